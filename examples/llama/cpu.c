/* CPU forward backend: weights converted to f32 (and transposed) at
 * create, prefill with the engine's own tiled causal attention, the KV cache
 * in libfreekv (FKV_BACKEND_CPU, host pointers), decode through fkv_append /
 * fkv_attend / fkv_select / fkv_recall in every layer. Decode allocates
 * nothing: every buffer it uses is sized at create. */
#include "engine.h"
#include "cpu_math.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Rows of the prompt processed together: bounds the prefill's scratch
 * (the MLP's [rows, intermediate] activations) independently of n. */
#define PREFILL_CHUNK 1024

typedef struct cpu_layer {
    float *attn_norm, *ffn_norm;
    float *wq, *wk, *wv, *wo, *w_gate, *w_up, *w_down; /* transposed [in][out] */
} cpu_layer;

typedef struct kept_prefill {
    int64_t n;
    float **k, **v; /* [layers][n * kvd] */
} kept_prefill;

struct llama_backend {
    llama_config c;
    llama_run_config rc;
    int64_t qd, kvd;
    float *weights;         /* one block for every converted tensor */
    uint64_t weight_bytes;
    float *embed;           /* [vocab][hidden] */
    float *norm;            /* [hidden] */
    float *lm_head;         /* transposed [hidden][vocab] */
    cpu_layer *layer;
    float *inv_freq;        /* [head_dim / 2] */

    fkv_cache *cache;
    fkv_dtype dtype;
    fkv_seq_id *seq;        /* [max_batch] */
    int64_t *pos;           /* [max_batch] tokens held */
    kept_prefill *kept;     /* [max_batch] */

    /* Decode scratch, [max_batch] rows each. */
    float *x, *xn, *q, *k, *v, *att, *gate, *up;
    void *qb, *kb, *vb, *ob; /* in the cache's dtype */
    fkv_seq_id *batch_ids;
    int64_t *batch_pos;
};

static int check_shape(const llama_config *c, char *err, size_t errlen)
{
    if (c->head_dim > 256 || c->head_dim % 32 || c->q_heads / c->kv_heads > 16) {
        llama_errf(err, errlen, "head_dim %d / group %d outside its tiles (head_dim a multiple of 32 up to 256, group up to 16)",
                   c->head_dim, c->q_heads / c->kv_heads);
        return -1;
    }
    return 0;
}

static void convert_plain(float *dst, const llama_tensor *t)
{
    size_t n = t->nbytes / (t->dtype == LLAMA_F32 ? 4 : 2), i;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (i = 0; i < n; i++)
        dst[i] = llama_tensor_get(t, i);
}

/* [out][in] -> [in][out] */
static void convert_transposed(float *dst, const llama_tensor *t)
{
    int64_t out = t->shape[0], in = t->shape[1], o;
#pragma omp parallel for schedule(static)
    for (o = 0; o < out; o++) {
        int64_t i;
        for (i = 0; i < in; i++)
            dst[i * out + o] = llama_tensor_get(t, (size_t)(o * in + i));
    }
}

static void cpu_destroy(llama_backend *b)
{
    int32_t s, l;
    if (!b)
        return;
    fkv_destroy(b->cache);
    if (b->kept)
        for (s = 0; s < b->rc.max_batch; s++) {
            for (l = 0; b->kept[s].k && l < b->c.layers; l++) {
                free(b->kept[s].k[l]);
                free(b->kept[s].v[l]);
            }
            free(b->kept[s].k);
            free(b->kept[s].v);
        }
    free(b->kept);
    free(b->weights);
    free(b->layer);
    free(b->inv_freq);
    free(b->seq);
    free(b->pos);
    free(b->x); free(b->xn); free(b->q); free(b->k); free(b->v); free(b->att);
    free(b->gate); free(b->up);
    free(b->qb); free(b->kb); free(b->vb); free(b->ob);
    free(b->batch_ids);
    free(b->batch_pos);
    free(b);
}

static int cpu_create(const llama_model *m, const llama_run_config *rc,
                      llama_backend **out, char *err, size_t errlen)
{
    llama_backend *b;
    const llama_config *c = &m->cfg;
    size_t total, off = 0, B;
    int32_t l, i;
    double *invd;
    *out = NULL;
    if (rc->max_batch < 1 || rc->max_context < 1) {
        llama_errf(err, errlen, "cpu backend: max_batch and max_context must be >= 1");
        return -1;
    }
    if (check_shape(c, err, errlen))
        return -1;
#ifdef _OPENMP
    if (rc->threads > 0)
        omp_set_num_threads(rc->threads);
#endif
    b = calloc(1, sizeof *b);
    if (!b)
        goto oom;
    b->c = *c;
    b->rc = *rc;
    b->qd = (int64_t)c->q_heads * c->head_dim;
    b->kvd = (int64_t)c->kv_heads * c->head_dim;
    /* Decode scratch rows: a batch of slots, or one slot's verify tokens. */
    B = (size_t)(rc->max_batch > LLAMA_MAX_VERIFY ? rc->max_batch : LLAMA_MAX_VERIFY);

    total = (size_t)c->vocab * c->hidden * 2 + (size_t)c->hidden;
    total += (size_t)c->layers * ((size_t)c->hidden * 2 + (size_t)b->qd * c->hidden * 2 +
                                  (size_t)b->kvd * c->hidden * 2 +
                                  (size_t)c->intermediate * c->hidden * 3);
    b->weights = malloc(total * sizeof(float));
    b->layer = calloc((size_t)c->layers, sizeof *b->layer);
    b->inv_freq = malloc((size_t)(c->head_dim / 2) * sizeof(float));
    invd = malloc((size_t)(c->head_dim / 2) * sizeof(double));
    if (!b->weights || !b->layer || !b->inv_freq || !invd) {
        free(invd);
        goto oom;
    }
    b->weight_bytes = total * sizeof(float);
    llama_rope_inv_freq(c, invd);
    for (i = 0; i < c->head_dim / 2; i++)
        b->inv_freq[i] = (float)invd[i];
    free(invd);

#define TAKE(n_) (off += (size_t)(n_), b->weights + off - (size_t)(n_))
    b->embed = TAKE((size_t)c->vocab * c->hidden);
    convert_plain(b->embed, m->embed);
    b->norm = TAKE(c->hidden);
    convert_plain(b->norm, m->norm);
    b->lm_head = TAKE((size_t)c->vocab * c->hidden);
    convert_transposed(b->lm_head, m->lm_head);
    for (l = 0; l < c->layers; l++) {
        const llama_layer *L = &m->layer[l];
        cpu_layer *C = &b->layer[l];
        C->attn_norm = TAKE(c->hidden);
        convert_plain(C->attn_norm, L->attn_norm);
        C->ffn_norm = TAKE(c->hidden);
        convert_plain(C->ffn_norm, L->ffn_norm);
        C->wq = TAKE((size_t)b->qd * c->hidden);
        convert_transposed(C->wq, L->wq);
        C->wk = TAKE((size_t)b->kvd * c->hidden);
        convert_transposed(C->wk, L->wk);
        C->wv = TAKE((size_t)b->kvd * c->hidden);
        convert_transposed(C->wv, L->wv);
        C->wo = TAKE((size_t)b->qd * c->hidden);
        convert_transposed(C->wo, L->wo);
        C->w_gate = TAKE((size_t)c->intermediate * c->hidden);
        convert_transposed(C->w_gate, L->w_gate);
        C->w_up = TAKE((size_t)c->intermediate * c->hidden);
        convert_transposed(C->w_up, L->w_up);
        C->w_down = TAKE((size_t)c->intermediate * c->hidden);
        convert_transposed(C->w_down, L->w_down);
    }
#undef TAKE

    b->seq = calloc((size_t)rc->max_batch, sizeof *b->seq);
    b->pos = calloc((size_t)rc->max_batch, sizeof *b->pos);
    b->kept = calloc((size_t)rc->max_batch, sizeof *b->kept);
    b->x = malloc(B * (size_t)c->hidden * sizeof(float));
    b->xn = malloc(B * (size_t)c->hidden * sizeof(float));
    b->q = malloc(B * (size_t)b->qd * sizeof(float));
    b->att = malloc(B * (size_t)b->qd * sizeof(float));
    b->k = malloc(B * (size_t)b->kvd * sizeof(float));
    b->v = malloc(B * (size_t)b->kvd * sizeof(float));
    b->gate = malloc(B * (size_t)c->intermediate * sizeof(float));
    b->up = malloc(B * (size_t)c->intermediate * sizeof(float));
    b->qb = malloc(B * (size_t)b->qd * sizeof(float));
    b->ob = malloc(B * (size_t)b->qd * sizeof(float));
    b->kb = malloc(B * (size_t)b->kvd * sizeof(float));
    b->vb = malloc(B * (size_t)b->kvd * sizeof(float));
    b->batch_ids = malloc(B * sizeof *b->batch_ids);
    b->batch_pos = malloc(B * sizeof *b->batch_pos);
    if (!b->seq || !b->pos || !b->kept || !b->x || !b->xn || !b->q || !b->att || !b->k ||
        !b->v || !b->gate || !b->up || !b->qb || !b->ob || !b->kb || !b->vb ||
        !b->batch_ids || !b->batch_pos)
        goto oom;
    *out = b;
    return 0;
oom:
    cpu_destroy(b);
    llama_errf(err, errlen, "cpu backend: out of memory for the weights and buffers");
    return -1;
}

static int cpu_cache_open(llama_backend *b, const fkv_options *opts, char *err,
                          size_t errlen)
{
    fkv_options o = *opts;
    fkv_cache *nc = NULL;
    int32_t s;
    o.backend = FKV_BACKEND_CPU;
    o.num_layers = b->c.layers;
    o.num_q_heads = b->c.q_heads;
    o.num_kv_heads = b->c.kv_heads;
    o.head_dim = b->c.head_dim;
    o.max_sequences = b->rc.max_batch;
    o.max_tokens_per_sequence = b->rc.max_context;
    if (llama_fkv_check(fkv_create(&o, &nc), NULL, "fkv_create", err, errlen))
        return -1;
    for (s = 0; s < b->rc.max_batch; s++)
        if (llama_fkv_check(fkv_seq_open(nc, &b->seq[s]), nc, "fkv_seq_open", err, errlen)) {
            fkv_destroy(nc);
            return -1;
        }
    fkv_destroy(b->cache);
    b->cache = nc;
    b->dtype = o.dtype;
    for (s = 0; s < b->rc.max_batch; s++)
        b->pos[s] = 0;
    return 0;
}

static int slot_ok(llama_backend *b, int32_t slot, int need_empty, char *err, size_t errlen)
{
    if (!b->cache) {
        llama_errf(err, errlen, "cpu backend: no cache (cache_open first)");
        return -1;
    }
    if (slot < 0 || slot >= b->rc.max_batch) {
        llama_errf(err, errlen, "cpu backend: slot %d outside [0, %d)", slot, b->rc.max_batch);
        return -1;
    }
    if (need_empty && b->pos[slot]) {
        llama_errf(err, errlen, "cpu backend: slot %d is not empty", slot);
        return -1;
    }
    return 0;
}

static int cpu_slot_reset(llama_backend *b, int32_t slot, char *err, size_t errlen)
{
    fkv_seq_id ns;
    if (slot_ok(b, slot, 0, err, errlen))
        return -1;
    if (llama_fkv_check(fkv_seq_close(b->cache, b->seq[slot]), b->cache, "fkv_seq_close", err, errlen) ||
        llama_fkv_check(fkv_seq_open(b->cache, &ns), b->cache, "fkv_seq_open", err, errlen))
        return -1;
    b->seq[slot] = ns;
    b->pos[slot] = 0;
    return 0;
}

/* One bulk append per layer of a prompt's K/V (f32, [n][kvd]). */
static int append_prompt(llama_backend *b, int32_t slot, int32_t layer, const float *k,
                         const float *v, int64_t n, void *conv, char *err, size_t errlen)
{
    int32_t nt = (int32_t)n;
    fkv_batch bt = {1, 0, &b->seq[slot], &nt};
    size_t cnt = (size_t)n * (size_t)b->kvd, es = llama_fkv_dtype_size(b->dtype);
    const void *kp = k, *vp = v;
    if (b->dtype != FKV_DTYPE_F32) {
        llama_convert_from_f32(b->dtype, k, conv, cnt);
        llama_convert_from_f32(b->dtype, v, (char *)conv + cnt * es, cnt);
        kp = conv;
        vp = (char *)conv + cnt * es;
    }
    return llama_fkv_check(fkv_append(b->cache, layer, &bt, kp, vp), b->cache, "fkv_append",
                           err, errlen);
}

static void drop_kept(llama_backend *b, int32_t slot)
{
    kept_prefill *kp = &b->kept[slot];
    int32_t l;
    for (l = 0; kp->k && l < b->c.layers; l++) {
        free(kp->k[l]);
        free(kp->v[l]);
    }
    free(kp->k);
    free(kp->v);
    memset(kp, 0, sizeof *kp);
}

static int cpu_prefill(llama_backend *b, int32_t slot, const int32_t *tokens, int64_t n,
                       float *logits, char *err, size_t errlen)
{
    const llama_config *c = &b->c;
    int64_t H = c->hidden, I = c->intermediate, qd = b->qd, kvd = b->kvd, t, r0;
    int64_t chunk = n < PREFILL_CHUNK ? n : PREFILL_CHUNK;
    float *x = NULL, *xn = NULL, *q = NULL, *att = NULL, *g = NULL, *u = NULL;
    float *kf = NULL, *vf = NULL;
    void *conv = NULL;
    float scale = 1.0f / sqrtf((float)c->head_dim);
    int32_t l;
    int rc = -1;
    if (slot_ok(b, slot, 1, err, errlen))
        return -1;
    if (n < 1 || n > b->rc.max_context || n > INT32_MAX) {
        llama_errf(err, errlen, "prefill: %lld tokens (must be in [1, %lld])", (long long)n,
                   (long long)b->rc.max_context);
        return -1;
    }
    for (t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= c->vocab) {
            llama_errf(err, errlen, "prefill: token %d at %lld outside the vocabulary [0, %d)",
                       tokens[t], (long long)t, c->vocab);
            return -1;
        }
    drop_kept(b, slot);
    x = malloc((size_t)n * H * sizeof(float));
    xn = malloc((size_t)chunk * H * sizeof(float));
    q = malloc((size_t)chunk * qd * sizeof(float));
    att = malloc((size_t)chunk * qd * sizeof(float));
    g = malloc((size_t)chunk * I * sizeof(float));
    u = malloc((size_t)chunk * I * sizeof(float));
    if (b->dtype != FKV_DTYPE_F32)
        conv = malloc((size_t)n * kvd * 2 * llama_fkv_dtype_size(b->dtype));
    if (!x || !xn || !q || !att || !g || !u || (b->dtype != FKV_DTYPE_F32 && !conv))
        goto oom;
    if (b->rc.keep_prefill) {
        b->kept[slot].k = calloc((size_t)c->layers, sizeof(float *));
        b->kept[slot].v = calloc((size_t)c->layers, sizeof(float *));
        if (!b->kept[slot].k || !b->kept[slot].v)
            goto oom;
    }
    for (t = 0; t < n; t++)
        memcpy(x + t * H, b->embed + (int64_t)tokens[t] * H, (size_t)H * sizeof(float));
    for (l = 0; l < c->layers; l++) {
        const cpu_layer *L = &b->layer[l];
        kf = malloc((size_t)n * kvd * sizeof(float));
        vf = malloc((size_t)n * kvd * sizeof(float));
        if (!kf || !vf)
            goto oom;
        for (r0 = 0; r0 < n; r0 += chunk) {
            int64_t m = n - r0 < chunk ? n - r0 : chunk;
            float *xc = x + r0 * H;
            cpu_rmsnorm(xn, xc, L->attn_norm, m, H, (float)c->rms_norm_eps);
            cpu_matmul(q, xn, L->wq, m, H, qd, 0);
            cpu_matmul(kf + r0 * kvd, xn, L->wk, m, H, kvd, 0);
            cpu_matmul(vf + r0 * kvd, xn, L->wv, m, H, kvd, 0);
            cpu_rope(q, m, c->q_heads, c->head_dim, NULL, r0, b->inv_freq);
            cpu_rope(kf + r0 * kvd, m, c->kv_heads, c->head_dim, NULL, r0, b->inv_freq);
            cpu_causal_attention(att, q, kf, vf, r0, r0 + m, c->q_heads, c->kv_heads,
                                 c->head_dim, scale);
            cpu_matmul(xc, att, L->wo, m, qd, H, 1);
            cpu_rmsnorm(xn, xc, L->ffn_norm, m, H, (float)c->rms_norm_eps);
            cpu_matmul(g, xn, L->w_gate, m, H, I, 0);
            cpu_matmul(u, xn, L->w_up, m, H, I, 0);
            cpu_swiglu(g, g, u, m * I);
            cpu_matmul(xc, g, L->w_down, m, I, H, 1);
        }
        if (append_prompt(b, slot, l, kf, vf, n, conv, err, errlen))
            goto out; /* the slot is reset below: no partial prompt stays */
        if (b->rc.keep_prefill) {
            b->kept[slot].k[l] = kf;
            b->kept[slot].v[l] = vf;
        } else {
            free(kf);
            free(vf);
        }
        kf = vf = NULL;
    }
    if (b->rc.keep_prefill)
        b->kept[slot].n = n;
    b->pos[slot] = n;
    if (logits) {
        cpu_rmsnorm(xn, x + (n - 1) * H, b->norm, 1, H, (float)c->rms_norm_eps);
        cpu_matmul(logits, xn, b->lm_head, 1, H, c->vocab, 0);
    }
    rc = 0;
    goto out;
oom:
    llama_errf(err, errlen, "prefill: out of memory for %lld tokens", (long long)n);
out:
    if (rc) {
        drop_kept(b, slot);
        /* Empty the slot again (some layers may hold the prompt). */
        {
            fkv_seq_id ns;
            if (fkv_seq_close(b->cache, b->seq[slot]) == FKV_OK &&
                fkv_seq_open(b->cache, &ns) == FKV_OK)
                b->seq[slot] = ns;
        }
        b->pos[slot] = 0;
    }
    free(kf); free(vf);
    free(x); free(xn); free(q); free(att); free(g); free(u); free(conv);
    return rc;
}

static int cpu_replay_prefill(llama_backend *b, int32_t slot, char *err, size_t errlen)
{
    kept_prefill *kp;
    void *conv = NULL;
    int32_t l;
    if (slot_ok(b, slot, 1, err, errlen))
        return -1;
    kp = &b->kept[slot];
    if (!kp->n) {
        llama_errf(err, errlen, "replay_prefill: slot %d kept no prefill (keep_prefill off?)", slot);
        return -1;
    }
    if (b->dtype != FKV_DTYPE_F32) {
        conv = malloc((size_t)kp->n * b->kvd * 2 * llama_fkv_dtype_size(b->dtype));
        if (!conv) {
            llama_errf(err, errlen, "replay_prefill: out of memory");
            return -1;
        }
    }
    for (l = 0; l < b->c.layers; l++)
        if (append_prompt(b, slot, l, kp->k[l], kp->v[l], kp->n, conv, err, errlen)) {
            free(conv);
            return -1;
        }
    free(conv);
    b->pos[slot] = kp->n;
    return 0;
}

static int cpu_fill_random(llama_backend *b, int32_t slot, int64_t n, uint64_t seed,
                           char *err, size_t errlen)
{
    const int64_t CH = 4096;
    int64_t kvd = b->kvd, t0, i;
    float *k, *v;
    void *conv = NULL;
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    int32_t l;
    if (slot_ok(b, slot, 1, err, errlen))
        return -1;
    if (n < 1 || n > b->rc.max_context) {
        llama_errf(err, errlen, "fill_random: %lld tokens (must be in [1, %lld])", (long long)n,
                   (long long)b->rc.max_context);
        return -1;
    }
    k = malloc((size_t)CH * kvd * sizeof(float));
    v = malloc((size_t)CH * kvd * sizeof(float));
    if (b->dtype != FKV_DTYPE_F32)
        conv = malloc((size_t)CH * kvd * 2 * llama_fkv_dtype_size(b->dtype));
    if (!k || !v || (b->dtype != FKV_DTYPE_F32 && !conv)) {
        free(k); free(v); free(conv);
        llama_errf(err, errlen, "fill_random: out of memory");
        return -1;
    }
    for (t0 = 0; t0 < n; t0 += CH) {
        int64_t m = n - t0 < CH ? n - t0 : CH;
        for (l = 0; l < b->c.layers; l++) {
            for (i = 0; i < m * kvd; i++) {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                k[i] = (float)((s >> 40) * (1.0 / 8388608.0)) - 1.0f;
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                v[i] = (float)((s >> 40) * (1.0 / 8388608.0)) - 1.0f;
            }
            if (append_prompt(b, slot, l, k, v, m, conv, err, errlen)) {
                free(k); free(v); free(conv);
                cpu_slot_reset(b, slot, NULL, 0);
                return -1;
            }
        }
    }
    free(k); free(v); free(conv);
    b->pos[slot] = n;
    return 0;
}

#define FKV(call, what)                                                       \
    do {                                                                      \
        if (llama_fkv_check((call), b->cache, what, err, errlen))             \
            return -1;                                                        \
    } while (0)

/* A layer's work before the cache, for n rows of b->x at b->batch_pos:
 * norm, Q/K/V, RoPE, and the cache dtype's copies; *qp.. point at what
 * fkv_append and fkv_attend take, *op where fkv_attend writes. */
static void cpu_layer_qkv(llama_backend *b, const cpu_layer *L, int32_t n, const void **qp,
                          const void **kp, const void **vp, void **op)
{
    const llama_config *c = &b->c;
    int64_t H = c->hidden, qd = b->qd, kvd = b->kvd;
    float eps = (float)c->rms_norm_eps;
    cpu_rmsnorm(b->xn, b->x, L->attn_norm, n, H, eps);
    cpu_matmul(b->q, b->xn, L->wq, n, H, qd, 0);
    cpu_matmul(b->k, b->xn, L->wk, n, H, kvd, 0);
    cpu_matmul(b->v, b->xn, L->wv, n, H, kvd, 0);
    cpu_rope(b->q, n, c->q_heads, c->head_dim, b->batch_pos, 0, b->inv_freq);
    cpu_rope(b->k, n, c->kv_heads, c->head_dim, b->batch_pos, 0, b->inv_freq);
    *qp = b->q;
    *kp = b->k;
    *vp = b->v;
    *op = b->att;
    if (b->dtype != FKV_DTYPE_F32) {
        llama_convert_from_f32(b->dtype, b->q, b->qb, (size_t)n * qd);
        llama_convert_from_f32(b->dtype, b->k, b->kb, (size_t)n * kvd);
        llama_convert_from_f32(b->dtype, b->v, b->vb, (size_t)n * kvd);
        *qp = b->qb;
        *kp = b->kb;
        *vp = b->vb;
        *op = b->ob;
    }
}

/* A layer's work after the cache: the attention output (in the cache
 * dtype's copy if not f32) through o_proj into the residual, then the
 * MLP. */
static void cpu_layer_out(llama_backend *b, const cpu_layer *L, int32_t n)
{
    const llama_config *c = &b->c;
    int64_t H = c->hidden, I = c->intermediate, qd = b->qd;
    float eps = (float)c->rms_norm_eps;
    if (b->dtype != FKV_DTYPE_F32)
        llama_convert_to_f32(b->dtype, b->ob, b->att, (size_t)n * qd);
    cpu_matmul(b->x, b->att, L->wo, n, qd, H, 1);
    cpu_rmsnorm(b->xn, b->x, L->ffn_norm, n, H, eps);
    cpu_matmul(b->gate, b->xn, L->w_gate, n, H, I, 0);
    cpu_matmul(b->up, b->xn, L->w_up, n, H, I, 0);
    cpu_swiglu(b->gate, b->gate, b->up, (int64_t)n * I);
    cpu_matmul(b->x, b->gate, L->w_down, n, I, H, 1);
}

static int cpu_decode(llama_backend *b, int32_t n, const int32_t *slots,
                      const int32_t *tokens, float *logits, char *err, size_t errlen)
{
    const llama_config *c = &b->c;
    int64_t H = c->hidden;
    float eps = (float)c->rms_norm_eps;
    fkv_batch bt;
    int32_t i, j, l;
    if (!b->cache) {
        llama_errf(err, errlen, "decode: no cache (cache_open first)");
        return -1;
    }
    if (n < 1 || n > b->rc.max_batch) {
        llama_errf(err, errlen, "decode: batch of %d (must be in [1, %d])", n, b->rc.max_batch);
        return -1;
    }
    for (i = 0; i < n; i++) {
        if (slots[i] < 0 || slots[i] >= b->rc.max_batch) {
            llama_errf(err, errlen, "decode: slot %d outside [0, %d)", slots[i], b->rc.max_batch);
            return -1;
        }
        for (j = 0; j < i; j++)
            if (slots[j] == slots[i]) {
                llama_errf(err, errlen, "decode: slot %d twice in one batch", slots[i]);
                return -1;
            }
        if (tokens[i] < 0 || tokens[i] >= c->vocab) {
            llama_errf(err, errlen, "decode: token %d outside the vocabulary [0, %d)", tokens[i], c->vocab);
            return -1;
        }
        if (b->pos[slots[i]] >= b->rc.max_context) {
            llama_errf(err, errlen, "decode: slot %d is at max_context %lld", slots[i],
                       (long long)b->rc.max_context);
            return -1;
        }
        b->batch_ids[i] = b->seq[slots[i]];
        b->batch_pos[i] = b->pos[slots[i]];
        memcpy(b->x + (int64_t)i * H, b->embed + (int64_t)tokens[i] * H, (size_t)H * sizeof(float));
    }
    bt.num_seqs = n;
    bt.reserved = 0;
    bt.seq_ids = b->batch_ids;
    bt.num_tokens = NULL;
    for (l = 0; l < c->layers; l++) {
        const cpu_layer *L = &b->layer[l];
        const void *qp, *kp, *vp;
        void *op;
        cpu_layer_qkv(b, L, n, &qp, &kp, &vp, &op);
        /* A failure here leaves earlier layers one token ahead; the caller
         * resets the slots (the engine treats it as fatal for them). */
        FKV(fkv_append(b->cache, l, &bt, kp, vp), "fkv_append");
        FKV(fkv_attend(b->cache, l, &bt, qp, op), "fkv_attend");
        FKV(fkv_select(b->cache, l, &bt, NULL), "fkv_select"); /* attend's q */
        FKV(fkv_recall(b->cache, l, &bt), "fkv_recall");
        cpu_layer_out(b, L, n);
    }
    cpu_rmsnorm(b->xn, b->x, b->norm, n, H, eps);
    cpu_matmul(logits, b->xn, b->lm_head, n, H, c->vocab, 0);
    for (i = 0; i < n; i++)
        b->pos[slots[i]]++;
    return 0;
}

/* The decode step for n tokens of one slot at once (speculative
 * verification): the same math as cpu_decode with n rows at positions
 * pos..pos+n-1, their K/V appended with one fkv_append per layer and
 * attended causally with fkv_attend_tokens. Allocates nothing (the scratch
 * has LLAMA_MAX_VERIFY rows). */
static int cpu_verify(llama_backend *b, int32_t slot, const int32_t *tokens, int32_t n,
                      float *logits, char *err, size_t errlen)
{
    const llama_config *c = &b->c;
    int64_t H = c->hidden, qd = b->qd, pos0;
    float eps = (float)c->rms_norm_eps;
    size_t es;
    fkv_batch bt, b1;
    int32_t i, l;
    if (slot_ok(b, slot, 0, err, errlen))
        return -1;
    if (n < 1 || n > LLAMA_MAX_VERIFY) {
        llama_errf(err, errlen, "verify: %d tokens (must be in [1, %d])", n, LLAMA_MAX_VERIFY);
        return -1;
    }
    pos0 = b->pos[slot];
    if (pos0 < 1 || pos0 + n > b->rc.max_context) {
        llama_errf(err, errlen, "verify: slot %d holds %lld tokens; %d more need a prefilled slot within max_context %lld",
                   slot, (long long)pos0, n, (long long)b->rc.max_context);
        return -1;
    }
    for (i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= c->vocab) {
            llama_errf(err, errlen, "verify: token %d outside the vocabulary [0, %d)", tokens[i], c->vocab);
            return -1;
        }
        b->batch_pos[i] = pos0 + i;
        memcpy(b->x + (int64_t)i * H, b->embed + (int64_t)tokens[i] * H, (size_t)H * sizeof(float));
    }
    es = llama_fkv_dtype_size(b->dtype);
    bt.num_seqs = 1;
    bt.reserved = 0;
    bt.seq_ids = &b->seq[slot];
    bt.num_tokens = &n;
    b1 = bt;
    b1.num_tokens = NULL;
    for (l = 0; l < c->layers; l++) {
        const cpu_layer *L = &b->layer[l];
        const void *qp, *kp, *vp;
        void *op;
        fkv_status st;
        const char *what;
        cpu_layer_qkv(b, L, n, &qp, &kp, &vp, &op);
        /* The selection is made with the last token's query, as
         * fkv_attend_tokens shares it among the tokens. */
        what = "fkv_append";
        st = fkv_append(b->cache, l, &bt, kp, vp);
        if (st == FKV_OK && (what = "fkv_attend_tokens",
                             st = fkv_attend_tokens(b->cache, l, &bt, qp, op)) == FKV_OK &&
            (what = "fkv_select",
             st = fkv_select(b->cache, l, &b1, (const char *)qp + (size_t)(n - 1) * qd * es)) == FKV_OK)
            what = "fkv_recall", st = fkv_recall(b->cache, l, &b1);
        if (st != FKV_OK) {
            llama_fkv_check(st, b->cache, what, err, errlen);
            /* Earlier layers hold the n tokens: one truncate drops them. */
            fkv_seq_truncate(b->cache, b->seq[slot], pos0);
            return -1;
        }
        cpu_layer_out(b, L, n);
    }
    cpu_rmsnorm(b->xn, b->x, b->norm, n, H, eps);
    cpu_matmul(logits, b->xn, b->lm_head, n, H, c->vocab, 0);
    b->pos[slot] = pos0 + n;
    return 0;
}

