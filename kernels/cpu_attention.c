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
 * of q's grid against the keys; two values per multiply-add against 12-bit halves of the weights); with
 * AVX-512 VNNI and head dims that are multiples of 32, on 512-bit ones that also add (vpdpwssd), eight keys'
 * scores rounded at once.
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
#include "cpu_attention_sums.h"
#include "cpu_threads.h"
#include "cpu_tile.h"

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
#ifdef VNNI512
        for (; d % 32 == 0 && j + 8 <= count; j += 8) {
            for (int64_t m = j + PREFETCH; m < j + PREFETCH + 8 && m < count; ++m) prefetch_row(a->rows[m], d);
            for (int64_t gi = 0; gi < g; ++gi)
                scores8(hi[gi], lo[gi], a->rows + j, d, (double)(1 << shift), qsc[gi], a->scales + j, srow[gi] + j);
        }
#endif
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
