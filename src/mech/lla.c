/* Local Linear Attention (attn.h, attn_lla_forward, attn_lla_backward),
 * blockwise on the CPU.
 *
 * Forward: a task is (sequence, query head, query block). Pass 1 walks the
 * visible key blocks with the online softmax (softmax_rows, logits in log2
 * units) and gathers, per query, sum_j p_ij [k_j, k_j k_jᵀ (upper
 * triangle)] with one GEMM per key block against X = [k | k_a k_b (a <= b)]
 * rows, rescaled by alpha through the GEMM's C scale. Then per query in
 * double: mu, Sigma = E[k kᵀ] - mu muᵀ + lambda I, a Cholesky solve for
 * rho = Sigma^-1 (q - mu). Pass 2 recomputes p and applies the weights
 * p_ij (1 + k_j·rho_i - mu_i·rho_i) to V (three GEMMs per key block: Q Kᵀ,
 * rho Kᵀ, Ω V).
 *
 * Backward (dout g): with s the softmax, h_ij = g_i·v_j, c_ij = (k_j -
 * mu_i)·rho_i, w = s (1 + c), E_i = sum_j s h, z_i = sum_j s h (k_j - mu_i),
 * y_i = Sigma_i^-1 z_i, u_ij = (k_j - mu_i)·y_i and
 * delta_i = g_i·o_i - y_i·(q_i - mu_i) + lambda y_i·rho_i:
 *   dv_j = sum_i w g_i,   da_ij = s ((h - u)(1 + c) - E c - delta)  (logits),
 *   dq_i = scale sum_j da k_j + y_i,
 *   dk_j = sum_i scale da q_i + s (h - u - E) rho_i - w y_i.
 * A task is (sequence, kv head): the heads of its group and their query
 * blocks in order, each with pass 1 (the Cholesky factors kept), a pass for
 * E, z and g·o, the solves for y, and a pass for the gradients; dk and dv
 * rows belong to one task (no atomics, no dependence on the thread count).
 *
 * Keys are centred first on the sequence's first key (per kv head; every
 * query sees it): the softmax is unchanged (q·c is constant along a row)
 * and so is the regression (q - c, k - c), but E[k kᵀ] - mu muᵀ then
 * cancels far less in f32 when the keys share an offset; the output does
 * not depend on c, so no gradient flows through it.
 * Every output row is computed by one task in a fixed order, so the result
 * does not depend on the thread count. */
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

/* Query and key block when params->chunk is 0. Measured (n 1024 / 2048,
 * H 8, D 64, causal, 1 thread, min of 3, shared cores): block 16: 412 / -,
 * 32: 303 / 719-967, 64: 223 / 633-635, 128: - / 605-613 ms. 64 keeps the
 * per-thread moments (64 x (D + D(D+1)/2) floats, 0.5 MiB at D 64) in L2. */
enum { LLA_DEFAULT_BLOCK = 64 };

/* The call and its dense copies. */
typedef struct lla_run {
    const lin_problem *pr;
    const attn_kernels *kr;
    double lambda;
    int64_t T, blk, W;       /* tokens (dim 1), block size, X width D + D(D+1)/2 */
    float *xq, *xk, *xv;     /* q; k - c; v: dense [B, T, H(k), D(v)] */
    double *c;               /* key centres [batch][Hk][D] */
    float *fo;               /* forward: o, dense [B, T, H, Dv] */
    float *xg, *fdq, *fdk, *fdv; /* backward: dout; dq, dk, dv (dense, zeroed) */
    int bwd;
    float *scratch;          /* per thread: floats_per_thread */
    int64_t floats_per_thread;
} lla_run;

/* One query block of one head: where its rows are, and a thread's scratch. */
typedef struct lla_blk {
    int64_t i0, nq, kend;       /* queries [i0, i0 + nq) of the sequence, keys [0, kend) */
    const float *krow, *vrow;   /* key j at krow + j * Hk * D, value j at vrow + j * Hk * Dv */
    float *qs, *S, *R, *U, *Hm, *kt, *vt, *X, *acc, *m, *l, *alpha, *mr, *my, *E, *go, *dl;
    float *rho, *y, *z, *g, *dq, *oacc; /* [blk][D] (g, oacc: [blk][Dv]) */
    double *mu, *rv, *wk, *fac; /* [blk][D], [blk][D], [D], factors [blk or 1][D][D] */
} lla_blk;

