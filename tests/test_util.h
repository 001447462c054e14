/* Tiny helpers shared by the C tests: pass/fail counting, a seeded RNG,
 * owned tensors in any dtype, element access and error measures.
 * Tests use only the public API (attn.h). Header-only: every test_*.c is its
 * own executable. */
#ifndef TEST_UTIL_H
#define TEST_UTIL_H

#include "attn.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
#define TU_UNUSED __attribute__((unused))
#define TU_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define TU_UNUSED
#define TU_PRINTF(a, b)
#endif

/* ------------------------------------------------------------ pass / fail */

static int tu_passed, tu_failed;
static char tu_case_name[512]; /* the case being run, printed with each failure */
static const char *tu_prefix = ""; /* printed before it (the ISA under test) */

/* Names the current case (printf format). */
static TU_UNUSED TU_PRINTF(1, 2) void tu_case(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tu_case_name, sizeof tu_case_name, fmt, ap);
    va_end(ap);
}

static TU_UNUSED TU_PRINTF(4, 5) int tu_check(int ok, const char *file, int line,
                                              const char *fmt, ...) {
    if (ok) {
        tu_passed++;
        return 1;
    }
    tu_failed++;
    fprintf(stderr, "FAIL %s:%d [%s%s%s]: ", file, line, tu_prefix, *tu_prefix ? ": " : "",
            tu_case_name);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    return 0;
}

/* CHECK(condition, "printf message", ...): records a pass or a failure (with
 * the current case and the message); evaluates to 1 when it passed. */
#define CHECK(cond, ...) tu_check((cond) ? 1 : 0, __FILE__, __LINE__, __VA_ARGS__)

/* CHECK_OK(status expression): the call returned ATTN_OK. */
#define CHECK_OK(expr)                                                                \
    do {                                                                              \
        attn_status st_ = (expr);                                                     \
        CHECK(st_ == ATTN_OK, "%s returned %s: %s", #expr, attn_status_str(st_),      \
              attn_last_error());                                                     \
    } while (0)

/* CHECK_ERR(call, status, word): the call returned that error status and
 * attn_last_error() names `word` (the argument or the rule). */
#define CHECK_ERR(call, status, word)                                                     \
    do {                                                                                  \
        attn_status st_ = (call);                                                         \
        CHECK(st_ == (status) && strstr(attn_last_error(), word), "%s: got %s (%s)", #call, \
              attn_status_str(st_), attn_last_error());                                   \
    } while (0)

/* Prints "name: P passed, F failed"; returns main()'s exit code. */
static TU_UNUSED int tu_finish(const char *name) {
    printf("%s: %d passed, %d failed\n", name, tu_passed, tu_failed);
    return tu_failed ? 1 : 0;
}

/* ------------------------------------------------------------ random */

/* splitmix64: fixed per run, fresh per case (seed from the case index). */
typedef struct tu_rng {
    uint64_t s;
} tu_rng;

