/* cpu_attention_prefill.c's blocks on AMX tiles (Intel Sapphire Rapids and later): the same exact integer sums, so
 * the same bits.
 *
 * AMX multiplies 16 x 64 tiles of 8-bit integers into 16 x 16 int32 sums in one instruction, ~16x the products a
 * cycle of AVX-512's 16-bit multiply-adds. Its operands are bytes, so the integers that the AVX paths split into
 * two int16 halves are split here into bytes (digits):
 * - scores: q's grid integer n (|n| <= levels <= 2**29) = top * 2**(8(D-1)) + sum of unsigned low digits * 2**(8i),
 *   D = 3 or 4 by the grid; low digits x keys on TDPBUSD (unsigned x signed), the signed top on TDPBSSD;
 * - weighted values: the probability grid's n (0 <= n <= 2**24) as three unsigned digits of its low 24 bits x the
 *   int8 values on TDPBUSD; the bits above (n = 2**24 at each row's largest probability) are added as
 *   (n >> 24) * 2**24 times the value row, outside the tiles.
 * Every digit's sum is exact in int32 (d <= 256 products of 255 * 128 for scores; at most MAX_KEYS = 2**15 keys of
 * 255 * 128 for values), and the digits' sums recombine exactly in double (integers below 2**53), so each score or
 * weighted value is the very integer the AVX paths compute, rounded and scaled by the same float operations.
 *
 * The tiles are a per-thread state the kernel hands out on request (arch_prctl, once per process:
 * pdserve_amx_ready); each thread's job loads its tile shapes and releases them (pdserve_amx_begin, _end). Built
 * only with -mamx-tile -mamx-int8 (kernels/cpu_fused.py adds them where /proc/cpuinfo lists amx_tile and
 * amx_int8); elsewhere pdserve_amx_ready says 0 and the AVX tiles run. PDSERVE_CPU_AMX=off does the same (A/Bs).
 */
#define _GNU_SOURCE  /* syscall(2) under -std=c99 */
#include "cpu_attention.h"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define KEY_PANEL 16  /* keys per score tile's columns; dims per weighted-value tile's columns */
#define KEY_CHUNK 64  /* keys per weighted-value tile's reduction */
#define UNITS 16  /* (query, head) rows per tile */
#define MAX_DIGITS 4  /* levels <= 2**29 (cpu_attention.c's run): the top digit <= 32 */

int pdserve_amx_ready(void) {
    static int ready = 0;  /* 0 unknown, 1 granted, -1 refused (a race only repeats the same request) */
    if (ready == 0) ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return ready == 1;
}

/* GCC's tile intrinsics (12, at least) do not tell the compiler what memory they read: ldtilecfg's operand is
 * declared as its first 8 bytes (the rest of the config's stores were dropped: a fault), tileloadd's as none (the
 * digits' stores could sink past it). A compiler barrier before each makes every store land first. */
#define STORES_LAND() __asm__ __volatile__("" ::: "memory")
#define LOAD_TILE(t, base, stride) do { STORES_LAND(); _tile_loadd(t, base, stride); } while (0)

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* One shape for both halves of a block: tiles 0-3 int32 sums (16 x 16); 4 and 5 the weighted values' operands
 * (16 rows of 64 digits, 16 rows of 64 value bytes); 6 and 7 the scores' (16 rows of `kstep` digits, kstep/4 rows
 * of 64 key bytes). */
static void configure(int64_t kstep) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; ++t) { c.rows[t] = UNITS; c.colsb[t] = 64; }
    c.rows[6] = UNITS;
    c.colsb[6] = (uint16_t)kstep;
    c.rows[7] = (uint8_t)(kstep / 4);
    c.colsb[7] = 64;
    STORES_LAND();
    _tile_loadconfig(&c);
}

/* Tile `acc` += tile A (digits) x tile B (int8): the top digit of a signed integer is signed. */
#define DOT(acc, A, B, top) do { if (top) _tile_dpbssd(acc, A, B); else _tile_dpbusd(acc, A, B); } while (0)

static inline void dot_digit(int dg, int top, int scores) {
    switch (dg * 2 + scores) {
        case 0: DOT(0, 4, 5, top); break;
        case 1: DOT(0, 6, 7, top); break;
        case 2: DOT(1, 4, 5, top); break;
        case 3: DOT(1, 6, 7, top); break;
        case 4: DOT(2, 4, 5, top); break;
        case 5: DOT(2, 6, 7, top); break;
        case 6: DOT(3, 4, 5, top); break;
        default: DOT(3, 6, 7, top); break;
    }
}

