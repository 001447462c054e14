/* Token reorderings, HiLo and Global Context:
 *   window-major and axis-permuted grid orders equal their definitions;
 *   gather then scatter is the identity, and a non-permutation is refused;
 *   HiLo with only Hi heads equals attention inside each window computed
 *   naively in double (tolerance 1e-5 rel RMS), with only Lo heads equals
 *   spatial-reduction attention (bitwise), and mixed heads match the
 *   reference composition (f32 tolerances of test_util.h); the LSE outputs
 *   equal log-sum-exp of the window's logits computed naively (LSE
 *   tolerances of test_util.h), and asking for them leaves o bitwise alone;
 *   the backwards: CPU (f32) against the reference (f64) with f32
 *   tolerances on odd grids, a 3-D grid, lo_heads 0, 1 and H, softcap on,
 *   bitwise equal for 1 and 2 threads; the reference backwards against
 *   central differences of the reference forwards (f64, step 1e-6, within
 *   1e-6 (|fd| + 1)); bad input named in the error, outputs untouched. */
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

    /* rows of one dtype with unit stride move as bytes, others element by
     * element: both give every element exactly (bf16 -> f32 widens) */
    attn_ctx *cpu = tu_ctx("test_reorder", ATTN_BACKEND_CPU, 2);
    for (int w = 0; w < 3; w++) {
        tu_case("gather on the CPU: %s", w == 0 ? "f32" : w == 1 ? "bf16 to f32" : "strided f32");
        tu_buf a = tu_alloc(w == 1 ? ATTN_BF16 : ATTN_F32, 2, 16, 3, 5 + (w == 2));
        tu_buf c = tu_alloc(ATTN_F32, 2, 16, 3, 5);
        tu_fill(&a.t, &rng, -1, 1);
        attn_tensor av = a.t;
        if (w == 2) av.shape[3] = 5, av.stride[3] = 1, av.stride[2] = 6; /* rows of 6, 5 used */
        CHECK_OK(attn_gather_tokens(cpu, idx, &av, &c.t));
        int same = 1;
        for (int64_t b = 0; b < 2; b++)
            for (int64_t t = 0; t < 16; t++)
                for (int64_t h = 0; h < 3; h++)
                    for (int64_t e = 0; e < 5; e++)
                        same &= tu_load(&c.t, tu_off4(&c.t, b, t, h, e)) ==
                                tu_load(&av, tu_off4(&av, b, idx[t], h, e));
        CHECK(same, "gather differs from x[idx[t]]");
        tu_free(&a), tu_free(&c);
    }
    attn_ctx_free(cpu);
}

/* Log-sum-exp, naively in double, of the logits (scaled, no softcap) of
 * query x[0, row, h] against the keys of window w of the window-major order
 * idx (wtok tokens a window). */
