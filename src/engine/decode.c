/* KV-cache decode with split-KV: 1..16 new queries per sequence against a
 * long cache. A task is (sequence, kv head, key split); its rows are all the
 * queries that share the kv head (GQA group x new tokens), so each cache row
 * is read once per task. Splits have a fixed size (tiling.h), not one per
 * thread, and are merged by LSE in split order: the result does not depend
 * on the thread count. */
#include <math.h>
#include <stdlib.h>

#include "engine.h"
#include "lse_merge.h"
#include "rows.h"
#include "tiling.h"

typedef struct dec_bufs {
    float *q;     /* [hk][rows][d] pre-scaled queries */
    float *kbuf;  /* [blk][hk][d] f32 staging, for caches without unit stride */
    float *vbuf;  /* [blk][hk][dv] */
    float *s;     /* [hk][rows][blk] logits then probabilities */
    float *o;     /* [hk][rows][dv] unnormalised outputs */
    float *m, *l, *alpha; /* [hk][rows] */
} dec_bufs;

static dec_bufs dec_carve(scratch *s, int64_t hk, int64_t rows, int64_t blk, int64_t d,
                          int64_t dv) {
    dec_bufs b;
    b.q = scratch_take(s, (size_t)(hk * rows * d));
    b.kbuf = scratch_take(s, (size_t)(blk * hk * d));
    b.vbuf = scratch_take(s, (size_t)(blk * hk * dv));
    b.s = scratch_take(s, (size_t)(hk * blk * rows));
    b.o = scratch_take(s, (size_t)(hk * rows * dv));
    b.m = scratch_take(s, (size_t)(hk * rows));
    b.l = scratch_take(s, (size_t)(hk * rows));
    b.alpha = scratch_take(s, (size_t)(hk * rows));
    return b;
}

/* A block of cache rows as the decode kernels read it. */
typedef struct operand {
    attn_dtype kind;     /* f32, f16 or bf16 */
    const void *data;
    int64_t ld, hs;      /* elements between rows, between heads */
} operand;

/* nk cache rows of all kv heads from element off: read in place when the
 * head dim has unit stride, else converted to f32 into buf [nk][heads][n]. */
static operand cache_rows(const attn_kernels *kr, const attn_tensor *t, int64_t off,
                          int64_t heads, int64_t nk, int64_t n, float *buf) {
    if (t->stride[3] == 1) {
        size_t es = attn_dtype_size(t->dtype);
        operand o = {t->dtype, (const char *)t->data + (size_t)off * es, t->stride[1],
                     t->stride[2]};
        return o;
    }
    for (int64_t j = 0; j < nk; j++)
        for (int64_t h = 0; h < heads; h++)
            rows_load(kr, t, off + j * t->stride[1] + h * t->stride[2], n,
                      buf + (j * heads + h) * n);
    operand o = {ATTN_F32, buf, heads * n, n};
    return o;
}

/* Whether some query of the sequence sees only part of keys [j0, j0 + nk). */
static bool partly_masked(const attn_problem *p, int64_t nq, int64_t m, int64_t j0, int64_t nk) {
    for (int64_t t = 0; t < nq; t++) {
        int64_t a, z;
        attn_visible_range(p, nq, m, t, &a, &z);
        if (a > j0 || z < j0 + nk - 1) return true;
    }
    return false;
}

/* Whether cache rows [j0, j0 + nk) of v (all heads) are finite. */
static bool finite_rows(const attn_tensor *v, int64_t tb, int64_t j0, int64_t nk) {
    for (int64_t j = 0; j < nk; j++)
        for (int64_t h = 0; h < v->shape[2]; h++) {
            int64_t off = attn_off4(v, tb, j0 + j, h, 0);
            for (int64_t c = 0; c < v->shape[3]; c++)
                if (!isfinite(attn_load_f64(v, off + c * v->stride[3]))) return false;
        }
    return true;
}

/* P * V over visible keys only, for a partly masked block holding a NaN or
 * Inf: a masked probability is 0, and 0 * NaN would leak into rows that do
 * not see the key. */
