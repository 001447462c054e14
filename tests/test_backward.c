/* attn_backward: the CPU backend against the reference backend on the same
 * inputs (the CPU's own f32 forward O and LSE are fed to both), and the
 * reference backward against central finite differences of the reference
 * forward in double precision.
 *
 * Tolerances:
 *   CPU vs reference (f32 gradients): rel RMS <= 1e-5 and max abs <= 1e-4 *
 *     (max|ref| + 1) per gradient, as for the forward; inputs are exact in f32.
 *   finite differences (f64 everywhere, loss = sum(dout * o), eps = 1e-6):
 *     rel RMS <= 1e-6 and max abs <= 1e-6 * (max|grad| + 1); the central
 *     difference's truncation error is ~eps^2 and its rounding error ~1e-10. */
#include "test_util.h"

static attn_ctx *g_ref, *g_cpu[2];
static attn_ctx *g_isa; /* when set: the cpu context of every case */

static attn_ctx *cpu_for(int idx) { return g_isa ? g_isa : g_cpu[idx % 2]; }

#define SALT 0xBAC4u

typedef struct bcase {
    int64_t B, N, M, H, Hk, D, Dv;
    int causal;
    int64_t wl, wr; /* used when win */
    int win;
    float scale, softcap;
    attn_dtype dt;  /* q, k, v (and dout) dtype; 0 = f32 */
    attn_dtype gdt; /* dq, dk, dv dtype of the CPU run; 0 = f32 */
    int strided;    /* every tensor a permuted, padded view ([B, H, seq, dim + 2] memory) */
} bcase;

static const bcase k_cases[] = {
    {.B = 1, .N = 1, .M = 1, .H = 1, .Hk = 1, .D = 16, .Dv = 16},
    {.B = 1, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 60, .Dv = 60},
    {.B = 1, .N = 65, .M = 63, .H = 4, .Hk = 1, .D = 64, .Dv = 64, .causal = 1},
    {.B = 2, .N = 33, .M = 33, .H = 8, .Hk = 2, .D = 96, .Dv = 96, .causal = 1},
    {.B = 1, .N = 129, .M = 129, .H = 2, .Hk = 2, .D = 64, .Dv = 128, .causal = 1},
    {.B = 1, .N = 100, .M = 100, .H = 4, .Hk = 2, .D = 64, .Dv = 32, .win = 1, .wl = 10, .wr = 5},
    {.B = 1, .N = 100, .M = 100, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .causal = 1, .win = 1, .wl = 7, .wr = 0},
    {.B = 1, .N = 65, .M = 65, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .scale = 1.0f, .softcap = 5.0f},
    {.B = 1, .N = 63, .M = 63, .H = 2, .Hk = 1, .D = 128, .Dv = 128, .causal = 1, .softcap = 20.0f},
    {.B = 1, .N = 257, .M = 257, .H = 2, .Hk = 1, .D = 128, .Dv = 128, .causal = 1},
    {.B = 1, .N = 1, .M = 200, .H = 8, .Hk = 1, .D = 64, .Dv = 64},
    {.B = 1, .N = 200, .M = 7, .H = 2, .Hk = 2, .D = 32, .Dv = 32},
    {.B = 1, .N = 40, .M = 40, .H = 2, .Hk = 1, .D = 256, .Dv = 256, .causal = 1},
    {.B = 1, .N = 33, .M = 65, .H = 2, .Hk = 1, .D = 192, .Dv = 128, .causal = 1},
    {.B = 1, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 64, .Dv = 64, .causal = 1, .dt = ATTN_F16},
    {.B = 1, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 64, .Dv = 64, .dt = ATTN_BF16},
    {.B = 2, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 64, .Dv = 48, .causal = 1, .strided = 1},
    {.B = 1, .N = 65, .M = 63, .H = 2, .Hk = 1, .D = 33, .Dv = 17, .causal = 1},
    {.B = 1, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 64, .Dv = 64, .causal = 1,
     .dt = ATTN_F16, .gdt = ATTN_F16},
    {.B = 1, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 64, .Dv = 64, .gdt = ATTN_BF16,
     .strided = 1},
};

