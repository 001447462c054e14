/* Native Sparse Attention as a composition: three causal branches run by the
 * tiled engine (or the reference, on a reference context) and mixed by
 * gates. The compressed branch is an ordinary problem whose keys carry
 * "compressed" positions (attn_problem.key_stride/span); the selected branch
 * runs a plan from attn_nsa_select; the window branch is the implicit window.
 * attn_nsa_attention takes the compressed branch from the selection's pass
 * (nsa_select.c); on the CPU the branches sum into o (and their gradients
 * into dq, dk, dv) through the engine's gated epilogue when the outputs are
 * f32, else through f32 buffers. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/rows.h"
#include "mech_run.h"
#include "nsa_select.h"
#include "validate.h"

enum { BRANCH_CMP = 0, BRANCH_SEL = 1, BRANCH_WIN = 2, BRANCHES = 3 };

/* ------------------------------------------------------------ checks */

static attn_status check_opts(const attn_nsa_opts *o) {
    if (!o) return attn_err(ATTN_ERR_NULL, "opt must not be NULL");
    if (o->cmp_block < 1 || o->cmp_stride < 1 || o->cmp_stride > o->cmp_block)
        return attn_err(ATTN_ERR_ARG, "opt->cmp_block and cmp_stride must be >= 1 with "
                                      "cmp_stride <= cmp_block");
    if (o->sel_block < 1 || o->sel_block > 512)
        return attn_err(ATTN_ERR_ARG, "opt->sel_block must be in 1..512");
    if (o->sel_count < 1) return attn_err(ATTN_ERR_ARG, "opt->sel_count must be >= 1");
    if (o->query_block < 1 || o->query_block > 512)
        return attn_err(ATTN_ERR_ARG, "opt->query_block must be in 1..512");
    if (o->window < 1) return attn_err(ATTN_ERR_ARG, "opt->window must be >= 1");
    return ATTN_OK;
}

#define CHECK(expr)                     \
    do {                                \
        attn_status st_ = (expr);       \
        if (st_ != ATTN_OK) return st_; \
    } while (0)

/* The three problems of a call: q against k/v (window, selected) and against
 * kc/vc (compressed). */
typedef struct nsa_problems {
    attn_problem br[BRANCHES];
} nsa_problems;

/* sel NULL: the selected branch's plan is attached later (attn_nsa_attention). */
static attn_status make_problems(const attn_ctx *ctx, const attn_params *p,
                                 const attn_nsa_opts *o, const attn_tensor *q,
                                 const attn_tensor *k, const attn_tensor *v,
                                 const attn_tensor *kc, const attn_tensor *vc,
                                 const attn_plan *sel, nsa_problems *pr) {
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    if (p->cu_seqlens_q || p->plan || p->window_left != -1 || p->window_right != -1)
        return attn_err(ATTN_ERR_ARG,
                        "NSA params take scale and softcap only (no varlen, plan or window)");
    CHECK(check_opts(o));
    CHECK(attn_check_tensor("q", q, 4, ref, false));
    CHECK(attn_check_tensor("k", k, 4, ref, false));
    CHECK(attn_check_tensor("v", v, 4, ref, false));
    CHECK(attn_check_tensor("kc", kc, 4, ref, false));
    CHECK(attn_check_tensor("vc", vc, 4, ref, false));
    if (q->shape[0] != 1) return attn_err(ATTN_ERR_SHAPE, "NSA takes one sequence (q->shape[0] == 1)");
    attn_params causal = *p;
    causal.causal = 1;
    CHECK(attn_check_params(&causal, q, k, v, &pr->br[BRANCH_WIN]));
    const int64_t m = k->shape[1], mc = nsa_compressed_len(o, m);
    if (m > INT32_MAX) /* the selection's block indices are int32 */
        return attn_err(ATTN_ERR_ARG, "k->shape[1] (%lld keys) must be below 2^31", (long long)m);
    CHECK(attn_check_shape("kc", kc, 1, mc, k->shape[2], k->shape[3]));
    CHECK(attn_check_shape("vc", vc, 1, mc, v->shape[2], v->shape[3]));
    if (mc < 1) return attn_err(ATTN_ERR_SHAPE, "k holds fewer keys than opt->cmp_block");
    if (sel && (sel->n != q->shape[1] || sel->m != m || sel->block_q != o->query_block ||
                sel->block_k != o->sel_block || sel->heads != k->shape[2]))
        return attn_err(ATTN_ERR_ARG, "sel is not a selection plan of this call "
                                      "(attn_nsa_select with the same opt and shapes)");
    pr->br[BRANCH_WIN].window_left = o->window - 1;
    pr->br[BRANCH_WIN].window_right = 0;
    pr->br[BRANCH_SEL] = pr->br[BRANCH_WIN];
    pr->br[BRANCH_SEL].window_left = -1;
    pr->br[BRANCH_SEL].plan = sel;
    CHECK(attn_check_params(&causal, q, kc, vc, &pr->br[BRANCH_CMP]));
    pr->br[BRANCH_CMP].key_stride = o->cmp_stride;
    pr->br[BRANCH_CMP].key_span = o->cmp_block;
    pr->br[BRANCH_CMP].key_positions = m;
    return ATTN_OK;
}

