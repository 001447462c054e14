/* AVX2 micro-kernels (AVX2 + FMA + F16C): the contract of kernels.h with
 * 8-lane vectors. Compiled with -mavx2 -mfma -mf16c (no AVX-512).
 *
 * AVX2 has no mask registers: tails use integer lane masks with
 * _mm256_maskload_ps / _mm256_maskstore_ps (masked-off lanes are neither read
 * nor written, so nothing past the last column is touched), and the
 * conversions finish their runs with the scalar functions of attn.h. */
#include <immintrin.h>
#include <math.h>

#include "../kernels.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Lanes 0 .. n-1 all ones (n clipped to 0..8). */
static ALWAYS_INLINE __m256i tail_mask(int64_t n) {
    int t = n < 0 ? 0 : n > 8 ? 8 : (int)n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(t), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 2^x, about 1 ulp for results >= 2^-125; 2^-inf = 0 exactly, NaN stays NaN,
 * 2^x = inf for x >= 128.
 *
 * x = n + f with n = round(x), f in [-0.5, 0.5]; 2^x = (2 * 2^f) * 2^(n-1),
 * where 2^(n-1) is built from the exponent field (n - 1 + 127) << 23. The
 * extra factor 2 (folded into the polynomial) lets n reach 128, so results up
 * to FLT_MAX stay finite and x >= 128 overflows to inf in the last multiply.
 * x is clamped to [-126, 128]; n = -126 gives exponent field 0, i.e. exactly
 * 0.0, so -inf and everything that rounds to n <= -126 (results below about
 * 2^-125.5, where the AVX-512 version still gives subnormals) is 0. */
static ALWAYS_INLINE __m256 exp2v(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-126.0f), x); /* NaN in x survives (2nd operand) */
    x = _mm256_min_ps(_mm256_set1_ps(128.0f), x);  /* likewise */
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(x, n); /* exact, in [-0.5, 0.5] */
    /* 2 * 2^f: minimax polynomial of degree 6 for relative error on
     * [-0.5, 0.5] (1.9e-9 in exact arithmetic, 1.6e-8 with these float
     * coefficients), every coefficient doubled (exactly). */
    __m256 p = _mm256_set1_ps(2.0f * 1.534581242594868e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0f * 1.3399930903688073e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0f * 9.618489071726799e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0f * 5.550328642129898e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0f * 2.4022646248340607e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0f * 6.931471824645996e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0f));
    /* NaN: n converts to INT_MIN and the exponent bits are garbage, but p is
     * NaN already and NaN * anything is NaN. */
    __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(126));
    __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
    return _mm256_mul_ps(p, scale);
}

/* ---------------------------------------------------------------- gemm */

enum { MR = 6, NV = 2 }; /* 6 rows x 16 columns: 12 accumulators of 16 ymm */

/* One MRxNV register tile; mr, nv and masked are constants after inlining.
 * When masked, the last vector column holds rem < 8 columns (lane mask
 * `last`: loads give 0 in the other lanes, stores skip them); otherwise every
 * vector is full. */
