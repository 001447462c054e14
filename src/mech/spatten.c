/* SpAtten's cascade token and head pruning: the attention probability each
 * key receives (recomputed from the saved LSE, in double, one row at a time:
 * an N x M pass with no N x M buffer), the top tokens, their selection, and
 * head importance by output magnitude. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "validate.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

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