static double naive_window_lse(const attn_tensor *x, int64_t row, int64_t h, const attn_tensor *k,
                               const int64_t *idx, int64_t w, int64_t wtok, double scale) {
    double s[512], mx = -INFINITY, sum = 0.0;
    for (int64_t a = 0; a < wtok; a++) {
        double dot = 0.0;
        for (int64_t e = 0; e < x->shape[3]; e++)
            dot += tu_load(x, tu_off4(x, 0, row, h, e)) * tu_load(k, tu_off4(k, 0, idx[w * wtok + a], h, e));
        s[a] = dot * scale;
        mx = fmax(mx, s[a]);
    }
    for (int64_t a = 0; a < wtok; a++) sum += exp(s[a] - mx);
    return mx + log(sum);
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
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, 0, &q.t, &k.t, &v.t, &o.t, NULL));
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

    tu_case("HiLo, Hi heads only: lse = log-sum-exp over the window (naive, double)");
    int64_t idx[48], inv[48];
    CHECK_OK(attn_grid_window_index(g, w, idx));
    for (int64_t r = 0; r < T; r++) inv[idx[r]] = r;
    tu_buf lse = tu_alloc(ATTN_F32, 1, H, T, -1), nl = tu_alloc(ATTN_F64, 1, H, T, -1);
    tu_buf o2 = tu_alloc(ATTN_F32, 1, T, H, Dv);
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, 0, &q.t, &k.t, &v.t, &o2.t, &lse.t));
    CHECK(tu_same_bits(&o, &o2), "asking for lse changed o");
    for (int64_t i = 0; i < T; i++)
        for (int64_t h = 0; h < H; h++)
            tu_store(&nl.t, tu_off3(&nl.t, 0, h, i), naive_window_lse(&q.t, i, h, &k.t, idx, inv[i] / 6, 6, 0.25));
    CHECK_CLOSE("lse (Hi)", &lse.t, &nl.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
    tu_free(&nl);

    tu_case("HiLo, Lo heads only = spatial-reduction attention (bitwise)");
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, H, &q.t, &k.t, &v.t, &o.t, NULL));
    tu_buf s = tu_alloc(ATTN_F32, 1, T, H, Dv);
    CHECK_OK(attn_sra_forward(cpu, &p, g, w, &q.t, &k.t, &v.t, &s.t, NULL));
    CHECK(tu_same_bits(&o, &s), "Lo heads differ from SRA");
    tu_buf sl = tu_alloc(ATTN_F32, 1, H, T, -1);
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, H, &q.t, &k.t, &v.t, &o2.t, &lse.t));
    CHECK_OK(attn_sra_forward(cpu, &p, g, w, &q.t, &k.t, &v.t, &s.t, &sl.t));
    CHECK(tu_same_bits(&lse, &sl), "Lo heads' lse differs from SRA's");
    tu_free(&s), tu_free(&sl);

    tu_case("HiLo, 3 Hi + 1 Lo heads: CPU vs reference");
    tu_buf o64 = tu_alloc(ATTN_F64, 1, T, H, Dv);
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, 1, &q.t, &k.t, &v.t, &o.t, NULL));
    CHECK_OK(attn_hilo_forward(ref, &p, g, w, 1, &q.t, &k.t, &v.t, &o64.t, NULL));
    CHECK_CLOSE("o", &o.t, &o64.t, 1e-5, 1e-4);
    tu_buf l64 = tu_alloc(ATTN_F64, 1, H, T, -1);
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, 1, &q.t, &k.t, &v.t, &o2.t, &lse.t));
    CHECK_OK(attn_hilo_forward(ref, &p, g, w, 1, &q.t, &k.t, &v.t, &o64.t, &l64.t));
    CHECK(tu_same_bits(&o, &o2), "asking for lse changed o");
    CHECK_CLOSE("lse", &lse.t, &l64.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
    tu_case("HiLo: bad input");
    CHECK(attn_hilo_forward(cpu, &p, g, w, 5, &q.t, &k.t, &v.t, &o.t, NULL) == ATTN_ERR_ARG &&
              strstr(attn_last_error(), "lo_heads"),
          "lo_heads > H: %s", attn_last_error());
    attn_tensor bad = lse.t;
    bad.shape[2] = T - 1;
    CHECK_ERR(attn_hilo_forward(cpu, &p, g, w, 1, &q.t, &k.t, &v.t, &o.t, &bad), ATTN_ERR_SHAPE, "lse");
    CHECK_ERR(attn_hilo_forward(cpu, &p, g, w, 1, &q.t, &k.t, &v.t, &o.t, &q.t), ATTN_ERR_SHAPE, "lse");
    tu_free(&o64), tu_free(&l64), tu_free(&o), tu_free(&o2), tu_free(&lse);
    tu_free(&q), tu_free(&k), tu_free(&v);
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
    CHECK_OK(attn_global_context_forward(cpu, &p, g, w, &q.t, &qg.t, &k.t, &v.t, &ol.t, &og.t, NULL, NULL));
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, 0, &q.t, &k.t, &v.t, &oh.t, NULL));
    CHECK(tu_same_bits(&ol, &oh), "o_local differs from window attention");
    int same = 1;
    for (int64_t r = 0; r < wtok; r++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t e = 0; e < Dv; e++)
                same &= tu_load(&og.t, tu_off4(&og.t, 0, idx[r], h, e)) == tu_load(&ol.t, tu_off4(&ol.t, 0, idx[r], h, e));
    CHECK(same, "o_global of window 0 differs from its local attention");
    tu_buf rl = tu_alloc(ATTN_F64, 1, T, H, Dv), rg = tu_alloc(ATTN_F64, 1, T, H, Dv);
    CHECK_OK(attn_global_context_forward(ref, &p, g, w, &q.t, &qg.t, &k.t, &v.t, &rl.t, &rg.t, NULL, NULL));
    CHECK_CLOSE("o_local", &ol.t, &rl.t, 1e-5, 1e-4);
    CHECK_CLOSE("o_global", &og.t, &rg.t, 1e-5, 1e-4);

    tu_case("global context lse: local = window attention's, global = log-sum-exp (naive, double)");
    tu_buf ll = tu_alloc(ATTN_F32, 1, H, T, -1), lg = tu_alloc(ATTN_F32, 1, H, T, -1);
    tu_buf lh = tu_alloc(ATTN_F32, 1, H, T, -1);
    tu_buf ol2 = tu_alloc(ATTN_F32, 1, T, H, Dv), og2 = tu_alloc(ATTN_F32, 1, T, H, Dv);
    CHECK_OK(attn_global_context_forward(cpu, &p, g, w, &q.t, &qg.t, &k.t, &v.t, &ol2.t, &og2.t, &ll.t, &lg.t));
    CHECK(tu_same_bits(&ol, &ol2) && tu_same_bits(&og, &og2), "asking for the LSEs changed the outputs");
    CHECK_OK(attn_hilo_forward(cpu, &p, g, w, 0, &q.t, &k.t, &v.t, &oh.t, &lh.t));
    CHECK(tu_same_bits(&ll, &lh), "lse_local differs from window attention's");
    tu_buf nl = tu_alloc(ATTN_F64, 1, H, T, -1);
    for (int64_t r = 0; r < T; r++) /* window-major row r: token idx[r], global query r % wtok */
        for (int64_t h = 0; h < H; h++)
            tu_store(&nl.t, tu_off3(&nl.t, 0, h, idx[r]),
                     naive_window_lse(&qg.t, r % wtok, h, &k.t, idx, r / wtok, wtok, 1.0 / sqrt((double)D)));
    CHECK_CLOSE("lse_global", &lg.t, &nl.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
    tu_buf rll = tu_alloc(ATTN_F64, 1, H, T, -1), rlg = tu_alloc(ATTN_F64, 1, H, T, -1);
    CHECK_OK(attn_global_context_forward(ref, &p, g, w, &q.t, &qg.t, &k.t, &v.t, &rl.t, &rg.t, &rll.t, &rlg.t));
    CHECK_CLOSE("lse_local (reference)", &ll.t, &rll.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
    CHECK_CLOSE("lse_global (reference)", &lg.t, &rlg.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
    CHECK_ERR(attn_global_context_forward(cpu, &p, g, w, &q.t, &qg.t, &k.t, &v.t, &ol.t, &og.t, &ll.t, &ll.t),
              ATTN_ERR_ALIAS, "lse_global");
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&qg), tu_free(&ol), tu_free(&og), tu_free(&oh);
    tu_free(&rl), tu_free(&rg), tu_free(&ll), tu_free(&lg), tu_free(&lh), tu_free(&ol2), tu_free(&og2);
    tu_free(&nl), tu_free(&rll), tu_free(&rlg);
}

/* ------------------------------------------------------------ backwards */

typedef struct grid_case {
    attn_grid g, w;
    int64_t B, H, D, Dv, lo; /* lo: HiLo's Lo heads */
    float softcap;
} grid_case;

static int64_t cells(attn_grid g) { return g.f * g.h * g.w; }

static void name_case(const char *what, grid_case c) {
    tu_case("%s: grid %lldx%lldx%lld, win %lldx%lldx%lld, B %lld, H %lld, lo %lld, D %lld, Dv %lld, "
            "softcap %g", what, (long long)c.g.f, (long long)c.g.h, (long long)c.g.w, (long long)c.w.f,
            (long long)c.w.h, (long long)c.w.w, (long long)c.B, (long long)c.H, (long long)c.lo,
            (long long)c.D, (long long)c.Dv, (double)c.softcap);
}

/* HiLo's backward on the CPU (f32, its own forward's o and lse) against the
 * reference (f64, the reference forward's), and 1 thread against 2. */
static void check_hilo_backward(attn_ctx *cpu, attn_ctx *cpu1, attn_ctx *ref, grid_case c, uint64_t seed) {
    name_case("HiLo backward, CPU vs reference", c);
    const int64_t B = c.B, T = cells(c.g), H = c.H;
    tu_rng rng = {tu_seed(SALT, seed)};
    tu_buf q = tu_alloc(ATTN_F32, B, T, H, c.D), k = tu_alloc(ATTN_F32, B, T, H, c.D);
    tu_buf v = tu_alloc(ATTN_F32, B, T, H, c.Dv), dout = tu_alloc(ATTN_F32, B, T, H, c.Dv);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    tu_fill(&dout.t, &rng, -1, 1);
    attn_params p = attn_params_default();
    p.softcap = c.softcap;
    tu_buf o = tu_alloc(ATTN_F32, B, T, H, c.Dv), lse = tu_alloc(ATTN_F32, B, H, T, -1);
    tu_buf o64 = tu_alloc(ATTN_F64, B, T, H, c.Dv), l64 = tu_alloc(ATTN_F64, B, H, T, -1);
    CHECK_OK(attn_hilo_forward(cpu, &p, c.g, c.w, c.lo, &q.t, &k.t, &v.t, &o.t, &lse.t));
    CHECK_OK(attn_hilo_forward(ref, &p, c.g, c.w, c.lo, &q.t, &k.t, &v.t, &o64.t, &l64.t));
    const attn_tensor *like[3] = {&q.t, &k.t, &v.t};
    tu_buf g32[3], g1[3], g64[3];
    for (int x = 0; x < 3; x++) {
        const int64_t d = like[x]->shape[3];
        g32[x] = tu_alloc(ATTN_F32, B, T, H, d), g1[x] = tu_alloc(ATTN_F32, B, T, H, d);
        g64[x] = tu_alloc(ATTN_F64, B, T, H, d);
    }
    CHECK_OK(attn_hilo_backward(cpu, &p, c.g, c.w, c.lo, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t,
                                &g32[0].t, &g32[1].t, &g32[2].t));
    CHECK_OK(attn_hilo_backward(cpu1, &p, c.g, c.w, c.lo, &q.t, &k.t, &v.t, &o.t, &lse.t, &dout.t,
                                &g1[0].t, &g1[1].t, &g1[2].t));
    CHECK_OK(attn_hilo_backward(ref, &p, c.g, c.w, c.lo, &q.t, &k.t, &v.t, &o64.t, &l64.t, &dout.t,
                                &g64[0].t, &g64[1].t, &g64[2].t));
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int x = 0; x < 3; x++) {
        CHECK_CLOSE(names[x], &g32[x].t, &g64[x].t, tu_rms_tol(ATTN_F32), tu_max_tol(ATTN_F32));
        CHECK(tu_same_bits(&g32[x], &g1[x]), "%s: 1 thread and 2 threads differ", names[x]);
        tu_free(&g32[x]), tu_free(&g1[x]), tu_free(&g64[x]);
    }
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&dout), tu_free(&o), tu_free(&lse);
    tu_free(&o64), tu_free(&l64);
}

