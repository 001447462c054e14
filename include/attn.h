/* libattn: efficient attention for transformer models.
 *
 * One header, C11. Every function returns an attn_status; on failure
 * attn_last_error() gives a sentence (thread-local) naming the argument and
 * the rule it broke. The library never aborts, exits or prints, and a call
 * either writes its whole output or leaves it untouched.
 *
 * Shapes use these names:
 *   B batch, N query length, M key length, H query heads, Hk key/value heads
 *   (Hk divides H), D query/key head dim, Dv value head dim.
 * Default layout is [B, seq, heads, dim]; any element strides work.
 * LSE (row log-sum-exp, natural log) is f32 [B, H, N].
 */
#ifndef ATTN_H
#define ATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ATTN_VERSION_MAJOR 0
#define ATTN_VERSION_MINOR 1
#define ATTN_VERSION_PATCH 0
#define ATTN_VERSION_NUMBER \
    (ATTN_VERSION_MAJOR * 10000 + ATTN_VERSION_MINOR * 100 + ATTN_VERSION_PATCH)

#if defined(_WIN32) && defined(ATTN_BUILD_SHARED)
#define ATTN_API __declspec(dllexport)
#elif defined(__GNUC__)
#define ATTN_API __attribute__((visibility("default")))
#else
#define ATTN_API
#endif

/* ---------------------------------------------------------------- status */

/* Numeric values are stable across releases. */
#define ATTN_STATUS_LIST(X)                                                  \
    X(ATTN_OK, 0, "success")                                                 \
    X(ATTN_ERR_NULL, 1, "a required pointer is null")                        \
    X(ATTN_ERR_SHAPE, 2, "tensor shapes do not match")                       \
    X(ATTN_ERR_DTYPE, 3, "unsupported or mismatched dtype")                  \
    X(ATTN_ERR_ARG, 4, "an argument has an invalid value")                   \
    X(ATTN_ERR_OVERFLOW, 5, "a size overflows")                              \
    X(ATTN_ERR_ALIAS, 6, "an output overlaps an input")                      \
    X(ATTN_ERR_NOMEM, 7, "out of memory")                                    \
    X(ATTN_ERR_UNSUPPORTED, 8, "not supported by this backend or machine")   \
    X(ATTN_ERR_INTERNAL, 9, "internal error")

typedef enum attn_status {
#define ATTN_STATUS_ENUM_(name, value, text) name = value,
    ATTN_STATUS_LIST(ATTN_STATUS_ENUM_)
#undef ATTN_STATUS_ENUM_
} attn_status;

/* Short fixed description of a status code ("unknown status" if invalid). */
ATTN_API const char *attn_status_str(attn_status s);
/* The last error of this thread as a full sentence; "" after success. */
ATTN_API const char *attn_last_error(void);

/* ---------------------------------------------------------------- version */

ATTN_API const char *attn_version(void);  /* "0.1.0" */
ATTN_API int attn_version_number(void);   /* ATTN_VERSION_NUMBER */

/* ---------------------------------------------------------------- tensors */

typedef enum attn_dtype {
    ATTN_F32 = 0,
    ATTN_F16 = 1,  /* IEEE binary16, stored as uint16_t */
    ATTN_BF16 = 2, /* bfloat16, stored as uint16_t */
    ATTN_F64 = 3   /* reference backend only (tests, oracles) */
} attn_dtype;

#define ATTN_MAX_DIMS 4

/* A strided view; nothing is owned. Strides are in elements, >= 0
 * (0 broadcasts an input; outputs need strides that never overlap).
 * Any strides work; the fast paths read the last dim (head dim) contiguously,
 * so a view with stride[3] != 1 is gathered element by element (slower, not
 * an error). */
typedef struct attn_tensor {
    void *data;
    attn_dtype dtype;
    int32_t ndim;
    int64_t shape[ATTN_MAX_DIMS];
    int64_t stride[ATTN_MAX_DIMS];
} attn_tensor;

/* Contiguous row-major views. */
ATTN_API attn_tensor attn_tensor_3d(void *data, attn_dtype dt, int64_t d0, int64_t d1,
                                    int64_t d2);
ATTN_API attn_tensor attn_tensor_4d(void *data, attn_dtype dt, int64_t d0, int64_t d1,
                                    int64_t d2, int64_t d3);
ATTN_API size_t attn_dtype_size(attn_dtype dt); /* 0 for an invalid dtype */
ATTN_API const char *attn_dtype_name(attn_dtype dt);

/* Scalar conversions (round to nearest even; NaN stays NaN). */
ATTN_API float attn_f16_to_f32(uint16_t h);
ATTN_API uint16_t attn_f32_to_f16(float f);
ATTN_API float attn_bf16_to_f32(uint16_t h);
ATTN_API uint16_t attn_f32_to_bf16(float f);

/* ---------------------------------------------------------------- context */

typedef enum attn_backend {
    ATTN_BACKEND_AUTO = 0, /* ATTN_BACKEND env var, else cpu */
    ATTN_BACKEND_CPU = 1,  /* tiled engine with SIMD micro-kernels */
    ATTN_BACKEND_REF = 2   /* double-precision reference (slow, exact) */
} attn_backend;

typedef enum attn_isa {
    ATTN_ISA_AUTO = 0, /* ATTN_ISA env var, else the best the CPU and OS support */
    ATTN_ISA_SCALAR = 1,
    ATTN_ISA_AVX2 = 2,   /* AVX2 + FMA + F16C */
    ATTN_ISA_AVX512 = 3, /* AVX-512 F/BW/VL/DQ */
    ATTN_ISA_NEON = 4
} attn_isa;

typedef struct attn_ctx_options {
    int32_t threads;     /* 0: ATTN_NUM_THREADS env var, else all cores */
    attn_backend backend;
    attn_isa isa;        /* asking for an ISA this machine lacks is an error */
    uint64_t seed;       /* for mechanisms that draw random numbers */
} attn_ctx_options;

typedef struct attn_ctx attn_ctx;

ATTN_API attn_ctx_options attn_ctx_options_default(void);
/* opt may be NULL (defaults). */
ATTN_API attn_status attn_ctx_create(attn_ctx **out, const attn_ctx_options *opt);
ATTN_API void attn_ctx_free(attn_ctx *ctx); /* NULL is a no-op */
ATTN_API int attn_ctx_threads(const attn_ctx *ctx);
ATTN_API attn_backend attn_ctx_backend(const attn_ctx *ctx);
ATTN_API attn_isa attn_ctx_isa(const attn_ctx *ctx);
ATTN_API const char *attn_isa_name(attn_isa isa);
ATTN_API const char *attn_backend_name(attn_backend b);
/* Best ISA that this CPU and OS support (cpuid + xgetbv). */
ATTN_API attn_isa attn_isa_detected(void);

/* ---------------------------------------------------------------- plans */

/* A plan lists, for each query block, the key blocks the engine visits.
 * Dense, causal and sliding-window plans are implicit (params, plan = NULL).
 * Explicit plans are built once and reused across calls and layers. */

