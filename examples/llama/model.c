/* Loader: config.json, model.safetensors or the shards of
 * model.safetensors.index.json, mapped read-only. Every header is checked
 * against its file (offsets inside the data, no overlap, size matching
 * shape * dtype) before any tensor is used, so a bad file is an error
 * message, never an out-of-bounds read. */
#define _POSIX_C_SOURCE 200809L
#include "engine.h"
#include "json.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* A header larger than this is not a checkpoint header. */
#define MAX_HEADER_BYTES ((uint64_t)256 << 20)
#define MAX_CONFIG_BYTES ((size_t)16 << 20)

static char *join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p)
        return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

/* Reads a whole small file; NULL (message in err) on failure. */
static char *read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t cap = 0, n = 0;
    if (!f) {
        llama_errf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    for (;;) {
        if (n == cap) {
            char *nb;
            if (cap >= MAX_CONFIG_BYTES) {
                llama_errf(err, errlen, "%s: larger than %zu bytes", path, MAX_CONFIG_BYTES);
                free(buf);
                fclose(f);
                return NULL;
            }
            cap = cap ? cap * 2 : 4096;
            nb = realloc(buf, cap + 1);
            if (!nb) {
                llama_errf(err, errlen, "%s: out of memory", path);
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0)
            break;
    }
    if (ferror(f)) {
        llama_errf(err, errlen, "%s: read error", path);
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

static json_value *read_json(const char *path, char *err, size_t errlen)
{
    size_t len;
    char msg[256];
    char *text = read_file(path, &len, err, errlen);
    json_value *v;
    if (!text)
        return NULL;
    v = json_parse(text, len, msg, sizeof msg);
    free(text);
    if (!v)
        llama_errf(err, errlen, "%s: %s", path, msg);
    else if (v->type != JSON_OBJECT) {
        llama_errf(err, errlen, "%s: not a JSON object", path);
        json_free(v);
        v = NULL;
    }
    return v;
}

/* An integer field: 1 found, 0 absent, -1 malformed. */
static int get_int(const json_value *o, const char *key, int64_t lo, int64_t hi,
                   int64_t *out, const char *file, char *err, size_t errlen)
{
    const json_value *v = json_get(o, key);
    if (!v || v->type == JSON_NULL)
        return 0;
    if (v->type != JSON_NUMBER || v->number != floor(v->number) ||
        v->number < (double)lo || v->number > (double)hi) {
        llama_errf(err, errlen, "%s: \"%s\" must be an integer in [%lld, %lld]",
                   file, key, (long long)lo, (long long)hi);
        return -1;
    }
    *out = (int64_t)v->number;
    return 1;
}

static int get_num(const json_value *o, const char *key, double lo, double *out,
                   const char *file, char *err, size_t errlen)
{
    const json_value *v = json_get(o, key);
    if (!v || v->type == JSON_NULL)
        return 0;
    if (v->type != JSON_NUMBER || !(v->number > lo) || !isfinite(v->number)) {
        llama_errf(err, errlen, "%s: \"%s\" must be a number > %g", file, key, lo);
        return -1;
    }
    *out = v->number;
    return 1;
}

static int parse_config(const json_value *j, const char *file, llama_config *c,
                        char *err, size_t errlen)
{
    const json_value *mt = json_get(j, "model_type"), *v;
    int64_t x;
    memset(c, 0, sizeof *c);
    if (!mt || mt->type != JSON_STRING) {
        llama_errf(err, errlen, "%s: no \"model_type\"", file);
        return -1;
    }
    if (strcmp(mt->string, "llama")) {
        llama_errf(err, errlen, "%s: model_type \"%s\" is not supported (only \"llama\")",
                   file, mt->string);
        return -1;
    }
#define REQ(key, field, hi)                                                  \
    do {                                                                     \
        int r_ = get_int(j, key, 1, hi, &x, file, err, errlen);              \
        if (r_ < 0) return -1;                                               \
        if (r_ == 0) {                                                       \
            llama_errf(err, errlen, "%s: \"%s\" is missing", file, key);     \
            return -1;                                                       \
        }                                                                    \
        c->field = (int32_t)x;                                               \
    } while (0)
    REQ("hidden_size", hidden, 1 << 20);
    REQ("intermediate_size", intermediate, 1 << 22);
    REQ("num_hidden_layers", layers, 4096);
    REQ("num_attention_heads", q_heads, 4096);
    REQ("vocab_size", vocab, 1 << 24);
#undef REQ
    c->kv_heads = c->q_heads;
    if (get_int(j, "num_key_value_heads", 1, 4096, &x, file, err, errlen) < 0) return -1;
    else if (json_get(j, "num_key_value_heads") && json_get(j, "num_key_value_heads")->type == JSON_NUMBER)
        c->kv_heads = (int32_t)x;
    if (c->q_heads % c->kv_heads) {
        llama_errf(err, errlen, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                   file, c->q_heads, c->kv_heads);
        return -1;
    }
    c->head_dim = c->hidden / c->q_heads;
    {
        int r = get_int(j, "head_dim", 2, 1 << 16, &x, file, err, errlen);
        if (r < 0) return -1;
        if (r > 0) c->head_dim = (int32_t)x;
        else if (c->hidden % c->q_heads) {
            llama_errf(err, errlen, "%s: hidden_size is not a multiple of num_attention_heads and head_dim is missing", file);
            return -1;
        }
    }
    if (c->head_dim % 2) {
        llama_errf(err, errlen, "%s: head_dim %d is odd (RoPE needs pairs)", file, c->head_dim);
        return -1;
    }
    if (get_int(j, "max_position_embeddings", 1, INT64_MAX / 2, &c->max_position, file, err, errlen) < 0)
        return -1;
    c->rope_theta = 10000.0;
    if (get_num(j, "rope_theta", 0.0, &c->rope_theta, file, err, errlen) < 0) return -1;
    c->rms_norm_eps = 1e-6;
    if (get_num(j, "rms_norm_eps", 0.0, &c->rms_norm_eps, file, err, errlen) < 0) return -1;
    v = json_get(j, "tie_word_embeddings");
    if (v && v->type == JSON_BOOL)
        c->tie_embeddings = v->number != 0;
    else if (v && v->type != JSON_NULL) {
        llama_errf(err, errlen, "%s: \"tie_word_embeddings\" must be true or false", file);
        return -1;
    }
    v = json_get(j, "hidden_act");
    if (v && v->type == JSON_STRING && strcmp(v->string, "silu")) {
        llama_errf(err, errlen, "%s: hidden_act \"%s\" is not supported (only \"silu\")", file, v->string);
        return -1;
    }
    v = json_get(j, "attention_bias");
    if (v && v->type == JSON_BOOL && v->number) {
        llama_errf(err, errlen, "%s: attention_bias is not supported", file);
        return -1;
    }
    v = json_get(j, "mlp_bias");
    if (v && v->type == JSON_BOOL && v->number) {
        llama_errf(err, errlen, "%s: mlp_bias is not supported", file);
        return -1;
    }
    v = json_get(j, "rope_scaling");
    if (v && v->type == JSON_OBJECT) {
        const json_value *t = json_get(v, "rope_type");
        llama_rope_scaling *rs = &c->rope_scaling;
        if (!t)
            t = json_get(v, "type");
        if (!t || t->type != JSON_STRING || strcmp(t->string, "llama3")) {
            llama_errf(err, errlen, "%s: rope_scaling type \"%s\" is not supported (only \"llama3\")",
                       file, t && t->type == JSON_STRING ? t->string : "?");
            return -1;
        }
        if (get_num(v, "factor", 0.0, &rs->factor, file, err, errlen) <= 0 ||
            get_num(v, "low_freq_factor", 0.0, &rs->low_freq_factor, file, err, errlen) <= 0 ||
            get_num(v, "high_freq_factor", 0.0, &rs->high_freq_factor, file, err, errlen) <= 0 ||
            get_num(v, "original_max_position_embeddings", 0.0,
                    &rs->original_max_position_embeddings, file, err, errlen) <= 0) {
            if (!err || !err[0] || !strstr(err, "must"))
                llama_errf(err, errlen, "%s: rope_scaling needs factor, low_freq_factor, "
                           "high_freq_factor and original_max_position_embeddings", file);
            return -1;
        }
        if (!(rs->high_freq_factor > rs->low_freq_factor)) {
            llama_errf(err, errlen, "%s: rope_scaling high_freq_factor must exceed low_freq_factor", file);
            return -1;
        }
        rs->enabled = 1;
    } else if (v && v->type != JSON_NULL) {
        llama_errf(err, errlen, "%s: rope_scaling must be an object or null", file);
        return -1;
    }
    return 0;
}

/* ---- safetensors ---------------------------------------------------------- */

static int dtype_from_string(const char *s, llama_dtype *d)
{
    if (!strcmp(s, "F32")) *d = LLAMA_F32;
    else if (!strcmp(s, "F16")) *d = LLAMA_F16;
    else if (!strcmp(s, "BF16")) *d = LLAMA_BF16;
    else return -1;
    return 0;
}

static size_t dtype_size(llama_dtype d) { return d == LLAMA_F32 ? 4 : 2; }

typedef struct span { uint64_t begin, end; const char *name; } span;

static int span_cmp(const void *a, const void *b)
{
    const span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

static int push_tensor(llama_model *m, int32_t *cap, llama_tensor *t, char *err, size_t errlen)
{
    if (m->n_tensors == *cap) {
        int32_t nc = *cap ? *cap * 2 : 64;
        llama_tensor *nt = realloc(m->tensors, (size_t)nc * sizeof *nt);
        if (!nt) {
            llama_errf(err, errlen, "out of memory");
            return -1;
        }
        m->tensors = nt;
        *cap = nc;
    }
    m->tensors[m->n_tensors++] = *t;
    return 0;
}

/* Maps one safetensors file and appends its tensors to m. */
static int load_shard(const char *path, llama_model *m, int32_t *cap, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    unsigned char lenbuf[8];
    uint64_t hlen = 0, data_size;
    void *addr;
    char *htext = NULL, msg[256];
    json_value *h = NULL;
    span *spans = NULL;
    size_t ns = 0, i;
    int rc = -1;

    if (fd < 0) {
        llama_errf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        llama_errf(err, errlen, "%s: not a regular file", path);
        close(fd);
        return -1;
    }
    if (st.st_size < 8) {
        llama_errf(err, errlen, "%s: truncated (%lld bytes, no header length)", path, (long long)st.st_size);
        close(fd);
        return -1;
    }
    if (pread(fd, lenbuf, 8, 0) != 8) {
        llama_errf(err, errlen, "%s: cannot read the header length", path);
        close(fd);
        return -1;
    }
    for (i = 0; i < 8; i++)
        hlen |= (uint64_t)lenbuf[i] << (8 * i);
    if (hlen > MAX_HEADER_BYTES || hlen > (uint64_t)st.st_size - 8) {
        llama_errf(err, errlen, "%s: truncated or corrupt: header of %llu bytes in a file of %lld",
                   path, (unsigned long long)hlen, (long long)st.st_size);
        close(fd);
        return -1;
    }
    data_size = (uint64_t)st.st_size - 8 - hlen;
    addr = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (addr == MAP_FAILED) {
        llama_errf(err, errlen, "%s: mmap: %s", path, strerror(errno));
        return -1;
    }
    {
        llama_mapping *nm = realloc(m->maps, (size_t)(m->n_maps + 1) * sizeof *nm);
        if (!nm) {
            munmap(addr, (size_t)st.st_size);
            llama_errf(err, errlen, "out of memory");
            return -1;
        }
        m->maps = nm;
        m->maps[m->n_maps].addr = addr;
        m->maps[m->n_maps].size = (size_t)st.st_size;
        m->n_maps++;
    }
    htext = malloc((size_t)hlen + 1);
    if (!htext) {
        llama_errf(err, errlen, "out of memory");
        return -1;
    }
    memcpy(htext, (const char *)addr + 8, (size_t)hlen);
    htext[hlen] = '\0';
    h = json_parse(htext, (size_t)hlen, msg, sizeof msg);
    if (!h) {
        llama_errf(err, errlen, "%s: header: %s", path, msg);
        goto out;
    }
    if (h->type != JSON_OBJECT) {
        llama_errf(err, errlen, "%s: header is not a JSON object", path);
        goto out;
    }
    spans = calloc(h->count + 1, sizeof *spans);
    if (!spans) {
        llama_errf(err, errlen, "out of memory");
        goto out;
    }
    for (i = 0; i < h->count; i++) {
        const char *name = h->keys[i];
        const json_value *e = &h->items[i], *dt, *shape, *off;
        llama_tensor t;
        uint64_t elems = 1, begin, end;
        size_t d;
        if (!strcmp(name, "__metadata__"))
            continue;
        memset(&t, 0, sizeof t);
        dt = json_get(e, "dtype");
        shape = json_get(e, "shape");
        off = json_get(e, "data_offsets");
        if (!dt || dt->type != JSON_STRING || !shape || shape->type != JSON_ARRAY ||
            !off || off->type != JSON_ARRAY || off->count != 2) {
            llama_errf(err, errlen, "%s: tensor \"%s\": needs dtype, shape and data_offsets [begin, end]", path, name);
            goto out;
        }
        if (dtype_from_string(dt->string, &t.dtype)) {
            llama_errf(err, errlen, "%s: tensor \"%s\": dtype %s is not supported (F32, F16, BF16)",
                       path, name, dt->string);
            goto out;
        }
        if (shape->count > LLAMA_MAX_DIMS) {
            llama_errf(err, errlen, "%s: tensor \"%s\": %zu dimensions (at most %d)", path, name,
                       shape->count, LLAMA_MAX_DIMS);
            goto out;
        }
        t.ndim = (int32_t)shape->count;
        for (d = 0; d < shape->count; d++) {
            const json_value *s = &shape->items[d];
            if (s->type != JSON_NUMBER || s->number < 0 || s->number != floor(s->number) || s->number > 1e12) {
                llama_errf(err, errlen, "%s: tensor \"%s\": bad shape", path, name);
                goto out;
            }
            t.shape[d] = (int64_t)s->number;
            elems *= (uint64_t)t.shape[d]; /* each <= 1e12, <= 4 dims: checked below */
            if (elems > ((uint64_t)1 << 50)) {
                llama_errf(err, errlen, "%s: tensor \"%s\": shape too large", path, name);
                goto out;
            }
        }
        for (d = 0; d < 2; d++) {
            const json_value *o = &off->items[d];
            if (o->type != JSON_NUMBER || o->number < 0 || o->number != floor(o->number) || o->number > 1.8e19) {
                llama_errf(err, errlen, "%s: tensor \"%s\": bad data_offsets", path, name);
                goto out;
            }
        }
        begin = (uint64_t)off->items[0].number;
        end = (uint64_t)off->items[1].number;
        if (begin > end || end > data_size) {
            llama_errf(err, errlen, "%s: tensor \"%s\": data_offsets [%llu, %llu] outside the %llu data bytes (truncated file?)",
                       path, name, (unsigned long long)begin, (unsigned long long)end,
                       (unsigned long long)data_size);
            goto out;
        }
        if (end - begin != elems * dtype_size(t.dtype)) {
            llama_errf(err, errlen, "%s: tensor \"%s\": %llu bytes do not match shape x %s (%llu bytes)",
                       path, name, (unsigned long long)(end - begin), dt->string,
                       (unsigned long long)(elems * dtype_size(t.dtype)));
            goto out;
        }
        t.data = (const char *)addr + 8 + hlen + begin;
        t.nbytes = (size_t)(end - begin);
        t.name = strdup(name);
        if (!t.name) {
            llama_errf(err, errlen, "out of memory");
            goto out;
        }
        if (push_tensor(m, cap, &t, err, errlen)) {
            free(t.name);
            goto out;
        }
        spans[ns].begin = begin;
        spans[ns].end = end;
        spans[ns].name = m->tensors[m->n_tensors - 1].name;
        ns++;
    }
    qsort(spans, ns, sizeof *spans, span_cmp);
    for (i = 1; i < ns; i++)
        if (spans[i].begin < spans[i - 1].end && spans[i].end > spans[i].begin) {
            llama_errf(err, errlen, "%s: tensors \"%s\" and \"%s\" overlap", path,
                       spans[i - 1].name, spans[i].name);
            goto out;
        }
    rc = 0;
out:
    free(spans);
    json_free(h);
    free(htext);
    return rc;
}

static const llama_tensor *find(const llama_model *m, const char *name)
{
    int32_t i;
    for (i = 0; i < m->n_tensors; i++)
        if (!strcmp(m->tensors[i].name, name))
            return &m->tensors[i];
    return NULL;
}

static int want(const llama_model *m, const char *name, int64_t d0, int64_t d1,
                const llama_tensor **out, char *err, size_t errlen)
{
    const llama_tensor *t = find(m, name);
    int ok;
    if (!t) {
        llama_errf(err, errlen, "tensor \"%s\" is missing", name);
        return -1;
    }
    ok = d1 ? (t->ndim == 2 && t->shape[0] == d0 && t->shape[1] == d1)
            : (t->ndim == 1 && t->shape[0] == d0);
    if (!ok) {
        char got[96] = "", *p = got;
        int32_t i;
        for (i = 0; i < t->ndim; i++)
            p += snprintf(p, sizeof got - (size_t)(p - got), "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        if (d1)
            llama_errf(err, errlen, "tensor \"%s\" has shape [%s], expected [%lld, %lld]", name, got,
                       (long long)d0, (long long)d1);
        else
            llama_errf(err, errlen, "tensor \"%s\" has shape [%s], expected [%lld]", name, got, (long long)d0);
        return -1;
    }
    *out = t;
    return 0;
}

/* Resolves and checks every tensor the forward pass reads. */
static int bind_tensors(llama_model *m, char *err, size_t errlen)
{
    const llama_config *c = &m->cfg;
    int64_t qd = (int64_t)c->q_heads * c->head_dim, kvd = (int64_t)c->kv_heads * c->head_dim;
    int32_t l, i, j;
    char name[128];
    for (i = 0; i < m->n_tensors; i++)
        for (j = i + 1; j < m->n_tensors; j++)
            if (!strcmp(m->tensors[i].name, m->tensors[j].name)) {
                llama_errf(err, errlen, "tensor \"%s\" appears twice", m->tensors[i].name);
                return -1;
            }
    if (want(m, "model.embed_tokens.weight", c->vocab, c->hidden, &m->embed, err, errlen) ||
        want(m, "model.norm.weight", c->hidden, 0, &m->norm, err, errlen))
        return -1;
    if (find(m, "lm_head.weight")) {
        if (want(m, "lm_head.weight", c->vocab, c->hidden, &m->lm_head, err, errlen))
            return -1;
    } else if (c->tie_embeddings) {
        m->lm_head = m->embed;
    } else {
        llama_errf(err, errlen, "tensor \"lm_head.weight\" is missing (and tie_word_embeddings is false)");
        return -1;
    }
    m->layer = calloc((size_t)c->layers, sizeof *m->layer);
    if (!m->layer) {
        llama_errf(err, errlen, "out of memory");
        return -1;
    }
    for (l = 0; l < c->layers; l++) {
        llama_layer *L = &m->layer[l];
#define W(field, suffix, d0, d1)                                                \
        snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix);           \
        if (want(m, name, d0, d1, &L->field, err, errlen)) return -1;
        W(attn_norm, "input_layernorm.weight", c->hidden, 0)
        W(wq, "self_attn.q_proj.weight", qd, c->hidden)
        W(wk, "self_attn.k_proj.weight", kvd, c->hidden)
        W(wv, "self_attn.v_proj.weight", kvd, c->hidden)
        W(wo, "self_attn.o_proj.weight", c->hidden, qd)
        W(ffn_norm, "post_attention_layernorm.weight", c->hidden, 0)
        W(w_gate, "mlp.gate_proj.weight", c->intermediate, c->hidden)
        W(w_up, "mlp.up_proj.weight", c->intermediate, c->hidden)
        W(w_down, "mlp.down_proj.weight", c->hidden, c->intermediate)
#undef W
    }
    return 0;
}

/* Shard file names of an index: distinct values of weight_map. */
static int load_index(const char *dir, const char *index_path, llama_model *m,
                      int32_t *cap, char *err, size_t errlen)
{
    json_value *j = read_json(index_path, err, errlen);
    const json_value *wm;
    size_t i, k;
    int rc = -1;
    if (!j)
        return -1;
    wm = json_get(j, "weight_map");
    if (!wm || wm->type != JSON_OBJECT || wm->count == 0) {
        llama_errf(err, errlen, "%s: no \"weight_map\" object", index_path);
        goto out;
    }
    for (i = 0; i < wm->count; i++) {
        const json_value *f = &wm->items[i];
        int seen = 0;
        if (f->type != JSON_STRING || !f->string[0] || strchr(f->string, '/')) {
            llama_errf(err, errlen, "%s: weight_map[\"%s\"] must be a file name in the model directory",
                       index_path, wm->keys[i]);
            goto out;
        }
        for (k = 0; k < i && !seen; k++)
            seen = !strcmp(wm->items[k].string, f->string);
        if (!seen) {
            char *path = join(dir, f->string);
            int r;
            if (!path) {
                llama_errf(err, errlen, "out of memory");
                goto out;
            }
            r = load_shard(path, m, cap, err, errlen);
            free(path);
            if (r)
                goto out;
        }
    }
    /* Every tensor the index names must be in the shards. */
    for (i = 0; i < wm->count; i++)
        if (!find(m, wm->keys[i])) {
            llama_errf(err, errlen, "%s: tensor \"%s\" is not in %s", index_path, wm->keys[i],
                       wm->items[i].string);
            goto out;
        }
    rc = 0;
out:
    json_free(j);
    return rc;
}

int llama_model_load(const char *dir, llama_model *m, char *err, size_t errlen)
{
    char *cfg_path = join(dir, "config.json");
    char *index_path = join(dir, "model.safetensors.index.json");
    char *single_path = join(dir, "model.safetensors");
    json_value *cj = NULL;
    int32_t cap = 0;
    int rc = -1;
    memset(m, 0, sizeof *m);
    if (!cfg_path || !index_path || !single_path) {
        llama_errf(err, errlen, "out of memory");
        goto out;
    }
    cj = read_json(cfg_path, err, errlen);
    if (!cj || parse_config(cj, cfg_path, &m->cfg, err, errlen))
        goto out;
    if (access(index_path, F_OK) == 0) {
        if (load_index(dir, index_path, m, &cap, err, errlen))
            goto out;
    } else if (load_shard(single_path, m, &cap, err, errlen)) {
        goto out;
    }
    if (bind_tensors(m, err, errlen))
        goto out;
    rc = 0;
out:
    json_free(cj);
    free(cfg_path);
    free(index_path);
    free(single_path);
    if (rc)
        llama_model_free(m);
    return rc;
}

void llama_model_free(llama_model *m)
{
    int32_t i;
    if (!m)
        return;
    for (i = 0; i < m->n_tensors; i++)
        free(m->tensors[i].name);
    free(m->tensors);
    for (i = 0; i < m->n_maps; i++)
        munmap(m->maps[i].addr, m->maps[i].size);
    free(m->maps);
    free(m->layer);
    free(m->owned);
    memset(m, 0, sizeof *m);
}

/* ---- random weights (bench) ------------------------------------------------ */

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

int llama_model_random(const llama_config *cfg, llama_dtype dtype, uint64_t seed,
                       llama_model *m, char *err, size_t errlen)
{
    const llama_config *c = cfg;
    int64_t qd = (int64_t)c->q_heads * c->head_dim, kvd = (int64_t)c->kv_heads * c->head_dim;
    int32_t per_layer = 9, n = 3 + per_layer * c->layers, l, k = 0;
    size_t es = dtype_size(dtype), total = 0, off;
    int64_t shapes[9][2] = {
        {c->hidden, 0}, {qd, c->hidden}, {kvd, c->hidden}, {kvd, c->hidden}, {c->hidden, qd},
        {c->hidden, 0}, {c->intermediate, c->hidden}, {c->intermediate, c->hidden},
        {c->hidden, c->intermediate}};
    const char *names[9] = {"input_layernorm.weight", "self_attn.q_proj.weight",
                            "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                            "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"};
    char name[128];
    uint64_t s = seed;
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    m->tensors = calloc((size_t)n, sizeof *m->tensors);
    if (!m->tensors)
        goto oom;
    /* Layout: embed, norm, lm_head, then each layer's nine tensors. */
#define ADD(nm, d0, d1)                                                        \
    do {                                                                       \
        llama_tensor *t_ = &m->tensors[k++];                                   \
        t_->name = strdup(nm);                                                 \
        if (!t_->name) goto oom;                                               \
        t_->dtype = dtype;                                                     \
        t_->ndim = (d1) ? 2 : 1;                                               \
        t_->shape[0] = (d0);                                                   \
        t_->shape[1] = (d1);                                                   \
        t_->nbytes = (size_t)(d0) * (size_t)((d1) ? (d1) : 1) * es;            \
        total += t_->nbytes;                                                   \
        m->n_tensors = k;                                                      \
    } while (0)
    ADD("model.embed_tokens.weight", c->vocab, c->hidden);
    ADD("model.norm.weight", c->hidden, 0);
    ADD("lm_head.weight", c->vocab, c->hidden);
    for (l = 0; l < c->layers; l++) {
        int32_t i;
        for (i = 0; i < per_layer; i++) {
            snprintf(name, sizeof name, "model.layers.%d.%s", l, names[i]);
            ADD(name, shapes[i][0], shapes[i][1]);
        }
    }
#undef ADD
    m->owned = malloc(total);
    if (!m->owned)
        goto oom;
    off = 0;
    for (k = 0; k < m->n_tensors; k++) {
        llama_tensor *t = &m->tensors[k];
        size_t cnt = t->nbytes / es, i;
        int is_norm = t->ndim == 1;
        /* Scale 1/sqrt(fan_in) keeps activations O(1) through the layers. */
        float scale = is_norm ? 0.0f : (float)(1.7320508 / sqrt((double)t->shape[1]));
        char *base = (char *)m->owned + off;
        for (i = 0; i < cnt; i++) {
            float u = (float)((splitmix(&s) >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
            float x = is_norm ? 1.0f : u * scale;
            if (dtype == LLAMA_F32) ((float *)base)[i] = x;
            else if (dtype == LLAMA_F16) ((uint16_t *)base)[i] = llama_f32_to_f16(x);
            else ((uint16_t *)base)[i] = llama_f32_to_bf16(x);
        }
        t->data = base;
        off += t->nbytes;
    }
    if (bind_tensors(m, err, errlen)) {
        llama_model_free(m);
        return -1;
    }
    return 0;
oom:
    llama_model_free(m);
    llama_errf(err, errlen, "out of memory for the random weights");
    return -1;
}
