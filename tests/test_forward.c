/* attn_forward on the CPU backend against the double-precision reference
 * backend (f64 outputs) on the same inputs: a grid of shapes, GQA ratios,
 * masks, windows, softcap, scales, strides, dtypes, varlen batches and
 * explicit plans. Tolerances: see tu_rms_tol / tu_max_tol in test_util.h
 * (f32 output: rel RMS 1e-5, max abs 1e-4 * (max|ref|+1); f16: 1e-3 / 2e-3;
 * bf16: 8e-3 / 8e-3; LSE: 1e-5 / 1e-4). Low-precision inputs are compared
 * with the reference run on the same already-rounded inputs. */
#include "test_util.h"

static attn_ctx *g_ref, *g_cpu[2]; /* cpu with 2 threads and with 1 thread */
static attn_ctx *g_isa[4];         /* cpu pinned to each other ISA of the machine */
static int g_n_isa;

/* The CPU contexts case idx runs on: auto ISA (2 or 1 threads by case), then
 * every other ISA. The reference runs once per case. Returns how many. */
static int cpus_for(int idx, attn_ctx **out) {
    out[0] = g_cpu[idx % 2];
    for (int i = 0; i < g_n_isa; i++) out[1 + i] = g_isa[i];
    return 1 + g_n_isa;
}

#define SALT 0xF0D1u

typedef struct fcase {
    int64_t B, N, M, H, Hk, D, Dv;
    int causal;
    int win; /* 0: windows -1 (unbounded); 1: use wl, wr */
    int64_t wl, wr;
    float scale, softcap;
    attn_dtype qdt, kvdt, odt; /* all 0 = f32 */
    int strided;               /* q, k, v, o as permuted, padded views; lse [B, H, N] over [B, N, H] */
    int no_lse;
    int bcast;                 /* k and v broadcast over the batch (stride 0) */
} fcase;

