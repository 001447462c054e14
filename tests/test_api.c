/* The API contract on bad input: every case returns the documented status,
 * attn_last_error() names the argument, and no output (nor input) byte
 * changes. Plus the small things: free(NULL), status strings, version,
 * capability queries, ISA selection, dtype helpers. */
#include "test_util.h"

#include <ctype.h>

static attn_ctx *g_ref, *g_cpu;

/* word appears in msg as a whole identifier (not inside a longer name). */
static int names(const char *msg, const char *word) {
    size_t n = strlen(word);
    for (const char *s = strstr(msg, word); s; s = strstr(s + 1, word)) {
        int before = s == msg || !(isalnum((unsigned char)s[-1]) || s[-1] == '_');
        int after = !(isalnum((unsigned char)s[n]) || s[n] == '_');
        if (before && after) return 1;
    }
    return 0;
}

/* Checks a failed call: status, a message naming `word`, and (done by the
 * caller) untouched buffers. */
static void expect(const char *what, attn_status got, attn_status want, const char *word) {
    const char *msg = attn_last_error();
    CHECK(got == want, "%s: returned %s (%d), expected %s (%d); message: '%s'", what,
          attn_status_str(got), (int)got, attn_status_str(want), (int)want, msg);
    CHECK(msg && msg[0] != '\0', "%s: empty attn_last_error()", what);
    if (word) CHECK(names(msg, word), "%s: message '%s' does not name '%s'", what, msg, word);
}

/* ------------------------------------------------------------ a valid problem */

/* Every buffer is 4096 elements so that a mutated (wrong) shape that slips
 * through validation still stays inside its memory. */
#define CAP 4096
enum { B = 1, N = 4, M = 5, H = 2, HK = 1, D = 8, DV = 8 };

typedef struct fixture {
    float q[CAP], k[CAP], v[CAP], o[CAP], lse[CAP], dout[CAP], dq[CAP], dk[CAP], dv[CAP];
    float o2[CAP], lse2[CAP];
    attn_tensor tq, tk, tv, to, tlse, tdout, tdq, tdk, tdv, to2, tlse2;
    attn_params p;
} fixture;

static fixture F, F0; /* the fixture, and a copy of its bytes before a call */

static void fixture_reset(void) {
    tu_rng r = {12345};
    for (int i = 0; i < CAP; i++) {
        F.q[i] = (float)tu_uniform(&r, -1, 1);
        F.k[i] = (float)tu_uniform(&r, -1, 1);
        F.v[i] = (float)tu_uniform(&r, -1, 1);
        F.dout[i] = (float)tu_uniform(&r, -1, 1);
        F.o2[i] = (float)tu_uniform(&r, -1, 1);
        F.lse2[i] = (float)tu_uniform(&r, -1, 1);
    }
    memset(F.o, 0xA5, sizeof F.o); /* sentinels in the outputs */
    memset(F.lse, 0xA5, sizeof F.lse);
    memset(F.dq, 0x5A, sizeof F.dq);
    memset(F.dk, 0x5B, sizeof F.dk);
    memset(F.dv, 0x5C, sizeof F.dv);
    F.tq = attn_tensor_4d(F.q, ATTN_F32, B, N, H, D);
    F.tk = attn_tensor_4d(F.k, ATTN_F32, B, M, HK, D);
    F.tv = attn_tensor_4d(F.v, ATTN_F32, B, M, HK, DV);
    F.to = attn_tensor_4d(F.o, ATTN_F32, B, N, H, DV);
    F.tlse = attn_tensor_3d(F.lse, ATTN_F32, B, H, N);
    F.tdout = attn_tensor_4d(F.dout, ATTN_F32, B, N, H, DV);
    F.tdq = attn_tensor_4d(F.dq, ATTN_F32, B, N, H, D);
    F.tdk = attn_tensor_4d(F.dk, ATTN_F32, B, M, HK, D);
    F.tdv = attn_tensor_4d(F.dv, ATTN_F32, B, M, HK, DV);
    F.to2 = attn_tensor_4d(F.o2, ATTN_F32, B, N, H, DV);
    F.tlse2 = attn_tensor_3d(F.lse2, ATTN_F32, B, H, N);
    F.p = attn_params_default();
    memcpy(&F0, &F, sizeof F);
}

/* No byte of any buffer changed since fixture_reset. */
static void expect_untouched(const char *what) {
    CHECK(memcmp(F.o, F0.o, sizeof F.o) == 0, "%s: o was written", what);
    CHECK(memcmp(F.lse, F0.lse, sizeof F.lse) == 0, "%s: lse was written", what);
    CHECK(memcmp(F.dq, F0.dq, sizeof F.dq) == 0 && memcmp(F.dk, F0.dk, sizeof F.dk) == 0 &&
              memcmp(F.dv, F0.dv, sizeof F.dv) == 0,
          "%s: a gradient was written", what);
    CHECK(memcmp(F.q, F0.q, sizeof F.q) == 0 && memcmp(F.k, F0.k, sizeof F.k) == 0 &&
              memcmp(F.v, F0.v, sizeof F.v) == 0 && memcmp(F.o2, F0.o2, sizeof F.o2) == 0,
          "%s: an input was written", what);
}

