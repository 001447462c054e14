/* Local Linear Attention (attn.h, attn_lla_forward), blockwise on the CPU.
 *
 * A task is (sequence, query head, query block). Pass 1 walks the visible
 * key blocks with the online softmax (softmax_rows, logits in log2 units)
 * and gathers, per query, sum_j p_ij [k_j, k_j k_jᵀ (upper triangle)] with
 * one GEMM per key block against X = [k | k_a k_b (a <= b)] rows, rescaled
 * by alpha through the GEMM's C scale. Then per query in double: mu, Sigma
 * = E[k kᵀ] - mu muᵀ + lambda I, a Cholesky solve for rho = Sigma^-1 (q -
 * mu). Pass 2 recomputes p and applies the weights p_ij (1 + k_j·rho_i -
 * mu_i·rho_i) to V (three GEMMs per key block: Q Kᵀ, rho Kᵀ, Ω V).
 *
 * Keys are centred first by their mean over the sequence (per kv head):
 * the softmax is unchanged (q·c is constant along a row) and so is the
 * regression (q - c, k - c), but E[k kᵀ] - mu muᵀ then cancels far less in
 * f32. Every output row is computed by one task in a fixed order, so the
 * result does not depend on the thread count. */
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

/* The call, dense copies and scratch. */
typedef struct lla_run {
    const lin_problem *pr;
    const attn_kernels *kr;
    double lambda;
    int64_t T, blk, W;   /* tokens (dim 1), block size, X width D + D(D+1)/2 */
    float *xq, *xk, *xv; /* q; k - c; v: dense [B, T, H(k), D(v)] */
    double *c;           /* key means [batch][Hk][D] */
    float *fo;           /* o, dense [B, T, H, Dv] */
    float *scratch;      /* per thread: floats_per_thread */
    int64_t floats_per_thread;
} lla_run;

/* Per-thread scratch layout (floats; the doubles at the end). */
static int64_t scratch_floats(int64_t blk, int64_t D, int64_t Dv, int64_t W) {
    return blk * D * 2 + blk * blk * 2 + D * blk + blk * W * 2 + blk * 5 + blk * Dv +
           2 * (D * D + D) + 16;
}

/* Cholesky solve of the symmetric a [D][D] (upper triangle used, in place:
 * a = Uᵀ U) against r, into r. Right-looking, so that the updates are
 * contiguous row axpys the compiler vectorises (no reductions). Pivots are
 * at least lambda in exact arithmetic (the smallest eigenvalue of Sigma);
 * clamping them there absorbs rounding. */
