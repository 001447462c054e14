/* One chunk of the chunked-recurrence engine (see chunk.h). */
#include "chunk.h"

#include <float.h>
#include <math.h>
#include <string.h>

lin_chunk lin_chunk_carve(scratch *s, const lin_problem *p) {
    lin_chunk c;
    const int64_t C = p->chunk, d = p->d, dv = p->dv;
    const int64_t dg = p->gate == ATTN_GATE_KEY ? d : 1;
    c.c = C;
    c.d = d;
    c.dv = dv;
    c.dg = dg;
    c.q = scratch_take(s, (size_t)(C * d));
    c.k = scratch_take(s, (size_t)(C * d));
    c.kt = scratch_take(s, (size_t)(d * C));
    c.ib = scratch_take(s, (size_t)(dg > 1 ? C * d : 1));
    c.ki = scratch_take(s, (size_t)(dg > 1 ? C * d : 1));
    c.keyfast = 0;
    c.v = scratch_take(s, (size_t)(C * dv));
    c.a = scratch_take(s, (size_t)(C * dg));
    c.b = (double *)scratch_take(s, (size_t)(2 * C * dg)); /* parts are 64-byte aligned */
    c.pp = scratch_take(s, (size_t)(C * dg));
    c.rr = scratch_take(s, (size_t)(C * dg));
    c.plast = scratch_take(s, (size_t)d);
    c.wt = scratch_take(s, (size_t)(C * C));
    c.zero = scratch_take(s, (size_t)C);
    c.sc = scratch_take(s, (size_t)(C * C));
    c.qp = scratch_take(s, (size_t)(C * d));
    c.kr = scratch_take(s, (size_t)(C * d));
    c.w = scratch_take(s, (size_t)d);
    c.ps = scratch_take(s, (size_t)C);
    c.cs = scratch_take(s, (size_t)C);
    return c;
}

/* Products that decay below the smallest normal float are flushed to 0: no
 * denormal arithmetic, and the value they stand for is 0 in f32 anyway. */
static inline float flush(float x) { return fabsf(x) < FLT_MIN ? 0.0f : x; }

#define LOG2E 1.4426950408889634f

/* Chunks ahead to ask for (lin_chunk_load's callers: the backward, the span
 * maps and the forward's slow key-gate path; the forward's fast chunks ask
 * for their next rows a share at a time, forward.c): 1, 2 and 4 measured the
 * same (GLA and linear, N 16384, H 8, D 128, 2 threads), so the nearest. */
#define PREFETCH_CHUNKS 1
void lin_chunk_prefetch(const lin_problem *p, const lin_seq *sq, int64_t h, int64_t r0,
                        int64_t n, const attn_tensor *q, const attn_tensor *k,
                        const attn_tensor *v, const attn_tensor *g) {
    const int64_t ahead = PREFETCH_CHUNKS * n, r1 = r0 + ahead; /* first row asked for */
    if (r1 >= sq->n) return;
    const int64_t hk = h / (p->h / p->hk), row = sq->t0 + r1;
    const int64_t n2 = r1 + n <= sq->n ? n : sq->n - r1;
    if (q) rows_prefetch(q, sq->tb, row, n2, h, 0);
    rows_prefetch(k, sq->tb, row, n2, hk, 0);
    rows_prefetch(v, sq->tb, row, n2, hk, 0);
    if (p->gate == ATTN_GATE_KEY) rows_prefetch(g, sq->tb, row, n2, h, 0);
}

void lin_chunk_load(const attn_kernels *kr, const lin_problem *p, const lin_seq *sq,
                    int64_t h, int64_t r0, int64_t n, const attn_tensor *q,
                    const attn_tensor *k, const attn_tensor *v, const attn_tensor *g,
                    lin_chunk *c) {
    const int64_t d = p->d, dv = p->dv, dg = c->dg, C = c->c;
    const int64_t hk = h / (p->h / p->hk), row = sq->t0 + r0;
    if (q) rows_load_block(kr, q, attn_off4(q, sq->tb, row, h, 0), q->stride[1], n, d, c->q, d);
    rows_load_block(kr, k, attn_off4(k, sq->tb, row, hk, 0), k->stride[1], n, d, c->k, d);
    rows_load_block(kr, v, attn_off4(v, sq->tb, row, hk, 0), v->stride[1], n, dv, c->v, dv);
    lin_chunk_prefetch(p, sq, h, r0, n, q, k, v, g);
    if (q)
        for (int64_t x = 0; x < n * d; x++) c->q[x] *= p->scale;
    if (dg == 1)
        for (int64_t i = 0; i < n; i++)
            for (int64_t x = 0; x < d; x++) c->kt[x * C + i] = c->k[i * d + x];
    lin_chunk_gates(kr, p, sq, h, r0, n, g, c);
    if (c->keyfast) { /* K ⊙ e^{-b} and its transpose */
        for (int64_t x = 0; x < n * d; x++) c->ki[x] = c->k[x] * c->ib[x];
        for (int64_t i = 0; i < n; i++)
            for (int64_t x = 0; x < d; x++) c->kt[x * C + i] = c->ki[i * d + x];
    }

    /* Q ⊙ P and K ⊙ R, the gate broadcast over d when scalar */
    const int64_t gs = dg == 1 ? 0 : 1; /* gate stride along x */
    for (int64_t i = 0; i < n; i++) {
        const float *restrict pi = c->pp + i * dg, *restrict ri = c->rr + i * dg;
        const float *restrict qi = c->q + i * d, *restrict ki = c->k + i * d;
        float *restrict qpi = c->qp + i * d, *restrict kri = c->kr + i * d;
        if (q)
            for (int64_t x = 0; x < d; x++) qpi[x] = qi[x] * pi[x * gs];
        for (int64_t x = 0; x < d; x++) kri[x] = ki[x] * ri[x * gs];
    }
}

