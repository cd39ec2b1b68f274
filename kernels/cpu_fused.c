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
#include <string.h>

static void rotate_quantize_row(const float *x, float *q, float *scale, int64_t k, int64_t block,
                                float norm, float *buf) {
    memcpy(buf, x, (size_t)k * sizeof(float));
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

/* x, q: [m, k] row-major float32; scale: [m]. Returns 0, or -1 when out of memory. */
int pdserve_rotate_quantize(const float *x, float *q, float *scale, int64_t m, int64_t k, int64_t block,
                            float norm) {
    float *buf = malloc((size_t)k * sizeof(float));
    if (buf == NULL) return -1;
    for (int64_t r = 0; r < m; ++r) rotate_quantize_row(x + r * k, q + r * k, scale + r, k, block, norm, buf);
    free(buf);
    return 0;
}
