/* SpAtten pruning: token importance sums the attention probabilities (each
 * row's probabilities add to 1, so the total is heads x rows; a planted
 * heavy key takes most of it; causal rows only give to their past), top
 * tokens rank with ties broken by position and come back in sequence order,
 * token selection gathers a subset, and head importance is each head's
 * output norm; the CPU path matches the reference backend's. Tolerances:
 * 1e-4 x H x N on the total, 1e-9 relative on accumulating, 2e-5 of the
 * largest importance between the backends. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "test_util.h"

#define SALT 0x5a77u

static void test_importance(attn_ctx *cpu) {
    const int64_t B = 2, N = 40, M = 50, H = 4, Hk = 2, D = 8;
    tu_rng rng = {tu_seed(SALT, 1)};
    tu_buf q = tu_alloc(ATTN_F32, B, N, H, D), k = tu_alloc(ATTN_F32, B, M, Hk, D), v = tu_alloc(ATTN_F32, B, M, Hk, D);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    for (int64_t i = 0; i < N; i++) /* key 17 of sequence 1 draws every query */
        for (int64_t h = 0; h < H; h++) tu_store(&q.t, tu_off4(&q.t, 1, i, h, 0), 1.0);
    for (int64_t g = 0; g < Hk; g++) tu_store(&k.t, tu_off4(&k.t, 1, 17, g, 0), 40.0);
    for (int causal = 0; causal <= 1; causal++) {
        tu_case("token importance, causal=%d", causal);
        attn_params p = attn_params_default();
        p.causal = causal;
        tu_fwd_out f = tu_run_forward(cpu, &p, &q.t, &k.t, &v.t, ATTN_F32, ATTN_F32, 1);
        double *imp = calloc((size_t)(B * M), sizeof(double));
        CHECK_OK(attn_token_importance(cpu, &p, &q.t, &k.t, &f.lse.t, imp));
        for (int64_t b = 0; b < B; b++) {
            double total = 0.0;
            for (int64_t j = 0; j < M; j++) total += imp[b * M + j];
            CHECK(fabs(total - (double)(H * N)) < 1e-4 * H * N, "b=%lld: total %.9g, want %lld", (long long)b,
                  total, (long long)(H * N));
        }
        int64_t best = 0;
        for (int64_t j = 1; j < M; j++) best = imp[M + j] > imp[M + best] ? j : best;
        CHECK(best == 17, "the heavy key is %lld, want 17", (long long)best);
        if (causal) /* with N < M the first M - N keys are seen by every row; the last by one */
            CHECK(imp[M - 1] > 0.0 && imp[M - 1] < (double)H + 1e-9, "last key importance %g", imp[M - 1]);
        /* accumulates across calls */
        double before = imp[0];
        CHECK_OK(attn_token_importance(cpu, &p, &q.t, &k.t, &f.lse.t, imp));
        CHECK(fabs(imp[0] - 2 * before) < 1e-9 * (fabs(before) + 1), "importance must accumulate");
        free(imp);
        tu_fwd_free(&f);
    }
    tu_free(&q), tu_free(&k), tu_free(&v);
}

/* The CPU path (f32 kernels, block by block) against the reference
 * backend's double loop: every key's importance within 2e-5 of the largest
 * (sums of up to H x N probabilities, each with f32 logits), on shapes with
 * partial blocks (N 70 > 64 rows, M 600 > 512 keys), GQA, causal or not, a
 * window and a soft-cap. */
