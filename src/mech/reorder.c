/* Token reorderings and HiLo: permutations of the tokens (gather, scatter,
 * the window-major and axis-permuted orders of a grid, PARO's choice of
 * order: on the CPU backend by GEMM logits, on the reference in double),
 * and HiLo attention,
 * whose Hi heads attend inside non-overlapping windows (window-major order
 * plus a block-diagonal plan) and Lo heads to pooled keys and values. */
#include <stdlib.h>
#include <string.h>

#include "engine/rows.h"
#include "mech_run.h"
#include "validate.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

static attn_status check_perm(const int64_t *idx, int64_t t) {
    if (!idx) return attn_err(ATTN_ERR_NULL, "idx must not be NULL");
    uint8_t *seen = calloc((size_t)t + 1, 1);
    if (!seen) return attn_err(ATTN_ERR_NOMEM, "out of memory checking idx");
    attn_status st = ATTN_OK;
    for (int64_t i = 0; i < t && st == ATTN_OK; i++) {
        if (idx[i] < 0 || idx[i] >= t || seen[idx[i]])
            st = attn_err(ATTN_ERR_ARG, "idx must be a permutation of 0..%lld (idx[%lld] = %lld)",
                          (long long)(t - 1), (long long)i, (long long)idx[i]);
        else
            seen[idx[i]] = 1;
    }
    free(seen);
    return st;
}

static attn_status move_tokens(attn_ctx *ctx, const int64_t *idx, const attn_tensor *x,
                               attn_tensor *out, int scatter) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("x", x, 4, ref, false));
    CHECK(attn_check_tensor("out", out, 4, ref, false));
    CHECK(attn_check_shape("out", out, x->shape[0], x->shape[1], x->shape[2], x->shape[3]));
    const attn_tensor *ins[] = {x};
    const char *names[] = {"x"};
    CHECK(attn_check_output("out", out, ins, names, 1));
    CHECK(check_perm(idx, x->shape[1]));
    for (int64_t b = 0; b < x->shape[0]; b++)
        for (int64_t t = 0; t < x->shape[1]; t++) {
            int64_t from = scatter ? t : idx[t], to = scatter ? idx[t] : t;
            for (int64_t h = 0; h < x->shape[2]; h++)
                for (int64_t e = 0; e < x->shape[3]; e++)
                    attn_store_f64(out, attn_off4(out, b, to, h, e),
                                   attn_load_f64(x, attn_off4(x, b, from, h, e)));
        }
    return ATTN_OK;
}

attn_status attn_gather_tokens(attn_ctx *ctx, const int64_t *idx, const attn_tensor *x,
                               attn_tensor *out) {
    return move_tokens(ctx, idx, x, out, 0);
}

attn_status attn_scatter_tokens(attn_ctx *ctx, const int64_t *idx, const attn_tensor *x,
                                attn_tensor *out) {
    return move_tokens(ctx, idx, x, out, 1);
}

attn_status attn_grid_window_index(attn_grid g, attn_grid win, int64_t *idx) {
    attn_clear_error();
    if (!idx) return attn_err(ATTN_ERR_NULL, "idx must not be NULL");
    if (g.f < 1 || g.h < 1 || g.w < 1) return attn_err(ATTN_ERR_ARG, "grid extents must be >= 1");
    if (win.f < 1 || win.h < 1 || win.w < 1 || g.f % win.f || g.h % win.h || g.w % win.w)
        return attn_err(ATTN_ERR_ARG, "win must be >= 1 and divide the grid on each axis");
    int64_t t = 0;
    for (int64_t wf = 0; wf < g.f / win.f; wf++)
        for (int64_t wy = 0; wy < g.h / win.h; wy++)
            for (int64_t wx = 0; wx < g.w / win.w; wx++)
                for (int64_t df = 0; df < win.f; df++)
                    for (int64_t dy = 0; dy < win.h; dy++)
                        for (int64_t dx = 0; dx < win.w; dx++)
                            idx[t++] = ((wf * win.f + df) * g.h + wy * win.h + dy) * g.w + wx * win.w + dx;
    return ATTN_OK;
}

