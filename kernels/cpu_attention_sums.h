/* The exact integer sums of cpu_attention.c's one-query path, on each instruction set the build has: scores
 * (int16 halves of q's grid against the int8 keys) and probability-weighted values (12-bit halves of the
 * probability grid against the int8 values). Every sum is exact, so each instruction set gives the same bits.
 * Included by cpu_attention.c only (after cpu_attention.h). */
#ifndef PDSERVE_CPU_ATTENTION_SUMS_H
#define PDSERVE_CPU_ATTENTION_SUMS_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* sum(hi * k), sum(lo * k) over d int8 k: exact int32 sums. */
static void dot_halves(const int16_t *hi, const int16_t *lo, const int8_t *k, int64_t d, int32_t *sh, int32_t *sl) {
#ifdef __AVX2__
    if (d % 16 == 0) {
        __m256i ah = _mm256_setzero_si256(), al = _mm256_setzero_si256();
        for (int64_t i = 0; i < d; i += 16) {
            const __m256i kw = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(k + i)));
            ah = _mm256_add_epi32(ah, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(hi + i)), kw));
            al = _mm256_add_epi32(al, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(lo + i)), kw));
        }
        __m256i s = _mm256_hadd_epi32(ah, al);  /* per 128-bit half: h01 h23 l01 l23 */
        s = _mm256_hadd_epi32(s, s);  /* h0123 l0123 h0123 l0123 */
        const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        *sh = _mm_cvtsi128_si32(t);
        *sl = _mm_extract_epi32(t, 1);
        return;
    }
#endif
    int32_t h = 0, l = 0;
    for (int64_t i = 0; i < d; ++i) { h += (int32_t)hi[i] * k[i]; l += (int32_t)lo[i] * k[i]; }
    *sh = h;
    *sl = l;
}

#ifdef __AVX2__
static inline __m256i sums8(const __m256i *a) {  /* lane m: the sum of a[m]'s eight lanes */
    const __m256i t0 = _mm256_hadd_epi32(a[0], a[1]), t1 = _mm256_hadd_epi32(a[2], a[3]);
    const __m256i t2 = _mm256_hadd_epi32(a[4], a[5]), t3 = _mm256_hadd_epi32(a[6], a[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

static inline __m128 exact_to_float(__m128i h, __m128i l, double unit) {  /* (float)(h * unit + l): one rounding */
    const __m256d x = _mm256_add_pd(_mm256_mul_pd(_mm256_cvtepi32_pd(h), _mm256_set1_pd(unit)), _mm256_cvtepi32_pd(l));
    return _mm256_cvtpd_ps(x);  /* the sum is an integer below 2**53: exact in double */
}

/* Four keys' scores for one query head, both halves of q in one pass (each key chunk widened once;
 * eight accumulators, so nothing spills): out[m] = (float)(sum(n * k_m)) * qsc * ks[m]. */
static void scores4(const int16_t *hi, const int16_t *lo, const int8_t *const *rows, int64_t d, double unit,
                    float qsc, const float *ks, float *out) {
    __m256i acc[8];
    for (int m = 0; m < 8; ++m) acc[m] = _mm256_setzero_si256();
    for (int64_t i = 0; i < d; i += 16) {
        const __m256i xh = _mm256_loadu_si256((const __m256i *)(hi + i)), xl = _mm256_loadu_si256((const __m256i *)(lo + i));
        for (int m = 0; m < 4; ++m) {
            const __m256i k = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(rows[m] + i)));
            acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(xh, k));
            acc[4 + m] = _mm256_add_epi32(acc[4 + m], _mm256_madd_epi16(xl, k));
        }
    }
    const __m256i s = sums8(acc);  /* lanes 0-3: the keys' hi sums, 4-7: their lo sums */
    const __m128 f = exact_to_float(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1), unit);
    _mm_storeu_ps(out, _mm_mul_ps(_mm_mul_ps(f, _mm_set1_ps(qsc)), _mm_loadu_ps(ks)));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define VNNI512 1
static inline __m256i fold512(__m512i x) {  /* lane i: lanes i and i + 8 added */
    return _mm256_add_epi32(_mm512_castsi512_si256(x), _mm512_extracti64x4_epi64(x, 1));
}

/* scores4 for eight keys on 512-bit multiply-adds (vpdpwssd: the 16-bit products summed into int32 lanes, one
 * instruction), d a multiple of 32: the same exact integer sums, rounded and scaled by the same operations. */