/* Carves a thread's scratch into b (base NULL: only counts); returns floats. */
static int64_t carve(const lla_run *r, float *base, lla_blk *b) {
    const int64_t blk = r->blk, D = r->pr->d, Dv = r->pr->dv;
    int64_t n = 0;
    float **f[] = {&b->qs, &b->S, &b->R, &b->U, &b->Hm, &b->kt, &b->vt, &b->X, &b->acc,
                   &b->m, &b->l, &b->alpha, &b->mr, &b->my, &b->E, &b->go, &b->dl,
                   &b->rho, &b->y, &b->z, &b->g, &b->dq, &b->oacc};
    const int64_t sz[] = {blk * D, blk * blk, blk * blk, blk * blk, blk * blk, D * blk, Dv * blk,
                          blk * r->W, blk * r->W, blk, blk, blk, blk, blk, blk, blk, blk,
                          blk * D, blk * D, blk * D, blk * Dv, blk * D, blk * Dv};
    for (size_t x = 0; x < sizeof sz / sizeof sz[0]; x++) {
        if (base) *f[x] = base + n;
        n += (sz[x] + 15) & ~(int64_t)15;
    }
    n = (n + 1) & ~(int64_t)1; /* doubles from here (base is malloc-aligned) */
    double **d[] = {&b->mu, &b->rv, &b->wk, &b->fac};
    const int64_t dz[] = {blk * D, blk * D, D, (r->bwd ? blk : 1) * D * D};
    for (size_t x = 0; x < sizeof dz / sizeof dz[0]; x++) {
        if (base) *d[x] = (double *)(base + n);
        n += 2 * dz[x];
    }
    return n;
}

/* Cholesky factor of the symmetric a [D][D] (upper triangle used, in
 * place: a = Uᵀ U). Right-looking, so that the updates are contiguous row
 * axpys the compiler vectorises (no reductions). Pivots are at least lambda
 * in exact arithmetic (the smallest eigenvalue of Sigma); clamping them
 * there absorbs rounding. */
static void chol_factor(double *a, int64_t D, double lambda) {
    for (int64_t k = 0; k < D; k++) {
        double *uk = a + k * D;
        const double d = sqrt(uk[k] > lambda ? uk[k] : lambda), inv = 1.0 / d;
        uk[k] = d;
        for (int64_t j = k + 1; j < D; j++) uk[j] *= inv;
        for (int64_t i = k + 1; i < D; i++) {
            double *ai = a + i * D;
            const double u = uk[i];
            for (int64_t j = i; j < D; j++) ai[j] -= u * uk[j];
        }
    }
}

/* r = (Uᵀ U)^-1 r for the factor of chol_factor. */
static void chol_apply(const double *a, double *r, int64_t D) {
    for (int64_t k = 0; k < D; k++) { /* Uᵀ y = r */
        const double *uk = a + k * D;
        r[k] /= uk[k];
        for (int64_t j = k + 1; j < D; j++) r[j] -= r[k] * uk[j];
    }
    for (int64_t k = D - 1; k >= 0; k--) { /* U x = y */
        const double *uk = a + k * D;
        double s = r[k];
        for (int64_t j = k + 1; j < D; j++) s -= uk[j] * r[j];
        r[k] = s / uk[k];
    }
}

/* out [d][ldo] = rows [n][d] (row j at rows + j * ld) transposed; X [n][W] =
 * [row | pairs row_a row_b (a <= b)] when X is not NULL. */
static void pack_rows(const float *rows, int64_t ld, int64_t n, int64_t d, float *out, int64_t ldo,
                      float *X, int64_t W) {
    for (int64_t j = 0; j < n; j++) {
        const float *kj = rows + j * ld;
        for (int64_t e = 0; e < d; e++) out[e * ldo + j] = kj[e];
        if (!X) continue;
        float *xr = X + j * W, *pp = xr + d;
        memcpy(xr, kj, (size_t)d * sizeof(float));
        for (int64_t a = 0; a < d; a++) {
            const float ka = kj[a];
            for (int64_t c = a; c < d; c++) pp[c - a] = ka * kj[c];
            pp += d - a;
        }
    }
}

/* Keys of block [j0, j0 + nk) packed (and their pairs when X), then the
 * logits S [nq][blk] = Qs Ktᵀ with -inf where the key is after the query. */
