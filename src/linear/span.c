/* The state algebra on the CPU: the affine map of a span of tokens,
 *   state_out = diag(decay) state_in + u,
 * and the composition of two maps (attn.h, "The state algebra"). The span
 * map is the forward's state sweep from a zero state; its decay is e^{sum
 * of the log gates}, summed in double from the chunks' cumulated logs. */
#include <math.h>
#include <stdlib.h>

#include "chunk.h"
#include "state.h"

typedef struct span_bufs {
    lin_chunk c;
    float *s;      /* [d][dv] */
    double *logd;  /* [d] */
} span_bufs;

static span_bufs span_carve(scratch *s, const lin_problem *p) {
    span_bufs b;
    b.c = lin_chunk_carve(s, p);
    b.s = scratch_take(s, (size_t)(p->d * p->dv));
    b.logd = (double *)scratch_take(s, (size_t)(2 * p->d));
    return b;
}

static void run_task(const attn_kernels *kr, const lin_problem *p, int64_t b, int64_t h,
                     const attn_tensor *k, const attn_tensor *v, const attn_tensor *g,
                     attn_tensor *decay, attn_tensor *u, span_bufs *bf) {
    const int64_t C = p->chunk, d = p->d, dv = p->dv;
    const lin_seq sq = lin_problem_seq(p, b);
    lin_chunk *c = &bf->c;
    lin_state_load(kr, NULL, b, h, d, dv, bf->s);
    for (int64_t x = 0; x < d; x++) bf->logd[x] = 0.0;
    for (int64_t r0 = 0; r0 < sq.n; r0 += C) {
        const int64_t n = r0 + C <= sq.n ? C : sq.n - r0;
        lin_chunk_load(kr, p, &sq, h, r0, n, NULL, k, v, g, c);
        kr->gemm(d, dv, n, c->kr, 1, d, c->v, dv, bf->s, dv, 1, c->plast);
        const double *blast = c->b + (n - 1) * c->dg;
        for (int64_t x = 0; x < d; x++) bf->logd[x] += blast[c->dg == 1 ? 0 : x];
    }
    lin_state_store(kr, u, b, h, d, dv, bf->s);
    for (int64_t x = 0; x < d; x++)
        attn_store_f64(decay, attn_off3(decay, b, h, x), (float)exp(bf->logd[x]));
}

attn_status linear_engine_span_map(const attn_ctx *ctx, const lin_problem *p,
                                   const attn_tensor *k, const attn_tensor *v,
                                   const attn_tensor *g, attn_tensor *decay, attn_tensor *u) {
    const int threads = ctx->threads;
    size_t stride;
    scratch count = {NULL, 0};
    span_carve(&count, p);
    float *scr = scratch_alloc(threads, count.used, &stride);
    if (!scr) return attn_err(ATTN_ERR_NOMEM, "out of memory for linear span map scratch");
    const int64_t n_tasks = p->batch * p->h;
#pragma omp parallel num_threads(threads)
    {
        scratch mine = {scr + stride * (size_t)engine_thread_id(), 0};
        span_bufs bf = span_carve(&mine, p);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tasks; t++)
            run_task(ctx->kernels, p, t / p->h, t % p->h, k, v, g, decay, u, &bf);
    }
    free(scr);
    return ATTN_OK;
}

attn_status linear_engine_state_compose(const attn_tensor *decay1, const attn_tensor *u1,
                                        const attn_tensor *decay2, const attn_tensor *u2,
                                        attn_tensor *decay_out, attn_tensor *u_out) {
    const int64_t *s = u1->shape;
    const float *d1 = decay1 ? decay1->data : NULL, *d2 = decay2->data;
    const float *a = u1->data, *c = u2->data;
    float *od = decay_out ? decay_out->data : NULL, *ou = u_out->data;
    for (int64_t b = 0; b < s[0]; b++)
        for (int64_t h = 0; h < s[1]; h++)
            for (int64_t x = 0; x < s[2]; x++) {
                const float f = d2[attn_off3(decay2, b, h, x)];
                if (od) od[attn_off3(decay_out, b, h, x)] = f * d1[attn_off3(decay1, b, h, x)];
                for (int64_t e = 0; e < s[3]; e++)
                    ou[attn_off4(u_out, b, h, x, e)] =
                        f * a[attn_off4(u1, b, h, x, e)] + c[attn_off4(u2, b, h, x, e)];
            }
    return ATTN_OK;
}