/* A branch-major [3 B, ...] tensor's checks. */
static attn_status check_saved(const attn_ctx *ctx, const attn_tensor *so,
                               const attn_tensor *sl, const attn_problem *p) {
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("saved_o", so, 4, ref, false));
    CHECK(attn_check_shape("saved_o", so, BRANCHES * p->batch, p->n, p->h, p->dv));
    CHECK(attn_check_tensor("saved_lse", sl, 3, ref, false));
    CHECK(attn_check_shape("saved_lse", sl, BRANCHES * p->batch, p->h, p->n, -1));
    return ATTN_OK;
}

/* ------------------------------------------------------------ compression */

/* c[b, tt] = mean of t[b, tt s .. tt s + l): in double, element by element. */
static attn_status compress_ref(const attn_nsa_opts *o, const attn_tensor *t, attn_tensor *c) {
    for (int64_t b = 0; b < t->shape[0]; b++)
        for (int64_t tt = 0; tt < c->shape[1]; tt++)
            for (int64_t h = 0; h < t->shape[2]; h++)
                for (int64_t e = 0; e < t->shape[3]; e++) {
                    double s = 0.0;
                    for (int64_t j = tt * o->cmp_stride; j < tt * o->cmp_stride + o->cmp_block; j++)
                        s += attn_load_f64(t, attn_off4(t, b, j, h, e));
                    attn_store_f64(c, attn_off4(c, b, tt, h, e), s / (double)o->cmp_block);
                }
    return ATTN_OK;
}

/* t[b, j] += sum over the spans holding j of dc[b, tt] / l: the adjoint. */
static attn_status compress_backward_ref(const attn_nsa_opts *o, const attn_tensor *dc,
                                         attn_tensor *t) {
    for (int64_t b = 0; b < t->shape[0]; b++)
        for (int64_t tt = 0; tt < dc->shape[1]; tt++)
            for (int64_t h = 0; h < t->shape[2]; h++)
                for (int64_t e = 0; e < t->shape[3]; e++) {
                    double g = attn_load_f64(dc, attn_off4(dc, b, tt, h, e)) / (double)o->cmp_block;
                    for (int64_t j = tt * o->cmp_stride; j < tt * o->cmp_stride + o->cmp_block; j++) {
                        int64_t off = attn_off4(t, b, j, h, e);
                        attn_store_f64(t, off, attn_load_f64(t, off) + g);
                    }
                }
    return ATTN_OK;
}

/* The CPU's: one row of every head per task, summed in f32 in a fixed order
 * (the same result for any thread count). */
static attn_status compress_cpu(const attn_ctx *ctx, const attn_nsa_opts *o,
                                const attn_tensor *t, attn_tensor *c) {
    const attn_kernels *kr = ctx->kernels;
    const int64_t mc = c->shape[1], heads = t->shape[2], e = t->shape[3];
    const int64_t tasks = t->shape[0] * mc;
    const float inv = 1.0f / (float)o->cmp_block;
    size_t stride;
    float *scr = scratch_alloc(ctx->threads, (size_t)(2 * e + 16), &stride);
    if (!scr) return attn_err(ATTN_ERR_NOMEM, "out of memory for the NSA compression");
#pragma omp parallel for num_threads(ctx->threads) schedule(static)
    for (int64_t task = 0; task < tasks; task++) {
        float *acc = scr + stride * (size_t)engine_thread_id(), *row = acc + e + 16;
        const int64_t b = task / mc, tt = task % mc;
        for (int64_t h = 0; h < heads; h++) {
            memset(acc, 0, (size_t)e * sizeof(float));
            for (int64_t j = tt * o->cmp_stride; j < tt * o->cmp_stride + o->cmp_block; j++) {
                rows_load(kr, t, attn_off4(t, b, j, h, 0), e, row);
                kr->axpy(e, 1.0f, row, acc);
            }
            for (int64_t x = 0; x < e; x++) acc[x] *= inv;
            rows_store(kr, c, attn_off4(c, b, tt, h, 0), e, acc);
        }
    }
    free(scr);
    return ATTN_OK;
}

/* The CPU's adjoint, gathered: task j sums the dc rows of the spans holding
 * key j (ascending), so that no two tasks write one row. */
