/* Linear-time attention (attn.h, "linear-time attention"): validate once at
 * the door, then hand a trusted lin_problem to the reference or the engine. */
#include <string.h>

#include "linear/linear.h"
#include "validate.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

attn_linear_params attn_linear_params_default(void) {
    attn_linear_params p;
    memset(&p, 0, sizeof p);
    p.causal = 1;
    return p;
}

static bool is_ref(const attn_ctx *ctx) { return ctx->backend == ATTN_BACKEND_REF; }

/* params and the sizes into a problem (B, T: dims 0 and 1 of the tensors). */
static attn_status resolve(const attn_linear_params *p, int64_t B, int64_t T, int64_t H,
                           int64_t Hk, int64_t D, int64_t Dv, lin_problem *out) {
    if (!(p->scale >= 0.0f) || !isfinite(p->scale))
        return attn_err(ATTN_ERR_ARG, "params->scale must be finite and >= 0 (0 = 1/sqrt(D))");
    if (p->causal != 0 && p->causal != 1)
        return attn_err(ATTN_ERR_ARG, "params->causal must be 0 or 1");
    if (p->gate < ATTN_GATE_NONE || p->gate > ATTN_GATE_KEY)
        return attn_err(ATTN_ERR_ARG, "params->gate (%d) is not an attn_gate", (int)p->gate);
    if (!p->causal && p->gate != ATTN_GATE_NONE)
        return attn_err(ATTN_ERR_UNSUPPORTED,
                        "params->causal = 0 runs without gates (params->gate must be NONE)");
    if (p->chunk < 0 || p->chunk > 1024)
        return attn_err(ATTN_ERR_ARG, "params->chunk is %d; it must be 0 (auto) or 1..1024",
                        (int)p->chunk);
    if (H % Hk != 0)
        return attn_err(ATTN_ERR_SHAPE,
                        "kv heads (k->shape[2] = %lld) must divide query heads (%lld)",
                        (long long)Hk, (long long)H);
    memset(out, 0, sizeof *out);
    out->batch = B;
    out->t = T;
    out->h = H;
    out->hk = Hk;
    out->d = D;
    out->dv = Dv;
    out->scale = p->scale > 0.0f ? p->scale : 1.0f / sqrtf((float)D);
    out->causal = p->causal;
    out->gate = p->gate;
    out->chunk = p->chunk > 0 ? p->chunk : lin_default_chunk(D, Dv, p->gate);
    if (p->cu_seqlens) {
        if (p->batch < 1)
            return attn_err(ATTN_ERR_ARG, "params->batch must be >= 1 with cu_seqlens");
        if (B != 1)
            return attn_err(ATTN_ERR_SHAPE, "with cu_seqlens, dim 0 of q, k, v must be 1 (packed rows)");
        CHECK(attn_check_cu("params->cu_seqlens", p->cu_seqlens, p->batch, T));
        out->batch = p->batch;
        out->cu = p->cu_seqlens;
    }
    return ATTN_OK;
}

/* k and v agree with each other. */
static attn_status check_kv(const attn_ctx *ctx, const attn_linear_params *p,
                            const attn_tensor *k, const attn_tensor *v) {
    bool ref = is_ref(ctx), varlen = p->cu_seqlens != NULL;
    CHECK(attn_check_tensor("k", k, 4, ref, varlen));
    CHECK(attn_check_tensor("v", v, 4, ref, varlen));
    if (v->shape[0] != k->shape[0] || v->shape[1] != k->shape[1] || v->shape[2] != k->shape[2])
        return attn_err(ATTN_ERR_SHAPE,
                        "v->shape[0..2] (%lld, %lld, %lld) must equal k's (%lld, %lld, %lld)",
                        (long long)v->shape[0], (long long)v->shape[1], (long long)v->shape[2],
                        (long long)k->shape[0], (long long)k->shape[1], (long long)k->shape[2]);
    return ATTN_OK;
}

/* params, q, k, v into a problem (also the door of mechanisms that take
 * linear params: lin_check_inputs in linear.h). */
