/* The Mamba selective scan (Mamba-1, diagonal A). As the chunked-recurrence
 * engine it is one head per channel e, q = C and k = B shared by every
 * channel (views with head stride 0, no copy), v = Δ x (Dv = 1), a gate per
 * state dim g = Δ A (ATTN_GATE_KEY), y = o + Dskip x: so it runs on the
 * reference backend and in the backward (the engine's backward, then the
 * chain rule through v = Δ x, g = Δ A and the skip). On the CPU the forward
 * and the step run the scan token by token instead (src/linear/scan.c):
 * with Dv = 1 the chunks' per-head overhead dominates. */
#include <stdlib.h>
#include <string.h>

#include "linear/linear.h"
#include "mech.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

/* The inputs shaped for the engine. */
typedef struct mamba_in {
    int64_t B, T, E, N;
    float *fx, *fdl, *fa, *fds; /* x, Δ [B,T,E]; A [E,N]; Dskip [E] or NULL */
    float *fv, *fg;             /* Δ x [B,T,E]; Δ A [B,T,E,N] */
    attn_tensor tq, tk, tv, tg;
} mamba_in;

static void mamba_free(mamba_in *m) {
    free(m->fx), free(m->fdl), free(m->fa), free(m->fds), free(m->fv), free(m->fg);
}

/* Validate the inputs, copy them, and (engine) build the engine's q, k, v, g. */
static attn_status prepare(const attn_ctx *ctx, const attn_tensor *x, const attn_tensor *delta,
                           const attn_tensor *a, const attn_tensor *bm, const attn_tensor *cm,
                           const attn_tensor *dskip, bool engine, mamba_in *m) {
    memset(m, 0, sizeof *m);
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("x", x, 3, ref, false));
    const int64_t B = x->shape[0], T = x->shape[1], E = x->shape[2];
    CHECK(attn_check_tensor("delta", delta, 3, ref, false));
    CHECK(attn_check_shape("delta", delta, B, T, E, -1));
    CHECK(attn_check_tensor("a", a, 2, ref, false));
    const int64_t N = a->shape[1];
    CHECK(attn_check_shape("a", a, E, N, -1, -1));
    CHECK(attn_check_tensor("bm", bm, 3, ref, false));
    CHECK(attn_check_shape("bm", bm, B, T, N, -1));
    CHECK(attn_check_tensor("cm", cm, 3, ref, false));
    CHECK(attn_check_shape("cm", cm, B, T, N, -1));
    if (dskip) CHECK(mech_check_1d("dskip", dskip, ref, E));
    m->B = B, m->T = T, m->E = E, m->N = N;
    m->fx = mech_alloc(B, T, E, 1), m->fdl = mech_alloc(B, T, E, 1), m->fa = mech_alloc(E, N, 1, 1);
    m->fds = dskip ? mech_alloc(E, 1, 1, 1) : NULL;
    if (engine) m->fv = mech_alloc(B, T, E, 1), m->fg = mech_alloc(B, T, E, N);
    if (!m->fx || !m->fdl || !m->fa || (dskip && !m->fds) || (engine && (!m->fv || !m->fg))) {
        mamba_free(m);
        return attn_err(ATTN_ERR_NOMEM, "mamba scan: out of memory for its copies");
    }
    mech_dense(x, m->fx);
    mech_dense(delta, m->fdl);
    mech_dense(a, m->fa);
    if (dskip) mech_dense(dskip, m->fds);
    if (!engine) return ATTN_OK;
    for (int64_t r = 0; r < B * T * E; r++) {
        const int64_t ch = r % E;
        const float d = m->fdl[r];
        m->fv[r] = d * m->fx[r];
        for (int64_t n = 0; n < N; n++) m->fg[r * N + n] = d * m->fa[ch * N + n];
    }
    m->tq = *cm;
    m->tk = *bm;
    attn_tensor *views[2] = {&m->tq, &m->tk};
    for (int i = 0; i < 2; i++) { /* [B, T, N] as [B, T, E, N], head stride 0 */
        const attn_tensor src = *views[i];
        views[i]->ndim = 4;
        views[i]->shape[2] = E;
        views[i]->shape[3] = N;
        views[i]->stride[2] = 0;
        views[i]->stride[3] = src.stride[2];
    }
    m->tv = attn_tensor_4d(m->fv, ATTN_F32, B, T, E, 1);
    m->tg = attn_tensor_4d(m->fg, ATTN_F32, B, T, E, N);
    return ATTN_OK;
}

