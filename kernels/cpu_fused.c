/* The int8 linear's prologue in one call: rotate, then quantize per row (kernels/cpu_fused.py).
 *
 * Bit for bit the torch ops it replaces: model.quant.hadamard_rotate (a fast Walsh-Hadamard
 * transform of each `block`-wide slice, passes from the widest pairing down, one rounding per
 * add, then times block**-0.5) followed by kernels.reference.quantize_rows_float (scale =
 * max|x| / 127, at least 1e-8 / 127; round half to even; clamp to +-127). Built with
 * -ffp-contract=off and without fast-math, so every operation rounds once, as torch's do.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>

/* The passes pairing j with j + 4, j + 2, j + 1 (in that order) on 8 floats in a register: each output
 * a + c (lanes of the low member) or a - c (the high member), as the scalar loop computes them. */
static inline __m256 butterflies8(__m256 v) {
    __m256 s = _mm256_permute2f128_ps(v, v, 1);  /* lane j <-> j + 4 */
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xF0);
    s = _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2));  /* j <-> j + 2 */
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xCC);
    s = _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1));  /* j <-> j + 1 */
    return _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xAA);
}

/* The last three passes and the normalization for block >= 8; returns max|x| (NaN if any is NaN). */
static float finish_avx2(float *buf, int64_t k, float norm) {
    __m256 amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f), n = _mm256_set1_ps(norm);
    for (int64_t i = 0; i < k; i += 8) {
        const __m256 v = _mm256_mul_ps(butterflies8(_mm256_loadu_ps(buf + i)), n);
        _mm256_storeu_ps(buf + i, v);
        const __m256 m = _mm256_andnot_ps(sign, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(m, m, _CMP_UNORD_Q));
        amax = _mm256_max_ps(m, amax);  /* a NaN m keeps amax, as the scalar loop */
    }
    float lanes[8], top = 0.0f;
    _mm256_storeu_ps(lanes, amax);
    for (int j = 0; j < 8; ++j) top = lanes[j] > top ? lanes[j] : top;
    return _mm256_movemask_ps(nan) ? NAN : top;
}

static void quantize_avx2(const float *buf, float *q, int64_t k, float s) {  /* k a multiple of 8 */
    const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    for (int64_t i = 0; i < k; i += 8) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(buf + i), sv),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(q + i, _mm256_min_ps(hi, _mm256_max_ps(lo, r)));  /* a NaN r stays (the second operand) */
    }
}
#endif

static void rotate_quantize_row(const float *x, float *q, float *scale, int64_t k, int64_t block,
                                float norm, float *buf) {
    memcpy(buf, x, (size_t)k * sizeof(float));
#ifdef __AVX2__
    if (block >= 8) {
        for (int64_t half = block / 2; half >= 8; half /= 2)
            for (int64_t g = 0; g < k; g += 2 * half)
                for (int64_t j = 0; j < half; j += 8) {
                    const __m256 u = _mm256_loadu_ps(buf + g + j), v = _mm256_loadu_ps(buf + g + half + j);
                    _mm256_storeu_ps(buf + g + j, _mm256_add_ps(u, v));
                    _mm256_storeu_ps(buf + g + half + j, _mm256_sub_ps(u, v));
                }
        const float amax = finish_avx2(buf, k, norm);
        const float s = (amax < 1e-8f ? 1e-8f : amax) / 127.0f;  /* NaN: the comparison fails, s is NaN */
        *scale = s;
        quantize_avx2(buf, q, k, s);
        return;
    }
#endif
    for (int64_t half = block / 2; half >= 1; half /= 2) {
        for (int64_t g = 0; g < k; g += 2 * half) {
            float *a = buf + g, *c = buf + g + half;
            for (int64_t j = 0; j < half; ++j) {
                float u = a[j], v = c[j];
                a[j] = u + v;
                c[j] = u - v;
            }
        }
    }
    float amax = 0.0f;
    int nan = 0;
    for (int64_t i = 0; i < k; ++i) {
        buf[i] = buf[i] * norm;
        float m = fabsf(buf[i]);
        nan |= isnan(m);
        amax = m > amax ? m : amax;
    }
    if (nan) amax = NAN;  /* torch's amax propagates NaN */
    float s = (amax < 1e-8f ? 1e-8f : amax) / 127.0f;
    *scale = s;
    for (int64_t i = 0; i < k; ++i) {
        float r = nearbyintf(buf[i] / s);
        q[i] = r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r);
    }
}

/* Rows [r0, r1) of x, q: [m, k] row-major float32 (scale: [m]) with a buffer of their own: 0, or -1 without
 * memory. A plain function (not the body of the parallel region below): inlined into OpenMP's outlined region the
 * loop ran ~20% slower on one thread. With q8 (not NULL) the integers go to q8 as int8 (q unused): each row's float
 * integers pass through the thread's buffer, not through memory, and torch's q.to(torch.int8) pass is saved. A NaN
 * row's codes are whatever the conversion gives; its scale is NaN, so its products are NaN either way. */
__attribute__((noinline)) static int rotate_quantize_range(const float *x, float *q, int8_t *q8, float *scale,
                                                          int64_t r0, int64_t r1, int64_t k, int64_t block,
                                                          float norm) {
    if (r0 >= r1) return 0;
    float *buf = malloc((size_t)k * 2 * sizeof(float));
    if (buf == NULL) return -1;
    for (int64_t r = r0; r < r1; ++r) {
        float *row = q8 == NULL ? q + r * k : buf + k;
        rotate_quantize_row(x + r * k, row, scale + r, k, block, norm, buf);
        if (q8 != NULL)
            for (int64_t i = 0; i < k; ++i) q8[r * k + i] = (int8_t)(int32_t)row[i];
    }
    free(buf);
    return 0;
}

