/* The diagonal selective scan (Mamba-1) on the CPU, token by token:
 *   h_t[e][n] = e^{Δ_te A_en} h_{t-1}[e][n] + Δ_te B_tn x_te,
 *   y_te = sum_n C_tn h_t[e][n] + Dskip_e x_te.
 * The chunked engine runs this as one head per channel with Dv = 1, where
 * the per-head overhead of every chunk dominates; here the state of a block
 * of channels is one E_B x N tile, its decays one exp2_rows call per token,
 * and the update plain loops across channels and state (vectorised by the
 * compiler). Tasks are (sequence, channel block): results do not depend on
 * the thread count. */
#include <stdlib.h>
#include <string.h>

#include "engine/rows.h"
#include "linear.h"

#define LOG2E 1.4426950408889634f
enum { CH_BLOCK = 64 }; /* channels per task: a 64 x 16 state tile is 4 KiB */

static void scan_block(const attn_kernels *kr, int64_t T, int64_t E, int64_t N, int64_t b,
                       int64_t e0, int64_t ne, const float *x, const float *dl, const float *a,
                       const float *bm, const float *cm, const float *ds, const float *state_in,
                       float *state_out, float *y, float *h, float *g, float *zero) {
    for (int64_t i = 0; i < ne * N; i++) h[i] = state_in ? state_in[(b * E + e0) * N + i] : 0.0f;
    zero[0] = 0.0f;
    for (int64_t t = 0; t < T; t++) {
        const int64_t row = b * T + t;
        const float *restrict xt = x + row * E + e0, *restrict dt = dl + row * E + e0;
        const float *restrict bt = bm + row * N, *restrict ct = cm + row * N;
        for (int64_t e = 0; e < ne; e++)
            for (int64_t n = 0; n < N; n++) g[e * N + n] = dt[e] * a[(e0 + e) * N + n];
        kr->exp2_rows(g, 1, ne * N, ne * N, LOG2E, zero);
        float *restrict yt = y + row * E + e0;
        for (int64_t e = 0; e < ne; e++) {
            float *restrict he = h + e * N;
            const float *restrict ge = g + e * N;
            const float u = dt[e] * xt[e];
            float acc = 0.0f;
            for (int64_t n = 0; n < N; n++) {
                he[n] = ge[n] * he[n] + u * bt[n];
                acc += ct[n] * he[n];
            }
            yt[e] = acc + (ds ? ds[e0 + e] * xt[e] : 0.0f);
        }
    }
    if (state_out) memcpy(state_out + (b * E + e0) * N, h, (size_t)(ne * N) * sizeof(float));
}

attn_status linear_engine_diag_scan(const attn_ctx *ctx, int64_t B, int64_t T, int64_t E,
                                    int64_t N, const float *x, const float *dl, const float *a,
                                    const float *bm, const float *cm, const float *ds,
                                    const float *state_in, float *state_out, float *y) {
    const int threads = ctx->threads;
    const size_t per = (size_t)(2 * CH_BLOCK * N + 16);
    size_t stride;
    float *scr = scratch_alloc(threads, per, &stride);
    if (!scr) return attn_err(ATTN_ERR_NOMEM, "out of memory for the selective scan scratch");
    const int64_t blocks = (E + CH_BLOCK - 1) / CH_BLOCK, n_tasks = B * blocks;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; task++) {
        float *mine = scr + stride * (size_t)engine_thread_id();
        const int64_t b = task / blocks, e0 = (task % blocks) * CH_BLOCK;
        const int64_t ne = e0 + CH_BLOCK <= E ? CH_BLOCK : E - e0;
        scan_block(ctx->kernels, T, E, N, b, e0, ne, x, dl, a, bm, cm, ds, state_in, state_out, y,
                   mine, mine + CH_BLOCK * N, mine + 2 * CH_BLOCK * N);
    }
    free(scr);
    return ATTN_OK;
}
