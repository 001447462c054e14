/* The chunked-recurrence engine, forward. One task is one (sequence, query
 * head): it walks the chunks in order, carrying the state S (D x Dv, f32)
 * in its scratch. Within a chunk (chunk.h):
 *   O = A V + (Q ⊙ P) S,   S = diag(P_last) S + (K ⊙ R)ᵀ V,
 * three GEMMs of the micro-kernel contract plus the scores. Tasks are
 * independent, so the result does not depend on the thread count. */
#include <stdlib.h>

#include "chunk.h"
#include "state.h"

typedef struct fwd_bufs {
    lin_chunk c;
    float *s;  /* [group][d][dv] states of the task's heads */
    float *o;  /* [chunk][dv] */
} fwd_bufs;

static fwd_bufs fwd_carve(scratch *s, const lin_problem *p, int64_t group) {
    fwd_bufs b;
    b.c = lin_chunk_carve(s, p);
    b.s = scratch_take(s, (size_t)(group * p->d * p->dv));
    b.o = scratch_take(s, (size_t)(p->chunk * p->dv));
    return b;
}

static void store_rows(const attn_kernels *kr, const lin_problem *p, const lin_seq *sq,
                       int64_t h, int64_t r0, int64_t n, const float *o, attn_tensor *out) {
    for (int64_t i = 0; i < n; i++)
        rows_store(kr, out, attn_off4(out, sq->tb, sq->t0 + r0 + i, h, 0), p->dv, o + i * p->dv);
}

/* The rows of a chunk as f32 in place (row r at ptr + r * ld), when the
 * tensor is f32 with unit stride along its last dim; NULL otherwise. */
static float *rows_in_place(const attn_tensor *t, int64_t tb, int64_t row, int64_t h,
                            int64_t *ld) {
    if (t->dtype != ATTN_F32 || t->stride[3] != 1) return NULL;
    *ld = t->stride[1];
    return (float *)t->data + attn_off4(t, tb, row, h, 0);
}

/* The rows of a chunk as f32: in place, or converted into buf (ld w). */
static const float *rows_f32(const attn_kernels *kr, const attn_tensor *t, int64_t tb,
                             int64_t row, int64_t h, int64_t n, int64_t w, float *buf,
                             int64_t *ld) {
    const float *in = rows_in_place(t, tb, row, h, ld);
    if (in) return in;
    rows_load_block(kr, t, attn_off4(t, tb, row, h, 0), t->stride[1], n, w, buf, w);
    *ld = w;
    return buf;
}

/* The next chunk's input rows of one head, asked for a few at a time
 * between the GEMMs of this chunk: a burst of all of them (hundreds of
 * lines) stalls the core on its miss queue, measured 3-4 % slower. */
typedef struct next_rows {
    const attn_tensor *t[4];
    int64_t head[4], tb, row, n, left, total;
} next_rows;

static next_rows next_rows_of(const lin_problem *p, const lin_seq *sq, int64_t h, int64_t hk,
                              int64_t r0, int64_t n, const attn_tensor *q,
                              const attn_tensor *k, const attn_tensor *v,
                              const attn_tensor *g) {
    next_rows nr = {{q, k, v, g}, {h, hk, hk, h}, sq->tb, sq->t0 + r0 + n, 0, 0, 0};
    if (r0 + n < sq->n) nr.n = r0 + 2 * n <= sq->n ? n : sq->n - r0 - n;
    const int tensors = p->gate == ATTN_GATE_KEY ? 4 : 3;
    nr.total = nr.left = tensors * nr.n;
    return nr;
}

/* Ask for the next `parts`-th share of the rows (parts: the calls left). */
static void next_rows_ask(next_rows *nr, int parts) {
    int64_t take = (nr->left + parts - 1) / parts;
    for (; take > 0 && nr->left > 0; take--, nr->left--) {
        const int64_t i = nr->total - nr->left, ti = i / nr->n;
        rows_prefetch(nr->t[ti], nr->tb, nr->row + i % nr->n, 1, nr->head[ti], 0);
    }
}

/* One causal chunk of head h, reading q, k, v and g where they lie (see
 * rows_in_place); o is made in scratch rows and streamed out past the caches
 * (store_stream: no read of the output lines before they are written, 4 %
 * faster for GLA at N 16384, H 8, D 128). The scale and
 * the gate products go where they cost least:
 *   scalar gates: A = scale (Q Kᵀ ⊙ W) and O = diag(scale P) (Q S) + A V,
 *     the row scale folded into the gemm (c_scale); the update takes
 *     (K ⊙ R)ᵀ as a [d][n] tile, its columns scaled by R;
 *   key gates: A = (Q ⊙ scale P)(K ⊙ e^{-b})ᵀ and the update's
 *     (K ⊙ R)ᵀ = diag(P_last) (K ⊙ e^{-b})ᵀ, made by one kernel
 *     (key_gate_chunk) from the rows as they lie.
 * Key gates whose cumulated logs leave ±KEYFAST_RANGE within the chunk go
 * through lin_chunk_load and its running products, as the backward does. */
