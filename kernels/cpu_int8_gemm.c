/* The CPU's C int8 GEMMs (kernels/cpu_gemm.py): a few rows reading the int8 weight itself, and many rows
 * against a packed copy (further down).
 *
 * The float route (kernels/cpu_gemm.py) multiplies by a float32 copy of each int8 weight: at one or
 * a few rows a step reads 4 bytes a weight, and decode at batch 1 is bound by those bytes. Here the
 * weight is read as int8 and the same integers come out: |x| <= 127, |w| <= 128, byte products summed in
 * pairs (vpmaddubsw, which cannot saturate here), then into int32 lanes (K up to 2**16 cannot overflow
 * them), one exact int32 per output, stored as float32 rounded once, as the float route's (float32, or
 * float64 beyond 1024) integers are by the epilogue, then scaled as the reference scales (`scaled`).
 * K not a multiple of 32 takes a scalar loop.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "cpu_threads.h"
#include "cpu_tile.h"

#define MAX_ROWS 16

typedef struct {
    const int8_t *x;  /* [m, k] */
    const int8_t *w;  /* [n, k] */
    const float *xs, *ws;  /* [m], [n] scales (see scaled), or NULL */
    float *out;  /* [m, n] */
    int64_t m, k, n, begin, end;  /* this thread's weight rows */
} GemmJob;

/* The epilogue of kernels.reference.int8_matmul: the exact sum rounded once to float32, then times the row's
 * scale, then times the column's, each product rounded (built without FMA contraction), as torch's two
 * in-place multiplies do it: the same bits. Without scales, the sum alone. */
static inline float scaled(int32_t acc, const float *xs, const float *ws, int64_t r, int64_t c) {
    return xs == NULL ? (float)acc : ((float)acc * xs[r]) * ws[c];
}

/* x (integers in [-127, 127] held in float32) as int16, rows of kp (a zero past k when kp > k); 0 or -5 when
 * any is not such an integer. Rows split over the OpenMP threads where there are many. */
static int rows_to_int16(const float *x, int64_t m, int64_t k, int64_t kp, int16_t *out) {
    int bad = 0;
#pragma omp parallel for reduction(| : bad) if (m * k >= 65536) schedule(static)
    for (int64_t r = 0; r < m; ++r) {
        for (int64_t i = 0; i < k; ++i) {  /* no early exit: the loop vectorizes */
            const float v = x[r * k + i];
            bad |= !(fabsf(v) <= 127.0f) | ((float)(int32_t)(fabsf(v) <= 127.0f ? v : 0.0f) != v);
            out[r * kp + i] = (int16_t)(fabsf(v) <= 127.0f ? v : 0.0f);
        }
        if (kp > k) out[r * kp + k] = 0;
    }
    return bad ? -5 : 0;
}

#ifdef __AVX2__
/* 32 products x*w summed in pairs into 16-bit lanes, then into 8 int32 lanes. vpmaddubsw multiplies unsigned
 * by signed bytes: |w| (-128 reads as 128 unsigned) times x with w's sign (|x| <= 127, so no overflow), and a
 * pair is at most 2 * 128 * 127 = 32512: never saturates. Exact, so any order of the sums gives the same. */
static inline __m256i dot32(__m256i xv, __m256i wv) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

static inline int32_t hsum(__m256i v) {
    const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    const __m128i t = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
}

/* M rows of x against one weight row at a time, its next-but-one row prefetched: the weights stream from
 * memory once, in order (reading four rows at a time, interleaved, ran up to 2x slower on a 28 MB weight). */
