/* Helpers shared by the engine's files: error messages and dtype
 * conversions. */
#include "engine.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void llama_errf(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    if (!err || !errlen)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

int llama_fkv_check(fkv_status st, const fkv_cache *c, const char *what,
                    char *err, size_t errlen)
{
    char msg[512];
    if (st == FKV_OK)
        return 0;
    fkv_last_error(c, msg, sizeof msg);
    llama_errf(err, errlen, "%s: %s: %s", what, fkv_status_string(st), msg);
    return -1;
}

uint16_t llama_f32_to_f16(float f)
{
    uint32_t x, sign, mant;
    int32_t exp;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000u;
    exp = (int32_t)((x >> 23) & 0xFF);
    mant = x & 0x7FFFFFu;
    if (exp == 0xFF) /* inf / nan */
        return (uint16_t)(sign | 0x7C00u | (mant ? 0x200u : 0));
    exp = exp - 127 + 15;
    if (exp >= 0x1F)
        return (uint16_t)(sign | 0x7C00u);
    if (exp <= 0) { /* subnormal or zero */
        uint32_t shift, m, r, half;
        if (exp < -10)
            return (uint16_t)sign;
        m = mant | 0x800000u;
        shift = (uint32_t)(14 - exp);
        r = m >> shift;
        half = 1u << (shift - 1);
        if ((m & ((1u << shift) - 1)) > half || ((m & ((1u << shift) - 1)) == half && (r & 1)))
            r++;
        return (uint16_t)(sign | r);
    }
    {
        uint32_t h = sign | ((uint32_t)exp << 10) | (mant >> 13);
        uint32_t rest = mant & 0x1FFFu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1)))
            h++; /* may carry into the exponent: still correct */
        return (uint16_t)h;
    }
}

float llama_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FFu, x;
    float f;
    if (exp == 0) {
        f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    }
    if (exp == 0x1F)
        x = sign | 0x7F800000u | (mant << 13);
    else
        x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    memcpy(&f, &x, 4);
    return f;
}

uint16_t llama_f32_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((x >> 16) | 0x40u); /* quiet nan */
    x += 0x7FFFu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

float llama_bf16_to_f32(uint16_t h)
{
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

size_t llama_fkv_dtype_size(fkv_dtype dtype)
{
    return dtype == FKV_DTYPE_F32 ? 4 : 2;
}

void llama_convert_from_f32(fkv_dtype dtype, const float *src, void *dst,
                            size_t n)
{
    size_t i;
    if (dtype == FKV_DTYPE_F32) {
        memcpy(dst, src, n * sizeof *src);
    } else if (dtype == FKV_DTYPE_F16) {
        uint16_t *d = dst;
        for (i = 0; i < n; i++)
            d[i] = llama_f32_to_f16(src[i]);
    } else {
        uint16_t *d = dst;
        for (i = 0; i < n; i++)
            d[i] = llama_f32_to_bf16(src[i]);
    }
}

void llama_convert_to_f32(fkv_dtype dtype, const void *src, float *dst,
                          size_t n)
{
    size_t i;
    if (dtype == FKV_DTYPE_F32) {
        memcpy(dst, src, n * sizeof *dst);
    } else if (dtype == FKV_DTYPE_F16) {
        const uint16_t *s = src;
        for (i = 0; i < n; i++)
            dst[i] = llama_f16_to_f32(s[i]);
    } else {
        const uint16_t *s = src;
        for (i = 0; i < n; i++)
            dst[i] = llama_bf16_to_f32(s[i]);
    }
}

float llama_tensor_get(const llama_tensor *t, size_t i)
{
    /* memcpy: a header length that is not a multiple of 4 leaves the data
     * unaligned, which a cast would not survive. */
    const char *p = (const char *)t->data;
    if (t->dtype == LLAMA_F32) {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    } else {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return t->dtype == LLAMA_F16 ? llama_f16_to_f32(h) : llama_bf16_to_f32(h);
    }
}

void llama_rope_inv_freq(const llama_config *cfg, double *inv_freq)
{
    int32_t i, half = cfg->head_dim / 2;
    const llama_rope_scaling *rs = &cfg->rope_scaling;
    for (i = 0; i < half; i++) {
        double f = 1.0 / pow(cfg->rope_theta, (2.0 * i) / cfg->head_dim);
        if (rs->enabled) {
            /* HF _compute_llama3_parameters. */
            double low_wavelen = rs->original_max_position_embeddings / rs->low_freq_factor;
            double high_wavelen = rs->original_max_position_embeddings / rs->high_freq_factor;
            double wavelen = 2.0 * 3.14159265358979323846 / f;
            if (wavelen > low_wavelen) {
                f = f / rs->factor;
            } else if (wavelen >= high_wavelen) {
                double smooth = (rs->original_max_position_embeddings / wavelen - rs->low_freq_factor) /
                                (rs->high_freq_factor - rs->low_freq_factor);
                f = (1.0 - smooth) * f / rs->factor + smooth * f;
            }
        }
        inv_freq[i] = f;
    }
}
