/* What cpu_attention.c (one query at a time) and cpu_attention_prefill.c (a prefill's queries in tiles) share:
 * the job, where a query's keys lie, a query's integer grid, and the softmax's exact halves. */
#ifndef PDSERVE_CPU_ATTENTION_H
#define PDSERVE_CPU_ATTENTION_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "cpu_threads.h"

#define MAX_D 256
#define MAX_GROUP 16
#define PREFETCH 32  /* rows ahead */
#define QUERY_BLOCK 16  /* queries per tile block (cpu_attention_prefill.c) */
#define TILED_MIN_QUERIES 4  /* fewer queries of one sequence go one at a time */

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
    int64_t begin, end;  /* this thread's (query, KV head) pairs, query-major; a prefill's: see `stride` */
    int64_t stride;  /* 0, or a prefill job (cpu_attention_prefill.c): query blocks begin, begin + stride, ... */
    const int8_t **rows;  /* scratch, one per column: a key's (or value's) row, its scale, its weight */
    float *scales;
    int32_t *weights;  /* pv: packed weights of every query head of a KV head, then one row's integers */
    int status;  /* 0, -2 a block outside the pool, -3 more keys than columns or a bad position, -4 no memory */
    const int8_t *vpool;  /* prefill jobs: the values' pool and scales beside the keys' */
    const float *vscale;
    int fused;  /* 0 one query at a time (cpu_attention.c), or a prefill's blocks: FUSED_TILES, FUSED_AMX */
} Job;

#define FUSED_TILES 1  /* the AVX register tiles (cpu_tile.h) */
#define FUSED_AMX 2  /* AMX tiles (cpu_attention_amx.c) */

static inline int64_t first_visible(int64_t qpos, int64_t window) {  /* window 0: no window */
    const int64_t f = window > 0 ? qpos - window + 1 : 0;
    return f > 0 ? f : 0;
}

static inline int64_t row_length(const Job *a, int64_t r) { return (a->offsets[r + 1] - a->offsets[r]) / a->h; }

static inline float *score_row(const Job *a, const float *base, int64_t r, int64_t hh) {
    return (float *)base + a->offsets[r] + hh * row_length(a, r);
}

/* The rows (and scales) of KV head kh at positions first..first+count-1 of sequence s (locate: query r's
 * visible ones), through its block table: 0, or the job's error status (-2 a block not held or outside the
 * pool, -3 a bad position). */
static inline int locate_span(const Job *a, int64_t s, int64_t kh, int64_t first, int64_t count, const int8_t **rows,
                              float *scales) {
    for (int64_t j = 0, b = first / a->bs, o = first % a->bs; j < count; ++b, o = 0) {  /* block by block */
        const int64_t blk = b < a->tw ? a->tables[s * a->tw + b] : -1;
        if (blk < 0 || blk >= a->nblocks) return -2;
        for (int64_t slot = blk * a->bs + o; o < a->bs && j < count; ++o, ++slot, ++j) {
            rows[j] = a->pool + (slot * a->hkv + kh) * a->d;
            scales[j] = a->pscale[slot * a->hkv + kh];
        }
    }
    return 0;
}

/* Whether query r's position is valid and its visible keys fit its score rows (else -3). */
static inline int query_fits(const Job *a, int64_t r) {
    return a->qpos[r] >= 0 && a->qpos[r] - first_visible(a->qpos[r], a->window) + 1 <= row_length(a, r);
}

static inline int locate(const Job *a, int64_t r, int64_t kh, int64_t *count, const int8_t **rows, float *scales) {
    const int64_t first = first_visible(a->qpos[r], a->window);
    *count = a->qpos[r] - first + 1;
    if (!query_fits(a, r)) return -3;
    return locate_span(a, a->qseq[r], kh, first, *count, rows, scales);
}

/* Keys and values lie where their blocks do, scattered: fetch a few rows ahead (the loop is latency-bound without). */
static inline void prefetch_row(const int8_t *row, int64_t d) {
    for (int64_t i = 0; i < d; i += 64) __builtin_prefetch(row + i);
}

