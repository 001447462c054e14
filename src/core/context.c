/* The context: backend, ISA, thread count and seed, resolved once from the
 * options and the environment (ATTN_BACKEND, ATTN_ISA, ATTN_NUM_THREADS). */
#include "context.h"

#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

attn_ctx_options attn_ctx_options_default(void) {
    attn_ctx_options o;
    memset(&o, 0, sizeof o);
    return o;
}

static attn_status backend_from_env(attn_backend *out) {
    const char *s = getenv("ATTN_BACKEND");
    if (!s || !*s) return *out = ATTN_BACKEND_CPU, ATTN_OK;
    if (!strcmp(s, "cpu")) return *out = ATTN_BACKEND_CPU, ATTN_OK;
    if (!strcmp(s, "ref")) return *out = ATTN_BACKEND_REF, ATTN_OK;
    return attn_err(ATTN_ERR_ARG, "ATTN_BACKEND='%s' must be 'cpu' or 'ref'", s);
}

static attn_status isa_from_env(attn_isa *out) {
    const char *s = getenv("ATTN_ISA");
    if (!s || !*s) return *out = attn_isa_detected(), ATTN_OK;
    static const attn_isa all[] = {ATTN_ISA_SCALAR, ATTN_ISA_AVX2, ATTN_ISA_AVX512,
                                   ATTN_ISA_NEON};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (!strcmp(s, attn_isa_name(all[i]))) return *out = all[i], ATTN_OK;
    return attn_err(ATTN_ERR_ARG, "ATTN_ISA='%s' must be scalar, avx2, avx512 or neon", s);
}

static int default_threads(void) {
    const char *s = getenv("ATTN_NUM_THREADS");
    if (s && *s) {
        char *end;
        long t = strtol(s, &end, 10);
        if (*end == '\0' && t >= 1 && t <= 4096) return (int)t;
        return -1;
    }
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

attn_status attn_ctx_create(attn_ctx **out, const attn_ctx_options *opt) {
    attn_clear_error();
    if (!out) return attn_err(ATTN_ERR_NULL, "out must not be NULL");
    *out = NULL;
    attn_ctx_options o = opt ? *opt : attn_ctx_options_default();
    attn_status st;

    attn_backend backend = o.backend;
    if (backend == ATTN_BACKEND_AUTO) {
        if ((st = backend_from_env(&backend)) != ATTN_OK) return st;
    } else if (backend != ATTN_BACKEND_CPU && backend != ATTN_BACKEND_REF) {
        return attn_err(ATTN_ERR_ARG, "opt->backend (%d) is not an attn_backend", (int)backend);
    }

    attn_isa isa = o.isa;
    if (isa == ATTN_ISA_AUTO) {
        if ((st = isa_from_env(&isa)) != ATTN_OK) return st;
    } else if (isa < ATTN_ISA_SCALAR || isa > ATTN_ISA_NEON) {
        return attn_err(ATTN_ERR_ARG, "opt->isa (%d) is not an attn_isa", (int)isa);
    }
    const attn_kernels *k = attn_kernels_for(isa);
    if (!k || !attn_isa_available(isa))
        return attn_err(ATTN_ERR_UNSUPPORTED,
                        "isa '%s' is not available on this machine (best: %s)",
                        attn_isa_name(isa), attn_isa_name(attn_isa_detected()));

    int threads = o.threads;
    if (threads < 0) return attn_err(ATTN_ERR_ARG, "opt->threads (%d) must be >= 0", threads);
    if (threads == 0) {
        threads = default_threads();
        if (threads < 1)
            return attn_err(ATTN_ERR_ARG, "ATTN_NUM_THREADS must be an integer in 1..4096");
    }

    attn_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return attn_err(ATTN_ERR_NOMEM, "out of memory allocating the context");
    ctx->backend = backend;
    ctx->isa = isa;
    ctx->kernels = k;
    ctx->threads = threads;
    ctx->seed = o.seed;
    *out = ctx;
    return ATTN_OK;
}

void attn_ctx_free(attn_ctx *ctx) { free(ctx); }

int attn_ctx_threads(const attn_ctx *ctx) { return ctx ? ctx->threads : 0; }
attn_backend attn_ctx_backend(const attn_ctx *ctx) {
    return ctx ? ctx->backend : ATTN_BACKEND_AUTO;
}
attn_isa attn_ctx_isa(const attn_ctx *ctx) { return ctx ? ctx->isa : ATTN_ISA_AUTO; }

const char *attn_backend_name(attn_backend b) {
    switch (b) {
    case ATTN_BACKEND_AUTO: return "auto";
    case ATTN_BACKEND_CPU: return "cpu";
    case ATTN_BACKEND_REF: return "ref";
    }
    return "invalid";
}
