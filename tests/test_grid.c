/* Token grids: pooling equals patch means and its backward is its adjoint;
 * spatial-reduction attention and pooled cross-attention equal attention on
 * the pooled tokens (ratio 1: plain attention, bitwise), CPU against the
 * reference (f32 tolerances of test_util.h), and the SRA and pooled-cross
 * backwards against central finite differences of the reference (f64, eps
 * 1e-6, 1e-6 relative). The pooled-cross backward: CPU against the reference
 * on odd sizes, GQA, 2-D and 3-D grids, dq overwritten (not added to stale
 * contents), and bad input refused by name with the outputs untouched. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "test_util.h"

#define SALT 0x62d1u

static void test_pool(attn_ctx *ref) {
    attn_grid g = {2, 6, 4}, r = {1, 3, 2};
    const int64_t T = 48, P = 2 * 2 * 2, H = 2, D = 3;
    tu_rng rng = {tu_seed(SALT, 1)};
    tu_buf x = tu_alloc(ATTN_F64, 2, T, H, D), y = tu_alloc(ATTN_F64, 2, P, H, D);
    tu_fill(&x.t, &rng, -1, 1);
    tu_case("grid pool: patch means");
    CHECK_OK(attn_grid_pool(ref, g, r, &x.t, &y.t));
    double worst = 0.0;
    for (int64_t b = 0; b < 2; b++)
        for (int64_t f = 0; f < 2; f++)
            for (int64_t py = 0; py < 2; py++)
                for (int64_t px = 0; px < 2; px++)
                    for (int64_t h = 0; h < H; h++)
                        for (int64_t e = 0; e < D; e++) {
                            double m = 0.0;
                            for (int64_t dy = 0; dy < 3; dy++)
                                for (int64_t dx = 0; dx < 2; dx++)
                                    m += tu_load(&x.t, tu_off4(&x.t, b, (f * 6 + py * 3 + dy) * 4 + px * 2 + dx, h, e));
                            double got = tu_load(&y.t, tu_off4(&y.t, b, (f * 2 + py) * 2 + px, h, e));
                            worst = fmax(worst, fabs(got - m / 6));
                        }
    CHECK(worst < 1e-14, "pooled differs from the patch means by %g", worst);
    tu_case("grid pool backward is the adjoint");
    tu_buf dy = tu_alloc(ATTN_F64, 2, P, H, D), dx = tu_alloc(ATTN_F64, 2, T, H, D);
    tu_fill(&dy.t, &rng, -1, 1);
    CHECK_OK(attn_grid_pool_backward(ref, g, r, &dy.t, &dx.t));
    double lhs = 0.0, rhs = 0.0;
    for (int64_t i = 0; i < tu_numel(&y.t); i++) lhs += tu_load(&dy.t, i) * tu_load(&y.t, i);
    for (int64_t i = 0; i < tu_numel(&x.t); i++) rhs += tu_load(&dx.t, i) * tu_load(&x.t, i);
    CHECK(fabs(lhs - rhs) < 1e-12 * (fabs(lhs) + 1), "<dy, P x> %.17g vs <P^T dy, x> %.17g", lhs, rhs);
    tu_case("grid pool: bad input");
    attn_grid bad = {1, 4, 2};
    CHECK(attn_grid_pool(ref, g, bad, &x.t, &y.t) == ATTN_ERR_ARG && strstr(attn_last_error(), "ratio"),
          "ratio not dividing: %s", attn_last_error());
    attn_grid wrong = {1, 6, 4};
    CHECK(attn_grid_pool(ref, wrong, r, &x.t, &y.t) == ATTN_ERR_SHAPE && strstr(attn_last_error(), "x"),
          "grid not matching the tokens: %s", attn_last_error());
    tu_free(&x), tu_free(&y), tu_free(&dy), tu_free(&dx);
}

static void test_sra(attn_ctx *cpu, attn_ctx *ref) {
    attn_grid g = {1, 12, 10}, r = {1, 2, 2};
    const int64_t N = 120, H = 4, Hk = 2, D = 24, Dv = 16;
    tu_rng rng = {tu_seed(SALT, 2)};
    tu_buf q = tu_alloc(ATTN_F32, 1, N, H, D), k = tu_alloc(ATTN_F32, 1, N, Hk, D),
           v = tu_alloc(ATTN_F32, 1, N, Hk, Dv);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    attn_params p = attn_params_default();
    tu_buf o = tu_alloc(ATTN_F32, 1, N, H, Dv), lse = tu_alloc(ATTN_F32, 1, H, N, -1);

    tu_case("SRA with ratio 1 = plain attention (bitwise)");
    attn_grid one = {1, 1, 1};
    CHECK_OK(attn_sra_forward(cpu, &p, g, one, &q.t, &k.t, &v.t, &o.t, NULL));
    tu_fwd_out plain = tu_run_forward(cpu, &p, &q.t, &k.t, &v.t, ATTN_F32, ATTN_F32, 0);
    CHECK(tu_same_bits(&o, &plain.o), "SRA ratio 1 differs from attn_forward");
    tu_fwd_free(&plain);

    tu_case("SRA forward and backward: CPU vs reference");
    tu_buf o64 = tu_alloc(ATTN_F64, 1, N, H, Dv), lse64 = tu_alloc(ATTN_F64, 1, H, N, -1);
    CHECK_OK(attn_sra_forward(cpu, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t));
    CHECK_OK(attn_sra_forward(ref, &p, g, r, &q.t, &k.t, &v.t, &o64.t, &lse64.t));
    CHECK_CLOSE("o", &o.t, &o64.t, 1e-5, 1e-4);
    CHECK_CLOSE("lse", &lse.t, &lse64.t, 1e-5, 1e-4);
    tu_buf dout = tu_alloc(ATTN_F32, 1, N, H, Dv);
    tu_fill(&dout.t, &rng, -1, 1);
    tu_buf g32[3] = {tu_alloc(ATTN_F32, 1, N, H, D), tu_alloc(ATTN_F32, 1, N, Hk, D), tu_alloc(ATTN_F32, 1, N, Hk, Dv)};
    tu_buf g64[3] = {tu_alloc(ATTN_F64, 1, N, H, D), tu_alloc(ATTN_F64, 1, N, Hk, D), tu_alloc(ATTN_F64, 1, N, Hk, Dv)};
    CHECK_OK(attn_sra_backward(cpu, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &g32[0].t, &g32[1].t, &g32[2].t));
    CHECK_OK(attn_sra_backward(ref, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &g64[0].t, &g64[1].t, &g64[2].t));
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int x = 0; x < 3; x++) CHECK_CLOSE(names[x], &g32[x].t, &g64[x].t, 1e-5, 1e-4);
    tu_case("SRA backward: dk aliasing k is refused");
    CHECK(attn_sra_backward(cpu, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &g32[0].t,
                            &k.t, &g32[2].t) == ATTN_ERR_ALIAS &&
              strstr(attn_last_error(), "dk"),
          "dk = k: %s", attn_last_error());
    for (int x = 0; x < 3; x++) tu_free(&g32[x]), tu_free(&g64[x]);

    tu_case("pooled cross-attention = attention from the pooled queries");
    attn_grid gq = {1, 12, 10};
    int64_t P = (12 / 2) * (10 / 2);
    tu_buf qp = tu_alloc(ATTN_F32, 1, P, H, D), op = tu_alloc(ATTN_F32, 1, P, H, Dv);
    CHECK_OK(attn_grid_pool(cpu, gq, r, &q.t, &qp.t));
    CHECK_OK(attn_pooled_cross_forward(cpu, &p, gq, r, &q.t, &k.t, &v.t, &op.t, NULL));
    tu_fwd_out direct = tu_run_forward(cpu, &p, &qp.t, &k.t, &v.t, ATTN_F32, ATTN_F32, 0);
    CHECK(tu_same_bits(&op, &direct.o), "pooled cross differs from attn_forward on pooled q");
    tu_fwd_free(&direct);
    tu_buf op64 = tu_alloc(ATTN_F64, 1, P, H, Dv);
    CHECK_OK(attn_pooled_cross_forward(ref, &p, gq, r, &q.t, &k.t, &v.t, &op64.t, NULL));
    CHECK_CLOSE("o (pooled cross, reference)", &op.t, &op64.t, 1e-5, 1e-4);
    tu_free(&qp), tu_free(&op), tu_free(&op64);

    tu_case("SRA: bad input");
    attn_params causal = p;
    causal.causal = 1;
    CHECK(attn_sra_forward(cpu, &causal, g, r, &q.t, &k.t, &v.t, &o.t, NULL) == ATTN_ERR_ARG,
          "causal SRA must be refused: %s", attn_last_error());
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&o), tu_free(&lse), tu_free(&o64), tu_free(&lse64);
    tu_free(&dout);
}

static double sra_loss(attn_ctx *ref, attn_grid g, attn_grid r, const tu_buf *q, const tu_buf *k,
                       const tu_buf *v, const tu_buf *dout) {
    attn_params p = attn_params_default();
    tu_buf o = tu_alloc(ATTN_F64, 1, q->t.shape[1], q->t.shape[2], v->t.shape[3]);
    CHECK_OK(attn_sra_forward(ref, &p, g, r, &q->t, &k->t, &v->t, &o.t, NULL));
    double s = 0.0;
    for (int64_t x = 0; x < tu_numel(&o.t); x++) s += tu_load(&o.t, x) * tu_load(&dout->t, x);
    tu_free(&o);
    return s;
}

static void test_sra_fd(attn_ctx *ref) {
    attn_grid g = {2, 2, 3}, r = {2, 1, 3};
    const int64_t N = 7, M = 12, H = 2, D = 3, Dv = 2;
    tu_rng rng = {tu_seed(SALT, 3)};
    tu_buf q = tu_alloc(ATTN_F64, 1, N, H, D), k = tu_alloc(ATTN_F64, 1, M, 1, D),
           v = tu_alloc(ATTN_F64, 1, M, 1, Dv), dout = tu_alloc(ATTN_F64, 1, N, H, Dv);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    tu_fill(&dout.t, &rng, -1, 1);
    attn_params p = attn_params_default();
    tu_buf o = tu_alloc(ATTN_F64, 1, N, H, Dv), lse = tu_alloc(ATTN_F64, 1, H, N, -1);
    CHECK_OK(attn_sra_forward(ref, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t));
    tu_buf gr[3] = {tu_alloc(ATTN_F64, 1, N, H, D), tu_alloc(ATTN_F64, 1, M, 1, D), tu_alloc(ATTN_F64, 1, M, 1, Dv)};
    CHECK_OK(attn_sra_backward(ref, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &gr[0].t, &gr[1].t, &gr[2].t));
    tu_buf *ins[3] = {&q, &k, &v};
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int w = 0; w < 3; w++) {
        tu_case("SRA finite differences %s", names[w]);
        double worst = 0.0, gmax = 0.0;
        for (int64_t x = 0; x < tu_numel(&ins[w]->t); x++) {
            double keep = tu_load(&ins[w]->t, x), eps = 1e-6;
            tu_store(&ins[w]->t, x, keep + eps);
            double up = sra_loss(ref, g, r, &q, &k, &v, &dout);
            tu_store(&ins[w]->t, x, keep - eps);
            double down = sra_loss(ref, g, r, &q, &k, &v, &dout);
            tu_store(&ins[w]->t, x, keep);
            double fd = (up - down) / (2 * eps), an = tu_load(&gr[w].t, x);
            worst = fmax(worst, fabs(fd - an));
            gmax = fmax(gmax, fabs(an));
        }
        CHECK(worst <= 1e-6 * (gmax + 1), "%s: worst %g (max |grad| %g)", names[w], worst, gmax);
    }
    for (int x = 0; x < 3; x++) tu_free(&gr[x]);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&dout), tu_free(&o), tu_free(&lse);
}

/* Pooled cross-attention of one problem: queries on `grid`, pooled by `ratio`. */
typedef struct cross_case {
    attn_grid grid, ratio;
    int64_t B, M, H, Hk, D, Dv;
} cross_case;

