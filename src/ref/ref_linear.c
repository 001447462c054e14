/* Reference of the chunked-recurrence engine in double precision: the
 * recurrence token by token,
 *   S_t = G_t ⊙ S_{t-1} + k_tᵀ v_t,   o_t = scale · q_t S_t,
 * and its backward through time (every state kept). Slow and plain: the
 * oracle of the tests. Outputs are written only once everything succeeded. */
#include <stdlib.h>
#include <string.h>

#include "linear/linear.h"

/* calloc of n1*n2*n3*n4 doubles, NULL on overflow or out of memory. */
static double *zeros(int64_t n1, int64_t n2, int64_t n3, int64_t n4) {
    int64_t n = 1;
    const int64_t dims[4] = {n1, n2, n3, n4};
    for (int i = 0; i < 4; i++)
        if (__builtin_mul_overflow(n, dims[i] > 0 ? dims[i] : 1, &n)) return NULL;
    if ((uint64_t)n > SIZE_MAX / sizeof(double)) return NULL;
    return calloc((size_t)n, sizeof(double));
}

/* buf laid out densely over t's logical shape [d0, d1, d2, d3] -> t. */
static void write4(attn_tensor *t, const double *buf) {
    const int64_t *s = t->shape;
    for (int64_t a = 0; a < s[0]; a++)
        for (int64_t b = 0; b < s[1]; b++)
            for (int64_t c = 0; c < s[2]; c++)
                for (int64_t x = 0; x < s[3]; x++)
                    attn_store_f64(t, attn_off4(t, a, b, c, x),
                                   buf[((a * s[1] + b) * s[2] + c) * s[3] + x]);
}

/* The gate tensor's dense twin (HEAD [H], HEAD_TOKEN [B, T, H], KEY [B, T, H, D]). */
static void write_gate(const lin_problem *p, attn_tensor *g, const double *buf) {
    if (p->gate == ATTN_GATE_KEY) {
        write4(g, buf);
    } else if (p->gate == ATTN_GATE_HEAD) {
        for (int64_t h = 0; h < p->h; h++) attn_store_f64(g, h * g->stride[0], buf[h]);
    } else {
        for (int64_t a = 0; a < g->shape[0]; a++)
            for (int64_t t = 0; t < g->shape[1]; t++)
                for (int64_t h = 0; h < p->h; h++)
                    attn_store_f64(g, attn_off3(g, a, t, h), buf[(a * g->shape[1] + t) * p->h + h]);
    }
}

static void load_state(const lin_problem *p, const attn_tensor *s, int64_t b, int64_t h,
                       double *S) {
    for (int64_t x = 0; x < p->d; x++)
        for (int64_t e = 0; e < p->dv; e++)
            S[x * p->dv + e] = s ? attn_load_f64(s, attn_off4(s, b, h, x, e)) : 0.0;
}

/* S = G_t ⊙ S + k_tᵀ v_t for row r (tensor index tb) of query head h. */
static void step(const lin_problem *p, const attn_tensor *k, const attn_tensor *v,
                 const attn_tensor *g, int64_t tb, int64_t r, int64_t h, double *S) {
    const int64_t hk = h / (p->h / p->hk);
    for (int64_t x = 0; x < p->d; x++) {
        double a = exp(lin_gate_at(p, g, tb, r, h, x));
        double kx = attn_load_f64(k, attn_off4(k, tb, r, hk, x));
        for (int64_t e = 0; e < p->dv; e++)
            S[x * p->dv + e] = a * S[x * p->dv + e] + kx * attn_load_f64(v, attn_off4(v, tb, r, hk, e));
    }
}

/* out[e] = scale * sum_x q_t[x] S[x][e]. */
static void readout(const lin_problem *p, const attn_tensor *q, int64_t tb, int64_t r,
                    int64_t h, const double *S, double *out) {
    for (int64_t e = 0; e < p->dv; e++) out[e] = 0.0;
    for (int64_t x = 0; x < p->d; x++) {
        double qx = p->scale * attn_load_f64(q, attn_off4(q, tb, r, h, x));
        for (int64_t e = 0; e < p->dv; e++) out[e] += qx * S[x * p->dv + e];
    }
}

/* dS += (scale q_t)ᵀ do_t. */
static void add_qdo(const lin_problem *p, const attn_tensor *q, const attn_tensor *dout,
                    int64_t tb, int64_t r, int64_t h, double *dS) {
    for (int64_t x = 0; x < p->d; x++) {
        double qx = p->scale * attn_load_f64(q, attn_off4(q, tb, r, h, x));
        for (int64_t e = 0; e < p->dv; e++)
            dS[x * p->dv + e] += qx * attn_load_f64(dout, attn_off4(dout, tb, r, h, e));
    }
}