static int cpu_truncate(llama_backend *b, int32_t slot, int64_t length, char *err,
                        size_t errlen)
{
    if (slot_ok(b, slot, 0, err, errlen))
        return -1;
    if (length < 0 || length > b->pos[slot]) {
        llama_errf(err, errlen, "truncate: length %lld outside [0, %lld]", (long long)length,
                   (long long)b->pos[slot]);
        return -1;
    }
    if (llama_fkv_check(fkv_seq_truncate(b->cache, b->seq[slot], length), b->cache,
                        "fkv_seq_truncate", err, errlen))
        return -1;
    b->pos[slot] = length;
    return 0;
}

static int cpu_stats(llama_backend *b, fkv_stats *st, char *err, size_t errlen)
{
    if (!b->cache) {
        llama_errf(err, errlen, "stats: no cache");
        return -1;
    }
    st->struct_size = sizeof *st;
    return llama_fkv_check(fkv_get_stats(b->cache, st), b->cache, "fkv_get_stats", err, errlen);
}

static uint64_t cpu_weight_bytes(llama_backend *b)
{
    return b->weight_bytes;
}

const llama_backend_ops llama_cpu_backend = {
    "cpu",
    cpu_create,
    cpu_destroy,
    cpu_cache_open,
    cpu_slot_reset,
    cpu_prefill,
    cpu_replay_prefill,
    cpu_fill_random,
    cpu_decode,
    cpu_stats,
    cpu_weight_bytes,
};

const llama_verify_ops llama_cpu_verify = {
    cpu_verify,
    cpu_truncate,
};
