/* Native Sparse Attention (src/mech/nsa.c):
 *   compression equals block means, and its backward is its adjoint;
 *   the selection finds planted blocks;
 *   each branch alone equals the attention it stands for (window: the
 *   implicit window; selected: attn_forward with the plan), bitwise on the CPU;
 *   the forward and backward on the CPU match the reference composition
 *   (f32 tolerances of test_util.h);
 *   the reference backward matches central finite differences of the
 *   reference forward (f64, eps 1e-6, tolerance 1e-6 relative). */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "test_util.h"

#define SALT 0x45a9u

typedef struct shape {
    int64_t N, M, H, Hk, D, Dv;
} shape;

typedef struct inputs {
    tu_buf q, k, v, kc, vc, gates;
} inputs;

static int64_t mc_of(const attn_nsa_opts *o, int64_t m) { return (m - o->cmp_block) / o->cmp_stride + 1; }

static inputs make_inputs(attn_ctx *ctx, const shape *s, const attn_nsa_opts *o, attn_dtype dt,
                          uint64_t seed) {
    tu_rng rng = {seed};
    inputs in;
    in.q = tu_alloc(dt, 1, s->N, s->H, s->D);
    in.k = tu_alloc(dt, 1, s->M, s->Hk, s->D);
    in.v = tu_alloc(dt, 1, s->M, s->Hk, s->Dv);
    in.kc = tu_alloc(dt, 1, mc_of(o, s->M), s->Hk, s->D);
    in.vc = tu_alloc(dt, 1, mc_of(o, s->M), s->Hk, s->Dv);
    in.gates = tu_alloc(dt, 1, s->N, s->H, 3);
    tu_fill(&in.q.t, &rng, -1, 1), tu_fill(&in.k.t, &rng, -1, 1), tu_fill(&in.v.t, &rng, -1, 1);
    tu_fill(&in.gates.t, &rng, 0, 1);
    CHECK_OK(attn_nsa_compress(ctx, o, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t));
    return in;
}

static void free_inputs(inputs *in) {
    tu_free(&in->q), tu_free(&in->k), tu_free(&in->v);
    tu_free(&in->kc), tu_free(&in->vc), tu_free(&in->gates);
}

static void convert(inputs *dst, const inputs *src) {
    tu_copy(&dst->q.t, &src->q.t), tu_copy(&dst->k.t, &src->k.t), tu_copy(&dst->v.t, &src->v.t);
    tu_copy(&dst->kc.t, &src->kc.t), tu_copy(&dst->vc.t, &src->vc.t);
    tu_copy(&dst->gates.t, &src->gates.t);
}

static void test_compress(attn_ctx *ref) {
    attn_nsa_opts o = {8, 4, 16, 2, 8, 16};
    shape s = {40, 37, 2, 2, 5, 3};
    inputs in = make_inputs(ref, &s, &o, ATTN_F64, tu_seed(SALT, 1));
    tu_case("compress: block means");
    double worst = 0.0;
    for (int64_t t = 0; t < in.kc.t.shape[1]; t++)
        for (int64_t h = 0; h < s.Hk; h++)
            for (int64_t e = 0; e < s.D; e++) {
                double m = 0.0;
                for (int64_t j = t * 4; j < t * 4 + 8; j++) m += tu_load(&in.k.t, tu_off4(&in.k.t, 0, j, h, e));
                worst = fmax(worst, fabs(m / 8 - tu_load(&in.kc.t, tu_off4(&in.kc.t, 0, t, h, e))));
            }
    CHECK(worst < 1e-14, "kc differs from the block means by %g", worst);
    tu_case("compress_backward is the adjoint of compress");
    tu_rng rng = {tu_seed(SALT, 2)};
    tu_buf gkc = tu_alloc(ATTN_F64, 1, in.kc.t.shape[1], s.Hk, s.D);
    tu_buf gvc = tu_alloc(ATTN_F64, 1, in.vc.t.shape[1], s.Hk, s.Dv);
    tu_buf gk = tu_alloc(ATTN_F64, 1, s.M, s.Hk, s.D), gv = tu_alloc(ATTN_F64, 1, s.M, s.Hk, s.Dv);
    tu_fill(&gkc.t, &rng, -1, 1), tu_fill(&gvc.t, &rng, -1, 1);
    CHECK_OK(attn_nsa_compress_backward(ref, &o, &gkc.t, &gvc.t, &gk.t, &gv.t));
    double lhs = 0.0, rhs = 0.0;
    for (int64_t x = 0; x < tu_numel(&gkc.t); x++) lhs += tu_load(&gkc.t, x) * tu_load(&in.kc.t, x);
    for (int64_t x = 0; x < tu_numel(&gk.t); x++) rhs += tu_load(&gk.t, x) * tu_load(&in.k.t, x);
    CHECK(fabs(lhs - rhs) < 1e-12 * (fabs(lhs) + 1), "<dkc, C k> = %.17g, <C^T dkc, k> = %.17g", lhs, rhs);
    tu_case("compress: bad input");
    attn_nsa_opts bad = o;
    bad.cmp_stride = 9;
    CHECK(attn_nsa_compress(ref, &bad, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t) == ATTN_ERR_ARG &&
              strstr(attn_last_error(), "cmp_stride"),
          "stride > block: %s", attn_last_error());
    tu_free(&gkc), tu_free(&gvc), tu_free(&gk), tu_free(&gv);
    free_inputs(&in);
}

