/* AVX-512 micro-kernels (F/BW/VL/DQ + F16C): the contract of kernels.h with
 * 16-lane vectors. Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq. */
#include <immintrin.h>
#include <math.h>

#include "../kernels.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Masked loads are for tails only: on Zen 5 a masked load that misses the
 * cache streams about 3x slower than a plain one (10 vs 34 GB/s measured
 * converting f16 from DRAM), so full vectors always use plain loads. */
static ALWAYS_INLINE __mmask16 tail_mask(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
}

/* 2^x, within 2.3e-7 relative on the normal range; 2^-inf = 0 exactly, NaN stays NaN. */
static ALWAYS_INLINE __m512 exp2v(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x); /* NaN in x survives (2nd operand) */
    x = _mm512_min_ps(_mm512_set1_ps(128.0f), x);
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n); /* [-0.5, 0.5] */
    /* 2^f by a degree-5 polynomial fitted for relative error on [-0.5, 0.5]:
     * 2.3e-7 (2 ulp) in float arithmetic. One FMA fewer than degree 6 matters:
     * the exponential shares the FMA pipes with the two GEMMs of attention. */
    __m512 p = _mm512_set1_ps(1.327647129073739e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675541892647743e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713092088699e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
    return _mm512_scalef_ps(p, n);
}

/* ---------------------------------------------------------------- gemm */

enum { MR = 6, NV = 4 }; /* 6 rows x 64 columns: 24 accumulators of 32 */
enum { B_F32 = 0, B_F16 = 1, B_BF16 = 2 }; /* storage of the B operand */

/* 16 values at b[i..i+16) as f32; with mk != 0xffff only mk's lanes are read. */
static ALWAYS_INLINE __m512 load_b(int kind, const void *b, int64_t i, __mmask16 mk) {
    if (kind == B_F32)
        return mk == 0xffff ? _mm512_loadu_ps((const float *)b + i)
                            : _mm512_maskz_loadu_ps(mk, (const float *)b + i);
    __m256i h = mk == 0xffff ? _mm256_loadu_si256((const __m256i *)((const uint16_t *)b + i))
                             : _mm256_maskz_loadu_epi16(mk, (const uint16_t *)b + i);
    if (kind == B_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* One MRxNV register tile; kind, mr and nv are constants after inlining.
 * The last vector column uses mask `last` (all ones when n % 16 == 0). */
static ALWAYS_INLINE void tile(int tail, int mr, int nv, int64_t k, const float *a,
                               int64_t rsa, int64_t csa, const float *b, int64_t ldb,
                               float *c, int64_t ldc, int accumulate, const float *c_scale,
                               __mmask16 last) {
    __m512 acc[MR][NV];
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k; kk++) {
        const float *ak = a + kk * csa;
        __m512 bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++)
            bv[v] = (tail && v == nv - 1) ? _mm512_maskz_loadu_ps(last, b + kk * ldb + 16 * v)
                                          : _mm512_loadu_ps(b + kk * ldb + 16 * v);
#pragma GCC unroll 6
        for (int r = 0; r < mr; r++) {
            __m512 ar = _mm512_set1_ps(ak[r * rsa]);
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++) acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
        float *cr = c + r * ldc;
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) {
            __mmask16 mk = (tail && v == nv - 1) ? last : (__mmask16)0xffff;
            __m512 x = acc[r][v];
            if (c_scale)
                x = _mm512_fmadd_ps(_mm512_set1_ps(c_scale[r]),
                                    _mm512_maskz_loadu_ps(mk, cr + 16 * v), x);
            else if (accumulate)
                x = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, cr + 16 * v), x);
            _mm512_mask_storeu_ps(cr + 16 * v, mk, x);
        }
    }
}

typedef void (*tile_fn)(int64_t, const float *, int64_t, int64_t, const float *, int64_t,
                        float *, int64_t, int, const float *, __mmask16);

/* Thin named instances of tile() for each (rows, vectors); the masked-tail
 * variant runs only when n is not a multiple of 16. */
