/* Exact attention for many queries of one sequence (a prefill), in register tiles (cpu_tile.h).
 *
 * cpu_attention.c takes one (query, KV head) at a time: each query reads and widens its keys and values again
 * and sums each key's products across vector lanes. A prefill's queries share their keys, so here a thread
 * packs the keys and values its queries see once per KV head and multiplies blocks of queries by them as
 * GEMMs: scores = q's int16 halves x keys (key panels of 16, the reduction over the head dim), weighted values
 * = the probability grid's 12-bit halves x values (value panels of 16 dims, the reduction over keys). Every sum
 * is the same exact integer as cpu_attention.c's, converted and scaled by the same float operations, so the
 * bits are the same (tests/test_cpu_attention.py compares both with the torch reference).
 *
 * One call does both halves (pdserve_attn_prefill): per block of 16 queries its scores, then at once its weighted
 * values, while the block's score rows are in cache; on AMX tiles where the CPU has them (cpu_attention_amx.c).
 * Query blocks go to threads in turn (block b to thread b % threads): under a causal mask later queries see
 * more keys, so contiguous ranges would leave the first thread idle.
 */
#include "cpu_attention.h"
#include "cpu_tile.h"

#define PAIRS_PER_SUM 1024  /* value pairs per int32 sum: a pair adds < 2 * 4096 * 128 = 2**20 */

/* Keys as panels of 16: [panels][d/2][16][2], key 16t + c's dims 2p, 2p+1 at ((t * d/2 + p) * 16 + c) * 2. */
static void pack_keys(const int8_t *const *rows, int64_t span, int64_t d, int8_t *out) {
    const int64_t panels = (span + TILE_COLS - 1) / TILE_COLS;
    memset(out, 0, (size_t)(panels * TILE_COLS * d));
    for (int64_t j = 0; j < span; ++j) {
        int8_t *o = out + (j / TILE_COLS) * TILE_COLS * d + (j % TILE_COLS) * 2;
        for (int64_t p = 0; p < d / 2; ++p) {
            o[p * 2 * TILE_COLS] = rows[j][2 * p];
            o[p * 2 * TILE_COLS + 1] = rows[j][2 * p + 1];
        }
    }
}

/* Values as panels of 16 dims: [d/16][pairs][16][2], key pair p's dim 16c + i at ((c * pairs + p) * 16 + i) * 2. */
static void pack_values(const int8_t *const *rows, int64_t span, int64_t d, int64_t pairs, int8_t *out) {
    memset(out, 0, (size_t)(d * pairs * 2));
    for (int64_t j = 0; j < span; ++j)
        for (int64_t i = 0; i < d; ++i)
            out[(((i / TILE_COLS) * pairs + j / 2) * TILE_COLS + i % TILE_COLS) * 2 + j % 2] = rows[j][i];
}

/* score[c] = (float)(hi[c] * 2**shift + lo[c]) * qsc * ks[c] for 16 keys: cpu_attention.c's one rounding, then its
 * two float multiplies. */
static void scale_scores(const int32_t *hi, const int32_t *lo, int shift, float qsc, const float *ks, float *out) {
#ifdef __AVX2__
    const __m256d unit = _mm256_set1_pd((double)(1 << shift));
    for (int c = 0; c < TILE_COLS; c += 4) {
        const __m256d h = _mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(hi + c)));
        const __m256d l = _mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(lo + c)));
        const __m256d x = _mm256_add_pd(_mm256_mul_pd(h, unit), l);
        _mm_storeu_ps(out + c, _mm_mul_ps(_mm_mul_ps(_mm256_cvtpd_ps(x), _mm_set1_ps(qsc)), _mm_loadu_ps(ks + c)));
    }
#else
    for (int c = 0; c < TILE_COLS; ++c) out[c] = (float)((int64_t)hi[c] * (1 << shift) + lo[c]) * qsc * ks[c];
#endif
}

/* A block's queries (a job of their own: block_job) against KV head kh's packed keys from position k0: every query
 * head's score row. */