static inline void store_digit(int dg, int32_t (*out)[UNITS][16]) {
    switch (dg) {
        case 0: _tile_stored(0, out[0], 64); break;
        case 1: _tile_stored(1, out[1], 64); break;
        case 2: _tile_stored(2, out[2], 64); break;
        default: _tile_stored(3, out[3], 64); break;
    }
}

static inline void zero_sums(void) { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }

/* (double) sum over digits of sums[dg][i][c..c+8) * 256**dg: exact (integers below 2**53). */
static inline __m512d recombine8(const int32_t (*sums)[UNITS][16], int digits, int i, int c) {
    __m512d x = _mm512_setzero_pd();
    for (int dg = digits - 1; dg >= 0; --dg)
        x = _mm512_add_pd(_mm512_mul_pd(x, _mm512_set1_pd(256.0)),
                          _mm512_cvtepi32_pd(_mm256_loadu_si256((const __m256i *)(sums[dg][i] + c))));
    return x;
}

/* ---- scores ---- */

/* The digits q's grid needs: the top one, n >> 8(D-1), fits a signed byte. */
static int query_digits(float levels) {
    const int64_t top = (int64_t)levels;
    int digits = 1;
    while ((top >> (8 * (digits - 1))) > 127) ++digits;
    return digits;
}

/* Keys as AMX right operands: per panel of 16 keys, [d/4][16][4]: key 16t + c's dims 4p..4p+3 at ((t * d/4 + p) * 16
 * + c) * 4. */
static void pack_keys_amx(const int8_t *const *rows, int64_t span, int64_t d, int8_t *out) {
    const int64_t panels = (span + KEY_PANEL - 1) / KEY_PANEL;
    memset(out, 0, (size_t)(panels * KEY_PANEL * d));
    for (int64_t j = 0; j < span; ++j) {
        int8_t *o = out + (j / KEY_PANEL) * KEY_PANEL * d + (j % KEY_PANEL) * 4;
        for (int64_t p = 0; p < d / 4; ++p) memcpy(o + p * 4 * KEY_PANEL, rows[j] + 4 * p, 4);
    }
}

/* A block's queries (a job of their own: cpu_attention_prefill.c's block_job) against KV head kh's packed keys from
 * position k0: every query head's score row. x: room for the block's digits [digits][upad][d]. */
void pdserve_amx_scores(Job *a, int64_t kh, int64_t k0, const int8_t *keys, const float *ks, uint8_t *x, float *qsc) {
    const int digits = query_digits(a->levels);
    const int64_t d = a->d, g = a->h / a->hkv, units = a->n * g, upad = (units + UNITS - 1) / UNITS * UNITS;
    const int64_t kstep = d < 64 ? d : 64;
    int64_t lo = INT64_MAX, hi = -1;
    memset(x, 0, (size_t)(digits * upad * d));
    for (int64_t u = 0; u < units; ++u) {  /* unit u: query u / g, head kh * g + u % g */
        const int64_t r = u / g, hh = kh * g + u % g;
        int32_t nq[MAX_D];
        qsc[u] = query_grid(a, a->q + (r * a->h + hh) * d, nq);
        for (int dg = 0; dg < digits; ++dg)
            for (int64_t i = 0; i < d; ++i)
                x[(dg * upad + u) * d + i] = (uint8_t)(nq[i] >> (8 * dg));  /* the top digit's byte: signed */
        const int64_t first = first_visible(a->qpos[r], a->window);
        float *row = score_row(a, a->out, r, hh);
        for (int64_t j = a->qpos[r] - first + 1; j < row_length(a, r); ++j) row[j] = -INFINITY;
        lo = first < lo ? first : lo;
        hi = a->qpos[r] > hi ? a->qpos[r] : hi;
    }
    int32_t sums[MAX_DIGITS][UNITS][16];
    for (int64_t t = (lo - k0) / KEY_PANEL; t <= (hi - k0) / KEY_PANEL; ++t) {
        const int64_t key0 = k0 + t * KEY_PANEL;
        const float *kscale = ks + t * KEY_PANEL;
        for (int64_t u0 = 0; u0 < units; u0 += UNITS) {
            zero_sums();
            for (int64_t s = 0; s < d; s += kstep) {
                LOAD_TILE(7, keys + (t * KEY_PANEL * d + s * KEY_PANEL), 64);
                for (int dg = 0; dg < digits; ++dg) {
                    LOAD_TILE(6, x + (dg * upad + u0) * d + s, d);
                    dot_digit(dg, dg == digits - 1, 1);
                }
            }
            for (int dg = 0; dg < digits; ++dg) store_digit(dg, sums);
            for (int64_t i = 0; i < UNITS && u0 + i < units; ++i) {
                const int64_t u = u0 + i, r = u / g;
                const int64_t first = first_visible(a->qpos[r], a->window);
                const int64_t c0 = first > key0 ? first - key0 : 0;
                const int64_t c1 = a->qpos[r] - key0 + 1 < KEY_PANEL ? a->qpos[r] - key0 + 1 : KEY_PANEL;
                if (c1 <= c0) continue;
                float *dst = score_row(a, a->out, r, kh * g + u % g) + key0 - first;
                const __mmask16 visible = (__mmask16)(((1u << c1) - 1) & ~((1u << c0) - 1));  /* columns c0..c1-1 */
                for (int c = 0; c < 16; c += 8)  /* (float)(sum) * qsc * ks: cpu_attention.c's operations */
                    _mm256_mask_storeu_ps(dst + c, (__mmask8)(visible >> c), _mm256_mul_ps(
                        _mm256_mul_ps(_mm512_cvtpd_ps(recombine8(sums, digits, (int)i, c)), _mm256_set1_ps(qsc[u])),
                        _mm256_loadu_ps(kscale + c)));
            }
        }
    }
    for (int64_t u = 0; u < units; ++u) {
        const int64_t r = u / g;
        softmax_numerators(score_row(a, a->out, r, kh * g + u % g),
                           a->qpos[r] - first_visible(a->qpos[r], a->window) + 1, row_length(a, r));
    }
}

