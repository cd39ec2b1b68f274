/* Exact attention over int8 paged KV, read in place from the pool (kernels/cpu_attention.py).
 *
 * The integer halves of kernels.reference._exact_attention, around torch's exp:
 *   pdserve_attn_scores: q on its integer grid (|n| <= levels <= 2**29), split n = hi * 2**s + lo with
 *     both halves in int16, dotted with the int8 keys exactly (two int32 sums, one int64 total), rounded to float32 once, times the grid scale, times the key's scale;
 *   (torch: e = exp(scores - max): the exp's bits stay torch's)
 *   pdserve_attn_pv: the softmax's sum and the probability-weighted sum of int8 values on their
 *     integer grids (exact in double), scaled as the reference scales them.
 * Every sum is exact, so neither the loop order nor the split across threads can change a bit;
 * the keys and values are read where they lie in the pool, never gathered or widened in memory.
 *
 * Row (n, hh) is query n's head hh; it sees positions first..qpos[n] of sequence qseq[n], first =
 * max(0, qpos[n] - window + 1) (window 0: no window), and its column j is position first + j;
 * columns past its last key are -inf. Built with -ffp-contract=off, without fast-math.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_D 256
#define MAX_GROUP 16
#define MAX_THREADS 64

typedef struct {
    const float *q, *in;  /* queries [n, h, d]; pv: e [n, h, cols] */
    int64_t n, h, d, hkv, cols;
    const int64_t *qseq, *qpos;
    int64_t window;
    const int64_t *tables;  /* [sequences, tw] block ids */
    int64_t tw, bs, nblocks;
    const int8_t *pool;  /* [nblocks * bs, hkv, d] */
    const float *pscale;  /* [nblocks * bs, hkv] */
    float levels, c, pdiv;
    float *out;  /* scores [n, h, cols] or attention [n, h, d] */
    int64_t begin, end;  /* this thread's (query, KV head) pairs, query-major */
    int status;  /* 0, -2 a block outside the pool, -3 more keys than columns or a bad position */
} Job;

static int64_t first_pos(const Job *a, int64_t r) {
    int64_t f = a->window > 0 ? a->qpos[r] - a->window + 1 : 0;
    return f > 0 ? f : 0;
}

/* Flat pool slot of position p of sequence s, or -1 when the table does not hold it. */
static int64_t slot_of(const Job *a, int64_t s, int64_t p) {
    if (p / a->bs >= a->tw) return -1;
    int64_t blk = a->tables[s * a->tw + p / a->bs];
    if (blk < 0 || blk >= a->nblocks) return -1;
    return blk * a->bs + p % a->bs;
}

static int check_row(Job *a, int64_t r, int64_t *first, int64_t *count) {
    *first = first_pos(a, r);
    *count = a->qpos[r] - *first + 1;
    if (a->qpos[r] < 0 || *count > a->cols) { a->status = -3; return 0; }
    return 1;
}

static void scores_rows(Job *a) {
    const int64_t d = a->d, g = a->h / a->hkv;
    int16_t hi[MAX_GROUP][MAX_D], lo[MAX_GROUP][MAX_D], kw[MAX_D];
    float qsc[MAX_GROUP];
    const int shift = ilogbf(a->levels) - 14 > 11 ? ilogbf(a->levels) - 14 : 11;  /* |hi| <= 2**14, lo < 2**15 */
    for (int64_t u = a->begin; u < a->end; ++u) {
        const int64_t r = u / a->hkv, kh = u % a->hkv;
        int64_t first, count;
        if (!check_row(a, r, &first, &count)) return;
        {
            for (int64_t gi = 0; gi < g; ++gi) {  /* each query head on its own integer grid */
                const float *qr = a->q + (r * a->h + kh * g + gi) * d;
                float amax = 0.0f;
                for (int64_t i = 0; i < d; ++i) { float m = fabsf(qr[i]); amax = m > amax ? m : amax; }
                const float scale = (amax < 1e-30f ? 1e-30f : amax) / a->levels;
                qsc[gi] = scale * a->c;
                for (int64_t i = 0; i < d; ++i) {
                    int32_t nq = (int32_t)nearbyintf(qr[i] / scale);
                    hi[gi][i] = (int16_t)(nq >> shift);  /* floor: lo lands in [0, 2**shift) */
                    lo[gi][i] = (int16_t)(nq - (nq >> shift) * (1 << shift));
                }
                float *row = a->out + (r * a->h + kh * g + gi) * a->cols;
                for (int64_t j = count; j < a->cols; ++j) row[j] = -INFINITY;
            }
            for (int64_t j = 0; j < count; ++j) {
                const int64_t slot = slot_of(a, a->qseq[r], first + j);
                if (slot < 0) { a->status = -2; return; }
                const int8_t *k = a->pool + (slot * a->hkv + kh) * d;
                const float ks = a->pscale[slot * a->hkv + kh];
                for (int64_t i = 0; i < d; ++i) kw[i] = k[i];
                for (int64_t gi = 0; gi < g; ++gi) {
                    int32_t sh = 0, sl = 0;
                    for (int64_t i = 0; i < d; ++i) {
                        sh += (int32_t)hi[gi][i] * kw[i];
                        sl += (int32_t)lo[gi][i] * kw[i];
                    }
                    const float acc = (float)((int64_t)sh * (1 << shift) + sl);  /* the one rounding */
                    a->out[(r * a->h + kh * g + gi) * a->cols + j] = acc * qsc[gi] * ks;
                }
            }
        }
    }
}

