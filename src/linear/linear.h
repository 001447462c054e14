/* The chunked-recurrence engine (linear-time attention): the validated
 * problem shared by the API edge, the reference and the engine, and the
 * engine's entry points. See attn.h, "linear-time attention". */
#ifndef ATTN_LINEAR_H
#define ATTN_LINEAR_H

#include "context.h"

/* A validated linear-attention problem. Kernels trust it. */
typedef struct lin_problem {
    int64_t batch;          /* sequences */
    int64_t t;              /* tokens per sequence (dense) or tensor rows (varlen) */
    int64_t h, hk, d, dv;
    float scale;            /* resolved: never 0 */
    int causal;
    attn_gate gate;
    int64_t chunk;          /* resolved: >= 1 */
    const int32_t *cu;      /* varlen offsets, or NULL */
    /* Folded into the CPU forward by mechanisms (SSD), NULL when unused;
     * causal only, and neither the reference nor the backward takes them:
     *   vrow [rows][H] (dense f32, a row per tensor row): v row (t, h) is
     *       taken as vrow[t][h] v[t, h];
     *   skip [H]: o[t, h] += skip[h] v[t, h] (v as given). */
    const float *vrow, *skip;
} lin_problem;

/* Tokens per chunk when the caller leaves it to the engine. Per token the
 * scores and A V cost C (D + Dv) FLOPs and grow with the chunk C, while the
 * state's share, (Q ⊙ P) S and the update, is 4 D Dv whatever C is: on a CPU
 * a chunk only has to be large enough for the GEMMs to run well. Measured
 * (attn bench --op lightning|gla --causal --n 16384 --heads 8 --dim 64
 * --threads 1, ms, 2 shared cores, noisy): lightning C 16: 43, 32: 48,
 * 64: 55, 128: 67; gla 16: 130, 32: 179, 64: 303, 128: 498. At n 8192,
 * C 8 / 16 / 24: lightning D 64: 24 / 25 / 23 (min ms), D 128: 56 / 64 / 55;
 * gla D 64: 72 / 63 / 75, D 128: 152 / 144 / 173. */
static inline int64_t lin_default_chunk(int64_t d, int64_t dv, attn_gate gate) {
    (void)d;
    (void)dv;
    (void)gate;
    return 16;
}

/* Query heads per engine task. The rows of consecutive heads of one token
 * lie next to each other ([T][H][D]), so a task that walks the chunks of a
 * group of heads together reads contiguous runs of group x D elements: far
 * fewer pages per chunk than one head's rows H x D apart, and runs the
 * hardware prefetchers follow. The group's states stay in cache (at most
 * 256 KiB of them, measured below), and there are at least as many tasks as
 * threads. */
static inline int64_t lin_head_group(const lin_problem *p, int threads) {
    const int64_t state_floats = p->d * p->dv, budget = 65536; /* floats = 256 KiB */
    int64_t groups = state_floats >= budget ? p->h : (p->h * state_floats + budget - 1) / budget;
    const int64_t want = (threads + p->batch - 1) / p->batch; /* groups per sequence */
    if (groups < want) groups = want;
    if (groups > p->h) groups = p->h;
    return (p->h + groups - 1) / groups;
}

/* Where sequence b lives: index along dim 0 of q/k/v/o/g, first row along
 * dim 1, token count; its state is state[b]. */
typedef struct lin_seq {
    int64_t tb, t0, n;
} lin_seq;

static inline lin_seq lin_problem_seq(const lin_problem *p, int64_t b) {
    lin_seq s;
    if (p->cu) {
        s.tb = 0;
        s.t0 = p->cu[b];
        s.n = p->cu[b + 1] - p->cu[b];
    } else {
        s.tb = b;
        s.t0 = 0;
        s.n = p->t;
    }
    return s;
}

/* The log gate of (row t of tensor index tb, query head h, key dim x), any
 * dtype (slow path: reference, tests, small loads). */
static inline double lin_gate_at(const lin_problem *p, const attn_tensor *g, int64_t tb,
                                 int64_t t, int64_t h, int64_t x) {
    switch (p->gate) {
    case ATTN_GATE_HEAD: return attn_load_f64(g, h * g->stride[0]);
    case ATTN_GATE_HEAD_TOKEN: return attn_load_f64(g, attn_off3(g, tb, t, h));
    case ATTN_GATE_KEY: return attn_load_f64(g, attn_off4(g, tb, t, h, x));
    default: return 0.0;
    }
}

