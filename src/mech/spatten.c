/* SpAtten's cascade token and head pruning: the attention probability each
 * key receives (recomputed from the saved LSE: on the CPU backend with the
 * micro-kernels, block by block; on the reference backend in double, one row
 * at a time; neither keeps an N x M buffer), the top tokens, their
 * selection, and head importance by output magnitude. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/rows.h"
#include "validate.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

/* The CPU path: per (sequence, kv head) task, Kᵀ once, then for each query
 * head of the group and block of IMP_BQ rows the logits of up to IMP_BK keys
 * at a time (a GEMM), the softcap, 2^(s log2e - lse log2e) with the keys a
 * row does not see at -inf, and the column sums, added in double to the
 * task's own row of sums; the tasks' sums go into importance in (b, kv head)
 * order, so the result does not depend on the thread count. */
enum { IMP_BQ = 64, IMP_BK = 512 };

static void importance_task(const attn_kernels *kr, const attn_problem *pr, int64_t b,
                            int64_t hk, const attn_tensor *q, const attn_tensor *k,
                            const attn_tensor *lse, float *kt, float *qb, float *sc,
                            float *sub, float *col, double *acc) {
    const int64_t n = pr->n, m = pr->m, d = pr->d, g = pr->h / pr->hk;
    const float l2e = 1.4426950408889634f;
    rows_load_transposed(kr, k, attn_off4(k, b, 0, hk, 0), k->stride[1], m, d, sc,
                         IMP_BQ * IMP_BK, kt, m); /* Kᵀ [d][m], staged through sc */
    for (int64_t j = 0; j < m; j++) acc[j] = 0.0;
    for (int64_t h = hk * g; h < (hk + 1) * g; h++)
        for (int64_t i0 = 0; i0 < n; i0 += IMP_BQ) {
            const int64_t rows = i0 + IMP_BQ <= n ? IMP_BQ : n - i0;
            int64_t lo = m, hi = -1; /* the keys some row of the block sees */
            for (int64_t r = 0; r < rows; r++) {
                const float l = (float)attn_load_f64(lse, attn_off3(lse, b, h, i0 + r));
                sub[r] = l == -INFINITY ? INFINITY : l * l2e; /* a row that sees nothing: 0 */
                int64_t a, z;
                attn_visible_range(pr, n, m, i0 + r, &a, &z);
                if (a <= z && l != -INFINITY) lo = a < lo ? a : lo, hi = z > hi ? z : hi;
            }
            if (lo > hi) continue;
            rows_load_block(kr, q, attn_off4(q, b, i0, h, 0), q->stride[1], rows, d, qb, d);
            for (int64_t j0 = lo; j0 <= hi; j0 += IMP_BK) {
                const int64_t w = j0 + IMP_BK <= hi + 1 ? IMP_BK : hi + 1 - j0;
                kr->gemm(rows, w, d, qb, d, 1, kt + j0, m, sc, w, 0, NULL);
                if (pr->softcap > 0.0f) {
                    kr->softcap(sc, rows, w, w, pr->scale / pr->softcap, pr->softcap, NULL, 0);
                } else {
                    for (int64_t x = 0; x < rows * w; x++) sc[x] *= pr->scale;
                }
                for (int64_t r = 0; r < rows; r++) { /* outside the row's range: -inf */
                    int64_t a, z;
                    attn_visible_range(pr, n, m, i0 + r, &a, &z);
                    float *sr = sc + r * w;
                    for (int64_t j = j0; j < j0 + w && j < a; j++) sr[j - j0] = -INFINITY;
                    for (int64_t j = z + 1 > j0 ? z + 1 : j0; j < j0 + w; j++) sr[j - j0] = -INFINITY;
                }
                kr->exp2_rows(sc, rows, w, w, l2e, sub);
                for (int64_t j = 0; j < w; j++) col[j] = 0.0f;
                for (int64_t r = 0; r < rows; r++) kr->axpy(w, 1.0f, sc + r * w, col);
                for (int64_t j = 0; j < w; j++) acc[j0 + j] += col[j];
            }
        }
}

static attn_status importance_cpu(const attn_ctx *ctx, const attn_problem *pr,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *lse, double *importance) {
    const int64_t m = pr->m, d = pr->d, tasks = pr->batch * pr->hk;
    const int threads = ctx->threads;
    const int64_t colw = IMP_BK > d ? IMP_BK : d;
    const size_t per = (size_t)(d * m + IMP_BQ * d + IMP_BQ * IMP_BK + IMP_BQ + colw) + 64;
    size_t stride;
    float *scr = scratch_alloc(threads, per, &stride);
    double *acc = malloc((size_t)(tasks * m) * sizeof(double));
    if (!scr || !acc) {
        free(scr), free(acc);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for token importance");
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; t++) {
        float *kt = scr + stride * (size_t)engine_thread_id(), *qb = kt + d * m,
              *sc = qb + IMP_BQ * d, *sub = sc + IMP_BQ * IMP_BK, *col = sub + IMP_BQ;
        importance_task(ctx->kernels, pr, t / pr->hk, t % pr->hk, q, k, lse, kt, qb, sc, sub,
                        col, acc + t * m);
    }
    for (int64_t t = 0; t < tasks; t++) {
        double *imp = importance + (t / pr->hk) * m;
        for (int64_t j = 0; j < m; j++) imp[j] += acc[t * m + j];
    }
    free(scr), free(acc);
    return ATTN_OK;
}

