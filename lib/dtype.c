/* Conversions between the cache dtypes and float, written out so that the
 * host code needs no compiler support for half types. */
#include <math.h>
#include <string.h>

#include "internal.h"

size_t fkvi_dtype_size(fkv_dtype dt)
{
    return dt == FKV_DTYPE_F32 ? 4 : 2;
}

static float bits_to_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t float_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

float fkvi_f16_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) /* inf or nan */
        return bits_to_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24 is exact in float */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t fkvi_float_to_f16(float f)
{
    uint32_t u = float_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs >= 0x7f800000u) /* inf or nan (keep nan quiet) */
        return sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (abs >= 0x477ff000u) /* rounds to >= 65520: overflow */
        return sign | 0x7c00u;
    if (abs < 0x38800000u) {
        /* below the smallest normal half: round to a multiple of 2^-24 */
        float a = bits_to_float(abs);
        float scaled = a * 16777216.0f; /* exact */
        uint32_t m = (uint32_t)lrintf(scaled); /* round half to even */
        return sign | (uint16_t)m;
    }
    uint32_t mant = abs & 0x7fffffu;
    uint32_t exp = (abs >> 23) - 112;
    uint32_t half = (exp << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u)))
        half++; /* a carry into the exponent is the right result */
    return sign | (uint16_t)half;
}

float fkvi_bf16_to_float(uint16_t h)
{
    return bits_to_float((uint32_t)h << 16);
}

uint16_t fkvi_float_to_bf16(float f)
{
    uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* nan: keep it a quiet nan */
        return (uint16_t)((u >> 16) | 0x40u);
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb; /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* The element-wise conversions of fkvi_load_row, inline and without
 * branches so that the loops over a row vectorise. */
static inline float bf16_bits_to_float(uint16_t h)
{
    return bits_to_float((uint32_t)h << 16);
}

/* f16 -> float by rebiasing the exponent; subnormal halves become
 * (2^-14 + m 2^-24) - 2^-14 (exact), inf and nan keep their mantissa bits.
 * Gives the same bits as fkvi_f16_to_float for all 65536 inputs. */
static inline float f16_bits_to_float(uint16_t h)
{
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t e = o & 0x0f800000u;
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t normal = o + (112u << 23);
    uint32_t special = o + (224u << 23);
    uint32_t sub = float_to_bits(bits_to_float(o + (113u << 23)) -
                                 6.103515625e-05f);
    /* masks rather than ?: so that the loop has no control flow */
    uint32_t is_special = 0u - (uint32_t)(e == 0x0f800000u);
    uint32_t is_sub = 0u - (uint32_t)(e == 0);
    uint32_t r = (normal & ~(is_special | is_sub)) | (special & is_special) |
                 (sub & is_sub);
    return bits_to_float(r | sign);
}

/* Block length of the conversion loops: a constant trip count lets GCC's
 * -O2 (very-cheap) vectoriser take the inner loop; the tail is scalar. */
#define FKVI_CVT_BLOCK 16

void fkvi_load_row(fkv_dtype dt, const void *src, size_t first, size_t n,
                   float *dst)
{
    size_t i = 0;
    switch (dt) {
    case FKV_DTYPE_UNSET: /* rejected by fkv_create */
        break;
    case FKV_DTYPE_F32:
        memcpy(dst, (const float *)src + first, n * sizeof(float));
        break;
    case FKV_DTYPE_F16: {
        const uint16_t *s = (const uint16_t *)src + first;
        for (; i + FKVI_CVT_BLOCK <= n; i += FKVI_CVT_BLOCK)
            for (size_t j = 0; j < FKVI_CVT_BLOCK; j++)
                dst[i + j] = f16_bits_to_float(s[i + j]);
        for (; i < n; i++)
            dst[i] = f16_bits_to_float(s[i]);
        break;
    }
    case FKV_DTYPE_BF16: {
        const uint16_t *s = (const uint16_t *)src + first;
        for (; i + FKVI_CVT_BLOCK <= n; i += FKVI_CVT_BLOCK)
            for (size_t j = 0; j < FKVI_CVT_BLOCK; j++)
                dst[i + j] = bf16_bits_to_float(s[i + j]);
        for (; i < n; i++)
            dst[i] = bf16_bits_to_float(s[i]);
        break;
    }
    }
}

void fkvi_store_row(fkv_dtype dt, const float *src, size_t n, void *dst,
                    size_t first)
{
    switch (dt) {
    case FKV_DTYPE_UNSET: /* rejected by fkv_create */
        break;
    case FKV_DTYPE_F32:
        memcpy((float *)dst + first, src, n * sizeof(float));
        break;
    case FKV_DTYPE_F16: {
        uint16_t *d = (uint16_t *)dst + first;
        for (size_t i = 0; i < n; i++)
            d[i] = fkvi_float_to_f16(src[i]);
        break;
    }
    case FKV_DTYPE_BF16: {
        uint16_t *d = (uint16_t *)dst + first;
        for (size_t i = 0; i < n; i++)
            d[i] = fkvi_float_to_bf16(src[i]);
        break;
    }
    }
}
