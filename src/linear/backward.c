/* The chunked-recurrence engine, backward. One task is one (sequence, kv
 * head): for each query head of the group in order, a forward sweep keeps
 * the state entering every chunk, then a reverse sweep carries dS, the
 * gradient of the state leaving the chunk. Within a chunk (chunk.h), with
 * q already scaled and dA_ij = do_i · v_j:
 *   dq = (dA ⊙ W) K + (dO S_inᵀ) ⊙ P
 *   dk = (dA ⊙ W)ᵀ Q + (V dSᵀ) ⊙ R
 *   dv = Aᵀ dO + (K ⊙ R) dS
 *   dS_in = diag(P_last) dS + (Q ⊙ P)ᵀ dO
 * (per-key gates: the dA ⊙ W products by lin_chunk_key_score_grads). The
 * log-gate gradient needs no state products: the loss depends on the
 * cumulated logs b_t only through q_t e^{b_t}, k_t e^{-b_t} and the final
 * state, so dL/db_t = q_t ⊙ dq_t - k_t ⊙ dk_t (+ rowsum(dS ⊙ S) at the last
 * token) and dg_t = sum_{s >= t} dL/db_s, a reverse running sum. dK and dV
 * of a group are summed over its heads in head order: the result does not
 * depend on the thread count. Memory: every chunk's entering state of one
 * sequence (T / chunk * D * Dv floats) per thread. */
#include <stdlib.h>
#include <string.h>

#include "chunk.h"
#include "state.h"

typedef struct bwd_bufs {
    lin_chunk c;
    float *dout; /* [C][dv] */
    float *vt;   /* [dv][C] Vᵀ */
    float *da;   /* [C][C] */
    float *dq, *dk, *tmp; /* [C][d] */
    float *dv;   /* [C][dv] */
    float *st, *dst; /* [dv][d] S_inᵀ, dSᵀ */
    float *ds, *s;   /* [d][dv] */
    float *suffix, *e; /* [d] */
    float *states;   /* [chunks][d][dv] */
    float *dk_acc, *dv_acc; /* [maxn][d], [maxn][dv] */
} bwd_bufs;

static bwd_bufs bwd_carve(scratch *s, const lin_problem *p, int64_t maxn) {
    bwd_bufs b;
    const int64_t C = p->chunk, d = p->d, dv = p->dv, chunks = (maxn + C - 1) / C;
    b.c = lin_chunk_carve(s, p);
    b.dout = scratch_take(s, (size_t)(C * dv));
    b.vt = scratch_take(s, (size_t)(dv * C));
    b.da = scratch_take(s, (size_t)(C * C));
    b.dq = scratch_take(s, (size_t)(C * d));
    b.dk = scratch_take(s, (size_t)(C * d));
    b.tmp = scratch_take(s, (size_t)(C * d));
    b.dv = scratch_take(s, (size_t)(C * dv));
    b.st = scratch_take(s, (size_t)(dv * d));
    b.dst = scratch_take(s, (size_t)(dv * d));
    b.ds = scratch_take(s, (size_t)(d * dv));
    b.s = scratch_take(s, (size_t)(d * dv));
    b.suffix = scratch_take(s, (size_t)d);
    b.e = scratch_take(s, (size_t)d);
    b.states = scratch_take(s, (size_t)((chunks > 0 ? chunks : 1) * d * dv));
    b.dk_acc = scratch_take(s, (size_t)((maxn > 0 ? maxn : 1) * d));
    b.dv_acc = scratch_take(s, (size_t)((maxn > 0 ? maxn : 1) * dv));
    return b;
}

static void transpose(const float *src, int64_t rows, int64_t cols, float *dst) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[c * rows + r] = src[r * cols + c];
}

/* dO rows [r0, r0 + n) of head h as f32 [n][dv]. */
static void load_dout(const attn_kernels *kr, const lin_problem *p, const lin_seq *sq,
                      int64_t h, int64_t r0, int64_t n, const attn_tensor *dout, float *dst) {
    rows_load_block(kr, dout, attn_off4(dout, sq->tb, sq->t0 + r0, h, 0), dout->stride[1], n,
                    p->dv, dst, p->dv);
}

