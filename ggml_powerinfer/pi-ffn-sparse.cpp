#include "pi-ffn-sparse.h"

#include "pi-axpy.h"
#include "pi-dot.h"
#include "pi-down-batch.h"
#include "pi-ffn-dense.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <cstring>

// Neurons per work unit of op 2: one predictor tile. Units go round-robin to the threads:
// activity falls off smoothly along the hot-first order, so neighbouring units cost about the
// same.
static const int64_t NEURON_CHUNK = PI_PREDICTOR_TILE;

bool pi_sparse_supported(const pi_bundle_layer * L, const struct ggml_tensor * gate, const struct ggml_tensor * up,
                         const struct ggml_tensor * down_t) {
    if (L->activation == PI_ACT_GRAPH) {
        return false; // a dense SiLU/GELU layer without threshold: nothing to skip
    }
    const ggml_backend_buffer_type_t cpu = ggml_backend_cpu_buffer_type();
    if (gate->buffer == nullptr || up->buffer == nullptr || gate->buffer->buft != cpu || up->buffer->buft != cpu) {
        return false; // repacked rows interleave eight neurons
    }
    const struct ggml_type_traits_cpu * tt = ggml_get_type_traits_cpu(gate->type);
    if (tt == nullptr || tt->vec_dot == nullptr) {
        return false;
    }
    const struct ggml_type_traits_cpu * qt = ggml_get_type_traits_cpu(tt->vec_dot_type);
    if (tt->vec_dot_type != GGML_TYPE_F32 && (qt == nullptr || qt->from_float == nullptr)) {
        return false;
    }
    return pi_axpy_kernel(down_t->type) != nullptr;
}

void pi_sparse_layer_prepare(pi_sparse_layer * s) {
    const pi_bundle_layer * L = s->L;
    const enum ggml_type dot_type = ggml_get_type_traits_cpu((enum ggml_type) L->gate_type)->vec_dot_type;
    s->xq.resize(ggml_row_size(dot_type, L->n_embd));
    s->h.resize(s->pred != nullptr ? (size_t) s->pred->rank : 0);
    s->act.resize((size_t) L->n_ff);
    s->n_predicted = 0;
    s->n_active    = 0;
}

void pi_sparse_prepare_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    pi_sparse_layer * s = (pi_sparse_layer *) userdata;
    const pi_bundle_layer * L = s->L;
    const float * x = (const float *) s->x->data;
    if (ith == 0) {
        const struct ggml_type_traits_cpu * tt = ggml_get_type_traits_cpu((enum ggml_type) L->gate_type);
        if (tt->vec_dot_type == GGML_TYPE_F32) {
            memcpy(s->xq.data(), x, sizeof(float) * L->n_embd);
        } else {
            ggml_get_type_traits_cpu(tt->vec_dot_type)->from_float(x, s->xq.data(), L->n_embd);
        }
    }
    if (s->pred == nullptr) {
        return;
    }
    // h = relu(x . fc1) (x . fc1 for a linear predictor): each thread a slice of the rank, fc1's
    // rows read once by the team
    const int64_t rank = s->pred->rank;
    const int64_t per = ((rank + nth - 1) / nth + 7) / 8 * 8;
    const int64_t r0 = per * ith < rank ? per * ith : rank;
    const int64_t r1 = r0 + per < rank ? r0 + per : rank;
    float * h = s->h.data();
    memset(h + r0, 0, sizeof(float) * (r1 - r0));
    pi_axpy_f16_panel(r1 - r0, x, s->pred->fc1.data() + r0, (size_t) rank, L->n_embd, h + r0);
    if (!s->pred->linear) {
        for (int64_t r = r0; r < r1; r++) {
            h[r] = h[r] > 0.0f ? h[r] : 0.0f;
        }
    }
    (void) dst;
}

static inline float relu(float v) {
    return v > 0.0f ? v : 0.0f;
}