typedef enum attn_block_mask {
    ATTN_BLOCK_FULL = 0,  /* every key of the block is visible */
    ATTN_BLOCK_PARAMS = 1 /* causal/window rule of the params applied per element */
} attn_block_mask;

/* Level l > 0 visits the block pooled by 2^l: each group of 2^l consecutive
 * keys (clipped to the block and the sequence) becomes one key whose K and V
 * are the group means and whose logit gets + ln(group size), so that it
 * weighs as the keys it stands for (Pyramid Sparse Attention). Pooled entries
 * take mask ATTN_BLOCK_FULL; 2^level <= block_k. */
typedef struct attn_plan_entry {
    int32_t key_block; /* index of the key block, ascending within a query block */
    uint8_t level;     /* pyramid level: 0 = full resolution, l = pooled by 2^l */
    uint8_t mask;      /* attn_block_mask */
    uint16_t reserved; /* 0 */
} attn_plan_entry;

typedef struct attn_plan attn_plan;

/* n, m: query and key lengths; block_q, block_k: block sizes (1..512);
 * heads: 1 (shared by all heads) or the number of query heads H, or Hk
 *   (shared by a GQA group);
 * row_offsets: int64 [heads * ceil(n/block_q) + 1], CSR offsets into entries;
 * entries: [row_offsets[last]]. The plan copies what it needs. */
ATTN_API attn_status attn_plan_create(attn_plan **out, int64_t n, int64_t m,
                                      int64_t block_q, int64_t block_k, int64_t heads,
                                      const int64_t *row_offsets,
                                      const attn_plan_entry *entries);
ATTN_API void attn_plan_free(attn_plan *plan); /* NULL is a no-op */
/* Fraction of the N×M logits that the plan computes (0..1); a pooled block
 * counts 1/2^level of its logits. */
ATTN_API double attn_plan_density(const attn_plan *plan);

/* ---------------------------------------------------------------- planners
 * Planners turn a rule or the inputs into a plan; they never compute
 * attention. Every listed block takes mask ATTN_BLOCK_PARAMS at level 0, so
 * the call's causal/window rule still applies inside it. */

/* From a block mask: mask uint8 [heads][ceil(n/block_q)][ceil(m/block_k)],
 * nonzero = visit the block. */
ATTN_API attn_status attn_plan_from_block_mask(attn_plan **out, int64_t n, int64_t m,
                                               int64_t block_q, int64_t block_k,
                                               int64_t heads, const uint8_t *mask);

/* Static patterns at block granularity (heads = 1): a band of `local` key
 * blocks ending at the query block's diagonal (bottom-right aligned), plus
 * every `stride`-th key block before it (dilated/strided; stride 0: none),
 * plus the key blocks of the first `global` tokens, which the query blocks
 * holding those tokens see in full (global tokens; 0: none). */
ATTN_API attn_status attn_plan_static(attn_plan **out, int64_t n, int64_t m, int64_t block_q,
                                      int64_t block_k, int64_t local, int64_t stride,
                                      int64_t global);

/* Dynamic block selection from mean-pooled Q and K blocks (Video-BLADE,
 * AdaSpa): per query head and query block, the block scores
 * s = scale * mean(q_blk) . mean(k_blk) + ln(keys in block) give an estimated
 * probability mass per key block; keep the `top_k` best key blocks (top_k > 0)
 * or the fewest whose mass reaches `mass` (0 < mass <= 1, top_k = 0). The
 * diagonal block and the first block are always kept when keep_diagonal /
 * keep_first. q [B, N, H, D], k [B, M, Hk, D] (batch 0 is used: plans are per
 * head, shared across the batch); the plan has H heads. */
typedef struct attn_select_opts {
    int64_t block_q, block_k;
    int64_t top_k;
    float mass;
    int32_t keep_diagonal, keep_first;
    int32_t causal;      /* only blocks with some visible key (bottom-right) */
    /* AdaSpa's precise search: the exact row LSE f32 [1, H, N] of one dense
     * pass (attn_forward), or NULL. With it, a block's mass is estimated per
     * query as sum_i exp(scale q_i . mean(k_blk) + ln(keys) - lse_i) / rows,
     * calibrated against the true normaliser, and `mass` keeps blocks until
     * that absolute mass is reached (fewer blocks where attention is sharp). */
    const attn_tensor *lse;
} attn_select_opts;

ATTN_API attn_status attn_plan_select(attn_ctx *ctx, attn_plan **out, const attn_tensor *q,
                                      const attn_tensor *k, const attn_select_opts *opt);

/* Pyramid Sparse Attention level assignment: key blocks ranked by the same
 * pooled scores; the best fraction quota[0] of each query block's key blocks
 * at level 0, the next quota[1] at level 1, ..., up to `levels` quotas;
 * the rest skipped. The diagonal block stays at level 0 when keep_diagonal.
 * A level-l block costs 1/2^l of a full one: attn_plan_density tells the
 * budget spent. */
ATTN_API attn_status attn_plan_psa(attn_ctx *ctx, attn_plan **out, const attn_tensor *q,
                                   const attn_tensor *k, const attn_select_opts *opt,
                                   int32_t levels, const float *quota);

/* PSA levels by thresholds: the ranked key blocks of each query block take
 * level 0 until their estimated mass (as attn_plan_select's mass, calibrated
 * by opt->lse when given) reaches threshold[0], level 1 until threshold[1],
 * ...; the rest are skipped. Thresholds ascend in (0, 1]. */
ATTN_API attn_status attn_plan_psa_thresholds(attn_ctx *ctx, attn_plan **out,
                                              const attn_tensor *q, const attn_tensor *k,
                                              const attn_select_opts *opt, int32_t levels,
                                              const float *threshold);


/* ---------------------------------------------------------------- params */

typedef struct attn_params {
    float scale;         /* logit scale; 0 means 1/sqrt(D) */
    float softcap;       /* > 0: logit s becomes softcap * tanh(s / softcap); 0 off */
    int32_t causal;      /* key j visible to query i iff j <= i + (M - N):
                            the diagonal is aligned bottom-right when N != M */
    int64_t window_left; /* -1 unbounded; else j >= i + (M - N) - window_left */
    int64_t window_right;/* -1 unbounded; else j <= i + (M - N) + window_right */
    /* Variable-length batch (packed, no padding): when cu_seqlens_q is set,
     * q/o are [1, total_q, H, *], k/v [1, total_k, Hk, *], lse [1, H, total_q],
     * and sequence b holds rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1. */
    int64_t batch;                 /* number of sequences (varlen only) */
    const int32_t *cu_seqlens_q;   /* int32 [batch + 1], non-decreasing, from 0 */
    const int32_t *cu_seqlens_k;   /* int32 [batch + 1] */
    const attn_plan *plan;         /* NULL: implicit dense/causal/window plan */
} attn_params;

/* scale 0, no softcap, not causal, windows -1, no varlen, no plan. */
ATTN_API attn_params attn_params_default(void);

/* ---------------------------------------------------------------- ops */

