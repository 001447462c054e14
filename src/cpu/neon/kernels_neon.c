/* NEON micro-kernels (AArch64 Advanced SIMD): the contract of kernels.h with
 * 4-lane f32 vectors. Everything used here is baseline AArch64 (FMA, FRINTN,
 * the f16 <-> f32 conversions FCVTL/FCVTN, the across-lane FMAXV/FADDP), so
 * the file needs no -march flag.
 *
 * NEON has no masked loads: tails of 1 .. 3 floats are assembled from 1- and
 * 2-element loads (vld1q_lane_f32, vld1_f32) and written back the same way,
 * so nothing past the last element is ever read or written; 16-bit tails and
 * the ends of conversion runs go through the scalar functions of attn.h. */
#include <arm_neon.h>
#include <math.h>

#include "../kernels.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* p[0 .. n) (1 <= n <= 4) with zeros above, reading nothing past p[n - 1]. */
static ALWAYS_INLINE float32x4_t ld_part(const float *p, int n) {
    if (n >= 4) return vld1q_f32(p);
    if (n == 1) return vld1q_lane_f32(p, vdupq_n_f32(0.0f), 0);
    float32x4_t v = vcombine_f32(vld1_f32(p), vdup_n_f32(0.0f));
    if (n == 3) v = vld1q_lane_f32(p + 2, v, 2);
    return v;
}

/* Lanes 0 .. n-1 of v to p[0 .. n) (1 <= n <= 4). */
static ALWAYS_INLINE void st_part(float *p, float32x4_t v, int n) {
    if (n >= 4) {
        vst1q_f32(p, v);
    } else if (n == 1) {
        vst1q_lane_f32(p, v, 0);
    } else {
        vst1_f32(p, vget_low_f32(v));
        if (n == 3) vst1q_lane_f32(p + 2, v, 2);
    }
}

/* Lanes 0 .. n-1 all ones (n clipped to 0..4). */
static ALWAYS_INLINE uint32x4_t lane_mask(int n) {
    static const uint32_t idx[4] = {0, 1, 2, 3};
    return vcltq_u32(vld1q_u32(idx), vdupq_n_u32((uint32_t)(n < 0 ? 0 : n)));
}

/* 2^x, the algorithm of the AVX2 kernels: about 1 ulp for results >= 2^-125;
 * 2^-inf = 0 exactly, NaN stays NaN, 2^x = inf for x >= 128.
 *
 * x = n + f with n = round(x) (FRINTN, ties to even), f in [-0.5, 0.5];
 * 2^x = (2 * 2^f) * 2^(n-1), 2^(n-1) built from the exponent field
 * (n - 1 + 127) << 23. x is clamped to [-126, 128] first (FMAX/FMIN return
 * NaN when either operand is NaN, so a NaN survives the clamp); n = -126 gives
 * exponent field 0, i.e. exactly 0.0, so -inf and everything that rounds to
 * n <= -126 is 0, and n = 128 with f >= 0 overflows to inf in the last
 * multiply. For a NaN, FCVTZS gives 0 and the scale is garbage, but p is NaN
 * and stays NaN. */
static ALWAYS_INLINE float32x4_t exp2v(float32x4_t x) {
    x = vmaxq_f32(x, vdupq_n_f32(-126.0f));
    x = vminq_f32(x, vdupq_n_f32(128.0f));
    float32x4_t n = vrndnq_f32(x);
    float32x4_t f = vsubq_f32(x, n); /* exact */
    /* 2 * 2^f: minimax polynomial of degree 6 on [-0.5, 0.5], coefficients doubled */
    float32x4_t p = vdupq_n_f32(2.0f * 1.534581242594868e-4f);
    p = vfmaq_f32(vdupq_n_f32(2.0f * 1.3399930903688073e-3f), p, f);
    p = vfmaq_f32(vdupq_n_f32(2.0f * 9.618489071726799e-3f), p, f);
    p = vfmaq_f32(vdupq_n_f32(2.0f * 5.550328642129898e-2f), p, f);
    p = vfmaq_f32(vdupq_n_f32(2.0f * 2.4022646248340607e-1f), p, f);
    p = vfmaq_f32(vdupq_n_f32(2.0f * 6.931471824645996e-1f), p, f);
    p = vfmaq_f32(vdupq_n_f32(2.0f), p, f);
    int32x4_t e = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(126));
    return vmulq_f32(p, vreinterpretq_f32_s32(vshlq_n_s32(e, 23)));
}

