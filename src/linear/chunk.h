/* One chunk of the chunked-recurrence engine: its tiles, gate products and
 * masked decayed scores, shared by the forward and the backward.
 *
 * Inside a chunk of n tokens with gates a_t = exp(g_t) (a scalar, or one per
 * key dim x):
 *   P_i = a_0 ... a_i                 (inclusive prefix products)
 *   R_j = a_{j+1} ... a_{n-1}         (exclusive suffix products)
 *   W_ij = a_{j+1} ... a_i  (j <= i)  (decay from token j to token i)
 *   A_ij = sum_x q_ix k_jx W_ijx      (0 for j > i)
 * and then
 *   O     = A V + (Q ⊙ P) S_in
 *   S_out = diag(P_{n-1}) S_in + (K ⊙ R)ᵀ V.
 * P, R and the scalar-gate W come from the cumulated logs b_i = g_0 + ... +
 * g_i summed in double (P_i = e^{b_i}, R_j = e^{b_{n-1} - b_j}, W_ij =
 * e^{b_i - b_j}, each one exp2_rows call over a tile): one rounding each, so
 * gates near 1 lose nothing to the f32 representation of e^g, and double
 * leaves no cancellation to speak of (g is clamped at -1e4, where e^g is 0
 * in f32, so that g = -inf cuts cleanly). Per-key-dim W is a running product
 * of at most chunk - 1 gates, unless the chunk's cumulated logs stay within
 * ±20 (keyfast): then W_ijx = e^{b_ix} e^{-b_jx} splits into Q ⊙ e^{b} and
 * K ⊙ e^{-b}, both within f32 range, and the scores are one GEMM (b rounded
 * to f32 costs at most 1.2e-6 relative per factor). */
#ifndef ATTN_LINEAR_CHUNK_H
#define ATTN_LINEAR_CHUNK_H

#include "engine/rows.h"
#include "linear.h"

/* Log gates below this are e^g = 0 in f32 and in the products; clamping
 * keeps differences of cumulated logs finite when g = -inf. */
#define GATE_FLOOR (-1e4)
/* |cumulated log gate| below which the split e^{b_i} e^{-b_j} is used: both
 * factors stay normal f32 (e^{±20}), and b rounded to f32 before the
 * exponential costs at most 20 x 2^-24 = 1.2e-6 relative per factor */
#define KEYFAST_RANGE 20.0

typedef struct lin_chunk {
    int64_t c, d, dv, dg; /* chunk capacity; dims; gate width (1 or d) */
    float *q;   /* [c][d]   scale * q */
    float *k;   /* [c][d] */
    float *kt;  /* [d][c]   Kᵀ (scalar gates), (K ⊙ e^{-b})ᵀ (key gates, keyfast) */
    float *ib;  /* [c][d]   e^{-b} (key gates, keyfast) */
    float *ki;  /* [c][d]   K ⊙ e^{-b} (key gates, keyfast) */
    int keyfast; /* key gates whose cumulated logs stay within ±KEYFAST_RANGE:
                    A = (Q ⊙ e^{b}) (K ⊙ e^{-b})ᵀ is one GEMM without overflow */
    float *v;   /* [c][dv] */
    float *a;   /* [c][dg]  gates e^g */
    double *b;  /* [c][dg]  cumulated log gates */
    float *pp;  /* [c][dg]  prefix products P */
    float *rr;  /* [c][dg]  suffix products R */
    float *plast; /* [d]    P_{n-1} broadcast over d (the state's row scale) */
    float *wt;  /* [c][c]   W (scalar gates; 0 above the diagonal) */
    float *zero; /* [c]     zeros (the exp2_rows offsets) */
    float *sc;  /* [c][c]   scores A */
    float *qp;  /* [c][d]   Q ⊙ P */
    float *kr;  /* [c][d]   K ⊙ R */
    float *w;   /* [d]      running product */
    float *ps;  /* [c]      row scales (the forward's scale P) */
    float *cs;  /* [c]      column scales (the forward's v row scales) */
} lin_chunk;

/* Carve the chunk buffers (base NULL: only count). */
lin_chunk lin_chunk_carve(scratch *s, const lin_problem *p);

/* Load rows [r0, r0 + n) of sequence sq, query head h: q (scaled), k, v and
 * the gates; then the products P, R, plast and Q ⊙ P, K ⊙ R. q may be NULL
 * (state-only sweeps: c->q and c->qp are then left as they were). */
void lin_chunk_load(const attn_kernels *kr, const lin_problem *p, const lin_seq *sq,
                    int64_t h, int64_t r0, int64_t n, const attn_tensor *q,
                    const attn_tensor *k, const attn_tensor *v, const attn_tensor *g,
                    lin_chunk *c);

/* The gates of rows [r0, r0 + n) alone: b, a, P, R, W, plast, keyfast and,
 * when keyfast, ib = e^{-b}. */
void lin_chunk_gates(const attn_kernels *kr, const lin_problem *p, const lin_seq *sq,
                     int64_t h, int64_t r0, int64_t n, const attn_tensor *g, lin_chunk *c);

/* Ask for the rows of the chunk after [r0, r0 + n) of head h (q may be NULL). */
void lin_chunk_prefetch(const lin_problem *p, const lin_seq *sq, int64_t h, int64_t r0,
                        int64_t n, const attn_tensor *q, const attn_tensor *k,
                        const attn_tensor *v, const attn_tensor *g);

/* sc = the masked decayed scores A [n][n] (leading dim c). */
void lin_chunk_scores(const attn_kernels *kr, const lin_problem *p, int64_t n, lin_chunk *c);

/* m[i][j] = 0 for j > i on a [n][n] tile. */
void lin_chunk_mask(int64_t n, float *m, int64_t ldm);

/* Scalar or no gates: m[i][j] *= W_ij for j <= i and m[i][j] = 0 for j > i,
 * on a [n][n] tile with leading dim ldm. */
void lin_chunk_decay_tile(const lin_problem *p, int64_t n, const lin_chunk *c, float *m,
                          int64_t ldm);

/* Per-key gates, the backward of the scores: with dA [n][n] (leading dim
 * ldm, zero above the diagonal),
 *   dq_i += sum_{j<=i} dA_ij (k_j ⊙ W_ij),  dk_j += sum_{i>=j} dA_ij (q_i ⊙ W_ij)
 * (q already scaled); dq, dk [n][d]. */
void lin_chunk_key_score_grads(const lin_problem *p, int64_t n, lin_chunk *c,
                               const float *dA, int64_t ldm, float *dq, float *dk);

#endif
