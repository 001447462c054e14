/* NSA's block selection (see nsa_select.h). A task is one (kv head, query
 * block): for each head of the GQA group it computes the block's logits
 * against every compressed key a query of the block sees, their exact
 * softmax (a compressed row is short: M / stride keys, held whole), and
 * from the probabilities both the compressed branch's output (P Vc) and the
 * column sums that score the selection blocks. One pass over Q Kc^T serves
 * the branch and the selection. */
#include "nsa_select.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/rows.h"

typedef struct cand {
    double s;
    int64_t u;
} cand;

/* The ranking of candidates: higher score first (NaN lowest), then lower
 * block index; a strict total order, so the kept set is unique. */
static bool ranks_above(const cand *x, const cand *y) {
    if (x->s != y->s) {
        if (y->s != y->s) return true;  /* y is NaN */
        if (x->s != x->s) return false; /* x is NaN */
        return x->s > y->s;
    }
    return x->u < y->u;
}

/* The `keep` best of c candidates into cd[0..keep), best first: an insertion
 * into a short sorted list, which most candidates leave at one comparison. */
static void keep_best(cand *cd, int64_t c, int64_t keep) {
    int64_t n = 0;
    for (int64_t x = 0; x < c; x++) {
        cand e = cd[x];
        if (n == keep && !ranks_above(&e, &cd[n - 1])) continue;
        int64_t at = n < keep ? n++ : n - 1; /* the slot freed: the end, or the worst */
        while (at > 0 && ranks_above(&e, &cd[at - 1])) {
            cd[at] = cd[at - 1];
            at--;
        }
        cd[at] = e;
    }
}

static int by_index(const void *a, const void *b) {
    const cand *x = a, *y = b;
    return (x->u > y->u) - (x->u < y->u);
}

/* What every task shares. */
typedef struct sel_job {
    const attn_ctx *ctx;
    const attn_problem *pc;
    const attn_nsa_opts *opt;
    const attn_tensor *q, *gates;
    attn_tensor *o, *lse;
    const float *kt; /* [hk][d][mc]  Kc^T */
    const float *vc; /* [hk][mc][dv] Vc as f32, when o is written */
    int64_t n, m, mc, nkb, g, lds;
} sel_job;

/* One thread's buffers. */
typedef struct sel_bufs {
    float *qr;     /* [bq][d]   the queries of one head, pre-scaled */
    float *s;      /* [bq][lds] logits, then probabilities */
    float *ob;     /* [bq][dv]  the branch's output rows */
    float *mx, *l, *alpha; /* [bq] */
    float *colsum; /* [mc]      probability mass of each compressed key */
} sel_bufs;

static sel_bufs sel_carve(scratch *s, int64_t bq, int64_t d, int64_t dv, int64_t lds,
                          int64_t mc) {
    sel_bufs b;
    b.qr = scratch_take(s, (size_t)(bq * d));
    b.s = scratch_take(s, (size_t)(bq * lds));
    b.ob = scratch_take(s, (size_t)(bq * dv));
    b.mx = scratch_take(s, (size_t)bq);
    b.l = scratch_take(s, (size_t)bq);
    b.alpha = scratch_take(s, (size_t)bq);
    b.colsum = scratch_take(s, (size_t)mc);
    return b;
}

/* The branch's rows of head hq for queries i0.. from the probabilities in
 * b->s (vis keys): o = P Vc / l (times the gate), lse = m ln 2 + ln l
 * (empty rows: 0, -inf). */
static void write_branch(const sel_job *j, const sel_bufs *b, int64_t hq, int64_t i0,
                         int64_t nq, int64_t vis) {
    const attn_kernels *kr = j->ctx->kernels;
    const int64_t dv = j->pc->dv, hk = hq / j->g;
    if (vis > 0)
        kr->gemm(nq, dv, vis, b->s, j->lds, 1, j->vc + hk * j->mc * dv, dv, b->ob, dv, 0, NULL);
    for (int64_t r = 0; r < nq; r++) {
        float *orow = b->ob + r * dv, l = vis > 0 ? b->l[r] : 0.0f;
        float inv = l > 0.0f ? 1.0f / l : (l != l ? l : 0.0f); /* a NaN row stays NaN */
        if (j->gates) inv *= (float)attn_load_f64(j->gates, attn_off4(j->gates, 0, i0 + r, hq, 0));
        for (int64_t x = 0; x < dv; x++) orow[x] = vis > 0 ? orow[x] * inv : 0.0f;
        rows_store(kr, j->o, attn_off4(j->o, 0, i0 + r, hq, 0), dv, orow);
        if (!j->lse) continue;
        float val = l > 0.0f ? b->mx[r] * LN2 + logf(l) : (l == 0.0f ? -INFINITY : l);
        attn_store_f64(j->lse, attn_off3(j->lse, 0, hq, i0 + r), val);
    }
}

