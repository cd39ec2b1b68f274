/* Exact attention over int8 paged KV, read in place from the pool (kernels/cpu_attention.py).
 *
 * kernels.reference._exact_attention in two calls:
 *   pdserve_attn_weights: q on its integer grid (|n| <= levels <= 2**29), split n = hi * 2**s + lo with
 *     both halves in int16, dotted with the int8 keys exactly (two int32 sums, one int64 total),
 *     rounded to float32 once, times the grid scale, times the key's scale; minus each row's max
 *     (exact), then exp (cpu_attention.h's exp_nonpositive, the reference's op for op), in packed rows:
 *     only the keys a query sees, padded to whole vectors (weight 0);
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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "cpu_attention.h"
#include "cpu_threads.h"
#include "cpu_tile.h"

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

static void scores_rows(Job *a) {
    const int64_t d = a->d, g = a->h / a->hkv;
    int16_t hi[MAX_GROUP][MAX_D], lo[MAX_GROUP][MAX_D];
    float qsc[MAX_GROUP], *srow[MAX_GROUP];  /* each head's score row: found once (a 64-bit division each) */
    const int shift = query_shift(a->levels);
    for (int64_t u = a->begin; u < a->end; ++u) {
        const int64_t r = u / a->hkv, kh = u % a->hkv;
        int64_t count;
        if ((a->status = locate(a, r, kh, &count, a->rows, a->scales))) return;
        for (int64_t gi = 0; gi < g; ++gi) {  /* each query head on its own integer grid */
            qsc[gi] = query_halves(a, a->q + (r * a->h + kh * g + gi) * d, shift, hi[gi], lo[gi]);
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
        for (int64_t gi = 0; gi < g; ++gi) softmax_numerators(srow[gi], count, row_length(a, r));
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
            unit[gi] = probability_grid(a, e, a->scales, count, n, &z[gi]);
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
    if (a->fused) {  /* cpu_attention_prefill.c: its own scratch */
        pdserve_prefill_blocks(a);
        return NULL;
    }
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

/* Whether cpu_attention_prefill.c takes this job: a few queries or more, all of one sequence (a prefill's), head
 * dims in whole tiles; PDSERVE_CPU_ATTENTION_TILES=off keeps one query at a time (same bits; for A/Bs). */
static int use_tiles(const Job *a) {
    const char *mode = getenv("PDSERVE_CPU_ATTENTION_TILES");
    if (a->n < TILED_MIN_QUERIES || a->d % TILE_COLS || (mode != NULL && strcmp(mode, "off") == 0)) return 0;
    for (int64_t r = 1; r < a->n; ++r) if (a->qseq[r] != a->qseq[0]) return 0;
    return 1;
}

/* Splits the (query, KV head) pairs over `threads` threads (this one included); returns the first error. */
static int run(Job *proto, int64_t threads) {
    if (proto->d > MAX_D || (proto->in == NULL && (proto->levels > 536870912.0f || proto->levels < 1.0f)) || proto->h % proto->hkv || proto->h / proto->hkv > MAX_GROUP) return -1;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const int tiled = proto->fused != 0;
    const int64_t units = tiled ? (proto->n + QUERY_BLOCK - 1) / QUERY_BLOCK : proto->n * proto->hkv;
    if (threads > units) threads = units > 0 ? units : 1;
    Job jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; ++t) {
        jobs[t] = *proto;
        jobs[t].begin = tiled ? t : units * t / threads;
        jobs[t].end = units * (t + 1) / threads;
        jobs[t].stride = tiled ? threads : 0;
        jobs[t].status = 0;
    }
    run_jobs(run_job, jobs, sizeof(*jobs), threads);
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
 * tables [sequences, tw] int64; out: packed rows (pdserve_attn_layout) of exp(scores minus each row's max).
 * levels: q's grid; c: 1/sqrt(d) as float. */
int pdserve_attn_weights(const float *q, int64_t n, int64_t h, int64_t d, const int64_t *qseq,
                        const int64_t *qpos, int64_t window, const int64_t *tables, int64_t tw, int64_t bs,
                        int64_t nblocks, const int8_t *k_pool, const float *k_scale, int64_t hkv,
                        float levels, float c, const int64_t *offsets, int64_t max_cols, float *out,
                        int64_t threads) {
    Job a = {.q = q, .in = NULL, .n = n, .h = h, .d = d, .hkv = hkv, .offsets = offsets, .max_cols = max_cols,
             .qseq = qseq, .qpos = qpos, .window = window, .tables = tables, .tw = tw, .bs = bs, .nblocks = nblocks,
             .pool = k_pool, .pscale = k_scale, .levels = levels, .c = c, .out = out};
    return run(&a, threads);
}

/* e: pdserve_attn_weights' rows, laid out as they were; v_pool / v_scale as the keys'; out [n, h, d] float32.
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

/* A prefill's attention, pdserve_attn_weights then pdserve_attn_pv in one call (cpu_attention_prefill.c): blocks of
 * 16 queries, each block's scores then at once its weighted values, no score rows in between (offsets and
 * max_cols unused), on AMX tiles where they are (pdserve_amx_ready; head dims in whole 64-byte rows or one shorter
 * row; PDSERVE_CPU_AMX=off keeps the AVX tiles), the same bits either way. Queries of sequence 0, at least
 * TILED_MIN_QUERIES, head dims in whole tiles; else (or with PDSERVE_CPU_ATTENTION_TILES=off) returns -5 and the
 * caller's two calls take them one query at a time. */
int pdserve_attn_prefill(const float *q, int64_t n, int64_t h, int64_t d, const int64_t *qseq, const int64_t *qpos,
                         int64_t window, const int64_t *tables, int64_t tw, int64_t bs, int64_t nblocks,
                         const int8_t *k_pool, const float *k_scale, const int8_t *v_pool, const float *v_scale,
                         int64_t hkv, float levels, float c, float pdiv, float *out, int64_t threads) {
    Job a = {.q = q, .n = n, .h = h, .d = d, .hkv = hkv, .qseq = qseq, .qpos = qpos, .window = window,
             .tables = tables, .tw = tw, .bs = bs, .nblocks = nblocks, .pool = k_pool, .pscale = k_scale,
             .vpool = v_pool, .vscale = v_scale, .levels = levels, .c = c, .pdiv = pdiv, .out = out,
             .fused = FUSED_TILES};
    if (!use_tiles(&a) || qseq[0] != 0) return -5;
    const char *mode = getenv("PDSERVE_CPU_AMX");
    if ((d <= 64 || d % 64 == 0) && !(mode != NULL && strcmp(mode, "off") == 0) && pdserve_amx_ready())
        a.fused = FUSED_AMX;
    return run(&a, threads);
}

/* cpu_attention.h's exp_nonpositive over x[0..n) in place, vectors (16 lanes, then 8) then a scalar tail (tests
 * compare its bits with kernels.reference.exp_nonpositive's). */
void pdserve_exp_nonpositive(float *x, int64_t n) {
    int64_t j = 0;
#ifdef __AVX512F__
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(x + j, exp_nonpositive16(_mm512_loadu_ps(x + j)));
#endif
#ifdef __AVX2__
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, exp_nonpositive8(_mm256_loadu_ps(x + j)));
#endif
    for (; j < n; ++j) x[j] = exp_nonpositive(x[j]);
}
