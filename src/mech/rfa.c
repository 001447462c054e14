/* Random-feature attention (attn.h, attn_rfa_forward): positive random
 * features of the softmax kernel (Performer's FAVOR+), then normalised
 * linear attention through attn_linear_attention. The projections w_i come
 * from the context's seed (splitmix64, Box-Muller), so that a seed gives the
 * same features on every backend and thread count. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mech.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* w [f][d] ~ N(0, 1) (mech.h). */
void mech_rfa_draw(uint64_t seed, int64_t f, int64_t d, float *w) {
    uint64_t s = seed ^ 0x5EEDF00Dull;
    for (int64_t i = 0; i < f * d; i += 2) {
        double u1 = ((double)(splitmix(&s) >> 11) + 0.5) / 9007199254740992.0;
        double u2 = (double)(splitmix(&s) >> 11) / 9007199254740992.0;
        double r = sqrt(-2.0 * log(u1));
        w[i] = (float)(r * cos(6.283185307179586 * u2));
        if (i + 1 < f * d) w[i + 1] = (float)(r * sin(6.283185307179586 * u2));
    }
}

/* rows [rows][d] -> u [rows][f] = w x' - |x'|²/2, x' = x * d^{-1/4}. The
 * reference backend sums in double; the CPU backend runs x (c wᵀ) as GEMMs
 * of 128 rows (the kernels' gemm, wt [d][f] = c wᵀ of scratch), in parallel. */
static void project(const attn_ctx *ctx, const float *x, int64_t rows, int64_t d, const float *w,
                    int64_t f, float *wt, float *u) {
    const double c = pow((double)d, -0.25);
    if (ctx->backend != ATTN_BACKEND_REF) {
        for (int64_t i = 0; i < f; i++)
            for (int64_t e = 0; e < d; e++) wt[e * f + i] = (float)(w[i * d + e] * c);
        const int64_t blk = 128, nblk = (rows + blk - 1) / blk;
#pragma omp parallel for num_threads(ctx->threads > 0 ? ctx->threads : 1) schedule(static)
        for (int64_t b = 0; b < nblk; b++) {
            const int64_t r0 = b * blk, nr = rows - r0 < blk ? rows - r0 : blk;
            ctx->kernels->gemm(nr, f, d, x + r0 * d, d, 1, wt, f, u + r0 * f, f, 0, NULL);
            for (int64_t r = r0; r < r0 + nr; r++) {
                double sq = 0.0;
                for (int64_t e = 0; e < d; e++) sq += (x[r * d + e] * c) * (x[r * d + e] * c);
                const float half = (float)(0.5 * sq);
                for (int64_t i = 0; i < f; i++) u[r * f + i] -= half;
            }
        }
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        double sq = 0.0;
        for (int64_t e = 0; e < d; e++) sq += (xr[e] * c) * (xr[e] * c);
        for (int64_t i = 0; i < f; i++) {
            double acc = 0.0;
            for (int64_t e = 0; e < d; e++) acc += (double)w[i * d + e] * xr[e] * c;
            u[r * f + i] = (float)(acc - 0.5 * sq);
        }
    }
}

/* u -> e^{u - m} / sqrt(f), m the row's max (per_row) or the max of all;
 * rows in parallel (each row's result depends on nothing else). The CPU
 * backend exponentiates with the kernels' exp2_rows, the reference with expf. */
static void features(const attn_ctx *ctx, float *u, int64_t rows, int64_t f, int per_row) {
    float gmax = -INFINITY;
    if (!per_row)
        for (int64_t x = 0; x < rows * f; x++) gmax = u[x] > gmax ? u[x] : gmax;
    const float inv = (float)(1.0 / sqrt((double)f)), half_log2f = (float)(0.5 * log2((double)f));
    const attn_kernels *kr = ctx->backend == ATTN_BACKEND_REF ? NULL : ctx->kernels;
#pragma omp parallel for num_threads(ctx->threads > 0 ? ctx->threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *ur = u + r * f, m = gmax;
        if (per_row) {
            m = -INFINITY;
            for (int64_t i = 0; i < f; i++) m = ur[i] > m ? ur[i] : m;
        }
        if (kr) {
            for (int64_t i = 0; i < f; i++) ur[i] -= m;
            kr->exp2_rows(ur, 1, f, f, 1.4426950408889634f, &half_log2f);
        } else {
            for (int64_t i = 0; i < f; i++) ur[i] = expf(ur[i] - m) * inv;
        }
    }
}

/* The features of q and k and what the backward needs to go through them. */
typedef struct rfa_in {
    int64_t D, F, rq, rk;
    float *w, *xq, *xk, *fq, *fk; /* w [F][D]; raw q, k [rows][D]; φ(q), φ(k) [rows][F] */
    float *wt;                    /* scratch of project: [D][F] */
    attn_tensor tq, tk;
} rfa_in;

static void rfa_free(rfa_in *m) {
    free(m->w), free(m->xq), free(m->xk), free(m->fq), free(m->fk), free(m->wt);
}

