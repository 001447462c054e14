/* Mamba-2 SSD over the chunked-recurrence engine: q = C, k = B, v = dt x,
 * one scalar gate per head and token g = dt A (ATTN_GATE_HEAD_TOKEN), B and
 * C shared by the heads of a group (views when there is one group or one
 * per head, else copied out per head), state N x P; then
 * y = o + Dskip x. (The Mamba-1 selective scan is mamba.c.) */
#include <stdlib.h>
#include <string.h>

#include "mech.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

static attn_status check_1d(const char *name, const attn_tensor *t, bool ref, int64_t n) {
    CHECK(attn_check_tensor(name, t, 1, ref, false));
    return attn_check_shape(name, t, n, -1, -1, -1);
}

attn_status attn_ssd_forward(attn_ctx *ctx, const attn_tensor *x, const attn_tensor *dt,
                             const attn_tensor *a, const attn_tensor *bm, const attn_tensor *cm,
                             const attn_tensor *dskip, const attn_tensor *state_in,
                             attn_tensor *y, attn_tensor *state_out) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("x", x, 4, ref, false));
    const int64_t B = x->shape[0], T = x->shape[1], H = x->shape[2], P = x->shape[3];
    CHECK(attn_check_tensor("dt", dt, 3, ref, false));
    CHECK(attn_check_shape("dt", dt, B, T, H, -1));
    CHECK(check_1d("a", a, ref, H));
    CHECK(attn_check_tensor("bm", bm, 4, ref, false));
    const int64_t G = bm->shape[2], N = bm->shape[3];
    CHECK(attn_check_shape("bm", bm, B, T, -1, -1));
    if (H % G != 0)
        return attn_err(ATTN_ERR_SHAPE, "groups (bm->shape[2] = %lld) must divide heads (%lld)",
                        (long long)G, (long long)H);
    CHECK(attn_check_tensor("cm", cm, 4, ref, false));
    CHECK(attn_check_shape("cm", cm, B, T, G, N));
    if (dskip) CHECK(check_1d("dskip", dskip, ref, H));
    CHECK(attn_check_tensor("y", y, 4, ref, false));
    CHECK(attn_check_shape("y", y, B, T, H, P));
    const attn_tensor *ins[] = {x, dt, a, bm, cm, dskip, state_in, state_out};
    const char *names[] = {"x", "dt", "a", "bm", "cm", "dskip", "state_in", "state_out"};
    CHECK(attn_check_output("y", y, ins, names, 8));

    /* B and C per head: with one group, or one group per head, views of the
     * caller's tensors (head stride 0 or theirs); else copies per head */
    const bool view = G == 1 || G == H;
    float *fq = view ? NULL : mech_alloc(B, T, H, N), *fk = view ? NULL : mech_alloc(B, T, H, N);
    float *fb = view ? NULL : mech_alloc(B, T, G, N), *fc = view ? NULL : mech_alloc(B, T, G, N);
    /* x and y are used in place when they are contiguous f32 */
    float *xin = mech_contiguous_f32(x), *yout = mech_contiguous_f32(y);
    float *fv = mech_alloc(B, T, H, P), *fg = mech_alloc(B, T, H, 1);
    float *fo = yout ? NULL : mech_alloc(B, T, H, P), *fx = xin ? NULL : mech_alloc(B, T, H, P);
    float *fa = mech_alloc(H, 1, 1, 1);
    float *fds = dskip ? mech_alloc(H, 1, 1, 1) : NULL;
    attn_status st = ATTN_OK;
    if ((!view && (!fq || !fk || !fb || !fc)) || !fv || !fg || (!yout && !fo) ||
        (!xin && !fx) || !fa || (dskip && !fds)) {
        st = attn_err(ATTN_ERR_NOMEM, "attn_ssd_forward: out of memory for its copies");
        goto done;
    }
    if (!xin) mech_dense(x, fx);
    const float *xs = xin ? xin : fx;
    float *os = yout ? yout : fo;
    mech_dense(dt, fg);
    mech_dense(a, fa);
    if (dskip) mech_dense(dskip, fds);
    attn_tensor tq = *cm, tk = *bm;
    if (view) {
        tq.stride[2] = G == 1 ? 0 : cm->stride[2];
        tk.stride[2] = G == 1 ? 0 : bm->stride[2];
        tq.shape[2] = tk.shape[2] = H;
    } else {
        mech_dense(bm, fb);
        mech_dense(cm, fc);
        for (int64_t r = 0; r < B * T * H; r++) {
            const int64_t bt = r / H, grp = (r % H) / (H / G);
            memcpy(fq + r * N, fc + (bt * G + grp) * N, (size_t)N * sizeof(float));
            memcpy(fk + r * N, fb + (bt * G + grp) * N, (size_t)N * sizeof(float));
        }
        tq = attn_tensor_4d(fq, ATTN_F32, B, T, H, N);
        tk = attn_tensor_4d(fk, ATTN_F32, B, T, H, N);
    }
    const int64_t rows = B * T * H;
    for (int64_t r = 0; r < rows; r++) {
        const float d = fg[r];
        fg[r] = d * fa[r % H]; /* the log gate dt * A */
        for (int64_t e = 0; e < P; e++) fv[r * P + e] = d * xs[r * P + e];
    }
    attn_tensor tv = attn_tensor_4d(fv, ATTN_F32, B, T, H, P);
    attn_tensor tg = attn_tensor_3d(fg, ATTN_F32, B, T, H);
    attn_tensor to = attn_tensor_4d(os, ATTN_F32, B, T, H, P);
    attn_linear_params p = attn_linear_params_default();
    p.scale = 1.0f;
    p.gate = ATTN_GATE_HEAD_TOKEN;
    st = attn_linear_forward(ctx, &p, &tq, &tk, &tv, &tg, state_in, &to, state_out);
    if (st == ATTN_OK) { /* y = o + Dskip x */
        if (fds)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t e = 0; e < P; e++) os[r * P + e] += fds[r % H] * xs[r * P + e];
        if (!yout) mech_store_dense(y, fo);
    }
done:
    free(fq), free(fk), free(fv), free(fg), free(fo), free(fx), free(fb), free(fc), free(fa);
    free(fds);
    return st;
}