#define TILE_FN(R, V)                                                                   \
    static void tile_##R##x##V(int64_t k, const float *a, int64_t rsa, int64_t csa,      \
                               const float *b, int64_t ldb, float *c, int64_t ldc,       \
                               int acc, const float *cs, __mmask16 last) {               \
        if (last == 0xffff)                                                              \
            tile(0, R, V, k, a, rsa, csa, b, ldb, c, ldc, acc, cs, last);                \
        else                                                                             \
            tile(1, R, V, k, a, rsa, csa, b, ldb, c, ldc, acc, cs, last);                \
    }
#define TILE_ROW(R) TILE_FN(R, 1) TILE_FN(R, 2) TILE_FN(R, 3) TILE_FN(R, 4)
TILE_ROW(1) TILE_ROW(2) TILE_ROW(3) TILE_ROW(4) TILE_ROW(5) TILE_ROW(6)
#define TILE_PTRS(R) {tile_##R##x1, tile_##R##x2, tile_##R##x3, tile_##R##x4}
static const tile_fn tiles[MR][NV] = {TILE_PTRS(1), TILE_PTRS(2), TILE_PTRS(3),
                                      TILE_PTRS(4), TILE_PTRS(5), TILE_PTRS(6)};

static void gemm(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa, int64_t csa,
                 const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate,
                 const float *c_scale) {
    for (int64_t j0 = 0; j0 < n; j0 += 16 * NV) {
        int64_t nc = n - j0 < 16 * NV ? n - j0 : 16 * NV;
        int nv = (int)((nc + 15) / 16);
        __mmask16 last = tail_mask(nc - 16 * (nv - 1));
        for (int64_t i0 = 0; i0 < m; i0 += MR) {
            int mr = (int)(m - i0 < MR ? m - i0 : MR);
            tiles[mr - 1][nv - 1](k, a + i0 * rsa, rsa, csa, b + j0, ldb, c + i0 * ldc + j0,
                                  ldc, accumulate, c_scale ? c_scale + i0 : NULL, last);
        }
    }
}

/* ---------------------------------------------------------------- decode */

/* The cache streams from DRAM: ask for the bytes PREFETCH_AHEAD past the row
 * being read. Measured, one thread, f16 decode of 256k keys x 8 heads x 128:
 * no prefetch 19, 4 KiB ahead 25-28, 8 KiB 31-32, 16 KiB 31 GB/s. */
enum { PREFETCH_AHEAD = 8192 };
static ALWAYS_INLINE void prefetch_ahead(const char *row, size_t bytes) {
    for (size_t x = 0; x < bytes; x += 64) _mm_prefetch(row + PREFETCH_AHEAD + x, _MM_HINT_T0);
}

/* Up to 8 vectors (d <= 128) of one cache row, converted once into registers. */
static ALWAYS_INLINE void load_row(int kind, const void *x, int64_t d, __m512 *out, int nv) {
    for (int v = 0; v < nv; v++) out[v] = load_b(kind, x, 16 * v, tail_mask(d - 16 * v));
}

/* Sums of 16 vectors: lane i of the result = sum of the lanes of x[i]. Four
 * levels of "half of each, added": 15 permute pairs for 16 sums instead of 16
 * full reductions. The inputs are taken in bit-reversed order, which the
 * halving levels undo. */