/* Softmax of query block qb of head hq over its vis compressed keys; adds
 * each key's probability mass (summed over the rows) into b->colsum. */
static void head_block(const sel_job *j, const sel_bufs *b, int64_t hq, int64_t i0, int64_t nq,
                       int64_t vis) {
    const attn_kernels *kr = j->ctx->kernels;
    const attn_problem *pc = j->pc;
    const int64_t d = pc->d, lds = j->lds;
    const float qscale = pc->softcap > 0.0f ? pc->scale : pc->scale * LOG2E;
    for (int64_t r = 0; r < nq; r++) {
        float *qrow = b->qr + r * d;
        rows_load(kr, j->q, attn_off4(j->q, 0, i0 + r, hq, 0), d, qrow);
        for (int64_t x = 0; x < d; x++) qrow[x] *= qscale;
        b->mx[r] = -INFINITY;
        b->l[r] = 0.0f;
    }
    kr->gemm(nq, vis, d, b->qr, d, 1, j->kt + (hq / j->g) * d * j->mc, j->mc, b->s, lds, 0,
             NULL);
    if (pc->softcap > 0.0f) /* s = cap tanh(s / cap), in log2 units */
        kr->softcap(b->s, nq, vis, lds, 1.0f / pc->softcap, pc->softcap * LOG2E, NULL, 0);
    for (int64_t r = 0; r < nq; r++) { /* keys whose span is not yet complete */
        int64_t lo, hi;
        attn_visible_range(pc, j->n, j->mc, i0 + r, &lo, &hi);
        for (int64_t t = hi + 1 > 0 ? hi + 1 : 0; t < vis; t++) b->s[r * lds + t] = -INFINITY;
    }
    kr->softmax_rows(b->s, nq, vis, lds, b->mx, b->l, b->alpha);
    for (int64_t r = 0; r < nq; r++) {
        float l = b->l[r], inv = l > 0.0f ? 1.0f / l : (l != l ? l : 0.0f);
        if (inv != 0.0f) kr->axpy(vis, inv, b->s + r * lds, b->colsum);
    }
}

/* The selection of one (kv head hh, query block qb) into chosen[0..) and the
 * branch's rows when asked; returns the number of blocks kept. */
static int64_t run_task(const sel_job *j, const sel_bufs *b, double *score, cand *cd,
                        int64_t hh, int64_t qb, int32_t *chosen) {
    const attn_nsa_opts *opt = j->opt;
    const int64_t bq = opt->query_block, bk = opt->sel_block, nkb = j->nkb;
    const int64_t i0 = qb * bq, nq = i0 + bq <= j->n ? bq : j->n - i0;
    int64_t lo, vis;
    attn_visible_range(j->pc, j->n, j->mc, i0 + nq - 1, &lo, &vis);
    vis += 1; /* compressed keys some query of the block sees */
    for (int64_t t = 0; t < vis; t++) b->colsum[t] = 0.0f;
    for (int64_t x = 0; x < j->g; x++) {
        const int64_t hq = hh * j->g + x;
        if (vis > 0) head_block(j, b, hq, i0, nq, vis);
        if (j->o) write_branch(j, b, hq, i0, nq, vis);
    }
    for (int64_t u = 0; u < nkb; u++) score[u] = 0.0;
    for (int64_t t = 0; t < vis; t++) { /* spread over the blocks the span overlaps */
        int64_t a = t * opt->cmp_stride, z = a + opt->cmp_block; /* [a, z) */
        for (int64_t u = a / bk; u < nkb && u * bk < z; u++) {
            int64_t l0 = u * bk > a ? u * bk : a, l1 = (u + 1) * bk < z ? (u + 1) * bk : z;
            score[u] += (double)b->colsum[t] * (double)(l1 - l0) / (double)opt->cmp_block;
        }
    }
    /* candidates: blocks with a key the block's last query sees */
    const int64_t last = i0 + nq - 1 + (j->m - j->n), diag = last / bk < nkb ? last / bk : nkb - 1;
    int64_t c = 0;
    for (int64_t u = 0; u <= diag; u++) {
        cd[c].s = (u == 0 || u == diag) ? INFINITY : score[u]; /* forced: first, diagonal */
        cd[c].u = u;
        c++;
    }
    int64_t kept = c < opt->sel_count ? c : opt->sel_count;
    if (kept < 2 && c >= 2) kept = 2; /* the two forced blocks always */
    keep_best(cd, c, kept);
    qsort(cd, (size_t)kept, sizeof(cand), by_index);
    for (int64_t x = 0; x < kept; x++) chosen[x] = (int32_t)cd[x].u;
    return kept;
}

