/* Internal declarations shared by core, ref and engine. Not installed. */
#ifndef ATTN_INTERNAL_H
#define ATTN_INTERNAL_H

#include "attn.h"

#include <math.h>
#include <stdbool.h>

#if defined(__GNUC__)
#define ATTN_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define ATTN_PRINTF(a, b)
#endif

/* Record a sentence as this thread's last error and return s. */
attn_status attn_err(attn_status s, const char *fmt, ...) ATTN_PRINTF(2, 3);
void attn_clear_error(void);

/* An explicit plan (see attn_plan_create). */
struct attn_plan {
    int64_t n, m, block_q, block_k, heads;
    int64_t n_qblocks, n_kblocks;
    int64_t *row_offsets;      /* [heads * n_qblocks + 1] */
    attn_plan_entry *entries;  /* [row_offsets[heads * n_qblocks]] */
    double density;
};

/* A validated problem: every op is described by one of these once the
 * arguments passed the checks at the API edge. Kernels trust it. */
typedef struct attn_problem {
    int64_t batch;             /* sequences */
    int64_t n, m;              /* per-sequence lengths (dense); tensor rows (varlen) */
    int64_t h, hk, d, dv;
    float scale;               /* resolved: never 0 */
    float softcap;             /* 0 = off */
    int causal;
    int64_t window_left, window_right; /* -1 = unbounded */
    const int32_t *cu_q, *cu_k;        /* varlen offsets, or NULL */
    const int32_t *kv_lens;            /* decode: live keys per sequence, or NULL */
    const attn_plan *plan;             /* explicit plan or NULL */
    /* Compressed keys (NSA's compressed branch; 0 = ordinary keys): key t
     * stands for original positions [t * key_stride, t * key_stride +
     * key_span - 1] of a sequence of key_positions keys, and query i (at
     * position i + key_positions - n) sees it once all of them are past:
     * causal only, no window. Set by mechanisms, never by the public API. */
    int64_t key_stride, key_span, key_positions;
    /* Neighbourhoods on a token grid (CLEAR; 0 = off): self-attention over
     * F x H x W tokens (row-major), query (f, y, x) sees key (f', y', x') iff
     * |f - f'| <= rad_f, |y - y'| <= rad_h and |x - x'| <= rad_w. Set by the
     * neighbourhood mechanism with a plan of the blocks it reaches. */
    int64_t grid_f, grid_h, grid_w, rad_f, rad_h, rad_w;
    /* A gated epilogue (the CPU engine only; NULL = off): output row (i, h)
     * becomes gate[tb, i, h, out_gate_col] times its attention, plus what o
     * held with out_accumulate. The backward takes dout as the gradient of
     * that gated output (so the attention's is g dout) and, with
     * out_accumulate, adds its gradients to dq, dk and dv. A mixture of
     * branches (NSA's) is then summed in place, without a buffer per branch. */
    const attn_tensor *out_gate;
    int64_t out_gate_col;
    int out_accumulate;
} attn_problem;

/* Where sequence b lives in the tensors. */
typedef struct attn_seq {
    int64_t tb;   /* index along the tensors' dim 0 */
    int64_t q0;   /* first query row along dim 1 */
    int64_t n;    /* queries */
    int64_t k0;   /* first key row along dim 1 */
    int64_t m;    /* keys */
} attn_seq;

static inline attn_seq attn_problem_seq(const attn_problem *p, int64_t b) {
    attn_seq s;
    if (p->cu_q) {
        s.tb = 0;
        s.q0 = p->cu_q[b];
        s.n = p->cu_q[b + 1] - p->cu_q[b];
        s.k0 = p->cu_k[b];
        s.m = p->cu_k[b + 1] - p->cu_k[b];
    } else {
        s.tb = b;
        s.q0 = 0;
        s.n = p->n;
        s.k0 = 0;
        s.m = p->kv_lens ? p->kv_lens[b] : p->m;
    }
    return s;
}

/* Keys visible to query i of a sequence with n queries and m keys under the
 * causal/window rule: the inclusive range [*lo, *hi] clipped to [0, m-1]
 * (empty when *lo > *hi). Explicit plans restrict this further. */
/* The first and last token of the grid box around token t (a bounding range:
 * the keys in between are visible only if attn_key_visible says so). */
static inline void attn_grid_box(const attn_problem *p, int64_t t, int64_t *lo, int64_t *hi) {
    int64_t f = t / (p->grid_h * p->grid_w), y = (t / p->grid_w) % p->grid_h, x = t % p->grid_w;
    int64_t f0 = f - p->rad_f > 0 ? f - p->rad_f : 0, y0 = y - p->rad_h > 0 ? y - p->rad_h : 0;
    int64_t x0 = x - p->rad_w > 0 ? x - p->rad_w : 0;
    int64_t f1 = f + p->rad_f < p->grid_f - 1 ? f + p->rad_f : p->grid_f - 1;
    int64_t y1 = y + p->rad_h < p->grid_h - 1 ? y + p->rad_h : p->grid_h - 1;
    int64_t x1 = x + p->rad_w < p->grid_w - 1 ? x + p->rad_w : p->grid_w - 1;
    *lo = (f0 * p->grid_h + y0) * p->grid_w + x0;
    *hi = (f1 * p->grid_h + y1) * p->grid_w + x1;
}

