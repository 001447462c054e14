/* Argument checks at the API edge (see validate.h). */
#include "validate.h"

#include <string.h>

static bool mul_overflows(int64_t a, int64_t b, int64_t *out) {
    return __builtin_mul_overflow(a, b, out);
}

/* Largest element offset reachable in t (strides >= 0), or -1 on overflow. */
static int64_t max_offset(const attn_tensor *t) {
    int64_t off = 0;
    for (int i = 0; i < t->ndim; i++) {
        int64_t term;
        if (t->shape[i] == 0) return 0;
        if (mul_overflows(t->shape[i] - 1, t->stride[i], &term)) return -1;
        if (__builtin_add_overflow(off, term, &off)) return -1;
    }
    return off;
}

attn_status attn_check_tensor(const char *name, const attn_tensor *t, int ndim,
                              bool allow_f64, bool allow_empty_seq) {
    if (!t) return attn_err(ATTN_ERR_NULL, "%s must not be NULL", name);
    if (!t->data) return attn_err(ATTN_ERR_NULL, "%s->data must not be NULL", name);
    if (attn_dtype_size(t->dtype) == 0)
        return attn_err(ATTN_ERR_DTYPE, "%s->dtype (%d) is not an attn_dtype", name,
                        (int)t->dtype);
    if (t->dtype == ATTN_F64 && !allow_f64)
        return attn_err(ATTN_ERR_DTYPE,
                        "%s->dtype f64 is only accepted by the reference backend", name);
    if (t->ndim != ndim)
        return attn_err(ATTN_ERR_SHAPE, "%s must have %d dims, has %d", name, ndim,
                        (int)t->ndim);
    for (int i = 0; i < ndim; i++) {
        int64_t lo = (allow_empty_seq && i == 1) ? 0 : 1;
        if (t->shape[i] < lo)
            return attn_err(ATTN_ERR_SHAPE, "%s->shape[%d] is %lld; sizes must be >= %lld",
                            name, i, (long long)t->shape[i], (long long)lo);
        if (t->stride[i] < 0)
            return attn_err(ATTN_ERR_ARG, "%s->stride[%d] is %lld; strides must be >= 0",
                            name, i, (long long)t->stride[i]);
    }
    int64_t extent = max_offset(t), bytes;
    if (extent < 0 || __builtin_add_overflow(extent, 1, &extent) ||
        mul_overflows(extent, (int64_t)attn_dtype_size(t->dtype), &bytes) ||
        (uint64_t)bytes > (uint64_t)(SIZE_MAX / 2))
        return attn_err(ATTN_ERR_OVERFLOW, "%s: the byte extent of shape and strides overflows",
                        name);
    int64_t elems = 1;
    for (int i = 0; i < ndim; i++)
        if (mul_overflows(elems, t->shape[i], &elems) ||
            mul_overflows(elems, (int64_t)attn_dtype_size(t->dtype), &bytes))
            return attn_err(ATTN_ERR_OVERFLOW, "%s: the element count overflows", name);
    return ATTN_OK;
}

attn_status attn_check_shape(const char *name, const attn_tensor *t, int64_t d0, int64_t d1,
                             int64_t d2, int64_t d3) {
    const int64_t want[4] = {d0, d1, d2, d3};
    static const char *const dim_names[4] = {"0", "1", "2", "3"};
    for (int i = 0; i < t->ndim && i < 4; i++)
        if (want[i] >= 0 && t->shape[i] != want[i])
            return attn_err(ATTN_ERR_SHAPE, "%s->shape[%s] is %lld, expected %lld", name,
                            dim_names[i], (long long)t->shape[i], (long long)want[i]);
    return ATTN_OK;
}

/* Byte range [lo, hi) covered by t. */
static void byte_range(const attn_tensor *t, uintptr_t *lo, uintptr_t *hi) {
    *lo = (uintptr_t)t->data;
    *hi = *lo + (uintptr_t)((max_offset(t) + 1) * (int64_t)attn_dtype_size(t->dtype));
}

