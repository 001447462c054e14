/* Helpers of the mechanisms that shape inputs for an engine: dense f32
 * copies of strided tensors of any dtype. */
#ifndef ATTN_MECH_H
#define ATTN_MECH_H

#include "validate.h"

/* malloc of the product of the sizes (each >= 0, a size of 0 counts as 1)
 * in floats; NULL on overflow or out of memory. */
float *mech_alloc(int64_t n0, int64_t n1, int64_t n2, int64_t n3);

/* Elements of t (product of its shape). */
int64_t mech_numel(const attn_tensor *t);
/* dst = t's elements in row-major order as f32 (any dims, dtype, strides;
 * rows of the last dim are read as runs). */
void mech_dense(const attn_tensor *t, float *dst);

/* The inverse: t's elements (row-major order) = src, in t's dtype. */
void mech_store_dense(attn_tensor *t, const float *src);

/* t's data when t is f32, contiguous and row-major (its dense copy would be
 * itself), else NULL. */
float *mech_contiguous_f32(const attn_tensor *t);

/* A 1-D tensor of n elements. */
attn_status mech_check_1d(const char *name, const attn_tensor *t, bool ref, int64_t n);

/* Gradients grads[0..n) shaped like likes[i] (same dims and sizes); the
 * first `required` must be given, the others only when their like is; each
 * may not overlap itself or all[0 .. n_before + i) (the inputs, then the
 * gradients before it). */
attn_status mech_check_grads(bool ref, int n, attn_tensor *const *grads,
                             const attn_tensor *const *likes, const char *const *names,
                             int required, const attn_tensor *const *all,
                             const char *const *all_names, int n_before);

/* Random-feature attention's projections w [f][d] ~ N(0, 1) from a seed
 * (splitmix64, Box-Muller; rfa.c): WERSA and its reference draw the same. */
void mech_rfa_draw(uint64_t seed, int64_t f, int64_t d, float *w);

/* References of mechanisms (src/ref/): double precision, outputs written
 * only on success. WERSA (attn_wersa_forward): the filter by its
 * definition (box means, details), the features in double from the same
 * draw and shifts as rfa.c, the normalised quadratic form; w [levels + 1]. */
struct lin_problem;
attn_status ref_wersa_forward(const struct lin_problem *pr, uint64_t seed, int32_t features,
                              int32_t levels, const double *w, const attn_tensor *q,
                              const attn_tensor *k, const attn_tensor *v, attn_tensor *o);
/* LLA (attn_lla_forward): per query the weights, moments, a Gaussian
 * elimination in double and the weighted sum. */
attn_status ref_lla_forward(const struct lin_problem *pr, double lambda, const attn_tensor *q,
                            const attn_tensor *k, const attn_tensor *v, attn_tensor *o);
/* Its backward, per query from the definition (the formulas atop lla.c). */
attn_status ref_lla_backward(const struct lin_problem *pr, double lambda, const attn_tensor *q,
                             const attn_tensor *k, const attn_tensor *v, const attn_tensor *dout,
                             attn_tensor *dq, attn_tensor *dk, attn_tensor *dv);

/* Dense contiguous f32 view of buffer buf with t's shape. */
attn_tensor mech_view(float *buf, const attn_tensor *t);

#endif
