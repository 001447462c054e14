/* attn bench: arguments, the quick suite, timing and the driver loop.
 *
 * Timing: warm-up calls, then the median of repeats (at least 3 and about
 * 1 s in all, at most BENCH_MAX_REPEATS, or --repeats), wall clock from
 * CLOCK_MONOTONIC. Peak RSS: the high-water mark is reset just before the
 * first call and read after the last one. */
#include "cli.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char bench_usage[] =
    "usage: attn bench [options]                 the quick suite\n"
    "       attn bench --op OP [shape] [options] one measurement\n"
    "\n"
    "ops:\n"
    "  attention      attn_forward\n"
    "  attention_bwd  attn_backward (one untimed forward first for O and LSE)\n"
    "  decode         attn_decode: --n new queries (1..16) against a cache of --m keys\n"
    "  linear         attn_linear_forward, no gate (--causal or not); --n tokens\n"
    "  lightning      attn_linear_forward, per-head decay (Lightning Attention-2)\n"
    "  gla            attn_linear_forward, per-key-dim gates (GLA); gla_bwd its backward\n"
    "  gla_decode     attn_linear_decode: --n tokens (default 1) per sequence\n"
    "  ssd            attn_ssd_forward (Mamba-2): --dim-v head dim, --dim state, --kv-heads groups\n"
    "  mamba          attn_mamba_scan: --heads channels, --dim state size\n"
    "  wersa          attn_wersa_forward: 2 D random features, 3 Haar levels (--causal or not)\n"
    "  lla            attn_lla_forward (Local Linear Attention), lambda 0.1 (--causal or not);\n"
    "                 lla_bwd its backward\n"
    "  efficiency     linear, lightning, gla against causal attention, N = 16 .. --n\n"
    "shape:\n"
    "  --n N           query length (default 1024; decode 1)\n"
    "  --m M           key length (default N; decode 65536)\n"
    "  --batch B       sequences (default 1)\n"
    "  --heads H       query heads (default 8)\n"
    "  --kv-heads HK   key/value heads, divides H (default H)\n"
    "  --dim D         query/key head dim (default 64)\n"
    "  --dim-v DV      value head dim (default D)\n"
    "  --causal        causal mask, diagonal aligned bottom-right\n"
    "  --window L,R    sliding window, -1 for unbounded (e.g. 256,0)\n"
    "  --dtype T       dtype of K and V: f32 (default), f16, bf16; Q and O are f32\n"
    "  --density R     blocksparse: fraction of key blocks per query block (0..1]\n"
    "  --budget R      psa, topk: fraction of the dense work (0..1]\n"
    "  --block BQ,BK   sparse ops: plan block sizes (default 192,96)\n"
    "options:\n"
    "  --threads T     threads (default: ATTN_NUM_THREADS, else all cores)\n"
    "  --repeats R     timed calls (default: adapt, >= 3 and ~1 s, at most 50)\n"
    "  --json          one JSON object per measurement per line (ceilings on stderr)\n"
    "  --no-check      skip the comparison with the reference backend (rel_err)\n"
    "  --max-rel-err X exit 1 when rel_err exceeds X\n"
    "  --no-ceilings   skip measuring FMA peak and memory bandwidth\n"
    "  --seed S        seed of the random inputs (default 1)\n"
    "environment: ATTN_BACKEND=cpu|ref, ATTN_ISA=scalar|avx2|avx512|neon, ATTN_NUM_THREADS\n";

/* ------------------------------------------------------------- arguments */

typedef struct bench_args {
    bench_opts opts;
    int have_op, shape_given;
    bench_case c;
    int64_t n, m, kv_heads, dim_v; /* -1: default */
} bench_args;

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
static int usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "attn bench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n(see attn bench --help)\n");
    va_end(ap);
    return CLI_EXIT_USAGE;
}

