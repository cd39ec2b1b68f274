/* Exact attention over int8 paged KV, read in place from the pool (kernels/cpu_attention.py).
 *
 * The integer halves of kernels.reference._exact_attention, around torch's exp:
 *   pdserve_attn_scores: q on its integer grid (|n| <= levels <= 2**29), split n = hi * 2**s + lo with
 *     both halves in int16, dotted with the int8 keys exactly (two int32 sums, one int64 total),
 *     rounded to float32 once, times the grid scale, times the key's scale; minus each row's max
 *     (exact), in packed rows: only the keys a query sees, padded to whole vectors;
 *   (torch: e = exp(scores - max), one op: the exp's bits stay torch's)
 *   pdserve_attn_pv: the softmax's sum (exact in double) and the probability-weighted sum of the int8
 *     values on the reference's 24-bit grid (int32 lanes, int64 totals), scaled as the reference does.
 * Every sum is exact, so neither the loop order nor the split across threads can change a bit;
 * the keys and values are read where they lie in the pool, never gathered or widened in memory.
 *
 * With AVX2 and head dims that are multiples of 16 the sums run on 16-bit multiply-adds (int16 halves
 * of q's grid against the keys; two values per multiply-add against 12-bit halves of the weights).
 *
 * Row (n, hh) is query n's head hh; it sees positions first..qpos[n] of sequence qseq[n], first =
 * max(0, qpos[n] - window + 1) (window 0: no window), and its column j is position first + j;
 * its row's columns past its last key are -inf. Built with -ffp-contract=off, without fast-math.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_D 256
#define MAX_GROUP 16
#define MAX_THREADS 64
#define PREFETCH 32  /* rows ahead */

typedef struct {
    const float *q, *in;  /* queries [n, h, d]; pv: e, laid out as the scores */
    int64_t n, h, d, hkv;
    const int64_t *offsets;  /* [n + 1]: query r's h score rows start at offsets[r], each of row_length(r) */
    int64_t max_cols;  /* the longest score row */
    const int64_t *qseq, *qpos;
    int64_t window;
    const int64_t *tables;  /* [sequences, tw] block ids */
    int64_t tw, bs, nblocks;
    const int8_t *pool;  /* [nblocks * bs, hkv, d] */
    const float *pscale;  /* [nblocks * bs, hkv] */
    float levels, c, pdiv;
    float *out;  /* scores (packed rows, see offsets) or attention [n, h, d] */
    int64_t begin, end;  /* this thread's (query, KV head) pairs, query-major */
    const int8_t **rows;  /* scratch, one per column: a key's (or value's) row, its scale, its weight */
    float *scales;
    int32_t *weights;  /* pv: packed weights of every query head of a KV head, then one row's integers */
    int status;  /* 0, -2 a block outside the pool, -3 more keys than columns or a bad position, -4 no memory */
} Job;

static int64_t first_visible(int64_t qpos, int64_t window) {  /* window 0: no window */
    const int64_t f = window > 0 ? qpos - window + 1 : 0;
    return f > 0 ? f : 0;
}

static int64_t row_length(const Job *a, int64_t r) { return (a->offsets[r + 1] - a->offsets[r]) / a->h; }

static float *score_row(const Job *a, const float *base, int64_t r, int64_t hh) {
    return (float *)base + a->offsets[r] + hh * row_length(a, r);
}

/* The rows (and scales) of KV head kh at query r's visible positions, through its block table:
 * 0, or the job's error status (-2 a block not held or outside the pool, -3 a bad position). */
static int locate(const Job *a, int64_t r, int64_t kh, int64_t *count, const int8_t **rows, float *scales) {
    const int64_t first = first_visible(a->qpos[r], a->window), s = a->qseq[r];
    *count = a->qpos[r] - first + 1;
    if (a->qpos[r] < 0 || *count > (a->offsets[r + 1] - a->offsets[r]) / a->h) return -3;
    for (int64_t j = 0, b = first / a->bs, o = first % a->bs; j < *count; ++b, o = 0) {  /* block by block */
        const int64_t blk = b < a->tw ? a->tables[s * a->tw + b] : -1;
        if (blk < 0 || blk >= a->nblocks) return -2;
        for (int64_t slot = blk * a->bs + o; o < a->bs && j < *count; ++o, ++slot, ++j) {
            rows[j] = a->pool + (slot * a->hkv + kh) * a->d;
            scales[j] = a->pscale[slot * a->hkv + kh];
        }
    }
    return 0;
}