static void masked_pv(const attn_kernels *kr, const attn_problem *p, const attn_seq *sq,
                      const attn_tensor *v, const dec_bufs *b, int64_t j0, int64_t nk) {
    const int64_t g = p->h / p->hk, nq = p->n, rows = g * nq, dv = p->dv;
    for (int64_t hk = 0; hk < p->hk; hk++)
        for (int64_t j = 0; j < nk; j++) {
            rows_load(kr, v, attn_off4(v, sq->tb, j0 + j, hk, 0), dv, b->vbuf);
            for (int64_t r = 0; r < rows; r++) {
                int64_t a, z;
                attn_visible_range(p, nq, sq->m, r / g, &a, &z);
                if (j0 + j < a || j0 + j > z) continue;
                kr->axpy(dv, b->s[(hk * rows + r) * nk + j], b->vbuf, b->o + (hk * rows + r) * dv);
            }
        }
}

/* One split of keys [ks, ke) of sequence bi, for every kv head at once (the
 * cache streams in memory order). Writes the normalised partial output and
 * natural-log LSE of each row, rows ordered [hk][t][head in group]. */
static void run_split(const attn_kernels *kr, const attn_problem *p, const attn_tensor *q,
                      const attn_tensor *k, const attn_tensor *v, const dec_bufs *b,
                      int64_t bi, int64_t ks, int64_t ke, float *part_o, float *part_l) {
    const attn_seq sq = attn_problem_seq(p, bi);
    const int64_t g = p->h / p->hk, nq = p->n, rows = g * nq, d = p->d, dv = p->dv;
    const int64_t blk = tiling_decode_block(p->hk, d, dv), all = p->hk * rows;
    const float qscale = p->softcap > 0.0f ? p->scale : p->scale * LOG2E;

    /* row r of kv head hk = query t = r / g of query head hk * g + r % g */
    int64_t lo = ke, hi = ks - 1;
    for (int64_t x = 0; x < all; x++) {
        int64_t hk = x / rows, r = x % rows, t = r / g, h = hk * g + r % g;
        rows_load(kr, q, attn_off4(q, sq.tb, t, h, 0), d, b->q + x * d);
        for (int64_t c = 0; c < d; c++) b->q[x * d + c] *= qscale;
        b->m[x] = -INFINITY;
        b->l[x] = 0.0f;
        int64_t a, z;
        attn_visible_range(p, nq, sq.m, t, &a, &z);
        if (a < lo) lo = a;
        if (z > hi) hi = z;
    }
    for (int64_t x = 0; x < all * dv; x++) b->o[x] = 0.0f;
    if (lo < ks) lo = ks;
    if (hi > ke - 1) hi = ke - 1;

    for (int64_t j0 = lo; j0 <= hi; j0 += blk) {
        const int64_t nk = (j0 + blk <= hi + 1) ? blk : hi + 1 - j0;
        operand K = cache_rows(kr, k, attn_off4(k, sq.tb, j0, 0, 0), p->hk, nk, d, b->kbuf);
        operand V = cache_rows(kr, v, attn_off4(v, sq.tb, j0, 0, 0), p->hk, nk, dv, b->vbuf);
        kr->qk_heads(K.kind, K.data, K.ld, K.hs, p->hk, nk, b->q, rows, d, b->s);
        for (int64_t hk = 0; hk < p->hk; hk++) {
            float *s = b->s + hk * rows * nk; /* [rows][nk] */
            for (int64_t r = 0; r < rows; r++) {
                int64_t a, z;
                attn_visible_range(p, nq, sq.m, r / g, &a, &z);
                float *sr = s + r * nk;
                if (p->softcap > 0.0f)
                    kr->softcap(sr, 1, nk, nk, 1.0f / p->softcap, p->softcap * LOG2E, NULL, 0);
                for (int64_t j = 0; j < nk && j0 + j < a; j++) sr[j] = -INFINITY;
                for (int64_t j = z + 1 - j0 > 0 ? z + 1 - j0 : 0; j < nk; j++) sr[j] = -INFINITY;
            }
            float *m = b->m + hk * rows, *l = b->l + hk * rows, *al = b->alpha + hk * rows;
            kr->softmax_rows(s, rows, nk, nk, m, l, al);
            /* rescale this head's outputs: O = diag(alpha) O (a GEMM with k = 0) */
            kr->gemm(rows, dv, 0, s, 1, rows, b->o, dv, b->o + hk * rows * dv, dv, 0, al);
        }
        if (partly_masked(p, nq, sq.m, j0, nk) && !finite_rows(v, sq.tb, j0, nk))
            masked_pv(kr, p, &sq, v, b, j0, nk);
        else
            kr->pv_heads(V.kind, V.data, V.ld, V.hs, p->hk, nk, b->s, rows, dv, b->o);
    }
    for (int64_t x = 0; x < all; x++) {
        float l = b->l[x];
        float inv = l > 0.0f ? 1.0f / l : (l == 0.0f ? 0.0f : l);
        for (int64_t c = 0; c < dv; c++) part_o[x * dv + c] = b->o[x * dv + c] * inv;
        part_l[x] = l > 0.0f ? b->m[x] * LN2 + logf(l) : (l == 0.0f ? -INFINITY : l);
    }
}