static void logits(const lla_run *r, lla_blk *b, int64_t j0, int64_t nk, float *X) {
    const int64_t D = r->pr->d, ld = r->blk, Hk = r->pr->hk;
    pack_rows(b->krow + j0 * Hk * D, Hk * D, nk, D, b->kt, ld, X, r->W);
    r->kr->gemm(b->nq, nk, D, b->qs, D, 1, b->kt, ld, b->S, ld, 0, NULL);
    if (!r->pr->causal || j0 + nk - 1 <= b->i0) return;
    for (int64_t x = 0; x < b->nq; x++)
        for (int64_t j = 0; j < nk; j++)
            if (j0 + j > b->i0 + x) b->S[x * ld + j] = -INFINITY;
}

/* The block of query head h, sequence sb, block qb: rows, scaled queries,
 * and (backward) the rows of dout. */
static void load(const lla_run *r, lla_blk *b, int64_t sb, int64_t h, int64_t qb) {
    const lin_problem *pr = r->pr;
    const lin_seq s = lin_problem_seq(pr, sb);
    const int64_t D = pr->d, Dv = pr->dv, H = pr->h, Hk = pr->hk, g = h / (H / Hk), T = r->T;
    b->i0 = qb * r->blk;
    b->nq = s.n - b->i0 < r->blk ? s.n - b->i0 : r->blk;
    b->kend = pr->causal ? b->i0 + b->nq : s.n;
    b->krow = r->xk + ((s.tb * T + s.t0) * Hk + g) * D;
    b->vrow = r->xv + ((s.tb * T + s.t0) * Hk + g) * Dv;
    const float mul = pr->scale * 1.4426950408889634f;
    for (int64_t x = 0; x < b->nq; x++) {
        const int64_t row = (s.tb * T + s.t0 + b->i0 + x) * H + h;
        for (int64_t e = 0; e < D; e++) b->qs[x * D + e] = r->xq[row * D + e] * mul;
        if (r->bwd) memcpy(b->g + x * Dv, r->xg + row * Dv, (size_t)Dv * sizeof(float));
        b->m[x] = -INFINITY, b->l[x] = 0.0f;
    }
}

/* Pass 1 and the solve: m, l, and per query mu, the Cholesky factor of
 * Sigma (kept per query in the backward), r = q - c - mu, rho = Sigma^-1 r
 * and mr = mu·rho. */
static void moments_and_rho(const lla_run *r, lla_blk *b, int64_t sb, int64_t h) {
    const lin_problem *pr = r->pr;
    const lin_seq s = lin_problem_seq(pr, sb);
    const int64_t D = pr->d, H = pr->h, Hk = pr->hk, T = r->T, blk = r->blk, W = r->W;
    const double *c = r->c + (sb * Hk + h / (H / Hk)) * D;
    memset(b->acc, 0, (size_t)(b->nq * W) * sizeof(float));
    for (int64_t j0 = 0; j0 < b->kend; j0 += blk) {
        const int64_t nk = b->kend - j0 < blk ? b->kend - j0 : blk;
        logits(r, b, j0, nk, b->X);
        r->kr->softmax_rows(b->S, b->nq, nk, blk, b->m, b->l, b->alpha);
        r->kr->gemm(b->nq, W, nk, b->S, blk, 1, b->X, W, b->acc, W, 0, b->alpha);
    }
    for (int64_t x = 0; x < b->nq; x++) {
        const double inv = 1.0 / b->l[x];
        const float *ax = b->acc + x * W, *pp = ax + D;
        const float *qi = r->xq + ((s.tb * T + s.t0 + b->i0 + x) * H + h) * D;
        double *sig = b->fac + (r->bwd ? x * D * D : 0), *mu = b->mu + x * D, *rv = b->rv + x * D;
        for (int64_t a = 0; a < D; a++) mu[a] = ax[a] * inv;
        for (int64_t a = 0; a < D; a++)
            for (int64_t e = a; e < D; e++)
                sig[a * D + e] = *pp++ * inv - mu[a] * mu[e] + (a == e ? r->lambda : 0.0);
        chol_factor(sig, D, r->lambda);
        double *rho = b->wk, mr = 0.0;
        for (int64_t a = 0; a < D; a++) rv[a] = rho[a] = ((double)qi[a] - c[a]) - mu[a];
        chol_apply(sig, rho, D);
        for (int64_t a = 0; a < D; a++) mr += mu[a] * rho[a], b->rho[x * D + a] = (float)rho[a];
        b->mr[x] = (float)mr;
    }
}