/* Keys and values lie where their blocks do, scattered: fetch a few rows ahead (the loop is latency-bound without). */
static inline void prefetch_row(const int8_t *row, int64_t d) {
    for (int64_t i = 0; i < d; i += 64) __builtin_prefetch(row + i);
}

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

/* The largest of row[0..count), NaN if any is. Which of two equal zeros wins may differ from a
 * left-to-right scan; row - max then differs only in a zero's sign, which exp maps to 1 either way. */
static float row_max(const float *row, int64_t count) {
    float top = -INFINITY;
    int nan = 0;
    int64_t j = 0;
#ifdef __AVX2__
    __m256 vt = _mm256_set1_ps(-INFINITY), vn = _mm256_setzero_ps();
    for (; j + 8 <= count; j += 8) {
        const __m256 x = _mm256_loadu_ps(row + j);
        vn = _mm256_or_ps(vn, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        vt = _mm256_max_ps(x, vt);  /* a NaN x keeps vt, as the scalar loop keeps top */
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vt);
    for (int m = 0; m < 8; ++m) top = lanes[m] > top ? lanes[m] : top;
    nan = _mm256_movemask_ps(vn) != 0;
#endif
    for (; j < count; ++j) { nan |= isnan(row[j]); top = row[j] > top ? row[j] : top; }
    return nan ? NAN : top;
}

static void scores_rows(Job *a) {
    const int64_t d = a->d, g = a->h / a->hkv;
    int16_t hi[MAX_GROUP][MAX_D], lo[MAX_GROUP][MAX_D];
    float qsc[MAX_GROUP], *srow[MAX_GROUP];  /* each head's score row: found once (a 64-bit division each) */
    const int shift = ilogbf(a->levels) - 14 > 11 ? ilogbf(a->levels) - 14 : 11;  /* |hi| <= 2**14, lo < 2**15 */
    for (int64_t u = a->begin; u < a->end; ++u) {
        const int64_t r = u / a->hkv, kh = u % a->hkv;
        int64_t count;
        if ((a->status = locate(a, r, kh, &count, a->rows, a->scales))) return;
        for (int64_t gi = 0; gi < g; ++gi) {  /* each query head on its own integer grid */
            const float *qr = a->q + (r * a->h + kh * g + gi) * d;
            float amax = 0.0f;
            for (int64_t i = 0; i < d; ++i) { float m = fabsf(qr[i]); amax = m > amax ? m : amax; }
            const float scale = (amax < 1e-30f ? 1e-30f : amax) / a->levels;
            qsc[gi] = scale * a->c;
            for (int64_t i = 0; i < d; ++i) {
                const int32_t nq = (int32_t)nearbyintf(qr[i] / scale);
                hi[gi][i] = (int16_t)(nq >> shift);  /* floor: lo lands in [0, 2**shift) */
                lo[gi][i] = (int16_t)(nq - (nq >> shift) * (1 << shift));
            }
            float *row = srow[gi] = score_row(a, a->out, r, kh * g + gi);
            for (int64_t j = count; j < row_length(a, r); ++j) row[j] = -INFINITY;
        }
        int64_t j = 0;
#ifdef __AVX2__
        for (; d % 16 == 0 && j + 4 <= count; j += 4) {
            for (int64_t m = j + PREFETCH; m < j + PREFETCH + 4 && m < count; ++m) prefetch_row(a->rows[m], d);
            for (int64_t gi = 0; gi < g; ++gi)
                scores4(hi[gi], lo[gi], a->rows + j, d, (double)(1 << shift), qsc[gi], a->scales + j, srow[gi] + j);
        }
#endif
        for (; j < count; ++j) {
            if (j + PREFETCH < count) prefetch_row(a->rows[j + PREFETCH], d);
            for (int64_t gi = 0; gi < g; ++gi) {
                int32_t sh, sl;
                dot_halves(hi[gi], lo[gi], a->rows[j], d, &sh, &sl);
                const float acc = (float)((int64_t)sh * (1 << shift) + sl);  /* the one rounding */
                srow[gi][j] = acc * qsc[gi] * a->scales[j];
            }
        }
        for (int64_t gi = 0; gi < g; ++gi) {  /* minus the row's max (NaN if any is, as torch's amax) */
            float *row = srow[gi];
            const float top = row_max(row, count);
            for (int64_t j = 0; j < count; ++j) row[j] = row[j] - top;
            if (isnan(top)) for (int64_t j = count; j < row_length(a, r); ++j) row[j] = NAN;
        }
    }
}

/* n = nh * 2**12 + nl (0 <= n <= 2**24), both halves int16, packed two keys to an int32 so one
 * multiply-add weighs two keys' values: wh[p] = nh[2p] | nh[2p+1] << 16, likewise wl (an odd tail
 * pairs with a key of weight 0). */
static void pack_weights(const int32_t *n, int64_t count, int32_t *wh, int32_t *wl) {
    for (int64_t j = 0; j < count; j += 2) {
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

/* acc[g][i] = sum_j n_g[j] * rows[j][i] exactly for G <= 4 weight rows (packed by pack_weights). */
static void weighted_sums(const int32_t *wh, const int32_t *wl, int64_t wstride, int G, const int8_t *const *rows,
                          int64_t count, int64_t d, int64_t (*acc)[MAX_D]) {
    for (int g = 0; g < G; ++g) memset(acc[g], 0, sizeof(int64_t) * d);
#ifdef __AVX2__
    if (d % 16 == 0) {  /* G known at each call, so the accumulators stay in registers */
        if (G == 1) weighted_sums_avx2(wh, wl, wstride, 1, rows, count, d, acc);
        else if (G == 2) weighted_sums_avx2(wh, wl, wstride, 2, rows, count, d, acc);
        else if (G == 3) weighted_sums_avx2(wh, wl, wstride, 3, rows, count, d, acc);
        else weighted_sums_avx2(wh, wl, wstride, 4, rows, count, d, acc);
        return;
    }
#endif
    for (int g = 0; g < G; ++g) {
        for (int64_t j = 0; j < count; ++j) {
            const uint32_t h = (uint32_t)wh[g * wstride + j / 2], l = (uint32_t)wl[g * wstride + j / 2];
            const int64_t n = j % 2 ? (int64_t)(h >> 16) * 4096 + (l >> 16) : (int64_t)(h & 0xffff) * 4096 + (l & 0xffff);
            if (n == 0) continue;
            for (int64_t i = 0; i < d; ++i) acc[g][i] += n * rows[j][i];
        }
    }
}

/* The softmax's sum in units of 2**-28 (integers summed in double: exact in any order), and in *pmax
 * the largest probability times its value scale (0 if none is larger; NaNs skipped, as the scalar loop). */
static double softmax_sum(const float *e, const float *scales, int64_t count, float *pmax) {
    double zs = 0.0;
    float top = 0.0f;
    int64_t j = 0;
#ifdef __AVX2__
    __m256d z0 = _mm256_setzero_pd(), z1 = _mm256_setzero_pd();
    __m256 vt = _mm256_setzero_ps();
    for (; j + 8 <= count; j += 8) {
        const __m256 x = _mm256_loadu_ps(e + j);
        const __m256 units = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(268435456.0f)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  /* nearbyintf */
        z0 = _mm256_add_pd(z0, _mm256_cvtps_pd(_mm256_castps256_ps128(units)));
        z1 = _mm256_add_pd(z1, _mm256_cvtps_pd(_mm256_extractf128_ps(units, 1)));
        vt = _mm256_max_ps(_mm256_mul_ps(x, _mm256_loadu_ps(scales + j)), vt);
    }
    double zl[4];
    float lanes[8];
    _mm256_storeu_pd(zl, _mm256_add_pd(z0, z1));
    zs = (zl[0] + zl[1]) + (zl[2] + zl[3]);
    _mm256_storeu_ps(lanes, vt);
    for (int m = 0; m < 8; ++m) top = lanes[m] > top ? lanes[m] : top;
#endif
    for (; j < count; ++j) {
        zs += (double)nearbyintf(e[j] * 268435456.0f);
        const float p = e[j] * scales[j];
        top = p > top ? p : top;
    }
    *pmax = top;
    return zs;
}

/* n[j] = round(e[j] * scales[j] / unit): each key's weight on the probability grid (IEEE division). */
static void grid_weights(const float *e, const float *scales, int64_t count, float unit, int32_t *n) {
    int64_t j = 0;
#ifdef __AVX2__
    for (; j + 8 <= count; j += 8) {
        const __m256 w = _mm256_div_ps(_mm256_mul_ps(_mm256_loadu_ps(e + j), _mm256_loadu_ps(scales + j)),
                                       _mm256_set1_ps(unit));
        _mm256_storeu_si256((__m256i *)(n + j), _mm256_cvtps_epi32(_mm256_round_ps(
            w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
#endif
    for (; j < count; ++j) n[j] = (int32_t)nearbyintf(e[j] * scales[j] / unit);
}

static void pv_rows(Job *a) {
    const int64_t d = a->d, g = a->h / a->hkv, wstride = a->max_cols / 2 + 1;
    int64_t acc[4][MAX_D];
    float unit[MAX_GROUP];
    double z[MAX_GROUP];
    int32_t *wh = a->weights, *wl = a->weights + MAX_GROUP * wstride, *n = a->weights + 2 * MAX_GROUP * wstride;
    for (int64_t u = a->begin; u < a->end; ++u) {
        const int64_t r = u / a->hkv, kh = u % a->hkv;
        int64_t count;
        if ((a->status = locate(a, r, kh, &count, a->rows, a->scales))) return;
        for (int64_t gi = 0; gi < g; ++gi) {
            const float *e = score_row(a, a->in, r, kh * g + gi);
            float pmax;
            z[gi] = softmax_sum(e, a->scales, count, &pmax);
            unit[gi] = pmax / a->pdiv;  /* the probability grid */
            grid_weights(e, a->scales, count, unit[gi], n);
            pack_weights(n, count, wh + gi * wstride, wl + gi * wstride);
        }
        for (int64_t g0 = 0; g0 < g; g0 += 4) {
            const int G = (int)(g - g0 < 4 ? g - g0 : 4);
            weighted_sums(wh + g0 * wstride, wl + g0 * wstride, wstride, G, a->rows, count, d, acc);
            for (int gi = 0; gi < G; ++gi) {
                float *o = a->out + (r * a->h + kh * g + g0 + gi) * d;
                const double f = (double)unit[g0 + gi] * 268435456.0;
                for (int64_t i = 0; i < d; ++i) o[i] = (float)((double)acc[gi][i] * f / z[g0 + gi]);
            }
        }
    }
}

static void *run_job(void *arg) {
    Job *a = arg;
    a->rows = malloc(sizeof(*a->rows) * (size_t)(a->max_cols + 1));
    a->scales = malloc(sizeof(float) * (size_t)(a->max_cols + 1));
    a->weights = malloc(sizeof(int32_t) * (size_t)(2 * MAX_GROUP * (a->max_cols / 2 + 1) + a->max_cols + 1));
    if (a->rows == NULL || a->scales == NULL || a->weights == NULL) a->status = -4;
    else if (a->in == NULL) scores_rows(a);
    else pv_rows(a);
    free(a->rows);
    free(a->scales);
    free(a->weights);
    return NULL;
}

/* Splits the (query, KV head) pairs over `threads` threads (this one included); returns the first error. */
static int run(Job *proto, int64_t threads) {
    if (proto->d > MAX_D || (proto->in == NULL && (proto->levels > 536870912.0f || proto->levels < 1.0f)) || proto->h % proto->hkv || proto->h / proto->hkv > MAX_GROUP) return -1;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const int64_t units = proto->n * proto->hkv;
    if (threads > units) threads = units > 0 ? units : 1;
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t t = 0; t < threads; ++t) {
        jobs[t] = *proto;
        jobs[t].begin = units * t / threads;
        jobs[t].end = units * (t + 1) / threads;
        jobs[t].status = 0;
    }
    for (int64_t t = 1; t < threads; ++t) started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int64_t t = 1; t < threads; ++t) {
        if (started[t]) pthread_join(ids[t], NULL); else run_job(&jobs[t]);
    }
    for (int64_t t = 0; t < threads; ++t) if (jobs[t].status) return jobs[t].status;
    return 0;
}

/* The packed score rows: query r's h rows hold its visible keys, each padded to a multiple of
 * `align` (-inf past the keys); offsets [n + 1]. Returns the total length, or -3 for a bad position. */
int64_t pdserve_attn_layout(int64_t n, int64_t h, const int64_t *qpos, int64_t window, int64_t align,
                            int64_t *offsets, int64_t *max_cols) {
    offsets[0] = 0;
    *max_cols = 0;
    for (int64_t r = 0; r < n; ++r) {
        if (qpos[r] < 0) return -3;
        const int64_t cols = (qpos[r] - first_visible(qpos[r], window) + 1 + align - 1) / align * align;
        *max_cols = cols > *max_cols ? cols : *max_cols;
        offsets[r + 1] = offsets[r] + h * cols;
    }
    return offsets[n];
}

/* q [n, h, d] float32; k_pool [nblocks * bs, hkv, d] int8; k_scale [nblocks * bs, hkv] float32;
 * tables [sequences, tw] int64; out: packed rows (pdserve_attn_layout) of scores minus each row's max.
 * levels: q's grid; c: 1/sqrt(d) as float. */
int pdserve_attn_scores(const float *q, int64_t n, int64_t h, int64_t d, const int64_t *qseq,
                        const int64_t *qpos, int64_t window, const int64_t *tables, int64_t tw, int64_t bs,
                        int64_t nblocks, const int8_t *k_pool, const float *k_scale, int64_t hkv,
                        float levels, float c, const int64_t *offsets, int64_t max_cols, float *out,
                        int64_t threads) {
    Job a = {.q = q, .in = NULL, .n = n, .h = h, .d = d, .hkv = hkv, .offsets = offsets, .max_cols = max_cols,
             .qseq = qseq, .qpos = qpos, .window = window, .tables = tables, .tw = tw, .bs = bs, .nblocks = nblocks,
             .pool = k_pool, .pscale = k_scale, .levels = levels, .c = c, .out = out};
    return run(&a, threads);
}

/* e: exp of the scores, laid out as they were; v_pool / v_scale as the keys'; out [n, h, d] float32.
 * pdiv: the probability grid's divisor (a power of two). */
int pdserve_attn_pv(const float *e, int64_t n, int64_t h, int64_t d, const int64_t *qseq,
                    const int64_t *qpos, int64_t window, const int64_t *tables, int64_t tw, int64_t bs,
                    int64_t nblocks, const int8_t *v_pool, const float *v_scale, int64_t hkv,
                    float pdiv, const int64_t *offsets, int64_t max_cols, float *out, int64_t threads) {
    Job a = {.q = NULL, .in = e, .n = n, .h = h, .d = d, .hkv = hkv, .offsets = offsets, .max_cols = max_cols,
             .qseq = qseq, .qpos = qpos, .window = window, .tables = tables, .tw = tw, .bs = bs, .nblocks = nblocks,
             .pool = v_pool, .pscale = v_scale, .pdiv = pdiv, .out = out};
    return run(&a, threads);
}