/* The CPU compression and its adjoint against the reference: f32 and bf16
 * (converted in registers), batch 2, odd sizes, dk accumulated onto. */
static void test_compress_cpu(attn_ctx *cpu, attn_ctx *ref) {
    attn_nsa_opts o = {7, 3, 16, 2, 8, 16};
    const int64_t B = 2, M = 53, Hk = 3, D = 19, mc = mc_of(&o, M);
    for (int w = 0; w < 2; w++) {
        const attn_dtype dt = w ? ATTN_BF16 : ATTN_F32;
        tu_case("compress and its backward on the CPU = the reference (%s)", w ? "bf16" : "f32");
        tu_rng rng = {tu_seed(SALT, 20 + w)};
        tu_buf k = tu_alloc(dt, B, M, Hk, D), kc = tu_alloc(dt, B, mc, Hk, D);
        tu_buf k64 = tu_alloc(ATTN_F64, B, M, Hk, D), kc64 = tu_alloc(ATTN_F64, B, mc, Hk, D);
        tu_buf g = tu_alloc(dt, B, mc, Hk, D), dk = tu_alloc(dt, B, M, Hk, D);
        tu_buf g64 = tu_alloc(ATTN_F64, B, mc, Hk, D), dk64 = tu_alloc(ATTN_F64, B, M, Hk, D);
        tu_fill(&k.t, &rng, -1, 1), tu_fill(&g.t, &rng, -1, 1), tu_fill(&dk.t, &rng, -1, 1);
        tu_copy(&k64.t, &k.t), tu_copy(&g64.t, &g.t), tu_copy(&dk64.t, &dk.t);
        CHECK_OK(attn_nsa_compress(cpu, &o, &k.t, &k.t, &kc.t, &kc.t));
        CHECK_OK(attn_nsa_compress(ref, &o, &k64.t, &k64.t, &kc64.t, &kc64.t));
        CHECK_CLOSE("kc", &kc.t, &kc64.t, tu_rms_tol(dt), tu_max_tol(dt));
        CHECK_OK(attn_nsa_compress_backward(cpu, &o, &g.t, &g.t, &dk.t, &dk.t));
        /* the reference: both calls add into dk64, as the CPU's added twice into dk */
        CHECK_OK(attn_nsa_compress_backward(ref, &o, &g64.t, &g64.t, &dk64.t, &dk64.t));
        CHECK_CLOSE("dk", &dk.t, &dk64.t, tu_rms_tol(dt), tu_max_tol(dt));
        tu_free(&k), tu_free(&kc), tu_free(&k64), tu_free(&kc64);
        tu_free(&g), tu_free(&dk), tu_free(&g64), tu_free(&dk64);
    }
}

/* The selection plan of the inputs (a planner runs the CPU engine on f32: f64
 * inputs are rounded for it, and both backends then run the same plan). */
static attn_plan *select_plan_with(attn_ctx *cpu, const attn_params *pp,
                                   const attn_nsa_opts *o, const inputs *in, int64_t m) {
    attn_params p = *pp;
    attn_plan *sel = NULL;
    tu_buf q = tu_alloc(ATTN_F32, 1, in->q.t.shape[1], in->q.t.shape[2], in->q.t.shape[3]);
    tu_buf kc = tu_alloc(ATTN_F32, 1, in->kc.t.shape[1], in->kc.t.shape[2], in->kc.t.shape[3]);
    tu_copy(&q.t, &in->q.t), tu_copy(&kc.t, &in->kc.t);
    attn_status st = attn_nsa_select(cpu, &p, o, &q.t, &kc.t, m, &sel);
    CHECK(st == ATTN_OK, "nsa_select: %s", attn_last_error());
    tu_free(&q), tu_free(&kc);
    return sel;
}

