/* attn bench for the linear-time mechanisms (the chunked-recurrence
 * engine): setting up, running and checking one case, their FLOP and byte
 * counts, and the efficiency length against exact causal attention.
 *
 * Shapes: --n tokens per sequence, --heads H, --kv-heads Hk, --dim D (key
 * dim; SSD and Mamba: the state size N), --dim-v Dv (SSD: the head dim P).
 * Mamba: --heads is the number of channels E. Q, O, gates f32; K, V dtype.
 * WERSA: F = 2 D features, 3 levels, weights 1, 0.8, 0.6, 0.4; LLA: lambda
 * 0.1, the library's blocks (its cost grows as n^2 D^2).
 * rel_err: the op on the first min(n, 128) tokens, on this context and on
 * the reference backend (a causal op's prefix is the same computation at
 * a shorter length). */
#include "cli.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct linear_state {
    attn_ctx *ctx;
    bench_case c;
    attn_linear_params p;
    void *q, *k, *v, *g, *o, *s, *dq, *dk, *dv, *dg, *aux, *dsk;
};

int bench_op_is_linear(bench_op op) {
    return op == BENCH_LINEAR || op == BENCH_LIGHTNING || op == BENCH_GLA ||
           op == BENCH_GLA_BWD || op == BENCH_GLA_DECODE || op == BENCH_SSD ||
           op == BENCH_MAMBA || op == BENCH_WERSA || op == BENCH_LLA || op == BENCH_LLA_BWD;
}

static void say(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void *zalloc(double count, size_t size) {
    double bytes = count * (double)size;
    if (!(bytes < 1e15)) return NULL;
    size_t n = ((size_t)bytes + 63) / 64 * 64;
    void *p = aligned_alloc(64, n ? n : 64);
    if (p) memset(p, 0, n ? n : 64);
    return p;
}

static void fill_uniform(float *x, size_t n, float lo, float hi, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        x[i] = lo + (hi - lo) * (float)((double)(s >> 11) / 9007199254740992.0);
    }
}

enum { WERSA_LEVELS = 3 };
static const float wersa_weights[WERSA_LEVELS + 1] = {1.0f, 0.8f, 0.6f, 0.4f};
#define LLA_LAMBDA 0.1f

/* Ops whose --causal flag is honoured (the others are causal). */
static int takes_causal(bench_op op) {
    return op == BENCH_LINEAR || op == BENCH_WERSA || op == BENCH_LLA || op == BENCH_LLA_BWD;
}

/* Backward ops: dout in aux, gradients dq, dk, dv (rel_err on dq). */
static int is_bwd(bench_op op) { return op == BENCH_GLA_BWD || op == BENCH_LLA_BWD; }

/* The engine's default chunk (src/linear/linear.h), for the FLOP count. */
static double chunk_of(bench_op op) {
    (void)op;
    return 16;
}

double linear_flops(const bench_case *c) {
    const double t = (double)c->batch * (double)c->n, C = chunk_of(c->op);
    double d = (double)c->dim, dv = (double)c->dim_v, h = (double)c->heads;
    switch (c->op) {
    case BENCH_GLA_DECODE: return t * h * 4.0 * d * dv; /* S update + readout */
    case BENCH_MAMBA: return t * h * 6.0 * d; /* the scan: decay, update, readout per state */
    case BENCH_GLA_BWD: return t * h * (C * (3.0 * d + 2.0 * dv) + 10.0 * d * dv);
    case BENCH_LINEAR:
        if (!c->causal) return t * h * 4.0 * d * dv;
        break;
    case BENCH_WERSA: { /* features of q and k (2 F D each), then linear attention on F, Dv + 1 */
        const double f = 2.0 * d, proj = t * (h + (double)c->kv_heads) * 2.0 * f * d;
        return proj + t * h * (c->causal ? C * (f + dv + 1) + 4.0 * f * (dv + 1) : 4.0 * f * (dv + 1));
    }
    case BENCH_LLA: /* per visible pair: Q Kᵀ twice, rho Kᵀ, the moments' GEMM, Ω V;
                       per query a Cholesky solve */
    case BENCH_LLA_BWD: { /* + a pass of Q Kᵀ, G Vᵀ, rho Kᵀ, z and one of Q Kᵀ, G Vᵀ,
                             rho Kᵀ, y Kᵀ, dv, dk (3), dq */
        const double n = (double)c->n, pairs = c->causal ? n * (n + 1) / 2 : n * n;
        const double w = d + d * (d + 1) / 2;
        const double per_pair = c->op == BENCH_LLA ? 2.0 * w + 6.0 * d + 2.0 * dv
                                                   : 2.0 * w + 24.0 * d + 6.0 * dv;
        return (double)c->batch * h * (pairs * per_pair + n * d * d * d / 3.0);
    }
    default: break;
    }
    /* per token and head: causal half of the C x C scores and of A V, then
     * (Q ⊙ P) S and the state update */
    return t * h * (C * (d + dv) + 4.0 * d * dv);
}

