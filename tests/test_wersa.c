/* WERSA (attn_wersa_forward, attn_wersa_backward): the CPU path against the
 * double reference backend on fresh random inputs (levels 0..4, D = 1, odd
 * D, Dv != D, GQA, causal and not, varlen), bitwise equal for 1 and 2
 * threads; the filter against one written here from the definition
 * (prefix sums of box means, then random-feature attention on the result);
 * unit weights leave q, k unchanged (WERSA = RFA, bitwise); many features
 * come near exact attention on the filtered q, k; later tokens never move
 * earlier outputs (causal); gradients against central differences; bad
 * arguments. Tolerances (f32 against double): rel RMS 5e-6, max abs 5e-5 *
 * (max|ref| + 1) (measured worst 1.9e-7 and 2.2e-7; the features are f32);
 * gradients: central differences (step 1e-2) within 1e-4 (|fd| + 1)
 * (measured worst 8.1e-6, dweights), CPU = reference within 1e-5, 1e-4. */
#include "test_util.h"

static attn_ctx *g_ctx[3]; /* cpu 2 threads, cpu 1 thread, ref */

#define SALT 0x3E75u

/* x~ of a dense f32 [T][heads][D] array (one sequence) into out (f32), by
 * prefix sums: c_l[t] = (P[t + 1] - P[max(0, t + 1 - 2^l)]) / 2^l. */
static void naive_filter(const float *x, int64_t T, int64_t heads, int64_t D, int L,
                         const double *w, float *out) {
    double *P = malloc((size_t)(T + 1) * sizeof(double));
    for (int64_t h = 0; h < heads; h++)
        for (int64_t e = 0; e < D; e++) {
            P[0] = 0;
            for (int64_t t = 0; t < T; t++) P[t + 1] = P[t] + x[(t * heads + h) * D + e];
            for (int64_t t = 0; t < T; t++) {
                double prev = x[(t * heads + h) * D + e], y = 0;
                for (int l = 1; l <= L; l++) {
                    int64_t width = (int64_t)1 << l, lo = t + 1 - width > 0 ? t + 1 - width : 0;
                    double c = (P[t + 1] - P[lo]) / (double)width;
                    y += w[l - 1] * (prev - c);
                    prev = c;
                }
                out[(t * heads + h) * D + e] = (float)(y + w[L] * prev);
            }
        }
    free(P);
}

typedef struct wersa_case {
    int64_t B, T, H, Hk, D, Dv;
    int causal, L, F, varlen;
} wersa_case;

static tu_buf weights_of(tu_rng *r, int L) {
    tu_buf w = tu_alloc(ATTN_F32, L + 1, 1, 1, -1);
    w.t.ndim = 1, w.t.stride[0] = 1;
    tu_fill(&w.t, r, -1, 2);
    return w;
}

static void check_case(int idx, wersa_case c) {
    tu_case("wersa B=%lld T=%lld H=%lld Hk=%lld D=%lld Dv=%lld causal=%d L=%d F=%d varlen=%d",
            (long long)c.B, (long long)c.T, (long long)c.H, (long long)c.Hk, (long long)c.D,
            (long long)c.Dv, c.causal, c.L, c.F, c.varlen);
    tu_rng r = {tu_seed(SALT, (uint64_t)idx)};
    tu_buf q = tu_alloc(ATTN_F32, c.B, c.T, c.H, c.D), k = tu_alloc(ATTN_F32, c.B, c.T, c.Hk, c.D),
           v = tu_alloc(ATTN_F32, c.B, c.T, c.Hk, c.Dv), want = tu_alloc(ATTN_F64, c.B, c.T, c.H, c.Dv);
    tu_fill(&q.t, &r, -1, 1), tu_fill(&k.t, &r, -1, 1), tu_fill(&v.t, &r, -1, 1);
    tu_buf w = weights_of(&r, c.L);
    int32_t cu[4] = {0, (int32_t)(c.T / 3), (int32_t)(c.T / 3), (int32_t)c.T};
    attn_linear_params p = attn_linear_params_default();
    p.causal = c.causal;
    if (c.varlen) p.batch = 3, p.cu_seqlens = cu;
    CHECK_OK(attn_wersa_forward(g_ctx[2], &p, c.F, c.L, &w.t, &q.t, &k.t, &v.t, &want.t));
    tu_buf o[2] = {tu_alloc(ATTN_F32, c.B, c.T, c.H, c.Dv), tu_alloc(ATTN_F32, c.B, c.T, c.H, c.Dv)};
    for (int x = 0; x < 2; x++) {
        CHECK_OK(attn_wersa_forward(g_ctx[x], &p, c.F, c.L, &w.t, &q.t, &k.t, &v.t, &o[x].t));
        CHECK_CLOSE("o against the reference", &o[x].t, &want.t, 5e-6, 5e-5);
    }
    CHECK(tu_same_bits(&o[0], &o[1]), "2 threads and 1 thread differ");
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&want), tu_free(&o[0]), tu_free(&o[1]), tu_free(&w);
}