static attn_plan *select_plan(attn_ctx *cpu, const attn_nsa_opts *o, const inputs *in, int64_t m) {
    attn_params p = attn_params_default();
    return select_plan_with(cpu, &p, o, in, m);
}

/* Whether two selection plans pick the same blocks: the selected branch
 * they drive (causal attention with the plan) agrees bit for bit. */
static bool same_selection(attn_ctx *cpu, const attn_plan *a, const attn_plan *b,
                           const inputs *in) {
    if (!a || !b) return false;
    attn_params p = attn_params_default();
    p.causal = 1, p.plan = a;
    tu_fwd_out x = tu_run_forward(cpu, &p, &in->q.t, &in->k.t, &in->v.t, ATTN_F32, ATTN_F32, 0);
    p.plan = b;
    tu_fwd_out y = tu_run_forward(cpu, &p, &in->q.t, &in->k.t, &in->v.t, ATTN_F32, ATTN_F32, 0);
    bool same = tu_same_bits(&x.o, &y.o);
    tu_fwd_free(&x), tu_fwd_free(&y);
    return same;
}

/* Gates that switch one branch on. */
static void one_branch(tu_buf *gates, int br) {
    for (int64_t x = 0; x < tu_numel(&gates->t); x++) tu_store(&gates->t, x, x % 3 == br ? 1.0 : 0.0);
}

