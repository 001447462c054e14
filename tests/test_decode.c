/* attn_decode (KV-cache decode) and attn_lse_merge on the CPU backend against
 * the reference backend. Tolerances: those of test_util.h by output dtype
 * (f32: rel RMS 1e-5, max abs 1e-4 * (max|ref|+1); f16: 1e-3 / 2e-3;
 * bf16: 8e-3 / 8e-3; LSE 1e-5 / 1e-4). */
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

#define SALT 0xDEC0u

typedef struct dcase {
    int64_t B, Nq, H, Hk, D, Dv, Mcap;
    int32_t lens[3]; /* per batch; all -1: cache_lens = NULL */
    int causal;
    int64_t wl, wr;
    float softcap;
    attn_dtype qdt, kvdt, odt;
    int strided; /* cache stored [B, Hk, Mcap, D], viewed as [B, Mcap, Hk, D] */
} dcase;

static const dcase k_cases[] = {
    {2, 1, 8, 2, 64, 64, 300, {300, 157}, 0, -1, -1, 0, ATTN_F32, ATTN_F32, ATTN_F32, 0},
    {3, 2, 4, 4, 128, 128, 1000, {1000, 999, 1}, 1, -1, -1, 0, ATTN_F32, ATTN_F16, ATTN_F32, 0},
    {2, 16, 8, 1, 64, 64, 700, {700, 513}, 1, -1, -1, 0, ATTN_F32, ATTN_BF16, ATTN_F32, 1},
    {1, 16, 2, 2, 96, 64, 100, {10}, 1, -1, -1, 0, ATTN_F32, ATTN_F32, ATTN_F32, 0},
    {2, 4, 4, 2, 64, 64, 2000, {-1, -1}, 1, 100, 0, 30.0f, ATTN_F32, ATTN_F32, ATTN_F32, 0},
    {3, 1, 4, 2, 32, 32, 64, {0, 5, 64}, 0, -1, -1, 0, ATTN_F32, ATTN_F32, ATTN_F32, 0},
    {2, 16, 8, 2, 128, 128, 600, {600, 333}, 1, -1, -1, 0, ATTN_F16, ATTN_F16, ATTN_F16, 0},
    {1, 3, 8, 8, 60, 60, 257, {256}, 0, 20, 20, 0, ATTN_F32, ATTN_F16, ATTN_F32, 1},
    /* wide GQA groups: 16 queries x 32 heads per kv head; many heads */
    {1, 16, 32, 1, 128, 128, 300, {299}, 1, -1, -1, 0, ATTN_F32, ATTN_F16, ATTN_F32, 0},
    {2, 1, 64, 8, 64, 64, 129, {-1, -1}, 0, -1, -1, 0, ATTN_F32, ATTN_F32, ATTN_F32, 0},
    /* a cache of more than 100k keys */
    {1, 2, 4, 1, 64, 64, 131072, {100003}, 1, -1, -1, 0, ATTN_F32, ATTN_F16, ATTN_F32, 0},
};

static tu_buf cache(attn_dtype dt, int strided, int64_t B, int64_t M, int64_t Hk, int64_t D) {
    return strided ? tu_alloc_strided(dt, B, M, Hk, D, 0) : tu_alloc(dt, B, M, Hk, D);
}

/* Sequence b of a [B, ...] tensor as a [1, ...] view. */
static attn_tensor batch_view(const attn_tensor *t, int64_t b) {
    attn_tensor v = *t;
    v.data = (char *)t->data + (size_t)(b * t->stride[0]) * attn_dtype_size(t->dtype);
    v.shape[0] = 1;
    return v;
}

/* Every element of sequence b of o is 0 and of lse -inf (an empty cache). */
static int64_t count_not_empty(const attn_tensor *o, const attn_tensor *lse, int64_t b) {
    attn_tensor ob = batch_view(o, b), lb = batch_view(lse, b);
    int64_t bad = 0;
    for (int64_t i = 0; i < tu_numel(&ob); i++) bad += tu_load(&ob, tu_offset(&ob, i)) != 0.0;
    for (int64_t i = 0; i < tu_numel(&lb); i++)
        bad += tu_load(&lb, tu_offset(&lb, i)) != -INFINITY;
    return bad;
}