static ALWAYS_INLINE void tile(int mr, int nv, int masked, int64_t k, const float *a,
                               int64_t rsa, int64_t csa, const float *b, int64_t ldb, float *c,
                               int64_t ldc, int accumulate, const float *c_scale,
                               int64_t rem) {
    const __m256i last = tail_mask(rem);
    __m256 acc[MR][NV];
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 2
        for (int v = 0; v < nv; v++) acc[r][v] = _mm256_setzero_ps();
    for (int64_t kk = 0; kk < k; kk++) {
        const float *bk = b + kk * ldb;
        const float *ak = a + kk * csa;
        __m256 bv[NV];
#pragma GCC unroll 2
        for (int v = 0; v < nv; v++)
            bv[v] = (masked && v == nv - 1) ? _mm256_maskload_ps(bk + 8 * v, last)
                                            : _mm256_loadu_ps(bk + 8 * v);
#pragma GCC unroll 6
        for (int r = 0; r < mr; r++) {
            __m256 ar = _mm256_broadcast_ss(ak + r * rsa);
#pragma GCC unroll 2
            for (int v = 0; v < nv; v++) acc[r][v] = _mm256_fmadd_ps(ar, bv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
        float *cr = c + r * ldc;
#pragma GCC unroll 2
        for (int v = 0; v < nv; v++) {
            int mv = masked && v == nv - 1;
            __m256 x = acc[r][v];
            if (c_scale || accumulate) {
                __m256 old = mv ? _mm256_maskload_ps(cr + 8 * v, last) : _mm256_loadu_ps(cr + 8 * v);
                x = c_scale ? _mm256_fmadd_ps(_mm256_set1_ps(c_scale[r]), old, x)
                            : _mm256_add_ps(old, x);
            }
            if (mv)
                _mm256_maskstore_ps(cr + 8 * v, last, x);
            else
                _mm256_storeu_ps(cr + 8 * v, x);
        }
    }
}

typedef void (*tile_fn)(int64_t, const float *, int64_t, int64_t, const float *, int64_t,
                        float *, int64_t, int, const float *, int64_t);

/* Thin named instances of tile() for each (masked, rows, vectors). */
#define TILE_FN(M, R, V)                                                                  \
    static void tile_##M##_##R##x##V(int64_t k, const float *a, int64_t rsa, int64_t csa,  \
                                     const float *b, int64_t ldb, float *c, int64_t ldc,   \
                                     int acc, const float *cs, int64_t rem) {              \
        tile(R, V, M, k, a, rsa, csa, b, ldb, c, ldc, acc, cs, rem);                       \
    }
#define TILE_ROW(M, R) TILE_FN(M, R, 1) TILE_FN(M, R, 2)
#define TILE_ALL(M)                                                                       \
    TILE_ROW(M, 1) TILE_ROW(M, 2) TILE_ROW(M, 3) TILE_ROW(M, 4) TILE_ROW(M, 5) TILE_ROW(M, 6)
TILE_ALL(0)
TILE_ALL(1)
#define TILE_PTRS(M, R) {tile_##M##_##R##x1, tile_##M##_##R##x2}
#define TILE_TABLE(M)                                                                     \
    {TILE_PTRS(M, 1), TILE_PTRS(M, 2), TILE_PTRS(M, 3),                                   \
     TILE_PTRS(M, 4), TILE_PTRS(M, 5), TILE_PTRS(M, 6)}
static const tile_fn tiles[2][MR][NV] = {TILE_TABLE(0), TILE_TABLE(1)};

static void gemm(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa, int64_t csa,
                 const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate,
                 const float *c_scale) {
    for (int64_t j0 = 0; j0 < n; j0 += 8 * NV) {
        int64_t nc = n - j0 < 8 * NV ? n - j0 : 8 * NV;
        int nv = (int)((nc + 7) / 8);
        int64_t rem = nc - 8 * (nv - 1); /* 1..8 columns in the last vector */
        int masked = rem < 8;
        for (int64_t i0 = 0; i0 < m; i0 += MR) {
            int mr = (int)(m - i0 < MR ? m - i0 : MR);
            tiles[masked][mr - 1][nv - 1](k, a + i0 * rsa, rsa, csa, b + j0, ldb,
                                          c + i0 * ldc + j0, ldc, accumulate,
                                          c_scale ? c_scale + i0 : NULL, rem);
        }
    }
}

/* ---------------------------------------------------------------- softmax */

/* Loads and stores of 8 lanes, masked when `masked` (a constant after inlining). */
static ALWAYS_INLINE __m256 ld8(int masked, const float *p, __m256i mk) {
    return masked ? _mm256_maskload_ps(p, mk) : _mm256_loadu_ps(p);
}
static ALWAYS_INLINE void st8(int masked, float *p, __m256i mk, __m256 x) {
    if (masked)
        _mm256_maskstore_ps(p, mk, x);
    else
        _mm256_storeu_ps(p, x);
}

/* Columns i .. i+7 of softmax_cols (only the lanes of mk when masked; the
 * other lanes compute on zeros and are never stored). */
static ALWAYS_INLINE void softmax_block(int masked, __m256i mk, float *s, int64_t rows,
                                        int64_t lds, float *m, float *l, float *alpha) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 mold = ld8(masked, m, mk);
    __m256 mx = mold;
    /* The scalar max lets a NaN through and keeps it (a NaN logit poisons its
     * column); _mm256_max_ps alone would drop a NaN met before a number. */
    __m256 nan = _mm256_cmp_ps(mold, mold, _CMP_UNORD_Q);
    for (int64_t j = 0; j < rows; j++) {
        __m256 x = ld8(masked, s + j * lds, mk);
        mx = _mm256_max_ps(mx, x);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    mx = _mm256_or_ps(mx, nan); /* all ones: a NaN */
    __m256 dead = _mm256_cmp_ps(mx, ninf, _CMP_EQ_OQ);
    __m256 sub = _mm256_andnot_ps(dead, mx); /* 0 for a dead column */
    __m256 al = exp2v(_mm256_sub_ps(mold, sub));
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 1 < rows; j += 2) {
        float *s0 = s + j * lds, *s1 = s0 + lds;
        __m256 p0 = exp2v(_mm256_sub_ps(ld8(masked, s0, mk), sub));
        __m256 p1 = exp2v(_mm256_sub_ps(ld8(masked, s1, mk), sub));
        st8(masked, s0, mk, p0);
        st8(masked, s1, mk, p1);
        sum0 = _mm256_add_ps(sum0, p0);
        sum1 = _mm256_add_ps(sum1, p1);
    }
    for (; j < rows; j++) {
        float *s0 = s + j * lds;
        __m256 p0 = exp2v(_mm256_sub_ps(ld8(masked, s0, mk), sub));
        st8(masked, s0, mk, p0);
        sum0 = _mm256_add_ps(sum0, p0);
    }
    __m256 lv = _mm256_fmadd_ps(al, ld8(masked, l, mk), _mm256_add_ps(sum0, sum1));
    st8(masked, l, mk, lv);
    st8(masked, m, mk, mx);
    st8(masked, alpha, mk, al);
}