/* Store dq (scaled back to q) for rows [r0, r0 + n) of head h. */
static void store_dq(const attn_kernels *kr, const lin_problem *p, const lin_seq *sq,
                     int64_t h, int64_t r0, int64_t n, float *dq, attn_tensor *out) {
    for (int64_t x = 0; x < n * p->d; x++) dq[x] *= p->scale;
    for (int64_t i = 0; i < n; i++)
        rows_store(kr, out, attn_off4(out, sq->tb, sq->t0 + r0 + i, h, 0), p->d, dq + i * p->d);
}

/* dg of rows [r0, r0 + n), last row first: dg_i = sum_x e_ix + suffix. */
static void gate_grads(const lin_problem *p, const lin_seq *sq, int64_t h, int64_t r0,
                       int64_t n, bwd_bufs *bf, attn_tensor *dg, double *dg_head) {
    const int64_t d = p->d;
    const lin_chunk *c = &bf->c;
    const int key = p->gate == ATTN_GATE_KEY;
    for (int64_t i = n - 1; i >= 0; i--) {
        const float *qi = c->q + i * d, *ki = c->k + i * d, *dqi = bf->dq + i * d,
                    *dki = bf->dk + i * d;
        const int64_t row = sq->t0 + r0 + i;
        if (key) {
            for (int64_t x = 0; x < d; x++) bf->suffix[x] += qi[x] * dqi[x] - ki[x] * dki[x];
            if (dg)
                for (int64_t x = 0; x < d; x++)
                    attn_store_f64(dg, attn_off4(dg, sq->tb, row, h, x), bf->suffix[x]);
        } else {
            float acc = 0.0f;
            for (int64_t x = 0; x < d; x++) acc += qi[x] * dqi[x] - ki[x] * dki[x];
            bf->suffix[0] += acc;
            if (p->gate == ATTN_GATE_HEAD) *dg_head += bf->suffix[0];
            else if (dg) attn_store_f64(dg, attn_off3(dg, sq->tb, row, h), bf->suffix[0]);
        }
    }
}