static void test_branches_and_forward(attn_ctx *cpu, attn_ctx *ref) {
    attn_nsa_opts o = {16, 8, 32, 3, 16, 48};
    shape s = {200, 200, 4, 2, 32, 16};
    inputs in = make_inputs(cpu, &s, &o, ATTN_F32, tu_seed(SALT, 3));
    attn_plan *sel = select_plan(cpu, &o, &in, s.M);
    attn_params p = attn_params_default();
    tu_buf o1 = tu_alloc(ATTN_F32, 1, s.N, s.H, s.Dv);

    tu_case("window branch alone = the implicit causal window");
    one_branch(&in.gates, 2);
    CHECK_OK(attn_nsa_forward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t, sel,
                              &in.gates.t, &o1.t, NULL, NULL));
    attn_params pw = attn_params_default();
    pw.causal = 1, pw.window_left = o.window - 1, pw.window_right = 0;
    tu_fwd_out w = tu_run_forward(cpu, &pw, &in.q.t, &in.k.t, &in.v.t, ATTN_F32, ATTN_F32, 0);
    CHECK(tu_same_bits(&o1, &w.o), "window branch differs from attn_forward with the window");
    tu_fwd_free(&w);

    tu_case("selected branch alone = attn_forward with the selection plan");
    one_branch(&in.gates, 1);
    CHECK_OK(attn_nsa_forward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t, sel,
                              &in.gates.t, &o1.t, NULL, NULL));
    attn_params ps = attn_params_default();
    ps.causal = 1, ps.plan = sel;
    w = tu_run_forward(cpu, &ps, &in.q.t, &in.k.t, &in.v.t, ATTN_F32, ATTN_F32, 0);
    CHECK(tu_same_bits(&o1, &w.o), "selected branch differs from attn_forward with the plan");
    tu_fwd_free(&w);

    tu_case("compressed branch alone = naive attention to the completed spans");
    one_branch(&in.gates, 0);
    CHECK_OK(attn_nsa_forward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t, sel,
                              &in.gates.t, &o1.t, NULL, NULL));
    {
        tu_buf naive = tu_alloc(ATTN_F64, 1, s.N, s.H, s.Dv);
        const int64_t mc = mc_of(&o, s.M), g = s.H / s.Hk;
        double *sc = calloc((size_t)mc, sizeof(double));
        for (int64_t i = 0; i < s.N; i++)
            for (int64_t h = 0; h < s.H; h++) {
                int64_t pos = i + (s.M - s.N), nt = 0;
                double mx = -INFINITY, sum = 0.0;
                for (int64_t t = 0; t < mc && t * o.cmp_stride + o.cmp_block - 1 <= pos; t++, nt++) {
                    double dot = 0.0;
                    for (int64_t e = 0; e < s.D; e++)
                        dot += tu_load(&in.q.t, tu_off4(&in.q.t, 0, i, h, e)) *
                               tu_load(&in.kc.t, tu_off4(&in.kc.t, 0, t, h / g, e));
                    sc[t] = dot / sqrt((double)s.D);
                    mx = fmax(mx, sc[t]);
                }
                for (int64_t t = 0; t < nt; t++) sum += exp(sc[t] - mx);
                for (int64_t e = 0; e < s.Dv; e++) {
                    double acc = 0.0;
                    for (int64_t t = 0; t < nt; t++)
                        acc += exp(sc[t] - mx) / sum * tu_load(&in.vc.t, tu_off4(&in.vc.t, 0, t, h / g, e));
                    tu_store(&naive.t, tu_off4(&naive.t, 0, i, h, e), nt ? acc : 0.0);
                }
            }
        CHECK_CLOSE("o_cmp", &o1.t, &naive.t, 1e-5, 1e-4);
        free(sc);
        tu_free(&naive);
    }

    tu_case("NSA forward: CPU vs reference composition");
    tu_rng rng = {tu_seed(SALT, 4)};
    tu_fill(&in.gates.t, &rng, 0, 1);
    inputs in64 = make_inputs(ref, &s, &o, ATTN_F64, tu_seed(SALT, 3));
    convert(&in64, &in);
    tu_buf o64 = tu_alloc(ATTN_F64, 1, s.N, s.H, s.Dv);
    CHECK_OK(attn_nsa_forward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t, sel,
                              &in.gates.t, &o1.t, NULL, NULL));
    CHECK_OK(attn_nsa_forward(ref, &p, &o, &in64.q.t, &in64.k.t, &in64.v.t, &in64.kc.t, &in64.vc.t,
                              sel, &in64.gates.t, &o64.t, NULL, NULL));
    CHECK_CLOSE("o", &o1.t, &o64.t, 1e-5, 1e-4);

    tu_case("NSA backward: CPU vs reference composition");
    tu_buf so = tu_alloc(ATTN_F32, 3, s.N, s.H, s.Dv), sl = tu_alloc(ATTN_F32, 3, s.H, s.N, -1);
    tu_buf so64 = tu_alloc(ATTN_F64, 3, s.N, s.H, s.Dv), sl64 = tu_alloc(ATTN_F64, 3, s.H, s.N, -1);
    CHECK_OK(attn_nsa_forward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t, sel,
                              &in.gates.t, &o1.t, &so.t, &sl.t));
    CHECK_OK(attn_nsa_forward(ref, &p, &o, &in64.q.t, &in64.k.t, &in64.v.t, &in64.kc.t, &in64.vc.t,
                              sel, &in64.gates.t, &o64.t, &so64.t, &sl64.t));
    tu_buf dout = tu_alloc(ATTN_F32, 1, s.N, s.H, s.Dv), dout64 = tu_alloc(ATTN_F64, 1, s.N, s.H, s.Dv);
    tu_fill(&dout.t, &rng, -1, 1);
    tu_copy(&dout64.t, &dout.t);
    const int64_t mc = mc_of(&o, s.M);
    const int64_t shp[6][4] = {{1, s.N, s.H, s.D}, {1, s.M, s.Hk, s.D}, {1, s.M, s.Hk, s.Dv},
                               {1, mc, s.Hk, s.D},  {1, mc, s.Hk, s.Dv}, {1, s.N, s.H, 3}};
    static const char *const names[6] = {"dq", "dk", "dv", "dkc", "dvc", "dgates"};
    tu_buf g[6], g64[6];
    for (int x = 0; x < 6; x++) {
        g[x] = tu_alloc(ATTN_F32, shp[x][0], shp[x][1], shp[x][2], shp[x][3]);
        g64[x] = tu_alloc(ATTN_F64, shp[x][0], shp[x][1], shp[x][2], shp[x][3]);
    }
    for (int x = 0; x < 6; x++) /* old contents must not leak into the sums */
        for (int64_t y = 0; y < tu_numel(&g[x].t); y++) tu_store(&g[x].t, y, NAN);
    CHECK_OK(attn_nsa_backward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t, sel,
                               &in.gates.t, &so.t, &sl.t, &dout.t, &g[0].t, &g[1].t, &g[2].t,
                               &g[3].t, &g[4].t, &g[5].t));
    CHECK_OK(attn_nsa_backward(ref, &p, &o, &in64.q.t, &in64.k.t, &in64.v.t, &in64.kc.t,
                               &in64.vc.t, sel, &in64.gates.t, &so64.t, &sl64.t, &dout64.t,
                               &g64[0].t, &g64[1].t, &g64[2].t, &g64[3].t, &g64[4].t, &g64[5].t));
    for (int x = 0; x < 6; x++) CHECK_CLOSE(names[x], &g[x].t, &g64[x].t, 1e-5, 1e-4);

    /* f32 gradients are summed in place branch by branch; bf16 ones in f32
     * buffers (rounded once): both against the reference */
    tu_case("NSA backward: bf16 gradients, CPU vs reference composition");
    {
        tu_buf h16[6];
        for (int x = 0; x < 6; x++) {
            h16[x] = tu_alloc(x == 5 ? ATTN_F32 : ATTN_BF16, shp[x][0], shp[x][1], shp[x][2], shp[x][3]);
            for (int64_t y = 0; y < tu_numel(&h16[x].t); y++) tu_store(&h16[x].t, y, NAN);
        }
        CHECK_OK(attn_nsa_backward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t,
                                   sel, &in.gates.t, &so.t, &sl.t, &dout.t, &h16[0].t, &h16[1].t,
                                   &h16[2].t, &h16[3].t, &h16[4].t, &h16[5].t));
        for (int x = 0; x < 6; x++) {
            attn_dtype dt = x == 5 ? ATTN_F32 : ATTN_BF16;
            CHECK_CLOSE(names[x], &h16[x].t, &g64[x].t, x == 5 ? 1e-5 : tu_rms_tol(dt),
                        x == 5 ? 1e-4 : tu_max_tol(dt));
            tu_free(&h16[x]);
        }
    }

    tu_case("NSA: bad input");
    attn_nsa_opts bad = o;
    bad.query_block = 8; /* not the plan's */
    CHECK(attn_nsa_forward(cpu, &p, &bad, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t, sel,
                           &in.gates.t, &o1.t, NULL, NULL) == ATTN_ERR_ARG &&
              strstr(attn_last_error(), "sel"),
          "plan of another call: %s", attn_last_error());
    CHECK(attn_nsa_forward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t, sel,
                           &in.gates.t, &in.q.t, NULL, NULL) != ATTN_OK,
          "o aliasing q must fail");

    for (int x = 0; x < 6; x++) tu_free(&g[x]), tu_free(&g64[x]);
    tu_free(&dout), tu_free(&dout64), tu_free(&so), tu_free(&sl), tu_free(&so64), tu_free(&sl64);
    tu_free(&o64), tu_free(&o1);
    free_inputs(&in64);
    attn_plan_free(sel);
    free_inputs(&in);
}

