#include "pi-dot.h"

#include "pi-quant-bytes.h"
#include "pi-vnni.h"

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

// ggml's block layouts (ggml-common.h is internal; these are fixed by the GGUF format)
#define PI_QK 32
struct pi_block_q4_0 { uint16_t d; uint8_t qs[PI_QK / 2]; };
struct pi_block_q8_0 { uint16_t d; int8_t  qs[PI_QK]; };
struct pi_block_q5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[PI_QK / 2]; };
static_assert(sizeof(pi_block_q4_0) == 18, "q4_0 block");
static_assert(sizeof(pi_block_q5_0) == 22, "q5_0 block");
static_assert(sizeof(pi_block_q8_0) == 34, "q8_0 block");

// F16 -> F32 by table, as ggml's CPU backend does: a scale becomes one broadcast load from the
// table instead of an insert, convert and broadcast on the vector shuffle unit, which the
// nibble unpacking already keeps busy (8 gathered Q4_0 rows: ~15% faster). Our own copy:
// ggml-cpu's ggml_table_f32_f16 is exported but declared only in its internal headers.
static float f16_table[1 << 16];
[[maybe_unused]] static const bool f16_table_filled = [] { // at load, before any kernel runs
    for (uint32_t h = 0; h < (1u << 16); h++) {
        f16_table[h] = _cvtsh_ss((uint16_t) h);
    }
    return true;
}();

// dx * dy for every lane
static inline __m256 scale_product(uint16_t dx, const __m256 dy) {
    return _mm256_mul_ps(_mm256_broadcast_ss(&f16_table[dx]), dy);
}

