#include "pi-ffn-sparse.h"

#include "pi-activation.h"
#include "pi-axpy.h"
#include "pi-dot.h"
#include "pi-down-batch.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <cstring>

// Neurons per work unit of op 2. Threads claim units in hot-first order from a shared counter,
// so that neither waits long at the barrier whatever a token's active set (a unit costs about
// as much as it has neurons predicted).
static const int64_t NEURON_CHUNK = 512;

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

void pi_sparse_layer_prepare(pi_sparse_layer * s, int n_threads) {
    const pi_bundle_layer * L = s->L;
    const pi_predictor_ram * P = s->pred;
    const enum ggml_type dot_type = ggml_get_type_traits_cpu((enum ggml_type) L->gate_type)->vec_dot_type;
    s->n_threads = n_threads;
    s->xq.resize(ggml_row_size(dot_type, L->n_embd));
    s->x8.resize(P != nullptr ? ggml_row_size(GGML_TYPE_Q8_0, P->n_embd_padded) * n_threads : 0);
    s->h.assign(P != nullptr ? (size_t) P->rank_padded : 0, 0.0f); // the padding stays zero
    s->h8.resize(P != nullptr ? ggml_row_size(GGML_TYPE_Q8_0, P->rank_padded) * n_threads : 0);
    s->act.resize((size_t) L->n_ff);
    s->n_predicted = 0;
    s->n_active    = 0;
}

// out[j] = dot(row j, y) for the first n_rows rows of a row-major matrix of Q8_0 rows of n
// values: the group kernel on PI_DOT_ROWS rows at a time (the next group prefetched), or vec_dot.
static void q8_0_row_dots(int n, const char * rows, size_t stride, int64_t n_rows, const void * y, float * out) {
    const pi_dot_rows_fn dot_rows = pi_dot_rows_kernel(GGML_TYPE_Q8_0);
    if (dot_rows == nullptr) {
        const ggml_vec_dot_t vec_dot = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->vec_dot;
        for (int64_t j = 0; j < n_rows; j++) {
            vec_dot(n, &out[j], 0, rows + (size_t) j*stride, 0, y, 0, 1);
        }
        return;
    }
    const char * ptr[2 * PI_DOT_ROWS];
    for (int64_t j = 0; j < n_rows; j += PI_DOT_ROWS) {
        const int n_cur  = (int) (n_rows - j < PI_DOT_ROWS ? n_rows - j : PI_DOT_ROWS);
        const int64_t k  = j + n_cur;
        const int n_next = (int) (n_rows - k < PI_DOT_ROWS ? n_rows - k : PI_DOT_ROWS);
        for (int r = 0; r < n_cur + n_next; r++) {
            ptr[r] = rows + (size_t) (j + r)*stride;
        }
        dot_rows(n, n_cur, out + j, ptr, n_next, ptr + n_cur, y);
    }
}

// v (n values) as Q8_0 blocks of n_padded values, the tail block zero-padded.
static void quantize_q8_0_padded(const float * v, int64_t n, int64_t n_padded, char * dst) {
    const ggml_from_float_t quantize = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->from_float;
    const int64_t full = n / PI_Q8_0_BLOCK * PI_Q8_0_BLOCK;
    quantize(v, dst, full);
    if (full < n_padded) {
        float tail[PI_Q8_0_BLOCK] = { 0.0f };
        memcpy(tail, v + full, sizeof(float) * (size_t) (n - full));
        quantize(tail, dst + ggml_row_size(GGML_TYPE_Q8_0, full), PI_Q8_0_BLOCK);
    }
}

void pi_sparse_prepare_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    pi_sparse_layer * s = (pi_sparse_layer *) userdata;
    const pi_bundle_layer * L = s->L;
    const float * x = (const float *) s->x->data;
    GGML_ASSERT(nth <= s->n_threads);
    if (ith == 0) {
        s->next_chunk.store(0, std::memory_order_relaxed); // op 2 starts after the graph's barrier
        const struct ggml_type_traits_cpu * tt = ggml_get_type_traits_cpu((enum ggml_type) L->gate_type);
        if (tt->vec_dot_type == GGML_TYPE_F32) {
            memcpy(s->xq.data(), x, sizeof(float) * L->n_embd);
        } else {
            ggml_get_type_traits_cpu(tt->vec_dot_type)->from_float(x, s->xq.data(), L->n_embd);
        }
    }
    const pi_predictor_ram * P = s->pred;
    if (P == nullptr) {
        return;
    }
    // h = relu(x . fc1) (x . fc1 for a linear predictor): each thread a slice of the rank, with
    // its own copy of x in Q8_0 (quantizing it is cheaper than another barrier)
    const size_t x8_row = ggml_row_size(GGML_TYPE_Q8_0, P->n_embd_padded);
    char * x8 = s->x8.data() + x8_row * ith;
    quantize_q8_0_padded(x, L->n_embd, P->n_embd_padded, x8);
    const int64_t per = (P->rank + nth - 1) / nth;
    const int64_t r0 = per * ith < P->rank ? per * ith : P->rank;
    const int64_t r1 = r0 + per < P->rank ? r0 + per : P->rank;
    float * h = s->h.data();
    q8_0_row_dots((int) P->n_embd_padded, P->fc1.data() + x8_row * r0, x8_row, r1 - r0, x8, h + r0);
    if (!P->linear) {
        for (int64_t r = r0; r < r1; r++) {
            h[r] = h[r] > 0.0f ? h[r] : 0.0f;
        }
    }
    (void) dst;
}

