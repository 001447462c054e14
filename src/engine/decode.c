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

#ifdef _OPENMP
#include <omp.h>
#endif

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

typedef struct dec_bufs {
    float *q;     /* [rows][d] pre-scaled queries */
    float *kbuf;  /* [blk][d] */
    float *vbuf;  /* [blk][dv] */
    float *s;     /* [blk][rows] logits then probabilities (column-major) */
    float *o;     /* [rows][dv] */
    float *m, *l, *alpha;
} dec_bufs;

static size_t dec_floats(int64_t rows, int64_t blk, int64_t d, int64_t dv) {
    return (size_t)(rows * d + blk * d + blk * dv + blk * rows + rows * dv + 3 * rows) + 8 * 16;
}

static dec_bufs dec_carve(float *base, int64_t rows, int64_t blk, int64_t d, int64_t dv) {
    scratch s = {base, 0, 0};
    dec_bufs b;
    b.q = scratch_take(&s, (size_t)(rows * d));
    b.kbuf = scratch_take(&s, (size_t)(blk * d));
    b.vbuf = scratch_take(&s, (size_t)(blk * dv));
    b.s = scratch_take(&s, (size_t)(blk * rows));
    b.o = scratch_take(&s, (size_t)(rows * dv));
    b.m = scratch_take(&s, (size_t)rows);
    b.l = scratch_take(&s, (size_t)rows);
    b.alpha = scratch_take(&s, (size_t)rows);
    return b;
}

/* One split of keys [ks, ke) for kv head hk of sequence bi; writes the
 * normalised partial output and its natural-log LSE per row. */
static void run_split(const attn_kernels *kr, const attn_problem *p, const attn_tensor *q,
                      const attn_tensor *k, const attn_tensor *v, const dec_bufs *b,
                      int64_t bi, int64_t hk, int64_t ks, int64_t ke, float *part_o,
                      float *part_l) {
    const attn_seq sq = attn_problem_seq(p, bi);
    const int64_t g = p->h / p->hk, nq = p->n, rows = g * nq, d = p->d, dv = p->dv;
    const int64_t blk = tiling_decode_block();
    const float qscale = p->softcap > 0.0f ? p->scale : p->scale * LOG2E;

    /* row r = (t, head in group): query t of head hk * g + r % g */
    int64_t lo = ke, hi = ks - 1;
    for (int64_t r = 0; r < rows; r++) {
        int64_t t = r / g, h = hk * g + r % g;
        rows_load(kr, q, attn_off4(q, sq.tb, t, h, 0), d, b->q + r * d);
        for (int64_t x = 0; x < d; x++) b->q[r * d + x] *= qscale;
        b->m[r] = -INFINITY;
        b->l[r] = 0.0f;
        int64_t a, z;
        attn_visible_range(p, nq, sq.m, t, &a, &z);
        if (a < lo) lo = a;
        if (z > hi) hi = z;
    }
    for (int64_t x = 0; x < rows * dv; x++) b->o[x] = 0.0f;
    if (lo < ks) lo = ks;
    if (hi > ke - 1) hi = ke - 1;

    for (int64_t j0 = lo; j0 <= hi; j0 += blk) {
        int64_t nk = (j0 + blk <= hi + 1) ? blk : hi + 1 - j0;
        int64_t koff = attn_off4(k, sq.tb, j0, hk, 0), voff = attn_off4(v, sq.tb, j0, hk, 0);
        const float *kb = b->kbuf, *vb = b->vbuf;
        int64_t ldk = d, ldv = dv;
        if (k->dtype == ATTN_F32 && k->stride[3] == 1) {
            kb = (const float *)k->data + koff;
            ldk = k->stride[1];
        } else {
            rows_load_block(kr, k, koff, k->stride[1], nk, d, b->kbuf, d);
        }
        if (v->dtype == ATTN_F32 && v->stride[3] == 1) {
            vb = (const float *)v->data + voff;
            ldv = v->stride[1];
        } else {
            rows_load_block(kr, v, voff, v->stride[1], nk, dv, b->vbuf, dv);
        }
        for (int64_t j = 0; j < nk; j++) kr->dot_rows(kb + j * ldk, b->q, rows, d, d, b->s + j * rows);
        for (int64_t r = 0; r < rows; r++) {
            int64_t t = r / g, a, z;
            attn_visible_range(p, nq, sq.m, t, &a, &z);
            for (int64_t j = 0; j < nk; j++) {
                float *x = b->s + j * rows + r;
                if (p->softcap > 0.0f) *x = p->softcap * tanhf(*x / p->softcap) * LOG2E;
                if (j0 + j < a || j0 + j > z) *x = -INFINITY;
            }
        }
        kr->softmax_cols(b->s, nk, rows, rows, b->m, b->l, b->alpha);
        kr->gemm(rows, dv, nk, b->s, 1, rows, vb, ldv, b->o, dv, 0, b->alpha);
    }
    for (int64_t r = 0; r < rows; r++) {
        float l = b->l[r];
        float inv = l > 0.0f ? 1.0f / l : (l == 0.0f ? 0.0f : l);
        for (int64_t x = 0; x < dv; x++) part_o[r * dv + x] = b->o[r * dv + x] * inv;
        part_l[r] = l > 0.0f ? b->m[r] * LN2 + logf(l) : (l == 0.0f ? -INFINITY : l);
    }
}