// Same reduction order as ggml's hsum_float_8.
static inline float hsum_float_8(const __m256 x) {
    __m128 res = _mm256_extractf128_ps(x, 1);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

// Prefetch, for each row of the next group, the cache line at byte `off` (called once per line
// of the current rows, so both groups advance together). Into L2: eight gathered rows of 4096
// values and the next eight fill L1 (32 KiB), and fetching into it evicted the rows being read
// (7B-class sparse decode: FFN 10% faster into L2).
static inline void prefetch_rows(int n_next, const char * const * next, size_t off) {
    for (int r = 0; r < n_next; r++) {
        _mm_prefetch(next[r] + off, _MM_HINT_T1);
    }
}

// The 32 values of a block as bytes in [0, 15] (Q4_0) or [0, 31] (Q5_0).
static inline __m256i unsigned_values(const pi_block_q4_0 * b) {
    return pi_nibble_bytes(b->qs);
}

static inline __m256i unsigned_values(const pi_block_q5_0 * b) {
    return pi_q5_bytes(b->qh, b->qs);
}

// Q4_0 / Q5_0 x Q8_0, values stored unsigned with an offset (8 / 16). ggml computes lane j =
// sum over 4 bytes of (x - offset) * y with a sign trick; here lane j = sum of x * y minus
// offset * sum of y: the same integer, with the activation part computed once for all rows.
template <typename Block, int OFFSET, int R>
static void dot_offset(int n, float * out, const char * const * rows, int n_next, const char * const * next,
                       const void * vy) {
    const int nb = n / PI_QK;
    const pi_block_q8_0 * y = (const pi_block_q8_0 *) vy;
    const Block * x[R];
    for (int r = 0; r < R; r++) {
        x[r] = (const Block *) rows[r];
    }
    const __m256i offset = _mm256_set1_epi8(OFFSET);
    __m256 acc[R];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_setzero_ps();
    }
    size_t fetched = 0; // bytes of the next rows prefetched so far
    for (int ib = 0; ib < nb; ib++) {
        if ((ib + 1) * sizeof(Block) > fetched) {
            prefetch_rows(n_next, next, fetched);
            fetched += 64;
        }
        const __m256i qy   = _mm256_loadu_si256((const __m256i *) y[ib].qs);
        const __m256i corr = _mm256_sub_epi32(_mm256_setzero_si256(), pi_dpbusd(_mm256_setzero_si256(), offset, qy));
        const __m256  dy   = _mm256_broadcast_ss(&f16_table[y[ib].d]);
        for (int r = 0; r < R; r++) {
            const __m256 q = _mm256_cvtepi32_ps(pi_dpbusd(corr, unsigned_values(&x[r][ib]), qy)); // x.y - offset*sum(y)
            acc[r] = _mm256_fmadd_ps(scale_product(x[r][ib].d, dy), q, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        out[r] = hsum_float_8(acc[r]);
    }
}

template <int R>
static void dot_q4_0(int n, float * out, const char * const * rows, int n_next, const char * const * next, const void * y) {
    dot_offset<pi_block_q4_0, 8, R>(n, out, rows, n_next, next, y);
}

template <int R>
static void dot_q5_0(int n, float * out, const char * const * rows, int n_next, const char * const * next, const void * y) {
    dot_offset<pi_block_q5_0, 16, R>(n, out, rows, n_next, next, y);
}

// Q8_0 x Q8_0: ggml's arithmetic per row, rows interleaved.
template <int R>
static void dot_q8_0(int n, float * out, const char * const * rows, int n_next, const char * const * next,
                     const void * vy) {
    const int nb = n / PI_QK;
    const pi_block_q8_0 * y = (const pi_block_q8_0 *) vy;
    const pi_block_q8_0 * x[R];
    for (int r = 0; r < R; r++) {
        x[r] = (const pi_block_q8_0 *) rows[r];
    }
    __m256 acc[R];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_setzero_ps();
    }
    size_t fetched = 0;
    for (int ib = 0; ib < nb; ib++) {
        if ((ib + 1) * sizeof(pi_block_q8_0) > fetched) {
            prefetch_rows(n_next, next, fetched);
            fetched += 64;
        }
        const __m256i qy = _mm256_loadu_si256((const __m256i *) y[ib].qs);
        const __m256  dy = _mm256_broadcast_ss(&f16_table[y[ib].d]);
        for (int r = 0; r < R; r++) {
            const __m256i qx  = _mm256_loadu_si256((const __m256i *) x[r][ib].qs);
            const __m256i ax  = _mm256_sign_epi8(qx, qx);
            const __m256i sy  = _mm256_sign_epi8(qy, qx);
            const __m256i dot = pi_dpbusd(_mm256_setzero_si256(), ax, sy);
            const __m256  d   = scale_product(x[r][ib].d, dy);
            acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        out[r] = hsum_float_8(acc[r]);
    }
}

static_assert(PI_DOT_ROWS == 8, "the dispatch below covers 1..8 rows");

// One instantiation per row count, so every count keeps its accumulators in registers.
#define PI_DOT_DISPATCH(name, kernel)                                                                    \
    static void name(int n, int n_rows, float * out, const char * const * rows, int n_next,             \
                     const char * const * next, const void * y) {                                       \
        switch (n_rows) {                                                                                \
            case 1: kernel<1>(n, out, rows, n_next, next, y); break;                                     \
            case 2: kernel<2>(n, out, rows, n_next, next, y); break;                                     \
            case 3: kernel<3>(n, out, rows, n_next, next, y); break;                                     \
            case 4: kernel<4>(n, out, rows, n_next, next, y); break;                                     \
            case 5: kernel<5>(n, out, rows, n_next, next, y); break;                                     \
            case 6: kernel<6>(n, out, rows, n_next, next, y); break;                                     \
            case 7: kernel<7>(n, out, rows, n_next, next, y); break;                                     \
            default: kernel<8>(n, out, rows, n_next, next, y); break;                                    \
        }                                                                                                \
    }
PI_DOT_DISPATCH(dot_rows_q4_0, dot_q4_0)
PI_DOT_DISPATCH(dot_rows_q5_0, dot_q5_0)
PI_DOT_DISPATCH(dot_rows_q8_0, dot_q8_0)

pi_dot_rows_fn pi_dot_rows_kernel(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_Q4_0: return dot_rows_q4_0;
        case GGML_TYPE_Q5_0: return dot_rows_q5_0;
        case GGML_TYPE_Q8_0: return dot_rows_q8_0;
        default:             return nullptr;
    }
}

#else

pi_dot_rows_fn pi_dot_rows_kernel(enum ggml_type type) {
    (void) type;
    return nullptr;
}

#endif
