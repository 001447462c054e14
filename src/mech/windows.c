/* Window attention on token grids: HiLo (LITv2), whose Hi heads attend
 * inside non-overlapping windows and Lo heads to pooled keys and values
 * (spatial reduction), and Global Context ViT's local and global-query
 * window attention. Forwards and backwards are compositions of
 * attn_forward / attn_backward, attn_sra_* and the token reorderings. */
#include <stdlib.h>
#include <string.h>

#include "mech_run.h"
#include "validate.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

/* ------------------------------------------------------------ windows
 * HiLo's Hi heads and Global Context run attention inside non-overlapping
 * windows: the tokens gathered into window-major order, then one plan with
 * a full block per window. The backwards run the same composition through
 * attn_backward and carry the gradients back to the grid order. */

/* Heads [h0, h0 + n) of a [B, T, H, D] view. */
static attn_tensor heads(const attn_tensor *t, int64_t h0, int64_t n) {
    attn_tensor v = *t;
    v.shape[2] = n;
    v.data = (char *)t->data + (size_t)(h0 * t->stride[2]) * attn_dtype_size(t->dtype);
    return v;
}

/* Heads [h0, h0 + n) of an LSE view [B, H, T]. */
static attn_tensor lse_heads(const attn_tensor *t, int64_t h0, int64_t n) {
    attn_tensor v = *t;
    v.shape[1] = n;
    v.data = (char *)t->data + (size_t)(h0 * t->stride[1]) * attn_dtype_size(t->dtype);
    return v;
}

/* The scratch tensors of one call, freed together: dense and zeroed, f64 on
 * the reference backend (the oracle stays exact), f32 on the CPU. */
enum { MAX_SCRATCH = 20 };
typedef struct scratch_set {
    void *mem[MAX_SCRATCH];
    int n;
    bool failed; /* some allocation failed */
} scratch_set;

/* [d0, d1, d2, d3], or [d0, d1, d2] when d3 < 0. */
static attn_tensor scratch_add(scratch_set *s, bool ref, int64_t d0, int64_t d1, int64_t d2,
                               int64_t d3) {
    const attn_dtype dt = ref ? ATTN_F64 : ATTN_F32;
    const int64_t n = d0 * d1 * d2 * (d3 < 0 ? 1 : d3);
    void *mem = s->n < MAX_SCRATCH ? calloc((size_t)n + 1, attn_dtype_size(dt)) : NULL;
    if (mem) s->mem[s->n++] = mem;
    else s->failed = true;
    return d3 < 0 ? attn_tensor_3d(mem, dt, d0, d1, d2) : attn_tensor_4d(mem, dt, d0, d1, d2, d3);
}

static void scratch_free(scratch_set *s) {
    for (int x = 0; x < s->n; x++) free(s->mem[x]);
    s->n = 0;
}

/* The mechanisms take p's scale and softcap; masks and plans are theirs. */
static attn_status check_plain(const attn_params *p, const char *what) {
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (p->causal || p->plan || p->cu_seqlens_q || p->window_left != -1 || p->window_right != -1)
        return attn_err(ATTN_ERR_ARG, "params: %s takes scale and softcap only", what);
    return ATTN_OK;
}

/* Self-attention on the grid with as many kv heads as query heads:
 * q, k [B, T, H, D], v [B, T, H, Dv]; *pr the problem they describe. */
static attn_status check_self_qkv(bool ref, const attn_params *p, const char *what,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, attn_problem *pr) {
    CHECK(attn_check_tensor("q", q, 4, ref, false));
    CHECK(attn_check_tensor("k", k, 4, ref, false));
    CHECK(attn_check_tensor("v", v, 4, ref, false));
    CHECK(attn_check_params(p, q, k, v, pr));
    if (k->shape[2] != q->shape[2])
        return attn_err(ATTN_ERR_SHAPE, "%s needs as many kv heads as query heads", what);
    if (k->shape[1] != q->shape[1])
        return attn_err(ATTN_ERR_SHAPE, "%s is self-attention: q, k and v hold the same tokens", what);
    return ATTN_OK;
}

/* The grid holds the T tokens and win cuts it into windows of *wtok <= 512
 * tokens (the largest plan block). */