static void score_block(Job *a, int64_t kh, int64_t k0, const int8_t *keys, const float *ks,
                        int16_t *x, float *qsc) {
    const int64_t d = a->d, g = a->h / a->hkv, units = a->n * g;
    const int shift = query_shift(a->levels);
    int64_t lo = INT64_MAX, hi = -1;
    for (int64_t u = 0; u < units; ++u) {  /* unit u: query u / g, head kh * g + u % g; rows 2u (hi), 2u + 1 */
        const int64_t r = u / g, hh = kh * g + u % g;
        qsc[u] = query_halves(a, a->q + (r * a->h + hh) * d, shift, x + 2 * u * d, x + (2 * u + 1) * d);
        const int64_t first = first_visible(a->qpos[r], a->window);
        float *row = score_row(a, a->out, r, hh);
        for (int64_t j = a->qpos[r] - first + 1; j < row_length(a, r); ++j) row[j] = -INFINITY;
        lo = first < lo ? first : lo;
        hi = a->qpos[r] > hi ? a->qpos[r] : hi;
    }
    int32_t tile[TILE_ROWS][TILE_COLS];
    float vals[TILE_COLS];
    for (int64_t t = (lo - k0) / TILE_COLS; t <= (hi - k0) / TILE_COLS; ++t) {
        const int64_t key0 = k0 + t * TILE_COLS;
        for (int64_t r0 = 0; r0 < 2 * units; r0 += TILE_ROWS) {
            const int R = (int)(2 * units - r0 < TILE_ROWS ? 2 * units - r0 : TILE_ROWS);
            tile_i32(x + r0 * d, d, keys + t * TILE_COLS * d, d / 2, R, tile);
            for (int i = 0; i < R; i += 2) {
                const int64_t u = (r0 + i) / 2, r = u / g;
                const int64_t first = first_visible(a->qpos[r], a->window);
                const int64_t c0 = first > key0 ? first - key0 : 0;
                const int64_t c1 = a->qpos[r] - key0 + 1 < TILE_COLS ? a->qpos[r] - key0 + 1 : TILE_COLS;
                if (c1 <= c0) continue;
                float *dst = score_row(a, a->out, r, kh * g + u % g) + key0 - first;
                if (c0 == 0 && c1 == TILE_COLS) {  /* a whole tile: straight into the row (memcpy became rep movs) */
                    scale_scores(tile[i], tile[i + 1], shift, qsc[u], ks + t * TILE_COLS, dst);
                    continue;
                }
                scale_scores(tile[i], tile[i + 1], shift, qsc[u], ks + t * TILE_COLS, vals);
                for (int64_t c = c0; c < c1; ++c) dst[c] = vals[c];
            }
        }
    }
    for (int64_t u = 0; u < units; ++u) {
        const int64_t r = u / g;
        softmax_numerators(score_row(a, a->out, r, kh * g + u % g), a->qpos[r] - first_visible(a->qpos[r], a->window) + 1,
                  row_length(a, r));
    }
}

/* A block's queries (block_job) and KV head kh: each query head's probability grid as 12-bit halves over the span's
 * keys (rows 2u and 2u + 1 of x, `lp` int16 each), times the packed values, into the output. */
