/* Edge cases of the CPU backend against the reference: rows that see no key,
 * very large logits, NaN and Inf inputs, and bitwise determinism across
 * thread counts (forward, backward, decode). */
#include "test_util.h"

static attn_ctx *g_ref, *g_cpu[3]; /* cpu with 1, 2 and 3 threads */

#define SALT 0xED6Eu

typedef struct shape {
    int64_t B, N, M, H, Hk, D, Dv;
} shape;

typedef struct inputs {
    tu_buf q, k, v;
} inputs;

static inputs make_inputs(const shape *s, attn_dtype dt, tu_rng *r) {
    inputs in;
    in.q = tu_alloc(dt, s->B, s->N, s->H, s->D);
    in.k = tu_alloc(dt, s->B, s->M, s->Hk, s->D);
    in.v = tu_alloc(dt, s->B, s->M, s->Hk, s->Dv);
    tu_fill(&in.q.t, r, -2, 2);
    tu_fill(&in.k.t, r, -2, 2);
    tu_fill(&in.v.t, r, -1, 1);
    return in;
}

static void free_inputs(inputs *in) {
    tu_free(&in->q);
    tu_free(&in->k);
    tu_free(&in->v);
}

/* Key range that query i of head hq sees under params without a plan,
 * mirroring the header's rule (for a dense problem). */
static void visible(const attn_params *p, int64_t n, int64_t m, int64_t i, int64_t *lo,
                    int64_t *hi) {
    int64_t diag = i + (m - n), l = 0, r = m - 1;
    if (p->window_left >= 0 && diag - p->window_left > l) l = diag - p->window_left;
    if (p->causal && diag < r) r = diag;
    if (p->window_right >= 0 && diag + p->window_right < r) r = diag + p->window_right;
    *lo = l;
    *hi = r;
}

/* ------------------------------------------------------------ masked rows */

/* Rows that see no key get O exactly 0 and LSE exactly -inf; the others
 * match the reference (f32 tolerances of test_util.h). */
