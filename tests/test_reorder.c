/* Token reorderings and HiLo:
 *   window-major and axis-permuted grid orders equal their definitions;
 *   gather then scatter is the identity, and a non-permutation is refused;
 *   HiLo with only Hi heads equals attention inside each window computed
 *   naively in double (tolerance 1e-5 rel RMS), with only Lo heads equals
 *   spatial-reduction attention (bitwise), and mixed heads match the
 *   reference composition (f32 tolerances of test_util.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "test_util.h"

#define SALT 0x7e0au

static void test_orders(attn_ctx *ref) {
    tu_case("window index of a 4 x 4 grid in 2 x 2 windows");
    attn_grid g = {1, 4, 4}, w = {1, 2, 2};
    int64_t idx[16];
    static const int64_t want[16] = {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15};
    CHECK_OK(attn_grid_window_index(g, w, idx));
    CHECK(memcmp(idx, want, sizeof want) == 0, "window order differs");
    tu_case("axis index: h, w, f of a 2 x 2 x 3 grid");
    attn_grid g3 = {2, 2, 3};
    int32_t perm[3] = {1, 2, 0};
    int64_t ax[12];
    CHECK_OK(attn_grid_axis_index(g3, perm, ax));
    int ok = 1, t = 0;
    for (int64_t y = 0; y < 2; y++)
        for (int64_t x = 0; x < 3; x++)
            for (int64_t f = 0; f < 2; f++) ok &= ax[t++] == (f * 2 + y) * 3 + x;
    CHECK(ok, "axis order differs");
    int32_t bad[3] = {0, 0, 1};
    CHECK(attn_grid_axis_index(g3, bad, ax) == ATTN_ERR_ARG, "a repeated axis must be refused");

    tu_case("gather then scatter is the identity");
    tu_rng rng = {tu_seed(SALT, 1)};
    tu_buf x = tu_alloc(ATTN_F64, 2, 16, 3, 5), y = tu_alloc(ATTN_F64, 2, 16, 3, 5), z = tu_alloc(ATTN_F64, 2, 16, 3, 5);
    tu_fill(&x.t, &rng, -1, 1);
    CHECK_OK(attn_gather_tokens(ref, idx, &x.t, &y.t));
    CHECK(tu_load(&y.t, tu_off4(&y.t, 1, 2, 1, 3)) == tu_load(&x.t, tu_off4(&x.t, 1, idx[2], 1, 3)),
          "gather puts x[idx[t]] at t");
    CHECK_OK(attn_scatter_tokens(ref, idx, &y.t, &z.t));
    CHECK(tu_same_bits(&x, &z), "scatter(gather(x)) != x");
    int64_t dup[16];
    memcpy(dup, idx, sizeof dup);
    dup[3] = dup[4];
    CHECK(attn_gather_tokens(ref, dup, &x.t, &y.t) == ATTN_ERR_ARG && strstr(attn_last_error(), "idx"),
          "a non-permutation must be refused: %s", attn_last_error());
    tu_free(&x), tu_free(&y), tu_free(&z);
}

static void test_hilo(attn_ctx *cpu, attn_ctx *ref) {
    attn_grid g = {1, 8, 6}, w = {1, 2, 3};
    const int64_t T = 48, H = 4, D = 16, Dv = 8;
    tu_rng rng = {tu_seed(SALT, 2)};
    tu_buf q = tu_alloc(ATTN_F32, 1, T, H, D), k = tu_alloc(ATTN_F32, 1, T, H, D), v = tu_alloc(ATTN_F32, 1, T, H, Dv);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    attn_params p = attn_params_default();
    tu_buf o = tu_alloc(ATTN_F32, 1, T, H, Dv);

    tu_case("HiLo, Hi heads only = attention inside each window (naive, double)");
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, 0, &q.t, &k.t, &v.t, &o.t));
    tu_buf naive = tu_alloc(ATTN_F64, 1, T, H, Dv);
    double sc[64];
    for (int64_t i = 0; i < T; i++)
        for (int64_t h = 0; h < H; h++) {
            int64_t yi = (i / 6) / 2, xi = (i % 6) / 3, c = 0;
            int64_t keys[64];
            double mx = -INFINITY, sum = 0.0;
            for (int64_t j = 0; j < T; j++)
                if ((j / 6) / 2 == yi && (j % 6) / 3 == xi) {
                    double dot = 0.0;
                    for (int64_t e = 0; e < D; e++)
                        dot += tu_load(&q.t, tu_off4(&q.t, 0, i, h, e)) * tu_load(&k.t, tu_off4(&k.t, 0, j, h, e));
                    sc[c] = dot / 4.0;
                    keys[c++] = j;
                    mx = fmax(mx, dot / 4.0);
                }
            for (int64_t a = 0; a < c; a++) sum += exp(sc[a] - mx);
            for (int64_t e = 0; e < Dv; e++) {
                double acc = 0.0;
                for (int64_t a = 0; a < c; a++) acc += exp(sc[a] - mx) / sum * tu_load(&v.t, tu_off4(&v.t, 0, keys[a], h, e));
                tu_store(&naive.t, tu_off4(&naive.t, 0, i, h, e), acc);
            }
        }
    CHECK_CLOSE("o (Hi)", &o.t, &naive.t, 1e-5, 1e-4);
    tu_free(&naive);

    tu_case("HiLo, Lo heads only = spatial-reduction attention (bitwise)");
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, H, &q.t, &k.t, &v.t, &o.t));
    tu_buf s = tu_alloc(ATTN_F32, 1, T, H, Dv);
    CHECK_OK(attn_sra_forward(cpu, &p, g, w, &q.t, &k.t, &v.t, &s.t, NULL));
    CHECK(tu_same_bits(&o, &s), "Lo heads differ from SRA");
    tu_free(&s);

    tu_case("HiLo, 3 Hi + 1 Lo heads: CPU vs reference");
    tu_buf o64 = tu_alloc(ATTN_F64, 1, T, H, Dv);
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, 1, &q.t, &k.t, &v.t, &o.t));
    CHECK_OK(attn_hilo_forward(ref, &p, g, w, 1, &q.t, &k.t, &v.t, &o64.t));
    CHECK_CLOSE("o", &o.t, &o64.t, 1e-5, 1e-4);
    tu_case("HiLo: bad input");
    CHECK(attn_hilo_forward(cpu, &p, g, w, 5, &q.t, &k.t, &v.t, &o.t) == ATTN_ERR_ARG &&
              strstr(attn_last_error(), "lo_heads"),
          "lo_heads > H: %s", attn_last_error());
    tu_free(&o64), tu_free(&o), tu_free(&q), tu_free(&k), tu_free(&v);
}

/* Planted: a video whose tokens attend along time (the same (y, x) in every
 * frame), which the default f, h, w order scatters F positions apart; PARO
 * must choose an order with f last, which makes those runs contiguous. */