static void softmax_cols(float *s, int64_t rows, int64_t cols, int64_t lds, float *m,
                         float *l, float *alpha) {
    const __m256i full = _mm256_set1_epi32(-1);
    int64_t i = 0;
    for (; i + 8 <= cols; i += 8) softmax_block(0, full, s + i, rows, lds, m + i, l + i, alpha + i);
    if (i < cols)
        softmax_block(1, tail_mask(cols - i), s + i, rows, lds, m + i, l + i, alpha + i);
}

static ALWAYS_INLINE void exp2_run(int masked, __m256i mk, float *p, __m256 vm, __m256 vs) {
    st8(masked, p, mk, exp2v(_mm256_fmsub_ps(ld8(masked, p, mk), vm, vs)));
}

/* tanh(x) = sign(x) (1 - e) / (1 + e) with e = 2^(-2 |x| log2 e) in (0, 1]:
 * no overflow at any x, tanh(+-inf) = +-1, absolute error about 1e-7. */
static ALWAYS_INLINE __m256 tanhv(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_andnot_ps(sign, x);
    __m256 e = exp2v(_mm256_mul_ps(a, _mm256_set1_ps(-2.8853900817779268f)));
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    return _mm256_or_ps(t, _mm256_and_ps(sign, x));
}

static ALWAYS_INLINE void softcap_run(int masked, __m256i mk, float *p, float *t_out, __m256 vi,
                                      __m256 vo) {
    __m256 t = tanhv(_mm256_mul_ps(ld8(masked, p, mk), vi));
    if (t_out) st8(masked, t_out, mk, t);
    st8(masked, p, mk, _mm256_mul_ps(vo, t));
}