static int parse_i64(const char *opt, const char *s, int64_t lo, int64_t hi, int64_t *out) {
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno == ERANGE || end == s || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr,
                "attn bench: %s expects an integer from %" PRId64 " to %" PRId64
                ", got '%s'\n(see attn bench --help)\n",
                opt, lo, hi, s);
        return CLI_EXIT_USAGE;
    }
    *out = (int64_t)v;
    return 0;
}

static int parse_window(const char *s, int64_t *left, int64_t *right) {
    const char *comma = strchr(s, ',');
    if (!comma) return usage_error("--window expects L,R (-1 for unbounded), got '%s'", s);
    char l[32];
    size_t len = (size_t)(comma - s);
    if (len == 0 || len >= sizeof l)
        return usage_error("--window expects L,R (-1 for unbounded), got '%s'", s);
    memcpy(l, s, len);
    l[len] = '\0';
    const int64_t big = (int64_t)1 << 40;
    if (parse_i64("--window (left)", l, -1, big, left)) return CLI_EXIT_USAGE;
    if (parse_i64("--window (right)", comma + 1, -1, big, right)) return CLI_EXIT_USAGE;
    return 0;
}

static int parse_op(const char *s, bench_op *op) {
    if (!strcmp(s, "attention") || !strcmp(s, "forward"))
        *op = BENCH_ATTENTION;
    else if (!strcmp(s, "attention_bwd") || !strcmp(s, "backward"))
        *op = BENCH_ATTENTION_BWD;
    else if (!strcmp(s, "decode"))
        *op = BENCH_DECODE;
    else if (!strcmp(s, "blocksparse"))
        *op = BENCH_BLOCKSPARSE;
    else if (!strcmp(s, "window"))
        *op = BENCH_WINDOW;
    else if (!strcmp(s, "psa"))
        *op = BENCH_PSA;
    else if (!strcmp(s, "topk"))
        *op = BENCH_TOPK;
    else if (!strcmp(s, "nsa"))
        *op = BENCH_NSA;
    else if (!strcmp(s, "nsa_bwd"))
        *op = BENCH_NSA_BWD;
    else {
        static const bench_op lin[] = {BENCH_LINEAR, BENCH_LIGHTNING, BENCH_GLA, BENCH_GLA_BWD,
                                       BENCH_GLA_DECODE, BENCH_SSD, BENCH_MAMBA, BENCH_EFFICIENCY,
                                       BENCH_WERSA, BENCH_LLA, BENCH_LLA_BWD};
        for (size_t i = 0; i < sizeof lin / sizeof lin[0]; i++)
            if (!strcmp(s, bench_op_name(lin[i]))) return *op = lin[i], 0;
        return usage_error("unknown op '%s': use attention, attention_bwd, decode, "
                           "blocksparse, window, psa, topk, linear, lightning, gla, gla_bwd, "
                           "gla_decode, ssd, mamba, wersa, lla, lla_bwd or efficiency", s);
    }
    return 0;
}

static int parse_dtype(const char *s, attn_dtype *dt) {
    if (!strcmp(s, "f32"))
        *dt = ATTN_F32;
    else if (!strcmp(s, "f16"))
        *dt = ATTN_F16;
    else if (!strcmp(s, "bf16"))
        *dt = ATTN_BF16;
    else
        return usage_error("--dtype expects f32, f16 or bf16, got '%s'", s);
    return 0;
}

