/* Mechanisms over the chunked-recurrence engine against naive double
 * implementations written here from their papers' formulas: linear
 * attention with feature maps and normaliser (quadratic form), Mamba-2 SSD
 * and the Mamba selective scan (recurrences), LightNet's additive recurrence
 * (running softmax over time), on the CPU and the reference backend; random
 * features against exact attention (Monte Carlo tolerance). Tolerances (f32): rel RMS 2e-5, max abs 2e-4 * (max|ref| + 1). */
#include "test_util.h"

static attn_ctx *g_ctx[3]; /* cpu 2 threads, cpu 1 thread, ref */

#define SALT 0x3EC4u

static double phi_of(attn_feature_map phi, double x) {
    return phi == ATTN_PHI_ELU1 ? (x > 0 ? x + 1 : exp(x)) : phi == ATTN_PHI_RELU ? (x > 0 ? x : 0) : x;
}

static void test_linear_attention(attn_feature_map phi, int normalize, int causal) {
    tu_case("linear attention phi=%d normalize=%d causal=%d", (int)phi, normalize, causal);
    tu_rng r = {tu_seed(SALT, (uint64_t)(phi * 4 + normalize * 2 + causal))};
    const int64_t B = 2, T = 75, H = 4, Hk = 2, D = 16, Dv = 12;
    const float eps = 1e-3f;
    tu_buf q = tu_alloc(ATTN_F32, B, T, H, D), k = tu_alloc(ATTN_F32, B, T, Hk, D),
           v = tu_alloc(ATTN_F32, B, T, Hk, Dv), want = tu_alloc(ATTN_F64, B, T, H, Dv);
    /* the identity map with the normaliser needs positive q·k, else the
     * denominators cross 0 and the problem has no stable answer */
    const double lo = phi == ATTN_PHI_IDENTITY && normalize ? 0.05 : -1.0;
    tu_fill(&q.t, &r, lo, 1);
    tu_fill(&k.t, &r, lo, 1);
    tu_fill(&v.t, &r, -1, 1);
    const double scale = 1.0 / sqrt((double)D);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < T; i++) {
                double num[16] = {0}, den = 0;
                for (int64_t j = 0; j < (causal ? i + 1 : T); j++) {
                    double s = 0;
                    for (int64_t x = 0; x < D; x++)
                        s += phi_of(phi, tu_load(&q.t, tu_off4(&q.t, b, i, h, x))) *
                             phi_of(phi, tu_load(&k.t, tu_off4(&k.t, b, j, h / 2, x)));
                    s *= scale;
                    den += s;
                    for (int64_t e = 0; e < Dv; e++) num[e] += s * tu_load(&v.t, tu_off4(&v.t, b, j, h / 2, e));
                }
                for (int64_t e = 0; e < Dv; e++)
                    tu_store(&want.t, tu_off4(&want.t, b, i, h, e), normalize ? num[e] / (den + eps) : num[e]);
            }
    attn_linear_params p = attn_linear_params_default();
    p.causal = causal;
    for (int c = 0; c < 3; c++) {
        tu_buf o = tu_alloc(ATTN_F32, B, T, H, Dv);
        CHECK_OK(attn_linear_attention(g_ctx[c], &p, phi, normalize, eps, &q.t, &k.t, &v.t, &o.t));
        CHECK_CLOSE("o", &o.t, &want.t, 2e-5, 2e-4);
        tu_free(&o);
    }
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&want);
}

