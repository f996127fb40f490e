#include "pi-ffn-dense.h"

#include "pi-activation.h"

#include <algorithm>

// Elements per call of the array activation (on the stack).
static const int64_t SEGMENT = 256;

void pi_activation_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const pi_bundle_layer * L = (const pi_bundle_layer *) userdata;
    const struct ggml_tensor * gate = dst->src[0];
    const struct ggml_tensor * up   = dst->src[1];
    const int64_t n = dst->ne[0];
    const int64_t rows = ggml_nrows(dst);
    // split the flat range evenly: a single token still uses every thread
    const int64_t total = n * rows;
    const int64_t per = (total + nth - 1) / nth;
    const int64_t e0 = std::min(per * ith, total);
    const int64_t e1 = std::min(e0 + per, total);
    float a[SEGMENT];
    for (int64_t e = e0; e < e1; ) {
        const int64_t r = e / n, i = e % n;
        const int64_t len = std::min(std::min(SEGMENT, n - i), e1 - e);
        const float * g = (const float *) ((const char *) gate->data + r*gate->nb[1]) + i;
        const float * u = (const float *) ((const char *) up->data   + r*up->nb[1]) + i;
        float * y = (float *) ((char *) dst->data + r*dst->nb[1]) + i;
        pi_gate_activations(L, g, a, len);
        for (int64_t k = 0; k < len; k++) {
            y[k] = a[k] == 0.0f ? 0.0f : a[k] * pi_up_factor(L, u[k]);
        }
        e += len;
    }
}