static void scores8(const int16_t *hi, const int16_t *lo, const int8_t *const *rows, int64_t d, double unit,
                    float qsc, const float *ks, float *out) {
    __m512i ah[8], al[8];
    for (int m = 0; m < 8; ++m) ah[m] = al[m] = _mm512_setzero_si512();
    for (int64_t i = 0; i < d; i += 32) {
        const __m512i xh = _mm512_loadu_si512(hi + i), xl = _mm512_loadu_si512(lo + i);
        for (int m = 0; m < 8; ++m) {
            const __m512i k = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(rows[m] + i)));
            ah[m] = _mm512_dpwssd_epi32(ah[m], xh, k);
            al[m] = _mm512_dpwssd_epi32(al[m], xl, k);
        }
    }
    __m256i h[8], l[8];
    for (int m = 0; m < 8; ++m) { h[m] = fold512(ah[m]); l[m] = fold512(al[m]); }
    const __m512d x = _mm512_add_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(sums8(h)), _mm512_set1_pd(unit)),
                                    _mm512_cvtepi32_pd(sums8(l)));  /* exact in double, as exact_to_float */
    const __m256 f = _mm512_cvtpd_ps(x);
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_mul_ps(f, _mm256_set1_ps(qsc)), _mm256_loadu_ps(ks)));
}
#endif

/* n = nh * 2**12 + nl (0 <= n <= 2**24), both halves int16, packed two keys to an int32 so one
 * multiply-add weighs two keys' values: wh[p] = nh[2p] | nh[2p+1] << 16, likewise wl (an odd tail
 * pairs with a key of weight 0). */
static void pack_weights(const int32_t *n, int64_t count, int32_t *wh, int32_t *wl) {
    int64_t j = 0;
#ifdef VNNI512
    /* eight pairs at once: each 64-bit lane holds a pair (n0 low, n1 high); the halves are below 2**16, so
     * lo | hi >> 16 of the 64-bit lane is the packed int32 (its upper half zero), narrowed by vpmovqd */
    const __m512i low = _mm512_set1_epi64(0xffffffff);
    for (; j + 16 <= count; j += 16) {
        const __m512i x = _mm512_loadu_si512(n + j);
        const __m512i h = _mm512_srli_epi32(x, 12), l = _mm512_and_si512(x, _mm512_set1_epi32(4095));
        _mm256_storeu_si256((__m256i *)(wh + j / 2),
                            _mm512_cvtepi64_epi32(_mm512_or_si512(_mm512_and_si512(h, low), _mm512_srli_epi64(h, 16))));
        _mm256_storeu_si256((__m256i *)(wl + j / 2),
                            _mm512_cvtepi64_epi32(_mm512_or_si512(_mm512_and_si512(l, low), _mm512_srli_epi64(l, 16))));
    }
#endif
    for (; j < count; j += 2) {
        const int32_t n0 = n[j], n1 = j + 1 < count ? n[j + 1] : 0;
        wh[j / 2] = (int32_t)(((uint32_t)(n1 >> 12) << 16) | (uint32_t)(n0 >> 12));
        wl[j / 2] = (int32_t)(((uint32_t)(n1 & 4095) << 16) | (uint32_t)(n0 & 4095));
    }
}

#ifdef __AVX2__
/* acc[g][i] = sum_j n_g[j] * rows[j][i] exactly for G weight rows at once (each value row is loaded
 * and widened once for all G). int32 lanes, flushed to int64 every 1024 pairs (a pair adds < 2**20 to
 * a lane). Lane order after the unpacks: lo = dims 0-3 and 8-11 of 16, hi = dims 4-7 and 12-15. */
static inline __attribute__((always_inline)) void weighted_sums_avx2(
        const int32_t *wh, const int32_t *wl, int64_t wstride, const int G, const int8_t *const *rows,
        int64_t count, int64_t d, int64_t (*acc)[MAX_D]) {
    static const int dims_lo[8] = {0, 1, 2, 3, 8, 9, 10, 11}, dims_hi[8] = {4, 5, 6, 7, 12, 13, 14, 15};
    for (int64_t c = 0; c < d; c += 16) {
        for (int64_t j0 = 0; j0 < count; j0 += 2048) {
            const int64_t j1 = j0 + 2048 < count ? j0 + 2048 : count;
            __m256i s[4][4];
            for (int g = 0; g < G; ++g) for (int x = 0; x < 4; ++x) s[g][x] = _mm256_setzero_si256();
            for (int64_t j = j0; j < j1; j += 2) {
                const int64_t k = j + 1 < j1 ? j + 1 : j;
                if (c == 0 && j + PREFETCH + 1 < count) {
                    prefetch_row(rows[j + PREFETCH], d);
                    prefetch_row(rows[j + PREFETCH + 1], d);
                }
                const __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(rows[j] + c)));
                const __m256i v1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(rows[k] + c)));
                const __m256i lo = _mm256_unpacklo_epi16(v0, v1), hi = _mm256_unpackhi_epi16(v0, v1);
                for (int g = 0; g < G; ++g) {
                    const __m256i bh = _mm256_set1_epi32(wh[g * wstride + j / 2]);
                    const __m256i bl = _mm256_set1_epi32(wl[g * wstride + j / 2]);
                    s[g][0] = _mm256_add_epi32(s[g][0], _mm256_madd_epi16(lo, bh));
                    s[g][1] = _mm256_add_epi32(s[g][1], _mm256_madd_epi16(hi, bh));
                    s[g][2] = _mm256_add_epi32(s[g][2], _mm256_madd_epi16(lo, bl));
                    s[g][3] = _mm256_add_epi32(s[g][3], _mm256_madd_epi16(hi, bl));
                }
            }
            for (int g = 0; g < G; ++g) {
                int32_t t[4][8];
                for (int x = 0; x < 4; ++x) _mm256_storeu_si256((__m256i *)t[x], s[g][x]);
                for (int x = 0; x < 8; ++x) {
                    acc[g][c + dims_lo[x]] += (int64_t)t[0][x] * 4096 + t[2][x];
                    acc[g][c + dims_hi[x]] += (int64_t)t[1][x] * 4096 + t[3][x];
                }
            }
        }
    }
}
#endif