static int64_t cross_pooled(const cross_case *c) {
    return (c->grid.f / c->ratio.f) * (c->grid.h / c->ratio.h) * (c->grid.w / c->ratio.w);
}

/* CPU backward (f32) against the reference backward (f64), each on its own
 * forward's o and lse; dq, dk, dv prefilled with garbage that must not leak
 * into the result. */
static void check_cross_backward(attn_ctx *cpu, attn_ctx *ref, const cross_case *c, uint64_t seed) {
    const int64_t N = c->grid.f * c->grid.h * c->grid.w, P = cross_pooled(c);
    tu_rng rng = {seed};
    tu_buf q = tu_alloc(ATTN_F32, c->B, N, c->H, c->D), k = tu_alloc(ATTN_F32, c->B, c->M, c->Hk, c->D),
           v = tu_alloc(ATTN_F32, c->B, c->M, c->Hk, c->Dv), dout = tu_alloc(ATTN_F32, c->B, P, c->H, c->Dv);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    tu_fill(&dout.t, &rng, -1, 1);
    attn_params p = attn_params_default();
    tu_buf o = tu_alloc(ATTN_F32, c->B, P, c->H, c->Dv), lse = tu_alloc(ATTN_F32, c->B, c->H, P, -1);
    tu_buf o64 = tu_alloc(ATTN_F64, c->B, P, c->H, c->Dv), lse64 = tu_alloc(ATTN_F64, c->B, c->H, P, -1);
    CHECK_OK(attn_pooled_cross_forward(cpu, &p, c->grid, c->ratio, &q.t, &k.t, &v.t, &o.t, &lse.t));
    CHECK_OK(attn_pooled_cross_forward(ref, &p, c->grid, c->ratio, &q.t, &k.t, &v.t, &o64.t, &lse64.t));
    CHECK_CLOSE("o", &o.t, &o64.t, 1e-5, 1e-4);
    CHECK_CLOSE("lse", &lse.t, &lse64.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
    const attn_tensor *like[3] = {&q.t, &k.t, &v.t};
    tu_buf g32[3], g64[3];
    for (int x = 0; x < 3; x++) {
        const int64_t *sh = like[x]->shape;
        g32[x] = tu_alloc(ATTN_F32, sh[0], sh[1], sh[2], sh[3]);
        g64[x] = tu_alloc(ATTN_F64, sh[0], sh[1], sh[2], sh[3]);
        tu_fill(&g32[x].t, &rng, 50, 60), tu_fill(&g64[x].t, &rng, 50, 60); /* stale contents */
    }
    CHECK_OK(attn_pooled_cross_backward(cpu, &p, c->grid, c->ratio, &q.t, &k.t, &v.t, &o.t, &lse.t,
                                        &dout.t, &g32[0].t, &g32[1].t, &g32[2].t));
    CHECK_OK(attn_pooled_cross_backward(ref, &p, c->grid, c->ratio, &q.t, &k.t, &v.t, &o64.t,
                                        &lse64.t, &dout.t, &g64[0].t, &g64[1].t, &g64[2].t));
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int x = 0; x < 3; x++) CHECK_CLOSE(names[x], &g32[x].t, &g64[x].t, tu_rms_tol(ATTN_F32), tu_max_tol(ATTN_F32));
    /* dq = the pooled gradient spread over each patch: every patch's rows
     * of dq sum to the pooled queries' gradient, so dq's total is the same
     * as attn_backward's on the pooled queries */
    tu_buf qp = tu_alloc(ATTN_F64, c->B, P, c->H, c->D), dqp = tu_alloc(ATTN_F64, c->B, P, c->H, c->D),
           dk2 = tu_alloc(ATTN_F64, c->B, c->M, c->Hk, c->D), dv2 = tu_alloc(ATTN_F64, c->B, c->M, c->Hk, c->Dv);
    CHECK_OK(attn_grid_pool(ref, c->grid, c->ratio, &q.t, &qp.t));
    CHECK_OK(attn_backward(ref, &p, &qp.t, &k.t, &v.t, &o64.t, &lse64.t, &dout.t, &dqp.t, &dk2.t, &dv2.t));
    double want = 0.0, got = 0.0;
    for (int64_t x = 0; x < tu_numel(&dqp.t); x++) want += tu_load(&dqp.t, x);
    for (int64_t x = 0; x < tu_numel(&g64[0].t); x++) got += tu_load(&g64[0].t, x);
    CHECK(fabs(got - want) < 1e-10 * (fabs(want) + 1), "sum of dq %.17g, of the pooled dq %.17g", got, want);
    CHECK_CLOSE("dk = attn_backward's on the pooled queries", &g64[1].t, &dk2.t, 1e-14, 1e-14);
    for (int x = 0; x < 3; x++) tu_free(&g32[x]), tu_free(&g64[x]);
    tu_free(&qp), tu_free(&dqp), tu_free(&dk2), tu_free(&dv2);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&dout), tu_free(&o), tu_free(&lse), tu_free(&o64), tu_free(&lse64);
}

