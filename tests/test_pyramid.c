/* Plans with pyramid levels: a level-l entry visits its key block pooled by
 * 2^l (group means of K and V, logit + ln(group size)).
 *
 *   1. CPU forward and backward on random mixed-level plans against the
 *      reference (f32 tolerances of test_util.h: rel RMS 1e-5);
 *   2. planted structure: when every group of 2^l keys holds identical rows,
 *      pooling loses nothing, so a plan with every block at level l must equal
 *      exact dense attention (reference, 1e-12; CPU, 1e-5);
 *   3. the reference backward through pooled blocks against central finite
 *      differences of the reference forward (f64, eps 1e-6, tolerance 1e-6);
 *   4. density counts a pooled block as 1/2^l of its logits. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "test_util.h"

#define SALT 0x5079u

/* A plan over n x m with blocks bq x bk whose query blocks visit every key
 * block (per head when heads > 1) at a random level in 0..max_level, or skip
 * it with probability skip / 8; level-0 entries take mask `mask0`. */
static attn_plan *random_plan(tu_rng *rng, int64_t n, int64_t m, int64_t bq, int64_t bk,
                              int64_t heads, int max_level, int skip, uint8_t mask0) {
    int64_t nqb = (n + bq - 1) / bq, nkb = (m + bk - 1) / bk, rows = heads * nqb;
    int64_t *off = calloc((size_t)rows + 1, sizeof *off);
    attn_plan_entry *e = calloc((size_t)(rows * nkb) + 1, sizeof *e);
    int64_t c = 0;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t kb = 0; kb < nkb; kb++) {
            if (tu_int(rng, 0, 7) < skip) continue;
            int lvl = (int)tu_int(rng, 0, max_level);
            while (((int64_t)1 << lvl) > bk) lvl--;
            attn_plan_entry en = {(int32_t)kb, (uint8_t)lvl, lvl ? ATTN_BLOCK_FULL : mask0, 0};
            e[c++] = en;
        }
        off[r + 1] = c;
    }
    attn_plan *pl = NULL;
    attn_status st = attn_plan_create(&pl, n, m, bq, bk, heads, off, e);
    CHECK(st == ATTN_OK, "plan_create: %s", attn_last_error());
    free(off);
    free(e);
    return pl;
}

/* Every key block of every query block at one level. */
static attn_plan *uniform_plan(int64_t n, int64_t m, int64_t bq, int64_t bk, int level) {
    int64_t nqb = (n + bq - 1) / bq, nkb = (m + bk - 1) / bk;
    int64_t *off = calloc((size_t)nqb + 1, sizeof *off);
    attn_plan_entry *e = calloc((size_t)(nqb * nkb), sizeof *e);
    for (int64_t r = 0; r < nqb; r++) {
        for (int64_t kb = 0; kb < nkb; kb++) {
            attn_plan_entry en = {(int32_t)kb, (uint8_t)level, ATTN_BLOCK_FULL, 0};
            e[r * nkb + kb] = en;
        }
        off[r + 1] = (r + 1) * nkb;
    }
    attn_plan *pl = NULL;
    CHECK_OK(attn_plan_create(&pl, n, m, bq, bk, 1, off, e));
    free(off);
    free(e);
    return pl;
}

