/* Linear attention with a feature map and an optional normaliser, over the
 * chunked-recurrence engine: φ(q), φ(k) are applied into f32 copies; the
 * normaliser z_t = sum φ(k_j) rides along as one more value column of ones,
 * so that one engine call gives both φ(q) S_t and φ(q) · z_t. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mech.h"

static float phi_of(attn_feature_map phi, float x) {
    switch (phi) {
    case ATTN_PHI_ELU1: return x > 0 ? x + 1.0f : expf(x);
    case ATTN_PHI_RELU: return x > 0 ? x : 0.0f;
    default: return x;
    }
}

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

/* φ'(x) given x. */
static float dphi_of(attn_feature_map phi, float x) {
    switch (phi) {
    case ATTN_PHI_ELU1: return x > 0 ? 1.0f : expf(x);
    case ATTN_PHI_RELU: return x > 0 ? 1.0f : 0.0f;
    default: return 1.0f;
    }
}

/* The engine's inputs: φ(q), φ(k), v with a column of ones (normalize). */
typedef struct la_in {
    int64_t B, T, H, Dv, dvx;
    float *fq, *fk, *fv;
    attn_tensor tq, tk, tv;
} la_in;

static void la_free(la_in *m) { free(m->fq), free(m->fk), free(m->fv); }

static attn_status prepare(const attn_ctx *ctx, const attn_linear_params *p,
                           attn_feature_map phi, int32_t normalize, float eps,
                           const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                           la_in *m) {
    memset(m, 0, sizeof *m);
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (p->gate != ATTN_GATE_NONE)
        return attn_err(ATTN_ERR_ARG, "params->gate must be NONE for attn_linear_attention");
    if (phi < ATTN_PHI_IDENTITY || phi > ATTN_PHI_RELU)
        return attn_err(ATTN_ERR_ARG, "phi (%d) is not an attn_feature_map", (int)phi);
    if (normalize != 0 && normalize != 1) return attn_err(ATTN_ERR_ARG, "normalize must be 0 or 1");
    if (!(eps >= 0.0f) || !isfinite(eps)) return attn_err(ATTN_ERR_ARG, "eps must be finite and >= 0");
    const bool ref = ctx->backend == ATTN_BACKEND_REF, varlen = p->cu_seqlens != NULL;
    CHECK(attn_check_tensor("q", q, 4, ref, varlen));
    CHECK(attn_check_tensor("k", k, 4, ref, varlen));
    CHECK(attn_check_tensor("v", v, 4, ref, varlen));
    m->B = q->shape[0], m->T = q->shape[1], m->H = q->shape[2], m->Dv = v->shape[3];
    m->dvx = m->Dv + (normalize ? 1 : 0);
    const int64_t Dv = m->Dv, dvx = m->dvx;
    m->fq = mech_alloc(q->shape[0], q->shape[1], q->shape[2], q->shape[3]);
    m->fk = mech_alloc(k->shape[0], k->shape[1], k->shape[2], k->shape[3]);
    m->fv = mech_alloc(v->shape[0], v->shape[1], v->shape[2], dvx);
    if (!m->fq || !m->fk || !m->fv) {
        la_free(m);
        return attn_err(ATTN_ERR_NOMEM, "linear attention: out of memory for its copies");
    }
    m->tq = mech_view(m->fq, q), m->tk = mech_view(m->fk, k);
    mech_dense(q, m->fq);
    mech_dense(k, m->fk);
    const int64_t nq = mech_numel(&m->tq), nk = mech_numel(&m->tk);
    if (phi != ATTN_PHI_IDENTITY) {
        for (int64_t i = 0; i < nq; i++) m->fq[i] = phi_of(phi, m->fq[i]);
        for (int64_t i = 0; i < nk; i++) m->fk[i] = phi_of(phi, m->fk[i]);
    }
    m->tv = mech_view(m->fv, v);
    m->tv.shape[3] = dvx;
    m->tv = mech_view(m->fv, &m->tv);
    mech_dense(v, m->fv);
    if (normalize) /* spread the rows of Dv into rows of Dv + 1, last to first */
        for (int64_t r = mech_numel(&m->tv) / dvx - 1; r >= 0; r--) {
            memmove(m->fv + r * dvx, m->fv + r * Dv, (size_t)Dv * sizeof(float));
            m->fv[r * dvx + Dv] = 1.0f;
        }
    return ATTN_OK;
}

/* fo [B, T, H, dvx] = the engine's output: φ(q) S (and φ(q) · z). */
static attn_status engine_out(attn_ctx *ctx, const attn_linear_params *p, la_in *m, float **fo) {
    *fo = mech_alloc(m->B, m->T, m->H, m->dvx);
    if (!*fo) return attn_err(ATTN_ERR_NOMEM, "linear attention: out of memory");
    attn_tensor to = attn_tensor_4d(*fo, ATTN_F32, m->B, m->T, m->H, m->dvx);
    return attn_linear_forward(ctx, p, &m->tq, &m->tk, &m->tv, NULL, NULL, &to, NULL);
}

