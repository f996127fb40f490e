#include "pi-ffn-dense.h"

#include "pi-bundle.h"

#include <cmath>
#include <cstring>
#include <vector>

// Output columns per tile and tokens per pass: a 16 x 256 f32 accumulator (16 KiB) stays in L1
// while every neuron's down_t row segment is dequantized once per pass and added to it.
static const int64_t TILE_COLS   = 256;
static const int64_t TILE_TOKENS = 16;

void pi_down_t_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor * act    = dst->src[0];
    const struct ggml_tensor * down_t = dst->src[1];
    const int64_t n_ff   = down_t->ne[1];
    const int64_t n_embd = down_t->ne[0];
    const int64_t n_tok  = act->ne[1];
    const struct ggml_type_traits * tt = ggml_get_type_traits(down_t->type);
    const int64_t blck = tt->blck_size;
    const int64_t tile = TILE_COLS % blck == 0 ? TILE_COLS : blck;
    const int64_t n_tiles = (n_embd + tile - 1) / tile;

    static thread_local std::vector<float> row;
    static thread_local std::vector<float> acc;
    row.resize(tile);
    acc.resize(TILE_TOKENS * tile);

    for (int64_t tl = ith; tl < n_tiles; tl += nth) {
        const int64_t j0 = tl * tile;
        const int64_t w  = j0 + tile <= n_embd ? tile : n_embd - j0;
        const size_t  row_off = (size_t) (j0 / blck) * tt->type_size;
        for (int64_t t0 = 0; t0 < n_tok; t0 += TILE_TOKENS) {
            const int64_t nt = t0 + TILE_TOKENS <= n_tok ? TILE_TOKENS : n_tok - t0;
            std::memset(acc.data(), 0, sizeof(float) * nt * tile);
            for (int64_t i = 0; i < n_ff; i++) {
                float a[TILE_TOKENS];
                bool any = false;
                for (int64_t t = 0; t < nt; t++) {
                    a[t] = *(const float *) ((const char *) act->data + (t0 + t)*act->nb[1] + i*act->nb[0]);
                    any |= a[t] != 0.0f;
                }
                if (!any) {
                    continue;
                }
                const char * src = (const char *) down_t->data + i*down_t->nb[1] + row_off;
                if (down_t->type == GGML_TYPE_F32) {
                    std::memcpy(row.data(), src, sizeof(float) * w);
                } else {
                    tt->to_float(src, row.data(), w);
                }
                for (int64_t t = 0; t < nt; t++) {
                    float * __restrict out = acc.data() + t*tile;
                    const float * __restrict r = row.data();
                    const float at = a[t];
                    for (int64_t k = 0; k < w; k++) {
                        out[k] += at * r[k];
                    }
                }
            }
            for (int64_t t = 0; t < nt; t++) {
                std::memcpy((char *) dst->data + (t0 + t)*dst->nb[1] + j0*sizeof(float), acc.data() + t*tile, sizeof(float) * w);
            }
        }
    }
    (void) userdata;
}

static inline float relu(float x) {
    return x > 0.0f ? x : 0.0f;
}

float pi_gate_activation(const pi_bundle_layer * L, float g) {
    switch (L->activation) {
        case PI_ACT_RELU:
        case PI_ACT_DRELU:   return relu(g);
        case PI_ACT_RELU2:   return relu(g) * relu(g);
        case PI_ACT_FATRELU: return g > L->act_threshold ? g : 0.0f;
        case PI_ACT_SILU_THRESHOLD: {
            const float a = g / (1.0f + expf(-g));
            return fabsf(a) > L->act_threshold ? a : 0.0f;
        }
        case PI_ACT_GELU_THRESHOLD: { // the tanh approximation, as ggml's GeGLU
            const float a = 0.5f*g*(1.0f + tanhf(0.7978845608f*g*(1.0f + 0.044715f*g*g)));
            return fabsf(a) > L->act_threshold ? a : 0.0f;
        }
        default:             return 0.0f; // PI_ACT_GRAPH: the graph's GLU runs instead
    }
}

void pi_activation_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const pi_bundle_layer * L = (const pi_bundle_layer *) userdata;
    const struct ggml_tensor * gate = dst->src[0];
    const struct ggml_tensor * up   = dst->src[1];
    const int64_t n = dst->ne[0];
    const int64_t rows = ggml_nrows(dst);
    // split the flat range evenly: a single token still uses every thread
    const int64_t total = n * rows;
    const int64_t per = (total + nth - 1) / nth;
    const int64_t e0 = per * ith;
    const int64_t e1 = e0 + per < total ? e0 + per : total;
    for (int64_t e = e0; e < e1; e++) {
        const int64_t r = e / n, i = e % n;
        const float g = *(const float *) ((const char *) gate->data + r*gate->nb[1] + i*sizeof(float));
        const float u = *(const float *) ((const char *) up->data   + r*up->nb[1]   + i*sizeof(float));
        const float a = pi_gate_activation(L, g);
        const float y = a == 0.0f ? 0.0f : a * (L->activation == PI_ACT_DRELU ? relu(u) : u);
        *(float *) ((char *) dst->data + r*dst->nb[1] + i*sizeof(float)) = y;
    }
}