static void test_paro(attn_ctx *cpu) {
    attn_grid g = {8, 4, 4};
    const int64_t T = 128, H = 2, D = 16;
    tu_rng rng = {tu_seed(SALT, 3)};
    tu_buf q = tu_alloc(ATTN_F32, 1, T, H, D), k = tu_alloc(ATTN_F32, 1, T, H, D);
    tu_fill(&q.t, &rng, -0.1, 0.1), tu_fill(&k.t, &rng, -0.1, 0.1);
    for (int64_t t = 0; t < T; t++) { /* a one-hot code of the spatial cell */
        int64_t cell = t % 16;
        for (int64_t h = 0; h < H; h++) {
            tu_store(&q.t, tu_off4(&q.t, 0, t, h, cell), 8.0);
            tu_store(&k.t, tu_off4(&k.t, 0, t, h, cell), 8.0);
        }
    }
    tu_case("PARO chooses an order with time last for temporal attention");
    attn_params p = attn_params_default();
    int32_t perm[2 * 3];
    CHECK_OK(attn_paro_choose(cpu, &p, g, &q.t, &k.t, 8, 1, 16, perm));
    for (int64_t h = 0; h < H; h++)
        CHECK(perm[3 * h + 2] == 0, "head %lld chose (%d, %d, %d); f must come last", (long long)h,
              perm[3 * h], perm[3 * h + 1], perm[3 * h + 2]);
    /* the CPU path (f32 GEMM logits) chooses as the reference (double) does,
     * also with a soft-cap, GQA (2 query heads on one kv head) and the
     * sampled rows not a multiple of the CPU path's row blocks */
    attn_ctx *ref = tu_ctx("test_reorder", ATTN_BACKEND_REF, 1);
    for (int c = 0; c < 2; c++) {
        tu_case("PARO: CPU and reference choose alike (case %d)", c);
        attn_params pc = attn_params_default();
        if (c == 1) pc.softcap = 4.0f;
        attn_tensor kk = k.t;
        if (c == 1) kk.shape[2] = 1; /* one kv head for both query heads */
        int32_t a[2 * 3], b[2 * 3];
        CHECK_OK(attn_paro_choose(cpu, &pc, g, &q.t, &kk, 8, 2, 13, a));
        CHECK_OK(attn_paro_choose(ref, &pc, g, &q.t, &kk, 8, 2, 13, b));
        CHECK(memcmp(a, b, sizeof a) == 0, "cpu chose (%d %d %d | %d %d %d), reference (%d %d %d | %d %d %d)",
              a[0], a[1], a[2], a[3], a[4], a[5], b[0], b[1], b[2], b[3], b[4], b[5]);
    }
    attn_ctx_free(ref);
    CHECK(attn_paro_choose(cpu, &p, g, &q.t, &k.t, 8, 99, 16, perm) == ATTN_ERR_ARG &&
              strstr(attn_last_error(), "keep"),
          "keep beyond the blocks must be named: %s", attn_last_error());
    tu_free(&q), tu_free(&k);
}

