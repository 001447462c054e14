/* Local Linear Attention (attn_lla_forward, attn_lla_backward): the
 * blockwise CPU path against the double reference backend on fresh random
 * inputs (odd lengths, D = 1, odd D, Dv != D, GQA, blocks that do not divide
 * T, causal and not, varlen, an empty sequence), bitwise equal for 1 and 2
 * threads; the reference backward against finite differences of the
 * reference forward and the CPU backward against it (check_grad); two
 * properties of the estimator checked from its definition (a large lambda
 * is softmax attention; values affine in the keys are reproduced at the
 * query: the local linear fit has no bias there); edge cases and bad
 * arguments.
 * Tolerances (f32 against double): rel RMS 2e-5, max abs 1e-4 * (max|ref| + 1)
 * (measured worst: 4.4e-6 and 2.4e-5 at lambda 0.02, inputs in [-2, 2]):
 * rho solves a D x D system whose condition number reaches (|k|² + lambda) /
 * lambda on early causal rows, which multiplies the f32 rounding of the
 * moments. */
#include "test_util.h"

static attn_ctx *g_ctx[3]; /* cpu 2 threads, cpu 1 thread, ref */

#define SALT 0x11A7u

typedef struct lla_case {
    int64_t B, T, H, Hk, D, Dv;
    int causal, blk, varlen;
    float lambda;
    double amp; /* inputs uniform in [-amp, amp] */
} lla_case;

static void check_case(int idx, lla_case c) {
    tu_case("lla B=%lld T=%lld H=%lld Hk=%lld D=%lld Dv=%lld causal=%d blk=%d varlen=%d lambda=%g",
            (long long)c.B, (long long)c.T, (long long)c.H, (long long)c.Hk, (long long)c.D,
            (long long)c.Dv, c.causal, c.blk, c.varlen, (double)c.lambda);
    tu_rng r = {tu_seed(SALT, (uint64_t)idx)};
    tu_buf q = tu_alloc(ATTN_F32, c.B, c.T, c.H, c.D), k = tu_alloc(ATTN_F32, c.B, c.T, c.Hk, c.D),
           v = tu_alloc(ATTN_F32, c.B, c.T, c.Hk, c.Dv), want = tu_alloc(ATTN_F64, c.B, c.T, c.H, c.Dv);
    tu_fill(&q.t, &r, -c.amp, c.amp);
    tu_fill(&k.t, &r, -c.amp, c.amp);
    tu_fill(&v.t, &r, -1, 1);
    int32_t cu[4] = {0, (int32_t)(c.T / 3), (int32_t)(c.T / 3), (int32_t)c.T}; /* one empty */
    attn_linear_params p = attn_linear_params_default();
    p.causal = c.causal;
    p.chunk = c.blk;
    if (c.varlen) p.batch = 3, p.cu_seqlens = cu;
    CHECK_OK(attn_lla_forward(g_ctx[2], &p, c.lambda, &q.t, &k.t, &v.t, &want.t));
    tu_buf o[2] = {tu_alloc(ATTN_F32, c.B, c.T, c.H, c.Dv), tu_alloc(ATTN_F32, c.B, c.T, c.H, c.Dv)};
    for (int x = 0; x < 2; x++) {
        CHECK_OK(attn_lla_forward(g_ctx[x], &p, c.lambda, &q.t, &k.t, &v.t, &o[x].t));
        CHECK_CLOSE("o against the reference", &o[x].t, &want.t, 2e-5, 1e-4);
    }
    CHECK(tu_same_bits(&o[0], &o[1]), "2 threads and 1 thread differ");
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&want), tu_free(&o[0]), tu_free(&o[1]);
}

/* The reference forward on x[0..2] = q, k, v, for tu_fd_worst. */
typedef struct fwd_args {
    const attn_linear_params *p;
    float lambda;
    tu_buf *x, *o;
} fwd_args;

static int run_forward(void *arg) {
    fwd_args *a = arg;
    return attn_lla_forward(g_ctx[2], a->p, a->lambda, &a->x[0].t, &a->x[1].t, &a->x[2].t,
                            &a->o->t) == ATTN_OK;
}