static const fcase k_cases[] = {
    /* shapes: N, M in {1, 2, 63, 65, 257, 1000}, D in {1, 60, 64, 96, 128, 192, 256, 512} */
    {.B = 1, .N = 1, .M = 1, .H = 1, .Hk = 1, .D = 64, .Dv = 64},
    {.B = 2, .N = 2, .M = 2, .H = 2, .Hk = 1, .D = 1, .Dv = 1, .causal = 1},
    {.B = 1, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 60, .Dv = 60},
    {.B = 1, .N = 65, .M = 63, .H = 4, .Hk = 2, .D = 96, .Dv = 96, .causal = 1},
    {.B = 1, .N = 257, .M = 257, .H = 8, .Hk = 2, .D = 128, .Dv = 128, .causal = 1},
    {.B = 1, .N = 1000, .M = 1000, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .causal = 1},
    {.B = 1, .N = 1, .M = 1000, .H = 8, .Hk = 1, .D = 128, .Dv = 128, .causal = 1},
    {.B = 1, .N = 1000, .M = 63, .H = 2, .Hk = 2, .D = 192, .Dv = 192},
    {.B = 1, .N = 65, .M = 257, .H = 4, .Hk = 4, .D = 256, .Dv = 256, .causal = 1},
    {.B = 1, .N = 63, .M = 65, .H = 2, .Hk = 1, .D = 512, .Dv = 512},
    {.B = 1, .N = 2, .M = 63, .H = 2, .Hk = 2, .D = 60, .Dv = 60, .causal = 1},
    {.B = 1, .N = 257, .M = 1, .H = 2, .Hk = 1, .D = 64, .Dv = 64}, /* one key */
    /* Dqk != Dv */
    {.B = 1, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 64, .Dv = 128, .causal = 1},
    {.B = 1, .N = 65, .M = 63, .H = 4, .Hk = 4, .D = 96, .Dv = 32},
    {.B = 1, .N = 64, .M = 64, .H = 2, .Hk = 1, .D = 192, .Dv = 128, .causal = 1},
    {.B = 1, .N = 63, .M = 63, .H = 2, .Hk = 1, .D = 1, .Dv = 60},
    /* GQA ratios 1, 2, 4, 8 with H = 8 */
    {.B = 1, .N = 63, .M = 65, .H = 8, .Hk = 8, .D = 64, .Dv = 64},
    {.B = 1, .N = 63, .M = 65, .H = 8, .Hk = 4, .D = 64, .Dv = 64, .causal = 1},
    {.B = 1, .N = 65, .M = 65, .H = 8, .Hk = 2, .D = 64, .Dv = 64},
    {.B = 1, .N = 65, .M = 63, .H = 8, .Hk = 1, .D = 64, .Dv = 64, .causal = 1},
    /* sliding windows (left, right), self and cross */
    {.B = 1, .N = 257, .M = 257, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .win = 1, .wl = 0, .wr = 0},
    {.B = 1, .N = 257, .M = 257, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .causal = 1, .win = 1, .wl = 16, .wr = 0},
    {.B = 1, .N = 257, .M = 257, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .win = 1, .wl = 5, .wr = 3},
    {.B = 1, .N = 257, .M = 257, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .win = 1, .wl = 0, .wr = 7},
    {.B = 1, .N = 257, .M = 257, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .win = 1, .wl = 100, .wr = -1},
    {.B = 1, .N = 257, .M = 257, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .win = 1, .wl = -1, .wr = 4},
    {.B = 1, .N = 257, .M = 257, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .causal = 1, .win = 1, .wl = 3, .wr = 2},
    {.B = 1, .N = 65, .M = 257, .H = 2, .Hk = 2, .D = 64, .Dv = 64, .win = 1, .wl = 8, .wr = 8},
    {.B = 1, .N = 65, .M = 257, .H = 2, .Hk = 2, .D = 64, .Dv = 64, .causal = 1, .win = 1, .wl = 0, .wr = 0},
    {.B = 1, .N = 257, .M = 65, .H = 2, .Hk = 1, .D = 96, .Dv = 96, .causal = 1, .win = 1, .wl = 31, .wr = -1},
    /* softcap and explicit scale */
    {.B = 1, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 64, .Dv = 64, .scale = 1.0f, .softcap = 5.0f},
    {.B = 1, .N = 65, .M = 65, .H = 4, .Hk = 1, .D = 128, .Dv = 128, .causal = 1, .softcap = 30.0f},
    {.B = 1, .N = 65, .M = 65, .H = 2, .Hk = 2, .D = 64, .Dv = 64, .scale = 0.3f},
    {.B = 2, .N = 63, .M = 65, .H = 2, .Hk = 1, .D = 60, .Dv = 60, .causal = 1, .scale = 0.05f},
    /* strided (permuted, padded) q, k, v and o; B > 1 */
    {.B = 3, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 64, .Dv = 64, .causal = 1, .strided = 1},
    {.B = 2, .N = 1, .M = 257, .H = 4, .Hk = 1, .D = 96, .Dv = 64, .strided = 1},
    {.B = 4, .N = 63, .M = 63, .H = 2, .Hk = 2, .D = 60, .Dv = 60, .causal = 1},
    {.B = 3, .N = 65, .M = 2, .H = 2, .Hk = 1, .D = 128, .Dv = 128},
    /* low-precision inputs and outputs */
    {.B = 1, .N = 65, .M = 257, .H = 4, .Hk = 2, .D = 128, .Dv = 128, .causal = 1,
     .qdt = ATTN_F16, .kvdt = ATTN_F16, .odt = ATTN_F32},
    {.B = 1, .N = 65, .M = 257, .H = 4, .Hk = 2, .D = 128, .Dv = 128, .causal = 1,
     .qdt = ATTN_BF16, .kvdt = ATTN_BF16, .odt = ATTN_F32},
    {.B = 1, .N = 63, .M = 65, .H = 4, .Hk = 1, .D = 64, .Dv = 64, .qdt = ATTN_F32,
     .kvdt = ATTN_F16, .odt = ATTN_F32},
    {.B = 1, .N = 63, .M = 65, .H = 4, .Hk = 1, .D = 64, .Dv = 64, .qdt = ATTN_F32,
     .kvdt = ATTN_BF16, .odt = ATTN_F32},
    {.B = 2, .N = 65, .M = 257, .H = 4, .Hk = 2, .D = 96, .Dv = 96, .causal = 1,
     .qdt = ATTN_F16, .kvdt = ATTN_F16, .odt = ATTN_F16},
    {.B = 1, .N = 65, .M = 63, .H = 2, .Hk = 2, .D = 64, .Dv = 64, .qdt = ATTN_BF16,
     .kvdt = ATTN_BF16, .odt = ATTN_BF16},
    {.B = 1, .N = 63, .M = 65, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .causal = 1,
     .odt = ATTN_F16},
    {.B = 1, .N = 63, .M = 65, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .qdt = ATTN_F16,
     .kvdt = ATTN_F16, .odt = ATTN_F16, .strided = 1},
    /* lse = NULL */
    {.B = 1, .N = 63, .M = 65, .H = 2, .Hk = 1, .D = 64, .Dv = 64, .causal = 1, .no_lse = 1},
    /* odd head dims (SIMD tails) */
    {.B = 1, .N = 65, .M = 63, .H = 2, .Hk = 1, .D = 33, .Dv = 17, .causal = 1},
    {.B = 1, .N = 17, .M = 100, .H = 3, .Hk = 1, .D = 7, .Dv = 129},
    /* k and v shared by every batch entry (stride 0) */
    {.B = 3, .N = 63, .M = 65, .H = 4, .Hk = 2, .D = 64, .Dv = 64, .causal = 1, .bcast = 1},
    {.B = 2, .N = 33, .M = 65, .H = 2, .Hk = 2, .D = 64, .Dv = 64, .bcast = 1, .strided = 1},
};