/* ---------------------------------------------------------------- gemm */

enum { MR = 8, NV = 2 }; /* 8 rows x 8 columns: 16 accumulators of the 32 q registers */

/* One MRxNV register tile; mr, nv and masked are constants after inlining.
 * When masked, the last vector holds rem (1..3) columns: loads give 0 in the
 * other lanes and stores skip them; otherwise every vector is full. */
static ALWAYS_INLINE void tile(int mr, int nv, int masked, int64_t k, const float *a,
                               int64_t rsa, int64_t csa, const float *b, int64_t ldb, float *c,
                               int64_t ldc, int accumulate, const float *c_scale, int rem) {
    float32x4_t acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 2
        for (int v = 0; v < nv; v++) acc[r][v] = vdupq_n_f32(0.0f);
    for (int64_t kk = 0; kk < k; kk++) {
        const float *bk = b + kk * ldb;
        const float *ak = a + kk * csa;
        float32x4_t bv[NV];
#pragma GCC unroll 2
        for (int v = 0; v < nv; v++)
            bv[v] = (masked && v == nv - 1) ? ld_part(bk + 4 * v, rem) : vld1q_f32(bk + 4 * v);
#pragma GCC unroll 8
        for (int r = 0; r < mr; r++) {
            float ar = ak[r * rsa];
#pragma GCC unroll 2
            for (int v = 0; v < nv; v++) acc[r][v] = vfmaq_n_f32(acc[r][v], bv[v], ar);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < mr; r++) {
        float *cr = c + r * ldc;
#pragma GCC unroll 2
        for (int v = 0; v < nv; v++) {
            int n = (masked && v == nv - 1) ? rem : 4;
            float32x4_t x = acc[r][v];
            if (c_scale || accumulate) {
                float32x4_t old = ld_part(cr + 4 * v, n);
                x = c_scale ? vfmaq_n_f32(x, old, c_scale[r]) : vaddq_f32(old, x);
            }
            st_part(cr + 4 * v, x, n);
        }
    }
}

typedef void (*tile_fn)(int64_t, const float *, int64_t, int64_t, const float *, int64_t,
                        float *, int64_t, int, const float *, int);

/* Thin named instances of tile() for each (masked, rows, vectors). */
#define TILE_FN(M, R, V)                                                                  \
    static void tile_##M##_##R##x##V(int64_t k, const float *a, int64_t rsa, int64_t csa,  \
                                     const float *b, int64_t ldb, float *c, int64_t ldc,   \
                                     int acc, const float *cs, int rem) {                  \
        tile(R, V, M, k, a, rsa, csa, b, ldb, c, ldc, acc, cs, rem);                       \
    }
#define TILE_ROW(M, R) TILE_FN(M, R, 1) TILE_FN(M, R, 2)
#define TILE_ALL(M)                                                                       \
    TILE_ROW(M, 1) TILE_ROW(M, 2) TILE_ROW(M, 3) TILE_ROW(M, 4)                           \
    TILE_ROW(M, 5) TILE_ROW(M, 6) TILE_ROW(M, 7) TILE_ROW(M, 8)
TILE_ALL(0)
TILE_ALL(1)
#define TILE_PTRS(M, R) {tile_##M##_##R##x1, tile_##M##_##R##x2}
#define TILE_TABLE(M)                                                                     \
    {TILE_PTRS(M, 1), TILE_PTRS(M, 2), TILE_PTRS(M, 3), TILE_PTRS(M, 4),                  \
     TILE_PTRS(M, 5), TILE_PTRS(M, 6), TILE_PTRS(M, 7), TILE_PTRS(M, 8)}
static const tile_fn tiles[2][MR][NV] = {TILE_TABLE(0), TILE_TABLE(1)};