attn_status engine_decode(const attn_ctx *ctx, const attn_problem *p, const attn_tensor *q,
                          const attn_tensor *k, const attn_tensor *v, attn_tensor *o,
                          attn_tensor *lse) {
    const int64_t g = p->h / p->hk, rows = g * p->n, dv = p->dv;
    const int64_t split = tiling_decode_split(p->m);
    const int64_t nsplit = (p->m + split - 1) / split;
    const int64_t n_tasks = p->batch * p->hk * nsplit;
    const int threads = ctx->threads;

    size_t part_floats = (size_t)n_tasks * (size_t)rows * (size_t)(dv + 1);
    float *part = malloc(part_floats * sizeof(float));
    size_t stride;
    float *scr = scratch_alloc(threads, dec_floats(rows, tiling_decode_block(), p->d, dv), &stride);
    if (!part || !scr) {
        free(part);
        free(scr);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for decode scratch");
    }
    float *part_l = part + (size_t)n_tasks * (size_t)rows * (size_t)dv;

#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        int tid = omp_get_thread_num();
#else
        int tid = 0;
#endif
        dec_bufs b = dec_carve(scr + stride * (size_t)tid, rows, tiling_decode_block(), p->d, dv);
#pragma omp for schedule(dynamic, 1)
        for (int64_t ti = 0; ti < n_tasks; ti++) {
            int64_t bi = ti / (p->hk * nsplit), hk = (ti / nsplit) % p->hk, s = ti % nsplit;
            int64_t m = attn_problem_seq(p, bi).m;
            int64_t ks = s * split, ke = ks + split < m ? ks + split : m;
            float *po = part + (size_t)ti * (size_t)(rows * dv);
            float *pl = part_l + (size_t)ti * (size_t)rows;
            if (ks >= ke) {
                for (int64_t r = 0; r < rows; r++) pl[r] = -INFINITY;
                for (int64_t x = 0; x < rows * dv; x++) po[x] = 0.0f;
                continue;
            }
            run_split(ctx->kernels, p, q, k, v, &b, bi, hk, ks, ke, po, pl);
        }

        /* merge the splits of each (sequence, kv head) in split order */
#pragma omp for schedule(static)
        for (int64_t gi = 0; gi < p->batch * p->hk; gi++) {
            int64_t bi = gi / p->hk, hk = gi % p->hk;
            float *acc = part + (size_t)(gi * nsplit) * (size_t)(rows * dv);
            float *accl = part_l + (size_t)(gi * nsplit) * (size_t)rows;
            for (int64_t s = 1; s < nsplit; s++)
                for (int64_t r = 0; r < rows; r++)
                    merge_rows(acc + r * dv, accl + r,
                               part + (size_t)(gi * nsplit + s) * (size_t)(rows * dv) + r * dv,
                               part_l[(size_t)(gi * nsplit + s) * (size_t)rows + r], dv);
            for (int64_t r = 0; r < rows; r++) {
                int64_t t = r / g, h = hk * g + r % g;
                rows_store(ctx->kernels, o, attn_off4(o, bi, t, h, 0), dv, acc + r * dv);
                if (lse) attn_store_f64(lse, attn_off3(lse, bi, h, t), accl[r]);
            }
        }
    }
    free(scr);
    free(part);
    return ATTN_OK;
}
