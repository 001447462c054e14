/* LightNet's additive recurrence over the chunked-recurrence engine (see
 * attn.h): per key dim a running softmax over time of the key logits,
 *   z_t = log(e^{z_{t-1}} + e^{k_t}),  k'_t = e^{k_t - z_t},  g_t = z_{t-1} - z_t,
 * then GLA (per-key-dim gates) on q, k', v, g. z runs in double per
 * sequence; g_0 = -inf (no state before the first token).
 * Backward: the engine's gives dk' and dg (summed over the heads of a GQA
 * group); then dz_t = -k'_t dk'_t - dg_t + dg_{t+1}, and since
 * dz_t/dk_j = e^{k_j - z_t} (j <= t),
 *   dk_j = k'_j (dk'_j + A_j),  A_j = dz_j + e^{g_{j+1}} A_{j+1}
 * (without -dg at a sequence's first token, whose g = -inf holds no z),
 * a reverse running sum whose factors e^{z_j - z_{j+1}} = e^{g_{j+1}} are
 * at most 1 (no overflow however negative the logits). */
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

/* The engine's inputs: k' [B, T, Hk, D] and g [B, T, H, D]. */
typedef struct ln_in {
    int64_t B, T, H, Hk, D, nseq;
    float *fk, *fg;
    attn_tensor tk, tg;
} ln_in;

static void ln_free(ln_in *m) { free(m->fk), free(m->fg); }

/* Rows of sequence s: tensor index, first row, count. */
static void seq_rows(const attn_linear_params *p, int64_t T, int64_t s, int64_t *tb, int64_t *t0,
                     int64_t *n) {
    const bool varlen = p->cu_seqlens != NULL;
    *tb = varlen ? 0 : s;
    *t0 = varlen ? p->cu_seqlens[s] : 0;
    *n = varlen ? p->cu_seqlens[s + 1] - p->cu_seqlens[s] : T;
}

static attn_status prepare(const attn_ctx *ctx, const attn_linear_params *p,
                           const attn_tensor *q, const attn_tensor *k, ln_in *m) {
    memset(m, 0, sizeof *m);
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (p->gate != ATTN_GATE_NONE || p->causal != 1)
        return attn_err(ATTN_ERR_ARG, "lightnet: params->gate must be NONE and causal 1");
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
    m->B = B, m->T = T, m->H = H, m->Hk = Hk, m->D = D, m->nseq = varlen ? p->batch : B;
    m->fk = mech_alloc(B, T, Hk, D), m->fg = mech_alloc(B, T, H, D);
    double *z = malloc((size_t)(Hk * D) * sizeof(double));
    if (!m->fk || !m->fg || !z) {
        free(z);
        ln_free(m);
        return attn_err(ATTN_ERR_NOMEM, "lightnet: out of memory for its copies");
    }
    mech_dense(k, m->fk);
    for (int64_t s = 0; s < m->nseq; s++) {
        int64_t tb, t0, n;
        seq_rows(p, T, s, &tb, &t0, &n);
        gate_sequence(m->fk, m->fg, z, T, Hk, H, D, tb, t0, n);
    }
    free(z);
    m->tk = attn_tensor_4d(m->fk, ATTN_F32, B, T, Hk, D);
    m->tg = attn_tensor_4d(m->fg, ATTN_F32, B, T, H, D);
    return ATTN_OK;
}

attn_status attn_lightnet_forward(attn_ctx *ctx, const attn_linear_params *p,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, attn_tensor *o) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    ln_in m;
    CHECK(prepare(ctx, p, q, k, &m));
    attn_linear_params pg = *p;
    pg.gate = ATTN_GATE_KEY;
    attn_status st = attn_linear_forward(ctx, &pg, q, &m.tk, v, &m.tg, NULL, o, NULL);
    ln_free(&m);
    return st;
}

