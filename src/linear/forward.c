/* The chunked-recurrence engine, forward. One task is one (sequence, query
 * head): it walks the chunks in order, carrying the state S (D x Dv, f32)
 * in its scratch. Within a chunk (chunk.h):
 *   O = A V + (Q ⊙ P) S,   S = diag(P_last) S + (K ⊙ R)ᵀ V,
 * three GEMMs of the micro-kernel contract plus the scores. Tasks are
 * independent, so the result does not depend on the thread count. */
#include <stdlib.h>

#include "chunk.h"
#include "state.h"

typedef struct fwd_bufs {
    lin_chunk c;
    float *s;  /* [d][dv] state */
    float *o;  /* [chunk][dv] */
} fwd_bufs;

static fwd_bufs fwd_carve(scratch *s, const lin_problem *p) {
    fwd_bufs b;
    b.c = lin_chunk_carve(s, p);
    b.s = scratch_take(s, (size_t)(p->d * p->dv));
    b.o = scratch_take(s, (size_t)(p->chunk * p->dv));
    return b;
}

static void store_rows(const attn_kernels *kr, const lin_problem *p, const lin_seq *sq,
                       int64_t h, int64_t r0, int64_t n, const float *o, attn_tensor *out) {
    for (int64_t i = 0; i < n; i++)
        rows_store(kr, out, attn_off4(out, sq->tb, sq->t0 + r0 + i, h, 0), p->dv, o + i * p->dv);
}

static void run_task(const attn_kernels *kr, const lin_problem *p, int64_t b, int64_t h,
                     const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                     const attn_tensor *g, const attn_tensor *state_in, attn_tensor *o,
                     attn_tensor *state_out, fwd_bufs *bf) {
    const int64_t C = p->chunk, d = p->d, dv = p->dv;
    const lin_seq sq = lin_problem_seq(p, b);
    lin_chunk *c = &bf->c;
    lin_state_load(kr, state_in, b, h, d, dv, bf->s);
    if (p->causal) {
        for (int64_t r0 = 0; r0 < sq.n; r0 += C) {
            const int64_t n = r0 + C <= sq.n ? C : sq.n - r0;
            lin_chunk_load(kr, p, &sq, h, r0, n, q, k, v, g, c);
            lin_chunk_scores(kr, p, n, c);
            kr->gemm(n, dv, n, c->sc, C, 1, c->v, dv, bf->o, dv, 0, NULL);  /* A V */
            kr->gemm(n, dv, d, c->qp, d, 1, bf->s, dv, bf->o, dv, 1, NULL); /* + (Q⊙P) S */
            store_rows(kr, p, &sq, h, r0, n, bf->o, o);
            /* S = diag(P_last) S + (K ⊙ R)ᵀ V */
            kr->gemm(d, dv, n, c->kr, 1, d, c->v, dv, bf->s, dv, 1, c->plast);
        }
    } else {
        /* every query reads the last state: first the state, then the outputs */
        for (int64_t r0 = 0; r0 < sq.n; r0 += C) {
            const int64_t n = r0 + C <= sq.n ? C : sq.n - r0;
            lin_chunk_load(kr, p, &sq, h, r0, n, q, k, v, g, c);
            kr->gemm(d, dv, n, c->k, 1, d, c->v, dv, bf->s, dv, 1, NULL);
        }
        for (int64_t r0 = 0; r0 < sq.n; r0 += C) {
            const int64_t n = r0 + C <= sq.n ? C : sq.n - r0;
            const int64_t row = sq.t0 + r0;
            rows_load_block(kr, q, attn_off4(q, sq.tb, row, h, 0), q->stride[1], n, d, c->q, d);
            for (int64_t x = 0; x < n * d; x++) c->q[x] *= p->scale;
            kr->gemm(n, dv, d, c->q, d, 1, bf->s, dv, bf->o, dv, 0, NULL);
            store_rows(kr, p, &sq, h, r0, n, bf->o, o);
        }
    }
    if (state_out) lin_state_store(kr, state_out, b, h, d, dv, bf->s);
}

attn_status linear_engine_forward(const attn_ctx *ctx, const lin_problem *p,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, const attn_tensor *g,
                                  const attn_tensor *state_in, attn_tensor *o,
                                  attn_tensor *state_out) {
    const int threads = ctx->threads;
    size_t stride;
    scratch count = {NULL, 0};
    fwd_carve(&count, p);
    float *scr = scratch_alloc(threads, count.used, &stride);
    if (!scr) return attn_err(ATTN_ERR_NOMEM, "out of memory for linear attention scratch");
    const int64_t n_tasks = p->batch * p->h;
#pragma omp parallel num_threads(threads)
    {
        scratch mine = {scr + stride * (size_t)engine_thread_id(), 0};
        fwd_bufs bf = fwd_carve(&mine, p);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tasks; t++)
            run_task(ctx->kernels, p, t / p->h, t % p->h, q, k, v, g, state_in, o, state_out,
                     &bf);
    }
    free(scr);
    return ATTN_OK;
}
