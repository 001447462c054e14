/* CATANet's content-aware token aggregation as a composition: tokens grouped
 * by their nearest centre, reordered group by group, attention within each
 * group as a variable-length batch (one sequence per group), and
 * cross-attention from every token to the groups' mean keys and values. A
 * mean's logit gets + ln(group size) through one extra key dimension holding
 * ln(size) against a query dimension holding 1 / scale.
 *
 * The backward runs the same composition backwards: the groups recomputed
 * from feats and centres (the same function as the forward's, so the same
 * groups), attn_backward on the varlen intra batch and on the inter branch
 * (the extra dimension's gradients dropped: ln(size) and 1 / scale are
 * constants), each mean's key/value gradient spread over its members (1 /
 * size each), and the sums scattered back to the original token order. The
 * grouping is a discrete choice held fixed: no gradient reaches feats or
 * centres. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mech_run.h"
#include "validate.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

/* The grouping of one call. Group g holds rows cu[g] .. cu[g + 1] - 1 of the
 * group-major order, in which row r is token idx[r]. */
typedef struct groups {
    int64_t n, count;
    int64_t *of;   /* [n]: each token's group */
    int64_t *size; /* [count] */
    int64_t *idx;  /* [n] */
    int32_t *cu;   /* [count + 1] */
} groups;

static void groups_free(groups *gr) {
    free(gr->of), free(gr->size), free(gr->idx), free(gr->cu);
}

/* The centre nearest to token t (L2; ties to the lower g). */
static int64_t nearest_centre(const attn_tensor *feats, const attn_tensor *centres, int64_t t) {
    const int64_t G = centres->shape[1], Df = feats->shape[3];
    double best = INFINITY;
    int64_t bg = 0;
    for (int64_t g = 0; g < G; g++) {
        double d2 = 0.0;
        for (int64_t e = 0; e < Df; e++) {
            double x = attn_load_f64(feats, attn_off4(feats, 0, t, 0, e)) -
                       attn_load_f64(centres, attn_off4(centres, 0, g, 0, e));
            d2 += x * x;
        }
        if (d2 < best) best = d2, bg = g;
    }
    return bg;
}

/* Each token's nearest centre, then the group-major order (stable within a
 * group) and the groups as varlen sequences. */
static attn_status groups_make(const attn_tensor *feats, const attn_tensor *centres,
                               groups *gr) {
    const int64_t N = feats->shape[1], G = centres->shape[1];
    gr->n = N, gr->count = G;
    gr->of = malloc((size_t)N * sizeof(int64_t));
    gr->idx = malloc((size_t)N * sizeof(int64_t));
    gr->size = calloc((size_t)G, sizeof(int64_t));
    gr->cu = calloc((size_t)G + 1, sizeof(int32_t));
    int64_t *fill = calloc((size_t)G, sizeof(int64_t));
    if (!gr->of || !gr->idx || !gr->size || !gr->cu || !fill) {
        free(fill);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for CATANet");
    }
    for (int64_t t = 0; t < N; t++) {
        gr->of[t] = nearest_centre(feats, centres, t);
        gr->size[gr->of[t]]++;
    }
    for (int64_t g = 0; g < G; g++) gr->cu[g + 1] = gr->cu[g] + (int32_t)gr->size[g];
    for (int64_t t = 0; t < N; t++) gr->idx[gr->cu[gr->of[t]] + fill[gr->of[t]]++] = t;
    free(fill);
    return ATTN_OK;
}

/* Dense scratch tensors of one call, zeroed, freed together. */
#define SCRATCH_MAX 20
typedef struct scratch {
    attn_dtype dt; /* f64 on the reference backend (the oracle stays exact), else f32 */
    void *mem[SCRATCH_MAX];
    int used;
    bool failed;
} scratch;