static attn_status fwd(attn_ctx *ctx) {
    return attn_forward(ctx, &F.p, &F.tq, &F.tk, &F.tv, &F.to, &F.tlse);
}

/* Runs `call` after `mutate` on a fresh fixture, on both backends. */
#define FWD_CASE(label, mutate, want, word)                                   \
    do {                                                                      \
        for (int be_ = 0; be_ < 2; be_++) {                                   \
            attn_ctx *ctx_ = be_ ? g_ref : g_cpu;                             \
            fixture_reset();                                                  \
            mutate;                                                           \
            tu_case("forward: %s (%s)", label, be_ ? "ref" : "cpu");          \
            expect(label, fwd(ctx_), want, word);                             \
            expect_untouched(label);                                          \
        }                                                                     \
    } while (0)

static int32_t g_cuq[4], g_cuk[4];

static void set_varlen(const int32_t *cuq, const int32_t *cuk, int64_t batch) {
    memcpy(g_cuq, cuq, sizeof g_cuq);
    memcpy(g_cuk, cuk, sizeof g_cuk);
    F.p.batch = batch;
    F.p.cu_seqlens_q = g_cuq;
    F.p.cu_seqlens_k = g_cuk;
}

static void forward_cases(void) {
    /* the valid fixture works (and writes o) */
    fixture_reset();
    tu_case("forward: valid fixture");
    CHECK_OK(fwd(g_cpu));
    CHECK(strcmp(attn_last_error(), "") == 0, "attn_last_error() is '%s' after success",
          attn_last_error());

    const int64_t huge = (int64_t)1 << 62;
    tu_case("forward: NULL ctx");
    fixture_reset();
    expect("NULL ctx", attn_forward(NULL, &F.p, &F.tq, &F.tk, &F.tv, &F.to, &F.tlse),
           ATTN_ERR_NULL, "ctx");
    expect_untouched("NULL ctx");
    for (int be = 0; be < 2; be++) {
        attn_ctx *c = be ? g_ref : g_cpu;
        tu_case("forward: NULL arguments (%s)", be ? "ref" : "cpu");
        fixture_reset();
        expect("NULL params", attn_forward(c, NULL, &F.tq, &F.tk, &F.tv, &F.to, &F.tlse),
               ATTN_ERR_NULL, "params");
        expect("NULL q", attn_forward(c, &F.p, NULL, &F.tk, &F.tv, &F.to, &F.tlse),
               ATTN_ERR_NULL, "q");
        expect("NULL k", attn_forward(c, &F.p, &F.tq, NULL, &F.tv, &F.to, &F.tlse),
               ATTN_ERR_NULL, "k");
        expect("NULL v", attn_forward(c, &F.p, &F.tq, &F.tk, NULL, &F.to, &F.tlse),
               ATTN_ERR_NULL, "v");
        expect("NULL o", attn_forward(c, &F.p, &F.tq, &F.tk, &F.tv, NULL, &F.tlse),
               ATTN_ERR_NULL, "o");
        expect_untouched("NULL arguments");
    }
    FWD_CASE("q->data NULL", F.tq.data = NULL, ATTN_ERR_NULL, "q");
    FWD_CASE("o->data NULL", F.to.data = NULL, ATTN_ERR_NULL, "o");

    /* shapes */
    FWD_CASE("batch mismatch", F.tk.shape[0] = F.tv.shape[0] = 2, ATTN_ERR_SHAPE, "k");
    FWD_CASE("D mismatch", F.tk.shape[3] = D - 1, ATTN_ERR_SHAPE, "k");
    FWD_CASE("Dv mismatch (o)", F.to.shape[3] = DV + 1, ATTN_ERR_SHAPE, "o");
    FWD_CASE("M mismatch (v)", F.tv.shape[1] = M + 1, ATTN_ERR_SHAPE, "v");
    FWD_CASE("H mismatch (o)", F.to.shape[2] = H + 1, ATTN_ERR_SHAPE, "o");
    FWD_CASE("N mismatch (o)", F.to.shape[1] = N - 1, ATTN_ERR_SHAPE, "o");
    FWD_CASE("H not divisible by Hk", (F.tq.shape[2] = 3, F.tk.shape[2] = F.tv.shape[2] = 2,
                                       F.to.shape[2] = 3, F.tlse.shape[1] = 3),
             ATTN_ERR_SHAPE, NULL);
    FWD_CASE("ndim 3 q", F.tq.ndim = 3, ATTN_ERR_SHAPE, "q");
    FWD_CASE("D = 0", F.tq.shape[3] = F.tk.shape[3] = 0, ATTN_ERR_SHAPE, "q");
    FWD_CASE("N = 0", (F.tq.shape[1] = 0, F.to.shape[1] = 0, F.tlse.shape[2] = 0),
             ATTN_ERR_SHAPE, "q");
    FWD_CASE("B = 0", F.tq.shape[0] = F.tk.shape[0] = F.tv.shape[0] = F.to.shape[0] = 0,
             ATTN_ERR_SHAPE, "q");
    FWD_CASE("M negative", F.tk.shape[1] = F.tv.shape[1] = -3, ATTN_ERR_SHAPE, "k");
    FWD_CASE("Dv negative", F.tv.shape[3] = F.to.shape[3] = -1, ATTN_ERR_SHAPE, "v");
    FWD_CASE("lse wrong shape", F.tlse.shape[2] = N + 1, ATTN_ERR_SHAPE, "lse");

    /* sizes that overflow: rejected before any memory is touched */
    FWD_CASE("N = 2^62 (byte extent overflows)",
             (F.tq.shape[1] = huge, F.to.shape[1] = huge, F.tlse.shape[2] = huge),
             ATTN_ERR_OVERFLOW, "q");
    FWD_CASE("M = 2^62 (byte extent overflows)", F.tk.shape[1] = F.tv.shape[1] = huge,
             ATTN_ERR_OVERFLOW, "k");
    FWD_CASE("element count overflows (broadcast strides)",
             (F.tq.shape[0] = F.tk.shape[0] = F.tv.shape[0] = F.to.shape[0] = (int64_t)1 << 40,
              F.tq.shape[1] = (int64_t)1 << 40, F.tq.stride[0] = F.tq.stride[1] = 0),
             ATTN_ERR_OVERFLOW, "q");
    FWD_CASE("stride overflows", F.tv.stride[1] = INT64_MAX / 2 + 1, ATTN_ERR_OVERFLOW, "v");
    FWD_CASE("negative stride", F.tq.stride[2] = -8, ATTN_ERR_ARG, "q");

    /* dtypes */
    FWD_CASE("bad q dtype", F.tq.dtype = (attn_dtype)99, ATTN_ERR_DTYPE, "q");
    FWD_CASE("bad o dtype", F.to.dtype = (attn_dtype)-1, ATTN_ERR_DTYPE, "o");
    FWD_CASE("k and v dtypes differ", F.tv.dtype = ATTN_F16, ATTN_ERR_DTYPE, "v");
    FWD_CASE("lse f16", F.tlse.dtype = ATTN_F16, ATTN_ERR_DTYPE, "lse");
    fixture_reset();
    tu_case("forward: f64 on the cpu backend");
    F.to.dtype = ATTN_F64;
    expect("f64 o on cpu", fwd(g_cpu), ATTN_ERR_DTYPE, "o");
    expect_untouched("f64 o on cpu");
    fixture_reset();
    F.tq.dtype = ATTN_F64;
    expect("f64 q on cpu", fwd(g_cpu), ATTN_ERR_DTYPE, "q");
    expect_untouched("f64 q on cpu");

    /* aliasing */
    FWD_CASE("o aliases q", F.to.data = F.q, ATTN_ERR_ALIAS, "o");
    FWD_CASE("o overlaps v", F.to.data = F.v + 3, ATTN_ERR_ALIAS, "o");
    FWD_CASE("lse inside o", F.tlse.data = F.o + 4, ATTN_ERR_ALIAS, NULL);
    FWD_CASE("lse aliases k", F.tlse.data = F.k, ATTN_ERR_ALIAS, "lse");
    FWD_CASE("o self-overlapping strides", F.to.stride[2] = 0, ATTN_ERR_ALIAS, "o");

    /* params */
    FWD_CASE("window_left = -2", F.p.window_left = -2, ATTN_ERR_ARG, "window_left");
    FWD_CASE("window_right = -5", F.p.window_right = -5, ATTN_ERR_ARG, NULL);
    FWD_CASE("negative scale", F.p.scale = -1.0f, ATTN_ERR_ARG, "scale");
    FWD_CASE("NaN scale", F.p.scale = NAN, ATTN_ERR_ARG, "scale");
    FWD_CASE("infinite scale", F.p.scale = INFINITY, ATTN_ERR_ARG, "scale");
    FWD_CASE("negative softcap", F.p.softcap = -2.0f, ATTN_ERR_ARG, "softcap");
    FWD_CASE("NaN softcap", F.p.softcap = NAN, ATTN_ERR_ARG, "softcap");
    FWD_CASE("causal = 2", F.p.causal = 2, ATTN_ERR_ARG, "causal");

    /* varlen: q [1, 4, H, D] holds sequences of 1 and 3 rows; k [1, 5] of 2 and 3 */
    static const int32_t okq[4] = {0, 1, 4, 0}, okk[4] = {0, 2, 5, 0};
    static const int32_t decq[4] = {0, 3, 2, 4}, startq[4] = {1, 2, 4, 0};
    static const int32_t shortq[4] = {0, 1, 3, 0};
    fixture_reset();
    set_varlen(okq, okk, 2);
    tu_case("forward: valid varlen");
    CHECK_OK(fwd(g_cpu));
    FWD_CASE("cu_seqlens_q decreasing", set_varlen(decq, okk, 3), ATTN_ERR_ARG, "cu_seqlens_q");
    FWD_CASE("cu_seqlens_q not from 0", set_varlen(startq, okk, 2), ATTN_ERR_ARG, "cu_seqlens_q");
    FWD_CASE("cu_seqlens_k not from 0", set_varlen(okq, startq, 2), ATTN_ERR_ARG, "cu_seqlens_k");
    FWD_CASE("cu_seqlens_q total differs from rows", set_varlen(shortq, okk, 2), ATTN_ERR_SHAPE,
             "cu_seqlens_q");
    FWD_CASE("cu_seqlens_k missing", (set_varlen(okq, okk, 2), F.p.cu_seqlens_k = NULL),
             ATTN_ERR_ARG, "cu_seqlens_k");
    FWD_CASE("varlen batch 0", set_varlen(okq, okk, 0), ATTN_ERR_ARG, "batch");
    FWD_CASE("varlen with q dim0 = 2", (set_varlen(okq, okk, 2), F.tq.shape[0] = 2,
                                        F.tk.shape[0] = F.tv.shape[0] = F.to.shape[0] = 2,
                                        F.tlse.shape[0] = 2),
             ATTN_ERR_SHAPE, "q");
}