attn_status attn_lightnet_backward(attn_ctx *ctx, const attn_linear_params *p,
                                   const attn_tensor *q, const attn_tensor *k,
                                   const attn_tensor *v, const attn_tensor *dout,
                                   attn_tensor *dq, attn_tensor *dk, attn_tensor *dv) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    ln_in m;
    CHECK(prepare(ctx, p, q, k, &m));
    const int64_t B = m.B, T = m.T, H = m.H, Hk = m.Hk, D = m.D, grp = H / Hk;
    float *fdk = mech_alloc(B, T, Hk, D), *fdg = mech_alloc(B, T, H, D);
    double *acc = malloc((size_t)(Hk * D) * sizeof(double));
    attn_status st = ATTN_OK;
    if (!fdk || !fdg || !acc) {
        st = attn_err(ATTN_ERR_NOMEM, "attn_lightnet_backward: out of memory");
        goto done;
    }
    if (dk) {
        const bool ref = ctx->backend == ATTN_BACKEND_REF, varlen = p->cu_seqlens != NULL;
        const attn_tensor *all[] = {q, k, v, dout, dq, dk, dv};
        const char *names[] = {"q", "k", "v", "dout", "dq", "dk", "dv"};
        st = attn_check_tensor("dk", dk, 4, ref, varlen);
        if (st == ATTN_OK) st = attn_check_shape("dk", dk, B, T, Hk, D);
        if (st == ATTN_OK) st = attn_check_output("dk", dk, all, names, 5);
        /* dq and dv are checked by the engine, but against k' (a copy): against k here */
        if (st == ATTN_OK && dq) st = attn_check_output("dq", dq, all, names, 4);
        if (st == ATTN_OK && dv) st = attn_check_output("dv", dv, all, names, 6);
    } else {
        st = attn_err(ATTN_ERR_NULL, "dk must not be NULL");
    }
    if (st != ATTN_OK) goto done;
    attn_tensor tdk = attn_tensor_4d(fdk, ATTN_F32, B, T, Hk, D);
    attn_tensor tdg = attn_tensor_4d(fdg, ATTN_F32, B, T, H, D);
    attn_linear_params pg = *p;
    pg.gate = ATTN_GATE_KEY;
    st = attn_linear_backward(ctx, &pg, q, &m.tk, v, &m.tg, NULL, dout, NULL, dq, &tdk, dv, &tdg,
                              NULL);
    if (st != ATTN_OK) goto done;
    /* through k' = e^{k - z} and g = z_prev - z, last token first */
    for (int64_t s = 0; s < m.nseq; s++) {
        int64_t tb, t0, n;
        seq_rows(p, T, s, &tb, &t0, &n);
        for (int64_t x = 0; x < Hk * D; x++) acc[x] = 0.0; /* A_{t+1} */
        for (int64_t t = t0 + n - 1; t >= t0; t--) {
            const int64_t row = tb * T + t;
            const float *kp = m.fk + row * Hk * D, *gnext = t + 1 < t0 + n ? m.fg + (row + 1) * H * D : NULL;
            float *dkr = fdk + row * Hk * D;
            const float *dgr = fdg + row * H * D, *dgn = gnext ? fdg + (row + 1) * H * D : NULL;
            for (int64_t hk = 0; hk < Hk; hk++)
                for (int64_t x = 0; x < D; x++) {
                    double dgt = 0.0, dgt1 = 0.0; /* dg of the group's heads, at t and t + 1 */
                    for (int64_t h = hk * grp; h < (hk + 1) * grp; h++) {
                        if (t > t0) dgt += dgr[h * D + x]; /* g_{t0} = -inf: no z in it */
                        if (dgn) dgt1 += dgn[h * D + x];
                    }
                    const int64_t i = hk * D + x;
                    const double kpi = kp[i], dkp = dkr[i];
                    const double dz = -kpi * dkp - dgt + dgt1;
                    /* A_t = dz_t + e^{g_{t+1}} A_{t+1} (g of any head of the group) */
                    const double decay = gnext ? exp((double)gnext[hk * grp * D + x]) : 0.0;
                    acc[i] = dz + decay * acc[i];
                    dkr[i] = (float)(kpi * (dkp + acc[i]));
                }
        }
    }
    mech_store_dense(dk, fdk);
done:
    free(fdk), free(fdg), free(acc);
    ln_free(&m);
    return st;
}