static attn_status check_windows(attn_grid g, attn_grid win, int64_t T, int64_t *wtok) {
    if (g.f < 1 || g.h < 1 || g.w < 1) return attn_err(ATTN_ERR_ARG, "grid extents must be >= 1");
    int64_t cells;
    if (__builtin_mul_overflow(g.f, g.h, &cells) || __builtin_mul_overflow(cells, g.w, &cells) ||
        cells != T)
        return attn_err(ATTN_ERR_SHAPE, "q->shape[1] (%lld) must be grid.f * grid.h * grid.w",
                        (long long)T);
    if (win.f < 1 || win.h < 1 || win.w < 1 || g.f % win.f || g.h % win.h || g.w % win.w)
        return attn_err(ATTN_ERR_ARG, "win must be >= 1 and divide the grid on each axis");
    *wtok = win.f * win.h * win.w;
    if (*wtok > 512)
        return attn_err(ATTN_ERR_ARG, "a window holds at most 512 tokens (win holds %lld)",
                        (long long)*wtok);
    return ATTN_OK;
}

/* A tensor of exactly [B, T, H, d]: an output, a saved output or a gradient. */
static attn_status check_rows(bool ref, const char *name, const attn_tensor *t, int64_t B,
                              int64_t T, int64_t H, int64_t dv) {
    CHECK(attn_check_tensor(name, t, 4, ref, false));
    return attn_check_shape(name, t, B, T, H, dv);
}

/* A gradient shaped like its input, overlapping none of the n tensors
 * before it in all (the inputs, then the gradients checked before it). */
static attn_status check_grad(bool ref, const char *name, const attn_tensor *g,
                              const attn_tensor *like, const attn_tensor *const *all,
                              const char *const *names, int n) {
    CHECK(attn_check_tensor(name, g, 4, ref, false));
    CHECK(attn_check_shape(name, g, like->shape[0], like->shape[1], like->shape[2], like->shape[3]));
    return attn_check_output(name, g, all, names, n);
}

/* The window-major order (malloc'ed into *idx) of a grid checked by check_windows. */
static attn_status window_order(attn_grid grid, attn_grid win, int64_t T, int64_t **idx) {
    *idx = malloc((size_t)T * sizeof(int64_t));
    if (!*idx) return attn_err(ATTN_ERR_NOMEM, "out of memory for the window order");
    return attn_grid_window_index(grid, win, *idx);
}

/* The block-diagonal plan of T window-major tokens: one full block per window. */
static attn_status window_plan(int64_t T, int64_t wtok, attn_plan **plan) {
    const int64_t nb = T / wtok;
    int64_t *off = calloc((size_t)nb + 1, sizeof(int64_t));
    attn_plan_entry *en = calloc((size_t)nb + 1, sizeof(attn_plan_entry));
    attn_status st = off && en ? ATTN_OK : attn_err(ATTN_ERR_NOMEM, "out of memory for window attention");
    for (int64_t b = 0; b < nb && st == ATTN_OK; b++) {
        attn_plan_entry e = {(int32_t)b, 0, ATTN_BLOCK_FULL, 0};
        en[b] = e;
        off[b + 1] = b + 1;
    }
    if (st == ATTN_OK) st = attn_plan_create(plan, T, T, wtok, wtok, 1, off, en);
    free(off), free(en);
    return st;
}

static attn_params with_plan(const attn_params *p, const attn_plan *plan) {
    attn_params pw = *p;
    pw.plan = plan;
    return pw;
}

/* LSE rows [B, H, T] between the grid order and window-major order:
 * gather dst[b, h, r] = src[b, h, idx[r]]; scatter dst[b, h, idx[r]] = src[b, h, r]. */
static void move_lse(const int64_t *idx, const attn_tensor *src, attn_tensor *dst, int scatter) {
    for (int64_t b = 0; b < src->shape[0]; b++)
        for (int64_t h = 0; h < src->shape[1]; h++)
            for (int64_t r = 0; r < src->shape[2]; r++) {
                const int64_t from = scatter ? r : idx[r], to = scatter ? idx[r] : r;
                attn_store_f64(dst, attn_off3(dst, b, h, to),
                               attn_load_f64(src, attn_off3(src, b, h, from)));
            }
}