/* The filter written here, then attn_rfa_forward, against WERSA; unit
 * weights: WERSA is RFA bitwise; 4096 features: near exact attention on
 * the filtered inputs. */
static void test_filter(void) {
    tu_case("wersa filter from its definition");
    tu_rng r = {tu_seed(SALT, 100)};
    enum { T = 77, H = 2, D = 5, L = 3 };
    tu_buf q = tu_alloc(ATTN_F32, 1, T, H, D), k = tu_alloc(ATTN_F32, 1, T, H, D),
           v = tu_alloc(ATTN_F32, 1, T, H, D), fq = tu_alloc(ATTN_F32, 1, T, H, D),
           fk = tu_alloc(ATTN_F32, 1, T, H, D), o = tu_alloc(ATTN_F32, 1, T, H, D),
           o2 = tu_alloc(ATTN_F32, 1, T, H, D), exact = tu_alloc(ATTN_F32, 1, T, H, D);
    tu_fill(&q.t, &r, -0.5, 0.5), tu_fill(&k.t, &r, -0.5, 0.5), tu_fill(&v.t, &r, -1, 1);
    tu_buf w = weights_of(&r, L);
    double wd[L + 1];
    for (int l = 0; l <= L; l++) wd[l] = ((float *)w.mem)[l];
    naive_filter(q.mem, T, H, D, L, wd, fq.mem);
    naive_filter(k.mem, T, H, D, L, wd, fk.mem);
    attn_linear_params p = attn_linear_params_default();
    CHECK_OK(attn_wersa_forward(g_ctx[0], &p, 64, L, &w.t, &q.t, &k.t, &v.t, &o.t));
    CHECK_OK(attn_rfa_forward(g_ctx[0], &p, 64, &fq.t, &fk.t, &v.t, &o2.t));
    CHECK_CLOSE("o against RFA on the filtered q, k", &o.t, &o2.t, 1e-5, 1e-4);

    tu_case("wersa on strided q, k (copied before the filter) is the same");
    tu_buf qs = tu_alloc_strided(ATTN_F32, 1, T, H, D, 3), ks = tu_alloc_strided(ATTN_F32, 1, T, H, D, 1);
    tu_copy(&qs.t, &q.t), tu_copy(&ks.t, &k.t);
    CHECK_OK(attn_wersa_forward(g_ctx[0], &p, 64, L, &w.t, &qs.t, &ks.t, &v.t, &o2.t));
    CHECK(tu_same_bits(&o, &o2), "strided q, k give another result");
    tu_free(&qs), tu_free(&ks);

    tu_case("wersa with unit weights is RFA");
    tu_fill_const(&w.t, 1.0);
    CHECK_OK(attn_wersa_forward(g_ctx[0], &p, 64, L, &w.t, &q.t, &k.t, &v.t, &o.t));
    CHECK_OK(attn_rfa_forward(g_ctx[0], &p, 64, &q.t, &k.t, &v.t, &o2.t));
    CHECK(tu_same_bits(&o, &o2), "WERSA with unit weights differs from RFA");

    tu_case("wersa with many features is near exact attention on the filtered inputs");
    for (int l = 0; l <= L; l++) ((float *)w.mem)[l] = (float)wd[l];
    attn_params pe = attn_params_default();
    pe.causal = 1;
    CHECK_OK(attn_forward(g_ctx[0], &pe, &fq.t, &fk.t, &v.t, &exact.t, NULL));
    CHECK_OK(attn_wersa_forward(g_ctx[0], &p, 4096, L, &w.t, &q.t, &k.t, &v.t, &o.t));
    CHECK_CLOSE("against exact attention", &o.t, &exact.t, 0.05, 0.1); /* ~1/sqrt(4096) */
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&fq), tu_free(&fk), tu_free(&o), tu_free(&o2);
    tu_free(&exact), tu_free(&w);
}