/* attn_nsa_attention = attn_nsa_select then attn_nsa_forward: the same plan
 * (entry for entry), the same output and saved branches (f32 tolerance: the
 * selection's LSE comes from the branch with the real values), on the CPU
 * and on the reference; saved tensors strided (the LSE copied out). */
static void test_fused(attn_ctx *cpu, attn_ctx *ref) {
    attn_nsa_opts o = {16, 8, 32, 3, 16, 48};
    shape s = {203, 203, 4, 2, 32, 16};
    inputs in = make_inputs(cpu, &s, &o, ATTN_F32, tu_seed(SALT, 9));
    tu_rng rng = {tu_seed(SALT, 10)};
    tu_fill(&in.gates.t, &rng, 0, 1);
    attn_params p = attn_params_default();
    for (int backend = 0; backend < 2; backend++) {
        attn_ctx *ctx = backend ? ref : cpu;
        const attn_dtype dt = backend ? ATTN_F64 : ATTN_F32;
        inputs use = make_inputs(ctx, &s, &o, dt, tu_seed(SALT, 9));
        convert(&use, &in);
        tu_case("attn_nsa_attention = select + forward (%s)", backend ? "reference" : "cpu");
        attn_plan *sel = select_plan(cpu, &o, &in, s.M), *fused = NULL;
        tu_buf o1 = tu_alloc(dt, 1, s.N, s.H, s.Dv), o2 = tu_alloc(dt, 1, s.N, s.H, s.Dv);
        tu_buf so1 = tu_alloc(dt, 3, s.N, s.H, s.Dv), sl1 = tu_alloc(dt, 3, s.H, s.N, -1);
        tu_buf so2 = tu_alloc(dt, 3, s.N, s.H, s.Dv), slw = tu_alloc(dt, 3, s.H, s.N + 5, -1);
        attn_tensor sl2 = slw.t; /* a strided LSE: rows of N + 5 */
        sl2.shape[2] = s.N;
        CHECK_OK(attn_nsa_forward(ctx, &p, &o, &use.q.t, &use.k.t, &use.v.t, &use.kc.t,
                                  &use.vc.t, sel, &use.gates.t, &o1.t, &so1.t, &sl1.t));
        CHECK_OK(attn_nsa_attention(ctx, &p, &o, &use.q.t, &use.k.t, &use.v.t, &use.kc.t,
                                    &use.vc.t, &use.gates.t, &o2.t, &so2.t, &sl2, &fused));
        CHECK(same_selection(cpu, fused, sel, &in), "the one call's plan differs from select's");
        CHECK_CLOSE("o", &o2.t, &o1.t, 1e-6, 1e-5);
        CHECK_CLOSE("saved_o", &so2.t, &so1.t, 1e-6, 1e-5);
        attn_plan_free(fused), attn_plan_free(sel);
        tu_free(&o1), tu_free(&o2), tu_free(&so1), tu_free(&sl1), tu_free(&so2), tu_free(&slw);
        free_inputs(&use);
    }
    tu_case("attn_nsa_attention: bad input");
    attn_plan *sel = (attn_plan *)&s; /* must be overwritten with NULL */
    tu_buf o1 = tu_alloc(ATTN_F32, 1, s.N, s.H, s.Dv + 1);
    CHECK(attn_nsa_attention(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t,
                             &in.gates.t, &o1.t, NULL, NULL, &sel) == ATTN_ERR_SHAPE &&
              sel == NULL && strstr(attn_last_error(), "o"),
          "o of the wrong shape: %s", attn_last_error());
    tu_free(&o1);
    free_inputs(&in);
}