static void test_ssd(int64_t G) {
    tu_case("ssd groups=%lld", (long long)G);
    tu_rng r = {tu_seed(SALT, 100 + (uint64_t)G)};
    const int64_t B = 2, T = 90, H = 4, P = 8, N = 6;
    tu_buf x = tu_alloc(ATTN_F32, B, T, H, P), dt = tu_alloc(ATTN_F32, B, T, H, -1),
           a = tu_alloc(ATTN_F32, H, 1, 1, -1), bm = tu_alloc(ATTN_F32, B, T, G, N),
           cm = tu_alloc(ATTN_F32, B, T, G, N), ds = tu_alloc(ATTN_F32, H, 1, 1, -1),
           s0 = tu_alloc(ATTN_F32, B, H, N, P), want = tu_alloc(ATTN_F64, B, T, H, P),
           wants = tu_alloc(ATTN_F64, B, H, N, P);
    a.t.ndim = ds.t.ndim = 1;
    a.t.stride[0] = ds.t.stride[0] = 1;
    tu_fill(&x.t, &r, -1, 1);
    tu_fill(&dt.t, &r, 0.01, 0.5);
    tu_fill(&a.t, &r, -2, -0.1);
    tu_fill(&bm.t, &r, -1, 1);
    tu_fill(&cm.t, &r, -1, 1);
    tu_fill(&ds.t, &r, -1, 1);
    tu_fill(&s0.t, &r, -1, 1);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            double S[6][8];
            const int64_t g = h / (H / G);
            for (int64_t n = 0; n < N; n++)
                for (int64_t e = 0; e < P; e++) S[n][e] = tu_load(&s0.t, tu_off4(&s0.t, b, h, n, e));
            for (int64_t t = 0; t < T; t++) {
                double d = tu_load(&dt.t, tu_off3(&dt.t, b, t, h)), dec = exp(d * tu_load(&a.t, h));
                for (int64_t n = 0; n < N; n++)
                    for (int64_t e = 0; e < P; e++)
                        S[n][e] = dec * S[n][e] + tu_load(&bm.t, tu_off4(&bm.t, b, t, g, n)) * d *
                                                      tu_load(&x.t, tu_off4(&x.t, b, t, h, e));
                for (int64_t e = 0; e < P; e++) {
                    double yv = tu_load(&ds.t, h) * tu_load(&x.t, tu_off4(&x.t, b, t, h, e));
                    for (int64_t n = 0; n < N; n++) yv += tu_load(&cm.t, tu_off4(&cm.t, b, t, g, n)) * S[n][e];
                    tu_store(&want.t, tu_off4(&want.t, b, t, h, e), yv);
                }
            }
            for (int64_t n = 0; n < N; n++)
                for (int64_t e = 0; e < P; e++) tu_store(&wants.t, tu_off4(&wants.t, b, h, n, e), S[n][e]);
        }
    for (int c = 0; c < 3; c++) {
        tu_buf y = tu_alloc(ATTN_F32, B, T, H, P), s = tu_alloc(ATTN_F32, B, H, N, P);
        CHECK_OK(attn_ssd_forward(g_ctx[c], &x.t, &dt.t, &a.t, &bm.t, &cm.t, &ds.t, &s0.t, &y.t, &s.t));
        CHECK_CLOSE("y", &y.t, &want.t, 2e-5, 2e-4);
        CHECK_CLOSE("state", &s.t, &wants.t, 2e-5, 2e-4);
        tu_free(&y), tu_free(&s);
    }
    { /* x as a strided view (rows padded by 3): the engine reads it in place */
        tu_buf xw = tu_alloc(ATTN_F32, B, T, H, P + 3), y = tu_alloc(ATTN_F32, B, T, H, P);
        tu_fill(&xw.t, &r, -1, 1);
        xw.t.shape[3] = P;
        for (int64_t b = 0; b < B; b++)
            for (int64_t t = 0; t < T; t++)
                for (int64_t h = 0; h < H; h++)
                    for (int64_t e = 0; e < P; e++)
                        tu_store(&xw.t, tu_off4(&xw.t, b, t, h, e),
                                 tu_load(&x.t, tu_off4(&x.t, b, t, h, e)));
        for (int c = 0; c < 3; c++) {
            CHECK_OK(attn_ssd_forward(g_ctx[c], &xw.t, &dt.t, &a.t, &bm.t, &cm.t, &ds.t, &s0.t,
                                      &y.t, NULL));
            CHECK_CLOSE("y (strided x)", &y.t, &want.t, 2e-5, 2e-4);
        }
        tu_free(&xw), tu_free(&y);
    }
    tu_free(&x), tu_free(&dt), tu_free(&a), tu_free(&bm), tu_free(&cm), tu_free(&ds);
    tu_free(&s0), tu_free(&want), tu_free(&wants);
}

static void test_mamba(void) {
    tu_case("mamba selective scan");
    tu_rng r = {tu_seed(SALT, 200)};
    const int64_t B = 2, T = 70, E = 70, N = 4; /* E > 64: two channel blocks */
    tu_buf x = tu_alloc(ATTN_F32, B, T, E, -1), dl = tu_alloc(ATTN_F32, B, T, E, -1),
           a = tu_alloc(ATTN_F32, E, N, 1, -1), bm = tu_alloc(ATTN_F32, B, T, N, -1),
           cm = tu_alloc(ATTN_F32, B, T, N, -1), ds = tu_alloc(ATTN_F32, E, 1, 1, -1),
           want = tu_alloc(ATTN_F64, B, T, E, -1), wants = tu_alloc(ATTN_F64, B, E, N, 1);
    a.t.ndim = 2;
    a.t.stride[0] = N;
    a.t.stride[1] = 1;
    ds.t.ndim = 1;
    ds.t.stride[0] = 1;
    tu_fill(&x.t, &r, -1, 1);
    tu_fill(&dl.t, &r, 0.01, 0.5);
    tu_fill(&a.t, &r, -3, -0.1);
    tu_fill(&bm.t, &r, -1, 1);
    tu_fill(&cm.t, &r, -1, 1);
    tu_fill(&ds.t, &r, -1, 1);
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < E; c++) {
            double hs[4] = {0};
            for (int64_t t = 0; t < T; t++) {
                double d = tu_load(&dl.t, tu_off3(&dl.t, b, t, c)), xv = tu_load(&x.t, tu_off3(&x.t, b, t, c));
                double yv = tu_load(&ds.t, c) * xv;
                for (int64_t n = 0; n < N; n++) {
                    hs[n] = exp(d * tu_load(&a.t, c * N + n)) * hs[n] + d * tu_load(&bm.t, tu_off3(&bm.t, b, t, n)) * xv;
                    yv += tu_load(&cm.t, tu_off3(&cm.t, b, t, n)) * hs[n];
                }
                tu_store(&want.t, tu_off3(&want.t, b, t, c), yv);
            }
            for (int64_t n = 0; n < N; n++) tu_store(&wants.t, tu_off4(&wants.t, b, c, n, 0), hs[n]);
        }
    for (int c = 0; c < 3; c++) {
        tu_buf y = tu_alloc(ATTN_F32, B, T, E, -1), s = tu_alloc(ATTN_F32, B, E, N, 1);
        CHECK_OK(attn_mamba_scan(g_ctx[c], &x.t, &dl.t, &a.t, &bm.t, &cm.t, &ds.t, NULL, &y.t, &s.t));
        CHECK_CLOSE("y", &y.t, &want.t, 2e-5, 2e-4);
        CHECK_CLOSE("state", &s.t, &wants.t, 2e-5, 2e-4);
        tu_free(&y), tu_free(&s);
    }
    tu_free(&x), tu_free(&dl), tu_free(&a), tu_free(&bm), tu_free(&cm), tu_free(&ds);
    tu_free(&want), tu_free(&wants);
}