/* Changing tokens from t0 on leaves the outputs before t0 (the keys' shared
 * feature shift moves, which cancels in the normaliser up to its eps). */
static void test_causal(void) {
    tu_case("wersa is causal");
    tu_rng r = {tu_seed(SALT, 200)};
    enum { T = 40, H = 2, D = 4, L = 4, T0 = 23 };
    tu_buf q = tu_alloc(ATTN_F32, 1, T, H, D), k = tu_alloc(ATTN_F32, 1, T, H, D),
           v = tu_alloc(ATTN_F32, 1, T, H, D), o = tu_alloc(ATTN_F32, 1, T, H, D),
           o2 = tu_alloc(ATTN_F32, 1, T, H, D);
    tu_fill(&q.t, &r, -1, 1), tu_fill(&k.t, &r, -1, 1), tu_fill(&v.t, &r, -1, 1);
    tu_buf w = weights_of(&r, L);
    attn_linear_params p = attn_linear_params_default();
    for (int c = 0; c < 3; c += 2) {
        CHECK_OK(attn_wersa_forward(g_ctx[c], &p, 32, L, &w.t, &q.t, &k.t, &v.t, &o.t));
        tu_buf q2 = tu_alloc(ATTN_F32, 1, T, H, D), k2 = tu_alloc(ATTN_F32, 1, T, H, D),
               v2 = tu_alloc(ATTN_F32, 1, T, H, D);
        tu_copy(&q2.t, &q.t), tu_copy(&k2.t, &k.t), tu_copy(&v2.t, &v.t);
        for (int64_t x = T0 * H * D; x < T * H * D; x++) {
            ((float *)q2.mem)[x] += 0.5f, ((float *)k2.mem)[x] -= 0.7f, ((float *)v2.mem)[x] *= 3;
        }
        CHECK_OK(attn_wersa_forward(g_ctx[c], &p, 32, L, &w.t, &q2.t, &k2.t, &v2.t, &o2.t));
        attn_tensor a = o.t, b = o2.t;
        a.shape[1] = b.shape[1] = T0;
        CHECK_CLOSE("outputs before the change", &b, &a, 1e-5, 1e-5);
        tu_free(&q2), tu_free(&k2), tu_free(&v2);
    }
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&o), tu_free(&o2), tu_free(&w);
}

/* The reference forward on x[0..3] = q, k, v, weights, for tu_fd_worst. */
typedef struct fwd_args {
    const attn_linear_params *p;
    int F, L;
    tu_buf *x, *o;
} fwd_args;

static int run_forward(void *arg) {
    fwd_args *a = arg;
    return attn_wersa_forward(g_ctx[2], a->p, a->F, a->L, &a->x[3].t, &a->x[0].t, &a->x[1].t,
                              &a->x[2].t, &a->o->t) == ATTN_OK;
}

/* attn_wersa_backward against central differences of the forward on the
 * reference backend (step 1e-2, tolerance 1e-4 (|fd| + 1)); the CPU
 * backend gives the same gradients. */
