/* attn cab: the CAB-style grid in C: every mechanism the library has, on the
 * four patterns (non-causal self, causal self, non-causal cross, causal
 * cross), over lengths; forward time, peak RSS, error against exact
 * attention, efficiency length. The same mechanisms and settings as the
 * Python registry (python/libattn/mechanisms.py), whose
 * `python -m libattn.bench` adds the float64 truth and the plots.
 *
 * Self patterns: N = M = L; cross: N = L/2 queries, M = L keys (causal cross
 * aligns the diagonal bottom-right). Inputs with locality: q and k are an
 * AR(1) sequence (lag-1 correlation 0.98) plus noise 0.5, v Gaussian. Error:
 * relative RMS of the whole output against attn_forward's (exact, f32). Time:
 * median of repeated calls (>= 3, ~0.3 s, at most 25), planning included. */
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { CAB_BLOCK = 64, CAB_WINDOW = 256, CAB_MAX_LENGTHS = 16, CAB_MAX_REPS = 25 };

typedef struct cab_problem {
    int64_t n, m, heads, dim;
    int causal;
    attn_tensor q, k, v, o;
} cab_problem;

typedef attn_status (*cab_fn)(attn_ctx *ctx, cab_problem *p);

typedef struct cab_mech {
    const char *name, *family;
    cab_fn run;
    int causal_only; /* runs the causal patterns only */
    int self_only;   /* needs N == M */
} cab_mech;

static int64_t cab_keep(int64_t m) { /* 1/8 of the key blocks, at least 2 */
    int64_t nkb = (m + CAB_BLOCK - 1) / CAB_BLOCK;
    int64_t k = (nkb + 7) / 8;
    if (k < 2) k = 2;
    return k < nkb ? k : nkb;
}

static attn_status cab_forward(attn_ctx *ctx, cab_problem *p, int64_t wl, int64_t wr,
                               const attn_plan *plan) {
    attn_params prm = attn_params_default();
    prm.causal = p->causal;
    prm.window_left = wl;
    prm.window_right = wr;
    prm.plan = plan;
    return attn_forward(ctx, &prm, &p->q, &p->k, &p->v, &p->o, NULL);
}

static attn_status run_exact(attn_ctx *ctx, cab_problem *p) {
    return cab_forward(ctx, p, -1, -1, NULL);
}

static attn_status run_window(attn_ctx *ctx, cab_problem *p) {
    return cab_forward(ctx, p, CAB_WINDOW, p->causal ? 0 : CAB_WINDOW, NULL);
}

static attn_status run_planned(attn_ctx *ctx, cab_problem *p, attn_status st, attn_plan *plan) {
    if (st == ATTN_OK) st = cab_forward(ctx, p, -1, -1, plan);
    attn_plan_free(plan);
    return st;
}

static attn_status run_static(attn_ctx *ctx, cab_problem *p) {
    attn_plan *plan = NULL;
    int64_t local = cab_keep(p->m) / 2;
    attn_status st = attn_plan_static(&plan, p->n, p->m, CAB_BLOCK, CAB_BLOCK,
                                      local < 1 ? 1 : local, 8, CAB_BLOCK);
    return run_planned(ctx, p, st, plan);
}

static attn_select_opts cab_select(const cab_problem *p) {
    attn_select_opts o;
    memset(&o, 0, sizeof o);
    o.block_q = o.block_k = CAB_BLOCK;
    o.keep_diagonal = 1;
    o.keep_first = 1;
    o.causal = p->causal;
    return o;
}

static attn_status run_topk(attn_ctx *ctx, cab_problem *p) {
    attn_plan *plan = NULL;
    attn_select_opts o = cab_select(p);
    o.top_k = cab_keep(p->m);
    attn_status st = attn_plan_select(ctx, &plan, &p->q, &p->k, &o);
    return run_planned(ctx, p, st, plan);
}

static attn_status run_mass(attn_ctx *ctx, cab_problem *p) {
    attn_plan *plan = NULL;
    attn_select_opts o = cab_select(p);
    o.mass = 0.9f;
    attn_status st = attn_plan_select(ctx, &plan, &p->q, &p->k, &o);
    return run_planned(ctx, p, st, plan);
}

static attn_status run_psa(attn_ctx *ctx, cab_problem *p) {
    static const float quota[3] = {1.0f / 16, 1.0f / 8, 1.0f / 4};
    attn_plan *plan = NULL;
    attn_select_opts o = cab_select(p);
    o.keep_first = 0;
    attn_status st = attn_plan_psa(ctx, &plan, &p->q, &p->k, &o, 3, quota);
    return run_planned(ctx, p, st, plan);
}