static attn_status compress_backward_cpu(const attn_ctx *ctx, const attn_nsa_opts *o,
                                         const attn_tensor *dc, attn_tensor *t) {
    const attn_kernels *kr = ctx->kernels;
    const int64_t m = t->shape[1], mc = dc->shape[1], heads = t->shape[2], e = t->shape[3];
    const int64_t tasks = t->shape[0] * m, s = o->cmp_stride, l = o->cmp_block;
    const float inv = 1.0f / (float)l;
    size_t stride;
    float *scr = scratch_alloc(ctx->threads, (size_t)(2 * e + 16), &stride);
    if (!scr) return attn_err(ATTN_ERR_NOMEM, "out of memory for the NSA compression backward");
#pragma omp parallel for num_threads(ctx->threads) schedule(static)
    for (int64_t task = 0; task < tasks; task++) {
        float *acc = scr + stride * (size_t)engine_thread_id(), *row = acc + e + 16;
        const int64_t b = task / m, j = task % m;
        /* spans [tt s, tt s + l) holding j: tt in [ceil((j - l + 1) / s), j / s] */
        const int64_t lo = j - l + 1 <= 0 ? 0 : (j - l + 1 + s - 1) / s;
        const int64_t hi = j / s < mc - 1 ? j / s : mc - 1;
        if (lo > hi) continue;
        for (int64_t h = 0; h < heads; h++) {
            memset(acc, 0, (size_t)e * sizeof(float));
            for (int64_t tt = lo; tt <= hi; tt++) {
                rows_load(kr, dc, attn_off4(dc, b, tt, h, 0), e, row);
                kr->axpy(e, 1.0f, row, acc);
            }
            rows_load(kr, t, attn_off4(t, b, j, h, 0), e, row);
            kr->axpy(e, inv, acc, row);
            rows_store(kr, t, attn_off4(t, b, j, h, 0), e, row);
        }
    }
    free(scr);
    return ATTN_OK;
}

attn_status attn_nsa_compress(attn_ctx *ctx, const attn_nsa_opts *opt, const attn_tensor *k,
                              const attn_tensor *v, attn_tensor *kc, attn_tensor *vc) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(check_opts(opt));
    const attn_tensor *in[2] = {k, v};
    attn_tensor *out[2] = {kc, vc};
    static const char *const in_names[2] = {"k", "v"}, *const out_names[2] = {"kc", "vc"};
    for (int x = 0; x < 2; x++) {
        CHECK(attn_check_tensor(in_names[x], in[x], 4, ref, false));
        CHECK(attn_check_tensor(out_names[x], out[x], 4, ref, false));
        int64_t mc = nsa_compressed_len(opt, in[x]->shape[1]);
        if (mc < 1) return attn_err(ATTN_ERR_SHAPE, "%s holds fewer keys than opt->cmp_block", in_names[x]);
        CHECK(attn_check_shape(out_names[x], out[x], in[x]->shape[0], mc, in[x]->shape[2],
                               in[x]->shape[3]));
        const attn_tensor *others[2] = {k, v};
        const char *onames[2] = {"k", "v"};
        CHECK(attn_check_output(out_names[x], out[x], others, onames, 2));
    }
    for (int x = 0; x < 2; x++)
        CHECK(ref ? compress_ref(opt, in[x], out[x]) : compress_cpu(ctx, opt, in[x], out[x]));
    return ATTN_OK;
}

attn_status attn_nsa_compress_backward(attn_ctx *ctx, const attn_nsa_opts *opt,
                                       const attn_tensor *dkc, const attn_tensor *dvc,
                                       attn_tensor *dk, attn_tensor *dv) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(check_opts(opt));
    const attn_tensor *in[2] = {dkc, dvc};
    attn_tensor *out[2] = {dk, dv};
    static const char *const in_names[2] = {"dkc", "dvc"}, *const out_names[2] = {"dk", "dv"};
    for (int x = 0; x < 2; x++) {
        CHECK(attn_check_tensor(in_names[x], in[x], 4, ref, false));
        CHECK(attn_check_tensor(out_names[x], out[x], 4, ref, false));
        if (nsa_compressed_len(opt, out[x]->shape[1]) != in[x]->shape[1])
            return attn_err(ATTN_ERR_SHAPE, "%s->shape[1] must be (M - cmp_block) / cmp_stride + 1 "
                                            "for M = %s->shape[1]", in_names[x], out_names[x]);
        CHECK(attn_check_shape(in_names[x], in[x], out[x]->shape[0], -1, out[x]->shape[2],
                               out[x]->shape[3]));
    }
    for (int x = 0; x < 2; x++)
        CHECK(ref ? compress_backward_ref(opt, in[x], out[x])
                  : compress_backward_cpu(ctx, opt, in[x], out[x]));
    return ATTN_OK;
}

/* ------------------------------------------------------------ selection */