static void gemm(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa, int64_t csa,
                 const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate,
                 const float *c_scale) {
    for (int64_t j0 = 0; j0 < n; j0 += 4 * NV) {
        int64_t nc = n - j0 < 4 * NV ? n - j0 : 4 * NV;
        int nv = (int)((nc + 3) / 4);
        int rem = (int)(nc - 4 * (nv - 1)); /* 1..4 columns in the last vector */
        int masked = rem < 4;
        for (int64_t i0 = 0; i0 < m; i0 += MR) {
            int mr = (int)(m - i0 < MR ? m - i0 : MR);
            tiles[masked][mr - 1][nv - 1](k, a + i0 * rsa, rsa, csa, b + j0, ldb,
                                          c + i0 * ldc + j0, ldc, accumulate,
                                          c_scale ? c_scale + i0 : NULL, rem);
        }
    }
}

/* ---------------------------------------------------------------- softmax */

/* Columns i .. i+n-1 (n = 1..4; a constant 4 for full blocks) of
 * softmax_cols. Lanes past n compute on zeros and are never stored. */
static ALWAYS_INLINE void softmax_block(int n, float *s, int64_t rows, int64_t lds, float *m,
                                        float *l, float *alpha) {
    const float32x4_t ninf = vdupq_n_f32(-INFINITY);
    float32x4_t mold = ld_part(m, n);
    /* FMAX returns NaN when either operand is NaN, which is the scalar
     * kernel's NaN-keeping max: a NaN logit or running max poisons its column. */
    float32x4_t mx = mold;
    for (int64_t j = 0; j < rows; j++) mx = vmaxq_f32(mx, ld_part(s + j * lds, n));
    uint32x4_t dead = vceqq_f32(mx, ninf);
    float32x4_t sub = vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(mx), dead));
    float32x4_t al = exp2v(vsubq_f32(mold, sub));
    float32x4_t sum0 = vdupq_n_f32(0.0f), sum1 = vdupq_n_f32(0.0f);
    int64_t j = 0;
    for (; j + 1 < rows; j += 2) {
        float *s0 = s + j * lds, *s1 = s0 + lds;
        float32x4_t p0 = exp2v(vsubq_f32(ld_part(s0, n), sub));
        float32x4_t p1 = exp2v(vsubq_f32(ld_part(s1, n), sub));
        st_part(s0, p0, n);
        st_part(s1, p1, n);
        sum0 = vaddq_f32(sum0, p0);
        sum1 = vaddq_f32(sum1, p1);
    }
    if (j < rows) {
        float *s0 = s + j * lds;
        float32x4_t p0 = exp2v(vsubq_f32(ld_part(s0, n), sub));
        st_part(s0, p0, n);
        sum0 = vaddq_f32(sum0, p0);
    }
    float32x4_t lv = vfmaq_f32(vaddq_f32(sum0, sum1), al, ld_part(l, n));
    st_part(l, lv, n);
    st_part(m, mx, n);
    st_part(alpha, al, n);
}

static void softmax_cols(float *s, int64_t rows, int64_t cols, int64_t lds, float *m,
                         float *l, float *alpha) {
    int64_t i = 0;
    for (; i + 4 <= cols; i += 4) softmax_block(4, s + i, rows, lds, m + i, l + i, alpha + i);
    if (i < cols) softmax_block((int)(cols - i), s + i, rows, lds, m + i, l + i, alpha + i);
}