static ALWAYS_INLINE __m512 sum16(const __m512 *x) {
    static const int br[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    const __m512i lo1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i hi1 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const __m512i lo2 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    const __m512i hi2 = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    const __m512i lo3 = _mm512_setr_epi32(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
    const __m512i hi3 = _mm512_setr_epi32(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    const __m512i lo4 = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    const __m512i hi4 = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    __m512 a[8], b[4], c[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        __m512 u = x[br[2 * i]], v = x[br[2 * i + 1]];
        a[i] = _mm512_add_ps(_mm512_permutex2var_ps(u, lo1, v), _mm512_permutex2var_ps(u, hi1, v));
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_permutex2var_ps(a[2 * i], lo2, a[2 * i + 1]),
                             _mm512_permutex2var_ps(a[2 * i], hi2, a[2 * i + 1]));
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_permutex2var_ps(b[2 * i], lo3, b[2 * i + 1]),
                             _mm512_permutex2var_ps(b[2 * i], hi3, b[2 * i + 1]));
    return _mm512_add_ps(_mm512_permutex2var_ps(c[0], lo4, c[1]),
                         _mm512_permutex2var_ps(c[0], hi4, c[1]));
}

/* Decode fast paths, for head dims d = 16 * nv <= 128: the block is read in
 * memory order (row j, every head), which the hardware prefetchers follow.
 * qk: 16 (key, head, query row) dot products at a time, one accumulator each,
 * summed by sum16 and scattered to s[h][r][j]. */
static ALWAYS_INLINE void qk_fast(int kind, int nv, const void *k, int64_t ld, int64_t hs,
                                  int64_t heads, int64_t nk, const float *q, int64_t rows,
                                  float *s, size_t es) {
    const int64_t per_row = heads * rows, total = nk * per_row;
    int64_t t = 0;
    for (; t + 16 <= total; t += 16) {
        __m512 acc[16];
        int64_t idx[16];
#pragma GCC unroll 16
        for (int u = 0; u < 16; u++) {
            int64_t x = t + u, j = x / per_row, hr = x % per_row, h = hr / rows;
            const char *row = (const char *)k + (size_t)(j * ld + h * hs) * es;
            if (hr % rows == 0) prefetch_ahead(row, (size_t)nv * 16 * es);
            const float *qr = q + hr * 16 * nv;
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qr), load_b(kind, row, 0, 0xffff));
#pragma GCC unroll 8
            for (int v = 1; v < nv; v++)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * v), load_b(kind, row, 16 * v, 0xffff), a);
            acc[u] = a;
            idx[u] = hr * nk + j;
        }
        float out[16];
        _mm512_storeu_ps(out, sum16(acc));
#pragma GCC unroll 16
        for (int u = 0; u < 16; u++) s[idx[u]] = out[u];
    }
    for (; t < total; t++) {
        int64_t j = t / per_row, hr = t % per_row, h = hr / rows;
        const char *row = (const char *)k + (size_t)(j * ld + h * hs) * es;
        const float *qr = q + hr * 16 * nv;
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qr), load_b(kind, row, 0, 0xffff));
        for (int v = 1; v < nv; v++)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * v), load_b(kind, row, 16 * v, 0xffff), a);
        s[hr * nk + j] = _mm512_reduce_add_ps(a);
    }
}

/* pv: each value row converted once into registers, then every query row
 * of its head accumulates it (outputs stay in L1). */
static ALWAYS_INLINE void pv_fast(int kind, int nv, const void *v, int64_t ld, int64_t hs,
                                  int64_t heads, int64_t nk, const float *p, int64_t rows,
                                  float *o, size_t es) {
    for (int64_t j = 0; j < nk; j++)
        for (int64_t h = 0; h < heads; h++) {
            const char *row = (const char *)v + (size_t)(j * ld + h * hs) * es;
            prefetch_ahead(row, (size_t)nv * 16 * es);
            __m512 vv[8];
#pragma GCC unroll 8
            for (int x = 0; x < nv; x++) vv[x] = load_b(kind, row, 16 * x, 0xffff);
            for (int64_t r = 0; r < rows; r++) {
                __m512 pr = _mm512_set1_ps(p[(h * rows + r) * nk + j]);
                float *orow = o + (h * rows + r) * 16 * nv;
#pragma GCC unroll 8
                for (int x = 0; x < nv; x++)
                    _mm512_storeu_ps(orow + 16 * x,
                                     _mm512_fmadd_ps(pr, vv[x], _mm512_loadu_ps(orow + 16 * x)));
            }
        }
}

#define FAST_NV_SWITCH(nv, CALL) \
    switch (nv) {                \
    case 1: CALL(1); break;      \
    case 2: CALL(2); break;      \
    case 3: CALL(3); break;      \
    case 4: CALL(4); break;      \
    case 5: CALL(5); break;      \
    case 6: CALL(6); break;      \
    case 7: CALL(7); break;      \
    default: CALL(8); break;     \
    }