/* Without saved branches the CPU sums the branches into o as they finish
 * (the engine's gated epilogue); with them, or for a 16-bit o, it mixes
 * buffers. Every way gives the same output within f32 (bf16) tolerance,
 * select + forward and the one call alike, and o's old contents (NaN here)
 * never leak in. */
static void test_streamed(attn_ctx *cpu) {
    attn_nsa_opts o = {16, 8, 32, 3, 16, 48};
    shape s = {181, 181, 6, 2, 24, 20};
    inputs in = make_inputs(cpu, &s, &o, ATTN_F32, tu_seed(SALT, 30));
    attn_params p = attn_params_default();
    p.softcap = 5.0f;
    attn_plan *sel = select_plan_with(cpu, &p, &o, &in, s.M), *sel2 = NULL;
    tu_buf ob = tu_alloc(ATTN_F32, 1, s.N, s.H, s.Dv), os = tu_alloc(ATTN_F32, 1, s.N, s.H, s.Dv);
    tu_buf o16 = tu_alloc(ATTN_BF16, 1, s.N, s.H, s.Dv);
    tu_buf so = tu_alloc(ATTN_F32, 3, s.N, s.H, s.Dv), sl = tu_alloc(ATTN_F32, 3, s.H, s.N, -1);
    for (int call = 0; call < 2; call++) {
        tu_case("NSA %s: streamed into o = mixed from buffers", call ? "attention" : "forward");
        for (int64_t x = 0; x < tu_numel(&os.t); x++) tu_store(&os.t, x, NAN);
        if (call == 0) {
            CHECK_OK(attn_nsa_forward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t,
                                      sel, &in.gates.t, &ob.t, &so.t, &sl.t));
            CHECK_OK(attn_nsa_forward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t,
                                      sel, &in.gates.t, &os.t, NULL, NULL));
            CHECK_OK(attn_nsa_forward(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t,
                                      sel, &in.gates.t, &o16.t, NULL, NULL));
        } else {
            CHECK_OK(attn_nsa_attention(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t,
                                        &in.vc.t, &in.gates.t, &ob.t, &so.t, &sl.t, NULL));
            CHECK_OK(attn_nsa_attention(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t,
                                        &in.vc.t, &in.gates.t, &os.t, NULL, NULL, &sel2));
            CHECK_OK(attn_nsa_attention(cpu, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t,
                                        &in.vc.t, &in.gates.t, &o16.t, NULL, NULL, NULL));
            CHECK(same_selection(cpu, sel2, sel, &in),
                  "the streamed call's plan differs from attn_nsa_select's (soft-capped)");
        }
        CHECK_CLOSE("o streamed", &os.t, &ob.t, 1e-6, 1e-5);
        CHECK_CLOSE("o bf16", &o16.t, &ob.t, tu_rms_tol(ATTN_BF16), tu_max_tol(ATTN_BF16));
    }
    attn_plan_free(sel), attn_plan_free(sel2);
    tu_free(&ob), tu_free(&os), tu_free(&o16), tu_free(&so), tu_free(&sl);
    free_inputs(&in);
}