static int parse_args(int argc, char **argv, bench_args *a) {
    memset(a, 0, sizeof *a);
    a->opts.check = 1;
    a->opts.ceilings = 1;
    a->opts.max_rel_err = -1.0;
    a->opts.seed = 1;
    a->c.op = BENCH_ATTENTION;
    a->c.batch = 1;
    a->c.heads = 8;
    a->c.dim = 64;
    a->c.window_left = a->c.window_right = -1;
    a->c.dtype = ATTN_F32;
    a->c.budget = 0.1;
    a->c.block_q = 192;
    a->c.block_k = 96;
    a->n = a->m = a->kv_heads = a->dim_v = -1;

    const int64_t big = (int64_t)1 << 40;
    for (int i = 0; i < argc; i++) {
        char name[64];
        const char *arg = argv[i], *val = NULL;
        if (!strcmp(arg, "-h")) {
            fputs(bench_usage, stdout);
            return -1;
        }
        if (strncmp(arg, "--", 2) != 0)
            return usage_error("unexpected argument '%s'", arg);
        const char *eq = strchr(arg, '=');
        size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
        if (len >= sizeof name) return usage_error("unknown option '%s'", arg);
        memcpy(name, arg, len);
        name[len] = '\0';
        if (eq) val = eq + 1;

        /* Flags without a value. */
        int *flag = NULL;
        int flag_value = 1;
        if (!strcmp(name, "--help")) {
            fputs(bench_usage, stdout);
            return -1;
        } else if (!strcmp(name, "--causal")) {
            flag = &a->c.causal;
            a->shape_given = 1;
        } else if (!strcmp(name, "--json")) {
            flag = &a->opts.json;
        } else if (!strcmp(name, "--no-check")) {
            flag = &a->opts.check;
            flag_value = 0;
        } else if (!strcmp(name, "--no-ceilings")) {
            flag = &a->opts.ceilings;
            flag_value = 0;
        }
        if (flag) {
            if (val) return usage_error("%s takes no value", name);
            *flag = flag_value;
            continue;
        }

        /* Options with a value: --name V or --name=V. */
        static const char *const valued[] = {
            "--op",    "--n",      "--m",       "--batch",  "--heads",
            "--kv-heads", "--dim", "--dim-v",   "--window", "--dtype",
            "--threads", "--repeats", "--seed", "--max-rel-err", "--density",
            "--budget", "--block"};
        int known = 0;
        for (size_t k = 0; k < sizeof valued / sizeof valued[0]; k++)
            if (!strcmp(name, valued[k])) known = 1;
        if (!known) return usage_error("unknown option '%s'", arg);
        if (!val) {
            if (i + 1 >= argc) return usage_error("%s needs a value", name);
            val = argv[++i];
        }

        int64_t v = 0;
        int rc = 0;
        if (!strcmp(name, "--op")) {
            rc = parse_op(val, &a->c.op);
            a->have_op = 1;
        } else if (!strcmp(name, "--n")) {
            rc = parse_i64(name, val, 1, big, &a->n);
            a->shape_given = 1;
        } else if (!strcmp(name, "--m")) {
            rc = parse_i64(name, val, 1, big, &a->m);
            a->shape_given = 1;
        } else if (!strcmp(name, "--batch")) {
            rc = parse_i64(name, val, 1, 1 << 20, &a->c.batch);
            a->shape_given = 1;
        } else if (!strcmp(name, "--heads")) {
            rc = parse_i64(name, val, 1, 1 << 16, &a->c.heads);
            a->shape_given = 1;
        } else if (!strcmp(name, "--kv-heads")) {
            rc = parse_i64(name, val, 1, 1 << 16, &a->kv_heads);
            a->shape_given = 1;
        } else if (!strcmp(name, "--dim")) {
            rc = parse_i64(name, val, 1, 1 << 16, &a->c.dim);
            a->shape_given = 1;
        } else if (!strcmp(name, "--dim-v")) {
            rc = parse_i64(name, val, 1, 1 << 16, &a->dim_v);
            a->shape_given = 1;
        } else if (!strcmp(name, "--window")) {
            rc = parse_window(val, &a->c.window_left, &a->c.window_right);
            a->shape_given = 1;
        } else if (!strcmp(name, "--dtype")) {
            rc = parse_dtype(val, &a->c.dtype);
            a->shape_given = 1;
        } else if (!strcmp(name, "--threads")) {
            rc = parse_i64(name, val, 1, 4096, &v);
            a->opts.threads = (int)v;
        } else if (!strcmp(name, "--repeats")) {
            rc = parse_i64(name, val, 1, 100000, &v);
            a->opts.repeats = (int)v;
        } else if (!strcmp(name, "--seed")) {
            rc = parse_i64(name, val, 0, INT64_MAX, &v);
            a->opts.seed = (uint64_t)v;
        } else if (!strcmp(name, "--density") || !strcmp(name, "--budget")) {
            char *end = NULL;
            errno = 0;
            double x = strtod(val, &end);
            if (errno || end == val || *end || !(x > 0.0 && x <= 1.0))
                return usage_error("%s expects a fraction in (0, 1], got '%s'", name, val);
            a->c.budget = x;
            a->shape_given = 1;
        } else if (!strcmp(name, "--block")) {
            rc = parse_window(val, &a->c.block_q, &a->c.block_k);
            if (!rc && (a->c.block_q < 1 || a->c.block_q > 512 || a->c.block_k < 1 ||
                        a->c.block_k > 512))
                return usage_error("--block expects BQ,BK in 1..512, got '%s'", val);
            a->shape_given = 1;
        } else if (!strcmp(name, "--max-rel-err")) {
            char *end = NULL;
            errno = 0;
            double x = strtod(val, &end);
            if (errno || end == val || *end || !(x >= 0.0))
                return usage_error("--max-rel-err expects a number >= 0, got '%s'", val);
            a->opts.max_rel_err = x;
        }
        if (rc) return rc;
    }

    if (a->shape_given && !a->have_op)
        return usage_error("shape options need --op (see attn bench --help)");
    if (!a->have_op) return 0;

    bench_case *c = &a->c;
    if (bench_op_is_linear(c->op) || c->op == BENCH_EFFICIENCY) {
        c->n = a->n > 0 ? a->n
               : c->op == BENCH_GLA_DECODE ? 1 : c->op == BENCH_EFFICIENCY ? 8192 : 4096;
        c->m = c->n;
    } else if (c->op == BENCH_DECODE) {
        c->n = a->n > 0 ? a->n : 1;
        c->m = a->m > 0 ? a->m : 65536;
        if (c->n > ATTN_DECODE_MAX_QUERIES) {
            fprintf(stderr, "attn bench: decode takes 1 to %d new queries (--n), got %" PRId64
                            "\n", ATTN_DECODE_MAX_QUERIES, c->n);
            return CLI_EXIT_USAGE;
        }
        if (c->m > INT32_MAX) {
            fprintf(stderr, "attn bench: decode caches hold at most %d keys (--m)\n", INT32_MAX);
            return CLI_EXIT_USAGE;
        }
    } else {
        c->n = a->n > 0 ? a->n : 1024;
        c->m = a->m > 0 ? a->m : c->n;
    }
    c->kv_heads = a->kv_heads > 0 ? a->kv_heads : c->heads;
    c->dim_v = a->dim_v > 0 ? a->dim_v : c->dim;
    if (c->heads % c->kv_heads != 0) {
        fprintf(stderr, "attn bench: --kv-heads (%" PRId64 ") must divide --heads (%" PRId64
                        ")\n", c->kv_heads, c->heads);
        return CLI_EXIT_USAGE;
    }
    double need = count_alloc_bytes(c), have = physical_memory_bytes();
    double limit = have > 0 ? have : (double)((int64_t)1 << 50);
    if (!(need <= limit)) {
        fprintf(stderr, "attn bench: this shape needs %.3g GiB of tensors; the machine has "
                        "%.3g GiB\n", need / 1073741824.0, limit / 1073741824.0);
        return CLI_EXIT_USAGE;
    }
    return 0;
}

