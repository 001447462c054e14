/* Tiled softmax attention, forward (FlashAttention-2 order): one task is a
 * block of bq query rows of one head; it walks the key blocks of its plan,
 * keeping the online-softmax state (m, l) and an f32 output tile. The logit
 * tile is stored transposed, S^T[key][query], so that K rows are the GEMM's
 * broadcast operand (read in place when f32) and the softmax vectorises
 * across queries. No N x M buffer exists anywhere. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "rows.h"
#include "tiling.h"

/* Set logits of keys outside each query's visible range to -inf. Rows of the
 * tile are keys j0.., columns queries i0..; the queries that see a key form
 * one run, so each row masks a prefix and a suffix. */
static void mask_tile(const attn_problem *p, const attn_seq *sq, float *s, int64_t ld,
                      int64_t i0, int64_t nq, int64_t j0, int64_t nk) {
    if (p->grid_w > 0) { /* grid neighbourhoods: no runs, element by element */
        for (int64_t r = 0; r < nk; r++)
            for (int64_t c = 0; c < nq; c++)
                if (!attn_key_visible(p, sq->n, sq->m, i0 + c, j0 + r)) s[r * ld + c] = -INFINITY;
        return;
    }
    for (int64_t r = 0; r < nk; r++) {
        int64_t lo, hi;
        attn_visible_queries(p, sq->n, sq->m, j0 + r, &lo, &hi);
        lo -= i0;
        hi -= i0;
        float *row = s + r * ld;
        if (lo > hi) lo = nq; /* nobody in this tile sees the key */
        for (int64_t c = 0; c < nq && c < lo; c++) row[c] = -INFINITY;
        for (int64_t c = hi + 1 > 0 ? hi + 1 : 0; c < nq; c++) row[c] = -INFINITY;
    }
}

/* Whether every key in [j0, j1) is visible to every query in [i0, i1). */
static bool block_fully_visible(const attn_problem *p, const attn_seq *sq, int64_t i0,
                                int64_t i1, int64_t j0, int64_t j1) {
    if (p->grid_w > 0) return false; /* a grid rule cuts every block it does not skip */
    int64_t lo_last, hi_last, lo_first, hi_first;
    attn_visible_range(p, sq->n, sq->m, i1 - 1, &lo_last, &hi_last);
    attn_visible_range(p, sq->n, sq->m, i0, &lo_first, &hi_first);
    return lo_last <= j0 && j1 - 1 <= hi_first;
}

typedef struct fwd_bufs {
    float *qt;    /* [d][bq]   Q^T, pre-scaled */
    float *kbuf;  /* [bk][d]   K block as f32, when K is not f32 with unit stride */
    float *vbuf;  /* [bk][dv] */
    float *s;     /* [bk][bq]  logits, then probabilities */
    float *o;     /* [bq][dv]  unnormalised output */
    float *m, *l, *alpha; /* [bq] */
    float *row;   /* [max(d, dv)] */
} fwd_bufs;

static fwd_bufs fwd_carve(scratch *s, int64_t bq, int64_t bk, int64_t d, int64_t dv) {
    fwd_bufs b;
    b.qt = scratch_take(s, (size_t)(d * bq));
    b.kbuf = scratch_take(s, (size_t)(bk * d));
    b.vbuf = scratch_take(s, (size_t)(bk * dv));
    b.s = scratch_take(s, (size_t)(bk * bq));
    b.o = scratch_take(s, (size_t)(bq * dv));
    b.m = scratch_take(s, (size_t)bq);
    b.l = scratch_take(s, (size_t)bq);
    b.alpha = scratch_take(s, (size_t)bq);
    b.row = scratch_take(s, (size_t)(d > dv ? d : dv));
    return b;
}

/* No NaN or Inf in the tile: exponent bits all ones mark both. An integer OR
 * without early exit, so that the compiler vectorises it. */
static bool all_finite(const float *x, int64_t rows, int64_t cols, int64_t ld) {
    uint32_t bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        for (int64_t c = 0; c < cols; c++) {
            uint32_t u;
            memcpy(&u, xr + c, 4);
            bad |= (u & 0x7f800000u) == 0x7f800000u;
        }
    }
    return !bad;
}