/* Window-major row r of wg holds the global query of position r % wtok. */
static void expand_global(const attn_tensor *q_global, int64_t wtok, attn_tensor *wg) {
    for (int64_t b = 0; b < wg->shape[0]; b++)
        for (int64_t r = 0; r < wg->shape[1]; r++)
            for (int64_t h = 0; h < wg->shape[2]; h++)
                for (int64_t e = 0; e < wg->shape[3]; e++)
                    attn_store_f64(wg, attn_off4(wg, b, r, h, e),
                                   attn_load_f64(q_global, attn_off4(q_global, b, r % wtok, h, e)));
}

/* The adjoint of expand_global: dq_global[b, r] = the sum over windows w of
 * wdg[b, w wtok + r], in window order (in double), whatever the threads. */
static void fold_global(const attn_tensor *wdg, int64_t wtok, attn_tensor *dq_global) {
    const int64_t nw = wdg->shape[1] / wtok;
    for (int64_t b = 0; b < wdg->shape[0]; b++)
        for (int64_t r = 0; r < wtok; r++)
            for (int64_t h = 0; h < wdg->shape[2]; h++)
                for (int64_t e = 0; e < wdg->shape[3]; e++) {
                    double acc = 0.0;
                    for (int64_t w = 0; w < nw; w++)
                        acc += attn_load_f64(wdg, attn_off4(wdg, b, w * wtok + r, h, e));
                    attn_store_f64(dq_global, attn_off4(dq_global, b, r, h, e), acc);
                }
}

/* acc += x, two dense scratch tensors of one shape and dtype. */
static void add_into(attn_tensor *acc, const attn_tensor *x) {
    const int64_t n = acc->shape[0] * acc->shape[1] * acc->shape[2] * acc->shape[3];
    if (acc->dtype == ATTN_F64) {
        double *a = acc->data;
        const double *b = x->data;
        for (int64_t i = 0; i < n; i++) a[i] += b[i];
    } else {
        float *a = acc->data;
        const float *b = x->data;
        for (int64_t i = 0; i < n; i++) a[i] += b[i];
    }
}

/* ------------------------------------------------------------ HiLo */

/* The first hi heads of x (HiLo's Hi heads) gathered into window-major
 * order, and back (scatter_hi, into out's first hi heads). */
static attn_status gather_hi(attn_ctx *ctx, const int64_t *idx, const attn_tensor *x,
                             int64_t hi, attn_tensor *out) {
    const attn_tensor xh = heads(x, 0, hi);
    return attn_gather_tokens(ctx, idx, &xh, out);
}

static attn_status scatter_hi(attn_ctx *ctx, const int64_t *idx, const attn_tensor *x,
                              int64_t hi, attn_tensor *out) {
    attn_tensor oh = heads(out, 0, hi);
    return attn_scatter_tokens(ctx, idx, x, &oh);
}