static void value_block(Job *a, int64_t kh, int64_t k0, int64_t lp, const int8_t *values,
                        const float *vs, int16_t *x, int32_t *n, int64_t (*acc)[MAX_D]) {
    const int64_t d = a->d, g = a->h / a->hkv, units = a->n * g, pairs = lp / 2;
    int64_t lo, hi;
    block_keys(a, 0, a->n, &lo, &hi);
    const int64_t p0 = (lo - k0) / 2, p1 = (hi - k0) / 2 + 1;  /* the block's key pairs */
    float unit[QUERY_BLOCK * MAX_GROUP];
    double z[QUERY_BLOCK * MAX_GROUP];
    for (int64_t u = 0; u < units; ++u) {
        const int64_t r = u / g, first = first_visible(a->qpos[r], a->window), count = a->qpos[r] - first + 1;
        const float *e = score_row(a, a->in, r, kh * g + u % g);
        unit[u] = probability_grid(a, e, vs + (first - k0), count, n, &z[u]);
        int16_t *wh = x + 2 * u * lp, *wl = wh + lp;
        memset(wh + 2 * p0, 0, sizeof(int16_t) * (size_t)(2 * (p1 - p0)));
        memset(wl + 2 * p0, 0, sizeof(int16_t) * (size_t)(2 * (p1 - p0)));
        for (int64_t j = 0; j < count; ++j) {
            wh[first - k0 + j] = (int16_t)(n[j] >> 12);  /* n <= 2**24: both halves fit int16 */
            wl[first - k0 + j] = (int16_t)(n[j] & 4095);
        }
    }
    int32_t tile[TILE_ROWS][TILE_COLS];
    for (int64_t r0 = 0; r0 < 2 * units; r0 += TILE_ROWS) {
        const int R = (int)(2 * units - r0 < TILE_ROWS ? 2 * units - r0 : TILE_ROWS);
        for (int64_t c = 0; c < d / TILE_COLS; ++c) {
            for (int i = 0; i < R; ++i) memset(acc[r0 + i] + c * TILE_COLS, 0, sizeof(int64_t) * TILE_COLS);
            for (int64_t p = p0; p < p1; p += PAIRS_PER_SUM) {
                const int64_t m = p1 - p < PAIRS_PER_SUM ? p1 - p : PAIRS_PER_SUM;
                tile_i32(x + r0 * lp + 2 * p, lp, values + (c * pairs + p) * 2 * TILE_COLS, m, R, tile);
                for (int i = 0; i < R; ++i)
                    for (int k = 0; k < TILE_COLS; ++k) acc[r0 + i][c * TILE_COLS + k] += tile[i][k];
            }
        }
    }
    for (int64_t u = 0; u < units; ++u) {
        const int64_t r = u / g;
        float *o = a->out + (r * a->h + kh * g + u % g) * d;
        const double f = (double)unit[u] * 268435456.0;
        for (int64_t i = 0; i < d; ++i) o[i] = (float)((double)(acc[2 * u][i] * 4096 + acc[2 * u + 1][i]) * f / z[u]);
    }
}

/* The keys this thread's query blocks see: [*k0, *k1], or -3 for a negative position. */
static int blocks_span(const Job *a, int64_t *k0, int64_t *k1) {
    *k0 = INT64_MAX;
    *k1 = -1;
    for (int64_t b = a->begin; b * QUERY_BLOCK < a->n; b += a->stride) {
        const int64_t q0 = b * QUERY_BLOCK, nb = block_queries(a, b);
        int64_t lo, hi;
        for (int64_t r = q0; r < q0 + nb; ++r) if (a->qpos[r] < 0) return -3;
        block_keys(a, q0, nb, &lo, &hi);
        *k0 = lo < *k0 ? lo : *k0;
        *k1 = hi > *k1 ? hi : *k1;
    }
    return 0;
}

/* Block b of job a as a job of its own: its queries 0..nb-1, its score rows in `scores` (laid out as
 * pdserve_attn_layout would, each padded to whole tiles), its output where a's is. */
static Job block_job(const Job *a, int64_t b, int64_t *offsets, float *scores) {
    const int64_t q0 = b * QUERY_BLOCK;
    Job blk = *a;
    blk.n = block_queries(a, b);
    blk.q = a->q + q0 * a->h * a->d;
    blk.qpos = a->qpos + q0;
    blk.qseq = a->qseq + q0;
    blk.out = scores;
    blk.offsets = offsets;
    offsets[0] = 0;
    for (int64_t r = 0; r < blk.n; ++r) {
        const int64_t cols = (blk.qpos[r] - first_visible(blk.qpos[r], a->window) + TILE_COLS) / TILE_COLS * TILE_COLS;
        offsets[r + 1] = offsets[r] + a->h * cols;
    }
    return blk;
}