/* P * V over visible keys only: a masked key's probability is 0, but 0 * NaN
 * is NaN, and a NaN or Inf in V must reach only the rows that see its key.
 * Runs only on blocks that are partly masked and hold a non-finite V.
 * s: P^T [nk][lds] for queries i0.., o: [nq][dv], alpha: [nq]. */
static void masked_pv(const attn_kernels *kr, const attn_problem *p, const attn_seq *sq,
                      const float *s, int64_t lds, float *o, const float *alpha, int64_t i0,
                      int64_t nq, int64_t j0, int64_t nk, const float *vb, int64_t ldv) {
    const int64_t dv = p->dv;
    for (int64_t c = 0; c < nq; c++) {
        float *orow = o + c * dv;
        for (int64_t x = 0; x < dv; x++) orow[x] *= alpha[c];
        for (int64_t r = 0; r < nk; r++)
            if (attn_key_visible(p, sq->n, sq->m, i0 + c, j0 + r))
                kr->axpy(dv, s[r * lds + c], vb + r * ldv, orow);
    }
}

/* Pooled K and V of every pyramid level a plan uses, built once per call:
 * level l holds, per (sequence, kv head), each key block's groups of 2^l keys
 * as their means, [B][Hk][nkb * gpb[l]][D] f32 (gpb: groups per block). A
 * pooled block is then read like any f32 block, not re-pooled for every
 * query block that visits it. */
typedef struct pyramid {
    float *k[16], *v[16];
    int64_t gpb[16], rows[16];
} pyramid;

static void pyramid_free(pyramid *py) {
    for (int l = 0; l < 16; l++) free(py->k[l]), free(py->v[l]);
}

static attn_status pyramid_build(const attn_ctx *ctx, const attn_problem *p, const attn_tensor *k,
                                 const attn_tensor *v, pyramid *py) {
    memset(py, 0, sizeof *py);
    const attn_plan *pl = p->plan;
    unsigned used = 0;
    for (int64_t e = 0; e < pl->row_offsets[pl->heads * pl->n_qblocks]; e++)
        used |= 1u << pl->entries[e].level;
    const int64_t bk = pl->block_k, nkb = pl->n_kblocks, dmax = p->d > p->dv ? p->d : p->dv;
    for (int l = 1; l < 16; l++) {
        if (!(used & (1u << l))) continue;
        py->gpb[l] = (bk + ((int64_t)1 << l) - 1) >> l;
        py->rows[l] = nkb * py->gpb[l];
        size_t n = (size_t)(p->batch * p->hk * py->rows[l]);
        py->k[l] = malloc(n * (size_t)p->d * sizeof(float));
        py->v[l] = malloc(n * (size_t)p->dv * sizeof(float));
        if (!py->k[l] || !py->v[l]) {
            pyramid_free(py);
            return attn_err(ATTN_ERR_NOMEM, "out of memory for the pooled key/value pyramid");
        }
    }
    size_t stride;
    float *tmp = scratch_alloc(ctx->threads, (size_t)dmax, &stride);
    if (!tmp) {
        pyramid_free(py);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for the pooled key/value pyramid");
    }
    const int64_t jobs = p->batch * p->hk * nkb;
#pragma omp parallel for num_threads(ctx->threads) schedule(static)
    for (int64_t x = 0; x < jobs; x++) {
        float *row = tmp + stride * (size_t)engine_thread_id();
        const int64_t bi = x / (p->hk * nkb), hk = (x / nkb) % p->hk, kb = x % nkb;
        const int64_t j0 = kb * bk, nk = j0 + bk <= p->m ? bk : p->m - j0;
        for (int l = 1; l < 16; l++) {
            if (!py->k[l]) continue;
            size_t r0 = (size_t)((bi * p->hk + hk) * py->rows[l] + kb * py->gpb[l]);
            rows_pool(ctx->kernels, k, attn_off4(k, bi, j0, hk, 0), k->stride[1], nk, l, p->d,
                      py->k[l] + r0 * (size_t)p->d, row);
            rows_pool(ctx->kernels, v, attn_off4(v, bi, j0, hk, 0), v->stride[1], nk, l, p->dv,
                      py->v[l] + r0 * (size_t)p->dv, row);
        }
    }
    free(tmp);
    return ATTN_OK;
}