/* Part i of a buffer whose dim 0 holds `parts` equal parts. */
static attn_tensor part(const tu_buf *b, int64_t parts, int64_t i) {
    attn_tensor t = b->t;
    t.shape[0] /= parts;
    t.data = (char *)b->mem + (size_t)(i * t.shape[0] * t.stride[0]) * attn_dtype_size(t.dtype);
    return t;
}

/* Global Context's forward in one call: outputs, LSEs and the gradients of
 * the outputs as parts 0 (local) and 1 (global) of [2 B, ...] buffers. */
typedef struct gc_io {
    tu_buf o, lse, dout;
} gc_io;

static gc_io gc_io_alloc(attn_dtype dt, int64_t B, int64_t T, int64_t H, int64_t Dv) {
    gc_io io = {tu_alloc(dt, 2 * B, T, H, Dv), tu_alloc(dt, 2 * B, H, T, -1), tu_alloc(dt, 2 * B, T, H, Dv)};
    return io;
}

static void gc_io_free(gc_io *io) { tu_free(&io->o), tu_free(&io->lse), tu_free(&io->dout); }

static attn_status gc_forward(attn_ctx *ctx, const attn_params *p, grid_case c, tu_buf *const x[4],
                              gc_io *io) {
    attn_tensor ol = part(&io->o, 2, 0), og = part(&io->o, 2, 1);
    attn_tensor ll = part(&io->lse, 2, 0), lg = part(&io->lse, 2, 1);
    return attn_global_context_forward(ctx, p, c.g, c.w, &x[0]->t, &x[1]->t, &x[2]->t, &x[3]->t,
                                       &ol, &og, &ll, &lg);
}

