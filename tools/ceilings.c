/* Machine ceilings measured by the benchmark itself: the denominators of every
 * percentage it prints.
 *
 * FMA peak: each thread runs many independent FMA chains on registers (16 zmm
 * or 12 ymm accumulators: enough to cover 2 FMA pipes x 4-cycle latency); the
 * kernel is picked by attn_isa_detected(). GFLOP/s = 2 * FMAs / s, best of
 * several runs of ~0.2 s, with all threads and with one (see ceilings_measure).
 * Bandwidth: a read stream summing a 1 GiB f32 array with all threads (best of
 * a few passes), plus copy and triad figures counted as STREAM does. */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"

#include <omp.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define CEIL_X86 1
#include <immintrin.h>
#elif defined(__aarch64__)
#define CEIL_NEON 1
#include <arm_neon.h>
#endif

#define FMA_A 0.99999994f /* chains converge to b / (1 - a): no overflow, no denormals */
#define FMA_B 1e-7f

/* ------------------------------------------------------------- FMA kernels */

#ifdef CEIL_X86
#define CHAIN16(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) \
                    OP(8) OP(9) OP(10) OP(11) OP(12) OP(13) OP(14) OP(15)
#define CHAIN12(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)

__attribute__((target("avx512f"))) static float fma_avx512(long iters) {
    const __m512 a = _mm512_set1_ps(FMA_A), b = _mm512_set1_ps(FMA_B);
#define DECL(i) __m512 c##i = _mm512_set1_ps(0.001f * (float)(i));
#define STEP(i) c##i = _mm512_fmadd_ps(c##i, a, b);
#define SUM(i) s = _mm512_add_ps(s, c##i);
    CHAIN16(DECL)
    for (long it = 0; it < iters; it++) {
        CHAIN16(STEP)
    }
    __m512 s = _mm512_setzero_ps();
    CHAIN16(SUM)
#undef DECL
#undef STEP
#undef SUM
    return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) static float fma_avx2(long iters) {
    const __m256 a = _mm256_set1_ps(FMA_A), b = _mm256_set1_ps(FMA_B);
#define DECL(i) __m256 c##i = _mm256_set1_ps(0.001f * (float)(i));
#define STEP(i) c##i = _mm256_fmadd_ps(c##i, a, b);
#define SUM(i) s = _mm256_add_ps(s, c##i);
    CHAIN12(DECL)
    for (long it = 0; it < iters; it++) {
        CHAIN12(STEP)
    }
    __m256 s = _mm256_setzero_ps();
    CHAIN12(SUM)
#undef DECL
#undef STEP
#undef SUM
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}
#endif

#ifdef CEIL_NEON
static float fma_neon(long iters) {
    const float32x4_t a = vdupq_n_f32(FMA_A), b = vdupq_n_f32(FMA_B);
    float32x4_t c[16];
    for (int i = 0; i < 16; i++) c[i] = vdupq_n_f32(0.001f * (float)i);
    for (long it = 0; it < iters; it++) {
        for (int i = 0; i < 16; i++) c[i] = vfmaq_f32(b, c[i], a);
    }
    float32x4_t s = vdupq_n_f32(0.0f);
    for (int i = 0; i < 16; i++) s = vaddq_f32(s, c[i]);
    return vaddvq_f32(s);
}
#endif

static float fma_scalar(long iters) {
    float c[8];
    for (int i = 0; i < 8; i++) c[i] = 0.001f * (float)i;
    for (long it = 0; it < iters; it++) {
        for (int i = 0; i < 8; i++) c[i] = c[i] * FMA_A + FMA_B;
    }
    return c[0] + c[1] + c[2] + c[3] + c[4] + c[5] + c[6] + c[7];
}

typedef float (*fma_fn)(long iters);

typedef struct fma_kernel {
    const char *name;
    fma_fn fn;
    double fmas_per_iter; /* chains x lanes */
} fma_kernel;

