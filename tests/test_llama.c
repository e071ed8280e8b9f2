/*
 * The llama example engine (examples/llama/): its loader and its CPU
 * forward path on libfreekv, against a float64 forward pass written here.
 *
 * Each case writes a tiny random Llama checkpoint (2 layers, hidden 64,
 * 4 query heads, 2 KV heads, head_dim 64 (the library's smallest), vocab
 * 256, MLP 96) as safetensors into a temporary directory: f32, f16, bf16,
 * tied embeddings, llama3 rope_scaling, sharded with an index. Weights are
 * small integers times 2^-9, exactly representable in all three dtypes, so
 * the reference reads the same values as the engine whatever the file's
 * dtype. Then: the engine's dense logits after prefill and after several
 * decode steps against the reference; every policy equal to dense while the
 * context fits the budget; the loader's error paths.
 *
 * SPDX-License-Identifier: MIT
 */
#define _POSIX_C_SOURCE 200809L
#include "tests.h"

#include "../examples/llama/engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { H = 64, I_ = 96, L_ = 2, QH = 4, KVH = 2, D = 64, V = 256 };
#define QD (QH * D)
#define KVD (KVH * D)

/* ---- checkpoint writer ------------------------------------------------------ */

typedef struct ck_tensor {
    char name[96];
    int ndim;
    int64_t shape[2];
    double *data; /* exact in f16 and bf16 */
} ck_tensor;

typedef struct ck_model {
    ck_tensor t[3 + 9 * L_];
    int n;
    int tied;
    int scaled; /* llama3 rope_scaling */
} ck_model;

static uint64_t g_rng;

static int rnd_int(int lo, int hi)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return lo + (int)(g_rng % (uint64_t)(hi - lo + 1));
}

static ck_tensor *ck_add(ck_model *m, const char *name, int64_t d0, int64_t d1, int norm)
{
    ck_tensor *t = &m->t[m->n++];
    int64_t n = d0 * (d1 ? d1 : 1), i;
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = d1 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->data = malloc((size_t)n * sizeof(double));
    ck_assert_ptr_nonnull(t->data);
    for (i = 0; i < n; i++)
        t->data[i] = norm ? (256 + 2 * rnd_int(-64, 64)) / 512.0 : rnd_int(-127, 127) / 512.0;
    return t;
}

