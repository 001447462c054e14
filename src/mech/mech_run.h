/* Running a validated problem of a mechanism (a composition over the
 * engines) on the context's backend, and views into branch-major buffers. */
#ifndef ATTN_MECH_RUN_H
#define ATTN_MECH_RUN_H

#include "context.h"
#include "engine/engine.h"

/* The problem on ctx's backend (reference or CPU engine). */
static inline attn_status mech_forward(const attn_ctx *ctx, const attn_problem *p,
                                       const attn_tensor *q, const attn_tensor *k,
                                       const attn_tensor *v, attn_tensor *o, attn_tensor *lse) {
    if (ctx->backend == ATTN_BACKEND_REF) return ref_forward(p, q, k, v, o, lse);
    return engine_forward(ctx, p, q, k, v, o, lse);
}

static inline attn_status mech_backward(const attn_ctx *ctx, const attn_problem *p,
                                        const attn_tensor *q, const attn_tensor *k,
                                        const attn_tensor *v, const attn_tensor *o,
                                        const attn_tensor *lse, const attn_tensor *dout,
                                        attn_tensor *dq, attn_tensor *dk, attn_tensor *dv) {
    if (ctx->backend == ATTN_BACKEND_REF)
        return ref_backward(p, q, k, v, o, lse, dout, dq, dk, dv);
    return engine_backward(ctx, p, q, k, v, o, lse, dout, dq, dk, dv);
}

/* Part `part` of a tensor whose dim 0 holds `parts` equal parts. */
static inline attn_tensor mech_part(const attn_tensor *t, int64_t parts, int64_t part) {
    attn_tensor v = *t;
    v.shape[0] = t->shape[0] / parts;
    v.data = (char *)t->data + (size_t)(part * v.shape[0] * t->stride[0]) * attn_dtype_size(t->dtype);
    return v;
}

#endif
