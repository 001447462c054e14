/* CATANet's aggregation: tokens join their nearest centre; o_intra equals
 * attention within each group and o_inter attention to the group means with
 * + ln(group size), and both LSEs their naive log-sum-exps, all computed
 * naively in double here (tolerance 1e-5 rel RMS, 1e-4 max); the CPU matches
 * the reference composition, and asking for the LSEs leaves the outputs
 * bitwise the same. The backward (groups held fixed): CPU (f32) against the
 * reference (f64) on odd sizes and GQA with an empty group and a group of one
 * token (f32 tolerances of test_util.h), the reference against central
 * finite differences of the reference forward (f64, eps 1e-6, 1e-6
 * relative; feats fixed, so the groups do not move), and bad input refused
 * by name with the outputs untouched. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "test_util.h"

#define SALT 0xca7au

/* One CATANet problem. Centre G - 2 lies far from every token (an empty
 * group) and centre G - 1 on token `lone`'s feats, far from the others (a
 * group of one). */
typedef struct problem {
    int64_t N, H, Hk, D, Dv, G, Df, lone;
    float scale; /* 0: 1 / sqrt(D) */
    tu_buf q, k, v, feats, centres;
} problem;

static problem make_problem(int64_t N, int64_t H, int64_t Hk, int64_t D, int64_t Dv, int64_t G,
                            float scale, attn_dtype dt, uint64_t seed) {
    problem pb = {.N = N, .H = H, .Hk = Hk, .D = D, .Dv = Dv, .G = G, .Df = 3, .lone = N / 3, .scale = scale};
    tu_rng rng = {seed};
    pb.q = tu_alloc(dt, 1, N, H, D), pb.k = tu_alloc(dt, 1, N, Hk, D), pb.v = tu_alloc(dt, 1, N, Hk, Dv);
    pb.feats = tu_alloc(ATTN_F32, 1, N, 1, pb.Df), pb.centres = tu_alloc(ATTN_F32, 1, G, 1, pb.Df);
    tu_fill(&pb.q.t, &rng, -1, 1), tu_fill(&pb.k.t, &rng, -1, 1), tu_fill(&pb.v.t, &rng, -1, 1);
    tu_fill(&pb.feats.t, &rng, -1, 1), tu_fill(&pb.centres.t, &rng, -1, 1);
    tu_store(&pb.centres.t, tu_off4(&pb.centres.t, 0, G - 2, 0, 0), 50.0);
    for (int64_t e = 0; e < pb.Df; e++) {
        tu_store(&pb.centres.t, tu_off4(&pb.centres.t, 0, G - 1, 0, e), 20.0);
        tu_store(&pb.feats.t, tu_off4(&pb.feats.t, 0, pb.lone, 0, e), 20.0);
    }
    return pb;
}

static void free_problem(problem *pb) {
    tu_free(&pb->q), tu_free(&pb->k), tu_free(&pb->v), tu_free(&pb->feats), tu_free(&pb->centres);
}

static attn_params params_of(const problem *pb) {
    attn_params p = attn_params_default();
    p.scale = pb->scale;
    return p;
}

/* Each token's nearest centre, computed here. */
static void naive_groups(const problem *pb, int64_t *grp) {
    for (int64_t t = 0; t < pb->N; t++) {
        double best = INFINITY;
        for (int64_t g = 0; g < pb->G; g++) {
            double d2 = 0.0;
            for (int64_t e = 0; e < pb->Df; e++) {
                double x = tu_load(&pb->feats.t, tu_off4(&pb->feats.t, 0, t, 0, e)) -
                           tu_load(&pb->centres.t, tu_off4(&pb->centres.t, 0, g, 0, e));
                d2 += x * x;
            }
            if (d2 < best) best = d2, grp[t] = g;
        }
    }
}

/* Softmax over c logits s, then out[e] = sum_a p_a val(a, e); returns the LSE. */
static double softmax_mix(const double *s, int64_t c, const double *vals, int64_t Dv, double *out) {
    double mx = -INFINITY, sum = 0.0;
    for (int64_t a = 0; a < c; a++) mx = fmax(mx, s[a]);
    for (int64_t a = 0; a < c; a++) sum += exp(s[a] - mx);
    for (int64_t e = 0; e < Dv; e++) {
        double acc = 0.0;
        for (int64_t a = 0; a < c; a++) acc += exp(s[a] - mx) / sum * vals[a * Dv + e];
        out[e] = acc;
    }
    return mx + log(sum);
}