/* Exact softmax attention, forward.
 *   q   [B, N, H, D]      f32 | f16 | bf16
 *   k   [B, M, Hk, D]     f32 | f16 | bf16 (k and v share a dtype)
 *   v   [B, M, Hk, Dv]
 *   o   [B, N, H, Dv]     output, f32 | f16 | bf16
 *   lse [B, H, N] f32     output, may be NULL
 * A row that sees no key gets O = 0 and LSE = -inf. NaN or Inf in an input
 * make the rows whose logits they reach non-finite; other rows are exact. */
ATTN_API attn_status attn_forward(attn_ctx *ctx, const attn_params *p,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, attn_tensor *o,
                                  attn_tensor *lse);

/* Backward of attn_forward with the same params. P is recomputed from lse.
 *   o, dout [B, N, H, Dv]; lse [B, H, N] f32 from attn_forward;
 *   dq [B, N, H, D], dk [B, M, Hk, D], dv [B, M, Hk, Dv]: outputs. */
ATTN_API attn_status attn_backward(attn_ctx *ctx, const attn_params *p,
                                   const attn_tensor *q, const attn_tensor *k,
                                   const attn_tensor *v, const attn_tensor *o,
                                   const attn_tensor *lse, const attn_tensor *dout,
                                   attn_tensor *dq, attn_tensor *dk, attn_tensor *dv);

#define ATTN_DECODE_MAX_QUERIES 16

/* KV-cache decode: 1..16 new queries per sequence against a long cache,
 * split across threads by key ranges and merged by LSE.
 *   q   [B, Nq, H, D]; Nq <= ATTN_DECODE_MAX_QUERIES
 *   k   [B, Mcap, Hk, D], v [B, Mcap, Hk, Dv]: the cache
 *   cache_lens int32 [B] or NULL (all Mcap): keys 0..cache_lens[b]-1 are live;
 *     the new queries are the last Nq positions (causal aligns bottom-right)
 *   o [B, Nq, H, Dv]; lse [B, H, Nq] f32 or NULL.
 * p may set scale, softcap, causal and windows; varlen and plans are
 * not used by decode. */
ATTN_API attn_status attn_decode(attn_ctx *ctx, const attn_params *p,
                                 const attn_tensor *q, const attn_tensor *k,
                                 const attn_tensor *v, const int32_t *cache_lens,
                                 attn_tensor *o, attn_tensor *lse);

/* LSE merge: (O1, L1) ⊕ (O2, L2) = attention over the union of two disjoint
 * key sets. o1, o2, o [B, N, H, Dv]; lse1, lse2, lse [B, H, N] f32.
 * A side with LSE = -inf contributes nothing; both -inf gives O = 0. */
ATTN_API attn_status attn_lse_merge(attn_ctx *ctx, const attn_tensor *o1,
                                    const attn_tensor *lse1, const attn_tensor *o2,
                                    const attn_tensor *lse2, attn_tensor *o,
                                    attn_tensor *lse);

/* ---------------------------------------------------------------- NSA
 * Native Sparse Attention: three causal branches per query (bottom-right
 * aligned), mixed by gates given per head and token:
 *   compressed: attention to compressed keys kc[t], vc[t] that stand for the
 *     keys [t * cmp_stride, t * cmp_stride + cmp_block); query i sees them once
 *     the whole span is in its past;
 *   selected: attention to sel_count key blocks of sel_block keys, chosen per
 *     query block and GQA group from the compressed branch's probabilities
 *     (attn_nsa_select), the causal rule applied inside;
 *   window: the last `window` keys.
 *   o = g[..., 0] o_cmp + g[..., 1] o_sel + g[..., 2] o_win.
 * The compressed K/V come from attn_nsa_compress (block means) or from the
 * caller's own compression. */
typedef struct attn_nsa_opts {
    int64_t cmp_block, cmp_stride; /* l, s: s <= l */
    int64_t sel_block, sel_count;  /* l' (1..512), n: blocks per query block */
    int64_t query_block;           /* queries sharing one selection (1..512) */
    int64_t window;                /* w >= 1 */
} attn_nsa_opts;

/* Compressed keys and values: kc[t] = mean of k[t s .. t s + l - 1] (likewise
 * vc), for t in 0 .. (M - l) / s. k [B, M, Hk, D], v [B, M, Hk, Dv];
 * kc [B, Mc, Hk, D], vc [B, Mc, Hk, Dv] with Mc = (M - l) / s + 1 (M >= l). */
ATTN_API attn_status attn_nsa_compress(attn_ctx *ctx, const attn_nsa_opts *opt,
                                       const attn_tensor *k, const attn_tensor *v,
                                       attn_tensor *kc, attn_tensor *vc);

/* The selection plan: per query block and kv head, block u scored by the
 * compressed-branch probabilities of the block's queries (all heads of the
 * group) over the compressed keys overlapping it; the first block and the
 * block on the diagonal always kept; sel_count blocks in all. */
ATTN_API attn_status attn_nsa_select(attn_ctx *ctx, const attn_params *p,
                                     const attn_nsa_opts *opt, const attn_tensor *q,
                                     const attn_tensor *kc, int64_t m, attn_plan **out);

/* Forward. q [B, N, H, D], k/v [B, M, Hk, *], kc/vc compressed, sel from
 * attn_nsa_select, gates f32 [B, N, H, 3], o [B, N, H, Dv];
 * saved_o f32 [3 B, N, H, Dv] and saved_lse f32 [3 B, H, N]: each branch's
 * output and LSE (branch-major), for the backward; both NULL or both set.
 * p sets scale and softcap (causal is implied). Without saved branches and
 * with an f32 o, the CPU adds each branch into o as it finishes (no buffer
 * per branch: the faster way for inference); on ATTN_ERR_NOMEM o is then
 * unspecified. */
ATTN_API attn_status attn_nsa_forward(attn_ctx *ctx, const attn_params *p,
                                      const attn_nsa_opts *opt, const attn_tensor *q,
                                      const attn_tensor *k, const attn_tensor *v,
                                      const attn_tensor *kc, const attn_tensor *vc,
                                      const attn_plan *sel, const attn_tensor *gates,
                                      attn_tensor *o, attn_tensor *saved_o,
                                      attn_tensor *saved_lse);

/* Selection and forward in one call, as attn_nsa_select then
 * attn_nsa_forward would give (the same plan; the same output within f32
 * rounding), with the compressed branch computed once: one pass over its
 * logits gives the branch and the selection's scores. The plan is
 * returned in *sel_out for the backward (free it with attn_plan_free), or
 * freed when sel_out is NULL; on error *sel_out is NULL. */
ATTN_API attn_status attn_nsa_attention(attn_ctx *ctx, const attn_params *p,
                                        const attn_nsa_opts *opt, const attn_tensor *q,
                                        const attn_tensor *k, const attn_tensor *v,
                                        const attn_tensor *kc, const attn_tensor *vc,
                                        const attn_tensor *gates, attn_tensor *o,
                                        attn_tensor *saved_o, attn_tensor *saved_lse,
                                        attn_plan **sel_out);