static attn_tensor scratch_tensor(scratch *s, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
    const size_t count = (size_t)(d0 * d1 * d2 * d3) + 1;
    void *m = s->used < SCRATCH_MAX ? calloc(count, attn_dtype_size(s->dt)) : NULL;
    if (m) s->mem[s->used++] = m;
    else s->failed = true;
    return attn_tensor_4d(m, s->dt, d0, d1, d2, d3);
}

static void scratch_free(scratch *s) {
    for (int x = 0; x < s->used; x++) free(s->mem[x]);
}

/* An LSE [1, H, N] seen as [1, N, H, 1], so that gather/scatter move its
 * tokens like those of q. */
static attn_tensor lse_as_tokens(const attn_tensor *lse) {
    attn_tensor t = *lse;
    t.ndim = 4;
    t.shape[1] = lse->shape[2], t.shape[2] = lse->shape[1], t.shape[3] = 1;
    t.stride[1] = lse->stride[2], t.stride[2] = lse->stride[1], t.stride[3] = 1;
    return t;
}

/* The inter branch's queries: wq's last dim (D) holds 1 / scale, so that it
 * meets ln(size) in the means' extra key dim. */
static void set_inv_scale_dim(attn_tensor *wq, double scale) {
    const int64_t N = wq->shape[1], H = wq->shape[2], D = wq->shape[3] - 1;
    const double inv_scale = 1.0 / scale;
    for (int64_t t = 0; t < N; t++)
        for (int64_t h = 0; h < H; h++) attn_store_f64(wq, attn_off4(wq, 0, t, h, D), inv_scale);
}

/* km, vm rows 0 .. live - 1: the means of the non-empty groups' keys and
 * values (wk, wv in group-major order), km's extra dim ln(size). Returns
 * live; empty groups are left out. */
static int64_t group_means(const groups *gr, const attn_tensor *wk, const attn_tensor *wv,
                           attn_tensor *km, attn_tensor *vm) {
    const int64_t Hk = wk->shape[2], D = wk->shape[3], Dv = wv->shape[3];
    int64_t live = 0;
    for (int64_t g = 0; g < gr->count; g++) {
        if (!gr->size[g]) continue;
        const int32_t r0 = gr->cu[g], r1 = gr->cu[g + 1];
        for (int64_t hh = 0; hh < Hk; hh++) {
            for (int64_t e = 0; e < D; e++) {
                double s = 0.0;
                for (int64_t r = r0; r < r1; r++) s += attn_load_f64(wk, attn_off4(wk, 0, r, hh, e));
                attn_store_f64(km, attn_off4(km, 0, live, hh, e), s / (double)gr->size[g]);
            }
            attn_store_f64(km, attn_off4(km, 0, live, hh, D), log((double)gr->size[g]));
            for (int64_t e = 0; e < Dv; e++) {
                double s = 0.0;
                for (int64_t r = r0; r < r1; r++) s += attn_load_f64(wv, attn_off4(wv, 0, r, hh, e));
                attn_store_f64(vm, attn_off4(vm, 0, live, hh, e), s / (double)gr->size[g]);
            }
        }
        live++;
    }
    return live;
}

static void add_at(attn_tensor *t, int64_t off, double x) {
    attn_store_f64(t, off, attn_load_f64(t, off) + x);
}

/* The adjoint of group_means: each member row of a non-empty group gets
 * 1 / size of its mean's gradient, added to gk, gv (group-major rows). The
 * extra dim of dkm, the gradient of the constant ln(size), is dropped. */
static void group_means_backward(const groups *gr, const attn_tensor *dkm, const attn_tensor *dvm,
                                 attn_tensor *gk, attn_tensor *gv) {
    const int64_t Hk = gk->shape[2], D = gk->shape[3], Dv = gv->shape[3];
    int64_t live = 0;
    for (int64_t g = 0; g < gr->count; g++) {
        if (!gr->size[g]) continue;
        const double inv = 1.0 / (double)gr->size[g];
        for (int64_t r = gr->cu[g]; r < gr->cu[g + 1]; r++)
            for (int64_t hh = 0; hh < Hk; hh++) {
                for (int64_t e = 0; e < D; e++)
                    add_at(gk, attn_off4(gk, 0, r, hh, e),
                           inv * attn_load_f64(dkm, attn_off4(dkm, 0, live, hh, e)));
                for (int64_t e = 0; e < Dv; e++)
                    add_at(gv, attn_off4(gv, 0, r, hh, e),
                           inv * attn_load_f64(dvm, attn_off4(dvm, 0, live, hh, e)));
            }
        live++;
    }
}

