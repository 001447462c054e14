/* Reference softmax attention, forward and backward: double precision, naive
 * loops, the oracle every fast path is tested against.
 *
 * Both ops compute into malloc'ed double buffers laid out like the logical
 * shapes of their outputs and store them (any dtype, any strides) only once
 * everything succeeded. Rows that belong to no sequence (varlen padding) and
 * keys beyond a sequence's live length get zero (O, dQ, dK, dV) and -inf (LSE),
 * like a row that sees no key.
 *
 * Backward choices: P is recomputed exactly in double from Q and K (the LSE
 * passed in is not used, so the oracle does not inherit its f32 rounding);
 * Delta_i = sum_d dO_i[d] * O_i[d] is taken from the O passed in, as
 * FlashAttention does, so the result is the backward of the forward that
 * produced that O.
 *
 * Pyramid levels: a plan entry of level l stands for its key block pooled by
 * 2^l: each group of up to 2^l consecutive keys (clipped to the block and the
 * sequence) becomes one virtual key whose K and V are the group means and
 * whose logit gets + ln(count), so that it weighs as the keys it replaces.
 * A level-0 key is a group of one. Gradients reach each member key as the
 * group's gradient / count. */
#include "internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ sizes */

/* *out = a * b as a size_t element count that also fits a byte count of
 * doubles; false on overflow or a negative factor. */
static bool count_mul(int64_t a, int64_t b, size_t *out) {
    if (a < 0 || b < 0) return false;
    if (a != 0 && (uint64_t)b > (uint64_t)(SIZE_MAX / sizeof(double)) / (uint64_t)a)
        return false;
    *out = (size_t)((uint64_t)a * (uint64_t)b);
    return true;
}

/* Element count of a 4-D (or 3-D) logical shape, checked. */
static bool count_shape(const attn_tensor *t, int ndim, size_t *out) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        if (!count_mul((int64_t)n, t->shape[i], &n)) return false;
    *out = n;
    return true;
}

/* calloc of n doubles; n may be 0 (returns a valid pointer). */
static double *dalloc(size_t n) { return calloc(n ? n : 1, sizeof(double)); }

/* Largest key count of any sequence (buffer sizes). */
static int64_t max_keys(const attn_problem *p) {
    int64_t mx = 0;
    for (int64_t b = 0; b < p->batch; b++) {
        attn_seq s = attn_problem_seq(p, b);
        if (s.m > mx) mx = s.m;
    }
    return mx;
}

/* ------------------------------------------------------------ visibility */

/* Writes the virtual keys (see the top of this file) that query row i of
 * query head hq sees: group g covers keys idx[g] .. idx[g] + cnt[g] - 1 (0-based
 * within the sequence). Returns the number of groups; idx and cnt hold >= s->m
 * entries. */
static int64_t visible_keys(const attn_problem *p, const attn_seq *s, int64_t hq,
                            int64_t i, int64_t *idx, int64_t *cnt) {
    int64_t lo, hi, c = 0;
    attn_visible_range(p, s->n, s->m, i, &lo, &hi);
    if (!p->plan) {
        for (int64_t j = lo; j <= hi; j++)
            if (attn_key_visible(p, s->n, s->m, i, j)) idx[c] = j, cnt[c++] = 1;
        return c;
    }
    const attn_plan *pl = p->plan;
    int64_t qb = i / pl->block_q;
    if (qb >= pl->n_qblocks) return 0;
    int64_t row = attn_plan_head(pl, hq, p->h, p->hk) * pl->n_qblocks + qb;
    for (int64_t e = pl->row_offsets[row]; e < pl->row_offsets[row + 1]; e++) {
        const attn_plan_entry *en = &pl->entries[e];
        int64_t a = (int64_t)en->key_block * pl->block_k;
        int64_t z = a + pl->block_k - 1;
        if (z > s->m - 1) z = s->m - 1;
        if (en->level > 0) { /* pooled: mask is always FULL (attn_plan_create) */
            int64_t f = (int64_t)1 << en->level;
            for (int64_t j = a; j <= z; j += f) idx[c] = j, cnt[c++] = j + f - 1 <= z ? f : z - j + 1;
            continue;
        }
        if (en->mask == ATTN_BLOCK_PARAMS) {
            if (a < lo) a = lo;
            if (z > hi) z = hi;
        }
        for (int64_t j = a; j <= z; j++)
            if (en->mask != ATTN_BLOCK_PARAMS || attn_key_visible(p, s->n, s->m, i, j))
                idx[c] = j, cnt[c++] = 1;
    }
    return c;
}