/* Backward: dq, dk, dv, dkc, dvc (gradients of kc/vc; attn_nsa_compress_backward
 * carries them to k/v for mean compression), dgates f32 [B, N, H, 3]. */
ATTN_API attn_status attn_nsa_backward(attn_ctx *ctx, const attn_params *p,
                                       const attn_nsa_opts *opt, const attn_tensor *q,
                                       const attn_tensor *k, const attn_tensor *v,
                                       const attn_tensor *kc, const attn_tensor *vc,
                                       const attn_plan *sel, const attn_tensor *gates,
                                       const attn_tensor *saved_o,
                                       const attn_tensor *saved_lse,
                                       const attn_tensor *dout, attn_tensor *dq,
                                       attn_tensor *dk, attn_tensor *dv, attn_tensor *dkc,
                                       attn_tensor *dvc, attn_tensor *dgates);

/* dk += dkc spread back over the compressed spans (each key gets 1/l of every
 * block that holds it), likewise dv; dk, dv f32 [B, M, Hk, *]. */
ATTN_API attn_status attn_nsa_compress_backward(attn_ctx *ctx, const attn_nsa_opts *opt,
                                                const attn_tensor *dkc,
                                                const attn_tensor *dvc, attn_tensor *dk,
                                                attn_tensor *dv);

/* ---------------------------------------------------------------- token grids
 * Tokens of an image or video laid out row-major on a grid F x H x W (F = 1
 * for images): token (f, y, x) is row (f H + y) W + x of dim 1. */
typedef struct attn_grid {
    int64_t f, h, w;     /* grid extents, >= 1 */
} attn_grid;

/* Average pooling of a token grid by ratio (rf, rh, rw) (each divides its
 * extent): x [B, F H W, heads, D] -> out [B, (F/rf)(H/rh)(W/rw), heads, D]. */
ATTN_API attn_status attn_grid_pool(attn_ctx *ctx, attn_grid grid, attn_grid ratio,
                                    const attn_tensor *x, attn_tensor *out);
/* Its adjoint: dx += each pooled gradient / (rf rh rw) over its patch. */
ATTN_API attn_status attn_grid_pool_backward(attn_ctx *ctx, attn_grid grid, attn_grid ratio,
                                             const attn_tensor *dout, attn_tensor *dx);

/* Spatial-reduction attention (PVT, Next-ViT, S2AFormer): keys and values
 * average-pooled on the grid by `ratio`, then attention from every query.
 * q [B, N, H, D] (any N: cross works), k/v [B, F H W, Hk, *], o [B, N, H, Dv],
 * lse [B, H, N] or NULL. p: scale, softcap (no mask: tokens are spatial). */
ATTN_API attn_status attn_sra_forward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                      attn_grid ratio, const attn_tensor *q,
                                      const attn_tensor *k, const attn_tensor *v,
                                      attn_tensor *o, attn_tensor *lse);
/* Backward (lse from the forward is required): dq, dk, dv. */
ATTN_API attn_status attn_sra_backward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                       attn_grid ratio, const attn_tensor *q,
                                       const attn_tensor *k, const attn_tensor *v,
                                       const attn_tensor *o, const attn_tensor *lse,
                                       const attn_tensor *dout, attn_tensor *dq,
                                       attn_tensor *dk, attn_tensor *dv);

/* CrossLMM's pooled cross-attention: queries average-pooled on their grid by
 * `ratio` attend to the full token set. q [B, F H W, H, D], k/v [B, M, Hk, *],
 * o [B, (F/rf)(H/rh)(W/rw), H, Dv], lse [B, H, pooled] or NULL. */
ATTN_API attn_status attn_pooled_cross_forward(attn_ctx *ctx, const attn_params *p,
                                               attn_grid grid, attn_grid ratio,
                                               const attn_tensor *q, const attn_tensor *k,
                                               const attn_tensor *v, attn_tensor *o,
                                               attn_tensor *lse);
/* Backward (lse from the forward is required): o, dout [B, pooled, H, Dv];
 * dq like q (each pooled query's gradient spread over its patch, 1 / (rf rh
 * rw) per token; dq is overwritten, not added to), dk, dv like k, v. */
ATTN_API attn_status attn_pooled_cross_backward(attn_ctx *ctx, const attn_params *p,
                                                attn_grid grid, attn_grid ratio,
                                                const attn_tensor *q, const attn_tensor *k,
                                                const attn_tensor *v, const attn_tensor *o,
                                                const attn_tensor *lse,
                                                const attn_tensor *dout, attn_tensor *dq,
                                                attn_tensor *dk, attn_tensor *dv);

/* 2-D / 3-D neighbourhood attention (CLEAR): self-attention on a token grid
 * where query (f, y, x) sees the keys within `radius` on every axis
 * (|f - f'| <= radius.f, ...; radius.f = 0 for images). The blocks that hold
 * visible pairs form a plan (attn_plan_neighborhood, block sizes bq x bk);
 * the rule is applied exactly inside them. q, k, v [B, F H W, H | Hk, *],
 * o [B, F H W, H, Dv], lse [B, H, F H W] or NULL; p: scale and softcap. */
ATTN_API attn_status attn_plan_neighborhood(attn_grid grid, attn_grid radius, int64_t block_q,
                                            int64_t block_k, attn_plan **out);
ATTN_API attn_status attn_neighborhood_forward(attn_ctx *ctx, const attn_params *p,
                                               attn_grid grid, attn_grid radius,
                                               const attn_plan *plan, const attn_tensor *q,
                                               const attn_tensor *k, const attn_tensor *v,
                                               attn_tensor *o, attn_tensor *lse);
ATTN_API attn_status attn_neighborhood_backward(attn_ctx *ctx, const attn_params *p,
                                                attn_grid grid, attn_grid radius,
                                                const attn_plan *plan, const attn_tensor *q,
                                                const attn_tensor *k, const attn_tensor *v,
                                                const attn_tensor *o, const attn_tensor *lse,
                                                const attn_tensor *dout, attn_tensor *dq,
                                                attn_tensor *dk, attn_tensor *dv);

/* Token reorderings (PAROAttention, window attention, grouping): a
 * permutation idx int64 [T] of the tokens; gather: out[:, t] = x[:, idx[t]];
 * scatter: out[:, idx[t]] = x[:, t] (the inverse). x, out [B, T, heads, D]. */
ATTN_API attn_status attn_gather_tokens(attn_ctx *ctx, const int64_t *idx,
                                        const attn_tensor *x, attn_tensor *out);
ATTN_API attn_status attn_scatter_tokens(attn_ctx *ctx, const int64_t *idx,
                                         const attn_tensor *x, attn_tensor *out);
/* Window-major order of a grid cut into non-overlapping windows `win` (each
 * divides its extent): the tokens of window 0 (row-major inside), then of
 * window 1, ...; idx [F H W]. */
ATTN_API attn_status attn_grid_window_index(attn_grid grid, attn_grid win, int64_t *idx);
/* The grid read with its axes in the order perm (a permutation of 0 = f,
 * 1 = h, 2 = w; e.g. {1, 2, 0}: h, w, f as PARO does): idx [F H W]. */
