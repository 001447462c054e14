/* Planners: block masks, static patterns, dynamic selection from pooled
 * scores (Video-BLADE / AdaSpa) and Pyramid Sparse Attention levels. A
 * planner builds a plan; it never computes attention. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "context.h"
#include "engine/rows.h"
#include "validate.h"

/* ------------------------------------------------------------ building */

/* Rows of entries grown one query block at a time. */
typedef struct builder {
    int64_t *off;
    attn_plan_entry *e;
    int64_t rows, count, cap;
} builder;

static attn_status builder_init(builder *b, int64_t rows, int64_t per_row) {
    memset(b, 0, sizeof *b);
    b->rows = rows;
    b->cap = rows * per_row + 1;
    b->off = calloc((size_t)rows + 1, sizeof *b->off);
    b->e = malloc((size_t)b->cap * sizeof *b->e);
    if (!b->off || !b->e) {
        free(b->off);
        free(b->e);
        return attn_err(ATTN_ERR_NOMEM, "out of memory building a plan");
    }
    return ATTN_OK;
}

static void builder_add(builder *b, int64_t kb, int level) {
    attn_plan_entry en = {(int32_t)kb, (uint8_t)level,
                          level ? ATTN_BLOCK_FULL : ATTN_BLOCK_PARAMS, 0};
    b->e[b->count++] = en;
}

static attn_status builder_finish(builder *b, attn_plan **out, int64_t n, int64_t m,
                                  int64_t bq, int64_t bk, int64_t heads) {
    attn_status st = attn_plan_create(out, n, m, bq, bk, heads, b->off, b->e);
    free(b->off);
    free(b->e);
    return st;
}

static attn_status check_sizes(attn_plan **out, int64_t n, int64_t m, int64_t bq, int64_t bk) {
    attn_clear_error();
    if (!out) return attn_err(ATTN_ERR_NULL, "out must not be NULL");
    *out = NULL;
    if (n < 1 || m < 1) return attn_err(ATTN_ERR_ARG, "n and m must be >= 1");
    if (n > INT32_MAX || m > INT32_MAX)
        return attn_err(ATTN_ERR_OVERFLOW, "n and m must be below 2^31 for plans");
    if (bq < 1 || bq > 512 || bk < 1 || bk > 512)
        return attn_err(ATTN_ERR_ARG, "block_q and block_k must be in 1..512");
    return ATTN_OK;
}

/* ------------------------------------------------------------ static */

attn_status attn_plan_from_block_mask(attn_plan **out, int64_t n, int64_t m, int64_t block_q,
                                      int64_t block_k, int64_t heads, const uint8_t *mask) {
    attn_status st = check_sizes(out, n, m, block_q, block_k);
    if (st != ATTN_OK) return st;
    if (!mask) return attn_err(ATTN_ERR_NULL, "mask must not be NULL");
    if (heads < 1 || heads > 65536) return attn_err(ATTN_ERR_ARG, "heads must be in 1..65536");
    const int64_t nqb = (n + block_q - 1) / block_q, nkb = (m + block_k - 1) / block_k;
    builder b;
    if ((st = builder_init(&b, heads * nqb, nkb)) != ATTN_OK) return st;
    for (int64_t r = 0; r < heads * nqb; r++) {
        for (int64_t kb = 0; kb < nkb; kb++)
            if (mask[r * nkb + kb]) builder_add(&b, kb, 0);
        b.off[r + 1] = b.count;
    }
    return builder_finish(&b, out, n, m, block_q, block_k, heads);
}

attn_status attn_plan_static(attn_plan **out, int64_t n, int64_t m, int64_t block_q,
                             int64_t block_k, int64_t local, int64_t stride, int64_t global) {
    attn_status st = check_sizes(out, n, m, block_q, block_k);
    if (st != ATTN_OK) return st;
    if (local < 0 || stride < 0 || global < 0)
        return attn_err(ATTN_ERR_ARG, "local, stride and global must be >= 0");
    const int64_t nqb = (n + block_q - 1) / block_q, nkb = (m + block_k - 1) / block_k;
    const int64_t gkb = (global + block_k - 1) / block_k; /* key blocks of the globals */
    builder b;
    if ((st = builder_init(&b, nqb, nkb)) != ATTN_OK) return st;
    for (int64_t qb = 0; qb < nqb; qb++) {
        /* key block of the block's last query on the bottom-right diagonal */
        int64_t last = (qb + 1) * block_q - 1 < n - 1 ? (qb + 1) * block_q - 1 : n - 1;
        int64_t diag = (last + (m - n)) / block_k;
        if (diag >= nkb) diag = nkb - 1;
        bool sees_all = qb * block_q < global;
        for (int64_t kb = 0; kb < nkb; kb++) {
            bool on = sees_all || kb < gkb || (diag - kb >= 0 && diag - kb < local) ||
                      (stride > 0 && kb <= diag && (diag - kb) % stride == 0);
            if (on) builder_add(&b, kb, 0);
        }
        b.off[qb + 1] = b.count;
    }
    return builder_finish(&b, out, n, m, block_q, block_k, 1);
}