/* ------------------------------------------------------------- quick suite */

static bench_case suite_case(bench_op op, int64_t n, int64_t m, int64_t h, int64_t hk,
                             int64_t d, int causal, attn_dtype dt) {
    bench_case c = {op, 1, n, m, h, hk, d, d, causal, -1, -1, dt, 0.1, 192, 96};
    return c;
}

/* The shapes of the issues' bars; about 70 s on 2 cores. */
static size_t quick_suite(bench_case *out) {
    size_t k = 0;
    for (int d = 64; d <= 128; d *= 2)
        for (int causal = 0; causal <= 1; causal++)
            out[k++] = suite_case(BENCH_ATTENTION, 4096, 4096, 8, 8, d, causal, ATTN_F32);
    for (int d = 64; d <= 128; d *= 2)
        for (int causal = 0; causal <= 1; causal++)
            out[k++] = suite_case(BENCH_ATTENTION, 4096, 4096, 8, 8, d, causal, ATTN_F16);
    for (int causal = 0; causal <= 1; causal++)
        out[k++] = suite_case(BENCH_ATTENTION, 512, 512, 8, 8, 64, causal, ATTN_F32);
    for (int d = 64; d <= 128; d *= 2)
        for (int causal = 0; causal <= 1; causal++)
            out[k++] = suite_case(BENCH_ATTENTION_BWD, 4096, 4096, 8, 8, d, causal, ATTN_F32);
    out[k++] = suite_case(BENCH_DECODE, 1, 262144, 8, 8, 128, 0, ATTN_F16);
    /* sparse section: N = 8192, H = 8, D = 64, structured inputs */
    static const struct {
        bench_op op;
        double budget;
        int64_t wl;
    } sparse[] = {{BENCH_BLOCKSPARSE, 0.10, -1}, {BENCH_BLOCKSPARSE, 0.25, -1},
                  {BENCH_WINDOW, 1.0, 512},      {BENCH_TOPK, 0.15, -1},
                  {BENCH_PSA, 0.15, -1}};
    for (size_t i = 0; i < sizeof sparse / sizeof sparse[0]; i++) {
        bench_case c = suite_case(sparse[i].op, 8192, 8192, 8, 8, 64, 0, ATTN_F32);
        c.budget = sparse[i].budget;
        if (sparse[i].wl >= 0) /* a causal sliding window beside causal dense attention */
            c.window_left = sparse[i].wl, c.window_right = 0, c.causal = 1;
        out[k++] = c;
    }
    /* linear-time section: the chunked-recurrence engine, H = 8, D = 64
     * (mamba: 1024 channels, state 16); the efficiency sweep follows the suite */
    static const bench_op lin[] = {BENCH_LINEAR, BENCH_LIGHTNING, BENCH_GLA, BENCH_SSD};
    for (size_t i = 0; i < sizeof lin / sizeof lin[0]; i++)
        out[k++] = suite_case(lin[i], 16384, 16384, 8, 8, 64, 1, ATTN_F32);
    out[k++] = suite_case(BENCH_GLA_BWD, 4096, 4096, 8, 8, 64, 1, ATTN_F32);
    out[k++] = suite_case(BENCH_MAMBA, 4096, 4096, 1024, 1024, 16, 1, ATTN_F32);
    out[k++] = suite_case(BENCH_GLA_DECODE, 1, 1, 32, 32, 128, 1, ATTN_F32);
    /* tokens per second against N, 1k to 1M (one head, D = Dv = 128: the
     * issue's per-token bar; about 5 s in all) */
    static const bench_op sweep[] = {BENCH_LINEAR, BENCH_GLA, BENCH_SSD};
    static const int64_t lens[] = {1024, 16384, 1048576};
    for (size_t i = 0; i < sizeof sweep / sizeof sweep[0]; i++)
        for (size_t j = 0; j < sizeof lens / sizeof lens[0]; j++)
            out[k++] = suite_case(sweep[i], lens[j], lens[j], 1, 1, 128, 1, ATTN_F32);
    return k;
}