static void check_backward(attn_ctx *cpu, attn_ctx *ref, const attn_params *p,
                           const attn_tensor *q, const attn_tensor *k, const attn_tensor *v) {
    int64_t B = q->shape[0], N = q->shape[1], H = q->shape[2], D = q->shape[3];
    int64_t M = k->shape[1], Hk = k->shape[2], Dv = v->shape[3];
    tu_rng rng = {tu_seed(SALT, 77)};
    tu_buf o = tu_alloc(ATTN_F32, B, N, H, Dv), lse = tu_alloc(ATTN_F32, B, H, N, -1);
    tu_buf dout = tu_alloc(ATTN_F32, B, N, H, Dv);
    tu_fill(&dout.t, &rng, -1, 1);
    CHECK_OK(attn_forward(cpu, p, q, k, v, &o.t, &lse.t));
    tu_buf g[2][3];
    attn_ctx *ctxs[2] = {cpu, ref};
    attn_dtype dts[2] = {ATTN_F32, ATTN_F64};
    for (int s = 0; s < 2; s++) {
        g[s][0] = tu_alloc(dts[s], B, N, H, D);
        g[s][1] = tu_alloc(dts[s], B, M, Hk, D);
        g[s][2] = tu_alloc(dts[s], B, M, Hk, Dv);
        attn_status st = attn_backward(ctxs[s], p, q, k, v, &o.t, &lse.t, &dout.t, &g[s][0].t,
                                       &g[s][1].t, &g[s][2].t);
        CHECK(st == ATTN_OK, "backward %s: %s", s ? "ref" : "cpu", attn_last_error());
    }
    CHECK_CLOSE("dq", &g[0][0].t, &g[1][0].t, 1e-5, 1e-4);
    CHECK_CLOSE("dk", &g[0][1].t, &g[1][1].t, 1e-5, 1e-4);
    CHECK_CLOSE("dv", &g[0][2].t, &g[1][2].t, 1e-5, 1e-4);
    for (int s = 0; s < 2; s++)
        for (int x = 0; x < 3; x++) tu_free(&g[s][x]);
    tu_free(&o), tu_free(&lse), tu_free(&dout);
}

/* 1. random mixed-level plans, CPU (every ISA) vs reference */
static void random_plans(attn_ctx *const *cpus, int ncpu, attn_ctx *ref) {
    static const struct {
        int64_t B, N, M, H, Hk, D, Dv, bq, bk, heads;
        int max_level, causal;
    } cs[] = {
        {1, 97, 131, 4, 2, 64, 64, 16, 16, 1, 4, 0},
        {2, 64, 256, 4, 4, 32, 48, 32, 64, 4, 6, 1},
        {1, 130, 130, 2, 1, 17, 9, 64, 32, 2, 5, 1},
        {1, 300, 515, 2, 2, 128, 128, 64, 64, 1, 3, 0},
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        tu_rng rng = {tu_seed(SALT, i)};
        tu_buf q = tu_alloc(ATTN_F32, cs[i].B, cs[i].N, cs[i].H, cs[i].D);
        tu_buf k = tu_alloc(ATTN_F32, cs[i].B, cs[i].M, cs[i].Hk, cs[i].D);
        tu_buf v = tu_alloc(ATTN_F32, cs[i].B, cs[i].M, cs[i].Hk, cs[i].Dv);
        tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
        attn_plan *pl = random_plan(&rng, cs[i].N, cs[i].M, cs[i].bq, cs[i].bk, cs[i].heads,
                                    cs[i].max_level, 2, ATTN_BLOCK_PARAMS);
        attn_params p = attn_params_default();
        p.causal = cs[i].causal;
        p.plan = pl;
        tu_case("pyramid random plan #%zu N=%lld M=%lld blocks %lldx%lld levels<=%d causal=%d", i,
                (long long)cs[i].N, (long long)cs[i].M, (long long)cs[i].bq, (long long)cs[i].bk,
                cs[i].max_level, cs[i].causal);
        tu_check_forward(cpus, ncpu, ref, &p, &p, &q.t, &k.t, &v.t, ATTN_F32, 1);
        check_backward(cpus[0], ref, &p, &q.t, &k.t, &v.t);
        if (i == 1) { /* with a soft-cap too */
            p.softcap = 3.0f;
            tu_case("pyramid random plan #%zu with softcap", i);
            tu_check_forward(cpus, ncpu, ref, &p, &p, &q.t, &k.t, &v.t, ATTN_F32, 1);
            check_backward(cpus[0], ref, &p, &q.t, &k.t, &v.t);
        }
        attn_plan_free(pl);
        tu_free(&q), tu_free(&k), tu_free(&v);
    }
}

