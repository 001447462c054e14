/* CATANet's aggregation: tokens join their nearest centre; o_intra equals
 * attention within each group and o_inter attention to the group means with
 * + ln(group size), both computed naively in double here (tolerance 1e-5 rel
 * RMS, 1e-4 max); the CPU matches the reference composition. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn.h"
#include "test_util.h"

#define SALT 0xca7au

int main(void) {
    attn_ctx *cpu = tu_ctx("test_catanet", ATTN_BACKEND_CPU, 2);
    attn_ctx *ref = tu_ctx("test_catanet", ATTN_BACKEND_REF, 1);
    const int64_t N = 60, H = 2, Hk = 1, D = 8, Dv = 4, G = 4, Df = 3;
    tu_rng rng = {tu_seed(SALT, 1)};
    tu_buf q = tu_alloc(ATTN_F32, 1, N, H, D), k = tu_alloc(ATTN_F32, 1, N, Hk, D), v = tu_alloc(ATTN_F32, 1, N, Hk, Dv);
    tu_buf feats = tu_alloc(ATTN_F32, 1, N, 1, Df), cen = tu_alloc(ATTN_F32, 1, G, 1, Df);
    tu_fill(&q.t, &rng, -1, 1), tu_fill(&k.t, &rng, -1, 1), tu_fill(&v.t, &rng, -1, 1);
    tu_fill(&feats.t, &rng, -1, 1);
    tu_fill(&cen.t, &rng, -1, 1);
    tu_store(&cen.t, tu_off4(&cen.t, 0, 3, 0, 0), 50.0); /* a centre nobody is near: an empty group */
    tu_buf oi = tu_alloc(ATTN_F32, 1, N, H, Dv), oe = tu_alloc(ATTN_F32, 1, N, H, Dv);
    int64_t grp[60];
    attn_params p = attn_params_default();
    tu_case("CATANet forward");
    CHECK_OK(attn_catanet_forward(cpu, &p, &feats.t, &cen.t, &q.t, &k.t, &v.t, &oi.t, &oe.t, grp));
    /* groups */
    int ok = 1;
    for (int64_t t = 0; t < N; t++) {
        double best = INFINITY;
        int64_t bg = 0;
        for (int64_t g = 0; g < G; g++) {
            double d2 = 0.0;
            for (int64_t e = 0; e < Df; e++) {
                double x = tu_load(&feats.t, tu_off4(&feats.t, 0, t, 0, e)) - tu_load(&cen.t, tu_off4(&cen.t, 0, g, 0, e));
                d2 += x * x;
            }
            if (d2 < best) best = d2, bg = g;
        }
        ok &= grp[t] == bg && bg != 3;
    }
    CHECK(ok, "tokens are not in their nearest group");
    /* naive double: intra and inter */
    tu_buf ni = tu_alloc(ATTN_F64, 1, N, H, Dv), ne = tu_alloc(ATTN_F64, 1, N, H, Dv);
    double sc[64], km[4][8], vm[4][4];
    int64_t cnt[4] = {0};
    for (int64_t t = 0; t < N; t++) cnt[grp[t]]++;
    for (int64_t g = 0; g < G; g++) {
        for (int64_t e = 0; e < D; e++) km[g][e] = 0.0;
        for (int64_t e = 0; e < Dv; e++) vm[g][e] = 0.0;
        for (int64_t t = 0; t < N; t++)
            if (grp[t] == g) {
                for (int64_t e = 0; e < D; e++) km[g][e] += tu_load(&k.t, tu_off4(&k.t, 0, t, 0, e)) / (double)cnt[g];
                for (int64_t e = 0; e < Dv; e++) vm[g][e] += tu_load(&v.t, tu_off4(&v.t, 0, t, 0, e)) / (double)cnt[g];
            }
    }
    const double scale = 1.0 / sqrt((double)D);
    for (int64_t i = 0; i < N; i++)
        for (int64_t h = 0; h < H; h++) {
            int64_t keys[64], c = 0;
            double mx = -INFINITY, sum = 0.0;
            for (int64_t j = 0; j < N; j++)
                if (grp[j] == grp[i]) {
                    double dot = 0.0;
                    for (int64_t e = 0; e < D; e++) dot += tu_load(&q.t, tu_off4(&q.t, 0, i, h, e)) * tu_load(&k.t, tu_off4(&k.t, 0, j, 0, e));
                    sc[c] = scale * dot, keys[c++] = j;
                    mx = fmax(mx, scale * dot);
                }
            for (int64_t a = 0; a < c; a++) sum += exp(sc[a] - mx);
            for (int64_t e = 0; e < Dv; e++) {
                double acc = 0.0;
                for (int64_t a = 0; a < c; a++) acc += exp(sc[a] - mx) / sum * tu_load(&v.t, tu_off4(&v.t, 0, keys[a], 0, e));
                tu_store(&ni.t, tu_off4(&ni.t, 0, i, h, e), acc);
            }
            mx = -INFINITY, sum = 0.0;
            double gs[4];
            for (int64_t g = 0; g < G; g++) {
                gs[g] = -INFINITY;
                if (!cnt[g]) continue;
                double dot = 0.0;
                for (int64_t e = 0; e < D; e++) dot += tu_load(&q.t, tu_off4(&q.t, 0, i, h, e)) * km[g][e];
                gs[g] = scale * dot + log((double)cnt[g]);
                mx = fmax(mx, gs[g]);
            }
            for (int64_t g = 0; g < G; g++) sum += cnt[g] ? exp(gs[g] - mx) : 0.0;
            for (int64_t e = 0; e < Dv; e++) {
                double acc = 0.0;
                for (int64_t g = 0; g < G; g++)
                    if (cnt[g]) acc += exp(gs[g] - mx) / sum * vm[g][e];
                tu_store(&ne.t, tu_off4(&ne.t, 0, i, h, e), acc);
            }
        }
    CHECK_CLOSE("o_intra", &oi.t, &ni.t, 1e-5, 1e-4);
    CHECK_CLOSE("o_inter", &oe.t, &ne.t, 1e-5, 1e-4);
    tu_case("CATANet: CPU vs reference");
    tu_buf ri = tu_alloc(ATTN_F64, 1, N, H, Dv), re = tu_alloc(ATTN_F64, 1, N, H, Dv);
    CHECK_OK(attn_catanet_forward(ref, &p, &feats.t, &cen.t, &q.t, &k.t, &v.t, &ri.t, &re.t, NULL));
    CHECK_CLOSE("o_intra", &oi.t, &ri.t, 1e-5, 1e-4);
    CHECK_CLOSE("o_inter", &oe.t, &re.t, 1e-5, 1e-4);
    tu_case("CATANet: bad input");
    attn_params cap = p;
    cap.softcap = 5.0f;
    CHECK(attn_catanet_forward(cpu, &cap, &feats.t, &cen.t, &q.t, &k.t, &v.t, &oi.t, &oe.t, NULL) == ATTN_ERR_ARG,
          "a softcap must be refused: %s", attn_last_error());
    tu_free(&q), tu_free(&k), tu_free(&v), tu_free(&feats), tu_free(&cen), tu_free(&oi), tu_free(&oe);
    tu_free(&ni), tu_free(&ne), tu_free(&ri), tu_free(&re);
    attn_ctx_free(cpu);
    attn_ctx_free(ref);
    return tu_finish("test_catanet");
}
