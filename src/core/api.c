/* The public operations: validate once at the door, then hand a trusted
 * problem to the reference or the CPU engine. */
#include <string.h>

#include "engine/engine.h"
#include "validate.h"

attn_params attn_params_default(void) {
    attn_params p;
    memset(&p, 0, sizeof p);
    p.window_left = -1;
    p.window_right = -1;
    return p;
}

static attn_status check_ctx(const attn_ctx *ctx) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    return ATTN_OK;
}

static bool is_ref(const attn_ctx *ctx) { return ctx->backend == ATTN_BACKEND_REF; }

#define CHECK(expr)                               \
    do {                                          \
        attn_status st_ = (expr);                 \
        if (st_ != ATTN_OK) return st_;           \
    } while (0)

/* q, k, v and the problem they describe. */
static attn_status check_qkv(const attn_ctx *ctx, const attn_params *p, const attn_tensor *q,
                             const attn_tensor *k, const attn_tensor *v, attn_problem *pr) {
    bool ref = is_ref(ctx);
    bool varlen = p && p->cu_seqlens_q;
    CHECK(attn_check_tensor("q", q, 4, ref, varlen));
    CHECK(attn_check_tensor("k", k, 4, ref, varlen));
    CHECK(attn_check_tensor("v", v, 4, ref, varlen));
    return attn_check_params(p, q, k, v, pr);
}

attn_status attn_forward(attn_ctx *ctx, const attn_params *p, const attn_tensor *q,
                         const attn_tensor *k, const attn_tensor *v, attn_tensor *o,
                         attn_tensor *lse) {
    CHECK(check_ctx(ctx));
    attn_problem pr;
    CHECK(check_qkv(ctx, p, q, k, v, &pr));
    bool ref = is_ref(ctx), varlen = pr.cu_q != NULL;
    CHECK(attn_check_tensor("o", o, 4, ref, varlen));
    CHECK(attn_check_shape("o", o, q->shape[0], q->shape[1], pr.h, pr.dv));
    const attn_tensor *ins[] = {q, k, v, lse};
    const char *names[] = {"q", "k", "v", "lse"};
    CHECK(attn_check_output("o", o, ins, names, lse ? 4 : 3));
    if (lse) {
        CHECK(attn_check_lse("lse", lse, ref, q->shape[0], pr.h, q->shape[1]));
        const attn_tensor *ins2[] = {q, k, v};
        CHECK(attn_check_output("lse", lse, ins2, names, 3));
    }
    if (ref) return ref_forward(&pr, q, k, v, o, lse);
    return engine_forward(ctx, &pr, q, k, v, o, lse);
}

attn_status attn_backward(attn_ctx *ctx, const attn_params *p, const attn_tensor *q,
                          const attn_tensor *k, const attn_tensor *v, const attn_tensor *o,
                          const attn_tensor *lse, const attn_tensor *dout, attn_tensor *dq,
                          attn_tensor *dk, attn_tensor *dv) {
    CHECK(check_ctx(ctx));
    attn_problem pr;
    CHECK(check_qkv(ctx, p, q, k, v, &pr));
    bool ref = is_ref(ctx), varlen = pr.cu_q != NULL;
    CHECK(attn_check_tensor("o", o, 4, ref, varlen));
    CHECK(attn_check_shape("o", o, q->shape[0], q->shape[1], pr.h, pr.dv));
    CHECK(attn_check_tensor("dout", dout, 4, ref, varlen));
    CHECK(attn_check_shape("dout", dout, q->shape[0], q->shape[1], pr.h, pr.dv));
    CHECK(attn_check_lse("lse", lse, ref, q->shape[0], pr.h, q->shape[1]));
    CHECK(attn_check_tensor("dq", dq, 4, ref, varlen));
    CHECK(attn_check_shape("dq", dq, q->shape[0], q->shape[1], pr.h, pr.d));
    CHECK(attn_check_tensor("dk", dk, 4, ref, varlen));
    CHECK(attn_check_shape("dk", dk, k->shape[0], k->shape[1], pr.hk, pr.d));
    CHECK(attn_check_tensor("dv", dv, 4, ref, varlen));
    CHECK(attn_check_shape("dv", dv, k->shape[0], k->shape[1], pr.hk, pr.dv));
    const attn_tensor *all[] = {q, k, v, o, lse, dout, dq, dk, dv};
    const char *names[] = {"q", "k", "v", "o", "lse", "dout", "dq", "dk", "dv"};
    /* each gradient against every input and the gradients before it */
    CHECK(attn_check_output("dq", dq, all, names, 6));
    CHECK(attn_check_output("dk", dk, all, names, 7));
    CHECK(attn_check_output("dv", dv, all, names, 8));
    if (ref) return ref_backward(&pr, q, k, v, o, lse, dout, dq, dk, dv);
    return engine_backward(ctx, &pr, q, k, v, o, lse, dout, dq, dk, dv);
}