static void test_pooled_cross_backward(attn_ctx *cpu, attn_ctx *ref) {
    static const cross_case cases[] = {
        {{1, 12, 10}, {1, 2, 2}, 1, 37, 4, 2, 24, 16}, /* image, GQA */
        {{1, 9, 15}, {1, 3, 5}, 2, 23, 3, 1, 7, 5},    /* odd sizes, batch 2, one kv head */
        {{3, 4, 6}, {3, 2, 3}, 1, 19, 2, 2, 9, 11},    /* video: pooled across frames too */
        {{2, 6, 5}, {1, 1, 1}, 2, 13, 6, 3, 5, 3},     /* ratio 1: plain attention */
    };
    for (size_t x = 0; x < sizeof cases / sizeof cases[0]; x++) {
        const cross_case *c = &cases[x];
        tu_case("pooled cross backward: CPU vs reference, grid %lldx%lldx%lld ratio %lldx%lldx%lld, "
                "B %lld M %lld H %lld Hk %lld D %lld Dv %lld",
                (long long)c->grid.f, (long long)c->grid.h, (long long)c->grid.w, (long long)c->ratio.f,
                (long long)c->ratio.h, (long long)c->ratio.w, (long long)c->B, (long long)c->M,
                (long long)c->H, (long long)c->Hk, (long long)c->D, (long long)c->Dv);
        check_cross_backward(cpu, ref, c, tu_seed(SALT, 10 + x));
    }
}

