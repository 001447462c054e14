/* Shared by the linear-attention tests: inputs of one case and the runs of
 * attn_linear_forward / attn_linear_decode into owned outputs. */
#ifndef TEST_LINEAR_UTIL_H
#define TEST_LINEAR_UTIL_H

#include "test_util.h"

typedef struct lin_inputs {
    tu_buf q, k, v, g, s0; /* g.mem NULL: no gate; s0.mem NULL: no state_in */
} lin_inputs;

/* The log-gate tensor of a gate kind: HEAD [H], HEAD_TOKEN [B, T, H], KEY [B, T, H, D]. */
static TU_UNUSED tu_buf lin_gate_alloc(attn_gate gate, attn_dtype dt, int64_t B, int64_t T,
                                       int64_t H, int64_t D) {
    tu_buf b;
    memset(&b, 0, sizeof b);
    if (gate == ATTN_GATE_HEAD) {
        b = tu_alloc(dt, H, 1, 1, -1);
        b.t.ndim = 1;
        b.t.shape[0] = H;
        b.t.stride[0] = 1;
    } else if (gate == ATTN_GATE_HEAD_TOKEN) {
        b = tu_alloc(dt, B, T, H, -1);
    } else if (gate == ATTN_GATE_KEY) {
        b = tu_alloc(dt, B, T, H, D);
    }
    return b;
}

/* q, k, v uniform in [-1, 1] (dtype dt), log gates uniform in [glo, ghi]
 * (f32), state_in uniform in [-1, 1] when with_state. */
static TU_UNUSED lin_inputs lin_make(tu_rng *r, attn_dtype dt, attn_gate gate, int64_t B,
                                     int64_t T, int64_t H, int64_t Hk, int64_t D, int64_t Dv,
                                     double glo, double ghi, int with_state) {
    lin_inputs in;
    memset(&in, 0, sizeof in);
    in.q = tu_alloc(dt, B, T, H, D);
    in.k = tu_alloc(dt, B, T, Hk, D);
    in.v = tu_alloc(dt, B, T, Hk, Dv);
    tu_fill(&in.q.t, r, -1, 1);
    tu_fill(&in.k.t, r, -1, 1);
    tu_fill(&in.v.t, r, -1, 1);
    in.g = lin_gate_alloc(gate, ATTN_F32, B, T, H, D);
    if (in.g.mem) tu_fill(&in.g.t, r, glo, ghi);
    if (with_state) {
        in.s0 = tu_alloc(ATTN_F32, B, H, D, Dv);
        tu_fill(&in.s0.t, r, -1, 1);
    }
    return in;
}

static TU_UNUSED const attn_tensor *lin_g(const lin_inputs *in) {
    return in->g.mem ? &in->g.t : NULL;
}
static TU_UNUSED const attn_tensor *lin_s0(const lin_inputs *in) {
    return in->s0.mem ? &in->s0.t : NULL;
}

static TU_UNUSED void lin_free(lin_inputs *in) {
    tu_free(&in->q);
    tu_free(&in->k);
    tu_free(&in->v);
    if (in->g.mem) tu_free(&in->g);
    if (in->s0.mem) tu_free(&in->s0);
}

typedef struct lin_out {
    tu_buf o, s; /* o [B, T, H, Dv], s [nb, H, D, Dv] */
    attn_status st;
} lin_out;

/* attn_linear_forward into o (odt) and state_out (sdt: F32, or F64 on ref). */
static TU_UNUSED lin_out lin_forward(attn_ctx *ctx, const attn_linear_params *p,
                                     const lin_inputs *in, attn_dtype odt, attn_dtype sdt) {
    lin_out r;
    const attn_tensor *q = &in->q.t;
    int64_t nb = p->cu_seqlens ? p->batch : q->shape[0];
    r.o = tu_alloc(odt, q->shape[0], q->shape[1], q->shape[2], in->v.t.shape[3]);
    r.s = tu_alloc(sdt, nb, q->shape[2], q->shape[3], in->v.t.shape[3]);
    r.st = attn_linear_forward(ctx, p, q, &in->k.t, &in->v.t, lin_g(in), lin_s0(in), &r.o.t,
                               &r.s.t);
    return r;
}

/* attn_linear_decode over all T tokens; the state starts as state_in (or 0). */
static TU_UNUSED lin_out lin_decode(attn_ctx *ctx, const attn_linear_params *p,
                                    const lin_inputs *in, attn_dtype odt, attn_dtype sdt) {
    lin_out r;
    const attn_tensor *q = &in->q.t;
    r.o = tu_alloc(odt, q->shape[0], q->shape[1], q->shape[2], in->v.t.shape[3]);
    r.s = tu_alloc(sdt, q->shape[0], q->shape[2], q->shape[3], in->v.t.shape[3]);
    if (in->s0.mem) tu_copy(&r.s.t, &in->s0.t);
    r.st = attn_linear_decode(ctx, p, q, &in->k.t, &in->v.t, lin_g(in), &r.s.t, &r.o.t);
    return r;
}

static TU_UNUSED void lin_out_free(lin_out *r) {
    tu_free(&r->o);
    tu_free(&r->s);
}

#endif