void lin_chunk_gates(const attn_kernels *kr, const lin_problem *p, const lin_seq *sq,
                     int64_t h, int64_t r0, int64_t n, const attn_tensor *g, lin_chunk *c) {
    const int64_t d = p->d, dg = c->dg, C = c->c, row = sq->t0 + r0;
    /* log gates into b (double), clamped at GATE_FLOOR */
    double *b = c->b;
    switch (p->gate) {
    case ATTN_GATE_NONE:
        for (int64_t i = 0; i < n; i++) b[i] = 0.0;
        break;
    case ATTN_GATE_HEAD: {
        double gh = attn_load_f64(g, h * g->stride[0]);
        for (int64_t i = 0; i < n; i++) b[i] = gh;
        break;
    }
    case ATTN_GATE_HEAD_TOKEN:
        for (int64_t i = 0; i < n; i++) b[i] = attn_load_f64(g, attn_off3(g, sq->tb, row + i, h));
        break;
    case ATTN_GATE_KEY:
        rows_load_block(kr, g, attn_off4(g, sq->tb, row, h, 0), g->stride[1], n, d, c->a, d);
        for (int64_t x = 0; x < n * d; x++) { /* a max in f32, so that it vectorises */
            const float ax = c->a[x];
            c->a[x] = (float)GATE_FLOOR > ax ? (float)GATE_FLOOR : ax; /* NaN stays */
            b[x] = c->a[x];
        }
        break;
    }
    for (int64_t i = 0; i < n; i++) c->zero[i] = 0.0f;
    if (dg == 1)
        for (int64_t i = 0; i < n; i++) {
            if (!(b[i] >= GATE_FLOOR)) b[i] = b[i] != b[i] ? b[i] : GATE_FLOOR; /* NaN stays */
            c->a[i] = (float)b[i];
        }
    for (int64_t i = 1; i < n; i++) /* cumulate */
        for (int64_t x = 0; x < dg; x++) b[i * dg + x] += b[(i - 1) * dg + x];
    const double *blast = b + (n - 1) * dg;
    for (int64_t i = 0; i < n; i++) {
        const double *restrict bi = b + i * dg;
        float *restrict pi = c->pp + i * dg, *restrict ri = c->rr + i * dg;
        for (int64_t x = 0; x < dg; x++) {
            pi[x] = (float)bi[x];
            ri[x] = (float)(blast[x] - bi[x]);
        }
    }
    int keyfast = 0;
    if (dg > 1) {
        /* on the f32 copy of b (still logs), with an OR of 32-bit flags and
         * no early exit, so that it vectorises; a NaN fails neither test,
         * and the products carry it either way */
        int32_t out = 0;
        for (int64_t x = 0; x < n * dg; x++) out |= fabsf(c->pp[x]) >= (float)KEYFAST_RANGE;
        keyfast = !out;
    }
    /* contiguous tiles go to exp2_rows as one row: no per-row tails */
    kr->exp2_rows(c->pp, 1, n * dg, n * dg, LOG2E, c->zero);
    kr->exp2_rows(c->rr, 1, n * dg, n * dg, LOG2E, c->zero);
    if (dg == 1 && p->gate != ATTN_GATE_NONE) { /* W_ij = e^{b_i - b_j}, 0 above the diagonal */
        for (int64_t i = 0; i < n; i++) {
            float *wi = c->wt + i * C;
            for (int64_t j = 0; j <= i; j++) wi[j] = (float)(b[i] - b[j]);
            for (int64_t j = i + 1; j < n; j++) wi[j] = -INFINITY;
        }
        if (n == C) kr->exp2_rows(c->wt, 1, n * C, n * C, LOG2E, c->zero);
        else kr->exp2_rows(c->wt, n, n, C, LOG2E, c->zero);
    }
    for (int64_t x = 0; x < d; x++) c->plast[x] = c->pp[(n - 1) * dg + (dg == 1 ? 0 : x)];
    c->keyfast = 0;
    if (dg > 1) {
        c->keyfast = keyfast;
        if (!c->keyfast) kr->exp2_rows(c->a, 1, n * dg, n * dg, LOG2E, c->zero); /* a = e^g */
    }
    if (c->keyfast) { /* e^{-b_i} = R_i e^{-b_last} */
        float *elast = c->w;
        for (int64_t x = 0; x < d; x++) elast[x] = (float)-blast[x];
        kr->exp2_rows(elast, 1, d, d, LOG2E, c->zero);
        for (int64_t i = 0; i < n; i++) {
            const float *restrict ri = c->rr + i * d;
            float *restrict ibi = c->ib + i * d;
            for (int64_t x = 0; x < d; x++) ibi[x] = ri[x] * elast[x];
        }
    }
}