/* The largest of row[0..count), NaN if any is. Which of two equal zeros wins may differ from a
 * left-to-right scan; row - max then differs only in a zero's sign, which exp maps to 1 either way. */
static inline float row_max(const float *row, int64_t count) {
    float top = -INFINITY;
    int nan = 0;
    int64_t j = 0;
#ifdef __AVX512F__
    __m512 wt = _mm512_set1_ps(-INFINITY);
    __mmask16 wn = 0;
    for (; j + 16 <= count; j += 16) {
        const __m512 x = _mm512_loadu_ps(row + j);
        wn |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        wt = _mm512_max_ps(x, wt);  /* a NaN x keeps wt, as the scalar loop keeps top */
    }
    top = _mm512_reduce_max_ps(wt);
    nan = wn != 0;
#endif
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
    nan |= _mm256_movemask_ps(vn) != 0;
#endif
    for (; j < count; ++j) { nan |= isnan(row[j]); top = row[j] > top ? row[j] : top; }
    return nan ? NAN : top;
}

/* kernels.reference.exp_nonpositive, op for op (each one IEEE rounding: built without FMA contraction), so the
 * same bits on every machine: exp of x <= 0 (larger read as 0), 0 below EXP_LOW and at -inf, NaN at NaN. */
#define EXP_LOW -87.0f
#define EXP_LOG2E 0x1.715476p+0f
#define EXP_LN2_HI 0x1.63p-1f
#define EXP_LN2_LO -0x1.bd0106p-13f
#define EXP_P0 0x1.a0d2cep-13f
#define EXP_P1 0x1.6e879cp-10f
#define EXP_P2 0x1.111210p-7f
#define EXP_P3 0x1.555382p-5f
#define EXP_P4 0x1.555554p-3f
#define EXP_P5 0x1p-1f

static inline float exp_nonpositive(float x) {
    if (isnan(x)) return x;
    if (x < EXP_LOW) return 0.0f;
    if (x > 0.0f) x = 0.0f;
    const float n = nearbyintf(x * EXP_LOG2E);
    const float r = (x - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    float p = EXP_P0;
    p = p * r + EXP_P1;
    p = p * r + EXP_P2;
    p = p * r + EXP_P3;
    p = p * r + EXP_P4;
    p = p * r + EXP_P5;
    p = (p * (r * r) + r) + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;  /* 2**n, n in [-126, 0] */
    float two_n;
    memcpy(&two_n, &bits, 4);
    return p * two_n;
}

#ifdef __AVX2__
static inline __m256 exp_nonpositive8(__m256 x) {
    const __m256 dead = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LOW), _CMP_LT_OQ);  /* false at NaN */
    x = _mm256_min_ps(_mm256_setzero_ps(), _mm256_max_ps(_mm256_set1_ps(EXP_LOW), x));  /* a NaN x stays NaN */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  /* nearbyintf */
    const __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(EXP_LN2_HI))),
                                   _mm256_mul_ps(n, _mm256_set1_ps(EXP_LN2_LO)));
    __m256 p = _mm256_set1_ps(EXP_P0);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_P1));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_P2));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_P3));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_P4));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_P5));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(dead, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));  /* NaN * anything: NaN */
}
#endif

#ifdef __AVX512F__
static inline __m512 exp_nonpositive16(__m512 x) {  /* exp_nonpositive8's operations on 16 lanes */
    const __mmask16 dead = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_LOW), _CMP_LT_OQ);  /* false at NaN */
    x = _mm512_min_ps(_mm512_setzero_ps(), _mm512_max_ps(_mm512_set1_ps(EXP_LOW), x));  /* a NaN x stays NaN */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  /* nearbyintf */
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(EXP_LN2_HI))),
                                   _mm512_mul_ps(n, _mm512_set1_ps(EXP_LN2_LO)));
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(EXP_P1));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(EXP_P2));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(EXP_P3));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(EXP_P4));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(EXP_P5));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mov_ps((__mmask16)~dead, _mm512_mul_ps(p, _mm512_castsi512_ps(bits)));
}
#endif