/* S = the probabilities of key block [j0, j0 + nk) (p = 2^(logit - m));
 * divided by l (the softmax s) when normalise. */
static void probs(const lla_run *r, lla_blk *b, int64_t j0, int64_t nk, int normalise) {
    logits(r, b, j0, nk, NULL);
    r->kr->exp2_rows(b->S, b->nq, nk, r->blk, 1.0f, b->m);
    if (normalise)
        for (int64_t x = 0; x < b->nq; x++) {
            const float inv = 1.0f / b->l[x];
            for (int64_t j = 0; j < nk; j++) b->S[x * r->blk + j] *= inv;
        }
}

static void forward_task(const lla_run *r, int64_t sb, int64_t h, int64_t qb, lla_blk *b) {
    const lin_problem *pr = r->pr;
    const lin_seq s = lin_problem_seq(pr, sb);
    const int64_t Dv = pr->dv, D = pr->d, Hk = pr->hk, blk = r->blk;
    load(r, b, sb, h, qb);
    moments_and_rho(r, b, sb, h);
    /* pass 2: o = sum_j p_ij (1 - mu_i·rho_i + k_j·rho_i) v_j / l_i */
    memset(b->oacc, 0, (size_t)(b->nq * Dv) * sizeof(float));
    for (int64_t j0 = 0; j0 < b->kend; j0 += blk) {
        const int64_t nk = b->kend - j0 < blk ? b->kend - j0 : blk;
        probs(r, b, j0, nk, 0);
        r->kr->gemm(b->nq, nk, D, b->rho, D, 1, b->kt, blk, b->R, blk, 0, NULL);
        for (int64_t x = 0; x < b->nq; x++) {
            const float one = 1.0f - b->mr[x];
            for (int64_t j = 0; j < nk; j++) b->S[x * blk + j] *= one + b->R[x * blk + j];
        }
        r->kr->gemm(b->nq, Dv, nk, b->S, blk, 1, b->vrow + j0 * Hk * Dv, Hk * Dv, b->oacc, Dv, 1, NULL);
    }
    for (int64_t x = 0; x < b->nq; x++) {
        float *ox = r->fo + ((s.tb * r->T + s.t0 + b->i0 + x) * pr->h + h) * Dv;
        const float inv = 1.0f / b->l[x];
        for (int64_t e = 0; e < Dv; e++) ox[e] = b->oacc[x * Dv + e] * inv;
    }
}

/* H = G Vᵀ, R = rho Kᵀ (and U = y Kᵀ when with_u) for key block [j0, j0 + nk),
 * after probs (which packed Kᵀ). */
static void products(const lla_run *r, lla_blk *b, int64_t j0, int64_t nk, int with_u) {
    const int64_t D = r->pr->d, Dv = r->pr->dv, Hk = r->pr->hk, blk = r->blk;
    pack_rows(b->vrow + j0 * Hk * Dv, Hk * Dv, nk, Dv, b->vt, blk, NULL, 0);
    r->kr->gemm(b->nq, nk, Dv, b->g, Dv, 1, b->vt, blk, b->Hm, blk, 0, NULL);
    r->kr->gemm(b->nq, nk, D, b->rho, D, 1, b->kt, blk, b->R, blk, 0, NULL);
    if (with_u) r->kr->gemm(b->nq, nk, D, b->y, D, 1, b->kt, blk, b->U, blk, 0, NULL);
}