/* dst += the first dst->shape[3] dims of src (same tokens and heads). */
static void add_leading_dims(attn_tensor *dst, const attn_tensor *src) {
    for (int64_t t = 0; t < dst->shape[1]; t++)
        for (int64_t h = 0; h < dst->shape[2]; h++)
            for (int64_t e = 0; e < dst->shape[3]; e++)
                add_at(dst, attn_off4(dst, 0, t, h, e), attn_load_f64(src, attn_off4(src, 0, t, h, e)));
}

/* What forward and backward share: params (a scale only), feats, centres,
 * q, k, v and the problem they describe (one sequence of self-attention). */
static attn_status check_inputs(bool ref, const attn_params *p, const attn_tensor *feats,
                                const attn_tensor *centres, const attn_tensor *q,
                                const attn_tensor *k, const attn_tensor *v, attn_problem *pr) {
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (p->causal || p->plan || p->cu_seqlens_q || p->window_left != -1 || p->window_right != -1 ||
        p->softcap != 0.0f) /* a cap would bend the ln(size) term too */
        return attn_err(ATTN_ERR_ARG, "params: CATANet takes a scale only");
    CHECK(attn_check_tensor("feats", feats, 4, true, false));
    CHECK(attn_check_tensor("centres", centres, 4, true, false));
    CHECK(attn_check_tensor("q", q, 4, ref, false));
    CHECK(attn_check_tensor("k", k, 4, ref, false));
    CHECK(attn_check_tensor("v", v, 4, ref, false));
    CHECK(attn_check_params(p, q, k, v, pr));
    const int64_t N = q->shape[1];
    if (q->shape[0] != 1 || k->shape[1] != N)
        return attn_err(ATTN_ERR_SHAPE, "CATANet takes one sequence of self-attention (q, k: [1, N, ...])");
    CHECK(attn_check_shape("feats", feats, 1, N, 1, -1));
    CHECK(attn_check_shape("centres", centres, 1, -1, 1, feats->shape[3]));
    if (N > INT32_MAX) return attn_err(ATTN_ERR_OVERFLOW, "N must be below 2^31");
    return ATTN_OK;
}

/* An LSE of one branch: f32 (f64 on the reference) [1, H, N]. */
static attn_status check_lse(const char *name, const attn_tensor *lse, bool ref,
                             const attn_problem *pr) {
    CHECK(attn_check_tensor(name, lse, 3, ref, false));
    if (lse->dtype != ATTN_F32 && lse->dtype != ATTN_F64)
        return attn_err(ATTN_ERR_DTYPE, "%s must be f32", name);
    return attn_check_shape(name, lse, 1, pr->h, pr->n, -1);
}