static void softmax_rows(float *s, int64_t rows, int64_t cols, int64_t lds, float *m,
                         float *l, float *alpha) {
    const float32x4_t ninf = vdupq_n_f32(-INFINITY);
    const int rem = (int)(cols % 4);
    const uint32x4_t mk = lane_mask(rem);
    for (int64_t r = 0; r < rows; r++) {
        float *sr = s + r * lds;
        const int64_t cf = cols - rem; /* columns in full vectors */
        float32x4_t mx0 = vdupq_n_f32(m[r]), mx1 = ninf;
        int64_t c = 0;
        for (; c + 8 <= cf; c += 8) {
            mx0 = vmaxq_f32(mx0, vld1q_f32(sr + c));
            mx1 = vmaxq_f32(mx1, vld1q_f32(sr + c + 4));
        }
        if (c < cf) mx0 = vmaxq_f32(mx0, vld1q_f32(sr + c));
        /* the tail with -inf in the lanes past the row: neutral for the max,
         * and 2^(-inf - sub) = 0 (or NaN when sub is, as every p then is) */
        float32x4_t xt = ninf;
        if (rem) xt = vbslq_f32(mk, ld_part(sr + cf, rem), ninf);
        mx0 = vmaxq_f32(mx0, vmaxq_f32(mx1, xt));
        float mnew = vmaxvq_f32(mx0); /* FMAXV keeps a NaN as FMAX does */
        float sub = mnew == -INFINITY ? 0.0f : mnew;
        const float32x4_t vs = vdupq_n_f32(sub);
        float32x4_t sum0 = vdupq_n_f32(0.0f), sum1 = vdupq_n_f32(0.0f);
        for (c = 0; c + 8 <= cf; c += 8) {
            float32x4_t p0 = exp2v(vsubq_f32(vld1q_f32(sr + c), vs));
            float32x4_t p1 = exp2v(vsubq_f32(vld1q_f32(sr + c + 4), vs));
            vst1q_f32(sr + c, p0);
            vst1q_f32(sr + c + 4, p1);
            sum0 = vaddq_f32(sum0, p0);
            sum1 = vaddq_f32(sum1, p1);
        }
        if (c < cf) {
            float32x4_t p0 = exp2v(vsubq_f32(vld1q_f32(sr + c), vs));
            vst1q_f32(sr + c, p0);
            sum0 = vaddq_f32(sum0, p0);
        }
        if (rem) {
            float32x4_t p = exp2v(vsubq_f32(xt, vs));
            st_part(sr + cf, p, rem);
            sum1 = vaddq_f32(sum1, p);
        }
        float al = vgetq_lane_f32(exp2v(vdupq_n_f32(m[r] - sub)), 0);
        alpha[r] = al;
        l[r] = al * l[r] + vaddvq_f32(vaddq_f32(sum0, sum1));
        m[r] = mnew;
    }
}

/* tanh(x) = sign(x) (1 - e) / (1 + e) with e = 2^(-2 |x| log2 e) in (0, 1]:
 * no overflow at any x, tanh(+-inf) = +-1, NaN stays NaN (e is NaN),
 * absolute error about 1e-7. */
static ALWAYS_INLINE float32x4_t tanhv(float32x4_t x) {
    const float32x4_t one = vdupq_n_f32(1.0f);
    float32x4_t e = exp2v(vmulq_f32(vabsq_f32(x), vdupq_n_f32(-2.8853900817779268f)));
    float32x4_t t = vdivq_f32(vsubq_f32(one, e), vaddq_f32(one, e));
    uint32x4_t sign = vandq_u32(vreinterpretq_u32_f32(x), vdupq_n_u32(0x80000000u));
    return vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(t), sign));
}

/* n (1..4) values of the soft-cap at p (and t_out when not NULL). */
static ALWAYS_INLINE void softcap_run(int n, float *p, float *t_out, float32x4_t vi,
                                      float32x4_t vo) {
    float32x4_t t = tanhv(vmulq_f32(ld_part(p, n), vi));
    if (t_out) st_part(t_out, t, n);
    st_part(p, vmulq_f32(vo, t), n);
}

static void softcap(float *s, int64_t rows, int64_t cols, int64_t lds, float in_mul,
                    float out_mul, float *t_out, int64_t ldt) {
    const float32x4_t vi = vdupq_n_f32(in_mul), vo = vdupq_n_f32(out_mul);
    const int rem = (int)(cols % 4);
    for (int64_t r = 0; r < rows; r++) {
        float *sr = s + r * lds, *tr = t_out ? t_out + r * ldt : NULL;
        int64_t c = 0;
        for (; c + 4 <= cols; c += 4) softcap_run(4, sr + c, tr ? tr + c : NULL, vi, vo);
        if (rem) softcap_run(rem, sr + c, tr ? tr + c : NULL, vi, vo);
    }
}

