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

// Any type ggml can dequantize: through a buffer, a block run at a time, row by row.
static void axpy_generic(enum ggml_type type, int64_t n, int n_rows, const float * a, const char * const * rows,
                         float * y) {
    static thread_local std::vector<float> buf;
    const struct ggml_type_traits * tt = ggml_get_type_traits(type);
    const int64_t step = tt->blck_size >= 1024 ? tt->blck_size : 1024 / tt->blck_size * tt->blck_size;
    buf.resize((size_t) step);
    for (int r = 0; r < n_rows; r++) {
        for (int64_t j = 0; j < n; j += step) {
            const int64_t m = j + step <= n ? step : n - j;
            tt->to_float(rows[r] + (size_t) (j / tt->blck_size) * tt->type_size, buf.data(), m);
            for (int64_t k = 0; k < m; k++) {
                y[j + k] += a[r] * buf[k];
            }
        }
    }
}

#define PI_GENERIC_AXPY(name, type)                                                                     \
    static void name(int64_t n, int n_rows, const float * a, const char * const * rows, int n_next,     \
                     const char * const * next, float * y) {                                            \
        (void) n_next; (void) next;                                                                      \
        axpy_generic(type, n, n_rows, a, rows, y);                                                       \
    }
PI_GENERIC_AXPY(axpy_generic_q4_1, GGML_TYPE_Q4_1)
PI_GENERIC_AXPY(axpy_generic_q4_k, GGML_TYPE_Q4_K)
PI_GENERIC_AXPY(axpy_generic_q5_k, GGML_TYPE_Q5_K)
PI_GENERIC_AXPY(axpy_generic_q6_k, GGML_TYPE_Q6_K)
PI_GENERIC_AXPY(axpy_generic_q2_k, GGML_TYPE_Q2_K)
PI_GENERIC_AXPY(axpy_generic_q3_k, GGML_TYPE_Q3_K)
PI_GENERIC_AXPY(axpy_generic_bf16, GGML_TYPE_BF16)

static void axpy_f32(int64_t n, int n_rows, const float * a, const char * const * rows, int n_next,
                     const char * const * next, float * y) {
    (void) n_next; (void) next;
    for (int r = 0; r < n_rows; r++) {
        const float * x = (const float *) rows[r];
        for (int64_t k = 0; k < n; k++) {
            y[k] += a[r] * x[k];
        }
    }
}

#ifdef PI_AXPY_AVX2