static void test_importance_cpu_vs_ref(attn_ctx *cpu, attn_ctx *ref) {
    const int64_t B = 2, N = 70, M = 600, H = 4, Hk = 2, D = 24;
    tu_rng rng = {tu_seed(SALT, 3)};
    tu_buf q = tu_alloc(ATTN_F32, B, N, H, D), k = tu_alloc(ATTN_F32, B, M, Hk, D), v = tu_alloc(ATTN_F32, B, M, Hk, D);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    for (int c = 0; c < 4; c++) {
        attn_params p = attn_params_default();
        p.causal = c & 1;
        if (c == 2) p.window_left = 20, p.window_right = 3;
        if (c == 3) p.softcap = 5.0f, p.scale = 1.5f;
        tu_case("token importance: cpu vs reference, case %d", c);
        tu_fwd_out f = tu_run_forward(cpu, &p, &q.t, &k.t, &v.t, ATTN_F32, ATTN_F32, 1);
        double *a = calloc((size_t)(B * M), sizeof(double)), *b = calloc((size_t)(B * M), sizeof(double));
        CHECK_OK(attn_token_importance(cpu, &p, &q.t, &k.t, &f.lse.t, a));
        CHECK_OK(attn_token_importance(ref, &p, &q.t, &k.t, &f.lse.t, b));
        double worst = 0.0, top = 0.0;
        for (int64_t j = 0; j < B * M; j++) {
            worst = fmax(worst, fabs(a[j] - b[j]));
            top = fmax(top, fabs(b[j]));
        }
        CHECK(worst <= 2e-5 * top, "worst difference %.3g against the largest importance %.3g", worst, top);
        free(a), free(b);
        tu_fwd_free(&f);
    }
    tu_free(&q), tu_free(&k), tu_free(&v);
}

static void test_top_and_select(attn_ctx *cpu) {
    tu_case("top tokens: ranking, ties by position, sequence order");
    double imp[6] = {0.5, 2.0, 0.5, 3.0, 0.1, 0.5};
    int64_t idx[3];
    CHECK_OK(attn_top_tokens(imp, 6, 3, idx));
    CHECK(idx[0] == 0 && idx[1] == 1 && idx[2] == 3, "got %lld %lld %lld, want 0 1 3", (long long)idx[0],
          (long long)idx[1], (long long)idx[2]);
    CHECK(attn_top_tokens(imp, 6, 7, idx) == ATTN_ERR_ARG, "keep > m must be refused");

    tu_case("select tokens");
    tu_rng rng = {tu_seed(SALT, 2)};
    tu_buf x = tu_alloc(ATTN_F32, 2, 6, 3, 4), y = tu_alloc(ATTN_F32, 2, 3, 3, 4);
    tu_fill(&x.t, &rng, -1, 1);
    CHECK_OK(attn_select_tokens(cpu, idx, 3, &x.t, &y.t));
    CHECK(tu_load(&y.t, tu_off4(&y.t, 1, 2, 2, 3)) == tu_load(&x.t, tu_off4(&x.t, 1, 3, 2, 3)), "out[:, 2] = x[:, idx[2]]");
    int64_t badidx[3] = {0, 9, 1};
    CHECK(attn_select_tokens(cpu, badidx, 3, &x.t, &y.t) == ATTN_ERR_ARG && strstr(attn_last_error(), "idx"),
          "an index out of range must be named: %s", attn_last_error());

    tu_case("head importance = output norm per head");
    double hn[2 * 3];
    CHECK_OK(attn_head_importance(cpu, &x.t, hn));
    double want = 0.0;
    for (int64_t i = 0; i < 6; i++)
        for (int64_t e = 0; e < 4; e++) {
            double a = tu_load(&x.t, tu_off4(&x.t, 1, i, 2, e));
            want += a * a;
        }
    CHECK(fabs(hn[1 * 3 + 2] - sqrt(want)) < 1e-12, "head norm %g, want %g", hn[5], sqrt(want));
    tu_free(&x), tu_free(&y);
}

int main(void) {
    attn_ctx *cpu = tu_ctx("test_spatten", ATTN_BACKEND_CPU, 2);
    attn_ctx *ref = tu_ctx("test_spatten", ATTN_BACKEND_REF, 1);
    test_importance(cpu);
    test_importance_cpu_vs_ref(cpu, ref);
    test_top_and_select(cpu);
    attn_ctx_free(cpu);
    attn_ctx_free(ref);
    return tu_finish("test_spatten");
}
