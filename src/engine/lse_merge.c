/* (O1, L1) ⊕ (O2, L2): the exact attention over the union of two disjoint key
 * sets, from the two partial results. The same arithmetic merges decode's
 * splits (merge_rows), so there is one definition of the merge. */
#include <math.h>
#include <stdlib.h>

#include "engine.h"
#include "lse_merge.h"
#include "rows.h"


void merge_rows(float *o1, float *l1, const float *o2, float l2, int64_t dv) {
    float a = *l1, b = l2;
    if (b == -INFINITY) return; /* nothing to add (also both -inf: o1 stays) */
    if (a == -INFINITY) {
        for (int64_t x = 0; x < dv; x++) o1[x] = o2[x];
        *l1 = b;
        return;
    }
    float mx = a > b ? a : b;
    float ea = expf(a - mx), eb = expf(b - mx);
    float l = mx + logf(ea + eb);
    float wa = expf(a - l), wb = expf(b - l);
    for (int64_t x = 0; x < dv; x++) o1[x] = wa * o1[x] + wb * o2[x];
    *l1 = l;
}

attn_status engine_lse_merge(const attn_ctx *ctx, const attn_tensor *o1,
                             const attn_tensor *lse1, const attn_tensor *o2,
                             const attn_tensor *lse2, attn_tensor *o, attn_tensor *lse) {
    const int64_t B = o1->shape[0], N = o1->shape[1], H = o1->shape[2], dv = o1->shape[3];
    const int threads = ctx->threads;
    size_t stride;
    float *scr = scratch_alloc(threads, (size_t)(2 * dv), &stride);
    if (!scr) return attn_err(ATTN_ERR_NOMEM, "out of memory for merge scratch");
    const int64_t rows = B * N * H;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *a = scr + stride * (size_t)engine_thread_id();
        float *bb = a + dv;
        int64_t b = r / (N * H), i = (r / H) % N, h = r % H;
        rows_load(ctx->kernels, o1, attn_off4(o1, b, i, h, 0), dv, a);
        rows_load(ctx->kernels, o2, attn_off4(o2, b, i, h, 0), dv, bb);
        float l1 = (float)attn_load_f64(lse1, attn_off3(lse1, b, h, i));
        float l2 = (float)attn_load_f64(lse2, attn_off3(lse2, b, h, i));
        if (l1 == -INFINITY && l2 == -INFINITY)
            for (int64_t x = 0; x < dv; x++) a[x] = 0.0f;
        merge_rows(a, &l1, bb, l2, dv);
        rows_store(ctx->kernels, o, attn_off4(o, b, i, h, 0), dv, a);
        attn_store_f64(lse, attn_off3(lse, b, h, i), l1);
    }
    free(scr);
    return ATTN_OK;
}