attn_status ref_linear_forward(const lin_problem *p, const attn_tensor *q,
                               const attn_tensor *k, const attn_tensor *v,
                               const attn_tensor *g, const attn_tensor *state_in,
                               attn_tensor *o, attn_tensor *state_out) {
    const int64_t T = o->shape[1];
    double *ob = zeros(o->shape[0], T, p->h, p->dv);
    double *sb = zeros(p->batch, p->h, p->d, p->dv);
    if (!ob || !sb) {
        free(ob);
        free(sb);
        return attn_err(ATTN_ERR_NOMEM, "linear attention (reference): out of memory");
    }
    const int64_t ss = p->d * p->dv;
    for (int64_t b = 0; b < p->batch; b++) {
        lin_seq sq = lin_problem_seq(p, b);
        for (int64_t h = 0; h < p->h; h++) {
            double *S = sb + (b * p->h + h) * ss;
            load_state(p, state_in, b, h, S);
            for (int64_t t = 0; t < sq.n; t++) {
                step(p, k, v, g, sq.tb, sq.t0 + t, h, S);
                if (p->causal)
                    readout(p, q, sq.tb, sq.t0 + t, h, S,
                            ob + ((sq.tb * T + sq.t0 + t) * p->h + h) * p->dv);
            }
            if (!p->causal)
                for (int64_t t = 0; t < sq.n; t++)
                    readout(p, q, sq.tb, sq.t0 + t, h, S,
                            ob + ((sq.tb * T + sq.t0 + t) * p->h + h) * p->dv);
        }
    }
    write4(o, ob);
    if (state_out) write4(state_out, sb);
    free(ob);
    free(sb);
    return ATTN_OK;
}

attn_status ref_linear_backward(const lin_problem *p, const attn_tensor *q,
                                const attn_tensor *k, const attn_tensor *v,
                                const attn_tensor *g, const attn_tensor *state_in,
                                const attn_tensor *dout, const attn_tensor *dstate_out,
                                attn_tensor *dq, attn_tensor *dk, attn_tensor *dv,
                                attn_tensor *dg, attn_tensor *dstate_in) {
    const int64_t T = q->shape[1], NB = q->shape[0], D = p->d, Dv = p->dv, ss = D * Dv;
    int64_t maxn = 0;
    for (int64_t b = 0; b < p->batch; b++)
        if (lin_problem_seq(p, b).n > maxn) maxn = lin_problem_seq(p, b).n;
    double *dqb = zeros(NB, T, p->h, D), *dkb = zeros(NB, T, p->hk, D);
    double *dvb = zeros(NB, T, p->hk, Dv), *dsb = zeros(p->batch, p->h, D, Dv);
    double *dgb = p->gate == ATTN_GATE_KEY ? zeros(NB, T, p->h, D)
                  : p->gate == ATTN_GATE_HEAD ? zeros(p->h, 1, 1, 1)
                                              : zeros(NB, T, p->h, 1);
    double *states = zeros(maxn + 1, D, Dv, 1), *dS = zeros(D, Dv, 1, 1);
    double *dov = zeros(Dv, 1, 1, 1);
    if (!dqb || !dkb || !dvb || !dsb || !dgb || !states || !dS || !dov) {
        free(dqb), free(dkb), free(dvb), free(dsb), free(dgb), free(states), free(dS);
        free(dov);
        return attn_err(ATTN_ERR_NOMEM, "linear attention backward (reference): out of memory");
    }
    for (int64_t b = 0; b < p->batch; b++) {
        lin_seq sq = lin_problem_seq(p, b);
        for (int64_t h = 0; h < p->h; h++) {
            const int64_t hk = h / (p->h / p->hk);
            /* states[t + 1] = S_t; states[0] = S_{-1} */
            load_state(p, state_in, b, h, states);
            for (int64_t t = 0; t < sq.n; t++) {
                memcpy(states + (t + 1) * ss, states + t * ss, (size_t)ss * sizeof(double));
                step(p, k, v, g, sq.tb, sq.t0 + t, h, states + (t + 1) * ss);
            }
            /* dq_t = scale * S do_t, S = S_t (causal) or S_last */
            const double *Slast = states + sq.n * ss;
            for (int64_t t = 0; t < sq.n; t++) {
                const int64_t r = sq.t0 + t;
                const double *St = p->causal ? states + (t + 1) * ss : Slast;
                for (int64_t e = 0; e < Dv; e++)
                    dov[e] = attn_load_f64(dout, attn_off4(dout, sq.tb, r, h, e));
                double *dqr = dqb + ((sq.tb * T + r) * p->h + h) * D;
                for (int64_t x = 0; x < D; x++) {
                    double acc = 0.0;
                    for (int64_t e = 0; e < Dv; e++) acc += St[x * Dv + e] * dov[e];
                    dqr[x] = p->scale * acc;
                }
            }
            load_state(p, dstate_out, b, h, dS);
            if (!p->causal) /* every o_t reads S_last */
                for (int64_t t = 0; t < sq.n; t++) add_qdo(p, q, dout, sq.tb, sq.t0 + t, h, dS);
            for (int64_t t = sq.n - 1; t >= 0; t--) {
                const int64_t r = sq.t0 + t;
                if (p->causal) add_qdo(p, q, dout, sq.tb, r, h, dS); /* o_t = q_t S_t */
                const double *Sprev = states + t * ss;
                double *dkr = dkb + ((sq.tb * T + r) * p->hk + hk) * D;
                double *dvr = dvb + ((sq.tb * T + r) * p->hk + hk) * Dv;
                double dgsum = 0.0;
                for (int64_t x = 0; x < D; x++) {
                    double kx = attn_load_f64(k, attn_off4(k, sq.tb, r, hk, x)), acc = 0.0,
                           da = 0.0;
                    for (int64_t e = 0; e < Dv; e++) {
                        double ve = attn_load_f64(v, attn_off4(v, sq.tb, r, hk, e));
                        acc += dS[x * Dv + e] * ve;
                        dvr[e] += kx * dS[x * Dv + e];
                        da += dS[x * Dv + e] * Sprev[x * Dv + e];
                    }
                    dkr[x] += acc;
                    double a = exp(lin_gate_at(p, g, sq.tb, r, h, x));
                    if (p->gate == ATTN_GATE_KEY) dgb[((sq.tb * T + r) * p->h + h) * D + x] = a * da;
                    else dgsum += a * da;
                    for (int64_t e = 0; e < Dv; e++) dS[x * Dv + e] *= a;
                }
                if (p->gate == ATTN_GATE_HEAD) dgb[h] += dgsum;
                else if (p->gate == ATTN_GATE_HEAD_TOKEN) dgb[(sq.tb * T + r) * p->h + h] = dgsum;
            }
            memcpy(dsb + (b * p->h + h) * ss, dS, (size_t)ss * sizeof(double));
        }
    }
    write4(dq, dqb);
    write4(dk, dkb);
    write4(dv, dvb);
    if (dg) write_gate(p, dg, dgb);
    if (dstate_in) write4(dstate_in, dsb);
    free(dqb), free(dkb), free(dvb), free(dsb), free(dgb), free(states), free(dS);
    free(dov);
    return ATTN_OK;
}