/* One key block [j0, j1) against the current query tile. */
static void visit_block(const attn_kernels *kr, const attn_problem *p, const attn_seq *sq,
                        const attn_tensor *k, const attn_tensor *v, int64_t hk,
                        const fwd_bufs *b, int64_t bq, int64_t i0, int64_t nq, int64_t j0,
                        int64_t j1, int64_t next, bool masked, int level, const pyramid *py) {
    const int64_t d = p->d, dv = p->dv;
    int64_t nk = j1 - j0;
    if (next >= 0 && next < sq->m) { /* the block visited next (full-resolution rows) */
        int64_t n2 = next + nk <= sq->m ? nk : sq->m - next;
        rows_prefetch(k, sq->tb, sq->k0 + next, n2, hk, 0);
        rows_prefetch(v, sq->tb, sq->k0 + next, n2, hk, 0);
    }
    const float *ka, *vb;
    int64_t lda, ldv;
    int64_t koff = attn_off4(k, sq->tb, sq->k0 + j0, hk, 0);
    int64_t voff = attn_off4(v, sq->tb, sq->k0 + j0, hk, 0);
    const int64_t keys = nk; /* before pooling */
    if (level > 0) { /* the block's pyramid level: group means, fewer keys */
        size_t r0 = (size_t)((sq->tb * p->hk + hk) * py->rows[level] +
                             (j0 / p->plan->block_k) * py->gpb[level]);
        nk = (nk + ((int64_t)1 << level) - 1) >> level;
        ka = py->k[level] + r0 * (size_t)d, lda = d;
        vb = py->v[level] + r0 * (size_t)dv, ldv = dv;
    } else if (k->dtype == ATTN_F32 && k->stride[3] == 1) {
        ka = (const float *)k->data + koff;
        lda = k->stride[1];
    } else {
        rows_load_block(kr, k, koff, k->stride[1], nk, d, b->kbuf, d);
        ka = b->kbuf;
        lda = d;
    }
    if (level > 0) {
        /* pooled V is in place already */
    } else if (v->dtype == ATTN_F32 && v->stride[3] == 1) {
        vb = (const float *)v->data + voff;
        ldv = v->stride[1];
    } else {
        rows_load_block(kr, v, voff, v->stride[1], nk, dv, b->vbuf, dv);
        vb = b->vbuf;
        ldv = dv;
    }
    /* Only the queries that see some key of the block: on the causal diagonal
     * (and window edges) the others are skipped, not computed and masked. */
    int64_t c0 = 0, c1 = nq;
    if (masked && p->grid_w == 0) { /* (grid boxes are not monotone in the token) */
        int64_t lo, hi, lo2, hi2;
        attn_visible_queries(p, sq->n, sq->m, j0, &lo, &hi);
        attn_visible_queries(p, sq->n, sq->m, j1 - 1, &lo2, &hi2);
        if (lo - i0 > c0) c0 = lo - i0;
        if (hi2 + 1 - i0 < c1) c1 = hi2 + 1 - i0;
        if (c0 >= c1) return;
    }
    const int64_t nc = c1 - c0;
    float *s = b->s + c0, *o = b->o + c0 * dv, *m = b->m + c0, *l = b->l + c0,
          *alpha = b->alpha + c0;
    /* S^T[nk][nc] = K[nk][d] * Q^T[d][nc] */
    kr->gemm(nk, nc, d, ka, lda, 1, b->qt + c0, bq, s, bq, 0, NULL);
    if (p->softcap > 0.0f) /* s = cap * tanh(s / cap), in log2 units */
        kr->softcap(s, nk, nc, bq, 1.0f / p->softcap, p->softcap * LOG2E, NULL, 0);
    if (level > 0) /* a pooled key weighs as the keys it stands for: + log2(count) */
        for (int64_t r = 0; r < nk; r++) {
            float bonus = log2f((float)pool_count(keys, level, r));
            for (int64_t c = 0; c < nc; c++) s[r * bq + c] += bonus;
        }
    if (masked) mask_tile(p, sq, s, bq, i0 + c0, nc, j0, nk);
    kr->softmax_cols(s, nk, nc, bq, m, l, alpha);
    /* O[nc][dv] = diag(alpha) O + P[nc][nk] * V[nk][dv], P read from S^T */
    if (masked && !all_finite(vb, nk, dv, ldv))
        masked_pv(kr, p, sq, s, bq, o, alpha, i0 + c0, nc, j0, nk, vb, ldv);
    else
        kr->gemm(nc, dv, nk, s, 1, bq, vb, ldv, o, dv, 0, alpha);
}

