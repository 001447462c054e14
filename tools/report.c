/* Output of attn bench: a readable table, or one JSON object per line. */
#include "cli.h"

#include <math.h>
#include <stdio.h>

static void json_num(const char *key, double v, int last) {
    if (isfinite(v))
        printf("\"%s\": %.6g%s", key, v, last ? "" : ", ");
    else
        printf("\"%s\": null%s", key, last ? "" : ", ");
}

static void json_int(const char *key, long long v) { printf("\"%s\": %lld, ", key, v); }

static void json_str(const char *key, const char *v) {
    printf("\"%s\": \"", key);
    for (const char *p = v ? v : ""; *p; p++) {
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if ((unsigned char)*p < 0x20)
            printf("\\u%04x", (unsigned)(unsigned char)*p);
        else
            putchar(*p);
    }
    printf("\", ");
}

void report_ceilings(const report_ctx *r) {
    const ceilings *c = r->ceil;
    if (!c) return;
    /* In JSON mode stdout holds only measurements: the ceilings go to stderr
     * (every measurement carries peak_gflops and peak_gbps). */
    FILE *f = r->json ? stderr : stdout;
    fprintf(f, "ceilings (%d threads, measured now):\n", c->threads);
    fprintf(f, "  f32 FMA peak      %9.1f GFLOP/s  (%s kernel; all threads at once %.1f, "
               "one thread %.1f)\n",
            c->fma_gflops, c->kernel, c->fma_all_gflops, c->fma_one_gflops);
    if (c->fma_all_gflops < 0.8 * c->fma_gflops)
        fprintf(f, "  warning: all threads together reached only %.0f%% of threads x one "
                   "thread: the cores look busy with other work, timings may be noisy\n",
                100.0 * c->fma_all_gflops / c->fma_gflops);
    fprintf(f, "  memory read       %9.1f GB/s     (sum of a 1 GiB f32 array)\n", c->read_gbps);
    fprintf(f, "  memory copy       %9.1f GB/s     (read + write)\n", c->copy_gbps);
    fprintf(f, "  memory triad      %9.1f GB/s     (a = b + s*c)\n", c->triad_gbps);
    fflush(f);
}

void report_header(const report_ctx *r) {
    if (r->json) return;
    printf("libattn %s, backend %s, isa %s, %d threads\n", attn_version(), r->backend, r->isa,
           r->threads);
    printf("%-13s %2s %6s %7s %3s %3s %4s %4s %-9s %-4s %9s %8s %6s %8s %6s %8s %9s\n", "op",
           "B", "N", "M", "H", "Hk", "D", "Dv", "mask", "kv", "ms", "GFLOP/s", "%peak", "GB/s",
           "%bw", "RSS MiB", "rel_err");
    fflush(stdout);
}

static void mask_text(const bench_case *c, char *buf, size_t len) {
    if (c->window_left >= 0 || c->window_right >= 0)
        snprintf(buf, len, "%sw%lld,%lld", c->causal ? "c" : "", (long long)c->window_left,
                 (long long)c->window_right);
    else
        snprintf(buf, len, "%s", c->causal ? "causal" : "none");
}

static void num_or_dash(char *buf, size_t len, const char *fmt, double v) {
    if (isfinite(v))
        snprintf(buf, len, fmt, v);
    else
        snprintf(buf, len, "-");
}

