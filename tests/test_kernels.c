/* The micro-kernel tables (src/cpu/kernels.h) against double-precision naive
 * computations, for every table this build has and this CPU can run
 * (scalar, avx2, avx512, neon).
 *
 * Buffers are allocated to their exact size (an access past the end is an
 * AddressSanitizer error in ATTN_SANITIZE builds); row paddings between the
 * last column and the leading dimension hold a sentinel that must survive,
 * and unused input elements hold NaN so that reading the wrong element shows.
 *
 * Tolerances (eps = 2^-24, the unit roundoff of f32):
 *   gemm            |err| <= 1e-5 * (sum_k |a||b| + |X|)   (X: 0, C or c_scale*C)
 *   exp2 (alone)    relative error < 1e-6 over x in [-120, 120]
 *   exp2 of a computed argument x (softmax_cols, exp2_rows): relative error
 *                   <= 2e-6 + 2 eps |x| ... (rounding x to f32 moves 2^x by
 *                   ln2 * eps * |x| relatively; the rest is the exp2 itself)
 *   softmax l       the p tolerance + (rows + 2) * 2 eps (the running sum)
 *   dsoftmax_rows   relative 1e-6 (three roundings)
 *   dot_rows        |err| <= 1e-5 * sum |q||k|
 *   qk_heads        |err| <= 1e-5 * sum |q||k|  (k as stored: f32, f16 or bf16)
 *   pv_heads        |err| <= 1e-5 * (|o| + sum |p||v|)
 *   axpy            |err| <= 1e-6 * (|a x| + |y|)
 *   transpose       bit-exact
 *   store_stream    bit-exact, at aligned and unaligned destinations
 *   key_gate_chunk  the products with e^{±b}: exp_tol(b log2 e) relative (b
 *                   summed in double and rounded to f32 as the contract
 *                   says); krt 1e-6 relative to kt * plast; the out-of-range
 *                   report exact
 *   conversions     bit-exact with attn_f16_to_f32 & co. of attn.h (for NaN
 *                   payloads see STRICT_NAN_PAYLOADS)
 * Exact: -inf logits give p = 0, a column with only -inf logits (and m = -inf)
 * keeps m = -inf, l = 0 and gets alpha = 0; 2^-inf = 0; max is exact. */
#if defined(__unix__) || defined(__APPLE__)
#define _POSIX_C_SOURCE 200809L /* posix_memalign, mprotect, sysconf */
#include <sys/mman.h>
#include <unistd.h>
#define GUARD_PAGES 1
#endif

#include "test_util.h"

#include "cpu/kernels.h"

#include <float.h>

#define SALT 0x6b65726eull /* "kern" */

static const uint32_t SENTINEL = 0xdeadbeefu; /* a float nobody computes (-6.3e18) */

static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bitsf(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Every buffer ends exactly at an inaccessible page (where the OS allows it):
 * AddressSanitizer does not see the masked loads of intrinsics, but the MMU
 * does, so a kernel that reads a lane past the end crashes the test. The
 * allocation and its guard page are noted in the 16 bytes at (p - 16) & ~7. */
static void *xmalloc(size_t bytes) {
    if (!bytes) bytes = 1;
#ifdef GUARD_PAGES
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t body = (bytes + 16 + page - 1) / page * page;
    void *base = NULL;
    if (posix_memalign(&base, page, body + page) == 0) {
        char *guard = (char *)base + body;
        if (mprotect(guard, page, PROT_NONE) == 0) {
            char *p = guard - bytes;
            void *note[2] = {base, guard};
            memcpy((void *)(((uintptr_t)p - 16) & ~(uintptr_t)7), note, sizeof note);
            return p;
        }
        free(base);
    }
    fprintf(stderr, "test_kernels: cannot allocate %zu bytes with a guard page\n", bytes);
    exit(2);
#else
    void *p = malloc(bytes);
    if (!p) {
        fprintf(stderr, "test_kernels: out of memory\n");
        exit(2);
    }
    return p;
#endif
}

static void xfree(void *p) {
#ifdef GUARD_PAGES
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void *note[2];
    memcpy(note, (void *)(((uintptr_t)p - 16) & ~(uintptr_t)7), sizeof note);
    if (mprotect(note[1], page, PROT_READ | PROT_WRITE) != 0) {
        fprintf(stderr, "test_kernels: cannot release a guard page\n");
        exit(2);
    }
    free(note[0]);
#else
    free(p);
#endif
}
static float *falloc(int64_t n) { return xmalloc((size_t)(n > 0 ? n : 1) * sizeof(float)); }
static void ffill(float *p, int64_t n, float x) {
    for (int64_t i = 0; i < n; i++) p[i] = x;
}
static void fsent(float *p, int64_t n) { ffill(p, n, bitsf(SENTINEL)); }
static float frand(tu_rng *r, double lo, double hi) { return (float)tu_uniform(r, lo, hi); }

/* Padding [cols, ld) of each of `rows` rows of p (allocated as `alloc`
 * floats) still holds the sentinel; returns the number of changed slots. */
static int64_t pad_changed(const float *p, int64_t rows, int64_t cols, int64_t ld,
                           int64_t alloc) {
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = cols; c < ld && r * ld + c < alloc; c++)
            if (fbits(p[r * ld + c]) != SENTINEL) bad++;
    return bad;
}

/* Relative tolerance of 2^x when x itself was computed in f32. */
static double exp_tol(double x) { return 2e-6 + 2.0 * ldexp(fabs(x), -24); }

typedef struct table {
    const attn_kernels *k;
    const char *name;
} table;

/* ------------------------------------------------------------ gemm */

static const int64_t SIZES[] = {1, 2, 5, 6, 7, 13, 16, 17, 31, 64, 65, 100};
enum { NSIZES = sizeof SIZES / sizeof SIZES[0] };

/* mode 0: overwrite (C starts as NaN: must not be read), 1: accumulate,
 * 2: c_scale with accumulate = 1, 3: c_scale with accumulate = 0 (c_scale wins). */
static void gemm_case(const table *t, uint64_t idx, int64_t m, int64_t n, int64_t k,
                      int trans, int mode) {
    tu_rng rng = {tu_seed(SALT, idx)};
    int64_t rsa, csa;
    if (trans) { /* A stored k x m (column-major m x k) */
        rsa = 1;
        csa = m + tu_int(&rng, 0, 3);
    } else {
        rsa = k + tu_int(&rng, 0, 3);
        csa = 1;
    }
    int64_t ldb = n + tu_int(&rng, 1, 5), ldc = n + tu_int(&rng, 1, 4);
    int64_t na = (m > 0 && k > 0) ? (m - 1) * rsa + (k - 1) * csa + 1 : 0;
    int64_t nb = k > 0 ? (k - 1) * ldb + n : 0;
    /* odd cases end C exactly after column n of the last row (ASan checks the
     * end), even ones keep the last row's padding (the sentinel checks it) */
    int64_t nc = m > 0 ? ((idx & 1) ? (m - 1) * ldc + n : m * ldc) : 0;
    float *a = falloc(na), *b = falloc(nb), *c = falloc(nc), *cs = falloc(m);
    double *ref = xmalloc(sizeof(double) * (size_t)(m * n + 1));
    double *bound = xmalloc(sizeof(double) * (size_t)(m * n + 1));
    ffill(a, na, NAN);
    ffill(b, nb, NAN);
    fsent(c, nc);
    for (int64_t r = 0; r < m; r++)
        for (int64_t kk = 0; kk < k; kk++) a[r * rsa + kk * csa] = frand(&rng, -1, 1);
    for (int64_t kk = 0; kk < k; kk++)
        for (int64_t j = 0; j < n; j++) b[kk * ldb + j] = frand(&rng, -1, 1);
    for (int64_t r = 0; r < m; r++) {
        cs[r] = r % 4 == 1 ? 0.0f : r % 4 == 2 ? 1.0f : frand(&rng, 0, 1);
        for (int64_t j = 0; j < n; j++) c[r * ldc + j] = mode == 0 ? NAN : frand(&rng, -2, 2);
    }
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < n; j++) {
            double x = mode == 0 ? 0.0 : mode == 1 ? c[r * ldc + j] : (double)cs[r] * c[r * ldc + j];
            double s = x, bd = fabs(x);
            for (int64_t kk = 0; kk < k; kk++) {
                double p = (double)a[r * rsa + kk * csa] * b[kk * ldb + j];
                s += p;
                bd += fabs(p);
            }
            ref[r * n + j] = s;
            bound[r * n + j] = bd;
        }
    const float *csp = mode >= 2 ? cs : NULL;
    int accumulate = mode == 1 || mode == 2;
    t->k->gemm(m, n, k, a, rsa, csa, b, ldb, c, ldc, accumulate, csp);

    tu_case("%s gemm m=%lld n=%lld k=%lld %s mode=%d ldb=%lld ldc=%lld", t->name, (long long)m,
            (long long)n, (long long)k, trans ? "A^T" : "A", mode, (long long)ldb,
            (long long)ldc);
    double worst = 0;
    int64_t wr = 0, wj = 0, nonfinite = 0;
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < n; j++) {
            double g = c[r * ldc + j];
            if (!isfinite(g)) {
                nonfinite++;
                continue;
            }
            double e = fabs(g - ref[r * n + j]);
            double lim = 1e-5 * bound[r * n + j];
            double q = lim > 0 ? e / lim : (e > 0 ? INFINITY : 0);
            if (q > worst) worst = q, wr = r, wj = j;
        }
    CHECK(nonfinite == 0, "%lld non-finite results", (long long)nonfinite);
    CHECK(worst <= 1.0, "error %.3g x tolerance at (%lld, %lld): got %.9g ref %.9g", worst,
          (long long)wr, (long long)wj, worst > 1.0 ? (double)c[wr * ldc + wj] : 0.0,
          worst > 1.0 ? ref[wr * n + wj] : 0.0);
    int64_t bad = pad_changed(c, m, n, ldc, nc);
    CHECK(bad == 0, "%lld padding slots of C (columns n .. ldc-1) changed", (long long)bad);
    xfree(a), xfree(b), xfree(c), xfree(cs), xfree(ref), xfree(bound);
}