/* ------------------------------------------------------------ plans */

static void plan_cases(void) {
    /* a valid plan: n 4, m 5, blocks 2 x 2 -> 2 query blocks, 3 key blocks */
    int64_t off[3] = {0, 2, 3};
    attn_plan_entry ent[3] = {{0, 0, ATTN_BLOCK_FULL, 0},
                              {2, 0, ATTN_BLOCK_PARAMS, 0},
                              {1, 0, ATTN_BLOCK_FULL, 0}};
    attn_plan *pl = NULL;
    tu_case("plan_create: valid");
    CHECK_OK(attn_plan_create(&pl, N, M, 2, 2, 1, off, ent));
    CHECK(pl != NULL, "plan is NULL");
    double dens = attn_plan_density(pl);
    /* visited: block (0,0) 2x2 + (0,2) 2x1 + (1,1) 2x2 = 10 of 20 */
    CHECK(fabs(dens - 0.5) < 1e-12, "density %g, expected 0.5", dens);
    fixture_reset();
    F.p.plan = pl;
    tu_case("forward with a valid plan");
    CHECK_OK(fwd(g_cpu));

    /* a plan of other n/m, or of a head count that is neither 1, H nor Hk */
    attn_plan *wrong = NULL;
    int64_t off2[4] = {0, 1, 2, 3};
    attn_plan_entry ent2[3] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
    CHECK_OK(attn_plan_create(&wrong, 6, 5, 2, 2, 1, off2, ent2));
    FWD_CASE("plan with wrong n", F.p.plan = wrong, ATTN_ERR_SHAPE, "plan");
    attn_plan_free(wrong);
    wrong = NULL;
    CHECK_OK(attn_plan_create(&wrong, 4, 6, 2, 2, 1, off2, ent2));
    FWD_CASE("plan with wrong m", F.p.plan = wrong, ATTN_ERR_SHAPE, "plan");
    attn_plan_free(wrong);
    wrong = NULL;
    int64_t off3[7] = {0, 1, 2, 3, 3, 3, 3};
    CHECK_OK(attn_plan_create(&wrong, 4, 5, 2, 2, 3, off3, ent2));
    FWD_CASE("plan with 3 heads (H 2, Hk 1)", F.p.plan = wrong, ATTN_ERR_SHAPE, "plan");
    attn_plan_free(wrong);
    static const int32_t okq[4] = {0, 1, 4, 0}, okk[4] = {0, 2, 5, 0};
    FWD_CASE("plan with varlen", (set_varlen(okq, okk, 2), F.p.plan = pl),
             ATTN_ERR_UNSUPPORTED, NULL);

    /* attn_plan_create's own checks; *out is NULL after a failure */
#define E(kb) {kb, 0, ATTN_BLOCK_FULL, 0}
    struct {
        const char *label;
        int64_t n, m, bq, bk, heads;
        int64_t off[3];
        attn_plan_entry e[3];
        attn_status want;
        const char *word;
        int null_off;
    } pc[] = {
        {"row_offsets[0] != 0", N, M, 2, 2, 1, {1, 2, 3}, {E(0), E(1), E(2)}, ATTN_ERR_ARG, "row_offsets", 0},
        {"decreasing row_offsets", N, M, 2, 2, 1, {0, 2, 1}, {E(0), E(1), E(2)}, ATTN_ERR_ARG, "row_offsets", 0},
        {"more entries than key blocks", N, M, 2, 2, 1, {0, 4, 4}, {E(0), E(1), E(2)}, ATTN_ERR_ARG, "row_offsets", 0},
        {"key_block out of range", N, M, 2, 2, 1, {0, 1, 2}, {E(0), E(3), E(0)}, ATTN_ERR_ARG, "key_block", 0},
        {"negative key_block", N, M, 2, 2, 1, {0, 1, 2}, {E(-1), E(0), E(0)}, ATTN_ERR_ARG, "key_block", 0},
        {"unsorted key_blocks", N, M, 2, 2, 1, {0, 2, 3}, {E(2), E(1), E(0)}, ATTN_ERR_ARG, "key_block", 0},
        {"duplicate key_blocks", N, M, 2, 2, 1, {0, 2, 3}, {E(1), E(1), E(0)}, ATTN_ERR_ARG, "key_block", 0},
        {"bad mask", N, M, 2, 2, 1, {0, 1, 2}, {{0, 0, 7, 0}, E(0), E(0)}, ATTN_ERR_ARG, "mask", 0},
        {"2^level > block_k", N, M, 2, 2, 1, {0, 1, 2}, {{0, 2, 0, 0}, E(0), E(0)}, ATTN_ERR_ARG, "level", 0},
        {"pooled entry with a PARAMS mask", N, M, 2, 2, 1, {0, 1, 2}, {{0, 1, ATTN_BLOCK_PARAMS, 0}, E(0), E(0)}, ATTN_ERR_ARG, "mask", 0},
        {"n = 0", 0, M, 2, 2, 1, {0, 0, 0}, {E(0), E(0), E(0)}, ATTN_ERR_ARG, "n", 0},
        {"m negative", N, -5, 2, 2, 1, {0, 0, 0}, {E(0), E(0), E(0)}, ATTN_ERR_ARG, "m", 0},
        {"block_q = 0", N, M, 0, 2, 1, {0, 0, 0}, {E(0), E(0), E(0)}, ATTN_ERR_ARG, "block_q", 0},
        {"block_k = 513", N, M, 2, 513, 1, {0, 0, 0}, {E(0), E(0), E(0)}, ATTN_ERR_ARG, "block_k", 0},
        {"heads = 0", N, M, 2, 2, 0, {0, 0, 0}, {E(0), E(0), E(0)}, ATTN_ERR_ARG, "heads", 0},
        {"row_offsets NULL", N, M, 2, 2, 1, {0, 0, 0}, {E(0), E(0), E(0)}, ATTN_ERR_NULL, "row_offsets", 1},
    };
    for (size_t i = 0; i < sizeof pc / sizeof pc[0]; i++) {
        tu_case("plan_create: %s", pc[i].label);
        attn_plan *out = (attn_plan *)&pc[i]; /* must be reset to NULL */
        attn_status st = attn_plan_create(&out, pc[i].n, pc[i].m, pc[i].bq, pc[i].bk,
                                          pc[i].heads, pc[i].null_off ? NULL : pc[i].off,
                                          pc[i].e);
        expect(pc[i].label, st, pc[i].want, pc[i].word);
        CHECK(out == NULL, "%s: *out is not NULL after a failure", pc[i].label);
        if (st == ATTN_OK && out != (attn_plan *)&pc[i]) attn_plan_free(out);
    }
#undef E
    tu_case("plan_create: NULL out");
    expect("NULL out", attn_plan_create(NULL, N, M, 2, 2, 1, off, ent), ATTN_ERR_NULL, "out");
    tu_case("plan_create: NULL entries with entries listed");
    attn_plan *out = NULL;
    expect("NULL entries", attn_plan_create(&out, N, M, 2, 2, 1, off, NULL), ATTN_ERR_NULL,
           "entries");
    attn_plan_free(pl);
    attn_plan_free(NULL); /* no-op */
    CHECK(attn_plan_density(NULL) == 0.0, "density of NULL");
}

