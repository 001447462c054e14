/* Run-time CPU feature detection: cpuid for what the CPU has, xgetbv for
 * what the OS saves on context switch (wide registers are useless without it). */
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t read_xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static attn_isa detect(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return ATTN_ISA_SCALAR;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1,
        f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return ATTN_ISA_SCALAR;
    uint64_t xcr0 = read_xcr0();
    int os_ymm = (xcr0 & 0x6) == 0x6;            /* SSE + AVX state */
    int os_zmm = (xcr0 & 0xe6) == 0xe6;          /* + opmask, ZMM hi256, hi16 */
    if (__get_cpuid_max(0, NULL) < 7) return ATTN_ISA_SCALAR;
    __cpuid_count(7, 0, a, b, c, d);
    int avx2 = (b >> 5) & 1;
    int avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
        avx512vl = (b >> 31) & 1;
    if (os_zmm && avx512f && avx512dq && avx512bw && avx512vl && fma && f16c)
        return ATTN_ISA_AVX512;
    if (os_ymm && avx2 && fma && f16c) return ATTN_ISA_AVX2;
    return ATTN_ISA_SCALAR;
}
#elif defined(__aarch64__)
static attn_isa detect(void) { return ATTN_ISA_NEON; } /* NEON is baseline on aarch64 */
#else
static attn_isa detect(void) { return ATTN_ISA_SCALAR; }
#endif

attn_isa attn_isa_detected(void) {
    static attn_isa cached = ATTN_ISA_AUTO;
    if (cached == ATTN_ISA_AUTO) cached = detect();
    return cached;
}

/* Whether the machine can run isa (an ISA runs everything below it). */
bool attn_isa_available(attn_isa isa) {
    attn_isa best = attn_isa_detected();
    switch (isa) {
    case ATTN_ISA_SCALAR: return true;
    case ATTN_ISA_AVX2: return best == ATTN_ISA_AVX2 || best == ATTN_ISA_AVX512;
    case ATTN_ISA_AVX512: return best == ATTN_ISA_AVX512;
    case ATTN_ISA_NEON: return best == ATTN_ISA_NEON;
    default: return false;
    }
}

const char *attn_isa_name(attn_isa isa) {
    switch (isa) {
    case ATTN_ISA_AUTO: return "auto";
    case ATTN_ISA_SCALAR: return "scalar";
    case ATTN_ISA_AVX2: return "avx2";
    case ATTN_ISA_AVX512: return "avx512";
    case ATTN_ISA_NEON: return "neon";
    }
    return "invalid";
}
