/* Which micro-kernel table serves which ISA in this build. */
#include "internal.h"
#include "cpu/kernels.h"

const attn_kernels *attn_kernels_for(attn_isa isa) {
    switch (isa) {
    case ATTN_ISA_SCALAR: return &attn_kernels_scalar;
#if defined(__x86_64__) || defined(__i386__)
    case ATTN_ISA_AVX2: return &attn_kernels_avx2;
    case ATTN_ISA_AVX512: return &attn_kernels_avx512;
#endif
#if defined(__aarch64__)
    case ATTN_ISA_NEON: return &attn_kernels_neon;
#endif
    default: return NULL;
    }
}