/* No two elements of t share memory: sorting dims by stride, each stride
 * must step over everything the smaller dims cover. */
static bool self_overlaps(const attn_tensor *t) {
    int idx[ATTN_MAX_DIMS];
    int n = 0;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] > 1) idx[n++] = i;
    for (int a = 1; a < n; a++) /* insertion sort by stride */
        for (int b = a; b > 0 && t->stride[idx[b]] < t->stride[idx[b - 1]]; b--) {
            int tmp = idx[b];
            idx[b] = idx[b - 1];
            idx[b - 1] = tmp;
        }
    int64_t covered = 0; /* max offset reachable by the dims so far */
    for (int a = 0; a < n; a++) {
        int64_t s = t->stride[idx[a]];
        if (s <= covered) return true;
        covered += s * (t->shape[idx[a]] - 1);
    }
    return false;
}

attn_status attn_check_output(const char *name, const attn_tensor *out,
                              const attn_tensor *const *others, const char *const *names,
                              int n_others) {
    if (self_overlaps(out))
        return attn_err(ATTN_ERR_ALIAS, "%s: strides make output elements overlap", name);
    uintptr_t lo, hi;
    byte_range(out, &lo, &hi);
    for (int i = 0; i < n_others; i++) {
        if (!others[i] || !others[i]->data) continue;
        uintptr_t olo, ohi;
        byte_range(others[i], &olo, &ohi);
        if (lo < ohi && olo < hi)
            return attn_err(ATTN_ERR_ALIAS, "%s overlaps %s in memory; outputs must not alias",
                            name, names[i]);
    }
    return ATTN_OK;
}

attn_status attn_check_lse(const char *name, const attn_tensor *lse, bool ref, int64_t b,
                           int64_t h, int64_t n) {
    attn_status st = attn_check_tensor(name, lse, 3, ref, true);
    if (st != ATTN_OK) return st;
    if (lse->dtype != ATTN_F32 && lse->dtype != ATTN_F64)
        return attn_err(ATTN_ERR_DTYPE, "%s must be f32", name);
    return attn_check_shape(name, lse, b, h, n, -1);
}

attn_status attn_check_cu(const char *name, const int32_t *cu, int64_t batch,
                          int64_t total) {
    if (cu[0] != 0) return attn_err(ATTN_ERR_ARG, "%s[0] is %d; it must be 0", name, cu[0]);
    for (int64_t b = 0; b < batch; b++)
        if (cu[b + 1] < cu[b])
            return attn_err(ATTN_ERR_ARG, "%s must be non-decreasing; %s[%lld] > %s[%lld]",
                            name, name, (long long)b, name, (long long)(b + 1));
    if (cu[batch] != total)
        return attn_err(ATTN_ERR_SHAPE, "%s[batch] is %d but the tensor holds %lld rows", name,
                        cu[batch], (long long)total);
    return ATTN_OK;
}