static void softcap(float *s, int64_t rows, int64_t cols, int64_t lds, float in_mul,
                    float out_mul, float *t_out, int64_t ldt) {
    const __m256 vi = _mm256_set1_ps(in_mul), vo = _mm256_set1_ps(out_mul);
    const __m256i full = _mm256_set1_epi32(-1), mk = tail_mask(cols % 8);
    for (int64_t r = 0; r < rows; r++) {
        float *sr = s + r * lds, *tr = t_out ? t_out + r * ldt : NULL;
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8) softcap_run(0, full, sr + c, tr ? tr + c : NULL, vi, vo);
        if (c < cols) softcap_run(1, mk, sr + c, tr ? tr + c : NULL, vi, vo);
    }
}

static void exp2_rows(float *s, int64_t rows, int64_t cols, int64_t lds, float mul,
                      const float *sub) {
    const __m256 vm = _mm256_set1_ps(mul);
    const __m256i full = _mm256_set1_epi32(-1), mk = tail_mask(cols % 8);
    for (int64_t r = 0; r < rows; r++) {
        __m256 vs = _mm256_set1_ps(sub[r]);
        float *sr = s + r * lds;
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8) exp2_run(0, full, sr + c, vm, vs);
        if (c < cols) exp2_run(1, mk, sr + c, vm, vs);
    }
}

static ALWAYS_INLINE void dsoftmax_run(int masked, __m256i mk, float *d, const float *p,
                                       __m256 vd, __m256 vm) {
    __m256 x = _mm256_sub_ps(ld8(masked, d, mk), vd);
    x = _mm256_mul_ps(_mm256_mul_ps(ld8(masked, p, mk), x), vm);
    st8(masked, d, mk, x);
}

static void dsoftmax_rows(float *dp, const float *p, int64_t rows, int64_t cols, int64_t ld,
                          const float *delta, float mul) {
    const __m256 vm = _mm256_set1_ps(mul);
    const __m256i full = _mm256_set1_epi32(-1), mk = tail_mask(cols % 8);
    for (int64_t r = 0; r < rows; r++) {
        __m256 vd = _mm256_set1_ps(delta[r]);
        float *dr = dp + r * ld;
        const float *pr = p + r * ld;
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8) dsoftmax_run(0, full, dr + c, pr + c, vd, vm);
        if (c < cols) dsoftmax_run(1, mk, dr + c, pr + c, vd, vm);
    }
}

/* ---------------------------------------------------------------- vectors */

static ALWAYS_INLINE float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* out[r * ldo] = sum_i q[r][i] * k[i] (i < d), or += that when add. */
static ALWAYS_INLINE void dot_core(const float *k, const float *q, int64_t rows, int64_t d,
                                   int64_t ldq, float *out, int64_t ldo, int add) {
    const __m256i mk = tail_mask(d % 8);
    for (int64_t r = 0; r < rows; r++) {
        const float *qr = q + r * ldq;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= d; i += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i), _mm256_loadu_ps(k + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i + 8), _mm256_loadu_ps(k + i + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i + 16), _mm256_loadu_ps(k + i + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i + 24), _mm256_loadu_ps(k + i + 24), a3);
        }
        for (; i + 8 <= d; i += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i), _mm256_loadu_ps(k + i), a0);
        if (i < d)
            a1 = _mm256_fmadd_ps(_mm256_maskload_ps(qr + i, mk), _mm256_maskload_ps(k + i, mk), a1);
        float x = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        out[r * ldo] = add ? out[r * ldo] + x : x;
    }
}