double linear_bytes(const bench_case *c) {
    const double t = (double)c->batch * (double)c->n, kv = (double)attn_dtype_size(c->dtype);
    const double h = (double)c->heads, hk = (double)c->kv_heads, d = (double)c->dim,
                 dv = (double)c->dim_v;
    switch (c->op) {
    case BENCH_MAMBA: return t * h * (4.0 * 3 + 4.0 * d) + t * 2.0 * d * 4.0; /* x, Δ, y; B, C */
    case BENCH_SSD: return t * h * (2.0 * dv * 4.0 + 4.0) + t * hk * 2.0 * d * 4.0;
    case BENCH_GLA_DECODE: /* + the state, read and written */
        return t * (h * (d + dv) * 4.0 + hk * (d + dv) * kv + h * d * 4.0) +
               (double)c->batch * h * d * dv * 8.0;
    default: {
        double fwd = t * (h * (d + dv) * 4.0 + hk * (d + dv) * kv);
        if (c->op == BENCH_GLA || c->op == BENCH_GLA_BWD) fwd += t * h * d * 4.0;
        return is_bwd(c->op) ? 2.0 * fwd + t * hk * (d + dv) * 4.0 : fwd;
    }
    }
}

void linear_free(linear_state *s) {
    if (!s) return;
    void *all[] = {s->q, s->k, s->v, s->g, s->o, s->s, s->dq, s->dk, s->dv, s->dg, s->aux, s->dsk};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
    free(s);
}