attn_status attn_nsa_select(attn_ctx *ctx, const attn_params *p, const attn_nsa_opts *opt,
                            const attn_tensor *q, const attn_tensor *kc, int64_t m,
                            attn_plan **out) {
    attn_clear_error();
    if (!out) return attn_err(ATTN_ERR_NULL, "out must not be NULL");
    *out = NULL;
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    if (!p) return attn_err(ATTN_ERR_NULL, "params must not be NULL");
    CHECK(check_opts(opt));
    CHECK(attn_check_tensor("q", q, 4, false, false));
    CHECK(attn_check_tensor("kc", kc, 4, false, false));
    if (q->shape[0] != 1 || kc->shape[0] != 1)
        return attn_err(ATTN_ERR_SHAPE, "NSA takes one sequence (shape[0] == 1)");
    if (m < opt->cmp_block || m > INT32_MAX)
        return attn_err(ATTN_ERR_ARG, "m must be in cmp_block..2^31-1");
    if (nsa_compressed_len(opt, m) != kc->shape[1])
        return attn_err(ATTN_ERR_SHAPE, "kc->shape[1] must be (m - cmp_block) / cmp_stride + 1");
    attn_params causal = *p;
    causal.causal = 1;
    causal.plan = NULL, causal.cu_seqlens_q = causal.cu_seqlens_k = NULL;
    causal.window_left = causal.window_right = -1;
    attn_problem pc;
    attn_tensor vc1 = *kc; /* no values: kc stands in for the shape checks */
    CHECK(attn_check_params(&causal, q, kc, &vc1, &pc));
    pc.key_stride = opt->cmp_stride, pc.key_span = opt->cmp_block, pc.key_positions = m;
    return nsa_select_run(ctx, &pc, opt, q, kc, NULL, m, NULL, NULL, NULL, out);
}

/* ------------------------------------------------------------ forward */

/* Contiguous row-major f32: the mixing loops then run on plain arrays. */
static bool dense_f32(const attn_tensor *t) {
    if (t->dtype != ATTN_F32) return false;
    int64_t want = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] > 1 && t->stride[d] != want) return false;
        want *= t->shape[d];
    }
    return true;
}

/* A dense buffer with t's shape for the context's backend: f64 on the
 * reference (so the oracle stays exact), f32 on the CPU. */
static attn_tensor scratch_like(const attn_ctx *ctx, int64_t d0, int64_t d1, int64_t d2,
                                int64_t d3, void **mem) {
    attn_dtype dt = ctx->backend == ATTN_BACKEND_REF ? ATTN_F64 : ATTN_F32;
    size_t n = (size_t)(d0 * d1 * d2 * (d3 > 0 ? d3 : 1));
    *mem = calloc(n ? n : 1, attn_dtype_size(dt));
    return d3 > 0 ? attn_tensor_4d(*mem, dt, d0, d1, d2, d3) : attn_tensor_3d(*mem, dt, d0, d1, d2);
}

/* The checks of a forward call's outputs (the inputs are make_problems'). */
static attn_status check_forward_outputs(const attn_ctx *ctx, const nsa_problems *pr,
                                         const attn_tensor *q, const attn_tensor *k,
                                         const attn_tensor *v, const attn_tensor *kc,
                                         const attn_tensor *vc, const attn_tensor *gates,
                                         const attn_tensor *o, const attn_tensor *saved_o,
                                         const attn_tensor *saved_lse) {
    const attn_problem *b0 = &pr->br[BRANCH_WIN];
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    CHECK(attn_check_tensor("gates", gates, 4, ref, false));
    CHECK(attn_check_shape("gates", gates, 1, b0->n, b0->h, BRANCHES));
    CHECK(attn_check_tensor("o", o, 4, ref, false));
    CHECK(attn_check_shape("o", o, 1, b0->n, b0->h, b0->dv));
    if ((saved_o == NULL) != (saved_lse == NULL))
        return attn_err(ATTN_ERR_ARG, "saved_o and saved_lse go together");
    if (saved_o) CHECK(check_saved(ctx, saved_o, saved_lse, b0));
    const attn_tensor *ins[] = {q, k, v, kc, vc, gates, saved_o, saved_lse};
    const char *names[] = {"q", "k", "v", "kc", "vc", "gates", "saved_o", "saved_lse"};
    CHECK(attn_check_output("o", o, ins, names, 8));
    if (saved_o) {
        CHECK(attn_check_output("saved_o", saved_o, ins, names, 6));
        CHECK(attn_check_output("saved_lse", saved_lse, ins, names, 7));
    }
    return ATTN_OK;
}

/* o = sum_b gate_b o_b over the branch-major outputs bo. */
static void mix(const attn_problem *b0, const attn_tensor *gates, const attn_tensor *bo,
                attn_tensor *o) {
    const int64_t rows = b0->n * b0->h, dv = b0->dv;
    if (dense_f32(o) && dense_f32(bo) && dense_f32(gates)) {
        const float *g = gates->data, *ob = bo->data;
        float *out = o->data;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t e = 0; e < dv; e++)
                out[r * dv + e] = g[r * 3] * ob[r * dv + e] + g[r * 3 + 1] * ob[(rows + r) * dv + e] +
                                  g[r * 3 + 2] * ob[(2 * rows + r) * dv + e];
        return;
    }
    for (int64_t i = 0; i < b0->n; i++)
        for (int64_t h = 0; h < b0->h; h++)
            for (int64_t e = 0; e < dv; e++) {
                double acc = 0.0;
                for (int br = 0; br < BRANCHES; br++) {
                    attn_tensor ob = mech_part(bo, BRANCHES, br);
                    acc += attn_load_f64(gates, attn_off4(gates, 0, i, h, br)) *
                           attn_load_f64(&ob, attn_off4(&ob, 0, i, h, e));
                }
                attn_store_f64(o, attn_off4(o, 0, i, h, e), acc);
            }
}