attn_status attn_decode(attn_ctx *ctx, const attn_params *p, const attn_tensor *q,
                        const attn_tensor *k, const attn_tensor *v, const int32_t *cache_lens,
                        attn_tensor *o, attn_tensor *lse) {
    CHECK(check_ctx(ctx));
    if (p && (p->cu_seqlens_q || p->cu_seqlens_k || p->plan))
        return attn_err(ATTN_ERR_ARG, "decode takes no cu_seqlens and no plan in params");
    attn_problem pr;
    CHECK(check_qkv(ctx, p, q, k, v, &pr));
    if (pr.n > ATTN_DECODE_MAX_QUERIES)
        return attn_err(ATTN_ERR_ARG, "q->shape[1] is %lld; decode takes 1..%d new queries",
                        (long long)pr.n, ATTN_DECODE_MAX_QUERIES);
    if (cache_lens)
        for (int64_t b = 0; b < pr.batch; b++)
            if (cache_lens[b] < 0 || cache_lens[b] > pr.m)
                return attn_err(ATTN_ERR_ARG, "cache_lens[%lld] is %d; it must be in 0..%lld",
                                (long long)b, cache_lens[b], (long long)pr.m);
    pr.kv_lens = cache_lens;
    bool ref = is_ref(ctx);
    CHECK(attn_check_tensor("o", o, 4, ref, false));
    CHECK(attn_check_shape("o", o, pr.batch, pr.n, pr.h, pr.dv));
    const attn_tensor *ins[] = {q, k, v, lse};
    const char *names[] = {"q", "k", "v", "lse"};
    CHECK(attn_check_output("o", o, ins, names, lse ? 4 : 3));
    if (lse) {
        CHECK(attn_check_lse("lse", lse, ref, pr.batch, pr.h, pr.n));
        CHECK(attn_check_output("lse", lse, ins, names, 3));
    }
    if (ref) return ref_forward(&pr, q, k, v, o, lse);
    return engine_decode(ctx, &pr, q, k, v, o, lse);
}

attn_status attn_lse_merge(attn_ctx *ctx, const attn_tensor *o1, const attn_tensor *lse1,
                           const attn_tensor *o2, const attn_tensor *lse2, attn_tensor *o,
                           attn_tensor *lse) {
    CHECK(check_ctx(ctx));
    bool ref = is_ref(ctx);
    CHECK(attn_check_tensor("o1", o1, 4, ref, false));
    const int64_t b = o1->shape[0], n = o1->shape[1], h = o1->shape[2], dv = o1->shape[3];
    CHECK(attn_check_tensor("o2", o2, 4, ref, false));
    CHECK(attn_check_shape("o2", o2, b, n, h, dv));
    CHECK(attn_check_tensor("o", o, 4, ref, false));
    CHECK(attn_check_shape("o", o, b, n, h, dv));
    CHECK(attn_check_lse("lse1", lse1, ref, b, h, n));
    CHECK(attn_check_lse("lse2", lse2, ref, b, h, n));
    CHECK(attn_check_lse("lse", lse, ref, b, h, n));
    const attn_tensor *ins[] = {o1, lse1, o2, lse2, lse};
    const char *names[] = {"o1", "lse1", "o2", "lse2", "lse"};
    CHECK(attn_check_output("o", o, ins, names, 5));
    CHECK(attn_check_output("lse", lse, ins, names, 4));
    if (ref) return ref_lse_merge(o1, lse1, o2, lse2, o, lse);
    return engine_lse_merge(ctx, o1, lse1, o2, lse2, o, lse);
}

attn_status attn_supports(const attn_ctx *ctx, attn_op op, const attn_config *cfg) {
    CHECK(check_ctx(ctx));
    if (!cfg) return attn_err(ATTN_ERR_NULL, "cfg must not be NULL");
    if (op < ATTN_OP_FORWARD || op > ATTN_OP_LINEAR_DECODE)
        return attn_err(ATTN_ERR_ARG, "op (%d) is not an attn_op", (int)op);
    const attn_dtype dts[3] = {cfg->q_dtype, cfg->kv_dtype, cfg->o_dtype};
    for (int i = 0; i < 3; i++) {
        if (attn_dtype_size(dts[i]) == 0)
            return attn_err(ATTN_ERR_DTYPE, "cfg dtype %d is not an attn_dtype", (int)dts[i]);
        if (dts[i] == ATTN_F64 && !is_ref(ctx))
            return attn_err(ATTN_ERR_UNSUPPORTED,
                            "f64 tensors run only on the reference backend (ATTN_BACKEND=ref)");
    }
    if (cfg->dim < 1 || cfg->dim_v < 1 || cfg->heads < 1 || cfg->kv_heads < 1)
        return attn_err(ATTN_ERR_ARG, "cfg dims and heads must be >= 1");
    if (cfg->heads % cfg->kv_heads != 0)
        return attn_err(ATTN_ERR_UNSUPPORTED, "kv_heads must divide heads");
    if (op == ATTN_OP_DECODE && cfg->has_plan)
        return attn_err(ATTN_ERR_UNSUPPORTED, "decode runs no explicit plan");
    /* The recurrence visits every token once: there are no blocks to plan. */
    if (op >= ATTN_OP_LINEAR_FORWARD && cfg->has_plan)
        return attn_err(ATTN_ERR_UNSUPPORTED, "linear-time attention runs no plan");
    return ATTN_OK;
}