attn_status linear_setup(linear_state **out, attn_ctx *ctx, const bench_case *c, uint64_t seed,
                         char *err, size_t errlen) {
    linear_state *s = calloc(1, sizeof *s);
    if (!s) return say(err, errlen, "out of memory"), ATTN_ERR_NOMEM;
    s->ctx = ctx;
    s->c = *c;
    s->p = attn_linear_params_default();
    s->p.causal = takes_causal(c->op) ? c->causal : 1;
    const double t = (double)c->batch * (double)c->n, H = (double)c->heads,
                 Hk = (double)c->kv_heads, D = (double)c->dim, Dv = (double)c->dim_v;
    const size_t kvs = attn_dtype_size(c->dtype);
    int ok = 1;
    switch (c->op) {
    case BENCH_SSD: /* x [B,T,H,P] in q, dt [B,T,H] in g, a [H] in aux, B and C [B,T,G,N] in k, v */
        ok = (s->q = zalloc(t * H * Dv, 4)) && (s->g = zalloc(t * H, 4)) &&
             (s->aux = zalloc(H, 4)) && (s->dsk = zalloc(H, 4)) &&
             (s->k = zalloc(t * Hk * D, 4)) && (s->v = zalloc(t * Hk * D, 4)) &&
             (s->o = zalloc(t * H * Dv, 4)) && (s->s = zalloc(c->batch * H * D * Dv, 4));
        if (!ok) break;
        fill_random(s->q, ATTN_F32, (size_t)(t * H * Dv), seed);
        fill_uniform(s->g, (size_t)(t * H), 0.01f, 0.2f, seed + 1);
        fill_uniform(s->aux, (size_t)H, -2.0f, -0.5f, seed + 2);
        fill_random(s->dsk, ATTN_F32, (size_t)H, seed + 3);
        fill_random(s->k, ATTN_F32, (size_t)(t * Hk * D), seed + 4);
        fill_random(s->v, ATTN_F32, (size_t)(t * Hk * D), seed + 5);
        break;
    case BENCH_MAMBA: /* x, Δ [B,T,E] in q, g; a [E,N] in aux; B, C [B,T,N] in k, v */
        ok = (s->q = zalloc(t * H, 4)) && (s->g = zalloc(t * H, 4)) &&
             (s->aux = zalloc(H * D, 4)) && (s->dsk = zalloc(H, 4)) &&
             (s->k = zalloc(t * D, 4)) && (s->v = zalloc(t * D, 4)) &&
             (s->o = zalloc(t * H, 4)) && (s->s = zalloc(c->batch * H * D, 4));
        if (!ok) break;
        fill_random(s->q, ATTN_F32, (size_t)(t * H), seed);
        fill_uniform(s->g, (size_t)(t * H), 0.01f, 0.2f, seed + 1);
        fill_uniform(s->aux, (size_t)(H * D), -4.0f, -0.5f, seed + 2);
        fill_random(s->dsk, ATTN_F32, (size_t)H, seed + 3);
        fill_random(s->k, ATTN_F32, (size_t)(t * D), seed + 4);
        fill_random(s->v, ATTN_F32, (size_t)(t * D), seed + 5);
        break;
    default:
        s->p.gate = takes_causal(c->op) ? ATTN_GATE_NONE
                    : c->op == BENCH_LIGHTNING ? ATTN_GATE_HEAD : ATTN_GATE_KEY;
        ok = (s->q = zalloc(t * H * D, 4)) && (s->k = zalloc(t * Hk * D, kvs)) &&
             (s->v = zalloc(t * Hk * Dv, kvs)) && (s->o = zalloc(t * H * Dv, 4)) &&
             (s->s = zalloc(c->batch * H * D * Dv, 4));
        if (ok && s->p.gate == ATTN_GATE_HEAD) ok = (s->g = zalloc(H, 4)) != NULL;
        if (ok && s->p.gate == ATTN_GATE_KEY) ok = (s->g = zalloc(t * H * D, 4)) != NULL;
        if (ok && is_bwd(c->op))
            ok = (s->dq = zalloc(t * H * D, 4)) && (s->dk = zalloc(t * Hk * D, 4)) &&
                 (s->dv = zalloc(t * Hk * Dv, 4)) && (s->dg = zalloc(t * H * D, 4)) &&
                 (s->aux = zalloc(t * H * Dv, 4));
        if (!ok) break;
        fill_random(s->q, ATTN_F32, (size_t)(t * H * D), seed);
        fill_random(s->k, c->dtype, (size_t)(t * Hk * D), seed + 1);
        fill_random(s->v, c->dtype, (size_t)(t * Hk * Dv), seed + 2);
        if (s->p.gate == ATTN_GATE_HEAD) { /* decays 0.9 .. 0.999 */
            fill_uniform(s->g, (size_t)H, 0.9f, 0.999f, seed + 3);
            for (int64_t h = 0; h < c->heads; h++) ((float *)s->g)[h] = logf(((float *)s->g)[h]);
        }
        if (s->p.gate == ATTN_GATE_KEY) fill_uniform(s->g, (size_t)(t * H * D), -0.1f, -0.001f, seed + 3);
        if (s->aux) fill_random(s->aux, ATTN_F32, (size_t)(t * H * Dv), seed + 4);
        break;
    }
    if (!ok) {
        linear_free(s);
        say(err, errlen, "out of memory for the tensors");
        return ATTN_ERR_NOMEM;
    }
    *out = s;
    return ATTN_OK;
}

/* t with only its first `tokens` rows along dim 1. */
static attn_tensor prefix(attn_tensor t, int64_t tokens) {
    t.shape[1] = tokens;
    return t;
}

/* The op on ctx over the first `tokens` tokens, outputs into o (and the
 * gradients of the state). state: the state tensor's memory (decode updates
 * it in place; the others write state_out there). */