static void run_task(const attn_ctx *ctx, const attn_problem *p, const attn_tensor *q,
                     const attn_tensor *k, const attn_tensor *v, attn_tensor *o,
                     attn_tensor *lse, const fwd_bufs *b, const pyramid *py, int64_t bq,
                     int64_t bk, int64_t bi, int64_t h, int64_t qb) {
    const attn_kernels *kr = ctx->kernels;
    const attn_seq sq = attn_problem_seq(p, bi);
    const int64_t d = p->d, dv = p->dv, hk = h / (p->h / p->hk);
    const int64_t i0 = qb * bq, nq = (i0 + bq <= sq.n) ? bq : sq.n - i0;
    const float qscale = p->softcap > 0.0f ? p->scale : p->scale * LOG2E;

    const bool read_back = p->out_gate && p->out_accumulate;
    rows_prefetch(q, sq.tb, sq.q0 + i0, nq, h, 0);
    if (!read_back) rows_prefetch(o, sq.tb, sq.q0 + i0, nq, h, 1); /* else asked for at the end */
    for (int64_t c = 0; c < nq; c++) {
        rows_load(kr, q, attn_off4(q, sq.tb, sq.q0 + i0 + c, h, 0), d, b->row);
        for (int64_t x = 0; x < d; x++) b->qt[x * bq + c] = b->row[x] * qscale;
        b->m[c] = -INFINITY;
        b->l[c] = 0.0f;
    }
    for (int64_t x = 0; x < nq * dv; x++) b->o[x] = 0.0f;

    if (p->plan) {
        const attn_plan *pl = p->plan;
        int64_t row = attn_plan_head(pl, h, p->h, p->hk) * pl->n_qblocks + qb;
        for (int64_t e = pl->row_offsets[row]; e < pl->row_offsets[row + 1]; e++) {
            const attn_plan_entry *en = &pl->entries[e];
            int64_t j0 = (int64_t)en->key_block * bk;
            int64_t j1 = j0 + bk < sq.m ? j0 + bk : sq.m;
            bool masked = en->mask == ATTN_BLOCK_PARAMS &&
                          !block_fully_visible(p, &sq, i0, i0 + nq, j0, j1);
            int64_t next = e + 1 < pl->row_offsets[row + 1] && en[1].level == 0
                               ? (int64_t)en[1].key_block * bk : -1;
            visit_block(kr, p, &sq, k, v, hk, b, bq, i0, nq, j0, j1, next, masked, en->level, py);
        }
    } else if (sq.m > 0) {
        /* keys seen by the first query from the left, by the last from the right */
        int64_t lo, hi, unused;
        attn_visible_range(p, sq.n, sq.m, i0, &lo, &unused);
        attn_visible_range(p, sq.n, sq.m, i0 + nq - 1, &unused, &hi);
        for (int64_t j0 = (lo / bk) * bk; j0 <= hi; j0 += bk) {
            int64_t j1 = j0 + bk < sq.m ? j0 + bk : sq.m;
            bool full = block_fully_visible(p, &sq, i0, i0 + nq, j0, j1);
            visit_block(kr, p, &sq, k, v, hk, b, bq, i0, nq, j0, j1, j1, !full, 0, NULL);
        }
    }

    if (read_back) /* read below: ask for all rows at once */
        rows_prefetch(o, sq.tb, sq.q0 + i0, nq, h, 1);
    for (int64_t c = 0; c < nq; c++) {
        float *orow = b->o + c * dv;
        float inv = b->l[c] > 0.0f ? 1.0f / b->l[c] : 0.0f;
        if (b->l[c] != b->l[c]) inv = b->l[c]; /* NaN row stays NaN */
        const int64_t ooff = attn_off4(o, sq.tb, sq.q0 + i0 + c, h, 0);
        if (p->out_gate) /* the gated epilogue: o = g a (+ o) */
            inv *= (float)attn_load_f64(p->out_gate, attn_off4(p->out_gate, sq.tb,
                                                               sq.q0 + i0 + c, h,
                                                               p->out_gate_col));
        for (int64_t x = 0; x < dv; x++) orow[x] *= inv;
        if (p->out_gate && p->out_accumulate) {
            rows_load(kr, o, ooff, dv, b->row);
            for (int64_t x = 0; x < dv; x++) orow[x] += b->row[x];
        }
        rows_store(kr, o, ooff, dv, orow);
        if (lse) {
            float val = b->l[c] > 0.0f ? b->m[c] * LN2 + logf(b->l[c])
                        : (b->l[c] == 0.0f ? -INFINITY : b->l[c]);
            attn_store_f64(lse, attn_off3(lse, sq.tb, h, sq.q0 + i0 + c), val);
        }
    }
}