static inline void attn_visible_range(const attn_problem *p, int64_t n, int64_t m,
                                      int64_t i, int64_t *lo, int64_t *hi) {
    if (p->grid_w > 0) { /* a bounding range; attn_key_visible has the rule */
        (void)n, (void)m;
        attn_grid_box(p, i, lo, hi);
        return;
    }
    if (p->key_stride > 0) { /* compressed keys: whole span in the past */
        int64_t last = i + (p->key_positions - n) - p->key_span + 1; /* first position >= 0 */
        *lo = 0;
        *hi = last < 0 ? -1 : last / p->key_stride;
        if (*hi > m - 1) *hi = m - 1;
        return;
    }
    int64_t diag = i + (m - n);
    int64_t l = 0, r = m - 1;
    if (p->window_left >= 0 && diag - p->window_left > l) l = diag - p->window_left;
    int64_t right = p->window_right;
    if (p->causal && (right < 0 || right > 0)) right = 0;
    if (right >= 0 && diag + right < r) r = diag + right;
    *lo = l;
    *hi = r;
}

/* The inverse of attn_visible_range: queries i (inclusive [*lo, *hi], clipped
 * to [0, n-1]) that see key j under the causal/window rule. */
static inline void attn_visible_queries(const attn_problem *p, int64_t n, int64_t m,
                                        int64_t j, int64_t *lo, int64_t *hi) {
    if (p->grid_w > 0) { /* the rule is symmetric: the same bounding range */
        attn_grid_box(p, j, lo, hi);
        return;
    }
    if (p->key_stride > 0) { /* compressed key j: queries at or after its span's end */
        int64_t first = j * p->key_stride + p->key_span - 1 - (p->key_positions - n);
        *lo = first > 0 ? first : 0;
        *hi = n - 1;
        return;
    }
    int64_t off = m - n, l = 0, r = n - 1;
    int64_t right = p->window_right;
    if (p->causal && (right < 0 || right > 0)) right = 0;
    if (right >= 0 && j - off - right > l) l = j - off - right; /* j <= i + off + right */
    if (p->window_left >= 0 && j - off + p->window_left < r)
        r = j - off + p->window_left;                          /* j >= i + off - left */
    *lo = l;
    *hi = r;
}

/* Whether query i sees key j under the problem's rule (any rule). */
static inline bool attn_key_visible(const attn_problem *p, int64_t n, int64_t m, int64_t i,
                                    int64_t j) {
    if (p->grid_w > 0) {
        int64_t hw = p->grid_h * p->grid_w;
        int64_t df = i / hw - j / hw, dy = (i / p->grid_w) % p->grid_h - (j / p->grid_w) % p->grid_h;
        int64_t dx = i % p->grid_w - j % p->grid_w;
        return (df < 0 ? -df : df) <= p->rad_f && (dy < 0 ? -dy : dy) <= p->rad_h &&
               (dx < 0 ? -dx : dx) <= p->rad_w;
    }
    int64_t lo, hi;
    attn_visible_range(p, n, m, i, &lo, &hi);
    return j >= lo && j <= hi;
}

/* Plan row of query head hq: index into plan->row_offsets' head dimension. */
static inline int64_t attn_plan_head(const attn_plan *plan, int64_t hq, int64_t h,
                                     int64_t hk) {
    if (plan->heads == 1) return 0;
    if (plan->heads == h) return hq;
    return hq / (h / hk);
}

/* Element offset of a 4-D index in a tensor view. */
static inline int64_t attn_off4(const attn_tensor *t, int64_t a, int64_t b, int64_t c,
                                int64_t d) {
    return a * t->stride[0] + b * t->stride[1] + c * t->stride[2] + d * t->stride[3];
}
static inline int64_t attn_off3(const attn_tensor *t, int64_t a, int64_t b, int64_t c) {
    return a * t->stride[0] + b * t->stride[1] + c * t->stride[2];
}

/* Scalar element access in any dtype, as double (slow paths: ref, tests). */
double attn_load_f64(const attn_tensor *t, int64_t off);
void attn_store_f64(attn_tensor *t, int64_t off, double x);

/* Reference backend (src/ref): double precision, naive loops, the oracle.
 * Arguments are already validated. Each computes into its own buffers and
 * writes outputs only when it succeeded. */
attn_status ref_forward(const attn_problem *p, const attn_tensor *q, const attn_tensor *k,
                        const attn_tensor *v, attn_tensor *o, attn_tensor *lse);
attn_status ref_backward(const attn_problem *p, const attn_tensor *q, const attn_tensor *k,
                         const attn_tensor *v, const attn_tensor *o,
                         const attn_tensor *lse, const attn_tensor *dout, attn_tensor *dq,
                         attn_tensor *dk, attn_tensor *dv);
attn_status ref_lse_merge(const attn_tensor *o1, const attn_tensor *lse1,
                          const attn_tensor *o2, const attn_tensor *lse2, attn_tensor *o,
                          attn_tensor *lse);

#endif
