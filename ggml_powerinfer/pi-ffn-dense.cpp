#include "pi-ffn-dense.h"

#include <cstring>

static inline float relu(float x) {
    return x > 0.0f ? x : 0.0f;
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
