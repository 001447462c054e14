/* PAROAttention's choice of token order per head: on the CPU backend by
 * GEMM logits, on the reference in double. */
#include <stdlib.h>
#include <string.h>

#include "engine/rows.h"
#include "mech_run.h"
#include "validate.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

/* ------------------------------------------------------------ PARO */

static int by_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* The CPU path of attn_paro_choose: the six orders read the same dot
 * products, so per query head Kᵀ (of its kv head) is built once and the
 * sampled rows of all six orders (6 x samples) get their logits by GEMM in
 * blocks of PARO_BQ rows x PARO_BK keys, twice (the row maxima, then
 * 2^(s - max) summed in double into each order's key blocks through the
 * order's inverse index). Heads run in parallel; each head's choice depends
 * only on its inputs. */
enum { PARO_BQ = 64, PARO_BK = 512 };

typedef struct paro_scratch {
    float *kt, *qb, *sc;  /* [d][T], [PARO_BQ][d], [PARO_BQ][PARO_BK] */
    double *mx, *mass;    /* [PARO_BQ], [PARO_BQ][nb] */
} paro_scratch;

static void paro_logits(const attn_kernels *kr, const attn_problem *pr, int64_t rows,
                        int64_t t0, int64_t w, int64_t T, const paro_scratch *s) {
    kr->gemm(rows, w, pr->d, s->qb, pr->d, 1, s->kt + t0, T, s->sc, w, 0, NULL);
    if (pr->softcap > 0.0f)
        kr->softcap(s->sc, rows, w, w, pr->scale / pr->softcap, pr->softcap, NULL, 0);
    else
        for (int64_t x = 0; x < rows * w; x++) s->sc[x] *= pr->scale;
}

static void paro_head(const attn_kernels *kr, const attn_problem *pr, int64_t h,
                      const attn_tensor *q, const attn_tensor *k, int64_t T, int64_t block,
                      int64_t keep, int64_t samples, const int64_t *idx, const int64_t *inv,
                      const paro_scratch *s, int32_t *perm_out, const int32_t perms[6][3]) {
    const int64_t d = pr->d, nb = (T + block - 1) / block, g = pr->h / pr->hk;
    rows_load_transposed(kr, k, attn_off4(k, 0, 0, h / g, 0), k->stride[1], T, d, s->sc,
                         PARO_BQ * PARO_BK, s->kt, T); /* Kᵀ of the head's kv head */
    double conc[6] = {0, 0, 0, 0, 0, 0};
    const int64_t total = 6 * samples; /* row r: order r / samples, sample r % samples */
    for (int64_t r0 = 0; r0 < total; r0 += PARO_BQ) {
        const int64_t rows = r0 + PARO_BQ <= total ? PARO_BQ : total - r0;
        for (int64_t r = 0; r < rows; r++) {
            const int64_t pi = (r0 + r) / samples, a = (r0 + r) % samples;
            const int64_t tok = idx[pi * T + a * T / samples];
            rows_load(kr, q, attn_off4(q, 0, tok, h, 0), d, s->qb + r * d);
            s->mx[r] = -INFINITY;
        }
        for (int64_t t0 = 0; t0 < T; t0 += PARO_BK) { /* the row maxima */
            const int64_t w = t0 + PARO_BK <= T ? PARO_BK : T - t0;
            paro_logits(kr, pr, rows, t0, w, T, s);
            for (int64_t r = 0; r < rows; r++)
                for (int64_t t = 0; t < w; t++)
                    s->mx[r] = s->sc[r * w + t] > s->mx[r] ? s->sc[r * w + t] : s->mx[r];
        }
        for (int64_t x = 0; x < rows * nb; x++) s->mass[x] = 0.0;
        for (int64_t t0 = 0; t0 < T; t0 += PARO_BK) { /* masses by the order's blocks */
            const int64_t w = t0 + PARO_BK <= T ? PARO_BK : T - t0;
            paro_logits(kr, pr, rows, t0, w, T, s);
            for (int64_t r = 0; r < rows; r++) {
                const int64_t pi = (r0 + r) / samples;
                const float sub = (float)(s->mx[r] * 1.4426950408889634);
                float *sr = s->sc + r * w;
                kr->exp2_rows(sr, 1, w, w, 1.4426950408889634f, &sub);
                double *mr = s->mass + r * nb;
                for (int64_t t = 0; t < w; t++) mr[inv[pi * T + t0 + t] / block] += sr[t];
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            double *mr = s->mass + r * nb, sum = 0.0, top = 0.0;
            for (int64_t b = 0; b < nb; b++) sum += mr[b];
            qsort(mr, (size_t)nb, sizeof(double), by_desc);
            for (int64_t b = 0; b < keep; b++) top += mr[b];
            conc[(r0 + r) / samples] += top / sum;
        }
    }
    int best_perm = 0;
    for (int pi = 1; pi < 6; pi++) /* ties: the earlier order */
        if (conc[pi] > conc[best_perm] + 1e-12) best_perm = pi;
    memcpy(perm_out + 3 * h, perms[best_perm], sizeof perms[0]);
}

static attn_status paro_choose_cpu(const attn_ctx *ctx, const attn_problem *pr, attn_grid grid,
                                   const attn_tensor *q, const attn_tensor *k, int64_t block,
                                   int64_t keep, int64_t samples, int32_t *perm_out,
                                   const int32_t perms[6][3]) {
    const int64_t T = q->shape[1], d = pr->d, nb = (T + block - 1) / block;
    const int threads = ctx->threads;
    int64_t *idx = malloc((size_t)(6 * T) * sizeof(int64_t));
    int64_t *inv = malloc((size_t)(6 * T) * sizeof(int64_t));
    const size_t per = (size_t)(d * T + PARO_BQ * d + PARO_BQ * PARO_BK) + 64;
    const size_t per_d = (size_t)(PARO_BQ + PARO_BQ * nb) + 8;
    size_t stride;
    float *scr = scratch_alloc(threads, per, &stride);
    double *dscr = malloc((size_t)threads * per_d * sizeof(double));
    if (!idx || !inv || !scr || !dscr) {
        free(idx), free(inv), free(scr), free(dscr);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for PARO");
    }
    for (int pi = 0; pi < 6; pi++) {
        attn_grid_axis_index(grid, perms[pi], idx + pi * T);
        for (int64_t t = 0; t < T; t++) inv[pi * T + idx[pi * T + t]] = t;
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t h = 0; h < pr->h; h++) {
        float *base = scr + stride * (size_t)engine_thread_id();
        double *dbase = dscr + per_d * (size_t)engine_thread_id();
        paro_scratch s = {base, base + d * T, base + d * T + PARO_BQ * d, dbase, dbase + PARO_BQ};
        paro_head(ctx->kernels, pr, h, q, k, T, block, keep, samples, idx, inv, &s, perm_out,
                  perms);
    }
    free(idx), free(inv), free(scr), free(dscr);
    return ATTN_OK;
}

attn_status attn_paro_choose(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                             const attn_tensor *q, const attn_tensor *k, int64_t block,
                             int64_t keep, int64_t samples, int32_t *perm_out) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!perm_out) return attn_err(ATTN_ERR_NULL, "perm_out must not be NULL");
    CHECK(attn_check_tensor("q", q, 4, true, false));
    CHECK(attn_check_tensor("k", k, 4, true, false));
    attn_problem pr;
    CHECK(attn_check_params(p, q, k, k, &pr));
    const int64_t T = q->shape[1];
    if (q->shape[0] != 1 || k->shape[1] != T)
        return attn_err(ATTN_ERR_SHAPE, "PARO takes one sequence of self-attention on the grid");
    if (grid.f < 1 || grid.h < 1 || grid.w < 1 || grid.f * grid.h * grid.w != T)
        return attn_err(ATTN_ERR_SHAPE, "q->shape[1] must be grid.f * grid.h * grid.w");
    if (pr.causal || pr.window_left != -1 || pr.window_right != -1 || pr.plan)
        return attn_err(ATTN_ERR_ARG, "params: PARO scores full attention (scale and softcap only)");
    if (block < 1 || block > T) return attn_err(ATTN_ERR_ARG, "block must be in 1..tokens");
    const int64_t nb = (T + block - 1) / block;
    if (keep < 1 || keep > nb) return attn_err(ATTN_ERR_ARG, "keep must be in 1..(tokens / block)");
    if (samples < 1 || samples > T) return attn_err(ATTN_ERR_ARG, "samples must be in 1..tokens");
    static const int32_t perms[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
    if (ctx->backend != ATTN_BACKEND_REF)
        return paro_choose_cpu(ctx, &pr, grid, q, k, block, keep, samples, perm_out, perms);
    const int64_t g = pr.h / pr.hk;
    int64_t *idx = malloc((size_t)T * sizeof(int64_t));
    double *s = malloc((size_t)T * sizeof(double)), *mass = malloc((size_t)nb * sizeof(double));
    double *qr = malloc((size_t)pr.d * sizeof(double));
    if (!idx || !s || !mass || !qr) {
        free(idx), free(s), free(mass), free(qr);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for PARO");
    }
    for (int64_t h = 0; h < pr.h; h++) {
        double best = -1.0;
        int best_perm = 0;
        for (int pi = 0; pi < 6; pi++) {
            attn_grid_axis_index(grid, perms[pi], idx);
            double conc = 0.0;
            for (int64_t a = 0; a < samples; a++) {
                int64_t row = a * T / samples; /* position in the reordered sequence */
                for (int64_t e = 0; e < pr.d; e++) qr[e] = attn_load_f64(q, attn_off4(q, 0, idx[row], h, e));
                double mx = -INFINITY, sum = 0.0;
                for (int64_t t = 0; t < T; t++) { /* key at reordered position t */
                    double dot = 0.0;
                    for (int64_t e = 0; e < pr.d; e++) dot += qr[e] * attn_load_f64(k, attn_off4(k, 0, idx[t], h / g, e));
                    double x = (double)pr.scale * dot;
                    if (pr.softcap > 0.0f) x = (double)pr.softcap * tanh(x / (double)pr.softcap);
                    s[t] = x;
                    mx = x > mx ? x : mx;
                }
                for (int64_t b = 0; b < nb; b++) mass[b] = 0.0;
                for (int64_t t = 0; t < T; t++) {
                    double e = exp(s[t] - mx);
                    mass[t / block] += e;
                    sum += e;
                }
                qsort(mass, (size_t)nb, sizeof(double), by_desc);
                double top = 0.0;
                for (int64_t b = 0; b < keep; b++) top += mass[b];
                conc += top / sum;
            }
            if (conc > best + 1e-12) best = conc, best_perm = pi; /* ties: the earlier order */
        }
        memcpy(perm_out + 3 * h, perms[best_perm], sizeof perms[0]);
    }
    free(idx), free(s), free(mass), free(qr);
    return ATTN_OK;
}
