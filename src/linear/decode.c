/* The chunked-recurrence engine, decode: the recurrence itself, token by
 * token, on the state held in the caller's tensor,
 *   S = G_t ⊙ S + k_tᵀ v_t,   o_t = scale · q_t S.
 * One task per (sequence, query head); per token a row-vector GEMM for o
 * and a rank-1 GEMM with the row scale for S. */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include "state.h"

typedef struct dec_bufs {
    float *s, *q, *k, *v, *a, *o; /* [d][dv], [d], [d], [dv], [d], [dv] */
} dec_bufs;

static dec_bufs dec_carve(scratch *s, const lin_problem *p) {
    dec_bufs b;
    b.s = scratch_take(s, (size_t)(p->d * p->dv));
    b.q = scratch_take(s, (size_t)p->d);
    b.k = scratch_take(s, (size_t)p->d);
    b.v = scratch_take(s, (size_t)p->dv);
    b.a = scratch_take(s, (size_t)p->d);
    b.o = scratch_take(s, (size_t)p->dv);
    return b;
}

static void run_task(const attn_kernels *kr, const lin_problem *p, int64_t b, int64_t h,
                     const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                     const attn_tensor *g, attn_tensor *state, attn_tensor *o,
                     const dec_bufs *bf) {
    const int64_t d = p->d, dv = p->dv, hk = h / (p->h / p->hk);
    /* the state in place when it is f32 with unit stride along Dv: one pass
     * reads it from memory, the update writes it back while in cache */
    const bool in_place = state->dtype == ATTN_F32 && state->stride[3] == 1;
    float *s = in_place ? (float *)state->data + attn_off4(state, b, h, 0, 0) : bf->s;
    const int64_t lds = in_place ? state->stride[2] : dv;
    if (!in_place) lin_state_load(kr, state, b, h, d, dv, bf->s);
    for (int64_t t = 0; t < p->t; t++) {
        rows_load(kr, q, attn_off4(q, b, t, h, 0), d, bf->q);
        rows_load(kr, k, attn_off4(k, b, t, hk, 0), d, bf->k);
        rows_load(kr, v, attn_off4(v, b, t, hk, 0), dv, bf->v);
        if (p->gate == ATTN_GATE_KEY) {
            rows_load(kr, g, attn_off4(g, b, t, h, 0), d, bf->a);
            for (int64_t x = 0; x < d; x++) bf->a[x] = expf(bf->a[x]);
        } else if (p->gate != ATTN_GATE_NONE) {
            float a = expf((float)lin_gate_at(p, g, b, t, h, 0));
            for (int64_t x = 0; x < d; x++) bf->a[x] = a;
        }
        /* o = q (diag(a) S + kᵀ v) = (q ⊙ a) S + (q · k) v from the old S,
         * then S = diag(a) S + kᵀ v: two passes over S, both GEMMs */
        const int gated = p->gate != ATTN_GATE_NONE;
        float qk = 0.0f;
        for (int64_t x = 0; x < d; x++) {
            qk += bf->q[x] * bf->k[x];
            bf->q[x] *= p->scale * (gated ? bf->a[x] : 1.0f);
        }
        kr->gemm(1, dv, d, bf->q, d, 1, s, lds, bf->o, dv, 0, NULL);
        kr->axpy(dv, p->scale * qk, bf->v, bf->o);
        kr->gemm(d, dv, 1, bf->k, 1, 0, bf->v, dv, s, lds, 1, gated ? bf->a : NULL);
        rows_store(kr, o, attn_off4(o, b, t, h, 0), dv, bf->o);
    }
    if (!in_place) lin_state_store(kr, state, b, h, d, dv, bf->s);
}

attn_status linear_engine_decode(const attn_ctx *ctx, const lin_problem *p,
                                 const attn_tensor *q, const attn_tensor *k,
                                 const attn_tensor *v, const attn_tensor *g,
                                 attn_tensor *state, attn_tensor *o) {
    const int threads = ctx->threads;
    size_t stride;
    scratch count = {NULL, 0};
    dec_carve(&count, p);
    float *scr = scratch_alloc(threads, count.used, &stride);
    if (!scr) return attn_err(ATTN_ERR_NOMEM, "out of memory for linear decode scratch");
    const int64_t n_tasks = p->batch * p->h;
#pragma omp parallel num_threads(threads)
    {
        scratch mine = {scr + stride * (size_t)engine_thread_id(), 0};
        dec_bufs bf = dec_carve(&mine, p);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tasks; t++)
            run_task(ctx->kernels, p, t / p->h, t % p->h, q, k, v, g, state, o, &bf);
    }
    free(scr);
    return ATTN_OK;
}