static void chol_solve(double *a, double *r, int64_t D, double lambda) {
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

/* Kt [D][ldk] = the key block's rows (k - c), transposed; X [nk][W] = [k |
 * pairs] when X is not NULL. */
static void pack_keys(const float *k, int64_t ld, int64_t nk, int64_t D, int64_t W, float *kt,
                      int64_t ldk, float *X) {
    for (int64_t j = 0; j < nk; j++) {
        const float *kj = k + j * ld;
        for (int64_t e = 0; e < D; e++) kt[e * ldk + j] = kj[e];
        if (!X) continue;
        float *xr = X + j * W, *pp = xr + D;
        memcpy(xr, kj, (size_t)D * sizeof(float));
        for (int64_t a = 0; a < D; a++) {
            const float ka = kj[a];
            for (int64_t b = a; b < D; b++) pp[b - a] = ka * kj[b];
            pp += D - a;
        }
    }
}

/* Logits S [nq][ld] = Qs Ktᵀ, then -inf where the key is after the query. */
static void logits(const lla_run *r, const float *qs, const float *kt, int64_t nq, int64_t nk,
                   int64_t i0, int64_t j0, float *S) {
    const int64_t D = r->pr->d, ld = r->blk;
    r->kr->gemm(nq, nk, D, qs, D, 1, kt, ld, S, ld, 0, NULL);
    if (!r->pr->causal || j0 + nk - 1 <= i0) return;
    for (int64_t x = 0; x < nq; x++)
        for (int64_t j = 0; j < nk; j++)
            if (j0 + j > i0 + x) S[x * ld + j] = -INFINITY;
}

static void task(const lla_run *r, int64_t b, int64_t h, int64_t qb, float *sc) {
    const lin_problem *pr = r->pr;
    const lin_seq s = lin_problem_seq(pr, b);
    const int64_t D = pr->d, Dv = pr->dv, H = pr->h, Hk = pr->hk, g = h / (H / Hk), T = r->T;
    const int64_t blk = r->blk, W = r->W;
    const int64_t i0 = qb * blk, nq = s.n - i0 < blk ? s.n - i0 : blk;
    const int64_t kend = pr->causal ? i0 + nq : s.n;
    float *qs = sc, *S = qs + blk * D, *R = S + blk * blk, *kt = R + blk * blk;
    float *X = kt + D * blk, *acc = X + blk * W, *m = acc + blk * W, *l = m + blk;
    float *alpha = l + blk, *cmu = alpha + blk, *rho = cmu + blk * 2, *oacc = rho + blk * D;
    double *sig = (double *)(((uintptr_t)(oacc + blk * Dv) + 15) & ~(uintptr_t)15), *rv = sig + D * D;
    const float *krow = r->xk + ((s.tb * T + s.t0) * Hk + g) * D; /* key j at krow + j * Hk * D */
    const float *vrow = r->xv + ((s.tb * T + s.t0) * Hk + g) * Dv;
    const double *c = r->c + (b * Hk + g) * D;
    const float mul = pr->scale * 1.4426950408889634f;
    for (int64_t x = 0; x < nq; x++) {
        const float *qi = r->xq + ((s.tb * T + s.t0 + i0 + x) * H + h) * D;
        for (int64_t e = 0; e < D; e++) qs[x * D + e] = qi[e] * mul;
        m[x] = -INFINITY, l[x] = 0.0f;
    }
    memset(acc, 0, (size_t)(nq * W) * sizeof(float));
    /* pass 1: online softmax and the weighted moments of the keys */
    for (int64_t j0 = 0; j0 < kend; j0 += blk) {
        const int64_t nk = kend - j0 < blk ? kend - j0 : blk;
        pack_keys(krow + j0 * Hk * D, Hk * D, nk, D, W, kt, blk, X);
        logits(r, qs, kt, nq, nk, i0, j0, S);
        r->kr->softmax_rows(S, nq, nk, blk, m, l, alpha);
        r->kr->gemm(nq, W, nk, S, blk, 1, X, W, acc, W, 0, alpha);
    }
    /* per query: mu, Sigma, rho (double) */
    for (int64_t x = 0; x < nq; x++) {
        const double inv = 1.0 / l[x];
        const float *ax = acc + x * W, *qi = r->xq + ((s.tb * T + s.t0 + i0 + x) * H + h) * D;
        const float *pp = ax + D;
        for (int64_t a = 0; a < D; a++)
            for (int64_t e = a; e < D; e++) {
                double v = *pp++ * inv - (ax[a] * inv) * (ax[e] * inv);
                sig[a * D + e] = v + (a == e ? r->lambda : 0.0);
            }
        for (int64_t a = 0; a < D; a++) rv[a] = ((double)qi[a] - c[a]) - ax[a] * inv;
        chol_solve(sig, rv, D, r->lambda);
        double mr = 0.0;
        for (int64_t a = 0; a < D; a++) mr += ax[a] * inv * rv[a], rho[x * D + a] = (float)rv[a];
        cmu[x] = (float)(1.0 - mr);
    }
    /* pass 2: o = sum_j p_ij (1 + k_j·rho_i - mu_i·rho_i) v_j / l_i */
    memset(oacc, 0, (size_t)(nq * Dv) * sizeof(float));
    for (int64_t j0 = 0; j0 < kend; j0 += blk) {
        const int64_t nk = kend - j0 < blk ? kend - j0 : blk;
        pack_keys(krow + j0 * Hk * D, Hk * D, nk, D, W, kt, blk, NULL);
        logits(r, qs, kt, nq, nk, i0, j0, S);
        r->kr->exp2_rows(S, nq, nk, blk, 1.0f, m);
        r->kr->gemm(nq, nk, D, rho, D, 1, kt, blk, R, blk, 0, NULL);
        for (int64_t x = 0; x < nq; x++)
            for (int64_t j = 0; j < nk; j++) S[x * blk + j] *= cmu[x] + R[x * blk + j];
        r->kr->gemm(nq, Dv, nk, S, blk, 1, vrow + j0 * Hk * Dv, Hk * Dv, oacc, Dv, 1, NULL);
    }
    for (int64_t x = 0; x < nq; x++) {
        float *ox = r->fo + ((s.tb * T + s.t0 + i0 + x) * H + h) * Dv;
        const float inv = 1.0f / l[x];
        for (int64_t e = 0; e < Dv; e++) ox[e] = oacc[x * Dv + e] * inv;
    }
}

/* Key means per (sequence, kv head) in double, and xk -= c. */
static void centre_keys(lla_run *r) {
    const lin_problem *pr = r->pr;
    const int64_t D = pr->d, Hk = pr->hk, T = r->T;
    for (int64_t b = 0; b < pr->batch; b++) {
        const lin_seq s = lin_problem_seq(pr, b);
        for (int64_t g = 0; g < Hk; g++) {
            double *c = r->c + (b * Hk + g) * D;
            for (int64_t e = 0; e < D; e++) c[e] = 0.0;
            for (int64_t t = 0; t < s.n; t++)
                for (int64_t e = 0; e < D; e++) c[e] += r->xk[((s.tb * T + s.t0 + t) * Hk + g) * D + e];
            for (int64_t e = 0; e < D; e++) c[e] = s.n ? c[e] / (double)s.n : 0.0;
            for (int64_t t = 0; t < s.n; t++)
                for (int64_t e = 0; e < D; e++) {
                    float *x = &r->xk[((s.tb * T + s.t0 + t) * Hk + g) * D + e];
                    *x = (float)(*x - c[e]);
                }
        }
    }
}

static void lla_free(lla_run *r) {
    free(r->xq), free(r->xk), free(r->xv), free(r->c), free(r->fo), free(r->scratch);
}

attn_status attn_lla_forward(attn_ctx *ctx, const attn_linear_params *p, float lambda,
                             const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                             attn_tensor *o) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    lin_problem pr;
    CHECK(lin_check_inputs(ctx, p, q, k, v, &pr));
    if (p->gate != ATTN_GATE_NONE)
        return attn_err(ATTN_ERR_ARG, "params->gate must be NONE for attn_lla_forward");
    if (!(lambda > 0.0f) || !isfinite(lambda))
        return attn_err(ATTN_ERR_ARG, "lambda is %g; it must be finite and > 0", (double)lambda);
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    const attn_tensor *ins[] = {q, k, v};
    const char *names[] = {"q", "k", "v"};
    CHECK(attn_check_tensor("o", o, 4, ref, p->cu_seqlens != NULL));
    CHECK(attn_check_shape("o", o, q->shape[0], q->shape[1], q->shape[2], pr.dv));
    CHECK(attn_check_output("o", o, ins, names, 3));
    if (ref) return ref_lla_forward(&pr, lambda, q, k, v, o);

    const int64_t D = pr.d, Dv = pr.dv, threads = ctx->threads > 0 ? ctx->threads : 1;
    lla_run r = {&pr, ctx->kernels, lambda, q->shape[1], p->chunk > 0 ? p->chunk : LLA_DEFAULT_BLOCK,
                 D + D * (D + 1) / 2, NULL, NULL, NULL, NULL, NULL, NULL, 0};
    r.floats_per_thread = scratch_floats(r.blk, D, Dv, r.W);
    r.xq = mech_alloc(q->shape[0], q->shape[1], q->shape[2], D);
    r.xk = mech_alloc(k->shape[0], k->shape[1], k->shape[2], D);
    r.xv = mech_alloc(v->shape[0], v->shape[1], v->shape[2], Dv);
    r.fo = mech_alloc(q->shape[0], q->shape[1], q->shape[2], Dv);
    r.c = (double *)mech_alloc(pr.batch, pr.hk, D, 2);
    r.scratch = mech_alloc(threads, r.floats_per_thread, 1, 1);
    if (!r.xq || !r.xk || !r.xv || !r.fo || !r.c || !r.scratch) {
        lla_free(&r);
        return attn_err(ATTN_ERR_NOMEM, "attn_lla_forward: out of memory");
    }
    mech_dense(q, r.xq);
    mech_dense(k, r.xk);
    mech_dense(v, r.xv);
    centre_keys(&r);
    /* tasks: (sequence, head, query block), the longest rows (last blocks) first */
    int64_t nqb = 0;
    for (int64_t b = 0; b < pr.batch; b++) {
        const lin_seq s = lin_problem_seq(&pr, b);
        const int64_t n = (s.n + r.blk - 1) / r.blk;
        nqb = n > nqb ? n : nqb;
    }
    const int64_t ntask = nqb * pr.batch * pr.h;
#pragma omp parallel for num_threads((int)threads) schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; t++) {
        const int64_t qb = nqb - 1 - t / (pr.batch * pr.h), rest = t % (pr.batch * pr.h);
        const int64_t b = rest / pr.h, h = rest % pr.h;
        if (qb * r.blk >= lin_problem_seq(&pr, b).n) continue;
        task(&r, b, h, qb, r.scratch + omp_get_thread_num() * r.floats_per_thread);
    }
    mech_store_dense(o, r.fo);
    lla_free(&r);
    return ATTN_OK;
}