/* The softmax's numerators in place: exp(row - its max) over the first count columns (NaN everywhere if any
 * is NaN, as torch's amax then exp); the padding past them (-inf) becomes 0. */
static inline void softmax_numerators(float *row, int64_t count, int64_t length) {
    const float top = row_max(row, count);
    int64_t j = 0;
#ifdef __AVX512F__
    for (const __m512 v16 = _mm512_set1_ps(top); j + 16 <= count; j += 16)
        _mm512_storeu_ps(row + j, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(row + j), v16)));
#endif
#ifdef __AVX2__
    const __m256 vt = _mm256_set1_ps(top);
    for (; j + 8 <= count; j += 8)
        _mm256_storeu_ps(row + j, exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vt)));
#endif
    for (; j < count; ++j) row[j] = exp_nonpositive(row[j] - top);
    for (j = count; j < length; ++j) row[j] = isnan(top) ? NAN : 0.0f;
}

/* The split of q's grid integers: n = hi * 2**shift + lo with |hi| <= 2**14 and 0 <= lo < 2**15. */
static inline int query_shift(float levels) { return ilogbf(levels) - 14 > 11 ? ilogbf(levels) - 14 : 11; }

/* One query head's row qr [d] on its integer grid (levels over its largest |q|): the integers into nq [d];
 * returns the grid's scale times c (1/sqrt(d)). */
static inline float query_grid(const Job *a, const float *qr, int32_t *nq) {
    float amax = 0.0f;
    for (int64_t i = 0; i < a->d; ++i) { float m = fabsf(qr[i]); amax = m > amax ? m : amax; }
    const float scale = (amax < 1e-30f ? 1e-30f : amax) / a->levels;
    for (int64_t i = 0; i < a->d; ++i) nq[i] = (int32_t)nearbyintf(qr[i] / scale);
    return scale * a->c;
}

/* query_grid's integers split into int16 halves: n = hi * 2**shift + lo. */
static inline float query_halves(const Job *a, const float *qr, int shift, int16_t *hi, int16_t *lo) {
    int32_t nq[MAX_D];
    const float qsc = query_grid(a, qr, nq);
    for (int64_t i = 0; i < a->d; ++i) {
        hi[i] = (int16_t)(nq[i] >> shift);  /* floor: lo lands in [0, 2**shift) */
        lo[i] = (int16_t)(nq[i] - (nq[i] >> shift) * (1 << shift));
    }
    return qsc;
}

/* The softmax's sum in units of 2**-28 (integers summed in double: exact in any order), and in *pmax
 * the largest probability times its value scale (0 if none is larger; NaNs skipped, as the scalar loop). */
static inline double softmax_sum(const float *e, const float *scales, int64_t count, float *pmax) {
    double zs = 0.0;
    float top = 0.0f;
    int64_t j = 0;
#ifdef __AVX512F__
    __m512d w0 = _mm512_setzero_pd(), w1 = _mm512_setzero_pd();
    __m512 wt = _mm512_setzero_ps();
    for (; j + 16 <= count; j += 16) {
        const __m512 x = _mm512_loadu_ps(e + j);
        const __m512 units = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(268435456.0f)),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  /* nearbyintf */
        w0 = _mm512_add_pd(w0, _mm512_cvtps_pd(_mm512_castps512_ps256(units)));
        w1 = _mm512_add_pd(w1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(units), 1))));
        wt = _mm512_max_ps(_mm512_mul_ps(x, _mm512_loadu_ps(scales + j)), wt);
    }
    zs = _mm512_reduce_add_pd(_mm512_add_pd(w0, w1));  /* integers below 2**53: exact in any order */
    top = _mm512_reduce_max_ps(wt);  /* >= 0: the lanes started at 0 */
