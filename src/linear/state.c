/* States of the chunked-recurrence engine (see state.h). */
#include "state.h"

#include <string.h>

void lin_state_load(const attn_kernels *kr, const attn_tensor *t, int64_t b, int64_t h,
                    int64_t d, int64_t dv, float *s) {
    if (!t) {
        memset(s, 0, (size_t)(d * dv) * sizeof(float));
        return;
    }
    for (int64_t x = 0; x < d; x++) rows_load(kr, t, attn_off4(t, b, h, x, 0), dv, s + x * dv);
}

void lin_state_store(const attn_kernels *kr, attn_tensor *t, int64_t b, int64_t h, int64_t d,
                     int64_t dv, const float *s) {
    for (int64_t x = 0; x < d; x++) rows_store(kr, t, attn_off4(t, b, h, x, 0), dv, s + x * dv);
}