/* Global context: o_local equals HiLo with only Hi heads (bitwise), and
 * o_global, with every window's global queries set to that window's own
 * tokens' queries in one window, equals local attention there. Checked
 * against the reference composition too. */
static void test_global_context(attn_ctx *cpu, attn_ctx *ref) {
    attn_grid g = {1, 4, 6}, w = {1, 2, 3};
    const int64_t T = 24, H = 2, D = 8, Dv = 4, wtok = 6;
    tu_rng rng = {tu_seed(SALT, 4)};
    tu_buf q = tu_alloc(ATTN_F32, 1, T, H, D), k = tu_alloc(ATTN_F32, 1, T, H, D), v = tu_alloc(ATTN_F32, 1, T, H, Dv);
    tu_buf qg = tu_alloc(ATTN_F32, 1, wtok, H, D);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    int64_t idx[24];
    CHECK_OK(attn_grid_window_index(g, w, idx));
    for (int64_t r = 0; r < wtok; r++) /* window 0's own queries become the global ones */
        for (int64_t h = 0; h < H; h++)
            for (int64_t e = 0; e < D; e++)
                tu_store(&qg.t, tu_off4(&qg.t, 0, r, h, e), tu_load(&q.t, tu_off4(&q.t, 0, idx[r], h, e)));
    tu_buf ol = tu_alloc(ATTN_F32, 1, T, H, Dv), og = tu_alloc(ATTN_F32, 1, T, H, Dv), oh = tu_alloc(ATTN_F32, 1, T, H, Dv);
    attn_params p = attn_params_default();
    tu_case("global context: local part = window attention; global part in window 0 = local");
    CHECK_OK(attn_global_context_forward(cpu, &p, g, w, &q.t, &qg.t, &k.t, &v.t, &ol.t, &og.t));
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, 0, &q.t, &k.t, &v.t, &oh.t));
    CHECK(tu_same_bits(&ol, &oh), "o_local differs from window attention");
    int same = 1;
    for (int64_t r = 0; r < wtok; r++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t e = 0; e < Dv; e++)
                same &= tu_load(&og.t, tu_off4(&og.t, 0, idx[r], h, e)) == tu_load(&ol.t, tu_off4(&ol.t, 0, idx[r], h, e));
    CHECK(same, "o_global of window 0 differs from its local attention");
    tu_buf rl = tu_alloc(ATTN_F64, 1, T, H, Dv), rg = tu_alloc(ATTN_F64, 1, T, H, Dv);
    CHECK_OK(attn_global_context_forward(ref, &p, g, w, &q.t, &qg.t, &k.t, &v.t, &rl.t, &rg.t));
    CHECK_CLOSE("o_local", &ol.t, &rl.t, 1e-5, 1e-4);
    CHECK_CLOSE("o_global", &og.t, &rg.t, 1e-5, 1e-4);
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&qg), tu_free(&ol), tu_free(&og), tu_free(&oh);
    tu_free(&rl), tu_free(&rg);
}

int main(void) {
    attn_ctx *cpu = tu_ctx("test_reorder", ATTN_BACKEND_CPU, 2);
    attn_ctx *ref = tu_ctx("test_reorder", ATTN_BACKEND_REF, 1);
    test_orders(ref);
    test_hilo(cpu, ref);
    test_paro(cpu);
    test_global_context(cpu, ref);
    attn_ctx_free(cpu);
    attn_ctx_free(ref);
    return tu_finish("test_reorder");
}
