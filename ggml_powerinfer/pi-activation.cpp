#include "pi-activation.h"

#include "pi-profile.h"

#include <cmath>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PI_ACT_AVX2 1

// gelu(g) = 0.5*g*(1 + tanh(z)) = g / (1 + e^-2z), z = sqrt(2/pi) * g * (1 + a*g^2), ggml's
// tanh approximation; silu(g) = g / (1 + e^-g)
static const float GELU_SQRT_2_OVER_PI = 0.7978845608f;
static const float GELU_COEF_A         = 0.044715f;
#endif

#ifdef PI_ACT_AVX2
// e^x: x = n*ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^7 (relative error
// below 1e-8), times 2^n built in the exponent bits. x is clamped to [-87.3, 88.3] so that 2^n
// stays a normal float; above that the result is inf (as expf's), so g / (1 + e) is 0 for a
// very negative g and NaN (not firing) for -inf.
static inline __m256 exp_ps(__m256 x_in) {
    const __m256 x = _mm256_min_ps(_mm256_max_ps(x_in, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);   // ln2, high bits
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);        // ln2, the rest
    __m256 p = _mm256_set1_ps(1.0f/5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f/720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f/120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f/24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f/6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x_in, _mm256_set1_ps(88.3f), _CMP_GT_OQ));
}

// Eight thresholded SiLU/GELU activations: |f(g)| > t ? f(g) : 0 (NaN compares false: 0).
static inline __m256 thresholded8(bool gelu, __m256 g, float threshold) {
    __m256 e;
    if (gelu) {
        const __m256 g2 = _mm256_mul_ps(g, g);
        const __m256 z  = _mm256_mul_ps(_mm256_mul_ps(g, _mm256_set1_ps(-2.0f*GELU_SQRT_2_OVER_PI)),
                                        _mm256_fmadd_ps(g2, _mm256_set1_ps(GELU_COEF_A), _mm256_set1_ps(1.0f)));
        e = exp_ps(z);
    } else {
        e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
    }
    const __m256 a = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    const __m256 mag = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a);
    return _mm256_and_ps(a, _mm256_cmp_ps(mag, _mm256_set1_ps(threshold), _CMP_GT_OQ));
}
#endif

static void thresholded(bool gelu, float threshold, const float * g, float * a, int64_t n) {
#ifdef PI_ACT_AVX2
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        _mm256_storeu_ps(a + k, thresholded8(gelu, _mm256_loadu_ps(g + k), threshold));
    }
    if (k < n) { // the tail through the same lanes, so a value never depends on its position
        float gt[8] = { 0 }, at[8];
        memcpy(gt, g + k, sizeof(float) * (size_t) (n - k));
        _mm256_storeu_ps(at, thresholded8(gelu, _mm256_loadu_ps(gt), threshold));
        memcpy(a + k, at, sizeof(float) * (size_t) (n - k));
    }
#else
    for (int64_t k = 0; k < n; k++) { // libm, as the profiler that set the threshold
        const float v = pi_glu_apply(gelu ? PI_GLU_GELU : PI_GLU_SILU, g[k]);
        a[k] = fabsf(v) > threshold ? v : 0.0f;
    }
#endif
}

void pi_gate_activations(const struct pi_bundle_layer * L, const float * g, float * a, int64_t n) {
    const float t = L->act_threshold;
    switch (L->activation) {
        case PI_ACT_RELU:
        case PI_ACT_DRELU:
            for (int64_t k = 0; k < n; k++) { a[k] = g[k] > 0.0f ? g[k] : 0.0f; }
            break;
        case PI_ACT_RELU2:
            for (int64_t k = 0; k < n; k++) { a[k] = g[k] > 0.0f ? g[k]*g[k] : 0.0f; }
            break;
        case PI_ACT_FATRELU:
            for (int64_t k = 0; k < n; k++) { a[k] = g[k] > t ? g[k] : 0.0f; }
            break;
        case PI_ACT_SILU_THRESHOLD: thresholded(false, t, g, a, n); break;
        case PI_ACT_GELU_THRESHOLD: thresholded(true,  t, g, a, n); break;
        default: // PI_ACT_GRAPH: the graph's GLU runs instead
            memset(a, 0, sizeof(float) * (size_t) n);
            break;
    }
}