attn_status engine_forward(const attn_ctx *ctx, const attn_problem *p, const attn_tensor *q,
                           const attn_tensor *k, const attn_tensor *v, attn_tensor *o,
                           attn_tensor *lse) {
    const int64_t bq = p->plan ? p->plan->block_q : tiling_fwd_bq(p->d, p->dv);
    const int64_t bk = p->plan ? p->plan->block_k : tiling_fwd_bk(p->d, p->dv);

    /* tasks: (sequence, query block) pairs, times heads */
    int64_t n_tasks_seq = 0;
    for (int64_t bi = 0; bi < p->batch; bi++)
        n_tasks_seq += (attn_problem_seq(p, bi).n + bq - 1) / bq;
    int64_t *task_seq = malloc((size_t)(n_tasks_seq > 0 ? n_tasks_seq : 1) * 2 * sizeof(int64_t));
    if (!task_seq) return attn_err(ATTN_ERR_NOMEM, "out of memory for the task list");
    int64_t t = 0;
    for (int64_t bi = 0; bi < p->batch; bi++) {
        int64_t nqb = (attn_problem_seq(p, bi).n + bq - 1) / bq;
        for (int64_t qb = nqb - 1; qb >= 0; qb--) { /* heavy causal blocks first */
            task_seq[2 * t] = bi;
            task_seq[2 * t + 1] = qb;
            t++;
        }
    }

    const int threads = ctx->threads;
    pyramid py;
    memset(&py, 0, sizeof py);
    if (p->plan) {
        attn_status st = pyramid_build(ctx, p, k, v, &py);
        if (st != ATTN_OK) {
            free(task_seq);
            return st;
        }
    }
    size_t stride;
    scratch count = {NULL, 0};
    fwd_carve(&count, bq, bk, p->d, p->dv);
    float *scr = scratch_alloc(threads, count.used, &stride);
    if (!scr) {
        free(task_seq);
        pyramid_free(&py);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for forward scratch");
    }
    const int64_t n_tasks = n_tasks_seq * p->h;

#pragma omp parallel num_threads(threads)
    {
        int tid = engine_thread_id();
        scratch mine = {scr + stride * (size_t)tid, 0};
        fwd_bufs b = fwd_carve(&mine, bq, bk, p->d, p->dv);
#pragma omp for schedule(dynamic, 1)
        for (int64_t ti = 0; ti < n_tasks; ti++) {
            /* head-major: consecutive tasks share a head, and its K/V stay in cache */
            int64_t h = ti / n_tasks_seq, s = ti % n_tasks_seq;
            run_task(ctx, p, q, k, v, o, lse, &b, &py, bq, bk, task_seq[2 * s], h,
                     task_seq[2 * s + 1]);
        }
    }
    free(scr);
    free(task_seq);
    pyramid_free(&py);
    return ATTN_OK;
}