static attn_status check_forward_outputs(bool ref, const attn_problem *pr, const attn_tensor *q,
                                         const attn_tensor *k, const attn_tensor *v,
                                         const attn_tensor *feats, const attn_tensor *centres,
                                         const attn_tensor *o_intra, const attn_tensor *o_inter,
                                         const attn_tensor *lse_intra,
                                         const attn_tensor *lse_inter) {
    CHECK(attn_check_tensor("o_intra", o_intra, 4, ref, false));
    CHECK(attn_check_tensor("o_inter", o_inter, 4, ref, false));
    CHECK(attn_check_shape("o_intra", o_intra, 1, pr->n, pr->h, pr->dv));
    CHECK(attn_check_shape("o_inter", o_inter, 1, pr->n, pr->h, pr->dv));
    if (lse_intra) CHECK(check_lse("lse_intra", lse_intra, ref, pr));
    if (lse_inter) CHECK(check_lse("lse_inter", lse_inter, ref, pr));
    const attn_tensor *outs[] = {o_intra, o_inter, lse_intra, lse_inter};
    const attn_tensor *ins[] = {q, k, v, feats, centres, o_intra, o_inter, lse_intra, lse_inter};
    static const char *const names[] = {"q", "k", "v", "feats", "centres",
                                        "o_intra", "o_inter", "lse_intra", "lse_inter"};
    for (int x = 0; x < 4; x++) /* each output against the inputs and the outputs before it */
        if (outs[x]) CHECK(attn_check_output(names[5 + x], outs[x], ins, names, 5 + x));
    return ATTN_OK;
}

attn_status attn_catanet_forward(attn_ctx *ctx, const attn_params *p, const attn_tensor *feats,
                                 const attn_tensor *centres, const attn_tensor *q,
                                 const attn_tensor *k, const attn_tensor *v, attn_tensor *o_intra,
                                 attn_tensor *o_inter, attn_tensor *lse_intra,
                                 attn_tensor *lse_inter, int64_t *group_out) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    attn_problem pr;
    CHECK(check_inputs(ref, p, feats, centres, q, k, v, &pr));
    CHECK(check_forward_outputs(ref, &pr, q, k, v, feats, centres, o_intra, o_inter, lse_intra,
                                lse_inter));

    const int64_t N = pr.n, G = centres->shape[1], D = pr.d, Dv = pr.dv, H = pr.h, Hk = pr.hk;
    groups gr = {0};
    attn_status st = groups_make(feats, centres, &gr);
    scratch s = {.dt = ref ? ATTN_F64 : ATTN_F32};
    /* D + 1 query dims: the last carries 1 / scale against ln(size) */
    attn_tensor wq = scratch_tensor(&s, 1, N, H, D + 1), wqd = wq;
    wqd.shape[3] = D; /* the first D dims: the queries */
    attn_tensor wk = scratch_tensor(&s, 1, N, Hk, D), wv = scratch_tensor(&s, 1, N, Hk, Dv);
    attn_tensor wo = scratch_tensor(&s, 1, N, H, Dv), woi = scratch_tensor(&s, 1, N, H, Dv);
    attn_tensor km = scratch_tensor(&s, 1, G, Hk, D + 1), vm = scratch_tensor(&s, 1, G, Hk, Dv);
    attn_tensor wli = scratch_tensor(&s, 1, H, N, 1), wlx = scratch_tensor(&s, 1, H, N, 1);
    wli.ndim = wlx.ndim = 3; /* [1, H, N]: each branch's LSE in group-major order */
    if (st == ATTN_OK && s.failed) st = attn_err(ATTN_ERR_NOMEM, "out of memory for CATANet");
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, gr.idx, q, &wqd);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, gr.idx, k, &wk);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, gr.idx, v, &wv);
    if (st == ATTN_OK) { /* within groups */
        attn_params pv = *p;
        pv.batch = G;
        pv.cu_seqlens_q = pv.cu_seqlens_k = gr.cu;
        st = attn_forward(ctx, &pv, &wqd, &wk, &wv, &wo, lse_intra ? &wli : NULL);
    }
    if (st == ATTN_OK) { /* across groups: to the means, + ln(size) in the extra dim */
        set_inv_scale_dim(&wq, pr.scale);
        km.shape[1] = vm.shape[1] = group_means(&gr, &wk, &wv, &km, &vm);
        attn_params pc = *p;
        pc.scale = pr.scale; /* the extra dim assumes this scale, not 1/sqrt(D + 1) */
        st = attn_forward(ctx, &pc, &wq, &km, &vm, &woi, lse_inter ? &wlx : NULL);
    }
    /* back to the original order; only now are the outputs written */
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, gr.idx, &wo, o_intra);
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, gr.idx, &woi, o_inter);
    if (st == ATTN_OK && lse_intra) {
        attn_tensor from = lse_as_tokens(&wli), to = lse_as_tokens(lse_intra);
        st = attn_scatter_tokens(ctx, gr.idx, &from, &to);
    }
    if (st == ATTN_OK && lse_inter) {
        attn_tensor from = lse_as_tokens(&wlx), to = lse_as_tokens(lse_inter);
        st = attn_scatter_tokens(ctx, gr.idx, &from, &to);
    }
    if (st == ATTN_OK && group_out) memcpy(group_out, gr.of, (size_t)N * sizeof(int64_t));
    groups_free(&gr);
    scratch_free(&s);
    return st;
}

