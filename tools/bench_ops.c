/* Setting up, running and checking one benchmark case through the public API. */
#include "cli.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct op_state {
    attn_ctx *ctx;
    bench_case c;
    attn_params p;
    void *q, *k, *v, *o, *lse, *dout, *dq, *dk, *dv;
    attn_tensor tq, tk, tv, to, tlse, tdout, tdq, tdk, tdv;
    sparse_state *sp; /* sparse ops run through bench_sparse.c */
    linear_state *ls; /* linear-time ops run through bench_linear.c */
};

const char *bench_op_name(bench_op op) {
    switch (op) {
    case BENCH_ATTENTION: return "attention";
    case BENCH_ATTENTION_BWD: return "attention_bwd";
    case BENCH_DECODE: return "decode";
    case BENCH_BLOCKSPARSE: return "blocksparse";
    case BENCH_WINDOW: return "window";
    case BENCH_PSA: return "psa";
    case BENCH_TOPK: return "topk";
    case BENCH_NSA: return "nsa";
    case BENCH_NSA_BWD: return "nsa_bwd";
    case BENCH_LINEAR: return "linear";
    case BENCH_LIGHTNING: return "lightning";
    case BENCH_GLA: return "gla";
    case BENCH_GLA_BWD: return "gla_bwd";
    case BENCH_GLA_DECODE: return "gla_decode";
    case BENCH_SSD: return "ssd";
    case BENCH_MAMBA: return "mamba";
    case BENCH_EFFICIENCY: return "efficiency";
    case BENCH_WERSA: return "wersa";
    case BENCH_LLA: return "lla";
    case BENCH_LLA_BWD: return "lla_bwd";
    }
    return "?";
}

static void say(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* 64-byte aligned, zeroed (so every page is resident before timing). */
static void *alloc_zero(size_t bytes) {
    size_t rounded = (bytes + 63) / 64 * 64;
    if (rounded == 0) rounded = 64;
    void *p = aligned_alloc(64, rounded);
    if (p) memset(p, 0, rounded);
    return p;
}

static void *alloc_random(size_t count, attn_dtype dt, uint64_t seed) {
    void *p = alloc_zero(count * attn_dtype_size(dt));
    if (p) fill_random(p, dt, count, seed);
    return p;
}

/* Rows r0 .. r0+s-1 (dim 1) of a contiguous [B, N, H, D] tensor. */
static attn_tensor rows_view(void *base, attn_dtype dt, int64_t b, int64_t n, int64_t h,
                             int64_t d, int64_t r0, int64_t s) {
    attn_tensor t = attn_tensor_4d((char *)base + (size_t)(r0 * h * d) * attn_dtype_size(dt),
                                   dt, b, s, h, d);
    t.stride[0] = n * h * d;
    return t;
}

/* Columns r0 .. r0+s-1 (dim 2) of a contiguous [B, H, N] f32 LSE. */
static attn_tensor lse_view(float *base, int64_t b, int64_t h, int64_t n, int64_t r0,
                            int64_t s) {
    attn_tensor t = attn_tensor_3d(base + r0, ATTN_F32, b, h, s);
    t.stride[0] = h * n;
    t.stride[1] = n;
    return t;
}

void op_free(op_state *s) {
    if (!s) return;
    sparse_free(s->sp);
    linear_free(s->ls);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->o);
    free(s->lse);
    free(s->dout);
    free(s->dq);
    free(s->dk);
    free(s->dv);
    free(s);
}

