/* Reference LSE merge in double precision:
 *   L = log(e^L1 + e^L2), O = e^(L1 - L) O1 + e^(L2 - L) O2,
 * computed around the larger of L1, L2. A side with L = -inf contributes
 * nothing (even if its O holds NaN); both -inf gives O = 0, L = -inf. A NaN
 * LSE makes the row NaN; +inf on a side gives NaN (inf - inf), as the math does. */
#include "internal.h"

#include <stdint.h>
#include <stdlib.h>

attn_status ref_lse_merge(const attn_tensor *o1, const attn_tensor *lse1,
                          const attn_tensor *o2, const attn_tensor *lse2, attn_tensor *o,
                          attn_tensor *lse) {
    int64_t B = o->shape[0], N = o->shape[1], H = o->shape[2], Dv = o->shape[3];
    /* rows = B*N*H, n = rows*Dv, both checked as counts of doubles. */
    const uint64_t lim = (uint64_t)(SIZE_MAX / sizeof(double));
    const int64_t dims[4] = {B, N, H, Dv};
    uint64_t n = 1, rows = 1;
    for (int i = 0; i < 4; i++) {
        if (dims[i] < 0 || (dims[i] != 0 && n > lim / (uint64_t)dims[i]))
            return attn_err(ATTN_ERR_OVERFLOW, "attn_lse_merge (reference): o size overflows");
        n *= (uint64_t)dims[i];
        if (i == 2) rows = n;
    }
    double *ob = malloc((size_t)(n ? n : 1) * sizeof(double));
    double *lb = malloc((size_t)(rows ? rows : 1) * sizeof(double));
    if (!ob || !lb) {
        free(ob);
        free(lb);
        return attn_err(ATTN_ERR_NOMEM, "attn_lse_merge (reference): out of memory");
    }

    /* ob is [B, N, H, Dv], lb is [B, H, N]. */
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < N; i++)
            for (int64_t h = 0; h < H; h++) {
                double l1 = attn_load_f64(lse1, attn_off3(lse1, b, h, i));
                double l2 = attn_load_f64(lse2, attn_off3(lse2, b, h, i));
                double *orow = ob + ((b * N + i) * H + h) * Dv;
                double *lrow = lb + (b * H + h) * N + i;
                double mx = (l1 > l2 || isnan(l1)) ? l1 : l2;
                if (mx == -INFINITY) { /* both sides empty */
                    for (int64_t x = 0; x < Dv; x++) orow[x] = 0.0;
                    *lrow = -INFINITY;
                    continue;
                }
                double l = mx + log(exp(l1 - mx) + exp(l2 - mx));
                double w1 = exp(l1 - l), w2 = exp(l2 - l);
                for (int64_t x = 0; x < Dv; x++) {
                    double acc = 0.0;
                    if (l1 != -INFINITY) acc += w1 * attn_load_f64(o1, attn_off4(o1, b, i, h, x));
                    if (l2 != -INFINITY) acc += w2 * attn_load_f64(o2, attn_off4(o2, b, i, h, x));
                    orow[x] = acc;
                }
                *lrow = l;
            }

    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < N; i++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t x = 0; x < Dv; x++)
                    attn_store_f64(o, attn_off4(o, b, i, h, x), ob[((b * N + i) * H + h) * Dv + x]);
    if (lse)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t i = 0; i < N; i++)
                    attn_store_f64(lse, attn_off3(lse, b, h, i), lb[(b * H + h) * N + i]);
    free(ob);
    free(lb);
    return ATTN_OK;
}