attn_status attn_grid_axis_index(attn_grid g, const int32_t perm[3], int64_t *idx) {
    attn_clear_error();
    if (!idx || !perm) return attn_err(ATTN_ERR_NULL, "perm and idx must not be NULL");
    if (g.f < 1 || g.h < 1 || g.w < 1) return attn_err(ATTN_ERR_ARG, "grid extents must be >= 1");
    int seen = 0;
    for (int a = 0; a < 3; a++) {
        if (perm[a] < 0 || perm[a] > 2 || (seen & (1 << perm[a])))
            return attn_err(ATTN_ERR_ARG, "perm must be a permutation of 0, 1, 2");
        seen |= 1 << perm[a];
    }
    const int64_t ext[3] = {g.f, g.h, g.w};
    int64_t c[3], t = 0;
    for (c[perm[0]] = 0; c[perm[0]] < ext[perm[0]]; c[perm[0]]++)
        for (c[perm[1]] = 0; c[perm[1]] < ext[perm[1]]; c[perm[1]]++)
            for (c[perm[2]] = 0; c[perm[2]] < ext[perm[2]]; c[perm[2]]++)
                idx[t++] = (c[0] * g.h + c[1]) * g.w + c[2];
    return ATTN_OK;
}

/* Heads [h0, h0 + n) of a [B, T, H, D] view. */
static attn_tensor heads(const attn_tensor *t, int64_t h0, int64_t n) {
    attn_tensor v = *t;
    v.shape[2] = n;
    v.data = (char *)t->data + (size_t)(h0 * t->stride[2]) * attn_dtype_size(t->dtype);
    return v;
}

/* Attention inside non-overlapping windows, on tensors already in
 * window-major order (T tokens, windows of wtok): a block-diagonal plan. */
static attn_status windows_forward(attn_ctx *ctx, const attn_params *p, int64_t T, int64_t wtok,
                                   const attn_tensor *wq, const attn_tensor *wk,
                                   const attn_tensor *wv, attn_tensor *wo) {
    const int64_t nb = T / wtok;
    int64_t *off = calloc((size_t)nb + 1, sizeof(int64_t));
    attn_plan_entry *en = calloc((size_t)nb + 1, sizeof(attn_plan_entry));
    attn_plan *plan = NULL;
    attn_status st = off && en ? ATTN_OK : attn_err(ATTN_ERR_NOMEM, "out of memory for window attention");
    for (int64_t b = 0; b < nb && st == ATTN_OK; b++) {
        attn_plan_entry e = {(int32_t)b, 0, ATTN_BLOCK_FULL, 0};
        en[b] = e;
        off[b + 1] = b + 1;
    }
    if (st == ATTN_OK) st = attn_plan_create(&plan, T, T, wtok, wtok, 1, off, en);
    if (st == ATTN_OK) {
        attn_params pw = *p;
        pw.plan = plan;
        st = attn_forward(ctx, &pw, wq, wk, wv, wo, NULL);
    }
    attn_plan_free(plan);
    free(off), free(en);
    return st;
}