/* Where the branches go: the caller's saved tensors, or scratch, mixed into
 * o at the end; or, streamed, straight into o through the engine's gated
 * epilogue (each branch adds gate x its output as it finishes). Streaming
 * takes a CPU context, no saved branches and an f32 o: a 16-bit o is mixed
 * in f32 buffers instead, so that it is rounded once. */
typedef struct branch_bufs {
    bool streamed;
    const attn_tensor *gates;
    attn_tensor *o;
    attn_tensor bo, bl;
    void *mo, *ml;
} branch_bufs;

static attn_status branch_bufs_make(const attn_ctx *ctx, const attn_problem *b0,
                                    const attn_tensor *gates, attn_tensor *o,
                                    attn_tensor *saved_o, attn_tensor *saved_lse,
                                    branch_bufs *b) {
    memset(b, 0, sizeof *b);
    b->gates = gates, b->o = o;
    b->streamed = !saved_o && ctx->backend != ATTN_BACKEND_REF && o->dtype == ATTN_F32;
    if (b->streamed) return ATTN_OK;
    b->bo = saved_o ? *saved_o : scratch_like(ctx, BRANCHES, b0->n, b0->h, b0->dv, &b->mo);
    b->bl = saved_lse ? *saved_lse : scratch_like(ctx, BRANCHES, b0->h, b0->n, -1, &b->ml);
    if (!saved_o && (!b->mo || !b->ml)) {
        free(b->mo), free(b->ml);
        return attn_err(ATTN_ERR_NOMEM, "out of memory for NSA branches");
    }
    return ATTN_OK;
}

/* Branches [first, last) into b; streamed, the first of all writes o and
 * the others add to it. */
static attn_status run_branches(const attn_ctx *ctx, const nsa_problems *pr, int first,
                                int last, const attn_tensor *q, const attn_tensor *k,
                                const attn_tensor *v, const attn_tensor *kc,
                                const attn_tensor *vc, branch_bufs *b) {
    const attn_tensor *kv[BRANCHES][2] = {{kc, vc}, {k, v}, {k, v}};
    for (int br = first; br < last; br++) {
        if (b->streamed) {
            attn_problem pb = pr->br[br];
            pb.out_gate = b->gates, pb.out_gate_col = br, pb.out_accumulate = br != BRANCH_CMP;
            CHECK(engine_forward(ctx, &pb, q, kv[br][0], kv[br][1], b->o, NULL));
            continue;
        }
        attn_tensor ob = mech_part(&b->bo, BRANCHES, br), lb = mech_part(&b->bl, BRANCHES, br);
        CHECK(mech_forward(ctx, &pr->br[br], q, kv[br][0], kv[br][1], &ob, &lb));
    }
    return ATTN_OK;
}

/* The branches' sum into o, when they were not streamed there. */
static void finish(const nsa_problems *pr, const branch_bufs *b) {
    if (!b->streamed) mix(&pr->br[BRANCH_WIN], b->gates, &b->bo, b->o);
    free(b->mo), free(b->ml);
}

/* The checks and buffers both forward doors start with (sel may be NULL:
 * attn_nsa_attention makes it). */
static attn_status begin_forward(const attn_ctx *ctx, const attn_params *p,
                                 const attn_nsa_opts *opt, const attn_tensor *q,
                                 const attn_tensor *k, const attn_tensor *v,
                                 const attn_tensor *kc, const attn_tensor *vc,
                                 const attn_plan *sel, const attn_tensor *gates,
                                 attn_tensor *o, attn_tensor *saved_o,
                                 attn_tensor *saved_lse, nsa_problems *pr, branch_bufs *b) {
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    CHECK(make_problems(ctx, p, opt, q, k, v, kc, vc, sel, pr));
    CHECK(check_forward_outputs(ctx, pr, q, k, v, kc, vc, gates, o, saved_o, saved_lse));
    return branch_bufs_make(ctx, &pr->br[BRANCH_WIN], gates, o, saved_o, saved_lse, b);
}