static attn_status check_backward_args(bool ref, const attn_problem *pr, const attn_tensor *q,
                                       const attn_tensor *k, const attn_tensor *v,
                                       const attn_tensor *feats, const attn_tensor *centres,
                                       const attn_tensor *o_intra, const attn_tensor *o_inter,
                                       const attn_tensor *lse_intra,
                                       const attn_tensor *lse_inter,
                                       const attn_tensor *dout_intra,
                                       const attn_tensor *dout_inter, const attn_tensor *dq,
                                       const attn_tensor *dk, const attn_tensor *dv) {
    const attn_tensor *per_row[] = {o_intra, o_inter, dout_intra, dout_inter};
    static const char *const row_names[] = {"o_intra", "o_inter", "dout_intra", "dout_inter"};
    for (int x = 0; x < 4; x++) {
        CHECK(attn_check_tensor(row_names[x], per_row[x], 4, ref, false));
        CHECK(attn_check_shape(row_names[x], per_row[x], 1, pr->n, pr->h, pr->dv));
    }
    CHECK(check_lse("lse_intra", lse_intra, ref, pr));
    CHECK(check_lse("lse_inter", lse_inter, ref, pr));
    const attn_tensor *grads[] = {dq, dk, dv}, *like[] = {q, k, v};
    const attn_tensor *all[] = {q, k, v, feats, centres, o_intra, o_inter, lse_intra, lse_inter,
                                dout_intra, dout_inter, dq, dk, dv};
    static const char *const names[] = {"q", "k", "v", "feats", "centres", "o_intra", "o_inter",
                                        "lse_intra", "lse_inter", "dout_intra", "dout_inter",
                                        "dq", "dk", "dv"};
    for (int x = 0; x < 3; x++) {
        CHECK(attn_check_tensor(names[11 + x], grads[x], 4, ref, false));
        CHECK(attn_check_shape(names[11 + x], grads[x], 1, like[x]->shape[1], like[x]->shape[2],
                               like[x]->shape[3]));
        /* each gradient against every input and the gradients before it */
        CHECK(attn_check_output(names[11 + x], grads[x], all, names, 11 + x));
    }
    return ATTN_OK;
}