attn_status attn_hilo_forward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                              attn_grid win, int64_t lo_heads, const attn_tensor *q,
                              const attn_tensor *k, const attn_tensor *v, attn_tensor *o) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (p->causal || p->plan || p->cu_seqlens_q || p->window_left != -1 || p->window_right != -1)
        return attn_err(ATTN_ERR_ARG, "params: HiLo takes scale and softcap only");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("q", q, 4, ref, false));
    CHECK(attn_check_tensor("k", k, 4, ref, false));
    CHECK(attn_check_tensor("v", v, 4, ref, false));
    CHECK(attn_check_tensor("o", o, 4, ref, false));
    const int64_t B = q->shape[0], T = q->shape[1], H = q->shape[2];
    if (k->shape[2] != H) return attn_err(ATTN_ERR_SHAPE, "HiLo needs as many kv heads as query heads");
    if (k->shape[1] != T || v->shape[1] != T)
        return attn_err(ATTN_ERR_SHAPE, "HiLo is self-attention: q, k and v hold the same tokens");
    if (lo_heads < 0 || lo_heads > H) return attn_err(ATTN_ERR_ARG, "lo_heads must be in 0..H");
    CHECK(attn_check_shape("o", o, B, T, H, v->shape[3]));
    const attn_tensor *ins[] = {q, k, v};
    const char *names[] = {"q", "k", "v"};
    CHECK(attn_check_output("o", o, ins, names, 3));
    int64_t wtok = win.f * win.h * win.w;
    if (wtok > 512) return attn_err(ATTN_ERR_ARG, "a window holds at most 512 tokens");
    int64_t *idx = malloc((size_t)T * sizeof(int64_t));
    if (!idx) return attn_err(ATTN_ERR_NOMEM, "out of memory for the window order");
    attn_status st = attn_grid_window_index(grid, win, idx);
    if (st == ATTN_OK && grid.f * grid.h * grid.w != T)
        st = attn_err(ATTN_ERR_SHAPE, "q->shape[1] must be grid.f * grid.h * grid.w");
    /* Hi heads are computed into a buffer first and the Lo heads (which write
     * o directly) only then, so that no failure leaves half an output. */
    const int64_t hi = H - lo_heads;
    attn_dtype dt = ref ? ATTN_F64 : ATTN_F32;
    size_t es = attn_dtype_size(dt);
    void *mq = calloc((size_t)(B * T * hi * q->shape[3]) + 1, es);
    void *mk = calloc((size_t)(B * T * hi * k->shape[3]) + 1, es);
    void *mv = calloc((size_t)(B * T * hi * v->shape[3]) + 1, es);
    void *mo = calloc((size_t)(B * T * hi * v->shape[3]) + 1, es);
    if (st == ATTN_OK && (!mq || !mk || !mv || !mo))
        st = attn_err(ATTN_ERR_NOMEM, "out of memory for HiLo");
    attn_tensor wq = attn_tensor_4d(mq, dt, B, T, hi, q->shape[3]);
    attn_tensor wk = attn_tensor_4d(mk, dt, B, T, hi, k->shape[3]);
    attn_tensor wv = attn_tensor_4d(mv, dt, B, T, hi, v->shape[3]);
    attn_tensor wo = attn_tensor_4d(mo, dt, B, T, hi, v->shape[3]);
    attn_tensor qh = heads(q, 0, hi), kh = heads(k, 0, hi), vh = heads(v, 0, hi), oh = heads(o, 0, hi);
    if (st == ATTN_OK && hi > 0) { /* Hi: windows, in window-major order */
        st = attn_gather_tokens(ctx, idx, &qh, &wq);
        if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, &kh, &wk);
        if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, &vh, &wv);
        if (st == ATTN_OK) st = windows_forward(ctx, p, T, wtok, &wq, &wk, &wv, &wo);
    }
    if (st == ATTN_OK && lo_heads > 0) { /* Lo: pooled keys and values */
        attn_tensor ql = heads(q, hi, lo_heads), kl = heads(k, hi, lo_heads), vl = heads(v, hi, lo_heads);
        attn_tensor ol = heads(o, hi, lo_heads);
        st = attn_sra_forward(ctx, p, grid, win, &ql, &kl, &vl, &ol, NULL);
    }
    if (st == ATTN_OK && hi > 0) st = attn_scatter_tokens(ctx, idx, &wo, &oh);
    free(mq), free(mk), free(mv), free(mo);
    free(idx);
    return st;
}