attn_status attn_hilo_forward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                              attn_grid win, int64_t lo_heads, const attn_tensor *q,
                              const attn_tensor *k, const attn_tensor *v, attn_tensor *o,
                              attn_tensor *lse) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    CHECK(check_plain(p, "HiLo"));
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    attn_problem pr;
    CHECK(check_self_qkv(ref, p, "HiLo", q, k, v, &pr));
    const int64_t B = q->shape[0], T = q->shape[1], H = q->shape[2], D = pr.d, Dv = pr.dv;
    if (lo_heads < 0 || lo_heads > H) return attn_err(ATTN_ERR_ARG, "lo_heads must be in 0..H");
    CHECK(check_rows(ref, "o", o, B, T, H, Dv));
    if (lse) CHECK(attn_check_lse("lse", lse, ref, B, H, T));
    const attn_tensor *ins[] = {q, k, v, lse};
    const char *names[] = {"q", "k", "v", "lse"};
    CHECK(attn_check_output("o", o, ins, names, 4));
    if (lse) CHECK(attn_check_output("lse", lse, ins, names, 3));
    int64_t wtok;
    CHECK(check_windows(grid, win, T, &wtok));

    /* Hi heads are computed into buffers first and the Lo heads (which write
     * o and lse directly) only then, so that no failure leaves half an output. */
    const int64_t hi = H - lo_heads;
    scratch_set s = {0};
    attn_tensor wq = scratch_add(&s, ref, B, T, hi, D), wk = scratch_add(&s, ref, B, T, hi, D);
    attn_tensor wv = scratch_add(&s, ref, B, T, hi, Dv), wo = scratch_add(&s, ref, B, T, hi, Dv);
    attn_tensor wl = scratch_add(&s, ref, B, hi, T, -1);
    int64_t *idx = NULL;
    attn_plan *plan = NULL;
    attn_status st = s.failed ? attn_err(ATTN_ERR_NOMEM, "out of memory for HiLo") : ATTN_OK;
    if (st == ATTN_OK) st = window_order(grid, win, T, &idx);
    if (st == ATTN_OK && hi > 0) { /* Hi: windows, in window-major order */
        st = gather_hi(ctx, idx, q, hi, &wq);
        if (st == ATTN_OK) st = gather_hi(ctx, idx, k, hi, &wk);
        if (st == ATTN_OK) st = gather_hi(ctx, idx, v, hi, &wv);
        if (st == ATTN_OK) st = window_plan(T, wtok, &plan);
        const attn_params pw = with_plan(p, plan);
        if (st == ATTN_OK) st = attn_forward(ctx, &pw, &wq, &wk, &wv, &wo, lse ? &wl : NULL);
    }
    if (st == ATTN_OK && lo_heads > 0) { /* Lo: pooled keys and values */
        attn_tensor ql = heads(q, hi, lo_heads), kl = heads(k, hi, lo_heads), vl = heads(v, hi, lo_heads);
        attn_tensor ol = heads(o, hi, lo_heads), ll = {0};
        if (lse) ll = lse_heads(lse, hi, lo_heads);
        st = attn_sra_forward(ctx, p, grid, win, &ql, &kl, &vl, &ol, lse ? &ll : NULL);
    }
    if (st == ATTN_OK && hi > 0) {
        st = scatter_hi(ctx, idx, &wo, hi, o);
        if (st == ATTN_OK && lse) {
            attn_tensor lh = lse_heads(lse, 0, hi);
            move_lse(idx, &wl, &lh, 1);
        }
    }
    attn_plan_free(plan);
    free(idx);
    scratch_free(&s);
    return st;
}

