#include "pi-axpy.h"

#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define PI_AXPY_AVX2 1
#endif

// Block layouts of the GGUF quant types (ggml-common.h), as read here.
struct pi_q8_0 { uint16_t d; int8_t qs[32]; };
struct pi_q5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };
struct pi_q5_1 { uint16_t d; uint16_t m; uint8_t qh[4]; uint8_t qs[16]; };
struct pi_q4_0 { uint16_t d; uint8_t qs[16]; };
static_assert(sizeof(pi_q8_0) == 34 && sizeof(pi_q5_0) == 22 && sizeof(pi_q5_1) == 24 && sizeof(pi_q4_0) == 18,
              "block layouts");

// Any type ggml can dequantize: through a buffer, a block run at a time.
static void axpy_generic(enum ggml_type type, int64_t n, float a, const void * row, float * y) {
    static thread_local std::vector<float> buf;
    const struct ggml_type_traits * tt = ggml_get_type_traits(type);
    const int64_t step = tt->blck_size >= 1024 ? tt->blck_size : 1024 / tt->blck_size * tt->blck_size;
    buf.resize((size_t) step);
    for (int64_t j = 0; j < n; j += step) {
        const int64_t m = j + step <= n ? step : n - j;
        tt->to_float((const char *) row + (size_t) (j / tt->blck_size) * tt->type_size, buf.data(), m);
        for (int64_t k = 0; k < m; k++) {
            y[j + k] += a * buf[k];
        }
    }
}

#define PI_GENERIC_AXPY(name, type) \
    static void name(int64_t n, float a, const void * row, float * y) { axpy_generic(type, n, a, row, y); }
PI_GENERIC_AXPY(axpy_generic_q4_1, GGML_TYPE_Q4_1)
PI_GENERIC_AXPY(axpy_generic_q4_k, GGML_TYPE_Q4_K)
PI_GENERIC_AXPY(axpy_generic_q5_k, GGML_TYPE_Q5_K)
PI_GENERIC_AXPY(axpy_generic_q6_k, GGML_TYPE_Q6_K)
PI_GENERIC_AXPY(axpy_generic_q2_k, GGML_TYPE_Q2_K)
PI_GENERIC_AXPY(axpy_generic_q3_k, GGML_TYPE_Q3_K)
PI_GENERIC_AXPY(axpy_generic_bf16, GGML_TYPE_BF16)

static void axpy_f32(int64_t n, float a, const void * row, float * y) {
    const float * x = (const float *) row;
    for (int64_t k = 0; k < n; k++) {
        y[k] += a * x[k];
    }
}

#ifdef PI_AXPY_AVX2

static inline float f16_to_f32(uint16_t h) {
    return _cvtsh_ss(h);
}

// y[0..8) += a * (q[0..8) * d) for 8 signed bytes. q * d is the dequantized value exactly (a
// small integer times an f16 scale), so the sum rounds as the dense path's dequantize-then-FMA.
static inline void madd_i8x8(__m256 a, __m256 d, __m128i q8, float * y) {
    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), d);
    _mm256_storeu_ps(y, _mm256_fmadd_ps(a, v, _mm256_loadu_ps(y)));
}

// 32 signed bytes: y[0..32) += a * (q * d)
static inline void madd_i8x32(__m256 a, __m256 d, __m256i q, float * y) {
    const __m128i lo = _mm256_castsi256_si128(q);
    const __m128i hi = _mm256_extracti128_si256(q, 1);
    madd_i8x8(a, d, lo, y);
    madd_i8x8(a, d, _mm_srli_si128(lo, 8), y + 8);
    madd_i8x8(a, d, hi, y + 16);
    madd_i8x8(a, d, _mm_srli_si128(hi, 8), y + 24);
}

// The 32 nibbles of a Q4/Q5 block as bytes in element order: low nibbles are elements 0..15,
// high nibbles 16..31.
static inline __m256i nibbles_in_order(const uint8_t * qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *) qs);
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