static void run_case(int idx, const dcase *c) {
    uint64_t seed = tu_seed(SALT, (uint64_t)idx);
    tu_rng r = {seed};
    const int32_t *lens = c->lens[0] < 0 ? NULL : c->lens;
    tu_case("decode #%d B=%lld Nq=%lld H=%lld Hk=%lld D=%lld Dv=%lld Mcap=%lld lens=%s "
            "causal=%d window=(%lld,%lld) softcap=%g q=%s kv=%s o=%s strided=%d seed=%llx",
            idx, (long long)c->B, (long long)c->Nq, (long long)c->H, (long long)c->Hk,
            (long long)c->D, (long long)c->Dv, (long long)c->Mcap, lens ? "set" : "NULL",
            c->causal, (long long)c->wl, (long long)c->wr, c->softcap,
            attn_dtype_name(c->qdt), attn_dtype_name(c->kvdt), attn_dtype_name(c->odt),
            c->strided, (unsigned long long)seed);
    tu_buf q = tu_alloc(c->qdt, c->B, c->Nq, c->H, c->D);
    tu_buf k = cache(c->kvdt, c->strided, c->B, c->Mcap, c->Hk, c->D);
    tu_buf v = cache(c->kvdt, c->strided, c->B, c->Mcap, c->Hk, c->Dv);
    tu_fill(&q.t, &r, -2, 2);
    tu_fill(&k.t, &r, -2, 2);
    tu_fill(&v.t, &r, -1, 1);
    attn_params p = attn_params_default();
    p.causal = c->causal;
    p.window_left = c->wl;
    p.window_right = c->wr;
    p.softcap = c->softcap;

    /* the reference decode, once */
    tu_buf ro = tu_alloc(ATTN_F64, c->B, c->Nq, c->H, c->Dv);
    tu_buf rl = tu_alloc(ATTN_F64, c->B, c->H, c->Nq, -1);
    attn_status sr = attn_decode(g_ref, &p, &q.t, &k.t, &v.t, lens, &ro.t, &rl.t);
    CHECK(sr == ATTN_OK, "ref decode: %s: %s", attn_status_str(sr), attn_last_error());

    /* Each sequence of it equals the reference forward over its live keys
     * (queries aligned bottom-right); an empty cache gives O = 0, LSE = -inf. */
    for (int64_t b = 0; b < c->B && sr == ATTN_OK; b++) {
        int64_t len = lens ? lens[b] : c->Mcap;
        if (len == 0) {
            int64_t bad = count_not_empty(&ro.t, &rl.t, b);
            CHECK(bad == 0, "ref: sequence %lld with an empty cache: %lld elements not O=0/LSE=-inf",
                  (long long)b, (long long)bad);
            continue;
        }
        attn_tensor qb = batch_view(&q.t, b), kb = batch_view(&k.t, b);
        attn_tensor vb = batch_view(&v.t, b), ob = batch_view(&ro.t, b);
        attn_tensor lb = batch_view(&rl.t, b);
        kb.shape[1] = vb.shape[1] = len;
        tu_fwd_out f = tu_run_forward(g_ref, &p, &qb, &kb, &vb, ATTN_F64, ATTN_F64, 1);
        CHECK(f.st == ATTN_OK, "ref forward of sequence %lld: %s", (long long)b, attn_last_error());
        if (f.st == ATTN_OK) {
            CHECK_CLOSE("ref decode o vs ref forward", &ob, &f.o.t, 1e-14, 1e-14);
            CHECK_CLOSE("ref decode lse vs ref forward", &lb, &f.lse.t, 1e-14, 1e-14);
        }
        tu_fwd_free(&f);
    }

    /* every CPU context against it */
    attn_ctx *cpus[5];
    int ncpu = cpus_for(idx, cpus);
    for (int i = 0; i < ncpu && sr == ATTN_OK; i++) {
        tu_prefix = i ? attn_isa_name(attn_ctx_isa(cpus[i])) : "";
        tu_buf o = tu_alloc(c->odt, c->B, c->Nq, c->H, c->Dv);
        tu_buf lse = tu_alloc(ATTN_F32, c->B, c->H, c->Nq, -1);
        attn_status sc = attn_decode(cpus[i], &p, &q.t, &k.t, &v.t, lens, &o.t, &lse.t);
        CHECK(sc == ATTN_OK, "cpu decode: %s: %s", attn_status_str(sc), attn_last_error());
        if (sc == ATTN_OK) {
            CHECK_CLOSE("o", &o.t, &ro.t, tu_rms_tol(c->odt), tu_max_tol(c->odt));
            CHECK_CLOSE("lse", &lse.t, &rl.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
            for (int64_t b = 0; b < c->B; b++) {
                if (!lens || lens[b] != 0) continue;
                int64_t bad = count_not_empty(&o.t, &lse.t, b);
                CHECK(bad == 0, "sequence %lld with an empty cache: %lld elements not O=0/LSE=-inf",
                      (long long)b, (long long)bad);
            }
        }
        tu_free(&o);
        tu_free(&lse);
    }
    tu_prefix = "";
    tu_buf *all[] = {&q, &k, &v, &ro, &rl};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) tu_free(all[i]);
}

/* ------------------------------------------------------------ LSE merge */

static attn_ctx *g_merge_ctx; /* when set: the cpu context of the merge cases */

