/* The context's fields, for the core and the engines. */
#ifndef ATTN_CONTEXT_H
#define ATTN_CONTEXT_H

#include "internal.h"
#include "cpu/kernels.h"

struct attn_ctx {
    attn_backend backend;      /* resolved: cpu or ref */
    attn_isa isa;              /* resolved */
    const attn_kernels *kernels;
    int threads;
    uint64_t seed;
};

bool attn_isa_available(attn_isa isa);

#endif
