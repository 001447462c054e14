/* Reference of Local Linear Attention (attn.h, attn_lla_forward), in
 * double, one query at a time from the definition: softmax weights s_ij,
 * mu_i, Sigma_i = sum_j s_ij (k_j - mu_i)(k_j - mu_i)ᵀ + lambda I, rho_i by
 * Gaussian elimination with partial pivoting, o_i = sum_j s_ij (1 + (k_j -
 * mu_i)·rho_i) v_j. */
#include <math.h>
#include <stdlib.h>

#include "linear/linear.h"
#include "mech/mech.h"

/* Solves a [n][n] x = r in place (r becomes x); a is destroyed. */
static void gauss_solve(double *a, double *r, int64_t n) {
    for (int64_t c = 0; c < n; c++) {
        int64_t piv = c;
        for (int64_t i = c + 1; i < n; i++)
            if (fabs(a[i * n + c]) > fabs(a[piv * n + c])) piv = i;
        if (piv != c) {
            for (int64_t x = 0; x < n; x++) {
                double t = a[c * n + x];
                a[c * n + x] = a[piv * n + x], a[piv * n + x] = t;
            }
            double t = r[c];
            r[c] = r[piv], r[piv] = t;
        }
        for (int64_t i = c + 1; i < n; i++) {
            double f = a[i * n + c] / a[c * n + c];
            for (int64_t x = c; x < n; x++) a[i * n + x] -= f * a[c * n + x];
            r[i] -= f * r[c];
        }
    }
    for (int64_t i = n - 1; i >= 0; i--) {
        double s = r[i];
        for (int64_t x = i + 1; x < n; x++) s -= a[i * n + x] * r[x];
        r[i] = s / a[i * n + i];
    }
}

attn_status ref_lla_forward(const lin_problem *pr, double lambda, const attn_tensor *q,
                            const attn_tensor *k, const attn_tensor *v, attn_tensor *o) {
    const int64_t T = q->shape[1], H = pr->h, Hk = pr->hk, D = pr->d, Dv = pr->dv;
    const int64_t nout = q->shape[0] * T * H * Dv;
    double *out = calloc((size_t)nout, sizeof(double));
    double *sc = malloc((size_t)(T > 0 ? T : 1) * sizeof(double));
    double *mu = malloc((size_t)(3 * D + D * D) * sizeof(double));
    if (!out || !sc || !mu) {
        free(out), free(sc), free(mu);
        return attn_err(ATTN_ERR_NOMEM, "LLA reference: out of memory");
    }
    double *rho = mu + D, *kd = rho + D, *sig = kd + D;
    for (int64_t b = 0; b < pr->batch; b++) {
        const lin_seq s = lin_problem_seq(pr, b);
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / Hk);
            for (int64_t i = 0; i < s.n; i++) {
                const int64_t nj = pr->causal ? i + 1 : s.n;
                double mx = -INFINITY, sum = 0.0;
                for (int64_t j = 0; j < nj; j++) {
                    double a = 0.0;
                    for (int64_t e = 0; e < D; e++)
                        a += attn_load_f64(q, attn_off4(q, s.tb, s.t0 + i, h, e)) *
                             attn_load_f64(k, attn_off4(k, s.tb, s.t0 + j, g, e));
                    sc[j] = a * pr->scale;
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                for (int64_t j = 0; j < nj; j++) sum += sc[j] = exp(sc[j] - mx);
                for (int64_t j = 0; j < nj; j++) sc[j] /= sum;
                for (int64_t e = 0; e < D; e++) mu[e] = 0.0;
                for (int64_t j = 0; j < nj; j++)
                    for (int64_t e = 0; e < D; e++)
                        mu[e] += sc[j] * attn_load_f64(k, attn_off4(k, s.tb, s.t0 + j, g, e));
                for (int64_t x = 0; x < D * D; x++) sig[x] = x % (D + 1) == 0 ? lambda : 0.0;
                for (int64_t j = 0; j < nj; j++) {
                    for (int64_t e = 0; e < D; e++)
                        kd[e] = attn_load_f64(k, attn_off4(k, s.tb, s.t0 + j, g, e)) - mu[e];
                    for (int64_t a = 0; a < D; a++)
                        for (int64_t e = 0; e < D; e++) sig[a * D + e] += sc[j] * kd[a] * kd[e];
                }
                for (int64_t e = 0; e < D; e++)
                    rho[e] = attn_load_f64(q, attn_off4(q, s.tb, s.t0 + i, h, e)) - mu[e];
                gauss_solve(sig, rho, D);
                double *oi = out + ((s.tb * T + s.t0 + i) * H + h) * Dv;
                for (int64_t j = 0; j < nj; j++) {
                    double wgt = 1.0;
                    for (int64_t e = 0; e < D; e++)
                        wgt += (attn_load_f64(k, attn_off4(k, s.tb, s.t0 + j, g, e)) - mu[e]) * rho[e];
                    wgt *= sc[j];
                    for (int64_t e = 0; e < Dv; e++)
                        oi[e] += wgt * attn_load_f64(v, attn_off4(v, s.tb, s.t0 + j, g, e));
                }
            }
        }
    }
    for (int64_t b = 0; b < q->shape[0]; b++)
        for (int64_t t = 0; t < T; t++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t e = 0; e < Dv; e++)
                    attn_store_f64(o, attn_off4(o, b, t, h, e), out[((b * T + t) * H + h) * Dv + e]);
    free(out), free(sc), free(mu);
    return ATTN_OK;
}