// 0x10 in byte k where bit k of the 32-bit word is set (the fifth bit of Q5 quants)
static inline __m256i fifth_bits(const uint8_t * qh) {
    uint32_t bits;
    memcpy(&bits, qh, 4);
    // byte k takes byte k/8 of the word, then keeps bit k%8
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int) bits),
        _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
    const __m256i bit = _mm256_set1_epi64x((long long) 0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

static void axpy_f16(int64_t n, float a, const void * row, float * y) {
    const uint16_t * x = (const uint16_t *) row;
    const __m256 va = _mm256_set1_ps(a);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + k)));
        _mm256_storeu_ps(y + k, _mm256_fmadd_ps(va, v, _mm256_loadu_ps(y + k)));
    }
    for (; k < n; k++) {
        y[k] += a * f16_to_f32(x[k]);
    }
}

static void axpy_q8_0(int64_t n, float a, const void * row, float * y) {
    const pi_q8_0 * b = (const pi_q8_0 *) row;
    const __m256 va = _mm256_set1_ps(a);
    for (int64_t i = 0; i < n / 32; i++, y += 32) {
        madd_i8x32(va, _mm256_set1_ps(f16_to_f32(b[i].d)), _mm256_loadu_si256((const __m256i *) b[i].qs), y);
    }
}

static void axpy_q4_0(int64_t n, float a, const void * row, float * y) {
    const pi_q4_0 * b = (const pi_q4_0 *) row;
    const __m256 va = _mm256_set1_ps(a);
    for (int64_t i = 0; i < n / 32; i++, y += 32) {
        const __m256i q = _mm256_sub_epi8(nibbles_in_order(b[i].qs), _mm256_set1_epi8(8));
        madd_i8x32(va, _mm256_set1_ps(f16_to_f32(b[i].d)), q, y);
    }
}

static void axpy_q5_0(int64_t n, float a, const void * row, float * y) {
    const pi_q5_0 * b = (const pi_q5_0 *) row;
    const __m256 va = _mm256_set1_ps(a);
    for (int64_t i = 0; i < n / 32; i++, y += 32) {
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(nibbles_in_order(b[i].qs), fifth_bits(b[i].qh)),
                                          _mm256_set1_epi8(16));
        madd_i8x32(va, _mm256_set1_ps(f16_to_f32(b[i].d)), q, y);
    }
}

static void axpy_q5_1(int64_t n, float a, const void * row, float * y) {
    const pi_q5_1 * b = (const pi_q5_1 *) row;
    const __m256 va = _mm256_set1_ps(a);
    for (int64_t i = 0; i < n / 32; i++, y += 32) {
        const __m256 m = _mm256_set1_ps(a * f16_to_f32(b[i].m));
        // quants are 0..31: the bytes stay non-negative as signed int8
        const __m256i q = _mm256_or_si256(nibbles_in_order(b[i].qs), fifth_bits(b[i].qh));
        for (int k = 0; k < 32; k += 8) {
            _mm256_storeu_ps(y + k, _mm256_add_ps(_mm256_loadu_ps(y + k), m));
        }
        madd_i8x32(va, _mm256_set1_ps(f16_to_f32(b[i].d)), q, y);
    }
}

#else

PI_GENERIC_AXPY(axpy_f16, GGML_TYPE_F16)
PI_GENERIC_AXPY(axpy_q8_0, GGML_TYPE_Q8_0)
PI_GENERIC_AXPY(axpy_q4_0, GGML_TYPE_Q4_0)
PI_GENERIC_AXPY(axpy_q5_0, GGML_TYPE_Q5_0)
PI_GENERIC_AXPY(axpy_q5_1, GGML_TYPE_Q5_1)

#endif

pi_axpy_fn pi_axpy_kernel(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:  return axpy_f32;
        case GGML_TYPE_F16:  return axpy_f16;
        case GGML_TYPE_BF16: return axpy_generic_bf16;
        case GGML_TYPE_Q8_0: return axpy_q8_0;
        case GGML_TYPE_Q4_0: return axpy_q4_0;
        case GGML_TYPE_Q4_1: return axpy_generic_q4_1;
        case GGML_TYPE_Q5_0: return axpy_q5_0;
        case GGML_TYPE_Q5_1: return axpy_q5_1;
        case GGML_TYPE_Q2_K: return axpy_generic_q2_k;
        case GGML_TYPE_Q3_K: return axpy_generic_q3_k;
        case GGML_TYPE_Q4_K: return axpy_generic_q4_k;
        case GGML_TYPE_Q5_K: return axpy_generic_q5_k;
        case GGML_TYPE_Q6_K: return axpy_generic_q6_k;
        default:             return nullptr;
    }
}