void report_row(const report_ctx *r, const bench_case *c, const bench_result *res) {
    double peak = r->ceil ? r->ceil->fma_gflops : NAN;
    double bw_start = r->ceil ? r->ceil->read_gbps : NAN;
    double bw = isfinite(res->peak_gbps) ? res->peak_gbps : bw_start;
    double pct_peak = 100.0 * res->gflops / peak;
    double pct_bw = 100.0 * res->gbps / bw;
    if (r->json) {
        printf("{");
        json_str("op", bench_op_name(c->op));
        json_int("batch", c->batch);
        json_int("n", c->n);
        json_int("m", c->m);
        json_int("heads", c->heads);
        json_int("kv_heads", c->kv_heads);
        json_int("dim", c->dim);
        json_int("dim_v", c->dim_v);
        printf("\"causal\": %s, ", c->causal ? "true" : "false");
        json_int("window_left", c->window_left);
        json_int("window_right", c->window_right);
        json_str("dtype", attn_dtype_name(c->dtype));
        json_int("threads", r->threads);
        json_str("isa", r->isa);
        json_str("backend", r->backend);
        json_int("repeats", res->repeats);
        json_num("median_ms", res->median_ms, 0);
        json_num("min_ms", res->min_ms, 0);
        json_num("gflops", res->gflops, 0);
        json_num("peak_gflops", peak, 0);
        json_num("pct_peak", pct_peak, 0);
        json_num("gbps", res->gbps, 0);
        json_num("peak_gbps", bw, 0);
        json_num("peak_gbps_start", bw_start, 0);
        json_num("pct_bandwidth", pct_bw, 0);
        if (res->peak_rss_bytes >= 0)
            printf("\"peak_rss_bytes\": %.0f, ", res->peak_rss_bytes);
        else
            printf("\"peak_rss_bytes\": null, ");
        if (isfinite(res->ns_per_token)) json_num("ns_per_token", res->ns_per_token, 0);
        if (isfinite(res->density)) {
            json_num("density", res->density, 0);
            json_num("dense_ms", res->dense_ms, 0);
        }
        json_num("rel_err", res->rel_err, 1);
        printf("}\n");
    } else {
        char mask[48], pk[16], pb[16], err[16], rss[16];
        mask_text(c, mask, sizeof mask);
        num_or_dash(pk, sizeof pk, "%.1f", pct_peak);
        num_or_dash(pb, sizeof pb, "%.1f", pct_bw);
        num_or_dash(err, sizeof err, "%.2e", res->rel_err);
        num_or_dash(rss, sizeof rss, "%.0f",
                    res->peak_rss_bytes >= 0 ? res->peak_rss_bytes / (1024.0 * 1024.0) : NAN);
        printf("%-13s %2lld %6lld %7lld %3lld %3lld %4lld %4lld %-9s %-4s %9.3f %8.1f %6s "
               "%8.1f %6s %8s %9s\n",
               bench_op_name(c->op), (long long)c->batch, (long long)c->n, (long long)c->m,
               (long long)c->heads, (long long)c->kv_heads, (long long)c->dim,
               (long long)c->dim_v, mask, attn_dtype_name(c->dtype), res->median_ms,
               res->gflops, pk, res->gbps, pb, rss, err);
        if (isfinite(res->ns_per_token))
            printf("%13s %.1f ns per token (all heads)\n", "", res->ns_per_token);
        if (isfinite(res->density))
            printf("%13s density %.3f of the dense work; dense forward %.3f ms (%.2fx)\n", "",
                   res->density, res->dense_ms, res->dense_ms / res->median_ms);
    }
    fflush(stdout);
}

void report_skip(const report_ctx *r, const bench_case *c, const char *why) {
    if (r->json) {
        fprintf(stderr, "attn bench: skipped %s (n %lld, m %lld, dim %lld, %s): %s\n",
                bench_op_name(c->op), (long long)c->n, (long long)c->m, (long long)c->dim,
                attn_dtype_name(c->dtype), why);
        return;
    }
    char mask[48];
    mask_text(c, mask, sizeof mask);
    printf("%-13s %2lld %6lld %7lld %3lld %3lld %4lld %4lld %-9s %-4s skipped: %s\n",
           bench_op_name(c->op), (long long)c->batch, (long long)c->n, (long long)c->m,
           (long long)c->heads, (long long)c->kv_heads, (long long)c->dim,
           (long long)c->dim_v, mask, attn_dtype_name(c->dtype), why);
    fflush(stdout);
}