/* ------------------------------------------------------------ shared work */

/* Scratch for one (sequence, kv head): K and V rows in double, the visible key
 * list and the logits of one query row. */
typedef struct ref_scratch {
    double *kd, *vd;   /* [mmax, d], [mmax, dv] */
    double *qd, *dod;  /* [d], [dv] */
    double *s, *t;     /* [mmax]: logits, tanh(raw / softcap) */
    double *km, *vm;   /* [d], [dv]: the current group's mean K and V */
    int64_t *idx, *cnt; /* [mmax]: first key and size of each visible group */
} ref_scratch;

static void scratch_free(ref_scratch *w) {
    free(w->kd);
    free(w->vd);
    free(w->qd);
    free(w->dod);
    free(w->s);
    free(w->t);
    free(w->km);
    free(w->vm);
    free(w->idx);
    free(w->cnt);
}

static attn_status scratch_alloc(ref_scratch *w, const attn_problem *p, const char *op) {
    memset(w, 0, sizeof *w);
    int64_t mmax = max_keys(p);
    size_t nk, nv, nm, nd, ndv;
    if (!count_mul(mmax, p->d, &nk) || !count_mul(mmax, p->dv, &nv) ||
        !count_mul(mmax, 1, &nm) || !count_mul(p->d, 1, &nd) || !count_mul(p->dv, 1, &ndv))
        return attn_err(ATTN_ERR_OVERFLOW, "%s (reference): scratch size overflows", op);
    w->kd = dalloc(nk);
    w->vd = dalloc(nv);
    w->qd = dalloc(nd);
    w->dod = dalloc(ndv);
    w->s = dalloc(nm);
    w->t = dalloc(nm);
    w->km = dalloc(nd);
    w->vm = dalloc(ndv);
    w->idx = calloc(nm ? nm : 1, sizeof(int64_t));
    w->cnt = calloc(nm ? nm : 1, sizeof(int64_t));
    if (!w->kd || !w->vd || !w->qd || !w->dod || !w->s || !w->t || !w->km || !w->vm ||
        !w->idx || !w->cnt) {
        scratch_free(w);
        return attn_err(ATTN_ERR_NOMEM, "%s (reference): out of memory for scratch", op);
    }
    return ATTN_OK;
}

/* Loads the live K and V rows of sequence s, kv head g, into w->kd, w->vd. */
static void load_kv(const attn_problem *p, const attn_seq *s, int64_t g,
                    const attn_tensor *k, const attn_tensor *v, ref_scratch *w) {
    for (int64_t j = 0; j < s->m; j++) {
        for (int64_t x = 0; x < p->d; x++)
            w->kd[j * p->d + x] = attn_load_f64(k, attn_off4(k, s->tb, s->k0 + j, g, x));
        for (int64_t x = 0; x < p->dv; x++)
            w->vd[j * p->dv + x] = attn_load_f64(v, attn_off4(v, s->tb, s->k0 + j, g, x));
    }
}

/* The mean of rows first .. first + count - 1 of x ([*, n]) into out. */
static void group_mean(const double *x, int64_t n, int64_t first, int64_t count, double *out) {
    for (int64_t c = 0; c < n; c++) out[c] = 0.0;
    for (int64_t j = first; j < first + count; j++)
        for (int64_t c = 0; c < n; c++) out[c] += x[j * n + c];
    for (int64_t c = 0; c < n; c++) out[c] /= (double)count;
}

/* Logits of query w->qd against the n groups listed in w->idx/w->cnt, into
 * w->s (and tanh values into w->t under softcap); a group of c keys adds ln c
 * after the cap. Returns the row maximum. NaN logits are skipped by the max
 * and propagate through exp() later. */
static double logits(const attn_problem *p, int64_t n, ref_scratch *w) {
    double mx = -INFINITY;
    for (int64_t c = 0; c < n; c++) {
        group_mean(w->kd, p->d, w->idx[c], w->cnt[c], w->km);
        double dot = 0.0;
        for (int64_t x = 0; x < p->d; x++) dot += w->qd[x] * w->km[x];
        double sc = (double)p->scale * dot;
        if (p->softcap > 0.0f) {
            double th = tanh(sc / (double)p->softcap);
            w->t[c] = th;
            sc = (double)p->softcap * th;
        }
        sc += log((double)w->cnt[c]);
        w->s[c] = sc;
        if (sc > mx) mx = sc;
    }
    return mx;
}

