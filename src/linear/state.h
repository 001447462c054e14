/* States of the chunked-recurrence engine: [nb, H, D, Dv] tensors <-> f32
 * [D][Dv] buffers. */
#ifndef ATTN_LINEAR_STATE_H
#define ATTN_LINEAR_STATE_H

#include "engine/rows.h"
#include "linear.h"

/* s[D][Dv] = t[b, h] (zeros when t is NULL). */
void lin_state_load(const attn_kernels *kr, const attn_tensor *t, int64_t b, int64_t h,
                    int64_t d, int64_t dv, float *s);
/* t[b, h] = s[D][Dv]. */
void lin_state_store(const attn_kernels *kr, attn_tensor *t, int64_t b, int64_t h, int64_t d,
                     int64_t dv, const float *s);

#endif