static void test_gemm(const table *t) {
    uint64_t idx = 1000;
    /* every (m, n), k rotating through the sizes */
    for (int im = 0; im < NSIZES; im++)
        for (int in = 0; in < NSIZES; in++) {
            int64_t k = SIZES[(im * 5 + in * 7 + 3) % NSIZES];
            gemm_case(t, idx++, SIZES[im], SIZES[in], k, (im + in) & 1, (im * 3 + in) % 4);
        }
    /* every (n, k), m rotating */
    for (int in = 0; in < NSIZES; in++)
        for (int ik = 0; ik < NSIZES; ik++) {
            int64_t m = SIZES[(in * 7 + ik * 5 + 1) % NSIZES];
            gemm_case(t, idx++, m, SIZES[in], SIZES[ik], (in + ik + 1) & 1, (in + ik * 3 + 1) % 4);
        }
    /* every column count 1 .. 40 (every tail length, one or more vectors) */
    for (int64_t n = 1; n <= 40; n++) gemm_case(t, idx++, 7, n, 5, (int)(n & 1), (int)(n % 4));
    /* every mode and layout on a few shapes that have full tiles and tails */
    static const int64_t shp[][3] = {{6, 16, 7}, {7, 17, 13}, {13, 65, 31}, {12, 64, 64}, {1, 1, 1}};
    for (size_t s = 0; s < sizeof shp / sizeof shp[0]; s++)
        for (int mode = 0; mode < 4; mode++)
            for (int tr = 0; tr < 2; tr++)
                gemm_case(t, idx++, shp[s][0], shp[s][1], shp[s][2], tr, mode);
    /* k = 0 (C = X) and empty m or n (C untouched) */
    for (int mode = 0; mode < 4; mode++) gemm_case(t, idx++, 7, 19, 0, mode & 1, mode);
    gemm_case(t, idx++, 0, 17, 5, 0, 1);
    gemm_case(t, idx++, 5, 0, 5, 1, 1);
}

/* ------------------------------------------------------------ softmax_cols */

typedef struct sm_ref {
    double *p, *m, *l, *alpha;
} sm_ref;

/* Double-precision online softmax over rows [0, rows) of s (column-major tile). */
static void softmax_ref(const float *s, int64_t rows, int64_t cols, int64_t lds,
                        const float *m, const float *l, sm_ref *o) {
    for (int64_t i = 0; i < cols; i++) {
        double mx = m[i];
        for (int64_t j = 0; j < rows; j++)
            if (s[j * lds + i] > mx) mx = s[j * lds + i];
        double sub = mx == -INFINITY ? 0.0 : mx;
        double al = exp2((double)m[i] - sub), sum = 0;
        for (int64_t j = 0; j < rows; j++) {
            double p = exp2((double)s[j * lds + i] - sub);
            o->p[j * cols + i] = p;
            sum += p;
        }
        o->m[i] = mx;
        o->alpha[i] = al;
        o->l[i] = al * l[i] + sum;
    }
}

static int close_rel(double got, double ref, double rel) {
    if (isinf(ref) || isnan(ref)) return got == ref || (isnan(ref) && isnan(got));
    if (!isfinite(got)) return 0;
    double lim = ref == 0 ? 0 : rel * fabs(ref); /* rel may be inf when ref is 0 */
    return fabs(got - ref) <= lim + 1e-37;
}

