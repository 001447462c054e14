/* Row movers and scratch (see rows.h). */
#include "rows.h"

#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

void rows_load(const attn_kernels *kr, const attn_tensor *t, int64_t off, int64_t n,
               float *dst) {
    int64_t st = t->stride[3];
    if (st == 1) {
        switch (t->dtype) {
        case ATTN_F32: memcpy(dst, (const float *)t->data + off, (size_t)n * 4); return;
        case ATTN_F16: kr->f16_to_f32((const uint16_t *)t->data + off, dst, n); return;
        case ATTN_BF16: kr->bf16_to_f32((const uint16_t *)t->data + off, dst, n); return;
        default: break;
        }
    }
    for (int64_t i = 0; i < n; i++) dst[i] = (float)attn_load_f64(t, off + i * st);
}

void rows_store(const attn_kernels *kr, attn_tensor *t, int64_t off, int64_t n,
                const float *src) {
    int64_t st = t->stride[3];
    if (st == 1) {
        switch (t->dtype) {
        case ATTN_F32: memcpy((float *)t->data + off, src, (size_t)n * 4); return;
        case ATTN_F16: kr->f32_to_f16(src, (uint16_t *)t->data + off, n); return;
        case ATTN_BF16: kr->f32_to_bf16(src, (uint16_t *)t->data + off, n); return;
        default: break;
        }
    }
    for (int64_t i = 0; i < n; i++) attn_store_f64(t, off + i * st, src[i]);
}

void rows_load_block(const attn_kernels *kr, const attn_tensor *t, int64_t off,
                     int64_t row_stride, int64_t rows, int64_t n, float *dst, int64_t ldd) {
    for (int64_t r = 0; r < rows; r++) rows_load(kr, t, off + r * row_stride, n, dst + r * ldd);
}

void rows_load_transposed(const attn_kernels *kr, const attn_tensor *t, int64_t off,
                          int64_t row_stride, int64_t rows, int64_t n, float *stage,
                          int64_t stage_floats, float *dst, int64_t ldd) {
    const int64_t per = stage_floats / n > 0 ? stage_floats / n : 1;
    for (int64_t r0 = 0; r0 < rows; r0 += per) {
        const int64_t w = r0 + per <= rows ? per : rows - r0;
        rows_load_block(kr, t, off + r0 * row_stride, row_stride, w, n, stage, n);
        kr->transpose(stage, n, w, n, dst + r0, ldd);
    }
}

void rows_prefetch(const attn_tensor *t, int64_t tb, int64_t r0, int64_t n, int64_t h,
                   int write) {
    const int64_t es = (int64_t)attn_dtype_size(t->dtype);
    const int64_t bytes = t->shape[3] * es;
    const char *base = (const char *)t->data + attn_off4(t, tb, r0, h, 0) * es;
    for (int64_t r = 0; r < n; r++)
        for (int64_t x = 0; x < bytes; x += 64) {
            if (write) __builtin_prefetch(base + r * t->stride[1] * es + x, 1, 3);
            else __builtin_prefetch(base + r * t->stride[1] * es + x, 0, 3);
        }
}

void rows_pool(const attn_kernels *kr, const attn_tensor *t, int64_t off, int64_t row_stride,
               int64_t nk, int level, int64_t n, float *dst, float *tmp) {
    const int64_t f = (int64_t)1 << level;
    for (int64_t g = 0; g * f < nk; g++) {
        float *out = dst + g * n;
        const int64_t cnt = pool_count(nk, level, g);
        for (int64_t x = 0; x < n; x++) out[x] = 0.0f;
        for (int64_t r = g * f; r < g * f + cnt; r++) {
            rows_load(kr, t, off + r * row_stride, n, tmp);
            kr->axpy(n, 1.0f, tmp, out);
        }
        for (int64_t x = 0; x < n; x++) out[x] /= (float)cnt;
    }
}

float *scratch_alloc(int threads, size_t floats, size_t *stride_out) {
    size_t stride = (floats + 15) & ~(size_t)15;
    if (stride == 0) stride = 16;
    if (stride > SIZE_MAX / 4 / (size_t)threads) return NULL;
    *stride_out = stride;
    return big_alloc(stride * (size_t)threads * 4);
}

void *big_alloc(size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    /* fresh pages cost a fault each on first touch: the backward's 128 MiB
     * of partial sums took ~70 ms of faults at N = 32768; 2 MiB pages take
     * 1/512 of them */
    const size_t huge = (size_t)2 << 20;
    if (bytes >= 4 * huge && bytes <= SIZE_MAX - huge) {
        size_t rounded = (bytes + huge - 1) & ~(huge - 1);
        void *p = aligned_alloc(huge, rounded);
        if (p) madvise(p, rounded, MADV_HUGEPAGE); /* a hint: failure is harmless */
        return p;
    }
#endif
    return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}

float *scratch_take(scratch *s, size_t n) {
    size_t start = s->used;
    s->used += (n + 15) & ~(size_t)15;
    return s->base ? s->base + start : NULL;
}

int engine_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}