// out[list[j]] = dot(row list[j], xq) for the listed rows of a row-major matrix: the group
// kernel on up to PI_DOT_ROWS gathered rows at a time (the next group prefetched), or vec_dot.
static void gathered_dots(ggml_vec_dot_t vec_dot, pi_dot_rows_fn dot_rows, int n, const char * rows, size_t stride,
                          const int * list, int n_list, const void * xq, float * out) {
    if (dot_rows == nullptr) {
        for (int j = 0; j < n_list; j++) {
            vec_dot(n, &out[list[j]], 0, rows + (size_t) list[j]*stride, 0, xq, 0, 1);
        }
        return;
    }
    const char * ptr[NEURON_CHUNK];
    for (int j = 0; j < n_list; j++) {
        ptr[j] = rows + (size_t) list[j]*stride;
    }
    for (int j = 0; j < n_list; j += PI_DOT_ROWS) {
        const int n_rows = j + PI_DOT_ROWS <= n_list ? PI_DOT_ROWS : n_list - j;
        const int k = j + n_rows;
        const int n_next = k + PI_DOT_ROWS <= n_list ? PI_DOT_ROWS : n_list - k;
        float sums[PI_DOT_ROWS];
        dot_rows(n, n_rows, sums, ptr + j, n_next, ptr + k, xq);
        for (int r = 0; r < n_rows; r++) {
            out[list[j + r]] = sums[r];
        }
    }
}

void pi_sparse_neurons_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    pi_sparse_layer * s = (pi_sparse_layer *) userdata;
    const pi_bundle_layer * L = s->L;
    const ggml_vec_dot_t vec_dot = ggml_get_type_traits_cpu((enum ggml_type) L->gate_type)->vec_dot;
    const pi_dot_rows_fn dot_rows = pi_dot_rows_kernel((enum ggml_type) L->gate_type);
    const int n = (int) L->n_embd;
    const char * gate = (const char *) s->gate->data;
    const char * up   = (const char *) s->up->data;
    const size_t row  = L->gate_row;
    const void * xq   = s->xq.data();
    float * act = s->act.data();
    const int64_t rank = s->pred != nullptr ? s->pred->rank : 0;
    const float threshold = s->pred != nullptr ? L->predictor.threshold : 0.0f;
    const int64_t n_chunks = (L->n_ff + NEURON_CHUNK - 1) / NEURON_CHUNK;
    uint64_t n_predicted = 0, n_active = 0;
    float score[NEURON_CHUNK];

    for (int64_t c = ith; c < n_chunks; c += nth) {
        const int64_t i0 = c * NEURON_CHUNK;
        const int64_t m  = i0 + NEURON_CHUNK <= L->n_ff ? NEURON_CHUNK : L->n_ff - i0;
        if (s->pred != nullptr) {
            memcpy(score, s->pred->bias.data() + i0, sizeof(float) * m);
            memset(score + m, 0, sizeof(float) * (NEURON_CHUNK - m)); // tiles are zero-padded: whole rows
            pi_axpy_f16_panel(NEURON_CHUNK, s->h.data(), s->pred->fc2.data() + c*rank*NEURON_CHUNK,
                              (size_t) NEURON_CHUNK, rank, score);
        }
        // gate rows of the candidates, then the activation, then up rows of the neurons that fire
        bool  cand[NEURON_CHUNK];
        float g[NEURON_CHUNK];
        int   list[NEURON_CHUNK];
        int   n_list = 0;
        for (int64_t k = 0; k < m; k++) {
            cand[k] = s->pred == nullptr || score[k] >= threshold;
            if (cand[k]) {
                list[n_list++] = (int) k;
            }
        }
        n_predicted += (uint64_t) (s->gate_out != nullptr ? m : n_list);
        if (s->gate_out != nullptr) {
            memcpy(g, (const float *) s->gate_out->data + i0, sizeof(float) * m);
        } else {
            gathered_dots(vec_dot, dot_rows, n, gate + i0*row, row, list, n_list, xq, g);
        }
        float a[NEURON_CHUNK];
        float u[NEURON_CHUNK];
        n_list = 0;
        for (int64_t k = 0; k < m; k++) {
            a[k] = cand[k] ? pi_gate_activation(L, g[k]) : 0.0f;
            if (a[k] != 0.0f) {
                list[n_list++] = (int) k;
            }
        }
        gathered_dots(vec_dot, dot_rows, n, up + i0*row, row, list, n_list, xq, u);
        for (int64_t k = 0; k < m; k++) {
            const float y = a[k] == 0.0f ? 0.0f : a[k] * (L->activation == PI_ACT_DRELU ? relu(u[k]) : u[k]);
            act[i0 + k] = y;
            n_active += y != 0.0f;
        }
    }
    s->n_predicted += n_predicted;
    s->n_active    += n_active;
    (void) dst;
}

void pi_sparse_down_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const pi_sparse_layer * s = (const pi_sparse_layer *) userdata;
    pi_down_t_rows(s->down_t, s->act.data(), sizeof(float), (float *) dst->data, ith, nth);
}