static void pv_rows(Job *a) {
    const int64_t d = a->d, g = a->h / a->hkv;
    double acc[MAX_GROUP][MAX_D], vw[MAX_D], z[MAX_GROUP];
    float unit[MAX_GROUP];
    for (int64_t u = a->begin; u < a->end; ++u) {
        const int64_t r = u / a->hkv, kh = u % a->hkv;
        int64_t first, count;
        if (!check_row(a, r, &first, &count)) return;
        {
            for (int64_t gi = 0; gi < g; ++gi) {  /* the softmax's sum in units of 2**-28, the probability grid */
                const float *e = a->in + (r * a->h + kh * g + gi) * a->cols;
                double zs = 0.0;
                float pmax = 0.0f;
                for (int64_t j = 0; j < count; ++j) {
                    zs += (double)nearbyintf(e[j] * 268435456.0f);
                    const int64_t slot = slot_of(a, a->qseq[r], first + j);
                    if (slot < 0) { a->status = -2; return; }
                    const float p = e[j] * a->pscale[slot * a->hkv + kh];
                    pmax = p > pmax ? p : pmax;
                }
                z[gi] = zs;
                unit[gi] = pmax / a->pdiv;
                memset(acc[gi], 0, sizeof(double) * d);
            }
            for (int64_t j = 0; j < count; ++j) {
                const int64_t slot = slot_of(a, a->qseq[r], first + j);
                const int8_t *v = a->pool + (slot * a->hkv + kh) * d;
                const float vs = a->pscale[slot * a->hkv + kh];
                for (int64_t i = 0; i < d; ++i) vw[i] = v[i];
                for (int64_t gi = 0; gi < g; ++gi) {
                    const float e = a->in[(r * a->h + kh * g + gi) * a->cols + j];
                    const double np = nearbyintf(e * vs / unit[gi]);  /* integer <= 2**24 */
                    if (np == 0.0) continue;
                    for (int64_t i = 0; i < d; ++i) acc[gi][i] += np * vw[i];  /* exact: < 2**53 */
                }
            }
            for (int64_t gi = 0; gi < g; ++gi) {
                float *o = a->out + (r * a->h + kh * g + gi) * d;
                const double f = (double)unit[gi] * 268435456.0;
                for (int64_t i = 0; i < d; ++i) o[i] = (float)(acc[gi][i] * f / z[gi]);
            }
        }
    }
}

static void *run_job(void *arg) {
    Job *a = arg;
    if (a->in == NULL) scores_rows(a); else pv_rows(a);
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

/* q [n, h, d] float32; k_pool [nblocks * bs, hkv, d] int8; k_scale [nblocks * bs, hkv] float32;
 * tables [sequences, tw] int64; out [n, h, cols] float32. levels: q's grid; c: 1/sqrt(d) as float. */
int pdserve_attn_scores(const float *q, int64_t n, int64_t h, int64_t d, const int64_t *qseq,
                        const int64_t *qpos, int64_t window, const int64_t *tables, int64_t tw, int64_t bs,
                        int64_t nblocks, const int8_t *k_pool, const float *k_scale, int64_t hkv,
                        float levels, float c, int64_t cols, float *out, int64_t threads) {
    Job a = {.q = q, .in = NULL, .n = n, .h = h, .d = d, .hkv = hkv, .cols = cols, .qseq = qseq, .qpos = qpos,
             .window = window, .tables = tables, .tw = tw, .bs = bs, .nblocks = nblocks, .pool = k_pool,
             .pscale = k_scale, .levels = levels, .c = c, .out = out};
    return run(&a, threads);
}

/* e [n, h, cols] float32 (exp(scores - max)); v_pool / v_scale as the keys'; out [n, h, d] float32.
 * pdiv: the probability grid's divisor (a power of two). */
int pdserve_attn_pv(const float *e, int64_t n, int64_t h, int64_t d, const int64_t *qseq,
                    const int64_t *qpos, int64_t window, const int64_t *tables, int64_t tw, int64_t bs,
                    int64_t nblocks, const int8_t *v_pool, const float *v_scale, int64_t hkv,
                    float pdiv, int64_t cols, float *out, int64_t threads) {
    Job a = {.q = NULL, .in = e, .n = n, .h = h, .d = d, .hkv = hkv, .cols = cols, .qseq = qseq, .qpos = qpos,
             .window = window, .tables = tables, .tw = tw, .bs = bs, .nblocks = nblocks, .pool = v_pool,
             .pscale = v_scale, .pdiv = pdiv, .out = out};
    return run(&a, threads);
}