ATTN_API attn_status attn_grid_axis_index(attn_grid grid, const int32_t perm[3], int64_t *idx);

/* PAROAttention's choice of token order per head: for each of the six axis
 * orders, `samples` query rows (evenly spaced) of the reordered sequence get
 * their exact attention over all keys; the order whose rows put the most mass
 * into their best `keep` key blocks of `block` tokens wins (attention made
 * block-shaped, ready for a block-sparse plan). q, k [1, F H W, H | Hk, D]
 * self-attention on the grid; perm_out int32 [H][3]. */
ATTN_API attn_status attn_paro_choose(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                      const attn_tensor *q, const attn_tensor *k,
                                      int64_t block, int64_t keep, int64_t samples,
                                      int32_t *perm_out);

/* HiLo attention (LITv2), self-attention on an H x W (x F) grid, H == Hk:
 * the first H - lo_heads heads (Hi) attend within non-overlapping windows
 * `win`; the last lo_heads heads (Lo) attend from every query to keys and
 * values average-pooled by `win`. q, k, v [B, F H W, H, *], o [B, F H W, H, Dv],
 * lse [B, H, F H W] or NULL: each head's LSE in the grid's token order (Hi
 * heads: over their window; Lo heads: over the pooled keys).
 * p: scale and softcap. */
ATTN_API attn_status attn_hilo_forward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                       attn_grid win, int64_t lo_heads, const attn_tensor *q,
                                       const attn_tensor *k, const attn_tensor *v,
                                       attn_tensor *o, attn_tensor *lse);
/* Backward (the same p, grid, win and lo_heads; o and lse from the forward
 * are required): dq, dk, dv shaped like q, k, v. */
ATTN_API attn_status attn_hilo_backward(attn_ctx *ctx, const attn_params *p, attn_grid grid,
                                        attn_grid win, int64_t lo_heads, const attn_tensor *q,
                                        const attn_tensor *k, const attn_tensor *v,
                                        const attn_tensor *o, const attn_tensor *lse,
                                        const attn_tensor *dout, attn_tensor *dq,
                                        attn_tensor *dk, attn_tensor *dv);

/* Global Context ViT's attention on an H x W (x F) grid cut into windows
 * `win`: o_local, each token attends to the keys of its own window; o_global,
 * the same windows but queried by global query tokens shared across windows
 * (q_global [B, wtok, H, D], wtok = win.f win.h win.w: row r queries position
 * r of every window). q, k, v [B, F H W, H, *] (H == Hk), o_local and
 * o_global [B, F H W, H, Dv]; lse_local, lse_global [B, H, F H W] or NULL
 * (in the grid's token order). p: scale and softcap. */
ATTN_API attn_status attn_global_context_forward(attn_ctx *ctx, const attn_params *p,
                                                 attn_grid grid, attn_grid win,
                                                 const attn_tensor *q,
                                                 const attn_tensor *q_global,
                                                 const attn_tensor *k, const attn_tensor *v,
                                                 attn_tensor *o_local, attn_tensor *o_global,
                                                 attn_tensor *lse_local,
                                                 attn_tensor *lse_global);
/* Backward (both outputs and LSEs from the forward are required; dout_local,
 * dout_global [B, F H W, H, Dv]): dq, dk, dv shaped like q, k, v (dk, dv
 * summed over both branches), dq_global [B, wtok, H, D] summed over the
 * windows in window order (the same for any thread count). */
ATTN_API attn_status attn_global_context_backward(
    attn_ctx *ctx, const attn_params *p, attn_grid grid, attn_grid win, const attn_tensor *q,
    const attn_tensor *q_global, const attn_tensor *k, const attn_tensor *v,
    const attn_tensor *o_local, const attn_tensor *o_global, const attn_tensor *lse_local,
    const attn_tensor *lse_global, const attn_tensor *dout_local, const attn_tensor *dout_global,
    attn_tensor *dq, attn_tensor *dq_global, attn_tensor *dk, attn_tensor *dv);

/* SpAtten's cascade pruning.
 * attn_token_importance: importance[b][j] += sum over query heads and rows i
 *   of the attention probability P[i][j] of the call (p's causal/window rule;
 *   lse from attn_forward of the same inputs). Accumulates across heads and
 *   calls (layers): importance f64 [B, M], zero it before the first layer.
 * attn_top_tokens: the `keep` most important tokens of sequence b, ascending
 *   (idx int64 [keep]): gather them with attn_select_tokens, and pass the kept
 *   positions on so that later layers prune from what is left (the cascade).
 * attn_select_tokens: out[:, t] = x[:, idx[t]] for t < keep (a subset).
 * attn_head_importance: out f64 [B, H] = the L2 norm of each head's output o
 *   [B, N, H, Dv]; prune the heads with the smallest. */
ATTN_API attn_status attn_token_importance(attn_ctx *ctx, const attn_params *p,
                                           const attn_tensor *q, const attn_tensor *k,
                                           const attn_tensor *lse, double *importance);
ATTN_API attn_status attn_top_tokens(const double *importance, int64_t m, int64_t keep,
                                     int64_t *idx);
ATTN_API attn_status attn_select_tokens(attn_ctx *ctx, const int64_t *idx, int64_t keep,
                                        const attn_tensor *x, attn_tensor *out);
ATTN_API attn_status attn_head_importance(attn_ctx *ctx, const attn_tensor *o, double *out);

/* CATANet's content-aware token aggregation, one sequence:
 *   each token t joins the group of its nearest centre (L2 between feats[t]
 *   and centres[g]; ties to the lower g);
 *   o_intra: attention among the tokens of the token's own group;
 *   o_inter: cross-attention from every token to the G group means of k and v
 *     (each mean's logit + ln(group size), so it weighs as its tokens; empty
 *     groups are left out).
 * feats [1, N, 1, Df], centres [1, G, 1, Df], q [1, N, H, D], k/v [1, N, Hk, *],
 * o_intra, o_inter [1, N, H, Dv]; lse_intra, lse_inter [1, H, N] f32 or NULL:
 * each branch's LSE (lse_inter over the means' logits, ln(size) included),
 * for the backward; group_out int64 [N] (may be NULL): each token's group.
 * p: scale only. */
ATTN_API attn_status attn_catanet_forward(attn_ctx *ctx, const attn_params *p,
                                          const attn_tensor *feats, const attn_tensor *centres,
                                          const attn_tensor *q, const attn_tensor *k,
                                          const attn_tensor *v, attn_tensor *o_intra,
                                          attn_tensor *o_inter, attn_tensor *lse_intra,
                                          attn_tensor *lse_inter, int64_t *group_out);
/* Backward with the forward's inputs, outputs and both LSEs (required):
 * dout_intra, dout_inter [1, N, H, Dv] (pass zeros for a branch the loss
 * does not use); dq, dk, dv like q, k, v (dk, dv summed over the heads of a
 * GQA group). The groups are a discrete choice, held fixed: they are
 * recomputed from feats and centres by the forward's own rule (so the same
 * groups; no indices to keep in step with the forward), and no gradient
 * reaches feats or centres. Each mean's key/value gradient goes to its
 * group's tokens, 1 / size each; ln(size) is a constant. */