static ALWAYS_INLINE void qk_heads_kind(int kind, const void *k, int64_t ld, int64_t hs,
                                        int64_t heads, int64_t nk, const float *q,
                                        int64_t rows, int64_t d, float *s) {
    const size_t es = kind == B_F32 ? 4 : 2;
    const int nv = (int)((d + 15) / 16);
    if (d % 16 == 0 && nv <= 8) {
#define QK_FAST(NV) qk_fast(kind, NV, k, ld, hs, heads, nk, q, rows, s, es)
        FAST_NV_SWITCH(nv, QK_FAST)
#undef QK_FAST
        return;
    }
    for (int64_t j = 0; j < nk; j++)
        for (int64_t h = 0; h < heads; h++) {
            const char *kr = (const char *)k + (size_t)(j * ld + h * hs) * es;
            prefetch_ahead(kr, (size_t)d * es);
            const float *qh = q + h * rows * d;
            float *sj = s + h * rows * nk + j; /* row r at sj[r * nk] */
            if (nv <= 8) {
                __m512 kv[8];
                load_row(kind, kr, d, kv, nv);
                for (int64_t r = 0; r < rows; r++) {
                    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                    for (int v = 0; v < nv; v += 2) {
                        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail_mask(d - 16 * v),
                                                                   qh + r * d + 16 * v), kv[v], a0);
                        if (v + 1 < nv)
                            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail_mask(d - 16 * v - 16),
                                                                       qh + r * d + 16 * v + 16),
                                                 kv[v + 1], a1);
                    }
                    sj[r * nk] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                }
            } else {
                for (int64_t r = 0; r < rows; r++) {
                    __m512 a0 = _mm512_setzero_ps();
                    for (int64_t i = 0; i < d; i += 16) {
                        __mmask16 mk = tail_mask(d - i);
                        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, qh + r * d + i),
                                             load_b(kind, kr, i, mk), a0);
                    }
                    sj[r * nk] = _mm512_reduce_add_ps(a0);
                }
            }
        }
}

static ALWAYS_INLINE void pv_heads_kind(int kind, const void *v, int64_t ld, int64_t hs,
                                        int64_t heads, int64_t nk, const float *p,
                                        int64_t rows, int64_t dv, float *o) {
    const size_t es = kind == B_F32 ? 4 : 2;
    const int nv = (int)((dv + 15) / 16);
    if (dv % 16 == 0 && nv <= 8) {
#define PV_FAST(NV) pv_fast(kind, NV, v, ld, hs, heads, nk, p, rows, o, es)
        FAST_NV_SWITCH(nv, PV_FAST)
#undef PV_FAST
        return;
    }
    for (int64_t j = 0; j < nk; j++)
        for (int64_t h = 0; h < heads; h++) {
            const char *vr = (const char *)v + (size_t)(j * ld + h * hs) * es;
            prefetch_ahead(vr, (size_t)dv * es);
            const float *pj = p + h * rows * nk + j; /* row r at pj[r * nk] */
            float *oh = o + h * rows * dv;
            for (int64_t c = 0; c < dv; c += 64) { /* 4 vectors of the row at a time */
                __m512 vv[4];
                int nv = (int)((dv - c + 15) / 16 < 4 ? (dv - c + 15) / 16 : 4);
                for (int x = 0; x < nv; x++)
                    vv[x] = load_b(kind, vr, c + 16 * x, tail_mask(dv - c - 16 * x));
                for (int64_t r = 0; r < rows; r++) {
                    __m512 pr = _mm512_set1_ps(pj[r * nk]);
                    float *orow = oh + r * dv + c;
                    for (int x = 0; x < nv; x++) {
                        __mmask16 mk = tail_mask(dv - c - 16 * x);
                        __m512 acc = _mm512_maskz_loadu_ps(mk, orow + 16 * x);
                        _mm512_mask_storeu_ps(orow + 16 * x, mk, _mm512_fmadd_ps(pr, vv[x], acc));
                    }
                }
            }
        }
}

