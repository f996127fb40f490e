#include "pi-axpy.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#include "pi-quant-bytes.h"
#include "pi-vnni.h"
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
        bytes_to_floats(_mm256_sub_epi8(pi_nibble_bytes(b->qs), _mm256_set1_epi8(8)), v);
        *d = f16_to_f32(b->d);
        *m = 0.0f;
    }
};

struct dec_q5_0 {
    static const size_t size = sizeof(pi_q5_0);
    static const bool has_min = false;
    static inline void decode(const char * p, __m256 v[4], float * d, float * m) {
        const pi_q5_0 * b = (const pi_q5_0 *) p;
        const __m256i q = pi_q5_bytes(b->qh, b->qs);
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
        bytes_to_floats(pi_q5_bytes(b->qh, b->qs), v);
        *d = f16_to_f32(b->d);
        *m = f16_to_f32(b->m);
    }
};

// y += sum over R rows of a[r] * row[r], 32 elements at a time: y is loaded and stored once per
// block for all R rows, and the next group's rows are prefetched (into L2, as pi-dot.cpp's) a
// cache line per line read.
template <int R, typename D>
static void axpy_block_rows(int64_t n, const float * a, const char * const * rows, int n_next,
                            const char * const * next, float * y) {
    size_t fetched = 0;
    for (int64_t i = 0; i < n / 32; i++, y += 32) {
        const size_t off = (size_t) i * D::size;
        while (off + D::size > fetched) {
            for (int r = 0; r < n_next; r++) {
                _mm_prefetch(next[r] + fetched, _MM_HINT_T1);
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

// The integer kernel: quants as unsigned bytes (0..31 for Q5_0, 0..15 for Q4_0) in element
// order (pi-quant-bytes.h), so no lane crossing.
template <bool Q5>
static inline __m256i unsigned_quants(const char * p) {
    return Q5 ? pi_q5_bytes(((const pi_q5_0 *) p)->qh, ((const pi_q5_0 *) p)->qs) : pi_nibble_bytes(((const pi_q4_0 *) p)->qs);
}

// Rows per int32 accumulation. The sums wrap around freely on the way (two's complement), so
// only the result, sum of coefficient * (quant - offset), must fit: |coefficient| <= 2^14 and
// |quant - offset| <= 16 give 4096 * 2^14 * 16 = 2^30.
static const int64_t INT_CHUNK = 4096;
static const int     INT_PAIRS = 4; // row pairs per pass over the blocks
// Rows are added in tiers of equal step: a row whose |a[r]| * scale_max[r] lies in
// [2^(TIER_BITS*t), 2^(TIER_BITS*(t+1))) has coefficients rounded to multiples of
// 2^(TIER_BITS*(t+1) - 14), so its largest is at least 2^(14 - TIER_BITS) steps: every row keeps
// ten bits or more whatever the others hold (ReLU activations have a long tail), and its
// coefficients depend on its own activation only, so a token alone or in a batch rounds alike.
static const int TIER_BITS = 4;
static const int TIER_MIN  = -30; // tiers below this (values under 2^-120) go through the float kernel

// The float kernel over any number of rows.
template <bool Q5>
static void axpy_float(int64_t n, int64_t n_rows, const float * a, const char * const * rows, float * y) {
    for (int64_t r = 0; r < n_rows; r += 4) {
        const int k = (int) std::min<int64_t>(4, n_rows - r);
        axpy_rows<typename std::conditional<Q5, dec_q5_0, dec_q4_0>::type>(n, k, a + r, rows + r, 0, nullptr, y);
    }
}

// The tier of a positive finite value: floor(log2(v) / TIER_BITS), from the exponent bits (a
// subnormal's tier is below TIER_MIN whatever its exact value).
static inline int tier_of(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof(bits));
    const int biased = (int) ((bits >> 23) & 0xFF);
    const int l = biased > 0 ? biased - 127 : -150; // floor(log2 v)
    return l >= 0 ? l / TIER_BITS : -((-l + TIER_BITS - 1) / TIER_BITS);
}

// The F16 scales of blocks b..b+8 of a row (zero past nb), gathered in a register: through a
// small array they would be stored in pieces and reloaded whole, which stalls the load.
static inline __m128i block_scales(const char * row, int64_t b, int64_t nb, size_t bsize) {
    uint16_t d[8] = {0};
    for (int t = 0; t < 8 && b + t < nb; t++) {
        memcpy(&d[t], row + (size_t) (b + t) * bsize, sizeof(uint16_t));
    }
    return _mm_set_epi16((short) d[7], (short) d[6], (short) d[5], (short) d[4],
                         (short) d[3], (short) d[2], (short) d[1], (short) d[0]);
}

template <bool Q5>
static void axpy_int_tier(int64_t n, int64_t n_rows, const float * a, const char * const * rows, float step, float * y) {
    const size_t bsize  = Q5 ? sizeof(pi_q5_0) : sizeof(pi_q4_0);
    const int    offset = Q5 ? 16 : 8;
    const int64_t nb  = n / 32;
    const int64_t nb8 = (nb + 7) / 8 * 8;
    const float inv = 1.0f / step;
    static thread_local std::vector<int32_t> acc, coef, pairs, coef_sum;
    acc.resize((size_t) n);
    coef.resize((size_t) (2 * INT_PAIRS * nb8));
    pairs.resize((size_t) (INT_PAIRS * nb8));
    coef_sum.resize((size_t) nb8);
    const __m256i zero = _mm256_setzero_si256();

    for (int64_t c0 = 0; c0 < n_rows; c0 += INT_CHUNK) {
        const int64_t c1 = std::min(n_rows, c0 + INT_CHUNK);
        std::fill(acc.begin(), acc.end(), 0);
        std::fill(coef_sum.begin(), coef_sum.end(), 0);
        for (int64_t g = c0; g < c1; g += 2 * INT_PAIRS) {
            // the group's coefficients, a[r] * d / step rounded, for every block (rows past the
            // end repeat the group's first with coefficient 0)
            const char * row[2 * INT_PAIRS];
            const char * next[2 * INT_PAIRS];
            int n_next = 0;
            for (int k = 0; k < 2 * INT_PAIRS; k++) {
                const bool real = g + k < c1;
                row[k] = rows[real ? g + k : g];
                if (g + 2 * INT_PAIRS + k < c1) {
                    next[n_next++] = rows[g + 2 * INT_PAIRS + k];
                }
                const __m256 ak = _mm256_set1_ps(real ? a[g + k] * inv : 0.0f);
                for (int64_t b = 0; b < nb; b += 8) {
                    const __m256 cf = _mm256_mul_ps(ak, _mm256_cvtph_ps(block_scales(row[k], b, nb, bsize)));
                    _mm256_storeu_si256((__m256i *) &coef[(size_t) (k * nb8 + b)], _mm256_cvtps_epi32(cf));
                }
            }
            // pairs of rows as (low, high) int16 halves for madd; their sums for the offset
            for (int p = 0; p < INT_PAIRS; p++) {
                for (int64_t b = 0; b < nb; b += 8) {
                    const __m256i lo = _mm256_loadu_si256((const __m256i *) &coef[(size_t) (2 * p * nb8 + b)]);
                    const __m256i hi = _mm256_loadu_si256((const __m256i *) &coef[(size_t) ((2 * p + 1) * nb8 + b)]);
                    _mm256_storeu_si256((__m256i *) &pairs[(size_t) (p * nb8 + b)],
                                        _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(hi, 16)));
                    __m256i * s = (__m256i *) &coef_sum[(size_t) b];
                    _mm256_storeu_si256(s, _mm256_add_epi32(_mm256_loadu_si256(s), _mm256_add_epi32(lo, hi)));
                }
            }
            // sums of coefficient * quant, a block at a time for all pairs; the next group prefetched
            size_t fetched = 0;
            for (int64_t b = 0; b < nb; b++) {
                const size_t off = (size_t) b * bsize;
                while (off + bsize > fetched) { // into L2, as pi-dot.cpp's prefetch_rows
                    for (int k = 0; k < n_next; k++) {
                        _mm_prefetch(next[k] + fetched, _MM_HINT_T1);
                    }
                    fetched += 64;
                }
                __m256i * v = (__m256i *) &acc[(size_t) (32 * b)];
                __m256i s0 = _mm256_loadu_si256(v + 0), s1 = _mm256_loadu_si256(v + 1);
                __m256i s2 = _mm256_loadu_si256(v + 2), s3 = _mm256_loadu_si256(v + 3);
                for (int p = 0; p < INT_PAIRS; p++) {
                    const __m256i cp = _mm256_set1_epi32(pairs[(size_t) (p * nb8 + b)]);
                    const __m256i q0 = unsigned_quants<Q5>(row[2 * p] + off);
                    const __m256i q1 = unsigned_quants<Q5>(row[2 * p + 1] + off);
                    // bytes (q0, q1) side by side, widened to int16: one madd per 8 elements
                    const __m256i lo = _mm256_unpacklo_epi8(q0, q1), hi = _mm256_unpackhi_epi8(q0, q1);
                    s0 = pi_dpwssd(s0, _mm256_unpacklo_epi8(lo, zero), cp);
                    s1 = pi_dpwssd(s1, _mm256_unpackhi_epi8(lo, zero), cp);
                    s2 = pi_dpwssd(s2, _mm256_unpacklo_epi8(hi, zero), cp);
                    s3 = pi_dpwssd(s3, _mm256_unpackhi_epi8(hi, zero), cp);
                }
                _mm256_storeu_si256(v + 0, s0); _mm256_storeu_si256(v + 1, s1);
                _mm256_storeu_si256(v + 2, s2); _mm256_storeu_si256(v + 3, s3);
            }
        }
        // y += step * (sum - offset * coefficient sum); the unpacks left each block's elements as
        // s0 = 0..3|16..19, s1 = 4..7|20..23, s2 = 8..11|24..27, s3 = 12..15|28..31
        const __m256 vs = _mm256_set1_ps(step);
        for (int64_t b = 0; b < nb; b++) {
            const __m256i o = _mm256_set1_epi32(offset * coef_sum[(size_t) b]);
            const __m256i * v = (const __m256i *) &acc[(size_t) (32 * b)];
            const __m256i s0 = _mm256_sub_epi32(_mm256_loadu_si256(v + 0), o);
            const __m256i s1 = _mm256_sub_epi32(_mm256_loadu_si256(v + 1), o);
            const __m256i s2 = _mm256_sub_epi32(_mm256_loadu_si256(v + 2), o);
            const __m256i s3 = _mm256_sub_epi32(_mm256_loadu_si256(v + 3), o);
            const __m256i e[4] = { _mm256_permute2x128_si256(s0, s1, 0x20), _mm256_permute2x128_si256(s2, s3, 0x20),
                                   _mm256_permute2x128_si256(s0, s1, 0x31), _mm256_permute2x128_si256(s2, s3, 0x31) };
            float * yb = y + 32 * b;
            for (int k = 0; k < 4; k++) {
                _mm256_storeu_ps(yb + 8 * k, _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(e[k]), _mm256_loadu_ps(yb + 8 * k)));
            }
        }
    }
}

// Rows grouped by tier (a counting sort), then one integer pass per tier.
template <bool Q5>
static void axpy_int(int64_t n, int64_t n_rows, const float * a, const float * scale_max, const char * const * rows, float * y) {
    static thread_local std::vector<int> tier;
    static thread_local std::vector<int64_t> start;
    static thread_local std::vector<const char *> tier_rows;
    static thread_local std::vector<float> tier_a;
    tier.resize((size_t) n_rows);
    int t_lo = INT32_MAX, t_hi = INT32_MIN;
    for (int64_t r = 0; r < n_rows; r++) {
        const float v = std::fabs(a[r]) * scale_max[r];
        if (!std::isfinite(v)) { // a NaN or inf: passed on as the float kernel would
            axpy_float<Q5>(n, n_rows, a, rows, y);
            return;
        }
        tier[r] = v > 0.0f ? std::max(tier_of(v), TIER_MIN - 1) : INT32_MIN; // zero rows add nothing
        if (tier[r] != INT32_MIN) {
            t_lo = std::min(t_lo, tier[r]);
            t_hi = std::max(t_hi, tier[r]);
        }
    }
    if (t_lo > t_hi) {
        return;
    }
    start.assign((size_t) (t_hi - t_lo + 2), 0);
    for (int64_t r = 0; r < n_rows; r++) {
        if (tier[r] != INT32_MIN) {
            start[(size_t) (tier[r] - t_lo + 1)]++;
        }
    }
    for (size_t t = 1; t < start.size(); t++) {
        start[t] += start[t - 1];
    }
    tier_rows.resize((size_t) start.back());
    tier_a.resize((size_t) start.back());
    for (int64_t r = 0; r < n_rows; r++) {
        if (tier[r] != INT32_MIN) {
            const int64_t at = start[(size_t) (tier[r] - t_lo)]++;
            tier_rows[(size_t) at] = rows[r];
            tier_a[(size_t) at]    = a[r];
        }
    }
    int64_t begin = 0;
    for (int t = t_lo; t <= t_hi; t++) {
        const int64_t end = start[(size_t) (t - t_lo)];
        if (end > begin) {
            if (t < TIER_MIN) {
                axpy_float<Q5>(n, end - begin, tier_a.data() + begin, tier_rows.data() + begin, y);
            } else {
                axpy_int_tier<Q5>(n, end - begin, tier_a.data() + begin, tier_rows.data() + begin,
                                  std::ldexp(1.0f, TIER_BITS * (t + 1) - 14), y);
            }
        }
        begin = end;
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

float pi_row_scale_max(enum ggml_type type, const char * row, int64_t n) {
    size_t bsize = 0;
    switch (type) {
        case GGML_TYPE_Q4_0: bsize = sizeof(pi_q4_0); break;
        case GGML_TYPE_Q5_0: bsize = sizeof(pi_q5_0); break;
        default: return 0.0f;
    }
    float m = 0.0f;
    for (int64_t b = 0; b < n / 32; b++) {
        uint16_t d;
        memcpy(&d, row + (size_t) b * bsize, sizeof(d));
        m = std::max(m, std::fabs(ggml_fp16_to_fp32(d)));
    }
    return m;
}

pi_axpy_int_fn pi_axpy_int_kernel(enum ggml_type type) {
#ifdef PI_AXPY_AVX2
    switch (type) {
        case GGML_TYPE_Q4_0: return axpy_int<false>;
        case GGML_TYPE_Q5_0: return axpy_int<true>;
        default:             return nullptr;
    }
#else
    GGML_UNUSED(type);
    return nullptr;
#endif
}