/* 2. groups of identical keys: pooling is exact */
static void planted_groups(attn_ctx *cpu, attn_ctx *ref) {
    const int64_t N = 70, M = 256, H = 2, D = 24, bk = 32;
    for (int level = 1; level <= 5; level++) {
        tu_rng rng = {tu_seed(SALT, 100 + (uint64_t)level)};
        tu_buf q = tu_alloc(ATTN_F64, 1, N, H, D);
        tu_buf k = tu_alloc(ATTN_F64, 1, M, H, D), v = tu_alloc(ATTN_F64, 1, M, H, D);
        tu_fill(&q.t, &rng, -2, 2);
        int64_t f = (int64_t)1 << level;
        for (int64_t j = 0; j < M; j += f) /* one random row per group, repeated */
            for (int64_t h = 0; h < H; h++)
                for (int64_t x = 0; x < D; x++) {
                    double kx = tu_uniform(&rng, -2, 2), vx = tu_uniform(&rng, -1, 1);
                    for (int64_t r = j; r < j + f; r++) {
                        tu_store(&k.t, tu_off4(&k.t, 0, r, h, x), kx);
                        tu_store(&v.t, tu_off4(&v.t, 0, r, h, x), vx);
                    }
                }
        attn_plan *pl = uniform_plan(N, M, 16, bk, level);
        attn_params dense = attn_params_default(), pooled = dense;
        pooled.plan = pl;
        tu_case("pyramid planted groups level %d", level);
        tu_fwd_out a = tu_run_forward(ref, &dense, &q.t, &k.t, &v.t, ATTN_F64, ATTN_F64, 1);
        tu_fwd_out b = tu_run_forward(ref, &pooled, &q.t, &k.t, &v.t, ATTN_F64, ATTN_F64, 1);
        CHECK(a.st == ATTN_OK && b.st == ATTN_OK, "reference runs: %s", attn_last_error());
        CHECK_CLOSE("ref pooled o vs dense", &b.o.t, &a.o.t, 1e-12, 1e-12);
        CHECK_CLOSE("ref pooled lse vs dense", &b.lse.t, &a.lse.t, 1e-12, 1e-12);
        /* the CPU engine on the same pooled plan, f32 inputs */
        tu_buf q32 = tu_alloc(ATTN_F32, 1, N, H, D), k32 = tu_alloc(ATTN_F32, 1, M, H, D),
               v32 = tu_alloc(ATTN_F32, 1, M, H, D);
        tu_copy(&q32.t, &q.t), tu_copy(&k32.t, &k.t), tu_copy(&v32.t, &v.t);
        tu_fwd_out c = tu_run_forward(cpu, &pooled, &q32.t, &k32.t, &v32.t, ATTN_F32, ATTN_F32, 1);
        CHECK(c.st == ATTN_OK, "cpu pooled: %s", attn_last_error());
        CHECK_CLOSE("cpu pooled o vs dense", &c.o.t, &a.o.t, 1e-5, 1e-4);
        CHECK(fabs(attn_plan_density(pl) - 1.0 / (double)f) < 1e-12, "density %g, want %g",
              attn_plan_density(pl), 1.0 / (double)f);
        tu_fwd_free(&a), tu_fwd_free(&b), tu_fwd_free(&c);
        tu_free(&q32), tu_free(&k32), tu_free(&v32);
        attn_plan_free(pl);
        tu_free(&q), tu_free(&k), tu_free(&v);
    }
}

/* 3. reference gradients through pooled blocks vs finite differences */
static double loss(attn_ctx *ref, const attn_params *p, const attn_tensor *q,
                   const attn_tensor *k, const attn_tensor *v, const attn_tensor *dout) {
    tu_fwd_out r = tu_run_forward(ref, p, q, k, v, ATTN_F64, ATTN_F64, 0);
    double s = 0.0;
    for (int64_t x = 0; x < tu_numel(&r.o.t); x++)
        s += tu_load(&r.o.t, tu_offset(&r.o.t, x)) * tu_load(dout, tu_offset(dout, x));
    tu_fwd_free(&r);
    return s;
}

