/* Linear-time attention (attn_linear_forward, attn_linear_decode): the
 * chunked engine and the recurrent decode on every ISA against the
 * double-precision reference; chunked = recurrent; state passing; varlen;
 * long sequences with gates near 0 and 1; argument errors.
 * Tolerances (f32 outputs; q, k, v, gates exact in f32): rel RMS 2e-5 and
 * max abs 2e-4 * (max|ref| + 1) for T <= 1000 (sums of up to T terms in
 * f32). Long runs (1e5..1e6 tokens, gates near 1): the state is rescaled
 * in f32 once per chunk (chunked) or per token (recurrent), each a rounding
 * of about 3e-8 relative that compounds; measured rel RMS 1.2e-4 chunked
 * and 9e-4 recurrent at 1e6 tokens, so the tolerances there are rel RMS
 * 5e-4 (chunked) and 3e-3 (recurrent), max abs 10x those * (max|ref| + 1).
 * f16/bf16 inputs: the reference sees the same rounded values, so the same
 * tolerances hold; f16/bf16 outputs use test_util.h's by dtype. */
#include "test_linear_util.h"

static attn_ctx *g_ref, *g_cpu[2]; /* 2 threads, 1 thread */
static attn_ctx *g_isa[4];
static int g_n_isa;

#define SALT 0x11EAu
#define RMS_TOL 2e-5
#define MAX_TOL 2e-4

static double rms_tol(attn_dtype odt) { return odt == ATTN_F32 ? RMS_TOL : tu_rms_tol(odt); }
static double max_tol(attn_dtype odt) { return odt == ATTN_F32 ? MAX_TOL : tu_max_tol(odt); }

typedef struct lcase {
    int64_t B, T, H, Hk, D, Dv;
    attn_gate gate;
    int causal, chunk, with_state;
    attn_dtype dt, odt;
    double glo, ghi; /* log gates drawn from [glo, ghi] */
} lcase;

static const lcase k_cases[] = {
    {2, 100, 4, 2, 32, 32, ATTN_GATE_NONE, 1, 0, 0, ATTN_F32, ATTN_F32, 0, 0},
    {2, 100, 4, 2, 32, 32, ATTN_GATE_NONE, 0, 0, 1, ATTN_F32, ATTN_F32, 0, 0},
    {1, 65, 2, 2, 64, 64, ATTN_GATE_HEAD, 1, 0, 1, ATTN_F32, ATTN_F32, -0.3, -0.01},
    {2, 63, 3, 1, 60, 48, ATTN_GATE_HEAD_TOKEN, 1, 0, 1, ATTN_F32, ATTN_F32, -1.0, 0},
    {1, 130, 2, 1, 16, 24, ATTN_GATE_KEY, 1, 0, 1, ATTN_F32, ATTN_F32, -0.5, 0},
    {1, 1, 1, 1, 1, 1, ATTN_GATE_KEY, 1, 0, 1, ATTN_F32, ATTN_F32, -0.5, 0},
    {1, 77, 2, 2, 1, 7, ATTN_GATE_HEAD_TOKEN, 1, 0, 0, ATTN_F32, ATTN_F32, -2.0, 0},
    /* forced chunk sizes: 1, 3, the whole sequence, beyond it */
    {1, 50, 2, 1, 8, 8, ATTN_GATE_KEY, 1, 1, 1, ATTN_F32, ATTN_F32, -0.5, 0},
    {1, 50, 2, 1, 8, 8, ATTN_GATE_HEAD_TOKEN, 1, 3, 1, ATTN_F32, ATTN_F32, -0.5, 0},
    {1, 50, 2, 1, 8, 8, ATTN_GATE_HEAD, 1, 50, 1, ATTN_F32, ATTN_F32, -0.1, 0},
    {1, 50, 2, 2, 8, 8, ATTN_GATE_NONE, 0, 1024, 1, ATTN_F32, ATTN_F32, 0, 0},
    /* wide dims, low precision in and out */
    {1, 200, 2, 1, 128, 128, ATTN_GATE_HEAD_TOKEN, 1, 0, 0, ATTN_F16, ATTN_F32, -0.2, 0},
    {1, 200, 2, 2, 128, 64, ATTN_GATE_KEY, 1, 0, 1, ATTN_BF16, ATTN_BF16, -0.2, 0},
    {2, 96, 4, 4, 64, 64, ATTN_GATE_NONE, 1, 0, 1, ATTN_F32, ATTN_F16, 0, 0},
    /* gates near 0 (g <= -30) and exactly 0 (g = -inf is tested below) */
    {1, 300, 2, 1, 16, 16, ATTN_GATE_KEY, 1, 0, 1, ATTN_F32, ATTN_F32, -60, -30},
    {1, 300, 2, 1, 16, 16, ATTN_GATE_HEAD_TOKEN, 1, 0, 1, ATTN_F32, ATTN_F32, -60, -30},
};