static void softmax_rows(float *s, int64_t rows, int64_t cols, int64_t lds, float *m,
                         float *l, float *alpha) {
    const __m256i full = _mm256_set1_epi32(-1), mk = tail_mask(cols % 8);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    for (int64_t r = 0; r < rows; r++) {
        float *sr = s + r * lds;
        __m256 mx = ninf, nan = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8) {
            __m256 x = ld8(0, sr + c, full);
            mx = _mm256_max_ps(mx, x);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        }
        if (c < cols) {
            __m256 x = _mm256_blendv_ps(ninf, ld8(1, sr + c, mk), _mm256_castsi256_ps(mk));
            mx = _mm256_max_ps(mx, x);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_or_ps(mx, nan));
        float mnew = m[r];
        for (int i = 0; i < 8; i++) /* NaN-keeping max, as the scalar kernel */
            if (lanes[i] > mnew || lanes[i] != lanes[i]) mnew = mnew != mnew ? mnew : lanes[i];
        float sub = mnew == -INFINITY ? 0.0f : mnew;
        __m256 vs = _mm256_set1_ps(sub), sum = _mm256_setzero_ps();
        for (c = 0; c + 8 <= cols; c += 8) {
            __m256 p = exp2v(_mm256_sub_ps(ld8(0, sr + c, full), vs));
            st8(0, sr + c, full, p);
            sum = _mm256_add_ps(sum, p);
        }
        if (c < cols) {
            __m256 p = exp2v(_mm256_sub_ps(ld8(1, sr + c, mk), vs));
            st8(1, sr + c, mk, p);
            sum = _mm256_add_ps(sum, _mm256_and_ps(p, _mm256_castsi256_ps(mk)));
        }
        float al = exp2f(m[r] - sub);
        alpha[r] = al;
        l[r] = al * l[r] + hsum(sum);
        m[r] = mnew;
    }
}

static void dot_rows(const float *k, const float *q, int64_t rows, int64_t d, int64_t ldq,
                     float *out) {
    dot_core(k, q, rows, d, ldq, out, 1, 0);
}

/* ---------------------------------------------------------------- decode */

enum { B_F32 = 0, B_F16 = 1, B_BF16 = 2 }; /* storage of a cache row */

/* p[0 .. rem) (1 <= rem <= 7) as 16-bit lanes, zeros above, reading nothing
 * past p[rem - 1]: AVX2 has no 16-bit masked load, so whole pairs come from a
 * 32-bit masked load and an odd last value is broadcast and blended in. */
static ALWAYS_INLINE __m128i tail16(const uint16_t *p, int64_t rem) {
    __m128i pairs = _mm_cmpgt_epi32(_mm_set1_epi32((int)(rem / 2)), _mm_setr_epi32(0, 1, 2, 3));
    __m128i last = _mm_cmpeq_epi16(_mm_set1_epi16((short)(rem & 1 ? rem - 1 : -1)),
                                   _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7));
    __m128i v = _mm_maskload_epi32((const int *)(const void *)p, pairs);
    return _mm_blendv_epi8(v, _mm_set1_epi16((short)p[rem - 1]), last);
}

/* 8 values of a row from element i as f32; when masked only the first rem
 * (1..7) are read and the other lanes are 0. Full vectors use plain loads
 * (masked loads are slower when streaming from memory). */
