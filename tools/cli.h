/* Internal declarations of the `attn` command-line tool.
 *
 * The tool uses only the public header include/attn.h; this file joins its
 * pieces: attn.c (main, dispatch), info.c (attn info), bench.c (attn bench:
 * arguments, suite, timing), bench_ops.c (setting up and running one op),
 * counts.c (FLOP and byte counts), ceilings.c (FMA peak, memory bandwidth),
 * report.c (table and JSON output), sysutil.c (clock, peak RSS, random fill),
 * cab.c (attn cab: every mechanism x the four CAB patterns x lengths). */
#ifndef ATTN_CLI_H
#define ATTN_CLI_H

#include "attn.h"

#include <stddef.h>
#include <stdint.h>

/* Exit codes. */
#define CLI_EXIT_OK 0
#define CLI_EXIT_FAIL 1  /* the library or the machine said no */
#define CLI_EXIT_USAGE 2 /* bad command-line arguments */

/* ------------------------------------------------------------- commands */

int cmd_info(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_cab(int argc, char **argv); /* cab.c: the CAB grid of every mechanism */

/* ------------------------------------------------------------- one case */

typedef enum bench_op {
    BENCH_ATTENTION = 0,     /* attn_forward */
    BENCH_ATTENTION_BWD = 1, /* attn_backward (after one untimed forward) */
    BENCH_DECODE = 2,        /* attn_decode: n new queries against a cache of m */
    /* sparse (bench_sparse.c): planning + attn_forward with the plan, on
     * structured inputs, compared with the dense forward of the same run */
    BENCH_BLOCKSPARSE = 3,   /* random key blocks at density `budget`, plus the diagonal */
    BENCH_WINDOW = 4,        /* the implicit sliding window of --window */
    BENCH_PSA = 5,           /* attn_plan_psa at work budget `budget` */
    BENCH_TOPK = 6,          /* attn_plan_select, top-k blocks at budget `budget` */
    /* linear-time (bench_linear.c): the chunked-recurrence engine; n tokens */
    BENCH_LINEAR = 7,        /* attn_linear_forward, no gate (--causal or not) */
    BENCH_LIGHTNING = 8,     /* attn_linear_forward, per-head decay (Lightning-2) */
    BENCH_GLA = 9,           /* attn_linear_forward, per-key-dim gates (GLA) */
    BENCH_GLA_BWD = 10,      /* attn_linear_backward, per-key-dim gates */
    BENCH_GLA_DECODE = 11,   /* attn_linear_decode: n tokens (default 1) per sequence */
    BENCH_SSD = 12,          /* attn_ssd_forward: P = dim_v, N = dim, groups = kv_heads */
    BENCH_MAMBA = 13,        /* attn_mamba_scan: E = heads channels, N = dim */
    BENCH_EFFICIENCY = 14,   /* linear, lightning, gla against causal attn_forward, N = 16 .. n */
    /* NSA (bench_sparse.c), causal, beside the dense causal forward/backward */
    BENCH_NSA = 15,          /* compression, selection, the three branches */
    BENCH_NSA_BWD = 16,      /* the backward (after one untimed forward) */
    /* linear-time mechanisms beside the engine (bench_linear.c), --causal or not */
    BENCH_WERSA = 17,        /* attn_wersa_forward: F = 2 D features, 3 levels */
    BENCH_LLA = 18,          /* attn_lla_forward: lambda 0.1, default blocks (quadratic in n) */
    BENCH_LLA_BWD = 19       /* attn_lla_backward, the same problem */
} bench_op;

const char *bench_op_name(bench_op op);
int bench_op_is_sparse(bench_op op);
int bench_op_is_linear(bench_op op);

/* One measured problem. Q, O (and all gradients) are f32; K and V are dtype. */
typedef struct bench_case {
    bench_op op;
    int64_t batch, n, m, heads, kv_heads, dim, dim_v;
    int causal;
    int64_t window_left, window_right; /* -1 unbounded */
    attn_dtype dtype;
    double budget;                     /* sparse ops: density / work budget in (0, 1] */
    int64_t block_q, block_k;          /* sparse ops: plan blocks */
} bench_case;

/* Options that apply to every case of a run. */
typedef struct bench_opts {
    int threads;        /* 0: the library's default (ATTN_NUM_THREADS, else all cores) */
    int repeats;        /* 0: adapt (>= 3 and ~1 s, at most BENCH_MAX_REPEATS) */
    int json;           /* one JSON object per line instead of a table */
    int check;          /* compare sample rows with the reference backend */
    double max_rel_err; /* < 0: none; else exit 1 when rel_err exceeds it */
    int ceilings;       /* measure FMA peak and bandwidth first */
    uint64_t seed;
} bench_opts;

#define BENCH_MAX_REPEATS 50

/* ------------------------------------------------------------- counts */

/* Visible (query, key) pairs of one head of one sequence. */
double count_visible_pairs(const bench_case *c);
/* FLOPs of one call: forward 2*pairs*(D + Dv) per head and sequence,
 * backward 2.5x forward (FlashAttention-2 convention), decode as forward. */
double count_flops(const bench_case *c);
/* Bytes an ideal implementation moves: each input read once (of K and V only
 * the rows some query sees), each output written once (decode: the live K/V
 * cache plus q and o). */
double count_bytes(const bench_case *c);
/* Bytes the benchmark allocates for the case (inputs, outputs, grads). */
double count_alloc_bytes(const bench_case *c);

/* ------------------------------------------------------------- running an op */

typedef struct op_state op_state;

/* Allocate and fill the case's tensors. On failure returns a status and
 * writes a sentence into err. */
attn_status op_setup(op_state **out, attn_ctx *ctx, const bench_case *c, uint64_t seed,
                     char *err, size_t errlen);
/* One call of the measured op. */
attn_status op_run(op_state *s);
/* Relative RMS error of sample rows against the reference backend
 * (ctx created with ATTN_BACKEND_REF). Writes a sentence into err on failure. */
attn_status op_rel_err(op_state *s, attn_ctx *ref, double *rel_err, char *err,
                       size_t errlen);
void op_free(op_state *s);
/* Sparse ops: fraction of the dense work, and the dense forward's ms; else NaN. */
double op_density(const op_state *s);
double op_dense_ms(const op_state *s);

/* ------------------------------------------------------------- sparse ops */

typedef struct sparse_state sparse_state;

/* Structured inputs (local bands plus a few heavy key columns), the dense
 * forward timed as the yardstick (median of `repeats`), and the op's plan
 * built once to know its density. */
attn_status sparse_setup(sparse_state **out, attn_ctx *ctx, const bench_case *c,
                         uint64_t seed, char *err, size_t errlen);
/* Planning plus the planned forward: what the op costs a user. */
attn_status sparse_run(sparse_state *s);
/* Relative L2 error of the last output against the dense forward. */
double sparse_rel_err(const sparse_state *s);
double sparse_density(const sparse_state *s);
double sparse_dense_ms(const sparse_state *s);
void sparse_free(sparse_state *s);

/* ------------------------------------------------------------- linear-time ops */

typedef struct linear_state linear_state;

attn_status linear_setup(linear_state **out, attn_ctx *ctx, const bench_case *c,
                         uint64_t seed, char *err, size_t errlen);
attn_status linear_run(linear_state *s);
/* The op on the first min(n, 128) tokens here and on the reference backend. */
attn_status linear_rel_err(linear_state *s, attn_ctx *ref, double *rel_err, char *err,
                           size_t errlen);
void linear_free(linear_state *s);
/* FLOPs of the chunked algorithm and bytes of one call (see bench_linear.c). */
double linear_flops(const bench_case *c);
double linear_bytes(const bench_case *c);
/* --op efficiency: times and the efficiency length; returns an exit code. */
int linear_efficiency(attn_ctx *ctx, const bench_case *c, const bench_opts *o, int threads,
                      const char *isa);

/* ------------------------------------------------------------- ceilings */

typedef struct ceilings {
    int threads;
    const char *kernel;  /* which FMA kernel ran: avx512, avx2, neon, scalar */
    double fma_gflops;     /* the peak: max(fma_all_gflops, threads * fma_one_gflops) */
    double fma_all_gflops; /* 2 * FMAs per second, all threads together */
    double fma_one_gflops; /* 2 * FMAs per second, one thread */
    double read_gbps;    /* read stream summing a 1 GiB f32 array */
    double copy_gbps;    /* memcpy, bytes read + written */
    double triad_gbps;   /* a = b + s*c, bytes read + written */
} ceilings;

/* Measure with `threads` threads (> 0). Returns 0, or -1 (message on stderr). */
int ceilings_measure(int threads, ceilings *out);
/* The read-stream bandwidth alone, measured now (NaN if 1 GiB is not there).
 * Memory-bound ops are compared with it measured right beside them: on a
 * shared machine the bandwidth drifts by 1.5x over seconds. */
double ceilings_read_gbps(int threads);

/* ------------------------------------------------------------- results */

typedef struct bench_result {
    double median_ms, min_ms;
    int repeats;
    double gflops, gbps;
    double peak_rss_bytes; /* < 0: unknown */
    double peak_gbps;      /* read bandwidth measured right before and after the op
                              (the larger), for memory-bound ops; NaN: use the ceiling */
    double rel_err;        /* NaN: not checked */
    double density;        /* sparse ops: fraction of the dense work done; else NaN */
    double dense_ms;       /* sparse ops: the dense forward of the same shape; else NaN */
    double ns_per_token;   /* linear-time ops: median / (batch * n); else NaN */
} bench_result;

typedef struct report_ctx {
    int json;
    int threads;
    const char *isa;
    const char *backend;
    const ceilings *ceil; /* NULL: not measured */
} report_ctx;

void report_ceilings(const report_ctx *r);
void report_header(const report_ctx *r);
void report_row(const report_ctx *r, const bench_case *c, const bench_result *res);
void report_skip(const report_ctx *r, const bench_case *c, const char *why);

/* ------------------------------------------------------------- system */

double now_seconds(void);           /* CLOCK_MONOTONIC */
int rss_reset_peak(void);           /* 0 if the high-water mark was reset */
double rss_peak_bytes(void);        /* VmHWM (or ru_maxrss); < 0 unknown */
double physical_memory_bytes(void); /* < 0 unknown */
int online_cpus(void);

/* Fill count elements of dtype dt with normal-ish values (mean 0, sd 1) from
 * a fixed seed; the same seed gives the same values for any thread count. */
void fill_random(void *data, attn_dtype dt, size_t count, uint64_t seed);

#endif /* ATTN_CLI_H */