/* ---- probabilities x values ---- */

/* Values as AMX right operands: per panel of 16 dims, [keys/4][16][4]: key 4p + b's dim 16c + i at
 * ((c * lk/4 + p) * 16 + i) * 4 + b (lk: the span in whole chunks; zero past the span). */
static void pack_values_amx(const int8_t *const *rows, int64_t span, int64_t d, int64_t lk, int8_t *out) {
    memset(out, 0, (size_t)(d * lk));
    for (int64_t j = 0; j < span; ++j)
        for (int64_t i = 0; i < d; ++i)
            out[(((i / KEY_PANEL) * (lk / 4) + j / 4) * KEY_PANEL + i % KEY_PANEL) * 4 + j % 4] = rows[j][i];
}

/* The bits of a weight above its three digits (each row's largest probability), times its value row: times 2**24
 * when the sums recombine. */
static void add_high_bits(int64_t *extra, int32_t n, const int8_t *row, int64_t d) {
    for (int64_t i = 0; i < d; ++i) extra[i] += (int64_t)(n >> 24) * row[i];
}

/* A block's queries (block_job) and KV head kh: each query head's probability grid as three digit rows over the
 * span's keys (x: [3][upad][lk] bytes), times the packed values, into the output. */
void pdserve_amx_values(Job *a, int64_t kh, int64_t k0, int64_t lk, const int8_t *const *rows, const int8_t *values,
                        const float *vs, uint8_t *x, int32_t *n, int64_t (*extra)[MAX_D]) {
    const int64_t d = a->d, g = a->h / a->hkv, units = a->n * g, upad = (units + UNITS - 1) / UNITS * UNITS;
    int64_t lo, hi;
    block_keys(a, 0, a->n, &lo, &hi);
    const int64_t c0 = (lo - k0) / KEY_CHUNK, c1 = (hi - k0) / KEY_CHUNK + 1;  /* the block's key chunks */
    float unit[QUERY_BLOCK * MAX_GROUP];
    double z[QUERY_BLOCK * MAX_GROUP];
    for (int64_t u = 0; u < upad; ++u)
        for (int dg = 0; dg < 3; ++dg)
            memset(x + (dg * upad + u) * lk + c0 * KEY_CHUNK, 0, (size_t)((c1 - c0) * KEY_CHUNK));
    for (int64_t u = 0; u < units; ++u) {
        const int64_t r = u / g, first = first_visible(a->qpos[r], a->window), count = a->qpos[r] - first + 1;
        const float *e = score_row(a, a->in, r, kh * g + u % g);
        unit[u] = probability_grid(a, e, vs + (first - k0), count, n, &z[u]);
        memset(extra[u], 0, sizeof(int64_t) * (size_t)d);
        uint8_t *x0 = x + u * lk + first - k0, *x1 = x0 + upad * lk, *x2 = x1 + upad * lk;
        int64_t j = 0;
        for (__mmask16 high = 0; j + 16 <= count; j += 16) {  /* the three digits of 16 keys at once */
            const __m512i v = _mm512_loadu_si512((const void *)(n + j));
            _mm_storeu_si128((__m128i *)(x0 + j), _mm512_cvtepi32_epi8(v));
            _mm_storeu_si128((__m128i *)(x1 + j), _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8)));
            _mm_storeu_si128((__m128i *)(x2 + j), _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 16)));
            if ((high = _mm512_test_epi32_mask(v, _mm512_set1_epi32(~0xffffff))))
                for (int m = 0; m < 16; ++m)
                    if (high >> m & 1) add_high_bits(extra[u], n[j + m], rows[first - k0 + j + m], d);
        }
        for (; j < count; ++j) {
            x0[j] = (uint8_t)n[j];
            x1[j] = (uint8_t)(n[j] >> 8);
            x2[j] = (uint8_t)(n[j] >> 16);
            if (n[j] >> 24) add_high_bits(extra[u], n[j], rows[first - k0 + j], d);
        }
    }
    int32_t sums[MAX_DIGITS][UNITS][16];
    for (int64_t u0 = 0; u0 < units; u0 += UNITS)
        for (int64_t c = 0; c < d / KEY_PANEL; ++c) {
            zero_sums();
            for (int64_t k = c0; k < c1; ++k) {
                LOAD_TILE(5, values + (c * (lk / 4) + k * (KEY_CHUNK / 4)) * 64, 64);
                for (int dg = 0; dg < 3; ++dg) {
                    LOAD_TILE(4, x + (dg * upad + u0) * lk + k * KEY_CHUNK, lk);
                    dot_digit(dg, 0, 0);
                }
            }
            for (int dg = 0; dg < 3; ++dg) store_digit(dg, sums);
            for (int64_t i = 0; i < UNITS && u0 + i < units; ++i) {
                const int64_t u = u0 + i, r = u / g;
                float *o = a->out + (r * a->h + kh * g + u % g) * d + c * KEY_PANEL;
                const double f = (double)unit[u] * 268435456.0;
                for (int m = 0; m < 16; ++m) {
                    const int64_t top = extra[u][c * KEY_PANEL + m] * 256 + sums[2][i][m];
                    const int64_t acc = (top * 256 + sums[1][i][m]) * 256 + sums[0][i][m];
                    o[m] = (float)((double)acc * f / z[u]);  /* cpu_attention.c's operations */
                }
            }
        }
}