static inline __attribute__((always_inline)) void rows_avx2(const GemmJob *a, const int M) {
    for (int64_t j = a->begin; j < a->end; ++j) {
        __m256i acc[MAX_ROWS];
        for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_si256();
        const int8_t *w = a->w + j * a->k;
        for (int64_t i = 0; i < a->k; i += 32) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + i));
            _mm_prefetch((const char *)(w + 2 * a->k + i), _MM_HINT_T0);
            for (int r = 0; r < M; ++r)
                acc[r] = _mm256_add_epi32(acc[r], dot32(_mm256_loadu_si256((const __m256i *)(a->x + r * a->k + i)), wv));
        }
        for (int r = 0; r < M; ++r) a->out[r * a->n + j] = scaled(hsum(acc[r]), a->xs, a->ws, r, j);
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* The same sums on AVX-512 VNNI, 64 bytes at a time: vpdpbusd multiplies unsigned by signed bytes and adds each
 * four products into an int32 lane (no 16-bit step, so nothing to saturate): |w| (-128 reads as 128 unsigned)
 * times x with w's sign (|x| <= 127, so negating it is exact). */
static inline __attribute__((always_inline)) void rows_avx512(const GemmJob *a, const int M) {
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t j = a->begin; j < a->end; ++j) {
        __m512i acc[MAX_ROWS];
        for (int r = 0; r < M; ++r) acc[r] = zero;
        const int8_t *w = a->w + j * a->k;
        for (int64_t i = 0; i < a->k; i += 64) {
            const __m512i wv = _mm512_loadu_si512((const void *)(w + i));
            _mm_prefetch((const char *)(w + 2 * a->k + i), _MM_HINT_T0);
            const __m512i wa = _mm512_abs_epi8(wv);
            const __mmask64 negative = _mm512_movepi8_mask(wv);
            for (int r = 0; r < M; ++r) {
                const __m512i xv = _mm512_loadu_si512((const void *)(a->x + r * a->k + i));
                acc[r] = _mm512_dpbusd_epi32(acc[r], wa, _mm512_mask_sub_epi8(xv, negative, zero, xv));
            }
        }
        for (int r = 0; r < M; ++r) a->out[r * a->n + j] = scaled(_mm512_reduce_add_epi32(acc[r]), a->xs, a->ws, r, j);
    }
}
#endif

/* The row counts known at each call (a copy of the kernel per count): the accumulators stay in registers. */
#define ROWS_BY_COUNT(kernel)                                                                             \
    switch (a->m) {                                                                                       \
        case 1: kernel(a, 1); return NULL;                                                                \
        case 2: kernel(a, 2); return NULL;                                                                \
        case 3: kernel(a, 3); return NULL;                                                                \
        case 4: kernel(a, 4); return NULL;                                                                \
        case 5: kernel(a, 5); return NULL;                                                                \
        case 6: kernel(a, 6); return NULL;                                                                \
        case 7: kernel(a, 7); return NULL;                                                                \
        case 8: kernel(a, 8); return NULL;                                                                \
        default: kernel(a, (int)a->m); return NULL;                                                       \
    }

static void *gemm_job(void *arg) {
    const GemmJob *a = arg;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (a->k % 64 == 0) ROWS_BY_COUNT(rows_avx512)
#endif
#ifdef __AVX2__
    if (a->k % 32 == 0) ROWS_BY_COUNT(rows_avx2)
#endif
    for (int64_t j = a->begin; j < a->end; ++j) {
        const int8_t *w = a->w + j * a->k;
        for (int64_t r = 0; r < a->m; ++r) {
            int32_t s = 0;
            for (int64_t i = 0; i < a->k; ++i) s += (int32_t)a->x[r * a->k + i] * w[i];
            a->out[r * a->n + j] = scaled(s, a->xs, a->ws, r, j);
        }
    }
    return NULL;
}

/* out[r, j] = sum_i x[r, i] * w[j, i] for x holding integers in [-127, 127] as float32 [m, k] and int8
 * w [n, k], times xs[r] and ws[j] where given (`scaled`). Returns 0, -1 (more than MAX_ROWS rows or K past
 * 2**16), -4 (no memory), -5 (an x that is not such an integer). */