static attn_status run_on(linear_state *s, attn_ctx *ctx, int64_t tokens, void *o, void *state,
                          void *dq) {
    const bench_case *c = &s->c;
    const int64_t B = c->batch, N = c->n, H = c->heads, Hk = c->kv_heads, D = c->dim, Dv = c->dim_v;
#define VIEW4(ptr, dt, h, d) prefix(attn_tensor_4d(ptr, dt, B, N, h, d), tokens)
    switch (c->op) {
    case BENCH_SSD: {
        attn_tensor x = VIEW4(s->q, ATTN_F32, H, Dv), y = VIEW4(o, ATTN_F32, H, Dv);
        attn_tensor dt = prefix(attn_tensor_3d(s->g, ATTN_F32, B, N, H), tokens);
        attn_tensor bm = VIEW4(s->k, ATTN_F32, Hk, D), cm = VIEW4(s->v, ATTN_F32, Hk, D);
        attn_tensor a = attn_tensor_3d(s->aux, ATTN_F32, H, 1, 1), ds = a;
        a.ndim = ds.ndim = 1;
        ds.data = s->dsk;
        attn_tensor st = attn_tensor_4d(state, ATTN_F32, B, H, D, Dv);
        return attn_ssd_forward(ctx, &x, &dt, &a, &bm, &cm, &ds, NULL, &y, &st);
    }
    case BENCH_MAMBA: {
        attn_tensor x = prefix(attn_tensor_3d(s->q, ATTN_F32, B, N, H), tokens);
        attn_tensor dl = prefix(attn_tensor_3d(s->g, ATTN_F32, B, N, H), tokens);
        attn_tensor y = prefix(attn_tensor_3d(o, ATTN_F32, B, N, H), tokens);
        attn_tensor bm = prefix(attn_tensor_3d(s->k, ATTN_F32, B, N, D), tokens);
        attn_tensor cm = prefix(attn_tensor_3d(s->v, ATTN_F32, B, N, D), tokens);
        attn_tensor a = attn_tensor_3d(s->aux, ATTN_F32, H, D, 1), ds = attn_tensor_3d(s->dsk, ATTN_F32, H, 1, 1);
        a.ndim = 2;
        ds.ndim = 1;
        attn_tensor st = attn_tensor_4d(state, ATTN_F32, B, H, D, 1);
        return attn_mamba_scan(ctx, &x, &dl, &a, &bm, &cm, &ds, NULL, &y, &st);
    }
    default: break;
    }
    attn_tensor q = VIEW4(s->q, ATTN_F32, H, D), k = VIEW4(s->k, c->dtype, Hk, D),
                v = VIEW4(s->v, c->dtype, Hk, Dv), to = VIEW4(o, ATTN_F32, H, Dv);
    attn_tensor st = attn_tensor_4d(state, ATTN_F32, B, H, D, Dv), g;
    if (s->p.gate == ATTN_GATE_HEAD) {
        g = attn_tensor_3d(s->g, ATTN_F32, H, 1, 1);
        g.ndim = 1;
    } else if (s->p.gate == ATTN_GATE_KEY) {
        g = VIEW4(s->g, ATTN_F32, H, D);
    }
    const attn_tensor *gp = s->p.gate == ATTN_GATE_NONE ? NULL : &g;
    switch (c->op) {
    case BENCH_GLA_DECODE:
        return attn_linear_decode(ctx, &s->p, &q, &k, &v, gp, &st, &to);
    case BENCH_GLA_BWD: {
        attn_tensor dout = VIEW4(s->aux, ATTN_F32, H, Dv), tdq = VIEW4(dq, ATTN_F32, H, D),
                    tdk = VIEW4(s->dk, ATTN_F32, Hk, D), tdv = VIEW4(s->dv, ATTN_F32, Hk, Dv),
                    tdg = VIEW4(s->dg, ATTN_F32, H, D);
        return attn_linear_backward(ctx, &s->p, &q, &k, &v, gp, NULL, &dout, NULL, &tdq, &tdk,
                                    &tdv, &tdg, NULL);
    }
    case BENCH_WERSA: {
        attn_tensor w = attn_tensor_3d((void *)wersa_weights, ATTN_F32, WERSA_LEVELS + 1, 1, 1);
        w.ndim = 1;
        return attn_wersa_forward(ctx, &s->p, (int32_t)(2 * D), WERSA_LEVELS, &w, &q, &k, &v, &to);
    }
    case BENCH_LLA:
        return attn_lla_forward(ctx, &s->p, LLA_LAMBDA, &q, &k, &v, &to);
    case BENCH_LLA_BWD: {
        attn_tensor dout = VIEW4(s->aux, ATTN_F32, H, Dv), tdq = VIEW4(dq, ATTN_F32, H, D),
                    tdk = VIEW4(s->dk, ATTN_F32, Hk, D),
                    tdv = VIEW4(s->dv, ATTN_F32, Hk, Dv);
        return attn_lla_backward(ctx, &s->p, LLA_LAMBDA, &q, &k, &v, &dout, &tdq, &tdk, &tdv);
    }
    default:
        return attn_linear_forward(ctx, &s->p, &q, &k, &v, gp, NULL, &to, &st);
    }
#undef VIEW4
}

