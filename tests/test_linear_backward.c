/* attn_linear_backward: the reference against central finite differences of
 * the reference forward (f64), then the chunked engine on every ISA against
 * the reference. The loss is L = sum(o ⊙ Wo) + sum(state_out ⊙ Ws) with
 * random weights, so dout = Wo and dstate_out = Ws.
 * Tolerances: finite differences (step 1e-6, f64): |fd - analytic| <= 1e-6 *
 * (|analytic| + 1). Engine (f32) vs reference: rel RMS 1e-4 and max abs
 * 1e-3 * (max|ref| + 1); the log-gate gradient is a reverse running sum
 * over the sequence of differences q⊙dq - k⊙dk, which cancel, so it gets
 * rel RMS 1e-3 and max abs 1e-2 * (max|ref| + 1). Its error is absolute,
 * f32 rounding of those terms (measured 2-4e-7 with terms of order 1):
 * with strong gates (g ~ -40) the true dg is ~1e-12, so there only the max
 * abs error is bounded, by 1e-5. */
#include "test_linear_util.h"

static attn_ctx *g_ref, *g_cpu[2];
static attn_ctx *g_isa[4];
static int g_n_isa;

#define SALT 0xB11Du

typedef struct bcase {
    int64_t B, T, H, Hk, D, Dv;
    attn_gate gate;
    int causal, chunk;
    double glo; /* log gates from [glo, glo / 2]; 0: from [-0.5, 0] */
} bcase;

typedef struct grads {
    tu_buf dq, dk, dv, dg, ds0;
    attn_status st;
} grads;

static grads run_backward(attn_ctx *ctx, const attn_linear_params *p, const lin_inputs *in,
                          const tu_buf *wo, const tu_buf *ws, attn_dtype dt) {
    grads r;
    memset(&r, 0, sizeof r);
    const attn_tensor *q = &in->q.t;
    int64_t B = q->shape[0], T = q->shape[1], H = q->shape[2], D = q->shape[3];
    int64_t Hk = in->k.t.shape[2], Dv = in->v.t.shape[3];
    r.dq = tu_alloc(dt, B, T, H, D);
    r.dk = tu_alloc(dt, B, T, Hk, D);
    r.dv = tu_alloc(dt, B, T, Hk, Dv);
    r.ds0 = tu_alloc(dt, p->cu_seqlens ? p->batch : B, H, D, Dv);
    if (in->g.mem) r.dg = lin_gate_alloc(p->gate, dt, B, T, H, D);
    r.st = attn_linear_backward(ctx, p, q, &in->k.t, &in->v.t, lin_g(in), lin_s0(in), &wo->t,
                                &ws->t, &r.dq.t, &r.dk.t, &r.dv.t, r.dg.mem ? &r.dg.t : NULL,
                                lin_s0(in) ? &r.ds0.t : NULL);
    return r;
}

static void grads_free(grads *g) {
    tu_free(&g->dq), tu_free(&g->dk), tu_free(&g->dv), tu_free(&g->ds0);
    if (g->dg.mem) tu_free(&g->dg);
}

/* The loss on the reference, inputs in f64. */
static double loss(const attn_linear_params *p, const lin_inputs *in, const tu_buf *wo,
                   const tu_buf *ws) {
    lin_out r = lin_forward(g_ref, p, in, ATTN_F64, ATTN_F64);
    double l = 0.0;
    for (int64_t i = 0; i < tu_numel(&r.o.t); i++) l += ((double *)r.o.mem)[i] * ((double *)wo->mem)[i];
    for (int64_t i = 0; i < tu_numel(&r.s.t); i++) l += ((double *)r.s.mem)[i] * ((double *)ws->mem)[i];
    lin_out_free(&r);
    return l;
}