/* grads: dq, dq_global, dk, dv. */
static attn_status gc_backward(attn_ctx *ctx, const attn_params *p, grid_case c, tu_buf *const x[4],
                               const gc_io *io, tu_buf *grads) {
    const attn_tensor ol = part(&io->o, 2, 0), og = part(&io->o, 2, 1);
    const attn_tensor ll = part(&io->lse, 2, 0), lg = part(&io->lse, 2, 1);
    const attn_tensor dl = part(&io->dout, 2, 0), dg = part(&io->dout, 2, 1);
    return attn_global_context_backward(ctx, p, c.g, c.w, &x[0]->t, &x[1]->t, &x[2]->t, &x[3]->t,
                                        &ol, &og, &ll, &lg, &dl, &dg, &grads[0].t, &grads[1].t,
                                        &grads[2].t, &grads[3].t);
}

/* q, q_global, k, v of a case in dt, filled from rng. */
static void gc_inputs(tu_buf x[4], attn_dtype dt, grid_case c, tu_rng *rng) {
    const int64_t T = cells(c.g), wtok = cells(c.w);
    x[0] = tu_alloc(dt, c.B, T, c.H, c.D), x[1] = tu_alloc(dt, c.B, wtok, c.H, c.D);
    x[2] = tu_alloc(dt, c.B, T, c.H, c.D), x[3] = tu_alloc(dt, c.B, T, c.H, c.Dv);
    for (int i = 0; i < 4; i++) tu_fill(&x[i].t, rng, -1, 1);
}

