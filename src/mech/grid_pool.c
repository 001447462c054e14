/* Token grids: average pooling by a ratio per axis and its adjoint, and the
 * two mechanisms made of "pool, then attend": spatial-reduction attention
 * (pooled keys and values) and pooled cross-attention (pooled queries).
 * Their backwards are attn_backward on the pooled tokens followed by the
 * pooling's adjoint, which spreads each pooled gradient over its patch. */
#include <stdlib.h>
#include <string.h>

#include "mech_run.h"
#include "validate.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

static attn_status check_grid(attn_grid g, attn_grid r, int64_t tokens, const char *name) {
    if (g.f < 1 || g.h < 1 || g.w < 1) return attn_err(ATTN_ERR_ARG, "grid extents must be >= 1");
    if (r.f < 1 || r.h < 1 || r.w < 1 || g.f % r.f || g.h % r.h || g.w % r.w)
        return attn_err(ATTN_ERR_ARG, "ratio must be >= 1 and divide the grid on each axis");
    if (g.f * g.h * g.w != tokens)
        return attn_err(ATTN_ERR_SHAPE, "%s->shape[1] (%lld) must be grid.f * grid.h * grid.w (%lld)",
                        name, (long long)tokens, (long long)(g.f * g.h * g.w));
    return ATTN_OK;
}

static int64_t pooled_tokens(attn_grid g, attn_grid r) {
    return (g.f / r.f) * (g.h / r.h) * (g.w / r.w);
}

/* Token index of grid cell (f, y, x). */
static int64_t cell(attn_grid g, int64_t f, int64_t y, int64_t x) { return (f * g.h + y) * g.w + x; }

/* out[p] = mean of x over patch p (add = 0), or dx[patch] += dout[p] / size
 * (add = 1, the adjoint). Double accumulation; any dtype and strides. */
static void pool(attn_grid g, attn_grid r, const attn_tensor *src, attn_tensor *dst, int adjoint) {
    const attn_grid pg = {g.f / r.f, g.h / r.h, g.w / r.w};
    const double inv = 1.0 / (double)(r.f * r.h * r.w);
    const attn_tensor *fine = adjoint ? dst : src;
    const int64_t B = fine->shape[0], heads = fine->shape[2], D = fine->shape[3];
    for (int64_t b = 0; b < B; b++)
        for (int64_t pf = 0; pf < pg.f; pf++)
            for (int64_t py = 0; py < pg.h; py++)
                for (int64_t px = 0; px < pg.w; px++) {
                    const int64_t pt = cell(pg, pf, py, px);
                    for (int64_t h = 0; h < heads; h++)
                        for (int64_t e = 0; e < D; e++) {
                            double acc = 0.0, gsh = 0.0;
                            if (adjoint) gsh = attn_load_f64(src, attn_off4(src, b, pt, h, e)) * inv;
                            for (int64_t df = 0; df < r.f; df++)
                                for (int64_t dy = 0; dy < r.h; dy++)
                                    for (int64_t dx = 0; dx < r.w; dx++) {
                                        int64_t t = cell(g, pf * r.f + df, py * r.h + dy, px * r.w + dx);
                                        if (adjoint) {
                                            int64_t off = attn_off4(dst, b, t, h, e);
                                            attn_store_f64(dst, off, attn_load_f64(dst, off) + gsh);
                                        } else {
                                            acc += attn_load_f64(src, attn_off4(src, b, t, h, e));
                                        }
                                    }
                            if (!adjoint) attn_store_f64(dst, attn_off4(dst, b, pt, h, e), acc * inv);
                        }
                }
}

attn_status attn_grid_pool(attn_ctx *ctx, attn_grid grid, attn_grid ratio, const attn_tensor *x,
                           attn_tensor *out) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("x", x, 4, ref, false));
    CHECK(attn_check_tensor("out", out, 4, ref, false));
    CHECK(check_grid(grid, ratio, x->shape[1], "x"));
    CHECK(attn_check_shape("out", out, x->shape[0], pooled_tokens(grid, ratio), x->shape[2],
                           x->shape[3]));
    const attn_tensor *ins[] = {x};
    const char *names[] = {"x"};
    CHECK(attn_check_output("out", out, ins, names, 1));
    pool(grid, ratio, x, out, 0);
    return ATTN_OK;
}