static attn_status check_problem(const attn_ctx *ctx, const attn_linear_params *p,
                                 const attn_tensor *q, const attn_tensor *k,
                                 const attn_tensor *v, lin_problem *out) {
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    CHECK(attn_check_tensor("q", q, 4, is_ref(ctx), p->cu_seqlens != NULL));
    CHECK(check_kv(ctx, p, k, v));
    if (k->shape[0] != q->shape[0] || k->shape[1] != q->shape[1])
        return attn_err(ATTN_ERR_SHAPE,
                        "k->shape[0..1] (%lld, %lld) must equal q's (%lld, %lld)",
                        (long long)k->shape[0], (long long)k->shape[1], (long long)q->shape[0],
                        (long long)q->shape[1]);
    if (q->shape[3] != k->shape[3])
        return attn_err(ATTN_ERR_SHAPE, "q->shape[3] (%lld) must equal k->shape[3] (%lld)",
                        (long long)q->shape[3], (long long)k->shape[3]);
    return resolve(p, q->shape[0], q->shape[1], q->shape[2], k->shape[2], q->shape[3],
                   v->shape[3], out);
}

/* The gate tensor (or its gradient) has the shape p->gate asks for. */
static attn_status check_gate(const char *name, const attn_tensor *g, bool ref,
                              const lin_problem *pr, const attn_tensor *q) {
    if (pr->gate == ATTN_GATE_NONE) {
        if (g) return attn_err(ATTN_ERR_ARG, "%s must be NULL when params->gate is NONE", name);
        return ATTN_OK;
    }
    if (!g) return attn_err(ATTN_ERR_NULL, "%s must not be NULL when params->gate is set", name);
    bool varlen = pr->cu != NULL;
    switch (pr->gate) {
    case ATTN_GATE_HEAD:
        CHECK(attn_check_tensor(name, g, 1, ref, false));
        return attn_check_shape(name, g, pr->h, -1, -1, -1);
    case ATTN_GATE_HEAD_TOKEN:
        CHECK(attn_check_tensor(name, g, 3, ref, varlen));
        return attn_check_shape(name, g, q->shape[0], q->shape[1], pr->h, -1);
    default:
        CHECK(attn_check_tensor(name, g, 4, ref, varlen));
        return attn_check_shape(name, g, q->shape[0], q->shape[1], pr->h, pr->d);
    }
}

/* A state [nb, H, D, Dv], f32 (f64 on the reference backend). */
static attn_status check_state(const char *name, const attn_tensor *s, bool ref,
                               const lin_problem *pr) {
    CHECK(attn_check_tensor(name, s, 4, ref, false));
    if (s->dtype != ATTN_F32 && s->dtype != ATTN_F64)
        return attn_err(ATTN_ERR_DTYPE, "%s must be f32", name);
    return attn_check_shape(name, s, pr->batch, pr->h, pr->d, pr->dv);
}

/* A [B, T, heads, dim] tensor like q's first two dims. */
static attn_status check_like(const char *name, const attn_tensor *t, bool ref,
                              const lin_problem *pr, const attn_tensor *q, int64_t heads,
                              int64_t dim) {
    CHECK(attn_check_tensor(name, t, 4, ref, pr->cu != NULL));
    return attn_check_shape(name, t, q->shape[0], q->shape[1], heads, dim);
}

static attn_status begin(const attn_ctx *ctx) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    return ATTN_OK;
}

attn_status lin_check_inputs(const attn_ctx *ctx, const attn_linear_params *p,
                             const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                             lin_problem *out) {
    return check_problem(ctx, p, q, k, v, out);
}

static attn_status forward(attn_ctx *ctx, const attn_linear_params *p, const attn_tensor *q,
                           const attn_tensor *k, const attn_tensor *v, const attn_tensor *g,
                           const attn_tensor *state_in, attn_tensor *o, attn_tensor *state_out,
                           const float *vrow, const float *skip) {
    CHECK(begin(ctx));
    lin_problem pr;
    CHECK(check_problem(ctx, p, q, k, v, &pr));
    if (vrow || skip) { /* internal callers only: a misuse is a bug, said plainly */
        if (is_ref(ctx) || !pr.causal || (vrow && pr.gate == ATTN_GATE_KEY))
            return attn_err(ATTN_ERR_UNSUPPORTED,
                            "folded v scales run on the CPU engine, causal, scalar gates only");
        pr.vrow = vrow;
        pr.skip = skip;
    }
    bool ref = is_ref(ctx);
    CHECK(check_gate("g", g, ref, &pr, q));
    if (state_in) CHECK(check_state("state_in", state_in, ref, &pr));
    CHECK(check_like("o", o, ref, &pr, q, pr.h, pr.dv));
    const attn_tensor *ins[] = {q, k, v, g, state_in, state_out};
    const char *names[] = {"q", "k", "v", "g", "state_in", "state_out"};
    CHECK(attn_check_output("o", o, ins, names, 6));
    if (state_out) {
        CHECK(check_state("state_out", state_out, ref, &pr));
        CHECK(attn_check_output("state_out", state_out, ins, names, 5));
    }
    if (ref) return ref_linear_forward(&pr, q, k, v, g, state_in, o, state_out);
    return linear_engine_forward(ctx, &pr, q, k, v, g, state_in, o, state_out);
}