/* Both branches and their LSEs, naively in double: oi, ox [1, N, H, Dv],
 * li, lx [1, H, N] (f64). */
static void naive_catanet(const problem *pb, const int64_t *grp, attn_tensor *oi, attn_tensor *ox,
                          attn_tensor *li, attn_tensor *lx) {
    const int64_t N = pb->N, H = pb->H, Hk = pb->Hk, D = pb->D, Dv = pb->Dv, G = pb->G;
    /* the default scale as the library takes it: 1 / sqrt(D) in f32 */
    const double scale = pb->scale > 0 ? pb->scale : 1.0f / sqrtf((float)D);
    double *km = calloc((size_t)(G * Hk * D), sizeof(double)), *vm = calloc((size_t)(G * Hk * Dv), sizeof(double));
    double *s = malloc((size_t)(N + G) * sizeof(double)), *vals = malloc((size_t)((N + G) * Dv) * sizeof(double));
    double *out = malloc((size_t)Dv * sizeof(double));
    int64_t *cnt = calloc((size_t)G, sizeof(int64_t));
    for (int64_t t = 0; t < N; t++) cnt[grp[t]]++;
    for (int64_t t = 0; t < N; t++)
        for (int64_t hk = 0; hk < Hk; hk++) {
            const int64_t g = grp[t];
            for (int64_t e = 0; e < D; e++) km[(g * Hk + hk) * D + e] += tu_load(&pb->k.t, tu_off4(&pb->k.t, 0, t, hk, e)) / (double)cnt[g];
            for (int64_t e = 0; e < Dv; e++) vm[(g * Hk + hk) * Dv + e] += tu_load(&pb->v.t, tu_off4(&pb->v.t, 0, t, hk, e)) / (double)cnt[g];
        }
    for (int64_t i = 0; i < N; i++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t hk = h / (H / Hk);
            int64_t c = 0;
            for (int64_t j = 0; j < N; j++) { /* intra: the keys of i's own group */
                if (grp[j] != grp[i]) continue;
                double dot = 0.0;
                for (int64_t e = 0; e < D; e++)
                    dot += tu_load(&pb->q.t, tu_off4(&pb->q.t, 0, i, h, e)) * tu_load(&pb->k.t, tu_off4(&pb->k.t, 0, j, hk, e));
                s[c] = scale * dot;
                for (int64_t e = 0; e < Dv; e++) vals[c * Dv + e] = tu_load(&pb->v.t, tu_off4(&pb->v.t, 0, j, hk, e));
                c++;
            }
            tu_store(li, tu_off3(li, 0, h, i), softmax_mix(s, c, vals, Dv, out));
            for (int64_t e = 0; e < Dv; e++) tu_store(oi, tu_off4(oi, 0, i, h, e), out[e]);
            c = 0;
            for (int64_t g = 0; g < G; g++) { /* inter: the non-empty groups' means */
                if (!cnt[g]) continue;
                double dot = 0.0;
                for (int64_t e = 0; e < D; e++) dot += tu_load(&pb->q.t, tu_off4(&pb->q.t, 0, i, h, e)) * km[(g * Hk + hk) * D + e];
                s[c] = scale * dot + log((double)cnt[g]);
                for (int64_t e = 0; e < Dv; e++) vals[c * Dv + e] = vm[(g * Hk + hk) * Dv + e];
                c++;
            }
            tu_store(lx, tu_off3(lx, 0, h, i), softmax_mix(s, c, vals, Dv, out));
            for (int64_t e = 0; e < Dv; e++) tu_store(ox, tu_off4(ox, 0, i, h, e), out[e]);
        }
    free(km), free(vm), free(s), free(vals), free(out), free(cnt);
}

/* The outputs of one forward: o [2, N, H, Dv] (intra, inter) and lse
 * [2, H, N], with per-branch views. */
typedef struct outputs {
    tu_buf o, lse;
    attn_tensor oi, ox, li, lx;
} outputs;

static attn_tensor part(const tu_buf *b, int64_t i) {
    attn_tensor t = b->t;
    t.shape[0] = 1;
    t.data = (char *)b->mem + (size_t)(i * t.stride[0]) * attn_dtype_size(t.dtype);
    return t;
}

static outputs make_outputs(const problem *pb, attn_dtype dt) {
    outputs r;
    r.o = tu_alloc(dt, 2, pb->N, pb->H, pb->Dv), r.lse = tu_alloc(dt, 2, pb->H, pb->N, -1);
    r.oi = part(&r.o, 0), r.ox = part(&r.o, 1), r.li = part(&r.lse, 0), r.lx = part(&r.lse, 1);
    return r;
}

