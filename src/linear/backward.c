/* The chunked-recurrence engine, backward: to be written. */
#include "linear.h"

attn_status linear_engine_backward(const attn_ctx *ctx, const lin_problem *p,
                                   const attn_tensor *q, const attn_tensor *k,
                                   const attn_tensor *v, const attn_tensor *g,
                                   const attn_tensor *state_in, const attn_tensor *dout,
                                   const attn_tensor *dstate_out, attn_tensor *dq,
                                   attn_tensor *dk, attn_tensor *dv, attn_tensor *dg,
                                   attn_tensor *dstate_in) {
    (void)ctx, (void)p, (void)q, (void)k, (void)v, (void)g, (void)state_in, (void)dout;
    (void)dstate_out, (void)dq, (void)dk, (void)dv, (void)dg, (void)dstate_in;
    return attn_err(ATTN_ERR_UNSUPPORTED, "linear attention backward runs on the reference backend only (for now)");
}
