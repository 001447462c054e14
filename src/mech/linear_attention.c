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

attn_status attn_linear_attention(attn_ctx *ctx, const attn_linear_params *p,
                                  attn_feature_map phi, int32_t normalize, float eps,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, attn_tensor *o) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
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
    CHECK(attn_check_tensor("o", o, 4, ref, varlen));
    const attn_tensor *ins[] = {q, k, v};
    const char *names[] = {"q", "k", "v"};
    CHECK(attn_check_output("o", o, ins, names, 3));
    const int64_t B = o->shape[0], T = o->shape[1], H = o->shape[2], Dv = o->shape[3];
    if (v->shape[3] != Dv)
        return attn_err(ATTN_ERR_SHAPE, "o->shape[3] (%lld) must equal v->shape[3] (%lld)",
                        (long long)Dv, (long long)v->shape[3]);
    const int64_t dvx = Dv + (normalize ? 1 : 0);
    float *fq = mech_alloc(q->shape[0], q->shape[1], q->shape[2], q->shape[3]);
    float *fk = mech_alloc(k->shape[0], k->shape[1], k->shape[2], k->shape[3]);
    float *fv = mech_alloc(v->shape[0], v->shape[1], v->shape[2], dvx);
    float *fo = mech_alloc(B, T, H, dvx);
    attn_status st = ATTN_OK;
    if (!fq || !fk || !fv || !fo) {
        st = attn_err(ATTN_ERR_NOMEM, "attn_linear_attention: out of memory for its copies");
        goto done;
    }
    attn_tensor tq = mech_view(fq, q), tk = mech_view(fk, k);
    mech_dense(q, fq);
    mech_dense(k, fk);
    for (int64_t i = 0; i < mech_numel(&tq); i++) fq[i] = phi_of(phi, fq[i]);
    for (int64_t i = 0; i < mech_numel(&tk); i++) fk[i] = phi_of(phi, fk[i]);
    attn_tensor tv = mech_view(fv, v);
    tv.shape[3] = dvx;
    tv = mech_view(fv, &tv);
    mech_dense(v, fv);
    if (normalize) /* spread the rows of Dv into rows of Dv + 1, last to first */
        for (int64_t r = mech_numel(&tv) / dvx - 1; r >= 0; r--) {
            memmove(fv + r * dvx, fv + r * Dv, (size_t)Dv * sizeof(float));
            fv[r * dvx + Dv] = 1.0f;
        }
    attn_tensor to = mech_view(fo, o);
    to.shape[3] = dvx;
    to = mech_view(fo, &to);
    st = attn_linear_forward(ctx, p, &tq, &tk, &tv, NULL, NULL, &to, NULL);
    if (st != ATTN_OK) goto done;
    if (normalize) /* divide, and pack rows of Dv + 1 into rows of Dv, first to last */
        for (int64_t r = 0; r < B * T * H; r++) {
            const float inv = 1.0f / (fo[r * dvx + Dv] + eps);
            for (int64_t e = 0; e < Dv; e++) fo[r * Dv + e] = fo[r * dvx + e] * inv;
        }
    mech_store_dense(o, fo);
done:
    free(fq);
    free(fk);
    free(fv);
    free(fo);
    return st;
}
