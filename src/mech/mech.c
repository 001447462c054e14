/* Helpers of the mechanisms (see mech.h). */
#include "mech.h"

#include <stdlib.h>

float *mech_alloc(int64_t n0, int64_t n1, int64_t n2, int64_t n3) {
    const int64_t dims[4] = {n0, n1, n2, n3};
    int64_t n = 1;
    for (int i = 0; i < 4; i++)
        if (__builtin_mul_overflow(n, dims[i] > 0 ? dims[i] : 1, &n)) return NULL;
    if ((uint64_t)n > SIZE_MAX / sizeof(float)) return NULL;
    return malloc((size_t)n * sizeof(float));
}

static int64_t offset_of(const attn_tensor *t, int64_t i) {
    int64_t off = 0;
    for (int d = t->ndim - 1; d >= 0; d--) {
        off += (i % t->shape[d]) * t->stride[d];
        i /= t->shape[d];
    }
    return off;
}

double mech_at(const attn_tensor *t, int64_t i) { return attn_load_f64(t, offset_of(t, i)); }

void mech_set(attn_tensor *t, int64_t i, double x) { attn_store_f64(t, offset_of(t, i), x); }

int64_t mech_numel(const attn_tensor *t) {
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

attn_tensor mech_view(float *buf, const attn_tensor *t) {
    attn_tensor v = *t;
    v.data = buf;
    v.dtype = ATTN_F32;
    int64_t st = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        v.stride[d] = st;
        st *= t->shape[d];
    }
    return v;
}