/* ------------------------------------------------------------- measuring */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int is_argument_error(attn_status st) {
    return st == ATTN_ERR_SHAPE || st == ATTN_ERR_DTYPE || st == ATTN_ERR_ARG ||
           st == ATTN_ERR_UNSUPPORTED || st == ATTN_ERR_OVERFLOW;
}

static attn_op api_op(bench_op op) {
    switch (op) {
    case BENCH_ATTENTION: return ATTN_OP_FORWARD;
    case BENCH_ATTENTION_BWD: return ATTN_OP_BACKWARD;
    case BENCH_DECODE: return ATTN_OP_DECODE;
    default: return ATTN_OP_FORWARD;
    }
}

static int timed_call(op_state *s, const char *what, double *seconds) {
    double t0 = now_seconds();
    attn_status st = op_run(s);
    *seconds = now_seconds() - t0;
    if (st != ATTN_OK) {
        fprintf(stderr, "attn bench: %s failed: %s: %s\n", what, attn_status_str(st),
                attn_last_error());
        return is_argument_error(st) ? CLI_EXIT_USAGE : CLI_EXIT_FAIL;
    }
    return 0;
}

/* Returns an exit code; single: the case was asked for by --op. */
static int run_case(attn_ctx *ctx, attn_ctx *ref, const bench_case *c, const bench_opts *o,
                    const report_ctx *r, int single) {
    attn_config cfg = {ATTN_F32, c->dtype, ATTN_F32, c->dim, c->dim_v, c->heads, c->kv_heads,
                       0};
    attn_status st = attn_supports(ctx, api_op(c->op), &cfg);
    if (st != ATTN_OK) {
        if (single) {
            fprintf(stderr, "attn bench: %s is not supported here: %s\n", bench_op_name(c->op),
                    attn_last_error());
            return is_argument_error(st) ? CLI_EXIT_USAGE : CLI_EXIT_FAIL;
        }
        report_skip(r, c, attn_last_error());
        return 0;
    }

    char err[512] = "";
    op_state *s = NULL;
    st = op_setup(&s, ctx, c, o->seed, err, sizeof err);
    if (st != ATTN_OK) {
        fprintf(stderr, "attn bench: %s: %s\n", bench_op_name(c->op), err);
        return is_argument_error(st) ? CLI_EXIT_USAGE : CLI_EXIT_FAIL;
    }
    const char *what = bench_op_name(c->op);
    bench_result res = {0};
    int rc = 0;
    /* decode reads the cache once per call: its ceiling is the bandwidth
     * measured beside it (before here, after the timed calls) */
    const int memory_bound = c->op == BENCH_DECODE && r->ceil;
    res.peak_gbps = memory_bound ? ceilings_read_gbps(r->threads) : NAN;
    rss_reset_peak();

    /* Warm-up: at least 2 calls and 0.1 s, or one call of 0.5 s or more. */
    double t, best = INFINITY, spent = 0.0;
    int warm = 0;
    do {
        if ((rc = timed_call(s, what, &t))) goto done;
        if (t < best) best = t;
        spent += t;
        warm++;
    } while (!(warm == 1 && t >= 0.5) && (warm < 2 || spent < 0.1) && warm < 20);

    int reps = o->repeats;
    if (reps <= 0) {
        double want = ceil(1.0 / (best > 1e-9 ? best : 1e-9));
        reps = want < 3 ? 3 : want > BENCH_MAX_REPEATS ? BENCH_MAX_REPEATS : (int)want;
    }
    double *times = malloc((size_t)reps * sizeof *times);
    if (!times) {
        fprintf(stderr, "attn bench: out of memory\n");
        rc = CLI_EXIT_FAIL;
        goto done;
    }
    for (int i = 0; i < reps; i++) {
        if ((rc = timed_call(s, what, &times[i]))) {
            free(times);
            goto done;
        }
    }
    res.peak_rss_bytes = rss_peak_bytes();
    if (memory_bound) {
        double after = ceilings_read_gbps(r->threads);
        if (!(res.peak_gbps >= after)) res.peak_gbps = after;
    }
    qsort(times, (size_t)reps, sizeof *times, cmp_double);
    double median = reps % 2 ? times[reps / 2] : 0.5 * (times[reps / 2 - 1] + times[reps / 2]);
    res.repeats = reps;
    res.median_ms = 1e3 * median;
    res.min_ms = 1e3 * times[0];
    res.gflops = count_flops(c) / median * 1e-9;
    res.gbps = count_bytes(c) / median * 1e-9;
    res.density = op_density(s);
    res.dense_ms = op_dense_ms(s);
    res.ns_per_token = bench_op_is_linear(c->op) ? median * 1e9 / ((double)c->batch * c->n) : NAN;
    if (bench_op_is_sparse(c->op)) /* the work done: the dense FLOPs times the density */
        res.gflops = 2.0 * (double)c->n * (double)c->m * (double)(c->dim + c->dim_v) *
                     (double)c->heads * res.density / median * 1e-9 *
                     (c->op == BENCH_NSA_BWD ? 2.5 : 1.0);
    free(times);

    res.rel_err = NAN;
    if (ref) {
        st = op_rel_err(s, ref, &res.rel_err, err, sizeof err);
        if (st != ATTN_OK) fprintf(stderr, "attn bench: %s: rel_err not measured: %s\n", what, err);
    }
    report_row(r, c, &res);
    if (o->max_rel_err >= 0.0 && !(res.rel_err <= o->max_rel_err)) {
        fprintf(stderr, "attn bench: %s: rel_err %.3g exceeds --max-rel-err %.3g\n", what,
                res.rel_err, o->max_rel_err);
        rc = CLI_EXIT_FAIL;
    }
done:
    op_free(s);
    return rc;
}