attn_status engine_decode(const attn_ctx *ctx, const attn_problem *p, const attn_tensor *q,
                          const attn_tensor *k, const attn_tensor *v, attn_tensor *o,
                          attn_tensor *lse) {
    const int64_t g = p->h / p->hk, rows = g * p->n, all = p->hk * rows, dv = p->dv;
    const int64_t split = tiling_decode_split(p->m);
    const int64_t nsplit = (p->m + split - 1) / split;
    const int64_t n_tasks = p->batch * nsplit;
    const int threads = ctx->threads;

    /* partial results [task][all][dv] and LSEs [task][all] */
    float *part = malloc((size_t)n_tasks * (size_t)all * (size_t)(dv + 1) * sizeof(float));
    const int64_t blk = tiling_decode_block(p->hk, p->d, dv);
    size_t stride;
    scratch count = {NULL, 0};
    dec_carve(&count, p->hk, rows, blk, p->d, dv);
    float *scr = scratch_alloc(threads, count.used, &stride);
    if (!part || !scr) {
        free(part);
        free(scr);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for decode scratch");
    }
    float *part_l = part + (size_t)n_tasks * (size_t)all * (size_t)dv;

#pragma omp parallel num_threads(threads)
    {
        int tid = engine_thread_id();
        scratch mine = {scr + stride * (size_t)tid, 0};
        dec_bufs b = dec_carve(&mine, p->hk, rows, blk, p->d, dv);
#pragma omp for schedule(dynamic, 1)
        for (int64_t ti = 0; ti < n_tasks; ti++) {
            int64_t bi = ti / nsplit, s = ti % nsplit;
            int64_t m = attn_problem_seq(p, bi).m;
            int64_t ks = s * split, ke = ks + split < m ? ks + split : m;
            float *po = part + (size_t)ti * (size_t)(all * dv);
            float *pl = part_l + (size_t)ti * (size_t)all;
            if (ks >= ke) {
                for (int64_t x = 0; x < all; x++) pl[x] = -INFINITY;
                for (int64_t x = 0; x < all * dv; x++) po[x] = 0.0f;
                continue;
            }
            run_split(ctx->kernels, p, q, k, v, &b, bi, ks, ke, po, pl);
        }

        /* merge each row's splits in split order, then write it */
#pragma omp for schedule(static)
        for (int64_t gx = 0; gx < p->batch * all; gx++) {
            int64_t bi = gx / all, x = gx % all;
            int64_t hk = x / rows, r = x % rows, t = r / g, h = hk * g + r % g;
            size_t t0 = (size_t)(bi * nsplit);
            float *acc = part + (t0 * (size_t)all + (size_t)x) * (size_t)dv;
            float *accl = part_l + t0 * (size_t)all + (size_t)x;
            for (int64_t s = 1; s < nsplit; s++) {
                size_t ts = t0 + (size_t)s;
                merge_rows(acc, accl, part + (ts * (size_t)all + (size_t)x) * (size_t)dv,
                           part_l[ts * (size_t)all + (size_t)x], dv);
            }
            rows_store(ctx->kernels, o, attn_off4(o, bi, t, h, 0), dv, acc);
            if (lse) attn_store_f64(lse, attn_off3(lse, bi, h, t), *accl);
        }
    }
    free(scr);
    free(part);
    return ATTN_OK;
}