/* The gradients of one query block (see the top of the file). */
static void backward_block(const lla_run *r, int64_t sb, int64_t h, int64_t qb, lla_blk *b) {
    const lin_problem *pr = r->pr;
    const lin_seq s = lin_problem_seq(pr, sb);
    const int64_t D = pr->d, Dv = pr->dv, H = pr->h, Hk = pr->hk, g = h / (H / Hk);
    const int64_t T = r->T, blk = r->blk;
    const float scale = pr->scale;
    load(r, b, sb, h, qb);
    const int64_t nq = b->nq;
    moments_and_rho(r, b, sb, h);
    /* pass B: E = sum s h, z = sum s h k (mu taken off below), g·o = sum w h */
    memset(b->z, 0, (size_t)(nq * D) * sizeof(float));
    for (int64_t x = 0; x < nq; x++) b->E[x] = 0.0f, b->go[x] = 0.0f;
    for (int64_t j0 = 0; j0 < b->kend; j0 += blk) {
        const int64_t nk = b->kend - j0 < blk ? b->kend - j0 : blk;
        probs(r, b, j0, nk, 1);
        products(r, b, j0, nk, 0);
        for (int64_t x = 0; x < nq; x++) {
            float *sx = b->S + x * blk, e = 0.0f, go = 0.0f;
            const float *hx = b->Hm + x * blk, *rx = b->R + x * blk, one = 1.0f - b->mr[x];
            for (int64_t j = 0; j < nk; j++) {
                const float sh = sx[j] * hx[j];
                e += sh, go += sh * (one + rx[j]), sx[j] = sh;
            }
            b->E[x] += e, b->go[x] += go;
        }
        r->kr->gemm(nq, D, nk, b->S, blk, 1, b->krow + j0 * Hk * D, Hk * D, b->z, D, 1, NULL);
    }
    /* y = Sigma^-1 (z - E mu); delta = g·o - y·r + lambda y·rho; my = mu·y */
    for (int64_t x = 0; x < nq; x++) {
        const double *mu = b->mu + x * D, *rv = b->rv + x * D;
        double *y = b->wk, yr = 0.0, yrho = 0.0, my = 0.0;
        for (int64_t a = 0; a < D; a++) y[a] = (double)b->z[x * D + a] - b->E[x] * mu[a];
        chol_apply(b->fac + x * D * D, y, D);
        for (int64_t a = 0; a < D; a++) {
            yr += y[a] * rv[a], yrho += y[a] * b->rho[x * D + a], my += mu[a] * y[a];
            b->y[x * D + a] = (float)y[a];
        }
        b->dl[x] = (float)(b->go[x] - yr + r->lambda * yrho);
        b->my[x] = (float)my;
    }
    /* pass C: the gradients */
    memset(b->dq, 0, (size_t)(nq * D) * sizeof(float));
    float *dkrow = r->fdk + ((s.tb * T + s.t0) * Hk + g) * D;
    float *dvrow = r->fdv + ((s.tb * T + s.t0) * Hk + g) * Dv;
    const float *qrow = r->xq + ((s.tb * T + s.t0 + b->i0) * H + h) * D;
    for (int64_t j0 = 0; j0 < b->kend; j0 += blk) {
        const int64_t nk = b->kend - j0 < blk ? b->kend - j0 : blk;
        probs(r, b, j0, nk, 1);
        products(r, b, j0, nk, 1);
        for (int64_t x = 0; x < nq; x++) { /* S <- scale da, Hm <- s (h - u - E), R <- w, U <- -w */
            float *sx = b->S + x * blk, *hx = b->Hm + x * blk, *rx = b->R + x * blk, *ux = b->U + x * blk;
            const float mr = b->mr[x], my = b->my[x], E = b->E[x], dl = b->dl[x];
            for (int64_t j = 0; j < nk; j++) {
                const float sv = sx[j], c = rx[j] - mr, u = ux[j] - my, hu = hx[j] - u, w = sv * (1.0f + c);
                sx[j] = scale * sv * (hu * (1.0f + c) - E * c - dl);
                hx[j] = sv * (hu - E);
                rx[j] = w, ux[j] = -w;
            }
        }
        float *dk = dkrow + j0 * Hk * D, *dv = dvrow + j0 * Hk * Dv;
        r->kr->gemm(nk, Dv, nq, b->R, 1, blk, b->g, Dv, dv, Hk * Dv, 1, NULL);
        r->kr->gemm(nk, D, nq, b->S, 1, blk, qrow, H * D, dk, Hk * D, 1, NULL);
        r->kr->gemm(nk, D, nq, b->Hm, 1, blk, b->rho, D, dk, Hk * D, 1, NULL);
        r->kr->gemm(nk, D, nq, b->U, 1, blk, b->y, D, dk, Hk * D, 1, NULL);
        r->kr->gemm(nq, D, nk, b->S, blk, 1, b->krow + j0 * Hk * D, Hk * D, b->dq, D, 1, NULL);
    }
    for (int64_t x = 0; x < nq; x++) {
        float *dqx = r->fdq + ((s.tb * T + s.t0 + b->i0 + x) * H + h) * D;
        for (int64_t e = 0; e < D; e++) dqx[e] = b->dq[x * D + e] + b->y[x * D + e];
    }
}