static void test_grad(int causal) {
    tu_case("wersa backward causal=%d", causal);
    tu_rng r = {tu_seed(SALT, 300 + (uint64_t)causal)};
    enum { T = 11, H = 2, Hk = 1, D = 3, Dv = 2, F = 16, L = 2 };
    tu_buf x[4] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, Hk, D),
                   tu_alloc(ATTN_F32, 1, T, Hk, Dv), weights_of(&r, L)};
    tu_buf g[4] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, Hk, D),
                   tu_alloc(ATTN_F32, 1, T, Hk, Dv), weights_of(&r, L)};
    for (int i = 0; i < 3; i++) tu_fill(&x[i].t, &r, -1, 1);
    tu_buf dout = tu_alloc(ATTN_F32, 1, T, H, Dv), o = tu_alloc(ATTN_F64, 1, T, H, Dv);
    tu_fill(&dout.t, &r, -1, 1);
    attn_linear_params p = attn_linear_params_default();
    p.causal = causal;
    CHECK_OK(attn_wersa_backward(g_ctx[2], &p, F, L, &x[3].t, &x[0].t, &x[1].t, &x[2].t, &dout.t,
                                 &g[0].t, &g[1].t, &g[2].t, &g[3].t));
    static const char *const names[4] = {"dq", "dk", "dv", "dweights"};
    fwd_args a = {&p, F, L, x, &o};
    for (int i = 0; i < 4; i++) {
        double worst = tu_fd_worst(&x[i], 1e-2, &g[i].t, run_forward, &a, &o.t, &dout.t);
        CHECK(worst <= 1e-4, "%s: finite differences differ by %.3g", names[i], worst);
    }
    tu_buf gc[4] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, Hk, D),
                    tu_alloc(ATTN_F32, 1, T, Hk, Dv), weights_of(&r, L)};
    CHECK_OK(attn_wersa_backward(g_ctx[0], &p, F, L, &x[3].t, &x[0].t, &x[1].t, &x[2].t, &dout.t,
                                 &gc[0].t, &gc[1].t, &gc[2].t, &gc[3].t));
    for (int i = 0; i < 4; i++) CHECK_CLOSE(names[i], &gc[i].t, &g[i].t, 1e-5, 1e-4);
    /* dweights is optional */
    CHECK_OK(attn_wersa_backward(g_ctx[0], &p, F, L, &x[3].t, &x[0].t, &x[1].t, &x[2].t, &dout.t,
                                 &gc[0].t, &gc[1].t, &gc[2].t, NULL));
    for (int i = 0; i < 4; i++) tu_free(&x[i]), tu_free(&g[i]), tu_free(&gc[i]);
    tu_free(&dout), tu_free(&o);
}

