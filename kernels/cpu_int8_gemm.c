/* The int8 GEMM of a few rows, reading the int8 weight itself (kernels/cpu_int8_gemm.py).
 *
 * The float route (kernels/cpu_gemm.py) multiplies by a float32 copy of each int8 weight: at one or
 * a few rows a step reads 4 bytes a weight, and decode at batch 1 is bound by those bytes. Here the
 * weight is read as int8 and the same integers come out: |x| <= 127, |w| <= 128, byte products summed in
 * pairs (vpmaddubsw, which cannot saturate here), then into int32 lanes (K up to 2**16 cannot overflow
 * them), one exact int32 per output, stored as float32 rounded once, as the float route's (float32, or
 * float64 beyond 1024) integers are by the epilogue. K not a multiple of 32 takes a scalar loop.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_ROWS 16
#define MAX_GEMM_THREADS 64

typedef struct {
    const int8_t *x;  /* [m, k] */
    const int8_t *w;  /* [n, k] */
    float *out;  /* [m, n] */
    int64_t m, k, n, begin, end;  /* this thread's weight rows */
} GemmJob;

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
        for (int r = 0; r < M; ++r) a->out[r * a->n + j] = (float)hsum(acc[r]);
    }
}
#endif

static void *gemm_job(void *arg) {
    const GemmJob *a = arg;
#ifdef __AVX2__
    if (a->k % 32 == 0) {  /* the row counts known at each call: the accumulators stay in registers */
        switch (a->m) {
            case 1: rows_avx2(a, 1); return NULL;
            case 2: rows_avx2(a, 2); return NULL;
            case 3: rows_avx2(a, 3); return NULL;
            case 4: rows_avx2(a, 4); return NULL;
            case 5: rows_avx2(a, 5); return NULL;
            case 6: rows_avx2(a, 6); return NULL;
            case 7: rows_avx2(a, 7); return NULL;
            case 8: rows_avx2(a, 8); return NULL;
            default: rows_avx2(a, (int)a->m); return NULL;
        }
    }
#endif
    for (int64_t j = a->begin; j < a->end; ++j) {
        const int8_t *w = a->w + j * a->k;
        for (int64_t r = 0; r < a->m; ++r) {
            int32_t s = 0;
            for (int64_t i = 0; i < a->k; ++i) s += (int32_t)a->x[r * a->k + i] * w[i];
            a->out[r * a->n + j] = (float)s;
        }
    }
    return NULL;
}

/* out[r, j] = sum_i x[r, i] * w[j, i] for x holding integers in [-127, 127] as float32 [m, k] and int8
 * w [n, k]. Returns 0, -1 (more than MAX_ROWS rows or K past 2**16), -4 (no memory), -5 (an x that is
 * not such an integer). */
int pdserve_int8_gemm_rows(const float *x, int64_t m, int64_t k, const int8_t *w, int64_t n, float *out,
                           int64_t threads) {
    if (m < 1 || m > MAX_ROWS || k > 65536) return -1;
    int8_t *xi = malloc((size_t)(m * k));
    if (xi == NULL) return -4;
    for (int64_t i = 0; i < m * k; ++i) {
        if (!(fabsf(x[i]) <= 127.0f) || (float)(int8_t)x[i] != x[i]) { free(xi); return -5; }
        xi[i] = (int8_t)x[i];
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_GEMM_THREADS) threads = MAX_GEMM_THREADS;
    if (threads > n) threads = n > 0 ? n : 1;
    GemmJob jobs[MAX_GEMM_THREADS];
    pthread_t ids[MAX_GEMM_THREADS];
    int started[MAX_GEMM_THREADS] = {0};
    for (int64_t t = 0; t < threads; ++t)
        jobs[t] = (GemmJob){.x = xi, .w = w, .out = out, .m = m, .k = k, .n = n,
                            .begin = n * t / threads, .end = n * (t + 1) / threads};
    for (int64_t t = 1; t < threads; ++t) started[t] = pthread_create(&ids[t], NULL, gemm_job, &jobs[t]) == 0;
    gemm_job(&jobs[0]);
    for (int64_t t = 1; t < threads; ++t) {
        if (started[t]) pthread_join(ids[t], NULL); else gemm_job(&jobs[t]);
    }
    free(xi);
    return 0;
}