attn_status attn_hilo_backward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                               attn_grid win, int64_t lo_heads, const attn_tensor *q,
                               const attn_tensor *k, const attn_tensor *v, const attn_tensor *o,
                               const attn_tensor *lse, const attn_tensor *dout, attn_tensor *dq,
                               attn_tensor *dk, attn_tensor *dv) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    CHECK(check_plain(p, "HiLo"));
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    attn_problem pr;
    CHECK(check_self_qkv(ref, p, "HiLo", q, k, v, &pr));
    const int64_t B = q->shape[0], T = q->shape[1], H = q->shape[2], D = pr.d, Dv = pr.dv;
    if (lo_heads < 0 || lo_heads > H) return attn_err(ATTN_ERR_ARG, "lo_heads must be in 0..H");
    CHECK(check_rows(ref, "o", o, B, T, H, Dv));
    CHECK(attn_check_lse("lse", lse, ref, B, H, T));
    CHECK(check_rows(ref, "dout", dout, B, T, H, Dv));
    const attn_tensor *all[] = {q, k, v, o, lse, dout, dq, dk};
    const char *names[] = {"q", "k", "v", "o", "lse", "dout", "dq", "dk"};
    CHECK(check_grad(ref, "dq", dq, q, all, names, 6));
    CHECK(check_grad(ref, "dk", dk, k, all, names, 7));
    CHECK(check_grad(ref, "dv", dv, v, all, names, 8));
    int64_t wtok;
    CHECK(check_windows(grid, win, T, &wtok));

    /* as the forward: the Hi heads' gradients into buffers, then the Lo
     * heads' (straight into the outputs), then the Hi heads scattered */
    const int64_t hi = H - lo_heads;
    scratch_set s = {0};
    attn_tensor wq = scratch_add(&s, ref, B, T, hi, D), wk = scratch_add(&s, ref, B, T, hi, D);
    attn_tensor wv = scratch_add(&s, ref, B, T, hi, Dv), wo = scratch_add(&s, ref, B, T, hi, Dv);
    attn_tensor wdo = scratch_add(&s, ref, B, T, hi, Dv), wl = scratch_add(&s, ref, B, hi, T, -1);
    attn_tensor wdq = scratch_add(&s, ref, B, T, hi, D), wdk = scratch_add(&s, ref, B, T, hi, D);
    attn_tensor wdv = scratch_add(&s, ref, B, T, hi, Dv);
    int64_t *idx = NULL;
    attn_plan *plan = NULL;
    attn_status st = s.failed ? attn_err(ATTN_ERR_NOMEM, "out of memory for the HiLo backward") : ATTN_OK;
    if (st == ATTN_OK) st = window_order(grid, win, T, &idx);
    if (st == ATTN_OK && hi > 0) {
        st = gather_hi(ctx, idx, q, hi, &wq);
        if (st == ATTN_OK) st = gather_hi(ctx, idx, k, hi, &wk);
        if (st == ATTN_OK) st = gather_hi(ctx, idx, v, hi, &wv);
        if (st == ATTN_OK) st = gather_hi(ctx, idx, o, hi, &wo);
        if (st == ATTN_OK) st = gather_hi(ctx, idx, dout, hi, &wdo);
        const attn_tensor lh = lse_heads(lse, 0, hi);
        if (st == ATTN_OK) move_lse(idx, &lh, &wl, 0);
        if (st == ATTN_OK) st = window_plan(T, wtok, &plan);
        const attn_params pw = with_plan(p, plan);
        if (st == ATTN_OK) st = attn_backward(ctx, &pw, &wq, &wk, &wv, &wo, &wl, &wdo, &wdq, &wdk, &wdv);
    }
    if (st == ATTN_OK && lo_heads > 0) {
        const attn_tensor ql = heads(q, hi, lo_heads), kl = heads(k, hi, lo_heads);
        const attn_tensor vl = heads(v, hi, lo_heads), ol = heads(o, hi, lo_heads);
        const attn_tensor ll = lse_heads(lse, hi, lo_heads), dol = heads(dout, hi, lo_heads);
        attn_tensor dql = heads(dq, hi, lo_heads), dkl = heads(dk, hi, lo_heads);
        attn_tensor dvl = heads(dv, hi, lo_heads);
        st = attn_sra_backward(ctx, p, grid, win, &ql, &kl, &vl, &ol, &ll, &dol, &dql, &dkl, &dvl);
    }
    if (st == ATTN_OK && hi > 0) st = scatter_hi(ctx, idx, &wdq, hi, dq);
    if (st == ATTN_OK && hi > 0) st = scatter_hi(ctx, idx, &wdk, hi, dk);
    if (st == ATTN_OK && hi > 0) st = scatter_hi(ctx, idx, &wdv, hi, dv);
    attn_plan_free(plan);
    free(idx);
    scratch_free(&s);
    return st;
}

/* ------------------------------------------------------------ Global Context */

static const char GC[] = "global context attention";

