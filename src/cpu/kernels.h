/* The micro-kernel contract. Each ISA (src/cpu/<isa>/) fills one table;
 * the engines call only these. Intrinsics live only behind this table.
 * All pointers are f32 unless named otherwise; kernels trust their inputs. */
#ifndef ATTN_KERNELS_H
#define ATTN_KERNELS_H

#include <stdint.h>

#include "attn.h"

typedef struct attn_kernels {
    attn_isa isa;

    /* Small GEMM on cache-resident tiles:
     *   C[m x n] = X + A[m x k] * B[k x n]
     * with X = 0 (accumulate == 0 and c_scale == NULL), X = C (accumulate),
     * or X = diag(c_scale) * C (c_scale != NULL, the online-softmax rescale).
     * A(r, kk) = a[r * rsa + kk * csa] (any strides: transposes are free);
     * B row kk = b + kk * ldb, contiguous along n; C row r = c + r * ldc. */
    void (*gemm)(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa,
                 int64_t csa, const float *b, int64_t ldb, float *c, int64_t ldc,
                 int accumulate, const float *c_scale);

    /* Online softmax over a column-major logit tile s[rows][cols] (row j is a
     * key, column i a query; logits in log2 units, masked = -inf):
     *   m_new[i] = max(m[i], max_j s[j][i]); alpha[i] = 2^(m[i] - m_new[i]);
     *   s[j][i] = 2^(s[j][i] - m_new[i]); l[i] = alpha[i] * l[i] + sum_j s[j][i].
     * A column with m_new = -inf keeps p = 0 and alpha = 0. m, l updated. */
    void (*softmax_cols)(float *s, int64_t rows, int64_t cols, int64_t lds, float *m,
                         float *l, float *alpha);

    /* The same online softmax over a row-major tile s[rows][cols] (row r is a
     * query, column c a key), vectorised along keys: for decode, where a
     * head has few query rows. */
    void (*softmax_rows)(float *s, int64_t rows, int64_t cols, int64_t lds, float *m,
                         float *l, float *alpha);

    /* Logit soft-cap on a row-major tile, in place:
     *   t = tanh(s[r][c] * in_mul); s[r][c] = out_mul * t;
     * and t is also stored at t_out[r * ldt + c] when t_out is not NULL (the
     * backward needs 1 - t^2). Absolute error of t about 1e-7; NaN stays NaN. */
    void (*softcap)(float *s, int64_t rows, int64_t cols, int64_t lds, float in_mul,
                    float out_mul, float *t_out, int64_t ldt);

    /* Row-major tile: p[r][c] = 2^(s[r][c] * mul - sub[r]) in place. */
    void (*exp2_rows)(float *s, int64_t rows, int64_t cols, int64_t lds, float mul,
                      const float *sub);

    /* Row-major tile: dp[r][c] = p[r][c] * (dp[r][c] - delta[r]) * mul in place. */
    void (*dsoftmax_rows)(float *dp, const float *p, int64_t rows, int64_t cols,
                          int64_t ld, const float *delta, float mul);

    /* Dot products of one key row k[d] (f32) with rows q[r][d] (f32, ldq):
     * out[r] = sum_d q[r][d] * k[d]. Used by decode for few queries. */
    void (*dot_rows)(const float *k, const float *q, int64_t rows, int64_t d, int64_t ldq,
                     float *out);

    /* Decode over nk cache rows of `heads` kv heads; row j of head h starts at
     * element j * ld + h * hs of k or v, stored as kind (f32, f16 or bf16,
     * converted in registers). Rows are read in memory order, all heads of a
     * row together, so that a long cache streams at full bandwidth.
     *   qk_heads: s[h][r][j] = sum_d q[h][r][d] * k(j, h)[d]
     *   pv_heads: o[h][r][:] += sum_j p[h][r][j] * v(j, h)[:] */
    void (*qk_heads)(attn_dtype kind, const void *k, int64_t ld, int64_t hs, int64_t heads,
                     int64_t nk, const float *q, int64_t rows, int64_t d, float *s);
    void (*pv_heads)(attn_dtype kind, const void *v, int64_t ld, int64_t hs, int64_t heads,
                     int64_t nk, const float *p, int64_t rows, int64_t dv, float *o);

    /* y[i] += a * x[i]. */
    void (*axpy)(int64_t n, float a, const float *x, float *y);

    /* dst rows [rows][n] (leading dim ldd) = src [rows][n] (ldd... lds), with
     * stores that bypass the caches where the ISA has them (no read of the
     * destination lines first); ordered before the call returns. */
    void (*store_stream)(const float *src, int64_t lds, int64_t rows, int64_t n, float *dst,
                         int64_t ldd);

    /* dst[c][r] = src[r][c] on a rows x cols tile (leading dims lds, ldd). */
    void (*transpose)(const float *src, int64_t lds, int64_t rows, int64_t cols, float *dst,
                      int64_t ldd);

    /* One chunk of per-key-dim gates for the chunked linear engine (GLA):
     * n rows of log gates g, queries q and keys k ([n][d], leading dims
     * ldg, ldq, ldk). With b_i = sum_{t<=i} max(g_t, gate_floor), summed
     * in double and rounded once to f32,
     *   qp[i][x]  = scale q_ix 2^(b_ix log2 e)      ([n][d], leading dim d)
     *   kt[x][i]  = k_ix 2^(-b_ix log2 e)           ([d][n], leading dim ldt)
     *   krt[x][i] = kt[x][i] plast[x],  plast[x] = 2^(b_{n-1,x} log2 e).
     * Returns 0, the outputs unspecified, when some |b_ix| >= range (the
     * split e^{b} e^{-b} would leave f32's range: the caller takes its
     * general path); else 1. A NaN gate passes and propagates.
     * Scratch: ke [n][d] floats, bsum [d] doubles. */
    int (*key_gate_chunk)(int64_t n, int64_t d, const float *g, int64_t ldg, const float *q,
                          int64_t ldq, const float *k, int64_t ldk, float scale,
                          float gate_floor, float range, float *qp, float *kt, float *krt,
                          int64_t ldt, float *plast, float *ke, double *bsum);

    /* Conversions of contiguous runs. */
    void (*f16_to_f32)(const uint16_t *src, float *dst, int64_t n);
    void (*bf16_to_f32)(const uint16_t *src, float *dst, int64_t n);
    void (*f32_to_f16)(const float *src, uint16_t *dst, int64_t n);
    void (*f32_to_bf16)(const float *src, uint16_t *dst, int64_t n);
} attn_kernels;

extern const attn_kernels attn_kernels_scalar;
#if defined(__x86_64__) || defined(__i386__)
extern const attn_kernels attn_kernels_avx2;
extern const attn_kernels attn_kernels_avx512;
#endif
#if defined(__aarch64__)
extern const attn_kernels attn_kernels_neon;
#endif

/* Portable versions (kernels_scalar.c) that the tables without a
 * specialised one share. */
void attn_transpose_portable(const float *src, int64_t lds, int64_t rows, int64_t cols,
                             float *dst, int64_t ldd);
void attn_store_stream_portable(const float *src, int64_t lds, int64_t rows, int64_t n,
                                float *dst, int64_t ldd);
int attn_key_gate_chunk_portable(int64_t n, int64_t d, const float *g, int64_t ldg,
                                 const float *q, int64_t ldq, const float *k, int64_t ldk,
                                 float scale, float gate_floor, float range, float *qp,
                                 float *kt, float *krt, int64_t ldt, float *plast, float *ke,
                                 double *bsum);

/* The table for an ISA this build has, or NULL. */
const attn_kernels *attn_kernels_for(attn_isa isa);

#endif
