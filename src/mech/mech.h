/* Helpers of the mechanisms that shape inputs for an engine: dense f32
 * copies of strided tensors of any dtype. */
#ifndef ATTN_MECH_H
#define ATTN_MECH_H

#include "validate.h"

/* malloc of the product of the sizes (each >= 0, a size of 0 counts as 1)
 * in floats; NULL on overflow or out of memory. */
float *mech_alloc(int64_t n0, int64_t n1, int64_t n2, int64_t n3);

/* Logical element i (row-major over t's shape) of t, as double. */
double mech_at(const attn_tensor *t, int64_t i);

/* Elements of t (product of its shape). */
int64_t mech_numel(const attn_tensor *t);
/* Logical element i of t = x (in t's dtype). */
void mech_set(attn_tensor *t, int64_t i, double x);

/* Dense contiguous f32 view of buffer buf with t's shape. */
attn_tensor mech_view(float *buf, const attn_tensor *t);

#endif