attn_status attn_grid_pool_backward(attn_ctx *ctx, attn_grid grid, attn_grid ratio,
                                    const attn_tensor *dout, attn_tensor *dx) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("dout", dout, 4, ref, false));
    CHECK(attn_check_tensor("dx", dx, 4, ref, false));
    CHECK(check_grid(grid, ratio, dx->shape[1], "dx"));
    CHECK(attn_check_shape("dout", dout, dx->shape[0], pooled_tokens(grid, ratio), dx->shape[2],
                           dx->shape[3]));
    const attn_tensor *ins[] = {dout};
    const char *names[] = {"dout"};
    CHECK(attn_check_output("dx", dx, ins, names, 1));
    pool(grid, ratio, dout, dx, 1);
    return ATTN_OK;
}

/* A zeroed dense buffer shaped like [d0, d1, d2, d3] for the backend: f64 on
 * the reference (the oracle stays exact), f32 on the CPU. */
static attn_tensor buffer(const attn_ctx *ctx, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
                          void **mem) {
    attn_dtype dt = ctx->backend == ATTN_BACKEND_REF ? ATTN_F64 : ATTN_F32;
    *mem = calloc((size_t)(d0 * d1 * d2 * d3) + 1, attn_dtype_size(dt));
    return attn_tensor_4d(*mem, dt, d0, d1, d2, d3);
}

/* Every element of t set to 0 (the pooling's adjoint adds into its output). */
static void zero(attn_tensor *t) {
    for (int64_t b = 0; b < t->shape[0]; b++)
        for (int64_t i = 0; i < t->shape[1]; i++)
            for (int64_t h = 0; h < t->shape[2]; h++)
                for (int64_t e = 0; e < t->shape[3]; e++) attn_store_f64(t, attn_off4(t, b, i, h, e), 0.0);
}

static attn_status check_plain(const attn_params *p) {
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (p->causal || p->plan || p->cu_seqlens_q || p->window_left != -1 || p->window_right != -1)
        return attn_err(ATTN_ERR_ARG, "params: pooled attention takes scale and softcap only");
    return ATTN_OK;
}

attn_status attn_sra_forward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                             attn_grid ratio, const attn_tensor *q, const attn_tensor *k,
                             const attn_tensor *v, attn_tensor *o, attn_tensor *lse) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    CHECK(check_plain(p));
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("k", k, 4, ref, false));
    CHECK(attn_check_tensor("v", v, 4, ref, false));
    CHECK(check_grid(grid, ratio, k->shape[1], "k"));
    const int64_t mp = pooled_tokens(grid, ratio);
    void *mk = NULL, *mv = NULL;
    attn_tensor kp = buffer(ctx, k->shape[0], mp, k->shape[2], k->shape[3], &mk);
    attn_tensor vp = buffer(ctx, v->shape[0], mp, v->shape[2], v->shape[3], &mv);
    attn_status st = mk && mv ? ATTN_OK : attn_err(ATTN_ERR_NOMEM, "out of memory pooling k/v");
    if (st == ATTN_OK) st = attn_grid_pool(ctx, grid, ratio, k, &kp);
    if (st == ATTN_OK) st = attn_grid_pool(ctx, grid, ratio, v, &vp);
    if (st == ATTN_OK) st = attn_forward(ctx, p, q, &kp, &vp, o, lse);
    free(mk), free(mv);
    return st;
}