static void qk_heads(attn_dtype kind, const void *k, int64_t ld, int64_t hs, int64_t heads,
                     int64_t nk, const float *q, int64_t rows, int64_t d, float *s) {
    if (kind == ATTN_F16) qk_heads_kind(B_F16, k, ld, hs, heads, nk, q, rows, d, s);
    else if (kind == ATTN_BF16) qk_heads_kind(B_BF16, k, ld, hs, heads, nk, q, rows, d, s);
    else qk_heads_kind(B_F32, k, ld, hs, heads, nk, q, rows, d, s);
}

static void pv_heads(attn_dtype kind, const void *v, int64_t ld, int64_t hs, int64_t heads,
                     int64_t nk, const float *p, int64_t rows, int64_t dv, float *o) {
    if (kind == ATTN_F16) pv_heads_kind(B_F16, v, ld, hs, heads, nk, p, rows, dv, o);
    else if (kind == ATTN_BF16) pv_heads_kind(B_BF16, v, ld, hs, heads, nk, p, rows, dv, o);
    else pv_heads_kind(B_F32, v, ld, hs, heads, nk, p, rows, dv, o);
}

/* ---------------------------------------------------------------- softmax */

static void softmax_cols(float *s, int64_t rows, int64_t cols, int64_t lds, float *m,
                         float *l, float *alpha) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < cols; i += 16) {
        __mmask16 mk = tail_mask(cols - i);
        __m512 mold = _mm512_mask_loadu_ps(ninf, mk, m + i);
        __m512 mx = mold;
        for (int64_t j = 0; j < rows; j++)
            mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, mk, s + j * lds + i));
        __mmask16 dead = _mm512_cmp_ps_mask(mx, ninf, _CMP_EQ_OQ);
        __m512 sub = _mm512_mask_blend_ps(dead, mx, _mm512_setzero_ps());
        __m512 al = exp2v(_mm512_sub_ps(mold, sub));
        __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 1 < rows; j += 2) {
            float *s0 = s + j * lds + i, *s1 = s0 + lds;
            __m512 p0 = exp2v(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s0), sub));
            __m512 p1 = exp2v(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s1), sub));
            _mm512_mask_storeu_ps(s0, mk, p0);
            _mm512_mask_storeu_ps(s1, mk, p1);
            sum0 = _mm512_add_ps(sum0, p0);
            sum1 = _mm512_add_ps(sum1, p1);
        }
        for (; j < rows; j++) {
            float *s0 = s + j * lds + i;
            __m512 p0 = exp2v(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s0), sub));
            _mm512_mask_storeu_ps(s0, mk, p0);
            sum0 = _mm512_add_ps(sum0, p0);
        }
        __m512 lv = _mm512_maskz_loadu_ps(mk, l + i);
        lv = _mm512_fmadd_ps(al, lv, _mm512_add_ps(sum0, sum1));
        _mm512_mask_storeu_ps(l + i, mk, lv);
        _mm512_mask_storeu_ps(m + i, mk, mx);
        _mm512_mask_storeu_ps(alpha + i, mk, al);
    }
}

static void softmax_rows(float *s, int64_t rows, int64_t cols, int64_t lds, float *m,
                         float *l, float *alpha) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t r = 0; r < rows; r++) {
        float *sr = s + r * lds;
        __m512 mx = ninf;
        __mmask16 nan = 0;
        for (int64_t c = 0; c < cols; c += 16) {
            __mmask16 mk = tail_mask(cols - c);
            __m512 x = mk == 0xffff ? _mm512_loadu_ps(sr + c) : _mm512_mask_loadu_ps(ninf, mk, sr + c);
            mx = _mm512_max_ps(mx, x);
            nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        }
        /* NaN-keeping max, as the scalar kernel: a NaN logit poisons its row */
        float mnew = nan ? NAN : _mm512_reduce_max_ps(mx);
        if (m[r] != m[r] || (mnew == mnew && m[r] > mnew)) mnew = m[r];
        float sub = mnew == -INFINITY ? 0.0f : mnew;
        __m512 vs = _mm512_set1_ps(sub), sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < cols; c += 16) {
            __mmask16 mk = tail_mask(cols - c);
            __m512 p = exp2v(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sr + c), vs));
            _mm512_mask_storeu_ps(sr + c, mk, p);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mk, p));
        }
        float al = exp2f(m[r] - sub);
        alpha[r] = al;
        l[r] = al * l[r] + _mm512_reduce_add_ps(sum);
        m[r] = mnew;
    }
}

