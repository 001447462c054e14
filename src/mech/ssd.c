/* Mamba-2 SSD over the chunked-recurrence engine: q = C, k = B, v = dt x,
 * one scalar gate per head and token g = dt A (ATTN_GATE_HEAD_TOKEN), B and
 * C shared by the heads of a group (views when there is one group or one
 * per head, else copied out per head), state N x P; then
 * y = o + Dskip x. The backward is the engine's, then the chain rule through
 * v = dt x, g = dt A, the group sharing and the skip. (The Mamba-1
 * selective scan is mamba.c.) */
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
typedef struct ssd_in {
    int64_t B, T, H, P, G, N;
    const float *xs;              /* x, dense f32 (the caller's or fx) */
    float *fx, *fdt, *fa, *fds;   /* copies: x (when not contiguous f32), dt, A, Dskip */
    float *fq, *fk, *fv, *fg;     /* per-head C, B (copies when viewed not), dt x, dt A */
    attn_tensor tq, tk, tv, tg;
} ssd_in;

static void ssd_free(ssd_in *s) {
    free(s->fx), free(s->fdt), free(s->fa), free(s->fds), free(s->fq), free(s->fk), free(s->fv);
    free(s->fg);
}

/* fold: the forward on the CPU engine, which takes v = x with dt as its row
 * scales (lin_problem.vrow): no dt x copy. */
static attn_status prepare(const attn_ctx *ctx, const attn_tensor *x, const attn_tensor *dt,
                           const attn_tensor *a, const attn_tensor *bm, const attn_tensor *cm,
                           const attn_tensor *dskip, bool fold, ssd_in *s) {
    memset(s, 0, sizeof *s);
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("x", x, 4, ref, false));
    const int64_t B = x->shape[0], T = x->shape[1], H = x->shape[2], P = x->shape[3];
    CHECK(attn_check_tensor("dt", dt, 3, ref, false));
    CHECK(attn_check_shape("dt", dt, B, T, H, -1));
    CHECK(mech_check_1d("a", a, ref, H));
    CHECK(attn_check_tensor("bm", bm, 4, ref, false));
    const int64_t G = bm->shape[2], N = bm->shape[3];
    CHECK(attn_check_shape("bm", bm, B, T, -1, -1));
    if (H % G != 0)
        return attn_err(ATTN_ERR_SHAPE, "groups (bm->shape[2] = %lld) must divide heads (%lld)",
                        (long long)G, (long long)H);
    CHECK(attn_check_tensor("cm", cm, 4, ref, false));
    CHECK(attn_check_shape("cm", cm, B, T, G, N));
    if (dskip) CHECK(mech_check_1d("dskip", dskip, ref, H));
    s->B = B, s->T = T, s->H = H, s->P = P, s->G = G, s->N = N;
    /* B and C per head: with one group, or one group per head, views of the
     * caller's tensors (head stride 0 or theirs); else copies per head */
    const bool view = G == 1 || G == H;
    const float *xin = mech_contiguous_f32(x);
    s->fx = xin || fold ? NULL : mech_alloc(B, T, H, P);
    s->fdt = mech_alloc(B, T, H, 1), s->fa = mech_alloc(H, 1, 1, 1);
    s->fds = dskip ? mech_alloc(H, 1, 1, 1) : NULL;
    s->fq = view ? NULL : mech_alloc(B, T, H, N), s->fk = view ? NULL : mech_alloc(B, T, H, N);
    s->fv = fold ? NULL : mech_alloc(B, T, H, P), s->fg = mech_alloc(B, T, H, 1);
    if ((!xin && !fold && !s->fx) || !s->fdt || !s->fa || (dskip && !s->fds) ||
        (!view && (!s->fq || !s->fk)) || (!fold && !s->fv) || !s->fg) {
        ssd_free(s);
        return attn_err(ATTN_ERR_NOMEM, "ssd: out of memory for its copies");
    }
    if (s->fx) mech_dense(x, s->fx);
    s->xs = xin ? xin : s->fx; /* NULL when folding a strided x: the engine reads x */
    mech_dense(dt, s->fdt);
    mech_dense(a, s->fa);
    if (dskip) mech_dense(dskip, s->fds);
    s->tq = *cm;
    s->tk = *bm;
    if (view) {
        s->tq.stride[2] = G == 1 ? 0 : cm->stride[2];
        s->tk.stride[2] = G == 1 ? 0 : bm->stride[2];
        s->tq.shape[2] = s->tk.shape[2] = H;
    } else {
        float *fb = mech_alloc(B, T, G, N), *fc = mech_alloc(B, T, G, N);
        if (!fb || !fc) {
            free(fb), free(fc);
            ssd_free(s);
            return attn_err(ATTN_ERR_NOMEM, "ssd: out of memory for its copies");
        }
        mech_dense(bm, fb);
        mech_dense(cm, fc);
        for (int64_t r = 0; r < B * T * H; r++) {
            const int64_t bt = r / H, grp = (r % H) / (H / G);
            memcpy(s->fq + r * N, fc + (bt * G + grp) * N, (size_t)N * sizeof(float));
            memcpy(s->fk + r * N, fb + (bt * G + grp) * N, (size_t)N * sizeof(float));
        }
        free(fb), free(fc);
        s->tq = attn_tensor_4d(s->fq, ATTN_F32, B, T, H, N);
        s->tk = attn_tensor_4d(s->fk, ATTN_F32, B, T, H, N);
    }
    /* elementwise, so threads change nothing but the time (at long T these
     * passes stream from memory) */
    const int threads = ctx->threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < B * T * H; r++) {
        const float d = s->fdt[r];
        s->fg[r] = d * s->fa[r % H]; /* the log gate dt * A */
        if (!fold)
            for (int64_t e = 0; e < P; e++) s->fv[r * P + e] = d * s->xs[r * P + e];
    }
    s->tv = fold ? *x : attn_tensor_4d(s->fv, ATTN_F32, B, T, H, P);
    s->tg = attn_tensor_3d(s->fg, ATTN_F32, B, T, H);
    return ATTN_OK;
}

