/* 2-D / 3-D neighbourhood attention (CLEAR): the grid rule lives in the
 * problem (attn_problem.grid_*, applied element by element in the blocks it
 * cuts), and a planner lists the key blocks that hold any visible pair, so
 * the tiled engine visits only those. */
#include <stdlib.h>
#include <string.h>

#include "mech_run.h"
#include "validate.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

static attn_status check_grid(attn_grid g, attn_grid r) {
    if (g.f < 1 || g.h < 1 || g.w < 1) return attn_err(ATTN_ERR_ARG, "grid extents must be >= 1");
    if (r.f < 0 || r.h < 0 || r.w < 0) return attn_err(ATTN_ERR_ARG, "radius must be >= 0 on every axis");
    if (g.f * g.h * g.w > INT32_MAX) return attn_err(ATTN_ERR_OVERFLOW, "the grid must hold < 2^31 tokens");
    return ATTN_OK;
}

attn_status attn_plan_neighborhood(attn_grid g, attn_grid r, int64_t block_q, int64_t block_k,
                                   attn_plan **out) {
    attn_clear_error();
    if (!out) return attn_err(ATTN_ERR_NULL, "out must not be NULL");
    *out = NULL;
    CHECK(check_grid(g, r));
    if (block_q < 1 || block_q > 512 || block_k < 1 || block_k > 512)
        return attn_err(ATTN_ERR_ARG, "block_q and block_k must be in 1..512");
    const int64_t T = g.f * g.h * g.w, nqb = (T + block_q - 1) / block_q, nkb = (T + block_k - 1) / block_k;
    uint8_t *mark = malloc((size_t)nkb);
    int64_t *off = calloc((size_t)nqb + 1, sizeof(int64_t));
    attn_plan_entry *en = malloc((size_t)(nqb * nkb) * sizeof(attn_plan_entry));
    if (!mark || !off || !en) {
        free(mark), free(off), free(en);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for the neighbourhood plan");
    }
    int64_t count = 0;
    for (int64_t qb = 0; qb < nqb; qb++) {
        memset(mark, 0, (size_t)nkb);
        for (int64_t i = qb * block_q; i < (qb + 1) * block_q && i < T; i++) {
            int64_t f = i / (g.h * g.w), y = (i / g.w) % g.h, x = i % g.w;
            int64_t x0 = x - r.w > 0 ? x - r.w : 0, x1 = x + r.w < g.w - 1 ? x + r.w : g.w - 1;
            for (int64_t ff = f - r.f; ff <= f + r.f; ff++)
                for (int64_t yy = y - r.h; yy <= y + r.h; yy++) {
                    if (ff < 0 || ff >= g.f || yy < 0 || yy >= g.h) continue;
                    int64_t a = (ff * g.h + yy) * g.w + x0, z = (ff * g.h + yy) * g.w + x1; /* one run */
                    for (int64_t kb = a / block_k; kb <= z / block_k; kb++) mark[kb] = 1;
                }
        }
        for (int64_t kb = 0; kb < nkb; kb++)
            if (mark[kb]) {
                attn_plan_entry e = {(int32_t)kb, 0, ATTN_BLOCK_PARAMS, 0};
                en[count++] = e;
            }
        off[qb + 1] = count;
    }
    attn_status st = attn_plan_create(out, T, T, block_q, block_k, 1, off, en);
    free(mark), free(off), free(en);
    return st;
}