static void test_lightnet(int varlen) {
    tu_case("lightnet varlen=%d", varlen);
    tu_rng r = {tu_seed(SALT, 300 + (uint64_t)varlen)};
    const int64_t B = varlen ? 1 : 2, T = 83, H = 4, Hk = 2, D = 8, Dv = 6;
    const int32_t cu[3] = {0, 30, 83};
    tu_buf q = tu_alloc(ATTN_F32, B, T, H, D), k = tu_alloc(ATTN_F32, B, T, Hk, D),
           v = tu_alloc(ATTN_F32, B, T, Hk, Dv), want = tu_alloc(ATTN_F64, B, T, H, Dv);
    tu_fill(&q.t, &r, -1, 1);
    tu_fill(&k.t, &r, -3, 3);
    tu_fill(&v.t, &r, -1, 1);
    const double scale = 1.0 / sqrt((double)D);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < T; i++) {
                const int64_t start = varlen && i >= cu[1] ? cu[1] : 0;
                for (int64_t e = 0; e < Dv; e++) {
                    double acc = 0;
                    for (int64_t x = 0; x < D; x++) {
                        double num = 0, den = 0;
                        for (int64_t j = start; j <= i; j++) {
                            double w = exp(tu_load(&k.t, tu_off4(&k.t, b, j, h / 2, x)));
                            num += w * tu_load(&v.t, tu_off4(&v.t, b, j, h / 2, e));
                            den += w;
                        }
                        acc += tu_load(&q.t, tu_off4(&q.t, b, i, h, x)) * num / den;
                    }
                    tu_store(&want.t, tu_off4(&want.t, b, i, h, e), scale * acc);
                }
            }
    attn_linear_params p = attn_linear_params_default();
    if (varlen) p.batch = 2, p.cu_seqlens = cu;
    for (int c = 0; c < 3; c++) {
        tu_buf o = tu_alloc(ATTN_F32, B, T, H, Dv);
        CHECK_OK(attn_lightnet_forward(g_ctx[c], &p, &q.t, &k.t, &v.t, &o.t));
        CHECK_CLOSE("o", &o.t, &want.t, 2e-5, 2e-4);
        tu_free(&o);
    }
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&want);
}

/* Random features: many features come near exact softmax attention; the
 * same seed gives the same features on the CPU and the reference backend. */
static void test_rfa(void) {
    tu_case("random-feature attention");
    tu_rng r = {tu_seed(SALT, 400)};
    const int64_t B = 1, T = 40, H = 2, D = 4;
    tu_buf q = tu_alloc(ATTN_F32, B, T, H, D), k = tu_alloc(ATTN_F32, B, T, H, D),
           v = tu_alloc(ATTN_F32, B, T, H, D), exact = tu_alloc(ATTN_F32, B, T, H, D),
           o = tu_alloc(ATTN_F32, B, T, H, D), o2 = tu_alloc(ATTN_F32, B, T, H, D);
    tu_fill(&q.t, &r, -0.5, 0.5);
    tu_fill(&k.t, &r, -0.5, 0.5);
    tu_fill(&v.t, &r, -1, 1);
    attn_params pe = attn_params_default();
    pe.causal = 1;
    CHECK_OK(attn_forward(g_ctx[0], &pe, &q.t, &k.t, &v.t, &exact.t, NULL));
    attn_linear_params p = attn_linear_params_default();
    CHECK_OK(attn_rfa_forward(g_ctx[0], &p, 4096, &q.t, &k.t, &v.t, &o.t));
    /* Monte Carlo with 4096 features: about 1/sqrt(4096) relative */
    CHECK_CLOSE("against exact attention", &o.t, &exact.t, 0.05, 0.1);
    CHECK_OK(attn_rfa_forward(g_ctx[2], &p, 4096, &q.t, &k.t, &v.t, &o2.t));
    CHECK_CLOSE("cpu against reference backend", &o.t, &o2.t, 2e-5, 2e-4);
    attn_status st = attn_rfa_forward(g_ctx[0], &p, 0, &q.t, &k.t, &v.t, &o.t);
    CHECK(st == ATTN_ERR_ARG && strstr(attn_last_error(), "features"), "features 0: %s", attn_last_error());
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&exact), tu_free(&o), tu_free(&o2);
}