/* ------------------------------------------------------------ other ops */

static void backward_cases(void) {
    fixture_reset();
    tu_case("backward: valid");
    CHECK_OK(fwd(g_cpu));
    memcpy(&F0, &F, sizeof F); /* o and lse now hold the forward's results */
    CHECK_OK(attn_backward(g_cpu, &F.p, &F.tq, &F.tk, &F.tv, &F.to, &F.tlse, &F.tdout, &F.tdq,
                           &F.tdk, &F.tdv));

#define BWD(label, mutate, want, word)                                                    \
    do {                                                                                  \
        fixture_reset();                                                                  \
        CHECK_OK(fwd(g_cpu));                                                             \
        memcpy(&F0, &F, sizeof F);                                                        \
        mutate;                                                                           \
        tu_case("backward: %s", label);                                                   \
        expect(label,                                                                     \
               attn_backward(g_cpu, &F.p, &F.tq, &F.tk, &F.tv, &F.to, &F.tlse, &F.tdout,  \
                             &F.tdq, &F.tdk, &F.tdv),                                     \
               want, word);                                                               \
        expect_untouched(label);                                                          \
    } while (0)
    fixture_reset();
    CHECK_OK(fwd(g_cpu));
    memcpy(&F0, &F, sizeof F);
    tu_case("backward: NULL arguments");
    expect("NULL dq", attn_backward(g_cpu, &F.p, &F.tq, &F.tk, &F.tv, &F.to, &F.tlse, &F.tdout,
                                    NULL, &F.tdk, &F.tdv),
           ATTN_ERR_NULL, "dq");
    expect("NULL lse", attn_backward(g_cpu, &F.p, &F.tq, &F.tk, &F.tv, &F.to, NULL, &F.tdout,
                                     &F.tdq, &F.tdk, &F.tdv),
           ATTN_ERR_NULL, "lse");
    expect("NULL dout", attn_backward(g_cpu, &F.p, &F.tq, &F.tk, &F.tv, &F.to, &F.tlse, NULL,
                                      &F.tdq, &F.tdk, &F.tdv),
           ATTN_ERR_NULL, "dout");
    expect("NULL ctx", attn_backward(NULL, &F.p, &F.tq, &F.tk, &F.tv, &F.to, &F.tlse, &F.tdout,
                                     &F.tdq, &F.tdk, &F.tdv),
           ATTN_ERR_NULL, "ctx");
    expect_untouched("backward NULL arguments");
    BWD("dk wrong shape", F.tdk.shape[3] = D + 1, ATTN_ERR_SHAPE, "dk");
    BWD("dv wrong heads", F.tdv.shape[2] = 2, ATTN_ERR_SHAPE, "dv");
    BWD("dout wrong shape", F.tdout.shape[1] = N + 1, ATTN_ERR_SHAPE, "dout");
    BWD("dq aliases k", F.tdq.data = F.k, ATTN_ERR_ALIAS, "dq");
    BWD("dv aliases dk", F.tdv.data = F.dk, ATTN_ERR_ALIAS, "dv");
    BWD("lse f16", F.tlse.dtype = ATTN_F16, ATTN_ERR_DTYPE, "lse");
    BWD("dq bad dtype", F.tdq.dtype = (attn_dtype)42, ATTN_ERR_DTYPE, "dq");
#undef BWD
}

