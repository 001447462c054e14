/* WERSA (attn.h, attn_wersa_forward): q and k through a multi-resolution
 * Haar filter along the tokens, then random-feature attention on the
 * filtered q~, k~ (rfa.c: the same seed, the same features).
 *
 * The filter is a sum of causal box averages: with c_l the mean of the 2^l
 * tokens ending at t (zeros before the sequence), d_l = c_{l-1} - c_l and
 *   x~ = sum_{l=1}^{L} w[l-1] d_l + w[L] c_L = sum_{l=0}^{L} a_l c_l,
 *   a_0 = w[0], a_l = w[l] - w[l-1],
 * so one pass per sequence and head keeps a running window sum per level
 * (double). The backward runs the same pass the other way (the adjoint of
 * a causal box is the anti-causal box) and sums dL/da_l = sum dx~ · c_l. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "linear/linear.h"
#include "mech.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

enum { WERSA_MAX_LEVELS = 20 };

/* The validated call and the filtered q, k. */
typedef struct wersa_in {
    lin_problem pr;
    int L;
    double a[WERSA_MAX_LEVELS + 1]; /* coefficient of c_l */
    int64_t T, rq, rk;              /* tokens (dim 1); rows of q and k */
    const float *xq, *xk;           /* raw q, k [B, T, H(k), D] dense: the caller's
                                       (contiguous f32) or cq, ck */
    float *cq, *ck, *fq, *fk;       /* copies of q, k when needed; filtered q, k */
    attn_tensor tq, tk;             /* views of fq, fk */
    double *acc, *da;               /* per thread (L + 1) x D; per (sequence, head) L + 1 */
} wersa_in;

static void wersa_free(wersa_in *m) {
    free(m->cq), free(m->ck), free(m->fq), free(m->fk), free(m->acc), free(m->da);
}

/* One sequence of one head: rows x + t * ld (D floats), t in [0, n).
 * Forward (reverse 0): window sums of the 2^l tokens ending at t; reverse 1:
 * of the 2^l tokens starting at t (the adjoint). y (when not NULL) gets
 * sum_l a_l 2^-l sum; da (when not NULL) gets sum_t dy_t · 2^-l sum_l(t)
 * (da[0]: dy · x). acc: (L + 1) x D doubles of scratch. */
static void haar_seq(const float *x, int64_t n, int64_t ld, int64_t D, int L, const double *a,
                     int reverse, float *y, const float *dy, double *da, double *acc) {
    double b[WERSA_MAX_LEVELS + 1]; /* a_l 2^-l */
    for (int l = 0; l <= L; l++) b[l] = ldexp(a[l], -l);
    double *v = acc + (int64_t)L * D;
    memset(acc, 0, (size_t)L * (size_t)D * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = reverse ? n - 1 - i : i;
        const float *xt = x + t * ld;
        for (int l = 1; l <= L; l++) {
            const int64_t w = (int64_t)1 << l, out = reverse ? t + w : t - w;
            double *s = acc + (int64_t)(l - 1) * D;
            if (out >= 0 && out < n) {
                const float *xo = x + out * ld;
                for (int64_t e = 0; e < D; e++) s[e] += (double)xt[e] - (double)xo[e];
            } else {
                for (int64_t e = 0; e < D; e++) s[e] += (double)xt[e];
            }
        }
        if (y) {
            for (int64_t e = 0; e < D; e++) v[e] = b[0] * xt[e];
            for (int l = 1; l <= L; l++) {
                const double *s = acc + (int64_t)(l - 1) * D;
                for (int64_t e = 0; e < D; e++) v[e] += b[l] * s[e];
            }
            for (int64_t e = 0; e < D; e++) y[t * ld + e] = (float)v[e];
        }
        if (da) {
            const float *g = dy + t * ld;
            for (int64_t e = 0; e < D; e++) da[0] += (double)g[e] * xt[e];
            for (int l = 1; l <= L; l++) {
                const double *s = acc + (int64_t)(l - 1) * D;
                double sum = 0.0;
                for (int64_t e = 0; e < D; e++) sum += (double)g[e] * s[e];
                da[l] += ldexp(sum, -l);
            }
        }
    }
}

static int threads_of(const attn_ctx *ctx) { return ctx->threads > 0 ? ctx->threads : 1; }

/* haar_seq over every (sequence, head) of a dense [B, T, heads, D] array,
 * in parallel. da: (batch * heads) x (L + 1) partial sums, or NULL. */