typedef struct cross_fd {
    attn_ctx *ref;
    cross_case c;
    tu_buf q, k, v, o;
} cross_fd;

static int cross_fd_run(void *arg) {
    cross_fd *f = arg;
    attn_params p = attn_params_default();
    return attn_pooled_cross_forward(f->ref, &p, f->c.grid, f->c.ratio, &f->q.t, &f->k.t, &f->v.t,
                                     &f->o.t, NULL) == ATTN_OK;
}

static void test_pooled_cross_fd(attn_ctx *ref) {
    cross_fd f = {.ref = ref, .c = {{2, 2, 3}, {2, 1, 3}, 1, 7, 2, 1, 3, 2}};
    const cross_case *c = &f.c;
    const int64_t N = 12, P = cross_pooled(c);
    tu_rng rng = {tu_seed(SALT, 20)};
    f.q = tu_alloc(ATTN_F64, 1, N, c->H, c->D), f.k = tu_alloc(ATTN_F64, 1, c->M, c->Hk, c->D);
    f.v = tu_alloc(ATTN_F64, 1, c->M, c->Hk, c->Dv), f.o = tu_alloc(ATTN_F64, 1, P, c->H, c->Dv);
    tu_buf dout = tu_alloc(ATTN_F64, 1, P, c->H, c->Dv), lse = tu_alloc(ATTN_F64, 1, c->H, P, -1);
    tu_fill(&f.q.t, &rng, -1, 1), tu_fill(&f.k.t, &rng, -1, 1), tu_fill(&f.v.t, &rng, -1, 1);
    tu_fill(&dout.t, &rng, -1, 1);
    attn_params p = attn_params_default();
    CHECK_OK(attn_pooled_cross_forward(ref, &p, c->grid, c->ratio, &f.q.t, &f.k.t, &f.v.t, &f.o.t, &lse.t));
    tu_buf o = tu_alloc(ATTN_F64, 1, P, c->H, c->Dv);
    tu_copy(&o.t, &f.o.t);
    tu_buf g[3] = {tu_alloc(ATTN_F64, 1, N, c->H, c->D), tu_alloc(ATTN_F64, 1, c->M, c->Hk, c->D),
                   tu_alloc(ATTN_F64, 1, c->M, c->Hk, c->Dv)};
    CHECK_OK(attn_pooled_cross_backward(ref, &p, c->grid, c->ratio, &f.q.t, &f.k.t, &f.v.t, &o.t,
                                        &lse.t, &dout.t, &g[0].t, &g[1].t, &g[2].t));
    tu_buf *ins[3] = {&f.q, &f.k, &f.v};
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int w = 0; w < 3; w++) {
        tu_case("pooled cross finite differences %s", names[w]);
        double worst = tu_fd_worst(ins[w], 1e-6, &g[w].t, cross_fd_run, &f, &f.o.t, &dout.t);
        CHECK(worst <= 1e-6, "%s: worst |fd - analytic| / (|fd| + 1) = %g", names[w], worst);
    }
    for (int x = 0; x < 3; x++) tu_free(&g[x]);
    tu_free(&f.q), tu_free(&f.k), tu_free(&f.v), tu_free(&f.o), tu_free(&o), tu_free(&dout), tu_free(&lse);
}

