/* Tiled softmax attention, backward (FlashAttention-2): P is recomputed from
 * the saved LSE, never stored whole. A task is one (sequence, kv head), or
 * one query head of it when there are fewer of those than threads: it walks
 * the key blocks in order, and for each the query blocks of its heads,
 * accumulating dK and dV of the block in tiles (head by head, the heads
 * added in order) and dQ in a per-task f32 buffer. Each
 * output element is summed in one fixed order, so results do not depend on
 * the thread count or on the split into tasks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "rows.h"
#include "tiling.h"

/* One (head, query block) pair a key block is visited by. */
typedef struct bwd_visit {
    int64_t gi, i0, nq;
    int level;
    bool masked;
} bwd_visit;

typedef struct bwd_bufs {
    float *kbuf, *kt, *vt;   /* [bk][d], [d][bk], [dv][bk] */
    float *qbuf, *dobuf;     /* [bq][d], [bq][dv] */
    float *p, *dp, *th;      /* [bq][bk] probabilities, dP then dS, tanh (softcap) */
    float *dk, *dv;          /* [bk][d], [bk][dv]: the key block's sums over heads */
    float *dkh, *dvh;        /* [bk][d], [bk][dv]: one head's, added to dk/dv in order */
    float *dq;               /* [gp][n][d]: the task's query heads */
    float *lse2, *delta;     /* [gp][n] */
    float *gate;             /* [gp][n] the gated epilogue's gates, else 1 */
    float *row;              /* [max(d, dv)] */
    float *dkv;              /* [2][d + dv]: one row of dK and dV summed over parts, and
                              * room to add it to the output */
    /* a pooled (pyramid level > 0) block: its K rows, K^T, V^T, their
     * gradients and the + log2(count) of each pooled key */
    float *pk, *pkt, *pvt, *pdk, *pdv, *bonus;
    bwd_visit *visits;       /* [gp][ceil(n / bq)] */
} bwd_bufs;

static bwd_bufs bwd_carve(scratch *s, int64_t bq, int64_t bk, int64_t d, int64_t dv,
                          int64_t g, int64_t n) {
    bwd_bufs b;
    b.kbuf = scratch_take(s, (size_t)(bk * d));
    b.kt = scratch_take(s, (size_t)(bk * d));
    b.vt = scratch_take(s, (size_t)(bk * dv));
    b.qbuf = scratch_take(s, (size_t)(bq * d));
    b.dobuf = scratch_take(s, (size_t)(bq * dv));
    b.p = scratch_take(s, (size_t)(bq * bk));
    b.dp = scratch_take(s, (size_t)(bq * bk));
    b.th = scratch_take(s, (size_t)(bq * bk));
    b.dk = scratch_take(s, (size_t)(bk * d));
    b.dv = scratch_take(s, (size_t)(bk * dv));
    b.dkh = scratch_take(s, (size_t)(bk * d));
    b.dvh = scratch_take(s, (size_t)(bk * dv));
    b.dq = scratch_take(s, (size_t)(g * n * d));
    b.lse2 = scratch_take(s, (size_t)(g * n));
    b.delta = scratch_take(s, (size_t)(g * n));
    b.gate = scratch_take(s, (size_t)(g * n));
    b.row = scratch_take(s, (size_t)(d > dv ? d : dv));
    b.dkv = scratch_take(s, (size_t)(2 * (d + dv)));
    b.pk = scratch_take(s, (size_t)(bk * d));
    b.pkt = scratch_take(s, (size_t)(bk * d));
    b.pvt = scratch_take(s, (size_t)(bk * dv));
    b.pdk = scratch_take(s, (size_t)(bk * d));
    b.pdv = scratch_take(s, (size_t)(bk * dv));
    b.bonus = scratch_take(s, (size_t)bk);
    const size_t nv = (size_t)(g * ((n + bq - 1) / bq));
    b.visits = (bwd_visit *)scratch_take(s, nv * sizeof(bwd_visit) / sizeof(float) + 1);
    return b;
}