attn_status attn_check_params(const attn_params *p, const attn_tensor *q,
                              const attn_tensor *k, const attn_tensor *v,
                              attn_problem *out) {
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (!(p->scale >= 0.0f) || !isfinite(p->scale))
        return attn_err(ATTN_ERR_ARG, "params->scale must be finite and >= 0 (0 = 1/sqrt(D))");
    if (!(p->softcap >= 0.0f) || !isfinite(p->softcap))
        return attn_err(ATTN_ERR_ARG, "params->softcap must be finite and >= 0 (0 = off)");
    if (p->causal != 0 && p->causal != 1)
        return attn_err(ATTN_ERR_ARG, "params->causal must be 0 or 1");
    if (p->window_left < -1 || p->window_right < -1)
        return attn_err(ATTN_ERR_ARG, "params->window_left/right must be >= -1 (-1 = unbounded)");
    if (q->shape[0] != k->shape[0] || v->shape[0] != k->shape[0])
        return attn_err(ATTN_ERR_SHAPE, "q, k and v must have the same batch size (dim 0)");
    if (v->shape[1] != k->shape[1])
        return attn_err(ATTN_ERR_SHAPE, "v->shape[1] (%lld) must equal k->shape[1] (%lld)",
                        (long long)v->shape[1], (long long)k->shape[1]);
    if (v->shape[2] != k->shape[2])
        return attn_err(ATTN_ERR_SHAPE, "v->shape[2] (%lld) must equal k->shape[2] (%lld)",
                        (long long)v->shape[2], (long long)k->shape[2]);
    if (q->shape[3] != k->shape[3])
        return attn_err(ATTN_ERR_SHAPE, "q->shape[3] (%lld) must equal k->shape[3] (%lld)",
                        (long long)q->shape[3], (long long)k->shape[3]);
    if (q->shape[2] % k->shape[2] != 0)
        return attn_err(ATTN_ERR_SHAPE,
                        "kv heads (k->shape[2] = %lld) must divide query heads (q->shape[2] = %lld)",
                        (long long)k->shape[2], (long long)q->shape[2]);
    if (k->dtype != v->dtype)
        return attn_err(ATTN_ERR_DTYPE, "k and v must share a dtype (%s vs %s)",
                        attn_dtype_name(k->dtype), attn_dtype_name(v->dtype));

    memset(out, 0, sizeof *out);
    out->batch = q->shape[0];
    out->n = q->shape[1];
    out->m = k->shape[1];
    out->h = q->shape[2];
    out->hk = k->shape[2];
    out->d = q->shape[3];
    out->dv = v->shape[3];
    out->scale = p->scale > 0.0f ? p->scale : 1.0f / sqrtf((float)out->d);
    out->softcap = p->softcap;
    out->causal = p->causal;
    out->window_left = p->window_left;
    out->window_right = p->window_right;
    out->plan = p->plan;

    if ((p->cu_seqlens_q == NULL) != (p->cu_seqlens_k == NULL))
        return attn_err(ATTN_ERR_ARG, "params->cu_seqlens_q and cu_seqlens_k must be set together");
    if (p->cu_seqlens_q) {
        if (p->plan)
            return attn_err(ATTN_ERR_UNSUPPORTED, "explicit plans with varlen batches are not supported yet");
        if (p->batch < 1)
            return attn_err(ATTN_ERR_ARG, "params->batch must be >= 1 with cu_seqlens");
        if (q->shape[0] != 1)
            return attn_err(ATTN_ERR_SHAPE, "with cu_seqlens, q->shape[0] must be 1 (packed rows)");
        attn_status st = attn_check_cu("params->cu_seqlens_q", p->cu_seqlens_q, p->batch, q->shape[1]);
        if (st == ATTN_OK) st = attn_check_cu("params->cu_seqlens_k", p->cu_seqlens_k, p->batch, k->shape[1]);
        if (st != ATTN_OK) return st;
        out->batch = p->batch;
        out->cu_q = p->cu_seqlens_q;
        out->cu_k = p->cu_seqlens_k;
    } else if (q->shape[1] < 1 || k->shape[1] < 1) {
        return attn_err(ATTN_ERR_SHAPE, "q->shape[1] and k->shape[1] must be >= 1");
    }

    if (p->plan) {
        const attn_plan *pl = p->plan;
        if (pl->n != out->n || pl->m != out->m)
            return attn_err(ATTN_ERR_SHAPE, "params->plan is for n=%lld, m=%lld but the call has n=%lld, m=%lld",
                            (long long)pl->n, (long long)pl->m, (long long)out->n, (long long)out->m);
        if (pl->heads != 1 && pl->heads != out->h && pl->heads != out->hk)
            return attn_err(ATTN_ERR_SHAPE, "params->plan has %lld heads; it must have 1, H or Hk",
                            (long long)pl->heads);
    }
    return ATTN_OK;
}
