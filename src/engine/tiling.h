/* Block sizes of the tiled engine: small pure functions of the shape.
 * The numbers that chose them are in docs/BENCHMARKS.md ("tile sizes"). */
#ifndef ATTN_TILING_H
#define ATTN_TILING_H

#include <stdint.h>

/* Forward query block: columns of the logit tile S^T[bk][bq] and rows of the
 * P*V product. 192 = 3 register tiles of 64 columns = 32 tiles of 6 rows, and
 * amortises packing Q^T over every key block. Measured (attn bench, N = M =
 * 4096, H = 8, 2 threads, ms, bk = 96): D = 128: bq 64: 184, 96: 176,
 * 128: 175, 192: 158, 256: 164, 384: 156; D = 64: 128: 82, 192: 81, 256: 86;
 * D = 256 (N = 2048): 64: 94, 128: 87, 192: 82. */
static inline int64_t tiling_fwd_bq(int64_t d, int64_t dv) {
    (void)dv;
    return d > 256 ? 96 : 192;
}

/* Forward key block: rows of S^T, the k of the P*V product. 96 rows = 16
 * register tiles of 6. Measured as above, D = 128, bq = 192: bk 64: 161,
 * 96: 158-162, 128: 159, 192: 158 (flat), D = 64: 48..128 within 2%. */
static inline int64_t tiling_fwd_bk(int64_t d, int64_t dv) {
    (void)d;
    (void)dv;
    return 96;
}

/* Backward blocks (query rows x key rows of the row-major P tile). */
static inline int64_t tiling_bwd_bq(int64_t d) { return d > 256 ? 32 : 64; }
/* A sliding window (windowed): a key block meets window + bk queries of which
 * every query sees at most the window, so a smaller bk wastes less of the
 * edge tiles. Measured (causal window 512, N = 32768, H = 8, Hk = 2, D = 64,
 * 2 threads, ms): bk 32: 335-344, 64: 319-329, 96: 335-348, 128: 334-351. */
static inline int64_t tiling_bwd_bk(int64_t d, int windowed) {
    if (windowed && d <= 256) return 64;
    return d > 256 ? 64 : 128;
}

/* Decode: keys per split (a fixed size, so that results do not depend on the
 * thread count) and keys per inner block. */
static inline int64_t tiling_decode_split(int64_t m) { return m >= (1 << 16) ? 8192 : 2048; }
/* Keys per inner block: the f32 staging of K and V for all kv heads,
 * block * hk * (d + dv) floats, stays within ~512 KiB of L2. */
static inline int64_t tiling_decode_block(int64_t hk, int64_t d, int64_t dv) {
    int64_t blk = (int64_t)(512 * 1024 / 4) / (hk * (d + dv));
    if (blk > 128) blk = 128;
    if (blk < 16) blk = 16;
    return blk;
}

#endif