attn_status attn_global_context_forward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                        attn_grid win, const attn_tensor *q,
                                        const attn_tensor *q_global, const attn_tensor *k,
                                        const attn_tensor *v, attn_tensor *o_local,
                                        attn_tensor *o_global, attn_tensor *lse_local,
                                        attn_tensor *lse_global) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    CHECK(check_plain(p, GC));
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    attn_problem pr;
    CHECK(check_self_qkv(ref, p, GC, q, k, v, &pr));
    const int64_t B = q->shape[0], T = q->shape[1], H = q->shape[2], D = pr.d, Dv = pr.dv;
    int64_t wtok;
    CHECK(check_windows(grid, win, T, &wtok));
    CHECK(check_rows(ref, "q_global", q_global, B, wtok, H, D));
    CHECK(check_rows(ref, "o_local", o_local, B, T, H, Dv));
    CHECK(check_rows(ref, "o_global", o_global, B, T, H, Dv));
    if (lse_local) CHECK(attn_check_lse("lse_local", lse_local, ref, B, H, T));
    if (lse_global) CHECK(attn_check_lse("lse_global", lse_global, ref, B, H, T));
    /* each output against the inputs and the outputs before it */
    const attn_tensor *all[] = {q, q_global, k, v, o_local, o_global, lse_local};
    static const char *const names[] = {"q", "q_global", "k", "v", "o_local", "o_global", "lse_local"};
    CHECK(attn_check_output("o_local", o_local, all, names, 4));
    CHECK(attn_check_output("o_global", o_global, all, names, 5));
    if (lse_local) CHECK(attn_check_output("lse_local", lse_local, all, names, 6));
    if (lse_global) CHECK(attn_check_output("lse_global", lse_global, all, names, 7));

    scratch_set s = {0};
    attn_tensor wq = scratch_add(&s, ref, B, T, H, D), wg = scratch_add(&s, ref, B, T, H, D);
    attn_tensor wk = scratch_add(&s, ref, B, T, H, D), wv = scratch_add(&s, ref, B, T, H, Dv);
    attn_tensor wl = scratch_add(&s, ref, B, T, H, Dv), wgo = scratch_add(&s, ref, B, T, H, Dv);
    attn_tensor wll = scratch_add(&s, ref, B, H, T, -1), wlg = scratch_add(&s, ref, B, H, T, -1);
    int64_t *idx = NULL;
    attn_plan *plan = NULL;
    attn_status st = s.failed ? attn_err(ATTN_ERR_NOMEM, "out of memory for global context attention")
                              : ATTN_OK;
    if (st == ATTN_OK) st = window_order(grid, win, T, &idx);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, q, &wq);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, k, &wk);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, v, &wv);
    if (st == ATTN_OK) expand_global(q_global, wtok, &wg);
    if (st == ATTN_OK) st = window_plan(T, wtok, &plan);
    const attn_params pw = with_plan(p, plan);
    if (st == ATTN_OK) st = attn_forward(ctx, &pw, &wq, &wk, &wv, &wl, lse_local ? &wll : NULL);
    if (st == ATTN_OK) st = attn_forward(ctx, &pw, &wg, &wk, &wv, &wgo, lse_global ? &wlg : NULL);
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, idx, &wl, o_local);
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, idx, &wgo, o_global);
    if (st == ATTN_OK && lse_local) move_lse(idx, &wll, lse_local, 1);
    if (st == ATTN_OK && lse_global) move_lse(idx, &wlg, lse_global, 1);
    attn_plan_free(plan);
    free(idx);
    scratch_free(&s);
    return st;
}

/* The backward's checks: every input, then each gradient against the
 * inputs and the gradients before it. *wtok: the window size. */
static attn_status check_gc_backward(bool ref, const attn_params *p, attn_grid grid, attn_grid win,
                                     const attn_tensor *const in[10], attn_tensor *const grads[4],
                                     int64_t *wtok) {
    const attn_tensor *q = in[0], *q_global = in[1], *k = in[2], *v = in[3];
    attn_problem pr;
    CHECK(check_self_qkv(ref, p, GC, q, k, v, &pr));
    const int64_t B = q->shape[0], T = q->shape[1], H = q->shape[2];
    CHECK(check_windows(grid, win, T, wtok));
    CHECK(check_rows(ref, "q_global", q_global, B, *wtok, H, pr.d));
    CHECK(check_rows(ref, "o_local", in[4], B, T, H, pr.dv));
    CHECK(check_rows(ref, "o_global", in[5], B, T, H, pr.dv));
    CHECK(attn_check_lse("lse_local", in[6], ref, B, H, T));
    CHECK(attn_check_lse("lse_global", in[7], ref, B, H, T));
    CHECK(check_rows(ref, "dout_local", in[8], B, T, H, pr.dv));
    CHECK(check_rows(ref, "dout_global", in[9], B, T, H, pr.dv));
    const attn_tensor *all[13];
    for (int x = 0; x < 10; x++) all[x] = in[x];
    for (int x = 0; x < 3; x++) all[10 + x] = grads[x];
    static const char *const names[13] = {"q", "q_global", "k", "v", "o_local", "o_global",
                                          "lse_local", "lse_global", "dout_local", "dout_global",
                                          "dq", "dq_global", "dk"};
    static const char *const gnames[4] = {"dq", "dq_global", "dk", "dv"};
    static const int like[4] = {0, 1, 2, 3}; /* dq like q, dq_global like q_global, ... */
    for (int x = 0; x < 4; x++)
        CHECK(check_grad(ref, gnames[x], grads[x], in[like[x]], all, names, 10 + x));
    return ATTN_OK;
}

