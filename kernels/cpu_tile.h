/* One register tile of exact 16-bit products: up to TILE_ROWS rows of int16 pairs against a panel of TILE_COLS
 * columns of int8 pairs, int32 sums (cpu_int8_gemm.c's many-row GEMM, cpu_attention_prefill.c's scores and
 * probability-weighted values).
 *
 * x: rows of int16, row r at x + r * xstride, read two at a time (pair p = x[2p], x[2p + 1]);
 * panel: [pairs][TILE_COLS][2] int8, column c's pair p at panel + p * 2 * TILE_COLS + 2 * c;
 * out[r][c] = sum over pairs p < pairs of x_r[2p] * panel(p, c, 0) + x_r[2p + 1] * panel(p, c, 1).
 *
 * vpmaddwd multiplies 16-bit pairs and adds each pair's products into an int32 lane: with |x| < 2**15 and
 * int8 panels a pair adds less than 2**23, so any caller that bounds `pairs` by its values keeps every sum
 * exact. The panel's two 16-byte halves are widened once (vpmovsxbw) for every row; each row's pair is
 * broadcast. Accumulators are named, not an array: GCC kept an array of tiles in memory (a store per
 * product). R is a constant where the caller's switch inlines it, so the unused rows compile away.
 */
#ifndef PDSERVE_CPU_TILE_H
#define PDSERVE_CPU_TILE_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define TILE_COLS 16
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TILE_ROWS 8  /* AVX-512: one register per row, of 32 */
#else
#define TILE_ROWS 4  /* AVX2: 4 x 16 measured 1.2-1.35x faster than 6 x 16, whose 12 accumulators spill */
#endif

#ifdef __AVX2__
#define TILE_ROW(i)                                                                                       \
    if (R > i) {                                                                                          \
        int32_t xx;                                                                                       \
        memcpy(&xx, x + i * xstride + 2 * p, 4);                                                          \
        const __m256i b = _mm256_set1_epi32(xx);                                                          \
        c##i##a = _mm256_add_epi32(c##i##a, _mm256_madd_epi16(b, w0));                                    \
        c##i##b = _mm256_add_epi32(c##i##b, _mm256_madd_epi16(b, w1));                                    \
    }
#define TILE_STORE(i)                                                                                     \
    if (R > i) {                                                                                          \
        _mm256_storeu_si256((__m256i *)out[i], c##i##a);                                                 \
        _mm256_storeu_si256((__m256i *)(out[i] + 8), c##i##b);                                           \
    }

static inline __attribute__((always_inline)) void tile_avx2(const int16_t *x, int64_t xstride, const int8_t *panel,
                                                            int64_t pairs, const int R, int32_t out[][TILE_COLS]) {
    const __m256i z = _mm256_setzero_si256();
    __m256i c0a = z, c0b = z, c1a = z, c1b = z, c2a = z, c2b = z, c3a = z, c3b = z;
    for (int64_t p = 0; p < pairs; ++p) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(panel + p * 2 * TILE_COLS)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(panel + p * 2 * TILE_COLS + 16)));
        TILE_ROW(0) TILE_ROW(1) TILE_ROW(2) TILE_ROW(3)
    }
    TILE_STORE(0) TILE_STORE(1) TILE_STORE(2) TILE_STORE(3)
}
#undef TILE_ROW
#undef TILE_STORE
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* The same tile on AVX-512 VNNI: the panel's 16 columns x 2 bytes widen into one 512-bit register of int16
 * pairs, and vpdpwssd multiplies each row's broadcast pair by it and adds into the row's 16 int32 lanes in one
 * instruction (AVX2: two multiply-adds and two adds). Not saturating: the same int32 sums. */
#define TILE_ROW512(i)                                                                                    \
    if (R > i) {                                                                                          \
        int32_t xx;                                                                                       \
        memcpy(&xx, x + i * xstride + 2 * p, 4);                                                          \
        c##i = _mm512_dpwssd_epi32(c##i, _mm512_set1_epi32(xx), w);                                       \
    }
#define TILE_STORE512(i) \
    if (R > i) _mm512_storeu_si512((void *)out[i], c##i);

static inline __attribute__((always_inline)) void tile_avx512(const int16_t *x, int64_t xstride, const int8_t *panel,
                                                              int64_t pairs, const int R, int32_t out[][TILE_COLS]) {
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    for (int64_t p = 0; p < pairs; ++p) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(panel + p * 2 * TILE_COLS)));
        TILE_ROW512(0) TILE_ROW512(1) TILE_ROW512(2) TILE_ROW512(3)
        TILE_ROW512(4) TILE_ROW512(5) TILE_ROW512(6) TILE_ROW512(7)
    }
    TILE_STORE512(0) TILE_STORE512(1) TILE_STORE512(2) TILE_STORE512(3)
    TILE_STORE512(4) TILE_STORE512(5) TILE_STORE512(6) TILE_STORE512(7)
}
#undef TILE_ROW512
#undef TILE_STORE512
#define TILE_KERNEL tile_avx512
#elif defined(__AVX2__)
#define TILE_KERNEL tile_avx2
#endif

/* out[r][c] for r < R <= TILE_ROWS (see above). */
static inline void tile_i32(const int16_t *x, int64_t xstride, const int8_t *panel, int64_t pairs, int R,
                            int32_t out[][TILE_COLS]) {
#ifdef TILE_KERNEL
    switch (R) {  /* the row count a constant in each copy: the accumulators stay in registers */
#if TILE_ROWS == 8
        case 8: TILE_KERNEL(x, xstride, panel, pairs, 8, out); return;
        case 7: TILE_KERNEL(x, xstride, panel, pairs, 7, out); return;
        case 6: TILE_KERNEL(x, xstride, panel, pairs, 6, out); return;
        case 5: TILE_KERNEL(x, xstride, panel, pairs, 5, out); return;
#endif
        case 4: TILE_KERNEL(x, xstride, panel, pairs, 4, out); return;
        case 3: TILE_KERNEL(x, xstride, panel, pairs, 3, out); return;
        case 2: TILE_KERNEL(x, xstride, panel, pairs, 2, out); return;
        default: TILE_KERNEL(x, xstride, panel, pairs, 1, out); return;
    }
#else
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < TILE_COLS; ++c) {
            int32_t s = 0;
            for (int64_t p = 0; p < pairs; ++p)
                s += (int32_t)x[r * xstride + 2 * p] * panel[p * 2 * TILE_COLS + 2 * c] +
                     (int32_t)x[r * xstride + 2 * p + 1] * panel[p * 2 * TILE_COLS + 2 * c + 1];
            out[r][c] = s;
        }
#endif
}

#endif