/* The centre of each (sequence, kv head): its first key, which every query
 * sees (so a non-finite later key cannot reach earlier rows); xk -= c. */
static void centre_keys(lla_run *r) {
    const lin_problem *pr = r->pr;
    const int64_t D = pr->d, Hk = pr->hk, T = r->T;
    for (int64_t b = 0; b < pr->batch; b++) {
        const lin_seq s = lin_problem_seq(pr, b);
        for (int64_t g = 0; g < Hk; g++) {
            double *c = r->c + (b * Hk + g) * D;
            for (int64_t e = 0; e < D; e++) c[e] = s.n ? r->xk[((s.tb * T + s.t0) * Hk + g) * D + e] : 0.0;
            for (int64_t t = 0; t < s.n; t++)
                for (int64_t e = 0; e < D; e++) {
                    float *x = &r->xk[((s.tb * T + s.t0 + t) * Hk + g) * D + e];
                    *x = (float)(*x - c[e]);
                }
        }
    }
}

static void lla_free(lla_run *r) {
    free(r->xq), free(r->xk), free(r->xv), free(r->c), free(r->fo), free(r->xg);
    free(r->fdq), free(r->fdk), free(r->fdv), free(r->scratch);
}

/* The door of both directions: params, lambda, q, k, v (then the caller's
 * own outputs) into a problem. */
static attn_status check_inputs(const attn_ctx *ctx, const attn_linear_params *p, float lambda,
                                const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                                const char *fn, lin_problem *pr) {
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    CHECK(lin_check_inputs(ctx, p, q, k, v, pr));
    if (p->gate != ATTN_GATE_NONE)
        return attn_err(ATTN_ERR_ARG, "params->gate must be NONE for %s", fn);
    if (!(lambda > 0.0f) || !isfinite(lambda))
        return attn_err(ATTN_ERR_ARG, "lambda is %g; it must be finite and > 0", (double)lambda);
    return ATTN_OK;
}

/* Dense copies, centred keys and scratch for the CPU path. */
static attn_status setup(attn_ctx *ctx, const attn_linear_params *p, const lin_problem *pr,
                         double lambda, const attn_tensor *q, const attn_tensor *k,
                         const attn_tensor *v, const attn_tensor *dout, lla_run *r) {
    const int64_t D = pr->d, Dv = pr->dv, threads = ctx->threads > 0 ? ctx->threads : 1;
    memset(r, 0, sizeof *r);
    r->pr = pr, r->kr = ctx->kernels, r->lambda = lambda, r->T = q->shape[1];
    r->blk = p->chunk > 0 ? p->chunk : LLA_DEFAULT_BLOCK;
    r->W = D + D * (D + 1) / 2;
    r->bwd = dout != NULL;
    lla_blk none;
    r->floats_per_thread = carve(r, NULL, &none);
    r->xq = mech_alloc(q->shape[0], q->shape[1], q->shape[2], D);
    r->xk = mech_alloc(k->shape[0], k->shape[1], k->shape[2], D);
    r->xv = mech_alloc(v->shape[0], v->shape[1], v->shape[2], Dv);
    r->c = (double *)mech_alloc(pr->batch, pr->hk, D, 2);
    r->scratch = mech_alloc(threads, r->floats_per_thread, 1, 1);
    bool ok = r->xq && r->xk && r->xv && r->c && r->scratch;
    if (dout) {
        r->xg = mech_alloc(q->shape[0], q->shape[1], q->shape[2], Dv);
        r->fdq = mech_alloc(q->shape[0], q->shape[1], q->shape[2], D);
        r->fdk = mech_alloc(k->shape[0], k->shape[1], k->shape[2], D);
        r->fdv = mech_alloc(v->shape[0], v->shape[1], v->shape[2], Dv);
        ok = ok && r->xg && r->fdq && r->fdk && r->fdv;
    } else {
        r->fo = mech_alloc(q->shape[0], q->shape[1], q->shape[2], Dv);
        ok = ok && r->fo;
    }
    if (!ok) {
        lla_free(r);
        return attn_err(ATTN_ERR_NOMEM, "Local Linear Attention: out of memory");
    }
    mech_dense(q, r->xq);
    mech_dense(k, r->xk);
    mech_dense(v, r->xv);
    if (dout) {
        mech_dense(dout, r->xg);
        memset(r->fdk, 0, (size_t)(mech_numel(k) * (int64_t)sizeof(float)));
        memset(r->fdv, 0, (size_t)(mech_numel(v) * (int64_t)sizeof(float)));
    }
    centre_keys(r);
    return ATTN_OK;
}