#ifdef VNNI512
/* weighted_sums_avx2 on 512-bit multiply-adds (vpdpwssd), 32 dims a pass, d a multiple of 32: the same exact
 * sums. Lane order after the unpacks: per 128-bit lane L, lo = dims 8L..8L+3, hi = dims 8L+4..8L+7. */
static inline __attribute__((always_inline)) void weighted_sums_512(
        const int32_t *wh, const int32_t *wl, int64_t wstride, const int G, const int8_t *const *rows,
        int64_t count, int64_t d, int64_t (*acc)[MAX_D]) {
    for (int64_t c = 0; c < d; c += 32) {
        for (int64_t j0 = 0; j0 < count; j0 += 2048) {  /* int32 lanes: < 2**20 a pair, flushed every 1024 */
            const int64_t j1 = j0 + 2048 < count ? j0 + 2048 : count;
            __m512i s[4][4];
            for (int g = 0; g < G; ++g) for (int x = 0; x < 4; ++x) s[g][x] = _mm512_setzero_si512();
            for (int64_t j = j0; j < j1; j += 2) {
                const int64_t k = j + 1 < j1 ? j + 1 : j;
                if (c == 0 && j + PREFETCH + 1 < count) {
                    prefetch_row(rows[j + PREFETCH], d);
                    prefetch_row(rows[j + PREFETCH + 1], d);
                }
                const __m512i v0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(rows[j] + c)));
                const __m512i v1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(rows[k] + c)));
                const __m512i lo = _mm512_unpacklo_epi16(v0, v1), hi = _mm512_unpackhi_epi16(v0, v1);
                for (int g = 0; g < G; ++g) {
                    const __m512i bh = _mm512_set1_epi32(wh[g * wstride + j / 2]);
                    const __m512i bl = _mm512_set1_epi32(wl[g * wstride + j / 2]);
                    s[g][0] = _mm512_dpwssd_epi32(s[g][0], lo, bh);
                    s[g][1] = _mm512_dpwssd_epi32(s[g][1], hi, bh);
                    s[g][2] = _mm512_dpwssd_epi32(s[g][2], lo, bl);
                    s[g][3] = _mm512_dpwssd_epi32(s[g][3], hi, bl);
                }
            }
            for (int g = 0; g < G; ++g) {
                int32_t t[4][16];
                for (int x = 0; x < 4; ++x) _mm512_storeu_si512(t[x], s[g][x]);
                for (int x = 0; x < 16; ++x) {
                    const int64_t dim = c + 8 * (x / 4) + x % 4;
                    acc[g][dim] += (int64_t)t[0][x] * 4096 + t[2][x];
                    acc[g][dim + 4] += (int64_t)t[1][x] * 4096 + t[3][x];
                }
            }
        }
    }
}
#endif

/* acc[g][i] = sum_j n_g[j] * rows[j][i] exactly for G <= 4 weight rows (packed by pack_weights). */
static void weighted_sums(const int32_t *wh, const int32_t *wl, int64_t wstride, int G, const int8_t *const *rows,
                          int64_t count, int64_t d, int64_t (*acc)[MAX_D]) {
    for (int g = 0; g < G; ++g) memset(acc[g], 0, sizeof(int64_t) * d);
/* G a constant at each call, so the accumulators stay in registers */
#define BY_GROUPS(fn) do { \
        if (G == 1) fn(wh, wl, wstride, 1, rows, count, d, acc); \
        else if (G == 2) fn(wh, wl, wstride, 2, rows, count, d, acc); \
        else if (G == 3) fn(wh, wl, wstride, 3, rows, count, d, acc); \
        else fn(wh, wl, wstride, 4, rows, count, d, acc); \
        return; \
    } while (0)
#ifdef VNNI512
    if (d % 32 == 0) BY_GROUPS(weighted_sums_512);
#endif
#ifdef __AVX2__
    if (d % 16 == 0) BY_GROUPS(weighted_sums_avx2);
#endif
#undef BY_GROUPS
    for (int g = 0; g < G; ++g) {
        for (int64_t j = 0; j < count; ++j) {
            const uint32_t h = (uint32_t)wh[g * wstride + j / 2], l = (uint32_t)wl[g * wstride + j / 2];
            const int64_t n = j % 2 ? (int64_t)(h >> 16) * 4096 + (l >> 16) : (int64_t)(h & 0xffff) * 4096 + (l & 0xffff);
            if (n == 0) continue;
            for (int64_t i = 0; i < d; ++i) acc[g][i] += n * rows[j][i];
        }
    }
}

#endif