static ALWAYS_INLINE __m256 load_row8(int kind, int masked, const void *x, int64_t i,
                                      int64_t rem) {
    if (kind == B_F32)
        return masked ? _mm256_maskload_ps((const float *)x + i, tail_mask(rem))
                      : _mm256_loadu_ps((const float *)x + i);
    const uint16_t *p = (const uint16_t *)x + i;
    __m128i h = masked ? tail16(p, rem) : _mm_loadu_si128((const __m128i *)p);
    if (kind == B_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The cache streams from memory: ask for the bytes PREFETCH_AHEAD past the
 * row being read. */
enum { PREFETCH_AHEAD = 4096 };
static ALWAYS_INLINE void prefetch_ahead(const char *row, size_t bytes) {
    for (size_t x = 0; x < bytes; x += 64) _mm_prefetch(row + PREFETCH_AHEAD + x, _MM_HINT_T0);
}

/* A 16-bit key row is converted once, CHUNK values at a time, into a buffer
 * on the stack; every query row then runs the f32 dot product over it. */
static ALWAYS_INLINE void qk_heads_kind(int kind, const void *k, int64_t ld, int64_t hs,
                                        int64_t heads, int64_t nk, const float *q,
                                        int64_t rows, int64_t d, float *s) {
    enum { CHUNK = 512 };
    const size_t es = kind == B_F32 ? 4 : 2;
    float kf[CHUNK];
    for (int64_t j = 0; j < nk; j++)
        for (int64_t h = 0; h < heads; h++) {
            const char *kr = (const char *)k + (size_t)(j * ld + h * hs) * es;
            prefetch_ahead(kr, (size_t)d * es);
            const float *qh = q + h * rows * d;
            float *sj = s + h * rows * nk + j; /* row r at sj[r * nk] */
            if (kind == B_F32) {
                dot_core((const float *)kr, qh, rows, d, d, sj, nk, 0);
                continue;
            }
            if (d <= 0) dot_core(kf, qh, rows, 0, d, sj, nk, 0); /* zeros */
            for (int64_t i0 = 0; i0 < d; i0 += CHUNK) {
                int64_t len = d - i0 < CHUNK ? d - i0 : CHUNK, i = 0;
                for (; i + 8 <= len; i += 8)
                    _mm256_storeu_ps(kf + i, load_row8(kind, 0, kr, i0 + i, 8));
                if (i < len)
                    _mm256_maskstore_ps(kf + i, tail_mask(len - i),
                                        load_row8(kind, 1, kr, i0 + i, len - i));
                dot_core(kf, qh + i0, rows, len, d, sj, nk, i0 > 0);
            }
        }
}

/* Up to 8 vectors (64 columns) of a value row in registers, then every
 * query row's o[r][c ..] += p[r] * v. */
static ALWAYS_INLINE void pv_heads_kind(int kind, const void *v, int64_t ld, int64_t hs,
                                        int64_t heads, int64_t nk, const float *p,
                                        int64_t rows, int64_t dv, float *o) {
    const size_t es = kind == B_F32 ? 4 : 2;
    for (int64_t j = 0; j < nk; j++)
        for (int64_t h = 0; h < heads; h++) {
            const char *vr = (const char *)v + (size_t)(j * ld + h * hs) * es;
            prefetch_ahead(vr, (size_t)dv * es);
            const float *pj = p + h * rows * nk + j; /* row r at pj[r * nk] */
            float *oh = o + h * rows * dv;
            int64_t c = 0;
            for (; c + 64 <= dv; c += 64) {
                __m256 vv[8];
#pragma GCC unroll 8
                for (int x = 0; x < 8; x++) vv[x] = load_row8(kind, 0, vr, c + 8 * x, 8);
                for (int64_t r = 0; r < rows; r++) {
                    __m256 pr = _mm256_set1_ps(pj[r * nk]);
                    float *orow = oh + r * dv + c;
#pragma GCC unroll 8
                    for (int x = 0; x < 8; x++)
                        _mm256_storeu_ps(orow + 8 * x, _mm256_fmadd_ps(pr, vv[x],
                                                                       _mm256_loadu_ps(orow + 8 * x)));
                }
            }
            if (c < dv) { /* the last 1 .. 63 columns */
                __m256 vv[8];
                int nf = (int)((dv - c) / 8), rem = (int)((dv - c) % 8);
                __m256i mk = tail_mask(rem);
                for (int x = 0; x < nf; x++) vv[x] = load_row8(kind, 0, vr, c + 8 * x, 8);
                if (rem) vv[nf] = load_row8(kind, 1, vr, c + 8 * nf, rem);
                for (int64_t r = 0; r < rows; r++) {
                    __m256 pr = _mm256_set1_ps(pj[r * nk]);
                    float *orow = oh + r * dv + c;
                    for (int x = 0; x < nf; x++)
                        _mm256_storeu_ps(orow + 8 * x, _mm256_fmadd_ps(pr, vv[x],
                                                                       _mm256_loadu_ps(orow + 8 * x)));
                    if (rem)
                        _mm256_maskstore_ps(orow + 8 * nf, mk,
                                            _mm256_fmadd_ps(pr, vv[nf],
                                                            _mm256_maskload_ps(orow + 8 * nf, mk)));
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

static void axpy(int64_t n, float a, const float *x, float *y) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    if (i < n) {
        __m256i mk = tail_mask(n - i);
        __m256 r = _mm256_fmadd_ps(va, _mm256_maskload_ps(x + i, mk), _mm256_maskload_ps(y + i, mk));
        _mm256_maskstore_ps(y + i, mk, r);
    }
}

/* ---------------------------------------------------------------- conversions */

/* Bit-exact with the scalar functions of src/core/dtype.c, NaNs included:
 * F16C quiets a signalling NaN and keeps the top payload bits of an f32 NaN,
 * while attn_f16_to_f32 keeps the f16 bits (mantissa << 13) and
 * attn_f32_to_f16 turns every NaN into sign | 0x7e00. The fix-ups run only
 * for vectors that hold a NaN. */

static void f16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    const __m256i qbit = _mm256_set1_epi32(0x400000);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        __m256 f = _mm256_cvtph_ps(h);
        __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
        if (_mm256_movemask_ps(nan)) {
            /* put back the quiet bit of the input (f16 bit 9 -> f32 bit 22) */
            __m256i q = _mm256_and_si256(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 13), qbit);
            __m256i g = _mm256_or_si256(_mm256_andnot_si256(qbit, _mm256_castps_si256(f)), q);
            f = _mm256_blendv_ps(f, _mm256_castsi256_ps(g), nan);
        }
        _mm256_storeu_ps(dst + i, f);
    }
    for (; i < n; i++) dst[i] = attn_f16_to_f32(src[i]);
}

static void bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
    }
    for (; i < n; i++) dst[i] = attn_bf16_to_f32(src[i]);
}