attn_status linear_run(linear_state *s) {
    return run_on(s, s->ctx, s->c.n, s->o, s->s, s->dq);
}

static double rel_rms(const float *x, const float *r, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)x[i] - (double)r[i];
        num += d * d;
        den += (double)r[i] * (double)r[i];
    }
    return den > 0.0 ? sqrt(num / den) : (num == 0.0 ? 0.0 : INFINITY);
}

attn_status linear_rel_err(linear_state *s, attn_ctx *ref, double *rel_err, char *err,
                           size_t errlen) {
    const bench_case *c = &s->c;
    *rel_err = NAN;
    if (takes_causal(c->op) && !c->causal && c->n > 128) {
        say(err, errlen, "non-causal: a prefix is not the same computation; not checked");
        return ATTN_ERR_UNSUPPORTED;
    }
    const int64_t R = c->n < 128 ? c->n : 128;
    /* outputs: o (or dq for the backward) of the full shape, rows [0, R) used */
    const double out_n = (double)c->batch * c->n * c->heads *
                         (is_bwd(c->op) ? c->dim : c->op == BENCH_MAMBA ? 1 : c->dim_v);
    const double st_n = (double)c->batch * c->heads * c->dim * (c->op == BENCH_MAMBA ? 1 : c->dim_v);
    float *o1 = zalloc(out_n, 4), *o2 = zalloc(out_n, 4), *s1 = zalloc(st_n, 4), *s2 = zalloc(st_n, 4);
    attn_status st = ATTN_ERR_NOMEM;
    if (!o1 || !o2 || !s1 || !s2) {
        say(err, errlen, "out of memory for the reference check");
        goto done;
    }
    memcpy(s1, s->s, (size_t)st_n * 4); /* decode: both start from the same state */
    memcpy(s2, s->s, (size_t)st_n * 4);
    const int bwd = is_bwd(c->op);
    st = run_on(s, s->ctx, R, bwd ? s->o : o1, s1, o1);
    if (st == ATTN_OK) st = run_on(s, ref, R, bwd ? s->o : o2, s2, o2);
    if (st != ATTN_OK) {
        say(err, errlen, "%s", attn_last_error());
        goto done;
    }
    /* rows [0, R) of each sequence */
    const size_t row = (size_t)(out_n / ((double)c->batch * c->n));
    double num = 0.0, den = 0.0;
    for (int64_t b = 0; b < c->batch; b++) {
        const size_t off = (size_t)(b * c->n) * row, len = (size_t)R * row;
        double e = rel_rms(o1 + off, o2 + off, len), r2 = 0.0;
        for (size_t i = 0; i < len; i++) r2 += (double)o2[off + i] * o2[off + i];
        num += e * e * r2;
        den += r2;
    }
    *rel_err = den > 0.0 ? sqrt(num / den) : 0.0;
done:
    free(o1), free(o2), free(s1), free(s2);
    return st;
}

/* ------------------------------------------------------------- efficiency length */

/* Seconds of the fastest call of attn_forward (causal) or of a linear op,
 * B = 1, n tokens, f32. */