attn_status attn_nsa_forward(attn_ctx *ctx, const attn_params *p, const attn_nsa_opts *opt,
                             const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                             const attn_tensor *kc, const attn_tensor *vc,
                             const attn_plan *sel, const attn_tensor *gates, attn_tensor *o,
                             attn_tensor *saved_o, attn_tensor *saved_lse) {
    attn_clear_error();
    if (!sel) return attn_err(ATTN_ERR_NULL, "sel must not be NULL");
    nsa_problems pr;
    branch_bufs b;
    CHECK(begin_forward(ctx, p, opt, q, k, v, kc, vc, sel, gates, o, saved_o, saved_lse, &pr,
                        &b));
    attn_status st = run_branches(ctx, &pr, BRANCH_CMP, BRANCHES, q, k, v, kc, vc, &b);
    finish(&pr, &b);
    return st;
}

attn_status attn_nsa_attention(attn_ctx *ctx, const attn_params *p, const attn_nsa_opts *opt,
                               const attn_tensor *q, const attn_tensor *k,
                               const attn_tensor *v, const attn_tensor *kc,
                               const attn_tensor *vc, const attn_tensor *gates, attn_tensor *o,
                               attn_tensor *saved_o, attn_tensor *saved_lse,
                               attn_plan **sel_out) {
    attn_clear_error();
    if (sel_out) *sel_out = NULL;
    nsa_problems pr;
    branch_bufs b;
    CHECK(begin_forward(ctx, p, opt, q, k, v, kc, vc, NULL, gates, o, saved_o, saved_lse, &pr,
                        &b));
    /* the compressed branch and the selection share one softmax on the
     * CPU; the reference runs its own branch, and the CPU's selection */
    attn_plan *sel = NULL;
    attn_status st = ATTN_OK;
    if (ctx->backend == ATTN_BACKEND_REF) {
        st = run_branches(ctx, &pr, BRANCH_CMP, BRANCH_CMP + 1, q, k, v, kc, vc, &b);
        if (st == ATTN_OK)
            st = nsa_select_run(ctx, &pr.br[BRANCH_CMP], opt, q, kc, NULL, k->shape[1], NULL,
                                NULL, NULL, &sel);
    } else if (b.streamed) { /* o = gate x the compressed branch */
        st = nsa_select_run(ctx, &pr.br[BRANCH_CMP], opt, q, kc, vc, k->shape[1], o, NULL,
                            gates, &sel);
    } else {
        attn_tensor ob = mech_part(&b.bo, BRANCHES, BRANCH_CMP);
        attn_tensor lb = mech_part(&b.bl, BRANCHES, BRANCH_CMP);
        st = nsa_select_run(ctx, &pr.br[BRANCH_CMP], opt, q, kc, vc, k->shape[1], &ob, &lb,
                            NULL, &sel);
    }
    if (st == ATTN_OK) {
        pr.br[BRANCH_SEL].plan = sel;
        st = run_branches(ctx, &pr, BRANCH_SEL, BRANCHES, q, k, v, kc, vc, &b);
    }
    finish(&pr, &b);
    if (st == ATTN_OK && sel_out)
        *sel_out = sel;
    else
        attn_plan_free(sel);
    return st;
}
/* ------------------------------------------------------------ backward */

/* The CPU backward into f32 gradients: each branch's backward takes g_b dO
 * and adds into the outputs through the engine's gated epilogue (the
 * selected branch writes dq, dk, dv; the window adds; the compressed adds
 * to dq and to dkc, dvc zeroed first), so no gradient buffer per branch
 * exists; dgates_b = dO . o_b row by row. Gradients of other dtypes are
 * summed in f32 buffers instead (attn_nsa_backward), to be rounded once. */