static tu_buf alloc4(attn_dtype dt, int strided, const int64_t *shape) {
    return strided ? tu_alloc_strided(dt, shape[0], shape[1], shape[2], shape[3], 2)
                   : tu_alloc(dt, shape[0], shape[1], shape[2], shape[3]);
}

typedef struct grads {
    tu_buf dq, dk, dv;
    attn_status st;
} grads;

static grads run_backward(attn_ctx *ctx, const attn_params *p, const attn_tensor *q,
                          const attn_tensor *k, const attn_tensor *v, const attn_tensor *o,
                          const attn_tensor *lse, const attn_tensor *dout, attn_dtype gdt,
                          int strided) {
    grads g;
    g.dq = alloc4(gdt, strided, q->shape);
    g.dk = alloc4(gdt, strided, k->shape);
    g.dv = alloc4(gdt, strided, v->shape);
    g.st = attn_backward(ctx, p, q, k, v, o, lse, dout, &g.dq.t, &g.dk.t, &g.dv.t);
    return g;
}

static void free_grads(grads *g) {
    tu_free(&g->dq);
    tu_free(&g->dk);
    tu_free(&g->dv);
}

/* CPU forward, then CPU and reference backward from the CPU's O and LSE.
 * Gradients in gdt on the CPU side (tolerances of tu_rms_tol / tu_max_tol:
 * f32 1e-5 / 1e-4, f16 1e-3 / 2e-3, bf16 8e-3 / 8e-3), all tensors strided
 * views when strided. */
static void cpu_vs_ref(attn_ctx *cpu, const attn_params *p, const attn_tensor *q,
                       const attn_tensor *k, const attn_tensor *v, tu_rng *r, attn_dtype gdt,
                       int strided) {
    tu_fwd_out f = tu_run_forward(cpu, p, q, k, v, ATTN_F32, ATTN_F32, 1);
    CHECK_OK(f.st);
    const int64_t oshape[4] = {q->shape[0], q->shape[1], q->shape[2], v->shape[3]};
    tu_buf dout = alloc4(q->dtype, strided, oshape);
    tu_fill(&dout.t, r, -1, 1);
    grads c = run_backward(cpu, p, q, k, v, &f.o.t, &f.lse.t, &dout.t, gdt, strided);
    grads e = run_backward(g_ref, p, q, k, v, &f.o.t, &f.lse.t, &dout.t, ATTN_F64, 0);
    CHECK(c.st == ATTN_OK, "cpu backward: %s: %s", attn_status_str(c.st), attn_last_error());
    CHECK(e.st == ATTN_OK, "ref backward: %s: %s", attn_status_str(e.st), attn_last_error());
    if (c.st == ATTN_OK && e.st == ATTN_OK) {
        CHECK_CLOSE("dq", &c.dq.t, &e.dq.t, tu_rms_tol(gdt), tu_max_tol(gdt));
        CHECK_CLOSE("dk", &c.dk.t, &e.dk.t, tu_rms_tol(gdt), tu_max_tol(gdt));
        CHECK_CLOSE("dv", &c.dv.t, &e.dv.t, tu_rms_tol(gdt), tu_max_tol(gdt));
    }
    free_grads(&c);
    free_grads(&e);
    tu_free(&dout);
    tu_fwd_free(&f);
}