attn_status attn_lla_forward(attn_ctx *ctx, const attn_linear_params *p, float lambda,
                             const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                             attn_tensor *o) {
    attn_clear_error();
    lin_problem pr;
    CHECK(check_inputs(ctx, p, lambda, q, k, v, "attn_lla_forward", &pr));
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    const attn_tensor *ins[] = {q, k, v};
    const char *names[] = {"q", "k", "v"};
    CHECK(attn_check_tensor("o", o, 4, ref, p->cu_seqlens != NULL));
    CHECK(attn_check_shape("o", o, q->shape[0], q->shape[1], q->shape[2], pr.dv));
    CHECK(attn_check_output("o", o, ins, names, 3));
    if (ref) return ref_lla_forward(&pr, lambda, q, k, v, o);
    lla_run r;
    CHECK(setup(ctx, p, &pr, lambda, q, k, v, NULL, &r));
    /* tasks: (sequence, head, query block), the longest rows (last blocks) first */
    int64_t nqb = 0;
    for (int64_t b = 0; b < pr.batch; b++) {
        const int64_t n = (lin_problem_seq(&pr, b).n + r.blk - 1) / r.blk;
        nqb = n > nqb ? n : nqb;
    }
    const int64_t ntask = nqb * pr.batch * pr.h;
#pragma omp parallel for num_threads(ctx->threads > 0 ? ctx->threads : 1) schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; t++) {
        const int64_t qb = nqb - 1 - t / (pr.batch * pr.h), rest = t % (pr.batch * pr.h);
        const int64_t b = rest / pr.h, h = rest % pr.h;
        if (qb * r.blk >= lin_problem_seq(&pr, b).n) continue;
        lla_blk blk;
        carve(&r, r.scratch + omp_get_thread_num() * r.floats_per_thread, &blk);
        forward_task(&r, b, h, qb, &blk);
    }
    mech_store_dense(o, r.fo);
    lla_free(&r);
    return ATTN_OK;
}

attn_status attn_lla_backward(attn_ctx *ctx, const attn_linear_params *p, float lambda,
                              const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                              const attn_tensor *dout, attn_tensor *dq, attn_tensor *dk,
                              attn_tensor *dv) {
    attn_clear_error();
    lin_problem pr;
    CHECK(check_inputs(ctx, p, lambda, q, k, v, "attn_lla_backward", &pr));
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    const attn_tensor *all[] = {q, k, v, dout, dq, dk, dv};
    const char *names[] = {"q", "k", "v", "dout", "dq", "dk", "dv"};
    CHECK(attn_check_tensor("dout", dout, 4, ref, p->cu_seqlens != NULL));
    CHECK(attn_check_shape("dout", dout, q->shape[0], q->shape[1], q->shape[2], pr.dv));
    attn_tensor *const grads[] = {dq, dk, dv};
    CHECK(mech_check_grads(ref, 3, grads, all, names + 4, 3, all, names, 4));
    if (ref) return ref_lla_backward(&pr, lambda, q, k, v, dout, dq, dk, dv);
    lla_run r;
    CHECK(setup(ctx, p, &pr, lambda, q, k, v, dout, &r));
    const int64_t ntask = pr.batch * pr.hk, group = pr.h / pr.hk;
#pragma omp parallel for num_threads(ctx->threads > 0 ? ctx->threads : 1) schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; t++) {
        const int64_t b = t / pr.hk, g = t % pr.hk, n = lin_problem_seq(&pr, b).n;
        lla_blk blk;
        carve(&r, r.scratch + omp_get_thread_num() * r.floats_per_thread, &blk);
        for (int64_t h = g * group; h < (g + 1) * group; h++)
            for (int64_t qb = 0; qb * r.blk < n; qb++) backward_block(&r, b, h, qb, &blk);
    }
    mech_store_dense(dq, r.fdq);
    mech_store_dense(dk, r.fdk);
    mech_store_dense(dv, r.fdv);
    lla_free(&r);
    return ATTN_OK;
}