static attn_linear_params engine_params(void) {
    attn_linear_params p = attn_linear_params_default();
    p.scale = 1.0f;
    p.gate = ATTN_GATE_HEAD_TOKEN;
    return p;
}

attn_status attn_ssd_forward(attn_ctx *ctx, const attn_tensor *x, const attn_tensor *dt,
                             const attn_tensor *a, const attn_tensor *bm, const attn_tensor *cm,
                             const attn_tensor *dskip, const attn_tensor *state_in,
                             attn_tensor *y, attn_tensor *state_out) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("y", y, 4, ref, false));
    const attn_tensor *ins[] = {x, dt, a, bm, cm, dskip, state_in, state_out};
    const char *names[] = {"x", "dt", "a", "bm", "cm", "dskip", "state_in", "state_out"};
    CHECK(attn_check_output("y", y, ins, names, 8));
    ssd_in s;
    const bool fold = !ref; /* the CPU engine takes dt and the skip itself */
    CHECK(prepare(ctx, x, dt, a, bm, cm, dskip, fold, &s));
    const int64_t rows = s.B * s.T * s.H, P = s.P;
    attn_status st = attn_check_shape("y", y, s.B, s.T, s.H, P);
    /* y is written in place when it is contiguous f32 */
    float *yout = mech_contiguous_f32(y), *fo = NULL;
    if (st == ATTN_OK && !yout && !(fo = mech_alloc(s.B, s.T, s.H, P)))
        st = attn_err(ATTN_ERR_NOMEM, "attn_ssd_forward: out of memory");
    if (st == ATTN_OK) {
        float *os = yout ? yout : fo;
        attn_tensor to = attn_tensor_4d(os, ATTN_F32, s.B, s.T, s.H, P);
        attn_linear_params p = engine_params();
        if (fold)
            st = linear_forward_folded(ctx, &p, &s.tq, &s.tk, &s.tv, &s.tg, state_in, &to,
                                       state_out, s.fdt, s.fds);
        else
            st = attn_linear_forward(ctx, &p, &s.tq, &s.tk, &s.tv, &s.tg, state_in, &to,
                                     state_out);
        if (st == ATTN_OK && !fold) { /* y = o + Dskip x */
            const int threads = ctx->threads;
            if (s.fds)
#pragma omp parallel for num_threads(threads) schedule(static)
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t e = 0; e < P; e++) os[r * P + e] += s.fds[r % s.H] * s.xs[r * P + e];
        }
        if (st == ATTN_OK && !yout) mech_store_dense(y, fo);
    }
    free(fo);
    ssd_free(&s);
    return st;
}