int pdserve_int8_gemm_rows_scaled(const float *x, int64_t m, int64_t k, const int8_t *w, int64_t n, const float *xs,
                                  const float *ws, float *out, int64_t threads) {
    if (m < 1 || m > MAX_ROWS || k > 65536) return -1;
    int8_t *xi = malloc((size_t)(m * k));
    if (xi == NULL) return -4;
    for (int64_t i = 0; i < m * k; ++i) {
        if (!(fabsf(x[i]) <= 127.0f) || (float)(int8_t)x[i] != x[i]) { free(xi); return -5; }
        xi[i] = (int8_t)x[i];
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = n > 0 ? n : 1;
    GemmJob jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; ++t)
        jobs[t] = (GemmJob){.x = xi, .w = w, .xs = xs, .ws = ws, .out = out, .m = m, .k = k, .n = n,
                            .begin = n * t / threads, .end = n * (t + 1) / threads};
    run_jobs(gemm_job, jobs, sizeof(*jobs), threads);
    free(xi);
    return 0;
}

int pdserve_rotate_quantize(const float *x, float *q, float *scale, int64_t m, int64_t k, int64_t block,
                            float norm);  /* cpu_fused.c */

/* The int8 linear of a few rows (decode) in one call from Python: each row rotated and quantized as
 * pdserve_rotate_quantize does it, then the rows GEMM with both scales: those two calls' bits, without the
 * second crossing and the intermediate tensors (at batch 1 the crossings cost more than the prologue's
 * arithmetic). Returns the rows GEMM's codes; -4 also when the prologue's scratch could not be had. */
int pdserve_int8_linear_rows(const float *x, int64_t m, int64_t k, int64_t block, float norm, const int8_t *w,
                             int64_t n, const float *ws, float *out, int64_t threads) {
    if (m < 1 || m > MAX_ROWS || k > 65536) return -1;
    float *q = malloc((size_t)(m * k + m) * sizeof(float));
    if (q == NULL) return -4;
    float *xs = q + m * k;
    int status = pdserve_rotate_quantize(x, q, xs, m, k, block, norm) ? -4
                 : pdserve_int8_gemm_rows_scaled(q, m, k, w, n, xs, ws, out, threads);
    free(q);
    return status;
}

/* The sums alone (the same entry point as before the scaled one; benchmarks.c_kernels_vs calls it in older builds). */
int pdserve_int8_gemm_rows(const float *x, int64_t m, int64_t k, const int8_t *w, int64_t n, float *out,
                           int64_t threads) {
    return pdserve_int8_gemm_rows_scaled(x, m, k, w, n, NULL, NULL, out, threads);
}

/* The epilogue of torch._int_mm's route (kernels/cpu_gemm.py): out[r, c] = scaled(acc[r, c]) in one pass, rows
 * over the threads; out may be acc itself (each element is read before it is written). */
int pdserve_int32_scaled(const int32_t *acc, int64_t m, int64_t n, const float *xs, const float *ws, float *out,
                         int64_t threads) {
    if (m < 0 || n < 0 || xs == NULL || ws == NULL) return -1;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) if (m * n >= 65536) schedule(static)
    for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < n; ++c) out[r * n + c] = scaled(acc[r * n + c], xs, ws, r, c);
    return 0;
}

/* The same epilogue for sums already rounded once to float32 (oneDNN's int8 matmul, kernels/cpu_gemm.py): the
 * bits of `scaled` on the int32 they came from. */
int pdserve_float_scaled(const float *acc, int64_t m, int64_t n, const float *xs, const float *ws, float *out,
                         int64_t threads) {
    if (m < 0 || n < 0 || xs == NULL || ws == NULL) return -1;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) if (m * n >= 65536) schedule(static)
    for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < n; ++c) out[r * n + c] = (acc[r * n + c] * xs[r]) * ws[c];
    return 0;
}