static void exp2_rows(float *s, int64_t rows, int64_t cols, int64_t lds, float mul,
                      const float *sub) {
    const float32x4_t vm = vdupq_n_f32(mul);
    const int rem = (int)(cols % 4);
    for (int64_t r = 0; r < rows; r++) {
        /* s * mul - sub rounded twice, as the scalar kernel does */
        const float32x4_t vs = vdupq_n_f32(sub[r]);
        float *sr = s + r * lds;
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8) {
            float32x4_t x0 = vsubq_f32(vmulq_f32(vld1q_f32(sr + c), vm), vs);
            float32x4_t x1 = vsubq_f32(vmulq_f32(vld1q_f32(sr + c + 4), vm), vs);
            vst1q_f32(sr + c, exp2v(x0));
            vst1q_f32(sr + c + 4, exp2v(x1));
        }
        if (c + 4 <= cols) {
            vst1q_f32(sr + c, exp2v(vsubq_f32(vmulq_f32(vld1q_f32(sr + c), vm), vs)));
            c += 4;
        }
        if (rem)
            st_part(sr + c, exp2v(vsubq_f32(vmulq_f32(ld_part(sr + c, rem), vm), vs)), rem);
    }
}

static void dsoftmax_rows(float *dp, const float *p, int64_t rows, int64_t cols, int64_t ld,
                          const float *delta, float mul) {
    /* p * (dp - delta) * mul in the scalar kernel's order: bit-identical */
    const float32x4_t vm = vdupq_n_f32(mul);
    const int rem = (int)(cols % 4);
    for (int64_t r = 0; r < rows; r++) {
        const float32x4_t vd = vdupq_n_f32(delta[r]);
        float *dr = dp + r * ld;
        const float *pr = p + r * ld;
        int64_t c = 0;
        for (; c + 4 <= cols; c += 4) {
            float32x4_t x = vsubq_f32(vld1q_f32(dr + c), vd);
            vst1q_f32(dr + c, vmulq_f32(vmulq_f32(vld1q_f32(pr + c), x), vm));
        }
        if (rem) {
            float32x4_t x = vsubq_f32(ld_part(dr + c, rem), vd);
            st_part(dr + c, vmulq_f32(vmulq_f32(ld_part(pr + c, rem), x), vm), rem);
        }
    }
}

/* ---------------------------------------------------------------- vectors */

/* out[r * ldo] = sum_i q[r][i] * k[i] (i < d), or += that when add. */
static ALWAYS_INLINE void dot_core(const float *k, const float *q, int64_t rows, int64_t d,
                                   int64_t ldq, float *out, int64_t ldo, int add) {
    const int rem = (int)(d % 4);
    for (int64_t r = 0; r < rows; r++) {
        const float *qr = q + r * ldq;
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
        float32x4_t a2 = vdupq_n_f32(0.0f), a3 = vdupq_n_f32(0.0f);
        int64_t i = 0;
        for (; i + 16 <= d; i += 16) {
            a0 = vfmaq_f32(a0, vld1q_f32(qr + i), vld1q_f32(k + i));
            a1 = vfmaq_f32(a1, vld1q_f32(qr + i + 4), vld1q_f32(k + i + 4));
            a2 = vfmaq_f32(a2, vld1q_f32(qr + i + 8), vld1q_f32(k + i + 8));
            a3 = vfmaq_f32(a3, vld1q_f32(qr + i + 12), vld1q_f32(k + i + 12));
        }
        for (; i + 4 <= d; i += 4) a0 = vfmaq_f32(a0, vld1q_f32(qr + i), vld1q_f32(k + i));
        if (rem) a1 = vfmaq_f32(a1, ld_part(qr + i, rem), ld_part(k + i, rem));
        float x = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
        out[r * ldo] = add ? out[r * ldo] + x : x;
    }
}

static void dot_rows(const float *k, const float *q, int64_t rows, int64_t d, int64_t ldq,
                     float *out) {
    dot_core(k, q, rows, d, ldq, out, 1, 0);
}

/* ---------------------------------------------------------------- decode */

enum { B_F32 = 0, B_F16 = 1, B_BF16 = 2 }; /* storage of a cache row */