static void run_case(int idx, const lcase *c) {
    uint64_t seed = tu_seed(SALT, (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("linear #%d B=%lld T=%lld H=%lld Hk=%lld D=%lld Dv=%lld gate=%d causal=%d chunk=%d "
            "state=%d dt=%s o=%s seed=%llx",
            idx, (long long)c->B, (long long)c->T, (long long)c->H, (long long)c->Hk,
            (long long)c->D, (long long)c->Dv, (int)c->gate, c->causal, c->chunk,
            c->with_state, attn_dtype_name(c->dt), attn_dtype_name(c->odt),
            (unsigned long long)seed);
    lin_inputs in = lin_make(&r, c->dt, c->gate, c->B, c->T, c->H, c->Hk, c->D, c->Dv, c->glo,
                             c->ghi, c->with_state);
    attn_linear_params p = attn_linear_params_default();
    p.gate = c->gate;
    p.causal = c->causal;
    p.chunk = c->chunk;
    lin_out ref = lin_forward(g_ref, &p, &in, ATTN_F64, ATTN_F64);
    CHECK_OK(ref.st);
    attn_ctx *cpus[5] = {g_cpu[idx % 2]};
    for (int i = 0; i < g_n_isa; i++) cpus[1 + i] = g_isa[i];
    for (int i = 0; i < 1 + g_n_isa && ref.st == ATTN_OK; i++) {
        tu_prefix = i ? attn_isa_name(attn_ctx_isa(cpus[i])) : "";
        lin_out got = lin_forward(cpus[i], &p, &in, c->odt, ATTN_F32);
        CHECK_OK(got.st);
        if (got.st == ATTN_OK) {
            CHECK_CLOSE("chunked o", &got.o.t, &ref.o.t, rms_tol(c->odt), max_tol(c->odt));
            CHECK_CLOSE("chunked state_out", &got.s.t, &ref.s.t, RMS_TOL, MAX_TOL);
        }
        lin_out_free(&got);
        if (!c->causal) continue;
        lin_out dec = lin_decode(cpus[i], &p, &in, c->odt, ATTN_F32);
        CHECK_OK(dec.st);
        if (dec.st == ATTN_OK) {
            CHECK_CLOSE("recurrent o", &dec.o.t, &ref.o.t, rms_tol(c->odt), max_tol(c->odt));
            CHECK_CLOSE("recurrent state", &dec.s.t, &ref.s.t, RMS_TOL, MAX_TOL);
        }
        lin_out_free(&dec);
    }
    tu_prefix = "";
    if (c->causal) { /* the reference's decode is its forward with state in = out */
        lin_out rd = lin_decode(g_ref, &p, &in, ATTN_F64, ATTN_F64);
        CHECK_OK(rd.st);
        if (rd.st == ATTN_OK) CHECK_CLOSE("ref decode o", &rd.o.t, &ref.o.t, 1e-12, 1e-12);
        lin_out_free(&rd);
    }
    lin_out_free(&ref);
    lin_free(&in);
}

/* Bitwise identical outputs for 1 and 2 threads. */
static void test_threads(void) {
    tu_case("threads: 1 vs 2, bitwise");
    tu_rng r = {tu_seed(SALT, 1000)};
    lin_inputs in = lin_make(&r, ATTN_F32, ATTN_GATE_KEY, 2, 150, 3, 1, 32, 32, -0.3, 0, 1);
    attn_linear_params p = attn_linear_params_default();
    p.gate = ATTN_GATE_KEY;
    lin_out a = lin_forward(g_cpu[0], &p, &in, ATTN_F32, ATTN_F32);
    lin_out b = lin_forward(g_cpu[1], &p, &in, ATTN_F32, ATTN_F32);
    CHECK_OK(a.st);
    CHECK_OK(b.st);
    CHECK(tu_same_bits(&a.o, &b.o) && tu_same_bits(&a.s, &b.s), "outputs differ by thread count");
    lin_out_free(&a);
    lin_out_free(&b);
    lin_free(&in);
}

/* [b, t0 .. t0 + n) of a [B, T, ...] tensor as a [1, n, ...] view. */
static attn_tensor slice(const attn_tensor *t, int64_t b, int64_t t0, int64_t n) {
    attn_tensor v = *t;
    v.data = (char *)t->data + (size_t)(b * t->stride[0] + t0 * t->stride[1]) * attn_dtype_size(t->dtype);
    v.shape[0] = 1;
    v.shape[1] = n;
    return v;
}

/* Running the first half, then the second from its state, equals one run. */
static void test_state_passing(void) {
    tu_case("state passing: two halves = one run");
    tu_rng r = {tu_seed(SALT, 1001)};
    const int64_t T = 157, H = 2, D = 16, Dv = 8, cut = 70;
    lin_inputs in = lin_make(&r, ATTN_F32, ATTN_GATE_HEAD_TOKEN, 1, T, H, H, D, Dv, -0.3, 0, 1);
    attn_linear_params p = attn_linear_params_default();
    p.gate = ATTN_GATE_HEAD_TOKEN;
    lin_out whole = lin_forward(g_cpu[0], &p, &in, ATTN_F32, ATTN_F32);
    CHECK_OK(whole.st);
    tu_buf o = tu_alloc(ATTN_F32, 1, T, H, Dv), s1 = tu_alloc(ATTN_F32, 1, H, D, Dv),
           s2 = tu_alloc(ATTN_F32, 1, H, D, Dv);
    const int64_t n[2] = {cut, T - cut}, t0[2] = {0, cut};
    for (int part = 0; part < 2; part++) {
        attn_tensor q = slice(&in.q.t, 0, t0[part], n[part]), k = slice(&in.k.t, 0, t0[part], n[part]),
                    v = slice(&in.v.t, 0, t0[part], n[part]), g = slice(&in.g.t, 0, t0[part], n[part]),
                    ov = slice(&o.t, 0, t0[part], n[part]);
        CHECK_OK(attn_linear_forward(g_cpu[0], &p, &q, &k, &v, &g, part ? &s1.t : &in.s0.t, &ov,
                                     part ? &s2.t : &s1.t));
    }
    CHECK_CLOSE("o", &o.t, &whole.o.t, RMS_TOL, MAX_TOL);
    CHECK_CLOSE("state", &s2.t, &whole.s.t, RMS_TOL, MAX_TOL);
    tu_free(&o), tu_free(&s1), tu_free(&s2);
    lin_out_free(&whole);
    lin_free(&in);
}

/* Varlen: packed sequences (one empty) against each sequence run alone. */
static void test_varlen(void) {
    tu_case("varlen: cu_seqlens = separate runs");
    tu_rng r = {tu_seed(SALT, 1002)};
    const int32_t cu[5] = {0, 37, 37, 140, 141};
    const int64_t total = 141, H = 4, Hk = 2, D = 24, Dv = 16;
    lin_inputs in = lin_make(&r, ATTN_F32, ATTN_GATE_KEY, 1, total, H, Hk, D, Dv, -0.4, 0, 0);
    in.s0 = tu_alloc(ATTN_F32, 4, H, D, Dv);
    tu_fill(&in.s0.t, &r, -1, 1);
    attn_linear_params p = attn_linear_params_default();
    p.gate = ATTN_GATE_KEY;
    p.batch = 4;
    p.cu_seqlens = cu;
    lin_out ref = lin_forward(g_ref, &p, &in, ATTN_F64, ATTN_F64);
    lin_out got = lin_forward(g_cpu[0], &p, &in, ATTN_F32, ATTN_F32);
    CHECK_OK(ref.st);
    CHECK_OK(got.st);
    if (ref.st == ATTN_OK && got.st == ATTN_OK) {
        CHECK_CLOSE("o", &got.o.t, &ref.o.t, RMS_TOL, MAX_TOL);
        CHECK_CLOSE("state_out", &got.s.t, &ref.s.t, RMS_TOL, MAX_TOL);
    }
    /* sequence 2 alone, dense */
    attn_linear_params pd = attn_linear_params_default();
    pd.gate = ATTN_GATE_KEY;
    attn_tensor q = slice(&in.q.t, 0, 37, 103), k = slice(&in.k.t, 0, 37, 103),
                v = slice(&in.v.t, 0, 37, 103), g = slice(&in.g.t, 0, 37, 103),
                s0 = slice(&in.s0.t, 2, 0, H);
    tu_buf o = tu_alloc(ATTN_F32, 1, 103, H, Dv), s = tu_alloc(ATTN_F32, 1, H, D, Dv);
    CHECK_OK(attn_linear_forward(g_cpu[0], &pd, &q, &k, &v, &g, &s0, &o.t, &s.t));
    attn_tensor go = slice(&got.o.t, 0, 37, 103), gs = slice(&got.s.t, 2, 0, H);
    CHECK_CLOSE("seq 2 o", &o.t, &go, 1e-6, 1e-6);
    CHECK_CLOSE("seq 2 state", &s.t, &gs, 1e-6, 1e-6);
    /* the empty sequence passes its state through */
    attn_tensor s1in = slice(&in.s0.t, 1, 0, H), s1out = slice(&got.s.t, 1, 0, H);
    CHECK_CLOSE("empty seq state", &s1out, &s1in, 0, 0);
    tu_free(&o), tu_free(&s);
    lin_out_free(&ref);
    lin_out_free(&got);
    lin_free(&in);
}

/* Long runs: gates near 1 (g = -1e-7 .. 0) with bursts near 0 (g = -80)
 * and exact zeros (g = -inf); nothing may turn NaN or Inf, and chunked,
 * recurrent and reference agree. */
static void test_long(attn_gate gate, int64_t T) {
    tu_case("long run gate=%d T=%lld", (int)gate, (long long)T);
    tu_rng r = {tu_seed(SALT, 2000 + (uint64_t)gate)};
    const int64_t H = 1, D = 4, Dv = 4;
    lin_inputs in = lin_make(&r, ATTN_F32, gate, 1, T, H, H, D, Dv, -1e-7, 0, 1);
    int64_t ng = tu_numel(&in.g.t);
    for (int64_t i = 0; i < ng; i++) {
        int64_t t = i / (gate == ATTN_GATE_KEY ? D : 1);
        if (t % 100003 == 5000) tu_store(&in.g.t, tu_offset(&in.g.t, i), -80.0);
        if (t % 250007 == 7) tu_store(&in.g.t, tu_offset(&in.g.t, i), -INFINITY);
    }
    attn_linear_params p = attn_linear_params_default();
    p.gate = gate;
    lin_out ref = lin_forward(g_ref, &p, &in, ATTN_F64, ATTN_F64);
    lin_out got = lin_forward(g_cpu[0], &p, &in, ATTN_F32, ATTN_F32);
    lin_out dec = lin_decode(g_cpu[0], &p, &in, ATTN_F32, ATTN_F32);
    CHECK_OK(ref.st);
    CHECK_OK(got.st);
    CHECK_OK(dec.st);
    if (ref.st == ATTN_OK && got.st == ATTN_OK && dec.st == ATTN_OK) {
        CHECK_CLOSE("chunked o", &got.o.t, &ref.o.t, 5e-4, 5e-3);
        CHECK_CLOSE("chunked state", &got.s.t, &ref.s.t, 5e-4, 5e-3);
        CHECK_CLOSE("recurrent o", &dec.o.t, &ref.o.t, 3e-3, 3e-2);
        CHECK_CLOSE("recurrent state", &dec.s.t, &ref.s.t, 3e-3, 3e-2);
    }
    lin_out_free(&ref), lin_out_free(&got), lin_out_free(&dec);
    lin_free(&in);
}

/* Bad arguments: a status and a sentence naming the argument. */
static void test_errors(void) {
    tu_case("argument errors");
    tu_rng r = {tu_seed(SALT, 3000)};
    lin_inputs in = lin_make(&r, ATTN_F32, ATTN_GATE_HEAD_TOKEN, 1, 10, 2, 1, 8, 8, -1, 0, 0);
    tu_buf o = tu_alloc(ATTN_F32, 1, 10, 2, 8), bad_s = tu_alloc(ATTN_F32, 1, 2, 8, 9);
    attn_linear_params p = attn_linear_params_default();
    p.gate = ATTN_GATE_HEAD_TOKEN;
    attn_status st = attn_linear_forward(g_cpu[0], &p, &in.q.t, &in.k.t, &in.v.t, NULL, NULL,
                                         &o.t, NULL);
    CHECK(st == ATTN_ERR_NULL && strstr(attn_last_error(), "g "), "missing g: %s",
          attn_last_error());
    p.causal = 0;
    st = attn_linear_forward(g_cpu[0], &p, &in.q.t, &in.k.t, &in.v.t, &in.g.t, NULL, &o.t, NULL);
    CHECK(st == ATTN_ERR_UNSUPPORTED, "non-causal with a gate: %s", attn_last_error());
    p.causal = 1;
    p.chunk = 2000;
    st = attn_linear_forward(g_cpu[0], &p, &in.q.t, &in.k.t, &in.v.t, &in.g.t, NULL, &o.t, NULL);
    CHECK(st == ATTN_ERR_ARG && strstr(attn_last_error(), "chunk"), "chunk: %s", attn_last_error());
    p.chunk = 0;
    st = attn_linear_forward(g_cpu[0], &p, &in.q.t, &in.k.t, &in.v.t, &in.g.t, NULL, &o.t,
                             &bad_s.t);
    CHECK(st == ATTN_ERR_SHAPE && strstr(attn_last_error(), "state_out"), "state shape: %s",
          attn_last_error());
    st = attn_linear_forward(g_cpu[0], &p, &in.q.t, &in.k.t, &in.v.t, &in.g.t, NULL, &in.q.t,
                             NULL);
    CHECK(st == ATTN_ERR_ALIAS || st == ATTN_ERR_SHAPE, "o aliasing q: %s", attn_last_error());
    p.gate = ATTN_GATE_NONE;
    st = attn_linear_forward(g_cpu[0], &p, &in.q.t, &in.k.t, &in.v.t, &in.g.t, NULL, &o.t, NULL);
    CHECK(st == ATTN_ERR_ARG, "g given without a gate: %s", attn_last_error());
    st = attn_linear_decode(g_cpu[0], &p, &in.q.t, &in.k.t, &in.v.t, NULL, NULL, &o.t);
    CHECK(st == ATTN_ERR_NULL && strstr(attn_last_error(), "state"), "decode state: %s",
          attn_last_error());
    tu_free(&o), tu_free(&bad_s);
    lin_free(&in);
}

int main(void) {
    g_ref = tu_ctx("test_linear", ATTN_BACKEND_REF, 1);
    g_cpu[0] = tu_ctx("test_linear", ATTN_BACKEND_CPU, 2);
    g_cpu[1] = tu_ctx("test_linear", ATTN_BACKEND_CPU, 1);
    g_n_isa = tu_other_isa_ctxs(g_isa, 4, 2);
    for (int i = 0; i < (int)(sizeof k_cases / sizeof k_cases[0]); i++) run_case(i, &k_cases[i]);
    test_threads();
    test_state_passing();
    test_varlen();
    test_long(ATTN_GATE_HEAD_TOKEN, 1000000);
    test_long(ATTN_GATE_KEY, 100000);
    test_errors();
    attn_ctx_free(g_ref);
    attn_ctx_free(g_cpu[0]);
    attn_ctx_free(g_cpu[1]);
    for (int i = 0; i < g_n_isa; i++) attn_ctx_free(g_isa[i]);
    return tu_finish("test_linear");
}
