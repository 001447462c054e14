/* CATANet's content-aware token aggregation as a composition: tokens grouped
 * by their nearest centre, reordered group by group, attention within each
 * group as a variable-length batch (one sequence per group), and
 * cross-attention from every token to the groups' mean keys and values. A
 * mean's logit gets + ln(group size) through one extra key dimension holding
 * ln(size) against a query dimension holding 1 / scale. */
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

attn_status attn_catanet_forward(attn_ctx *ctx, const attn_params *p, const attn_tensor *feats,
                                 const attn_tensor *centres, const attn_tensor *q,
                                 const attn_tensor *k, const attn_tensor *v, attn_tensor *o_intra,
                                 attn_tensor *o_inter, int64_t *group_out) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (p->causal || p->plan || p->cu_seqlens_q || p->window_left != -1 || p->window_right != -1 ||
        p->softcap != 0.0f) /* a cap would bend the ln(size) term too */
        return attn_err(ATTN_ERR_ARG, "params: CATANet takes a scale only");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("feats", feats, 4, true, false));
    CHECK(attn_check_tensor("centres", centres, 4, true, false));
    CHECK(attn_check_tensor("q", q, 4, ref, false));
    CHECK(attn_check_tensor("k", k, 4, ref, false));
    CHECK(attn_check_tensor("v", v, 4, ref, false));
    CHECK(attn_check_tensor("o_intra", o_intra, 4, ref, false));
    CHECK(attn_check_tensor("o_inter", o_inter, 4, ref, false));
    attn_problem pr;
    CHECK(attn_check_params(p, q, k, v, &pr));
    const int64_t N = q->shape[1], G = centres->shape[1], Df = feats->shape[3];
    if (q->shape[0] != 1 || k->shape[1] != N)
        return attn_err(ATTN_ERR_SHAPE, "CATANet takes one sequence of self-attention (q, k: [1, N, ...])");
    CHECK(attn_check_shape("feats", feats, 1, N, 1, -1));
    CHECK(attn_check_shape("centres", centres, 1, G, 1, Df));
    CHECK(attn_check_shape("o_intra", o_intra, 1, N, pr.h, pr.dv));
    CHECK(attn_check_shape("o_inter", o_inter, 1, N, pr.h, pr.dv));
    const attn_tensor *ins[] = {q, k, v, feats, centres, o_intra};
    const char *names[] = {"q", "k", "v", "feats", "centres", "o_intra"};
    CHECK(attn_check_output("o_intra", o_intra, ins, names, 5));
    CHECK(attn_check_output("o_inter", o_inter, ins, names, 6));
    if (N > INT32_MAX) return attn_err(ATTN_ERR_OVERFLOW, "N must be below 2^31");

    attn_dtype dt = ref ? ATTN_F64 : ATTN_F32;
    size_t es = attn_dtype_size(dt);
    const int64_t D = pr.d, Dv = pr.dv, H = pr.h, Hk = pr.hk;
    int64_t *grp = malloc((size_t)N * sizeof(int64_t)), *idx = malloc((size_t)N * sizeof(int64_t));
    int64_t *size = calloc((size_t)G, sizeof(int64_t));
    int32_t *cu = calloc((size_t)G + 1, sizeof(int32_t));
    /* D + 1 key dims: the last carries ln(size) against a query dim of 1 / scale */
    void *mq = calloc((size_t)(N * H * (D + 1)) + 1, es), *mk = calloc((size_t)(N * Hk * D) + 1, es);
    void *mv = calloc((size_t)(N * Hk * Dv) + 1, es), *mo = calloc((size_t)(N * H * Dv) + 1, es);
    void *mkm = calloc((size_t)(G * Hk * (D + 1)) + 1, es), *mvm = calloc((size_t)(G * Hk * Dv) + 1, es);
    void *moi = calloc((size_t)(N * H * Dv) + 1, es);
    attn_status st = ATTN_OK;
    if (!grp || !idx || !size || !cu || !mq || !mk || !mv || !mo || !mkm || !mvm || !moi)
        st = attn_err(ATTN_ERR_NOMEM, "out of memory for CATANet");
    /* 1. groups: the nearest centre */
    for (int64_t t = 0; t < N && st == ATTN_OK; t++) {
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
        grp[t] = bg;
        size[bg]++;
    }
    /* 2. group-major order (stable), and the groups as varlen sequences */
    if (st == ATTN_OK) {
        for (int64_t g = 0; g < G; g++) cu[g + 1] = cu[g] + (int32_t)size[g];
        int64_t *fill = calloc((size_t)G, sizeof(int64_t));
        if (!fill) st = attn_err(ATTN_ERR_NOMEM, "out of memory for CATANet");
        for (int64_t t = 0; t < N && st == ATTN_OK; t++) idx[cu[grp[t]] + fill[grp[t]]++] = t;
        free(fill);
    }
    attn_tensor wq = attn_tensor_4d(mq, dt, 1, N, H, D + 1), wqd = wq;
    wqd.shape[3] = D; /* the first D dims: the queries */
    attn_tensor wk = attn_tensor_4d(mk, dt, 1, N, Hk, D), wv = attn_tensor_4d(mv, dt, 1, N, Hk, Dv);
    attn_tensor wo = attn_tensor_4d(mo, dt, 1, N, H, Dv);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, q, &wqd);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, k, &wk);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, v, &wv);
    if (st == ATTN_OK) { /* 3. within groups */
        attn_params pv = *p;
        pv.batch = G;
        pv.cu_seqlens_q = pv.cu_seqlens_k = cu;
        st = attn_forward(ctx, &pv, &wqd, &wk, &wv, &wo, NULL);
    }
    /* 4. across groups: means of k (plus ln(size) in the extra dim) and v */
    int64_t live = 0;
    if (st == ATTN_OK) {
        const double inv_scale = 1.0 / (double)pr.scale;
        for (int64_t t = 0; t < N; t++)
            for (int64_t h = 0; h < H; h++) /* the query's extra dim: 1 / scale */
                attn_store_f64(&wq, attn_off4(&wq, 0, t, h, D), inv_scale);
        attn_tensor km = attn_tensor_4d(mkm, dt, 1, G, Hk, D + 1), vm = attn_tensor_4d(mvm, dt, 1, G, Hk, Dv);
        for (int64_t g = 0; g < G; g++) {
            if (!size[g]) continue; /* empty groups are left out */
            for (int64_t hh = 0; hh < Hk; hh++) {
                for (int64_t e = 0; e < D; e++) {
                    double s = 0.0;
                    for (int64_t r = cu[g]; r < cu[g + 1]; r++) s += attn_load_f64(&wk, attn_off4(&wk, 0, r, hh, e));
                    attn_store_f64(&km, attn_off4(&km, 0, live, hh, e), s / (double)size[g]);
                }
                attn_store_f64(&km, attn_off4(&km, 0, live, hh, D), log((double)size[g]));
                for (int64_t e = 0; e < Dv; e++) {
                    double s = 0.0;
                    for (int64_t r = cu[g]; r < cu[g + 1]; r++) s += attn_load_f64(&wv, attn_off4(&wv, 0, r, hh, e));
                    attn_store_f64(&vm, attn_off4(&vm, 0, live, hh, e), s / (double)size[g]);
                }
            }
            live++;
        }
        km.shape[1] = vm.shape[1] = live;
        attn_params pc = *p;
        pc.scale = pr.scale; /* the extra dim assumes this scale, not 1/sqrt(D + 1) */
        attn_tensor woi = attn_tensor_4d(moi, dt, 1, N, H, Dv);
        st = attn_forward(ctx, &pc, &wq, &km, &vm, &woi, NULL);
        /* 5. back to the original order; only now are the outputs written */
        if (st == ATTN_OK) st = attn_scatter_tokens(ctx, idx, &wo, o_intra);
        if (st == ATTN_OK) st = attn_scatter_tokens(ctx, idx, &woi, o_inter);
    }
    if (st == ATTN_OK && group_out) memcpy(group_out, grp, (size_t)N * sizeof(int64_t));
    free(grp), free(idx), free(size), free(cu), free(mq), free(mk), free(mv), free(mo);
    free(mkm), free(mvm), free(moi);
    return st;
}