/* The reference backward against central differences of the reference
 * forward (when fd; f64 inputs, step 1e-6, within 1e-7 (|fd| + 1), measured
 * worst 1.2e-9); then the CPU backward against the reference backward on the
 * same case (f32 inputs; rel RMS 2e-5, max abs 1e-4 (max|ref| + 1), measured
 * worst 3.1e-7 and 8.4e-7), bitwise equal for 1 and 2 threads. */
static void check_grad(int idx, lla_case c, int fd) {
    tu_case("lla backward B=%lld T=%lld H=%lld Hk=%lld D=%lld Dv=%lld causal=%d blk=%d varlen=%d "
            "lambda=%g", (long long)c.B, (long long)c.T, (long long)c.H, (long long)c.Hk,
            (long long)c.D, (long long)c.Dv, c.causal, c.blk, c.varlen, (double)c.lambda);
    tu_rng r = {tu_seed(SALT, 500 + (uint64_t)idx)};
    const int64_t dims[3][2] = {{c.H, c.D}, {c.Hk, c.D}, {c.Hk, c.Dv}};
    tu_buf x[3], x32[3], gr[3], gc[2][3];
    for (int i = 0; i < 3; i++) {
        x32[i] = tu_alloc(ATTN_F32, c.B, c.T, dims[i][0], dims[i][1]);
        tu_fill(&x32[i].t, &r, -c.amp, c.amp);
        if (i == 2) tu_fill(&x32[i].t, &r, -1, 1);
        x[i] = tu_alloc(ATTN_F64, c.B, c.T, dims[i][0], dims[i][1]);
        tu_copy(&x[i].t, &x32[i].t);
        gr[i] = tu_alloc(ATTN_F64, c.B, c.T, dims[i][0], dims[i][1]);
        for (int t = 0; t < 2; t++) gc[t][i] = tu_alloc(ATTN_F32, c.B, c.T, dims[i][0], dims[i][1]);
    }
    tu_buf dout = tu_alloc(ATTN_F32, c.B, c.T, c.H, c.Dv), d64 = tu_alloc(ATTN_F64, c.B, c.T, c.H, c.Dv);
    tu_buf o = tu_alloc(ATTN_F64, c.B, c.T, c.H, c.Dv);
    tu_fill(&dout.t, &r, -1, 1);
    tu_copy(&d64.t, &dout.t);
    int32_t cu[4] = {0, (int32_t)(c.T / 3), (int32_t)(c.T / 3), (int32_t)c.T};
    attn_linear_params p = attn_linear_params_default();
    p.causal = c.causal;
    p.chunk = c.blk;
    if (c.varlen) p.batch = 3, p.cu_seqlens = cu;
    CHECK_OK(attn_lla_backward(g_ctx[2], &p, c.lambda, &x[0].t, &x[1].t, &x[2].t, &d64.t, &gr[0].t,
                               &gr[1].t, &gr[2].t));
    static const char *const names[3] = {"dq", "dk", "dv"};
    fwd_args a = {&p, c.lambda, x, &o};
    for (int i = 0; i < 3 && fd; i++) {
        double worst = tu_fd_worst(&x[i], 1e-6, &gr[i].t, run_forward, &a, &o.t, &d64.t);
        CHECK(worst <= 1e-7, "%s: finite differences differ by %.3g", names[i], worst);
    }
    for (int t = 0; t < 2; t++) {
        CHECK_OK(attn_lla_backward(g_ctx[t], &p, c.lambda, &x32[0].t, &x32[1].t, &x32[2].t, &dout.t,
                                   &gc[t][0].t, &gc[t][1].t, &gc[t][2].t));
        for (int i = 0; i < 3; i++) CHECK_CLOSE(names[i], &gc[t][i].t, &gr[i].t, 2e-5, 1e-4);
    }
    for (int i = 0; i < 3; i++)
        CHECK(tu_same_bits(&gc[0][i], &gc[1][i]), "%s: 2 threads and 1 thread differ", names[i]);
    for (int i = 0; i < 3; i++) {
        tu_free(&x[i]), tu_free(&x32[i]), tu_free(&gr[i]);
        for (int t = 0; t < 2; t++) tu_free(&gc[t][i]);
    }
    tu_free(&dout), tu_free(&d64), tu_free(&o);
}