static double time_min(attn_ctx *ctx, bench_op op, int64_t n, int64_t h, int64_t d, int reps,
                       uint64_t seed, attn_status *st) {
    bench_case c = {0};
    c.op = op;
    c.batch = 1;
    c.n = c.m = n;
    c.heads = c.kv_heads = h;
    c.dim = c.dim_v = d;
    c.causal = 1;
    c.dtype = ATTN_F32;
    c.window_left = c.window_right = -1;
    const double t = (double)n * h * d;
    float *q = zalloc(t, 4), *k = zalloc(t, 4), *v = zalloc(t, 4), *o = zalloc(t, 4);
    linear_state *ls = NULL;
    char err[256];
    double best = INFINITY;
    *st = ATTN_ERR_NOMEM;
    if (!q || !k || !v || !o) goto done;
    fill_random(q, ATTN_F32, (size_t)t, seed);
    fill_random(k, ATTN_F32, (size_t)t, seed + 1);
    fill_random(v, ATTN_F32, (size_t)t, seed + 2);
    if (op != BENCH_ATTENTION && (*st = linear_setup(&ls, ctx, &c, seed, err, sizeof err)) != ATTN_OK)
        goto done;
    attn_params p = attn_params_default();
    p.causal = 1;
    attn_tensor tq = attn_tensor_4d(q, ATTN_F32, 1, n, h, d), tk = attn_tensor_4d(k, ATTN_F32, 1, n, h, d),
                tv = attn_tensor_4d(v, ATTN_F32, 1, n, h, d), to = attn_tensor_4d(o, ATTN_F32, 1, n, h, d);
    /* the first call warms up; then at least reps calls and, for short
     * ones, 0.1 s of them (at most 1000): on shared cores a call is now and
     * then descheduled for a few ms, and the fastest call is the one that
     * was not */
    double spent = 0.0;
    for (int r = 0; r <= reps || (spent < 0.1 && r <= 1000); r++) {
        double t0 = now_seconds();
        *st = ls ? linear_run(ls) : attn_forward(ctx, &p, &tq, &tk, &tv, &to, NULL);
        double dt = now_seconds() - t0;
        if (*st != ATTN_OK) break;
        if (r > 0 && dt < best) best = dt;
        spent += dt;
    }
done:
    free(q), free(k), free(v), free(o);
    linear_free(ls);
    return best;
}

int linear_efficiency(attn_ctx *ctx, const bench_case *c, const bench_opts *o, int threads,
                      const char *isa) {
    static const bench_op ops[3] = {BENCH_LINEAR, BENCH_LIGHTNING, BENCH_GLA};
    const int reps = o->repeats > 0 ? o->repeats : 3;
    int64_t lens[24];
    int nl = 0;
    for (int64_t n = 16; n <= c->n && nl < 24; n *= 2) lens[nl++] = n;
    double exact[24], lin[3][24];
    for (int i = 0; i < nl; i++) {
        attn_status st;
        exact[i] = time_min(ctx, BENCH_ATTENTION, lens[i], c->heads, c->dim, reps, o->seed, &st);
        for (int m = 0; m < 3 && st == ATTN_OK; m++)
            lin[m][i] = time_min(ctx, ops[m], lens[i], c->heads, c->dim, reps, o->seed, &st);
        if (st != ATTN_OK) {
            fprintf(stderr, "attn bench: efficiency: %s: %s\n", attn_status_str(st), attn_last_error());
            return CLI_EXIT_FAIL;
        }
        if (o->json) {
            printf("{\"op\": \"efficiency\", \"n\": %lld, \"heads\": %lld, \"dim\": %lld, "
                   "\"threads\": %d, \"isa\": \"%s\", \"exact_causal_ms\": %.6g",
                   (long long)lens[i], (long long)c->heads, (long long)c->dim, threads, isa,
                   1e3 * exact[i]);
            for (int m = 0; m < 3; m++) printf(", \"%s_ms\": %.6g", bench_op_name(ops[m]), 1e3 * lin[m][i]);
            printf("}\n");
        } else {
            printf("efficiency  N %7lld  exact causal %9.3f ms", (long long)lens[i], 1e3 * exact[i]);
            for (int m = 0; m < 3; m++) printf("  %s %9.3f ms", bench_op_name(ops[m]), 1e3 * lin[m][i]);
            printf("\n");
        }
        fflush(stdout);
    }
    /* the efficiency length: the smallest N from which the linear op is
     * faster at every measured length */
    for (int m = 0; m < 3; m++) {
        long long len = -1;
        for (int i = nl - 1; i >= 0 && lin[m][i] < exact[i]; i--) len = (long long)lens[i];
        if (o->json)
            printf("{\"op\": \"efficiency_length\", \"mechanism\": \"%s\", \"heads\": %lld, "
                   "\"dim\": %lld, \"threads\": %d, \"max_n\": %lld, \"efficiency_length\": %lld}\n",
                   bench_op_name(ops[m]), (long long)c->heads, (long long)c->dim, threads,
                   (long long)lens[nl - 1], len);
        else if (len > 0)
            printf("efficiency length of %s against exact causal attention: N = %lld\n",
                   bench_op_name(ops[m]), len);
        else
            printf("efficiency length of %s: not reached up to N = %lld\n", bench_op_name(ops[m]),
                   (long long)lens[nl - 1]);
    }
    return CLI_EXIT_OK;
}
