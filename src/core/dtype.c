/* Dtypes: sizes, names, scalar conversions, and element access for slow paths. */
#include "internal.h"

#include <string.h>

size_t attn_dtype_size(attn_dtype dt) {
    switch (dt) {
    case ATTN_F32: return 4;
    case ATTN_F16: return 2;
    case ATTN_BF16: return 2;
    case ATTN_F64: return 8;
    }
    return 0;
}

const char *attn_dtype_name(attn_dtype dt) {
    switch (dt) {
    case ATTN_F32: return "f32";
    case ATTN_F16: return "f16";
    case ATTN_BF16: return "bf16";
    case ATTN_F64: return "f64";
    }
    return "invalid";
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float attn_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13)); /* inf, nan */
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24 */
        float f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t attn_f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) /* inf or nan (keep nan quiet) */
        return (uint16_t)(sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds to inf */
    if (a < 0x38800000u) {
        /* subnormal half or zero: round a * 2^24 to an integer, ties to even */
        float x = bits_f32(a) * 16777216.0f;
        uint32_t r = (uint32_t)x;
        float frac = x - (float)r;
        if (frac > 0.5f || (frac == 0.5f && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t exp = (a >> 23) - 112;
    uint32_t man = a & 0x7fffff;
    uint32_t h = (exp << 10) | (man >> 13);
    uint32_t rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++; /* carries into exp fine */
    return (uint16_t)(sign | h);
}

float attn_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t attn_f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet nan */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

double attn_load_f64(const attn_tensor *t, int64_t off) {
    switch (t->dtype) {
    case ATTN_F32: return ((const float *)t->data)[off];
    case ATTN_F16: return attn_f16_to_f32(((const uint16_t *)t->data)[off]);
    case ATTN_BF16: return attn_bf16_to_f32(((const uint16_t *)t->data)[off]);
    case ATTN_F64: return ((const double *)t->data)[off];
    }
    return 0.0;
}

void attn_store_f64(attn_tensor *t, int64_t off, double x) {
    switch (t->dtype) {
    case ATTN_F32: ((float *)t->data)[off] = (float)x; break;
    case ATTN_F16: ((uint16_t *)t->data)[off] = attn_f32_to_f16((float)x); break;
    case ATTN_BF16: ((uint16_t *)t->data)[off] = attn_f32_to_bf16((float)x); break;
    case ATTN_F64: ((double *)t->data)[off] = x; break;
    }
}

attn_tensor attn_tensor_3d(void *data, attn_dtype dt, int64_t d0, int64_t d1, int64_t d2) {
    attn_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dt;
    t.ndim = 3;
    t.shape[0] = d0, t.shape[1] = d1, t.shape[2] = d2;
    t.stride[2] = 1, t.stride[1] = d2, t.stride[0] = d1 * d2;
    return t;
}

attn_tensor attn_tensor_4d(void *data, attn_dtype dt, int64_t d0, int64_t d1, int64_t d2,
                           int64_t d3) {
    attn_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dt;
    t.ndim = 4;
    t.shape[0] = d0, t.shape[1] = d1, t.shape[2] = d2, t.shape[3] = d3;
    t.stride[3] = 1, t.stride[2] = d3, t.stride[1] = d2 * d3, t.stride[0] = d1 * d2 * d3;
    return t;
}