attn_status nsa_select_run(const attn_ctx *ctx, const attn_problem *pc,
                           const attn_nsa_opts *opt, const attn_tensor *q,
                           const attn_tensor *kc, const attn_tensor *vc, int64_t m,
                           attn_tensor *o, attn_tensor *lse, const attn_tensor *gates,
                           attn_plan **out) {
    const attn_kernels *kr = ctx->kernels;
    const int64_t n = q->shape[1], h = q->shape[2], hk = kc->shape[2], d = q->shape[3];
    const int64_t mc = kc->shape[1], dv = o ? pc->dv : 0;
    const int64_t bq = opt->query_block, bk = opt->sel_block;
    const int64_t nqb = (n + bq - 1) / bq, nkb = (m + bk - 1) / bk, jobs = hk * nqb;
    const int64_t keep_max = opt->sel_count > 2 ? opt->sel_count : 2;
    const int threads = ctx->threads;
    sel_job j = {ctx, pc, opt, q, gates, o, lse, NULL, NULL, n, m, mc, nkb, h / hk, (mc + 15) & ~15};
    scratch count = {NULL, 0};
    sel_carve(&count, bq, d, dv, j.lds, mc);
    size_t per = count.used > (size_t)d ? count.used : (size_t)d, stride = 0;
    size_t per_d = (size_t)(3 * nkb) + 8; /* scores, then candidates (2 doubles each) */
    float *kt = malloc((size_t)(hk * d * mc) * sizeof(float));
    float *vcb = o ? malloc((size_t)(hk * mc * dv) * sizeof(float)) : NULL;
    int32_t *chosen = malloc((size_t)(jobs * keep_max) * sizeof(int32_t));
    int64_t *nchosen = calloc((size_t)jobs, sizeof(int64_t));
    int64_t *off = calloc((size_t)jobs + 1, sizeof(int64_t));
    attn_plan_entry *en = malloc((size_t)(jobs * keep_max + 1) * sizeof(attn_plan_entry));
    float *scr = scratch_alloc(threads, per, &stride);
    double *dscr = malloc((size_t)threads * per_d * sizeof(double));
    attn_status st = ATTN_OK;
    if (!kt || (o && !vcb) || !chosen || !nchosen || !off || !en || !scr || !dscr) {
        st = attn_err(ATTN_ERR_NOMEM, "out of memory for the NSA selection");
        goto done;
    }
    for (int64_t hh = 0; hh < hk; hh++) { /* staged through thread 0's scratch */
        rows_load_transposed(kr, kc, attn_off4(kc, 0, 0, hh, 0), kc->stride[1], mc, d, scr,
                             (int64_t)per, kt + hh * d * mc, mc);
        if (o)
            rows_load_block(kr, vc, attn_off4(vc, 0, 0, hh, 0), vc->stride[1], mc, dv,
                            vcb + hh * mc * dv, dv);
    }
    j.kt = kt, j.vc = vcb;
    /* each (kv head, query block) alone, in parallel: the choice depends only
     * on its inputs, so the plan is the same for any thread count; late
     * query blocks (more keys) first */
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t x = 0; x < jobs; x++) {
        const int tid = engine_thread_id();
        scratch mine = {scr + stride * (size_t)tid, 0};
        sel_bufs b = sel_carve(&mine, bq, d, dv, j.lds, mc);
        double *score = dscr + per_d * (size_t)tid;
        const int64_t hh = x / nqb, qb = nqb - 1 - x % nqb, job = hh * nqb + qb;
        nchosen[job] = run_task(&j, &b, score, (cand *)(score + nkb), hh, qb,
                                chosen + job * keep_max);
    }
    int64_t count_e = 0;
    for (int64_t job = 0; job < jobs; job++) {
        for (int64_t x = 0; x < nchosen[job]; x++) {
            attn_plan_entry e = {chosen[job * keep_max + x], 0, ATTN_BLOCK_PARAMS, 0};
            en[count_e++] = e;
        }
        off[job + 1] = count_e;
    }
    st = attn_plan_create(out, n, m, bq, bk, hk, off, en);
done:
    free(kt), free(vcb), free(chosen), free(nchosen), free(off), free(en);
    free(scr), free(dscr);
    return st;
}
