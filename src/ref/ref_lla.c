/* Reference of Local Linear Attention (attn.h, attn_lla_forward and
 * attn_lla_backward), in double, one query at a time from the definition:
 * softmax weights s_ij, mu_i, Sigma_i = sum_j s_ij (k_j - mu_i)(k_j -
 * mu_i)ᵀ + lambda I, rho_i by Gaussian elimination with partial pivoting,
 * o_i = sum_j s_ij (1 + (k_j - mu_i)·rho_i) v_j; the backward by the chain
 * rule through each of these, unsimplified. */
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

/* Per-query workspace and the fit of query i: weights s [nj], mu, Sigma
 * (kept in sig, its copy solved into rho), rho = Sigma^-1 (q - mu). */
typedef struct fit {
    int64_t D, nj;
    double *s, *q, *mu, *rho, *sig, *tmp, *kd;
} fit;

static double kat(const attn_tensor *k, const lin_seq *s, int64_t j, int64_t g, int64_t e) {
    return attn_load_f64(k, attn_off4(k, s->tb, s->t0 + j, g, e));
}

static void fit_query(const lin_problem *pr, double lambda, const attn_tensor *q,
                      const attn_tensor *k, const lin_seq *s, int64_t h, int64_t i, fit *f) {
    const int64_t D = pr->d, g = h / (pr->h / pr->hk), nj = pr->causal ? i + 1 : s->n;
    double mx = -INFINITY, sum = 0.0;
    f->nj = nj;
    for (int64_t e = 0; e < D; e++) f->q[e] = attn_load_f64(q, attn_off4(q, s->tb, s->t0 + i, h, e));
    for (int64_t j = 0; j < nj; j++) {
        double a = 0.0;
        for (int64_t e = 0; e < D; e++) a += f->q[e] * kat(k, s, j, g, e);
        f->s[j] = a * pr->scale;
        mx = f->s[j] > mx ? f->s[j] : mx;
    }
    for (int64_t j = 0; j < nj; j++) sum += f->s[j] = exp(f->s[j] - mx);
    for (int64_t j = 0; j < nj; j++) f->s[j] /= sum;
    for (int64_t e = 0; e < D; e++) f->mu[e] = 0.0;
    for (int64_t j = 0; j < nj; j++)
        for (int64_t e = 0; e < D; e++) f->mu[e] += f->s[j] * kat(k, s, j, g, e);
    for (int64_t x = 0; x < D * D; x++) f->sig[x] = x % (D + 1) == 0 ? lambda : 0.0;
    for (int64_t j = 0; j < nj; j++) {
        for (int64_t e = 0; e < D; e++) f->kd[e] = kat(k, s, j, g, e) - f->mu[e];
        for (int64_t a = 0; a < D; a++)
            for (int64_t e = 0; e < D; e++) f->sig[a * D + e] += f->s[j] * f->kd[a] * f->kd[e];
    }
    for (int64_t e = 0; e < D; e++) f->rho[e] = f->q[e] - f->mu[e];
    for (int64_t x = 0; x < D * D; x++) f->tmp[x] = f->sig[x];
    gauss_solve(f->tmp, f->rho, D);
}

/* (k_j - mu)·x */
static double centred_dot(const attn_tensor *k, const lin_seq *s, int64_t j, int64_t g,
                          const fit *f, const double *x) {
    double a = 0.0;
    for (int64_t e = 0; e < f->D; e++) a += (kat(k, s, j, g, e) - f->mu[e]) * x[e];
    return a;
}

static fit fit_alloc(const lin_problem *pr, int64_t T, double **block) {
    const int64_t D = pr->d;
    fit f = {D, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    *block = malloc((size_t)((T > 0 ? T : 1) + 4 * D + 2 * D * D) * sizeof(double));
    if (!*block) return f;
    f.s = *block, f.q = f.s + (T > 0 ? T : 1), f.mu = f.q + D, f.rho = f.mu + D, f.kd = f.rho + D;
    f.sig = f.kd + D, f.tmp = f.sig + D * D;
    return f;
}

/* Stores a dense f64 [B, T, heads, d] array into t. */
static void store_all(attn_tensor *t, const double *x) {
    for (int64_t b = 0; b < t->shape[0]; b++)
        for (int64_t i = 0; i < t->shape[1]; i++)
            for (int64_t h = 0; h < t->shape[2]; h++)
                for (int64_t e = 0; e < t->shape[3]; e++)
                    attn_store_f64(t, attn_off4(t, b, i, h, e),
                                   x[((b * t->shape[1] + i) * t->shape[2] + h) * t->shape[3] + e]);
}

attn_status ref_lla_forward(const lin_problem *pr, double lambda, const attn_tensor *q,
                            const attn_tensor *k, const attn_tensor *v, attn_tensor *o) {
    const int64_t T = q->shape[1], H = pr->h, Dv = pr->dv;
    double *out = calloc((size_t)(q->shape[0] * T * H * Dv), sizeof(double)), *block = NULL;
    fit f = fit_alloc(pr, T, &block);
    if (!out || !block) {
        free(out), free(block);
        return attn_err(ATTN_ERR_NOMEM, "LLA reference: out of memory");
    }
    for (int64_t b = 0; b < pr->batch; b++) {
        const lin_seq s = lin_problem_seq(pr, b);
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / pr->hk);
            for (int64_t i = 0; i < s.n; i++) {
                fit_query(pr, lambda, q, k, &s, h, i, &f);
                double *oi = out + ((s.tb * T + s.t0 + i) * H + h) * Dv;
                for (int64_t j = 0; j < f.nj; j++) {
                    const double w = f.s[j] * (1.0 + centred_dot(k, &s, j, g, &f, f.rho));
                    for (int64_t e = 0; e < Dv; e++)
                        oi[e] += w * attn_load_f64(v, attn_off4(v, s.tb, s.t0 + j, g, e));
                }
            }
        }
    }
    store_all(o, out);
    free(out), free(block);
    return ATTN_OK;
}