static void haar_all(const attn_ctx *ctx, const wersa_in *m, const float *x, int64_t heads,
                     int reverse, float *y, const float *dy, double *da) {
    const lin_problem *pr = &m->pr;
    const int64_t D = pr->d, tasks = pr->batch * heads, L = m->L;
    double *acc = m->acc;
#pragma omp parallel for num_threads(threads_of(ctx)) schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        const lin_seq s = lin_problem_seq(pr, task / heads);
        const int64_t h = task % heads, off = ((s.tb * m->T + s.t0) * heads + h) * D;
        double *mine = acc + (int64_t)omp_get_thread_num() * (L + 1) * D;
        double *dat = da ? da + task * (L + 1) : NULL;
        if (dat) memset(dat, 0, (size_t)(L + 1) * sizeof(double));
        haar_seq(x + off, s.n, heads * D, D, m->L, m->a, reverse, y ? y + off : NULL,
                 dy ? dy + off : NULL, dat, mine);
    }
}

static attn_status prepare(const attn_ctx *ctx, const attn_linear_params *p, int32_t nfeat,
                           int32_t levels, const attn_tensor *weights, const attn_tensor *q,
                           const attn_tensor *k, const attn_tensor *v, wersa_in *m) {
    memset(m, 0, sizeof *m);
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (nfeat < 1 || nfeat > 4096)
        return attn_err(ATTN_ERR_ARG, "features is %d; it must be in 1..4096", (int)nfeat);
    if (levels < 0 || levels > WERSA_MAX_LEVELS)
        return attn_err(ATTN_ERR_ARG, "levels is %d; it must be in 0..%d", (int)levels,
                        WERSA_MAX_LEVELS);
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(lin_check_inputs(ctx, p, q, k, v, &m->pr));
    if (p->gate != ATTN_GATE_NONE)
        return attn_err(ATTN_ERR_ARG, "params->gate must be NONE for WERSA");
    if (!weights) return attn_err(ATTN_ERR_NULL, "weights must not be NULL");
    CHECK(mech_check_1d("weights", weights, ref, (int64_t)levels + 1));
    double w[WERSA_MAX_LEVELS + 1];
    for (int l = 0; l <= levels; l++) {
        w[l] = attn_load_f64(weights, l * weights->stride[0]);
        if (!isfinite(w[l]))
            return attn_err(ATTN_ERR_ARG, "weights[%d] is not finite", l);
    }
    m->L = levels;
    m->a[0] = w[0];
    for (int l = 1; l <= levels; l++) m->a[l] = w[l] - w[l - 1];
    m->T = q->shape[1];
    m->rq = q->shape[0] * q->shape[1] * q->shape[2];
    m->rk = k->shape[0] * k->shape[1] * k->shape[2];
    const int64_t D = m->pr.d;
    const int64_t heads = m->pr.h > m->pr.hk ? m->pr.h : m->pr.hk;
    m->xq = mech_contiguous_f32(q), m->xk = mech_contiguous_f32(k);
    if (!m->xq) m->xq = m->cq = mech_alloc(m->rq, D, 1, 1);
    if (!m->xk) m->xk = m->ck = mech_alloc(m->rk, D, 1, 1);
    m->fq = mech_alloc(m->rq, D, 1, 1), m->fk = mech_alloc(m->rk, D, 1, 1);
    m->acc = (double *)mech_alloc(threads_of(ctx), levels + 1, D, 2); /* 2 floats a double */
    m->da = (double *)mech_alloc(m->pr.batch, heads, levels + 1, 2);
    if (!m->xq || !m->fq || !m->xk || !m->fk || !m->acc || !m->da) {
        wersa_free(m);
        return attn_err(ATTN_ERR_NOMEM, "WERSA: out of memory for the filtered q and k");
    }
    m->tq = mech_view(m->fq, q), m->tk = mech_view(m->fk, k);
    return ATTN_OK;
}

/* The filtered q and k (q, k copied first unless contiguous f32). */
static void filter_qk(const attn_ctx *ctx, const attn_tensor *q, const attn_tensor *k,
                      wersa_in *m) {
    if (m->cq) mech_dense(q, m->cq);
    if (m->ck) mech_dense(k, m->ck);
    haar_all(ctx, m, m->xq, m->pr.h, 0, m->fq, NULL, NULL);
    haar_all(ctx, m, m->xk, m->pr.hk, 0, m->fk, NULL, NULL);
}