#endif
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
    zs += (zl[0] + zl[1]) + (zl[2] + zl[3]);
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
static inline void grid_weights(const float *e, const float *scales, int64_t count, float unit, int32_t *n) {
    int64_t j = 0;
#ifdef __AVX512F__
    for (; j + 16 <= count; j += 16) {
        const __m512 w = _mm512_div_ps(_mm512_mul_ps(_mm512_loadu_ps(e + j), _mm512_loadu_ps(scales + j)),
                                       _mm512_set1_ps(unit));
        _mm512_storeu_si512((void *)(n + j), _mm512_cvtps_epi32(_mm512_roundscale_ps(
            w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
#endif
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

/* The keys queries q0..q0+nb-1 see, together: [*lo, *hi]. */
static inline void block_keys(const Job *a, int64_t q0, int64_t nb, int64_t *lo, int64_t *hi) {
    *lo = INT64_MAX;
    *hi = -1;
    for (int64_t r = q0; r < q0 + nb; ++r) {
        const int64_t f = first_visible(a->qpos[r], a->window);
        *lo = f < *lo ? f : *lo;
        *hi = a->qpos[r] > *hi ? a->qpos[r] : *hi;
    }
}

/* The queries of block b (QUERY_BLOCK, fewer in the last). */
static inline int64_t block_queries(const Job *a, int64_t b) {
    return a->n - b * QUERY_BLOCK < QUERY_BLOCK ? a->n - b * QUERY_BLOCK : QUERY_BLOCK;
}

/* Rows of KV head kh at positions k0..k0+span-1 and their scales (zero for `pad` past the span, for padded keys):
 * 0 or the status. */
static inline int gather_span(const Job *a, int64_t kh, int64_t k0, int64_t span, int64_t pad, const int8_t **rows,
                              float *scales) {
    memset(scales + span, 0, sizeof(float) * (size_t)pad);
    return locate_span(a, a->qseq[0], kh, k0, span, rows, scales);
}

/* One score row's softmax numerators e [count] on the probability grid: each key's weight into n [count], the
 * softmax's sum into *z; returns the grid's unit (its largest probability over pdiv). */
static inline float probability_grid(const Job *a, const float *e, const float *scales, int64_t count, int32_t *n,
                                     double *z) {
    float pmax;
    *z = softmax_sum(e, scales, count, &pmax);
    const float unit = pmax / a->pdiv;
    grid_weights(e, scales, count, unit, n);
    return unit;
}

/* cpu_attention_prefill.c: one thread's blocks of a prefill job (stride > 0), scores then weighted values. */
void pdserve_prefill_blocks(Job *a) __attribute__((visibility("hidden")));

/* cpu_attention_amx.c: its part of a FUSED_AMX job, where the library was built for AMX and the kernel lets this
 * process use the tiles (pdserve_amx_ready; elsewhere these are never called); the AVX tiles' bits. Buffers as
 * pdserve_prefill_blocks sizes them: keys and values [lk * d] (lk: the span in whole 64-key chunks), x q's or the
 * probabilities' digits, extra [upad][MAX_D]. */
int pdserve_amx_ready(void);
void pdserve_amx_begin(int64_t d) __attribute__((visibility("hidden")));
void pdserve_amx_end(void) __attribute__((visibility("hidden")));
void pdserve_amx_pack(const int8_t *const *krows, const int8_t *const *vrows, int64_t span, int64_t d, int64_t lk,
                      int8_t *keys, int8_t *values) __attribute__((visibility("hidden")));
void pdserve_amx_scores(Job *a, int64_t kh, int64_t k0, const int8_t *keys, const float *ks, uint8_t *x, float *qsc)
    __attribute__((visibility("hidden")));
void pdserve_amx_values(Job *a, int64_t kh, int64_t k0, int64_t lk, const int8_t *const *rows, const int8_t *values,
                        const float *vs, uint8_t *x, int32_t *n, int64_t (*extra)[MAX_D])
    __attribute__((visibility("hidden")));

#endif