/* tanh(x) = sign(x) (1 - e) / (1 + e) with e = 2^(-2 |x| log2 e) in (0, 1]:
 * no overflow at any x, tanh(+-inf) = +-1, absolute error about 1e-7. */
static ALWAYS_INLINE __m512 tanhv(__m512 x) {
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u));
    __m512 a = _mm512_andnot_ps(sign, x);
    __m512 e = exp2v(_mm512_mul_ps(a, _mm512_set1_ps(-2.8853900817779268f)));
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    return _mm512_or_ps(t, _mm512_and_ps(sign, x));
}

static void softcap(float *s, int64_t rows, int64_t cols, int64_t lds, float in_mul,
                    float out_mul, float *t_out, int64_t ldt) {
    const __m512 vi = _mm512_set1_ps(in_mul), vo = _mm512_set1_ps(out_mul);
    for (int64_t r = 0; r < rows; r++) {
        float *sr = s + r * lds;
        for (int64_t c = 0; c < cols; c += 16) {
            __mmask16 mk = tail_mask(cols - c);
            __m512 t = tanhv(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sr + c), vi));
            if (t_out) _mm512_mask_storeu_ps(t_out + r * ldt + c, mk, t);
            _mm512_mask_storeu_ps(sr + c, mk, _mm512_mul_ps(vo, t));
        }
    }
}

static void exp2_rows(float *s, int64_t rows, int64_t cols, int64_t lds, float mul,
                      const float *sub) {
    const __m512 vm = _mm512_set1_ps(mul);
    for (int64_t r = 0; r < rows; r++) {
        __m512 vs = _mm512_set1_ps(sub[r]);
        float *sr = s + r * lds;
        for (int64_t c = 0; c < cols; c += 16) {
            __mmask16 mk = tail_mask(cols - c);
            __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, sr + c), vm, vs);
            _mm512_mask_storeu_ps(sr + c, mk, exp2v(x));
        }
    }
}

static void dsoftmax_rows(float *dp, const float *p, int64_t rows, int64_t cols, int64_t ld,
                          const float *delta, float mul) {
    const __m512 vm = _mm512_set1_ps(mul);
    for (int64_t r = 0; r < rows; r++) {
        __m512 vd = _mm512_set1_ps(delta[r]);
        float *dr = dp + r * ld;
        const float *pr = p + r * ld;
        for (int64_t c = 0; c < cols; c += 16) {
            __mmask16 mk = tail_mask(cols - c);
            __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, dr + c), vd);
            x = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_maskz_loadu_ps(mk, pr + c)), vm);
            _mm512_mask_storeu_ps(dr + c, mk, x);
        }
    }
}

/* ---------------------------------------------------------------- vectors */

static void dot_rows(const float *k, const float *q, int64_t rows, int64_t d, int64_t ldq,
                     float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *qr = q + r * ldq;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= d; i += 32) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + i), _mm512_loadu_ps(k + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + i + 16), _mm512_loadu_ps(k + i + 16), a1);
        }
        for (; i < d; i += 16) {
            __mmask16 mk = tail_mask(d - i);
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, qr + i),
                                 _mm512_maskz_loadu_ps(mk, k + i), a0);
        }
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

static void axpy(int64_t n, float a, const float *x, float *y) {
    __m512 va = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mk = tail_mask(n - i);
        __m512 r = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(mk, x + i),
                                   _mm512_maskz_loadu_ps(mk, y + i));
        _mm512_mask_storeu_ps(y + i, mk, r);
    }
}

/* ---------------------------------------------------------------- transpose */