/* The validated problem of a neighbourhood call. */
static attn_status make_problem(attn_ctx *ctx, const attn_params *p, attn_grid g, attn_grid r,
                                const attn_plan *plan, const attn_tensor *q, const attn_tensor *k,
                                const attn_tensor *v, attn_problem *pr) {
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (!plan) return attn_err(ATTN_ERR_NULL, "plan must not be NULL");
    if (p->causal || p->plan || p->cu_seqlens_q || p->window_left != -1 || p->window_right != -1)
        return attn_err(ATTN_ERR_ARG, "params: neighbourhood attention takes scale and softcap only");
    CHECK(check_grid(g, r));
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("q", q, 4, ref, false));
    CHECK(attn_check_tensor("k", k, 4, ref, false));
    CHECK(attn_check_tensor("v", v, 4, ref, false));
    attn_params pp = *p;
    pp.plan = plan;
    CHECK(attn_check_params(&pp, q, k, v, pr));
    const int64_t T = g.f * g.h * g.w;
    if (q->shape[1] != T || k->shape[1] != T)
        return attn_err(ATTN_ERR_SHAPE, "q and k must hold grid.f * grid.h * grid.w tokens (self-attention)");
    if (plan->heads != 1) return attn_err(ATTN_ERR_ARG, "plan must come from attn_plan_neighborhood");
    pr->grid_f = g.f, pr->grid_h = g.h, pr->grid_w = g.w;
    pr->rad_f = r.f, pr->rad_h = r.h, pr->rad_w = r.w;
    return ATTN_OK;
}

attn_status attn_neighborhood_forward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                      attn_grid radius, const attn_plan *plan,
                                      const attn_tensor *q, const attn_tensor *k,
                                      const attn_tensor *v, attn_tensor *o, attn_tensor *lse) {
    attn_clear_error();
    attn_problem pr;
    CHECK(make_problem(ctx, p, grid, radius, plan, q, k, v, &pr));
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("o", o, 4, ref, false));
    CHECK(attn_check_shape("o", o, q->shape[0], q->shape[1], pr.h, pr.dv));
    const attn_tensor *ins[] = {q, k, v, lse};
    const char *names[] = {"q", "k", "v", "lse"};
    CHECK(attn_check_output("o", o, ins, names, lse ? 4 : 3));
    if (lse) {
        CHECK(attn_check_tensor("lse", lse, 3, ref, false));
        CHECK(attn_check_shape("lse", lse, q->shape[0], pr.h, q->shape[1], -1));
        CHECK(attn_check_output("lse", lse, ins, names, 3));
    }
    return mech_forward(ctx, &pr, q, k, v, o, lse);
}

attn_status attn_neighborhood_backward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                       attn_grid radius, const attn_plan *plan,
                                       const attn_tensor *q, const attn_tensor *k,
                                       const attn_tensor *v, const attn_tensor *o,
                                       const attn_tensor *lse, const attn_tensor *dout,
                                       attn_tensor *dq, attn_tensor *dk, attn_tensor *dv) {
    attn_clear_error();
    attn_problem pr;
    CHECK(make_problem(ctx, p, grid, radius, plan, q, k, v, &pr));
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    const attn_tensor *t4[] = {o, dout, dq, dk, dv};
    static const char *const n4[] = {"o", "dout", "dq", "dk", "dv"};
    const attn_tensor *like[] = {q, q, q, k, v};
    for (int x = 0; x < 5; x++) {
        CHECK(attn_check_tensor(n4[x], t4[x], 4, ref, false));
        CHECK(attn_check_shape(n4[x], t4[x], like[x]->shape[0], like[x]->shape[1], like[x]->shape[2],
                               x < 2 ? pr.dv : like[x]->shape[3]));
    }
    CHECK(attn_check_tensor("lse", lse, 3, ref, false));
    CHECK(attn_check_shape("lse", lse, q->shape[0], pr.h, q->shape[1], -1));
    const attn_tensor *all[] = {q, k, v, o, lse, dout, dq, dk, dv};
    const char *names[] = {"q", "k", "v", "o", "lse", "dout", "dq", "dk", "dv"};
    CHECK(attn_check_output("dq", dq, all, names, 6));
    CHECK(attn_check_output("dk", dk, all, names, 7));
    CHECK(attn_check_output("dv", dv, all, names, 8));
    return mech_backward(ctx, &pr, q, k, v, o, lse, dout, dq, dk, dv);
}