static ALWAYS_INLINE float32x4_t f16x4_to_f32(uint16x4_t h) {
    return vcvt_f32_f16(vreinterpret_f16_u16(h));
}
static ALWAYS_INLINE float32x4_t bf16x4_to_f32(uint16x4_t h) {
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

/* 4 values of a row from element i as f32; when rem < 4 only the first rem
 * are read and the other lanes are 0. */
static ALWAYS_INLINE float32x4_t load_row4(int kind, const void *x, int64_t i, int rem) {
    if (kind == B_F32) return ld_part((const float *)x + i, rem);
    const uint16_t *p = (const uint16_t *)x + i;
    uint16x4_t h;
    if (rem >= 4) {
        h = vld1_u16(p);
    } else {
        h = vdup_n_u16(0);
        h = vld1_lane_u16(p, h, 0);
        if (rem > 1) h = vld1_lane_u16(p + 1, h, 1);
        if (rem > 2) h = vld1_lane_u16(p + 2, h, 2);
    }
    return kind == B_F16 ? f16x4_to_f32(h) : bf16x4_to_f32(h);
}

/* The cache streams from memory: ask for the bytes PREFETCH_AHEAD past the
 * row being read (a prefetch never faults, wherever it points). */
enum { PREFETCH_AHEAD = 4096 };
static ALWAYS_INLINE void prefetch_ahead(const char *row, size_t bytes) {
    for (size_t x = 0; x < bytes; x += 64) __builtin_prefetch(row + PREFETCH_AHEAD + x, 0, 3);
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
            const uint16_t *k16 = (const uint16_t *)(const void *)kr;
            for (int64_t i0 = 0; i0 < d; i0 += CHUNK) {
                int64_t len = d - i0 < CHUNK ? d - i0 : CHUNK, i = 0;
                for (; i + 8 <= len; i += 8) {
                    uint16x8_t hv = vld1q_u16(k16 + i0 + i);
                    if (kind == B_F16) {
                        float16x8_t hf = vreinterpretq_f16_u16(hv);
                        vst1q_f32(kf + i, vcvt_f32_f16(vget_low_f16(hf)));
                        vst1q_f32(kf + i + 4, vcvt_high_f32_f16(hf));
                    } else {
                        vst1q_f32(kf + i, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(hv), 16)));
                        vst1q_f32(kf + i + 4, vreinterpretq_f32_u32(vshll_high_n_u16(hv, 16)));
                    }
                }
                for (; i < len; i += 4) {
                    int n = len - i < 4 ? (int)(len - i) : 4;
                    st_part(kf + i, load_row4(kind, kr, i0 + i, n), n);
                }
                dot_core(kf, qh + i0, rows, len, d, sj, nk, i0 > 0);
            }
        }
}

/* Up to 16 vectors (64 columns) of a value row in registers, then every
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
                float32x4_t vv[16];
#pragma GCC unroll 16
                for (int x = 0; x < 16; x++) vv[x] = load_row4(kind, vr, c + 4 * x, 4);
                for (int64_t r = 0; r < rows; r++) {
                    float pr = pj[r * nk];
                    float *orow = oh + r * dv + c;
#pragma GCC unroll 16
                    for (int x = 0; x < 16; x++)
                        vst1q_f32(orow + 4 * x, vfmaq_n_f32(vld1q_f32(orow + 4 * x), vv[x], pr));
                }
            }
            if (c < dv) { /* the last 1 .. 63 columns */
                float32x4_t vv[16];
                int nf = (int)((dv - c) / 4), rem = (int)((dv - c) % 4);
                for (int x = 0; x < nf; x++) vv[x] = load_row4(kind, vr, c + 4 * x, 4);
                if (rem) vv[nf] = load_row4(kind, vr, c + 4 * nf, rem);
                for (int64_t r = 0; r < rows; r++) {
                    float pr = pj[r * nk];
                    float *orow = oh + r * dv + c;
                    for (int x = 0; x < nf; x++)
                        vst1q_f32(orow + 4 * x, vfmaq_n_f32(vld1q_f32(orow + 4 * x), vv[x], pr));
                    if (rem)
                        st_part(orow + 4 * nf,
                                vfmaq_n_f32(ld_part(orow + 4 * nf, rem), vv[nf], pr), rem);
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
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
        vst1q_f32(y + i + 4, vfmaq_n_f32(vld1q_f32(y + i + 4), vld1q_f32(x + i + 4), a));
    }
    for (; i < n; i += 4) {
        int r = n - i < 4 ? (int)(n - i) : 4;
        st_part(y + i, vfmaq_n_f32(ld_part(y + i, r), ld_part(x + i, r), a), r);
    }
}

/* ---------------------------------------------------------------- conversions */