static void ck_build(ck_model *m, int tied, int scaled, uint64_t seed)
{
    static const char *names[9] = {"input_layernorm.weight", "self_attn.q_proj.weight",
                                   "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                   "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                                   "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                   "mlp.down_proj.weight"};
    const int64_t shp[9][2] = {{H, 0}, {QD, H}, {KVD, H}, {KVD, H}, {H, QD},
                               {H, 0}, {I_, H}, {I_, H}, {H, I_}};
    char name[96];
    int l, i;
    memset(m, 0, sizeof *m);
    g_rng = seed * 0x9E3779B97F4A7C15ull + 7;
    m->tied = tied;
    m->scaled = scaled;
    ck_add(m, "model.embed_tokens.weight", V, H, 0);
    ck_add(m, "model.norm.weight", H, 0, 1);
    if (!tied)
        ck_add(m, "lm_head.weight", V, H, 0);
    for (l = 0; l < L_; l++)
        for (i = 0; i < 9; i++) {
            snprintf(name, sizeof name, "model.layers.%d.%s", l, names[i]);
            ck_add(m, name, shp[i][0], shp[i][1], i == 0 || i == 5);
        }
}

static void ck_free(ck_model *m)
{
    int i;
    for (i = 0; i < m->n; i++)
        free(m->t[i].data);
}

static const ck_tensor *ck_find(const ck_model *m, const char *name)
{
    int i;
    for (i = 0; i < m->n; i++)
        if (!strcmp(m->t[i].name, name))
            return &m->t[i];
    return NULL;
}

/* Exact encodings (the values are exact in every dtype). */
static uint16_t enc_bf16(double x)
{
    float f = (float)x;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

static uint16_t enc_f16(double x)
{
    int e;
    double m;
    uint16_t s = x < 0 ? 0x8000 : 0;
    if (x == 0)
        return s;
    m = frexp(fabs(x), &e); /* |x| = m * 2^e, m in [0.5, 1) */
    /* normal: 1.f * 2^(e-1), biased exponent e - 1 + 15 */
    return (uint16_t)(s | (uint16_t)((e - 1 + 15) << 10) | (uint16_t)((m * 2 - 1) * 1024));
}

/* Mutations for the error cases. */
typedef struct ck_faults {
    const char *skip;        /* leave this tensor out */
    const char *bad_shape;   /* write this tensor with its dims swapped */
    const char *bad_dtype;   /* name this tensor's dtype "I32" */
    int offsets_beyond;      /* the last tensor's end beyond the data */
    int overlap;             /* the second tensor starts inside the first */
    int size_mismatch;       /* the first tensor's end 2 bytes short */
} ck_faults;

/* Writes tensors [from, to) of m as one safetensors file. */
static void ck_write_st(const ck_model *m, int from, int to, const char *path, const char *dtype,
                        const ck_faults *f)
{
    static const ck_faults none;
    size_t es = strcmp(dtype, "F32") ? 2 : 4, cap = 1 << 16, hl = 0, off = 0;
    char *hdr = malloc(cap);
    FILE *fp;
    int i, first = 1;
    uint64_t len;
    if (!f)
        f = &none;
    ck_assert_ptr_nonnull(hdr);
    hl += (size_t)snprintf(hdr + hl, cap - hl, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (i = from; i < to; i++) {
        const ck_tensor *t = &m->t[i];
        size_t bytes = (size_t)(t->shape[0] * (t->ndim == 2 ? t->shape[1] : 1)) * es;
        size_t b = off, e = off + bytes;
        if (f->skip && !strcmp(f->skip, t->name))
            continue;
        if (f->overlap && !first && i == from + 1)
            b -= 8, e -= 8;
        if (f->size_mismatch && first)
            e -= 2;
        if (f->offsets_beyond && i == to - 1)
            e += 4096, b += 4096;
        hl += (size_t)snprintf(hdr + hl, cap - hl, ",\"%s\":{\"dtype\":\"%s\",\"shape\":", t->name,
                               f->bad_dtype && !strcmp(f->bad_dtype, t->name) ? "I32" : dtype);
        if (t->ndim == 1)
            hl += (size_t)snprintf(hdr + hl, cap - hl, "[%lld]", (long long)t->shape[0]);
        else if (f->bad_shape && !strcmp(f->bad_shape, t->name))
            hl += (size_t)snprintf(hdr + hl, cap - hl, "[%lld,%lld]", (long long)t->shape[1],
                                   (long long)t->shape[0]);
        else
            hl += (size_t)snprintf(hdr + hl, cap - hl, "[%lld,%lld]", (long long)t->shape[0],
                                   (long long)t->shape[1]);
        hl += (size_t)snprintf(hdr + hl, cap - hl, ",\"data_offsets\":[%zu,%zu]}", b, e);
        off += bytes;
        first = 0;
    }
    hl += (size_t)snprintf(hdr + hl, cap - hl, "}");
    while (hl % 8)
        hdr[hl++] = ' ';
    fp = fopen(path, "wb");
    ck_assert_ptr_nonnull(fp);
    len = hl;
    {
        unsigned char lb[8];
        int k;
        for (k = 0; k < 8; k++)
            lb[k] = (unsigned char)(len >> (8 * k));
        fwrite(lb, 1, 8, fp);
    }
    fwrite(hdr, 1, hl, fp);
    for (i = from; i < to; i++) {
        const ck_tensor *t = &m->t[i];
        size_t n = (size_t)(t->shape[0] * (t->ndim == 2 ? t->shape[1] : 1)), k;
        if (f->skip && !strcmp(f->skip, t->name))
            continue;
        for (k = 0; k < n; k++) {
            if (es == 4) {
                float x = (float)t->data[k];
                fwrite(&x, 4, 1, fp);
            } else {
                uint16_t x = strcmp(dtype, "F16") ? enc_bf16(t->data[k]) : enc_f16(t->data[k]);
                fwrite(&x, 2, 1, fp);
            }
        }
    }
    fclose(fp);
    free(hdr);
}

static void write_text(const char *path, const char *text)
{
    FILE *fp = fopen(path, "wb");
    ck_assert_ptr_nonnull(fp);
    fputs(text, fp);
    fclose(fp);
}

static void ck_write_config(const ck_model *m, const char *dir, const char *model_type)
{
    char path[512], buf[2048];
    snprintf(path, sizeof path, "%s/config.json", dir);
    snprintf(buf, sizeof buf,
             "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"%s\",\"hidden_size\":%d,"
             "\"intermediate_size\":%d,\"num_hidden_layers\":%d,\"num_attention_heads\":%d,"
             "\"num_key_value_heads\":%d,\"head_dim\":%d,\"vocab_size\":%d,"
             "\"max_position_embeddings\":4096,\"rope_theta\":10000.0,\"rms_norm_eps\":1e-05,"
             "\"hidden_act\":\"silu\",\"tie_word_embeddings\":%s,\"rope_scaling\":%s,"
             "\"torch_dtype\":\"float32\",\"bos_token_id\":null}\n",
             model_type, H, I_, L_, QH, KVH, D, V, m->tied ? "true" : "false",
             m->scaled ? "{\"rope_type\":\"llama3\",\"factor\":4.0,\"low_freq_factor\":1.0,"
                         "\"high_freq_factor\":4.0,\"original_max_position_embeddings\":16}"
                       : "null");
    write_text(path, buf);
}

static char g_dir[256];

static const char *tmpdir(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/fkv_llama_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(g_dir));
    return g_dir;
}

static void rmdir_all(const char *dir)
{
    static const char *files[] = {"config.json", "model.safetensors", "model.safetensors.index.json",
                                  "model-00001-of-00002.safetensors",
                                  "model-00002-of-00002.safetensors"};
    char path[512];
    size_t i;
    for (i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

static void ck_write_dir(const ck_model *m, const char *dir, const char *dtype, const ck_faults *f)
{
    char path[512];
    ck_write_config(m, dir, "llama");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ck_write_st(m, 0, m->n, path, dtype, f);
}

static void ck_write_sharded(const ck_model *m, const char *dir, const char *dtype)
{
    char path[512], *idx;
    size_t cap = 1 << 15, n = 0;
    int half = m->n / 2, i;
    ck_write_config(m, dir, "llama");
    snprintf(path, sizeof path, "%s/model-00001-of-00002.safetensors", dir);
    ck_write_st(m, 0, half, path, dtype, NULL);
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    ck_write_st(m, half, m->n, path, dtype, NULL);
    idx = malloc(cap);
    ck_assert_ptr_nonnull(idx);
    n += (size_t)snprintf(idx + n, cap - n, "{\"metadata\":{\"total_size\":0},\"weight_map\":{");
    for (i = 0; i < m->n; i++)
        n += (size_t)snprintf(idx + n, cap - n, "%s\"%s\":\"model-0000%d-of-00002.safetensors\"",
                              i ? "," : "", m->t[i].name, i < half ? 1 : 2);
    snprintf(idx + n, cap - n, "}}");
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    write_text(path, idx);
    free(idx);
}

/* ---- float64 reference forward ------------------------------------------- */

static const double *W(const ck_model *m, int layer, const char *suffix)
{
    char name[96];
    const ck_tensor *t;
    if (layer < 0)
        snprintf(name, sizeof name, "%s", suffix);
    else
        snprintf(name, sizeof name, "model.layers.%d.%s", layer, suffix);
    t = ck_find(m, name);
    ck_assert_msg(t != NULL, "reference: no %s", name);
    return t->data;
}

/* y[out] = w[out][in] x[in] */
static void ref_linear(double *y, const double *w, const double *x, int out, int in)
{
    int o, i;
    for (o = 0; o < out; o++) {
        double s = 0;
        for (i = 0; i < in; i++)
            s += w[(size_t)o * in + i] * x[i];
        y[o] = s;
    }
}

static void ref_rmsnorm(double *y, const double *x, const double *w, int n, double eps)
{
    double ss = 0;
    int i;
    for (i = 0; i < n; i++)
        ss += x[i] * x[i];
    ss = 1.0 / sqrt(ss / n + eps);
    for (i = 0; i < n; i++)
        y[i] = w[i] * x[i] * ss;
}

static double ref_inv_freq(const ck_model *m, int i)
{
    double f = pow(10000.0, -2.0 * i / D);
    if (m->scaled) {
        /* Llama 3.1: factor 4, low 1, high 4, original context 16. */
        double wl = 2 * 3.14159265358979323846 / f, lo_wl = 16.0 / 1.0, hi_wl = 16.0 / 4.0;
        if (wl > lo_wl)
            f /= 4.0;
        else if (wl >= hi_wl) {
            double sm = (16.0 / wl - 1.0) / (4.0 - 1.0);
            f = (1 - sm) * f / 4.0 + sm * f;
        }
    }
    return f;
}

static void ref_rope(double *x, int heads, int pos, const ck_model *m)
{
    int h, i;
    for (h = 0; h < heads; h++)
        for (i = 0; i < D / 2; i++) {
            double a = pos * ref_inv_freq(m, i), c = cos(a), s = sin(a);
            double *v = x + h * D, x1 = v[i], x2 = v[i + D / 2];
            v[i] = x1 * c - x2 * s;
            v[i + D / 2] = x2 * c + x1 * s;
        }
}

/* logits[n][V] for every position of tokens[n]. */
static double *ref_forward(const ck_model *m, const int32_t *tokens, int n)
{
    double *logits = malloc((size_t)n * V * sizeof(double));
    double *K = malloc((size_t)L_ * n * KVD * sizeof(double));
    double *Vv = malloc((size_t)L_ * n * KVD * sizeof(double));
    double *sc = malloc((size_t)n * sizeof(double));
    double x[H], xn[H], q[QD], att[QD], o[H], g[I_], u[I_], dn[H];
    const double *lm = m->tied ? W(m, -1, "model.embed_tokens.weight") : W(m, -1, "lm_head.weight");
    int p, l, i, h, j, d;
    ck_assert(logits && K && Vv && sc);
    for (p = 0; p < n; p++) {
        memcpy(x, W(m, -1, "model.embed_tokens.weight") + (size_t)tokens[p] * H, sizeof x);
        for (l = 0; l < L_; l++) {
            double *kl = K + ((size_t)l * n + p) * KVD, *vl = Vv + ((size_t)l * n + p) * KVD;
            ref_rmsnorm(xn, x, W(m, l, "input_layernorm.weight"), H, 1e-5);
            ref_linear(q, W(m, l, "self_attn.q_proj.weight"), xn, QD, H);
            ref_linear(kl, W(m, l, "self_attn.k_proj.weight"), xn, KVD, H);
            ref_linear(vl, W(m, l, "self_attn.v_proj.weight"), xn, KVD, H);
            ref_rope(q, QH, p, m);
            ref_rope(kl, KVH, p, m);
            for (h = 0; h < QH; h++) {
                int kh = h / (QH / KVH);
                double mx = -1e300, sum = 0;
                for (j = 0; j <= p; j++) {
                    const double *kj = K + ((size_t)l * n + j) * KVD + kh * D;
                    double s = 0;
                    for (d = 0; d < D; d++)
                        s += q[h * D + d] * kj[d];
                    sc[j] = s / sqrt((double)D);
                    if (sc[j] > mx)
                        mx = sc[j];
                }
                for (j = 0; j <= p; j++)
                    sum += (sc[j] = exp(sc[j] - mx));
                for (d = 0; d < D; d++) {
                    double a = 0;
                    for (j = 0; j <= p; j++)
                        a += sc[j] * Vv[((size_t)l * n + j) * KVD + kh * D + d];
                    att[h * D + d] = a / sum;
                }
            }
            ref_linear(o, W(m, l, "self_attn.o_proj.weight"), att, H, QD);
            for (i = 0; i < H; i++)
                x[i] += o[i];
            ref_rmsnorm(xn, x, W(m, l, "post_attention_layernorm.weight"), H, 1e-5);
            ref_linear(g, W(m, l, "mlp.gate_proj.weight"), xn, I_, H);
            ref_linear(u, W(m, l, "mlp.up_proj.weight"), xn, I_, H);
            for (i = 0; i < I_; i++)
                g[i] = g[i] / (1 + exp(-g[i])) * u[i];
            ref_linear(dn, W(m, l, "mlp.down_proj.weight"), g, H, I_);
            for (i = 0; i < H; i++)
                x[i] += dn[i];
        }
        ref_rmsnorm(xn, x, W(m, -1, "model.norm.weight"), H, 1e-5);
        ref_linear(logits + (size_t)p * V, lm, xn, V, H);
    }
    free(K);
    free(Vv);
    free(sc);
    return logits;
}

/* ---- engine runs ------------------------------------------------------------ */

/* max |a - ref| / max |ref| over one logits vector. */
static double rel_err(const float *a, const double *ref)
{
    double num = 0, den = 0;
    int i;
    for (i = 0; i < V; i++) {
        double e = fabs((double)a[i] - ref[i]);
        if (e > num) num = e;
        if (fabs(ref[i]) > den) den = fabs(ref[i]);
    }
    return num / (den > 0 ? den : 1);
}

static void engine_opts(fkv_options *o, fkv_policy policy, fkv_dtype dt)
{
    ck_assert_int_eq(fkv_options_init(o, sizeof *o), FKV_OK);
    o->policy = policy;
    o->dtype = dt;
    o->page_tokens = 16;
    o->sink_tokens = 16;
    o->window_tokens = 16;
    o->budget_tokens = 64;
}

/* Prefill P tokens then S decode steps; logits[(S + 1)][V]: after the
 * prefill, then after each step. */
static float *engine_run(const char *dir, fkv_policy policy, fkv_dtype dt, const int32_t *tokens,
                         int P, int S)
{
    llama_model m;
    llama_backend *b = NULL;
    llama_run_config rc;
    fkv_options o;
    char err[1024];
    float *logits = malloc((size_t)(S + 1) * V * sizeof(float));
    int s;
    memset(&rc, 0, sizeof rc);
    rc.max_batch = 1;
    rc.max_context = P + S;
    rc.threads = 1;
    ck_assert_ptr_nonnull(logits);
    ck_assert_msg(llama_model_load(dir, &m, err, sizeof err) == 0, "load: %s", err);
    ck_assert_msg(llama_cpu_backend.create(&m, &rc, &b, err, sizeof err) == 0, "create: %s", err);
    engine_opts(&o, policy, dt);
    ck_assert_msg(llama_cpu_backend.cache_open(b, &o, err, sizeof err) == 0, "cache: %s", err);
    ck_assert_msg(llama_cpu_backend.prefill(b, 0, tokens, P, logits, err, sizeof err) == 0,
                  "prefill: %s", err);
    for (s = 0; s < S; s++) {
        int32_t slot = 0;
        ck_assert_msg(llama_cpu_backend.decode(b, 1, &slot, &tokens[P + s], logits + (size_t)(s + 1) * V,
                                               err, sizeof err) == 0, "decode: %s", err);
    }
    llama_cpu_backend.destroy(b);
    llama_model_free(&m);
    return logits;
}

static void make_tokens(int32_t *t, int n, uint64_t seed)
{
    int i;
    g_rng = seed + 99;
    for (i = 0; i < n; i++)
        t[i] = rnd_int(0, V - 1);
}

/* Dense logits of the checkpoint in dir against the reference: a prompt of
 * P tokens, then S steps. */
static void check_dense_n(const ck_model *m, const char *dir, fkv_dtype dt, double tol, int P,
                          int S)
{
    int32_t *tokens = malloc((size_t)(P + S) * sizeof *tokens);
    double *ref;
    float *got;
    int s;
    ck_assert_ptr_nonnull(tokens);
    make_tokens(tokens, P + S, 5);
    ref = ref_forward(m, tokens, P + S);
    got = engine_run(dir, FKV_POLICY_DENSE, dt, tokens, P, S);
    for (s = 0; s <= S; s++) {
        double e = rel_err(got + (size_t)s * V, ref + (size_t)(P - 1 + s) * V);
        ck_assert_msg(e <= tol, "step %d: logits rel err %g > %g", s, e, tol);
    }
    free(ref);
    free(got);
    free(tokens);
}

/* Several attention tiles (32 queries x 128 keys). */
static void check_dense(const ck_model *m, const char *dir, fkv_dtype dt, double tol)
{
    check_dense_n(m, dir, dt, tol, 300, 6);
}

static void dense_case(int tied, int scaled, const char *dtype, int sharded)
{
    ck_model m;
    const char *dir = tmpdir();
    ck_build(&m, tied, scaled, 11 + (uint64_t)tied * 3 + (uint64_t)scaled * 5);
    if (sharded)
        ck_write_sharded(&m, dir, dtype);
    else
        ck_write_dir(&m, dir, dtype, NULL);
    check_dense(&m, dir, FKV_DTYPE_F32, 1e-4);
    rmdir_all(dir);
    ck_free(&m);
}

START_TEST(test_llama_dense_f32) { dense_case(0, 0, "F32", 0); }
END_TEST

START_TEST(test_llama_dense_f16_file) { dense_case(0, 0, "F16", 0); }
END_TEST

START_TEST(test_llama_dense_bf16_file) { dense_case(0, 0, "BF16", 0); }
END_TEST

START_TEST(test_llama_tied) { dense_case(1, 0, "F32", 0); }
END_TEST

START_TEST(test_llama_rope_llama3) { dense_case(0, 1, "BF16", 0); }
END_TEST

START_TEST(test_llama_sharded) { dense_case(1, 1, "F16", 1); }
END_TEST

/* K/V/Q handed to the library in f16 / bf16: the same logits within the
 * rounding of those types. */
START_TEST(test_llama_cache_dtypes)
{
    ck_model m;
    const char *dir = tmpdir();
    ck_build(&m, 0, 0, 21);
    ck_write_dir(&m, dir, "F32", NULL);
    check_dense(&m, dir, FKV_DTYPE_F16, 5e-3);
    check_dense(&m, dir, FKV_DTYPE_BF16, 4e-2);
    rmdir_all(dir);
    ck_free(&m);
}
END_TEST

/* A prompt longer than the CPU path's prefill chunk (1024 rows): the
 * chunks' attention over the earlier chunks' keys. */
START_TEST(test_llama_long_prefill)
{
    ck_model m;
    const char *dir = tmpdir();
    ck_build(&m, 0, 0, 61);
    ck_write_dir(&m, dir, "F32", NULL);
    check_dense_n(&m, dir, FKV_DTYPE_F32, 1e-4, 1100, 2);
    rmdir_all(dir);
    ck_free(&m);
}
END_TEST

/* Every policy equals dense while the context (at most 60 tokens) fits the
 * budget (64); beyond it each still runs and gives finite logits. */
START_TEST(test_llama_policies)
{
    static const fkv_policy pols[4] = {FKV_POLICY_DENSE, FKV_POLICY_RESIDENT, FKV_POLICY_SYNC,
                                       FKV_POLICY_FREEKV};
    enum { P = 50, S = 10, P2 = 150, S2 = 12 };
    int32_t tokens[P2 + S2];
    ck_model m;
    const char *dir = tmpdir();
    float *dense, *got;
    int p, i;
    ck_build(&m, 0, 0, 31);
    ck_write_dir(&m, dir, "F32", NULL);
    make_tokens(tokens, P2 + S2, 9);
    dense = engine_run(dir, FKV_POLICY_DENSE, FKV_DTYPE_F32, tokens, P, S);
    for (p = 1; p < 4; p++) {
        got = engine_run(dir, pols[p], FKV_DTYPE_F32, tokens, P, S);
        for (i = 0; i < (S + 1) * V; i++)
            ck_assert_msg(fabsf(got[i] - dense[i]) <= 1e-5f * (1 + fabsf(dense[i])),
                          "policy %d logit %d: %g vs dense %g", p, i, got[i], dense[i]);
        free(got);
    }
    free(dense);
    for (p = 0; p < 4; p++) {
        got = engine_run(dir, pols[p], FKV_DTYPE_F32, tokens, P2, S2);
        for (i = 0; i < (S2 + 1) * V; i++)
            ck_assert_msg(isfinite(got[i]), "policy %d: logit %d not finite", p, i);
        free(got);
    }
    rmdir_all(dir);
    ck_free(&m);
}
END_TEST

/* ---- loader errors -------------------------------------------------------- */

static void expect_load_error(const char *dir, const char *needle)
{
    llama_model m;
    char err[1024] = "";
    ck_assert_msg(llama_model_load(dir, &m, err, sizeof err) != 0, "load of a bad checkpoint succeeded");
    ck_assert_msg(strstr(err, needle) != NULL, "error \"%s\" does not say \"%s\"", err, needle);
}

static void fault_case(const ck_faults *f, const char *needle)
{
    ck_model m;
    const char *dir = tmpdir();
    ck_build(&m, 0, 0, 41);
    ck_write_dir(&m, dir, "F32", f);
    expect_load_error(dir, needle);
    rmdir_all(dir);
    ck_free(&m);
}

START_TEST(test_llama_err_missing_tensor)
{
    ck_faults f = {0};
    f.skip = "model.layers.1.mlp.up_proj.weight";
    fault_case(&f, "model.layers.1.mlp.up_proj.weight\" is missing");
}
END_TEST

START_TEST(test_llama_err_shape)
{
    ck_faults f = {0};
    f.bad_shape = "model.layers.0.self_attn.k_proj.weight";
    fault_case(&f, "has shape [64, 128], expected [128, 64]");
}
END_TEST

START_TEST(test_llama_err_dtype)
{
    ck_faults f = {0};
    f.bad_dtype = "model.norm.weight";
    fault_case(&f, "dtype I32 is not supported");
}
END_TEST

START_TEST(test_llama_err_offsets)
{
    ck_faults f = {0};
    f.offsets_beyond = 1;
    fault_case(&f, "outside the");
}
END_TEST

START_TEST(test_llama_err_overlap)
{
    ck_faults f = {0};
    f.overlap = 1;
    fault_case(&f, "overlap");
}
END_TEST

START_TEST(test_llama_err_size)
{
    ck_faults f = {0};
    f.size_mismatch = 1;
    fault_case(&f, "do not match shape");
}
END_TEST

START_TEST(test_llama_err_truncated)
{
    ck_model m;
    const char *dir = tmpdir();
    char path[512];
    struct stat st;
    ck_build(&m, 0, 0, 43);
    ck_write_dir(&m, dir, "F32", NULL);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ck_assert_int_eq(stat(path, &st), 0);
    /* Data cut short: the last tensors' offsets are beyond the file. */
    ck_assert_int_eq(truncate(path, st.st_size / 2), 0);
    expect_load_error(dir, "truncated");
    /* Header cut short. */
    ck_assert_int_eq(truncate(path, 100), 0);
    expect_load_error(dir, "truncated");
    /* Not even the length. */
    ck_assert_int_eq(truncate(path, 5), 0);
    expect_load_error(dir, "truncated");
    rmdir_all(dir);
    ck_free(&m);
}
END_TEST

START_TEST(test_llama_err_json)
{
    ck_model m;
    const char *dir = tmpdir();
    char path[512];
    ck_build(&m, 0, 0, 47);
    ck_write_dir(&m, dir, "F32", NULL);
    snprintf(path, sizeof path, "%s/config.json", dir);
    write_text(path, "{\"model_type\": \"llama\", \"hidden_size\": 64,");
    expect_load_error(dir, "JSON");
    write_text(path, "{\"model_type\": \"llama\", \"hidden_size\": [64}");
    expect_load_error(dir, "JSON");
    write_text(path, "[1, 2]");
    expect_load_error(dir, "not a JSON object");
    /* A safetensors header that is not JSON. */
    ck_write_config(&m, dir, "llama");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    {
        FILE *fp = fopen(path, "wb");
        unsigned char lb[8] = {16, 0, 0, 0, 0, 0, 0, 0};
        ck_assert_ptr_nonnull(fp);
        fwrite(lb, 1, 8, fp);
        fwrite("{\"a\": nope }    ", 1, 16, fp);
        fclose(fp);
    }
    expect_load_error(dir, "header: JSON");
    rmdir_all(dir);
    ck_free(&m);
}
END_TEST

START_TEST(test_llama_err_model_type)
{
    ck_model m;
    const char *dir = tmpdir();
    char path[512];
    ck_build(&m, 0, 0, 53);
    ck_write_dir(&m, dir, "F32", NULL);
    ck_write_config(&m, dir, "mistral");
    expect_load_error(dir, "model_type \"mistral\" is not supported");
    /* An index naming a shard that is not there. */
    ck_write_config(&m, dir, "llama");
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    write_text(path, "{\"weight_map\": {\"model.norm.weight\": \"model-00001-of-00002.safetensors\"}}");
    expect_load_error(dir, "model-00001-of-00002.safetensors");
    rmdir_all(dir);
    ck_free(&m);
}
END_TEST

Suite *suite_llama(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "llama"));
    TCase *tc;
    /* The engine's CPU path only: nothing to repeat in the GPU run. */
    if (prefix[0])
        return s;
    tc = tst_tcase(s, "forward");
    tcase_add_test(tc, test_llama_dense_f32);
    tcase_add_test(tc, test_llama_dense_f16_file);
    tcase_add_test(tc, test_llama_dense_bf16_file);
    tcase_add_test(tc, test_llama_tied);
    tcase_add_test(tc, test_llama_rope_llama3);
    tcase_add_test(tc, test_llama_sharded);
    tcase_add_test(tc, test_llama_cache_dtypes);
    tcase_add_test(tc, test_llama_long_prefill);
    tcase_add_test(tc, test_llama_policies);
    tc = tst_tcase(s, "loader_errors");
    tcase_add_test(tc, test_llama_err_missing_tensor);
    tcase_add_test(tc, test_llama_err_shape);
    tcase_add_test(tc, test_llama_err_dtype);
    tcase_add_test(tc, test_llama_err_offsets);
    tcase_add_test(tc, test_llama_err_overlap);
    tcase_add_test(tc, test_llama_err_size);
    tcase_add_test(tc, test_llama_err_truncated);
    tcase_add_test(tc, test_llama_err_json);
    tcase_add_test(tc, test_llama_err_model_type);
    return s;
}