attn_status attn_sra_backward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                              attn_grid ratio, const attn_tensor *q, const attn_tensor *k,
                              const attn_tensor *v, const attn_tensor *o, const attn_tensor *lse,
                              const attn_tensor *dout, attn_tensor *dq, attn_tensor *dk,
                              attn_tensor *dv) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    CHECK(check_plain(p));
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("k", k, 4, ref, false));
    CHECK(attn_check_tensor("v", v, 4, ref, false));
    CHECK(attn_check_tensor("dk", dk, 4, ref, false));
    CHECK(attn_check_tensor("dv", dv, 4, ref, false));
    CHECK(check_grid(grid, ratio, k->shape[1], "k"));
    CHECK(attn_check_shape("dk", dk, k->shape[0], k->shape[1], k->shape[2], k->shape[3]));
    CHECK(attn_check_shape("dv", dv, v->shape[0], v->shape[1], v->shape[2], v->shape[3]));
    /* attn_backward below sees only the pooled copies: check dk, dv here */
    const attn_tensor *ins[] = {q, k, v, o, lse, dout, dq, dk};
    static const char *const names[] = {"q", "k", "v", "o", "lse", "dout", "dq", "dk"};
    CHECK(attn_check_output("dk", dk, ins, names, 7));
    CHECK(attn_check_output("dv", dv, ins, names, 8));
    const int64_t mp = pooled_tokens(grid, ratio);
    void *m[4] = {0};
    attn_tensor kp = buffer(ctx, k->shape[0], mp, k->shape[2], k->shape[3], &m[0]);
    attn_tensor vp = buffer(ctx, v->shape[0], mp, v->shape[2], v->shape[3], &m[1]);
    attn_tensor dkp = buffer(ctx, k->shape[0], mp, k->shape[2], k->shape[3], &m[2]);
    attn_tensor dvp = buffer(ctx, v->shape[0], mp, v->shape[2], v->shape[3], &m[3]);
    attn_status st = m[0] && m[1] && m[2] && m[3] ? ATTN_OK
                                                  : attn_err(ATTN_ERR_NOMEM, "out of memory pooling k/v");
    if (st == ATTN_OK) st = attn_grid_pool(ctx, grid, ratio, k, &kp);
    if (st == ATTN_OK) st = attn_grid_pool(ctx, grid, ratio, v, &vp);
    if (st == ATTN_OK) st = attn_backward(ctx, p, q, &kp, &vp, o, lse, dout, dq, &dkp, &dvp);
    if (st == ATTN_OK) { /* dk = pool^T(dkp): zero, then the adjoint adds */
        zero(dk), zero(dv);
        st = attn_grid_pool_backward(ctx, grid, ratio, &dkp, dk);
        if (st == ATTN_OK) st = attn_grid_pool_backward(ctx, grid, ratio, &dvp, dv);
    }
    for (int x = 0; x < 4; x++) free(m[x]);
    return st;
}

attn_status attn_pooled_cross_forward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                      attn_grid ratio, const attn_tensor *q,
                                      const attn_tensor *k, const attn_tensor *v,
                                      attn_tensor *o, attn_tensor *lse) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    CHECK(check_plain(p));
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("q", q, 4, ref, false));
    CHECK(check_grid(grid, ratio, q->shape[1], "q"));
    void *mq = NULL;
    attn_tensor qp = buffer(ctx, q->shape[0], pooled_tokens(grid, ratio), q->shape[2], q->shape[3], &mq);
    attn_status st = mq ? ATTN_OK : attn_err(ATTN_ERR_NOMEM, "out of memory pooling q");
    if (st == ATTN_OK) st = attn_grid_pool(ctx, grid, ratio, q, &qp);
    if (st == ATTN_OK) st = attn_forward(ctx, p, &qp, k, v, o, lse);
    free(mq);
    return st;
}

/* The saved forward (o, lse), dout and the gradients of a pooled
 * cross-attention backward: shapes by the pooled queries (o, dout, lse) and
 * by q, k, v (dq, dk, dv); no gradient overlapping an input or another. */