/* lambda -> inf: rho -> 0 and o is softmax attention. */
static void test_softmax_limit(void) {
    tu_case("lla with a large lambda is softmax attention");
    tu_rng r = {tu_seed(SALT, 100)};
    const int64_t T = 45, H = 2, D = 8;
    tu_buf q = tu_alloc(ATTN_F32, 1, T, H, D), k = tu_alloc(ATTN_F32, 1, T, H, D),
           v = tu_alloc(ATTN_F32, 1, T, H, D), o = tu_alloc(ATTN_F32, 1, T, H, D),
           sm = tu_alloc(ATTN_F64, 1, T, H, D);
    tu_fill(&q.t, &r, -1, 1), tu_fill(&k.t, &r, -1, 1), tu_fill(&v.t, &r, -1, 1);
    attn_params ps = attn_params_default();
    ps.causal = 1;
    CHECK_OK(attn_forward(g_ctx[2], &ps, &q.t, &k.t, &v.t, &sm.t, NULL));
    attn_linear_params p = attn_linear_params_default();
    CHECK_OK(attn_lla_forward(g_ctx[0], &p, 1e7f, &q.t, &k.t, &v.t, &o.t));
    CHECK_CLOSE("o against softmax attention", &o.t, &sm.t, 1e-5, 1e-4);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&o), tu_free(&sm);
}

/* v = A k + b exactly: the local linear fit at q is A q + b (up to the
 * ridge's bias, lambda small against the keys' spread). Softmax attention,
 * the local constant fit, misses it by far. */
static void test_affine_values(void) {
    tu_case("lla reproduces values affine in the keys");
    tu_rng r = {tu_seed(SALT, 200)};
    enum { T = 64, D = 3, Dv = 2 };
    double A[Dv][D], bias[Dv];
    for (int e = 0; e < Dv; e++) {
        bias[e] = tu_uniform(&r, -1, 1);
        for (int x = 0; x < D; x++) A[e][x] = tu_uniform(&r, -1, 1);
    }
    tu_buf q = tu_alloc(ATTN_F32, 1, T, 1, D), k = tu_alloc(ATTN_F32, 1, T, 1, D),
           v = tu_alloc(ATTN_F32, 1, T, 1, Dv), want = tu_alloc(ATTN_F64, 1, T, 1, Dv),
           o = tu_alloc(ATTN_F32, 1, T, 1, Dv), sm = tu_alloc(ATTN_F32, 1, T, 1, Dv);
    tu_fill(&q.t, &r, -0.8, 0.8), tu_fill(&k.t, &r, -1, 1);
    for (int64_t t = 0; t < T; t++)
        for (int e = 0; e < Dv; e++) {
            double vk = bias[e], vq = bias[e];
            for (int x = 0; x < D; x++) {
                vk += A[e][x] * ((float *)k.mem)[t * D + x];
                vq += A[e][x] * ((float *)q.mem)[t * D + x];
            }
            ((float *)v.mem)[t * Dv + e] = (float)vk;
            ((double *)want.mem)[t * Dv + e] = vq;
        }
    attn_linear_params p = attn_linear_params_default();
    p.causal = 0;
    p.scale = 2.0f;
    for (int c = 0; c < 3; c += 2) {
        tu_buf *got = c == 2 ? &sm : &o;
        CHECK_OK(attn_lla_forward(g_ctx[c], &p, 1e-5f, &q.t, &k.t, &v.t, &got->t));
        CHECK_CLOSE("o against A q + b", &got->t, &want.t, 1e-3, 1e-3);
    }
    attn_params ps = attn_params_default();
    ps.scale = 2.0f;
    CHECK_OK(attn_forward(g_ctx[0], &ps, &q.t, &k.t, &v.t, &sm.t, NULL));
    tu_err e = tu_compare(&sm.t, &want.t, 0);
    CHECK(e.rel_rms > 0.05, "softmax attention also reproduces it (rel RMS %.3g)", e.rel_rms);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&want), tu_free(&o), tu_free(&sm);
}