static attn_linear_params engine_params(void) {
    attn_linear_params p = attn_linear_params_default();
    p.scale = 1.0f;
    p.gate = ATTN_GATE_KEY;
    return p;
}

/* y = o + Dskip x. */
static void finish_y(const mamba_in *m, float *fo, attn_tensor *y) {
    if (m->fds)
        for (int64_t r = 0; r < m->B * m->T * m->E; r++) fo[r] += m->fds[r % m->E] * m->fx[r];
    mech_store_dense(y, fo);
}

static attn_status check_y(const attn_ctx *ctx, const char *name, const attn_tensor *y,
                           const mamba_in *m) {
    CHECK(attn_check_tensor(name, y, 3, ctx->backend == ATTN_BACKEND_REF, false));
    return attn_check_shape(name, y, m->B, m->T, m->E, -1);
}

/* A state [B, E, N, 1] f32. */
static attn_status check_state(const attn_ctx *ctx, const char *name, const attn_tensor *t,
                               const mamba_in *m) {
    CHECK(attn_check_tensor(name, t, 4, ctx->backend == ATTN_BACKEND_REF, false));
    if (t->dtype != ATTN_F32 && t->dtype != ATTN_F64)
        return attn_err(ATTN_ERR_DTYPE, "%s must be f32", name);
    return attn_check_shape(name, t, m->B, m->E, m->N, 1);
}

/* The CPU path: the selective scan token by token (src/linear/scan.c) on
 * dense copies; fo gets y with the skip. */
static attn_status run_scan(const attn_ctx *ctx, const mamba_in *m, const attn_tensor *bm,
                            const attn_tensor *cm, const attn_tensor *state_in,
                            attn_tensor *state_out, float *fo) {
    float *fb = mech_alloc(m->B, m->T, m->N, 1), *fc = mech_alloc(m->B, m->T, m->N, 1);
    float *fs = (state_in || state_out) ? mech_alloc(m->B, m->E, m->N, 1) : NULL;
    attn_status st = ATTN_OK;
    if (!fb || !fc || ((state_in || state_out) && !fs)) {
        st = attn_err(ATTN_ERR_NOMEM, "mamba scan: out of memory for its copies");
        goto done;
    }
    mech_dense(bm, fb);
    mech_dense(cm, fc);
    if (state_in) mech_dense(state_in, fs);
    st = linear_engine_diag_scan(ctx, m->B, m->T, m->E, m->N, m->fx, m->fdl, m->fa, fb, fc, m->fds,
                                 state_in ? fs : NULL, state_out ? fs : NULL, fo);
    if (st == ATTN_OK && state_out) mech_store_dense(state_out, fs);
done:
    free(fb), free(fc), free(fs);
    return st;
}