attn_status attn_linear_attention(attn_ctx *ctx, const attn_linear_params *p,
                                  attn_feature_map phi, int32_t normalize, float eps,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, attn_tensor *o) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    la_in m;
    CHECK(prepare(ctx, p, phi, normalize, eps, q, k, v, &m));
    const bool ref = ctx->backend == ATTN_BACKEND_REF;
    const attn_tensor *ins[] = {q, k, v};
    const char *names[] = {"q", "k", "v"};
    attn_status st = attn_check_tensor("o", o, 4, ref, p->cu_seqlens != NULL);
    if (st == ATTN_OK) st = attn_check_shape("o", o, m.B, m.T, m.H, m.Dv);
    if (st == ATTN_OK) st = attn_check_output("o", o, ins, names, 3);
    float *fo = NULL;
    if (st == ATTN_OK) st = engine_out(ctx, p, &m, &fo);
    if (st == ATTN_OK) {
        const int64_t Dv = m.Dv, dvx = m.dvx;
        if (normalize) /* divide, and pack rows of Dv + 1 into rows of Dv, first to last */
            for (int64_t r = 0; r < m.B * m.T * m.H; r++) {
                const float inv = 1.0f / (fo[r * dvx + Dv] + eps);
                for (int64_t e = 0; e < Dv; e++) fo[r * Dv + e] = fo[r * dvx + e] * inv;
            }
        mech_store_dense(o, fo);
    }
    free(fo);
    la_free(&m);
    return st;
}

attn_status attn_linear_attention_backward(attn_ctx *ctx, const attn_linear_params *p,
                                           attn_feature_map phi, int32_t normalize, float eps,
                                           const attn_tensor *q, const attn_tensor *k,
                                           const attn_tensor *v, const attn_tensor *dout,
                                           attn_tensor *dq, attn_tensor *dk, attn_tensor *dv) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    la_in m;
    CHECK(prepare(ctx, p, phi, normalize, eps, q, k, v, &m));
    const bool ref = ctx->backend == ATTN_BACKEND_REF, varlen = p->cu_seqlens != NULL;
    const attn_tensor *all[] = {q, k, v, dout, dq, dk, dv};
    const char *names[] = {"q", "k", "v", "dout", "dq", "dk", "dv"};
    attn_status st = attn_check_tensor("dout", dout, 4, ref, varlen);
    if (st == ATTN_OK) st = attn_check_shape("dout", dout, m.B, m.T, m.H, m.Dv);
    attn_tensor *const grads[] = {dq, dk, dv};
    if (st == ATTN_OK) st = mech_check_grads(ref, 3, grads, all, names + 4, 3, all, names, 4);
    const int64_t rows = m.B * m.T * m.H, Dv = m.Dv, dvx = m.dvx;
    float *fo = NULL, *fdo = NULL, *fdq = NULL, *fdk = NULL, *fdv = NULL, *raw = NULL;
    if (st == ATTN_OK && normalize) st = engine_out(ctx, p, &m, &fo);
    if (st == ATTN_OK) {
        fdo = mech_alloc(m.B, m.T, m.H, dvx);
        fdq = mech_alloc(m.tq.shape[0], m.tq.shape[1], m.tq.shape[2], m.tq.shape[3]);
        fdk = mech_alloc(m.tk.shape[0], m.tk.shape[1], m.tk.shape[2], m.tk.shape[3]);
        fdv = mech_alloc(m.tv.shape[0], m.tv.shape[1], m.tv.shape[2], dvx);
        raw = mech_alloc(mech_numel(&m.tq) > mech_numel(&m.tk) ? mech_numel(&m.tq) : mech_numel(&m.tk), 1, 1, 1);
        if (!fdo || !fdq || !fdk || !fdv || !raw)
            st = attn_err(ATTN_ERR_NOMEM, "attn_linear_attention_backward: out of memory");
    }
    if (st == ATTN_OK) {
        mech_dense(dout, fdo); /* rows of Dv; spread to Dv + 1 below */
        if (normalize) /* d num = dO / (den + eps); d den = -dO · o / (den + eps) */
            for (int64_t r = rows - 1; r >= 0; r--) {
                const float inv = 1.0f / (fo[r * dvx + Dv] + eps);
                float dden = 0.0f;
                for (int64_t e = Dv - 1; e >= 0; e--) {
                    const float g = fdo[r * Dv + e];
                    dden -= g * fo[r * dvx + e] * inv * inv;
                    fdo[r * dvx + e] = g * inv;
                }
                fdo[r * dvx + Dv] = dden;
            }
        attn_tensor tdo = attn_tensor_4d(fdo, ATTN_F32, m.B, m.T, m.H, dvx);
        attn_tensor tdq = mech_view(fdq, &m.tq), tdk = mech_view(fdk, &m.tk), tdv = mech_view(fdv, &m.tv);
        st = attn_linear_backward(ctx, p, &m.tq, &m.tk, &m.tv, NULL, NULL, &tdo, NULL, &tdq, &tdk,
                                  &tdv, NULL, NULL);
        if (st == ATTN_OK) {
            /* through φ: the raw inputs again, dense */
            mech_dense(q, raw);
            for (int64_t i = 0, n = mech_numel(&m.tq); i < n; i++) fdq[i] *= dphi_of(phi, raw[i]);
            mech_dense(k, raw);
            for (int64_t i = 0, n = mech_numel(&m.tk); i < n; i++) fdk[i] *= dphi_of(phi, raw[i]);
            if (normalize) /* drop the ones column's gradient */
                for (int64_t r = 0, n = mech_numel(&m.tv) / dvx; r < n; r++)
                    memmove(fdv + r * Dv, fdv + r * dvx, (size_t)Dv * sizeof(float));
            mech_store_dense(dq, fdq);
            mech_store_dense(dk, fdk);
            mech_store_dense(dv, fdv);
        }
    }
    free(fo), free(fdo), free(fdq), free(fdk), free(fdv), free(raw);
    la_free(&m);
    return st;
}
