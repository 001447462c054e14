/* Planners: block masks, static patterns, pooled-score selection and PSA
 * levels. Plans are opaque, so each planner is checked through what it makes
 * attention do: the forward with the planner's plan must equal the forward
 * with a plan built by hand from the rule (bitwise: the same plan runs the
 * same arithmetic), and the selection planners must find planted structure.
 * Density is checked exactly where the rule fixes it. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "test_util.h"

#define SALT 0x91a7u

static attn_plan *from_mask(int64_t n, int64_t m, int64_t bq, int64_t bk, int64_t heads,
                            const uint8_t *mask) {
    attn_plan *pl = NULL;
    attn_status st = attn_plan_from_block_mask(&pl, n, m, bq, bk, heads, mask);
    CHECK(st == ATTN_OK, "plan_from_block_mask: %s", attn_last_error());
    return pl;
}

/* o of a forward with plan pl (NULL: dense) on ctx. */
static tu_fwd_out run(attn_ctx *ctx, attn_plan *pl, int causal, const tu_buf *q,
                      const tu_buf *k, const tu_buf *v) {
    attn_params p = attn_params_default();
    p.plan = pl;
    p.causal = causal;
    tu_fwd_out r = tu_run_forward(ctx, &p, &q->t, &k->t, &v->t, ATTN_F32, ATTN_F32, 1);
    CHECK(r.st == ATTN_OK, "forward: %s", attn_last_error());
    return r;
}

static void same_output(const char *what, tu_fwd_out *a, tu_fwd_out *b) {
    CHECK(tu_same_bits(&a->o, &b->o), "%s: outputs differ", what);
    tu_fwd_free(a);
    tu_fwd_free(b);
}

/* A mask that keeps every block equals dense; the static rule matches a
 * hand-built mask; global tokens see and are seen by all. */
static void static_plans(attn_ctx *cpu) {
    const int64_t N = 300, M = 300, H = 2, D = 32, bq = 32, bk = 32;
    const int64_t nqb = (N + bq - 1) / bq, nkb = (M + bk - 1) / bk;
    tu_rng rng = {tu_seed(SALT, 1)};
    tu_buf q = tu_alloc(ATTN_F32, 1, N, H, D), k = tu_alloc(ATTN_F32, 1, M, H, D),
           v = tu_alloc(ATTN_F32, 1, M, H, D);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    uint8_t *mask = calloc((size_t)(nqb * nkb), 1);

    tu_case("block mask of every block = dense causal");
    memset(mask, 1, (size_t)(nqb * nkb));
    attn_plan *all = from_mask(N, M, bq, bk, 1, mask);
    CHECK(fabs(attn_plan_density(all) - 1.0) < 1e-12, "density %g", attn_plan_density(all));
    tu_fwd_out a = run(cpu, all, 1, &q, &k, &v), b = run(cpu, NULL, 1, &q, &k, &v);
    CHECK_CLOSE("o", &a.o.t, &b.o.t, 1e-6, 1e-6);
    tu_fwd_free(&a), tu_fwd_free(&b);
    attn_plan_free(all);

    static const int64_t rules[][3] = {{1, 0, 0}, {2, 3, 0}, {1, 0, 40}, {3, 2, 70}, {0, 1, 0}};
    for (size_t r = 0; r < sizeof rules / sizeof rules[0]; r++) {
        int64_t local = rules[r][0], stride = rules[r][1], global = rules[r][2];
        tu_case("static local=%lld stride=%lld global=%lld", (long long)local,
                (long long)stride, (long long)global);
        memset(mask, 0, (size_t)(nqb * nkb));
        for (int64_t qb = 0; qb < nqb; qb++) {
            int64_t last = (qb + 1) * bq - 1 < N - 1 ? (qb + 1) * bq - 1 : N - 1;
            int64_t diag = last / bk; /* N == M */
            for (int64_t kb = 0; kb < nkb; kb++) {
                bool on = qb * bq < global || kb * bk < global ||
                          (diag - kb >= 0 && diag - kb < local) ||
                          (stride > 0 && kb <= diag && (diag - kb) % stride == 0);
                mask[qb * nkb + kb] = on;
            }
        }
        attn_plan *st = NULL, *hand = from_mask(N, M, bq, bk, 1, mask);
        CHECK_OK(attn_plan_static(&st, N, M, bq, bk, local, stride, global));
        CHECK(fabs(attn_plan_density(st) - attn_plan_density(hand)) < 1e-12,
              "density %g vs hand-built %g", attn_plan_density(st), attn_plan_density(hand));
        a = run(cpu, st, 1, &q, &k, &v);
        b = run(cpu, hand, 1, &q, &k, &v);
        same_output("static vs hand-built", &a, &b);
        attn_plan_free(st);
        attn_plan_free(hand);
    }
    tu_case("static: bad arguments");
    attn_plan *bad = NULL;
    CHECK(attn_plan_static(&bad, N, M, bq, bk, -1, 0, 0) == ATTN_ERR_ARG && !bad &&
              strstr(attn_last_error(), "local"),
          "local = -1: %s", attn_last_error());
    CHECK(attn_plan_from_block_mask(&bad, N, M, bq, bk, 1, NULL) == ATTN_ERR_NULL,
          "mask NULL: %s", attn_last_error());
    free(mask);
    tu_free(&q), tu_free(&k), tu_free(&v);
}