static void test_bad_args(void) {
    tu_case("wersa bad arguments");
    tu_rng r = {tu_seed(SALT, 400)};
    tu_buf q = tu_alloc(ATTN_F32, 1, 8, 2, 4), k = tu_alloc(ATTN_F32, 1, 8, 2, 4),
           v = tu_alloc(ATTN_F32, 1, 8, 2, 3), o = tu_alloc(ATTN_F32, 1, 8, 2, 3),
           obad = tu_alloc(ATTN_F32, 1, 8, 2, 4), w = weights_of(&r, 2), w3 = weights_of(&r, 3),
           dq = tu_alloc(ATTN_F32, 1, 8, 2, 4), dk = tu_alloc(ATTN_F32, 1, 8, 2, 4),
           dv = tu_alloc(ATTN_F32, 1, 8, 2, 3), dw = weights_of(&r, 2);
    attn_linear_params p = attn_linear_params_default();
    attn_ctx *c = g_ctx[0];
    CHECK_ERR(attn_wersa_forward(c, &p, 0, 2, &w.t, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "features");
    CHECK_ERR(attn_wersa_forward(c, &p, 5000, 2, &w.t, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "features");
    CHECK_ERR(attn_wersa_forward(c, &p, 8, -1, &w.t, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "levels");
    CHECK_ERR(attn_wersa_forward(c, &p, 8, 21, &w.t, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "levels");
    CHECK_ERR(attn_wersa_forward(c, &p, 8, 2, &w3.t, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_SHAPE, "weights");
    CHECK_ERR(attn_wersa_forward(c, &p, 8, 2, NULL, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_NULL, "weights");
    ((float *)w.mem)[1] = NAN;
    CHECK_ERR(attn_wersa_forward(c, &p, 8, 2, &w.t, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "weights[1]");
    ((float *)w.mem)[1] = 1.0f;
    CHECK_ERR(attn_wersa_forward(NULL, &p, 8, 2, &w.t, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_NULL, "ctx");
    CHECK_ERR(attn_wersa_forward(c, NULL, 8, 2, &w.t, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_NULL, "params");
    CHECK_ERR(attn_wersa_forward(c, &p, 8, 2, &w.t, &q.t, &k.t, &v.t, &obad.t), ATTN_ERR_SHAPE, "o");
    attn_tensor alias = o.t;
    alias.data = v.mem;
    CHECK_ERR(attn_wersa_forward(c, &p, 8, 2, &w.t, &q.t, &k.t, &v.t, &alias), ATTN_ERR_ALIAS, "o");
    p.gate = ATTN_GATE_HEAD;
    CHECK_ERR(attn_wersa_forward(c, &p, 8, 2, &w.t, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "gate");
    p = attn_linear_params_default();
    CHECK_ERR(attn_wersa_backward(c, &p, 8, 2, &w.t, &q.t, &k.t, &v.t, &o.t, &dq.t, &dk.t, &dv.t, &w3.t),
           ATTN_ERR_SHAPE, "dweights");
    CHECK_ERR(attn_wersa_backward(c, &p, 8, 2, &w.t, &q.t, &k.t, &v.t, &o.t, &dq.t, &dk.t, &dv.t, &w.t),
           ATTN_ERR_ALIAS, "dweights");
    CHECK_ERR(attn_wersa_backward(c, &p, 8, 2, &w.t, &q.t, &k.t, &v.t, &o.t, NULL, &dk.t, &dv.t, &dw.t),
           ATTN_ERR_NULL, "dq");
    CHECK_ERR(attn_wersa_backward(c, &p, 8, 2, &w.t, &q.t, &k.t, &v.t, &obad.t, &dq.t, &dk.t, &dv.t, &dw.t),
           ATTN_ERR_SHAPE, "dout");
    CHECK_OK(attn_wersa_backward(c, &p, 8, 2, &w.t, &q.t, &k.t, &v.t, &o.t, &dq.t, &dk.t, &dv.t, &dw.t));
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&o), tu_free(&obad), tu_free(&w), tu_free(&w3);
    tu_free(&dq), tu_free(&dk), tu_free(&dv), tu_free(&dw);
}

int main(void) {
    g_ctx[0] = tu_ctx("test_wersa", ATTN_BACKEND_CPU, 2);
    g_ctx[1] = tu_ctx("test_wersa", ATTN_BACKEND_CPU, 1);
    g_ctx[2] = tu_ctx("test_wersa", ATTN_BACKEND_REF, 1);
    const wersa_case cases[] = {
        /* B  T   H  Hk D   Dv causal L F   varlen */
        {2, 75, 4, 2, 16, 12, 1, 3, 64, 0},
        {2, 75, 4, 2, 16, 12, 0, 3, 64, 0},
        {1, 33, 3, 1, 1, 3, 1, 2, 16, 0},
        {1, 40, 2, 2, 7, 5, 1, 0, 33, 0},
        {1, 50, 2, 1, 9, 4, 1, 4, 48, 1},
        {1, 50, 2, 1, 9, 4, 0, 1, 48, 1},
        {1, 1, 1, 1, 3, 2, 1, 5, 8, 0},
        {1, 20, 1, 1, 2, 2, 1, 20, 8, 0},
    };
    for (int i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) check_case(i, cases[i]);
    test_filter();
    test_causal();
    test_grad(1);
    test_grad(0);
    test_bad_args();
    for (int c = 0; c < 3; c++) attn_ctx_free(g_ctx[c]);
    return tu_finish("test_wersa");
}