attn_status attn_global_context_forward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                        attn_grid win, const attn_tensor *q,
                                        const attn_tensor *q_global, const attn_tensor *k,
                                        const attn_tensor *v, attn_tensor *o_local,
                                        attn_tensor *o_global) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (p->causal || p->plan || p->cu_seqlens_q || p->window_left != -1 || p->window_right != -1)
        return attn_err(ATTN_ERR_ARG, "params: global context attention takes scale and softcap only");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    const attn_tensor *all[] = {q, q_global, k, v, o_local, o_global};
    static const char *const names[] = {"q", "q_global", "k", "v", "o_local", "o_global"};
    for (int x = 0; x < 6; x++) CHECK(attn_check_tensor(names[x], all[x], 4, ref, false));
    const int64_t B = q->shape[0], T = q->shape[1], H = q->shape[2], wtok = win.f * win.h * win.w;
    if (k->shape[2] != H || k->shape[1] != T || v->shape[1] != T)
        return attn_err(ATTN_ERR_SHAPE, "q, k and v must hold the same tokens and heads");
    if (wtok > 512) return attn_err(ATTN_ERR_ARG, "a window holds at most 512 tokens");
    CHECK(attn_check_shape("q_global", q_global, B, wtok, H, q->shape[3]));
    CHECK(attn_check_shape("o_local", o_local, B, T, H, v->shape[3]));
    CHECK(attn_check_shape("o_global", o_global, B, T, H, v->shape[3]));
    CHECK(attn_check_output("o_local", o_local, all, names, 4));
    CHECK(attn_check_output("o_global", o_global, all, names, 5));
    int64_t *idx = malloc((size_t)T * sizeof(int64_t));
    if (!idx) return attn_err(ATTN_ERR_NOMEM, "out of memory for the window order");
    attn_status st = attn_grid_window_index(grid, win, idx);
    if (st == ATTN_OK && grid.f * grid.h * grid.w != T)
        st = attn_err(ATTN_ERR_SHAPE, "q->shape[1] must be grid.f * grid.h * grid.w");
    attn_dtype dt = ref ? ATTN_F64 : ATTN_F32;
    size_t es = attn_dtype_size(dt);
    const int64_t D = q->shape[3], Dv = v->shape[3];
    void *m[6];
    const int64_t sz[6] = {D, D, D, Dv, Dv, Dv};
    for (int x = 0; x < 6; x++) m[x] = calloc((size_t)(B * T * H * sz[x]) + 1, es);
    for (int x = 0; x < 6; x++)
        if (!m[x] && st == ATTN_OK) st = attn_err(ATTN_ERR_NOMEM, "out of memory for global context attention");
    attn_tensor wq = attn_tensor_4d(m[0], dt, B, T, H, D), wg = attn_tensor_4d(m[1], dt, B, T, H, D);
    attn_tensor wk = attn_tensor_4d(m[2], dt, B, T, H, D), wv = attn_tensor_4d(m[3], dt, B, T, H, Dv);
    attn_tensor wl = attn_tensor_4d(m[4], dt, B, T, H, Dv), wgo = attn_tensor_4d(m[5], dt, B, T, H, Dv);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, q, &wq);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, k, &wk);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, v, &wv);
    if (st == ATTN_OK) /* window-major row r holds position r % wtok of its window */
        for (int64_t b = 0; b < B; b++)
            for (int64_t r = 0; r < T; r++)
                for (int64_t h = 0; h < H; h++)
                    for (int64_t e = 0; e < D; e++)
                        attn_store_f64(&wg, attn_off4(&wg, b, r, h, e),
                                       attn_load_f64(q_global, attn_off4(q_global, b, r % wtok, h, e)));
    if (st == ATTN_OK) st = windows_forward(ctx, p, T, wtok, &wq, &wk, &wv, &wl);
    if (st == ATTN_OK) st = windows_forward(ctx, p, T, wtok, &wg, &wk, &wv, &wgo);
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, idx, &wl, o_local);
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, idx, &wgo, o_global);
    for (int x = 0; x < 6; x++) free(m[x]);
    free(idx);
    return st;
}

/* ------------------------------------------------------------ PARO */