static TU_UNUSED uint64_t tu_next(tu_rng *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The seed of case number idx of a test file (salt: any constant per file). */
static TU_UNUSED uint64_t tu_seed(uint64_t salt, uint64_t idx) {
    tu_rng r = {salt * 0x2545F4914F6CDD1Dull + idx};
    return tu_next(&r);
}

static TU_UNUSED double tu_uniform(tu_rng *r, double lo, double hi) {
    return lo + (hi - lo) * ((double)(tu_next(r) >> 11) * (1.0 / 9007199254740992.0));
}

static TU_UNUSED int64_t tu_int(tu_rng *r, int64_t lo, int64_t hi) { /* inclusive */
    return lo + (int64_t)(tu_next(r) % (uint64_t)(hi - lo + 1));
}

/* ------------------------------------------------------------ tensors */

/* A tensor view with the memory it owns. */
typedef struct tu_buf {
    attn_tensor t;
    void *mem;
    size_t bytes;
} tu_buf;

/* Contiguous row-major [d0, d1, d2(, d3)] (d3 < 0: a 3-D tensor), zeroed. */
static TU_UNUSED tu_buf tu_alloc(attn_dtype dt, int64_t d0, int64_t d1, int64_t d2,
                                 int64_t d3) {
    tu_buf b;
    int64_t n = d0 * d1 * d2 * (d3 < 0 ? 1 : d3);
    b.bytes = (size_t)(n > 0 ? n : 1) * attn_dtype_size(dt);
    b.mem = calloc(1, b.bytes);
    if (!b.mem) {
        fprintf(stderr, "test: out of memory (%zu bytes)\n", b.bytes);
        exit(2);
    }
    b.t = d3 < 0 ? attn_tensor_3d(b.mem, dt, d0, d1, d2)
                 : attn_tensor_4d(b.mem, dt, d0, d1, d2, d3);
    return b;
}

/* A 4-D [d0, d1, d2, d3] view whose memory is laid out as [d0, d2, d1, d3]
 * (dims 1 and 2 swapped: e.g. [B, N, H, D] over a [B, H, N, D] buffer), plus
 * `pad` unused elements after each innermost row. */
static TU_UNUSED tu_buf tu_alloc_strided(attn_dtype dt, int64_t d0, int64_t d1, int64_t d2,
                                         int64_t d3, int64_t pad) {
    int64_t row = d3 + pad;
    tu_buf b = tu_alloc(dt, d0, d2, d1, row);
    b.t.shape[0] = d0;
    b.t.shape[1] = d1;
    b.t.shape[2] = d2;
    b.t.shape[3] = d3;
    b.t.stride[3] = 1;
    b.t.stride[1] = row;
    b.t.stride[2] = d1 * row;
    b.t.stride[0] = d2 * d1 * row;
    return b;
}

static TU_UNUSED void tu_free(tu_buf *b) {
    free(b->mem);
    b->mem = NULL;
}

static TU_UNUSED int64_t tu_numel(const attn_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* Element offset of the flat logical index `flat` (row-major over the shape). */
static TU_UNUSED int64_t tu_offset(const attn_tensor *t, int64_t flat) {
    int64_t off = 0;
    for (int i = t->ndim - 1; i >= 0; i--) {
        off += (flat % t->shape[i]) * t->stride[i];
        flat /= t->shape[i];
    }
    return off;
}

static TU_UNUSED double tu_load(const attn_tensor *t, int64_t off) {
    switch (t->dtype) {
    case ATTN_F32: return ((const float *)t->data)[off];
    case ATTN_F16: return attn_f16_to_f32(((const uint16_t *)t->data)[off]);
    case ATTN_BF16: return attn_bf16_to_f32(((const uint16_t *)t->data)[off]);
    case ATTN_F64: return ((const double *)t->data)[off];
    }
    return NAN;
}

static TU_UNUSED void tu_store(attn_tensor *t, int64_t off, double x) {
    switch (t->dtype) {
    case ATTN_F32: ((float *)t->data)[off] = (float)x; break;
    case ATTN_F16: ((uint16_t *)t->data)[off] = attn_f32_to_f16((float)x); break;
    case ATTN_BF16: ((uint16_t *)t->data)[off] = attn_f32_to_bf16((float)x); break;
    case ATTN_F64: ((double *)t->data)[off] = x; break;
    }
}

/* Logical element [i0, i1, i2(, i3)]. */
static TU_UNUSED int64_t tu_off4(const attn_tensor *t, int64_t a, int64_t b, int64_t c,
                                 int64_t d) {
    return a * t->stride[0] + b * t->stride[1] + c * t->stride[2] + d * t->stride[3];
}
static TU_UNUSED int64_t tu_off3(const attn_tensor *t, int64_t a, int64_t b, int64_t c) {
    return a * t->stride[0] + b * t->stride[1] + c * t->stride[2];
}

static TU_UNUSED void tu_fill(attn_tensor *t, tu_rng *r, double lo, double hi) {
    int64_t n = tu_numel(t);
    for (int64_t i = 0; i < n; i++) tu_store(t, tu_offset(t, i), tu_uniform(r, lo, hi));
}

static TU_UNUSED void tu_fill_const(attn_tensor *t, double x) {
    int64_t n = tu_numel(t);
    for (int64_t i = 0; i < n; i++) tu_store(t, tu_offset(t, i), x);
}

/* Copies src into dst element by element (any dtypes, same logical shape). */
static TU_UNUSED void tu_copy(attn_tensor *dst, const attn_tensor *src) {
    int64_t n = tu_numel(src);
    for (int64_t i = 0; i < n; i++) tu_store(dst, tu_offset(dst, i), tu_load(src, tu_offset(src, i)));
}

/* ------------------------------------------------------------ errors */

typedef struct tu_err {
    double rel_rms;      /* sqrt(sum (got-ref)^2 / sum ref^2) over finite ref */
    double max_abs;      /* max |got - ref| over finite ref */
    double max_ref;      /* max |ref| over finite ref */
    int64_t worst;       /* flat index of max_abs */
    int64_t bad_nonfinite; /* elements whose non-finiteness disagrees */
    int64_t first_bad;   /* flat index of the first such element, or -1 */
} tu_err;

/* Compares got with ref over the logical shape (same shape, any dtypes).
 * A finite ref element must be matched by a finite value; a NaN by any
 * non-finite value; +-inf exactly, unless loose (then by any non-finite). */
static TU_UNUSED tu_err tu_compare(const attn_tensor *got, const attn_tensor *ref, int loose) {
    tu_err e = {0, 0, 0, -1, 0, -1};
    double num = 0, den = 0;
    int64_t n = tu_numel(ref);
    for (int64_t i = 0; i < n; i++) {
        double g = tu_load(got, tu_offset(got, i)), r = tu_load(ref, tu_offset(ref, i));
        int bad;
        if (isnan(r)) bad = isfinite(g);
        else if (isinf(r)) bad = loose ? isfinite(g) : g != r;
        else bad = !isfinite(g);
        if (bad) {
            if (e.bad_nonfinite++ == 0) e.first_bad = i;
            continue;
        }
        if (!isfinite(r)) continue;
        double d = fabs(g - r);
        num += d * d;
        den += r * r;
        if (d > e.max_abs) {
            e.max_abs = d;
            e.worst = i;
        }
        if (fabs(r) > e.max_ref) e.max_ref = fabs(r);
    }
    e.rel_rms = den > 0 ? sqrt(num / den) : sqrt(num);
    return e;
}

/* Checks got against ref: relative RMS error <= rms_tol and max abs error <=
 * max_tol * (max |ref| + 1), non-finite elements agreeing. */
#define CHECK_CLOSE(what, got, ref, rms_tol, max_tol) \
    tu_check_close(what, got, ref, rms_tol, max_tol, 0, __FILE__, __LINE__)
/* The same, where any non-finite value matches a non-finite ref (NaN or Inf
 * inputs, for which the header promises only "non-finite"). */
#define CHECK_CLOSE_NF(what, got, ref, rms_tol, max_tol) \
    tu_check_close(what, got, ref, rms_tol, max_tol, 1, __FILE__, __LINE__)

static TU_UNUSED int tu_check_close(const char *what, const attn_tensor *got,
                                    const attn_tensor *ref, double rms_tol, double max_tol,
                                    int loose, const char *file, int line) {
    tu_err e = tu_compare(got, ref, loose);
    double lim = max_tol * (e.max_ref + 1.0);
    int ok = e.bad_nonfinite == 0 && e.rel_rms <= rms_tol && e.max_abs <= lim;
    if (ok) return tu_check(1, file, line, "%s", what);
    if (e.bad_nonfinite)
        return tu_check(0, file, line,
                        "%s: %lld elements disagree on finiteness, first at flat index %lld "
                        "(got %g, ref %g)",
                        what, (long long)e.bad_nonfinite, (long long)e.first_bad,
                        tu_load(got, tu_offset(got, e.first_bad)),
                        tu_load(ref, tu_offset(ref, e.first_bad)));
    return tu_check(0, file, line,
                    "%s: rel RMS %.3g (tol %.3g), max abs %.3g at flat %lld (got %.9g ref %.9g; "
                    "tol %.3g)",
                    what, e.rel_rms, rms_tol, e.max_abs, (long long)e.worst,
                    tu_load(got, tu_offset(got, e.worst)), tu_load(ref, tu_offset(ref, e.worst)),
                    lim);
}

/* Bitwise comparison of two owned buffers of equal size. */
static TU_UNUSED int tu_same_bits(const tu_buf *a, const tu_buf *b) {
    return a->bytes == b->bytes && memcmp(a->mem, b->mem, a->bytes) == 0;
}

/* ------------------------------------------------------------ gradients */

/* Central differences of loss = sum(o * dout) with respect to every element
 * of x (contiguous, f32 or f64), against grad (x's shape, any dtype): the
 * worst |fd - grad| / (|fd| + 1). run(arg) runs the forward into o (the
 * loss is summed in double); it returns 0 when the forward failed. */
static TU_UNUSED double tu_fd_worst(tu_buf *x, double step, const attn_tensor *grad,
                                    int (*run)(void *), void *arg, const attn_tensor *o,
                                    const attn_tensor *dout) {
    double worst = 0;
    for (int64_t j = 0; j < tu_numel(&x->t); j++) {
        const double keep = tu_load(&x->t, j);
        double l[2];
        for (int s = 0; s < 2; s++) {
            tu_store(&x->t, j, keep + (s ? -step : step));
            if (!run(arg)) return INFINITY;
            l[s] = 0;
            for (int64_t t = 0; t < tu_numel(o); t++)
                l[s] += tu_load(o, tu_offset(o, t)) * tu_load(dout, tu_offset(dout, t));
        }
        tu_store(&x->t, j, keep);
        const double fd = (l[0] - l[1]) / (2 * step), err = fabs(fd - tu_load(grad, tu_offset(grad, j))) / (fabs(fd) + 1);
        if (err > worst) worst = err;
    }
    return worst;
}

/* ------------------------------------------------------------ contexts */

/* A context, or exit with a failure line when it cannot be made. */
static TU_UNUSED attn_ctx *tu_ctx(const char *test, attn_backend be, int threads) {
    attn_ctx_options o = attn_ctx_options_default();
    o.backend = be;
    o.threads = threads;
    attn_ctx *c = NULL;
    attn_status st = attn_ctx_create(&c, &o);
    if (st != ATTN_OK || !c) {
        fprintf(stderr, "FAIL: attn_ctx_create(%s, threads %d): %s: %s\n",
                attn_backend_name(be), threads, attn_status_str(st), attn_last_error());
        printf("%s: %d passed, %d failed\n", test, tu_passed, tu_failed + 1);
        exit(1);
    }
    return c;
}

/* CPU contexts pinned to each ISA this machine runs, other than the one
 * ATTN_ISA_AUTO picks (already covered by tu_ctx), so that every kernel set
 * gets tested. Returns how many were made (at most max). */
static TU_UNUSED int tu_other_isa_ctxs(attn_ctx **out, int max, int threads) {
    static const attn_isa all[] = {ATTN_ISA_SCALAR, ATTN_ISA_AVX2, ATTN_ISA_AVX512,
                                   ATTN_ISA_NEON};
    attn_ctx *autoc = NULL;
    attn_ctx_options o = attn_ctx_options_default();
    o.backend = ATTN_BACKEND_CPU;
    attn_isa picked = attn_ctx_create(&autoc, &o) == ATTN_OK ? attn_ctx_isa(autoc) : ATTN_ISA_AUTO;
    attn_ctx_free(autoc);
    int n = 0;
    for (size_t i = 0; i < sizeof all / sizeof all[0] && n < max; i++) {
        if (all[i] == picked) continue;
        o.isa = all[i];
        o.threads = threads;
        attn_ctx *c = NULL;
        if (attn_ctx_create(&c, &o) == ATTN_OK) out[n++] = c;
    }
    return n;
}

/* ------------------------------------------------------------ forward runs */

/* Tolerances by output dtype (the LSE is always f32):
 *   f32 : rel RMS <= 1e-5, max abs <= 1e-4 * (max|ref| + 1). The inputs are
 *         exact in f32, so this bounds the engine's own f32 arithmetic.
 *   f16 : rel RMS <= 1e-3, max abs <= 2e-3 * (max|ref| + 1): rounding the
 *         output to f16 alone costs up to 2^-11 = 4.9e-4 relative.
 *   bf16: rel RMS <= 8e-3, max abs <= 8e-3 * (max|ref| + 1): rounding to bf16
 *         costs up to 2^-9 = 2e-3 relative. */
static TU_UNUSED double tu_rms_tol(attn_dtype dt) {
    return dt == ATTN_F16 ? 1e-3 : dt == ATTN_BF16 ? 8e-3 : 1e-5;
}
static TU_UNUSED double tu_max_tol(attn_dtype dt) {
    return dt == ATTN_F16 ? 2e-3 : dt == ATTN_BF16 ? 8e-3 : 1e-4;
}
#define TU_LSE_RMS_TOL 1e-5
#define TU_LSE_MAX_TOL 1e-4

/* Outputs of one forward: o [B, N, H, Dv] and lse [B, H, N]. */
typedef struct tu_fwd_out {
    tu_buf o, lse;
    attn_status st;
} tu_fwd_out;

/* Runs attn_forward on ctx writing o in odt (and lse in ldt; ATTN_F64 allowed
 * on the reference backend), output shapes taken from q and v. want_lse = 0
 * passes lse = NULL. */
static TU_UNUSED tu_fwd_out tu_run_forward(attn_ctx *ctx, const attn_params *p,
                                           const attn_tensor *q, const attn_tensor *k,
                                           const attn_tensor *v, attn_dtype odt,
                                           attn_dtype ldt, int want_lse) {
    tu_fwd_out r;
    int64_t B = q->shape[0], N = q->shape[1], H = q->shape[2], Dv = v->shape[3];
    r.o = tu_alloc(odt, B, N, H, Dv);
    r.lse = tu_alloc(ldt, B, H, N, -1);
    r.st = attn_forward(ctx, p, q, k, v, &r.o.t, want_lse ? &r.lse.t : NULL);
    return r;
}

static TU_UNUSED void tu_fwd_free(tu_fwd_out *r) {
    tu_free(&r->o);
    tu_free(&r->lse);
}

/* CPU forward (o in odt, lse f32) on each of the n contexts in cpus against
 * the reference forward (f64), all on the same inputs; pc and pr are the
 * params of the CPU and the reference side (usually the same). Failures of
 * cpus[i], i > 0, are labelled with that context's ISA. */
static TU_UNUSED void tu_check_forward(attn_ctx *const *cpus, int n, attn_ctx *ref,
                                       const attn_params *pc, const attn_params *pr,
                                       const attn_tensor *q, const attn_tensor *k,
                                       const attn_tensor *v, attn_dtype odt, int want_lse) {
    tu_fwd_out r = tu_run_forward(ref, pr, q, k, v, ATTN_F64, ATTN_F64, 1);
    CHECK(r.st == ATTN_OK, "ref forward: %s: %s", attn_status_str(r.st), attn_last_error());
    for (int i = 0; i < n && r.st == ATTN_OK; i++) {
        tu_prefix = i ? attn_isa_name(attn_ctx_isa(cpus[i])) : "";
        tu_fwd_out c = tu_run_forward(cpus[i], pc, q, k, v, odt, ATTN_F32, want_lse);
        CHECK(c.st == ATTN_OK, "cpu forward: %s: %s", attn_status_str(c.st), attn_last_error());
        if (c.st == ATTN_OK) {
            CHECK_CLOSE("o", &c.o.t, &r.o.t, tu_rms_tol(odt), tu_max_tol(odt));
            if (want_lse) CHECK_CLOSE("lse", &c.lse.t, &r.lse.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
        }
        tu_fwd_free(&c);
    }
    tu_prefix = "";
    tu_fwd_free(&r);
}

#endif