static attn_status prepare(const attn_ctx *ctx, const attn_linear_params *p, int32_t nfeat,
                           const attn_tensor *q, const attn_tensor *k, rfa_in *m) {
    memset(m, 0, sizeof *m);
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (nfeat < 1 || nfeat > 4096)
        return attn_err(ATTN_ERR_ARG, "features is %d; it must be in 1..4096", (int)nfeat);
    const bool ref = ctx->backend == ATTN_BACKEND_REF, varlen = p->cu_seqlens != NULL;
    CHECK(attn_check_tensor("q", q, 4, ref, varlen));
    CHECK(attn_check_tensor("k", k, 4, ref, varlen));
    const int64_t D = q->shape[3], F = nfeat;
    CHECK(attn_check_shape("k", k, -1, -1, -1, D));
    m->D = D, m->F = F;
    m->rq = q->shape[0] * q->shape[1] * q->shape[2];
    m->rk = k->shape[0] * k->shape[1] * k->shape[2];
    m->w = mech_alloc(F, D, 1, 1), m->wt = mech_alloc(F, D, 1, 1), m->xq = mech_alloc(m->rq, D, 1, 1);
    m->xk = mech_alloc(m->rk, D, 1, 1);
    m->fq = mech_alloc(m->rq, F, 1, 1), m->fk = mech_alloc(m->rk, F, 1, 1);
    if (!m->w || !m->wt || !m->xq || !m->xk || !m->fq || !m->fk) {
        rfa_free(m);
        return attn_err(ATTN_ERR_NOMEM, "random-feature attention: out of memory for the features");
    }
    mech_rfa_draw(ctx->seed, F, D, m->w);
    mech_dense(q, m->xq);
    mech_dense(k, m->xk);
    project(ctx, m->xq, m->rq, D, m->w, F, m->wt, m->fq);
    project(ctx, m->xk, m->rk, D, m->w, F, m->wt, m->fk);
    features(ctx, m->fq, m->rq, F, 1); /* a per-query constant cancels in the normaliser */
    features(ctx, m->fk, m->rk, F, 0); /* keys share one constant */
    m->tq = attn_tensor_4d(m->fq, ATTN_F32, q->shape[0], q->shape[1], q->shape[2], F);
    m->tk = attn_tensor_4d(m->fk, ATTN_F32, k->shape[0], k->shape[1], k->shape[2], F);
    return ATTN_OK;
}

attn_status attn_rfa_forward(attn_ctx *ctx, const attn_linear_params *p, int32_t nfeat,
                             const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                             attn_tensor *o) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    rfa_in m;
    CHECK(prepare(ctx, p, nfeat, q, k, &m));
    attn_linear_params pf = *p;
    pf.scale = 1.0f;
    attn_status st = attn_linear_attention(ctx, &pf, ATTN_PHI_IDENTITY, 1, 1e-6f, &m.tq, &m.tk, v, o);
    rfa_free(&m);
    return st;
}

/* dx [rows][D] from dφ [rows][F]: φ_i = e^{w_i·x' - |x'|²/2 - m} / sqrt(F),
 * x' = c x, so dx = c (Wᵀ (dφ ⊙ φ) - x' Σ_i dφ_i φ_i); the shift m is a
 * constant that cancels in the normaliser (up to eps) and gets no gradient.
 * acc: D doubles of scratch. */
static void through_features(const rfa_in *m, const float *x, const float *phi, const float *dphi,
                             int64_t rows, double *acc, float *dx) {
    const int64_t D = m->D, F = m->F;
    const double c = pow((double)D, -0.25);
    for (int64_t r = 0; r < rows; r++) {
        double tot = 0.0;
        for (int64_t e = 0; e < D; e++) acc[e] = 0.0;
        for (int64_t i = 0; i < F; i++) {
            const double g = (double)dphi[r * F + i] * phi[r * F + i];
            tot += g;
            for (int64_t e = 0; e < D; e++) acc[e] += g * m->w[i * D + e];
        }
        for (int64_t e = 0; e < D; e++) dx[r * D + e] = (float)(c * (acc[e] - c * x[r * D + e] * tot));
    }
}

attn_status attn_rfa_backward(attn_ctx *ctx, const attn_linear_params *p, int32_t nfeat,
                              const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                              const attn_tensor *dout, attn_tensor *dq, attn_tensor *dk,
                              attn_tensor *dv) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    rfa_in m;
    CHECK(prepare(ctx, p, nfeat, q, k, &m));
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    const attn_tensor *all[] = {q, k, v, dout, dq, dk, dv};
    const char *names[] = {"q", "k", "v", "dout", "dq", "dk", "dv"};
    attn_tensor *const grads[] = {dq, dk};
    attn_status st = mech_check_grads(ref, 2, grads, all, names + 4, 2, all, names, 4);
    if (st == ATTN_OK && dv) st = attn_check_output("dv", dv, all, names, 6);
    float *dfq = mech_alloc(m.rq, m.F, 1, 1), *dfk = mech_alloc(m.rk, m.F, 1, 1);
    float *oq = mech_alloc(m.rq, m.D, 1, 1), *ok = mech_alloc(m.rk, m.D, 1, 1);
    double *acc = malloc((size_t)m.D * sizeof(double));
    if (st == ATTN_OK && (!dfq || !dfk || !oq || !ok || !acc))
        st = attn_err(ATTN_ERR_NOMEM, "attn_rfa_backward: out of memory");
    if (st == ATTN_OK) {
        attn_tensor tdq = m.tq, tdk = m.tk;
        tdq.data = dfq;
        tdk.data = dfk;
        attn_linear_params pf = *p;
        pf.scale = 1.0f;
        st = attn_linear_attention_backward(ctx, &pf, ATTN_PHI_IDENTITY, 1, 1e-6f, &m.tq, &m.tk, v,
                                            dout, &tdq, &tdk, dv);
    }
    if (st == ATTN_OK) {
        through_features(&m, m.xq, m.fq, dfq, m.rq, acc, oq);
        through_features(&m, m.xk, m.fk, dfk, m.rk, acc, ok);
        mech_store_dense(dq, oq);
        mech_store_dense(dk, ok);
    }
    free(dfq), free(dfk), free(oq), free(ok), free(acc);
    rfa_free(&m);
    return st;
}