static void softmax_case(const table *t, uint64_t idx, int64_t rows, int64_t cols) {
    tu_rng rng = {tu_seed(SALT, idx)};
    int64_t lds = cols + tu_int(&rng, 0, 3);
    int64_t ns = (rows - 1) * lds + cols;
    float *s0 = falloc(ns), *s = falloc(ns), *s2 = falloc(ns);
    float *m0 = falloc(cols), *l0 = falloc(cols);
    float *m = falloc(cols), *l = falloc(cols), *al = falloc(cols);
    float *m2 = falloc(cols), *l2 = falloc(cols), *al1 = falloc(cols), *al2 = falloc(cols);
    sm_ref o = {xmalloc(sizeof(double) * (size_t)(rows * cols)), xmalloc(sizeof(double) * (size_t)cols),
                xmalloc(sizeof(double) * (size_t)cols), xmalloc(sizeof(double) * (size_t)cols)};
    fsent(s0, ns);
    for (int64_t i = 0; i < cols; i++) {
        int dead = i % 5 == 3; /* only -inf logits in this column */
        for (int64_t j = 0; j < rows; j++)
            s0[j * lds + i] = dead || tu_int(&rng, 0, 4) == 0 ? -INFINITY : frand(&rng, -20, 20);
        if (i % 2 == 0 || i % 10 == 3) { /* first visit */
            m0[i] = -INFINITY;
            l0[i] = 0.0f;
        } else {
            m0[i] = frand(&rng, -10, 10);
            l0[i] = frand(&rng, 0.5, 3);
        }
    }

    /* one call */
    memcpy(s, s0, sizeof(float) * (size_t)ns);
    memcpy(m, m0, sizeof(float) * (size_t)cols);
    memcpy(l, l0, sizeof(float) * (size_t)cols);
    ffill(al, cols, NAN);
    t->k->softmax_cols(s, rows, cols, lds, m, l, al);
    softmax_ref(s0, rows, cols, lds, m0, l0, &o);

    tu_case("%s softmax_cols rows=%lld cols=%lld lds=%lld", t->name, (long long)rows,
            (long long)cols, (long long)lds);
    int64_t bad_m = 0, bad_a = 0, bad_l = 0, bad_p = 0, bad_zero = 0, bad_dead = 0;
    char msg[256] = "";
    for (int64_t i = 0; i < cols; i++) {
        double maxarg = 0;
        for (int64_t j = 0; j < rows; j++) {
            float x = s0[j * lds + i];
            double got = s[j * lds + i], ref = o.p[j * cols + i];
            if (x == -INFINITY) {
                if (fbits(s[j * lds + i]) != 0) bad_zero++; /* +0 exactly */
                continue;
            }
            double arg = (double)x - o.m[i];
            if (fabs(arg) > maxarg) maxarg = fabs(arg);
            if (!close_rel(got, ref, exp_tol(arg))) {
                if (!bad_p++)
                    snprintf(msg, sizeof msg, "p[%lld][%lld] = %.9g, ref %.9g", (long long)j,
                             (long long)i, got, ref);
            }
        }
        if ((double)m[i] != o.m[i]) bad_m++;
        if (o.m[i] == -INFINITY) {
            /* nothing visible yet: p = 0 (checked), alpha = 0, l = 0, m = -inf */
            if (fbits(al[i]) != 0 || fbits(l[i]) != 0 || m[i] != -INFINITY) bad_dead++;
        } else {
            if (!close_rel(al[i], o.alpha[i], exp_tol((double)m0[i] - o.m[i]))) bad_a++;
            double tl = exp_tol(maxarg > fabs((double)m0[i] - o.m[i]) ? maxarg
                                                                     : fabs((double)m0[i] - o.m[i]));
            if (!close_rel(l[i], o.l[i], tl + (double)(rows + 2) * 2 * ldexp(1, -24))) bad_l++;
        }
    }
    CHECK(bad_zero == 0, "%lld -inf logits did not give p = +0", (long long)bad_zero);
    CHECK(bad_p == 0, "%lld p outside tolerance, first %s", (long long)bad_p, msg);
    CHECK(bad_m == 0, "%lld m differ from the exact max", (long long)bad_m);
    CHECK(bad_a == 0, "%lld alpha outside tolerance", (long long)bad_a);
    CHECK(bad_l == 0, "%lld l outside tolerance", (long long)bad_l);
    CHECK(bad_dead == 0, "%lld all -inf columns without alpha = 0, l = 0, m = -inf",
          (long long)bad_dead);
    int64_t bad = pad_changed(s, rows, cols, lds, ns);
    CHECK(bad == 0, "%lld padding slots of s changed", (long long)bad);

    /* two calls carrying m and l: rows [0, r1) then [r1, rows) */
    if (rows >= 2) {
        int64_t r1 = tu_int(&rng, 1, rows - 1);
        tu_case("%s softmax_cols split rows=%lld+%lld cols=%lld", t->name, (long long)r1,
                (long long)(rows - r1), (long long)cols);
        memcpy(s2, s0, sizeof(float) * (size_t)ns);
        memcpy(m2, m0, sizeof(float) * (size_t)cols);
        memcpy(l2, l0, sizeof(float) * (size_t)cols);
        t->k->softmax_cols(s2, r1, cols, lds, m2, l2, al1);
        t->k->softmax_cols(s2 + r1 * lds, rows - r1, cols, lds, m2, l2, al2);
        int64_t bm = 0, bl = 0, bp = 0;
        for (int64_t i = 0; i < cols; i++) {
            if (fbits(m2[i]) != fbits(m[i])) bm++;
            if (o.m[i] == -INFINITY) {
                if (fbits(l2[i]) != 0) bl++;
            } else if (!close_rel(l2[i], l[i], 2e-5)) {
                bl++;
            }
            for (int64_t j = 0; j < rows; j++) {
                double q = s2[j * lds + i];
                if (j < r1) q *= al2[i]; /* rescale the first part to the final max */
                double want = s[j * lds + i];
                if (o.m[i] == -INFINITY || s0[j * lds + i] == -INFINITY) {
                    if (q != 0) bp++;
                } else if (!close_rel(q, want, 2 * exp_tol(40.0))) {
                    bp++;
                }
            }
        }
        CHECK(bm == 0, "%lld m differ from one call over all rows", (long long)bm);
        CHECK(bl == 0, "%lld l differ from one call over all rows", (long long)bl);
        CHECK(bp == 0, "%lld p (first part times the second alpha) differ from one call",
              (long long)bp);
    }
    xfree(s0), xfree(s), xfree(s2), xfree(m0), xfree(l0), xfree(m), xfree(l), xfree(al);
    xfree(m2), xfree(l2), xfree(al1), xfree(al2);
    xfree(o.p), xfree(o.m), xfree(o.l), xfree(o.alpha);
}

/* A NaN logit poisons its column: l becomes NaN; other columns are unharmed. */
static void softmax_nan(const table *t) {
    enum { R = 5, C = 11 };
    float s[R * C], m[C], l[C], al[C];
    for (int j = 0; j < R; j++)
        for (int i = 0; i < C; i++) s[j * C + i] = (float)(j - i) * 0.25f;
    s[1 * C + 2] = NAN;  /* a NaN before larger numbers of its column */
    s[4 * C + 9] = NAN;  /* in the last row */
    for (int i = 0; i < C; i++) m[i] = -INFINITY, l[i] = 0;
    m[5] = NAN; /* a NaN running max */
    t->k->softmax_cols(s, R, C, C, m, l, al);
    tu_case("%s softmax_cols NaN", t->name);
    CHECK(isnan(l[2]) && isnan(l[9]) && isnan(l[5]), "l of columns with a NaN: %g %g %g",
          (double)l[2], (double)l[9], (double)l[5]);
    int ok = 1;
    for (int i = 0; i < C; i++)
        if (i != 2 && i != 9 && i != 5 && !isfinite(l[i])) ok = 0;
    CHECK(ok, "a NaN leaked into another column");
    /* Informational (not a failure: kernels.h does not say what m becomes): the
     * scalar kernel keeps a NaN running max once it has met a NaN. */
    if (!isnan(m[2]) || !isnan(m[9]) || !isnan(m[5]))
        fprintf(stderr, "note: %s softmax_cols: m of NaN columns = %g %g %g (scalar: NaN)\n",
                t->name, (double)m[2], (double)m[9], (double)m[5]);
}

/* softmax_rows on a row-major tile (query rows, key columns) against the
 * double-precision online softmax of its transpose. Tolerances: m exact;
 * p, alpha, l relative 1e-5 (exp2 within 2.3e-7, sums of <= 100 terms). */
static void softmax_rows_case(const table *t, uint64_t idx, int64_t rows, int64_t cols) {
    tu_rng rng = {tu_seed(SALT, idx)};
    int64_t lds = cols + tu_int(&rng, 0, 3);
    int64_t ns = (rows - 1) * lds + cols;
    float *s = falloc(ns), *st = falloc(rows * cols);
    float *m = falloc(rows), *l = falloc(rows), *al = falloc(rows), *m0 = falloc(rows), *l0 = falloc(rows);
    sm_ref o = {xmalloc(sizeof(double) * (size_t)(rows * cols)), xmalloc(sizeof(double) * (size_t)rows),
                xmalloc(sizeof(double) * (size_t)rows), xmalloc(sizeof(double) * (size_t)rows)};
    fsent(s, ns);
    for (int64_t r = 0; r < rows; r++) {
        int dead = r % 4 == 3;
        for (int64_t c = 0; c < cols; c++) {
            float x = dead || tu_int(&rng, 0, 4) == 0 ? -INFINITY : frand(&rng, -20, 20);
            s[r * lds + c] = x;
            st[c * rows + r] = x; /* transpose: column-major for the reference */
        }
        m0[r] = r % 2 ? frand(&rng, -10, 10) : -INFINITY;
        l0[r] = r % 2 ? frand(&rng, 0.5, 3) : 0.0f;
        if (dead && r % 2) m0[r] = -INFINITY, l0[r] = 0.0f;
    }
    memcpy(m, m0, sizeof(float) * (size_t)rows);
    memcpy(l, l0, sizeof(float) * (size_t)rows);
    t->k->softmax_rows(s, rows, cols, lds, m, l, al);
    softmax_ref(st, cols, rows, rows, m0, l0, &o);
    tu_case("%s softmax_rows rows=%lld cols=%lld lds=%lld", t->name, (long long)rows,
            (long long)cols, (long long)lds);
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        if ((double)m[r] != o.m[r]) bad++;
        if (!close_rel(al[r], o.alpha[r], 1e-5) || !close_rel(l[r], o.l[r], 1e-5)) bad++;
        for (int64_t c = 0; c < cols; c++)
            if (!close_rel(s[r * lds + c], o.p[c * rows + r], 1e-5)) bad++;
        for (int64_t c = cols; c < lds && r + 1 < rows; c++)
            if (fbits(s[r * lds + c]) != SENTINEL) bad++; /* padding untouched */
    }
    CHECK(bad == 0, "%lld values outside tolerance", (long long)bad);
    xfree(s), xfree(st), xfree(m), xfree(l), xfree(al), xfree(m0), xfree(l0);
    xfree(o.p), xfree(o.m), xfree(o.l), xfree(o.alpha);
}