static void decode_cases(void) {
    fixture_reset();
    tu_case("decode: valid");
    int32_t lens[2] = {3, 5};
    CHECK_OK(attn_decode(g_cpu, &F.p, &F.tq, &F.tk, &F.tv, lens, &F.to, &F.tlse));

    /* 17 new queries */
    static float q17[17 * H * D], o17[17 * H * DV], l17[H * 17];
    memset(o17, 0xA5, sizeof o17);
    memset(l17, 0xA5, sizeof l17);
    attn_tensor tq = attn_tensor_4d(q17, ATTN_F32, 1, 17, H, D);
    attn_tensor to = attn_tensor_4d(o17, ATTN_F32, 1, 17, H, DV);
    attn_tensor tl = attn_tensor_3d(l17, ATTN_F32, 1, H, 17);
    fixture_reset();
    tu_case("decode: Nq = 17");
    expect("decode Nq 17", attn_decode(g_cpu, &F.p, &tq, &F.tk, &F.tv, NULL, &to, &tl),
           ATTN_ERR_ARG, "q");
    int bad = 0;
    for (size_t i = 0; i < sizeof o17; i++) bad += ((unsigned char *)o17)[i] != 0xA5;
    for (size_t i = 0; i < sizeof l17; i++) bad += ((unsigned char *)l17)[i] != 0xA5;
    CHECK(bad == 0, "decode Nq 17 wrote its output");

#define DEC(label, mutate, lens_, want, word)                                                 \
    do {                                                                                      \
        fixture_reset();                                                                      \
        mutate;                                                                               \
        tu_case("decode: %s", label);                                                         \
        expect(label, attn_decode(g_cpu, &F.p, &F.tq, &F.tk, &F.tv, lens_, &F.to, &F.tlse),   \
               want, word);                                                                   \
        expect_untouched(label);                                                              \
    } while (0)
    int32_t too_long[1] = {M + 1}, negative[1] = {-1};
    DEC("cache_lens > capacity", (void)0, too_long, ATTN_ERR_ARG, "cache_lens");
    DEC("negative cache_lens", (void)0, negative, ATTN_ERR_ARG, "cache_lens");
    static const int32_t cu[3] = {0, 4, 4};
    DEC("decode with cu_seqlens", (F.p.batch = 1, F.p.cu_seqlens_q = cu, F.p.cu_seqlens_k = cu),
        NULL, ATTN_ERR_ARG, "cu_seqlens");
    DEC("decode NULL q", F.tq.data = NULL, NULL, ATTN_ERR_NULL, "q");
    DEC("decode o aliases k", F.to.data = F.k, NULL, ATTN_ERR_ALIAS, "o");
    DEC("decode bad window", F.p.window_left = -7, NULL, ATTN_ERR_ARG, NULL);
#undef DEC
}

