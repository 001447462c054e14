/* Scalar micro-kernels: the portable implementation of the contract in
 * kernels.h, always built, and the model the SIMD versions follow. */
#include <math.h>
#include <string.h>

#include "../kernels.h"

static void gemm(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa, int64_t csa,
                 const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate,
                 const float *c_scale) {
    for (int64_t r = 0; r < m; r++) {
        float *cr = c + r * ldc;
        if (c_scale) {
            for (int64_t j = 0; j < n; j++) cr[j] *= c_scale[r];
        } else if (!accumulate) {
            for (int64_t j = 0; j < n; j++) cr[j] = 0.0f;
        }
        for (int64_t kk = 0; kk < k; kk++) {
            float av = a[r * rsa + kk * csa];
            const float *bk = b + kk * ldb;
            for (int64_t j = 0; j < n; j++) cr[j] += av * bk[j];
        }
    }
}

/* max that lets a NaN through, so that a NaN logit poisons its row */
static inline float max_nan(float m, float x) { return (x > m || x != x) ? x : m; }

static void softmax_cols(float *s, int64_t rows, int64_t cols, int64_t lds, float *m,
                         float *l, float *alpha) {
    for (int64_t i = 0; i < cols; i++) {
        float mx = m[i];
        for (int64_t j = 0; j < rows; j++) mx = max_nan(mx, s[j * lds + i]);
        float sub = (mx == -INFINITY) ? 0.0f : mx;
        alpha[i] = exp2f(m[i] - sub);
        float sum = 0.0f;
        for (int64_t j = 0; j < rows; j++) {
            float p = exp2f(s[j * lds + i] - sub);
            s[j * lds + i] = p;
            sum += p;
        }
        l[i] = alpha[i] * l[i] + sum;
        m[i] = mx;
    }
}

static void softmax_rows(float *s, int64_t rows, int64_t cols, int64_t lds, float *m,
                         float *l, float *alpha) {
    /* the column kernel with the tile's strides swapped, one row at a time */
    for (int64_t r = 0; r < rows; r++)
        softmax_cols(s + r * lds, cols, 1, 1, m + r, l + r, alpha + r);
}

static void softcap(float *s, int64_t rows, int64_t cols, int64_t lds, float in_mul,
                    float out_mul, float *t_out, int64_t ldt) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            float t = tanhf(s[r * lds + c] * in_mul);
            if (t_out) t_out[r * ldt + c] = t;
            s[r * lds + c] = out_mul * t;
        }
}

static void exp2_rows(float *s, int64_t rows, int64_t cols, int64_t lds, float mul,
                      const float *sub) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) s[r * lds + c] = exp2f(s[r * lds + c] * mul - sub[r]);
}

static void dsoftmax_rows(float *dp, const float *p, int64_t rows, int64_t cols, int64_t ld,
                          const float *delta, float mul) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            dp[r * ld + c] = p[r * ld + c] * (dp[r * ld + c] - delta[r]) * mul;
}

static void dot_rows(const float *k, const float *q, int64_t rows, int64_t d, int64_t ldq,
                     float *out) {
    for (int64_t r = 0; r < rows; r++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < d; i++) acc += q[r * ldq + i] * k[i];
        out[r] = acc;
    }
}

static inline float b16_to_f32(uint16_t x, int bf16) {
    return bf16 ? attn_bf16_to_f32(x) : attn_f16_to_f32(x);
}

static inline float elem(attn_dtype kind, const void *x, int64_t i) {
    if (kind == ATTN_F32) return ((const float *)x)[i];
    return b16_to_f32(((const uint16_t *)x)[i], kind == ATTN_BF16);
}

static void qk_heads(attn_dtype kind, const void *k, int64_t ld, int64_t hs, int64_t heads,
                     int64_t nk, const float *q, int64_t rows, int64_t d, float *s) {
    for (int64_t j = 0; j < nk; j++)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t r = 0; r < rows; r++) {
                float acc = 0.0f;
                for (int64_t i = 0; i < d; i++)
                    acc += q[(h * rows + r) * d + i] * elem(kind, k, j * ld + h * hs + i);
                s[(h * rows + r) * nk + j] = acc;
            }
}

static void pv_heads(attn_dtype kind, const void *v, int64_t ld, int64_t hs, int64_t heads,
                     int64_t nk, const float *p, int64_t rows, int64_t dv, float *o) {
    for (int64_t j = 0; j < nk; j++)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t r = 0; r < rows; r++) {
                float pr = p[(h * rows + r) * nk + j];
                for (int64_t c = 0; c < dv; c++)
                    o[(h * rows + r) * dv + c] += pr * elem(kind, v, j * ld + h * hs + c);
            }
}

static void axpy(int64_t n, float a, const float *x, float *y) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

void attn_transpose_portable(const float *src, int64_t lds, int64_t rows, int64_t cols,
                             float *dst, int64_t ldd) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) /* 16-column strips stay in cache */
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = c0; c < cols && c < c0 + 16; c++) dst[c * ldd + r] = src[r * lds + c];
}

void attn_store_stream_portable(const float *src, int64_t lds, int64_t rows, int64_t n,
                                float *dst, int64_t ldd) {
    for (int64_t r = 0; r < rows; r++) memcpy(dst + r * ldd, src + r * lds, (size_t)n * sizeof(float));
}

int attn_key_gate_chunk_portable(int64_t n, int64_t d, const float *g, int64_t ldg,
                                 const float *q, int64_t ldq, const float *k, int64_t ldk,
                                 float scale, float gate_floor, float range, float *qp,
                                 float *kt, float *krt, int64_t ldt, float *plast, float *ke,
                                 double *bsum) {
    const float log2e = 1.4426950408889634f;
    int bad = 0;
    for (int64_t x = 0; x < d; x++) bsum[x] = 0.0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t x = 0; x < d; x++) {
            const float gx = g[i * ldg + x];
            bsum[x] += gate_floor > gx ? gate_floor : gx; /* NaN stays */
            const float b = (float)bsum[x];
            bad |= fabsf(b) >= range;
            const float pb = exp2f(b * log2e);
            qp[i * d + x] = scale * q[i * ldq + x] * pb;
            ke[i * d + x] = k[i * ldk + x] * exp2f(-b * log2e);
            if (i == n - 1) plast[x] = pb;
        }
    if (bad) return 0;
    attn_transpose_portable(ke, d, n, d, kt, ldt);
    for (int64_t x = 0; x < d; x++)
        for (int64_t i = 0; i < n; i++) krt[x * ldt + i] = kt[x * ldt + i] * plast[x];
    return 1;
}

static void f16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = attn_f16_to_f32(src[i]);
}
static void bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = attn_bf16_to_f32(src[i]);
}
static void f32_to_f16(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = attn_f32_to_f16(src[i]);
}
static void f32_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = attn_f32_to_bf16(src[i]);
}

const attn_kernels attn_kernels_scalar = {
    .isa = ATTN_ISA_SCALAR,
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