/* Naive Mamba on dense double arrays: x, dl [T][E], a [E][N], bm, cm [T][N],
 * ds [E]; y [T][E]. One sequence, zero initial state. */
static void mamba_naive(int64_t T, int64_t E, int64_t N, const double *x, const double *dl,
                        const double *a, const double *bm, const double *cm, const double *ds,
                        double *y) {
    for (int64_t e = 0; e < E; e++) {
        double h[8] = {0};
        for (int64_t t = 0; t < T; t++) {
            double d = dl[t * E + e], yv = ds[e] * x[t * E + e];
            for (int64_t n = 0; n < N; n++) {
                h[n] = exp(d * a[e * N + n]) * h[n] + d * bm[t * N + n] * x[t * E + e];
                yv += cm[t * N + n] * h[n];
            }
            y[t * E + e] = yv;
        }
    }
}

/* attn_mamba_scan_backward against central differences of the naive
 * forward (f64); attn_mamba_step token by token against the scan.
 * Tolerance: |fd - got| <= 1e-3 * (|fd| + 1) (f32 engine). */
static void test_mamba_grad(void) {
    tu_case("mamba backward and step");
    tu_rng r = {tu_seed(SALT, 500)};
    enum { T = 21, E = 3, N = 4 };
    double in[6][T * N] = {{0}}; /* the largest: T * N */
    const int64_t sizes[6] = {T * E, T * E, E * N, T * N, T * N, E}; /* x dl a bm cm ds */
    const double lo[6] = {-1, 0.05, -2, -1, -1, -1}, hi[6] = {1, 0.6, -0.2, 1, 1, 1};
    for (int i = 0; i < 6; i++)
        for (int64_t j = 0; j < sizes[i]; j++) in[i][j] = tu_uniform(&r, lo[i], hi[i]);
    double w[T * E];
    for (int64_t j = 0; j < T * E; j++) w[j] = tu_uniform(&r, -1, 1);
    /* f32 tensors of the same values (rounded: the naive side uses them too) */
    tu_buf tx = tu_alloc(ATTN_F32, 1, T, E, -1), tdl = tu_alloc(ATTN_F32, 1, T, E, -1),
           ta = tu_alloc(ATTN_F32, E, N, 1, -1), tb = tu_alloc(ATTN_F32, 1, T, N, -1),
           tc = tu_alloc(ATTN_F32, 1, T, N, -1), tds = tu_alloc(ATTN_F32, E, 1, 1, -1),
           tdy = tu_alloc(ATTN_F32, 1, T, E, -1);
    ta.t.ndim = 2, ta.t.stride[0] = N, ta.t.stride[1] = 1;
    tds.t.ndim = 1, tds.t.stride[0] = 1;
    tu_buf *bufs[6] = {&tx, &tdl, &ta, &tb, &tc, &tds};
    for (int i = 0; i < 6; i++)
        for (int64_t j = 0; j < sizes[i]; j++) {
            ((float *)bufs[i]->mem)[j] = (float)in[i][j];
            in[i][j] = ((float *)bufs[i]->mem)[j];
        }
    for (int64_t j = 0; j < T * E; j++) ((float *)tdy.mem)[j] = (float)w[j];
    tu_buf g[6] = {tu_alloc(ATTN_F32, 1, T, E, -1), tu_alloc(ATTN_F32, 1, T, E, -1),
                   tu_alloc(ATTN_F32, E, N, 1, -1), tu_alloc(ATTN_F32, 1, T, N, -1),
                   tu_alloc(ATTN_F32, 1, T, N, -1), tu_alloc(ATTN_F32, E, 1, 1, -1)};
    g[2].t.ndim = 2, g[2].t.stride[0] = N, g[2].t.stride[1] = 1;
    g[5].t.ndim = 1, g[5].t.stride[0] = 1;
    CHECK_OK(attn_mamba_scan_backward(g_ctx[0], &tx.t, &tdl.t, &ta.t, &tb.t, &tc.t, &tds.t, NULL,
                                      &tdy.t, NULL, &g[0].t, &g[1].t, &g[2].t, &g[3].t, &g[4].t,
                                      &g[5].t, NULL));
    static const char *const names[6] = {"dx", "ddelta", "da", "dbm", "dcm", "ddskip"};
    for (int i = 0; i < 6; i++) {
        double worst = 0;
        for (int64_t j = 0; j < sizes[i]; j++) {
            double keep = in[i][j], y1[T * E], y2[T * E], l1 = 0, l2 = 0;
            in[i][j] = keep + 1e-6;
            mamba_naive(T, E, N, in[0], in[1], in[2], in[3], in[4], in[5], y1);
            in[i][j] = keep - 1e-6;
            mamba_naive(T, E, N, in[0], in[1], in[2], in[3], in[4], in[5], y2);
            in[i][j] = keep;
            for (int64_t t = 0; t < T * E; t++) l1 += y1[t] * w[t], l2 += y2[t] * w[t];
            double fd = (l1 - l2) / 2e-6, got = ((float *)g[i].mem)[j];
            double err = fabs(fd - got) / (fabs(fd) + 1);
            if (err > worst) worst = err;
        }
        CHECK(worst <= 1e-3, "%s: finite differences differ by %.3g", names[i], worst);
    }
    /* step: token by token from a zero state equals the scan */
    tu_buf ys = tu_alloc(ATTN_F32, 1, T, E, -1), y1 = tu_alloc(ATTN_F32, 1, T, E, -1),
           st = tu_alloc(ATTN_F32, 1, E, N, 1), sst = tu_alloc(ATTN_F32, 1, E, N, 1);
    CHECK_OK(attn_mamba_scan(g_ctx[0], &tx.t, &tdl.t, &ta.t, &tb.t, &tc.t, &tds.t, NULL, &ys.t, &sst.t));
    for (int64_t t = 0; t < T; t++) {
        attn_tensor v[6];
        const tu_buf *src[6] = {&tx, &tdl, &tb, &tc, &y1, NULL};
        for (int i = 0; i < 5; i++) {
            v[i] = src[i]->t;
            v[i].data = (float *)src[i]->mem + t * v[i].stride[1];
            v[i].shape[1] = 1;
        }
        CHECK_OK(attn_mamba_step(g_ctx[1], &v[0], &v[1], &ta.t, &v[2], &v[3], &tds.t, &st.t, &v[4]));
    }
    CHECK_CLOSE("step y", &y1.t, &ys.t, 2e-5, 2e-4);
    CHECK_CLOSE("step state", &st.t, &sst.t, 2e-5, 2e-4);
    for (int i = 0; i < 6; i++) tu_free(&g[i]), tu_free(bufs[i]);
    tu_free(&tdy), tu_free(&ys), tu_free(&y1), tu_free(&st), tu_free(&sst);
}

