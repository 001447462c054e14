/* attn info: version, CPU features, what a default context chooses, and what
 * the library supports here (nothing falls back silently: this is where a
 * missing path shows). */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *env_or_unset(const char *name) {
    const char *v = getenv(name);
    return v ? v : "(unset)";
}

static void print_isas(void) {
    static const attn_isa isas[] = {ATTN_ISA_SCALAR, ATTN_ISA_AVX2, ATTN_ISA_AVX512,
                                    ATTN_ISA_NEON};
    printf("ISAs (a context created with each):\n");
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        attn_ctx_options opt = attn_ctx_options_default();
        opt.isa = isas[i];
        opt.backend = ATTN_BACKEND_CPU;
        opt.threads = 1;
        attn_ctx *ctx = NULL;
        attn_status st = attn_ctx_create(&ctx, &opt);
        if (st == ATTN_OK)
            printf("  %-8s available\n", attn_isa_name(isas[i]));
        else
            printf("  %-8s not available: %s\n", attn_isa_name(isas[i]), attn_last_error());
        attn_ctx_free(ctx);
    }
}

static void print_support(const attn_ctx *ctx) {
    static const attn_dtype dtypes[] = {ATTN_F32, ATTN_F16, ATTN_BF16};
    static const struct {
        attn_op op;
        const char *name;
    } ops[] = {{ATTN_OP_FORWARD, "forward"},
               {ATTN_OP_BACKWARD, "backward"},
               {ATTN_OP_DECODE, "decode"},
               {ATTN_OP_LSE_MERGE, "lse_merge"},
               {ATTN_OP_LINEAR_FORWARD, "linear_fwd"},
               {ATTN_OP_LINEAR_BACKWARD, "linear_bwd"},
               {ATTN_OP_LINEAR_DECODE, "linear_dec"}};
    static const int64_t dims[] = {64, 128, 256};

    printf("support with this context (Q and O f32, H = Hk = 8; columns: dtype of K and V):\n");
    printf("  %-10s %4s  %-6s %-6s %-6s\n", "op", "D", "f32", "f16", "bf16");
    char reasons[12][400];
    int nreasons = 0;
    for (size_t o = 0; o < sizeof ops / sizeof ops[0]; o++) {
        for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++) {
            printf("  %-10s %4lld ", ops[o].name, (long long)dims[d]);
            for (size_t t = 0; t < sizeof dtypes / sizeof dtypes[0]; t++) {
                attn_config cfg = {ATTN_F32, dtypes[t], ATTN_F32, dims[d], dims[d], 8, 8, 0};
                if (ops[o].op == ATTN_OP_LSE_MERGE) cfg.kv_dtype = ATTN_F32;
                attn_status st = attn_supports(ctx, ops[o].op, &cfg);
                if (st == ATTN_OK) {
                    printf(" %-6s", "yes");
                } else {
                    char mark[16];
                    int found = -1;
                    for (int r = 0; r < nreasons; r++)
                        if (!strcmp(reasons[r], attn_last_error())) found = r;
                    if (found < 0 && nreasons < 12) {
                        snprintf(reasons[nreasons], sizeof reasons[0], "%s", attn_last_error());
                        found = nreasons++;
                    }
                    snprintf(mark, sizeof mark, "no[%d]", found + 1);
                    printf(" %-6s", mark);
                }
                if (ops[o].op == ATTN_OP_LSE_MERGE) break; /* dtype of K/V does not apply */
            }
            printf("\n");
        }
    }
    for (int r = 0; r < nreasons; r++) printf("  [%d] %s\n", r + 1, reasons[r]);
}

int cmd_info(int argc, char **argv) {
    (void)argv;
    if (argc > 0) {
        fprintf(stderr, "attn info: takes no arguments\n");
        return CLI_EXIT_USAGE;
    }
    printf("libattn %s (version number %d, header %d)\n", attn_version(),
           attn_version_number(), ATTN_VERSION_NUMBER);
    printf("CPU: %d online cores; best ISA detected (cpuid + OS): %s\n", online_cpus(),
           attn_isa_name(attn_isa_detected()));
    printf("environment: ATTN_BACKEND=%s ATTN_ISA=%s ATTN_NUM_THREADS=%s\n",
           env_or_unset("ATTN_BACKEND"), env_or_unset("ATTN_ISA"),
           env_or_unset("ATTN_NUM_THREADS"));

    attn_ctx *ctx = NULL;
    attn_status st = attn_ctx_create(&ctx, NULL);
    if (st != ATTN_OK) {
        printf("default context: cannot be created: %s\n", attn_last_error());
        fprintf(stderr, "attn info: %s\n", attn_last_error());
        print_isas();
        return CLI_EXIT_FAIL;
    }
    printf("default context: backend %s, isa %s, %d threads\n",
           attn_backend_name(attn_ctx_backend(ctx)), attn_isa_name(attn_ctx_isa(ctx)),
           attn_ctx_threads(ctx));
    print_isas();
    print_support(ctx);
    attn_ctx_free(ctx);
    return CLI_EXIT_OK;
}