static void causal_head(const attn_kernels *kr, const lin_problem *p, int64_t b, int64_t h,
                        const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                        const attn_tensor *g, const attn_tensor *state_in,
                        const attn_tensor *dout, const attn_tensor *dstate_out,
                        attn_tensor *dq, attn_tensor *dg, attn_tensor *dstate_in,
                        bwd_bufs *bf, double *dg_head) {
    const int64_t C = p->chunk, d = p->d, dv = p->dv, ss = d * dv;
    const lin_seq sq = lin_problem_seq(p, b);
    lin_chunk *c = &bf->c;
    const int64_t chunks = (sq.n + C - 1) / C;
    /* forward sweep: the state entering each chunk */
    lin_state_load(kr, state_in, b, h, d, dv, bf->s);
    for (int64_t ci = 0; ci < chunks; ci++) {
        const int64_t r0 = ci * C, n = r0 + C <= sq.n ? C : sq.n - r0;
        memcpy(bf->states + ci * ss, bf->s, (size_t)ss * sizeof(float));
        lin_chunk_load(kr, p, &sq, h, r0, n, q, k, v, g, c);
        kr->gemm(d, dv, n, c->kr, 1, d, c->v, dv, bf->s, dv, 1, c->plast);
    }
    /* reverse sweep */
    lin_state_load(kr, dstate_out, b, h, d, dv, bf->ds);
    const int64_t dgw = p->gate == ATTN_GATE_KEY ? d : 1;
    for (int64_t x = 0; x < dgw; x++) bf->suffix[x] = 0.0f;
    for (int64_t x = 0; x < d; x++) { /* the final state's share: rowsum(dS ⊙ S) */
        float acc = 0.0f;
        for (int64_t e = 0; e < dv; e++) acc += bf->ds[x * dv + e] * bf->s[x * dv + e];
        bf->suffix[dgw > 1 ? x : 0] += acc;
    }
    for (int64_t ci = chunks - 1; ci >= 0; ci--) {
        const int64_t r0 = ci * C, n = r0 + C <= sq.n ? C : sq.n - r0;
        const float *sin = bf->states + ci * ss;
        lin_chunk_load(kr, p, &sq, h, r0, n, q, k, v, g, c);
        load_dout(kr, p, &sq, h, r0, n, dout, bf->dout);
        lin_chunk_scores(kr, p, n, c);
        transpose(c->v, n, dv, bf->vt); /* vt [dv][n], leading dim n */
        kr->gemm(n, n, dv, bf->dout, dv, 1, bf->vt, n, bf->da, C, 0, NULL); /* dA = dO Vᵀ */
        transpose(sin, d, dv, bf->st);
        transpose(bf->ds, d, dv, bf->dst);
        /* dq = (dO S_inᵀ) ⊙ P + intra; dk = (V dSᵀ) ⊙ R + intra */
        kr->gemm(n, d, dv, bf->dout, dv, 1, bf->st, d, bf->dq, d, 0, NULL);
        kr->gemm(n, d, dv, c->v, dv, 1, bf->dst, d, bf->dk, d, 0, NULL);
        for (int64_t i = 0; i < n; i++)
            for (int64_t x = 0; x < d; x++) {
                int64_t gx = i * c->dg + (c->dg == 1 ? 0 : x);
                bf->dq[i * d + x] *= c->pp[gx];
                bf->dk[i * d + x] *= c->rr[gx];
            }
        if (c->dg == 1) {
            lin_chunk_decay_tile(p, n, c, bf->da, C);
            kr->gemm(n, d, n, bf->da, C, 1, c->k, d, bf->dq, d, 1, NULL);
            kr->gemm(n, d, n, bf->da, 1, C, c->q, d, bf->dk, d, 1, NULL);
        } else if (c->keyfast) { /* dq += e^{b} ⊙ (dA K̃), dk += e^{-b} ⊙ (dAᵀ Q̃) */
            lin_chunk_mask(n, bf->da, C);
            kr->gemm(n, d, n, bf->da, C, 1, c->ki, d, bf->tmp, d, 0, NULL);
            for (int64_t x = 0; x < n * d; x++) bf->dq[x] += bf->tmp[x] * c->pp[x];
            kr->gemm(n, d, n, bf->da, 1, C, c->qp, d, bf->tmp, d, 0, NULL);
            for (int64_t x = 0; x < n * d; x++) bf->dk[x] += bf->tmp[x] * c->ib[x];
        } else {
            lin_chunk_key_score_grads(p, n, c, bf->da, C, bf->dq, bf->dk);
        }
        /* dv = Aᵀ dO + (K ⊙ R) dS */
        kr->gemm(n, dv, n, c->sc, 1, C, bf->dout, dv, bf->dv, dv, 0, NULL);
        kr->gemm(n, dv, d, c->kr, d, 1, bf->ds, dv, bf->dv, dv, 1, NULL);
        if (p->gate != ATTN_GATE_NONE) gate_grads(p, &sq, h, r0, n, bf, dg, dg_head);
        /* dS_in = diag(P_last) dS + (Q ⊙ P)ᵀ dO */
        kr->gemm(d, dv, n, c->qp, 1, d, bf->dout, dv, bf->ds, dv, 1, c->plast);
        for (int64_t x = 0; x < n * d; x++) bf->dk_acc[r0 * d + x] += bf->dk[x];
        for (int64_t x = 0; x < n * dv; x++) bf->dv_acc[r0 * dv + x] += bf->dv[x];
        store_dq(kr, p, &sq, h, r0, n, bf->dq, dq);
    }
    if (dstate_in) lin_state_store(kr, dstate_in, b, h, d, dv, bf->ds);
}