static inline float f16_to_f32(uint16_t h) {
    return _cvtsh_ss(h);
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

// 32 signed bytes as four vectors of eight floats
static inline void bytes_to_floats(__m256i q, __m256 v[4]) {
    const __m128i lo = _mm256_castsi256_si128(q);
    const __m128i hi = _mm256_extracti128_si256(q, 1);
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

// Block decoders: 32 elements as v[0..4) * d + m.
struct dec_f16 {
    static const size_t size = 64;
    static const bool has_min = false;
    static inline void decode(const char * p, __m256 v[4], float * d, float * m) {
        const __m128i * h = (const __m128i *) p;
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_cvtph_ps(_mm_loadu_si128(h + k));
        }
        *d = 1.0f;
        *m = 0.0f;
    }
};

struct dec_q8_0 {
    static const size_t size = sizeof(pi_q8_0);
    static const bool has_min = false;
    static inline void decode(const char * p, __m256 v[4], float * d, float * m) {
        const pi_q8_0 * b = (const pi_q8_0 *) p;
        bytes_to_floats(_mm256_loadu_si256((const __m256i *) b->qs), v);
        *d = f16_to_f32(b->d);
        *m = 0.0f;
    }
};

struct dec_q4_0 {
    static const size_t size = sizeof(pi_q4_0);
    static const bool has_min = false;
    static inline void decode(const char * p, __m256 v[4], float * d, float * m) {
        const pi_q4_0 * b = (const pi_q4_0 *) p;
        bytes_to_floats(_mm256_sub_epi8(nibbles_in_order(b->qs), _mm256_set1_epi8(8)), v);
        *d = f16_to_f32(b->d);
        *m = 0.0f;
    }
};

struct dec_q5_0 {
    static const size_t size = sizeof(pi_q5_0);
    static const bool has_min = false;
    static inline void decode(const char * p, __m256 v[4], float * d, float * m) {
        const pi_q5_0 * b = (const pi_q5_0 *) p;
        const __m256i q = _mm256_or_si256(nibbles_in_order(b->qs), fifth_bits(b->qh));
        bytes_to_floats(_mm256_sub_epi8(q, _mm256_set1_epi8(16)), v);
        *d = f16_to_f32(b->d);
        *m = 0.0f;
    }
};

struct dec_q5_1 {
    static const size_t size = sizeof(pi_q5_1);
    static const bool has_min = true;
    static inline void decode(const char * p, __m256 v[4], float * d, float * m) {
        const pi_q5_1 * b = (const pi_q5_1 *) p;
        // quants are 0..31: the bytes stay non-negative as signed int8
        bytes_to_floats(_mm256_or_si256(nibbles_in_order(b->qs), fifth_bits(b->qh)), v);
        *d = f16_to_f32(b->d);
        *m = f16_to_f32(b->m);
    }
};

// y += sum over R rows of a[r] * row[r], 32 elements at a time: y is loaded and stored once per
// block for all R rows, and the next group's rows are prefetched a cache line per line read.
template <int R, typename D>
static void axpy_block_rows(int64_t n, const float * a, const char * const * rows, int n_next,
                            const char * const * next, float * y) {
    size_t fetched = 0;
    for (int64_t i = 0; i < n / 32; i++, y += 32) {
        const size_t off = (size_t) i * D::size;
        while (off + D::size > fetched) {
            for (int r = 0; r < n_next; r++) {
                _mm_prefetch(next[r] + fetched, _MM_HINT_T0);
            }
            fetched += 64;
        }
        __m256 acc[4];
        for (int k = 0; k < 4; k++) {
            acc[k] = _mm256_loadu_ps(y + 8*k);
        }
        for (int r = 0; r < R; r++) {
            __m256 v[4];
            float d, m;
            D::decode(rows[r] + off, v, &d, &m);
            const __m256 s = _mm256_set1_ps(a[r] * d);
            for (int k = 0; k < 4; k++) {
                acc[k] = _mm256_fmadd_ps(s, v[k], acc[k]);
            }
            if (D::has_min) {
                const __m256 am = _mm256_set1_ps(a[r] * m);
                for (int k = 0; k < 4; k++) {
                    acc[k] = _mm256_add_ps(acc[k], am);
                }
            }
        }
        for (int k = 0; k < 4; k++) {
            _mm256_storeu_ps(y + 8*k, acc[k]);
        }
    }
}

template <typename D>
static void axpy_rows(int64_t n, int n_rows, const float * a, const char * const * rows, int n_next,
                      const char * const * next, float * y) {
    switch (n_rows) {
        case 1:  axpy_block_rows<1, D>(n, a, rows, n_next, next, y); break;
        case 2:  axpy_block_rows<2, D>(n, a, rows, n_next, next, y); break;
        case 3:  axpy_block_rows<3, D>(n, a, rows, n_next, next, y); break;
        default: axpy_block_rows<4, D>(n, a, rows, n_next, next, y); break;
    }
}
static_assert(PI_AXPY_ROWS == 4, "the dispatch above covers 1..4 rows");

static void axpy_f16(int64_t n, int n_rows, const float * a, const char * const * rows, int n_next,
                     const char * const * next, float * y) {
    if (n % 32 == 0) {
        axpy_rows<dec_f16>(n, n_rows, a, rows, n_next, next, y);
        return;
    }
    for (int r = 0; r < n_rows; r++) { // rows whose length is not a multiple of 32
        const uint16_t * x = (const uint16_t *) rows[r];
        const __m256 va = _mm256_set1_ps(a[r]);
        int64_t k = 0;
        for (; k + 8 <= n; k += 8) {
            const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + k)));
            _mm256_storeu_ps(y + k, _mm256_fmadd_ps(va, v, _mm256_loadu_ps(y + k)));
        }
        for (; k < n; k++) {
            y[k] += a[r] * f16_to_f32(x[k]);
        }
    }
}

#define axpy_q8_0 axpy_rows<dec_q8_0>
#define axpy_q4_0 axpy_rows<dec_q4_0>
#define axpy_q5_0 axpy_rows<dec_q5_0>
#define axpy_q5_1 axpy_rows<dec_q5_1>

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