static attn_status backward_streamed(const attn_ctx *ctx, const nsa_problems *pr,
                                     const attn_tensor *q, const attn_tensor *k,
                                     const attn_tensor *v, const attn_tensor *kc,
                                     const attn_tensor *vc, const attn_tensor *gates,
                                     const attn_tensor *saved_o, const attn_tensor *saved_lse,
                                     const attn_tensor *dout, attn_tensor *dq, attn_tensor *dk,
                                     attn_tensor *dv, attn_tensor *dkc, attn_tensor *dvc,
                                     attn_tensor *dgates) {
    const attn_kernels *kr = ctx->kernels;
    const attn_problem *b0 = &pr->br[BRANCH_WIN];
    const int64_t n = b0->n, h = b0->h, e = b0->dv, rows = n * h;
    size_t stride;
    float *scr = scratch_alloc(ctx->threads, (size_t)(4 * e + 32), &stride);
    if (!scr) return attn_err(ATTN_ERR_NOMEM, "out of memory for the NSA backward");
    const attn_tensor so[BRANCHES] = {mech_part(saved_o, BRANCHES, 0),
                                      mech_part(saved_o, BRANCHES, 1),
                                      mech_part(saved_o, BRANCHES, 2)};
#pragma omp parallel for num_threads(ctx->threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) { /* dgates */
        float *d0 = scr + stride * (size_t)engine_thread_id(), *ob = d0 + e + 16, dot[BRANCHES];
        const int64_t i = r / h, hh = r % h;
        rows_load(kr, dout, attn_off4(dout, 0, i, hh, 0), e, d0);
        for (int br = 0; br < BRANCHES; br++)
            rows_load(kr, &so[br], attn_off4(&so[br], 0, i, hh, 0), e, ob + br * e);
        kr->dot_rows(d0, ob, BRANCHES, e, e, dot);
        for (int br = 0; br < BRANCHES; br++)
            attn_store_f64(dgates, attn_off4(dgates, 0, i, hh, br), dot[br]);
    }
    memset(scr, 0, (size_t)(kc->shape[3] > vc->shape[3] ? kc->shape[3] : vc->shape[3]) * 4);
    for (int64_t t = 0; t < kc->shape[1]; t++) /* the compressed branch adds into these */
        for (int64_t hh = 0; hh < kc->shape[2]; hh++) {
            rows_store(kr, dkc, attn_off4(dkc, 0, t, hh, 0), kc->shape[3], scr);
            rows_store(kr, dvc, attn_off4(dvc, 0, t, hh, 0), vc->shape[3], scr);
        }
    free(scr);
    static const int order[BRANCHES] = {BRANCH_SEL, BRANCH_WIN, BRANCH_CMP};
    for (int x = 0; x < BRANCHES; x++) {
        const int br = order[x];
        attn_problem pb = pr->br[br];
        pb.out_gate = gates, pb.out_gate_col = br, pb.out_accumulate = br != BRANCH_SEL;
        const attn_tensor ob = mech_part(saved_o, BRANCHES, br);
        const attn_tensor lb = mech_part(saved_lse, BRANCHES, br);
        const bool cmp = br == BRANCH_CMP;
        CHECK(engine_backward(ctx, &pb, q, cmp ? kc : k, cmp ? vc : v, &ob, &lb, dout, dq,
                              cmp ? dkc : dk, cmp ? dvc : dv));
    }
    return ATTN_OK;
}