static attn_status check_pooled_cross_backward(bool ref, const attn_params *p, attn_grid grid,
                                               attn_grid ratio, const attn_tensor *q,
                                               const attn_tensor *k, const attn_tensor *v,
                                               const attn_tensor *o, const attn_tensor *lse,
                                               const attn_tensor *dout, const attn_tensor *dq,
                                               const attn_tensor *dk, const attn_tensor *dv) {
    CHECK(attn_check_tensor("q", q, 4, ref, false));
    CHECK(attn_check_tensor("k", k, 4, ref, false));
    CHECK(attn_check_tensor("v", v, 4, ref, false));
    CHECK(check_grid(grid, ratio, q->shape[1], "q"));
    attn_problem pr;
    CHECK(attn_check_params(p, q, k, v, &pr));
    const int64_t B = q->shape[0], P = pooled_tokens(grid, ratio);
    CHECK(attn_check_tensor("o", o, 4, ref, false));
    CHECK(attn_check_shape("o", o, B, P, pr.h, pr.dv));
    CHECK(attn_check_tensor("lse", lse, 3, ref, false));
    if (lse->dtype != ATTN_F32 && lse->dtype != ATTN_F64)
        return attn_err(ATTN_ERR_DTYPE, "lse must be f32 (the forward's LSE)");
    CHECK(attn_check_shape("lse", lse, B, pr.h, P, -1));
    CHECK(attn_check_tensor("dout", dout, 4, ref, false));
    CHECK(attn_check_shape("dout", dout, B, P, pr.h, pr.dv));
    const attn_tensor *grads[] = {dq, dk, dv}, *like[] = {q, k, v};
    static const char *const gnames[] = {"dq", "dk", "dv"};
    const attn_tensor *all[] = {q, k, v, o, lse, dout, dq, dk, dv};
    static const char *const names[] = {"q", "k", "v", "o", "lse", "dout", "dq", "dk", "dv"};
    for (int x = 0; x < 3; x++) {
        CHECK(attn_check_tensor(gnames[x], grads[x], 4, ref, false));
        CHECK(attn_check_shape(gnames[x], grads[x], like[x]->shape[0], like[x]->shape[1],
                               like[x]->shape[2], like[x]->shape[3]));
        /* each gradient against every input and the gradients before it */
        CHECK(attn_check_output(gnames[x], grads[x], all, names, 6 + x));
    }
    return ATTN_OK;
}

attn_status attn_pooled_cross_backward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                       attn_grid ratio, const attn_tensor *q,
                                       const attn_tensor *k, const attn_tensor *v,
                                       const attn_tensor *o, const attn_tensor *lse,
                                       const attn_tensor *dout, attn_tensor *dq,
                                       attn_tensor *dk, attn_tensor *dv) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    CHECK(check_plain(p));
    CHECK(check_pooled_cross_backward(ctx->backend == ATTN_BACKEND_REF, p, grid, ratio, q, k, v,
                                      o, lse, dout, dq, dk, dv));
    const int64_t B = q->shape[0], P = pooled_tokens(grid, ratio), H = q->shape[2],
                  D = q->shape[3];
    void *mq = NULL, *mdq = NULL;
    attn_tensor qp = buffer(ctx, B, P, H, D, &mq), dqp = buffer(ctx, B, P, H, D, &mdq);
    attn_status st = mq && mdq ? ATTN_OK : attn_err(ATTN_ERR_NOMEM, "out of memory pooling q");
    if (st == ATTN_OK) st = attn_grid_pool(ctx, grid, ratio, q, &qp);
    /* dk, dv come straight out; dq of the pooled queries goes through the adjoint */
    if (st == ATTN_OK) st = attn_backward(ctx, p, &qp, k, v, o, lse, dout, &dqp, dk, dv);
    if (st == ATTN_OK) { /* dq = pool^T(dqp): the adjoint adds, so dq starts at zero */
        zero(dq);
        st = attn_grid_pool_backward(ctx, grid, ratio, &dqp, dq);
    }
    free(mq), free(mdq);
    return st;
}