/* Naive SSD on dense doubles (one sequence, zero state): x [T][H][P],
 * dt [T][H], a [H], bm, cm [T][G][N], ds [H]; y [T][H][P]. */
static void ssd_naive(int64_t T, int64_t H, int64_t P, int64_t G, int64_t N, const double *x,
                      const double *dt, const double *a, const double *bm, const double *cm,
                      const double *ds, double *y) {
    for (int64_t h = 0; h < H; h++) {
        double S[4][4] = {{0}};
        const int64_t g = h / (H / G);
        for (int64_t t = 0; t < T; t++) {
            const double d = dt[t * H + h], dec = exp(d * a[h]);
            for (int64_t n = 0; n < N; n++)
                for (int64_t e = 0; e < P; e++)
                    S[n][e] = dec * S[n][e] + bm[(t * G + g) * N + n] * d * x[(t * H + h) * P + e];
            for (int64_t e = 0; e < P; e++) {
                double yv = ds[h] * x[(t * H + h) * P + e];
                for (int64_t n = 0; n < N; n++) yv += cm[(t * G + g) * N + n] * S[n][e];
                y[(t * H + h) * P + e] = yv;
            }
        }
    }
}

/* attn_ssd_backward against central differences of the naive forward (f64).
 * Tolerance: |fd - got| <= 1e-3 * (|fd| + 1) (f32 engine). */