static void run_case(int idx, const bcase *c) {
    uint64_t seed = tu_seed(SALT, (uint64_t)idx);
    tu_rng r = {seed};
    attn_params p = attn_params_default();
    p.causal = c->causal;
    p.window_left = c->win ? c->wl : -1;
    p.window_right = c->win ? c->wr : -1;
    p.scale = c->scale;
    p.softcap = c->softcap;
    tu_case("backward #%d B=%lld N=%lld M=%lld H=%lld Hk=%lld D=%lld Dv=%lld causal=%d "
            "window=(%lld,%lld) scale=%g softcap=%g dtype=%s grads=%s strided=%d seed=%llx",
            idx, (long long)c->B, (long long)c->N, (long long)c->M, (long long)c->H,
            (long long)c->Hk, (long long)c->D, (long long)c->Dv, c->causal,
            (long long)p.window_left, (long long)p.window_right, c->scale, c->softcap,
            attn_dtype_name(c->dt), attn_dtype_name(c->gdt), c->strided,
            (unsigned long long)seed);
    const int64_t qs[4] = {c->B, c->N, c->H, c->D}, ks[4] = {c->B, c->M, c->Hk, c->D};
    const int64_t vs[4] = {c->B, c->M, c->Hk, c->Dv};
    tu_buf q = alloc4(c->dt, c->strided, qs);
    tu_buf k = alloc4(c->dt, c->strided, ks);
    tu_buf v = alloc4(c->dt, c->strided, vs);
    tu_fill(&q.t, &r, -2, 2);
    tu_fill(&k.t, &r, -2, 2);
    tu_fill(&v.t, &r, -1, 1);
    cpu_vs_ref(cpu_for(idx), &p, &q.t, &k.t, &v.t, &r, c->gdt, c->strided);
    tu_free(&q);
    tu_free(&k);
    tu_free(&v);
}