attn_status attn_token_importance(attn_ctx *ctx, const attn_params *p, const attn_tensor *q,
                                  const attn_tensor *k, const attn_tensor *lse,
                                  double *importance) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!importance) return attn_err(ATTN_ERR_NULL, "importance must not be NULL");
    CHECK(attn_check_tensor("q", q, 4, true, false));
    CHECK(attn_check_tensor("k", k, 4, true, false));
    CHECK(attn_check_tensor("lse", lse, 3, true, false));
    attn_problem pr;
    CHECK(attn_check_params(p, q, k, k, &pr)); /* v unused: k stands in */
    if (pr.cu_q || pr.plan)
        return attn_err(ATTN_ERR_UNSUPPORTED, "token importance takes dense problems (no varlen or plan)");
    CHECK(attn_check_shape("lse", lse, pr.batch, pr.h, pr.n, -1));
    if (ctx->backend != ATTN_BACKEND_REF) return importance_cpu(ctx, &pr, q, k, lse, importance);
    const int64_t g = pr.h / pr.hk;
    double *qr = malloc((size_t)pr.d * sizeof(double));
    if (!qr) return attn_err(ATTN_ERR_NOMEM, "out of memory for token importance");
    for (int64_t b = 0; b < pr.batch; b++)
        for (int64_t h = 0; h < pr.h; h++)
            for (int64_t i = 0; i < pr.n; i++) {
                double l = attn_load_f64(lse, attn_off3(lse, b, h, i));
                if (l == -INFINITY) continue; /* a row that sees nothing gives nothing */
                for (int64_t e = 0; e < pr.d; e++) qr[e] = attn_load_f64(q, attn_off4(q, b, i, h, e));
                int64_t lo, hi;
                attn_visible_range(&pr, pr.n, pr.m, i, &lo, &hi);
                for (int64_t j = lo; j <= hi; j++) {
                    double dot = 0.0;
                    for (int64_t e = 0; e < pr.d; e++) dot += qr[e] * attn_load_f64(k, attn_off4(k, b, j, h / g, e));
                    double s = (double)pr.scale * dot;
                    if (pr.softcap > 0.0f) s = (double)pr.softcap * tanh(s / (double)pr.softcap);
                    importance[b * pr.m + j] += exp(s - l);
                }
            }
    free(qr);
    return ATTN_OK;
}

typedef struct ranked {
    double v;
    int64_t j;
} ranked;

static int by_value_desc(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->v != y->v) return x->v < y->v ? 1 : -1;
    return (x->j > y->j) - (x->j < y->j);
}

static int by_index(const void *a, const void *b) {
    const int64_t *x = a, *y = b;
    return (*x > *y) - (*x < *y);
}

attn_status attn_top_tokens(const double *importance, int64_t m, int64_t keep, int64_t *idx) {
    attn_clear_error();
    if (!importance || !idx) return attn_err(ATTN_ERR_NULL, "importance and idx must not be NULL");
    if (m < 1 || keep < 1 || keep > m) return attn_err(ATTN_ERR_ARG, "keep must be in 1..m (m >= 1)");
    ranked *r = malloc((size_t)m * sizeof *r);
    if (!r) return attn_err(ATTN_ERR_NOMEM, "out of memory ranking tokens");
    for (int64_t j = 0; j < m; j++) r[j].v = importance[j], r[j].j = j;
    qsort(r, (size_t)m, sizeof *r, by_value_desc); /* ties: earlier tokens first */
    for (int64_t t = 0; t < keep; t++) idx[t] = r[t].j;
    free(r);
    qsort(idx, (size_t)keep, sizeof *idx, by_index); /* keep the sequence order */
    return ATTN_OK;
}

attn_status attn_select_tokens(attn_ctx *ctx, const int64_t *idx, int64_t keep,
                               const attn_tensor *x, attn_tensor *out) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!idx) return attn_err(ATTN_ERR_NULL, "idx must not be NULL");
    CHECK(attn_check_tensor("x", x, 4, true, false));
    CHECK(attn_check_tensor("out", out, 4, true, false));
    if (keep < 1 || keep > x->shape[1]) return attn_err(ATTN_ERR_ARG, "keep must be in 1..x->shape[1]");
    CHECK(attn_check_shape("out", out, x->shape[0], keep, x->shape[2], x->shape[3]));
    const attn_tensor *ins[] = {x};
    const char *names[] = {"x"};
    CHECK(attn_check_output("out", out, ins, names, 1));
    for (int64_t t = 0; t < keep; t++)
        if (idx[t] < 0 || idx[t] >= x->shape[1])
            return attn_err(ATTN_ERR_ARG, "idx[%lld] = %lld is not a token of x", (long long)t, (long long)idx[t]);
    for (int64_t b = 0; b < x->shape[0]; b++)
        for (int64_t t = 0; t < keep; t++)
            for (int64_t h = 0; h < x->shape[2]; h++)
                for (int64_t e = 0; e < x->shape[3]; e++)
                    attn_store_f64(out, attn_off4(out, b, t, h, e), attn_load_f64(x, attn_off4(x, b, idx[t], h, e)));
    return ATTN_OK;
}

attn_status attn_head_importance(attn_ctx *ctx, const attn_tensor *o, double *out) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!out) return attn_err(ATTN_ERR_NULL, "out must not be NULL");
    CHECK(attn_check_tensor("o", o, 4, true, false));
    for (int64_t b = 0; b < o->shape[0]; b++)
        for (int64_t h = 0; h < o->shape[2]; h++) {
            double s = 0.0;
            for (int64_t i = 0; i < o->shape[1]; i++)
                for (int64_t e = 0; e < o->shape[3]; e++) {
                    double x = attn_load_f64(o, attn_off4(o, b, i, h, e));
                    s += x * x;
                }
            out[b * o->shape[2] + h] = sqrt(s);
        }
    return ATTN_OK;
}