ATTN_API attn_status attn_catanet_backward(attn_ctx *ctx, const attn_params *p,
                                           const attn_tensor *feats, const attn_tensor *centres,
                                           const attn_tensor *q, const attn_tensor *k,
                                           const attn_tensor *v, const attn_tensor *o_intra,
                                           const attn_tensor *o_inter,
                                           const attn_tensor *lse_intra,
                                           const attn_tensor *lse_inter,
                                           const attn_tensor *dout_intra,
                                           const attn_tensor *dout_inter, attn_tensor *dq,
                                           attn_tensor *dk, attn_tensor *dv);

/* ---------------------------------------------------------------- linear-time attention */

/* The chunked-recurrence engine. Per sequence and query head h, a state
 * S (D x Dv, f32) runs through the tokens t = 0 .. T-1:
 *     S_t = G_t ⊙ S_{t-1} + k_tᵀ v_t,        o_t = scale · q_t S_t   (causal)
 * with S_{-1} = state_in (zeros when NULL); state_out = S_{T-1}.
 * Non-causal: every o_t = scale · q_t S_{T-1} (gates must be NONE).
 * G_t multiplies the rows of S; it is given in log space, g = log G (<= 0
 * in normal use, -inf cuts the history; g > 0 grows the state and may overflow):
 *   NONE        G = 1                                   g: NULL
 *   HEAD        one decay per head (Lightning-2)        g: [H]
 *   HEAD_TOKEN  scalar per head and token (Mamba-2/SSD) g: [B, T, H]
 *   KEY         per key dim and token (GLA)             g: [B, T, H, D]
 * Chunked: inside a chunk a masked tile product, between chunks the state;
 * the decays come from the log gates cumulated in double per chunk (no
 * cancellation after a strongly decaying token; g = -inf cuts cleanly).
 * K/V heads Hk divide H (GQA:
 * query head h reads kv head h / (H / Hk)); the state and the gates are per
 * query head. Results are bitwise identical for any thread count.
 * Shapes: q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv], o [B, T, H, Dv]
 * (f32 | f16 | bf16); state [B, H, D, Dv] f32. Varlen (cu_seqlens set):
 * q/k/v/o/g are [1, total, ...] and state [batch, H, D, Dv]. */

typedef enum attn_gate {
    ATTN_GATE_NONE = 0,
    ATTN_GATE_HEAD = 1,
    ATTN_GATE_HEAD_TOKEN = 2,
    ATTN_GATE_KEY = 3
} attn_gate;

typedef struct attn_linear_params {
    float scale;        /* multiplies q; 0 means 1/sqrt(D) */
    int32_t causal;     /* 1 (default) or 0 */
    attn_gate gate;
    int32_t chunk;      /* tokens per chunk; 0: the engine's choice (1..1024) */
    int64_t batch;              /* number of sequences (varlen only) */
    const int32_t *cu_seqlens;  /* int32 [batch + 1], non-decreasing, from 0, or NULL */
} attn_linear_params;

/* scale 0 (1/sqrt(D)), causal, no gate, chunk 0, no varlen. */
ATTN_API attn_linear_params attn_linear_params_default(void);

/* Forward. g: the log gate (shape by p->gate, f32 | f16 | bf16), NULL for
 * NONE; state_in, state_out: [B, H, D, Dv] f32, each may be NULL. */
ATTN_API attn_status attn_linear_forward(attn_ctx *ctx, const attn_linear_params *p,
                                         const attn_tensor *q, const attn_tensor *k,
                                         const attn_tensor *v, const attn_tensor *g,
                                         const attn_tensor *state_in, attn_tensor *o,
                                         attn_tensor *state_out);

/* Backward of attn_linear_forward with the same params and inputs.
 *   dout [B, T, H, Dv]; dstate_out [B, H, D, Dv] f32 or NULL (zero): the
 *     gradient reaching state_out;
 *   dq, dk, dv: like q, k, v (dk, dv summed over the heads of a GQA group);
 *   dg: like g (NULL allowed; HEAD: summed over batch and tokens);
 *   dstate_in: like state_in, or NULL. */
ATTN_API attn_status attn_linear_backward(attn_ctx *ctx, const attn_linear_params *p,
                                          const attn_tensor *q, const attn_tensor *k,
                                          const attn_tensor *v, const attn_tensor *g,
                                          const attn_tensor *state_in, const attn_tensor *dout,
                                          const attn_tensor *dstate_out, attn_tensor *dq,
                                          attn_tensor *dk, attn_tensor *dv, attn_tensor *dg,
                                          attn_tensor *dstate_in);

/* Decode: the recurrence itself, token by token, on T >= 1 new tokens per
 * sequence (causal; no varlen; p->chunk unused). state [B, H, D, Dv] f32 is
 * read and updated in place (the one argument that is input and output). */
ATTN_API attn_status attn_linear_decode(attn_ctx *ctx, const attn_linear_params *p,
                                        const attn_tensor *q, const attn_tensor *k,
                                        const attn_tensor *v, const attn_tensor *g,
                                        attn_tensor *state, attn_tensor *o);

/* The state algebra. A span of tokens maps the state entering it to the
 * state leaving it by an affine map, state_out = diag(decay) state_in + u,
 * with decay the product of the span's gates per key dim. Maps compose
 * (what makes a scan over sequence slices, ZeCO's All-Scan, possible).
 *   attn_linear_span_map: the map of k, v, g (causal; shapes as in
 *     attn_linear_forward, varlen allowed): decay [B, H, D] f32, u [B, H, D, Dv] f32.
 *   attn_linear_state_compose: first (decay1, u1), then (decay2, u2):
 *     decay = decay2 ⊙ decay1, u = diag(decay2) u1 + u2. decay1 NULL treats
 *     u1 as a state (decay_out must then be NULL): u = diag(decay2) u1 + u2
 *     is the state after the second span. decay_out may be NULL. */
ATTN_API attn_status attn_linear_span_map(attn_ctx *ctx, const attn_linear_params *p,
                                          const attn_tensor *k, const attn_tensor *v,
                                          const attn_tensor *g, attn_tensor *decay,
                                          attn_tensor *u);
ATTN_API attn_status attn_linear_state_compose(attn_ctx *ctx, const attn_tensor *decay1,
                                               const attn_tensor *u1, const attn_tensor *decay2,
                                               const attn_tensor *u2, attn_tensor *decay_out,
                                               attn_tensor *u_out);

/* Mechanisms over the chunked-recurrence engine (thin: they shape inputs
 * and call attn_linear_forward; the reference backend runs its reference).
 * Lightning Attention-2 is attn_linear_forward with ATTN_GATE_HEAD (g = log
 * of the per-head decay λ); Gated Linear Attention (GLA) is ATTN_GATE_KEY
 * with g = log α (e.g. logsigmoid of the gate logits). */