/* Bit-exact with the scalar functions of src/core/dtype.c, NaNs included.
 * FCVTL/FCVTN (with FPCR.DN = 0, the Linux default) quiet a signalling NaN
 * and keep the top payload bits, while attn_f16_to_f32 keeps the f16 bits
 * (mantissa << 13) and attn_f32_to_f16 turns every NaN into sign | 0x7e00:
 * the NaN lanes are fixed up with a bit select (no branch). Ordinary values
 * round to nearest even (the FPCR default) and keep subnormals (FZ = 0). */

static void f16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    const uint32x4_t qbit = vdupq_n_u32(0x400000);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t h = vld1q_u16(src + i);
        float16x8_t hf = vreinterpretq_f16_u16(h);
        float32x4_t f[2] = {vcvt_f32_f16(vget_low_f16(hf)), vcvt_high_f32_f16(hf)};
        uint32x4_t w[2] = {vshll_n_u16(vget_low_u16(h), 13), vshll_high_n_u16(h, 13)};
        for (int x = 0; x < 2; x++) {
            /* put back the quiet bit of the input (f16 bit 9 -> f32 bit 22) */
            uint32x4_t nan = vmvnq_u32(vceqq_f32(f[x], f[x]));
            uint32x4_t g = vbslq_u32(qbit, w[x], vreinterpretq_u32_f32(f[x]));
            vst1q_f32(dst + i + 4 * x,
                      vreinterpretq_f32_u32(vbslq_u32(nan, g, vreinterpretq_u32_f32(f[x]))));
        }
    }
    for (; i < n; i++) dst[i] = attn_f16_to_f32(src[i]);
}

static void bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t h = vld1q_u16(src + i);
        vst1q_f32(dst + i, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)));
        vst1q_f32(dst + i + 4, vreinterpretq_f32_u32(vshll_high_n_u16(h, 16)));
    }
    for (; i < n; i++) dst[i] = attn_bf16_to_f32(src[i]);
}

/* A NaN lane becomes sign | 0x7fc00000 first, which converts to sign | 0x7e00. */
static ALWAYS_INLINE float32x4_t canon_nan(float32x4_t f) {
    uint32x4_t u = vreinterpretq_u32_f32(f);
    uint32x4_t nan = vmvnq_u32(vceqq_f32(f, f));
    uint32x4_t q = vorrq_u32(vandq_u32(u, vdupq_n_u32(0x80000000u)), vdupq_n_u32(0x7fc00000u));
    return vreinterpretq_f32_u32(vbslq_u32(nan, q, u));
}

static void f32_to_f16(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        float16x4_t lo = vcvt_f16_f32(canon_nan(vld1q_f32(src + i)));
        float16x8_t h = vcvt_high_f16_f32(lo, canon_nan(vld1q_f32(src + i + 4)));
        vst1q_u16(dst + i, vreinterpretq_u16_f16(h));
    }
    for (; i < n; i++) dst[i] = attn_f32_to_f16(src[i]);
}

/* Round to nearest even by adding 0x7fff + lsb; a NaN keeps its top bits
 * with the quiet bit (0x40) set, as attn_f32_to_bf16 does. */
static ALWAYS_INLINE uint16x4_t bf16x4(uint32x4_t u) {
    uint32x4_t nan = vcgtq_u32(vandq_u32(u, vdupq_n_u32(0x7fffffffu)), vdupq_n_u32(0x7f800000u));
    uint32x4_t hi = vshrq_n_u32(u, 16);
    uint32x4_t r = vaddq_u32(u, vaddq_u32(vandq_u32(hi, vdupq_n_u32(1)), vdupq_n_u32(0x7fff)));
    r = vbslq_u32(nan, vorrq_u32(hi, vdupq_n_u32(0x40)), vshrq_n_u32(r, 16));
    return vmovn_u32(r); /* every lane is 0 .. 0xffff */
}

static void f32_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x4_t lo = bf16x4(vreinterpretq_u32_f32(vld1q_f32(src + i)));
        uint16x4_t hi = bf16x4(vreinterpretq_u32_f32(vld1q_f32(src + i + 4)));
        vst1q_u16(dst + i, vcombine_u16(lo, hi));
    }
    for (; i < n; i++) dst[i] = attn_f32_to_bf16(src[i]);
}

const attn_kernels attn_kernels_neon = {
    .isa = ATTN_ISA_NEON,
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