void lin_chunk_mask(int64_t n, float *m, int64_t ldm) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = i + 1; j < n; j++) m[i * ldm + j] = 0.0f;
}

void lin_chunk_decay_tile(const lin_problem *p, int64_t n, const lin_chunk *c, float *m,
                          int64_t ldm) {
    lin_chunk_mask(n, m, ldm);
    if (p->gate == ATTN_GATE_NONE) return;
    for (int64_t i = 0; i < n; i++) {
        float *mi = m + i * ldm;
        const float *wi = c->wt + i * c->c;
        for (int64_t j = 0; j < i; j++) mi[j] *= wi[j];
    }
}

void lin_chunk_scores(const attn_kernels *kr, const lin_problem *p, int64_t n, lin_chunk *c) {
    const int64_t d = p->d, C = c->c;
    if (c->keyfast) { /* A = (Q ⊙ e^{b}) (K ⊙ e^{-b})ᵀ, masked */
        kr->gemm(n, n, d, c->qp, d, 1, c->kt, C, c->sc, C, 0, NULL);
        lin_chunk_mask(n, c->sc, C);
        return;
    }
    if (c->dg == 1) { /* A = (Q Kᵀ) ⊙ W */
        kr->gemm(n, n, d, c->q, d, 1, c->kt, C, c->sc, C, 0, NULL);
        lin_chunk_decay_tile(p, n, c, c->sc, C);
        return;
    }
    /* per key dim: for each j, w = k_j ⊙ W_ij walks i up from j */
    float *w = c->w;
    for (int64_t j = 0; j < n; j++) {
        memcpy(w, c->k + j * d, (size_t)d * sizeof(float));
        for (int64_t i = 0; i < j; i++) c->sc[i * C + j] = 0.0f;
        for (int64_t i = j; i < n; i++) {
            const float *qi = c->q + i * d, *ai = c->a + i * d;
            if (i > j)
                for (int64_t x = 0; x < d; x++) w[x] = flush(w[x] * ai[x]);
            float acc = 0.0f;
            for (int64_t x = 0; x < d; x++) acc += qi[x] * w[x];
            c->sc[i * C + j] = acc;
        }
    }
}

void lin_chunk_key_score_grads(const lin_problem *p, int64_t n, lin_chunk *c,
                               const float *dA, int64_t ldm, float *dq, float *dk) {
    const int64_t d = p->d;
    float *w = c->w;
    /* dq_i += sum_{j<=i} dA_ij (k_j ⊙ W_ij): w walks i up from j */
    for (int64_t j = 0; j < n; j++) {
        memcpy(w, c->k + j * d, (size_t)d * sizeof(float));
        for (int64_t i = j; i < n; i++) {
            const float *ai = c->a + i * d;
            if (i > j)
                for (int64_t x = 0; x < d; x++) w[x] = flush(w[x] * ai[x]);
            const float s = dA[i * ldm + j];
            float *dqi = dq + i * d;
            for (int64_t x = 0; x < d; x++) dqi[x] += s * w[x];
        }
    }
    /* dk_j += sum_{i>=j} dA_ij (q_i ⊙ W_ij): w walks j down from i */
    for (int64_t i = 0; i < n; i++) {
        memcpy(w, c->q + i * d, (size_t)d * sizeof(float));
        for (int64_t j = i; j >= 0; j--) {
            if (j < i) {
                const float *aj = c->a + (j + 1) * d;
                for (int64_t x = 0; x < d; x++) w[x] = flush(w[x] * aj[x]);
            }
            const float s = dA[i * ldm + j];
            float *dkj = dk + j * d;
            for (int64_t x = 0; x < d; x++) dkj[x] += s * w[x];
        }
    }
}
