/* 2-D / 3-D neighbourhood attention: the forward against a naive double
 * computation of the rule (1e-5 rel RMS), a radius that covers the grid
 * against dense attention, CPU against the reference forward and backward,
 * and the reference backward against central finite differences (f64, eps
 * 1e-6, 1e-6 relative). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "test_util.h"

#define SALT 0x3b1du

static void naive(const tu_buf *q, const tu_buf *k, const tu_buf *v, attn_grid g, attn_grid r,
                  tu_buf *o) {
    const int64_t T = q->t.shape[1], H = q->t.shape[2], D = q->t.shape[3], Dv = v->t.shape[3];
    const int64_t grp = H / k->t.shape[2];
    double *s = malloc((size_t)T * sizeof(double));
    for (int64_t i = 0; i < T; i++)
        for (int64_t h = 0; h < H; h++) {
            int64_t fi = i / (g.h * g.w), yi = (i / g.w) % g.h, xi = i % g.w;
            double mx = -INFINITY, sum = 0.0;
            for (int64_t j = 0; j < T; j++) {
                int64_t fj = j / (g.h * g.w), yj = (j / g.w) % g.h, xj = j % g.w;
                s[j] = -INFINITY;
                if (labs(fi - fj) > r.f || labs(yi - yj) > r.h || labs(xi - xj) > r.w) continue;
                double dot = 0.0;
                for (int64_t e = 0; e < D; e++)
                    dot += tu_load(&q->t, tu_off4(&q->t, 0, i, h, e)) * tu_load(&k->t, tu_off4(&k->t, 0, j, h / grp, e));
                s[j] = dot / sqrt((double)D);
                mx = fmax(mx, s[j]);
            }
            for (int64_t j = 0; j < T; j++) sum += s[j] == -INFINITY ? 0.0 : exp(s[j] - mx);
            for (int64_t e = 0; e < Dv; e++) {
                double acc = 0.0;
                for (int64_t j = 0; j < T; j++)
                    if (s[j] != -INFINITY) acc += exp(s[j] - mx) / sum * tu_load(&v->t, tu_off4(&v->t, 0, j, h / grp, e));
                tu_store(&o->t, tu_off4(&o->t, 0, i, h, e), acc);
            }
        }
    free(s);
}

static void one_case(attn_ctx *cpu, attn_ctx *ref, attn_grid g, attn_grid r, int64_t bq, int64_t bk,
                     uint64_t seed) {
    const int64_t T = g.f * g.h * g.w, H = 2, Hk = 1, D = 16, Dv = 8;
    tu_rng rng = {seed};
    tu_buf q = tu_alloc(ATTN_F32, 1, T, H, D), k = tu_alloc(ATTN_F32, 1, T, Hk, D), v = tu_alloc(ATTN_F32, 1, T, Hk, Dv);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    attn_plan *plan = NULL;
    CHECK_OK(attn_plan_neighborhood(g, r, bq, bk, &plan));
    attn_params p = attn_params_default();
    tu_buf o = tu_alloc(ATTN_F32, 1, T, H, Dv), lse = tu_alloc(ATTN_F32, 1, H, T, -1);
    tu_buf on = tu_alloc(ATTN_F64, 1, T, H, Dv);
    tu_case("neighbourhood %lldx%lldx%lld radius %lld,%lld,%lld blocks %lldx%lld vs naive", (long long)g.f,
            (long long)g.h, (long long)g.w, (long long)r.f, (long long)r.h, (long long)r.w, (long long)bq, (long long)bk);
    CHECK_OK(attn_neighborhood_forward(cpu, &p, g, r, plan, &q.t, &k.t, &v.t, &o.t, &lse.t));
    naive(&q, &k, &v, g, r, &on);
    CHECK_CLOSE("o", &o.t, &on.t, 1e-5, 1e-4);
    tu_case("neighbourhood: CPU vs reference, forward and backward");
    tu_buf o64 = tu_alloc(ATTN_F64, 1, T, H, Dv);
    CHECK_OK(attn_neighborhood_forward(ref, &p, g, r, plan, &q.t, &k.t, &v.t, &o64.t, NULL));
    CHECK_CLOSE("o ref", &o.t, &o64.t, 1e-5, 1e-4);
    tu_buf dout = tu_alloc(ATTN_F32, 1, T, H, Dv);
    tu_fill(&dout.t, &rng, -1, 1);
    tu_buf g32[3] = {tu_alloc(ATTN_F32, 1, T, H, D), tu_alloc(ATTN_F32, 1, T, Hk, D), tu_alloc(ATTN_F32, 1, T, Hk, Dv)};
    tu_buf g64[3] = {tu_alloc(ATTN_F64, 1, T, H, D), tu_alloc(ATTN_F64, 1, T, Hk, D), tu_alloc(ATTN_F64, 1, T, Hk, Dv)};
    CHECK_OK(attn_neighborhood_backward(cpu, &p, g, r, plan, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &g32[0].t, &g32[1].t, &g32[2].t));
    CHECK_OK(attn_neighborhood_backward(ref, &p, g, r, plan, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &g64[0].t, &g64[1].t, &g64[2].t));
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int x = 0; x < 3; x++) CHECK_CLOSE(names[x], &g32[x].t, &g64[x].t, 1e-5, 1e-4);
    for (int x = 0; x < 3; x++) tu_free(&g32[x]), tu_free(&g64[x]);
    attn_plan_free(plan);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&o), tu_free(&lse), tu_free(&on), tu_free(&o64), tu_free(&dout);
}

static double loss(attn_ctx *ref, attn_grid g, attn_grid r, const attn_plan *plan, const tu_buf *q,
                   const tu_buf *k, const tu_buf *v, const tu_buf *dout) {
    attn_params p = attn_params_default();
    tu_buf o = tu_alloc(ATTN_F64, 1, q->t.shape[1], q->t.shape[2], v->t.shape[3]);
    CHECK_OK(attn_neighborhood_forward(ref, &p, g, r, plan, &q->t, &k->t, &v->t, &o.t, NULL));
    double s = 0.0;
    for (int64_t x = 0; x < tu_numel(&o.t); x++) s += tu_load(&o.t, x) * tu_load(&dout->t, x);
    tu_free(&o);
    return s;
}

static void finite_differences(attn_ctx *ref) {
    attn_grid g = {2, 3, 3}, r = {1, 1, 0};
    const int64_t T = 18, H = 1, D = 3, Dv = 2;
    tu_rng rng = {tu_seed(SALT, 9)};
    tu_buf q = tu_alloc(ATTN_F64, 1, T, H, D), k = tu_alloc(ATTN_F64, 1, T, H, D), v = tu_alloc(ATTN_F64, 1, T, H, Dv);
    tu_buf dout = tu_alloc(ATTN_F64, 1, T, H, Dv);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1), tu_fill(&dout.t, &rng, -1, 1);
    attn_plan *plan = NULL;
    CHECK_OK(attn_plan_neighborhood(g, r, 4, 5, &plan));
    attn_params p = attn_params_default();
    tu_buf o = tu_alloc(ATTN_F64, 1, T, H, Dv), lse = tu_alloc(ATTN_F64, 1, H, T, -1);
    CHECK_OK(attn_neighborhood_forward(ref, &p, g, r, plan, &q.t, &k.t, &v.t, &o.t, &lse.t));
    tu_buf gr[3] = {tu_alloc(ATTN_F64, 1, T, H, D), tu_alloc(ATTN_F64, 1, T, H, D), tu_alloc(ATTN_F64, 1, T, H, Dv)};
    CHECK_OK(attn_neighborhood_backward(ref, &p, g, r, plan, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t, &gr[0].t, &gr[1].t, &gr[2].t));
    tu_buf *ins[3] = {&q, &k, &v};
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int w = 0; w < 3; w++) {
        tu_case("neighbourhood finite differences %s", names[w]);
        double worst = 0.0, gmax = 0.0;
        for (int64_t x = 0; x < tu_numel(&ins[w]->t); x++) {
            double keep = tu_load(&ins[w]->t, x), eps = 1e-6;
            tu_store(&ins[w]->t, x, keep + eps);
            double up = loss(ref, g, r, plan, &q, &k, &v, &dout);
            tu_store(&ins[w]->t, x, keep - eps);
            double down = loss(ref, g, r, plan, &q, &k, &v, &dout);
            tu_store(&ins[w]->t, x, keep);
            double fd = (up - down) / (2 * eps), an = tu_load(&gr[w].t, x);
            worst = fmax(worst, fabs(fd - an));
            gmax = fmax(gmax, fabs(an));
        }
        CHECK(worst <= 1e-6 * (gmax + 1), "%s: worst %g (max |grad| %g)", names[w], worst, gmax);
    }
    for (int x = 0; x < 3; x++) tu_free(&gr[x]);
    attn_plan_free(plan);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&dout), tu_free(&o), tu_free(&lse);
}

int main(void) {
    attn_ctx *cpu = tu_ctx("test_neighborhood", ATTN_BACKEND_CPU, 2);
    attn_ctx *ref = tu_ctx("test_neighborhood", ATTN_BACKEND_REF, 1);
    one_case(cpu, ref, (attn_grid){1, 12, 16}, (attn_grid){0, 2, 3}, 32, 32, tu_seed(SALT, 1));
    one_case(cpu, ref, (attn_grid){1, 9, 7}, (attn_grid){0, 1, 1}, 17, 13, tu_seed(SALT, 2));
    one_case(cpu, ref, (attn_grid){4, 5, 6}, (attn_grid){1, 2, 1}, 24, 48, tu_seed(SALT, 3));
    one_case(cpu, ref, (attn_grid){1, 6, 6}, (attn_grid){0, 9, 9}, 16, 16, tu_seed(SALT, 4)); /* all */
    finite_differences(ref);
    tu_case("neighbourhood: bad input");
    attn_plan *pl = NULL;
    CHECK(attn_plan_neighborhood((attn_grid){1, 4, 4}, (attn_grid){0, -1, 1}, 8, 8, &pl) == ATTN_ERR_ARG &&
              strstr(attn_last_error(), "radius"),
          "a negative radius must be named: %s", attn_last_error());
    attn_ctx_free(cpu);
    attn_ctx_free(ref);
    return tu_finish("test_neighborhood");
}