static attn_ctx *cpu_for(int idx) { return g_merge_ctx ? g_merge_ctx : g_cpu[idx % 2]; }

/* Splits the keys at m1, runs the CPU forward on each part, merges (CPU and
 * reference merge), and compares with the reference forward over all keys. */
static void merge_split(int idx, int64_t B, int64_t N, int64_t M, int64_t m1, int64_t H,
                        int64_t Hk, int64_t D, attn_dtype odt) {
    uint64_t seed = tu_seed(SALT, 100u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("merge split #%d B=%lld N=%lld M=%lld split=%lld H=%lld Hk=%lld D=%lld o=%s seed=%llx",
            idx, (long long)B, (long long)N, (long long)M, (long long)m1, (long long)H,
            (long long)Hk, (long long)D, attn_dtype_name(odt), (unsigned long long)seed);
    tu_buf q = tu_alloc(ATTN_F32, B, N, H, D);
    tu_buf k = tu_alloc(ATTN_F32, B, M, Hk, D);
    tu_buf v = tu_alloc(ATTN_F32, B, M, Hk, D);
    tu_fill(&q.t, &r, -2, 2);
    tu_fill(&k.t, &r, -2, 2);
    tu_fill(&v.t, &r, -1, 1);
    attn_params p = attn_params_default();
    attn_tensor k1 = k.t, v1 = v.t, k2 = k.t, v2 = v.t;
    k1.shape[1] = v1.shape[1] = m1;
    k2.shape[1] = v2.shape[1] = M - m1;
    k2.data = (float *)k.mem + m1 * k.t.stride[1];
    v2.data = (float *)v.mem + m1 * v.t.stride[1];
    attn_ctx *cpu = cpu_for(idx);
    tu_fwd_out h1 = tu_run_forward(cpu, &p, &q.t, &k1, &v1, ATTN_F32, ATTN_F32, 1);
    tu_fwd_out h2 = tu_run_forward(cpu, &p, &q.t, &k2, &v2, ATTN_F32, ATTN_F32, 1);
    tu_fwd_out all = tu_run_forward(g_ref, &p, &q.t, &k.t, &v.t, ATTN_F64, ATTN_F64, 1);
    CHECK_OK(h1.st);
    CHECK_OK(h2.st);
    CHECK_OK(all.st);
    /* halves stored in odt when testing low-precision merges */
    tu_buf o1 = tu_alloc(odt, B, N, H, D), o2 = tu_alloc(odt, B, N, H, D);
    tu_copy(&o1.t, &h1.o.t);
    tu_copy(&o2.t, &h2.o.t);
    tu_buf o = tu_alloc(odt, B, N, H, D), l = tu_alloc(ATTN_F32, B, H, N, -1);
    CHECK_OK(attn_lse_merge(cpu, &o1.t, &h1.lse.t, &o2.t, &h2.lse.t, &o.t, &l.t));
    CHECK_CLOSE("merged o vs forward over all keys", &o.t, &all.o.t, tu_rms_tol(odt),
                tu_max_tol(odt));
    CHECK_CLOSE("merged lse vs forward over all keys", &l.t, &all.lse.t, TU_LSE_RMS_TOL,
                TU_LSE_MAX_TOL);
    /* the reference merge of the same halves */
    tu_buf ro = tu_alloc(ATTN_F64, B, N, H, D), rl = tu_alloc(ATTN_F64, B, H, N, -1);
    CHECK_OK(attn_lse_merge(g_ref, &o1.t, &h1.lse.t, &o2.t, &h2.lse.t, &ro.t, &rl.t));
    CHECK_CLOSE("cpu merge vs ref merge (o)", &o.t, &ro.t, tu_rms_tol(odt), tu_max_tol(odt));
    CHECK_CLOSE("cpu merge vs ref merge (lse)", &l.t, &rl.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
    tu_buf *bufs[] = {&q, &k, &v, &o1, &o2, &o, &l, &ro, &rl};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) tu_free(bufs[i]);
    tu_fwd_free(&h1);
    tu_fwd_free(&h2);
    tu_fwd_free(&all);
}

/* Sides with LSE = -inf contribute nothing, whatever their O holds (finite
 * garbage here); both -inf gives O = 0 and LSE = -inf, exactly. */
static void merge_neg_inf(int idx) {
    uint64_t seed = tu_seed(SALT, 200u + (uint64_t)idx);
    tu_rng r = {seed};
    tu_case("merge -inf sides #%d seed=%llx", idx, (unsigned long long)seed);
    const int64_t B = 2, N = 9, H = 3, Dv = 20;
    tu_buf o1 = tu_alloc(ATTN_F32, B, N, H, Dv), o2 = tu_alloc(ATTN_F32, B, N, H, Dv);
    tu_buf l1 = tu_alloc(ATTN_F32, B, H, N, -1), l2 = tu_alloc(ATTN_F32, B, H, N, -1);
    tu_fill(&o1.t, &r, -1, 1);
    tu_fill(&o2.t, &r, -1, 1);
    tu_fill(&l1.t, &r, -5, 5);
    tu_fill(&l2.t, &r, -5, 5);
    /* row kind by i % 4: 0 both finite, 1 side 1 empty, 2 side 2 empty, 3 both empty */
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < N; i++) {
                int kind = (int)(i % 4);
                if (kind == 1 || kind == 3) {
                    tu_store(&l1.t, tu_off3(&l1.t, b, h, i), -INFINITY);
                    for (int64_t x = 0; x < Dv; x++)
                        tu_store(&o1.t, tu_off4(&o1.t, b, i, h, x), 1e30);
                }
                if (kind == 2 || kind == 3) {
                    tu_store(&l2.t, tu_off3(&l2.t, b, h, i), -INFINITY);
                    for (int64_t x = 0; x < Dv; x++)
                        tu_store(&o2.t, tu_off4(&o2.t, b, i, h, x), -7e29);
                }
            }
    tu_buf o = tu_alloc(ATTN_F32, B, N, H, Dv), l = tu_alloc(ATTN_F32, B, H, N, -1);
    tu_buf ro = tu_alloc(ATTN_F64, B, N, H, Dv), rl = tu_alloc(ATTN_F64, B, H, N, -1);
    CHECK_OK(attn_lse_merge(cpu_for(idx), &o1.t, &l1.t, &o2.t, &l2.t, &o.t, &l.t));
    CHECK_OK(attn_lse_merge(g_ref, &o1.t, &l1.t, &o2.t, &l2.t, &ro.t, &rl.t));
    CHECK_CLOSE("o vs ref merge", &o.t, &ro.t, 1e-5, 1e-4);
    CHECK_CLOSE("lse vs ref merge", &l.t, &rl.t, TU_LSE_RMS_TOL, TU_LSE_MAX_TOL);
    int64_t bad = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < N; i++) {
                int kind = (int)(i % 4);
                double L = tu_load(&l.t, tu_off3(&l.t, b, h, i));
                const tu_buf *keep = kind == 1 ? &o2 : &o1;
                const tu_buf *keepl = kind == 1 ? &l2 : &l1;
                if (kind == 3) bad += L != -INFINITY;
                else if (kind != 0)
                    bad += !(fabs(L - tu_load(&keepl->t, tu_off3(&keepl->t, b, h, i))) <= 1e-6);
                for (int64_t x = 0; x < Dv; x++) {
                    double y = tu_load(&o.t, tu_off4(&o.t, b, i, h, x));
                    if (kind == 3) bad += y != 0.0;
                    else if (kind != 0)
                        bad += fabs(y - tu_load(&keep->t, tu_off4(&keep->t, b, i, h, x))) > 1e-6;
                }
            }
    CHECK(bad == 0, "%lld elements: an empty side was not ignored, or both-empty not O=0/LSE=-inf",
          (long long)bad);
    tu_buf *bufs[] = {&o1, &o2, &l1, &l2, &o, &l, &ro, &rl};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) tu_free(bufs[i]);
}