/* One thread's query blocks of a prefill (stride > 0), scores and weighted values block by block, on the AVX tiles
 * above or AMX's (FUSED_AMX): the keys and values of each KV head gathered and packed once, a block's score rows in
 * this thread's scratch (a few hundred KiB, still in cache when its weighted values read them). Each buffer is
 * sized for either kind of tile. */
void pdserve_prefill_blocks(Job *a) {
    const int amx = a->fused == FUSED_AMX;
    const int64_t d = a->d, g = a->h / a->hkv;
    int64_t k0, k1;
    if ((a->status = blocks_span(a, &k0, &k1)) || k1 < 0) return;
    const int64_t span = k1 - k0 + 1, lp = span + (span & 1);
    const int64_t lk = (span + 63) / 64 * 64, pad = lk - span + TILE_COLS;  /* the span in AMX's 64-key chunks */
    const int64_t upad = (QUERY_BLOCK * g + 15) / 16 * 16;  /* a block's (query, head) rows in whole AMX tiles */
    int8_t *keys = malloc((size_t)(lk * d)), *values = malloc((size_t)(lk * d));
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(2 * upad * d));
    int16_t *xw = malloc(sizeof(int16_t) * (size_t)(2 * upad * lk));
    float *qsc = malloc(sizeof(float) * (size_t)upad);
    float *scores = malloc(sizeof(float) * (size_t)(a->h * QUERY_BLOCK * (span + TILE_COLS)));
    float *ks = malloc(sizeof(float) * (size_t)(lk + TILE_COLS)), *vs = malloc(sizeof(float) * (size_t)(lk + TILE_COLS));
    const int8_t **krows = malloc(sizeof(*krows) * (size_t)span), **vrows = malloc(sizeof(*vrows) * (size_t)span);
    int32_t *n = malloc(sizeof(int32_t) * (size_t)(span + 16));
    int64_t (*acc)[MAX_D] = malloc(sizeof(*acc) * (size_t)(2 * upad));
    int64_t offsets[QUERY_BLOCK + 1];
    if (!keys || !values || !xq || !xw || !qsc || !scores || !ks || !vs || !krows || !vrows || !n || !acc)
        a->status = -4;
    const int tiles_held = amx && !a->status;
    if (tiles_held) pdserve_amx_begin(d);
    for (int64_t kh = 0; kh < a->hkv && !a->status; ++kh) {
        Job values_of = *a;
        values_of.pool = a->vpool;
        values_of.pscale = a->vscale;
        if ((a->status = gather_span(a, kh, k0, span, pad, krows, ks)) ||
            (a->status = gather_span(&values_of, kh, k0, span, pad, vrows, vs)))
            break;
        if (amx) {
            pdserve_amx_pack(krows, vrows, span, d, lk, keys, values);
        } else {
            pack_keys(krows, span, d, keys);
            pack_values(vrows, span, d, lp / 2, values);
        }
        for (int64_t b = a->begin; b * QUERY_BLOCK < a->n; b += a->stride) {
            Job blk = block_job(a, b, offsets, scores);
            if (amx) pdserve_amx_scores(&blk, kh, k0, keys, ks, (uint8_t *)xq, qsc);
            else score_block(&blk, kh, k0, keys, ks, xq, qsc);
            blk.in = scores;
            blk.out = a->out + b * QUERY_BLOCK * a->h * d;
            if (amx) pdserve_amx_values(&blk, kh, k0, lk, vrows, values, vs, (uint8_t *)xw, n, acc);
            else value_block(&blk, kh, k0, lp, values, vs, xw, n, acc);
        }
    }
    if (tiles_held) pdserve_amx_end();
    free(keys);
    free(values);
    free(xq);
    free(xw);
    free(qsc);
    free(scores);
    free(ks);
    free(vs);
    free(krows);
    free(vrows);
    free(n);
    free(acc);
}