attn_status attn_linear_forward(attn_ctx *ctx, const attn_linear_params *p,
                                const attn_tensor *q, const attn_tensor *k,
                                const attn_tensor *v, const attn_tensor *g,
                                const attn_tensor *state_in, attn_tensor *o,
                                attn_tensor *state_out) {
    return forward(ctx, p, q, k, v, g, state_in, o, state_out, NULL, NULL);
}

attn_status linear_forward_folded(attn_ctx *ctx, const attn_linear_params *p,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, const attn_tensor *g,
                                  const attn_tensor *state_in, attn_tensor *o,
                                  attn_tensor *state_out, const float *vrow, const float *skip) {
    return forward(ctx, p, q, k, v, g, state_in, o, state_out, vrow, skip);
}

attn_status attn_linear_backward(attn_ctx *ctx, const attn_linear_params *p,
                                 const attn_tensor *q, const attn_tensor *k,
                                 const attn_tensor *v, const attn_tensor *g,
                                 const attn_tensor *state_in, const attn_tensor *dout,
                                 const attn_tensor *dstate_out, attn_tensor *dq,
                                 attn_tensor *dk, attn_tensor *dv, attn_tensor *dg,
                                 attn_tensor *dstate_in) {
    CHECK(begin(ctx));
    lin_problem pr;
    CHECK(check_problem(ctx, p, q, k, v, &pr));
    bool ref = is_ref(ctx);
    CHECK(check_gate("g", g, ref, &pr, q));
    if (state_in) CHECK(check_state("state_in", state_in, ref, &pr));
    CHECK(check_like("dout", dout, ref, &pr, q, pr.h, pr.dv));
    if (dstate_out) CHECK(check_state("dstate_out", dstate_out, ref, &pr));
    CHECK(check_like("dq", dq, ref, &pr, q, pr.h, pr.d));
    CHECK(check_like("dk", dk, ref, &pr, q, pr.hk, pr.d));
    CHECK(check_like("dv", dv, ref, &pr, q, pr.hk, pr.dv));
    if (dg) CHECK(check_gate("dg", dg, ref, &pr, q));
    if (dstate_in) CHECK(check_state("dstate_in", dstate_in, ref, &pr));
    const attn_tensor *all[] = {q, k, v, g, state_in, dout, dstate_out, dq, dk, dv, dg, dstate_in};
    const char *names[] = {"q", "k", "v", "g", "state_in", "dout", "dstate_out",
                           "dq", "dk", "dv", "dg", "dstate_in"};
    /* each gradient against every input and the gradients before it */
    CHECK(attn_check_output("dq", dq, all, names, 7));
    CHECK(attn_check_output("dk", dk, all, names, 8));
    CHECK(attn_check_output("dv", dv, all, names, 9));
    if (dg) CHECK(attn_check_output("dg", dg, all, names, 10));
    if (dstate_in) CHECK(attn_check_output("dstate_in", dstate_in, all, names, 11));
    if (ref)
        return ref_linear_backward(&pr, q, k, v, g, state_in, dout, dstate_out, dq, dk, dv, dg,
                                   dstate_in);
    return linear_engine_backward(ctx, &pr, q, k, v, g, state_in, dout, dstate_out, dq, dk, dv,
                                  dg, dstate_in);
}