static attn_status run_linear_elu(attn_ctx *ctx, cab_problem *p) {
    attn_linear_params lp = attn_linear_params_default();
    lp.causal = p->causal;
    lp.scale = 1.0f;
    return attn_linear_attention(ctx, &lp, ATTN_PHI_ELU1, 1, 1e-6f, &p->q, &p->k, &p->v, &p->o);
}

/* The registry: one entry per mechanism. */
static const cab_mech cab_mechs[] = {
    {"exact", "exact", run_exact, 0, 0},
    {"window", "sparse", run_window, 0, 0},
    {"static", "sparse", run_static, 1, 0},
    {"topk", "sparse", run_topk, 0, 0},
    {"mass", "sparse", run_mass, 0, 0},
    {"psa", "sparse", run_psa, 0, 0},
    {"linear_elu", "linear", run_linear_elu, 0, 1},
};
enum { CAB_NMECH = (int)(sizeof cab_mechs / sizeof cab_mechs[0]) };

static const struct {
    const char *name;
    int causal, cross;
} cab_patterns[4] = {
    {"noncausal-self", 0, 0}, {"causal-self", 1, 0}, {"noncausal-cross", 0, 1},
    {"causal-cross", 1, 1}};

typedef struct cab_record {
    double ms, peak_mib, rel_err;
    int ran;
    char note[96];
} cab_record;

/* AR(1) rows of `heads * dim` values plus noise, written from row `from` on. */
static void cab_fill(float *x, int64_t rows, int64_t width, uint64_t seed) {
    float *eps = malloc((size_t)(rows * width) * sizeof *eps);
    if (!eps) return;
    fill_random(eps, ATTN_F32, (size_t)(rows * width), seed);
    const float a = 0.98f, s = sqrtf(1.0f - a * a);
    for (int64_t j = 0; j < width; j++) x[j] = eps[j];
    for (int64_t t = 1; t < rows; t++)
        for (int64_t j = 0; j < width; j++)
            x[t * width + j] = a * x[(t - 1) * width + j] + s * eps[t * width + j];
    free(eps);
}