int main(void) {
    g_ref = tu_ctx("test_decode", ATTN_BACKEND_REF, 1);
    g_cpu[0] = tu_ctx("test_decode", ATTN_BACKEND_CPU, 2);
    g_cpu[1] = tu_ctx("test_decode", ATTN_BACKEND_CPU, 1);

    g_n_isa = tu_other_isa_ctxs(g_isa, 4, 2);
    for (int i = 0; i < (int)(sizeof k_cases / sizeof k_cases[0]); i++) run_case(i, &k_cases[i]);

    /* the merge on every ISA */
    for (int r = -1; r < g_n_isa; r++) {
        g_merge_ctx = r < 0 ? NULL : g_isa[r];
        tu_prefix = r < 0 ? "" : attn_isa_name(attn_ctx_isa(g_merge_ctx));
        merge_split(0, 2, 33, 200, 100, 4, 2, 64, ATTN_F32);
        merge_split(1, 1, 1, 1000, 1, 8, 1, 128, ATTN_F32);
        merge_split(2, 1, 16, 65, 63, 4, 4, 96, ATTN_F16);
        merge_neg_inf(0);
        merge_neg_inf(1);
    }
    tu_prefix = "";
    for (int i = 0; i < g_n_isa; i++) attn_ctx_free(g_isa[i]);

    attn_ctx_free(g_ref);
    attn_ctx_free(g_cpu[0]);
    attn_ctx_free(g_cpu[1]);
    return tu_finish("test_decode");
}
