/* Sparse ops of attn bench: block-sparse, sliding window, PSA and top-k
 * selection. Each case times what a user pays (planning plus the planned
 * forward) beside the dense forward of the same shape and inputs, and reports
 * the fraction of the dense work done (the plan's density: blocks visited,
 * pooled ones at 1/2^level; the window runs as an explicit band of blocks
 * with the window rule applied inside them) and the output's relative L2
 * error against the dense (exact) result.
 *
 * Inputs have the structure these methods exploit rather than i.i.d. noise:
 * a positional part in the first head dims makes q_i . k_j peak near i = j
 * (local bands at several widths), and a few heavy key columns (the first key,
 * as an attention sink, and 7 others) draw every query. */
#include "cli.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct sparse_state {
    attn_ctx *ctx;
    bench_case c;
    float *q, *k, *v, *o, *o_dense;
    attn_tensor tq, tk, tv, to, tod;
    uint8_t *mask; /* blocksparse: [heads][nqb][nkb] */
    double density, dense_ms;
    /* NSA: compressed K/V, gates, the selection, the forward's saved branch
     * outputs and LSEs, and the gradients of the backward */
    attn_nsa_opts nsa;
    float *kc, *vc, *gates, *so, *sl, *dout, *g[6];
    attn_tensor tkc, tvc, tg, tso, tsl, tdout, tgr[6];
    attn_plan *sel;
};

/* NSA's defaults (the paper's): compressed blocks of 32 with stride 16, 16
 * selected blocks of 64 for each 64 queries, a window of 512. */
static const attn_nsa_opts nsa_default = {32, 16, 64, 16, 64, 512};

static attn_status nsa_forward(sparse_state *s, int save) {
    attn_params p = attn_params_default();
    attn_status st = attn_nsa_compress(s->ctx, &s->nsa, &s->tk, &s->tv, &s->tkc, &s->tvc);
    if (st == ATTN_OK) { /* selection and forward in one call */
        attn_plan_free(s->sel);
        s->sel = NULL;
        st = attn_nsa_attention(s->ctx, &p, &s->nsa, &s->tq, &s->tk, &s->tv, &s->tkc, &s->tvc,
                                &s->tg, &s->to, save ? &s->tso : NULL, save ? &s->tsl : NULL,
                                &s->sel);
    }
    return st;
}

static attn_status nsa_backward(sparse_state *s) {
    attn_params p = attn_params_default();
    attn_status st = attn_nsa_backward(s->ctx, &p, &s->nsa, &s->tq, &s->tk, &s->tv, &s->tkc,
                                       &s->tvc, s->sel, &s->tg, &s->tso, &s->tsl, &s->tdout,
                                       &s->tgr[0], &s->tgr[1], &s->tgr[2], &s->tgr[3],
                                       &s->tgr[4], &s->tgr[5]);
    if (st == ATTN_OK) /* the compression's share of dk, dv */
        st = attn_nsa_compress_backward(s->ctx, &s->nsa, &s->tgr[3], &s->tgr[4], &s->tgr[1],
                                        &s->tgr[2]);
    return st;
}

/* Pairs NSA computes, over all heads' N x M: compressed keys completed before
 * each query, the selection plan's blocks, and the window. */
static double nsa_density(const sparse_state *s) {
    const bench_case *c = &s->c;
    const attn_nsa_opts *o = &s->nsa;
    int64_t mc = (c->m - o->cmp_block) / o->cmp_stride + 1;
    double pairs = 0.0;
    for (int64_t i = 0; i < c->n; i++) {
        int64_t pos = i + (c->m - c->n), t = (pos - o->cmp_block + 1) / o->cmp_stride + 1;
        if (pos - o->cmp_block + 1 < 0) t = 0;
        pairs += (double)(t < mc ? t : mc);
        pairs += (double)(pos + 1 < o->window ? pos + 1 : o->window);
    }
    return pairs / ((double)c->n * (double)c->m) + attn_plan_density(s->sel);
}