/* Varlen batch (with an empty query sequence and a sequence of one key). */
static void run_varlen(int idx, int causal) {
    uint64_t seed = tu_seed(SALT, 100u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("backward varlen #%d causal=%d seed=%llx", idx, causal, (unsigned long long)seed);
    int32_t cuq[6] = {0, 5, 5, 6, 70, 103}, cuk[6] = {0, 7, 10, 11, 81, 81};
    attn_params p = attn_params_default();
    p.causal = causal;
    p.batch = 5;
    p.cu_seqlens_q = cuq;
    p.cu_seqlens_k = cuk;
    tu_buf q = tu_alloc(ATTN_F32, 1, 103, 4, 32);
    tu_buf k = tu_alloc(ATTN_F32, 1, 81, 2, 32);
    tu_buf v = tu_alloc(ATTN_F32, 1, 81, 2, 40);
    tu_fill(&q.t, &r, -2, 2);
    tu_fill(&k.t, &r, -2, 2);
    tu_fill(&v.t, &r, -1, 1);
    cpu_vs_ref(cpu_for(idx), &p, &q.t, &k.t, &v.t, &r, ATTN_F32, 0);
    tu_free(&q);
    tu_free(&k);
    tu_free(&v);
}

/* A random block-sparse plan. */
static attn_plan *random_plan(int64_t n, int64_t m, int64_t bq, int64_t bk, int64_t heads,
                              tu_rng *r) {
    int64_t nqb = (n + bq - 1) / bq, nkb = (m + bk - 1) / bk, e = 0;
    int64_t *off = calloc((size_t)(heads * nqb + 1), sizeof *off);
    attn_plan_entry *ent = calloc((size_t)(heads * nqb * nkb + 1), sizeof *ent);
    for (int64_t row = 0; row < heads * nqb; row++) {
        for (int64_t kb = 0; kb < nkb; kb++) {
            if (tu_uniform(r, 0, 1) >= 0.4) continue;
            ent[e].key_block = (int32_t)kb;
            ent[e].mask = (uint8_t)tu_int(r, 0, 1);
            e++;
        }
        off[row + 1] = e;
    }
    attn_plan *plan = NULL;
    CHECK_OK(attn_plan_create(&plan, n, m, bq, bk, heads, off, ent));
    free(off);
    free(ent);
    return plan;
}

static void run_plan(int idx, int causal, int64_t heads) {
    uint64_t seed = tu_seed(SALT, 200u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("backward plan #%d causal=%d heads=%lld seed=%llx", idx, causal, (long long)heads,
            (unsigned long long)seed);
    const int64_t N = 77, M = 90, H = 4, Hk = 2, D = 32;
    attn_plan *plan = random_plan(N, M, 16, 16, heads, &r);
    if (!plan) return;
    attn_params p = attn_params_default();
    p.causal = causal;
    p.plan = plan;
    tu_buf q = tu_alloc(ATTN_F32, 1, N, H, D);
    tu_buf k = tu_alloc(ATTN_F32, 1, M, Hk, D);
    tu_buf v = tu_alloc(ATTN_F32, 1, M, Hk, D);
    tu_fill(&q.t, &r, -2, 2);
    tu_fill(&k.t, &r, -2, 2);
    tu_fill(&v.t, &r, -1, 1);
    cpu_vs_ref(cpu_for(idx), &p, &q.t, &k.t, &v.t, &r, ATTN_F32, 0);
    attn_plan_free(plan);
    tu_free(&q);
    tu_free(&k);
    tu_free(&v);
}

/* ------------------------------------------------------------ finite differences */

static double loss(const attn_params *p, const tu_buf *q, const tu_buf *k, const tu_buf *v,
                   const tu_buf *dout, tu_buf *o) {
    attn_status st = attn_forward(g_ref, p, &q->t, &k->t, &v->t, &o->t, NULL);
    if (st != ATTN_OK) return NAN;
    const double *a = o->mem, *b = dout->mem;
    double s = 0.0;
    for (int64_t i = 0; i < tu_numel(&o->t); i++) s += a[i] * b[i];
    return s;
}

/* Central differences of x's elements into fd (same shape, f64). */
static void fd_grad(const attn_params *p, tu_buf *x, tu_buf *fd, const tu_buf *q,
                    const tu_buf *k, const tu_buf *v, const tu_buf *dout, tu_buf *o) {
    const double eps = 1e-6;
    double *a = x->mem, *g = fd->mem;
    for (int64_t i = 0; i < tu_numel(&x->t); i++) {
        double keep = a[i];
        a[i] = keep + eps;
        double lp = loss(p, q, k, v, dout, o);
        a[i] = keep - eps;
        double lm = loss(p, q, k, v, dout, o);
        a[i] = keep;
        g[i] = (lp - lm) / (2 * eps);
    }
}

static void finite_diff(int idx, int64_t B, int64_t N, int64_t M, int64_t H, int64_t Hk,
                        int64_t D, int64_t Dv, attn_params p) {
    uint64_t seed = tu_seed(SALT, 300u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("finite differences #%d B=%lld N=%lld M=%lld H=%lld Hk=%lld D=%lld Dv=%lld "
            "causal=%d window=(%lld,%lld) scale=%g softcap=%g varlen=%d plan=%d seed=%llx",
            idx, (long long)B, (long long)N, (long long)M, (long long)H, (long long)Hk,
            (long long)D, (long long)Dv, p.causal, (long long)p.window_left,
            (long long)p.window_right, p.scale, p.softcap, p.cu_seqlens_q != NULL,
            p.plan != NULL, (unsigned long long)seed);
    tu_buf q = tu_alloc(ATTN_F64, B, N, H, D), k = tu_alloc(ATTN_F64, B, M, Hk, D);
    tu_buf v = tu_alloc(ATTN_F64, B, M, Hk, Dv), dout = tu_alloc(ATTN_F64, B, N, H, Dv);
    tu_fill(&q.t, &r, -2, 2);
    tu_fill(&k.t, &r, -2, 2);
    tu_fill(&v.t, &r, -1, 1);
    tu_fill(&dout.t, &r, -1, 1);
    tu_fwd_out f = tu_run_forward(g_ref, &p, &q.t, &k.t, &v.t, ATTN_F64, ATTN_F64, 1);
    CHECK_OK(f.st);
    grads g = run_backward(g_ref, &p, &q.t, &k.t, &v.t, &f.o.t, &f.lse.t, &dout.t, ATTN_F64, 0);
    CHECK_OK(g.st);
    tu_buf o = tu_alloc(ATTN_F64, B, N, H, Dv);
    tu_buf fq = tu_alloc(ATTN_F64, B, N, H, D), fk = tu_alloc(ATTN_F64, B, M, Hk, D);
    tu_buf fv = tu_alloc(ATTN_F64, B, M, Hk, Dv);
    fd_grad(&p, &q, &fq, &q, &k, &v, &dout, &o);
    fd_grad(&p, &k, &fk, &q, &k, &v, &dout, &o);
    fd_grad(&p, &v, &fv, &q, &k, &v, &dout, &o);
    CHECK_CLOSE("dq vs finite differences", &g.dq.t, &fq.t, 1e-6, 1e-6);
    CHECK_CLOSE("dk vs finite differences", &g.dk.t, &fk.t, 1e-6, 1e-6);
    CHECK_CLOSE("dv vs finite differences", &g.dv.t, &fv.t, 1e-6, 1e-6);
    tu_buf *all[] = {&q, &k, &v, &dout, &o, &fq, &fk, &fv};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) tu_free(all[i]);
    free_grads(&g);
    tu_fwd_free(&f);
}

static void finite_diff_all(void) {
    attn_params p = attn_params_default();
    finite_diff(0, 1, 3, 4, 2, 1, 3, 2, p);
    p.causal = 1;
    finite_diff(1, 1, 3, 4, 2, 1, 3, 2, p);
    finite_diff(2, 1, 5, 3, 4, 2, 2, 3, p); /* N > M: first rows see nothing */
    p = attn_params_default();
    p.window_left = 1;
    p.window_right = 0;
    finite_diff(3, 1, 5, 5, 2, 2, 3, 3, p);
    p = attn_params_default();
    p.scale = 1.0f;
    p.softcap = 2.0f;
    finite_diff(4, 1, 4, 4, 2, 1, 4, 2, p);
    p = attn_params_default();
    p.scale = 0.7f;
    p.causal = 1;
    p.window_left = 2;
    finite_diff(5, 2, 3, 5, 4, 1, 2, 2, p);
    /* varlen: sequences of 2, 0 and 3 queries over 3, 1 and 2 keys */
    static const int32_t cuq[4] = {0, 2, 2, 5}, cuk[4] = {0, 3, 4, 6};
    p = attn_params_default();
    p.causal = 1;
    p.batch = 3;
    p.cu_seqlens_q = cuq;
    p.cu_seqlens_k = cuk;
    finite_diff(6, 1, 5, 6, 2, 1, 3, 2, p);
    /* explicit plan: blocks of 2, query block 1 sees key block 0 only */
    int64_t off[4] = {0, 2, 3, 5};
    attn_plan_entry ent[5] = {{0, 0, ATTN_BLOCK_FULL, 0}, {2, 0, ATTN_BLOCK_PARAMS, 0},
                              {0, 0, ATTN_BLOCK_FULL, 0}, {1, 0, ATTN_BLOCK_FULL, 0},
                              {2, 0, ATTN_BLOCK_PARAMS, 0}};
    attn_plan *plan = NULL;
    CHECK_OK(attn_plan_create(&plan, 6, 6, 2, 2, 1, off, ent));
    p = attn_params_default();
    p.causal = 1;
    p.plan = plan;
    finite_diff(7, 1, 6, 6, 2, 1, 3, 2, p);
    attn_plan_free(plan);
}

int main(void) {
    g_ref = tu_ctx("test_backward", ATTN_BACKEND_REF, 1);
    g_cpu[0] = tu_ctx("test_backward", ATTN_BACKEND_CPU, 2);
    g_cpu[1] = tu_ctx("test_backward", ATTN_BACKEND_CPU, 1);

    /* CPU vs reference with the auto-selected ISA, then with each other ISA */
    attn_ctx *isas[4];
    int n_isa = tu_other_isa_ctxs(isas, 4, 2);
    for (int r = -1; r < n_isa; r++) {
        g_isa = r < 0 ? NULL : isas[r];
        tu_prefix = r < 0 ? "" : attn_isa_name(attn_ctx_isa(g_isa));
        for (int i = 0; i < (int)(sizeof k_cases / sizeof k_cases[0]); i++)
            run_case(i, &k_cases[i]);
        run_varlen(0, 0);
        run_varlen(1, 1);
        run_plan(0, 0, 1);
        run_plan(1, 1, 4);
        run_plan(2, 0, 2);
    }
    for (int r = 0; r < n_isa; r++) attn_ctx_free(isas[r]);
    g_isa = NULL;
    tu_prefix = "";
    finite_diff_all();

    attn_ctx_free(g_ref);
    attn_ctx_free(g_cpu[0]);
    attn_ctx_free(g_cpu[1]);
    return tu_finish("test_backward");
}