/* The chain rule as it comes (no simplification): with h = g·v_j,
 * c = (k_j - mu)·rho, E = sum s h, z = sum s h (k_j - mu), y = Sigma^-1 z,
 * u = (k_j - mu)·y, m = -E rho - y (the gradient reaching mu):
 *   ds_j = h (1 + c) - u c + k_j·m,  da = s (ds - sum s ds),
 *   dq += scale sum da k_j + y,
 *   dk_j += scale da q + s h rho - s (c y + u rho) + s m,  dv_j += s (1 + c) g. */
attn_status ref_lla_backward(const lin_problem *pr, double lambda, const attn_tensor *q,
                             const attn_tensor *k, const attn_tensor *v, const attn_tensor *dout,
                             attn_tensor *dq, attn_tensor *dk, attn_tensor *dv) {
    const int64_t T = q->shape[1], H = pr->h, Hk = pr->hk, D = pr->d, Dv = pr->dv;
    const int64_t B0 = q->shape[0];
    double *gq = calloc((size_t)(B0 * T * H * D), sizeof(double));
    double *gk = calloc((size_t)(B0 * T * Hk * D), sizeof(double));
    double *gv = calloc((size_t)(B0 * T * Hk * Dv), sizeof(double));
    double *ds = malloc((size_t)(T > 0 ? T : 1) * sizeof(double));
    double *vec = malloc((size_t)(3 * D + Dv) * sizeof(double)), *block = NULL;
    fit f = fit_alloc(pr, T, &block);
    if (!gq || !gk || !gv || !ds || !vec || !block) {
        free(gq), free(gk), free(gv), free(ds), free(vec), free(block);
        return attn_err(ATTN_ERR_NOMEM, "LLA reference: out of memory");
    }
    double *z = vec, *y = z + D, *m = y + D, *go = m + D;
    for (int64_t b = 0; b < pr->batch; b++) {
        const lin_seq s = lin_problem_seq(pr, b);
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / Hk);
            for (int64_t i = 0; i < s.n; i++) {
                fit_query(pr, lambda, q, k, &s, h, i, &f);
                for (int64_t e = 0; e < Dv; e++)
                    go[e] = attn_load_f64(dout, attn_off4(dout, s.tb, s.t0 + i, h, e));
                double E = 0.0, tot = 0.0;
                for (int64_t e = 0; e < D; e++) z[e] = 0.0;
                for (int64_t j = 0; j < f.nj; j++) {
                    double hj = 0.0;
                    for (int64_t e = 0; e < Dv; e++) hj += go[e] * attn_load_f64(v, attn_off4(v, s.tb, s.t0 + j, g, e));
                    ds[j] = hj; /* h, for now */
                    E += f.s[j] * hj;
                    for (int64_t e = 0; e < D; e++) z[e] += f.s[j] * hj * (kat(k, &s, j, g, e) - f.mu[e]);
                }
                for (int64_t e = 0; e < D; e++) y[e] = z[e];
                for (int64_t x = 0; x < D * D; x++) f.tmp[x] = f.sig[x];
                gauss_solve(f.tmp, y, D);
                for (int64_t e = 0; e < D; e++) m[e] = -E * f.rho[e] - y[e];
                for (int64_t j = 0; j < f.nj; j++) {
                    const double hj = ds[j], c = centred_dot(k, &s, j, g, &f, f.rho);
                    const double u = centred_dot(k, &s, j, g, &f, y);
                    double km = 0.0;
                    for (int64_t e = 0; e < D; e++) km += kat(k, &s, j, g, e) * m[e];
                    double *gkj = gk + ((s.tb * T + s.t0 + j) * Hk + g) * D;
                    double *gvj = gv + ((s.tb * T + s.t0 + j) * Hk + g) * Dv;
                    for (int64_t e = 0; e < D; e++)
                        gkj[e] += f.s[j] * (hj * f.rho[e] - (c * y[e] + u * f.rho[e]) + m[e]);
                    for (int64_t e = 0; e < Dv; e++) gvj[e] += f.s[j] * (1.0 + c) * go[e];
                    ds[j] = hj * (1.0 + c) - u * c + km;
                    tot += f.s[j] * ds[j];
                }
                double *gqi = gq + ((s.tb * T + s.t0 + i) * H + h) * D;
                for (int64_t e = 0; e < D; e++) gqi[e] += y[e];
                for (int64_t j = 0; j < f.nj; j++) {
                    const double da = f.s[j] * (ds[j] - tot) * pr->scale;
                    double *gkj = gk + ((s.tb * T + s.t0 + j) * Hk + g) * D;
                    for (int64_t e = 0; e < D; e++) {
                        gqi[e] += da * kat(k, &s, j, g, e);
                        gkj[e] += da * f.q[e];
                    }
                }
            }
        }
    }
    store_all(dq, gq);
    store_all(dk, gk);
    store_all(dv, gv);
    free(gq), free(gk), free(gv), free(ds), free(vec), free(block);
    return ATTN_OK;
}