static fma_kernel pick_fma_kernel(void) {
    attn_isa isa = attn_isa_detected();
    (void)isa;
#ifdef CEIL_X86
    if (isa == ATTN_ISA_AVX512) return (fma_kernel){"avx512", fma_avx512, 16.0 * 16.0};
    if (isa == ATTN_ISA_AVX2) return (fma_kernel){"avx2", fma_avx2, 12.0 * 8.0};
#endif
#ifdef CEIL_NEON
    return (fma_kernel){"neon", fma_neon, 16.0 * 4.0};
#endif
    return (fma_kernel){"scalar", fma_scalar, 8.0};
}

static volatile float g_sink;

/* Seconds for every thread to run iters iterations. */
static double time_fma(fma_kernel k, int threads, long iters) {
    float sink = 0.0f;
    double t0 = now_seconds();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    sink += k.fn(iters);
    double t = now_seconds() - t0;
    g_sink = sink;
    return t;
}

/* Best GFLOP/s of `runs` runs of ~0.2 s with `threads` threads. */
static double measure_fma(fma_kernel k, int threads, int runs) {
    long iters = 1 << 14;
    double t = time_fma(k, threads, iters); /* starts the thread team */
    while ((t = time_fma(k, threads, iters)) < 0.02 && iters < (1L << 40)) iters *= 4;
    double scaled = (double)iters * 0.2 / (t > 0 ? t : 1e-9);
    iters = scaled > 1.0 ? (long)scaled : 1;
    double best = 0.0;
    for (int r = 0; r < runs; r++) {
        t = time_fma(k, threads, iters);
        double gflops = 2.0 * k.fmas_per_iter * (double)iters * threads / t * 1e-9;
        if (gflops > best) best = gflops;
    }
    return best;
}

/* ------------------------------------------------------------- bandwidth */

#ifdef CEIL_X86
__attribute__((target("avx512f"))) static float sum_avx512(const float *x, size_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_add_ps(s0, _mm512_load_ps(x + i));
        s1 = _mm512_add_ps(s1, _mm512_load_ps(x + i + 16));
        s2 = _mm512_add_ps(s2, _mm512_load_ps(x + i + 32));
        s3 = _mm512_add_ps(s3, _mm512_load_ps(x + i + 48));
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    for (; i < n; i++) s += x[i];
    return s;
}

__attribute__((target("avx2"))) static float sum_avx2(const float *x, size_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_add_ps(s0, _mm256_load_ps(x + i));
        s1 = _mm256_add_ps(s1, _mm256_load_ps(x + i + 8));
        s2 = _mm256_add_ps(s2, _mm256_load_ps(x + i + 16));
        s3 = _mm256_add_ps(s3, _mm256_load_ps(x + i + 24));
    }
    float out[8];
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    float s = out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
    for (; i < n; i++) s += x[i];
    return s;
}
#endif