static void test_softmax(const table *t) {
    static const int64_t shp[][2] = {{1, 1},  {1, 8},   {2, 1},  {3, 7},   {5, 9},
                                     {7, 24}, {16, 16}, {17, 13}, {31, 64}, {64, 33},
                                     {100, 17}, {4, 100}};
    for (size_t i = 0; i < sizeof shp / sizeof shp[0]; i++)
        softmax_case(t, 2000 + i, shp[i][0], shp[i][1]);
    for (size_t i = 0; i < sizeof shp / sizeof shp[0]; i++)
        softmax_rows_case(t, 2100 + i, shp[i][1], shp[i][0]);
    softmax_nan(t);
}

/* ------------------------------------------------------------ exp2_rows */

static void exp2_case(const table *t, uint64_t idx, int64_t rows, int64_t cols) {
    tu_rng rng = {tu_seed(SALT, idx)};
    int64_t lds = cols + tu_int(&rng, 1, 4);
    int64_t ns = (rows - 1) * lds + cols + ((idx & 1) ? 0 : lds - cols);
    float *s = falloc(ns), *s0 = falloc(ns), *sub = falloc(rows);
    float mul = frand(&rng, 0.5, 2);
    fsent(s, ns);
    for (int64_t r = 0; r < rows; r++) {
        sub[r] = frand(&rng, -20, 20);
        for (int64_t c = 0; c < cols; c++) s[r * lds + c] = frand(&rng, -30, 30);
    }
    memcpy(s0, s, sizeof(float) * (size_t)ns);
    t->k->exp2_rows(s, rows, cols, lds, mul, sub);
    tu_case("%s exp2_rows rows=%lld cols=%lld lds=%lld", t->name, (long long)rows,
            (long long)cols, (long long)lds);
    int64_t bad = 0;
    double worst_g = 0, worst_r = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            double sm = (double)s0[r * lds + c] * mul, x = sm - sub[r];
            double ref = exp2(x), got = s[r * lds + c];
            if (!close_rel(got, ref, exp_tol(fabs(sm) + fabs(x)))) {
                if (!bad++) worst_g = got, worst_r = ref;
            }
        }
    CHECK(bad == 0, "%lld outside tolerance, first got %.9g ref %.9g", (long long)bad, worst_g,
          worst_r);
    int64_t bp = pad_changed(s, rows, cols, lds, ns);
    CHECK(bp == 0, "%lld padding slots changed", (long long)bp);
    xfree(s), xfree(s0), xfree(sub);
}

static void exp2_specials(const table *t) {
    static const float xs[] = {-INFINITY, -1000.0f, -200.0f, -150.0f, -130.0f, -127.0f,
                               -126.0f,   -125.0f,  -1.0f,   -0.0f,   0.0f,    0.5f,
                               1.0f,      10.0f,    127.0f,  127.5f,  127.9f,  127.99f,
                               128.0f,    129.0f,   200.0f,  INFINITY, NAN,    -NAN};
    enum { N = sizeof xs / sizeof xs[0] };
    float s[N], zero = 0.0f;
    memcpy(s, xs, sizeof s);
    t->k->exp2_rows(s, 1, N, N, 1.0f, &zero);
    tu_case("%s exp2 specials", t->name);
    for (int i = 0; i < N; i++) {
        double x = xs[i], ref = exp2(x), g = s[i];
        if (isnan(x))
            CHECK(isnan(g), "2^NaN = %g", g);
        else if (x <= -200) /* -inf included */
            CHECK(fbits(s[i]) == 0, "2^%g = %g, want +0 exactly", x, g);
        else if (ref < ldexp(1, -125)) /* an implementation may flush these to 0 */
            CHECK(g >= 0 && fabs(g - ref) <= ldexp(1, -125), "2^%g = %g (ref %g)", x, g, ref);
        else if (ref > FLT_MAX)
            CHECK(g == INFINITY, "2^%g = %g, want inf", x, g);
        else
            CHECK(close_rel(g, ref, 1e-6), "2^%g = %.9g, ref %.9g", x, g, ref);
    }
    /* accuracy: relative error < 1e-6 over [-120, 120] (mul = 1, sub = 0: exact argument) */
    enum { M = 240001 };
    float *v = falloc(M);
    tu_rng rng = {tu_seed(SALT, 3000)};
    for (int i = 0; i < M; i++)
        v[i] = i % 2 ? (float)(-120.0 + 240.0 * i / (M - 1)) : frand(&rng, -120, 120);
    float *v0 = falloc(M);
    memcpy(v0, v, sizeof(float) * M);
    t->k->exp2_rows(v, 1, M, M, 1.0f, &zero);
    double worst = 0, wx = 0;
    for (int i = 0; i < M; i++) {
        double ref = exp2((double)v0[i]), e = fabs(v[i] - ref) / ref;
        if (!(e <= worst)) worst = e, wx = v0[i];
    }
    tu_case("%s exp2 accuracy on [-120, 120]", t->name);
    CHECK(worst < 1e-6, "max relative error %.3g at x = %.9g", worst, wx);
    printf("  %-7s exp2 max relative error on [-120, 120]: %.3g\n", t->name, worst);
    xfree(v), xfree(v0);
}

static void test_exp2(const table *t) {
    static const int64_t shp[][2] = {{1, 1}, {1, 7}, {2, 8}, {3, 9}, {5, 16}, {4, 17},
                                     {6, 31}, {7, 64}, {2, 65}, {3, 100}};
    for (size_t i = 0; i < sizeof shp / sizeof shp[0]; i++)
        exp2_case(t, 4000 + i, shp[i][0], shp[i][1]);
    exp2_specials(t);
}

/* ------------------------------------------------------------ dsoftmax_rows */

static void dsoftmax_case(const table *t, uint64_t idx, int64_t rows, int64_t cols) {
    tu_rng rng = {tu_seed(SALT, idx)};
    int64_t ld = cols + tu_int(&rng, 0, 3);
    int64_t n = (rows - 1) * ld + cols;
    float *dp = falloc(n), *dp0 = falloc(n), *p = falloc(n), *delta = falloc(rows);
    float mul = frand(&rng, 0.1, 2);
    fsent(dp, n);
    ffill(p, n, NAN);
    for (int64_t r = 0; r < rows; r++) {
        delta[r] = frand(&rng, -1, 1);
        for (int64_t c = 0; c < cols; c++) {
            dp[r * ld + c] = frand(&rng, -2, 2);
            p[r * ld + c] = frand(&rng, 0, 1);
        }
    }
    memcpy(dp0, dp, sizeof(float) * (size_t)n);
    t->k->dsoftmax_rows(dp, p, rows, cols, ld, delta, mul);
    tu_case("%s dsoftmax_rows rows=%lld cols=%lld ld=%lld", t->name, (long long)rows,
            (long long)cols, (long long)ld);
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            double ref = (double)p[r * ld + c] * ((double)dp0[r * ld + c] - delta[r]) * mul;
            if (!close_rel(dp[r * ld + c], ref, 1e-6)) bad++;
        }
    CHECK(bad == 0, "%lld outside tolerance", (long long)bad);
    int64_t bp = pad_changed(dp, rows, cols, ld, n);
    CHECK(bp == 0, "%lld padding slots changed", (long long)bp);
    xfree(dp), xfree(dp0), xfree(p), xfree(delta);
}

/* softcap: s = out_mul * tanh(s * in_mul), t_out = the tanh. Tolerance:
 * |t - tanh| <= 3e-7 absolute (the kernels compute tanh from exp2 without a
 * small-argument series; logits only ever need absolute accuracy), s within
 * 3e-7 * |out_mul| + 1 ulp; NaN stays NaN; +-inf give +-1. */
