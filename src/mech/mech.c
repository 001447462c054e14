/* Helpers of the mechanisms (see mech.h). */
#include "mech.h"

#include <stdlib.h>
#include <string.h>

float *mech_alloc(int64_t n0, int64_t n1, int64_t n2, int64_t n3) {
    const int64_t dims[4] = {n0, n1, n2, n3};
    int64_t n = 1;
    for (int i = 0; i < 4; i++)
        if (__builtin_mul_overflow(n, dims[i] > 0 ? dims[i] : 1, &n)) return NULL;
    if ((uint64_t)n > SIZE_MAX / sizeof(float)) return NULL;
    return malloc((size_t)n * sizeof(float));
}

/* Element offset of the first element of row r (over all dims but the last). */
static int64_t row_offset(const attn_tensor *t, int64_t r) {
    int64_t off = 0;
    for (int d = t->ndim - 2; d >= 0; d--) {
        off += (r % t->shape[d]) * t->stride[d];
        r /= t->shape[d];
    }
    return off;
}

void mech_dense(const attn_tensor *t, float *dst) {
    const int64_t w = t->shape[t->ndim - 1], ws = t->stride[t->ndim - 1];
    const int64_t rows = w > 0 ? mech_numel(t) / w : 0;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t off = row_offset(t, r);
        float *out = dst + r * w;
        if (t->dtype == ATTN_F32 && ws == 1)
            memcpy(out, (const float *)t->data + off, (size_t)w * sizeof(float));
        else
            for (int64_t e = 0; e < w; e++) out[e] = (float)attn_load_f64(t, off + e * ws);
    }
}

void mech_store_dense(attn_tensor *t, const float *src) {
    const int64_t w = t->shape[t->ndim - 1], ws = t->stride[t->ndim - 1];
    const int64_t rows = w > 0 ? mech_numel(t) / w : 0;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t off = row_offset(t, r);
        const float *in = src + r * w;
        if (t->dtype == ATTN_F32 && ws == 1)
            memcpy((float *)t->data + off, in, (size_t)w * sizeof(float));
        else
            for (int64_t e = 0; e < w; e++) attn_store_f64(t, off + e * ws, in[e]);
    }
}

int64_t mech_numel(const attn_tensor *t) {
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

float *mech_contiguous_f32(const attn_tensor *t) {
    if (t->dtype != ATTN_F32) return NULL;
    int64_t st = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] > 1 && t->stride[d] != st) return NULL;
        st *= t->shape[d];
    }
    return t->data;
}

attn_status mech_check_1d(const char *name, const attn_tensor *t, bool ref, int64_t n) {
    attn_status st = attn_check_tensor(name, t, 1, ref, false);
    return st != ATTN_OK ? st : attn_check_shape(name, t, n, -1, -1, -1);
}

attn_status mech_check_grads(bool ref, int n, attn_tensor *const *grads,
                             const attn_tensor *const *likes, const char *const *names,
                             int required, const attn_tensor *const *all,
                             const char *const *all_names, int n_before) {
    for (int i = 0; i < n; i++) {
        const attn_tensor *l = likes[i];
        if (!grads[i]) {
            if (i < required) return attn_err(ATTN_ERR_NULL, "%s must not be NULL", names[i]);
            continue;
        }
        if (!l) return attn_err(ATTN_ERR_ARG, "%s must be NULL: its input is not given", names[i]);
        attn_status st = attn_check_tensor(names[i], grads[i], l->ndim, ref,
                                           l->ndim > 1 && l->shape[1] == 0);
        if (st == ATTN_OK)
            st = attn_check_shape(names[i], grads[i], l->shape[0], l->ndim > 1 ? l->shape[1] : -1,
                                  l->ndim > 2 ? l->shape[2] : -1, l->ndim > 3 ? l->shape[3] : -1);
        if (st == ATTN_OK) st = attn_check_output(names[i], grads[i], all, all_names, n_before + i);
        if (st != ATTN_OK) return st;
    }
    return ATTN_OK;
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