/* The entry of query block qb of plan head ph for key block kb, or NULL. */
static const attn_plan_entry *plan_lists(const attn_plan *pl, int64_t ph, int64_t qb,
                                         int64_t kb) {
    int64_t row = ph * pl->n_qblocks + qb;
    int64_t lo = pl->row_offsets[row], hi = pl->row_offsets[row + 1];
    while (lo < hi) { /* entries ascend by key block */
        int64_t mid = (lo + hi) / 2;
        int32_t kbm = pl->entries[mid].key_block;
        if (kbm == kb) return &pl->entries[mid];
        if (kbm < kb) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

typedef struct bwd_args {
    const attn_ctx *ctx;
    const attn_problem *p;
    const attn_tensor *q, *k, *v, *o, *lse, *dout;
    attn_tensor *dq, *dk, *dv;
    int64_t bq, bk;
    int64_t parts, gp;  /* parts of each GQA group, query heads per part */
    int64_t mmax;       /* longest key sequence */
    float *part_dkv;    /* parts > 1: partial [seq][hk][part][mmax][d + dv] */
} bwd_args;

/* One (query block, key block) pair: the five products of FA-2's backward. */
static void kr_axpy(const bwd_args *a, int64_t n, float s, const float *x, float *y) {
    a->ctx->kernels->axpy(n, s, x, y);
}

/* The keys of one block as the five products read them: K rows, K^T, V^T,
 * the dK/dV accumulators, and for a pooled block the logit bonus of each key
 * (in the units of S before the exp2 multiplier), else NULL. */
typedef struct key_operands {
    const float *k, *kt, *vt;
    float *dk, *dv;
    const float *bonus;
    int64_t nk;
} key_operands;

/* Set logits of keys outside each query's visible range to -inf. Rows of
 * the tile are queries i0.., columns keys j0..; the keys a query sees form
 * one run (except on a grid), so each row masks a prefix and a suffix. */
static void mask_rows(const attn_problem *p, const attn_seq *sq, float *s, int64_t ld,
                      int64_t i0, int64_t nq, int64_t j0, int64_t nk) {
    for (int64_t r = 0; r < nq; r++) {
        float *row = s + r * ld;
        if (p->grid_w > 0) {
            for (int64_t c = 0; c < nk; c++)
                if (!attn_key_visible(p, sq->n, sq->m, i0 + r, j0 + c)) row[c] = -INFINITY;
            continue;
        }
        int64_t lo, hi;
        attn_visible_range(p, sq->n, sq->m, i0 + r, &lo, &hi);
        lo -= j0;
        hi -= j0;
        if (lo > hi) lo = nk; /* the query sees nothing here */
        for (int64_t c = 0; c < nk && c < lo; c++) row[c] = -INFINITY;
        for (int64_t c = hi + 1 > 0 ? hi + 1 : 0; c < nk; c++) row[c] = -INFINITY;
    }
}

/* The query rows of one pair: Q and dO as f32 rows, read in place when the
 * tensors are f32 with unit stride (else copied into the task's buffers). */
typedef struct query_operands {
    const float *q, *dout;
    int64_t ldq, lddo;
    float *dq; /* the pair's dQ rows in the task's buffer, accumulated into */
} query_operands;

static void pair(const bwd_args *a, const bwd_bufs *b, const attn_seq *sq, int64_t gi,
                 int64_t i0, int64_t nq, int64_t j0, const query_operands *qo,
                 const key_operands *ko, bool masked) {
    const attn_kernels *kr = a->ctx->kernels;
    const attn_problem *p = a->p;
    const int64_t d = p->d, dv = p->dv, bk = a->bk, nk = ko->nk;
    const float *lse2 = b->lse2 + gi * sq->n + i0, *delta = b->delta + gi * sq->n + i0;

    /* S = Q K^T, then P = 2^(S * scale * log2 e - lse2) */
    kr->gemm(nq, nk, d, qo->q, qo->ldq, 1, ko->kt, bk, b->p, bk, 0, NULL);
    if (p->softcap > 0.0f) /* capped logit, scaled; t kept for the derivative */
        kr->softcap(b->p, nq, nk, bk, p->scale / p->softcap, p->softcap, b->th, bk);
    if (ko->bonus)
        for (int64_t r = 0; r < nq; r++)
            for (int64_t c = 0; c < nk; c++) b->p[r * bk + c] += ko->bonus[c];
    if (masked) mask_rows(p, sq, b->p, bk, i0, nq, j0, nk);
    kr->exp2_rows(b->p, nq, nk, bk, p->softcap > 0.0f ? LOG2E : p->scale * LOG2E, lse2);
    if (p->out_gate) /* gated: the attention's gradient is g dO, folded into P's rows */
        for (int64_t r = 0; r < nq; r++) {
            const float gt = b->gate[gi * sq->n + i0 + r];
            for (int64_t c = 0; c < nk; c++) b->p[r * bk + c] *= gt;
        }

    /* dV += P^T dO */
    kr->gemm(nk, dv, nq, b->p, 1, bk, qo->dout, qo->lddo, ko->dv, dv, 1, NULL);
    /* dP = dO V^T; dS = P (dP - delta) scale */
    kr->gemm(nq, nk, dv, qo->dout, qo->lddo, 1, ko->vt, bk, b->dp, bk, 0, NULL);
    if (p->softcap > 0.0f) {
        kr->dsoftmax_rows(b->dp, b->p, nq, nk, bk, delta, 1.0f);
        for (int64_t r = 0; r < nq; r++)
            for (int64_t c = 0; c < nk; c++) {
                float t = b->th[r * bk + c];
                b->dp[r * bk + c] *= (1.0f - t * t) * p->scale;
            }
    } else {
        kr->dsoftmax_rows(b->dp, b->p, nq, nk, bk, delta, p->scale);
    }
    /* dK += dS^T Q; dQ += dS K */
    kr->gemm(nk, d, nq, b->dp, 1, bk, qo->q, qo->ldq, ko->dk, d, 1, NULL);
    kr->gemm(nq, d, nk, b->dp, bk, 1, ko->k, d, qo->dq, d, 1, NULL);
}

/* The key operands of block [j0, j0 + nk) at pyramid level `level` > 0: group
 * means of the full-resolution rows already in b (kbuf, vt), zeroed gradient
 * accumulators, and the + log2(count) bonus divided by the exp2 multiplier. */
static key_operands pooled_operands(const bwd_args *a, const bwd_bufs *b, int64_t nk,
                                    int level) {
    const int64_t d = a->p->d, dv = a->p->dv, bk = a->bk, f = (int64_t)1 << level;
    const int64_t ng = (nk + f - 1) / f;
    const float mul = a->p->softcap > 0.0f ? LOG2E : a->p->scale * LOG2E;
    for (int64_t g = 0; g < ng; g++) {
        const int64_t cnt = pool_count(nk, level, g);
        const float inv = 1.0f / (float)cnt;
        for (int64_t x = 0; x < d; x++) {
            float s = 0.0f;
            for (int64_t r = g * f; r < g * f + cnt; r++) s += b->kbuf[r * d + x];
            b->pk[g * d + x] = s * inv;
            b->pkt[x * bk + g] = s * inv;
        }
        for (int64_t x = 0; x < dv; x++) {
            float s = 0.0f;
            for (int64_t r = g * f; r < g * f + cnt; r++) s += b->vt[x * bk + r];
            b->pvt[x * bk + g] = s * inv;
        }
        b->bonus[g] = log2f((float)cnt) / mul;
    }
    memset(b->pdk, 0, (size_t)(ng * d) * sizeof(float));
    memset(b->pdv, 0, (size_t)(ng * dv) * sizeof(float));
    key_operands ko = {b->pk, b->pkt, b->pvt, b->pdk, b->pdv, b->bonus, ng};
    return ko;
}

/* A mean passes 1/count of its gradient to each member key (of gk, gv). */
static void unpool_gradients(const bwd_args *a, const bwd_bufs *b, int64_t nk, int level,
                             float *gk, float *gv) {
    const int64_t d = a->p->d, dv = a->p->dv, f = (int64_t)1 << level;
    for (int64_t r = 0; r < nk; r++) {
        const int64_t g = r / f;
        const float inv = 1.0f / (float)pool_count(nk, level, g);
        kr_axpy(a, d, inv, b->pdk + g * d, gk + r * d);
        kr_axpy(a, dv, inv, b->pdv + g * dv, gv + r * dv);
    }
}

/* Whether query block vi (of head h) sees key block kb = [j0, j0 + nk), and
 * then at which pyramid level and whether a rule cuts through the pair. */
static bool pair_visit(const bwd_args *a, const attn_seq *sq, int64_t h, int64_t kb,
                       int64_t j0, int64_t nk, bwd_visit *vi) {
    const attn_problem *p = a->p;
    const int64_t n = sq->n, i0 = vi->i0, nq = vi->nq;
    int64_t lo0, hi0, lo1, hi1;
    attn_visible_range(p, n, sq->m, i0, &lo0, &hi0);
    attn_visible_range(p, n, sq->m, i0 + nq - 1, &lo1, &hi1);
    const bool cut = !(lo1 <= j0 && j0 + nk - 1 <= hi0);
    if (p->plan) {
        int64_t ph = attn_plan_head(p->plan, h, p->h, p->hk);
        const attn_plan_entry *en = plan_lists(p->plan, ph, i0 / a->bq, kb);
        if (!en) return false;
        vi->level = en->level;
        vi->masked = en->mask == ATTN_BLOCK_PARAMS && (p->grid_w > 0 || cut);
        return true;
    }
    if (hi1 < j0 || lo0 > j0 + nk - 1) return false; /* no overlap */
    vi->masked = cut;
    return true;
}

/* A gradient row into t: stored, or added to what t holds when the gated
 * epilogue accumulates (tmp: n floats). */
static void put_row(const bwd_args *a, attn_tensor *t, int64_t off, int64_t n, const float *src,
                    float *tmp) {
    const attn_kernels *kr = a->ctx->kernels;
    if (!(a->p->out_gate && a->p->out_accumulate)) {
        rows_store(kr, t, off, n, src);
        return;
    }
    rows_load(kr, t, off, n, tmp);
    kr->axpy(n, 1.0f, src, tmp);
    rows_store(kr, t, off, n, tmp);
}

/* A head's dK/dV tile (tdk, tdv) into the block's sums b->dk, b->dv (a no-op
 * for the first head, which sums in place). */
static void fold_head(const bwd_args *a, const bwd_bufs *b, int64_t nk, const float *tdk,
                      const float *tdv) {
    if (tdk == b->dk) return;
    kr_axpy(a, nk * a->p->d, 1.0f, tdk, b->dk);
    kr_axpy(a, nk * a->p->dv, 1.0f, tdv, b->dv);
}

/* Where task (bi, hk, part) keeps its partial dK/dV rows. */
static float *part_rows(const bwd_args *a, int64_t bi, int64_t hk, int64_t part) {
    size_t task = (size_t)((bi * a->p->hk + hk) * a->parts + part);
    return a->part_dkv + task * (size_t)(a->mmax * (a->p->d + a->p->dv));
}

/* Query heads [g0, g1) of kv head hk of sequence bi: dQ of those heads, and
 * their contribution to dK/dV (the whole of it when parts == 1). */
static void run_task(const bwd_args *a, const bwd_bufs *b, int64_t bi, int64_t hk,
                     int64_t part) {
    const attn_kernels *kr = a->ctx->kernels;
    const attn_problem *p = a->p;
    const attn_seq sq = attn_problem_seq(p, bi);
    const int64_t g = p->h / p->hk, d = p->d, dv = p->dv, bq = a->bq, bk = a->bk;
    const int64_t n = sq.n, g0 = part * a->gp, g1 = g0 + a->gp < g ? g0 + a->gp : g;

    /* per-row constants: LSE in log2 units (0 for empty rows, whose P is 0
     * anyway), and delta_i = dO_i . O_i */
    for (int64_t gi = g0; gi < g1; gi++) {
        int64_t h = hk * g + gi;
        for (int64_t i = 0; i < n; i++) {
            float l = (float)attn_load_f64(a->lse, attn_off3(a->lse, sq.tb, h, sq.q0 + i));
            b->lse2[(gi - g0) * n + i] = l == -INFINITY ? 0.0f : l * LOG2E;
            rows_load(kr, a->dout, attn_off4(a->dout, sq.tb, sq.q0 + i, h, 0), dv, b->dobuf);
            rows_load(kr, a->o, attn_off4(a->o, sq.tb, sq.q0 + i, h, 0), dv, b->row);
            float acc;
            kr->dot_rows(b->dobuf, b->row, 1, dv, dv, &acc);
            /* gated (o = g a): the attention's gradient is g dO */
            float gt = p->out_gate ? (float)attn_load_f64(p->out_gate,
                                                          attn_off4(p->out_gate, sq.tb, sq.q0 + i,
                                                                    h, p->out_gate_col))
                                   : 1.0f;
            b->gate[(gi - g0) * n + i] = gt;
            b->delta[(gi - g0) * n + i] = acc; /* of dO itself: g is folded into P */
        }
    }
    /* dQ of the task's heads in contiguous rows: accumulating into dq's own
     * rows (H D apart, a multiple of 4 KiB at H D = 1024) ran 4 % slower */
    memset(b->dq, 0, (size_t)((g1 - g0) * n * d) * sizeof(float));
    float *part_dkv = a->parts > 1 ? part_rows(a, bi, hk, part) : NULL;

    for (int64_t j0 = 0; j0 < sq.m; j0 += bk) {
        const int64_t nk = j0 + bk <= sq.m ? bk : sq.m - j0, kb = j0 / bk;
        rows_load_block(kr, a->k, attn_off4(a->k, sq.tb, sq.k0 + j0, hk, 0), a->k->stride[1],
                        nk, d, b->kbuf, d);
        for (int64_t r = 0; r < nk; r++)
            for (int64_t x = 0; x < d; x++) b->kt[x * bk + r] = b->kbuf[r * d + x];
        for (int64_t r = 0; r < nk; r++) {
            rows_load(kr, a->v, attn_off4(a->v, sq.tb, sq.k0 + j0 + r, hk, 0), dv, b->row);
            for (int64_t x = 0; x < dv; x++) b->vt[x * bk + r] = b->row[x];
        }
        memset(b->dk, 0, (size_t)(nk * d) * sizeof(float));
        memset(b->dv, 0, (size_t)(nk * dv) * sizeof(float));

        /* the (head, query block) pairs that see the block, then each with
         * the next one's Q and dO rows asked for ahead: the rows of one
         * head are strided, and a plan's query blocks are scattered */
        int64_t nv = 0;
        for (int64_t gi = g0; gi < g1; gi++)
            for (int64_t i0 = 0; i0 < n; i0 += bq) {
                bwd_visit vi = {gi, i0, i0 + bq <= n ? bq : n - i0, 0, false};
                if (pair_visit(a, &sq, hk * g + gi, kb, j0, nk, &vi)) b->visits[nv++] = vi;
            }
        /* dK, dV of the block: each head's pairs summed alone, the heads then
         * added in order (T_0 + T_1) + ... whatever the split into tasks, so
         * that results do not depend on it; the first head sums in place */
        float *tdk = b->dk, *tdv = b->dv;
        for (int64_t x = 0; x < nv; x++) {
            const bwd_visit *vi = &b->visits[x];
            const int64_t h = hk * g + vi->gi, i0 = vi->i0, nq = vi->nq;
            if (x > 0 && vi->gi != vi[-1].gi) { /* a new head */
                fold_head(a, b, nk, tdk, tdv);
                tdk = b->dkh, tdv = b->dvh;
                memset(tdk, 0, (size_t)(nk * d) * sizeof(float));
                memset(tdv, 0, (size_t)(nk * dv) * sizeof(float));
            }
            query_operands qo = {b->qbuf, b->dobuf, d, dv, b->dq + ((vi->gi - g0) * n + i0) * d};
            if (x + 1 < nv) {
                const bwd_visit *nx = &b->visits[x + 1];
                const int64_t hn = hk * g + nx->gi;
                rows_prefetch(a->q, sq.tb, sq.q0 + nx->i0, nx->nq, hn, 0);
                rows_prefetch(a->dout, sq.tb, sq.q0 + nx->i0, nx->nq, hn, 0);
                const char *dqn = (const char *)(b->dq + ((nx->gi - g0) * n + nx->i0) * d);
                for (int64_t y = 0; y < nx->nq * d * (int64_t)sizeof(float); y += 64)
                    __builtin_prefetch(dqn + y, 1, 3); /* its dQ rows, accumulated into */
            }
            const int64_t qoff = attn_off4(a->q, sq.tb, sq.q0 + i0, h, 0);
            const int64_t dooff = attn_off4(a->dout, sq.tb, sq.q0 + i0, h, 0);
            if (a->q->dtype == ATTN_F32 && a->q->stride[3] == 1)
                qo.q = (const float *)a->q->data + qoff, qo.ldq = a->q->stride[1];
            else
                rows_load_block(kr, a->q, qoff, a->q->stride[1], nq, d, b->qbuf, d);
            if (a->dout->dtype == ATTN_F32 && a->dout->stride[3] == 1)
                qo.dout = (const float *)a->dout->data + dooff, qo.lddo = a->dout->stride[1];
            else
                rows_load_block(kr, a->dout, dooff, a->dout->stride[1], nq, dv, b->dobuf, dv);
            if (vi->level > 0) {
                key_operands ko = pooled_operands(a, b, nk, vi->level);
                pair(a, b, &sq, vi->gi - g0, i0, nq, j0, &qo, &ko, false);
                unpool_gradients(a, b, nk, vi->level, tdk, tdv);
            } else {
                key_operands ko = {b->kbuf, b->kt, b->vt, tdk, tdv, NULL, nk};
                pair(a, b, &sq, vi->gi - g0, i0, nq, j0, &qo, &ko, vi->masked);
            }
        }
        fold_head(a, b, nk, tdk, tdv);
        for (int64_t r = 0; r < nk; r++) {
            if (part_dkv) { /* summed over the parts later, in order */
                memcpy(part_dkv + (j0 + r) * (d + dv), b->dk + r * d, (size_t)d * sizeof(float));
                memcpy(part_dkv + (j0 + r) * (d + dv) + d, b->dv + r * dv, (size_t)dv * sizeof(float));
                continue;
            }
            put_row(a, a->dk, attn_off4(a->dk, sq.tb, sq.k0 + j0 + r, hk, 0), d, b->dk + r * d, b->row);
            put_row(a, a->dv, attn_off4(a->dv, sq.tb, sq.k0 + j0 + r, hk, 0), dv, b->dv + r * dv,
                    b->row);
        }
    }
    const bool read_back = p->out_gate && p->out_accumulate;
    for (int64_t gi = g0; gi < g1; gi++)
        for (int64_t i = 0; i < n; i++) {
            if (read_back && i % 32 == 0 && i + 32 < n) /* dq rows read back: the next 32 */
                rows_prefetch(a->dq, sq.tb, sq.q0 + i + 32, n - i - 32 < 32 ? n - i - 32 : 32,
                              hk * g + gi, 1);
            put_row(a, a->dq, attn_off4(a->dq, sq.tb, sq.q0 + i, hk * g + gi, 0), d,
                    b->dq + ((gi - g0) * n + i) * d, b->row);
        }
}

/* dK/dV row j of kv head hk of sequence bi: the parts' partial sums added in
 * part order (the same order for any thread count). acc holds 2 (d + dv) floats. */
static void sum_parts(const bwd_args *a, int64_t bi, int64_t hk, int64_t j, float *acc) {
    const int64_t d = a->p->d, dv = a->p->dv, w = d + dv;
    const attn_seq sq = attn_problem_seq(a->p, bi);
    memcpy(acc, part_rows(a, bi, hk, 0) + j * w, (size_t)w * sizeof(float));
    for (int64_t part = 1; part < a->parts; part++) {
        const float *x = part_rows(a, bi, hk, part) + j * w;
        for (int64_t c = 0; c < w; c++) acc[c] += x[c];
    }
    put_row(a, a->dk, attn_off4(a->dk, sq.tb, sq.k0 + j, hk, 0), d, acc, acc + w);
    put_row(a, a->dv, attn_off4(a->dv, sq.tb, sq.k0 + j, hk, 0), dv, acc + d, acc + w);
}

attn_status engine_backward(const attn_ctx *ctx, const attn_problem *p, const attn_tensor *q,
                            const attn_tensor *k, const attn_tensor *v, const attn_tensor *o,
                            const attn_tensor *lse, const attn_tensor *dout, attn_tensor *dq,
                            attn_tensor *dk, attn_tensor *dv) {
    const int64_t g = p->h / p->hk;
    const int threads = ctx->threads;
    /* tasks: (sequence, kv head), each with its whole GQA group, when they
     * are enough for the threads; else one per query head, whose dK/dV
     * sums wait in part_dkv. Either way every sum runs in the same order
     * (see run_task), so the split may follow the thread count. */
    const int64_t parts = p->batch * p->hk >= threads ? 1 : g;
    bwd_args a = {ctx, p, q, k, v, o, lse, dout, dq, dk, dv,
                  p->plan ? p->plan->block_q : tiling_bwd_bq(p->d),
                  p->plan ? p->plan->block_k : tiling_bwd_bk(p->d, p->window_left >= 0),
                  parts, g / parts, 0, NULL};
    int64_t nmax = 0;
    for (int64_t bi = 0; bi < p->batch; bi++) {
        attn_seq sq = attn_problem_seq(p, bi);
        if (sq.n > nmax) nmax = sq.n;
        if (sq.m > a.mmax) a.mmax = sq.m;
    }
    size_t stride;
    scratch count = {NULL, 0};
    bwd_carve(&count, a.bq, a.bk, p->d, p->dv, a.gp, nmax);
    float *scr = scratch_alloc(threads, count.used, &stride);
    if (a.parts > 1)
        a.part_dkv = big_alloc((size_t)(p->batch * p->hk * a.parts) * (size_t)a.mmax *
                               (size_t)(p->d + p->dv) * sizeof(float));
    if (!scr || (a.parts > 1 && !a.part_dkv)) {
        free(scr);
        free(a.part_dkv);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for backward scratch");
    }
    const int64_t n_tasks = p->batch * p->hk * a.parts;
#pragma omp parallel num_threads(threads)
    {
        int tid = engine_thread_id();
        scratch mine = {scr + stride * (size_t)tid, 0};
        bwd_bufs b = bwd_carve(&mine, a.bq, a.bk, p->d, p->dv, a.gp, nmax);
#pragma omp for schedule(dynamic, 1)
        for (int64_t ti = 0; ti < n_tasks; ti++)
            run_task(&a, &b, ti / (p->hk * a.parts), (ti / a.parts) % p->hk, ti % a.parts);
        if (a.parts > 1) {
#pragma omp for schedule(static)
            for (int64_t x = 0; x < p->batch * p->hk * a.mmax; x++) {
                int64_t bi = x / (p->hk * a.mmax), hk = (x / a.mmax) % p->hk, j = x % a.mmax;
                if (j < attn_problem_seq(p, bi).m) sum_parts(&a, bi, hk, j, b.dkv);
            }
        }
    }
    free(scr);
    free(a.part_dkv);
    return ATTN_OK;
}