attn_status attn_ssd_backward(attn_ctx *ctx, const attn_tensor *x, const attn_tensor *dt,
                              const attn_tensor *a, const attn_tensor *bm, const attn_tensor *cm,
                              const attn_tensor *dskip, const attn_tensor *state_in,
                              const attn_tensor *dy, const attn_tensor *dstate_out,
                              attn_tensor *dx, attn_tensor *ddt, attn_tensor *da,
                              attn_tensor *dbm, attn_tensor *dcm, attn_tensor *ddskip,
                              attn_tensor *dstate_in) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if ((dskip == NULL) != (ddskip == NULL))
        return attn_err(ATTN_ERR_ARG, "dskip and ddskip must be given together");
    ssd_in s;
    CHECK(prepare(ctx, x, dt, a, bm, cm, dskip, false, &s));
    const int64_t B = s.B, T = s.T, H = s.H, P = s.P, G = s.G, N = s.N, rows = B * T * H;
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    const attn_tensor *all[] = {x, dt, a, bm, cm, dskip, state_in, dy, dstate_out,
                                dx, ddt, da, dbm, dcm, ddskip, dstate_in};
    const char *names[] = {"x", "dt", "a", "bm", "cm", "dskip", "state_in", "dy", "dstate_out",
                           "dx", "ddt", "da", "dbm", "dcm", "ddskip", "dstate_in"};
    attn_tensor *const grads[] = {dx, ddt, da, dbm, dcm, ddskip};
    attn_status st = attn_check_tensor("dy", dy, 4, ref, false);
    if (st == ATTN_OK) st = attn_check_shape("dy", dy, B, T, H, P);
    if (st == ATTN_OK) st = mech_check_grads(ref, 6, grads, all, names + 9, 5, all, names, 9);
    float *fdy = mech_alloc(B, T, H, P), *fdq = mech_alloc(B, T, H, N), *fdk = mech_alloc(B, T, H, N);
    float *fdv = mech_alloc(B, T, H, P), *fdg = mech_alloc(B, T, H, 1);
    float *o1 = mech_alloc(B, T, H, P), *o2 = mech_alloc(B, T, H, 1), *og = mech_alloc(B, T, G, N);
    float *oa = mech_alloc(H, 1, 1, 1), *oe = mech_alloc(H, 1, 1, 1);
    if (st == ATTN_OK && (!fdy || !fdq || !fdk || !fdv || !fdg || !o1 || !o2 || !og || !oa || !oe))
        st = attn_err(ATTN_ERR_NOMEM, "attn_ssd_backward: out of memory");
    if (st == ATTN_OK) {
        mech_dense(dy, fdy);
        attn_tensor tdo = attn_tensor_4d(fdy, ATTN_F32, B, T, H, P);
        attn_tensor tdq = attn_tensor_4d(fdq, ATTN_F32, B, T, H, N);
        attn_tensor tdk = attn_tensor_4d(fdk, ATTN_F32, B, T, H, N);
        attn_tensor tdv = attn_tensor_4d(fdv, ATTN_F32, B, T, H, P);
        attn_tensor tdg = attn_tensor_3d(fdg, ATTN_F32, B, T, H);
        attn_linear_params p = engine_params();
        st = attn_linear_backward(ctx, &p, &s.tq, &s.tk, &s.tv, &s.tg, state_in, &tdo, dstate_out,
                                  &tdq, &tdk, &tdv, &tdg, dstate_in);
    }
    if (st == ATTN_OK) {
        /* dx = dt dv + Dskip dy; ddt = x · dv + dg A; dA = Σ dg dt; dDskip = Σ dy · x */
        for (int64_t h = 0; h < H; h++) oa[h] = oe[h] = 0.0f;
        for (int64_t r = 0; r < rows; r++) {
            const int64_t h = r % H;
            const float d = s.fdt[r];
            float xv = 0.0f, xy = 0.0f;
            for (int64_t e = 0; e < P; e++) {
                const float xe = s.xs[r * P + e];
                o1[r * P + e] = d * fdv[r * P + e] + (s.fds ? s.fds[h] * fdy[r * P + e] : 0.0f);
                xv += xe * fdv[r * P + e];
                xy += xe * fdy[r * P + e];
            }
            o2[r] = xv + fdg[r] * s.fa[h];
            oa[h] += fdg[r] * d;
            oe[h] += xy;
        }
        mech_store_dense(dx, o1);
        mech_store_dense(ddt, o2);
        mech_store_dense(da, oa);
        if (ddskip) mech_store_dense(ddskip, oe);
        /* B and C: the heads of a group summed in head order */
        float *const srcs[2] = {fdk, fdq};
        attn_tensor *const dsts[2] = {dbm, dcm};
        for (int w = 0; w < 2; w++) {
            for (int64_t bt = 0; bt < B * T; bt++)
                for (int64_t gi = 0; gi < G; gi++) {
                    float *out = og + (bt * G + gi) * N;
                    for (int64_t n = 0; n < N; n++) out[n] = 0.0f;
                    for (int64_t h = gi * (H / G); h < (gi + 1) * (H / G); h++)
                        for (int64_t n = 0; n < N; n++) out[n] += srcs[w][(bt * H + h) * N + n];
                }
            mech_store_dense(dsts[w], og);
        }
    }
    free(fdy), free(fdq), free(fdk), free(fdv), free(fdg), free(o1), free(o2), free(og), free(oa);
    free(oe);
    ssd_free(&s);
    return st;
}