static double cab_rel_rms(const float *a, const float *b, size_t count) {
    double num = 0, den = 0;
    for (size_t i = 0; i < count; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static int parse_list(const char *s, int64_t *out, int max) {
    int n = 0;
    while (*s && n < max) {
        char *end;
        long long v = strtoll(s, &end, 10);
        if (end == s || v < 16 || v > (1LL << 22)) return -1;
        out[n++] = v;
        if (*end == ',') end++;
        else if (*end) return -1;
        s = end;
    }
    return *s ? -1 : n;
}

static const char cab_usage[] =
    "usage: attn cab [options]\n"
    "  the CAB grid: every mechanism x {noncausal,causal} x {self,cross} x lengths\n"
    "  --lengths L,..   key lengths (default 256,1024,4096; >= 16)\n"
    "  --heads H        heads (default 8)\n"
    "  --dim D          head dim (default 64)\n"
    "  --threads T      threads (default: the library's default)\n"
    "  --json           one JSON object per line\n"
    "  (python -m libattn.bench runs the same grid with plots)\n";

int cmd_cab(int argc, char **argv) {
    int64_t lengths[CAB_MAX_LENGTHS] = {256, 1024, 4096};
    int nlen = 3, json = 0, threads = 0;
    int64_t heads = 8, dim = 64;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--json")) {
            json = 1;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(cab_usage, stdout);
            return CLI_EXIT_OK;
        } else if (i + 1 < argc && !strcmp(a, "--lengths")) {
            nlen = parse_list(argv[++i], lengths, CAB_MAX_LENGTHS);
            if (nlen <= 0) {
                fprintf(stderr, "attn cab: --lengths wants comma-separated integers in 16..4194304\n");
                return CLI_EXIT_USAGE;
            }
        } else if (i + 1 < argc && (!strcmp(a, "--heads") || !strcmp(a, "--dim") ||
                                    !strcmp(a, "--threads"))) {
            char *end;
            long long v = strtoll(argv[++i], &end, 10);
            if (*end || v < (a[2] == 't' ? 0 : 1) || v > 4096) {
                fprintf(stderr, "attn cab: bad value for %s\n", a);
                return CLI_EXIT_USAGE;
            }
            if (a[2] == 'h') heads = v;
            else if (a[2] == 'd') dim = v;
            else threads = (int)v;
        } else {
            fprintf(stderr, "attn cab: unknown or incomplete option '%s'\n\n%s", a, cab_usage);
            return CLI_EXIT_USAGE;
        }
    }
    attn_ctx_options opt = attn_ctx_options_default();
    opt.threads = threads;
    attn_ctx *ctx = NULL;
    if (attn_ctx_create(&ctx, &opt) != ATTN_OK) {
        fprintf(stderr, "attn cab: %s\n", attn_last_error());
        return CLI_EXIT_FAIL;
    }
    cab_record *rec = calloc((size_t)nlen * 4 * CAB_NMECH, sizeof *rec);
    if (!rec) {
        attn_ctx_free(ctx);
        return CLI_EXIT_FAIL;
    }
    if (!json)
        printf("attn cab: %d threads, H = %lld, D = %lld; self N = M = L, cross N = L/2, M = L\n",
               attn_ctx_threads(ctx), (long long)heads, (long long)dim);
    int rc = CLI_EXIT_OK, done = 0, total = nlen * 4 * CAB_NMECH;
    for (int li = 0; li < nlen && rc == CLI_EXIT_OK; li++) {
        for (int pi = 0; pi < 4 && rc == CLI_EXIT_OK; pi++) {
            cab_problem p;
            memset(&p, 0, sizeof p);
            p.m = lengths[li];
            p.n = cab_patterns[pi].cross ? p.m / 2 : p.m;
            p.heads = heads;
            p.dim = dim;
            p.causal = cab_patterns[pi].causal;
            size_t w = (size_t)(heads * dim), nq = (size_t)p.n * w, nk = (size_t)p.m * w;
            float *x = malloc(nk * sizeof *x), *noise = malloc(nk * sizeof *noise);
            float *q = malloc(nq * sizeof *q), *k = malloc(nk * sizeof *k);
            float *v = malloc(nk * sizeof *v), *o = malloc(nq * sizeof *o);
            float *ex = malloc(nq * sizeof *ex);
            if (!x || !noise || !q || !k || !v || !o || !ex) {
                fprintf(stderr, "attn cab: out of memory at L = %lld\n", (long long)p.m);
                rc = CLI_EXIT_FAIL;
            } else {
                uint64_t seed = 1000 + (uint64_t)p.m;
                cab_fill(x, p.m, (int64_t)w, seed);
                fill_random(noise, ATTN_F32, nk, seed + 1);
                for (size_t i = 0; i < nk; i++) k[i] = x[i] + 0.5f * noise[i];
                fill_random(noise, ATTN_F32, nk, seed + 2);
                for (size_t i = 0; i < nq; i++) q[i] = x[(nk - nq) + i] + 0.5f * noise[i];
                fill_random(v, ATTN_F32, nk, seed + 3);
                p.q = attn_tensor_4d(q, ATTN_F32, 1, p.n, heads, dim);
                p.k = attn_tensor_4d(k, ATTN_F32, 1, p.m, heads, dim);
                p.v = attn_tensor_4d(v, ATTN_F32, 1, p.m, heads, dim);
                p.o = attn_tensor_4d(ex, ATTN_F32, 1, p.n, heads, dim);
                if (run_exact(ctx, &p) != ATTN_OK) {
                    fprintf(stderr, "attn cab: exact: %s\n", attn_last_error());
                    rc = CLI_EXIT_FAIL;
                }
                p.o = attn_tensor_4d(o, ATTN_F32, 1, p.n, heads, dim);
            }
            for (int mi = 0; mi < CAB_NMECH && rc == CLI_EXIT_OK; mi++) {
                const cab_mech *me = &cab_mechs[mi];
                cab_record *r = &rec[((size_t)li * 4 + pi) * CAB_NMECH + mi];
                r->ms = r->peak_mib = r->rel_err = NAN;
                if ((me->causal_only && !p.causal) || (me->self_only && p.n != p.m)) {
                    snprintf(r->note, sizeof r->note, "pattern not supported");
                } else {
                    rss_reset_peak();
                    attn_status st = me->run(ctx, &p);
                    double peak = rss_peak_bytes();
                    if (st != ATTN_OK) {
                        snprintf(r->note, sizeof r->note, "error: %.80s", attn_last_error());
                    } else {
                        r->ran = 1;
                        r->peak_mib = peak >= 0 ? peak / 1048576.0 : NAN;
                        r->rel_err = mi == 0 ? NAN : cab_rel_rms(o, ex, nq); /* exact: the yardstick */
                        double times[CAB_MAX_REPS], start = now_seconds();
                        int reps = 0;
                        while (reps < 3 || (now_seconds() - start < 0.3 && reps < CAB_MAX_REPS)) {
                            double t0 = now_seconds();
                            me->run(ctx, &p);
                            times[reps++] = now_seconds() - t0;
                        }
                        for (int i = 1; i < reps; i++) /* insertion sort */
                            for (int j = i; j > 0 && times[j] < times[j - 1]; j--) {
                                double t = times[j];
                                times[j] = times[j - 1];
                                times[j - 1] = t;
                            }
                        r->ms = 1e3 * (reps % 2 ? times[reps / 2]
                                                : 0.5 * (times[reps / 2 - 1] + times[reps / 2]));
                    }
                }
                done++;
                if (!json) {
                    fprintf(stderr, "\r[%d/%d] %-10s %-15s L=%lld   ", done, total, me->name,
                            cab_patterns[pi].name, (long long)p.m);
                    fflush(stderr);
                }
            }
            free(x), free(noise), free(q), free(k), free(v), free(o), free(ex);
        }
    }
    if (!json) fputs("\n", stderr);
    if (rc == CLI_EXIT_OK && !json)
        printf("| mechanism | pattern | L | fwd ms | peak RSS MiB | rel err | eff. length |\n"
               "| --- | --- | --- | --- | --- | --- | --- |\n");
    for (int li = 0; li < nlen && rc == CLI_EXIT_OK; li++)
        for (int pi = 0; pi < 4; pi++)
            for (int mi = 0; mi < CAB_NMECH; mi++) {
                const cab_record *r = &rec[((size_t)li * 4 + pi) * CAB_NMECH + mi];
                /* efficiency length: from where the mechanism stays faster than exact */
                double eff = NAN;
                int last = -1;
                for (int l = nlen - 1; l >= 0; l--) {
                    const cab_record *a = &rec[((size_t)l * 4 + pi) * CAB_NMECH + mi];
                    const cab_record *e = &rec[((size_t)l * 4 + pi) * CAB_NMECH];
                    if (!a->ran || !e->ran || !(a->ms < e->ms)) break;
                    last = l;
                }
                if (last == 0) {
                    eff = (double)lengths[0];
                } else if (last > 0) {
                    const cab_record *a0 = &rec[((size_t)(last - 1) * 4 + pi) * CAB_NMECH + mi];
                    const cab_record *e0 = &rec[((size_t)(last - 1) * 4 + pi) * CAB_NMECH];
                    const cab_record *a1 = &rec[((size_t)last * 4 + pi) * CAB_NMECH + mi];
                    const cab_record *e1 = &rec[((size_t)last * 4 + pi) * CAB_NMECH];
                    if (a0->ran && e0->ran) {
                        double r0 = log(a0->ms / e0->ms), r1 = log(a1->ms / e1->ms);
                        double f = r0 / (r0 - r1);
                        eff = exp(log((double)lengths[last - 1]) +
                                  f * (log((double)lengths[last]) - log((double)lengths[last - 1])));
                    } else {
                        eff = (double)lengths[last];
                    }
                }
                const char *mech = cab_mechs[mi].name, *pat = cab_patterns[pi].name;
                long long L = (long long)lengths[li];
                if (json) {
                    printf("{\"mechanism\": \"%s\", \"family\": \"%s\", \"pattern\": \"%s\", "
                           "\"length\": %lld, ", mech, cab_mechs[mi].family, pat, L);
                    if (r->ran && mi == 0)
                        printf("\"fwd_ms\": %.4f, \"peak_rss_mib\": %.1f, \"rel_err\": null, ",
                               r->ms, r->peak_mib);
                    else if (r->ran)
                        printf("\"fwd_ms\": %.4f, \"peak_rss_mib\": %.1f, \"rel_err\": %.3e, ",
                               r->ms, r->peak_mib, r->rel_err);
                    else
                        printf("\"fwd_ms\": null, \"peak_rss_mib\": null, \"rel_err\": null, ");
                    if (mi > 0 && !isnan(eff)) printf("\"efficiency_length\": %.0f, ", eff);
                    else printf("\"efficiency_length\": null, ");
                    printf("\"note\": \"%s\"}\n", r->note);
                } else if (r->ran) {
                    char effs[32] = "";
                    if (mi > 0) {
                        if (isnan(eff)) snprintf(effs, sizeof effs, "not faster");
                        else if (eff == (double)lengths[0]) snprintf(effs, sizeof effs, "<= %.0f", eff);
                        else snprintf(effs, sizeof effs, "%.0f", eff);
                    }
                    char errs[32] = "";
                    if (mi > 0) snprintf(errs, sizeof errs, "%.2e", r->rel_err);
                    printf("| %s | %s | %lld | %.3f | %.1f | %s | %s |\n", mech, pat, L, r->ms,
                           r->peak_mib, errs, effs);
                } else {
                    printf("| %s | %s | %lld | | | | | %s\n", mech, pat, L, r->note);
                }
            }
    free(rec);
    attn_ctx_free(ctx);
    return rc;
}