/* Non-causal (no gates): o_t = q'_t S_last, S_last = S_in + Kᵀ V. */
static void noncausal_head(const attn_kernels *kr, const lin_problem *p, int64_t b, int64_t h,
                           const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                           const attn_tensor *state_in, const attn_tensor *dout,
                           const attn_tensor *dstate_out, attn_tensor *dq,
                           attn_tensor *dstate_in, bwd_bufs *bf) {
    const int64_t C = p->chunk, d = p->d, dv = p->dv;
    const lin_seq sq = lin_problem_seq(p, b);
    lin_chunk *c = &bf->c;
    lin_state_load(kr, state_in, b, h, d, dv, bf->s);
    lin_state_load(kr, dstate_out, b, h, d, dv, bf->ds);
    for (int64_t r0 = 0; r0 < sq.n; r0 += C) {
        const int64_t n = r0 + C <= sq.n ? C : sq.n - r0;
        lin_chunk_load(kr, p, &sq, h, r0, n, q, k, v, NULL, c);
        load_dout(kr, p, &sq, h, r0, n, dout, bf->dout);
        kr->gemm(d, dv, n, c->k, 1, d, c->v, dv, bf->s, dv, 1, NULL);     /* S_last */
        kr->gemm(d, dv, n, c->q, 1, d, bf->dout, dv, bf->ds, dv, 1, NULL); /* dS */
    }
    transpose(bf->s, d, dv, bf->st);
    transpose(bf->ds, d, dv, bf->dst);
    for (int64_t r0 = 0; r0 < sq.n; r0 += C) {
        const int64_t n = r0 + C <= sq.n ? C : sq.n - r0;
        lin_chunk_load(kr, p, &sq, h, r0, n, q, k, v, NULL, c);
        load_dout(kr, p, &sq, h, r0, n, dout, bf->dout);
        kr->gemm(n, d, dv, bf->dout, dv, 1, bf->st, d, bf->dq, d, 0, NULL);
        kr->gemm(n, d, dv, c->v, dv, 1, bf->dst, d, bf->dk, d, 0, NULL);
        kr->gemm(n, dv, d, c->k, d, 1, bf->ds, dv, bf->dv, dv, 0, NULL);
        for (int64_t x = 0; x < n * d; x++) bf->dk_acc[r0 * d + x] += bf->dk[x];
        for (int64_t x = 0; x < n * dv; x++) bf->dv_acc[r0 * dv + x] += bf->dv[x];
        store_dq(kr, p, &sq, h, r0, n, bf->dq, dq);
    }
    if (dstate_in) lin_state_store(kr, dstate_in, b, h, d, dv, bf->ds);
}

attn_status linear_engine_backward(const attn_ctx *ctx, const lin_problem *p,
                                   const attn_tensor *q, const attn_tensor *k,
                                   const attn_tensor *v, const attn_tensor *g,
                                   const attn_tensor *state_in, const attn_tensor *dout,
                                   const attn_tensor *dstate_out, attn_tensor *dq,
                                   attn_tensor *dk, attn_tensor *dv, attn_tensor *dg,
                                   attn_tensor *dstate_in) {
    int64_t maxn = 0;
    for (int64_t b = 0; b < p->batch; b++)
        if (lin_problem_seq(p, b).n > maxn) maxn = lin_problem_seq(p, b).n;
    const int threads = ctx->threads;
    size_t stride;
    scratch count = {NULL, 0};
    bwd_carve(&count, p, maxn);
    float *scr = scratch_alloc(threads, count.used, &stride);
    double *dg_head = calloc((size_t)(p->batch * p->h), sizeof(double));
    if (!scr || !dg_head) {
        free(scr);
        free(dg_head);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for linear attention backward scratch");
    }
    const int64_t n_tasks = p->batch * p->hk, group = p->h / p->hk;
#pragma omp parallel num_threads(threads)
    {
        scratch mine = {scr + stride * (size_t)engine_thread_id(), 0};
        bwd_bufs bf = bwd_carve(&mine, p, maxn);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tasks; t++) {
            const int64_t b = t / p->hk, hk = t % p->hk;
            const lin_seq sq = lin_problem_seq(p, b);
            memset(bf.dk_acc, 0, (size_t)(sq.n * p->d) * sizeof(float));
            memset(bf.dv_acc, 0, (size_t)(sq.n * p->dv) * sizeof(float));
            for (int64_t h = hk * group; h < (hk + 1) * group; h++) {
                if (p->causal)
                    causal_head(ctx->kernels, p, b, h, q, k, v, g, state_in, dout, dstate_out,
                                dq, dg, dstate_in, &bf, &dg_head[b * p->h + h]);
                else
                    noncausal_head(ctx->kernels, p, b, h, q, k, v, state_in, dout, dstate_out,
                                   dq, dstate_in, &bf);
            }
            for (int64_t i = 0; i < sq.n; i++) {
                rows_store(ctx->kernels, dk, attn_off4(dk, sq.tb, sq.t0 + i, hk, 0), p->d,
                           bf.dk_acc + i * p->d);
                rows_store(ctx->kernels, dv, attn_off4(dv, sq.tb, sq.t0 + i, hk, 0), p->dv,
                           bf.dv_acc + i * p->dv);
            }
        }
    }
    if (dg && p->gate == ATTN_GATE_HEAD) /* summed over sequences in order */
        for (int64_t h = 0; h < p->h; h++) {
            double acc = 0.0;
            for (int64_t b = 0; b < p->batch; b++) acc += dg_head[b * p->h + h];
            attn_store_f64(dg, h * dg->stride[0], acc);
        }
    free(dg_head);
    free(scr);
    return ATTN_OK;
}