// Rows fetched ahead of ggml's one-row vec_dot, into L2 (as the pi-dot kernels' prefetch).
static const int PREFETCH_AHEAD = 4;

static inline void prefetch_row(const char * row, size_t size) {
    for (size_t off = 0; off < size; off += 64) {
        __builtin_prefetch(row + off, 0, 2);
    }
}

// out[list[j]] = dot(row list[j], xq) for the listed rows of a row-major matrix: the group
// kernel on up to PI_DOT_ROWS gathered rows at a time (the next group prefetched), or vec_dot.
static void gathered_dots(ggml_vec_dot_t vec_dot, pi_dot_rows_fn dot_rows, int n, const char * rows, size_t stride,
                          const int * list, int n_list, const void * xq, float * out) {
    if (dot_rows == nullptr) { // one row at a time: the rows PREFETCH_AHEAD further on are fetched meanwhile
        for (int j = 0; j < n_list; j++) {
            if (j + PREFETCH_AHEAD < n_list) {
                prefetch_row(rows + (size_t) list[j + PREFETCH_AHEAD]*stride, stride);
            }
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
    const pi_predictor_ram * P = s->pred;
    const float threshold = P != nullptr ? L->predictor.threshold : 0.0f;
    const int64_t n_chunks = (L->n_ff + NEURON_CHUNK - 1) / NEURON_CHUNK;
    uint64_t n_predicted = 0, n_active = 0;
    // this thread's copy of h in Q8_0: the scores are dots of fc2 rows with it
    const size_t h8_row = P != nullptr ? ggml_row_size(GGML_TYPE_Q8_0, P->rank_padded) : 0;
    char * h8 = P != nullptr ? s->h8.data() + h8_row * ith : nullptr;
    if (P != nullptr) {
        quantize_q8_0_padded(s->h.data(), P->rank_padded, P->rank_padded, h8);
    }
    float score[NEURON_CHUNK];

    for (int64_t c; (c = s->next_chunk.fetch_add(1, std::memory_order_relaxed)) < n_chunks;) {
        const int64_t i0 = c * NEURON_CHUNK;
        const int64_t m  = i0 + NEURON_CHUNK <= L->n_ff ? NEURON_CHUNK : L->n_ff - i0;
        if (P != nullptr) {
            q8_0_row_dots((int) P->rank_padded, P->fc2.data() + h8_row * i0, h8_row, m, h8, score);
            for (int64_t k = 0; k < m; k++) {
                score[k] += P->bias[i0 + k];
            }
        }
        // gate rows of the candidates, then the activation, then up rows of the neurons that
        // fire; lists built without branches (which candidates pass is close to a coin toss)
        int list[NEURON_CHUNK];
        int n_list = 0;
        for (int64_t k = 0; k < m; k++) {
            list[n_list] = (int) k;
            n_list += P == nullptr || score[k] >= threshold;
        }
        n_predicted += (uint64_t) (s->gate_out != nullptr ? m : n_list);
        float g[NEURON_CHUNK];
        if (s->gate_out != nullptr) {
            memcpy(g, (const float *) s->gate_out->data + i0, sizeof(float) * m);
        } else {
            gathered_dots(vec_dot, dot_rows, n, gate + i0*row, row, list, n_list, xq, g);
        }
        float a[NEURON_CHUNK];
        int fire[NEURON_CHUNK];
        int n_fire = 0;
        float gl[NEURON_CHUNK], al[NEURON_CHUNK];
        for (int j = 0; j < n_list; j++) {
            gl[j] = g[list[j]];
        }
        pi_gate_activations(L, gl, al, n_list);
        for (int j = 0; j < n_list; j++) {
            const int k = list[j];
            a[k] = al[j];
            fire[n_fire] = k;
            n_fire += al[j] != 0.0f;
        }
        float u[NEURON_CHUNK];
        gathered_dots(vec_dot, dot_rows, n, up + i0*row, row, fire, n_fire, xq, u);
        memset(act + i0, 0, sizeof(float) * m);
        for (int j = 0; j < n_fire; j++) {
            const int k = fire[j];
            const float y = a[k] * pi_up_factor(L, u[k]);
            act[i0 + k] = y;
            n_active += y != 0.0f;
        }
    }
    s->n_predicted += n_predicted;
    s->n_active    += n_active;
    (void) dst; (void) nth;
}

void pi_sparse_down_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const pi_sparse_layer * s = (const pi_sparse_layer *) userdata;
    pi_down_t_rows(s->down_t, s->down_scale_max, s->act.data(), sizeof(float), (float *) dst->data, ith, nth);
}