/* Planted structure: each query block's queries point along one direction
 * that only the keys of a few chosen key blocks share; the selection must
 * keep exactly those blocks (top_k = their number), and a mass threshold
 * must keep them too. */
static void planted_selection(attn_ctx *cpu) {
    const int64_t N = 256, M = 512, H = 2, Hk = 1, D = 16, bq = 32, bk = 64;
    const int64_t nqb = N / bq, nkb = M / bk, chosen = 2;
    tu_rng rng = {tu_seed(SALT, 2)};
    tu_buf q = tu_alloc(ATTN_F32, 1, N, H, D), k = tu_alloc(ATTN_F32, 1, M, Hk, D),
           v = tu_alloc(ATTN_F32, 1, M, Hk, D);
    tu_fill(&q.t, &rng, -0.05, 0.05), tu_fill(&k.t, &rng, -0.05, 0.05);
    tu_fill(&v.t, &rng, -1, 1);
    uint8_t *want = calloc((size_t)(H * nqb * nkb), 1);
    /* direction of query block qb: unit vector e_(qb % D); key blocks qb % nkb
     * and (qb + 3) % nkb hold it strongly */
    for (int64_t qb = 0; qb < nqb; qb++) {
        int64_t axis = qb % D;
        int64_t kbs[2] = {qb % nkb, (qb + 3) % nkb};
        for (int64_t i = qb * bq; i < (qb + 1) * bq; i++)
            for (int64_t h = 0; h < H; h++) tu_store(&q.t, tu_off4(&q.t, 0, i, h, axis), 8.0);
        for (int c = 0; c < 2; c++) {
            for (int64_t j = kbs[c] * bk; j < (kbs[c] + 1) * bk; j++)
                tu_store(&k.t, tu_off4(&k.t, 0, j, 0, axis), 8.0);
            for (int64_t h = 0; h < H; h++) want[(h * nqb + qb) * nkb + kbs[c]] = 1;
        }
    }
    /* key blocks planted for one query block also match another block's axis
     * only if they share it: axes differ (qb % D, nqb <= D), so the top two
     * blocks of each query block are exactly its planted ones */
    attn_plan *hand = from_mask(N, M, bq, bk, H, want);
    attn_select_opts o = {bq, bk, chosen, 0.0f, 0, 0, 0, NULL};
    attn_plan *sel = NULL;
    tu_case("select top-k finds the planted blocks");
    CHECK_OK(attn_plan_select(cpu, &sel, &q.t, &k.t, &o));
    tu_fwd_out a = run(cpu, sel, 0, &q, &k, &v), b = run(cpu, hand, 0, &q, &k, &v);
    same_output("top-k vs planted", &a, &b);
    attn_plan_free(sel);

    tu_case("select by mass 0.9 keeps the planted blocks and little else");
    o.top_k = 0;
    o.mass = 0.9f;
    CHECK_OK(attn_plan_select(cpu, &sel, &q.t, &k.t, &o));
    CHECK(fabs(attn_plan_density(sel) - attn_plan_density(hand)) < 1e-12,
          "density %g, planted %g", attn_plan_density(sel), attn_plan_density(hand));
    a = run(cpu, sel, 0, &q, &k, &v);
    b = run(cpu, hand, 0, &q, &k, &v);
    same_output("mass vs planted", &a, &b);
    attn_plan_free(sel);

    tu_case("AdaSpa: calibrated masses from the exact LSE keep the planted blocks");
    {
        tu_fwd_out dense = run(cpu, NULL, 0, &q, &k, &v); /* one dense pass: the row LSE */
        attn_select_opts ao = {bq, bk, 0, 0.9f, 0, 0, 0, &dense.lse.t};
        CHECK_OK(attn_plan_select(cpu, &sel, &q.t, &k.t, &ao));
        CHECK(fabs(attn_plan_density(sel) - attn_plan_density(hand)) < 1e-12,
              "density %g, planted %g", attn_plan_density(sel), attn_plan_density(hand));
        a = run(cpu, sel, 0, &q, &k, &v);
        b = run(cpu, hand, 0, &q, &k, &v);
        same_output("AdaSpa vs planted", &a, &b);
        attn_plan_free(sel);
        attn_select_opts bad_lse = ao;
        bad_lse.lse = &q.t; /* wrong rank */
        CHECK(attn_plan_select(cpu, &sel, &q.t, &k.t, &bad_lse) != ATTN_OK &&
                  strstr(attn_last_error(), "lse"),
              "a bad lse must be named: %s", attn_last_error());
        tu_fwd_free(&dense);
    }

    tu_case("PSA: planted blocks at level 0, the next quarter pooled");
    float quota[3] = {2.0f / 8.0f, 2.0f / 8.0f, 0.0f};
    attn_select_opts po = {bq, bk, 0, 0.0f, 0, 0, 0, NULL};
    attn_plan *psa = NULL;
    CHECK_OK(attn_plan_psa(cpu, &psa, &q.t, &k.t, &po, 3, quota));
    /* budget: 2 blocks at full cost + 2 at half, of 8 */
    double want_density = (2.0 + 2.0 * 0.5) / 8.0;
    CHECK(fabs(attn_plan_density(psa) - want_density) < 1e-12, "density %g, want %g",
          attn_plan_density(psa), want_density);
    /* planted blocks carry nearly all the mass, so PSA stays close to them */
    a = run(cpu, psa, 0, &q, &k, &v);
    b = run(cpu, hand, 0, &q, &k, &v);
    CHECK_CLOSE("psa vs planted", &a.o.t, &b.o.t, 2e-2, 2e-1);
    tu_fwd_free(&a), tu_fwd_free(&b);
    attn_plan_free(psa);

    tu_case("PSA by thresholds: the planted blocks hold the mass, so one level suffices");
    float thr[2] = {0.9f, 0.99f};
    CHECK_OK(attn_plan_psa_thresholds(cpu, &psa, &q.t, &k.t, &po, 2, thr));
    /* the two planted blocks reach 0.9 at level 0; level 1 takes the blocks
     * up to 0.99: the density sits between the planted one and that plus half */
    CHECK(attn_plan_density(psa) >= attn_plan_density(hand) - 1e-12 &&
              attn_plan_density(psa) <= attn_plan_density(hand) + 0.5,
          "density %g (planted %g)", attn_plan_density(psa), attn_plan_density(hand));
    a = run(cpu, psa, 0, &q, &k, &v);
    b = run(cpu, hand, 0, &q, &k, &v);
    CHECK_CLOSE("psa thresholds vs planted", &a.o.t, &b.o.t, 2e-2, 2e-1);
    tu_fwd_free(&a), tu_fwd_free(&b);
    attn_plan_free(psa);
    float bad_thr[2] = {0.9f, 0.5f};
    CHECK(attn_plan_psa_thresholds(cpu, &psa, &q.t, &k.t, &po, 2, bad_thr) == ATTN_ERR_ARG &&
              strstr(attn_last_error(), "threshold"),
          "descending thresholds must be refused: %s", attn_last_error());

    tu_case("PSA: one level with quota 1 equals dense");
    float all[1] = {1.0f};
    CHECK_OK(attn_plan_psa(cpu, &psa, &q.t, &k.t, &po, 1, all));
    a = run(cpu, psa, 0, &q, &k, &v);
    b = run(cpu, NULL, 0, &q, &k, &v);
    CHECK_CLOSE("o", &a.o.t, &b.o.t, 1e-6, 1e-6);
    tu_fwd_free(&a), tu_fwd_free(&b);
    attn_plan_free(psa);

    tu_case("select and PSA: bad arguments");
    attn_plan *bad = NULL;
    attn_select_opts z = {bq, bk, 0, 0.0f, 0, 0, 0, NULL};
    CHECK(attn_plan_select(cpu, &bad, &q.t, &k.t, &z) == ATTN_ERR_ARG && !bad &&
              strstr(attn_last_error(), "mass"),
          "mass 0: %s", attn_last_error());
    float over[2] = {0.7f, 0.7f};
    CHECK(attn_plan_psa(cpu, &bad, &q.t, &k.t, &po, 2, over) == ATTN_ERR_ARG &&
              strstr(attn_last_error(), "quota"),
          "quotas over 1: %s", attn_last_error());
    CHECK(attn_plan_select(NULL, &bad, &q.t, &k.t, &o) == ATTN_ERR_NULL, "ctx NULL");

    attn_plan_free(hand);
    free(want);
    tu_free(&q), tu_free(&k), tu_free(&v);
}