static void test_ssd_grad(int64_t G) {
    tu_case("ssd backward groups=%lld", (long long)G);
    tu_rng r = {tu_seed(SALT, 600 + (uint64_t)G)};
    enum { T = 19, H = 4, P = 3, N = 4, MAXN = T * H * P };
    const int64_t sizes[6] = {T * H * P, T * H, H, T * G * N, T * G * N, H}; /* x dt a bm cm ds */
    const double lo[6] = {-1, 0.05, -2, -1, -1, -1}, hi[6] = {1, 0.6, -0.2, 1, 1, 1};
    static double in[6][MAXN];
    double w[MAXN];
    tu_buf bufs[6] = {tu_alloc(ATTN_F32, 1, T, H, P), tu_alloc(ATTN_F32, 1, T, H, -1),
                      tu_alloc(ATTN_F32, H, 1, 1, -1), tu_alloc(ATTN_F32, 1, T, G, N),
                      tu_alloc(ATTN_F32, 1, T, G, N), tu_alloc(ATTN_F32, H, 1, 1, -1)};
    tu_buf grads[6] = {tu_alloc(ATTN_F32, 1, T, H, P), tu_alloc(ATTN_F32, 1, T, H, -1),
                       tu_alloc(ATTN_F32, H, 1, 1, -1), tu_alloc(ATTN_F32, 1, T, G, N),
                       tu_alloc(ATTN_F32, 1, T, G, N), tu_alloc(ATTN_F32, H, 1, 1, -1)};
    for (int i = 2; i < 6; i += 3) { /* a and ds are 1-D */
        bufs[i].t.ndim = grads[i].t.ndim = 1;
        bufs[i].t.stride[0] = grads[i].t.stride[0] = 1;
    }
    for (int i = 0; i < 6; i++)
        for (int64_t j = 0; j < sizes[i]; j++) {
            ((float *)bufs[i].mem)[j] = (float)tu_uniform(&r, lo[i], hi[i]);
            in[i][j] = ((float *)bufs[i].mem)[j];
        }
    tu_buf dy = tu_alloc(ATTN_F32, 1, T, H, P);
    for (int64_t j = 0; j < T * H * P; j++) ((float *)dy.mem)[j] = (float)(w[j] = tu_uniform(&r, -1, 1));
    CHECK_OK(attn_ssd_backward(g_ctx[0], &bufs[0].t, &bufs[1].t, &bufs[2].t, &bufs[3].t, &bufs[4].t,
                               &bufs[5].t, NULL, &dy.t, NULL, &grads[0].t, &grads[1].t, &grads[2].t,
                               &grads[3].t, &grads[4].t, &grads[5].t, NULL));
    static const char *const names[6] = {"dx", "ddt", "da", "dbm", "dcm", "ddskip"};
    for (int i = 0; i < 6; i++) {
        double worst = 0;
        for (int64_t j = 0; j < sizes[i]; j++) {
            double keep = in[i][j], y1[MAXN], y2[MAXN], l1 = 0, l2 = 0;
            in[i][j] = keep + 1e-6;
            ssd_naive(T, H, P, G, N, in[0], in[1], in[2], in[3], in[4], in[5], y1);
            in[i][j] = keep - 1e-6;
            ssd_naive(T, H, P, G, N, in[0], in[1], in[2], in[3], in[4], in[5], y2);
            in[i][j] = keep;
            for (int64_t t = 0; t < T * H * P; t++) l1 += y1[t] * w[t], l2 += y2[t] * w[t];
            double fd = (l1 - l2) / 2e-6, got = ((float *)grads[i].mem)[j];
            double err = fabs(fd - got) / (fabs(fd) + 1);
            if (err > worst) worst = err;
        }
        CHECK(worst <= 1e-3, "%s: finite differences differ by %.3g", names[i], worst);
    }
    for (int i = 0; i < 6; i++) tu_free(&bufs[i]), tu_free(&grads[i]);
    tu_free(&dy);
}

/* Naive feature-map linear attention (quadratic form) on dense doubles:
 * q [T][H][D], k, v [T][Hk][*] with Hk = 1, o [T][H][Dv]. */
static void la_naive(attn_feature_map phi, int normalize, int causal, int64_t T, int64_t H,
                     int64_t D, int64_t Dv, const double *q, const double *k, const double *v,
                     double *o) {
    const double scale = 1.0 / sqrt((double)D), eps = 1e-3;
    for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < T; i++) {
            double num[8] = {0}, den = 0;
            for (int64_t j = 0; j < (causal ? i + 1 : T); j++) {
                double s = 0;
                for (int64_t x = 0; x < D; x++) s += phi_of(phi, q[(i * H + h) * D + x]) * phi_of(phi, k[j * D + x]);
                s *= scale;
                den += s;
                for (int64_t e = 0; e < Dv; e++) num[e] += s * v[j * Dv + e];
            }
            for (int64_t e = 0; e < Dv; e++) o[(i * H + h) * Dv + e] = normalize ? num[e] / (den + eps) : num[e];
        }
}

/* attn_linear_attention_backward against central differences of la_naive.
 * Tolerance: |fd - got| <= 1e-3 * (|fd| + 1) (f32 engine). */