void pdserve_amx_begin(int64_t d) { configure(d < 64 ? d : 64); }

void pdserve_amx_end(void) { _tile_release(); }

void pdserve_amx_pack(const int8_t *const *krows, const int8_t *const *vrows, int64_t span, int64_t d, int64_t lk,
                      int8_t *keys, int8_t *values) {
    pack_keys_amx(krows, span, d, keys);
    pack_values_amx(vrows, span, d, lk, values);
}

#else  /* built without AMX: pdserve_amx_ready says so, and the rest is never called */
int pdserve_amx_ready(void) { return 0; }
void pdserve_amx_begin(int64_t d) { (void)d; }
void pdserve_amx_end(void) {}
void pdserve_amx_pack(const int8_t *const *krows, const int8_t *const *vrows, int64_t span, int64_t d, int64_t lk,
                      int8_t *keys, int8_t *values) {
    (void)krows, (void)vrows, (void)span, (void)d, (void)lk, (void)keys, (void)values;
}
void pdserve_amx_scores(Job *a, int64_t kh, int64_t k0, const int8_t *keys, const float *ks, uint8_t *x, float *qsc) {
    (void)a, (void)kh, (void)k0, (void)keys, (void)ks, (void)x, (void)qsc;
}
void pdserve_amx_values(Job *a, int64_t kh, int64_t k0, int64_t lk, const int8_t *const *rows, const int8_t *values,
                        const float *vs, uint8_t *x, int32_t *n, int64_t (*extra)[MAX_D]) {
    (void)a, (void)kh, (void)k0, (void)lk, (void)rows, (void)values, (void)vs, (void)x, (void)n, (void)extra;
}
#endif