/* Every element of x against the analytic gradient grad. */
static void fd_check(const char *what, const attn_linear_params *p, lin_inputs *in, tu_buf *x,
                     const tu_buf *grad, const tu_buf *wo, const tu_buf *ws) {
    const double step = 1e-6;
    double worst = 0.0;
    int64_t n = tu_numel(&x->t), at = -1;
    for (int64_t i = 0; i < n; i++) {
        double *e = (double *)x->mem + i, keep = *e;
        *e = keep + step;
        double lp = loss(p, in, wo, ws);
        *e = keep - step;
        double lm = loss(p, in, wo, ws);
        *e = keep;
        double fd = (lp - lm) / (2 * step), an = ((double *)grad->mem)[i];
        double err = fabs(fd - an) / (fabs(an) + 1.0);
        if (err > worst) worst = err, at = i;
    }
    CHECK(worst <= 1e-6, "%s: finite differences differ by %.3g (relative) at %lld", what, worst,
          (long long)at);
}

static void test_fd(int idx, const bcase *c) {
    uint64_t seed = tu_seed(SALT, (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("fd #%d B=%lld T=%lld H=%lld Hk=%lld D=%lld Dv=%lld gate=%d causal=%d seed=%llx", idx,
            (long long)c->B, (long long)c->T, (long long)c->H, (long long)c->Hk, (long long)c->D,
            (long long)c->Dv, (int)c->gate, c->causal, (unsigned long long)seed);
    lin_inputs in = lin_make(&r, ATTN_F64, c->gate, c->B, c->T, c->H, c->Hk, c->D, c->Dv, -0.7,
                             0, 1);
    if (in.g.mem) { /* the gate in f64 too */
        tu_buf g64 = lin_gate_alloc(c->gate, ATTN_F64, c->B, c->T, c->H, c->D);
        tu_copy(&g64.t, &in.g.t);
        tu_free(&in.g);
        in.g = g64;
    }
    tu_buf s64 = tu_alloc(ATTN_F64, c->B, c->H, c->D, c->Dv);
    tu_copy(&s64.t, &in.s0.t);
    tu_free(&in.s0);
    in.s0 = s64;
    tu_buf wo = tu_alloc(ATTN_F64, c->B, c->T, c->H, c->Dv), ws = tu_alloc(ATTN_F64, c->B, c->H, c->D, c->Dv);
    tu_fill(&wo.t, &r, -1, 1);
    tu_fill(&ws.t, &r, -1, 1);
    attn_linear_params p = attn_linear_params_default();
    p.gate = c->gate;
    p.causal = c->causal;
    grads gr = run_backward(g_ref, &p, &in, &wo, &ws, ATTN_F64);
    CHECK_OK(gr.st);
    if (gr.st == ATTN_OK) {
        fd_check("dq", &p, &in, &in.q, &gr.dq, &wo, &ws);
        fd_check("dk", &p, &in, &in.k, &gr.dk, &wo, &ws);
        fd_check("dv", &p, &in, &in.v, &gr.dv, &wo, &ws);
        fd_check("dstate_in", &p, &in, &in.s0, &gr.ds0, &wo, &ws);
        if (in.g.mem) fd_check("dg", &p, &in, &in.g, &gr.dg, &wo, &ws);
    }
    grads_free(&gr);
    tu_free(&wo), tu_free(&ws);
    lin_free(&in);
}

static void test_engine(int idx, const bcase *c) {
    uint64_t seed = tu_seed(SALT, 100 + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("engine #%d B=%lld T=%lld H=%lld Hk=%lld D=%lld Dv=%lld gate=%d causal=%d chunk=%d "
            "glo=%g seed=%llx", idx, (long long)c->B, (long long)c->T, (long long)c->H, (long long)c->Hk,
            (long long)c->D, (long long)c->Dv, (int)c->gate, c->causal, c->chunk, c->glo,
            (unsigned long long)seed);
    lin_inputs in = lin_make(&r, ATTN_F32, c->gate, c->B, c->T, c->H, c->Hk, c->D, c->Dv,
                             c->glo < 0 ? c->glo : -0.5, c->glo < 0 ? c->glo / 2 : 0, 1);
    tu_buf wo = tu_alloc(ATTN_F32, c->B, c->T, c->H, c->Dv), ws = tu_alloc(ATTN_F32, c->B, c->H, c->D, c->Dv);
    tu_fill(&wo.t, &r, -1, 1);
    tu_fill(&ws.t, &r, -1, 1);
    attn_linear_params p = attn_linear_params_default();
    p.gate = c->gate;
    p.causal = c->causal;
    p.chunk = c->chunk;
    grads ref = run_backward(g_ref, &p, &in, &wo, &ws, ATTN_F64);
    CHECK_OK(ref.st);
    attn_ctx *cpus[5] = {g_cpu[idx % 2]};
    for (int i = 0; i < g_n_isa; i++) cpus[1 + i] = g_isa[i];
    for (int i = 0; i < 1 + g_n_isa && ref.st == ATTN_OK; i++) {
        tu_prefix = i ? attn_isa_name(attn_ctx_isa(cpus[i])) : "";
        grads got = run_backward(cpus[i], &p, &in, &wo, &ws, ATTN_F32);
        CHECK_OK(got.st);
        if (got.st == ATTN_OK) {
            CHECK_CLOSE("dq", &got.dq.t, &ref.dq.t, 1e-4, 1e-3);
            CHECK_CLOSE("dk", &got.dk.t, &ref.dk.t, 1e-4, 1e-3);
            CHECK_CLOSE("dv", &got.dv.t, &ref.dv.t, 1e-4, 1e-3);
            CHECK_CLOSE("dstate_in", &got.ds0.t, &ref.ds0.t, 1e-4, 1e-3);
            /* strong gates: the true dg is ~1e-12 and the error is absolute */
            if (in.g.mem && c->glo < 0) CHECK_CLOSE("dg", &got.dg.t, &ref.dg.t, INFINITY, 1e-5);
            else if (in.g.mem) CHECK_CLOSE("dg", &got.dg.t, &ref.dg.t, 1e-3, 1e-2);
        }
        grads_free(&got);
    }
    tu_prefix = "";
    grads_free(&ref);
    tu_free(&wo), tu_free(&ws);
    lin_free(&in);
}

static const bcase k_fd[] = {
    {1, 7, 2, 1, 3, 2, ATTN_GATE_NONE, 1, 0, 0},
    {2, 5, 2, 2, 3, 2, ATTN_GATE_NONE, 0, 0, 0},
    {1, 6, 2, 1, 3, 2, ATTN_GATE_HEAD, 1, 0, 0},
    {2, 6, 2, 1, 2, 3, ATTN_GATE_HEAD_TOKEN, 1, 0, 0},
    {1, 7, 2, 2, 3, 2, ATTN_GATE_KEY, 1, 0, 0},
};

static const bcase k_engine[] = {
    {2, 100, 4, 2, 32, 32, ATTN_GATE_NONE, 1, 0, 0},
    {2, 100, 4, 2, 32, 16, ATTN_GATE_NONE, 0, 0, 0},
    {1, 130, 2, 1, 64, 64, ATTN_GATE_HEAD, 1, 0, 0},
    {2, 63, 3, 1, 60, 48, ATTN_GATE_HEAD_TOKEN, 1, 0, 0},
    {1, 130, 2, 1, 16, 24, ATTN_GATE_KEY, 1, 0, 0},
    {1, 41, 2, 2, 8, 8, ATTN_GATE_KEY, 1, 3, 0},
    {1, 41, 2, 2, 8, 8, ATTN_GATE_HEAD_TOKEN, 1, 1, 0},
    {1, 1, 1, 1, 1, 1, ATTN_GATE_KEY, 1, 0, 0},
    {1, 200, 2, 1, 128, 128, ATTN_GATE_KEY, 1, 0, 0},
    /* strong per-key gates: cumulated logs beyond ±20 in a chunk take the
     * product walk instead of the split GEMM */
    {1, 90, 2, 1, 16, 8, ATTN_GATE_KEY, 1, 0, -40},
    {1, 90, 2, 1, 16, 8, ATTN_GATE_HEAD_TOKEN, 1, 0, -40},
};

/* Bitwise identical gradients for 1 and 2 threads (GQA: dK/dV summed per group). */
static void test_threads(void) {
    tu_case("backward threads: 1 vs 2, bitwise");
    tu_rng r = {tu_seed(SALT, 999)};
    lin_inputs in = lin_make(&r, ATTN_F32, ATTN_GATE_HEAD, 3, 90, 4, 2, 16, 16, -0.3, 0, 1);
    tu_buf wo = tu_alloc(ATTN_F32, 3, 90, 4, 16), ws = tu_alloc(ATTN_F32, 3, 4, 16, 16);
    tu_fill(&wo.t, &r, -1, 1);
    tu_fill(&ws.t, &r, -1, 1);
    attn_linear_params p = attn_linear_params_default();
    p.gate = ATTN_GATE_HEAD;
    grads a = run_backward(g_cpu[0], &p, &in, &wo, &ws, ATTN_F32);
    grads b = run_backward(g_cpu[1], &p, &in, &wo, &ws, ATTN_F32);
    CHECK_OK(a.st);
    CHECK_OK(b.st);
    CHECK(tu_same_bits(&a.dq, &b.dq) && tu_same_bits(&a.dk, &b.dk) && tu_same_bits(&a.dv, &b.dv) &&
              tu_same_bits(&a.dg, &b.dg) && tu_same_bits(&a.ds0, &b.ds0),
          "gradients differ by thread count");
    grads_free(&a), grads_free(&b);
    tu_free(&wo), tu_free(&ws);
    lin_free(&in);
}

/* Varlen (one empty sequence) and per-key gates: engine against reference. */
static void test_varlen(void) {
    tu_case("backward varlen");
    tu_rng r = {tu_seed(SALT, 998)};
    const int32_t cu[4] = {0, 37, 37, 100};
    const int64_t total = 100, H = 4, Hk = 2, D = 12, Dv = 8;
    lin_inputs in = lin_make(&r, ATTN_F32, ATTN_GATE_KEY, 1, total, H, Hk, D, Dv, -0.4, 0, 0);
    in.s0 = tu_alloc(ATTN_F32, 3, H, D, Dv);
    tu_fill(&in.s0.t, &r, -1, 1);
    tu_buf wo = tu_alloc(ATTN_F32, 1, total, H, Dv), ws = tu_alloc(ATTN_F32, 3, H, D, Dv);
    tu_fill(&wo.t, &r, -1, 1);
    tu_fill(&ws.t, &r, -1, 1);
    attn_linear_params p = attn_linear_params_default();
    p.gate = ATTN_GATE_KEY;
    p.batch = 3;
    p.cu_seqlens = cu;
    grads ref = run_backward(g_ref, &p, &in, &wo, &ws, ATTN_F64);
    grads got = run_backward(g_cpu[0], &p, &in, &wo, &ws, ATTN_F32);
    CHECK_OK(ref.st);
    CHECK_OK(got.st);
    if (ref.st == ATTN_OK && got.st == ATTN_OK) {
        CHECK_CLOSE("dq", &got.dq.t, &ref.dq.t, 1e-4, 1e-3);
        CHECK_CLOSE("dk", &got.dk.t, &ref.dk.t, 1e-4, 1e-3);
        CHECK_CLOSE("dv", &got.dv.t, &ref.dv.t, 1e-4, 1e-3);
        CHECK_CLOSE("dg", &got.dg.t, &ref.dg.t, 1e-3, 1e-2);
    }
    grads_free(&ref), grads_free(&got);
    tu_free(&wo), tu_free(&ws);
    lin_free(&in);
}

int main(void) {
    g_ref = tu_ctx("test_linear_backward", ATTN_BACKEND_REF, 1);
    g_cpu[0] = tu_ctx("test_linear_backward", ATTN_BACKEND_CPU, 2);
    g_cpu[1] = tu_ctx("test_linear_backward", ATTN_BACKEND_CPU, 1);
    g_n_isa = tu_other_isa_ctxs(g_isa, 4, 2);
    for (int i = 0; i < (int)(sizeof k_fd / sizeof k_fd[0]); i++) test_fd(i, &k_fd[i]);
    for (int i = 0; i < (int)(sizeof k_engine / sizeof k_engine[0]); i++) test_engine(i, &k_engine[i]);
    test_threads();
    test_varlen();
    attn_ctx_free(g_ref);
    attn_ctx_free(g_cpu[0]);
    attn_ctx_free(g_cpu[1]);
    for (int i = 0; i < g_n_isa; i++) attn_ctx_free(g_isa[i]);
    return tu_finish("test_linear_backward");
}