static void softcap_case(const table *t, uint64_t idx, int64_t rows, int64_t cols) {
    tu_rng rng = {tu_seed(SALT, idx)};
    int64_t lds = cols + tu_int(&rng, 0, 3), ldt = cols + tu_int(&rng, 0, 2);
    int64_t ns = (rows - 1) * lds + cols, nt = (rows - 1) * ldt + cols;
    float *s = falloc(ns), *s0 = falloc(ns), *th = falloc(nt);
    fsent(s, ns);
    fsent(th, nt);
    float in_mul = frand(&rng, 0.01, 0.2), out_mul = frand(&rng, 5, 50);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            int64_t k = r * cols + c;
            float x = k % 11 == 3 ? frand(&rng, -1e-3, 1e-3) : frand(&rng, -400, 400);
            if (k == 5) x = INFINITY;
            if (k == 6) x = -INFINITY;
            if (k == 7) x = NAN;
            s[r * lds + c] = x;
        }
    memcpy(s0, s, sizeof(float) * (size_t)ns);
    t->k->softcap(s, rows, cols, lds, in_mul, out_mul, th, ldt);
    tu_case("%s softcap rows=%lld cols=%lld", t->name, (long long)rows, (long long)cols);
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++) {
            double ref = tanh((double)s0[r * lds + c] * (double)in_mul);
            float got_t = th[r * ldt + c], got_s = s[r * lds + c];
            if (isnan(ref)) {
                if (!isnan(got_t) || !isnan(got_s)) bad++;
                continue;
            }
            if (!(fabs(got_t - ref) <= 3e-7)) bad++;
            if (!(fabs(got_s - out_mul * ref) <= 3e-7 * out_mul + 1e-6 * fabs(out_mul * ref))) bad++;
        }
        for (int64_t c = cols; c < lds && r + 1 < rows; c++)
            if (fbits(s[r * lds + c]) != SENTINEL) bad++;
        for (int64_t c = cols; c < ldt && r + 1 < rows; c++)
            if (fbits(th[r * ldt + c]) != SENTINEL) bad++;
    }
    CHECK(bad == 0, "%lld values outside tolerance or padding touched", (long long)bad);
    /* without t_out */
    memcpy(s, s0, sizeof(float) * (size_t)ns);
    t->k->softcap(s, rows, cols, lds, in_mul, out_mul, NULL, 0);
    int64_t bad2 = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            double ref = out_mul * tanh((double)s0[r * lds + c] * (double)in_mul);
            float got = s[r * lds + c];
            if (isnan(ref) ? !isnan(got) : !(fabs(got - ref) <= 3e-7 * out_mul + 1e-6 * fabs(ref)))
                bad2++;
        }
    CHECK(bad2 == 0, "%lld values outside tolerance (no t_out)", (long long)bad2);
    xfree(s), xfree(s0), xfree(th);
}

static void test_softcap(const table *t) {
    static const int64_t shp[][2] = {{1, 1}, {1, 8}, {2, 7}, {3, 16}, {5, 17}, {4, 33}, {2, 100}};
    for (size_t i = 0; i < sizeof shp / sizeof shp[0]; i++)
        softcap_case(t, 5500 + i, shp[i][0], shp[i][1]);
}

static void test_dsoftmax(const table *t) {
    static const int64_t shp[][2] = {{1, 1}, {1, 8}, {2, 7}, {3, 9}, {5, 16},
                                     {4, 17}, {6, 33}, {7, 64}, {3, 100}};
    for (size_t i = 0; i < sizeof shp / sizeof shp[0]; i++)
        dsoftmax_case(t, 5000 + i, shp[i][0], shp[i][1]);
}

/* ------------------------------------------------------------ dot_rows, axpy */

static void test_dot(const table *t) {
    static const int64_t ds[] = {1, 15, 16, 17, 64, 128, 129};
    static const int64_t rs[] = {1, 2, 3, 5, 8};
    uint64_t idx = 6000;
    for (size_t i = 0; i < sizeof ds / sizeof ds[0]; i++)
        for (size_t j = 0; j < sizeof rs / sizeof rs[0]; j++) {
            int64_t d = ds[i], rows = rs[j];
            tu_rng rng = {tu_seed(SALT, idx++)};
            int64_t ldq = d + tu_int(&rng, 0, 3);
            int64_t nq = (rows - 1) * ldq + d;
            float *k = falloc(d), *q = falloc(nq), *out = falloc(rows);
            ffill(q, nq, NAN);
            for (int64_t x = 0; x < d; x++) k[x] = frand(&rng, -1, 1);
            for (int64_t r = 0; r < rows; r++)
                for (int64_t x = 0; x < d; x++) q[r * ldq + x] = frand(&rng, -1, 1);
            ffill(out, rows, NAN);
            t->k->dot_rows(k, q, rows, d, ldq, out);
            tu_case("%s dot_rows d=%lld rows=%lld ldq=%lld", t->name, (long long)d,
                    (long long)rows, (long long)ldq);
            int64_t bad = 0;
            for (int64_t r = 0; r < rows; r++) {
                double s = 0, b = 0;
                for (int64_t x = 0; x < d; x++) {
                    double v = (double)q[r * ldq + x] * k[x];
                    s += v;
                    b += fabs(v);
                }
                if (!(fabs(out[r] - s) <= 1e-5 * b)) bad++;
            }
            CHECK(bad == 0, "%lld of %lld rows outside tolerance", (long long)bad,
                  (long long)rows);
            xfree(k), xfree(q), xfree(out);
        }
}

static void test_axpy(const table *t) {
    static const int64_t ns[] = {1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100, 129, 1000};
    uint64_t idx = 7000;
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
        for (int guard = 0; guard < 2; guard++) {
            int64_t n = ns[i], ny = n + (guard ? 9 : 0);
            tu_rng rng = {tu_seed(SALT, idx++)};
            float *x = falloc(n), *y = falloc(ny), *y0 = falloc(n);
            float a = frand(&rng, -2, 2);
            fsent(y, ny);
            for (int64_t j = 0; j < n; j++) {
                x[j] = frand(&rng, -1, 1);
                y[j] = y0[j] = frand(&rng, -1, 1);
            }
            t->k->axpy(n, a, x, y);
            tu_case("%s axpy n=%lld%s", t->name, (long long)n, guard ? " guarded" : "");
            int64_t bad = 0, bg = 0;
            for (int64_t j = 0; j < n; j++) {
                double ref = (double)y0[j] + (double)a * x[j];
                if (!(fabs(y[j] - ref) <= 1e-6 * (fabs((double)a * x[j]) + fabs(y0[j])))) bad++;
            }
            for (int64_t j = n; j < ny; j++)
                if (fbits(y[j]) != SENTINEL) bg++;
            CHECK(bad == 0, "%lld outside tolerance", (long long)bad);
            CHECK(bg == 0, "%lld slots after y[n-1] changed", (long long)bg);
            xfree(x), xfree(y), xfree(y0);
        }
}

/* ------------------------------------------------------------ transpose, key_gate_chunk */

static void test_transpose(const table *t) {
    static const int64_t shp[][2] = {{1, 1}, {1, 17}, {16, 16}, {5, 128}, {16, 60},
                                     {17, 33}, {50, 8}, {31, 100}};
    uint64_t idx = 7500;
    for (size_t i = 0; i < sizeof shp / sizeof shp[0]; i++) {
        const int64_t rows = shp[i][0], cols = shp[i][1];
        tu_rng rng = {tu_seed(SALT, idx++)};
        const int64_t lds = cols + tu_int(&rng, 0, 3), ldd = rows + tu_int(&rng, 0, 3);
        float *src = falloc((rows - 1) * lds + cols), *dst = falloc(cols * ldd);
        ffill(src, (rows - 1) * lds + cols, NAN);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++) src[r * lds + c] = frand(&rng, -1, 1);
        fsent(dst, cols * ldd);
        t->k->transpose(src, lds, rows, cols, dst, ldd);
        tu_case("%s transpose %lldx%lld lds=%lld ldd=%lld", t->name, (long long)rows,
                (long long)cols, (long long)lds, (long long)ldd);
        int64_t bad = 0;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++) bad += fbits(dst[c * ldd + r]) != fbits(src[r * lds + c]);
        CHECK(bad == 0, "%lld elements differ", (long long)bad);
        CHECK(pad_changed(dst, cols, rows, ldd, cols * ldd) == 0, "padding changed");
        xfree(src), xfree(dst);
    }
}

/* store_stream: a bitwise copy, the padding after each row untouched, at a
 * 64-byte aligned and an unaligned destination. */