/* ------------------------------------------------------------ pooled scores */

/* Mean of rows [r0, r0 + cnt) of head h (batch 0) of t, as f32, into out [d]. */
static void pooled_row(const attn_kernels *kr, const attn_tensor *t, int64_t h, int64_t r0,
                       int64_t cnt, float *out, float *tmp) {
    const int64_t d = t->shape[3];
    for (int64_t x = 0; x < d; x++) out[x] = 0.0f;
    for (int64_t r = r0; r < r0 + cnt; r++) {
        rows_load(kr, t, attn_off4(t, 0, r, h, 0), d, tmp);
        kr->axpy(d, 1.0f, tmp, out);
    }
    for (int64_t x = 0; x < d; x++) out[x] /= (float)cnt;
}

typedef struct scored {
    double s;
    int64_t kb;
} scored;

static int by_score_desc(const void *a, const void *b) {
    const scored *x = a, *y = b;
    if (x->s != y->s) return x->s < y->s ? 1 : -1;
    return (x->kb > y->kb) - (x->kb < y->kb); /* ties: lower block first */
}

static int by_block(const void *a, const void *b) {
    const scored *x = a, *y = b;
    return (x->kb > y->kb) - (x->kb < y->kb);
}

typedef struct scorer {
    const attn_select_opts *opt;
    int64_t n, m, h, hk, d, nqb, nkb;
    float scale;
    float *kbar; /* [hk][nkb][d] */
    float *qbar, *tmp; /* [d] */
    scored *row; /* [nkb] */
    double *mass; /* [nkb]: AdaSpa's calibrated block masses (opt->lse set) */
} scorer;

static attn_status check_select(attn_ctx *ctx, attn_plan **out, const attn_tensor *q,
                                const attn_tensor *k, const attn_select_opts *opt) {
    if (!out) return attn_err(ATTN_ERR_NULL, "out must not be NULL");
    *out = NULL;
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!opt) return attn_err(ATTN_ERR_NULL, "opt must not be NULL");
    attn_status st;
    if ((st = attn_check_tensor("q", q, 4, false, false)) != ATTN_OK) return st;
    if ((st = attn_check_tensor("k", k, 4, false, false)) != ATTN_OK) return st;
    if (q->shape[3] != k->shape[3])
        return attn_err(ATTN_ERR_SHAPE, "q->shape[3] must equal k->shape[3]");
    if (q->shape[0] != k->shape[0])
        return attn_err(ATTN_ERR_SHAPE, "q and k must have the same batch size");
    if (q->shape[2] % k->shape[2] != 0)
        return attn_err(ATTN_ERR_SHAPE, "kv heads (k->shape[2]) must divide query heads");
    if ((st = check_sizes(out, q->shape[1], k->shape[1], opt->block_q, opt->block_k)) != ATTN_OK)
        return st;
    if (opt->top_k < 0) return attn_err(ATTN_ERR_ARG, "opt->top_k must be >= 0");
    if (opt->top_k == 0 && !(opt->mass > 0.0f && opt->mass <= 1.0f))
        return attn_err(ATTN_ERR_ARG, "opt->mass must be in (0, 1] when opt->top_k is 0");
    if (opt->lse) {
        if ((st = attn_check_tensor("opt->lse", opt->lse, 3, false, false)) != ATTN_OK) return st;
        if (opt->lse->dtype != ATTN_F32) return attn_err(ATTN_ERR_DTYPE, "opt->lse must be f32");
        if ((st = attn_check_shape("opt->lse", opt->lse, 1, q->shape[2], q->shape[1], -1)) != ATTN_OK)
            return st;
    }
    return ATTN_OK;
}

static void scorer_free(scorer *s) {
    free(s->kbar);
    free(s->qbar);
    free(s->tmp);
    free(s->row);
    free(s->mass);
}