/* One token: the fit has one point, o = v_0; large logits stay finite. */
static void test_edges(void) {
    tu_case("lla edges");
    tu_rng r = {tu_seed(SALT, 300)};
    tu_buf q = tu_alloc(ATTN_F32, 2, 1, 3, 5), k = tu_alloc(ATTN_F32, 2, 1, 3, 5),
           v = tu_alloc(ATTN_F32, 2, 1, 3, 4), o = tu_alloc(ATTN_F32, 2, 1, 3, 4);
    tu_fill(&q.t, &r, -1, 1), tu_fill(&k.t, &r, -1, 1), tu_fill(&v.t, &r, -1, 1);
    attn_linear_params p = attn_linear_params_default();
    CHECK_OK(attn_lla_forward(g_ctx[0], &p, 0.1f, &q.t, &k.t, &v.t, &o.t));
    CHECK_CLOSE("one token: o = v", &o.t, &v.t, 1e-6, 1e-6);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&o);

    tu_case("lla large logits");
    const int64_t T = 40, D = 6;
    tu_buf q2 = tu_alloc(ATTN_F32, 1, T, 2, D), k2 = tu_alloc(ATTN_F32, 1, T, 2, D),
           v2 = tu_alloc(ATTN_F32, 1, T, 2, D), o2 = tu_alloc(ATTN_F32, 1, T, 2, D),
           w2 = tu_alloc(ATTN_F64, 1, T, 2, D);
    tu_fill(&q2.t, &r, -20, 20), tu_fill(&k2.t, &r, -20, 20), tu_fill(&v2.t, &r, -1, 1);
    CHECK_OK(attn_lla_forward(g_ctx[2], &p, 1.0f, &q2.t, &k2.t, &v2.t, &w2.t));
    CHECK_OK(attn_lla_forward(g_ctx[0], &p, 1.0f, &q2.t, &k2.t, &v2.t, &o2.t));
    /* logits up to ~1e3: their f32 rounding alone moves weights by ~1e-4 */
    CHECK_CLOSE("o against the reference", &o2.t, &w2.t, 1e-4, 1e-3);
    tu_free(&q2), tu_free(&k2), tu_free(&v2), tu_free(&o2), tu_free(&w2);
}

/* f16 and bf16 inputs (read the same way on both backends); a NaN in one
 * key makes the outputs of the queries that see it non-finite and leaves
 * the rows of earlier query blocks finite (attn.h: inside the key's own
 * block the masked products are computed, and 0 x NaN is NaN). */
static void test_dtypes_and_nan(void) {
    static const attn_dtype dts[2] = {ATTN_F16, ATTN_BF16};
    for (int d = 0; d < 2; d++) {
        tu_case("lla %s inputs", d ? "bf16" : "f16");
        tu_rng r = {tu_seed(SALT, 600 + (uint64_t)d)};
        const int64_t T = 37, H = 2, D = 6, Dv = 5;
        tu_buf q = tu_alloc(dts[d], 1, T, H, D), k = tu_alloc(dts[d], 1, T, H, D),
               v = tu_alloc(dts[d], 1, T, H, Dv), o = tu_alloc(ATTN_F32, 1, T, H, Dv),
               want = tu_alloc(ATTN_F64, 1, T, H, Dv);
        tu_fill(&q.t, &r, -1, 1), tu_fill(&k.t, &r, -1, 1), tu_fill(&v.t, &r, -1, 1);
        attn_linear_params p = attn_linear_params_default();
        CHECK_OK(attn_lla_forward(g_ctx[2], &p, 0.2f, &q.t, &k.t, &v.t, &want.t));
        CHECK_OK(attn_lla_forward(g_ctx[0], &p, 0.2f, &q.t, &k.t, &v.t, &o.t));
        CHECK_CLOSE("o against the reference", &o.t, &want.t, 2e-5, 1e-4);
        tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&o), tu_free(&want);
    }
    tu_case("lla NaN in a key");
    tu_rng r = {tu_seed(SALT, 700)};
    const int64_t T = 30, D = 4, T0 = 17;
    tu_buf q = tu_alloc(ATTN_F32, 1, T, 1, D), k = tu_alloc(ATTN_F32, 1, T, 1, D),
           v = tu_alloc(ATTN_F32, 1, T, 1, D), o = tu_alloc(ATTN_F32, 1, T, 1, D),
           want = tu_alloc(ATTN_F64, 1, T, 1, D);
    tu_fill(&q.t, &r, -1, 1), tu_fill(&k.t, &r, -1, 1), tu_fill(&v.t, &r, -1, 1);
    ((float *)k.mem)[T0 * D + 1] = NAN;
    attn_linear_params p = attn_linear_params_default();
    p.chunk = 8; /* T0 lies in the block [16, 24): the rows of earlier blocks stay finite */
    CHECK_OK(attn_lla_forward(g_ctx[0], &p, 0.2f, &q.t, &k.t, &v.t, &o.t));
    int bad_before = 0, finite_after = 0;
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < D; e++) {
            const float x = ((float *)o.mem)[t * D + e];
            if (t < T0 / 8 * 8 && !isfinite(x)) bad_before++;
            if (t >= T0 && isfinite(x)) finite_after++;
        }
    CHECK(bad_before == 0, "%d outputs of earlier blocks are not finite", bad_before);
    CHECK(finite_after == 0, "%d outputs at or after the NaN key are finite", finite_after);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&o), tu_free(&want);
}