/* t[16] rows in, the 16 columns out: pairs, quads, then 128-bit lanes. */
static ALWAYS_INLINE void transpose16(__m512 *t) {
    __m512 a[16], b[16], c[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_ps(t[2 * i], t[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_ps(t[2 * i], t[2 * i + 1]);
    }
    /* b[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3 */
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        b[4 * i + 0] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0x44);
        b[4 * i + 1] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0xEE);
        b[4 * i + 2] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0x44);
        b[4 * i + 3] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0xEE);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        c[j] = _mm512_shuffle_f32x4(b[j], b[4 + j], 0x88);
        c[4 + j] = _mm512_shuffle_f32x4(b[j], b[4 + j], 0xDD);
        c[8 + j] = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0x88);
        c[12 + j] = _mm512_shuffle_f32x4(b[8 + j], b[12 + j], 0xDD);
    }
#pragma GCC unroll 8
    for (int m = 0; m < 8; m++) {
        t[m] = _mm512_shuffle_f32x4(c[m], c[8 + m], 0x88);
        t[8 + m] = _mm512_shuffle_f32x4(c[m], c[8 + m], 0xDD);
    }
}

static void transpose(const float *src, int64_t lds, int64_t rows, int64_t cols, float *dst,
                      int64_t ldd) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        const int64_t nr = rows - r0 < 16 ? rows - r0 : 16;
        const __mmask16 mr = tail_mask(nr);
        for (int64_t c0 = 0; c0 < cols; c0 += 16) {
            const int64_t nc = cols - c0 < 16 ? cols - c0 : 16;
            const __mmask16 mc = tail_mask(nc);
            __m512 t[16];
            for (int64_t i = 0; i < 16; i++) {
                const float *row = src + (r0 + i) * lds + c0;
                t[i] = i >= nr ? _mm512_setzero_ps()
                       : nc == 16 ? _mm512_loadu_ps(row) : _mm512_maskz_loadu_ps(mc, row);
            }
            transpose16(t);
            for (int64_t j = 0; j < nc; j++) _mm512_mask_storeu_ps(dst + (c0 + j) * ldd + r0, mr, t[j]);
        }
    }
}

/* Non-temporal stores where a row's destination is 64-byte aligned and
 * whole vectors; plain stores for the rest. */
static void store_stream(const float *src, int64_t lds, int64_t rows, int64_t n, float *dst,
                         int64_t ldd) {
    for (int64_t r = 0; r < rows; r++) {
        const float *s = src + r * lds;
        float *d = dst + r * ldd;
        int64_t x = 0;
        if (((uintptr_t)d & 63) == 0)
            for (; x + 16 <= n; x += 16) _mm512_stream_ps(d + x, _mm512_loadu_ps(s + x));
        for (; x < n; x += 16) {
            const __mmask16 mk = tail_mask(n - x);
            _mm512_mask_storeu_ps(d + x, mk, _mm512_maskz_loadu_ps(mk, s + x));
        }
    }
    _mm_sfence();
}

/* ---------------------------------------------------------------- linear gates */