attn_status op_setup(op_state **out, attn_ctx *ctx, const bench_case *c, uint64_t seed,
                     char *err, size_t errlen) {
    *out = NULL;
    op_state *s = calloc(1, sizeof *s);
    if (!s) {
        say(err, errlen, "out of memory");
        return ATTN_ERR_NOMEM;
    }
    s->ctx = ctx;
    s->c = *c;
    if (bench_op_is_linear(c->op)) {
        attn_status st = linear_setup(&s->ls, ctx, c, seed, err, errlen);
        if (st != ATTN_OK) {
            free(s);
            return st;
        }
        *out = s;
        return ATTN_OK;
    }
    if (bench_op_is_sparse(c->op)) {
        attn_status st = sparse_setup(&s->sp, ctx, c, seed, err, errlen);
        if (st != ATTN_OK) {
            free(s);
            return st;
        }
        *out = s;
        return ATTN_OK;
    }
    s->p = attn_params_default();
    s->p.causal = c->causal;
    s->p.window_left = c->window_left;
    s->p.window_right = c->window_right;

    size_t nq = (size_t)(c->batch * c->n * c->heads * c->dim);
    size_t no = (size_t)(c->batch * c->n * c->heads * c->dim_v);
    size_t nk = (size_t)(c->batch * c->m * c->kv_heads * c->dim);
    size_t nv = (size_t)(c->batch * c->m * c->kv_heads * c->dim_v);
    size_t nl = (size_t)(c->batch * c->heads * c->n);

    s->q = alloc_random(nq, ATTN_F32, seed + 1);
    s->k = alloc_random(nk, c->dtype, seed + 2);
    s->v = alloc_random(nv, c->dtype, seed + 3);
    s->o = alloc_zero(no * 4);
    int ok = s->q && s->k && s->v && s->o;
    if (ok && c->op == BENCH_ATTENTION_BWD) {
        s->lse = alloc_zero(nl * 4);
        s->dout = alloc_random(no, ATTN_F32, seed + 4);
        s->dq = alloc_zero(nq * 4);
        s->dk = alloc_zero(nk * 4);
        s->dv = alloc_zero(nv * 4);
        ok = s->lse && s->dout && s->dq && s->dk && s->dv;
    }
    if (!ok) {
        op_free(s);
        say(err, errlen, "out of memory allocating the inputs and outputs");
        return ATTN_ERR_NOMEM;
    }

    s->tq = attn_tensor_4d(s->q, ATTN_F32, c->batch, c->n, c->heads, c->dim);
    s->tk = attn_tensor_4d(s->k, c->dtype, c->batch, c->m, c->kv_heads, c->dim);
    s->tv = attn_tensor_4d(s->v, c->dtype, c->batch, c->m, c->kv_heads, c->dim_v);
    s->to = attn_tensor_4d(s->o, ATTN_F32, c->batch, c->n, c->heads, c->dim_v);
    if (c->op == BENCH_ATTENTION_BWD) {
        s->tlse = attn_tensor_3d(s->lse, ATTN_F32, c->batch, c->heads, c->n);
        s->tdout = attn_tensor_4d(s->dout, ATTN_F32, c->batch, c->n, c->heads, c->dim_v);
        s->tdq = attn_tensor_4d(s->dq, ATTN_F32, c->batch, c->n, c->heads, c->dim);
        s->tdk = attn_tensor_4d(s->dk, ATTN_F32, c->batch, c->m, c->kv_heads, c->dim);
        s->tdv = attn_tensor_4d(s->dv, ATTN_F32, c->batch, c->m, c->kv_heads, c->dim_v);
        /* The backward needs O and LSE: one untimed forward. */
        attn_status st = attn_forward(ctx, &s->p, &s->tq, &s->tk, &s->tv, &s->to, &s->tlse);
        if (st != ATTN_OK) {
            say(err, errlen, "attn_forward (before the backward): %s", attn_last_error());
            op_free(s);
            return st;
        }
    }
    *out = s;
    return ATTN_OK;
}

attn_status op_run(op_state *s) {
    if (s->sp) return sparse_run(s->sp);
    if (s->ls) return linear_run(s->ls);
    switch (s->c.op) {
    case BENCH_ATTENTION:
        return attn_forward(s->ctx, &s->p, &s->tq, &s->tk, &s->tv, &s->to, NULL);
    case BENCH_ATTENTION_BWD:
        return attn_backward(s->ctx, &s->p, &s->tq, &s->tk, &s->tv, &s->to, &s->tlse,
                             &s->tdout, &s->tdq, &s->tdk, &s->tdv);
    case BENCH_DECODE:
        return attn_decode(s->ctx, &s->p, &s->tq, &s->tk, &s->tv, NULL, &s->to, NULL);
    default:
        return ATTN_ERR_ARG;
    }
}

/* sqrt(sum (x - r)^2 / sum r^2) of rows r0.. of x [B, N, H, D] against the
 * contiguous ref [B, s, H, D]. */
static double rel_rms(const float *x, const float *ref, int64_t b, int64_t n, int64_t h,
                      int64_t d, int64_t r0, int64_t s) {
    double num = 0.0, den = 0.0;
    size_t row = (size_t)(h * d);
    for (int64_t bi = 0; bi < b; bi++) {
        for (int64_t i = 0; i < s; i++) {
            const float *xr = x + ((size_t)(bi * n + r0 + i)) * row;
            const float *rr = ref + ((size_t)(bi * s + i)) * row;
            for (size_t e = 0; e < row; e++) {
                double diff = (double)xr[e] - (double)rr[e];
                num += diff * diff;
                den += (double)rr[e] * (double)rr[e];
            }
        }
    }
    if (den == 0.0) return num == 0.0 ? 0.0 : INFINITY;
    return sqrt(num / den);
}