int bench_op_is_sparse(bench_op op) {
    return op == BENCH_BLOCKSPARSE || op == BENCH_WINDOW || op == BENCH_PSA ||
           op == BENCH_TOPK || op == BENCH_NSA || op == BENCH_NSA_BWD;
}

static int is_nsa(bench_op op) { return op == BENCH_NSA || op == BENCH_NSA_BWD; }

static void say(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static uint64_t mix(uint64_t *s) { /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A standard normal draw (Box-Muller) from the splitmix state. */
static double gauss(uint64_t *s) {
    double u = ((double)(mix(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    double w = ((double)(mix(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * w);
}

/* Adds positional structure and heavy columns to random q and k (f32,
 * contiguous [1, n, h, d] and [1, m, hk, d]; d >= 10). The first 2P dims
 * hold random Fourier features of a Gaussian kernel in the position: q_i . k_j
 * gets 12 exp(-(i - j)^2 / (2 w^2)) (after the 1/sqrt(d) scale) plus small
 * ripples, so each query has a local band of width w: 32 keys for even kv
 * heads (sharp), 1024 for odd ones (broad), as trained models mix them. The
 * last dim makes 8 keys (the first, as an attention sink, and 7 others) heavy
 * for every query, independent of position. */
static void add_structure(float *q, float *k, const bench_case *c, uint64_t seed) {
    const int64_t n = c->n, m = c->m, h = c->heads, hk = c->kv_heads, d = c->dim;
    const int64_t pairs = (d - 2) / 2 < 12 ? (d - 2) / 2 : 12, group = h / hk;
    const double amp = sqrt(12.0 * sqrt((double)d) / (double)pairs);
    uint64_t s = seed;
    for (int64_t x = 0; x < hk; x++) {
        const double width = x % 2 ? 1024.0 : 32.0;
        for (int64_t a = 0; a < pairs; a++) {
            double w = gauss(&s) / width;
            for (int64_t j = 0; j < m; j++) {
                float *kr = k + (j * hk + x) * d;
                kr[2 * a] = (float)(amp * cos(w * (double)j));
                kr[2 * a + 1] = (float)(amp * sin(w * (double)j));
            }
            for (int64_t hq = x * group; hq < (x + 1) * group; hq++)
                for (int64_t i = 0; i < n; i++) {
                    float *qr = q + (i * h + hq) * d;
                    qr[2 * a] = (float)(amp * cos(w * (double)(i + (m - n))));
                    qr[2 * a + 1] = (float)(amp * sin(w * (double)(i + (m - n))));
                }
        }
    }
    const int64_t heavy = d - 1;
    for (int64_t i = 0; i < n * h; i++) q[i * d + heavy] = 1.0f;
    for (int64_t j = 0; j < m * hk; j++) k[j * d + heavy] = 0.0f;
    for (int c8 = 0; c8 < 8; c8++) {
        int64_t j = c8 == 0 ? 0 : (int64_t)(mix(&s) % (uint64_t)m);
        for (int64_t x = 0; x < hk; x++) {
            float *kr = k + (j * hk + x) * d;
            for (int64_t e = 0; e < 2 * pairs; e++) kr[e] = 0.0f; /* no position */
            kr[heavy] = (float)(10.0 * sqrt((double)d));
        }
    }
}

static void *alloc_f32(size_t count) {
    void *p = aligned_alloc(64, (count * 4 + 63) / 64 * 64);
    if (p) memset(p, 0, count * 4);
    return p;
}

static attn_status make_plan(sparse_state *s, attn_plan **plan) {
    const bench_case *c = &s->c;
    *plan = NULL;
    switch (c->op) {
    case BENCH_BLOCKSPARSE:
        return attn_plan_from_block_mask(plan, c->n, c->m, c->block_q, c->block_k, c->heads,
                                         s->mask);
    case BENCH_TOPK: {
        int64_t nkb = (c->m + c->block_k - 1) / c->block_k;
        int64_t kb = (int64_t)ceil(c->budget * (double)nkb);
        attn_select_opts o = {c->block_q, c->block_k, kb < 1 ? 1 : kb, 0.0f, 0, 0, c->causal, NULL};
        return attn_plan_select(s->ctx, plan, &s->tq, &s->tk, &o);
    }
    case BENCH_PSA: {
        /* the budget split over levels 0..3 as 0.4, 0.2, 0.2, 0.2 (a level-l
         * block costs 1/2^l, so levels 1..3 cover 2, 4 and 8 times as many
         * blocks). Measured on these inputs (N = 4096, H = 2, budget 0.15,
         * rel L2 error): 1,0,0,0: 0.259 (= top-k); 0.7,0.3,0,0: 0.251;
         * 0.5,0.25,0.25,0: 0.243; 0.25 each: 0.183; 0.4,0.2,0.2,0.2: 0.177. */
        static const double split[4] = {0.4, 0.2, 0.2, 0.2};
        float quota[4];
        for (int l = 0; l < 4; l++) quota[l] = (float)(split[l] * c->budget * (double)(1 << l));
        double sum = 0.0;
        for (int l = 0; l < 4; l++) {
            if (sum + quota[l] > 1.0) quota[l] = (float)(1.0 - sum);
            sum += quota[l];
        }
        attn_select_opts o = {c->block_q, c->block_k, 0, 0.0f, 1, 0, c->causal, NULL};
        return attn_plan_psa(s->ctx, plan, &s->tq, &s->tk, &o, 4, quota);
    }
    case BENCH_WINDOW: { /* the band of key blocks the window reaches */
        int64_t wl = c->window_left >= 0 ? c->window_left : c->m;
        int64_t local = (wl + c->block_q + c->block_k - 1) / c->block_k + 1;
        return attn_plan_static(plan, c->n, c->m, c->block_q, c->block_k, local, 0, 0);
    }
    default:
        return ATTN_OK;
    }
}

static attn_status planned_forward(sparse_state *s, attn_plan *plan, attn_tensor *o) {
    attn_params p = attn_params_default();
    p.causal = s->c.causal;
    if (s->c.op == BENCH_WINDOW) {
        p.window_left = s->c.window_left;
        p.window_right = s->c.window_right;
    }
    p.plan = plan;
    return attn_forward(s->ctx, &p, &s->tq, &s->tk, &s->tv, o, NULL);
}

attn_status sparse_run(sparse_state *s) {
    if (s->c.op == BENCH_NSA) return nsa_forward(s, 0);
    if (s->c.op == BENCH_NSA_BWD) return nsa_backward(s);
    attn_plan *plan = NULL;
    attn_status st = make_plan(s, &plan);
    if (st == ATTN_OK) st = planned_forward(s, plan, &s->to);
    attn_plan_free(plan);
    return st;
}

void sparse_free(sparse_state *s) {
    if (!s) return;
    free(s->q), free(s->k), free(s->v), free(s->o), free(s->o_dense), free(s->mask);
    free(s->kc), free(s->vc), free(s->gates), free(s->so), free(s->sl), free(s->dout);
    for (int x = 0; x < 6; x++) free(s->g[x]);
    attn_plan_free(s->sel);
    free(s);
}

/* NSA's tensors and one forward (saving the branches for the backward). */
static attn_status nsa_setup(sparse_state *s, uint64_t seed) {
    const bench_case *c = &s->c;
    s->nsa = nsa_default;
    const int64_t mc = (c->m - s->nsa.cmp_block) / s->nsa.cmp_stride + 1;
    const int64_t n = c->n, h = c->heads, hk = c->kv_heads, d = c->dim, dv = c->dim_v;
    s->kc = alloc_f32((size_t)(mc * hk * d)), s->vc = alloc_f32((size_t)(mc * hk * dv));
    s->gates = alloc_f32((size_t)(n * h * 3));
    s->so = alloc_f32((size_t)(3 * n * h * dv)), s->sl = alloc_f32((size_t)(3 * h * n));
    s->dout = alloc_f32((size_t)(n * h * dv));
    const int64_t gsz[6][4] = {{1, n, h, d}, {1, c->m, hk, d}, {1, c->m, hk, dv},
                               {1, mc, hk, d}, {1, mc, hk, dv}, {1, n, h, 3}};
    for (int x = 0; x < 6; x++) {
        s->g[x] = alloc_f32((size_t)(gsz[x][1] * gsz[x][2] * gsz[x][3]));
        if (!s->g[x]) return ATTN_ERR_NOMEM;
        s->tgr[x] = attn_tensor_4d(s->g[x], ATTN_F32, 1, gsz[x][1], gsz[x][2], gsz[x][3]);
    }
    if (!s->kc || !s->vc || !s->gates || !s->so || !s->sl || !s->dout) return ATTN_ERR_NOMEM;
    for (int64_t x = 0; x < n * h * 3; x++) s->gates[x] = 1.0f / 3.0f;
    fill_random(s->dout, ATTN_F32, (size_t)(n * h * dv), seed + 9);
    s->tkc = attn_tensor_4d(s->kc, ATTN_F32, 1, mc, hk, d);
    s->tvc = attn_tensor_4d(s->vc, ATTN_F32, 1, mc, hk, dv);
    s->tg = attn_tensor_4d(s->gates, ATTN_F32, 1, n, h, 3);
    s->tso = attn_tensor_4d(s->so, ATTN_F32, 3, n, h, dv);
    s->tsl = attn_tensor_3d(s->sl, ATTN_F32, 3, h, n);
    s->tdout = attn_tensor_4d(s->dout, ATTN_F32, 1, n, h, dv);
    return nsa_forward(s, 1);
}

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

attn_status sparse_setup(sparse_state **out, attn_ctx *ctx, const bench_case *c,
                         uint64_t seed, char *err, size_t errlen) {
    *out = NULL;
    if (c->batch != 1 || c->dtype != ATTN_F32 || c->dim < 10 || c->dim_v != c->dim ||
        (is_nsa(c->op) && c->m < 512)) {
        say(err, errlen, "sparse ops take batch 1, f32, dim >= 10 and dim-v = dim (NSA: m >= 512)");
        return ATTN_ERR_ARG;
    }
    sparse_state *s = calloc(1, sizeof *s);
    if (!s) return say(err, errlen, "out of memory"), ATTN_ERR_NOMEM;
    s->ctx = ctx;
    s->c = *c;
    size_t nq = (size_t)(c->n * c->heads * c->dim), nk = (size_t)(c->m * c->kv_heads * c->dim);
    s->q = alloc_f32(nq), s->k = alloc_f32(nk), s->v = alloc_f32(nk);
    s->o = alloc_f32(nq), s->o_dense = alloc_f32(nq);
    if (!s->q || !s->k || !s->v || !s->o || !s->o_dense) {
        sparse_free(s);
        return say(err, errlen, "out of memory for the inputs"), ATTN_ERR_NOMEM;
    }
    fill_random(s->q, ATTN_F32, nq, seed + 1);
    fill_random(s->k, ATTN_F32, nk, seed + 2);
    fill_random(s->v, ATTN_F32, nk, seed + 3);
    add_structure(s->q, s->k, c, seed + 4);
    s->tq = attn_tensor_4d(s->q, ATTN_F32, 1, c->n, c->heads, c->dim);
    s->tk = attn_tensor_4d(s->k, ATTN_F32, 1, c->m, c->kv_heads, c->dim);
    s->tv = attn_tensor_4d(s->v, ATTN_F32, 1, c->m, c->kv_heads, c->dim_v);
    s->to = attn_tensor_4d(s->o, ATTN_F32, 1, c->n, c->heads, c->dim_v);
    s->tod = attn_tensor_4d(s->o_dense, ATTN_F32, 1, c->n, c->heads, c->dim_v);

    if (c->op == BENCH_BLOCKSPARSE) { /* random blocks at the density, plus the diagonal */
        int64_t nqb = (c->n + c->block_q - 1) / c->block_q, nkb = (c->m + c->block_k - 1) / c->block_k;
        s->mask = calloc((size_t)(c->heads * nqb * nkb), 1);
        if (!s->mask) {
            sparse_free(s);
            return say(err, errlen, "out of memory for the mask"), ATTN_ERR_NOMEM;
        }
        int64_t want = (int64_t)llround(c->budget * (double)nkb);
        uint64_t r = seed + 5;
        for (int64_t row = 0; row < c->heads * nqb; row++) {
            uint8_t *mr = s->mask + row * nkb;
            int64_t qb = row % nqb;
            int64_t diag = ((qb + 1) * c->block_q - 1 + (c->m - c->n)) / c->block_k;
            if (diag >= nkb) diag = nkb - 1;
            mr[diag] = 1;
            for (int64_t got = 1; got < want;) {
                int64_t kb = (int64_t)(mix(&r) % (uint64_t)nkb);
                if (!mr[kb]) mr[kb] = 1, got++;
            }
        }
    }

    /* the dense yardstick: the same forward without a plan (causal as asked;
     * NSA is causal) */
    attn_params dense = attn_params_default();
    dense.causal = c->causal || is_nsa(c->op);
    double t[5];
    attn_status st = ATTN_OK;
    for (int i = 0; i < 5 && st == ATTN_OK; i++) {
        double t0 = now_seconds();
        st = attn_forward(ctx, &dense, &s->tq, &s->tk, &s->tv, &s->tod, NULL);
        t[i] = now_seconds() - t0;
    }
    if (st == ATTN_OK && c->op == BENCH_NSA_BWD) { /* the yardstick is the dense backward */
        float *lse = alloc_f32((size_t)(c->heads * c->n));
        float *gq = alloc_f32(nq), *gk = alloc_f32(nk), *gv = alloc_f32(nk);
        if (!lse || !gq || !gk || !gv) st = ATTN_ERR_NOMEM;
        attn_tensor tl = attn_tensor_3d(lse, ATTN_F32, 1, c->heads, c->n);
        attn_tensor tgq = attn_tensor_4d(gq, ATTN_F32, 1, c->n, c->heads, c->dim);
        attn_tensor tgk = attn_tensor_4d(gk, ATTN_F32, 1, c->m, c->kv_heads, c->dim);
        attn_tensor tgv = attn_tensor_4d(gv, ATTN_F32, 1, c->m, c->kv_heads, c->dim_v);
        if (st == ATTN_OK) st = attn_forward(ctx, &dense, &s->tq, &s->tk, &s->tv, &s->tod, &tl);
        for (int i = 0; i < 5 && st == ATTN_OK; i++) {
            double t0 = now_seconds();
            st = attn_backward(ctx, &dense, &s->tq, &s->tk, &s->tv, &s->tod, &tl, &s->tod, &tgq,
                               &tgk, &tgv);
            t[i] = now_seconds() - t0;
        }
        free(lse), free(gq), free(gk), free(gv);
    }
    attn_plan *plan = NULL;
    if (st == ATTN_OK) st = is_nsa(c->op) ? nsa_setup(s, seed) : make_plan(s, &plan);
    if (st != ATTN_OK) {
        say(err, errlen, "%s", st == ATTN_ERR_NOMEM ? "out of memory" : attn_last_error());
        attn_plan_free(plan);
        sparse_free(s);
        return st;
    }
    qsort(t + 1, 4, sizeof(double), cmp_dbl); /* the first call warms up */
    s->dense_ms = 1e3 * 0.5 * (t[2] + t[3]);
    s->density = is_nsa(c->op) ? nsa_density(s) : attn_plan_density(plan); /* work visited */
    attn_plan_free(plan);
    *out = s;
    return ATTN_OK;
}

double sparse_rel_err(const sparse_state *s) {
    double num = 0.0, den = 0.0;
    size_t n = (size_t)(s->c.n * s->c.heads * s->c.dim_v);
    for (size_t i = 0; i < n; i++) {
        double diff = (double)s->o[i] - (double)s->o_dense[i];
        num += diff * diff;
        den += (double)s->o_dense[i] * (double)s->o_dense[i];
    }
    return den > 0.0 ? sqrt(num / den) : (num == 0.0 ? 0.0 : INFINITY);
}

double sparse_density(const sparse_state *s) { return s->density; }
double sparse_dense_ms(const sparse_state *s) { return s->dense_ms; }