static float sum_scalar(const float *x, size_t n) {
    float s[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += x[i + j];
    for (; i < n; i++) s[0] += x[i];
    return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

typedef float (*sum_fn)(const float *x, size_t n);

static sum_fn pick_sum(void) {
#ifdef CEIL_X86
    attn_isa isa = attn_isa_detected();
    if (isa == ATTN_ISA_AVX512) return sum_avx512;
    if (isa == ATTN_ISA_AVX2) return sum_avx2;
#endif
    return sum_scalar;
}

/* Thread t's share [lo, hi) of n elements, 64-element aligned. */
static void share(size_t n, int t, int threads, size_t *lo, size_t *hi) {
    size_t blocks = n / 64, per = blocks / (size_t)threads, extra = blocks % (size_t)threads;
    size_t b0 = (size_t)t * per + ((size_t)t < extra ? (size_t)t : extra);
    size_t b1 = b0 + per + ((size_t)t < extra ? 1 : 0);
    *lo = b0 * 64;
    *hi = (size_t)t == (size_t)threads - 1 ? n : b1 * 64;
}

#define BW_BYTES ((size_t)1 << 30)

/* Best GB/s of `passes` read streams over x (n floats) with `threads` threads. */
static double read_stream_gbps(const float *x, size_t n, int threads, int passes) {
    sum_fn sum = pick_sum();
    double best = 0.0;
    for (int pass = 0; pass < passes; pass++) {
        float total = 0.0f;
        double t0 = now_seconds();
#pragma omp parallel num_threads(threads) reduction(+ : total)
        {
            size_t lo, hi;
            share(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
            total += sum(x + lo, hi - lo);
        }
        double t = now_seconds() - t0;
        g_sink = total;
        double gbps = (double)(n * sizeof(float)) / t * 1e-9;
        if (gbps > best) best = gbps;
    }
    return best;
}

/* A 1 GiB f32 array, first touched by the threads that will read each part. */
static float *bandwidth_array(int threads) {
    size_t n = BW_BYTES / sizeof(float);
    float *x = aligned_alloc(64, BW_BYTES);
    if (!x) {
        fprintf(stderr, "attn bench: cannot allocate 1 GiB to measure memory bandwidth\n");
        return NULL;
    }
#pragma omp parallel num_threads(threads)
    {
        size_t lo, hi;
        share(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        for (size_t i = lo; i < hi; i++) x[i] = 1.0f;
    }
    return x;
}

double ceilings_read_gbps(int threads) {
    float *x = bandwidth_array(threads);
    if (!x) return NAN;
    double gbps = read_stream_gbps(x, BW_BYTES / sizeof(float), threads, 5);
    free(x);
    return gbps;
}

static int measure_bandwidth(int threads, ceilings *out) {
    size_t n = BW_BYTES / sizeof(float);
    float *x = bandwidth_array(threads);
    if (!x) return -1;
    out->read_gbps = read_stream_gbps(x, n, threads, 5);

    /* Copy: first half into second half; bytes = read + written. */
    size_t half = n / 2;
    double best = 0.0;
    for (int pass = 0; pass < 3; pass++) {
        double t0 = now_seconds();
#pragma omp parallel num_threads(threads)
        {
            size_t lo, hi;
            share(half, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
            memcpy(x + half + lo, x + lo, (hi - lo) * sizeof(float));
        }
        double t = now_seconds() - t0;
        double gbps = 2.0 * (double)half * sizeof(float) / t * 1e-9;
        if (gbps > best) best = gbps;
    }
    out->copy_gbps = best;

    /* Triad over thirds: a = b + s * c; bytes = 2 read + 1 written. */
    size_t third = n / 3 / 64 * 64;
    float *a = x, *b = x + third, *c = x + 2 * third;
    const float scalar = 0.5f;
    best = 0.0;
    for (int pass = 0; pass < 3; pass++) {
        double t0 = now_seconds();
#pragma omp parallel for simd num_threads(threads) schedule(static)
        for (size_t i = 0; i < third; i++) a[i] = b[i] + scalar * c[i];
        double t = now_seconds() - t0;
        double gbps = 3.0 * (double)third * sizeof(float) / t * 1e-9;
        if (gbps > best) best = gbps;
    }
    out->triad_gbps = best;
    g_sink = a[third / 2];

    free(x);
    return 0;
}

int ceilings_measure(int threads, ceilings *out) {
    memset(out, 0, sizeof *out);
    if (threads < 1) threads = 1;
    out->threads = threads;
    fma_kernel k = pick_fma_kernel();
    out->kernel = k.name;
    out->fma_all_gflops = measure_fma(k, threads, 5);
    out->fma_one_gflops = threads > 1 ? measure_fma(k, 1, 3) : out->fma_all_gflops;
    /* On a machine shared with other work the all-thread figure can come out
     * low (a core was busy elsewhere), which would inflate every percentage.
     * FMA throughput on registers scales with cores, so threads x one-thread
     * is also a measured bound; the larger of the two is the denominator. */
    double scaled = out->fma_one_gflops * threads;
    out->fma_gflops = scaled > out->fma_all_gflops ? scaled : out->fma_all_gflops;
    return measure_bandwidth(threads, out);
}
