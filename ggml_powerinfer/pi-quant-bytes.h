// Q4_0 / Q5_0 quants as unsigned bytes in element order (bytes 0..15: elements 0..15 from the
// low nibbles; bytes 16..31: elements 16..31 from the high nibbles), for the AVX2 kernels of
// pi-dot.cpp and pi-axpy.cpp. Q4_0 values are these bytes minus 8, Q5_0's minus 16.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

// The 16 bytes of nibbles loaded into both halves, the upper half shifted by a per-lane count:
// no insert on the shuffle unit.
static inline __m256i pi_nibble_bytes(const uint8_t * qs) {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *) qs));
    return _mm256_and_si256(_mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0F));
}

// 0x10 in byte k where bit k of Q5's 32-bit qh word is set.
static inline __m256i pi_fifth_bits(const uint8_t * qh) {
    uint32_t bits;
    memcpy(&bits, qh, sizeof(bits));
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_maskz_mov_epi8((__mmask32) bits, _mm256_set1_epi8(0x10)); // the word is a byte mask
#else
    // byte k takes byte k/8 of the word, then keeps bit k%8
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int) bits),
        _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x((long long) 0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
#endif
}

// A Q5_0 block's quants as bytes in [0, 31].
static inline __m256i pi_q5_bytes(const uint8_t * qh, const uint8_t * qs) {
    return _mm256_or_si256(pi_nibble_bytes(qs), pi_fifth_bits(qh));
}
#endif
