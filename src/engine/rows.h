/* Moving rows between tensors (any dtype, any strides) and f32 buffers. */
#ifndef ATTN_ROWS_H
#define ATTN_ROWS_H

#include "context.h"

/* dst[0..n) = t's elements at off, off + step, ... as f32 (step = stride[3]). */
void rows_load(const attn_kernels *kr, const attn_tensor *t, int64_t off, int64_t n,
               float *dst);
/* t's elements at off, off + stride[3], ... = src[0..n) in t's dtype. */
void rows_store(const attn_kernels *kr, attn_tensor *t, int64_t off, int64_t n,
                const float *src);
/* rows consecutive rows of n elements each, row r at off + r * row_stride, into
 * dst with leading dimension ldd. */
void rows_load_block(const attn_kernels *kr, const attn_tensor *t, int64_t off,
                     int64_t row_stride, int64_t rows, int64_t n, float *dst, int64_t ldd);

/* The same rows transposed: dst[x * ldd + r] = element x of row r, staged
 * through stage (stage_floats >= n) a block of rows at a time so that the
 * transpose is the kernel's (16 x 16 register tiles, whole cache lines). */
void rows_load_transposed(const attn_kernels *kr, const attn_tensor *t, int64_t off,
                          int64_t row_stride, int64_t rows, int64_t n, float *stage,
                          int64_t stage_floats, float *dst, int64_t ldd);

/* Ask for rows [r0, r0 + n) of head h of t (any dtype, unit stride assumed
 * for the extent; other layouts only lose the hint). Rows of one head are
 * H * D elements apart in the usual layout, a stride the hardware
 * prefetchers do not follow. */
void rows_prefetch(const attn_tensor *t, int64_t tb, int64_t r0, int64_t n, int64_t h,
                   int write);

/* Pyramid pooling of a block of nk rows (row r at off + r * row_stride, n
 * elements each): groups of 2^level consecutive rows (the last one may be
 * shorter) become their means, written to dst [groups][n]; tmp holds n floats. */
void rows_pool(const attn_kernels *kr, const attn_tensor *t, int64_t off, int64_t row_stride,
               int64_t nk, int level, int64_t n, float *dst, float *tmp);
/* Rows in pooled group g of a block of nk rows. */
static inline int64_t pool_count(int64_t nk, int level, int64_t g) {
    int64_t f = (int64_t)1 << level, left = nk - g * f;
    return left < f ? left : f;
}

/* Scratch of one thread: a single allocation carved into named parts. A
 * carve over a scratch with base NULL only counts, so that one function
 * gives both the size and the layout. */
typedef struct scratch {
    float *base;
    size_t used; /* in floats */
} scratch;

/* Allocate per-thread scratch of `floats` floats each for `threads` threads
 * (64-byte aligned parts); NULL on overflow or out of memory. */
float *scratch_alloc(int threads, size_t floats, size_t *stride_out);
/* bytes of memory for free(), 64-byte aligned; large blocks in 2 MiB pages
 * where the system has them (fewer first-touch faults). NULL when out of
 * memory. */
void *big_alloc(size_t bytes);
/* Next part of n floats (64-byte aligned) from a thread's slice (NULL when
 * only counting). */
float *scratch_take(scratch *s, size_t n);

/* This thread's index in the OpenMP team (0 without OpenMP). */
int engine_thread_id(void);

#endif