static void merge_cases(void) {
    fixture_reset();
    tu_case("lse_merge: valid");
    CHECK_OK(attn_lse_merge(g_cpu, &F.tdout, &F.tlse2, &F.to2, &F.tlse2, &F.to, &F.tlse));

#define MRG(label, mutate, want, word)                                                      \
    do {                                                                                    \
        fixture_reset();                                                                    \
        mutate;                                                                             \
        tu_case("lse_merge: %s", label);                                                    \
        expect(label,                                                                       \
               attn_lse_merge(g_cpu, &F.tdout, &F.tlse2, &F.to2, &F.tlse2, &F.to, &F.tlse), \
               want, word);                                                                 \
        expect_untouched(label);                                                            \
    } while (0)
    MRG("o2 wrong shape", F.to2.shape[3] = DV - 1, ATTN_ERR_SHAPE, "o2");
    MRG("lse1 wrong shape", F.tlse2.shape[1] = H + 1, ATTN_ERR_SHAPE, "lse1");
    MRG("o aliases o2", F.to.data = F.o2, ATTN_ERR_ALIAS, "o");
    MRG("lse f16", F.tlse.dtype = ATTN_F16, ATTN_ERR_DTYPE, "lse");
    MRG("o1 NULL data", F.tdout.data = NULL, ATTN_ERR_NULL, "o1");
#undef MRG
    fixture_reset();
    tu_case("lse_merge: NULL ctx and NULL o1");
    expect("merge NULL ctx",
           attn_lse_merge(NULL, &F.tdout, &F.tlse2, &F.to2, &F.tlse2, &F.to, &F.tlse),
           ATTN_ERR_NULL, "ctx");
    expect("merge NULL o1",
           attn_lse_merge(g_cpu, NULL, &F.tlse2, &F.to2, &F.tlse2, &F.to, &F.tlse),
           ATTN_ERR_NULL, "o1");
    expect_untouched("merge NULL");
}

/* ------------------------------------------------------------ small things */