static void causal_chunk(const attn_kernels *kr, const lin_problem *p, const lin_seq *sq,
                         int64_t h, int64_t r0, int64_t n, const attn_tensor *q,
                         const attn_tensor *k, const attn_tensor *v, const attn_tensor *g,
                         attn_tensor *o, float *s, fwd_bufs *bf) {
    const int64_t C = p->chunk, d = p->d, dv = p->dv;
    const int64_t hk = h / (p->h / p->hk), row = sq->t0 + r0;
    lin_chunk *c = &bf->c;
    int64_t ldo, ldq, ldk, ldv, ldg;
    /* o is made in the scratch rows, then streamed out */
    float *od = bf->o;
    ldo = dv;
    const float *qr = rows_f32(kr, q, sq->tb, row, h, n, d, c->q, &ldq);
    const float *kk = rows_f32(kr, k, sq->tb, row, hk, n, d, c->k, &ldk);
    const float *vr = rows_f32(kr, v, sq->tb, row, hk, n, dv, c->v, &ldv);
    float *kt = c->kt, *krt = c->kr; /* [d][C]: Kᵀ (⊙ e^{-b}), (K ⊙ R)ᵀ */
    next_rows nr = next_rows_of(p, sq, h, hk, r0, n, q, k, v, g);
    if (p->gate == ATTN_GATE_KEY) {
        const float *gr = rows_f32(kr, g, sq->tb, row, h, n, d, c->a, &ldg);
        next_rows_ask(&nr, 5);
        if (!kr->key_gate_chunk(n, d, gr, ldg, qr, ldq, kk, ldk, p->scale, (float)GATE_FLOOR,
                                (float)KEYFAST_RANGE, c->qp, kt, krt, C, c->plast, c->ki,
                                c->b)) {
            lin_chunk_load(kr, p, sq, h, r0, n, q, k, v, g, c);
            lin_chunk_scores(kr, p, n, c);
            kr->gemm(n, dv, n, c->sc, C, 1, c->v, dv, od, ldo, 0, NULL);  /* A V */
            kr->gemm(n, dv, d, c->qp, d, 1, s, dv, od, ldo, 1, NULL);     /* + (Q⊙P) S */
            kr->gemm(d, dv, n, c->kr, 1, d, c->v, dv, s, dv, 1, c->plast);
            krt = NULL; /* the state is updated */
        } else {
            next_rows_ask(&nr, 4);
            kr->gemm(n, n, d, c->qp, d, 1, kt, C, c->sc, C, 0, NULL);
            next_rows_ask(&nr, 3);
            lin_chunk_mask(n, c->sc, C);
            kr->gemm(n, dv, n, c->sc, C, 1, vr, ldv, od, ldo, 0, NULL); /* A V */
            next_rows_ask(&nr, 2);
            kr->gemm(n, dv, d, c->qp, d, 1, s, dv, od, ldo, 1, NULL);   /* + (Q⊙P) S */
            next_rows_ask(&nr, 1);
        }
    } else {
        next_rows_ask(&nr, 4);
        lin_chunk_gates(kr, p, sq, h, r0, n, g, c);
        kr->transpose(kk, ldk, n, d, kt, C);
        kr->gemm(n, n, d, qr, ldq, 1, kt, C, c->sc, C, 0, NULL);
        next_rows_ask(&nr, 3);
        lin_chunk_decay_tile(p, n, c, c->sc, C);
        /* v's row scales (vrow) fold into the columns of A and of (K ⊙ R)ᵀ */
        float *ps = c->ps, *cs = c->cs; /* scale P_i; the columns' scale */
        const float *vs = p->vrow ? p->vrow + (sq->tb * p->t + row) * p->h + h : NULL;
        for (int64_t j = 0; j < n; j++) cs[j] = vs ? vs[j * p->h] : 1.0f;
        for (int64_t i = 0; i < n; i++) {
            ps[i] = p->scale * c->pp[i];
            for (int64_t j = 0; j <= i; j++) c->sc[i * C + j] *= p->scale * cs[j];
        }
        kr->gemm(n, dv, d, qr, ldq, 1, s, dv, od, ldo, 0, NULL);  /* Q S */
        next_rows_ask(&nr, 2);
        kr->gemm(n, dv, n, c->sc, C, 1, vr, ldv, od, ldo, 0, ps); /* scale P ⊙ . + A V */
        next_rows_ask(&nr, 1);
        if (p->gate == ATTN_GATE_NONE && !vs) {
            krt = kt;
        } else {
            for (int64_t j = 0; j < n; j++) cs[j] *= c->rr[j];
            for (int64_t x = 0; x < d; x++)
                for (int64_t i = 0; i < n; i++) krt[x * C + i] = kt[x * C + i] * cs[i];
        }
    }
    if (p->skip) /* o += skip v, while both are in cache */
        for (int64_t i = 0; i < n; i++) kr->axpy(dv, p->skip[h], vr + i * ldv, od + i * ldo);
    /* S = diag(P_last) S + (K ⊙ R)ᵀ V */
    if (krt) kr->gemm(d, dv, n, krt, C, 1, vr, ldv, s, dv, 1, c->plast);
    int64_t ldt;
    float *dst = rows_in_place(o, sq->tb, row, h, &ldt);
    if (dst)
        kr->store_stream(bf->o, dv, n, dv, dst, ldt);
    else
        store_rows(kr, p, sq, h, r0, n, bf->o, o);
}