/* forward (step = 0) or step (step = 1: state in place). */
static attn_status run(attn_ctx *ctx, int step, const attn_tensor *x, const attn_tensor *delta,
                       const attn_tensor *a, const attn_tensor *bm, const attn_tensor *cm,
                       const attn_tensor *dskip, const attn_tensor *state_in, attn_tensor *y,
                       attn_tensor *state_out) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    mamba_in m;
    const bool scan = ctx->backend == ATTN_BACKEND_CPU; /* else the engine's reference */
    CHECK(prepare(ctx, x, delta, a, bm, cm, dskip, !scan, &m));
    attn_status st = check_y(ctx, "y", y, &m);
    const attn_tensor *ins[] = {x, delta, a, bm, cm, dskip, state_in, state_out};
    const char *names[] = {"x", "delta", "a", "bm", "cm", "dskip", "state_in", "state_out"};
    if (st == ATTN_OK) st = attn_check_output("y", y, ins, names, 8);
    if (st == ATTN_OK && state_in) st = check_state(ctx, "state_in", state_in, &m);
    if (st == ATTN_OK && state_out) st = check_state(ctx, step ? "state" : "state_out", state_out, &m);
    if (st == ATTN_OK && state_out) st = attn_check_output("state_out", state_out, ins, names, 7);
    float *fo = st == ATTN_OK ? mech_alloc(m.B, m.T, m.E, 1) : NULL;
    if (st == ATTN_OK && !fo) st = attn_err(ATTN_ERR_NOMEM, "mamba scan: out of memory");
    if (st == ATTN_OK && scan) {
        st = run_scan(ctx, &m, bm, cm, step ? state_out : state_in, state_out, fo);
        if (st == ATTN_OK) mech_store_dense(y, fo);
    } else if (st == ATTN_OK) {
        attn_tensor to = attn_tensor_4d(fo, ATTN_F32, m.B, m.T, m.E, 1);
        attn_linear_params p = engine_params();
        st = step ? attn_linear_decode(ctx, &p, &m.tq, &m.tk, &m.tv, &m.tg, state_out, &to)
                  : attn_linear_forward(ctx, &p, &m.tq, &m.tk, &m.tv, &m.tg, state_in, &to,
                                        state_out);
        if (st == ATTN_OK) finish_y(&m, fo, y);
    }
    free(fo);
    mamba_free(&m);
    return st;
}

attn_status attn_mamba_scan(attn_ctx *ctx, const attn_tensor *x, const attn_tensor *delta,
                            const attn_tensor *a, const attn_tensor *bm, const attn_tensor *cm,
                            const attn_tensor *dskip, const attn_tensor *state_in,
                            attn_tensor *y, attn_tensor *state_out) {
    return run(ctx, 0, x, delta, a, bm, cm, dskip, state_in, y, state_out);
}

attn_status attn_mamba_step(attn_ctx *ctx, const attn_tensor *x, const attn_tensor *delta,
                            const attn_tensor *a, const attn_tensor *bm, const attn_tensor *cm,
                            const attn_tensor *dskip, attn_tensor *state, attn_tensor *y) {
    if (ctx && !state) {
        attn_clear_error();
        return attn_err(ATTN_ERR_NULL, "state must not be NULL");
    }
    return run(ctx, 1, x, delta, a, bm, cm, dskip, NULL, y, state);
}

/* Σ over channels: out [B*T][N] = Σ_e in [B*T][E][N]. */
static void sum_channels(const float *in, int64_t bt, int64_t e, int64_t n, float *out) {
    for (int64_t r = 0; r < bt; r++)
        for (int64_t x = 0; x < n; x++) {
            float acc = 0.0f;
            for (int64_t c = 0; c < e; c++) acc += in[(r * e + c) * n + x];
            out[r * n + x] = acc;
        }
}

