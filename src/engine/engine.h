/* The tiled softmax engine on the CPU: entry points called by the API once
 * the arguments are validated. Written against the micro-kernel contract. */
#ifndef ATTN_ENGINE_H
#define ATTN_ENGINE_H

#include "context.h"

/* The engines run the softmax in base 2: logits are pre-scaled by log2(e). */
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

attn_status engine_forward(const attn_ctx *ctx, const attn_problem *p, const attn_tensor *q,
                           const attn_tensor *k, const attn_tensor *v, attn_tensor *o,
                           attn_tensor *lse);
attn_status engine_backward(const attn_ctx *ctx, const attn_problem *p, const attn_tensor *q,
                            const attn_tensor *k, const attn_tensor *v, const attn_tensor *o,
                            const attn_tensor *lse, const attn_tensor *dout, attn_tensor *dq,
                            attn_tensor *dk, attn_tensor *dv);
attn_status engine_decode(const attn_ctx *ctx, const attn_problem *p, const attn_tensor *q,
                          const attn_tensor *k, const attn_tensor *v, attn_tensor *o,
                          attn_tensor *lse);
attn_status engine_lse_merge(const attn_ctx *ctx, const attn_tensor *o1,
                             const attn_tensor *lse1, const attn_tensor *o2,
                             const attn_tensor *lse2, attn_tensor *o, attn_tensor *lse);

#endif