/* One task: heads [h0, h1) of sequence b, chunk by chunk, every head of the
 * group in turn within a chunk. */
static void run_task(const attn_kernels *kr, const lin_problem *p, int64_t b, int64_t h0,
                     int64_t h1, const attn_tensor *q, const attn_tensor *k,
                     const attn_tensor *v, const attn_tensor *g, const attn_tensor *state_in,
                     attn_tensor *o, attn_tensor *state_out, fwd_bufs *bf) {
    const int64_t C = p->chunk, d = p->d, dv = p->dv;
    const lin_seq sq = lin_problem_seq(p, b);
    lin_chunk *c = &bf->c;
    for (int64_t h = h0; h < h1; h++)
        lin_state_load(kr, state_in, b, h, d, dv, bf->s + (h - h0) * d * dv);
    if (p->causal) {
        for (int64_t r0 = 0; r0 < sq.n; r0 += C) {
            const int64_t n = r0 + C <= sq.n ? C : sq.n - r0;
            for (int64_t h = h0; h < h1; h++)
                causal_chunk(kr, p, &sq, h, r0, n, q, k, v, g, o, bf->s + (h - h0) * d * dv,
                             bf);
        }
    } else {
        /* every query reads the last state: first the state, then the outputs */
        for (int64_t r0 = 0; r0 < sq.n; r0 += C) {
            const int64_t n = r0 + C <= sq.n ? C : sq.n - r0;
            for (int64_t h = h0; h < h1; h++) {
                lin_chunk_load(kr, p, &sq, h, r0, n, q, k, v, g, c);
                kr->gemm(d, dv, n, c->k, 1, d, c->v, dv, bf->s + (h - h0) * d * dv, dv, 1, NULL);
            }
        }
        for (int64_t r0 = 0; r0 < sq.n; r0 += C) {
            const int64_t n = r0 + C <= sq.n ? C : sq.n - r0;
            const int64_t row = sq.t0 + r0;
            for (int64_t h = h0; h < h1; h++) {
                rows_load_block(kr, q, attn_off4(q, sq.tb, row, h, 0), q->stride[1], n, d, c->q,
                                d);
                for (int64_t x = 0; x < n * d; x++) c->q[x] *= p->scale;
                kr->gemm(n, dv, d, c->q, d, 1, bf->s + (h - h0) * d * dv, dv, bf->o, dv, 0, NULL);
                store_rows(kr, p, &sq, h, r0, n, bf->o, o);
            }
        }
    }
    if (state_out)
        for (int64_t h = h0; h < h1; h++)
            lin_state_store(kr, state_out, b, h, d, dv, bf->s + (h - h0) * d * dv);
}

attn_status linear_engine_forward(const attn_ctx *ctx, const lin_problem *p,
                                  const attn_tensor *q, const attn_tensor *k,
                                  const attn_tensor *v, const attn_tensor *g,
                                  const attn_tensor *state_in, attn_tensor *o,
                                  attn_tensor *state_out) {
    const int threads = ctx->threads;
    const int64_t group = lin_head_group(p, threads);
    const int64_t groups = (p->h + group - 1) / group;
    size_t stride;
    scratch count = {NULL, 0};
    fwd_carve(&count, p, group);
    float *scr = scratch_alloc(threads, count.used, &stride);
    if (!scr) return attn_err(ATTN_ERR_NOMEM, "out of memory for linear attention scratch");
    const int64_t n_tasks = p->batch * groups;
#pragma omp parallel num_threads(threads)
    {
        scratch mine = {scr + stride * (size_t)engine_thread_id(), 0};
        fwd_bufs bf = fwd_carve(&mine, p, group);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_tasks; t++) {
            const int64_t h0 = (t % groups) * group;
            const int64_t h1 = h0 + group < p->h ? h0 + group : p->h;
            run_task(ctx->kernels, p, t / groups, h0, h1, q, k, v, g, state_in, o, state_out,
                     &bf);
        }
    }
    free(scr);
    return ATTN_OK;
}