attn_status attn_mamba_scan_backward(attn_ctx *ctx, const attn_tensor *x,
                                     const attn_tensor *delta, const attn_tensor *a,
                                     const attn_tensor *bm, const attn_tensor *cm,
                                     const attn_tensor *dskip, const attn_tensor *state_in,
                                     const attn_tensor *dy, const attn_tensor *dstate_out,
                                     attn_tensor *dx, attn_tensor *ddelta, attn_tensor *da,
                                     attn_tensor *dbm, attn_tensor *dcm, attn_tensor *ddskip,
                                     attn_tensor *dstate_in) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if ((dskip == NULL) != (ddskip == NULL))
        return attn_err(ATTN_ERR_ARG, "dskip and ddskip must be given together");
    mamba_in m;
    CHECK(prepare(ctx, x, delta, a, bm, cm, dskip, true, &m));
    const int64_t B = m.B, T = m.T, E = m.E, N = m.N, rows = B * T * E;
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    attn_status st = check_y(ctx, "dy", dy, &m);
    const attn_tensor *all[] = {x, delta, a, bm, cm, dskip, state_in, dy, dstate_out,
                                dx, ddelta, da, dbm, dcm, ddskip, dstate_in};
    const char *names[] = {"x", "delta", "a", "bm", "cm", "dskip", "state_in", "dy", "dstate_out",
                           "dx", "ddelta", "da", "dbm", "dcm", "ddskip", "dstate_in"};
    attn_tensor *const grads[] = {dx, ddelta, da, dbm, dcm, ddskip};
    if (st == ATTN_OK) st = mech_check_grads(ref, 6, grads, all, names + 9, 5, all, names, 9);
    float *fdy = mech_alloc(B, T, E, 1), *fdq = mech_alloc(B, T, E, N), *fdk = mech_alloc(B, T, E, N);
    float *fdv = mech_alloc(B, T, E, 1), *fdg = mech_alloc(B, T, E, N);
    float *o1 = mech_alloc(B, T, E, 1), *o2 = mech_alloc(B, T, E, 1), *on = mech_alloc(B, T, N, 1);
    float *oa = mech_alloc(E, N, 1, 1), *oe = mech_alloc(E, 1, 1, 1);
    if (st == ATTN_OK && (!fdy || !fdq || !fdk || !fdv || !fdg || !o1 || !o2 || !on || !oa || !oe))
        st = attn_err(ATTN_ERR_NOMEM, "mamba scan backward: out of memory");
    if (st == ATTN_OK) {
        mech_dense(dy, fdy);
        attn_tensor tdo = attn_tensor_4d(fdy, ATTN_F32, B, T, E, 1);
        attn_tensor tdq = attn_tensor_4d(fdq, ATTN_F32, B, T, E, N);
        attn_tensor tdk = attn_tensor_4d(fdk, ATTN_F32, B, T, E, N);
        attn_tensor tdv = attn_tensor_4d(fdv, ATTN_F32, B, T, E, 1);
        attn_tensor tdg = attn_tensor_4d(fdg, ATTN_F32, B, T, E, N);
        attn_linear_params p = engine_params();
        st = attn_linear_backward(ctx, &p, &m.tq, &m.tk, &m.tv, &m.tg, state_in, &tdo, dstate_out,
                                  &tdq, &tdk, &tdv, &tdg, dstate_in);
    }
    if (st == ATTN_OK) {
        /* dx = Δ dv + Dskip dy; dΔ = x dv + Σ_n dg A; dA = Σ_{b,t} dg Δ; dDskip = Σ dy x */
        for (int64_t x2 = 0; x2 < E * N; x2++) oa[x2] = 0.0f;
        for (int64_t e = 0; e < E; e++) oe[e] = 0.0f;
        for (int64_t r = 0; r < rows; r++) {
            const int64_t e = r % E;
            float dd = m.fx[r] * fdv[r];
            for (int64_t n = 0; n < N; n++) {
                dd += fdg[r * N + n] * m.fa[e * N + n];
                oa[e * N + n] += fdg[r * N + n] * m.fdl[r];
            }
            o1[r] = m.fdl[r] * fdv[r] + (m.fds ? m.fds[e] * fdy[r] : 0.0f);
            o2[r] = dd;
            oe[e] += fdy[r] * m.fx[r];
        }
        mech_store_dense(dx, o1);
        mech_store_dense(ddelta, o2);
        mech_store_dense(da, oa);
        sum_channels(fdk, B * T, E, N, on);
        mech_store_dense(dbm, on);
        sum_channels(fdq, B * T, E, N, on);
        mech_store_dense(dcm, on);
        if (ddskip) mech_store_dense(ddskip, oe);
    }
    free(fdy), free(fdq), free(fdk), free(fdv), free(fdg), free(o1), free(o2), free(on), free(oa);
    free(oe);
    mamba_free(&m);
    return st;
}