/* Causal selection keeps the diagonal and never lists a block above it. */
static void causal_selection(attn_ctx *cpu, attn_ctx *ref) {
    const int64_t N = 200, M = 200, H = 2, D = 24, bq = 32, bk = 32;
    tu_rng rng = {tu_seed(SALT, 3)};
    tu_buf q = tu_alloc(ATTN_F32, 1, N, H, D), k = tu_alloc(ATTN_F32, 1, M, H, D),
           v = tu_alloc(ATTN_F32, 1, M, H, D);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    attn_select_opts o = {bq, bk, 2, 0.0f, 1, 1, 1, NULL};
    attn_plan *sel = NULL;
    tu_case("causal top-2 with diagonal and first block, vs reference");
    CHECK_OK(attn_plan_select(cpu, &sel, &q.t, &k.t, &o));
    attn_params p = attn_params_default();
    p.causal = 1;
    p.plan = sel;
    attn_ctx *cpus[1] = {cpu};
    tu_check_forward(cpus, 1, ref, &p, &p, &q.t, &k.t, &v.t, ATTN_F32, 1);
    /* every row sees its own diagonal key: no row is empty */
    tu_fwd_out a = run(cpu, sel, 1, &q, &k, &v);
    int empty = 0;
    for (int64_t x = 0; x < tu_numel(&a.lse.t); x++)
        if (tu_load(&a.lse.t, tu_offset(&a.lse.t, x)) == -INFINITY) empty++;
    CHECK(empty == 0, "%d rows saw no key", empty);
    tu_fwd_free(&a);
    attn_plan_free(sel);
    tu_free(&q), tu_free(&k), tu_free(&v);
}

int main(void) {
    attn_ctx *cpu = tu_ctx("test_planners", ATTN_BACKEND_CPU, 2);
    attn_ctx *ref = tu_ctx("test_planners", ATTN_BACKEND_REF, 1);
    static_plans(cpu);
    planted_selection(cpu);
    causal_selection(cpu, ref);
    attn_ctx_free(cpu);
    attn_ctx_free(ref);
    return tu_finish("test_planners");
}