static void test_linear_attention_grad(attn_feature_map phi, int normalize, int causal) {
    tu_case("linear attention backward phi=%d normalize=%d causal=%d", (int)phi, normalize, causal);
    tu_rng r = {tu_seed(SALT, 700 + (uint64_t)(phi * 4 + normalize * 2 + causal))};
    enum { T = 11, H = 2, D = 3, Dv = 2 };
    const int64_t sizes[3] = {T * H * D, T * D, T * Dv};
    const double lo = phi == ATTN_PHI_IDENTITY && normalize ? 0.1 : -1.0;
    static double in[3][T * H * D];
    double w[T * H * Dv];
    tu_buf bufs[3] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, 1, D),
                      tu_alloc(ATTN_F32, 1, T, 1, Dv)};
    tu_buf grads[3] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, 1, D),
                       tu_alloc(ATTN_F32, 1, T, 1, Dv)};
    for (int i = 0; i < 3; i++)
        for (int64_t j = 0; j < sizes[i]; j++) {
            ((float *)bufs[i].mem)[j] = (float)tu_uniform(&r, i < 2 ? lo : -1.0, 1);
            in[i][j] = ((float *)bufs[i].mem)[j];
        }
    tu_buf dout = tu_alloc(ATTN_F32, 1, T, H, Dv);
    for (int64_t j = 0; j < T * H * Dv; j++) ((float *)dout.mem)[j] = (float)(w[j] = tu_uniform(&r, -1, 1));
    attn_linear_params p = attn_linear_params_default();
    p.causal = causal;
    CHECK_OK(attn_linear_attention_backward(g_ctx[0], &p, phi, normalize, 1e-3f, &bufs[0].t,
                                            &bufs[1].t, &bufs[2].t, &dout.t, &grads[0].t,
                                            &grads[1].t, &grads[2].t));
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        double worst = 0;
        for (int64_t j = 0; j < sizes[i]; j++) {
            double keep = in[i][j], o1[T * H * Dv], o2[T * H * Dv], l1 = 0, l2 = 0;
            in[i][j] = keep + 1e-6;
            la_naive(phi, normalize, causal, T, H, D, Dv, in[0], in[1], in[2], o1);
            in[i][j] = keep - 1e-6;
            la_naive(phi, normalize, causal, T, H, D, Dv, in[0], in[1], in[2], o2);
            in[i][j] = keep;
            for (int64_t t = 0; t < T * H * Dv; t++) l1 += o1[t] * w[t], l2 += o2[t] * w[t];
            double fd = (l1 - l2) / 2e-6, got = ((float *)grads[i].mem)[j];
            double err = fabs(fd - got) / (fabs(fd) + 1);
            if (err > worst) worst = err;
        }
        CHECK(worst <= 1e-3, "%s: finite differences differ by %.3g", names[i], worst);
    }
    for (int i = 0; i < 3; i++) tu_free(&bufs[i]), tu_free(&grads[i]);
    tu_free(&dout);
}

/* Naive LightNet on dense doubles, one sequence: q [T][H][D], k [T][Hk][D],
 * v [T][Hk][Dv], o [T][H][Dv]. */
static void lightnet_naive(int64_t T, int64_t H, int64_t Hk, int64_t D, int64_t Dv,
                           const double *q, const double *k, const double *v, double *o) {
    const double scale = 1.0 / sqrt((double)D);
    for (int64_t h = 0; h < H; h++) {
        const int64_t hk = h / (H / Hk);
        for (int64_t i = 0; i < T; i++)
            for (int64_t e = 0; e < Dv; e++) {
                double acc = 0;
                for (int64_t x = 0; x < D; x++) {
                    double num = 0, den = 0;
                    for (int64_t j = 0; j <= i; j++) {
                        double w = exp(k[(j * Hk + hk) * D + x]);
                        num += w * v[(j * Hk + hk) * Dv + e];
                        den += w;
                    }
                    acc += q[(i * H + h) * D + x] * num / den;
                }
                o[(i * H + h) * Dv + e] = scale * acc;
            }
    }
}

/* attn_lightnet_backward against central differences of lightnet_naive.
 * Tolerance: |fd - got| <= 1e-3 * (|fd| + 1) (f32 engine). */
static void test_lightnet_grad(void) {
    tu_case("lightnet backward");
    tu_rng r = {tu_seed(SALT, 800)};
    enum { T = 23, H = 4, Hk = 2, D = 3, Dv = 2 };
    const int64_t sizes[3] = {T * H * D, T * Hk * D, T * Hk * Dv};
    static double in[3][T * H * D];
    double w[T * H * Dv];
    tu_buf bufs[3] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, Hk, D),
                      tu_alloc(ATTN_F32, 1, T, Hk, Dv)};
    tu_buf grads[3] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, Hk, D),
                       tu_alloc(ATTN_F32, 1, T, Hk, Dv)};
    for (int i = 0; i < 3; i++)
        for (int64_t j = 0; j < sizes[i]; j++) {
            ((float *)bufs[i].mem)[j] = (float)tu_uniform(&r, i == 1 ? -3 : -1, i == 1 ? 3 : 1);
            in[i][j] = ((float *)bufs[i].mem)[j];
        }
    tu_buf dout = tu_alloc(ATTN_F32, 1, T, H, Dv);
    for (int64_t j = 0; j < T * H * Dv; j++) ((float *)dout.mem)[j] = (float)(w[j] = tu_uniform(&r, -1, 1));
    attn_linear_params p = attn_linear_params_default();
    for (int c = 0; c < 3; c += 2) { /* the CPU and the reference backend */
        tu_prefix = c ? "ref" : "";
        CHECK_OK(attn_lightnet_backward(g_ctx[c], &p, &bufs[0].t, &bufs[1].t, &bufs[2].t, &dout.t,
                                        &grads[0].t, &grads[1].t, &grads[2].t));
        static const char *const names[3] = {"dq", "dk", "dv"};
        for (int i = 0; i < 3; i++) {
            double worst = 0;
            for (int64_t j = 0; j < sizes[i]; j++) {
                double keep = in[i][j], o1[T * H * Dv], o2[T * H * Dv], l1 = 0, l2 = 0;
                in[i][j] = keep + 1e-6;
                lightnet_naive(T, H, Hk, D, Dv, in[0], in[1], in[2], o1);
                in[i][j] = keep - 1e-6;
                lightnet_naive(T, H, Hk, D, Dv, in[0], in[1], in[2], o2);
                in[i][j] = keep;
                for (int64_t t = 0; t < T * H * Dv; t++) l1 += o1[t] * w[t], l2 += o2[t] * w[t];
                double fd = (l1 - l2) / 2e-6, got = ((float *)grads[i].mem)[j];
                double err = fabs(fd - got) / (fabs(fd) + 1);
                if (err > worst) worst = err;
            }
            CHECK(worst <= 1e-3, "%s: finite differences differ by %.3g", names[i], worst);
        }
    }
    tu_prefix = "";
    for (int i = 0; i < 3; i++) tu_free(&bufs[i]), tu_free(&grads[i]);
    tu_free(&dout);
}