typedef enum attn_feature_map {
    ATTN_PHI_IDENTITY = 0, /* φ(x) = x */
    ATTN_PHI_ELU1 = 1,     /* φ(x) = elu(x) + 1 = x + 1 (x > 0), e^x (x <= 0) */
    ATTN_PHI_RELU = 2      /* φ(x) = max(x, 0) */
} attn_feature_map;

/* Linear attention with a feature map (Katharopoulos et al.; CAB):
 *   o_t = φ(q_t) S_t / (φ(q_t) · z_t + eps)  when normalize, else φ(q_t) S_t,
 *   S_t = sum_{j <= t} φ(k_j)ᵀ v_j, z_t = sum_{j <= t} φ(k_j) (all j when
 *   p->causal = 0). p->scale multiplies φ(q) (normalized: it cancels but for
 *   eps). p->gate must be NONE; varlen allowed; eps >= 0.
 * Shapes as attn_linear_forward; no state in or out. */
ATTN_API attn_status attn_linear_attention(attn_ctx *ctx, const attn_linear_params *p,
                                           attn_feature_map phi, int32_t normalize, float eps,
                                           const attn_tensor *q, const attn_tensor *k,
                                           const attn_tensor *v, attn_tensor *o);
/* Its backward: dout like o; dq, dk, dv like q, k, v (dk, dv summed over the
 * heads of a GQA group). The forward is run again for the normaliser. */
ATTN_API attn_status attn_linear_attention_backward(attn_ctx *ctx, const attn_linear_params *p,
                                                    attn_feature_map phi, int32_t normalize,
                                                    float eps, const attn_tensor *q,
                                                    const attn_tensor *k, const attn_tensor *v,
                                                    const attn_tensor *dout, attn_tensor *dq,
                                                    attn_tensor *dk, attn_tensor *dv);

/* Mamba-2 SSD (state-space duality): per head h with G groups of B and C,
 *   S_t = e^{dt_t A_h} S_{t-1} + B_tᵀ (dt_t x_t),  y_t = C_t S_t + Dskip_h x_t.
 *   x [B, T, H, P], dt [B, T, H] (> 0, after softplus), a [H] (A, < 0),
 *   bm, cm [B, T, G, N] (G divides H; head h reads group h / (H / G)),
 *   dskip [H] or NULL, state_in/state_out [B, H, N, P] f32 or NULL,
 *   y [B, T, H, P]. Inputs f32 | f16 | bf16 (dt, a, dskip: f32). */
ATTN_API attn_status attn_ssd_forward(attn_ctx *ctx, const attn_tensor *x,
                                      const attn_tensor *dt, const attn_tensor *a,
                                      const attn_tensor *bm, const attn_tensor *cm,
                                      const attn_tensor *dskip, const attn_tensor *state_in,
                                      attn_tensor *y, attn_tensor *state_out);

/* Backward of attn_ssd_forward with the same inputs. dy [B, T, H, P];
 * dstate_out [B, H, N, P] or NULL (zero); outputs shaped like their inputs:
 * dx, ddt, da, dbm, dcm (summed over the heads of a group), ddskip (NULL iff
 * dskip is NULL), dstate_in [B, H, N, P] or NULL. */
ATTN_API attn_status attn_ssd_backward(
    attn_ctx *ctx, const attn_tensor *x, const attn_tensor *dt, const attn_tensor *a,
    const attn_tensor *bm, const attn_tensor *cm, const attn_tensor *dskip,
    const attn_tensor *state_in, const attn_tensor *dy, const attn_tensor *dstate_out,
    attn_tensor *dx, attn_tensor *ddt, attn_tensor *da, attn_tensor *dbm, attn_tensor *dcm,
    attn_tensor *ddskip, attn_tensor *dstate_in);

/* LightNet's additive recurrence ("You Only Scan Once"): per key dim x,
 *   S_t[x] = sum_{j <= t} e^{k_jx} v_j / sum_{j <= t} e^{k_jx},  o_t = scale · q_t S_t,
 * an order-free (additive) running softmax over time, run as GLA with
 * z_t = logcumsumexp(k)_t, gate g_t = z_{t-1} - z_t and key e^{k_t - z_t}.
 * Shapes as attn_linear_forward (k: logits, GQA allowed); p->gate must be
 * NONE and p->causal 1; varlen allowed; no state in or out. */
ATTN_API attn_status attn_lightnet_forward(attn_ctx *ctx, const attn_linear_params *p,
                                           const attn_tensor *q, const attn_tensor *k,
                                           const attn_tensor *v, attn_tensor *o);
/* Its backward: dout like o; dq, dk, dv like q, k, v (dk, dv summed over the
 * heads of a GQA group). */
ATTN_API attn_status attn_lightnet_backward(attn_ctx *ctx, const attn_linear_params *p,
                                            const attn_tensor *q, const attn_tensor *k,
                                            const attn_tensor *v, const attn_tensor *dout,
                                            attn_tensor *dq, attn_tensor *dk, attn_tensor *dv);

/* Random-feature attention (RFA / Performer FAVOR+ positive features): the
 * softmax kernel e^{q·k / sqrt(D)} approximated by φ(x) = e^{w_i·x' - |x'|²/2}
 * / sqrt(F), x' = x / D^{1/4}, with F features w_i ~ N(0, I) drawn from the
 * context's seed; then normalised linear attention (eps 1e-6 in the
 * denominator). p->scale is unused; p->gate NONE; causal or not; varlen
 * allowed. q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv], o [B, T, H, Dv];
 * features 1..4096. */
ATTN_API attn_status attn_rfa_forward(attn_ctx *ctx, const attn_linear_params *p,
                                      int32_t features, const attn_tensor *q,
                                      const attn_tensor *k, const attn_tensor *v,
                                      attn_tensor *o);
/* Its backward (the same seed, so the same features): dout like o; dq, dk,
 * dv like q, k, v. The features' max shifts (for range) are constants that
 * cancel in the normaliser and get no gradient. */
ATTN_API attn_status attn_rfa_backward(attn_ctx *ctx, const attn_linear_params *p,
                                       int32_t features, const attn_tensor *q,
                                       const attn_tensor *k, const attn_tensor *v,
                                       const attn_tensor *dout, attn_tensor *dq,
                                       attn_tensor *dk, attn_tensor *dv);

/* WERSA (wavelet-enhanced random spectral attention, Dentamaro): q and k
 * pass through a multi-resolution Haar filter along the tokens, then
 * random-feature attention (attn_rfa_forward: the same seed, features and
 * normaliser) runs on the filtered q~, k~. With levels L, per sequence and
 * head, c_0 = x and c_l[t] = 2^-l sum_{s = t - 2^l + 1}^{t} x_s (zero before
 * the sequence's first token; the undecimated, causal Haar approximation),
 * details d_l = c_{l-1} - c_l, and
 *   x~ = sum_{l=1}^{L} w[l-1] d_l + w[L] c_L    (all w = 1: x~ = x),
 * so w [L + 1] (1-D, f32 | f16 | bf16, finite) weighs the finest detail
 * first and the coarsest approximation last. Unlike the paper's decimated transform, this one is
 * shift-invariant and never reads a later token (causal-safe). The paper's
 * per-token filter MLP and GELU are model layers, not part of this op.
 * p: scale unused, gate NONE, causal or not, varlen allowed (the filter
 * restarts at each sequence). features 1..4096, levels 0..20.
 * Shapes: q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv], o [B, T, H, Dv]. */