attn_status attn_linear_decode(attn_ctx *ctx, const attn_linear_params *p,
                               const attn_tensor *q, const attn_tensor *k,
                               const attn_tensor *v, const attn_tensor *g, attn_tensor *state,
                               attn_tensor *o) {
    CHECK(begin(ctx));
    if (p && p->cu_seqlens) return attn_err(ATTN_ERR_ARG, "decode takes no cu_seqlens");
    if (p && !p->causal) return attn_err(ATTN_ERR_ARG, "decode is causal (params->causal = 1)");
    lin_problem pr;
    CHECK(check_problem(ctx, p, q, k, v, &pr));
    bool ref = is_ref(ctx);
    CHECK(check_gate("g", g, ref, &pr, q));
    if (!state) return attn_err(ATTN_ERR_NULL, "state must not be NULL");
    CHECK(check_state("state", state, ref, &pr));
    CHECK(check_like("o", o, ref, &pr, q, pr.h, pr.dv));
    const attn_tensor *ins[] = {q, k, v, g, state};
    const char *names[] = {"q", "k", "v", "g", "state"};
    CHECK(attn_check_output("o", o, ins, names, 5));
    CHECK(attn_check_output("state", state, ins, names, 4));
    if (ref) return ref_linear_forward(&pr, q, k, v, g, state, o, state);
    return linear_engine_decode(ctx, &pr, q, k, v, g, state, o);
}

attn_status attn_linear_span_map(attn_ctx *ctx, const attn_linear_params *p,
                                 const attn_tensor *k, const attn_tensor *v,
                                 const attn_tensor *g, attn_tensor *decay, attn_tensor *u) {
    CHECK(begin(ctx));
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    CHECK(check_kv(ctx, p, k, v));
    bool ref = is_ref(ctx);
    CHECK(attn_check_tensor("u", u, 4, ref, false));
    lin_problem pr;
    CHECK(resolve(p, k->shape[0], k->shape[1], u->shape[1], k->shape[2], k->shape[3],
                  v->shape[3], &pr));
    CHECK(check_gate("g", g, ref, &pr, k));
    CHECK(check_state("u", u, ref, &pr));
    CHECK(attn_check_tensor("decay", decay, 3, ref, false));
    if (decay->dtype != ATTN_F32 && decay->dtype != ATTN_F64)
        return attn_err(ATTN_ERR_DTYPE, "decay must be f32");
    CHECK(attn_check_shape("decay", decay, pr.batch, pr.h, pr.d, -1));
    const attn_tensor *ins[] = {k, v, g, u};
    const char *names[] = {"k", "v", "g", "u"};
    CHECK(attn_check_output("decay", decay, ins, names, 4));
    CHECK(attn_check_output("u", u, ins, names, 3));
    if (ref) return ref_linear_span_map(&pr, k, v, g, decay, u);
    return linear_engine_span_map(ctx, &pr, k, v, g, decay, u);
}

attn_status attn_linear_state_compose(attn_ctx *ctx, const attn_tensor *decay1,
                                      const attn_tensor *u1, const attn_tensor *decay2,
                                      const attn_tensor *u2, attn_tensor *decay_out,
                                      attn_tensor *u_out) {
    CHECK(begin(ctx));
    bool ref = is_ref(ctx);
    CHECK(attn_check_tensor("u1", u1, 4, ref, false));
    const int64_t *s = u1->shape;
    const attn_tensor *all[] = {decay1, u1, decay2, u2, decay_out, u_out};
    const char *names[] = {"decay1", "u1", "decay2", "u2", "decay_out", "u_out"};
    for (int i = 0; i < 6; i++) {
        if (!all[i]) {
            if (i == 1 || i == 2 || i == 3 || i == 5)
                return attn_err(ATTN_ERR_NULL, "%s must not be NULL", names[i]);
            continue;
        }
        bool is_decay = i % 2 == 0; /* decay1, decay2, decay_out */
        CHECK(attn_check_tensor(names[i], all[i], is_decay ? 3 : 4, ref, false));
        if (all[i]->dtype != ATTN_F32 && all[i]->dtype != ATTN_F64)
            return attn_err(ATTN_ERR_DTYPE, "%s must be f32", names[i]);
        CHECK(attn_check_shape(names[i], all[i], s[0], s[1], s[2], is_decay ? -1 : s[3]));
    }
    if (!decay1 && decay_out)
        return attn_err(ATTN_ERR_ARG, "decay_out must be NULL when decay1 is NULL (u1 is a state)");
    CHECK(attn_check_output("u_out", u_out, all, names, 5));
    if (decay_out) CHECK(attn_check_output("decay_out", decay_out, all, names, 4));
    if (ref) return ref_linear_state_compose(decay1, u1, decay2, u2, decay_out, u_out);
    return linear_engine_state_compose(decay1, u1, decay2, u2, decay_out, u_out);
}