static void load_row(const attn_tensor *t, const attn_seq *s, int64_t row, int64_t h,
                     int64_t d, double *dst) {
    for (int64_t x = 0; x < d; x++)
        dst[x] = attn_load_f64(t, attn_off4(t, s->tb, s->q0 + row, h, x));
}

/* Stores a double buffer holding the whole logical 4-D shape of t. */
static void store4(attn_tensor *t, const double *buf) {
    int64_t n = 0;
    for (int64_t a = 0; a < t->shape[0]; a++)
        for (int64_t b = 0; b < t->shape[1]; b++)
            for (int64_t c = 0; c < t->shape[2]; c++)
                for (int64_t d = 0; d < t->shape[3]; d++)
                    attn_store_f64(t, attn_off4(t, a, b, c, d), buf[n++]);
}

static void store3(attn_tensor *t, const double *buf) {
    int64_t n = 0;
    for (int64_t a = 0; a < t->shape[0]; a++)
        for (int64_t b = 0; b < t->shape[1]; b++)
            for (int64_t c = 0; c < t->shape[2]; c++)
                attn_store_f64(t, attn_off3(t, a, b, c), buf[n++]);
}

/* Index of [a, b, c, d] in a contiguous buffer with t's logical shape. */
static size_t idx4(const attn_tensor *t, int64_t a, int64_t b, int64_t c, int64_t d) {
    return (size_t)(((a * t->shape[1] + b) * t->shape[2] + c) * t->shape[3] + d);
}
static size_t idx3(const attn_tensor *t, int64_t a, int64_t b, int64_t c) {
    return (size_t)((a * t->shape[1] + b) * t->shape[2] + c);
}

/* ------------------------------------------------------------ forward */

attn_status ref_forward(const attn_problem *p, const attn_tensor *q, const attn_tensor *k,
                        const attn_tensor *v, attn_tensor *o, attn_tensor *lse) {
    size_t no, nl = 0;
    if (!count_shape(o, 4, &no) || (lse && !count_shape(lse, 3, &nl)))
        return attn_err(ATTN_ERR_OVERFLOW, "attn_forward (reference): o or lse size overflows");
    ref_scratch w;
    attn_status st = scratch_alloc(&w, p, "attn_forward");
    if (st != ATTN_OK) return st;
    double *ob = dalloc(no);
    double *lb = lse ? dalloc(nl) : NULL;
    if (!ob || (lse && !lb)) {
        free(ob);
        free(lb);
        scratch_free(&w);
        return attn_err(ATTN_ERR_NOMEM, "attn_forward (reference): out of memory for o/lse");
    }
    for (size_t x = 0; x < nl; x++) lb[x] = -INFINITY;

    int64_t group = p->h / p->hk;
    for (int64_t b = 0; b < p->batch; b++) {
        attn_seq s = attn_problem_seq(p, b);
        for (int64_t g = 0; g < p->hk; g++) {
            load_kv(p, &s, g, k, v, &w);
            for (int64_t hq = g * group; hq < (g + 1) * group; hq++) {
                for (int64_t i = 0; i < s.n; i++) {
                    int64_t nvis = visible_keys(p, &s, hq, i, w.idx, w.cnt);
                    if (nvis == 0) continue; /* O = 0, LSE = -inf */
                    load_row(q, &s, i, hq, p->d, w.qd);
                    double mx = logits(p, nvis, &w);
                    double *orow = ob + idx4(o, s.tb, s.q0 + i, hq, 0);
                    double sum = 0.0;
                    for (int64_t c = 0; c < nvis; c++) {
                        double e = exp(w.s[c] - mx);
                        sum += e;
                        group_mean(w.vd, p->dv, w.idx[c], w.cnt[c], w.vm);
                        for (int64_t x = 0; x < p->dv; x++) orow[x] += e * w.vm[x];
                    }
                    for (int64_t x = 0; x < p->dv; x++) orow[x] /= sum;
                    if (lb) lb[idx3(lse, s.tb, hq, s.q0 + i)] = mx + log(sum);
                }
            }
        }
    }

    store4(o, ob);
    if (lse) store3(lse, lb);
    free(ob);
    free(lb);
    scratch_free(&w);
    return ATTN_OK;
}

/* ------------------------------------------------------------ backward */