static void test_bad_args(void) {
    tu_case("lla bad arguments");
    tu_buf q = tu_alloc(ATTN_F32, 1, 8, 4, 4), k = tu_alloc(ATTN_F32, 1, 8, 2, 4),
           v = tu_alloc(ATTN_F32, 1, 8, 2, 3), o = tu_alloc(ATTN_F32, 1, 8, 4, 3),
           k3 = tu_alloc(ATTN_F32, 1, 8, 3, 4), v3 = tu_alloc(ATTN_F32, 1, 8, 3, 3),
           obad = tu_alloc(ATTN_F32, 1, 8, 4, 4);
    attn_linear_params p = attn_linear_params_default();
    attn_ctx *c = g_ctx[0];
    CHECK_ERR(attn_lla_forward(c, &p, 0.0f, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "lambda");
    CHECK_ERR(attn_lla_forward(c, &p, -1.0f, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "lambda");
    CHECK_ERR(attn_lla_forward(c, &p, NAN, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "lambda");
    CHECK_ERR(attn_lla_forward(c, &p, INFINITY, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "lambda");
    CHECK_ERR(attn_lla_forward(NULL, &p, 1.0f, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_NULL, "ctx");
    CHECK_ERR(attn_lla_forward(c, NULL, 1.0f, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_NULL, "params");
    CHECK_ERR(attn_lla_forward(c, &p, 1.0f, NULL, &k.t, &v.t, &o.t), ATTN_ERR_NULL, "q");
    CHECK_ERR(attn_lla_forward(c, &p, 1.0f, &q.t, &k.t, &v.t, NULL), ATTN_ERR_NULL, "o");
    CHECK_ERR(attn_lla_forward(c, &p, 1.0f, &q.t, &k.t, &v.t, &obad.t), ATTN_ERR_SHAPE, "o");
    CHECK_ERR(attn_lla_forward(c, &p, 1.0f, &q.t, &k3.t, &v3.t, &o.t), ATTN_ERR_SHAPE, "divide");
    CHECK_ERR(attn_lla_forward(c, &p, 1.0f, &q.t, &k.t, &v3.t, &o.t), ATTN_ERR_SHAPE, "v->shape");
    attn_tensor alias = o.t;
    alias.data = q.mem;
    CHECK_ERR(attn_lla_forward(c, &p, 1.0f, &q.t, &k.t, &v.t, &alias), ATTN_ERR_ALIAS, "o");
    p.gate = ATTN_GATE_HEAD;
    CHECK_ERR(attn_lla_forward(c, &p, 1.0f, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "gate");
    p = attn_linear_params_default();
    p.chunk = 5000;
    CHECK_ERR(attn_lla_forward(c, &p, 1.0f, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "chunk");
    p = attn_linear_params_default();
    p.scale = -1.0f;
    CHECK_ERR(attn_lla_forward(c, &p, 1.0f, &q.t, &k.t, &v.t, &o.t), ATTN_ERR_ARG, "scale");
    p = attn_linear_params_default();
    tu_buf dq = tu_alloc(ATTN_F32, 1, 8, 4, 4), dk = tu_alloc(ATTN_F32, 1, 8, 2, 4),
           dv = tu_alloc(ATTN_F32, 1, 8, 2, 3);
    CHECK_OK(attn_lla_backward(c, &p, 1.0f, &q.t, &k.t, &v.t, &o.t, &dq.t, &dk.t, &dv.t));
    CHECK_ERR(attn_lla_backward(c, &p, 0.0f, &q.t, &k.t, &v.t, &o.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_ARG, "lambda");
    CHECK_ERR(attn_lla_backward(c, &p, 1.0f, &q.t, &k.t, &v.t, &o.t, NULL, &dk.t, &dv.t),
              ATTN_ERR_NULL, "dq");
    CHECK_ERR(attn_lla_backward(c, &p, 1.0f, &q.t, &k.t, &v.t, &obad.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_SHAPE, "dout");
    CHECK_ERR(attn_lla_backward(c, &p, 1.0f, &q.t, &k.t, &v.t, &o.t, &dq.t, &dq.t, &dv.t),
              ATTN_ERR_SHAPE, "dk");
    alias = dk.t;
    alias.data = dq.mem;
    CHECK_ERR(attn_lla_backward(c, &p, 1.0f, &q.t, &k.t, &v.t, &o.t, &dq.t, &alias, &dv.t),
              ATTN_ERR_ALIAS, "dk");
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&o), tu_free(&k3), tu_free(&v3), tu_free(&obad);
    tu_free(&dq), tu_free(&dk), tu_free(&dv);
}

int main(void) {
    g_ctx[0] = tu_ctx("test_lla", ATTN_BACKEND_CPU, 2);
    g_ctx[1] = tu_ctx("test_lla", ATTN_BACKEND_CPU, 1);
    g_ctx[2] = tu_ctx("test_lla", ATTN_BACKEND_REF, 1);
    const lla_case cases[] = {
        /* B  T   H  Hk D   Dv causal blk varlen lambda amp */
        {2, 75, 4, 2, 16, 12, 1, 0, 0, 0.1f, 1.0},
        {2, 75, 4, 2, 16, 12, 0, 0, 0, 0.1f, 1.0},
        {1, 70, 2, 2, 7, 5, 1, 16, 0, 0.5f, 1.0},
        {1, 33, 3, 1, 1, 3, 1, 8, 0, 0.05f, 1.0},
        {1, 33, 3, 1, 1, 1, 0, 0, 0, 0.05f, 1.0},
        {1, 90, 2, 1, 9, 4, 1, 13, 1, 0.2f, 1.0},
        {1, 90, 2, 1, 9, 4, 0, 13, 1, 0.2f, 1.0},
        {1, 50, 1, 1, 32, 32, 1, 64, 0, 1.0f, 0.5},
        {1, 64, 2, 2, 4, 4, 1, 1, 0, 0.02f, 2.0},
    };
    for (int i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) check_case(i, cases[i]);
    const lla_case grads[] = {
        /* B  T   H  Hk D  Dv causal blk varlen lambda amp */
        {2, 19, 4, 2, 3, 2, 1, 8, 0, 0.1f, 1.0},
        {1, 17, 2, 1, 5, 3, 0, 7, 0, 0.3f, 1.0},
        {1, 21, 2, 2, 1, 2, 1, 0, 1, 0.05f, 1.0},
        {1, 21, 1, 1, 4, 4, 0, 5, 1, 1.0f, 1.5},
        {2, 75, 4, 2, 16, 12, 1, 0, 0, 0.1f, 1.0}, /* CPU against the reference only */
        {1, 90, 2, 1, 9, 4, 0, 13, 1, 0.2f, 1.0},
    };
    for (int i = 0; i < (int)(sizeof grads / sizeof grads[0]); i++) check_grad(i, grads[i], i < 4);
    test_softmax_limit();
    test_affine_values();
    test_edges();
    test_dtypes_and_nan();
    test_bad_args();
    for (int c = 0; c < 3; c++) attn_ctx_free(g_ctx[c]);
    return tu_finish("test_lla");
}