attn_status attn_wersa_forward(attn_ctx *ctx, const attn_linear_params *p, int32_t nfeat,
                               int32_t levels, const attn_tensor *weights, const attn_tensor *q,
                               const attn_tensor *k, const attn_tensor *v, attn_tensor *o) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    wersa_in m;
    CHECK(prepare(ctx, p, nfeat, levels, weights, q, k, v, &m));
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    const attn_tensor *ins[] = {q, k, v, weights};
    const char *names[] = {"q", "k", "v", "weights"};
    attn_status st = attn_check_tensor("o", o, 4, ref, p->cu_seqlens != NULL);
    if (st == ATTN_OK) st = attn_check_shape("o", o, q->shape[0], q->shape[1], q->shape[2], m.pr.dv);
    if (st == ATTN_OK) st = attn_check_output("o", o, ins, names, 4);
    if (st == ATTN_OK && ref) {
        double w[WERSA_MAX_LEVELS + 1];
        for (int l = 0; l <= levels; l++) w[l] = attn_load_f64(weights, l * weights->stride[0]);
        st = ref_wersa_forward(&m.pr, ctx->seed, nfeat, levels, w, q, k, v, o);
    } else if (st == ATTN_OK) {
        filter_qk(ctx, q, k, &m);
        st = attn_rfa_forward(ctx, p, nfeat, &m.tq, &m.tk, v, o);
    }
    wersa_free(&m);
    return st;
}

/* dx (dense, like x) and the level sums of dL/da from dx~ (dense): the
 * anti-causal pass for dx, the causal pass on x for da (added to da_sum). */
static void through_filter(const attn_ctx *ctx, const wersa_in *m, const float *x,
                           const float *dxf, int64_t heads, float *dx, double *da_sum) {
    haar_all(ctx, m, dxf, heads, 1, dx, NULL, NULL);
    if (!da_sum) return;
    const int64_t tasks = m->pr.batch * heads, L = m->L;
    haar_all(ctx, m, x, heads, 0, NULL, dxf, m->da);
    for (int64_t t = 0; t < tasks; t++) /* in task order: no dependence on threads */
        for (int64_t l = 0; l <= L; l++) da_sum[l] += m->da[t * (L + 1) + l];
}

attn_status attn_wersa_backward(attn_ctx *ctx, const attn_linear_params *p, int32_t nfeat,
                                int32_t levels, const attn_tensor *weights, const attn_tensor *q,
                                const attn_tensor *k, const attn_tensor *v,
                                const attn_tensor *dout, attn_tensor *dq, attn_tensor *dk,
                                attn_tensor *dv, attn_tensor *dweights) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    wersa_in m;
    CHECK(prepare(ctx, p, nfeat, levels, weights, q, k, v, &m));
    const bool ref = ctx->backend == ATTN_BACKEND_REF, varlen = p->cu_seqlens != NULL;
    const attn_tensor *all[] = {q, k, v, weights, dout, dq, dk, dv, dweights};
    const char *names[] = {"q", "k", "v", "weights", "dout", "dq", "dk", "dv", "dweights"};
    attn_status st = attn_check_tensor("dout", dout, 4, ref, varlen);
    if (st == ATTN_OK)
        st = attn_check_shape("dout", dout, q->shape[0], q->shape[1], q->shape[2], m.pr.dv);
    attn_tensor *const grads[] = {dq, dk, dv};
    const attn_tensor *likes[] = {q, k, v};
    if (st == ATTN_OK) st = mech_check_grads(ref, 3, grads, likes, names + 5, 3, all, names, 5);
    if (st == ATTN_OK && dweights) {
        st = mech_check_1d("dweights", dweights, ref, (int64_t)levels + 1);
        if (st == ATTN_OK) st = attn_check_output("dweights", dweights, all, names, 8);
    }
    const int64_t D = m.pr.d;
    float *dfq = mech_alloc(m.rq, D, 1, 1), *dfk = mech_alloc(m.rk, D, 1, 1);
    float *gq = mech_alloc(m.rq, D, 1, 1), *gk = mech_alloc(m.rk, D, 1, 1);
    if (st == ATTN_OK && (!dfq || !dfk || !gq || !gk))
        st = attn_err(ATTN_ERR_NOMEM, "attn_wersa_backward: out of memory");
    if (st == ATTN_OK) {
        filter_qk(ctx, q, k, &m);
        attn_tensor tdq = mech_view(dfq, q), tdk = mech_view(dfk, k);
        st = attn_rfa_backward(ctx, p, nfeat, &m.tq, &m.tk, v, dout, &tdq, &tdk, dv);
    }
    double da[WERSA_MAX_LEVELS + 2] = {0};
    if (st == ATTN_OK) {
        through_filter(ctx, &m, m.xq, dfq, m.pr.h, gq, dweights ? da : NULL);
        through_filter(ctx, &m, m.xk, dfk, m.pr.hk, gk, dweights ? da : NULL);
        mech_store_dense(dq, gq);
        mech_store_dense(dk, gk);
        if (dweights) /* a_0 = w_0, a_l = w_l - w_{l-1}: dw_l = da_l - da_{l+1} */
            for (int l = 0; l <= levels; l++)
                attn_store_f64(dweights, l * dweights->stride[0], da[l] - (l < levels ? da[l + 1] : 0.0));
    }
    free(dfq), free(dfk), free(gq), free(gk);
    wersa_free(&m);
    return st;
}