attn_status attn_nsa_backward(attn_ctx *ctx, const attn_params *p, const attn_nsa_opts *opt,
                              const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                              const attn_tensor *kc, const attn_tensor *vc,
                              const attn_plan *sel, const attn_tensor *gates,
                              const attn_tensor *saved_o, const attn_tensor *saved_lse,
                              const attn_tensor *dout, attn_tensor *dq, attn_tensor *dk,
                              attn_tensor *dv, attn_tensor *dkc, attn_tensor *dvc,
                              attn_tensor *dgates) {
    attn_clear_error();
    if (!ctx) return attn_err(ATTN_ERR_NULL, "ctx must not be NULL");
    nsa_problems pr;
    CHECK(make_problems(ctx, p, opt, q, k, v, kc, vc, sel, &pr));
    const attn_problem *b0 = &pr.br[BRANCH_WIN];
    bool ref = ctx->backend == ATTN_BACKEND_REF;
    if (!saved_o || !saved_lse) return attn_err(ATTN_ERR_NULL, "saved_o and saved_lse must not be NULL");
    CHECK(check_saved(ctx, saved_o, saved_lse, b0));
    CHECK(attn_check_tensor("gates", gates, 4, ref, false));
    CHECK(attn_check_shape("gates", gates, 1, b0->n, b0->h, BRANCHES));
    CHECK(attn_check_tensor("dout", dout, 4, ref, false));
    CHECK(attn_check_shape("dout", dout, 1, b0->n, b0->h, b0->dv));
    attn_tensor *outs[] = {dq, dk, dv, dkc, dvc, dgates};
    const char *onames[] = {"dq", "dk", "dv", "dkc", "dvc", "dgates"};
    const attn_tensor *shapes[] = {q, k, v, kc, vc, gates};
    const attn_tensor *ins[] = {q, k, v, kc, vc, gates, saved_o, saved_lse, dout,
                                dq, dk, dv, dkc, dvc};
    const char *names[] = {"q", "k", "v", "kc", "vc", "gates", "saved_o", "saved_lse", "dout",
                           "dq", "dk", "dv", "dkc", "dvc"};
    for (int x = 0; x < 6; x++) {
        CHECK(attn_check_tensor(onames[x], outs[x], 4, ref, false));
        CHECK(attn_check_shape(onames[x], outs[x], shapes[x]->shape[0], shapes[x]->shape[1],
                               shapes[x]->shape[2], shapes[x]->shape[3]));
        CHECK(attn_check_output(onames[x], outs[x], ins, names, 9 + x));
    }

    if (!ref && dq->dtype == ATTN_F32 && dk->dtype == ATTN_F32 && dv->dtype == ATTN_F32 &&
        dkc->dtype == ATTN_F32 && dvc->dtype == ATTN_F32)
        return backward_streamed(ctx, &pr, q, k, v, kc, vc, gates, saved_o, saved_lse, dout, dq,
                                 dk, dv, dkc, dvc, dgates);

    /* per branch: dout_b = g_b dO, then the branch backward into its own
     * gradients; the sums go to the outputs at the end */
    void *mdb = NULL, *mq[BRANCHES] = {0}, *mk[BRANCHES] = {0}, *mv[BRANCHES] = {0};
    attn_tensor db = scratch_like(ctx, 1, b0->n, b0->h, b0->dv, &mdb);
    attn_tensor gq[BRANCHES], gk[BRANCHES], gv[BRANCHES];
    attn_status st = mdb ? ATTN_OK : attn_err(ATTN_ERR_NOMEM, "out of memory for NSA gradients");
    for (int br = 0; br < BRANCHES; br++) {
        const attn_tensor *kk = br == BRANCH_CMP ? kc : k, *vv = br == BRANCH_CMP ? vc : v;
        gq[br] = scratch_like(ctx, 1, b0->n, b0->h, b0->d, &mq[br]);
        gk[br] = scratch_like(ctx, 1, kk->shape[1], kk->shape[2], kk->shape[3], &mk[br]);
        gv[br] = scratch_like(ctx, 1, vv->shape[1], vv->shape[2], vv->shape[3], &mv[br]);
        if (!mq[br] || !mk[br] || !mv[br])
            st = attn_err(ATTN_ERR_NOMEM, "out of memory for NSA gradients");
    }

    /* (all-f32 gradients on the CPU took backward_streamed: what is left
     * here is the reference, or 16-bit gradients summed in f32 once) */
    for (int br = 0; br < BRANCHES && st == ATTN_OK; br++) {
        for (int64_t i = 0; i < b0->n; i++)
            for (int64_t h = 0; h < b0->h; h++) {
                double gt = attn_load_f64(gates, attn_off4(gates, 0, i, h, br));
                for (int64_t e = 0; e < b0->dv; e++)
                    attn_store_f64(&db, attn_off4(&db, 0, i, h, e),
                                   gt * attn_load_f64(dout, attn_off4(dout, 0, i, h, e)));
            }
        attn_tensor ob = mech_part(saved_o, BRANCHES, br), lb = mech_part(saved_lse, BRANCHES, br);
        const attn_tensor *kk = br == BRANCH_CMP ? kc : k, *vv = br == BRANCH_CMP ? vc : v;
        st = mech_backward(ctx, &pr.br[br], q, kk, vv, &ob, &lb, &db, &gq[br], &gk[br], &gv[br]);
    }
    if (st == ATTN_OK) {
        for (int64_t x = 0; x < b0->n * b0->h * b0->d; x++) { /* dq: all three */
            int64_t i = x / (b0->h * b0->d), h = (x / b0->d) % b0->h, e = x % b0->d;
            double s = 0.0;
            for (int br = 0; br < BRANCHES; br++) s += attn_load_f64(&gq[br], attn_off4(&gq[br], 0, i, h, e));
            attn_store_f64(dq, attn_off4(dq, 0, i, h, e), s);
        }
        attn_tensor *dst[2] = {dk, dv}, *dstc[2] = {dkc, dvc};
        attn_tensor *gs[2] = {gk, gv};
        for (int w = 0; w < 2; w++) {
            attn_tensor *t = dst[w], *tc = dstc[w], *g = gs[w];
            for (int64_t j = 0; j < t->shape[1]; j++)
                for (int64_t h = 0; h < t->shape[2]; h++)
                    for (int64_t e = 0; e < t->shape[3]; e++) {
                        double s = attn_load_f64(&g[BRANCH_SEL], attn_off4(&g[BRANCH_SEL], 0, j, h, e)) +
                                   attn_load_f64(&g[BRANCH_WIN], attn_off4(&g[BRANCH_WIN], 0, j, h, e));
                        attn_store_f64(t, attn_off4(t, 0, j, h, e), s);
                    }
            for (int64_t j = 0; j < tc->shape[1]; j++)
                for (int64_t h = 0; h < tc->shape[2]; h++)
                    for (int64_t e = 0; e < tc->shape[3]; e++)
                        attn_store_f64(tc, attn_off4(tc, 0, j, h, e),
                                       attn_load_f64(&g[BRANCH_CMP], attn_off4(&g[BRANCH_CMP], 0, j, h, e)));
        }
        for (int64_t i = 0; i < b0->n; i++) /* dgates: dO . o_b */
            for (int64_t h = 0; h < b0->h; h++)
                for (int br = 0; br < BRANCHES; br++) {
                    attn_tensor ob = mech_part(saved_o, BRANCHES, br);
                    double s = 0.0;
                    for (int64_t e = 0; e < b0->dv; e++)
                        s += attn_load_f64(dout, attn_off4(dout, 0, i, h, e)) *
                             attn_load_f64(&ob, attn_off4(&ob, 0, i, h, e));
                    attn_store_f64(dgates, attn_off4(dgates, 0, i, h, br), s);
                }
    }
    free(mdb);
    for (int br = 0; br < BRANCHES; br++) free(mq[br]), free(mk[br]), free(mv[br]);
    return st;
}
