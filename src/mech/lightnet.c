/* LightNet's additive recurrence over the chunked-recurrence engine (see
 * attn.h): per key dim a running softmax over time of the key logits,
 *   z_t = log(e^{z_{t-1}} + e^{k_t}),  k'_t = e^{k_t - z_t},  g_t = z_{t-1} - z_t,
 * then GLA (per-key-dim gates) on q, k', v, g. z runs in double per
 * sequence; g_0 = -inf (no state before the first token). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mech.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

/* z, k', g of rows [t0, t0 + n) of tensor index tb; fk holds the logits on
 * entry and k' on exit; fg [.., H, D] gets g for every query head. */
static void gate_sequence(float *fk, float *fg, double *z, int64_t T, int64_t Hk, int64_t H,
                          int64_t D, int64_t tb, int64_t t0, int64_t n) {
    const int64_t grp = H / Hk;
    for (int64_t x = 0; x < Hk * D; x++) z[x] = -INFINITY;
    for (int64_t t = t0; t < t0 + n; t++) {
        float *kr = fk + (tb * T + t) * Hk * D;
        float *gr = fg + (tb * T + t) * H * D;
        for (int64_t hk = 0; hk < Hk; hk++)
            for (int64_t x = 0; x < D; x++) {
                const double kv = kr[hk * D + x], zp = z[hk * D + x];
                const double zn = zp > kv ? zp + log1p(exp(kv - zp)) : kv + log1p(exp(zp - kv));
                z[hk * D + x] = zn;
                kr[hk * D + x] = (float)exp(kv - zn);
                for (int64_t h = hk * grp; h < (hk + 1) * grp; h++)
                    gr[h * D + x] = (float)(zp - zn); /* -inf at the first token */
            }
    }
}

attn_status attn_lightnet_forward(attn_ctx *ctx, const attn_linear_params *p,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, attn_tensor *o) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (p->gate != ATTN_GATE_NONE || p->causal != 1)
        return attn_err(ATTN_ERR_ARG, "attn_lightnet_forward: params->gate must be NONE and causal 1");
    const bool ref = ctx->backend == ATTN_BACKEND_REF, varlen = p->cu_seqlens != NULL;
    CHECK(attn_check_tensor("q", q, 4, ref, varlen));
    CHECK(attn_check_tensor("k", k, 4, ref, varlen));
    const int64_t B = k->shape[0], T = k->shape[1], Hk = k->shape[2], D = k->shape[3];
    const int64_t H = q->shape[2];
    CHECK(attn_check_shape("q", q, B, T, -1, D));
    if (H % Hk != 0)
        return attn_err(ATTN_ERR_SHAPE, "kv heads (k->shape[2] = %lld) must divide query heads (%lld)",
                        (long long)Hk, (long long)H);
    if (varlen) {
        if (p->batch < 1 || B != 1)
            return attn_err(ATTN_ERR_ARG, "with cu_seqlens, params->batch >= 1 and dim 0 of q, k must be 1");
        CHECK(attn_check_cu("params->cu_seqlens", p->cu_seqlens, p->batch, T));
    }
    float *fk = mech_alloc(B, T, Hk, D), *fg = mech_alloc(B, T, H, D);
    double *z = malloc((size_t)(Hk * D) * sizeof(double));
    attn_status st = ATTN_OK;
    if (!fk || !fg || !z) {
        st = attn_err(ATTN_ERR_NOMEM, "attn_lightnet_forward: out of memory for its copies");
        goto done;
    }
    mech_dense(k, fk);
    const int64_t nseq = varlen ? p->batch : B;
    for (int64_t s = 0; s < nseq; s++) {
        const int64_t tb = varlen ? 0 : s, t0 = varlen ? p->cu_seqlens[s] : 0;
        const int64_t n = varlen ? p->cu_seqlens[s + 1] - p->cu_seqlens[s] : T;
        gate_sequence(fk, fg, z, T, Hk, H, D, tb, t0, n);
    }
    attn_tensor tk = attn_tensor_4d(fk, ATTN_F32, B, T, Hk, D);
    attn_tensor tg = attn_tensor_4d(fg, ATTN_F32, B, T, H, D);
    attn_linear_params pg = *p;
    pg.gate = ATTN_GATE_KEY;
    st = attn_linear_forward(ctx, &pg, q, &tk, v, &tg, NULL, o, NULL);
done:
    free(fk), free(fg), free(z);
    return st;
}