static void test_store_stream(const table *t) {
    static const int64_t shp[][2] = {{1, 1}, {3, 16}, {16, 128}, {5, 17}, {7, 100}, {2, 33}};
    uint64_t idx = 7700;
    for (size_t i = 0; i < sizeof shp / sizeof shp[0]; i++)
        for (int shift = 0; shift < 2; shift++) {
            const int64_t rows = shp[i][0], n = shp[i][1];
            tu_rng rng = {tu_seed(SALT, idx++)};
            const int64_t lds = n + tu_int(&rng, 0, 3), ldd = (n + 15) / 16 * 16 + 16;
            float *src = falloc((rows - 1) * lds + n), *buf = falloc(rows * ldd + 16);
            for (int64_t x = 0; x < (rows - 1) * lds + n; x++) src[x] = frand(&rng, -1, 1);
            fsent(buf, rows * ldd + 16);
            float *dst = buf + shift; /* buf ends at a page and holds a multiple of 16
                                         floats: it starts 64-byte aligned */
            t->k->store_stream(src, lds, rows, n, dst, ldd);
            tu_case("%s store_stream %lldx%lld ldd=%lld shift=%d", t->name, (long long)rows,
                    (long long)n, (long long)ldd, shift);
            int64_t bad = 0;
            for (int64_t r = 0; r < rows; r++)
                for (int64_t x = 0; x < n; x++) bad += fbits(dst[r * ldd + x]) != fbits(src[r * lds + x]);
            CHECK(bad == 0, "%lld elements differ", (long long)bad);
            CHECK(pad_changed(dst, rows, n, ldd, rows * ldd + 16 - shift) == 0, "padding changed");
            xfree(src), xfree(buf);
        }
}

/* Against double: b summed in double from the clamped gates, then the
 * products with exp2 of b rounded to f32 (tolerance exp_tol of the
 * exponent, two of them for krt). */
static void key_gate_case(const table *t, uint64_t idx, int64_t n, int64_t d, double glo,
                          double ghi, int minus_inf, int expect_ok) {
    tu_rng rng = {tu_seed(SALT, idx)};
    const int64_t ldg = d + tu_int(&rng, 0, 3), ldq = d + tu_int(&rng, 0, 3),
                  ldk = d + tu_int(&rng, 0, 3), ldt = n + tu_int(&rng, 0, 3);
    const float floor_ = -1e4f, range = 20.0f, scale = 0.3f;
    float *g = falloc(n * ldg), *q = falloc(n * ldq), *k = falloc(n * ldk);
    float *qp = falloc(n * d), *kt = falloc(d * ldt), *krt = falloc(d * ldt), *pl = falloc(d);
    float *ke = falloc(n * d);
    double *bsum = xmalloc((size_t)d * sizeof(double));
    ffill(g, n * ldg, NAN), ffill(q, n * ldq, NAN), ffill(k, n * ldk, NAN);
    for (int64_t i = 0; i < n; i++)
        for (int64_t x = 0; x < d; x++) {
            g[i * ldg + x] = frand(&rng, glo, ghi);
            q[i * ldq + x] = frand(&rng, -1, 1);
            k[i * ldk + x] = frand(&rng, -1, 1);
        }
    if (minus_inf) g[(n - 1) * ldg + d / 2] = -INFINITY; /* the floor: out of range */
    fsent(kt, d * ldt), fsent(krt, d * ldt);
    int ok = t->k->key_gate_chunk(n, d, g, ldg, q, ldq, k, ldk, scale, floor_, range, qp, kt,
                                  krt, ldt, pl, ke, bsum);
    tu_case("%s key_gate_chunk n=%lld d=%lld gates [%g, %g]", t->name, (long long)n,
            (long long)d, glo, ghi);
    CHECK(ok == expect_ok, "returned %d, expected %d", ok, expect_ok);
    if (ok) {
        int64_t bad = 0;
        double *b = xmalloc((size_t)d * sizeof(double));
        for (int64_t x = 0; x < d; x++) b[x] = 0.0;
        const double l2e = 1.4426950408889634;
        for (int64_t i = 0; i < n; i++)
            for (int64_t x = 0; x < d; x++) {
                const double gx = g[i * ldg + x];
                b[x] += gx < floor_ ? floor_ : gx;
                const double bl = (double)(float)b[x] * l2e;
                const double p = exp2(bl), e = exp2(-bl), pn = i == n - 1 ? p : 0;
                const double rq = scale * (double)q[i * ldq + x] * p, rk = k[i * ldk + x] * e;
                bad += !(fabs(qp[i * d + x] - rq) <= exp_tol(bl) * fabs(rq) + 1e-30);
                bad += !(fabs(kt[x * ldt + i] - rk) <= exp_tol(bl) * fabs(rk) + 1e-30);
                if (i == n - 1) bad += !(fabs(pl[x] - pn) <= exp_tol(bl) * pn);
            }
        for (int64_t x = 0; x < d; x++)
            for (int64_t i = 0; i < n; i++) {
                const double rk = (double)kt[x * ldt + i] * pl[x];
                bad += !(fabs(krt[x * ldt + i] - rk) <= 1e-6 * fabs(rk) + 1e-30);
            }
        CHECK(bad == 0, "%lld values outside tolerance", (long long)bad);
        CHECK(pad_changed(kt, d, n, ldt, d * ldt) == 0, "kt padding changed");
        CHECK(pad_changed(krt, d, n, ldt, d * ldt) == 0, "krt padding changed");
        xfree(b);
    }
    xfree(g), xfree(q), xfree(k), xfree(qp), xfree(kt), xfree(krt), xfree(pl), xfree(ke);
    xfree(bsum);
}

static void test_key_gate_chunk(const table *t) {
    static const int64_t shp[][2] = {{1, 1}, {1, 16}, {16, 128}, {5, 17}, {16, 60},
                                     {3, 33}, {50, 8}, {24, 100}};
    uint64_t idx = 7600;
    for (size_t i = 0; i < sizeof shp / sizeof shp[0]; i++) {
        const int64_t n = shp[i][0], d = shp[i][1];
        key_gate_case(t, idx++, n, d, -0.3, 0.3, 0, 1);   /* within range, both signs */
        key_gate_case(t, idx++, n, d, -0.01, 0.0, 0, 1);  /* gates near 1 */
        key_gate_case(t, idx++, n, d, -0.3, 0.3, 1, 0);   /* a gate of 0 (log -inf) */
        if (n >= 16) key_gate_case(t, idx++, n, d, -2.5, -1.5, 0, 0); /* decays past e^-20 */
    }
}

/* ------------------------------------------------------------ qk_heads, pv_heads */

static const attn_dtype CACHE_KINDS[] = {ATTN_F32, ATTN_F16, ATTN_BF16};

/* A cache block: nk rows of `heads` heads of n values, row j of head h at
 * element j * ld + h * hs, allocated to end exactly after the last value
 * (unused elements NaN). vals holds the values as f32 (after rounding to the
 * kind) at the same offsets. */
typedef struct cache_blk {
    void *data;
    float *vals;
    int64_t ld, hs, len;
} cache_blk;

static cache_blk cache_make(tu_rng *rng, attn_dtype kind, int64_t nk, int64_t heads, int64_t n,
                            int head_major) {
    cache_blk c;
    int64_t pad1 = tu_int(rng, 0, 3), pad2 = tu_int(rng, 0, 5);
    if (head_major) { /* [heads][nk][n] */
        c.ld = n + pad1;
        c.hs = nk * c.ld + pad2;
    } else { /* [nk][heads][n] */
        c.hs = n + pad1;
        c.ld = heads * c.hs + pad2;
    }
    c.len = (nk - 1) * c.ld + (heads - 1) * c.hs + n;
    size_t es = kind == ATTN_F32 ? 4 : 2;
    c.data = xmalloc(es * (size_t)c.len);
    c.vals = falloc(c.len);
    for (int64_t i = 0; i < c.len; i++) {
        if (kind == ATTN_F32) ((float *)c.data)[i] = NAN;
        else ((uint16_t *)c.data)[i] = kind == ATTN_F16 ? 0x7e00 : 0x7fc0;
    }
    for (int64_t j = 0; j < nk; j++)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t i = 0; i < n; i++) {
                int64_t off = j * c.ld + h * c.hs + i;
                float x = frand(rng, -1, 1);
                if (kind == ATTN_F16) {
                    ((uint16_t *)c.data)[off] = attn_f32_to_f16(x);
                    x = attn_f16_to_f32(((uint16_t *)c.data)[off]);
                } else if (kind == ATTN_BF16) {
                    ((uint16_t *)c.data)[off] = attn_f32_to_bf16(x);
                    x = attn_bf16_to_f32(((uint16_t *)c.data)[off]);
                } else {
                    ((float *)c.data)[off] = x;
                }
                c.vals[off] = x;
            }
    return c;
}

