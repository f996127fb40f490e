// Integer multiply-accumulate for the AVX2 kernels: one VNNI instruction where the build
// target has it (AVX512-VNNI with VL, or AVX-VNNI), else the AVX2 pair. Both give the same
// integers: the kernels' 16-bit pair sums cannot saturate (u8 <= 15 or |s8| <= 127 operands).
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

// acc + the sum of each 4 u8 * s8 products, per 32-bit lane
static inline __m256i pi_dpbusd(__m256i acc, __m256i u8, __m256i s8) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u8, s8);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u8, s8);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(u8, s8)));
#endif
}

// acc + the sum of each 2 s16 * s16 products, per 32-bit lane (wrapping, as the add would)
static inline __m256i pi_dpwssd(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
#endif