attn_status attn_catanet_backward(attn_ctx *ctx, const attn_params *p, const attn_tensor *feats,
                                  const attn_tensor *centres, const attn_tensor *q,
                                  const attn_tensor *k, const attn_tensor *v,
                                  const attn_tensor *o_intra, const attn_tensor *o_inter,
                                  const attn_tensor *lse_intra, const attn_tensor *lse_inter,
                                  const attn_tensor *dout_intra, const attn_tensor *dout_inter,
                                  attn_tensor *dq, attn_tensor *dk, attn_tensor *dv) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    attn_problem pr;
    CHECK(check_inputs(ref, p, feats, centres, q, k, v, &pr));
    CHECK(check_backward_args(ref, &pr, q, k, v, feats, centres, o_intra, o_inter, lse_intra,
                              lse_inter, dout_intra, dout_inter, dq, dk, dv));

    const int64_t N = pr.n, G = centres->shape[1], D = pr.d, Dv = pr.dv, H = pr.h, Hk = pr.hk;
    groups gr = {0};
    attn_status st = groups_make(feats, centres, &gr);
    scratch s = {.dt = ref ? ATTN_F64 : ATTN_F32};
    /* everything in group-major order, as the forward ran it */
    attn_tensor wq = scratch_tensor(&s, 1, N, H, D + 1), wqd = wq;
    wqd.shape[3] = D;
    attn_tensor wk = scratch_tensor(&s, 1, N, Hk, D), wv = scratch_tensor(&s, 1, N, Hk, Dv);
    attn_tensor woi = scratch_tensor(&s, 1, N, H, Dv), wox = scratch_tensor(&s, 1, N, H, Dv);
    attn_tensor wdi = scratch_tensor(&s, 1, N, H, Dv), wdx = scratch_tensor(&s, 1, N, H, Dv);
    attn_tensor wli = scratch_tensor(&s, 1, H, N, 1), wlx = scratch_tensor(&s, 1, H, N, 1);
    wli.ndim = wlx.ndim = 3;
    attn_tensor km = scratch_tensor(&s, 1, G, Hk, D + 1), vm = scratch_tensor(&s, 1, G, Hk, Dv);
    attn_tensor dkm = scratch_tensor(&s, 1, G, Hk, D + 1), dvm = scratch_tensor(&s, 1, G, Hk, Dv);
    attn_tensor gq = scratch_tensor(&s, 1, N, H, D), gqx = scratch_tensor(&s, 1, N, H, D + 1);
    attn_tensor gk = scratch_tensor(&s, 1, N, Hk, D), gv = scratch_tensor(&s, 1, N, Hk, Dv);
    if (st == ATTN_OK && s.failed) st = attn_err(ATTN_ERR_NOMEM, "out of memory for CATANet");
    const attn_tensor *from[] = {q, k, v, o_intra, o_inter, dout_intra, dout_inter};
    attn_tensor *to[] = {&wqd, &wk, &wv, &woi, &wox, &wdi, &wdx};
    for (int x = 0; x < 7 && st == ATTN_OK; x++)
        st = attn_gather_tokens(ctx, gr.idx, from[x], to[x]);
    if (st == ATTN_OK) {
        attn_tensor li = lse_as_tokens(lse_intra), wliv = lse_as_tokens(&wli);
        st = attn_gather_tokens(ctx, gr.idx, &li, &wliv);
    }
    if (st == ATTN_OK) {
        attn_tensor lx = lse_as_tokens(lse_inter), wlxv = lse_as_tokens(&wlx);
        st = attn_gather_tokens(ctx, gr.idx, &lx, &wlxv);
    }
    if (st == ATTN_OK) { /* within groups: gq, gk, gv start here */
        attn_params pv = *p;
        pv.batch = G;
        pv.cu_seqlens_q = pv.cu_seqlens_k = gr.cu;
        st = attn_backward(ctx, &pv, &wqd, &wk, &wv, &woi, &wli, &wdi, &gq, &gk, &gv);
    }
    if (st == ATTN_OK) { /* across groups, then the means' gradients to their members */
        set_inv_scale_dim(&wq, pr.scale);
        const int64_t live = group_means(&gr, &wk, &wv, &km, &vm);
        km.shape[1] = vm.shape[1] = dkm.shape[1] = dvm.shape[1] = live;
        attn_params pc = *p;
        pc.scale = pr.scale;
        st = attn_backward(ctx, &pc, &wq, &km, &vm, &wox, &wlx, &wdx, &gqx, &dkm, &dvm);
    }
    if (st == ATTN_OK) {
        add_leading_dims(&gq, &gqx); /* the 1 / scale dim's gradient dropped */
        group_means_backward(&gr, &dkm, &dvm, &gk, &gv);
    }
    /* back to the original order; only now are the outputs written */
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, gr.idx, &gq, dq);
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, gr.idx, &gk, dk);
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, gr.idx, &gv, dv);
    groups_free(&gr);
    scratch_free(&s);
    return st;
}