/* qk_heads: |err| <= 1e-5 * sum |q||k|; pv_heads: |err| <= 1e-5 * (|o| + sum |p||v|). */
static void heads_case(const table *t, uint64_t idx, attn_dtype kind, int64_t heads, int64_t nk,
                       int64_t rows, int64_t d) {
    tu_rng rng = {tu_seed(SALT, idx)};
    int head_major = (int)(idx & 1);
    const char *kn = kind == ATTN_F32 ? "f32" : kind == ATTN_F16 ? "f16" : "bf16";

    /* qk_heads: s[h][j][r] = sum_i q[h][r][i] * k(j, h)[i] */
    cache_blk kc = cache_make(&rng, kind, nk, heads, d, head_major);
    int64_t nq = heads * rows * d, ns = heads * nk * rows;
    float *q = falloc(nq), *sv = falloc(ns);
    for (int64_t i = 0; i < nq; i++) q[i] = frand(&rng, -1, 1);
    ffill(sv, ns, NAN);
    t->k->qk_heads(kind, kc.data, kc.ld, kc.hs, heads, nk, q, rows, d, sv);
    tu_case("%s qk_heads %s heads=%lld nk=%lld rows=%lld d=%lld ld=%lld hs=%lld", t->name, kn,
            (long long)heads, (long long)nk, (long long)rows, (long long)d, (long long)kc.ld,
            (long long)kc.hs);
    int64_t bad = 0;
    for (int64_t h = 0; h < heads; h++)
        for (int64_t j = 0; j < nk; j++)
            for (int64_t r = 0; r < rows; r++) {
                double sum = 0, b = 0;
                for (int64_t i = 0; i < d; i++) {
                    double x = (double)q[(h * rows + r) * d + i] * kc.vals[j * kc.ld + h * kc.hs + i];
                    sum += x;
                    b += fabs(x);
                }
                if (!(fabs(sv[(h * rows + r) * nk + j] - sum) <= 1e-5 * b)) bad++;
            }
    CHECK(bad == 0, "%lld of %lld outside tolerance", (long long)bad, (long long)ns);
    xfree(kc.data), xfree(kc.vals), xfree(q);

    /* pv_heads: o[h][r][:] += sum_j p[h][j][r] * v(j, h)[:], with dv = d */
    int64_t dv = d, no = heads * rows * dv;
    cache_blk vc = cache_make(&rng, kind, nk, heads, dv, !head_major);
    float *o = falloc(no), *o0 = falloc(no);
    for (int64_t i = 0; i < ns; i++) sv[i] = frand(&rng, 0, 1); /* probabilities */
    for (int64_t i = 0; i < no; i++) o[i] = o0[i] = frand(&rng, -1, 1);
    t->k->pv_heads(kind, vc.data, vc.ld, vc.hs, heads, nk, sv, rows, dv, o);
    tu_case("%s pv_heads %s heads=%lld nk=%lld rows=%lld dv=%lld ld=%lld hs=%lld", t->name, kn,
            (long long)heads, (long long)nk, (long long)rows, (long long)dv, (long long)vc.ld,
            (long long)vc.hs);
    bad = 0;
    for (int64_t h = 0; h < heads; h++)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < dv; c++) {
                double sum = o0[(h * rows + r) * dv + c], b = fabs(sum);
                for (int64_t j = 0; j < nk; j++) {
                    double x = (double)sv[(h * rows + r) * nk + j] * vc.vals[j * vc.ld + h * vc.hs + c];
                    sum += x;
                    b += fabs(x);
                }
                if (!(fabs(o[(h * rows + r) * dv + c] - sum) <= 1e-5 * b)) bad++;
            }
    CHECK(bad == 0, "%lld of %lld outside tolerance", (long long)bad, (long long)no);
    xfree(vc.data), xfree(vc.vals), xfree(o), xfree(o0), xfree(sv);
}

static void test_heads(const table *t) {
    static const int64_t ds[] = {1, 7, 8, 15, 16, 17, 31, 64, 65, 100, 128, 129, 600};
    uint64_t idx = 9000;
    for (int kk = 0; kk < 3; kk++)
        for (size_t i = 0; i < sizeof ds / sizeof ds[0]; i++) {
            int64_t heads = 1 + (int64_t)(i % 3), nk = (int64_t[]){1, 5, 17}[(i + kk) % 3];
            int64_t rows = (int64_t[]){1, 3, 8}[(i / 3 + kk) % 3];
            heads_case(t, idx++, CACHE_KINDS[kk], heads, nk, rows, ds[i]);
        }
}

/* ------------------------------------------------------------ conversions */

/* Half and bfloat16 special inputs for the f32 -> 16-bit conversions. */
static const uint32_t SPECIAL_F32[] = {
    0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, /* +-0, +-inf */
    0x7fc00000u, 0xffc00000u,                           /* quiet NaNs */
    0x7f800001u, 0xff800001u, 0x7fa00000u, 0x7fc02000u, 0x7fffffffu, 0xffffe000u, /* NaN payloads */
    0x00000001u, 0x80000001u, 0x007fffffu, 0x00400000u, /* f32 subnormals */
    0x00800000u, 0x7f7fffffu, 0xff7fffffu,              /* min normal, +-FLT_MAX (bf16: inf) */
    0x477fe000u, 0xc77fe000u,                           /* +-65504: max half */
    0x477fefffu, 0x477ff000u, 0x477ff001u, 0x47800000u, /* below / at / above the half tie to inf */
    0x33800000u, 0x33000000u, 0x33000001u, 0x33c00000u, /* 2^-24, 2^-25 (tie to 0), 1.5 * 2^-24 */
    0x34000000u, 0x38800000u, 0x387fe000u, 0x387fffffu, /* half subnormals .. min normal */
    0x3f801000u, 0x3f803000u, 0x3f801001u,              /* half ties 1 + 2^-11, 1 + 3 * 2^-11 */
    0x3f808000u, 0x3f818000u, 0x3f808001u, 0x3f807fffu, /* bf16 ties and neighbours */
    0x7f7f8000u, 0x7f7f7fffu,                           /* bf16 tie to inf, just below */
    0x3f800000u, 0xbf800000u, 0x40490fdbu,              /* 1, -1, pi */
};

/* NaN payloads. F16C (vcvtph2ps, vcvtps2ph) quiets a signalling NaN and keeps
 * the top payload bits, while attn_f16_to_f32 keeps the f16 bits as they are
 * and attn_f32_to_f16 turns every NaN into sign | 0x7e00. With
 * STRICT_NAN_PAYLOADS 0 a NaN input with a non-canonical payload (anything but
 * 0x7fc00000 / 0x7e00 / 0x7fc0 up to the sign) needs only a NaN of the same
 * sign, and payload differences are counted and printed as a note; with 1 they
 * are failures like any other bit difference. Everything else is bit-exact. */
#ifndef STRICT_NAN_PAYLOADS
#define STRICT_NAN_PAYLOADS 0
#endif

static int64_t nan_payload_diffs;
static char nan_payload_msg[160];

/* 1: matches; 0: a failure; 2 (not strict): a NaN payload that differs */
static int nan_payload_case(int in_nan_noncanonical, int got_nan, int same_sign, int same_bits,
                            const char *what, unsigned in, unsigned got, unsigned want) {
    if (same_bits) return 1;
    if (STRICT_NAN_PAYLOADS || !in_nan_noncanonical || !got_nan || !same_sign) return 0;
    if (!nan_payload_diffs++)
        snprintf(nan_payload_msg, sizeof nan_payload_msg, "%s in 0x%x: got 0x%x, scalar 0x%x",
                 what, in, got, want);
    return 2;
}

static int u16_ok(uint16_t got, float in, int bf) {
    uint16_t want = bf ? attn_f32_to_bf16(in) : attn_f32_to_f16(in);
    uint32_t u = fbits(in);
    int noncanon = (u & 0x7fffffffu) > 0x7f800000u && (u & 0x7fffffffu) != 0x7fc00000u;
    int got_nan = bf ? (got & 0x7fff) > 0x7f80 : (got & 0x7fff) > 0x7c00;
    return nan_payload_case(noncanon, got_nan, (got & 0x8000) == (u >> 16 & 0x8000), got == want,
                            bf ? "f32_to_bf16" : "f32_to_f16", u, got, want);
}

static int f32_ok(float got, uint16_t in, int bf) {
    uint32_t want = fbits(bf ? attn_bf16_to_f32(in) : attn_f16_to_f32(in)), g = fbits(got);
    int noncanon = bf ? (in & 0x7fff) > 0x7f80 && (in & 0x7fff) != 0x7fc0
                      : (in & 0x7fff) > 0x7c00 && (in & 0x7fff) != 0x7e00;
    return nan_payload_case(noncanon, isnan(got), (g >> 16 & 0x8000) == (in & 0x8000u),
                            g == want, bf ? "bf16_to_f32" : "f16_to_f32", in, g, want);
}