attn_status ref_backward(const attn_problem *p, const attn_tensor *q, const attn_tensor *k,
                         const attn_tensor *v, const attn_tensor *o,
                         const attn_tensor *lse, const attn_tensor *dout, attn_tensor *dq,
                         attn_tensor *dk, attn_tensor *dv) {
    (void)lse; /* recomputed exactly; see the top of this file */
    size_t nq, nk, nv;
    if (!count_shape(dq, 4, &nq) || !count_shape(dk, 4, &nk) || !count_shape(dv, 4, &nv))
        return attn_err(ATTN_ERR_OVERFLOW,
                        "attn_backward (reference): dq, dk or dv size overflows");
    ref_scratch w;
    attn_status st = scratch_alloc(&w, p, "attn_backward");
    if (st != ATTN_OK) return st;
    size_t nm = (size_t)max_keys(p);
    double *dqb = dalloc(nq), *dkb = dalloc(nk), *dvb = dalloc(nv);
    double *pr = dalloc(nm), *ds = dalloc(nm), *od = dalloc((size_t)p->dv);
    if (!dqb || !dkb || !dvb || !pr || !ds || !od) {
        free(dqb);
        free(dkb);
        free(dvb);
        free(pr);
        free(ds);
        free(od);
        scratch_free(&w);
        return attn_err(ATTN_ERR_NOMEM, "attn_backward (reference): out of memory");
    }

    int64_t group = p->h / p->hk;
    double scale = (double)p->scale;
    for (int64_t b = 0; b < p->batch; b++) {
        attn_seq s = attn_problem_seq(p, b);
        for (int64_t g = 0; g < p->hk; g++) {
            load_kv(p, &s, g, k, v, &w);
            for (int64_t hq = g * group; hq < (g + 1) * group; hq++) {
                for (int64_t i = 0; i < s.n; i++) {
                    int64_t nvis = visible_keys(p, &s, hq, i, w.idx, w.cnt);
                    if (nvis == 0) continue; /* P = 0: no gradient flows */
                    load_row(q, &s, i, hq, p->d, w.qd);
                    load_row(dout, &s, i, hq, p->dv, w.dod);
                    load_row(o, &s, i, hq, p->dv, od);
                    double mx = logits(p, nvis, &w);
                    double sum = 0.0;
                    for (int64_t c = 0; c < nvis; c++) {
                        pr[c] = exp(w.s[c] - mx);
                        sum += pr[c];
                    }
                    double delta = 0.0;
                    for (int64_t x = 0; x < p->dv; x++) delta += w.dod[x] * od[x];
                    for (int64_t c = 0; c < nvis; c++) {
                        pr[c] /= sum;
                        group_mean(w.vd, p->dv, w.idx[c], w.cnt[c], w.vm);
                        double dp = 0.0;
                        for (int64_t x = 0; x < p->dv; x++) dp += w.dod[x] * w.vm[x];
                        double d = pr[c] * (dp - delta);
                        if (p->softcap > 0.0f) d *= 1.0 - w.t[c] * w.t[c];
                        ds[c] = d * scale; /* d loss / d (q . k) */
                    }
                    double *dqrow = dqb + idx4(dq, s.tb, s.q0 + i, hq, 0);
                    for (int64_t c = 0; c < nvis; c++) {
                        group_mean(w.kd, p->d, w.idx[c], w.cnt[c], w.km);
                        for (int64_t x = 0; x < p->d; x++) dqrow[x] += ds[c] * w.km[x];
                        /* a mean passes 1/count of its gradient to each member */
                        double share = 1.0 / (double)w.cnt[c];
                        for (int64_t j = w.idx[c]; j < w.idx[c] + w.cnt[c]; j++) {
                            double *dkrow = dkb + idx4(dk, s.tb, s.k0 + j, g, 0);
                            double *dvrow = dvb + idx4(dv, s.tb, s.k0 + j, g, 0);
                            for (int64_t x = 0; x < p->d; x++) dkrow[x] += share * ds[c] * w.qd[x];
                            for (int64_t x = 0; x < p->dv; x++) dvrow[x] += share * pr[c] * w.dod[x];
                        }
                    }
                }
            }
        }
    }

    store4(dq, dqb);
    store4(dk, dkb);
    store4(dv, dvb);
    free(dqb);
    free(dkb);
    free(dvb);
    free(pr);
    free(ds);
    free(od);
    scratch_free(&w);
    return ATTN_OK;
}
