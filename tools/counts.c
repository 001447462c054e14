/* FLOP and byte counts of a benchmark case: the numerators of GFLOP/s and GB/s. */
#include "cli.h"

/* Keys [*lo, *hi] visible to query row i (0-based) of n against m keys: the
 * library's rule with the diagonal aligned bottom-right (offset m - n). */
static void visible_range(const bench_case *c, int64_t i, int64_t *lo_out, int64_t *hi_out) {
    int64_t diag = i + (c->m - c->n);
    int64_t lo = 0, hi = c->m - 1;
    if (c->window_left >= 0 && diag - c->window_left > lo) lo = diag - c->window_left;
    int64_t right = -1; /* -1: unbounded */
    if (c->causal) right = 0;
    if (c->window_right >= 0 && (right < 0 || c->window_right < right))
        right = c->window_right;
    if (right >= 0 && diag + right < hi) hi = diag + right;
    *lo_out = lo;
    *hi_out = hi;
}

static int masked(const bench_case *c) {
    return c->causal || c->window_left >= 0 || c->window_right >= 0;
}

double count_visible_pairs(const bench_case *c) {
    if (!masked(c)) return (double)c->n * (double)c->m;
    double pairs = 0.0;
    for (int64_t i = 0; i < c->n; i++) {
        int64_t lo, hi;
        visible_range(c, i, &lo, &hi);
        if (hi >= lo) pairs += (double)(hi - lo + 1);
    }
    return pairs;
}

/* Keys that at least one query sees: the K/V rows that must be read. Both
 * ends of the visible range are non-decreasing in i, so one sweep counts the
 * union. */
static double count_visible_keys(const bench_case *c) {
    if (!masked(c)) return (double)c->m;
    double keys = 0.0;
    int64_t covered = -1; /* keys 0..covered are counted */
    for (int64_t i = 0; i < c->n; i++) {
        int64_t lo, hi;
        visible_range(c, i, &lo, &hi);
        if (lo <= covered) lo = covered + 1;
        if (hi >= lo) {
            keys += (double)(hi - lo + 1);
            covered = hi;
        }
    }
    return keys;
}

double count_flops(const bench_case *c) {
    if (bench_op_is_linear(c->op)) return linear_flops(c);
    double fwd = 2.0 * count_visible_pairs(c) * (double)(c->dim + c->dim_v) *
                 (double)c->heads * (double)c->batch;
    return c->op == BENCH_ATTENTION_BWD ? 2.5 * fwd : fwd;
}

static double kv_size(const bench_case *c) { return (double)attn_dtype_size(c->dtype); }

double count_bytes(const bench_case *c) {
    if (bench_op_is_linear(c->op)) return linear_bytes(c);
    double b = (double)c->batch;
    double q = b * c->n * c->heads * c->dim * 4.0;
    double o = b * c->n * c->heads * c->dim_v * 4.0;
    double kv = b * count_visible_keys(c) * c->kv_heads * (double)(c->dim + c->dim_v) *
                kv_size(c);
    double lse = b * c->heads * c->n * 4.0;
    switch (c->op) {
    default: /* forward-like: attention, decode, the sparse ops */
        return q + kv + o;
    case BENCH_ATTENTION_BWD: {
        /* read q, k, v, o, dout, lse; write dq, dk, dv (f32) */
        double dkv = b * c->m * c->kv_heads * (double)(c->dim + c->dim_v) * 4.0;
        return q + kv + o + o + lse + q + dkv;
    }
    }
    return 0.0;
}

double count_alloc_bytes(const bench_case *c) {
    double b = (double)c->batch;
    double q = b * c->n * c->heads * c->dim * 4.0;
    double o = b * c->n * c->heads * c->dim_v * 4.0;
    double kv = b * c->m * c->kv_heads * (double)(c->dim + c->dim_v) * kv_size(c);
    double lse = b * c->heads * c->n * 4.0;
    double total = q + kv + 2.0 * o + lse; /* o twice: the reference's copy */
    if (c->op == BENCH_ATTENTION_BWD) {
        double dkv = b * c->m * c->kv_heads * (double)(c->dim + c->dim_v) * 4.0;
        total += o + 2.0 * q + 2.0 * dkv; /* dout, dq (+ref), dk dv (+ref) */
    }
    return total;
}