static int64_t conv_u16_check(const uint16_t *got, const float *src, int64_t n, int bf,
                              char *msg, size_t len) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++)
        if (!u16_ok(got[i], src[i], bf) && !bad++)
            snprintf(msg, len, "in 0x%08x: got 0x%04x want 0x%04x", fbits(src[i]), got[i],
                     bf ? attn_f32_to_bf16(src[i]) : attn_f32_to_f16(src[i]));
    return bad;
}

static int64_t conv_f32_check(const float *got, const uint16_t *src, int64_t n, int bf,
                              char *msg, size_t len) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++)
        if (!f32_ok(got[i], src[i], bf) && !bad++)
            snprintf(msg, len, "in 0x%04x: got 0x%08x want 0x%08x", src[i], fbits(got[i]),
                     fbits(bf ? attn_bf16_to_f32(src[i]) : attn_f16_to_f32(src[i])));
    return bad;
}

static void test_conversions(const table *t) {
    char msg[160] = "";
    nan_payload_diffs = 0;
    /* 16 -> 32 bits: all 65536 inputs, then short runs from odd offsets (tails) */
    uint16_t *all = xmalloc(sizeof(uint16_t) * 65536);
    for (int i = 0; i < 65536; i++) all[i] = (uint16_t)i;
    for (int bf = 0; bf < 2; bf++) {
        float *out = falloc(65536);
        (bf ? t->k->bf16_to_f32 : t->k->f16_to_f32)(all, out, 65536);
        tu_case("%s %s_to_f32 all inputs", t->name, bf ? "bf16" : "f16");
        int64_t bad = conv_f32_check(out, all, 65536, bf, msg, sizeof msg);
        CHECK(bad == 0, "%lld of 65536 differ from the scalar conversion, first %s",
              (long long)bad, msg);
        xfree(out);
        for (int64_t n = 1; n <= 40; n++) {
            int64_t off = (n * 7919) % 60000 + (n & 1);
            float *o = falloc(n);
            (bf ? t->k->bf16_to_f32 : t->k->f16_to_f32)(all + off, o, n);
            bad = conv_f32_check(o, all + off, n, bf, msg, sizeof msg);
            tu_case("%s %s_to_f32 n=%lld", t->name, bf ? "bf16" : "f16", (long long)n);
            CHECK(bad == 0, "%lld differ, first %s", (long long)bad, msg);
            xfree(o);
        }
    }
    xfree(all);

    /* 32 -> 16 bits: specials, random bit patterns (NaN payloads, subnormals, all
     * exponents), random values around the half range and near bf16 ties */
    enum { NS = sizeof SPECIAL_F32 / sizeof SPECIAL_F32[0], NR = 1 << 18 };
    int64_t n = NS + NR;
    float *src = falloc(n);
    tu_rng rng = {tu_seed(SALT, 8000)};
    for (int i = 0; i < NS; i++) src[i] = bitsf(SPECIAL_F32[i]);
    for (int64_t i = NS; i < n; i++) {
        uint32_t u = (uint32_t)tu_next(&rng);
        switch (i % 4) {
        case 0: src[i] = bitsf(u); break;
        case 1: src[i] = (float)ldexp(tu_uniform(&rng, 1, 2), (int)tu_int(&rng, -27, 17)) *
                         (u & 1 ? -1.0f : 1.0f); break;
        case 2: src[i] = bitsf((u & 0x8fffe000u) | 0x38000000u | (u & 0x1000u)); break; /* f16 ties */
        default: src[i] = bitsf((u & 0xffff0000u) | (u & 1 ? 0x8000u : 0x7fffu)); break; /* bf16 ties */
        }
    }
    for (int bf = 0; bf < 2; bf++) {
        uint16_t *out = xmalloc(sizeof(uint16_t) * (size_t)n);
        (bf ? t->k->f32_to_bf16 : t->k->f32_to_f16)(src, out, n);
        tu_case("%s f32_to_%s specials and random", t->name, bf ? "bf16" : "f16");
        int64_t bad = conv_u16_check(out, src, n, bf, msg, sizeof msg);
        CHECK(bad == 0, "%lld of %lld differ from the scalar conversion, first %s",
              (long long)bad, (long long)n, msg);
        /* specials one by one, each a run of 1 (tail path) and inside a run of 8 */
        int64_t bs = 0;
        for (int i = 0; i < NS; i++) {
            uint16_t o1, o8[9];
            float in8[9];
            for (int j = 0; j < 9; j++) in8[j] = src[i];
            (bf ? t->k->f32_to_bf16 : t->k->f32_to_f16)(src + i, &o1, 1);
            (bf ? t->k->f32_to_bf16 : t->k->f32_to_f16)(in8, o8, 9);
            uint16_t want = bf ? attn_f32_to_bf16(src[i]) : attn_f32_to_f16(src[i]);
            int ok = u16_ok(o1, src[i], bf) != 0;
            for (int j = 0; j < 9; j++) ok &= u16_ok(o8[j], src[i], bf) != 0;
            if (!ok && !bs++)
                snprintf(msg, sizeof msg, "in 0x%08x: got 0x%04x (alone) 0x%04x (in a run) want 0x%04x",
                         SPECIAL_F32[i], o1, o8[0], want);
        }
        CHECK(bs == 0, "%lld specials differ, first %s", (long long)bs, msg);
        for (int64_t len = 1; len <= 40; len++) {
            int64_t off = (len * 104729) % (n - 64) + (len & 3);
            uint16_t *o = xmalloc(sizeof(uint16_t) * (size_t)len);
            (bf ? t->k->f32_to_bf16 : t->k->f32_to_f16)(src + off, o, len);
            tu_case("%s f32_to_%s n=%lld", t->name, bf ? "bf16" : "f16", (long long)len);
            bad = conv_u16_check(o, src + off, len, bf, msg, sizeof msg);
            CHECK(bad == 0, "%lld differ, first %s", (long long)bad, msg);
            xfree(o);
        }
        xfree(out);
    }
    xfree(src);
    if (nan_payload_diffs)
        fprintf(stderr, "note: %s conversions: %lld NaN results differ from the scalar "
                "conversion in the payload only (STRICT_NAN_PAYLOADS 0), first %s\n",
                t->name, (long long)nan_payload_diffs, nan_payload_msg);
}

/* ------------------------------------------------------------ main */

int main(void) {
    static const attn_isa isas[] = {ATTN_ISA_SCALAR, ATTN_ISA_AVX2, ATTN_ISA_AVX512,
                                    ATTN_ISA_NEON};
    attn_isa best = attn_isa_detected();
    table tables[4];
    int nt = 0;
    for (int i = 0; i < 4; i++) {
        const attn_kernels *k = attn_kernels_for(isas[i]);
        const char *name = attn_isa_name(isas[i]);
        int runs = isas[i] == ATTN_ISA_SCALAR ||
                   (isas[i] == ATTN_ISA_AVX2 && (best == ATTN_ISA_AVX2 || best == ATTN_ISA_AVX512)) ||
                   (isas[i] == ATTN_ISA_AVX512 && best == ATTN_ISA_AVX512) ||
                   (isas[i] == ATTN_ISA_NEON && best == ATTN_ISA_NEON);
        if (!k) {
            printf("  %-7s not in this build: skipped\n", name);
        } else if (!runs) {
            printf("  %-7s this CPU cannot run it (detected %s): skipped\n", name,
                   attn_isa_name(best));
        } else {
            tu_case("%s table", name);
            CHECK(k->isa == isas[i], "table for %s says isa %d", name, (int)k->isa);
            tables[nt].k = k;
            tables[nt].name = name;
            nt++;
        }
    }
    for (int i = 0; i < nt; i++) {
        const table *t = &tables[i];
        int before = tu_failed;
        test_gemm(t);
        test_softmax(t);
        test_exp2(t);
        test_softcap(t);
        test_dsoftmax(t);
        test_dot(t);
        test_heads(t);
        test_axpy(t);
        test_transpose(t);
        test_store_stream(t);
        test_key_gate_chunk(t);
        test_conversions(t);
        printf("  %-7s %s\n", t->name, tu_failed == before ? "ok" : "FAILED");
    }
    return tu_finish("test_kernels");
}