static int key_gate_chunk(int64_t n, int64_t d, const float *g, int64_t ldg, const float *q,
                          int64_t ldq, const float *k, int64_t ldk, float scale,
                          float gate_floor, float range, float *qp, float *kt, float *krt,
                          int64_t ldt, float *plast, float *ke, double *bsum) {
    const __m512 vfloor = _mm512_set1_ps(gate_floor), vscale = _mm512_set1_ps(scale);
    const __m512 l2e = _mm512_set1_ps(1.4426950408889634f), vrange = _mm512_set1_ps(range);
    __mmask16 bad = 0;
    for (int64_t x = 0; x < d; x++) bsum[x] = 0.0;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t x0 = 0; x0 < d; x0 += 16) {
            const __mmask16 mk = tail_mask(d - x0);
            const __mmask8 mlo = (__mmask8)mk, mhi = (__mmask8)(mk >> 8);
            __m512 gv = mk == 0xffff ? _mm512_loadu_ps(g + i * ldg + x0)
                                     : _mm512_maskz_loadu_ps(mk, g + i * ldg + x0);
            gv = _mm512_max_ps(vfloor, gv); /* NaN in gv survives (2nd operand) */
            __m512d lo = _mm512_maskz_loadu_pd(mlo, bsum + x0);
            __m512d hi = _mm512_maskz_loadu_pd(mhi, bsum + x0 + 8);
            lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(gv)));
            hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(
                                       _mm512_extractf64x4_pd(_mm512_castps_pd(gv), 1))));
            _mm512_mask_storeu_pd(bsum + x0, mlo, lo);
            _mm512_mask_storeu_pd(bsum + x0 + 8, mhi, hi);
            const __m512 b = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)),
                                                _mm512_cvtpd_ps(hi), 1);
            bad |= _mm512_mask_cmp_ps_mask(mk, _mm512_abs_ps(b), vrange, _CMP_GE_OQ);
            const __m512 bl = _mm512_mul_ps(b, l2e);
            const __m512 pb = exp2v(bl), eb = exp2v(_mm512_sub_ps(_mm512_setzero_ps(), bl));
            const __m512 qv = mk == 0xffff ? _mm512_loadu_ps(q + i * ldq + x0)
                                           : _mm512_maskz_loadu_ps(mk, q + i * ldq + x0);
            const __m512 kv = mk == 0xffff ? _mm512_loadu_ps(k + i * ldk + x0)
                                           : _mm512_maskz_loadu_ps(mk, k + i * ldk + x0);
            _mm512_mask_storeu_ps(qp + i * d + x0, mk, _mm512_mul_ps(_mm512_mul_ps(vscale, qv), pb));
            _mm512_mask_storeu_ps(ke + i * d + x0, mk, _mm512_mul_ps(kv, eb));
            if (i == n - 1) _mm512_mask_storeu_ps(plast + x0, mk, pb);
        }
    }
    if (bad) return 0;
    transpose(ke, d, n, d, kt, ldt);
    for (int64_t x = 0; x < d; x++) {
        const __m512 px = _mm512_set1_ps(plast[x]);
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
            const __mmask16 mk = tail_mask(n - i0);
            _mm512_mask_storeu_ps(krt + x * ldt + i0, mk,
                                  _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, kt + x * ldt + i0), px));
        }
    }
    return 1;
}

static void f16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i < n; i += 16) {
        __mmask16 mk = tail_mask(n - i);
        __m256i h = _mm256_maskz_loadu_epi16(mk, src + i);
        _mm512_mask_storeu_ps(dst + i, mk, _mm512_cvtph_ps(h));
    }
}

static void bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
    for (; i < n; i += 16) {
        __mmask16 mk = tail_mask(n - i);
        __m256i h = _mm256_maskz_loadu_epi16(mk, src + i);
        __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
        _mm512_mask_storeu_ps(dst + i, mk, _mm512_castsi512_ps(w));
    }
}

static void f32_to_f16(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mk = tail_mask(n - i);
        __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(mk, src + i),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16(dst + i, mk, h);
    }
}

static void f32_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mk = tail_mask(n - i);
        __m512i u = _mm512_castps_si512(_mm512_maskz_loadu_ps(mk, src + i));
        __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, absmask), inf);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        r = _mm512_srli_epi32(r, 16);
        __m512i q = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
        r = _mm512_mask_blend_epi32(nan, r, q);
        _mm256_mask_storeu_epi16(dst + i, mk, _mm512_cvtepi32_epi16(r));
    }
}

const attn_kernels attn_kernels_avx512 = {
    .isa = ATTN_ISA_AVX512,
    .gemm = gemm,
    .softmax_cols = softmax_cols,
    .softmax_rows = softmax_rows,
    .softcap = softcap,
    .exp2_rows = exp2_rows,
    .dsoftmax_rows = dsoftmax_rows,
    .dot_rows = dot_rows,
    .qk_heads = qk_heads,
    .pv_heads = pv_heads,
    .axpy = axpy,
    .transpose = transpose,
    .store_stream = store_stream,
    .key_gate_chunk = key_gate_chunk,
    .f16_to_f32 = f16_to_f32,
    .bf16_to_f32 = bf16_to_f32,
    .f32_to_f16 = f32_to_f16,
    .f32_to_bf16 = f32_to_bf16,
};