/* Reference (src/ref/ref_linear*.c): double precision, the recurrence token
 * by token. Computes into its own buffers, writes outputs only on success;
 * so state_in may be the same tensor as state_out (decode). */
attn_status ref_linear_forward(const lin_problem *p, const attn_tensor *q,
                               const attn_tensor *k, const attn_tensor *v,
                               const attn_tensor *g, const attn_tensor *state_in,
                               attn_tensor *o, attn_tensor *state_out);
attn_status ref_linear_backward(const lin_problem *p, const attn_tensor *q,
                                const attn_tensor *k, const attn_tensor *v,
                                const attn_tensor *g, const attn_tensor *state_in,
                                const attn_tensor *dout, const attn_tensor *dstate_out,
                                attn_tensor *dq, attn_tensor *dk, attn_tensor *dv,
                                attn_tensor *dg, attn_tensor *dstate_in);

attn_status ref_linear_span_map(const lin_problem *p, const attn_tensor *k,
                                const attn_tensor *v, const attn_tensor *g, attn_tensor *decay,
                                attn_tensor *u);
attn_status ref_linear_state_compose(const attn_tensor *decay1, const attn_tensor *u1,
                                     const attn_tensor *decay2, const attn_tensor *u2,
                                     attn_tensor *decay_out, attn_tensor *u_out);

/* The door's checks of params, q [B, T, H, D], k [B, T, Hk, D] and
 * v [B, T, Hk, Dv] (dtypes, shapes, GQA, scale, causal, gate, chunk, varlen)
 * into a problem, for mechanisms that take attn_linear_params
 * (src/core/api_linear.c). */
attn_status lin_check_inputs(const attn_ctx *ctx, const attn_linear_params *p,
                             const attn_tensor *q, const attn_tensor *k, const attn_tensor *v,
                             lin_problem *out);

/* attn_linear_forward on the CPU engine with vrow and skip folded in (see
 * lin_problem); validates as attn_linear_forward does. Causal only. */
attn_status linear_forward_folded(attn_ctx *ctx, const attn_linear_params *p,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, const attn_tensor *g,
                                  const attn_tensor *state_in, attn_tensor *o,
                                  attn_tensor *state_out, const float *vrow, const float *skip);

/* The CPU engine (src/linear/). */
attn_status linear_engine_forward(const attn_ctx *ctx, const lin_problem *p,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, const attn_tensor *g,
                                  const attn_tensor *state_in, attn_tensor *o,
                                  attn_tensor *state_out);
attn_status linear_engine_backward(const attn_ctx *ctx, const lin_problem *p,
                                   const attn_tensor *q, const attn_tensor *k,
                                   const attn_tensor *v, const attn_tensor *g,
                                   const attn_tensor *state_in, const attn_tensor *dout,
                                   const attn_tensor *dstate_out, attn_tensor *dq,
                                   attn_tensor *dk, attn_tensor *dv, attn_tensor *dg,
                                   attn_tensor *dstate_in);
attn_status linear_engine_decode(const attn_ctx *ctx, const lin_problem *p,
                                 const attn_tensor *q, const attn_tensor *k,
                                 const attn_tensor *v, const attn_tensor *g,
                                 attn_tensor *state, attn_tensor *o);

attn_status linear_engine_span_map(const attn_ctx *ctx, const lin_problem *p,
                                   const attn_tensor *k, const attn_tensor *v,
                                   const attn_tensor *g, attn_tensor *decay, attn_tensor *u);
attn_status linear_engine_state_compose(const attn_tensor *decay1, const attn_tensor *u1,
                                        const attn_tensor *decay2, const attn_tensor *u2,
                                        attn_tensor *decay_out, attn_tensor *u_out);

/* The diagonal selective scan (Mamba-1), token by token (src/linear/scan.c).
 * Dense f32: x, dl [B][T][E], a [E][N], bm, cm [B][T][N], ds [E] or NULL,
 * state_in [B][E][N] or NULL (zeros), state_out [B][E][N] or NULL (may be
 * state_in), y [B][T][E]. */
attn_status linear_engine_diag_scan(const attn_ctx *ctx, int64_t B, int64_t T, int64_t E,
                                    int64_t N, const float *x, const float *dl, const float *a,
                                    const float *bm, const float *cm, const float *ds,
                                    const float *state_in, float *state_out, float *y);

#endif