/* Whether every element of b still holds x. */
static int all_equal(const tu_buf *b, double x) {
    for (int64_t i = 0; i < tu_numel(&b->t); i++)
        if (tu_load(&b->t, tu_offset(&b->t, i)) != x) return 0;
    return 1;
}

static void test_pooled_cross_bad_input(attn_ctx *cpu) {
    attn_grid g = {1, 4, 6}, r = {1, 2, 3};
    const int64_t N = 24, P = 4, M = 9, H = 2, Hk = 1, D = 4, Dv = 3;
    tu_rng rng = {tu_seed(SALT, 30)};
    tu_buf q = tu_alloc(ATTN_F32, 1, N, H, D), k = tu_alloc(ATTN_F32, 1, M, Hk, D), v = tu_alloc(ATTN_F32, 1, M, Hk, Dv);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    tu_buf o = tu_alloc(ATTN_F32, 1, P, H, Dv), lse = tu_alloc(ATTN_F32, 1, H, P, -1), dout = tu_alloc(ATTN_F32, 1, P, H, Dv);
    tu_fill(&dout.t, &rng, -1, 1);
    attn_params p = attn_params_default();
    CHECK_OK(attn_pooled_cross_forward(cpu, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t));
    tu_buf dq = tu_alloc(ATTN_F32, 1, N, H, D), dk = tu_alloc(ATTN_F32, 1, M, Hk, D), dv = tu_alloc(ATTN_F32, 1, M, Hk, Dv);
    tu_fill_const(&dq.t, 7), tu_fill_const(&dk.t, 7), tu_fill_const(&dv.t, 7);
    tu_buf small = tu_alloc(ATTN_F32, 1, P, H, Dv + 1), dq_pooled = tu_alloc(ATTN_F32, 1, P, H, D);
    tu_case("pooled cross backward: bad input");
    CHECK_ERR(attn_pooled_cross_backward(cpu, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &small.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_SHAPE, "dout");
    CHECK_ERR(attn_pooled_cross_backward(cpu, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &dq_pooled.t, &dk.t, &dv.t),
              ATTN_ERR_SHAPE, "dq");
    CHECK_ERR(attn_pooled_cross_backward(cpu, &p, g, r, &q.t, &k.t, &v.t, &o.t, NULL, &dout.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_NULL, "lse");
    CHECK_ERR(attn_pooled_cross_backward(cpu, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &dq.t, &dk.t, &q.t),
              ATTN_ERR_SHAPE, "dv");
    CHECK_ERR(attn_pooled_cross_backward(cpu, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &dq.t, &k.t, &dv.t),
              ATTN_ERR_ALIAS, "dk");
    attn_tensor over_dk = dv.t; /* v's shape, in dk's memory */
    over_dk.data = dk.mem;
    CHECK_ERR(attn_pooled_cross_backward(cpu, &p, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &dq.t, &dk.t, &over_dk),
              ATTN_ERR_ALIAS, "dv overlaps dk");
    attn_grid wrong = {1, 8, 6};
    CHECK_ERR(attn_pooled_cross_backward(cpu, &p, wrong, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_SHAPE, "q->shape[1]");
    attn_params causal = p;
    causal.causal = 1;
    CHECK_ERR(attn_pooled_cross_backward(cpu, &causal, g, r, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_ARG, "params");
    CHECK(all_equal(&dq, 7) && all_equal(&dk, 7) && all_equal(&dv, 7), "a refused call wrote an output");
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&o), tu_free(&lse), tu_free(&dout);
    tu_free(&dq), tu_free(&dk), tu_free(&dv), tu_free(&small), tu_free(&dq_pooled);
}

int main(void) {
    attn_ctx *cpu = tu_ctx("test_grid", ATTN_BACKEND_CPU, 2);
    attn_ctx *ref = tu_ctx("test_grid", ATTN_BACKEND_REF, 1);
    test_pool(ref);
    test_sra(cpu, ref);
    test_sra_fd(ref);
    test_pooled_cross_backward(cpu, ref);
    test_pooled_cross_fd(ref);
    test_pooled_cross_bad_input(cpu);
    attn_ctx_free(cpu);
    attn_ctx_free(ref);
    return tu_finish("test_grid");
}
