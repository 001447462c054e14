/* Token grids: pooling equals patch means and its backward is its adjoint;
 * spatial-reduction attention and pooled cross-attention equal attention on
 * the pooled tokens (ratio 1: plain attention, bitwise), CPU against the
 * reference (f32 tolerances of test_util.h), and the SRA backward against
 * central finite differences of the reference (f64, eps 1e-6, 1e-6 relative). */
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

int main(void) {
    attn_ctx *cpu = tu_ctx("test_grid", ATTN_BACKEND_CPU, 2);
    attn_ctx *ref = tu_ctx("test_grid", ATTN_BACKEND_REF, 1);
    test_pool(ref);
    test_sra(cpu, ref);
    test_sra_fd(ref);
    attn_ctx_free(cpu);
    attn_ctx_free(ref);
    return tu_finish("test_grid");
}
