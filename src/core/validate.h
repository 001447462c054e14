/* Argument checks at the API edge: each returns ATTN_OK or an error status
 * with a sentence naming the argument and the rule it broke. */
#ifndef ATTN_VALIDATE_H
#define ATTN_VALIDATE_H

#include "context.h"

/* A tensor view is usable: non-null, known dtype (f64 only if allow_f64),
 * ndim dims of size >= 1 (dim 1 may be 0 when allow_empty_seq), strides >= 0,
 * and its byte extent fits in memory without overflow. */
attn_status attn_check_tensor(const char *name, const attn_tensor *t, int ndim,
                              bool allow_f64, bool allow_empty_seq);

/* t has exactly these sizes (-1 = any). */
attn_status attn_check_shape(const char *name, const attn_tensor *t, int64_t d0, int64_t d1,
                             int64_t d2, int64_t d3);

/* An output: elements never overlap each other, and its bytes are disjoint
 * from every tensor in others (NULL entries skipped). */
attn_status attn_check_output(const char *name, const attn_tensor *out,
                              const attn_tensor *const *others, const char *const *names,
                              int n_others);

/* An LSE [b, h, n]: f32, or f64 on the reference backend. */
attn_status attn_check_lse(const char *name, const attn_tensor *lse, bool ref, int64_t b,
                           int64_t h, int64_t n);

/* cu (int32 [batch + 1]) starts at 0, never decreases and ends at total. */
attn_status attn_check_cu(const char *name, const int32_t *cu, int64_t batch, int64_t total);

/* Resolve params against q/k shapes into a problem (dense or varlen). */
attn_status attn_check_params(const attn_params *p, const attn_tensor *q,
                              const attn_tensor *k, const attn_tensor *v,
                              attn_problem *out);

#endif