static void masked_rows(int idx, const shape *s, int causal, int64_t wl, int64_t wr,
                        attn_dtype odt) {
    uint64_t seed = tu_seed(SALT, (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("masked rows #%d N=%lld M=%lld causal=%d window=(%lld,%lld) o=%s seed=%llx", idx,
            (long long)s->N, (long long)s->M, causal, (long long)wl, (long long)wr,
            attn_dtype_name(odt), (unsigned long long)seed);
    inputs in = make_inputs(s, ATTN_F32, &r);
    attn_params p = attn_params_default();
    p.causal = causal;
    p.window_left = wl;
    p.window_right = wr;
    tu_check_forward(&g_cpu[idx % 3], 1, g_ref, &p, &p, &in.q.t, &in.k.t, &in.v.t, odt, 1);

    tu_fwd_out c = tu_run_forward(g_cpu[idx % 3], &p, &in.q.t, &in.k.t, &in.v.t, odt,
                                  ATTN_F32, 1);
    CHECK_OK(c.st);
    int64_t empty = 0, bad = 0;
    for (int64_t b = 0; b < s->B; b++)
        for (int64_t i = 0; i < s->N; i++) {
            int64_t lo, hi;
            visible(&p, s->N, s->M, i, &lo, &hi);
            if (lo <= hi) continue;
            empty++;
            for (int64_t h = 0; h < s->H; h++) {
                if (tu_load(&c.lse.t, tu_off3(&c.lse.t, b, h, i)) != -INFINITY) bad++;
                for (int64_t x = 0; x < s->Dv; x++)
                    if (tu_load(&c.o.t, tu_off4(&c.o.t, b, i, h, x)) != 0.0) bad++;
            }
        }
    CHECK(empty > 0, "the case has no fully masked row (test bug)");
    CHECK(bad == 0, "%lld elements of fully masked rows are not O = 0 / LSE = -inf",
          (long long)bad);
    tu_fwd_free(&c);
    free_inputs(&in);
}

/* A varlen batch whose second sequence has no keys, and a plan with an empty
 * query block: those rows are O = 0, LSE = -inf exactly. */
static void masked_varlen_and_plan(void) {
    tu_rng r = {tu_seed(SALT, 100)};
    tu_case("masked rows: varlen with an empty key sequence");
    int32_t cuq[4] = {0, 9, 30, 31}, cuk[4] = {0, 12, 12, 40};
    attn_params p = attn_params_default();
    p.batch = 3;
    p.cu_seqlens_q = cuq;
    p.cu_seqlens_k = cuk;
    shape s = {1, 31, 40, 2, 1, 32, 32};
    inputs in = make_inputs(&s, ATTN_F32, &r);
    tu_fwd_out c = tu_run_forward(g_cpu[0], &p, &in.q.t, &in.k.t, &in.v.t, ATTN_F32, ATTN_F32, 1);
    CHECK_OK(c.st);
    int64_t bad = 0;
    for (int64_t i = 9; i < 30; i++)
        for (int64_t h = 0; h < s.H; h++) {
            if (tu_load(&c.lse.t, tu_off3(&c.lse.t, 0, h, i)) != -INFINITY) bad++;
            for (int64_t x = 0; x < s.Dv; x++)
                if (tu_load(&c.o.t, tu_off4(&c.o.t, 0, i, h, x)) != 0.0) bad++;
        }
    CHECK(bad == 0, "%lld elements of rows without keys are not O = 0 / LSE = -inf",
          (long long)bad);
    tu_check_forward(&g_cpu[1], 1, g_ref, &p, &p, &in.q.t, &in.k.t, &in.v.t, ATTN_F32, 1);
    tu_fwd_free(&c);
    free_inputs(&in);

    tu_case("masked rows: plan with an empty query block");
    shape s2 = {1, 64, 64, 2, 2, 32, 32};
    in = make_inputs(&s2, ATTN_F32, &r);
    /* 4 query blocks of 16; block 2 lists nothing, the others key block 0 */
    int64_t off[5] = {0, 1, 2, 2, 3};
    attn_plan_entry ent[3] = {{0, 0, ATTN_BLOCK_FULL, 0},
                              {0, 0, ATTN_BLOCK_FULL, 0},
                              {0, 0, ATTN_BLOCK_FULL, 0}};
    attn_plan *plan = NULL;
    CHECK_OK(attn_plan_create(&plan, 64, 64, 16, 32, 1, off, ent));
    attn_params pp = attn_params_default();
    pp.plan = plan;
    c = tu_run_forward(g_cpu[0], &pp, &in.q.t, &in.k.t, &in.v.t, ATTN_F32, ATTN_F32, 1);
    CHECK_OK(c.st);
    bad = 0;
    for (int64_t i = 32; i < 48; i++)
        for (int64_t h = 0; h < s2.H; h++) {
            if (tu_load(&c.lse.t, tu_off3(&c.lse.t, 0, h, i)) != -INFINITY) bad++;
            for (int64_t x = 0; x < s2.Dv; x++)
                if (tu_load(&c.o.t, tu_off4(&c.o.t, 0, i, h, x)) != 0.0) bad++;
        }
    CHECK(bad == 0, "%lld elements of an empty plan row are not O = 0 / LSE = -inf",
          (long long)bad);
    tu_check_forward(&g_cpu[1], 1, g_ref, &pp, &pp, &in.q.t, &in.k.t, &in.v.t, ATTN_F32, 1);
    tu_fwd_free(&c);
    attn_plan_free(plan);
    free_inputs(&in);
}

/* ------------------------------------------------------------ large logits */

/* Logits of magnitude ~1e4 built from small integers (q.k exact in f32,
 * scale 1). Tolerance: an f32 engine rounds each logit of magnitude L by
 * about L * 2^-24 per operation (the scale and log2(e) are folded into q), so
 * with L ~ 1.4e4 the probabilities carry ~1e-3 relative error: O must be
 * finite with rel RMS <= 4e-3 and max abs <= 1e-2 * (max|ref| + 1); LSE keeps
 * the usual 1e-5 relative tolerance. */
static void large_logits(int idx, int sign_mode, float softcap, int causal) {
    uint64_t seed = tu_seed(SALT, 200u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("large logits #%d mode=%d softcap=%g causal=%d seed=%llx", idx, sign_mode, softcap,
            causal, (unsigned long long)seed);
    shape s = {1, 63, 65, 2, 1, 4, 16};
    inputs in = make_inputs(&s, ATTN_F32, &r);
    int64_t nq = tu_numel(&in.q.t), nk = tu_numel(&in.k.t);
    for (int64_t i = 0; i < nq; i++)
        tu_store(&in.q.t, i, sign_mode == 0 ? (double)tu_int(&r, -60, 60) : 50.0);
    for (int64_t i = 0; i < nk; i++)
        tu_store(&in.k.t, i, sign_mode == 0 ? (double)tu_int(&r, -60, 60)
                                            : (double)tu_int(&r, -50, -48));
    attn_params p = attn_params_default();
    p.scale = 1.0f;
    p.softcap = softcap;
    p.causal = causal;
    tu_fwd_out c = tu_run_forward(g_cpu[idx % 3], &p, &in.q.t, &in.k.t, &in.v.t, ATTN_F32,
                                  ATTN_F32, 1);
    tu_fwd_out f = tu_run_forward(g_ref, &p, &in.q.t, &in.k.t, &in.v.t, ATTN_F64, ATTN_F64, 1);
    CHECK_OK(c.st);
    CHECK_OK(f.st);
    int64_t nonfinite = 0, no = tu_numel(&c.o.t);
    for (int64_t i = 0; i < no; i++) nonfinite += !isfinite(tu_load(&c.o.t, i));
    CHECK(nonfinite == 0, "%lld output elements are not finite", (long long)nonfinite);
    CHECK_CLOSE("o", &c.o.t, &f.o.t, 4e-3, 1e-2);
    CHECK_CLOSE("lse", &c.lse.t, &f.lse.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
    tu_fwd_free(&c);
    tu_fwd_free(&f);
    free_inputs(&in);
}

/* ------------------------------------------------------------ NaN and Inf */

enum poison { POISON_K_NAN, POISON_V_NAN, POISON_K_INF, POISON_V_INF };

/* Poisons key j0 of kv head 1 and checks that exactly the rows that see it
 * (query heads of group 1 whose visible range holds j0) are non-finite, and
 * that every other row is finite and matches the reference. For +inf in K,
 * q is positive so the logit is +inf (inf - inf gives NaN). */
static void poison(int idx, enum poison what, int causal, int64_t wl, int64_t wr) {
    uint64_t seed = tu_seed(SALT, 300u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("poison #%d kind=%d causal=%d window=(%lld,%lld) seed=%llx", idx, (int)what, causal,
            (long long)wl, (long long)wr, (unsigned long long)seed);
    shape s = {2, 70, 70, 4, 2, 32, 24};
    inputs in = make_inputs(&s, ATTN_F32, &r);
    const int64_t j0 = 37, g = 1, b0 = 1;
    if (what == POISON_K_INF) tu_fill(&in.q.t, &r, 0.1, 1.0);
    attn_tensor *t = (what == POISON_K_NAN || what == POISON_K_INF) ? &in.k.t : &in.v.t;
    double val = (what == POISON_K_NAN || what == POISON_V_NAN) ? NAN : INFINITY;
    tu_store(t, tu_off4(t, b0, j0, g, 3), val);

    attn_params p = attn_params_default();
    p.causal = causal;
    p.window_left = wl;
    p.window_right = wr;
    tu_fwd_out c = tu_run_forward(g_cpu[idx % 3], &p, &in.q.t, &in.k.t, &in.v.t, ATTN_F32,
                                  ATTN_F32, 1);
    tu_fwd_out f = tu_run_forward(g_ref, &p, &in.q.t, &in.k.t, &in.v.t, ATTN_F64, ATTN_F64, 1);
    CHECK_OK(c.st);
    CHECK_OK(f.st);
    int64_t wrong = 0, seen = 0, first = -1;
    for (int64_t b = 0; b < s.B; b++)
        for (int64_t h = 0; h < s.H; h++)
            for (int64_t i = 0; i < s.N; i++) {
                int64_t lo, hi;
                visible(&p, s.N, s.M, i, &lo, &hi);
                int sees = b == b0 && h / (s.H / s.Hk) == g && lo <= j0 && j0 <= hi;
                int bad = 0;
                for (int64_t x = 0; x < s.Dv; x++)
                    bad |= !isfinite(tu_load(&c.o.t, tu_off4(&c.o.t, b, i, h, x)));
                seen += sees;
                if (bad != sees) {
                    if (first < 0) first = (b * s.H + h) * s.N + i;
                    wrong++;
                }
                /* LSE: poisoned by a poisoned K only; V leaves it finite */
                int lse_bad = !isfinite(tu_load(&c.lse.t, tu_off3(&c.lse.t, b, h, i)));
                int lse_want = sees && t == &in.k.t;
                if (lse_bad != lse_want) wrong++;
            }
    CHECK(seen > 0, "no row sees the poisoned key (test bug)");
    CHECK(wrong == 0,
          "%lld rows (first: flat [b,h,i] %lld) disagree on being non-finite with 'sees key %lld'",
          (long long)wrong, (long long)first, (long long)j0);
    /* finite rows match the reference; poisoned ones are non-finite in both */
    CHECK_CLOSE_NF("o", &c.o.t, &f.o.t, 1e-5, 1e-4);
    CHECK_CLOSE_NF("lse", &c.lse.t, &f.lse.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
    tu_fwd_free(&c);
    tu_fwd_free(&f);
    free_inputs(&in);
}

/* ------------------------------------------------------------ determinism */

/* Forward, backward and decode give bitwise identical results with 1, 2 and
 * 3 threads. */
static void determinism_forward(int idx, const shape *s, const attn_params *p) {
    uint64_t seed = tu_seed(SALT, 400u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("determinism forward #%d N=%lld M=%lld H=%lld Hk=%lld causal=%d seed=%llx", idx,
            (long long)s->N, (long long)s->M, (long long)s->H, (long long)s->Hk, p->causal,
            (unsigned long long)seed);
    inputs in = make_inputs(s, ATTN_F32, &r);
    tu_fwd_out o[3];
    for (int t = 0; t < 3; t++) {
        o[t] = tu_run_forward(g_cpu[t], p, &in.q.t, &in.k.t, &in.v.t, ATTN_F32, ATTN_F32, 1);
        CHECK_OK(o[t].st);
    }
    for (int t = 1; t < 3; t++) {
        CHECK(tu_same_bits(&o[0].o, &o[t].o), "o differs between 1 and %d threads", t + 1);
        CHECK(tu_same_bits(&o[0].lse, &o[t].lse), "lse differs between 1 and %d threads", t + 1);
    }
    for (int t = 0; t < 3; t++) tu_fwd_free(&o[t]);
    free_inputs(&in);
}

static void determinism_backward(int idx, const shape *s, const attn_params *p) {
    uint64_t seed = tu_seed(SALT, 500u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("determinism backward #%d N=%lld M=%lld H=%lld Hk=%lld causal=%d seed=%llx", idx,
            (long long)s->N, (long long)s->M, (long long)s->H, (long long)s->Hk, p->causal,
            (unsigned long long)seed);
    inputs in = make_inputs(s, ATTN_F32, &r);
    tu_buf dout = tu_alloc(ATTN_F32, s->B, s->N, s->H, s->Dv);
    tu_fill(&dout.t, &r, -1, 1);
    tu_fwd_out f = tu_run_forward(g_cpu[0], p, &in.q.t, &in.k.t, &in.v.t, ATTN_F32, ATTN_F32, 1);
    CHECK_OK(f.st);
    tu_buf dq[3], dk[3], dv[3];
    for (int t = 0; t < 3; t++) {
        dq[t] = tu_alloc(ATTN_F32, s->B, s->N, s->H, s->D);
        dk[t] = tu_alloc(ATTN_F32, s->B, s->M, s->Hk, s->D);
        dv[t] = tu_alloc(ATTN_F32, s->B, s->M, s->Hk, s->Dv);
        CHECK_OK(attn_backward(g_cpu[t], p, &in.q.t, &in.k.t, &in.v.t, &f.o.t, &f.lse.t,
                               &dout.t, &dq[t].t, &dk[t].t, &dv[t].t));
    }
    for (int t = 1; t < 3; t++) {
        CHECK(tu_same_bits(&dq[0], &dq[t]), "dq differs between 1 and %d threads", t + 1);
        CHECK(tu_same_bits(&dk[0], &dk[t]), "dk differs between 1 and %d threads", t + 1);
        CHECK(tu_same_bits(&dv[0], &dv[t]), "dv differs between 1 and %d threads", t + 1);
    }
    for (int t = 0; t < 3; t++) {
        tu_free(&dq[t]);
        tu_free(&dk[t]);
        tu_free(&dv[t]);
    }
    tu_free(&dout);
    tu_fwd_free(&f);
    free_inputs(&in);
}

static void determinism_decode(int idx, int64_t B, int64_t nq, int64_t mcap, attn_dtype kvdt,
                               int causal) {
    uint64_t seed = tu_seed(SALT, 600u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("determinism decode #%d B=%lld Nq=%lld Mcap=%lld kv=%s causal=%d seed=%llx", idx,
            (long long)B, (long long)nq, (long long)mcap, attn_dtype_name(kvdt), causal,
            (unsigned long long)seed);
    const int64_t H = 8, Hk = 2, D = 64;
    tu_buf q = tu_alloc(ATTN_F32, B, nq, H, D);
    tu_buf k = tu_alloc(kvdt, B, mcap, Hk, D);
    tu_buf v = tu_alloc(kvdt, B, mcap, Hk, D);
    tu_fill(&q.t, &r, -2, 2);
    tu_fill(&k.t, &r, -2, 2);
    tu_fill(&v.t, &r, -1, 1);
    int32_t *lens = malloc((size_t)B * sizeof *lens);
    for (int64_t b = 0; b < B; b++) lens[b] = (int32_t)(mcap - 1 - 97 * b);
    attn_params p = attn_params_default();
    p.causal = causal;
    tu_buf o[3], lse[3];
    for (int t = 0; t < 3; t++) {
        o[t] = tu_alloc(ATTN_F32, B, nq, H, D);
        lse[t] = tu_alloc(ATTN_F32, B, H, nq, -1);
        CHECK_OK(attn_decode(g_cpu[t], &p, &q.t, &k.t, &v.t, lens, &o[t].t, &lse[t].t));
    }
    for (int t = 1; t < 3; t++) {
        CHECK(tu_same_bits(&o[0], &o[t]), "o differs between 1 and %d threads", t + 1);
        CHECK(tu_same_bits(&lse[0], &lse[t]), "lse differs between 1 and %d threads", t + 1);
    }
    for (int t = 0; t < 3; t++) {
        tu_free(&o[t]);
        tu_free(&lse[t]);
    }
    free(lens);
    tu_free(&q);
    tu_free(&k);
    tu_free(&v);
}

int main(void) {
    g_ref = tu_ctx("test_edge", ATTN_BACKEND_REF, 1);
    for (int t = 0; t < 3; t++) g_cpu[t] = tu_ctx("test_edge", ATTN_BACKEND_CPU, t + 1);

    /* fully masked rows */
    shape s1 = {1, 10, 4, 2, 1, 32, 32}, s2 = {2, 20, 8, 4, 2, 64, 64};
    shape s3 = {1, 64, 16, 4, 2, 32, 48}, s4 = {1, 300, 40, 2, 1, 64, 64};
    masked_rows(0, &s1, 0, 0, 0, ATTN_F32);   /* window (0,0), N > M: rows 0..5 empty */
    masked_rows(1, &s2, 1, -1, -1, ATTN_F32); /* causal N > M: rows 0..11 empty */
    masked_rows(2, &s3, 0, 2, 1, ATTN_F16);   /* window (2,1), N > M, f16 output */
    masked_rows(3, &s4, 1, -1, -1, ATTN_F32); /* causal, several tiles of empty rows */
    masked_rows(4, &s4, 0, 5, 0, ATTN_BF16);  /* window (5,0) */
    masked_varlen_and_plan();

    /* very large logits */
    large_logits(0, 0, 0.0f, 0);
    large_logits(1, 0, 0.0f, 1);
    large_logits(2, 1, 0.0f, 0); /* all logits near -1e4 */
    large_logits(3, 0, 30.0f, 1);

    /* NaN / Inf */
    poison(0, POISON_K_NAN, 1, -1, -1);
    poison(1, POISON_K_NAN, 1, 10, -1);
    poison(2, POISON_V_NAN, 0, 3, 5);
    poison(3, POISON_K_INF, 1, -1, -1);
    poison(4, POISON_V_INF, 1, 10, 0);
    poison(5, POISON_V_NAN, 0, -1, -1);

    /* determinism across thread counts */
    attn_params pd = attn_params_default();
    attn_params pc = attn_params_default();
    pc.causal = 1;
    attn_params pw = pc;
    pw.window_left = 50;
    shape d1 = {2, 257, 257, 8, 2, 64, 64}, d2 = {1, 65, 1000, 4, 1, 128, 128};
    shape d3 = {1, 129, 129, 4, 2, 64, 32};
    determinism_forward(0, &d1, &pc);
    determinism_forward(1, &d2, &pd);
    determinism_forward(2, &d1, &pw);
    determinism_backward(0, &d3, &pc);
    determinism_backward(1, &d3, &pd);
    /* one kv head for 8 query heads: on 2 and 3 threads the backward splits
     * the group into one task per head, on 1 it runs the group whole */
    shape d4 = {1, 150, 150, 8, 1, 32, 48};
    determinism_backward(2, &d4, &pw);
    determinism_decode(0, 2, 1, 5000, ATTN_F32, 0);
    determinism_decode(1, 3, 16, 3000, ATTN_F16, 1);

    attn_ctx_free(g_ref);
    for (int t = 0; t < 3; t++) attn_ctx_free(g_cpu[t]);
    return tu_finish("test_edge");
}