static void gc_grads(tu_buf g[4], attn_dtype dt, tu_buf *const x[4]) {
    for (int i = 0; i < 4; i++)
        g[i] = tu_alloc(dt, x[i]->t.shape[0], x[i]->t.shape[1], x[i]->t.shape[2], x[i]->t.shape[3]);
}

static const char *const gc_names[4] = {"dq", "dq_global", "dk", "dv"};

/* Global Context's backward on the CPU against the reference, and 1 thread
 * against 2 (dq_global is summed over the windows in a fixed order). */
static void check_gc_backward(attn_ctx *cpu, attn_ctx *cpu1, attn_ctx *ref, grid_case c, uint64_t seed) {
    name_case("global context backward, CPU vs reference", c);
    const int64_t T = cells(c.g);
    tu_rng rng = {tu_seed(SALT, seed)};
    tu_buf in[4];
    gc_inputs(in, ATTN_F32, c, &rng);
    tu_buf *const x[4] = {&in[0], &in[1], &in[2], &in[3]};
    attn_params p = attn_params_default();
    p.softcap = c.softcap;
    gc_io io = gc_io_alloc(ATTN_F32, c.B, T, c.H, c.Dv), io64 = gc_io_alloc(ATTN_F64, c.B, T, c.H, c.Dv);
    tu_fill(&io.dout.t, &rng, -1, 1);
    tu_copy(&io64.dout.t, &io.dout.t);
    CHECK_OK(gc_forward(cpu, &p, c, x, &io));
    CHECK_OK(gc_forward(ref, &p, c, x, &io64));
    tu_buf g32[4], g1[4], g64[4];
    gc_grads(g32, ATTN_F32, x), gc_grads(g1, ATTN_F32, x), gc_grads(g64, ATTN_F64, x);
    CHECK_OK(gc_backward(cpu, &p, c, x, &io, g32));
    CHECK_OK(gc_backward(cpu1, &p, c, x, &io, g1));
    CHECK_OK(gc_backward(ref, &p, c, x, &io64, g64));
    for (int i = 0; i < 4; i++) {
        CHECK_CLOSE(gc_names[i], &g32[i].t, &g64[i].t, tu_rms_tol(ATTN_F32), tu_max_tol(ATTN_F32));
        CHECK(tu_same_bits(&g32[i], &g1[i]), "%s: 1 thread and 2 threads differ", gc_names[i]);
        tu_free(&g32[i]), tu_free(&g1[i]), tu_free(&g64[i]), tu_free(&in[i]);
    }
    gc_io_free(&io), gc_io_free(&io64);
}

static void test_backwards_cpu(attn_ctx *cpu, attn_ctx *ref) {
    attn_ctx *cpu1 = tu_ctx("test_reorder", ATTN_BACKEND_CPU, 1);
    const attn_grid g610 = {1, 6, 10}, w25 = {1, 2, 5}, g3 = {2, 4, 6}, w3 = {2, 2, 3};
    const grid_case hilo[] = {
        {g610, w25, 1, 3, 8, 6, 0, 0.0f}, /* all Hi */
        {g610, w25, 1, 3, 8, 6, 1, 0.0f},
        {g610, w25, 1, 3, 8, 6, 3, 0.0f}, /* all Lo */
        {g610, w25, 2, 4, 16, 8, 2, 5.0f},
        {g3, w3, 1, 2, 5, 3, 1, 3.0f},    /* 3-D grid, windows of 12 */
    };
    for (size_t i = 0; i < sizeof hilo / sizeof hilo[0]; i++) check_hilo_backward(cpu, cpu1, ref, hilo[i], 10 + i);
    const grid_case gc[] = {
        {g610, w25, 1, 2, 8, 6, 0, 0.0f},
        {g610, w25, 2, 3, 16, 8, 0, 5.0f},
        {g3, w3, 1, 2, 5, 3, 0, 3.0f},
    };
    for (size_t i = 0; i < sizeof gc / sizeof gc[0]; i++) check_gc_backward(cpu, cpu1, ref, gc[i], 20 + i);
    attn_ctx_free(cpu1);
}