static attn_status scorer_init(scorer *s, attn_ctx *ctx, const attn_tensor *q,
                               const attn_tensor *k, const attn_select_opts *opt) {
    memset(s, 0, sizeof *s);
    s->opt = opt;
    s->n = q->shape[1], s->m = k->shape[1], s->h = q->shape[2], s->hk = k->shape[2];
    s->d = q->shape[3];
    s->nqb = (s->n + opt->block_q - 1) / opt->block_q;
    s->nkb = (s->m + opt->block_k - 1) / opt->block_k;
    s->scale = 1.0f / sqrtf((float)s->d);
    s->kbar = malloc((size_t)(s->hk * s->nkb * s->d) * sizeof(float));
    s->qbar = malloc((size_t)s->d * sizeof(float));
    s->tmp = malloc((size_t)s->d * sizeof(float));
    s->row = malloc((size_t)s->nkb * sizeof(scored));
    s->mass = malloc((size_t)s->nkb * sizeof(double));
    if (!s->kbar || !s->qbar || !s->tmp || !s->row || !s->mass) {
        scorer_free(s);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for block scores");
    }
    for (int64_t g = 0; g < s->hk; g++)
        for (int64_t kb = 0; kb < s->nkb; kb++) {
            int64_t r0 = kb * opt->block_k;
            int64_t cnt = r0 + opt->block_k <= s->m ? opt->block_k : s->m - r0;
            pooled_row(ctx->kernels, k, g, r0, cnt, s->kbar + (g * s->nkb + kb) * s->d, s->tmp);
        }
    return ATTN_OK;
}

/* Scores of the candidate key blocks of (head h, query block qb) into
 * s->row, sorted best first; returns how many. */
static int64_t score_row(scorer *s, attn_ctx *ctx, const attn_tensor *q, int64_t h, int64_t qb) {
    const attn_select_opts *opt = s->opt;
    int64_t r0 = qb * opt->block_q;
    int64_t cnt = r0 + opt->block_q <= s->n ? opt->block_q : s->n - r0;
    pooled_row(ctx->kernels, q, h, r0, cnt, s->qbar, s->tmp);
    const int64_t g = h / (s->h / s->hk);
    const int64_t last_key = r0 + cnt - 1 + (s->m - s->n); /* causal reach of the block */
    int64_t c = 0;
    for (int64_t kb = 0; kb < s->nkb; kb++) {
        if (opt->causal && kb * opt->block_k > last_key) continue;
        const float *kr = s->kbar + (g * s->nkb + kb) * s->d;
        double dot = 0.0;
        for (int64_t x = 0; x < s->d; x++) dot += (double)s->qbar[x] * kr[x];
        int64_t keys = kb * opt->block_k + opt->block_k <= s->m ? opt->block_k : s->m - kb * opt->block_k;
        s->row[c].s = s->scale * dot + log((double)keys); /* a block weighs as its keys */
        s->row[c].kb = kb;
        c++;
    }
    if (opt->lse) { /* AdaSpa: each query's own pooled logits against its exact LSE */
        for (int64_t x = 0; x < c; x++) s->mass[x] = 0.0;
        for (int64_t i = r0; i < r0 + cnt; i++) {
            rows_load(ctx->kernels, q, attn_off4(q, 0, i, h, 0), s->d, s->tmp);
            double l = attn_load_f64(opt->lse, attn_off3(opt->lse, 0, h, i));
            for (int64_t x = 0; x < c; x++) {
                const float *kr = s->kbar + (g * s->nkb + s->row[x].kb) * s->d;
                double dot = 0.0;
                for (int64_t e = 0; e < s->d; e++) dot += (double)s->tmp[e] * kr[e];
                int64_t kb = s->row[x].kb;
                int64_t keys = kb * opt->block_k + opt->block_k <= s->m ? opt->block_k
                                                                         : s->m - kb * opt->block_k;
                if (l != -INFINITY) s->mass[x] += exp(s->scale * dot + log((double)keys) - l);
            }
        }
        for (int64_t x = 0; x < c; x++) s->row[x].s = s->mass[x] / (double)cnt;
    }
    qsort(s->row, (size_t)c, sizeof(scored), by_score_desc);
    return c;
}