/* ------------------------------------------------------------- driver */

int cmd_bench(int argc, char **argv) {
    bench_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc < 0) return CLI_EXIT_OK; /* --help */
    if (rc) return rc;

    attn_ctx_options opt = attn_ctx_options_default();
    opt.threads = a.opts.threads;
    attn_ctx *ctx = NULL, *ref = NULL;
    attn_status st = attn_ctx_create(&ctx, &opt);
    if (st != ATTN_OK) {
        fprintf(stderr, "attn bench: cannot create a context: %s\n", attn_last_error());
        return is_argument_error(st) ? CLI_EXIT_USAGE : CLI_EXIT_FAIL;
    }
    if (a.opts.check) {
        attn_ctx_options ropt = opt;
        ropt.backend = ATTN_BACKEND_REF;
        ropt.isa = ATTN_ISA_AUTO;
        if (attn_ctx_create(&ref, &ropt) != ATTN_OK) {
            fprintf(stderr, "attn bench: no reference backend (%s); rel_err not measured\n",
                    attn_last_error());
            ref = NULL;
        }
    }

    ceilings ceil_buf;
    report_ctx r = {a.opts.json, attn_ctx_threads(ctx), attn_isa_name(attn_ctx_isa(ctx)),
                    attn_backend_name(attn_ctx_backend(ctx)), NULL};
    if (a.opts.ceilings) {
        if (!a.opts.json) {
            printf("measuring ceilings with %d threads ...\n", r.threads);
            fflush(stdout);
        }
        if (ceilings_measure(r.threads, &ceil_buf) == 0) r.ceil = &ceil_buf;
    }
    report_ceilings(&r);
    report_header(&r);

    if (a.have_op && a.c.op == BENCH_EFFICIENCY) {
        rc = linear_efficiency(ctx, &a.c, &a.opts, r.threads, r.isa);
    } else if (a.have_op) {
        rc = run_case(ctx, ref, &a.c, &a.opts, &r, 1);
    } else {
        bench_case cases[64];
        size_t count = quick_suite(cases);
        for (size_t i = 0; i < count; i++) {
            int one = run_case(ctx, ref, &cases[i], &a.opts, &r, 0);
            if (one && !rc) rc = one;
        }
        bench_case eff = suite_case(BENCH_EFFICIENCY, 8192, 8192, 8, 8, 64, 1, ATTN_F32);
        int one = linear_efficiency(ctx, &eff, &a.opts, r.threads, r.isa);
        if (one && !rc) rc = one;
    }
    attn_ctx_free(ref);
    attn_ctx_free(ctx);
    return rc;
}