/* ------------------------------------------------------------ finite differences */

typedef struct hilo_run {
    attn_ctx *ref;
    const attn_params *p;
    grid_case c;
    tu_buf *x; /* q, k, v */
    tu_buf *o;
} hilo_run;

static int run_hilo(void *arg) {
    hilo_run *a = arg;
    return attn_hilo_forward(a->ref, a->p, a->c.g, a->c.w, a->c.lo, &a->x[0].t, &a->x[1].t,
                             &a->x[2].t, &a->o->t, NULL) == ATTN_OK;
}

static void test_hilo_fd(attn_ctx *ref) {
    const grid_case c = {{1, 4, 6}, {1, 2, 3}, 1, 3, 3, 2, 1, 2.0f}; /* 2 Hi heads, 1 Lo */
    name_case("HiLo reference backward vs finite differences", c);
    const int64_t T = cells(c.g);
    tu_rng rng = {tu_seed(SALT, 30)};
    tu_buf x[3] = {tu_alloc(ATTN_F64, 1, T, c.H, c.D), tu_alloc(ATTN_F64, 1, T, c.H, c.D),
                   tu_alloc(ATTN_F64, 1, T, c.H, c.Dv)};
    for (int i = 0; i < 3; i++) tu_fill(&x[i].t, &rng, -1.5, 1.5);
    tu_buf dout = tu_alloc(ATTN_F64, 1, T, c.H, c.Dv), o = tu_alloc(ATTN_F64, 1, T, c.H, c.Dv);
    tu_buf lse = tu_alloc(ATTN_F64, 1, c.H, T, -1);
    tu_fill(&dout.t, &rng, -1, 1);
    attn_params p = attn_params_default();
    p.softcap = c.softcap;
    CHECK_OK(attn_hilo_forward(ref, &p, c.g, c.w, c.lo, &x[0].t, &x[1].t, &x[2].t, &o.t, &lse.t));
    tu_buf g[3];
    for (int i = 0; i < 3; i++) g[i] = tu_alloc(ATTN_F64, 1, T, c.H, x[i].t.shape[3]);
    CHECK_OK(attn_hilo_backward(ref, &p, c.g, c.w, c.lo, &x[0].t, &x[1].t, &x[2].t, &o.t, &lse.t,
                                &dout.t, &g[0].t, &g[1].t, &g[2].t));
    hilo_run a = {ref, &p, c, x, &o};
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        const double worst = tu_fd_worst(&x[i], 1e-6, &g[i].t, run_hilo, &a, &o.t, &dout.t);
        CHECK(worst <= 1e-6, "%s: finite differences differ by %.3g", names[i], worst);
    }
    for (int i = 0; i < 3; i++) tu_free(&g[i]), tu_free(&x[i]);
    tu_free(&dout), tu_free(&o), tu_free(&lse);
}

typedef struct gc_run {
    attn_ctx *ref;
    const attn_params *p;
    grid_case c;
    tu_buf *const *x;
    gc_io *io;
} gc_run;

static int run_gc(void *arg) {
    gc_run *a = arg;
    return gc_forward(a->ref, a->p, a->c, a->x, a->io) == ATTN_OK;
}

/* The loss sum(o_local dout_local) + sum(o_global dout_global): one sum
 * over the two parts of io's buffers. */
static void test_gc_fd(attn_ctx *ref) {
    const grid_case c = {{1, 4, 6}, {1, 2, 3}, 1, 2, 3, 2, 0, 2.0f};
    name_case("global context reference backward vs finite differences", c);
    tu_rng rng = {tu_seed(SALT, 31)};
    tu_buf in[4];
    gc_inputs(in, ATTN_F64, c, &rng);
    tu_buf *const x[4] = {&in[0], &in[1], &in[2], &in[3]};
    gc_io io = gc_io_alloc(ATTN_F64, c.B, cells(c.g), c.H, c.Dv);
    tu_fill(&io.dout.t, &rng, -1, 1);
    attn_params p = attn_params_default();
    p.softcap = c.softcap;
    CHECK_OK(gc_forward(ref, &p, c, x, &io));
    tu_buf g[4];
    gc_grads(g, ATTN_F64, x);
    CHECK_OK(gc_backward(ref, &p, c, x, &io, g));
    gc_run a = {ref, &p, c, x, &io};
    for (int i = 0; i < 4; i++) {
        const double worst = tu_fd_worst(&in[i], 1e-6, &g[i].t, run_gc, &a, &io.o.t, &io.dout.t);
        CHECK(worst <= 1e-6, "%s: finite differences differ by %.3g", gc_names[i], worst);
    }
    for (int i = 0; i < 4; i++) tu_free(&g[i]), tu_free(&in[i]);
    gc_io_free(&io);
}