static void finite_differences(attn_ctx *ref) {
    const int64_t N = 9, M = 21, H = 2, Hk = 1, D = 5, Dv = 3;
    tu_rng rng = {tu_seed(SALT, 200)};
    tu_buf q = tu_alloc(ATTN_F64, 1, N, H, D), k = tu_alloc(ATTN_F64, 1, M, Hk, D),
           v = tu_alloc(ATTN_F64, 1, M, Hk, Dv), dout = tu_alloc(ATTN_F64, 1, N, H, Dv);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    tu_fill(&dout.t, &rng, -1, 1);
    attn_plan *pl = random_plan(&rng, N, M, 4, 8, 1, 3, 1, ATTN_BLOCK_FULL);
    attn_params p = attn_params_default();
    p.plan = pl;
    p.softcap = 2.5f;
    tu_fwd_out f = tu_run_forward(ref, &p, &q.t, &k.t, &v.t, ATTN_F64, ATTN_F64, 1);
    tu_buf dq = tu_alloc(ATTN_F64, 1, N, H, D), dk = tu_alloc(ATTN_F64, 1, M, Hk, D),
           dv = tu_alloc(ATTN_F64, 1, M, Hk, Dv);
    CHECK_OK(attn_backward(ref, &p, &q.t, &k.t, &v.t, &f.o.t, &f.lse.t, &dout.t, &dq.t, &dk.t,
                           &dv.t));
    tu_buf *ins[3] = {&q, &k, &v}, *grads[3] = {&dq, &dk, &dv};
    const char *names[3] = {"dq", "dk", "dv"};
    for (int w = 0; w < 3; w++) {
        tu_case("pyramid finite differences %s", names[w]);
        double worst = 0.0, gmax = 0.0;
        for (int64_t x = 0; x < tu_numel(&ins[w]->t); x++) {
            int64_t off = tu_offset(&ins[w]->t, x);
            double keep = tu_load(&ins[w]->t, off), eps = 1e-6;
            tu_store(&ins[w]->t, off, keep + eps);
            double up = loss(ref, &p, &q.t, &k.t, &v.t, &dout.t);
            tu_store(&ins[w]->t, off, keep - eps);
            double down = loss(ref, &p, &q.t, &k.t, &v.t, &dout.t);
            tu_store(&ins[w]->t, off, keep);
            double fd = (up - down) / (2 * eps), an = tu_load(&grads[w]->t, tu_offset(&grads[w]->t, x));
            if (fabs(fd - an) > worst) worst = fabs(fd - an);
            if (fabs(an) > gmax) gmax = fabs(an);
        }
        CHECK(worst <= 1e-6 * (gmax + 1), "%s: worst |fd - analytic| = %g (max |grad| %g)",
              names[w], worst, gmax);
    }
    tu_fwd_free(&f);
    tu_free(&dq), tu_free(&dk), tu_free(&dv);
    attn_plan_free(pl);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&dout);
}

int main(void) {
    attn_ctx *cpus[8];
    cpus[0] = tu_ctx("test_pyramid", ATTN_BACKEND_CPU, 2);
    int ncpu = 1 + tu_other_isa_ctxs(cpus + 1, 7, 2);
    attn_ctx *ref = tu_ctx("test_pyramid", ATTN_BACKEND_REF, 1);
    random_plans(cpus, ncpu, ref);
    planted_groups(cpus[0], ref);
    finite_differences(ref);
    for (int i = 0; i < ncpu; i++) attn_ctx_free(cpus[i]);
    attn_ctx_free(ref);
    return tu_finish("test_pyramid");
}