static tu_buf input4(attn_dtype dt, int strided, int64_t a, int64_t b, int64_t c, int64_t d) {
    return strided ? tu_alloc_strided(dt, a, b, c, d, 3) : tu_alloc(dt, a, b, c, d);
}

static void run_case(int idx, const fcase *c) {
    uint64_t seed = tu_seed(SALT, (uint64_t)idx);
    tu_rng r = {seed};
    attn_params p = attn_params_default();
    p.causal = c->causal;
    p.window_left = c->win ? c->wl : -1;
    p.window_right = c->win ? c->wr : -1;
    p.scale = c->scale;
    p.softcap = c->softcap;
    tu_case("forward #%d B=%lld N=%lld M=%lld H=%lld Hk=%lld D=%lld Dv=%lld causal=%d "
            "window=(%lld,%lld) scale=%g softcap=%g q=%s kv=%s o=%s strided=%d bcast=%d seed=%llx",
            idx, (long long)c->B, (long long)c->N, (long long)c->M, (long long)c->H,
            (long long)c->Hk, (long long)c->D, (long long)c->Dv, c->causal,
            (long long)p.window_left, (long long)p.window_right, c->scale, c->softcap,
            attn_dtype_name(c->qdt), attn_dtype_name(c->kvdt), attn_dtype_name(c->odt),
            c->strided, c->bcast, (unsigned long long)seed);

    tu_buf q = input4(c->qdt, c->strided, c->B, c->N, c->H, c->D);
    int64_t kb = c->bcast ? 1 : c->B;
    tu_buf k = input4(c->kvdt, c->strided, kb, c->M, c->Hk, c->D);
    tu_buf v = input4(c->kvdt, c->strided, kb, c->M, c->Hk, c->Dv);
    tu_fill(&q.t, &r, -2, 2);
    tu_fill(&k.t, &r, -2, 2);
    tu_fill(&v.t, &r, -1, 1);
    if (c->bcast) {
        k.t.shape[0] = v.t.shape[0] = c->B;
        k.t.stride[0] = v.t.stride[0] = 0;
    }
    attn_ctx *cpus[5];
    int ncpu = cpus_for(idx, cpus);

    if (!c->strided) {
        tu_check_forward(cpus, ncpu, g_ref, &p, &p, &q.t, &k.t, &v.t, c->odt, !c->no_lse);
    } else {
        /* strided output too: o is a [B, N, H, Dv] view over [B, H, N, Dv + 3] */
        tu_fwd_out rr = tu_run_forward(g_ref, &p, &q.t, &k.t, &v.t, ATTN_F64, ATTN_F64, 1);
        CHECK_OK(rr.st);
        for (int i = 0; i < ncpu; i++) {
            tu_prefix = i ? attn_isa_name(attn_ctx_isa(cpus[i])) : "";
            tu_buf o = input4(c->odt, 1, c->B, c->N, c->H, c->Dv);
            tu_buf lse = tu_alloc(ATTN_F32, c->B, c->N, c->H, -1); /* viewed as [B, H, N] */
            lse.t.shape[1] = c->H;
            lse.t.shape[2] = c->N;
            lse.t.stride[1] = 1;
            lse.t.stride[2] = c->H;
            CHECK_OK(attn_forward(cpus[i], &p, &q.t, &k.t, &v.t, &o.t, &lse.t));
            CHECK_CLOSE("o (strided)", &o.t, &rr.o.t, tu_rms_tol(c->odt), tu_max_tol(c->odt));
            CHECK_CLOSE("lse", &lse.t, &rr.lse.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
            tu_free(&o);
            tu_free(&lse);
        }
        tu_prefix = "";
        tu_fwd_free(&rr);
    }
    tu_free(&q);
    tu_free(&k);
    tu_free(&v);
}

/* ------------------------------------------------------------ varlen */

/* Packed sequences of these query/key lengths (including a length-0 query
 * sequence, a length-0 key sequence whose rows see nothing, and length 1). */
static void run_varlen(int idx, int causal, int64_t wl, int64_t wr, float softcap,
                       attn_dtype kvdt) {
    static const int32_t qlens[] = {5, 0, 1, 70, 33, 1, 64};
    static const int32_t klens[] = {7, 3, 1, 70, 0, 64, 17};
    enum { NSEQ = 7 };
    int32_t cuq[NSEQ + 1] = {0}, cuk[NSEQ + 1] = {0};
    for (int b = 0; b < NSEQ; b++) {
        cuq[b + 1] = cuq[b] + qlens[b];
        cuk[b + 1] = cuk[b] + klens[b];
    }
    const int64_t H = 4, Hk = 2, D = 64, Dv = 48;
    uint64_t seed = tu_seed(SALT, 1000u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("varlen #%d causal=%d window=(%lld,%lld) softcap=%g kv=%s seed=%llx", idx, causal,
            (long long)wl, (long long)wr, softcap, attn_dtype_name(kvdt),
            (unsigned long long)seed);
    attn_params p = attn_params_default();
    p.causal = causal;
    p.window_left = wl;
    p.window_right = wr;
    p.softcap = softcap;
    p.batch = NSEQ;
    p.cu_seqlens_q = cuq;
    p.cu_seqlens_k = cuk;
    tu_buf q = tu_alloc(ATTN_F32, 1, cuq[NSEQ], H, D);
    tu_buf k = tu_alloc(kvdt, 1, cuk[NSEQ], Hk, D);
    tu_buf v = tu_alloc(kvdt, 1, cuk[NSEQ], Hk, Dv);
    tu_fill(&q.t, &r, -2, 2);
    tu_fill(&k.t, &r, -2, 2);
    tu_fill(&v.t, &r, -1, 1);
    attn_ctx *cpus[5];
    int ncpu = cpus_for(idx, cpus);
    tu_check_forward(cpus, ncpu, g_ref, &p, &p, &q.t, &k.t, &v.t, ATTN_F32, 1);

    /* each sequence alone as a dense problem gives the same rows */
    tu_fwd_out whole = tu_run_forward(g_ref, &p, &q.t, &k.t, &v.t, ATTN_F64, ATTN_F64, 1);
    for (int b = 0; b < NSEQ; b++) {
        if (qlens[b] == 0 || klens[b] == 0) continue;
        attn_params pd = p;
        pd.batch = 0;
        pd.cu_seqlens_q = pd.cu_seqlens_k = NULL;
        attn_tensor qs = q.t, ks = k.t, vs = v.t;
        qs.data = (float *)q.mem + (int64_t)cuq[b] * q.t.stride[1];
        qs.shape[1] = qlens[b];
        size_t kvsz = attn_dtype_size(kvdt);
        ks.data = (char *)k.mem + (size_t)cuk[b] * (size_t)k.t.stride[1] * kvsz;
        ks.shape[1] = klens[b];
        vs.data = (char *)v.mem + (size_t)cuk[b] * (size_t)v.t.stride[1] * kvsz;
        vs.shape[1] = klens[b];
        tu_fwd_out one = tu_run_forward(g_cpu[0], &pd, &qs, &ks, &vs, ATTN_F32, ATTN_F32, 1);
        CHECK(one.st == ATTN_OK, "dense run of sequence %d: %s", b, attn_last_error());
        if (one.st == ATTN_OK && whole.st == ATTN_OK) {
            attn_tensor wo = whole.o.t, wl_ = whole.lse.t;
            wo.data = (double *)whole.o.mem + (int64_t)cuq[b] * wo.stride[1];
            wo.shape[1] = qlens[b];
            wl_.data = (double *)whole.lse.mem + (int64_t)cuq[b] * wl_.stride[2];
            wl_.shape[2] = qlens[b];
            CHECK_CLOSE("o of one sequence run dense", &one.o.t, &wo, 1e-5, 1e-4);
            CHECK_CLOSE("lse of one sequence run dense", &one.lse.t, &wl_, 1e-5, 1e-4);
        }
        tu_fwd_free(&one);
    }
    tu_fwd_free(&whole);
    tu_free(&q);
    tu_free(&k);
    tu_free(&v);
}

/* ------------------------------------------------------------ plans */

enum plan_kind { PLAN_ALL_PARAMS, PLAN_CAUSAL_MIXED, PLAN_RANDOM };

/* Builds a plan over n x m with the given blocks and heads. For
 * PLAN_CAUSAL_MIXED: blocks fully under the bottom-right causal diagonal are
 * FULL, blocks it crosses PARAMS, blocks above it omitted. PLAN_RANDOM keeps
 * each block with probability 0.35 with a random mask, and leaves query block
 * 1 of head 0 empty. */
static attn_plan *make_plan(enum plan_kind kind, int64_t n, int64_t m, int64_t bq, int64_t bk,
                            int64_t heads, tu_rng *r) {
    int64_t nqb = (n + bq - 1) / bq, nkb = (m + bk - 1) / bk;
    int64_t *off = calloc((size_t)(heads * nqb + 1), sizeof *off);
    attn_plan_entry *ent = calloc((size_t)(heads * nqb * nkb + 1), sizeof *ent);
    int64_t e = 0;
    for (int64_t h = 0; h < heads; h++)
        for (int64_t qb = 0; qb < nqb; qb++) {
            int64_t imin = qb * bq, imax = (qb + 1) * bq > n ? n - 1 : (qb + 1) * bq - 1;
            for (int64_t kb = 0; kb < nkb; kb++) {
                int64_t jmin = kb * bk, jmax = (kb + 1) * bk > m ? m - 1 : (kb + 1) * bk - 1;
                int mask = ATTN_BLOCK_PARAMS, keep = 1;
                if (kind == PLAN_CAUSAL_MIXED) {
                    if (jmin > imax + (m - n)) keep = 0;
                    else if (jmax <= imin + (m - n)) mask = ATTN_BLOCK_FULL;
                } else if (kind == PLAN_RANDOM) {
                    keep = tu_uniform(r, 0, 1) < 0.35 && !(h == 0 && qb == 1);
                    mask = (int)tu_int(r, 0, 1);
                }
                if (!keep) continue;
                ent[e].key_block = (int32_t)kb;
                ent[e].level = 0;
                ent[e].mask = (uint8_t)mask;
                ent[e].reserved = 0;
                e++;
            }
            off[h * nqb + qb + 1] = e;
        }
    attn_plan *plan = NULL;
    attn_status st = attn_plan_create(&plan, n, m, bq, bk, heads, off, ent);
    CHECK(st == ATTN_OK, "attn_plan_create: %s", attn_last_error());
    free(off);
    free(ent);
    return plan;
}

typedef struct pcase {
    enum plan_kind kind;
    int64_t N, M, H, Hk, D, bq, bk;
    int heads_sel; /* 0: 1 head, 1: H, 2: Hk */
    int causal;
    int64_t wl, wr;
} pcase;

static const pcase k_plans[] = {
    {PLAN_ALL_PARAMS, 129, 129, 4, 2, 64, 16, 16, 0, 1, -1, -1},
    {PLAN_ALL_PARAMS, 100, 150, 4, 2, 64, 32, 64, 1, 1, -1, -1},
    {PLAN_ALL_PARAMS, 100, 150, 4, 2, 64, 7, 13, 2, 0, -1, -1},
    {PLAN_ALL_PARAMS, 129, 129, 2, 1, 64, 64, 32, 0, 0, 20, 3},
    {PLAN_CAUSAL_MIXED, 129, 129, 4, 2, 64, 16, 16, 0, 1, -1, -1},
    {PLAN_CAUSAL_MIXED, 100, 150, 4, 4, 96, 32, 64, 1, 1, -1, -1},
    {PLAN_CAUSAL_MIXED, 150, 100, 2, 1, 64, 13, 7, 0, 1, -1, -1},
    {PLAN_RANDOM, 129, 129, 4, 2, 64, 16, 16, 1, 0, -1, -1},
    {PLAN_RANDOM, 129, 129, 4, 2, 64, 16, 32, 2, 1, -1, -1},
    {PLAN_RANDOM, 100, 150, 8, 2, 64, 32, 16, 0, 0, 10, 10},
    {PLAN_RANDOM, 100, 150, 4, 1, 128, 7, 13, 1, 1, -1, -1},
    {PLAN_RANDOM, 300, 300, 2, 1, 64, 64, 512, 0, 0, -1, -1},
    {PLAN_RANDOM, 257, 63, 2, 2, 64, 1, 8, 1, 0, -1, -1},
};

static void run_plan(int idx, const pcase *c) {
    uint64_t seed = tu_seed(SALT, 2000u + (uint64_t)idx);
    tu_rng r = {seed};
    int64_t heads = c->heads_sel == 0 ? 1 : c->heads_sel == 1 ? c->H : c->Hk;
    tu_case("plan #%d kind=%d N=%lld M=%lld H=%lld Hk=%lld D=%lld blocks=%lldx%lld heads=%lld "
            "causal=%d window=(%lld,%lld) seed=%llx",
            idx, (int)c->kind, (long long)c->N, (long long)c->M, (long long)c->H,
            (long long)c->Hk, (long long)c->D, (long long)c->bq, (long long)c->bk,
            (long long)heads, c->causal, (long long)c->wl, (long long)c->wr,
            (unsigned long long)seed);
    attn_plan *plan = make_plan(c->kind, c->N, c->M, c->bq, c->bk, heads, &r);
    if (!plan) return;
    if (c->kind == PLAN_ALL_PARAMS)
        CHECK(fabs(attn_plan_density(plan) - 1.0) < 1e-12, "density of a full plan is %g",
              attn_plan_density(plan));
    tu_buf q = tu_alloc(ATTN_F32, 1, c->N, c->H, c->D);
    tu_buf k = tu_alloc(ATTN_F32, 1, c->M, c->Hk, c->D);
    tu_buf v = tu_alloc(ATTN_F32, 1, c->M, c->Hk, c->D);
    tu_fill(&q.t, &r, -2, 2);
    tu_fill(&k.t, &r, -2, 2);
    tu_fill(&v.t, &r, -1, 1);
    attn_params pp = attn_params_default();
    pp.causal = c->causal;
    pp.window_left = c->wl;
    pp.window_right = c->wr;
    attn_params pi = pp; /* implicit: the same rule without a plan */
    pp.plan = plan;
    attn_ctx *cpus[5];
    int ncpu = cpus_for(idx, cpus);
    /* the CPU with the plan against the reference with the plan */
    tu_check_forward(cpus, ncpu, g_ref, &pp, &pp, &q.t, &k.t, &v.t, ATTN_F32, 1);
    if (c->kind != PLAN_RANDOM) {
        /* a plan covering every visible key equals the implicit rule */
        tu_check_forward(cpus, ncpu, g_ref, &pp, &pi, &q.t, &k.t, &v.t, ATTN_F32, 1);
        tu_fwd_out a = tu_run_forward(g_ref, &pp, &q.t, &k.t, &v.t, ATTN_F64, ATTN_F64, 1);
        tu_fwd_out b = tu_run_forward(g_ref, &pi, &q.t, &k.t, &v.t, ATTN_F64, ATTN_F64, 1);
        CHECK(a.st == ATTN_OK && b.st == ATTN_OK && tu_same_bits(&a.o, &b.o) &&
                  tu_same_bits(&a.lse, &b.lse),
              "reference with the full plan differs from the implicit rule");
        tu_fwd_free(&a);
        tu_fwd_free(&b);
    }
    attn_plan_free(plan);
    tu_free(&q);
    tu_free(&k);
    tu_free(&v);
}

/* ------------------------------------------------------------ closed form */

/* One query against two keys, D = Dv = 1, scale 1: logits s = (1, 2) (or
 * capped: c tanh(s / c)), o = (e^s0 v0 + e^s1 v1) / (e^s0 + e^s1),
 * lse = log(e^s0 + e^s1). Checks the oracle itself, then the CPU. */
static void closed_form(float softcap, int causal) {
    tu_case("closed form softcap=%g causal=%d", softcap, causal);
    float q[1] = {1.0f}, k[2] = {1.0f, 2.0f}, v[2] = {1.0f, 3.0f};
    attn_tensor tq = attn_tensor_4d(q, ATTN_F32, 1, 1, 1, 1);
    attn_tensor tk = attn_tensor_4d(k, ATTN_F32, 1, 2, 1, 1);
    attn_tensor tv = attn_tensor_4d(v, ATTN_F32, 1, 2, 1, 1);
    attn_params p = attn_params_default();
    p.scale = 1.0f;
    p.softcap = softcap;
    p.causal = causal; /* one query aligned bottom-right sees both keys */
    double s0 = 1.0, s1 = 2.0;
    if (softcap > 0) {
        s0 = softcap * tanh(s0 / softcap);
        s1 = softcap * tanh(s1 / softcap);
    }
    double want_o = (exp(s0) * 1.0 + exp(s1) * 3.0) / (exp(s0) + exp(s1));
    double want_l = log(exp(s0) + exp(s1));
    tu_fwd_out r = tu_run_forward(g_ref, &p, &tq, &tk, &tv, ATTN_F64, ATTN_F64, 1);
    CHECK_OK(r.st);
    double ro = ((double *)r.o.mem)[0], rl = ((double *)r.lse.mem)[0];
    CHECK(fabs(ro - want_o) < 1e-14 && fabs(rl - want_l) < 1e-14,
          "reference: o %.17g lse %.17g, closed form %.17g %.17g", ro, rl, want_o, want_l);
    for (int t = 0; t < 2; t++) {
        tu_fwd_out c = tu_run_forward(g_cpu[t], &p, &tq, &tk, &tv, ATTN_F32, ATTN_F32, 1);
        CHECK_OK(c.st);
        double co = ((float *)c.o.mem)[0], cl = ((float *)c.lse.mem)[0];
        CHECK(fabs(co - want_o) < 1e-6 && fabs(cl - want_l) < 1e-6,
              "cpu: o %.9g lse %.9g, closed form %.9g %.9g", co, cl, want_o, want_l);
        tu_fwd_free(&c);
    }
    tu_fwd_free(&r);
}

int main(void) {
    g_ref = tu_ctx("test_forward", ATTN_BACKEND_REF, 1);
    g_cpu[0] = tu_ctx("test_forward", ATTN_BACKEND_CPU, 2);
    g_cpu[1] = tu_ctx("test_forward", ATTN_BACKEND_CPU, 1);

    g_n_isa = tu_other_isa_ctxs(g_isa, 4, 2);

    closed_form(0.0f, 0);
    closed_form(0.0f, 1);
    closed_form(1.5f, 0);

    for (int i = 0; i < (int)(sizeof k_cases / sizeof k_cases[0]); i++) run_case(i, &k_cases[i]);

    run_varlen(0, 0, -1, -1, 0.0f, ATTN_F32);
    run_varlen(1, 1, -1, -1, 0.0f, ATTN_F32);
    run_varlen(2, 1, 8, 0, 0.0f, ATTN_F32);
    run_varlen(3, 0, 4, 4, 20.0f, ATTN_F32);
    run_varlen(4, 1, -1, -1, 0.0f, ATTN_F16);

    for (int i = 0; i < (int)(sizeof k_plans / sizeof k_plans[0]); i++) run_plan(i, &k_plans[i]);

    for (int i = 0; i < g_n_isa; i++) attn_ctx_free(g_isa[i]);
    attn_ctx_free(g_ref);
    attn_ctx_free(g_cpu[0]);
    attn_ctx_free(g_cpu[1]);
    return tu_finish("test_forward");
}