/* ------------------------------------------------------------ bad input */

static int all_equal(const attn_tensor *t, double x) {
    for (int64_t i = 0; i < tu_numel(t); i++)
        if (tu_load(t, tu_offset(t, i)) != x) return 0;
    return 1;
}

static void test_backward_bad_input(attn_ctx *cpu) {
    const grid_case c = {{1, 4, 6}, {1, 2, 3}, 1, 2, 4, 4, 1, 0.0f};
    const int64_t T = cells(c.g), H = c.H;
    tu_rng rng = {tu_seed(SALT, 40)};
    tu_buf in[4];
    gc_inputs(in, ATTN_F32, c, &rng);
    tu_buf *const x[4] = {&in[0], &in[1], &in[2], &in[3]};
    const attn_tensor *q = &in[0].t, *k = &in[2].t, *v = &in[3].t;
    attn_params p = attn_params_default();
    tu_buf o = tu_alloc(ATTN_F32, 1, T, H, c.Dv), lse = tu_alloc(ATTN_F32, 1, H, T, -1);
    tu_buf dout = tu_alloc(ATTN_F32, 1, T, H, c.Dv), wide = tu_alloc(ATTN_F32, 1, T, H, c.Dv + 1);
    tu_buf dq = tu_alloc(ATTN_F32, 1, T, H, c.D), dk = tu_alloc(ATTN_F32, 1, T, H, c.D);
    tu_buf dv = tu_alloc(ATTN_F32, 1, T, H, c.Dv);
    CHECK_OK(attn_hilo_forward(cpu, &p, c.g, c.w, c.lo, q, k, v, &o.t, &lse.t));
    tu_fill_const(&dq.t, 7.0), tu_fill_const(&dk.t, 7.0), tu_fill_const(&dv.t, 7.0);

    tu_case("HiLo backward: bad input is named and writes nothing");
    CHECK_ERR(attn_hilo_backward(cpu, &p, c.g, c.w, c.lo, q, k, v, &o.t, &lse.t, &wide.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_SHAPE, "dout");
    CHECK_ERR(attn_hilo_backward(cpu, &p, c.g, c.w, c.lo, q, k, v, &o.t, &lse.t, &dout.t, &wide.t, &dk.t, &dv.t),
              ATTN_ERR_SHAPE, "dq");
    CHECK_ERR(attn_hilo_backward(cpu, &p, c.g, c.w, c.lo, q, k, v, &o.t, NULL, &dout.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_NULL, "lse");
    CHECK_ERR(attn_hilo_backward(cpu, &p, c.g, c.w, c.lo, q, k, v, &o.t, &lse.t, &dout.t, &dq.t, &dk.t, &wide.t),
              ATTN_ERR_SHAPE, "dv");
    CHECK_ERR(attn_hilo_backward(cpu, &p, c.g, c.w, c.lo, q, k, v, &o.t, &lse.t, &dout.t, &dq.t, &dq.t, &dv.t),
              ATTN_ERR_ALIAS, "dk");
    CHECK_ERR(attn_hilo_backward(cpu, &p, c.g, c.w, c.lo, q, k, v, &o.t, &lse.t, &dout.t, &dq.t, &dk.t, &dout.t),
              ATTN_ERR_ALIAS, "dv");
    const attn_grid wrong = {1, 5, 6}, uneven = {1, 4, 4};
    CHECK_ERR(attn_hilo_backward(cpu, &p, wrong, c.w, c.lo, q, k, v, &o.t, &lse.t, &dout.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_SHAPE, "grid");
    /* a grid of more cells than tokens (win dividing it) is refused before
     * its order is built */
    const attn_grid larger = {1, 6, 6};
    CHECK_ERR(attn_hilo_forward(cpu, &p, larger, c.w, c.lo, q, k, v, &o.t, &lse.t), ATTN_ERR_SHAPE, "grid");
    CHECK_ERR(attn_global_context_forward(cpu, &p, larger, c.w, q, &in[1].t, k, v, &dout.t, &dv.t, NULL, NULL),
              ATTN_ERR_SHAPE, "grid");
    CHECK_ERR(attn_hilo_backward(cpu, &p, c.g, uneven, c.lo, q, k, v, &o.t, &lse.t, &dout.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_ARG, "win");
    CHECK_ERR(attn_hilo_backward(cpu, &p, c.g, c.w, H + 1, q, k, v, &o.t, &lse.t, &dout.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_ARG, "lo_heads");
    attn_params causal = p;
    causal.causal = 1;
    CHECK_ERR(attn_hilo_backward(cpu, &causal, c.g, c.w, c.lo, q, k, v, &o.t, &lse.t, &dout.t, &dq.t, &dk.t, &dv.t),
              ATTN_ERR_ARG, "params");
    CHECK(all_equal(&dq.t, 7.0) && all_equal(&dk.t, 7.0) && all_equal(&dv.t, 7.0),
          "a refused call wrote its outputs");

    tu_case("global context backward: bad input is named and writes nothing");
    gc_io io = gc_io_alloc(ATTN_F32, 1, T, H, c.Dv);
    CHECK_OK(gc_forward(cpu, &p, c, x, &io));
    tu_buf g[4];
    gc_grads(g, ATTN_F32, x);
    for (int i = 0; i < 4; i++) tu_fill_const(&g[i].t, 7.0);
    attn_tensor ol = part(&io.o, 2, 0), og = part(&io.o, 2, 1), ll = part(&io.lse, 2, 0), lg = part(&io.lse, 2, 1);
    attn_tensor dl = part(&io.dout, 2, 0), dg = part(&io.dout, 2, 1);
    attn_tensor *gq = &g[0].t, *gg = &g[1].t, *gk = &g[2].t, *gv = &g[3].t;
    const attn_tensor *qg = &in[1].t;
    CHECK_ERR(attn_global_context_backward(cpu, &p, c.g, c.w, q, qg, k, v, &ol, &og,
                                           &ll, &lg, &dl, &wide.t, gq, gg, gk, gv),
              ATTN_ERR_SHAPE, "dout_global");
    CHECK_ERR(attn_global_context_backward(cpu, &p, c.g, c.w, q, qg, k, v, &ol, &og,
                                           &ll, NULL, &dl, &dg, gq, gg, gk, gv),
              ATTN_ERR_NULL, "lse_global");
    CHECK_ERR(attn_global_context_backward(cpu, &p, c.g, c.w, q, qg, k, v, &ol, &og,
                                           &ll, &lg, &dl, &dg, gq, &dq.t, gk, gv),
              ATTN_ERR_SHAPE, "dq_global");
    CHECK_ERR(attn_global_context_backward(cpu, &p, c.g, c.w, q, qg, k, v, &ol, &og,
                                           &ll, &lg, &dl, &dg, &wide.t, gg, gk, gv),
              ATTN_ERR_SHAPE, "dq");
    CHECK_ERR(attn_global_context_backward(cpu, &p, c.g, c.w, q, qg, k, v, &ol, &og,
                                           &ll, &lg, &dl, &dg, gq, gg, gk, &io.dout.t),
              ATTN_ERR_SHAPE, "dv");
    CHECK_ERR(attn_global_context_backward(cpu, &p, c.g, c.w, q, qg, k, v, &ol, &og,
                                           &ll, &lg, &dl, &dg, gq, gg, gk, &dg),
              ATTN_ERR_ALIAS, "dv");
    CHECK_ERR(attn_global_context_backward(cpu, &p, c.g, c.w, q, qg, k, v, &ol, &og,
                                           &ll, &lg, &dl, &dg, gq, gg, gk, NULL),
              ATTN_ERR_NULL, "dv");
    int untouched = 1;
    for (int i = 0; i < 4; i++) untouched &= all_equal(&g[i].t, 7.0);
    CHECK(untouched, "a refused call wrote its outputs");
    for (int i = 0; i < 4; i++) tu_free(&g[i]), tu_free(&in[i]);
    gc_io_free(&io);
    tu_free(&o), tu_free(&lse), tu_free(&dout), tu_free(&wide), tu_free(&dq), tu_free(&dk), tu_free(&dv);
}

int main(void) {
    attn_ctx *cpu = tu_ctx("test_reorder", ATTN_BACKEND_CPU, 2);
    attn_ctx *ref = tu_ctx("test_reorder", ATTN_BACKEND_REF, 1);
    test_orders(ref);
    test_hilo(cpu, ref);
    test_paro(cpu);
    test_global_context(cpu, ref);
    test_backwards_cpu(cpu, ref);
    test_hilo_fd(ref);
    test_gc_fd(ref);
    test_backward_bad_input(cpu);
    attn_ctx_free(cpu);
    attn_ctx_free(ref);
    return tu_finish("test_reorder");
}