attn_status ref_linear_span_map(const lin_problem *p, const attn_tensor *k,
                                const attn_tensor *v, const attn_tensor *g, attn_tensor *decay,
                                attn_tensor *u) {
    const int64_t ss = p->d * p->dv;
    double *ub = zeros(p->batch, p->h, p->d, p->dv), *db = zeros(p->batch, p->h, p->d, 1);
    if (!ub || !db) {
        free(ub);
        free(db);
        return attn_err(ATTN_ERR_NOMEM, "linear span map (reference): out of memory");
    }
    for (int64_t b = 0; b < p->batch; b++) {
        lin_seq sq = lin_problem_seq(p, b);
        for (int64_t h = 0; h < p->h; h++) {
            double *dl = db + (b * p->h + h) * p->d; /* sum of log gates, then its exp */
            for (int64_t t = 0; t < sq.n; t++) {
                step(p, k, v, g, sq.tb, sq.t0 + t, h, ub + (b * p->h + h) * ss);
                for (int64_t x = 0; x < p->d; x++) dl[x] += lin_gate_at(p, g, sq.tb, sq.t0 + t, h, x);
            }
            for (int64_t x = 0; x < p->d; x++) dl[x] = exp(dl[x]);
        }
    }
    for (int64_t b = 0; b < p->batch; b++)
        for (int64_t h = 0; h < p->h; h++)
            for (int64_t x = 0; x < p->d; x++)
                attn_store_f64(decay, attn_off3(decay, b, h, x), db[(b * p->h + h) * p->d + x]);
    write4(u, ub);
    free(ub);
    free(db);
    return ATTN_OK;
}

attn_status ref_linear_state_compose(const attn_tensor *decay1, const attn_tensor *u1,
                                     const attn_tensor *decay2, const attn_tensor *u2,
                                     attn_tensor *decay_out, attn_tensor *u_out) {
    const int64_t *s = u1->shape;
    double *ub = zeros(s[0], s[1], s[2], s[3]), *db = zeros(s[0], s[1], s[2], 1);
    if (!ub || !db) {
        free(ub);
        free(db);
        return attn_err(ATTN_ERR_NOMEM, "linear state compose (reference): out of memory");
    }
    for (int64_t b = 0; b < s[0]; b++)
        for (int64_t h = 0; h < s[1]; h++)
            for (int64_t x = 0; x < s[2]; x++) {
                double d2 = attn_load_f64(decay2, attn_off3(decay2, b, h, x));
                int64_t row = (b * s[1] + h) * s[2] + x;
                db[row] = d2 * (decay1 ? attn_load_f64(decay1, attn_off3(decay1, b, h, x)) : 1.0);
                for (int64_t e = 0; e < s[3]; e++)
                    ub[row * s[3] + e] = d2 * attn_load_f64(u1, attn_off4(u1, b, h, x, e)) +
                                         attn_load_f64(u2, attn_off4(u2, b, h, x, e));
            }
    if (decay_out)
        for (int64_t b = 0; b < s[0]; b++)
            for (int64_t h = 0; h < s[1]; h++)
                for (int64_t x = 0; x < s[2]; x++)
                    attn_store_f64(decay_out, attn_off3(decay_out, b, h, x),
                                   db[(b * s[1] + h) * s[2] + x]);
    write4(u_out, ub);
    free(ub);
    free(db);
    return ATTN_OK;
}