static void free_outputs(outputs *r) { tu_free(&r->o), tu_free(&r->lse); }

static attn_status run_forward(attn_ctx *ctx, const problem *pb, outputs *r, int with_lse,
                               int64_t *grp) {
    attn_params p = params_of(pb);
    return attn_catanet_forward(ctx, &p, &pb->feats.t, &pb->centres.t, &pb->q.t, &pb->k.t, &pb->v.t,
                                &r->oi, &r->ox, with_lse ? &r->li : NULL, with_lse ? &r->lx : NULL, grp);
}

static void test_forward(attn_ctx *cpu, attn_ctx *ref) {
    static const int64_t dims[][7] = {{60, 2, 1, 8, 4, 6}, {61, 4, 2, 7, 5, 7}, {23, 3, 3, 5, 9, 4}};
    for (size_t c = 0; c < sizeof dims / sizeof dims[0]; c++) {
        const int64_t *d = dims[c];
        problem pb = make_problem(d[0], d[1], d[2], d[3], d[4], d[5], c == 2 ? 0.4f : 0.0f, ATTN_F32,
                                  tu_seed(SALT, 1 + c));
        tu_case("CATANet forward N %lld H %lld Hk %lld D %lld Dv %lld G %lld", (long long)d[0],
                (long long)d[1], (long long)d[2], (long long)d[3], (long long)d[4], (long long)d[5]);
        int64_t *grp = malloc((size_t)pb.N * sizeof(int64_t)), *want = malloc((size_t)pb.N * sizeof(int64_t));
        outputs r = make_outputs(&pb, ATTN_F32), bare = make_outputs(&pb, ATTN_F32), r64 = make_outputs(&pb, ATTN_F64);
        CHECK_OK(run_forward(cpu, &pb, &r, 1, grp));
        naive_groups(&pb, want);
        int same = 1, empty = 1, lone = 0;
        for (int64_t t = 0; t < pb.N; t++) {
            same &= grp[t] == want[t];
            empty &= grp[t] != pb.G - 2;
            lone += grp[t] == pb.G - 1;
        }
        CHECK(same, "tokens are not in their nearest group");
        CHECK(empty && lone == 1 && grp[pb.lone] == pb.G - 1, "expected an empty group and a group of one");
        outputs nv = make_outputs(&pb, ATTN_F64);
        naive_catanet(&pb, want, &nv.oi, &nv.ox, &nv.li, &nv.lx);
        CHECK_CLOSE("o_intra", &r.oi, &nv.oi, 1e-5, 1e-4);
        CHECK_CLOSE("o_inter", &r.ox, &nv.ox, 1e-5, 1e-4);
        CHECK_CLOSE("lse_intra", &r.li, &nv.li, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
        CHECK_CLOSE("lse_inter", &r.lx, &nv.lx, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
        CHECK_OK(run_forward(cpu, &pb, &bare, 0, NULL));
        CHECK(tu_same_bits(&r.o, &bare.o), "asking for the LSEs changed o_intra or o_inter");
        tu_case("CATANet forward: reference N %lld", (long long)d[0]);
        CHECK_OK(run_forward(ref, &pb, &r64, 1, NULL));
        CHECK_CLOSE("o_intra", &r64.oi, &nv.oi, 1e-12, 1e-12);
        CHECK_CLOSE("o_inter", &r64.ox, &nv.ox, 1e-12, 1e-12);
        CHECK_CLOSE("lse_intra", &r64.li, &nv.li, 1e-12, 1e-12);
        CHECK_CLOSE("lse_inter", &r64.lx, &nv.lx, 1e-12, 1e-12);
        free_outputs(&r), free_outputs(&bare), free_outputs(&r64), free_outputs(&nv);
        free(grp), free(want);
        free_problem(&pb);
    }
}

/* dq, dk, dv shaped like the problem's q, k, v. */
typedef struct grads {
    tu_buf g[3];
} grads;

static grads make_grads(const problem *pb, attn_dtype dt, double fill) {
    grads r = {{tu_alloc(dt, 1, pb->N, pb->H, pb->D), tu_alloc(dt, 1, pb->N, pb->Hk, pb->D),
                tu_alloc(dt, 1, pb->N, pb->Hk, pb->Dv)}};
    for (int x = 0; x < 3; x++) tu_fill_const(&r.g[x].t, fill);
    return r;
}

static void free_grads(grads *r) {
    for (int x = 0; x < 3; x++) tu_free(&r->g[x]);
}

static attn_status run_backward(attn_ctx *ctx, const problem *pb, const outputs *r, const tu_buf *dout,
                                grads *g) {
    attn_params p = params_of(pb);
    attn_tensor di = part(dout, 0), dx = part(dout, 1);
    return attn_catanet_backward(ctx, &p, &pb->feats.t, &pb->centres.t, &pb->q.t, &pb->k.t, &pb->v.t,
                                 &r->oi, &r->ox, &r->li, &r->lx, &di, &dx, &g->g[0].t, &g->g[1].t,
                                 &g->g[2].t);
}

static const char *const grad_names[3] = {"dq", "dk", "dv"};

static void test_backward_cpu_vs_ref(attn_ctx *cpu, attn_ctx *ref) {
    static const int64_t dims[][7] = {{61, 4, 2, 7, 5, 7}, {45, 2, 1, 16, 8, 5}, {29, 3, 3, 5, 9, 4}};
    for (size_t c = 0; c < sizeof dims / sizeof dims[0]; c++) {
        const int64_t *d = dims[c];
        problem pb = make_problem(d[0], d[1], d[2], d[3], d[4], d[5], c == 2 ? 0.4f : 0.0f, ATTN_F32,
                                  tu_seed(SALT, 10 + c));
        tu_case("CATANet backward: CPU vs reference, N %lld H %lld Hk %lld D %lld Dv %lld G %lld",
                (long long)d[0], (long long)d[1], (long long)d[2], (long long)d[3], (long long)d[4],
                (long long)d[5]);
        tu_rng rng = {tu_seed(SALT, 20 + c)};
        tu_buf dout = tu_alloc(ATTN_F32, 2, pb.N, pb.H, pb.Dv);
        tu_fill(&dout.t, &rng, -1, 1);
        outputs r = make_outputs(&pb, ATTN_F32), r64 = make_outputs(&pb, ATTN_F64);
        CHECK_OK(run_forward(cpu, &pb, &r, 1, NULL));
        CHECK_OK(run_forward(ref, &pb, &r64, 1, NULL));
        grads g32 = make_grads(&pb, ATTN_F32, 55.0), g64 = make_grads(&pb, ATTN_F64, 55.0); /* stale */
        CHECK_OK(run_backward(cpu, &pb, &r, &dout, &g32));
        CHECK_OK(run_backward(ref, &pb, &r64, &dout, &g64));
        for (int x = 0; x < 3; x++)
            CHECK_CLOSE(grad_names[x], &g32.g[x].t, &g64.g[x].t, tu_rms_tol(ATTN_F32), tu_max_tol(ATTN_F32));

        tu_case("CATANet backward: strided q and dout give the same bits, N %lld", (long long)d[0]);
        tu_buf qs = tu_alloc_strided(ATTN_F32, 1, pb.N, pb.H, pb.D, 3);
        tu_buf ds = tu_alloc_strided(ATTN_F32, 2, pb.N, pb.H, pb.Dv, 1);
        tu_copy(&qs.t, &pb.q.t), tu_copy(&ds.t, &dout.t);
        grads gs = make_grads(&pb, ATTN_F32, 0.0);
        attn_params p = params_of(&pb);
        attn_tensor di = part(&ds, 0), dx = part(&ds, 1);
        CHECK_OK(attn_catanet_backward(cpu, &p, &pb.feats.t, &pb.centres.t, &qs.t, &pb.k.t, &pb.v.t, &r.oi,
                                       &r.ox, &r.li, &r.lx, &di, &dx, &gs.g[0].t, &gs.g[1].t, &gs.g[2].t));
        for (int x = 0; x < 3; x++) CHECK(tu_same_bits(&gs.g[x], &g32.g[x]), "%s differs", grad_names[x]);
        free_grads(&gs), tu_free(&qs), tu_free(&ds);
        free_grads(&g32), free_grads(&g64), free_outputs(&r), free_outputs(&r64), tu_free(&dout);
        free_problem(&pb);
    }
}

/* The forward for finite differences: both branches into one [2, N, H, Dv]. */
typedef struct fd_run {
    attn_ctx *ref;
    problem *pb;
    outputs *r;
} fd_run;

static int fd_forward(void *arg) {
    fd_run *f = arg;
    return run_forward(f->ref, f->pb, f->r, 0, NULL) == ATTN_OK;
}

static void test_finite_differences(attn_ctx *ref) {
    problem pb = make_problem(13, 2, 1, 3, 2, 5, 0.0f, ATTN_F64, tu_seed(SALT, 30));
    tu_rng rng = {tu_seed(SALT, 31)};
    tu_buf dout = tu_alloc(ATTN_F64, 2, pb.N, pb.H, pb.Dv);
    tu_fill(&dout.t, &rng, -1, 1);
    outputs saved = make_outputs(&pb, ATTN_F64), probe = make_outputs(&pb, ATTN_F64);
    int64_t grp[13];
    CHECK_OK(run_forward(ref, &pb, &saved, 1, grp));
    int lone = 0, empty = 1;
    for (int64_t t = 0; t < pb.N; t++) lone += grp[t] == pb.G - 1, empty &= grp[t] != pb.G - 2;
    CHECK(lone == 1 && empty, "expected an empty group and a group of one");
    grads g = make_grads(&pb, ATTN_F64, 0.0);
    CHECK_OK(run_backward(ref, &pb, &saved, &dout, &g));
    fd_run f = {ref, &pb, &probe};
    tu_buf *ins[3] = {&pb.q, &pb.k, &pb.v};
    for (int w = 0; w < 3; w++) {
        tu_case("CATANet finite differences %s", grad_names[w]);
        double worst = tu_fd_worst(ins[w], 1e-6, &g.g[w].t, fd_forward, &f, &probe.o.t, &dout.t);
        CHECK(worst <= 1e-6, "%s: worst |fd - analytic| / (|fd| + 1) = %g", grad_names[w], worst);
    }
    free_grads(&g), free_outputs(&saved), free_outputs(&probe), tu_free(&dout);
    free_problem(&pb);
}

/* Whether every element of b still holds x. */
static int all_equal(const tu_buf *b, double x) {
    for (int64_t i = 0; i < tu_numel(&b->t); i++)
        if (tu_load(&b->t, tu_offset(&b->t, i)) != x) return 0;
    return 1;
}

static void test_bad_input(attn_ctx *cpu) {
    problem pb = make_problem(20, 2, 1, 4, 3, 4, 0.0f, ATTN_F32, tu_seed(SALT, 40));
    attn_params p = params_of(&pb);
    outputs r = make_outputs(&pb, ATTN_F32);
    tu_case("CATANet forward: bad input");
    attn_params cap = p;
    cap.softcap = 5.0f;
    CHECK_OK(run_forward(cpu, &pb, &r, 1, NULL));
    CHECK_ERR(attn_catanet_forward(cpu, &cap, &pb.feats.t, &pb.centres.t, &pb.q.t, &pb.k.t, &pb.v.t, &r.oi,
                                   &r.ox, NULL, NULL, NULL), ATTN_ERR_ARG, "params");
    tu_buf lse_short = tu_alloc(ATTN_F32, 1, pb.H, pb.N - 1, -1);
    CHECK_ERR(attn_catanet_forward(cpu, &p, &pb.feats.t, &pb.centres.t, &pb.q.t, &pb.k.t, &pb.v.t, &r.oi,
                                   &r.ox, &lse_short.t, NULL, NULL), ATTN_ERR_SHAPE, "lse_intra");
    attn_tensor lse_in_o = r.li; /* an LSE view over o_intra's memory */
    lse_in_o.data = r.oi.data;
    CHECK_ERR(attn_catanet_forward(cpu, &p, &pb.feats.t, &pb.centres.t, &pb.q.t, &pb.k.t, &pb.v.t, &r.oi,
                                   &r.ox, &r.li, &lse_in_o, NULL), ATTN_ERR_ALIAS, "lse_inter overlaps o_intra");

    tu_case("CATANet backward: bad input");
    tu_rng rng = {tu_seed(SALT, 41)};
    tu_buf dout = tu_alloc(ATTN_F32, 2, pb.N, pb.H, pb.Dv);
    tu_fill(&dout.t, &rng, -1, 1);
    attn_tensor di = part(&dout, 0), dx = part(&dout, 1);
    grads g = make_grads(&pb, ATTN_F32, 7.0);
    attn_tensor *dq = &g.g[0].t, *dk = &g.g[1].t, *dv = &g.g[2].t;
    tu_buf di_wide = tu_alloc(ATTN_F32, 1, pb.N, pb.H, pb.Dv + 1), dq_narrow = tu_alloc(ATTN_F32, 1, pb.N, pb.H, pb.D - 1);
    const attn_tensor *F = &pb.feats.t, *C = &pb.centres.t, *Q = &pb.q.t, *K = &pb.k.t, *V = &pb.v.t;
    CHECK_ERR(attn_catanet_backward(cpu, &p, F, C, Q, K, V, &r.oi, &r.ox, &r.li, &r.lx, &di_wide.t, &dx, dq, dk, dv),
              ATTN_ERR_SHAPE, "dout_intra");
    CHECK_ERR(attn_catanet_backward(cpu, &p, F, C, Q, K, V, &r.oi, &r.ox, &r.li, &r.lx, &di, &di_wide.t, dq, dk, dv),
              ATTN_ERR_SHAPE, "dout_inter");
    CHECK_ERR(attn_catanet_backward(cpu, &p, F, C, Q, K, V, &r.oi, &r.ox, &r.li, &r.lx, &di, &dx, &dq_narrow.t, dk, dv),
              ATTN_ERR_SHAPE, "dq");
    CHECK_ERR(attn_catanet_backward(cpu, &p, F, C, Q, K, V, &r.oi, &r.ox, NULL, &r.lx, &di, &dx, dq, dk, dv),
              ATTN_ERR_NULL, "lse_intra");
    CHECK_ERR(attn_catanet_backward(cpu, &p, F, C, Q, K, V, &r.oi, &r.ox, &r.li, NULL, &di, &dx, dq, dk, dv),
              ATTN_ERR_NULL, "lse_inter");
    CHECK_ERR(attn_catanet_backward(cpu, &p, F, C, Q, K, V, &r.oi, &r.ox, &r.li, &r.lx, &di, &dx, dq, dk, NULL),
              ATTN_ERR_NULL, "dv");
    CHECK_ERR(attn_catanet_backward(cpu, &p, F, C, Q, K, V, &r.oi, &r.ox, &r.li, &r.lx, &di, &dx, dq, dk, &pb.v.t),
              ATTN_ERR_ALIAS, "dv overlaps v");
    attn_tensor dk_in_dout = *dk; /* dk's shape over dout_inter's memory */
    dk_in_dout.data = dx.data;
    CHECK_ERR(attn_catanet_backward(cpu, &p, F, C, Q, K, V, &r.oi, &r.ox, &r.li, &r.lx, &di, &dx, dq, &dk_in_dout, dv),
              ATTN_ERR_ALIAS, "dk overlaps dout_inter");
    CHECK_OK(attn_catanet_backward(cpu, &p, F, C, Q, K, V, &r.oi, &r.ox, &r.li, &r.lx, &di, &dx, dq, dk, dv));
    tu_buf feats_short = tu_alloc(ATTN_F32, 1, pb.N - 1, 1, pb.Df);
    CHECK_ERR(attn_catanet_backward(cpu, &p, &feats_short.t, C, Q, K, V, &r.oi, &r.ox, &r.li, &r.lx, &di, &dx, dq,
                                    dk, dv), ATTN_ERR_SHAPE, "feats");
    grads untouched = make_grads(&pb, ATTN_F32, 7.0);
    CHECK_ERR(attn_catanet_backward(cpu, &cap, F, C, Q, K, V, &r.oi, &r.ox, &r.li, &r.lx, &di, &dx, &untouched.g[0].t,
                                    &untouched.g[1].t, &untouched.g[2].t), ATTN_ERR_ARG, "params");
    CHECK_ERR(attn_catanet_backward(cpu, &p, F, C, Q, K, V, &r.oi, &r.ox, &r.li, &lse_short.t, &di, &dx,
                                    &untouched.g[0].t, &untouched.g[1].t, &untouched.g[2].t), ATTN_ERR_SHAPE, "lse_inter");
    CHECK(all_equal(&untouched.g[0], 7) && all_equal(&untouched.g[1], 7) && all_equal(&untouched.g[2], 7),
          "a refused call wrote an output");
    free_grads(&g), free_grads(&untouched), free_outputs(&r);
    tu_free(&dout), tu_free(&di_wide), tu_free(&dq_narrow), tu_free(&lse_short), tu_free(&feats_short);
    free_problem(&pb);
}

int main(void) {
    attn_ctx *cpu = tu_ctx("test_catanet", ATTN_BACKEND_CPU, 2);
    attn_ctx *ref = tu_ctx("test_catanet", ATTN_BACKEND_REF, 1);
    test_forward(cpu, ref);
    test_backward_cpu_vs_ref(cpu, ref);
    test_finite_differences(ref);
    test_bad_input(cpu);
    attn_ctx_free(cpu);
    attn_ctx_free(ref);
    return tu_finish("test_catanet");
}