static int by_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* The CPU path of attn_paro_choose: the six orders read the same dot
 * products, so per query head Kᵀ (of its kv head) is built once and the
 * sampled rows of all six orders (6 x samples) get their logits by GEMM in
 * blocks of PARO_BQ rows x PARO_BK keys, twice (the row maxima, then
 * 2^(s - max) summed in double into each order's key blocks through the
 * order's inverse index). Heads run in parallel; each head's choice depends
 * only on its inputs. */
enum { PARO_BQ = 64, PARO_BK = 512 };

typedef struct paro_scratch {
    float *kt, *qb, *sc;  /* [d][T], [PARO_BQ][d], [PARO_BQ][PARO_BK] */
    double *mx, *mass;    /* [PARO_BQ], [PARO_BQ][nb] */
} paro_scratch;

static void paro_logits(const attn_kernels *kr, const attn_problem *pr, int64_t rows,
                        int64_t t0, int64_t w, int64_t T, const paro_scratch *s) {
    kr->gemm(rows, w, pr->d, s->qb, pr->d, 1, s->kt + t0, T, s->sc, w, 0, NULL);
    if (pr->softcap > 0.0f)
        kr->softcap(s->sc, rows, w, w, pr->scale / pr->softcap, pr->softcap, NULL, 0);
    else
        for (int64_t x = 0; x < rows * w; x++) s->sc[x] *= pr->scale;
}

static void paro_head(const attn_kernels *kr, const attn_problem *pr, int64_t h,
                      const attn_tensor *q, const attn_tensor *k, int64_t T, int64_t block,
                      int64_t keep, int64_t samples, const int64_t *idx, const int64_t *inv,
                      const paro_scratch *s, int32_t *perm_out, const int32_t perms[6][3]) {
    const int64_t d = pr->d, nb = (T + block - 1) / block, g = pr->h / pr->hk;
    rows_load_transposed(kr, k, attn_off4(k, 0, 0, h / g, 0), k->stride[1], T, d, s->sc,
                         PARO_BQ * PARO_BK, s->kt, T); /* Kᵀ of the head's kv head */
    double conc[6] = {0, 0, 0, 0, 0, 0};
    const int64_t total = 6 * samples; /* row r: order r / samples, sample r % samples */
    for (int64_t r0 = 0; r0 < total; r0 += PARO_BQ) {
        const int64_t rows = r0 + PARO_BQ <= total ? PARO_BQ : total - r0;
        for (int64_t r = 0; r < rows; r++) {
            const int64_t pi = (r0 + r) / samples, a = (r0 + r) % samples;
            const int64_t tok = idx[pi * T + a * T / samples];
            rows_load(kr, q, attn_off4(q, 0, tok, h, 0), d, s->qb + r * d);
            s->mx[r] = -INFINITY;
        }
        for (int64_t t0 = 0; t0 < T; t0 += PARO_BK) { /* the row maxima */
            const int64_t w = t0 + PARO_BK <= T ? PARO_BK : T - t0;
            paro_logits(kr, pr, rows, t0, w, T, s);
            for (int64_t r = 0; r < rows; r++)
                for (int64_t t = 0; t < w; t++)
                    s->mx[r] = s->sc[r * w + t] > s->mx[r] ? s->sc[r * w + t] : s->mx[r];
        }
        for (int64_t x = 0; x < rows * nb; x++) s->mass[x] = 0.0;
        for (int64_t t0 = 0; t0 < T; t0 += PARO_BK) { /* masses by the order's blocks */
            const int64_t w = t0 + PARO_BK <= T ? PARO_BK : T - t0;
            paro_logits(kr, pr, rows, t0, w, T, s);
            for (int64_t r = 0; r < rows; r++) {
                const int64_t pi = (r0 + r) / samples;
                const float sub = (float)(s->mx[r] * 1.4426950408889634);
                float *sr = s->sc + r * w;
                kr->exp2_rows(sr, 1, w, w, 1.4426950408889634f, &sub);
                double *mr = s->mass + r * nb;
                for (int64_t t = 0; t < w; t++) mr[inv[pi * T + t0 + t] / block] += sr[t];
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            double *mr = s->mass + r * nb, sum = 0.0, top = 0.0;
            for (int64_t b = 0; b < nb; b++) sum += mr[b];
            qsort(mr, (size_t)nb, sizeof(double), by_desc);
            for (int64_t b = 0; b < keep; b++) top += mr[b];
            conc[(r0 + r) / samples] += top / sum;
        }
    }
    int best_perm = 0;
    for (int pi = 1; pi < 6; pi++) /* ties: the earlier order */
        if (conc[pi] > conc[best_perm] + 1e-12) best_perm = pi;
    memcpy(perm_out + 3 * h, perms[best_perm], sizeof perms[0]);
}

static attn_status paro_choose_cpu(const attn_ctx *ctx, const attn_problem *pr, attn_grid grid,
                                   const attn_tensor *q, const attn_tensor *k, int64_t block,
                                   int64_t keep, int64_t samples, int32_t *perm_out,
                                   const int32_t perms[6][3]) {
    const int64_t T = q->shape[1], d = pr->d, nb = (T + block - 1) / block;
    const int threads = ctx->threads;
    int64_t *idx = malloc((size_t)(6 * T) * sizeof(int64_t));
    int64_t *inv = malloc((size_t)(6 * T) * sizeof(int64_t));
    const size_t per = (size_t)(d * T + PARO_BQ * d + PARO_BQ * PARO_BK) + 64;
    const size_t per_d = (size_t)(PARO_BQ + PARO_BQ * nb) + 8;
    size_t stride;
    float *scr = scratch_alloc(threads, per, &stride);
    double *dscr = malloc((size_t)threads * per_d * sizeof(double));
    if (!idx || !inv || !scr || !dscr) {
        free(idx), free(inv), free(scr), free(dscr);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for PARO");
    }
    for (int pi = 0; pi < 6; pi++) {
        attn_grid_axis_index(grid, perms[pi], idx + pi * T);
        for (int64_t t = 0; t < T; t++) inv[pi * T + idx[pi * T + t]] = t;
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t h = 0; h < pr->h; h++) {
        float *base = scr + stride * (size_t)engine_thread_id();
        double *dbase = dscr + per_d * (size_t)engine_thread_id();
        paro_scratch s = {base, base + d * T, base + d * T + PARO_BQ * d, dbase, dbase + PARO_BQ};
        paro_head(ctx->kernels, pr, h, q, k, T, block, keep, samples, idx, inv, &s, perm_out,
                  perms);
    }
    free(idx), free(inv), free(scr), free(dscr);
    return ATTN_OK;
}

attn_status attn_paro_choose(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                             const attn_tensor *q, const attn_tensor *k, int64_t block,
                             int64_t keep, int64_t samples, int32_t *perm_out) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!perm_out) return attn_err(ATTN_ERR_NULL, "perm_out must not be NULL");
    CHECK(attn_check_tensor("q", q, 4, true, false));
    CHECK(attn_check_tensor("k", k, 4, true, false));
    attn_problem pr;
    CHECK(attn_check_params(p, q, k, k, &pr));
    const int64_t T = q->shape[1];
    if (q->shape[0] != 1 || k->shape[1] != T)
        return attn_err(ATTN_ERR_SHAPE, "PARO takes one sequence of self-attention on the grid");
    if (grid.f < 1 || grid.h < 1 || grid.w < 1 || grid.f * grid.h * grid.w != T)
        return attn_err(ATTN_ERR_SHAPE, "q->shape[1] must be grid.f * grid.h * grid.w");
    if (pr.causal || pr.window_left != -1 || pr.window_right != -1 || pr.plan)
        return attn_err(ATTN_ERR_ARG, "params: PARO scores full attention (scale and softcap only)");
    if (block < 1 || block > T) return attn_err(ATTN_ERR_ARG, "block must be in 1..tokens");
    const int64_t nb = (T + block - 1) / block;
    if (keep < 1 || keep > nb) return attn_err(ATTN_ERR_ARG, "keep must be in 1..(tokens / block)");
    if (samples < 1 || samples > T) return attn_err(ATTN_ERR_ARG, "samples must be in 1..tokens");
    static const int32_t perms[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
    if (ctx->backend != ATTN_BACKEND_REF)
        return paro_choose_cpu(ctx, &pr, grid, q, k, block, keep, samples, perm_out, perms);
    const int64_t g = pr.h / pr.hk;
    int64_t *idx = malloc((size_t)T * sizeof(int64_t));
    double *s = malloc((size_t)T * sizeof(double)), *mass = malloc((size_t)nb * sizeof(double));
    double *qr = malloc((size_t)pr.d * sizeof(double));
    if (!idx || !s || !mass || !qr) {
        free(idx), free(s), free(mass), free(qr);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for PARO");
    }
    for (int64_t h = 0; h < pr.h; h++) {
        double best = -1.0;
        int best_perm = 0;
        for (int pi = 0; pi < 6; pi++) {
            attn_grid_axis_index(grid, perms[pi], idx);
            double conc = 0.0;
            for (int64_t a = 0; a < samples; a++) {
                int64_t row = a * T / samples; /* position in the reordered sequence */
                for (int64_t e = 0; e < pr.d; e++) qr[e] = attn_load_f64(q, attn_off4(q, 0, idx[row], h, e));
                double mx = -INFINITY, sum = 0.0;
                for (int64_t t = 0; t < T; t++) { /* key at reordered position t */
                    double dot = 0.0;
                    for (int64_t e = 0; e < pr.d; e++) dot += qr[e] * attn_load_f64(k, attn_off4(k, 0, idx[t], h / g, e));
                    double x = (double)pr.scale * dot;
                    if (pr.softcap > 0.0f) x = (double)pr.softcap * tanh(x / (double)pr.softcap);
                    s[t] = x;
                    mx = x > mx ? x : mx;
                }
                for (int64_t b = 0; b < nb; b++) mass[b] = 0.0;
                for (int64_t t = 0; t < T; t++) {
                    double e = exp(s[t] - mx);
                    mass[t / block] += e;
                    sum += e;
                }
                qsort(mass, (size_t)nb, sizeof(double), by_desc);
                double top = 0.0;
                for (int64_t b = 0; b < keep; b++) top += mass[b];
                conc += top / sum;
            }
            if (conc > best + 1e-12) best = conc, best_perm = pi; /* ties: the earlier order */
        }
        memcpy(perm_out + 3 * h, perms[best_perm], sizeof perms[0]);
    }
    free(idx), free(s), free(mass), free(qr);
    return ATTN_OK;
}
