/* NSA's block selection, with the compressed branch computed on the way
 * (src/mech/nsa_select.c). */
#ifndef ATTN_NSA_SELECT_H
#define ATTN_NSA_SELECT_H

#include "context.h"

/* Compressed keys of m keys: spans of cmp_block with stride cmp_stride. */
static inline int64_t nsa_compressed_len(const attn_nsa_opts *o, int64_t m) {
    return m < o->cmp_block ? 0 : (m - o->cmp_block) / o->cmp_stride + 1;
}

/* The selection plan of the compressed problem pc (q against kc, causal,
 * key_stride/span set; inputs checked), over m keys, by the CPU kernels
 * whatever the backend (a planner's output must not depend on it). When o
 * is given, the compressed branch's output is written too (vc then holds its
 * values; times gates[0, i, h, 0] when gates is given) and its LSE when lse
 * is: the same softmax feeds the branch and the selection. */
attn_status nsa_select_run(const attn_ctx *ctx, const attn_problem *pc,
                           const attn_nsa_opts *opt, const attn_tensor *q,
                           const attn_tensor *kc, const attn_tensor *vc, int64_t m,
                           attn_tensor *o, attn_tensor *lse, const attn_tensor *gates,
                           attn_plan **out);

#endif