/* Planted: every query of query block qb points along axis qb % D, which only
 * the keys of selection block (qb * 3 + 1) % blocks_before_diag share. */
static void test_select_planted(attn_ctx *cpu) {
    attn_nsa_opts o = {16, 16, 32, 3, 32, 32};
    const int64_t N = 256, M = 256, H = 2, Hk = 1, D = 16;
    tu_rng rng = {tu_seed(SALT, 5)};
    tu_buf q = tu_alloc(ATTN_F32, 1, N, H, D), k = tu_alloc(ATTN_F32, 1, M, Hk, D),
           v = tu_alloc(ATTN_F32, 1, M, Hk, D);
    tu_fill(&q.t, &rng, -0.05, 0.05), tu_fill(&k.t, &rng, -0.05, 0.05), tu_fill(&v.t, &rng, -1, 1);
    const int64_t nqb = N / o.query_block, nkb = M / o.sel_block;
    uint8_t *want = calloc((size_t)(nqb * nkb), 1);
    for (int64_t qb = 2; qb < nqb; qb++) {
        int64_t axis = qb % D, diag = ((qb + 1) * o.query_block - 1) / o.sel_block;
        int64_t u = 1 + (qb * 3) % (diag - 1); /* strictly between the first and the diagonal */
        for (int64_t i = qb * o.query_block; i < (qb + 1) * o.query_block; i++)
            for (int64_t h = 0; h < H; h++) tu_store(&q.t, tu_off4(&q.t, 0, i, h, axis), 12.0);
        for (int64_t j = u * o.sel_block; j < (u + 1) * o.sel_block; j++)
            tu_store(&k.t, tu_off4(&k.t, 0, j, 0, axis), 12.0);
        want[qb * nkb + 0] = want[qb * nkb + diag] = want[qb * nkb + u] = 1;
    }
    for (int64_t qb = 0; qb < 2; qb++) /* too early for three blocks: all before the diagonal */
        for (int64_t u = 0; u <= ((qb + 1) * o.query_block - 1) / o.sel_block; u++) want[qb * nkb + u] = 1;
    tu_buf kc = tu_alloc(ATTN_F32, 1, mc_of(&o, M), Hk, D), vc = tu_alloc(ATTN_F32, 1, mc_of(&o, M), Hk, D);
    CHECK_OK(attn_nsa_compress(cpu, &o, &k.t, &v.t, &kc.t, &vc.t));
    attn_params p = attn_params_default();
    attn_plan *sel = NULL, *hand = NULL;
    tu_case("NSA selection finds the planted blocks");
    CHECK_OK(attn_nsa_select(cpu, &p, &o, &q.t, &kc.t, M, &sel));
    CHECK_OK(attn_plan_from_block_mask(&hand, N, M, o.query_block, o.sel_block, 1, want));
    attn_params ps = attn_params_default(), ph = ps;
    ps.causal = ph.causal = 1;
    ps.plan = sel;
    ph.plan = hand;
    /* the plans visit the same blocks iff the forwards agree bitwise (the
     * hand plan is per kv head, shared like the selection) */
    tu_fwd_out a = tu_run_forward(cpu, &ps, &q.t, &k.t, &v.t, ATTN_F32, ATTN_F32, 0);
    tu_fwd_out b = tu_run_forward(cpu, &ph, &q.t, &k.t, &v.t, ATTN_F32, ATTN_F32, 0);
    CHECK(tu_same_bits(&a.o, &b.o), "selection differs from the planted blocks");
    CHECK(fabs(attn_plan_density(sel) - attn_plan_density(hand)) < 1e-12, "density %g vs %g",
          attn_plan_density(sel), attn_plan_density(hand));
    tu_fwd_free(&a), tu_fwd_free(&b);
    attn_plan_free(sel), attn_plan_free(hand);
    free(want);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&kc), tu_free(&vc);
}