static void f32_to_f16(const float *src, uint16_t *dst, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 qnan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 f = _mm256_loadu_ps(src + i);
        __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
        if (_mm256_movemask_ps(nan)) /* a NaN becomes sign | 0x7fc00000 -> sign | 0x7e00 */
            f = _mm256_blendv_ps(f, _mm256_or_ps(_mm256_and_ps(f, sign), qnan), nan);
        __m128i h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
    for (; i < n; i++) dst[i] = attn_f32_to_f16(src[i]);
}

/* Round to nearest even by adding 0x7fff + lsb; a NaN keeps its top bits
 * with the quiet bit (0x40) set, as attn_f32_to_bf16 does. */
static void f32_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff),
                  quiet = _mm256_set1_epi32(0x40);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i u = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, absmask), inf);
        __m256i hi = _mm256_srli_epi32(u, 16);
        __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_and_si256(hi, one), bias));
        r = _mm256_srli_epi32(r, 16);
        r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, quiet), nan);
        /* every lane is 0 .. 0xffff, so the unsigned saturating pack is exact */
        __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
    for (; i < n; i++) dst[i] = attn_f32_to_bf16(src[i]);
}

const attn_kernels attn_kernels_avx2 = {
    .isa = ATTN_ISA_AVX2,
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
    .transpose = attn_transpose_portable,
    .store_stream = attn_store_stream_portable,
    .key_gate_chunk = attn_key_gate_chunk_portable,
    .f16_to_f32 = f16_to_f32,
    .bf16_to_f32 = bf16_to_f32,
    .f32_to_f16 = f32_to_f16,
    .f32_to_bf16 = f32_to_bf16,
};
