/* Random-feature attention (attn.h, attn_rfa_forward): positive random
 * features of the softmax kernel (Performer's FAVOR+), then normalised
 * linear attention through attn_linear_attention. The projections w_i come
 * from the context's seed (splitmix64, Box-Muller), so that a seed gives the
 * same features on every backend and thread count. */
#include <math.h>
#include <stdlib.h>

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

/* w [f][d] ~ N(0, 1). */
static void draw(uint64_t seed, int64_t f, int64_t d, float *w) {
    uint64_t s = seed ^ 0x5EEDF00Dull;
    for (int64_t i = 0; i < f * d; i += 2) {
        double u1 = ((double)(splitmix(&s) >> 11) + 0.5) / 9007199254740992.0;
        double u2 = (double)(splitmix(&s) >> 11) / 9007199254740992.0;
        double r = sqrt(-2.0 * log(u1));
        w[i] = (float)(r * cos(6.283185307179586 * u2));
        if (i + 1 < f * d) w[i + 1] = (float)(r * sin(6.283185307179586 * u2));
    }
}

/* rows [rows][d] -> u [rows][f] = w x' - |x'|²/2, x' = x * d^{-1/4}. */
static void project(const float *x, int64_t rows, int64_t d, const float *w, int64_t f,
                    float *u) {
    const double c = pow((double)d, -0.25);
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

/* u -> e^{u - m} / sqrt(f), m the row's max (per_row) or the max of all. */
static void features(float *u, int64_t rows, int64_t f, int per_row) {
    float gmax = -INFINITY;
    for (int64_t x = 0; x < rows * f; x++) gmax = u[x] > gmax ? u[x] : gmax;
    const float inv = (float)(1.0 / sqrt((double)f));
    for (int64_t r = 0; r < rows; r++) {
        float *ur = u + r * f, m = gmax;
        if (per_row) {
            m = -INFINITY;
            for (int64_t i = 0; i < f; i++) m = ur[i] > m ? ur[i] : m;
        }
        for (int64_t i = 0; i < f; i++) ur[i] = expf(ur[i] - m) * inv;
    }
}

attn_status attn_rfa_forward(attn_ctx *ctx, const attn_linear_params *p, int32_t nfeat,
                             const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                             attn_tensor *o) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (nfeat < 1 || nfeat > 4096)
        return attn_err(ATTN_ERR_ARG, "features is %d; it must be in 1..4096", (int)nfeat);
    const bool ref = ctx->backend == ATTN_BACKEND_REF, varlen = p->cu_seqlens != NULL;
    CHECK(attn_check_tensor("q", q, 4, ref, varlen));
    CHECK(attn_check_tensor("k", k, 4, ref, varlen));
    const int64_t D = q->shape[3], F = nfeat;
    CHECK(attn_check_shape("k", k, -1, -1, -1, D));
    const int64_t rq = q->shape[0] * q->shape[1] * q->shape[2];
    const int64_t rk = k->shape[0] * k->shape[1] * k->shape[2];
    float *w = mech_alloc(F, D, 1, 1), *xq = mech_alloc(rq, D, 1, 1), *xk = mech_alloc(rk, D, 1, 1);
    float *fq = mech_alloc(rq, F, 1, 1), *fk = mech_alloc(rk, F, 1, 1);
    attn_status st = ATTN_OK;
    if (!w || !xq || !xk || !fq || !fk) {
        st = attn_err(ATTN_ERR_NOMEM, "attn_rfa_forward: out of memory for the features");
        goto done;
    }
    draw(ctx->seed, F, D, w);
    mech_dense(q, xq);
    mech_dense(k, xk);
    project(xq, rq, D, w, F, fq);
    project(xk, rk, D, w, F, fk);
    features(fq, rq, F, 1); /* a per-query constant cancels in the normaliser */
    features(fk, rk, F, 0); /* keys share one constant */
    attn_tensor tq = attn_tensor_4d(fq, ATTN_F32, q->shape[0], q->shape[1], q->shape[2], F);
    attn_tensor tk = attn_tensor_4d(fk, ATTN_F32, k->shape[0], k->shape[1], k->shape[2], F);
    attn_linear_params pf = *p;
    pf.scale = 1.0f;
    st = attn_linear_attention(ctx, &pf, ATTN_PHI_IDENTITY, 1, 1e-6f, &tq, &tk, v, o);
done:
    free(w), free(xq), free(xk), free(fq), free(fk);
    return st;
}
