/* Clock, peak resident set, machine size and random inputs for the CLI. */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Writing "5" to clear_refs resets VmHWM to the current RSS (Linux >= 4.0). */
int rss_reset_peak(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return -1;
    int ok = fputs("5", f) >= 0;
    if (fclose(f) != 0) ok = 0;
    return ok ? 0 : -1;
}

double rss_peak_bytes(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (f) {
        char line[256];
        while (fgets(line, sizeof line, f)) {
            long long kb;
            if (sscanf(line, "VmHWM: %lld kB", &kb) == 1) {
                fclose(f);
                return 1024.0 * (double)kb;
            }
        }
        fclose(f);
    }
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0) return 1024.0 * (double)ru.ru_maxrss;
    return -1.0;
}

double physical_memory_bytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || size <= 0) return -1.0;
    return (double)pages * (double)size;
}

int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* ------------------------------------------------------------- random fill */

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Irwin-Hall: four 16-bit uniforms summed, centred and scaled to sd 1. */
static float normalish(uint64_t *s) {
    uint64_t x = *s; /* xorshift64 */
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    uint32_t sum = (uint32_t)(x & 0xFFFF) + (uint32_t)((x >> 16) & 0xFFFF) +
                   (uint32_t)((x >> 32) & 0xFFFF) + (uint32_t)(x >> 48);
    /* sum/65536 - 2 has variance 4/12. */
    return (float)(((double)sum * (1.0 / 65536.0) - 2.0) * 1.7320508075688772);
}

#define FILL_CHUNK ((size_t)1 << 16)

void fill_random(void *data, attn_dtype dt, size_t count, uint64_t seed) {
    long long chunks = (long long)((count + FILL_CHUNK - 1) / FILL_CHUNK);
#pragma omp parallel for schedule(static)
    for (long long ch = 0; ch < chunks; ch++) {
        uint64_t s = splitmix64(seed ^ splitmix64((uint64_t)ch));
        if (s == 0) s = 1;
        size_t lo = (size_t)ch * FILL_CHUNK;
        size_t hi = lo + FILL_CHUNK < count ? lo + FILL_CHUNK : count;
        for (size_t i = lo; i < hi; i++) {
            float v = normalish(&s);
            switch (dt) {
            case ATTN_F32: ((float *)data)[i] = v; break;
            case ATTN_F16: ((uint16_t *)data)[i] = attn_f32_to_f16(v); break;
            case ATTN_BF16: ((uint16_t *)data)[i] = attn_f32_to_bf16(v); break;
            case ATTN_F64: ((double *)data)[i] = v; break;
            }
        }
    }
}
