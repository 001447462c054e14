/* Token reorderings: permutations of the tokens (gather, scatter) and the
 * window-major and axis-permuted orders of a grid. The window mechanisms
 * that use them are in windows.c, PARO's choice of order in paro.c. */
#include <stdlib.h>
#include <string.h>

#include "mech_run.h"
#include "validate.h"

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

static attn_status check_perm(const int64_t *idx, int64_t t) {
    if (!idx) return attn_err(ATTN_ERR_NULL, "idx must not be NULL");
    uint8_t *seen = calloc((size_t)t + 1, 1);
    if (!seen) return attn_err(ATTN_ERR_NOMEM, "out of memory checking idx");
    attn_status st = ATTN_OK;
    for (int64_t i = 0; i < t && st == ATTN_OK; i++) {
        if (idx[i] < 0 || idx[i] >= t || seen[idx[i]])
            st = attn_err(ATTN_ERR_ARG, "idx must be a permutation of 0..%lld (idx[%lld] = %lld)",
                          (long long)(t - 1), (long long)i, (long long)idx[i]);
        else
            seen[idx[i]] = 1;
    }
    free(seen);
    return st;
}

static attn_status move_tokens(attn_ctx *ctx, const int64_t *idx, const attn_tensor *x,
                               attn_tensor *out, int scatter) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("x", x, 4, ref, false));
    CHECK(attn_check_tensor("out", out, 4, ref, false));
    CHECK(attn_check_shape("out", out, x->shape[0], x->shape[1], x->shape[2], x->shape[3]));
    const attn_tensor *ins[] = {x};
    const char *names[] = {"x"};
    CHECK(attn_check_output("out", out, ins, names, 1));
    CHECK(check_perm(idx, x->shape[1]));
    /* rows of one dtype with unit stride move as bytes; else element by
     * element through double (exact for every dtype) */
    const bool bytes = x->dtype == out->dtype && x->stride[3] == 1 && out->stride[3] == 1;
    const size_t es = attn_dtype_size(x->dtype);
    for (int64_t b = 0; b < x->shape[0]; b++)
        for (int64_t t = 0; t < x->shape[1]; t++) {
            int64_t from = scatter ? t : idx[t], to = scatter ? idx[t] : t;
            for (int64_t h = 0; h < x->shape[2]; h++) {
                const int64_t src = attn_off4(x, b, from, h, 0), dst = attn_off4(out, b, to, h, 0);
                if (bytes) {
                    memcpy((char *)out->data + (size_t)dst * es,
                           (const char *)x->data + (size_t)src * es, (size_t)x->shape[3] * es);
                    continue;
                }
                for (int64_t e = 0; e < x->shape[3]; e++)
                    attn_store_f64(out, dst + e * out->stride[3],
                                   attn_load_f64(x, src + e * x->stride[3]));
            }
        }
    return ATTN_OK;
}

attn_status attn_gather_tokens(attn_ctx *ctx, const int64_t *idx, const attn_tensor *x,
                               attn_tensor *out) {
    return move_tokens(ctx, idx, x, out, 0);
}

attn_status attn_scatter_tokens(attn_ctx *ctx, const int64_t *idx, const attn_tensor *x,
                                attn_tensor *out) {
    return move_tokens(ctx, idx, x, out, 1);
}

attn_status attn_grid_window_index(attn_grid g, attn_grid win, int64_t *idx) {
    attn_clear_error();
    if (!idx) return attn_err(ATTN_ERR_NULL, "idx must not be NULL");
    if (g.f < 1 || g.h < 1 || g.w < 1) return attn_err(ATTN_ERR_ARG, "grid extents must be >= 1");
    if (win.f < 1 || win.h < 1 || win.w < 1 || g.f % win.f || g.h % win.h || g.w % win.w)
        return attn_err(ATTN_ERR_ARG, "win must be >= 1 and divide the grid on each axis");
    int64_t t = 0;
    for (int64_t wf = 0; wf < g.f / win.f; wf++)
        for (int64_t wy = 0; wy < g.h / win.h; wy++)
            for (int64_t wx = 0; wx < g.w / win.w; wx++)
                for (int64_t df = 0; df < win.f; df++)
                    for (int64_t dy = 0; dy < win.h; dy++)
                        for (int64_t dx = 0; dx < win.w; dx++)
                            idx[t++] = ((wf * win.f + df) * g.h + wy * win.h + dy) * g.w + wx * win.w + dx;
    return ATTN_OK;
}

attn_status attn_grid_axis_index(attn_grid g, const int32_t perm[3], int64_t *idx) {
    attn_clear_error();
    if (!idx || !perm) return attn_err(ATTN_ERR_NULL, "perm and idx must not be NULL");
    if (g.f < 1 || g.h < 1 || g.w < 1) return attn_err(ATTN_ERR_ARG, "grid extents must be >= 1");
    int seen = 0;
    for (int a = 0; a < 3; a++) {
        if (perm[a] < 0 || perm[a] > 2 || (seen & (1 << perm[a])))
            return attn_err(ATTN_ERR_ARG, "perm must be a permutation of 0, 1, 2");
        seen |= 1 << perm[a];
    }
    const int64_t ext[3] = {g.f, g.h, g.w};
    int64_t c[3], t = 0;
    for (c[perm[0]] = 0; c[perm[0]] < ext[perm[0]]; c[perm[0]]++)
        for (c[perm[1]] = 0; c[perm[1]] < ext[perm[1]]; c[perm[1]]++)
            for (c[perm[2]] = 0; c[perm[2]] < ext[perm[2]]; c[perm[2]]++)
                idx[t++] = (c[0] * g.h + c[1]) * g.w + c[2];
    return ATTN_OK;
}