/* -- many rows: packed weights, register tiles (cpu_tile.h) ----------------------------------------------------
 * At prefill a weight is reused by hundreds of rows, so the arithmetic, not the bytes, sets the time. AVX2 has
 * no 8-bit dot product that is exact here (vpmaddubsw's pairs of |w| * x fit, but it needs a sign op per
 * product vector), while vpmaddwd multiplies 16-bit pairs into int32 at the rate of an fp32 FMA with twice
 * its products: x widened to int16 once per call, the weight packed once (kernels/cpu_gemm.py,
 * ``pack_weight``) as panels of 16 columns, [ceil(N/16)][K/2][16][2] bytes. Exact int32 sums (K up to 2**16),
 * each stored as float32 rounded once: the same bits as the rows path and the float route. */
#define ROW_BLOCK 48  /* rows whose int16 copy (48 x K x 2 bytes) stays in L2 while every panel passes */

typedef struct {
    const int16_t *x;  /* [m, kp] */
    const int8_t *wp;  /* packed */
    const float *xs, *ws;  /* [m], [n] scales (see scaled), or NULL */
    float *out;  /* [m, n] */
    int64_t m, kp, n, begin, end;  /* this thread's panels */
} PanelJob;

static void *panel_job(void *arg) {
    const PanelJob *a = arg;
    int32_t tile[TILE_ROWS][TILE_COLS];
    for (int64_t r0 = 0; r0 < a->m; r0 += ROW_BLOCK) {
        const int64_t r1 = r0 + ROW_BLOCK < a->m ? r0 + ROW_BLOCK : a->m;
        for (int64_t j = a->begin; j < a->end; ++j) {
            const int8_t *wp = a->wp + j * a->kp * TILE_COLS;
            const int64_t cols = a->n - j * TILE_COLS < TILE_COLS ? a->n - j * TILE_COLS : TILE_COLS;
            for (int64_t r = r0; r < r1; r += TILE_ROWS) {
                const int R = (int)(r1 - r < TILE_ROWS ? r1 - r : TILE_ROWS);
                tile_i32(a->x + r * a->kp, a->kp, wp, a->kp / 2, R, tile);
                for (int i = 0; i < R; ++i) {
                    float *o = a->out + (r + i) * a->n + j * TILE_COLS;
                    for (int64_t c = 0; c < cols; ++c)
                        o[c] = scaled(tile[i][c], a->xs, a->ws, r + i, j * TILE_COLS + c);
                }
            }
        }
    }
    return NULL;
}

/* out[r, j] = sum_i x[r, i] * w[j, i] for x holding integers in [-127, 127] as float32 [m, k] and w packed by
 * ``pack_weight`` (K padded to kp, even; N to whole panels), times xs[r] and ws[j] where given (`scaled`).
 * Returns 0, -1 (K past 2**16 or kp not K rounded up to even), -4 (no memory), -5 (an x that is not such an
 * integer). */
int pdserve_int8_gemm_packed(const float *x, int64_t m, int64_t k, const int8_t *wp, int64_t n, int64_t kp,
                             const float *xs, const float *ws, float *out, int64_t threads) {
    if (m < 1 || k > 65536 || kp != k + (k & 1)) return -1;
    int16_t *xi = malloc((size_t)(m * kp) * sizeof(int16_t));
    if (xi == NULL) return -4;
    if (rows_to_int16(x, m, k, kp, xi)) { free(xi); return -5; }
    const int64_t panels = (n + TILE_COLS - 1) / TILE_COLS;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > panels) threads = panels;
    PanelJob jobs[MAX_THREADS];
    for (int64_t t = 0; t < threads; ++t)
        jobs[t] = (PanelJob){.x = xi, .wp = wp, .xs = xs, .ws = ws, .out = out, .m = m, .kp = kp, .n = n,
                             .begin = panels * t / threads, .end = panels * (t + 1) / threads};
    run_jobs(panel_job, jobs, sizeof(*jobs), threads);
    free(xi);
    return 0;
}