ATTN_API attn_status attn_wersa_forward(attn_ctx *ctx, const attn_linear_params *p,
                                        int32_t features, int32_t levels,
                                        const attn_tensor *weights, const attn_tensor *q,
                                        const attn_tensor *k, const attn_tensor *v,
                                        attn_tensor *o);
/* Its backward: dout like o; dq, dk, dv like q, k, v (dk, dv summed over the
 * heads of a GQA group); dweights [levels + 1] or NULL (the gradient of the
 * level weights, summed in a fixed order). */
ATTN_API attn_status attn_wersa_backward(attn_ctx *ctx, const attn_linear_params *p,
                                         int32_t features, int32_t levels,
                                         const attn_tensor *weights, const attn_tensor *q,
                                         const attn_tensor *k, const attn_tensor *v,
                                         const attn_tensor *dout, attn_tensor *dq,
                                         attn_tensor *dk, attn_tensor *dv,
                                         attn_tensor *dweights);

/* Local Linear Attention (LLA; Zuo et al., "FlashLLA"): per query a local
 * linear regression of the values on the keys, weighted by the softmax
 * kernel, read at the query (softmax attention is the local constant fit):
 *   s_ij = softmax_j(scale q_i·k_j) over visible keys (causal: j <= i),
 *   mu_i = sum_j s_ij k_j,  Sigma_i = sum_j s_ij (k_j - mu_i)(k_j - mu_i)ᵀ + lambda I,
 *   rho_i = Sigma_i^-1 (q_i - mu_i),
 *   o_i = sum_j s_ij (1 + (k_j - mu_i)·rho_i) v_j.
 * lambda (finite, > 0) is the ridge on the slope, relative to weights that
 * sum to 1; lambda -> inf gives softmax attention. Blockwise (FlashLLA's
 * shape): per query block, one pass over key blocks gathers the online
 * softmax and the weighted moments of the keys (one GEMM per key block),
 * a Cholesky solve per query gives rho, a second pass applies the weights.
 * Cost O(T^2 D^2) per head, memory O(block D^2) per thread. p->chunk: the
 * block size (0: 64); gate NONE; causal or not; varlen allowed. A NaN or
 * Inf input makes the rows that see it non-finite, and (causal) also the
 * earlier rows of its own block (masked products are computed, then
 * multiplied by 0); rows of earlier blocks are unaffected.
 * Shapes: q [B, T, H, D], k [B, T, Hk, D], v [B, T, Hk, Dv], o [B, T, H, Dv]. */
ATTN_API attn_status attn_lla_forward(attn_ctx *ctx, const attn_linear_params *p, float lambda,
                                      const attn_tensor *q, const attn_tensor *k,
                                      const attn_tensor *v, attn_tensor *o);
/* Its backward (the forward's passes recomputed, then a pass for the
 * regression's adjoint y = Sigma^-1 z and one for the gradients): dout like
 * o; dq, dk, dv like q, k, v (dk, dv summed over the heads of a GQA group). */
ATTN_API attn_status attn_lla_backward(attn_ctx *ctx, const attn_linear_params *p, float lambda,
                                       const attn_tensor *q, const attn_tensor *k,
                                       const attn_tensor *v, const attn_tensor *dout,
                                       attn_tensor *dq, attn_tensor *dk, attn_tensor *dv);

/* Mamba selective scan (Mamba-1, diagonal A): per channel c of E,
 *   h_t = e^{Δ_tc A_c} ⊙ h_{t-1} + Δ_tc B_t x_tc,  y_tc = C_t · h_t + Dskip_c x_tc,
 * h_t in R^N. x, delta [B, T, E]; a [E, N]; bm, cm [B, T, N]; dskip [E] or
 * NULL; state_in/state_out [B, E, N, 1] f32 or NULL; y [B, T, E]. Runs on
 * the engine with per-key gates, one head per channel, Dv = 1. */
ATTN_API attn_status attn_mamba_scan(attn_ctx *ctx, const attn_tensor *x,
                                     const attn_tensor *delta, const attn_tensor *a,
                                     const attn_tensor *bm, const attn_tensor *cm,
                                     const attn_tensor *dskip, const attn_tensor *state_in,
                                     attn_tensor *y, attn_tensor *state_out);

/* The scan's step (decode): T >= 1 new tokens per sequence, the recurrence
 * itself on state [B, E, N, 1] f32, read and updated in place. */
ATTN_API attn_status attn_mamba_step(attn_ctx *ctx, const attn_tensor *x,
                                     const attn_tensor *delta, const attn_tensor *a,
                                     const attn_tensor *bm, const attn_tensor *cm,
                                     const attn_tensor *dskip, attn_tensor *state,
                                     attn_tensor *y);

/* Backward of attn_mamba_scan with the same inputs. dy [B, T, E];
 * dstate_out [B, E, N, 1] or NULL (zero); outputs dx, ddelta [B, T, E],
 * da [E, N], dbm, dcm [B, T, N], ddskip [E] (NULL iff dskip is NULL),
 * dstate_in [B, E, N, 1] or NULL. Sums over channels and tokens run in a
 * fixed order. */
ATTN_API attn_status attn_mamba_scan_backward(
    attn_ctx *ctx, const attn_tensor *x, const attn_tensor *delta, const attn_tensor *a,
    const attn_tensor *bm, const attn_tensor *cm, const attn_tensor *dskip,
    const attn_tensor *state_in, const attn_tensor *dy, const attn_tensor *dstate_out,
    attn_tensor *dx, attn_tensor *ddelta, attn_tensor *da, attn_tensor *dbm, attn_tensor *dcm,
    attn_tensor *ddskip, attn_tensor *dstate_in);

/* ---------------------------------------------------------------- capability */

typedef enum attn_op {
    ATTN_OP_FORWARD = 0,
    ATTN_OP_BACKWARD = 1,
    ATTN_OP_DECODE = 2,
    ATTN_OP_LSE_MERGE = 3,
    ATTN_OP_LINEAR_FORWARD = 4,  /* attn_linear_forward */
    ATTN_OP_LINEAR_BACKWARD = 5, /* attn_linear_backward */
    ATTN_OP_LINEAR_DECODE = 6    /* attn_linear_decode */
} attn_op;

typedef struct attn_config {
    attn_dtype q_dtype, kv_dtype, o_dtype;
    int64_t dim, dim_v, heads, kv_heads;
    int32_t has_plan;
} attn_config;

/* ATTN_OK if ctx runs op on config as asked (no fallback), else
 * ATTN_ERR_UNSUPPORTED (or an argument error) with attn_last_error() saying why. */
ATTN_API attn_status attn_supports(const attn_ctx *ctx, attn_op op, const attn_config *cfg);

#ifdef __cplusplus
}
#endif
#endif /* ATTN_H */