/* Whether key block kb holds the diagonal of query block qb, or is the first. */
static bool forced(const scorer *s, int64_t qb, int64_t kb) {
    const attn_select_opts *opt = s->opt;
    int64_t last = (qb + 1) * opt->block_q - 1 < s->n - 1 ? (qb + 1) * opt->block_q - 1 : s->n - 1;
    int64_t diag = (last + (s->m - s->n)) / opt->block_k;
    if (diag >= s->nkb) diag = s->nkb - 1;
    return (opt->keep_diagonal && kb == diag) || (opt->keep_first && kb == 0);
}

/* How many of the c sorted candidates to keep (before forced ones). */
static int64_t keep_count(const scorer *s, int64_t c) {
    if (s->opt->top_k > 0) return s->opt->top_k < c ? s->opt->top_k : c;
    if (s->opt->lse) { /* calibrated masses: stop at the absolute mass */
        double run = 0.0;
        for (int64_t i = 0; i < c; i++) {
            run += s->row[i].s;
            if (run >= (double)s->opt->mass) return i + 1;
        }
        return c;
    }
    double mx = c ? s->row[0].s : 0.0, total = 0.0, run = 0.0;
    for (int64_t i = 0; i < c; i++) total += exp(s->row[i].s - mx);
    for (int64_t i = 0; i < c; i++) {
        run += exp(s->row[i].s - mx);
        if (run >= (double)s->opt->mass * total) return i + 1;
    }
    return c;
}

attn_status attn_plan_select(attn_ctx *ctx, attn_plan **out, const attn_tensor *q,
                             const attn_tensor *k, const attn_select_opts *opt) {
    attn_clear_error();
    attn_status st = check_select(ctx, out, q, k, opt);
    if (st != ATTN_OK) return st;
    scorer s;
    if ((st = scorer_init(&s, ctx, q, k, opt)) != ATTN_OK) return st;
    builder b;
    if ((st = builder_init(&b, s.h * s.nqb, s.nkb)) != ATTN_OK) {
        scorer_free(&s);
        return st;
    }
    for (int64_t h = 0; h < s.h; h++)
        for (int64_t qb = 0; qb < s.nqb; qb++) {
            int64_t c = score_row(&s, ctx, q, h, qb), keep = keep_count(&s, c), kept = 0;
            for (int64_t i = 0; i < c; i++)
                if (i < keep || forced(&s, qb, s.row[i].kb)) s.row[kept++] = s.row[i];
            qsort(s.row, (size_t)kept, sizeof(scored), by_block); /* plans ascend */
            for (int64_t i = 0; i < kept; i++) builder_add(&b, s.row[i].kb, 0);
            b.off[h * s.nqb + qb + 1] = b.count;
        }
    scorer_free(&s);
    return builder_finish(&b, out, q->shape[1], k->shape[1], opt->block_q, opt->block_k, q->shape[2]);
}

/* How a pyramid planner turns a query block's ranked key blocks into levels:
 * by quota (a fraction of the row per level) or by threshold (the estimated
 * mass at which each level ends). Exactly one of quota and threshold is set. */
typedef struct level_rule {
    int32_t levels;
    const float *quota, *threshold;
} level_rule;

/* level_of[kb] for the c ranked blocks of s->row (unranked ones stay -1). */
static void assign_levels(const scorer *s, int64_t c, const level_rule *r, int32_t *level_of) {
    if (r->quota) { /* ranks [edge_l, edge_{l+1}) get level l: cumulative quotas, rounded up */
        double cum = 0.0;
        int64_t start = 0;
        for (int32_t l = 0; l < r->levels; l++) {
            cum += r->quota[l];
            int64_t end = (int64_t)ceil(cum * (double)c - 1e-9);
            if (end > c) end = c;
            for (int64_t i = start; i < end; i++) level_of[s->row[i].kb] = l;
            if (end > start) start = end;
        }
        return;
    }
    /* estimated masses: calibrated (lse) or the softmax of the scores */
    const bool calibrated = s->opt->lse != NULL;
    double mx = c ? s->row[0].s : 0.0, total = 0.0, run = 0.0;
    if (!calibrated)
        for (int64_t i = 0; i < c; i++) total += exp(s->row[i].s - mx);
    int32_t l = 0;
    for (int64_t i = 0; i < c && l < r->levels; i++) {
        level_of[s->row[i].kb] = l;
        run += calibrated ? s->row[i].s : exp(s->row[i].s - mx) / total;
        while (l < r->levels && run >= (double)r->threshold[l]) l++;
    }
}

/* The pyramid plan: every query block's key blocks ranked, given levels by
 * the rule, the forced blocks (first, diagonal) kept at level 0. */