/* attn_rfa_backward against central differences of attn_rfa_forward on the
 * reference backend (the same seed, so the same features; the features are
 * formed in f32, so the step is 1e-2 and the tolerance 1e-2 * (|fd| + 1)). */
static void test_rfa_grad(void) {
    tu_case("random-feature attention backward");
    tu_rng r = {tu_seed(SALT, 900)};
    enum { T = 9, H = 2, D = 4, Dv = 3, F = 16 };
    tu_buf x[3] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, H, D),
                   tu_alloc(ATTN_F32, 1, T, H, Dv)};
    tu_buf g[3] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, H, D),
                   tu_alloc(ATTN_F32, 1, T, H, Dv)};
    for (int i = 0; i < 3; i++) tu_fill(&x[i].t, &r, -1, 1);
    tu_buf dout = tu_alloc(ATTN_F32, 1, T, H, Dv), o = tu_alloc(ATTN_F64, 1, T, H, Dv);
    tu_fill(&dout.t, &r, -1, 1);
    attn_linear_params p = attn_linear_params_default();
    CHECK_OK(attn_rfa_backward(g_ctx[2], &p, F, &x[0].t, &x[1].t, &x[2].t, &dout.t, &g[0].t, &g[1].t,
                               &g[2].t));
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        double worst = 0;
        for (int64_t j = 0; j < tu_numel(&x[i].t); j++) {
            float *e = (float *)x[i].mem + j, keep = *e;
            double l[2];
            for (int s = 0; s < 2; s++) {
                *e = keep + (s ? -1e-2f : 1e-2f);
                CHECK_OK(attn_rfa_forward(g_ctx[2], &p, F, &x[0].t, &x[1].t, &x[2].t, &o.t));
                l[s] = 0;
                for (int64_t t = 0; t < tu_numel(&o.t); t++)
                    l[s] += ((double *)o.mem)[t] * ((float *)dout.mem)[t];
            }
            *e = keep;
            double fd = (l[0] - l[1]) / 2e-2, got = ((float *)g[i].mem)[j];
            double err = fabs(fd - got) / (fabs(fd) + 1);
            if (err > worst) worst = err;
        }
        CHECK(worst <= 1e-2, "%s: finite differences differ by %.3g", names[i], worst);
    }
    /* the CPU backend gives the same gradients */
    tu_buf gc[3] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, H, D),
                    tu_alloc(ATTN_F32, 1, T, H, Dv)};
    CHECK_OK(attn_rfa_backward(g_ctx[0], &p, F, &x[0].t, &x[1].t, &x[2].t, &dout.t, &gc[0].t,
                               &gc[1].t, &gc[2].t));
    for (int i = 0; i < 3; i++) CHECK_CLOSE(names[i], &gc[i].t, &g[i].t, 1e-4, 1e-3);
    for (int i = 0; i < 3; i++) tu_free(&x[i]), tu_free(&g[i]), tu_free(&gc[i]);
    tu_free(&dout), tu_free(&o);
}

int main(void) {
    g_ctx[0] = tu_ctx("test_linear_mech", ATTN_BACKEND_CPU, 2);
    g_ctx[1] = tu_ctx("test_linear_mech", ATTN_BACKEND_CPU, 1);
    g_ctx[2] = tu_ctx("test_linear_mech", ATTN_BACKEND_REF, 1);
    for (int phi = 0; phi < 3; phi++)
        for (int norm = 0; norm < 2; norm++)
            for (int causal = 0; causal < 2; causal++)
                test_linear_attention((attn_feature_map)phi, norm, causal);
    test_ssd(1);
    test_ssd(2);
    test_ssd(4);
    test_mamba();
    test_lightnet(0);
    test_lightnet(1);
    test_rfa();
    test_lightnet_grad();
    test_rfa_grad();
    test_mamba_grad();
    test_ssd_grad(1);
    test_ssd_grad(2);
    for (int phi = 0; phi < 3; phi++)
        for (int norm = 0; norm < 2; norm++)
            for (int causal = 0; causal < 2; causal++)
                test_linear_attention_grad((attn_feature_map)phi, norm, causal);
    for (int c = 0; c < 3; c++) attn_ctx_free(g_ctx[c]);
    return tu_finish("test_linear_mech");
}
