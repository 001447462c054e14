/* Reference of WERSA (attn.h, attn_wersa_forward), in double: the Haar
 * filter by its definition (box means c_l of the 2^l tokens ending at t,
 * details c_{l-1} - c_l, weighted), the positive random features of rfa.c
 * (the same draw, the same max shifts: per query row, one for all keys),
 * then the normalised linear attention as a quadratic form. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "linear/linear.h"
#include "mech/mech.h"

/* x~ of token t (dense f64 rows x + s * ld, s in [0, n)) into out[D]. */
static void filtered(const double *x, int64_t ld, int64_t D, int64_t t, int32_t L,
                     const double *w, double *out, double *c_prev, double *c) {
    for (int64_t e = 0; e < D; e++) c_prev[e] = x[t * ld + e], out[e] = 0.0;
    for (int32_t l = 1; l <= L; l++) {
        const int64_t width = (int64_t)1 << l;
        for (int64_t e = 0; e < D; e++) c[e] = 0.0;
        for (int64_t s = t; s >= 0 && s > t - width; s--)
            for (int64_t e = 0; e < D; e++) c[e] += x[s * ld + e];
        for (int64_t e = 0; e < D; e++) {
            c[e] /= (double)width;
            out[e] += w[l - 1] * (c_prev[e] - c[e]);
            c_prev[e] = c[e];
        }
    }
    for (int64_t e = 0; e < D; e++) out[e] += w[L] * c_prev[e];
}

/* u [F] = w x' - |x'|²/2 for x' = x D^{-1/4}. */
static void project(const float *wr, int64_t F, int64_t D, const double *x, double *u) {
    const double c = pow((double)D, -0.25);
    double sq = 0.0;
    for (int64_t e = 0; e < D; e++) sq += (x[e] * c) * (x[e] * c);
    for (int64_t i = 0; i < F; i++) {
        double acc = 0.0;
        for (int64_t e = 0; e < D; e++) acc += (double)wr[i * D + e] * x[e] * c;
        u[i] = acc - 0.5 * sq;
    }
}

/* Dense f64 copy of a 4-D tensor. */
static void dense64(const attn_tensor *t, double *dst) {
    int64_t i = 0;
    for (int64_t a = 0; a < t->shape[0]; a++)
        for (int64_t b = 0; b < t->shape[1]; b++)
            for (int64_t c = 0; c < t->shape[2]; c++)
                for (int64_t d = 0; d < t->shape[3]; d++)
                    dst[i++] = attn_load_f64(t, attn_off4(t, a, b, c, d));
}

attn_status ref_wersa_forward(const lin_problem *pr, uint64_t seed, int32_t features,
                              int32_t levels, const double *w, const attn_tensor *q,
                              const attn_tensor *k, const attn_tensor *v, attn_tensor *o) {
    const int64_t T = q->shape[1], H = pr->h, Hk = pr->hk, D = pr->d, Dv = pr->dv, F = features;
    const int64_t nq = q->shape[0] * T * H, nk = k->shape[0] * T * Hk;
    float *wr = malloc((size_t)(F * D) * sizeof(float));
    double *xq = malloc((size_t)(nq * D) * sizeof(double)), *xk = malloc((size_t)(nk * D) * sizeof(double));
    double *fk = malloc((size_t)(nk * F) * sizeof(double)), *out = calloc((size_t)(nq * Dv), sizeof(double));
    double *tmp = malloc((size_t)(3 * D + F) * sizeof(double)), *num = malloc((size_t)Dv * sizeof(double));
    if (!wr || !xq || !xk || !fk || !out || !tmp || !num) {
        free(wr), free(xq), free(xk), free(fk), free(out), free(tmp), free(num);
        return attn_err(ATTN_ERR_NOMEM, "WERSA reference: out of memory");
    }
    mech_rfa_draw(seed, F, D, wr);
    dense64(q, xq);
    dense64(k, xk);
    double *xf = tmp, *cp = tmp + D, *cc = tmp + 2 * D, *u = tmp + 3 * D;
    /* key features; their shift is the max over every key row */
    double kmax = -INFINITY;
    for (int64_t b = 0; b < pr->batch; b++) {
        const lin_seq s = lin_problem_seq(pr, b);
        for (int64_t g = 0; g < Hk; g++)
            for (int64_t t = 0; t < s.n; t++) {
                const int64_t row = (s.tb * T + s.t0 + t) * Hk + g;
                filtered(xk + ((s.tb * T + s.t0) * Hk + g) * D, Hk * D, D, t, levels, w, xf, cp, cc);
                project(wr, F, D, xf, fk + row * F);
                for (int64_t i = 0; i < F; i++) kmax = fk[row * F + i] > kmax ? fk[row * F + i] : kmax;
            }
    }
    const double inv = 1.0 / sqrt((double)F);
    for (int64_t x = 0; x < nk * F; x++) fk[x] = exp(fk[x] - kmax) * inv;
    for (int64_t b = 0; b < pr->batch; b++) {
        const lin_seq s = lin_problem_seq(pr, b);
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / Hk);
            for (int64_t t = 0; t < s.n; t++) {
                filtered(xq + ((s.tb * T + s.t0) * H + h) * D, H * D, D, t, levels, w, xf, cp, cc);
                project(wr, F, D, xf, u);
                double qmax = -INFINITY;
                for (int64_t i = 0; i < F; i++) qmax = u[i] > qmax ? u[i] : qmax;
                for (int64_t i = 0; i < F; i++) u[i] = exp(u[i] - qmax) * inv;
                double den = 0.0;
                for (int64_t e = 0; e < Dv; e++) num[e] = 0.0;
                for (int64_t j = 0; j < (pr->causal ? t + 1 : s.n); j++) {
                    const int64_t row = (s.tb * T + s.t0 + j) * Hk + g;
                    double a = 0.0;
                    for (int64_t i = 0; i < F; i++) a += u[i] * fk[row * F + i];
                    den += a;
                    for (int64_t e = 0; e < Dv; e++)
                        num[e] += a * attn_load_f64(v, attn_off4(v, s.tb, s.t0 + j, g, e));
                }
                for (int64_t e = 0; e < Dv; e++)
                    out[((s.tb * T + s.t0 + t) * H + h) * Dv + e] = num[e] / (den + 1e-6);
            }
        }
    }
    for (int64_t b = 0; b < q->shape[0]; b++)
        for (int64_t t = 0; t < T; t++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t e = 0; e < Dv; e++)
                    attn_store_f64(o, attn_off4(o, b, t, h, e), out[((b * T + t) * H + h) * Dv + e]);
    free(wr), free(xq), free(xk), free(fk), free(out), free(tmp), free(num);
    return ATTN_OK;
}