static double loss(attn_ctx *ref, const attn_nsa_opts *o, const inputs *in, const attn_plan *sel,
                   const tu_buf *dout) {
    attn_params p = attn_params_default();
    p.softcap = 4.0f;
    tu_buf out = tu_alloc(ATTN_F64, 1, in->q.t.shape[1], in->q.t.shape[2], in->v.t.shape[3]);
    CHECK_OK(attn_nsa_forward(ref, &p, o, &in->q.t, &in->k.t, &in->v.t, &in->kc.t, &in->vc.t, sel,
                              &in->gates.t, &out.t, NULL, NULL));
    double s = 0.0;
    for (int64_t x = 0; x < tu_numel(&out.t); x++) s += tu_load(&out.t, x) * tu_load(&dout->t, x);
    tu_free(&out);
    return s;
}

static void test_finite_differences(attn_ctx *cpu, attn_ctx *ref) {
    attn_nsa_opts o = {4, 2, 4, 2, 4, 3};
    shape s = {11, 13, 2, 1, 3, 2};
    inputs in = make_inputs(ref, &s, &o, ATTN_F64, tu_seed(SALT, 6));
    attn_plan *sel = select_plan(cpu, &o, &in, s.M);
    tu_rng rng = {tu_seed(SALT, 7)};
    tu_buf dout = tu_alloc(ATTN_F64, 1, s.N, s.H, s.Dv);
    tu_fill(&dout.t, &rng, -1, 1);
    attn_params p = attn_params_default();
    p.softcap = 4.0f;
    tu_buf so = tu_alloc(ATTN_F64, 3, s.N, s.H, s.Dv), sl = tu_alloc(ATTN_F64, 3, s.H, s.N, -1);
    tu_buf o1 = tu_alloc(ATTN_F64, 1, s.N, s.H, s.Dv);
    CHECK_OK(attn_nsa_forward(ref, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t, sel,
                              &in.gates.t, &o1.t, &so.t, &sl.t));
    tu_buf *ins[6] = {&in.q, &in.k, &in.v, &in.kc, &in.vc, &in.gates};
    tu_buf g[6];
    for (int x = 0; x < 6; x++)
        g[x] = tu_alloc(ATTN_F64, ins[x]->t.shape[0], ins[x]->t.shape[1], ins[x]->t.shape[2],
                        ins[x]->t.shape[3]);
    CHECK_OK(attn_nsa_backward(ref, &p, &o, &in.q.t, &in.k.t, &in.v.t, &in.kc.t, &in.vc.t, sel,
                               &in.gates.t, &so.t, &sl.t, &dout.t, &g[0].t, &g[1].t, &g[2].t,
                               &g[3].t, &g[4].t, &g[5].t));
    static const char *const names[6] = {"dq", "dk", "dv", "dkc", "dvc", "dgates"};
    for (int w = 0; w < 6; w++) {
        tu_case("NSA finite differences %s", names[w]);
        double worst = 0.0, gmax = 0.0;
        for (int64_t x = 0; x < tu_numel(&ins[w]->t); x++) {
            double keep = tu_load(&ins[w]->t, x), eps = 1e-6;
            tu_store(&ins[w]->t, x, keep + eps);
            double up = loss(ref, &o, &in, sel, &dout);
            tu_store(&ins[w]->t, x, keep - eps);
            double down = loss(ref, &o, &in, sel, &dout);
            tu_store(&ins[w]->t, x, keep);
            double fd = (up - down) / (2 * eps), an = tu_load(&g[w].t, x);
            worst = fmax(worst, fabs(fd - an));
            gmax = fmax(gmax, fabs(an));
        }
        CHECK(worst <= 1e-6 * (gmax + 1), "%s: worst |fd - analytic| %g (max |grad| %g)", names[w],
              worst, gmax);
    }
    for (int x = 0; x < 6; x++) tu_free(&g[x]);
    tu_free(&so), tu_free(&sl), tu_free(&o1), tu_free(&dout);
    attn_plan_free(sel);
    free_inputs(&in);
}

int main(void) {
    attn_ctx *cpu = tu_ctx("test_nsa", ATTN_BACKEND_CPU, 2);
    attn_ctx *ref = tu_ctx("test_nsa", ATTN_BACKEND_REF, 1);
    test_compress(ref);
    test_compress_cpu(cpu, ref);
    test_select_planted(cpu);
    test_branches_and_forward(cpu, ref);
    test_fused(cpu, ref);
    test_streamed(cpu);
    test_finite_differences(cpu, ref);
    attn_ctx_free(cpu);
    attn_ctx_free(ref);
    return tu_finish("test_nsa");
}
