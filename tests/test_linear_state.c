/* The state algebra: attn_linear_span_map against the reference, and the
 * composition of span maps (an exclusive scan over slices of a sequence, as
 * ZeCO's All-Scan does across ranks) against one forward over the whole
 * sequence. Tolerances: rel RMS 2e-5, max abs 2e-4 * (max|ref| + 1) (f32). */
#include "test_linear_util.h"

static attn_ctx *g_ref, *g_cpu;

#define SALT 0x5CA1u

static attn_tensor slice(const attn_tensor *t, int64_t t0, int64_t n) {
    attn_tensor v = *t;
    v.data = (char *)t->data + (size_t)(t0 * t->stride[1]) * attn_dtype_size(t->dtype);
    v.shape[1] = n;
    return v;
}

static void test_gate(attn_gate gate) {
    tu_case("span maps gate=%d", (int)gate);
    tu_rng r = {tu_seed(SALT, (uint64_t)gate)};
    const int64_t B = 2, T = 211, H = 4, Hk = 2, D = 12, Dv = 10;
    const int64_t cuts[4] = {0, 50, 51, T}; /* spans of 50, 1 and 160 tokens */
    lin_inputs in = lin_make(&r, ATTN_F32, gate, B, T, H, Hk, D, Dv, -0.2, 0, 1);
    attn_linear_params p = attn_linear_params_default();
    p.gate = gate;
    lin_out whole = lin_forward(g_cpu, &p, &in, ATTN_F32, ATTN_F32);
    CHECK_OK(whole.st);

    tu_buf dec[3], u[3], state = tu_alloc(ATTN_F32, B, H, D, Dv), o = tu_alloc(ATTN_F32, B, T, H, Dv);
    tu_buf tot_d = tu_alloc(ATTN_F32, B, H, D, -1), tot_u = tu_alloc(ATTN_F32, B, H, D, Dv);
    tu_buf tmp_d = tu_alloc(ATTN_F32, B, H, D, -1), tmp_u = tu_alloc(ATTN_F32, B, H, D, Dv);
    tu_copy(&state.t, &in.s0.t);
    for (int s = 0; s < 3; s++) {
        int64_t t0 = cuts[s], n = cuts[s + 1] - cuts[s];
        attn_tensor k = slice(&in.k.t, t0, n), v = slice(&in.v.t, t0, n), q = slice(&in.q.t, t0, n),
                    ov = slice(&o.t, t0, n);
        attn_tensor g = gate == ATTN_GATE_NONE || gate == ATTN_GATE_HEAD ? in.g.t : slice(&in.g.t, t0, n);
        const attn_tensor *gp = in.g.mem ? &g : NULL;
        dec[s] = tu_alloc(ATTN_F32, B, H, D, -1);
        u[s] = tu_alloc(ATTN_F32, B, H, D, Dv);
        CHECK_OK(attn_linear_span_map(g_cpu, &p, &k, &v, gp, &dec[s].t, &u[s].t));
        /* against the reference */
        tu_buf rd = tu_alloc(ATTN_F64, B, H, D, -1), ru = tu_alloc(ATTN_F64, B, H, D, Dv);
        CHECK_OK(attn_linear_span_map(g_ref, &p, &k, &v, gp, &rd.t, &ru.t));
        CHECK_CLOSE("span decay", &dec[s].t, &rd.t, 2e-5, 2e-4);
        CHECK_CLOSE("span u", &u[s].t, &ru.t, 2e-5, 2e-4);
        tu_free(&rd), tu_free(&ru);
        /* the outputs of this span from the state the scan gives it */
        CHECK_OK(attn_linear_forward(g_cpu, &p, &q, &k, &v, gp, &state.t, &ov, NULL));
        CHECK_OK(attn_linear_state_compose(g_cpu, NULL, &state.t, &dec[s].t, &u[s].t, NULL, &tmp_u.t));
        tu_copy(&state.t, &tmp_u.t);
        /* the total map, composed left to right */
        if (s == 0) {
            tu_copy(&tot_d.t, &dec[0].t);
            tu_copy(&tot_u.t, &u[0].t);
        } else {
            CHECK_OK(attn_linear_state_compose(g_cpu, &tot_d.t, &tot_u.t, &dec[s].t, &u[s].t,
                                               &tmp_d.t, &tmp_u.t));
            tu_copy(&tot_d.t, &tmp_d.t);
            tu_copy(&tot_u.t, &tmp_u.t);
        }
    }
    CHECK_CLOSE("scanned outputs", &o.t, &whole.o.t, 2e-5, 2e-4);
    CHECK_CLOSE("scanned state", &state.t, &whole.s.t, 2e-5, 2e-4);
    /* the total map applied to state_in */
    CHECK_OK(attn_linear_state_compose(g_cpu, NULL, &in.s0.t, &tot_d.t, &tot_u.t, NULL, &tmp_u.t));
    CHECK_CLOSE("total map", &tmp_u.t, &whole.s.t, 2e-5, 2e-4);
    /* compose on the reference */
    tu_buf rd = tu_alloc(ATTN_F64, B, H, D, -1), ru = tu_alloc(ATTN_F64, B, H, D, Dv);
    CHECK_OK(attn_linear_state_compose(g_ref, &dec[0].t, &u[0].t, &dec[2].t, &u[2].t, &rd.t, &ru.t));
    CHECK_OK(attn_linear_state_compose(g_cpu, &dec[0].t, &u[0].t, &dec[2].t, &u[2].t, &tmp_d.t, &tmp_u.t));
    CHECK_CLOSE("compose decay", &tmp_d.t, &rd.t, 1e-7, 1e-7);
    CHECK_CLOSE("compose u", &tmp_u.t, &ru.t, 1e-7, 1e-7);
    attn_status st = attn_linear_state_compose(g_cpu, NULL, &u[0].t, &dec[1].t, &u[1].t, &tmp_d.t, &tmp_u.t);
    CHECK(st == ATTN_ERR_ARG, "decay_out with decay1 NULL: %s", attn_last_error());
    tu_free(&rd), tu_free(&ru);
    for (int s = 0; s < 3; s++) tu_free(&dec[s]), tu_free(&u[s]);
    tu_free(&state), tu_free(&o), tu_free(&tot_d), tu_free(&tot_u), tu_free(&tmp_d), tu_free(&tmp_u);
    lin_out_free(&whole);
    lin_free(&in);
}

int main(void) {
    g_ref = tu_ctx("test_linear_state", ATTN_BACKEND_REF, 1);
    g_cpu = tu_ctx("test_linear_state", ATTN_BACKEND_CPU, 2);
    test_gate(ATTN_GATE_NONE);
    test_gate(ATTN_GATE_HEAD);
    test_gate(ATTN_GATE_HEAD_TOKEN);
    test_gate(ATTN_GATE_KEY);
    attn_ctx_free(g_ref);
    attn_ctx_free(g_cpu);
    return tu_finish("test_linear_state");
}