static void misc_cases(void) {
    tu_case("free(NULL)");
    attn_ctx_free(NULL);
    attn_plan_free(NULL);
    CHECK(1, "free of NULL returned");

    tu_case("status strings");
#define STATUS_STR_(name, value, text)                                                    \
    CHECK((int)name == value && strcmp(attn_status_str(name), text) == 0,                 \
          "attn_status_str(%s) is '%s'", #name, attn_status_str(name));
    ATTN_STATUS_LIST(STATUS_STR_)
#undef STATUS_STR_
    CHECK(strcmp(attn_status_str((attn_status)1234), "unknown status") == 0,
          "attn_status_str(1234) is '%s'", attn_status_str((attn_status)1234));
    CHECK(strcmp(attn_status_str((attn_status)-1), "unknown status") == 0,
          "attn_status_str(-1) is '%s'", attn_status_str((attn_status)-1));

    tu_case("version");
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", ATTN_VERSION_MAJOR, ATTN_VERSION_MINOR,
             ATTN_VERSION_PATCH);
    CHECK(strcmp(attn_version(), want) == 0, "attn_version() is '%s'", attn_version());
    CHECK(attn_version_number() == ATTN_VERSION_NUMBER, "attn_version_number() is %d",
          attn_version_number());

    tu_case("dtypes");
    CHECK(attn_dtype_size(ATTN_F32) == 4 && attn_dtype_size(ATTN_F16) == 2 &&
              attn_dtype_size(ATTN_BF16) == 2 && attn_dtype_size(ATTN_F64) == 8 &&
              attn_dtype_size((attn_dtype)99) == 0,
          "attn_dtype_size");
    CHECK(strcmp(attn_dtype_name(ATTN_BF16), "bf16") == 0, "attn_dtype_name(bf16)");
    CHECK(attn_dtype_name((attn_dtype)99) != NULL, "attn_dtype_name(99) is NULL");
    CHECK(attn_f16_to_f32(attn_f32_to_f16(1.5f)) == 1.5f, "f16 round trip of 1.5");
    CHECK(attn_f16_to_f32(attn_f32_to_f16(65504.0f)) == 65504.0f, "f16 max");
    CHECK(isinf(attn_f16_to_f32(attn_f32_to_f16(1e6f))), "f16 overflow to inf");
    CHECK(isnan(attn_f16_to_f32(attn_f32_to_f16(NAN))), "f16 NaN stays NaN");
    CHECK(attn_f32_to_f16(1.0f + 1.0f / 2048.0f) == attn_f32_to_f16(1.0f),
          "f16 ties to even (down)");
    CHECK(attn_f32_to_f16(1.0f + 3.0f / 2048.0f) == attn_f32_to_f16(1.0f + 2.0f / 1024.0f),
          "f16 ties to even (up)");
    CHECK(attn_f16_to_f32(1) == 5.9604644775390625e-8f, "smallest f16 subnormal");
    CHECK(attn_bf16_to_f32(attn_f32_to_bf16(-2.5f)) == -2.5f, "bf16 round trip");
    CHECK(isnan(attn_bf16_to_f32(attn_f32_to_bf16(NAN))), "bf16 NaN stays NaN");
    CHECK(attn_f32_to_bf16(1.0f + 1.0f / 256.0f) == attn_f32_to_bf16(1.0f),
          "bf16 ties to even");

    tu_case("tensor constructors");
    float buf[24];
    attn_tensor t4 = attn_tensor_4d(buf, ATTN_F32, 1, 2, 3, 4);
    CHECK(t4.ndim == 4 && t4.stride[0] == 24 && t4.stride[1] == 12 && t4.stride[2] == 4 &&
              t4.stride[3] == 1 && t4.data == buf,
          "attn_tensor_4d strides");
    attn_tensor t3 = attn_tensor_3d(buf, ATTN_F32, 2, 3, 4);
    CHECK(t3.ndim == 3 && t3.stride[0] == 12 && t3.stride[1] == 4 && t3.stride[2] == 1,
          "attn_tensor_3d strides");

    tu_case("params default");
    attn_params p = attn_params_default();
    CHECK(p.scale == 0.0f && p.softcap == 0.0f && p.causal == 0 && p.window_left == -1 &&
              p.window_right == -1 && p.cu_seqlens_q == NULL && p.cu_seqlens_k == NULL &&
              p.plan == NULL,
          "attn_params_default");

    tu_case("context");
    CHECK(attn_ctx_backend(g_cpu) == ATTN_BACKEND_CPU, "cpu ctx backend");
    CHECK(attn_ctx_backend(g_ref) == ATTN_BACKEND_REF, "ref ctx backend");
    CHECK(attn_ctx_threads(g_cpu) == 2, "cpu ctx threads %d", attn_ctx_threads(g_cpu));
    const char *env_isa = getenv("ATTN_ISA");
    if (!env_isa || !*env_isa)
        CHECK(attn_ctx_isa(g_cpu) == attn_isa_detected(), "auto isa is the detected one");
    attn_ctx_options o = attn_ctx_options_default();
    attn_ctx *c = (attn_ctx *)&o;
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
    o.isa = ATTN_ISA_NEON;
#else
    o.isa = ATTN_ISA_AVX2;
#endif
    expect("ctx with a missing ISA", attn_ctx_create(&c, &o), ATTN_ERR_UNSUPPORTED, NULL);
    CHECK(c == NULL, "ctx_create left *out non-NULL after a failure");
    if (attn_isa_detected() != ATTN_ISA_AVX512 && attn_isa_detected() != ATTN_ISA_NEON) {
        o.isa = ATTN_ISA_AVX512;
        expect("ctx with avx512 missing", attn_ctx_create(&c, &o), ATTN_ERR_UNSUPPORTED, NULL);
    }
    o = attn_ctx_options_default();
    o.backend = (attn_backend)7;
    expect("ctx with a bad backend", attn_ctx_create(&c, &o), ATTN_ERR_ARG, "backend");
    o = attn_ctx_options_default();
    o.threads = -1;
    expect("ctx with threads -1", attn_ctx_create(&c, &o), ATTN_ERR_ARG, "threads");
    o = attn_ctx_options_default();
    o.isa = (attn_isa)42;
    expect("ctx with a bad isa", attn_ctx_create(&c, &o), ATTN_ERR_ARG, "isa");
    expect("ctx_create NULL out", attn_ctx_create(NULL, NULL), ATTN_ERR_NULL, "out");
    /* every available ISA can be asked for by name */
    const attn_isa isas[] = {ATTN_ISA_SCALAR, ATTN_ISA_AVX2, ATTN_ISA_AVX512, ATTN_ISA_NEON};
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        attn_isa best = attn_isa_detected();
        int avail = isas[i] == ATTN_ISA_SCALAR ||
                    (isas[i] == ATTN_ISA_AVX2 && (best == ATTN_ISA_AVX2 || best == ATTN_ISA_AVX512)) ||
                    (isas[i] == ATTN_ISA_AVX512 && best == ATTN_ISA_AVX512) ||
                    (isas[i] == ATTN_ISA_NEON && best == ATTN_ISA_NEON);
        if (!avail) continue;
        o = attn_ctx_options_default();
        o.backend = ATTN_BACKEND_CPU;
        o.isa = isas[i];
        c = NULL;
        attn_status st = attn_ctx_create(&c, &o);
        CHECK(st == ATTN_OK && c && attn_ctx_isa(c) == isas[i], "ctx with isa %s: %s",
              attn_isa_name(isas[i]), attn_last_error());
        attn_ctx_free(c);
    }

    tu_case("attn_supports");
    attn_config cfg = {ATTN_F32, ATTN_F32, ATTN_F32, 64, 64, 8, 2, 0};
    for (int op = ATTN_OP_FORWARD; op <= ATTN_OP_LINEAR_DECODE; op++)
        CHECK(attn_supports(g_cpu, (attn_op)op, &cfg) == ATTN_OK, "f32 op %d: %s", op,
              attn_last_error());
    attn_config f64 = cfg;
    f64.q_dtype = f64.kv_dtype = f64.o_dtype = ATTN_F64;
    expect("f64 on cpu", attn_supports(g_cpu, ATTN_OP_FORWARD, &f64), ATTN_ERR_UNSUPPORTED,
           NULL);
    CHECK(attn_supports(g_ref, ATTN_OP_FORWARD, &f64) == ATTN_OK, "f64 on ref: %s",
          attn_last_error());
    attn_config half = cfg;
    half.q_dtype = half.kv_dtype = half.o_dtype = ATTN_F16;
    CHECK(attn_supports(g_cpu, ATTN_OP_DECODE, &half) == ATTN_OK, "f16 decode: %s",
          attn_last_error());
    CHECK(attn_supports(g_cpu, ATTN_OP_LINEAR_FORWARD, &half) == ATTN_OK, "f16 linear: %s",
          attn_last_error());
    attn_config planned = cfg;
    planned.has_plan = 1;
    CHECK(attn_supports(g_cpu, ATTN_OP_FORWARD, &planned) == ATTN_OK, "planned forward: %s",
          attn_last_error());
    expect("linear with a plan", attn_supports(g_cpu, ATTN_OP_LINEAR_BACKWARD, &planned),
           ATTN_ERR_UNSUPPORTED, "plan");
    expect("supports NULL cfg", attn_supports(g_cpu, ATTN_OP_FORWARD, NULL), ATTN_ERR_NULL,
           "cfg");
    expect("supports NULL ctx", attn_supports(NULL, ATTN_OP_FORWARD, &cfg), ATTN_ERR_NULL,
           "ctx");
    expect("supports bad op", attn_supports(g_cpu, (attn_op)9, &cfg), ATTN_ERR_ARG, "op");
    attn_config baddt = cfg;
    baddt.kv_dtype = (attn_dtype)99;
    expect("supports bad dtype", attn_supports(g_cpu, ATTN_OP_FORWARD, &baddt), ATTN_ERR_DTYPE,
           NULL);
}

int main(void) {
    g_ref = tu_ctx("test_api", ATTN_BACKEND_REF, 1);
    g_cpu = tu_ctx("test_api", ATTN_BACKEND_CPU, 2);
    forward_cases();
    plan_cases();
    backward_cases();
    decode_cases();
    merge_cases();
    misc_cases();
    attn_ctx_free(g_ref);
    attn_ctx_free(g_cpu);
    return tu_finish("test_api");
}