static attn_status plan_levels(attn_ctx *ctx, attn_plan **out, const attn_tensor *q,
                               const attn_tensor *k, const attn_select_opts *o,
                               const level_rule *r) {
    attn_status st;
    scorer s;
    if ((st = scorer_init(&s, ctx, q, k, o)) != ATTN_OK) return st;
    builder b;
    if ((st = builder_init(&b, s.h * s.nqb, s.nkb)) != ATTN_OK) {
        scorer_free(&s);
        return st;
    }
    int32_t *level_of = malloc((size_t)s.nkb * sizeof *level_of);
    if (!level_of) {
        scorer_free(&s);
        free(b.off), free(b.e);
        return attn_err(ATTN_ERR_NOMEM, "out of memory assigning levels");
    }
    for (int64_t h = 0; h < s.h; h++)
        for (int64_t qb = 0; qb < s.nqb; qb++) {
            int64_t c = score_row(&s, ctx, q, h, qb);
            for (int64_t kb = 0; kb < s.nkb; kb++) level_of[kb] = -1;
            assign_levels(&s, c, r, level_of);
            for (int64_t i = 0; i < c; i++)
                if (forced(&s, qb, s.row[i].kb)) level_of[s.row[i].kb] = 0;
            for (int64_t kb = 0; kb < s.nkb; kb++)
                if (level_of[kb] >= 0) builder_add(&b, kb, level_of[kb]);
            b.off[h * s.nqb + qb + 1] = b.count;
        }
    free(level_of);
    scorer_free(&s);
    return builder_finish(&b, out, q->shape[1], k->shape[1], o->block_q, o->block_k, q->shape[2]);
}

attn_status attn_plan_psa(attn_ctx *ctx, attn_plan **out, const attn_tensor *q,
                          const attn_tensor *k, const attn_select_opts *opt, int32_t levels,
                          const float *quota) {
    attn_clear_error();
    attn_select_opts o = opt ? *opt : (attn_select_opts){0};
    o.top_k = 1; /* selection rule unused here; keeps check_select quiet */
    attn_status st = check_select(ctx, out, q, k, opt ? &o : NULL);
    if (st != ATTN_OK) return st;
    if (levels < 1 || levels > 16) return attn_err(ATTN_ERR_ARG, "levels must be in 1..16");
    if (!quota) return attn_err(ATTN_ERR_NULL, "quota must not be NULL");
    double total = 0.0;
    for (int32_t l = 0; l < levels; l++) {
        if (!(quota[l] >= 0.0f && quota[l] <= 1.0f))
            return attn_err(ATTN_ERR_ARG, "quota[%d] must be in [0, 1]", l);
        if (quota[l] > 0.0f && ((int64_t)1 << l) > o.block_k)
            return attn_err(ATTN_ERR_ARG, "quota[%d] > 0 needs 2^%d <= block_k", l, l);
        total += quota[l];
    }
    if (total > 1.0 + 1e-6) return attn_err(ATTN_ERR_ARG, "the quotas must sum to at most 1");
    const level_rule r = {levels, quota, NULL};
    return plan_levels(ctx, out, q, k, &o, &r);
}

attn_status attn_plan_psa_thresholds(attn_ctx *ctx, attn_plan **out, const attn_tensor *q,
                                     const attn_tensor *k, const attn_select_opts *opt,
                                     int32_t levels, const float *threshold) {
    attn_clear_error();
    attn_select_opts o = opt ? *opt : (attn_select_opts){0};
    o.top_k = 1; /* selection rule unused here; keeps check_select quiet */
    attn_status st = check_select(ctx, out, q, k, opt ? &o : NULL);
    if (st != ATTN_OK) return st;
    if (levels < 1 || levels > 16) return attn_err(ATTN_ERR_ARG, "levels must be in 1..16");
    if (!threshold) return attn_err(ATTN_ERR_NULL, "threshold must not be NULL");
    for (int32_t l = 0; l < levels; l++) {
        if (!(threshold[l] > 0.0f && threshold[l] <= 1.0f) || (l && threshold[l] < threshold[l - 1]))
            return attn_err(ATTN_ERR_ARG, "threshold[%d] must be in (0, 1] and ascend", l);
        if (((int64_t)1 << l) > o.block_k)
            return attn_err(ATTN_ERR_ARG, "level %d needs 2^%d <= block_k", l, l);
    }
    const level_rule r = {levels, NULL, threshold};
    return plan_levels(ctx, out, q, k, &o, &r);
}