attn_status op_rel_err(op_state *s, attn_ctx *ref, double *rel_err, char *err,
                       size_t errlen) {
    const bench_case *c = &s->c;
    *rel_err = NAN;
    if (s->ls) return linear_rel_err(s->ls, ref, rel_err, err, errlen);
    if (s->sp) { /* against the dense (exact) forward of the same run */
        (void)ref;
        *rel_err = sparse_rel_err(s->sp);
        return ATTN_OK;
    }
    /* Decode checks every query; the others the last rows, which see the same
     * bottom-right causal alignment as in the full problem. */
    int64_t rows = c->op == BENCH_DECODE ? c->n : (c->n < 16 ? c->n : 16);
    int64_t r0 = c->n - rows;
    attn_status st = ATTN_OK;

    attn_tensor qs = rows_view(s->q, ATTN_F32, c->batch, c->n, c->heads, c->dim, r0, rows);
    size_t n_out = (size_t)(c->batch * rows * c->heads *
                            (c->op == BENCH_ATTENTION_BWD ? c->dim : c->dim_v));
    float *got = malloc(n_out * sizeof(float));
    float *dk = NULL, *dv = NULL;
    if (!got) {
        say(err, errlen, "out of memory for the reference check");
        return ATTN_ERR_NOMEM;
    }

    switch (c->op) {
    default:
        break;
    case BENCH_ATTENTION: {
        attn_tensor os = attn_tensor_4d(got, ATTN_F32, c->batch, rows, c->heads, c->dim_v);
        st = attn_forward(ref, &s->p, &qs, &s->tk, &s->tv, &os, NULL);
        if (st == ATTN_OK)
            *rel_err = rel_rms(s->o, got, c->batch, c->n, c->heads, c->dim_v, r0, rows);
        break;
    }
    case BENCH_DECODE: {
        attn_tensor os = attn_tensor_4d(got, ATTN_F32, c->batch, rows, c->heads, c->dim_v);
        st = attn_decode(ref, &s->p, &qs, &s->tk, &s->tv, NULL, &os, NULL);
        if (st == ATTN_OK)
            *rel_err = rel_rms(s->o, got, c->batch, c->n, c->heads, c->dim_v, r0, rows);
        break;
    }
    case BENCH_ATTENTION_BWD: {
        size_t nk = (size_t)(c->batch * c->m * c->kv_heads * c->dim);
        size_t nv = (size_t)(c->batch * c->m * c->kv_heads * c->dim_v);
        dk = malloc(nk * sizeof(float));
        dv = malloc(nv * sizeof(float));
        if (!dk || !dv) {
            st = ATTN_ERR_NOMEM;
            say(err, errlen, "out of memory for the reference check");
            break;
        }
        attn_tensor os = rows_view(s->o, ATTN_F32, c->batch, c->n, c->heads, c->dim_v, r0, rows);
        attn_tensor douts =
            rows_view(s->dout, ATTN_F32, c->batch, c->n, c->heads, c->dim_v, r0, rows);
        attn_tensor lses = lse_view(s->lse, c->batch, c->heads, c->n, r0, rows);
        attn_tensor dqs = attn_tensor_4d(got, ATTN_F32, c->batch, rows, c->heads, c->dim);
        attn_tensor dks = attn_tensor_4d(dk, ATTN_F32, c->batch, c->m, c->kv_heads, c->dim);
        attn_tensor dvs = attn_tensor_4d(dv, ATTN_F32, c->batch, c->m, c->kv_heads, c->dim_v);
        st = attn_backward(ref, &s->p, &qs, &s->tk, &s->tv, &os, &lses, &douts, &dqs, &dks,
                           &dvs);
        if (st == ATTN_OK)
            *rel_err = rel_rms(s->dq, got, c->batch, c->n, c->heads, c->dim, r0, rows);
        break;
    }
    }
    if (st != ATTN_OK && st != ATTN_ERR_NOMEM)
        say(err, errlen, "reference backend: %s", attn_last_error());
    free(got);
    free(dk);
    free(dv);
    return st;
}

double op_density(const op_state *s) { return s->sp ? sparse_density(s->sp) : NAN; }
double op_dense_ms(const op_state *s) { return s->sp ? sparse_dense_ms(s->sp) : NAN; }