attn_status attn_global_context_backward(
    attn_ctx *ctx, const attn_params *p, attn_grid grid, attn_grid win, const attn_tensor *q,
    const attn_tensor *q_global, const attn_tensor *k, const attn_tensor *v,
    const attn_tensor *o_local, const attn_tensor *o_global, const attn_tensor *lse_local,
    const attn_tensor *lse_global, const attn_tensor *dout_local, const attn_tensor *dout_global,
    attn_tensor *dq, attn_tensor *dq_global, attn_tensor *dk, attn_tensor *dv) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    CHECK(check_plain(p, GC));
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    const attn_tensor *const in[10] = {q, q_global, k, v, o_local, o_global,
                                       lse_local, lse_global, dout_local, dout_global};
    attn_tensor *const grads[4] = {dq, dq_global, dk, dv};
    int64_t wtok;
    CHECK(check_gc_backward(ref, p, grid, win, in, grads, &wtok));
    const int64_t B = q->shape[0], T = q->shape[1], H = q->shape[2], D = q->shape[3], Dv = v->shape[3];

    /* both branches' gradients in window-major order: dk and dv are the sum
     * of the two (local + global, element by element), dq_global the sum of
     * its expanded rows' gradients over the windows */
    scratch_set s = {0};
    attn_tensor wq = scratch_add(&s, ref, B, T, H, D), wg = scratch_add(&s, ref, B, T, H, D);
    attn_tensor wk = scratch_add(&s, ref, B, T, H, D), wv = scratch_add(&s, ref, B, T, H, Dv);
    attn_tensor wol = scratch_add(&s, ref, B, T, H, Dv), wog = scratch_add(&s, ref, B, T, H, Dv);
    attn_tensor wdl = scratch_add(&s, ref, B, T, H, Dv), wdg = scratch_add(&s, ref, B, T, H, Dv);
    attn_tensor wll = scratch_add(&s, ref, B, H, T, -1), wlg = scratch_add(&s, ref, B, H, T, -1);
    attn_tensor wdq = scratch_add(&s, ref, B, T, H, D), wdqg = scratch_add(&s, ref, B, T, H, D);
    attn_tensor wdk = scratch_add(&s, ref, B, T, H, D), wdv = scratch_add(&s, ref, B, T, H, Dv);
    attn_tensor wdk2 = scratch_add(&s, ref, B, T, H, D), wdv2 = scratch_add(&s, ref, B, T, H, Dv);
    int64_t *idx = NULL;
    attn_plan *plan = NULL;
    attn_status st = s.failed ? attn_err(ATTN_ERR_NOMEM, "out of memory for the global context backward")
                              : ATTN_OK;
    if (st == ATTN_OK) st = window_order(grid, win, T, &idx);
    const attn_tensor *from[6] = {q, k, v, o_local, o_global, dout_local};
    attn_tensor *to[6] = {&wq, &wk, &wv, &wol, &wog, &wdl};
    for (int x = 0; x < 6 && st == ATTN_OK; x++) st = attn_gather_tokens(ctx, idx, from[x], to[x]);
    if (st == ATTN_OK) st = attn_gather_tokens(ctx, idx, dout_global, &wdg);
    if (st == ATTN_OK) {
        expand_global(q_global, wtok, &wg);
        move_lse(idx, lse_local, &wll, 0);
        move_lse(idx, lse_global, &wlg, 0);
        st = window_plan(T, wtok, &plan);
    }
    const attn_params pw = with_plan(p, plan);
    if (st == ATTN_OK) st = attn_backward(ctx, &pw, &wq, &wk, &wv, &wol, &wll, &wdl, &wdq, &wdk, &wdv);
    if (st == ATTN_OK) st = attn_backward(ctx, &pw, &wg, &wk, &wv, &wog, &wlg, &wdg, &wdqg, &wdk2, &wdv2);
    if (st == ATTN_OK) {
        add_into(&wdk, &wdk2);
        add_into(&wdv, &wdv2);
        st = attn_scatter_tokens(ctx, idx, &wdq, dq);
    }
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, idx, &wdk, dk);
    if (st == ATTN_OK) st = attn_scatter_tokens(ctx, idx, &wdv, dv);
    if (st == ATTN_OK) fold_global(&wdqg, wtok, dq_global);
    attn_plan_free(plan);
    free(idx);
    scratch_free(&s);
    return st;
}