static int rotate_quantize(const float *x, float *q, int8_t *q8, float *scale, int64_t m, int64_t k, int64_t block,
                           float norm) {
    int status = 0;
#pragma omp parallel reduction(| : status) if (m * k >= 65536)  /* rows are independent: any split, same bits */
    {
        int64_t t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        status |= rotate_quantize_range(x, q, q8, scale, m * t / nt, m * (t + 1) / nt, k, block, norm);
    }
    return status ? -1 : 0;
}

int pdserve_rotate_quantize(const float *x, float *q, float *scale, int64_t m, int64_t k, int64_t block,
                            float norm) {
    return rotate_quantize(x, q, NULL, scale, m, k, block, norm);
}

/* The same, the integers as int8 [m, k] (for torch._int_mm). */
int pdserve_rotate_quantize_int8(const float *x, int8_t *q8, float *scale, int64_t m, int64_t k, int64_t block,
                                 float norm) {
    return rotate_quantize(x, NULL, q8, scale, m, k, block, norm);
}

/* New K and V rows into the int8 pool (kernels.reference.write_kv in one call): each token's head quantized
 * as quantize_rows does it (scale = max|x| / 127, at least 1e-8 / 127; round half to even; clamp to +-127)
 * and stored at its flat slot. k, v: [n, hkv, d] float32; slots: [n]; pools [slots, hkv, d] int8 and
 * scales [slots, hkv] float32. A later row with the same slot overwrites an earlier one, as torch's.
 * Returns -1, writing nothing, if a slot lies outside [0, capacity). */
static void quantize_row_int8(const float *x, int8_t *q, float *scale, int64_t d) {
    float amax = 0.0f;
    int nan = 0;
    for (int64_t i = 0; i < d; ++i) {
        const float m = fabsf(x[i]);
        nan |= isnan(m);
        amax = m > amax ? m : amax;
    }
    if (nan) amax = NAN;
    const float s = (amax < 1e-8f ? 1e-8f : amax) / 127.0f;
    *scale = s;
    for (int64_t i = 0; i < d; ++i) {
        const float r = nearbyintf(x[i] / s);
        q[i] = (int8_t)(int32_t)(r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r));
    }
}

int pdserve_write_kv(const float *k, const float *v, const int64_t *slots, int64_t n, int64_t hkv, int64_t d,
                     int8_t *k_pool, int8_t *v_pool, float *k_scale, float *v_scale, int64_t capacity) {
    for (int64_t t = 0; t < n; ++t)
        if (slots[t] < 0 || slots[t] >= capacity) return -1;  /* nothing written */
    /* a job per (K or V, head), tokens in order within it: a slot written twice keeps the later row, as torch's */
#pragma omp parallel for if (n * hkv * d >= 65536) schedule(static)
    for (int64_t job = 0; job < 2 * hkv; ++job) {
        const int64_t h = job / 2;
        const float *src = job % 2 ? v : k;
        int8_t *pool = job % 2 ? v_pool : k_pool;
        float *scale = job % 2 ? v_scale : k_scale;
        for (int64_t t = 0; t < n; ++t) {
            const int64_t row = slots[t] * hkv + h;
            quantize_row_int8(src + (t * hkv + h) * d, pool + row * d, scale + row, d);
        }
    }
    return 0;
}

/* RoPE in place on the first `heads` heads (d floats each) of n rows of `stride` floats (model/transformer.py's
 * RopeAt on a Q/K/V projection's output): x[i] * cos[i] + x[(i + d/2) % d] * ssin[i], the two products and the
 * sum each rounded once as torch's mul, roll, mul and add do it: the same bits. cos, ssin: [n, d]. Returns -1
 * for a head wider than its buffer. */
int pdserve_rope_heads(float *rows, int64_t n, int64_t stride, int64_t heads, int64_t d, const float *cos,
                       const float *ssin) {
    if (d > 512 || d % 2) return -1;
#pragma omp parallel for if (n * heads * d >= 65536) schedule(static)  /* rows are independent: any split */
    for (int64_t t = 0; t < n; ++t) {
        float buf[512];
        for (int64_t h = 0; h < heads; ++h) {
            float *x = rows + t * stride + h * d;
            const float *c = cos + t * d, *s = ssin + t * d;
            const int64_t half = d / 2;
            memcpy(buf, x, (size_t)d * sizeof(float));
            for (int64_t i = 0; i < half; ++i) x[i] = buf[i] * c[i] + buf[i + half] * s[i];  /* two plain loops: */
            for (int64_t i = half; i < d; ++i) x[i] = buf[i] * c[i] + buf[i - half] * s[i];  /* they vectorize */
        }
    }
    return 0;
}

/* RMSNorm after its mean of squares (model/transformer.py): out[r, i] = w[i] * (x[r, i] * (1 / sqrt(ms[r] + eps))),
 * each op rounded once as torch's add, rsqrt (a division of 1 by a square root), mul and mul round it: the same
 * bits. x, out: [m, k]; ms: [m]; w: [k]. */
void pdserve_rms_scale(const float *x, const float *ms, const float *w, float eps, float *out, int64_t m, int64_t k) {
#pragma omp parallel for if (m * k >= 65536) schedule(static)
    for (int64_t r = 0; r < m; ++r) {
        const float inv = 1.0f / sqrtf(ms[r] + eps);
        for (int64_t i = 0; i < k; ++i) out[r * k + i] = w[i] * (x[r * k + i] * inv);
    }
}

/* Where built with OpenMP (cpu_threads.h), its runtime's thread count for a parallel region here (so a test can
 * see it is torch's: torch.set_num_threads sets it); 0 without OpenMP. */
int pdserve_openmp(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 0;
#endif
}
