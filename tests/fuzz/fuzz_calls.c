/*
 * libFuzzer target over sequences of libfreekv calls (CPU backend).
 *
 * The input's first bytes choose a small cache shape (every policy, dtype,
 * group score, page size, sink/window/budget, capacity, pool limit); the
 * rest is a list of operations: open, close, append, attend, select, recall,
 * whole decode steps, reserve, introspection, stats, and calls with bad
 * arguments. Every operation goes first to the "real" cache; when it
 * succeeds it is applied to a "twin" cache too (which only ever sees calls
 * that succeeded). After each operation the two must be indistinguishable
 * (lengths, selected pages, stats including host_bytes, attend outputs bit
 * for bit), so a failed call provably left the real cache as it was. A call
 * with a known-bad argument must fail, with a message; a valid call the
 * harness knows must succeed must succeed. Attend outputs must be finite and
 * equal, within the dtype's tolerance, to the float64 reference of
 * tests/reference.c over the tokens the library says it attended (the
 * sink, window, partial page and its reported selection; every token under
 * DENSE or while the candidates fit the budget).
 *
 * Built with -fsanitize=fuzzer by `make fuzz`; with -DFKV_FUZZ_REPLAY it
 * is a plain program that runs each file (or each file of each directory)
 * named on its command line, for machines without libFuzzer.
 *
 * SPDX-License-Identifier: MIT
 */
#include "freekv.h"
#include "reference.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RECORDS 24 /* sequences one input may open */
#define MAX_BATCH 16
#define MAX_OPS 160
#define HEAD_DIM 64

/* ---------------------------------------------------------------------- */
/* Input bytes                                                            */
/* ---------------------------------------------------------------------- */

typedef struct input {
    const uint8_t *p;
    size_t n, at;
} input;

/* The next byte; 0 past the end, so that every input decodes. */
static unsigned in_u8(input *in)
{
    return in->at < in->n ? in->p[in->at++] : 0;
}

static int in_done(const input *in) { return in->at >= in->n; }

/* ---------------------------------------------------------------------- */
/* Harness state                                                          */
/* ---------------------------------------------------------------------- */

typedef struct record {
    fkv_seq_id rid, tid; /* ids in the real cache and in the twin */
    int open;
    int64_t len[2];      /* tokens per layer, as the harness counts them */
    /* FREEKV: len at the layer's last attend while its selection is the
     * pending one (fkv_select with q NULL keeps it), else -1 */
    int64_t attended[2];
    float *k[2], *v[2];  /* [max_tokens][kv_heads][D], decoded */
} record;

typedef struct harness {
    fkv_options o;
    fkv_cache *real, *twin;
    int L, Hq, Hkv, G, D, P, S, W, K;
    int64_t max_tokens;
    int pool_ample; /* every valid append fits in the pool */
    size_t esz;
    ref_layout lay;
    double tol;
    record rec[MAX_RECORDS];
    int nrec;
    ref_rng rng;
    /* scratch */
    void *kbuf, *vbuf, *qbuf, *obuf_r, *obuf_t;
    float *kf, *vf, *qf, *of;
    int32_t *pages_r, *pages_t;
    unsigned char *mask;
    double *ref;
    int64_t kv_cap; /* tokens the k/v scratch holds */
} harness;

static void fail(const harness *h, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fuzz_calls: ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (h)
        fprintf(stderr, "\n  shape: policy %d dtype %d group %d L %d Hq %d "
                "Hkv %d P %d S %d W %d K %d max_tokens %lld pool %llu\n",
                (int)h->o.policy, (int)h->o.dtype, (int)h->o.group_score,
                h->L, h->Hq, h->Hkv, h->P, h->S, h->W, h->K,
                (long long)h->max_tokens,
                (unsigned long long)h->o.host_pool_bytes);
    else
        fprintf(stderr, "\n");
    abort();
}

/* What the checks looked at, for the replay program's summary. */
static struct {
    unsigned long long calls, rejected, outputs, selections;
} counts;

#define CHECK(h, cond, ...) \
    do { if (!(cond)) fail((h), __VA_ARGS__); } while (0)

/* A failed call must say why. */
static void check_message(const harness *h, fkv_cache *c, fkv_status st,
                          const char *what)
{
    char msg[256], tiny[2] = { 'x', 'x' };
    size_t n = fkv_last_error(c, msg, sizeof msg);
    CHECK(h, n > 0 && msg[0] != '\0',
          "%s failed (%s) with an empty fkv_last_error", what,
          fkv_status_string(st));
    /* snprintf-like: the full length whatever the buffer, NUL-terminated
     * when there is room for anything. */
    CHECK(h, fkv_last_error(c, NULL, 0) == n &&
                 fkv_last_error(c, tiny, 1) == n && tiny[0] == '\0' &&
                 tiny[1] == 'x',
          "%s: fkv_last_error with a short buffer", what);
    CHECK(h, st > FKV_OK && st <= FKV_ERR_INTERNAL,
          "%s returned an unknown status %d", what, (int)st);
    CHECK(h, st != FKV_ERR_INTERNAL, "%s: FKV_ERR_INTERNAL: %s", what, msg);
}

/* The outcome of one call on the real cache. bad: the arguments are known
 * to be invalid (the call must fail); good: known valid (it must succeed). */
static void check_outcome(const harness *h, fkv_cache *used, fkv_status st,
                          int bad, int good, const char *what)
{
    if (bad)
        CHECK(h, st != FKV_OK, "%s with a bad argument succeeded", what);
    if (good && !bad && st != FKV_OK) {
        char msg[256];
        fkv_last_error(h->real, msg, sizeof msg);
        fail(h, "%s with valid arguments failed: %s: %s", what,
             fkv_status_string(st), msg);
    }
    counts.calls++;
    if (st != FKV_OK) {
        counts.rejected++;
        check_message(h, used, st, what);
    }
}

/* ---------------------------------------------------------------------- */
/* Real versus twin                                                       */
/* ---------------------------------------------------------------------- */

static void compare_caches(harness *h, const char *after)
{
    fkv_stats sr, stw;
    memset(&sr, 0, sizeof sr);
    memset(&stw, 0, sizeof stw);
    sr.struct_size = stw.struct_size = sizeof sr;
    CHECK(h, fkv_get_stats(h->real, &sr) == FKV_OK, "get_stats (real)");
    CHECK(h, fkv_get_stats(h->twin, &stw) == FKV_OK, "get_stats (twin)");
    CHECK(h, memcmp(&sr, &stw, sizeof sr) == 0,
          "after %s: stats differ from the twin's (steps %llu/%llu recalled "
          "%llu/%llu corrections %llu/%llu checked %llu/%llu host_bytes "
          "%llu/%llu)", after,
          (unsigned long long)sr.steps, (unsigned long long)stw.steps,
          (unsigned long long)sr.pages_recalled,
          (unsigned long long)stw.pages_recalled,
          (unsigned long long)sr.corrections,
          (unsigned long long)stw.corrections,
          (unsigned long long)sr.heads_checked,
          (unsigned long long)stw.heads_checked,
          (unsigned long long)sr.host_bytes,
          (unsigned long long)stw.host_bytes);
    CHECK(h, sr.device_bytes == 0, "CPU backend reports device bytes");

    for (int i = 0; i < h->nrec; i++) {
        record *r = &h->rec[i];
        int64_t lr = -1, lt = -1;
        fkv_status a = fkv_seq_length(h->real, r->rid, &lr);
        if (!r->open) {
            CHECK(h, a == FKV_ERR_UNKNOWN_SEQUENCE,
                  "after %s: closed sequence %lld: seq_length gives %s",
                  after, (long long)r->rid, fkv_status_string(a));
            continue;
        }
        fkv_status b = fkv_seq_length(h->twin, r->tid, &lt);
        CHECK(h, a == FKV_OK && b == FKV_OK && lr == lt,
              "after %s: sequence %lld length %lld (%s), twin %lld (%s)",
              after, (long long)r->rid, (long long)lr, fkv_status_string(a),
              (long long)lt, fkv_status_string(b));
        int64_t want = r->len[0];
        for (int l = 1; l < h->L; l++)
            if (r->len[l] < want)
                want = r->len[l];
        CHECK(h, lr == want, "after %s: sequence %lld length %lld, the "
              "harness counts %lld", after, (long long)r->rid,
              (long long)lr, (long long)want);
        for (int l = 0; l < h->L; l++)
            for (int g = 0; g < h->Hkv; g++) {
                int32_t cr = -1, ct = -1;
                a = fkv_get_selected_pages(h->real, l, r->rid, g, h->pages_r,
                                           64, &cr);
                b = fkv_get_selected_pages(h->twin, l, r->tid, g, h->pages_t,
                                           64, &ct);
                CHECK(h, a == FKV_OK && b == FKV_OK && cr == ct &&
                             cr >= 0 && cr <= h->K &&
                             memcmp(h->pages_r, h->pages_t,
                                    sizeof(int32_t) * (size_t)cr) == 0,
                      "after %s: selected pages of (layer %d, seq %lld, "
                      "head %d) differ from the twin's (%d vs %d)", after, l,
                      (long long)r->rid, g, cr, ct);
            }
    }
}

/* ---------------------------------------------------------------------- */
/* Batches, with optional bad arguments                                   */
/* ---------------------------------------------------------------------- */

enum {
    MUT_NONE = 0,
    MUT_NULL_BATCH,
    MUT_NULL_IDS,
    MUT_ZERO_SEQS,
    MUT_NEG_SEQS,
    MUT_TOO_MANY,
    MUT_DUPLICATE,
    MUT_RESERVED,
    MUT_UNKNOWN_ID,
    MUT_CLOSED_ID,
    MUT_BAD_LAYER,
    MUT_ZERO_TOKENS,
    MUT_NEG_TOKENS,
    MUT_NULL_TENSOR,
    MUT_NULL_CACHE,
    MUT_COUNT
};

typedef struct call {
    int layer;
    int n;                  /* entries in idx */
    int idx[MAX_BATCH];     /* records, in batch order */
    int32_t tokens[MAX_BATCH];
    int64_t total_tokens;
    int mut;
    int force_layer;        /* >= 0: the layer, whatever the input says */
    /* what the real cache is given */
    fkv_batch rb;
    fkv_seq_id rids[MAX_BATCH + 2];
    int32_t rtok[MAX_BATCH + 2];
    fkv_batch tb;
    fkv_seq_id tids[MAX_BATCH];
    int bad;
} call;

/* A subset of the open sequences, in an order the input chooses. */
static void pick_batch(harness *h, input *in, call *c)
{
    unsigned mask = in_u8(in) | (in_u8(in) << 8);
    unsigned rot = in_u8(in);
    int open[MAX_RECORDS], no = 0;
    c->force_layer = -1;
    for (int i = 0; i < h->nrec; i++)
        if (h->rec[i].open)
            open[no++] = i;
    c->n = 0;
    for (int j = 0; j < no && c->n < MAX_BATCH; j++) {
        int i = open[(j + rot) % no];
        if (mask & (1u << (j % 16)) || mask == 0)
            c->idx[c->n++] = i;
    }
}

static int closed_record(const harness *h)
{
    for (int i = 0; i < h->nrec; i++)
        if (!h->rec[i].open)
            return i;
    return -1;
}

/* Fills rb/tb from the batch, applying the mutation to rb only. */
static void build_batch(harness *h, input *in, call *c, int with_tokens)
{
    c->mut = MUT_NONE;
    unsigned m = in_u8(in);
    if (m >= 208)
        c->mut = 1 + (int)(m % (MUT_COUNT - 1));
    c->layer = (int)(in_u8(in) % (unsigned)h->L);
    if (c->force_layer >= 0)
        c->layer = c->force_layer;
    c->total_tokens = 0;
    for (int i = 0; i < c->n; i++) {
        c->rids[i] = h->rec[c->idx[i]].rid;
        c->tids[i] = h->rec[c->idx[i]].tid;
        c->rtok[i] = c->tokens[i];
        c->total_tokens += c->tokens[i];
    }
    c->rb.num_seqs = c->n;
    c->rb.reserved = 0;
    c->rb.seq_ids = c->rids;
    c->rb.num_tokens = with_tokens ? c->rtok : NULL;
    c->tb = c->rb;
    c->tb.seq_ids = c->tids;
    c->tb.num_tokens = with_tokens ? c->tokens : NULL;
    c->bad = c->n < 1;

    switch (c->mut) {
    case MUT_NULL_IDS:
        c->rb.seq_ids = NULL;
        c->bad = 1;
        break;
    case MUT_ZERO_SEQS:
        c->rb.num_seqs = 0;
        c->bad = 1;
        break;
    case MUT_NEG_SEQS:
        c->rb.num_seqs = -1 - (int)(in_u8(in) & 3);
        c->bad = 1;
        break;
    case MUT_TOO_MANY: {
        /* More entries than max_sequences; the extra ones are valid-looking
         * repeats, so only the count can make it fail. */
        int want = h->o.max_sequences + 1;
        if (want > MAX_BATCH + 2 || c->n < 1)
            break;
        for (int i = c->n; i < want; i++) {
            c->rids[i] = c->rids[i % c->n];
            c->rtok[i] = 1;
        }
        c->rb.num_seqs = want;
        c->bad = 1;
        break;
    }
    case MUT_DUPLICATE:
        /* Within the batch when it has two entries (so that only the
         * duplicate can make it fail), else one more entry. */
        if (c->n >= 2) {
            unsigned a = in_u8(in) % (unsigned)c->n;
            c->rids[(a + 1) % (unsigned)c->n] = c->rids[a];
        } else if (c->n == 1) {
            c->rids[1] = c->rids[0];
            c->rtok[1] = 1;
            c->rb.num_seqs = 2;
        } else {
            break;
        }
        c->bad = 1;
        break;
    case MUT_RESERVED:
        c->rb.reserved = 1 + (int32_t)(in_u8(in) & 0x7f);
        c->bad = 1;
        break;
    case MUT_UNKNOWN_ID:
    case MUT_CLOSED_ID: {
        if (c->n < 1)
            break;
        int k = closed_record(h);
        /* Never assigned: ids are generation * max_sequences + slot >= 0 and
         * an input opens at most MAX_RECORDS sequences. */
        fkv_seq_id bogus[4] = { -1, INT64_MIN, (fkv_seq_id)1 << 40,
                                INT64_MAX };
        c->rids[in_u8(in) % (unsigned)c->n] =
            (c->mut == MUT_CLOSED_ID && k >= 0) ? h->rec[k].rid
                                                : bogus[in_u8(in) & 3];
        c->bad = 1;
        break;
    }
    case MUT_BAD_LAYER: {
        int32_t bad_layers[4] = { -1, (int32_t)h->L, (int32_t)h->L + 7,
                                  INT32_MIN };
        c->layer = bad_layers[in_u8(in) & 3];
        c->bad = 1;
        break;
    }
    case MUT_ZERO_TOKENS:
    case MUT_NEG_TOKENS:
        if (!with_tokens || c->n < 1)
            break;
        c->rtok[in_u8(in) % (unsigned)c->n] =
            c->mut == MUT_ZERO_TOKENS ? 0 : (in_u8(in) & 1 ? -1 : INT32_MIN);
        c->bad = 1;
        break;
    case MUT_NULL_BATCH:
    case MUT_NULL_TENSOR:
    case MUT_NULL_CACHE:
        c->bad = 1;
        break;
    default:
        break;
    }
}

static fkv_cache *real_cache(const harness *h, const call *c)
{
    return c->mut == MUT_NULL_CACHE ? NULL : h->real;
}

static const fkv_batch *real_batch(const call *c)
{
    return c->mut == MUT_NULL_BATCH ? NULL : &c->rb;
}

/* After a failed call on NULL, the thread's message must be set. */
static void check_null_cache(const harness *h, const call *c, fkv_status st,
                             const char *what)
{
    if (c->mut != MUT_NULL_CACHE)
        return;
    CHECK(h, st == FKV_ERR_INVALID_ARGUMENT,
          "%s with a NULL cache returned %s", what, fkv_status_string(st));
    char msg[128];
    CHECK(h, fkv_last_error(NULL, msg, sizeof msg) > 0,
          "%s with a NULL cache left no thread message", what);
}

/* ---------------------------------------------------------------------- */
/* Data                                                                   */
/* ---------------------------------------------------------------------- */

/* n rows of width w in the dtype, random; the decoded values in f. */
static void random_rows(harness *h, void *dst, float *f, int64_t rows, int w,
                        double stddev)
{
    size_t n = (size_t)rows * (size_t)w;
    ref_random_tensor(&h->rng, h->o.dtype, f, n, stddev);
    ref_encode(h->o.dtype, f, dst, n);
}

/* ---------------------------------------------------------------------- */
/* Operations                                                             */
/* ---------------------------------------------------------------------- */

static void op_open(harness *h, input *in)
{
    unsigned m = in_u8(in);
    if (m >= 240) { /* bad arguments */
        fkv_seq_id id = 0;
        fkv_status st = (m & 1) ? fkv_seq_open(h->real, NULL)
                                : fkv_seq_open(NULL, &id);
        CHECK(h, st == FKV_ERR_INVALID_ARGUMENT,
              "seq_open with a NULL argument returned %s",
              fkv_status_string(st));
        compare_caches(h, "bad seq_open");
        return;
    }
    if (h->nrec >= MAX_RECORDS)
        return;
    int nopen = 0;
    for (int i = 0; i < h->nrec; i++)
        nopen += h->rec[i].open;
    fkv_seq_id rid = -1, tid = -1;
    fkv_status st = fkv_seq_open(h->real, &rid);
    check_outcome(h, h->real, st, nopen >= h->o.max_sequences,
                  nopen < h->o.max_sequences, "seq_open");
    if (st == FKV_OK) {
        fkv_status st2 = fkv_seq_open(h->twin, &tid);
        CHECK(h, st2 == FKV_OK, "seq_open on the twin failed");
        for (int i = 0; i < h->nrec; i++)
            CHECK(h, h->rec[i].rid != rid, "seq_open reused id %lld",
                  (long long)rid);
        record *r = &h->rec[h->nrec++];
        memset(r, 0, sizeof *r);
        r->rid = rid;
        r->tid = tid;
        r->open = 1;
        size_t n = (size_t)h->max_tokens * (size_t)h->Hkv * (size_t)h->D;
        for (int l = 0; l < h->L; l++) {
            r->attended[l] = -1;
            r->k[l] = malloc(n * sizeof(float));
            r->v[l] = malloc(n * sizeof(float));
            CHECK(h, r->k[l] && r->v[l], "out of memory in the harness");
        }
    }
    compare_caches(h, "seq_open");
}

static void op_close(harness *h, input *in)
{
    unsigned m = in_u8(in);
    if (h->nrec == 0 || m >= 224) {
        fkv_seq_id bogus[4] = { -1, INT64_MAX, (fkv_seq_id)1 << 40,
                                INT64_MIN }; /* never assigned */
        fkv_status st = (m & 4) ? fkv_seq_close(NULL, 1)
                                : fkv_seq_close(h->real, bogus[m & 3]);
        CHECK(h, st != FKV_OK, "seq_close of a bogus id succeeded");
        check_message(h, (m & 4) ? NULL : h->real, st, "seq_close");
        compare_caches(h, "bad seq_close");
        return;
    }
    record *r = &h->rec[m % (unsigned)h->nrec];
    fkv_status st = fkv_seq_close(h->real, r->rid);
    check_outcome(h, h->real, st, !r->open, r->open, "seq_close");
    if (st == FKV_OK) {
        CHECK(h, fkv_seq_close(h->twin, r->tid) == FKV_OK,
              "seq_close on the twin failed");
        r->open = 0;
        for (int l = 0; l < h->L; l++) {
            free(r->k[l]);
            free(r->v[l]);
            r->k[l] = r->v[l] = NULL;
        }
    }
    compare_caches(h, "seq_close");
}

/* tokens_kind: 0 = one token each (NULL num_tokens), 1 = a few, 2 = prefill */
static void do_append(harness *h, input *in, call *c, int tokens_kind)
{
    for (int i = 0; i < c->n; i++) {
        int64_t t = 1;
        if (tokens_kind == 1)
            t = 1 + (in_u8(in) % (unsigned)(2 * h->P + 1));
        else if (tokens_kind == 2)
            t = 1 + (int64_t)(in_u8(in) * (h->max_tokens + 2) / 255);
        c->tokens[i] = (int32_t)t;
    }
    build_batch(h, in, c, 1);
    if (tokens_kind == 0 && c->mut != MUT_ZERO_TOKENS &&
        c->mut != MUT_NEG_TOKENS) {
        c->rb.num_tokens = NULL;
        c->tb.num_tokens = NULL;
    }
    if (c->total_tokens > h->kv_cap)
        return; /* the scratch cannot hold it (never for valid calls) */
    int w = h->Hkv * h->D;
    double stddev = (in_u8(in) & 0x80) ? 4.0 : 1.0;
    random_rows(h, h->kbuf, h->kf, c->total_tokens, w, stddev);
    random_rows(h, h->vbuf, h->vf, c->total_tokens, w, 1.0);

    int good = !c->bad && h->pool_ample;
    int over = 0;
    if (!c->bad)
        for (int i = 0; i < c->n; i++)
            if (h->rec[c->idx[i]].len[c->layer] + c->tokens[i] >
                h->max_tokens)
                over = 1;
    if (over)
        good = 0;
    const void *kp = h->kbuf, *vp = h->vbuf;
    if (c->mut == MUT_NULL_TENSOR) {
        if (in_u8(in) & 1)
            kp = NULL;
        else
            vp = NULL;
    }
    fkv_status st = fkv_append(real_cache(h, c), c->layer, real_batch(c),
                               kp, vp);
    check_null_cache(h, c, st, "append");
    check_outcome(h, real_cache(h, c), st, c->bad || over, good, "append");
    if (over)
        CHECK(h, st == FKV_ERR_CAPACITY,
              "append past max_tokens_per_sequence returned %s",
              fkv_status_string(st));
    if (st == FKV_OK) {
        CHECK(h, fkv_append(h->twin, c->layer, &c->tb, h->kbuf, h->vbuf) ==
                     FKV_OK, "append on the twin failed");
        int64_t off = 0;
        for (int i = 0; i < c->n; i++) {
            record *r = &h->rec[c->idx[i]];
            size_t rowf = (size_t)w;
            memcpy(r->k[c->layer] + (size_t)r->len[c->layer] * rowf,
                   h->kf + (size_t)off * rowf,
                   (size_t)c->tokens[i] * rowf * sizeof(float));
            memcpy(r->v[c->layer] + (size_t)r->len[c->layer] * rowf,
                   h->vf + (size_t)off * rowf,
                   (size_t)c->tokens[i] * rowf * sizeof(float));
            r->len[c->layer] += c->tokens[i];
            off += c->tokens[i];
        }
    }
    compare_caches(h, "append");
}

static int all_have_tokens(const harness *h, const call *c)
{
    for (int i = 0; i < c->n; i++)
        if (h->rec[c->idx[i]].len[c->layer] < 1)
            return 0;
    return 1;
}

/* fkv_select with q NULL keeps the selection of the attend just made:
 * valid when every sequence's attend is the last call on the layer that
 * changed its selection (FREEKV; a no-op under the other policies). */
static int all_attended(const harness *h, const call *c)
{
    if (h->o.policy != FKV_POLICY_FREEKV)
        return 1;
    for (int i = 0; i < c->n; i++) {
        const record *r = &h->rec[c->idx[i]];
        if (r->attended[c->layer] != r->len[c->layer])
            return 0;
    }
    return 1;
}

static void set_attended(harness *h, const call *c, int on)
{
    if (h->o.policy != FKV_POLICY_FREEKV)
        return;
    for (int i = 0; i < c->n; i++) {
        record *r = &h->rec[c->idx[i]];
        r->attended[c->layer] = on ? r->len[c->layer] : -1;
    }
}

/* Whether the pages an attend uses are the top-K of its own query: SYNC and
 * RESIDENT always; FREEKV with threshold 1, where every head is corrected
 * (each attend here has a fresh random query, so no cosine reaches 1). */
static int exact_selection(const harness *h)
{
    return h->o.policy == FKV_POLICY_SYNC ||
           h->o.policy == FKV_POLICY_RESIDENT ||
           (h->o.policy == FKV_POLICY_FREEKV &&
            h->o.correction_threshold == 1.0f);
}

/* The selection against the reference's top-K, where its K-th and (K+1)-th
 * aggregates are far enough apart for float rounding not to swap them. */
static void check_selection(harness *h, const record *r, int layer, int g,
                            const float *q, const int *sel, int cnt)
{
    int want[64];
    double gap = 0.0;
    int nw = ref_select(&h->lay, r->k[layer], r->len[layer], h->Hkv, h->D, g,
                        q + (size_t)g * (size_t)h->G * (size_t)h->D, h->G,
                        h->o.softmax_scale,
                        h->o.group_score == FKV_GROUP_MEAN_SCORE
                            ? REF_GROUP_MEAN_SCORE
                            : REF_GROUP_MEAN_SOFTMAX,
                        want, &gap);
    if (!(gap >= 1e-3))
        return;
    counts.selections++;
    int same = nw == cnt;
    for (int i = 0; same && i < cnt; i++)
        same = want[i] == sel[i];
    CHECK(h, same, "(layer %d, seq %lld, head %d, n %lld): selected %d "
          "pages (first %d), the reference's top-K is %d pages (first %d), "
          "gap %g", layer, (long long)r->rid, g, (long long)r->len[layer],
          cnt, cnt ? sel[0] : -1, nw, nw ? want[0] : -1, gap);
}

/* The output of one sequence against the reference over the tokens the
 * library reports it attended. */
static void check_attention(harness *h, const record *r, int layer,
                            const float *q, const float *out)
{
    int64_t n = r->len[layer];
    int first = 0, end = 0;
    int ncand = ref_candidates(&h->lay, n, &first, &end);
    for (int g = 0; g < h->Hkv; g++) {
        int32_t cnt = -1;
        CHECK(h, fkv_get_selected_pages(h->real, layer, r->rid, g, h->pages_r,
                                        64, &cnt) == FKV_OK,
              "get_selected_pages after attend");
        int sel[64];
        if (h->o.policy == FKV_POLICY_DENSE) {
            CHECK(h, cnt == 0, "DENSE lists %d selected pages", cnt);
        } else {
            CHECK(h, cnt <= h->K && cnt <= ncand,
                  "%d pages selected of %d candidates, K %d", cnt, ncand,
                  h->K);
            if (ncand <= h->K)
                CHECK(h, cnt == ncand, "%d candidates fit the budget but %d "
                      "are selected (n %lld)", ncand, cnt, (long long)n);
            for (int i = 0; i < cnt; i++) {
                CHECK(h, h->pages_r[i] >= first && h->pages_r[i] < end &&
                             (i == 0 || h->pages_r[i] > h->pages_r[i - 1]),
                      "selected page %d is not an ascending candidate in "
                      "[%d, %d)", h->pages_r[i], first, end);
                sel[i] = h->pages_r[i];
            }
            ref_attended_mask(&h->lay, n, sel, cnt, h->mask);
            if (exact_selection(h) && ncand > h->K)
                check_selection(h, r, layer, g, q, sel, cnt);
        }
        for (int j = 0; j < h->G; j++) {
            int qh = g * h->G + j;
            const float *o = out + (size_t)qh * (size_t)h->D;
            for (int d = 0; d < h->D; d++)
                CHECK(h, isfinite(o[d]), "attend output is not finite");
            ref_attention(r->k[layer], r->v[layer], n, h->Hkv, h->D, g,
                          q + (size_t)qh * (size_t)h->D, h->o.softmax_scale,
                          h->o.policy == FKV_POLICY_DENSE ? NULL : h->mask,
                          h->ref);
            double e = ref_rel_err(o, h->ref, (size_t)h->D);
            counts.outputs++;
            CHECK(h, e <= h->tol, "attend output of (layer %d, seq %lld, "
                  "q head %d) is off the reference by %g (tolerance %g, "
                  "n %lld, %d selected)", layer, (long long)r->rid, qh, e,
                  h->tol, (long long)n, cnt);
        }
    }
}

static void do_attend(harness *h, input *in, call *c)
{
    build_batch(h, in, c, 0);
    int w = h->Hq * h->D;
    random_rows(h, h->qbuf, h->qf, c->n > 0 ? c->n : 1, w, 1.0);
    int ready = !c->bad && all_have_tokens(h, c);
    const void *qp = h->qbuf;
    void *op = h->obuf_r;
    if (c->mut == MUT_NULL_TENSOR) {
        if (in_u8(in) & 1)
            qp = NULL;
        else
            op = NULL;
    }
    size_t obytes = (size_t)(c->n > 0 ? c->n : 1) * (size_t)w * h->esz;
    memset(h->obuf_r, 0xA5, obytes);
    fkv_status st = fkv_attend(real_cache(h, c), c->layer, real_batch(c), qp,
                               op);
    check_null_cache(h, c, st, "attend");
    check_outcome(h, real_cache(h, c), st,
                  c->bad || (!c->bad && !all_have_tokens(h, c)),
                  ready, "attend");
    if (!c->bad && !ready)
        CHECK(h, st == FKV_ERR_INVALID_STATE,
              "attend before append returned %s", fkv_status_string(st));
    if (st == FKV_OK) {
        set_attended(h, c, 1);
        CHECK(h, fkv_attend(h->twin, c->layer, &c->tb, h->qbuf, h->obuf_t) ==
                     FKV_OK, "attend on the twin failed");
        CHECK(h, memcmp(h->obuf_r, h->obuf_t, obytes) == 0,
              "attend output differs from the twin's");
        ref_decode(h->o.dtype, h->obuf_r, h->of, (size_t)c->n * (size_t)w);
        for (int i = 0; i < c->n; i++)
            check_attention(h, &h->rec[c->idx[i]], c->layer,
                            h->qf + (size_t)i * (size_t)w,
                            h->of + (size_t)i * (size_t)w);
    }
    compare_caches(h, "attend");
}

/* select reuses the query in qbuf when keep_q (a decode step's), else a new
 * one. q NULL (MUT_NULL_TENSOR) is the attend's query: valid right after an
 * attend (all_attended), INVALID_STATE otherwise. */
static void do_select(harness *h, input *in, call *c, int keep_q)
{
    build_batch(h, in, c, 0);
    int w = h->Hq * h->D;
    if (!keep_q)
        random_rows(h, h->qbuf, h->qf, c->n > 0 ? c->n : 1, w, 1.0);
    const int null_q = c->mut == MUT_NULL_TENSOR;
    if (null_q) /* not a bad argument in itself */
        c->bad = c->n < 1;
    int ready = !c->bad && all_have_tokens(h, c);
    int valid = ready && (!null_q || all_attended(h, c));
    const void *qp = null_q ? NULL : h->qbuf;
    fkv_status st = fkv_select(real_cache(h, c), c->layer, real_batch(c), qp);
    check_null_cache(h, c, st, "select");
    check_outcome(h, real_cache(h, c), st, c->bad || !valid, valid,
                  "select");
    if (ready && !valid)
        CHECK(h, st == FKV_ERR_INVALID_STATE,
              "select with q NULL and no attend before returned %s",
              fkv_status_string(st));
    if (st == FKV_OK) {
        if (!null_q)
            set_attended(h, c, 0);
        CHECK(h, fkv_select(h->twin, c->layer, &c->tb, qp) == FKV_OK,
              "select on the twin failed");
    }
    compare_caches(h, "select");
}

static void do_recall(harness *h, input *in, call *c)
{
    build_batch(h, in, c, 0);
    if (c->mut == MUT_NULL_TENSOR)
        c->mut = MUT_NONE, c->bad = c->n < 1;
    fkv_status st = fkv_recall(real_cache(h, c), c->layer, real_batch(c));
    check_null_cache(h, c, st, "recall");
    check_outcome(h, real_cache(h, c), st, c->bad, !c->bad, "recall");
    if (st == FKV_OK) {
        set_attended(h, c, 0);
        CHECK(h, fkv_recall(h->twin, c->layer, &c->tb) == FKV_OK,
              "recall on the twin failed");
    }
    compare_caches(h, "recall");
}

/* A whole decode step over a batch: every layer appends one token, attends,
 * selects and recalls; the layer byte of each call is overridden. */
static void op_step(harness *h, input *in)
{
    call c;
    pick_batch(h, in, &c);
    for (int l = 0; l < h->L; l++) {
        c.force_layer = l;
        call x = c;
        do_append(h, in, &x, 0);
        x = c;
        do_attend(h, in, &x);
        x = c;
        do_select(h, in, &x, 1);
        x = c;
        do_recall(h, in, &x);
    }
}

static void op_reserve(harness *h, input *in)
{
    unsigned m = in_u8(in);
    if (h->nrec == 0)
        return;
    record *r = &h->rec[m % (unsigned)h->nrec];
    unsigned t = in_u8(in);
    int64_t tokens;
    switch (t & 3) {
    case 0: tokens = -(int64_t)(t >> 2) - 1; break;
    case 1: tokens = h->max_tokens + 1 + (t >> 2); break;
    default: tokens = (int64_t)(t >> 2) * h->max_tokens / 63; break;
    }
    fkv_status st = fkv_seq_reserve(h->real, r->rid, tokens);
    int bad = !r->open || tokens < 0 || tokens > h->max_tokens;
    check_outcome(h, h->real, st, bad, !bad && h->pool_ample,
                  "reserve");
    if (st == FKV_OK)
        CHECK(h, fkv_seq_reserve(h->twin, r->tid, tokens) == FKV_OK,
              "reserve on the twin failed");
    compare_caches(h, "reserve");
}

static void op_introspect(harness *h, input *in)
{
    unsigned m = in_u8(in);
    int32_t cnt = 0;
    fkv_seq_id id = h->nrec ? h->rec[m % (unsigned)h->nrec].rid : 1;
    fkv_status st;
    fkv_cache *c = h->real;
    int32_t *pg = h->pages_r;
    switch ((m >> 4) % 8) {
    case 0: st = fkv_get_selected_pages(c, -1, id, 0, pg, 8, &cnt); break;
    case 1: st = fkv_get_selected_pages(c, h->L, id, 0, pg, 8, &cnt); break;
    case 2: st = fkv_get_selected_pages(c, 0, id, h->Hkv, pg, 8, &cnt); break;
    case 3: st = fkv_get_selected_pages(c, 0, id, 0, NULL, 8, &cnt); break;
    case 4: st = fkv_get_selected_pages(c, 0, id, 0, pg, -1, &cnt); break;
    case 5: st = fkv_get_selected_pages(c, 0, id, 0, pg, 8, NULL); break;
    case 6: st = fkv_seq_length(c, id, NULL); break;
    default: {
        fkv_stats s;
        s.struct_size = (m & 1) ? 0 : 7;
        st = fkv_get_stats(h->real, &s);
        break;
    }
    }
    CHECK(h, st != FKV_OK, "introspection with a bad argument succeeded "
          "(case %u)", (m >> 4) % 8);
    check_message(h, h->real, st, "introspection");
    /* Capacity 0 with NULL pages is allowed and counts. */
    if (h->nrec && h->rec[m % (unsigned)h->nrec].open) {
        st = fkv_get_selected_pages(h->real, 0, id, 0, NULL, 0, &cnt);
        CHECK(h, st == FKV_OK && cnt >= 0 && cnt <= h->K,
              "get_selected_pages with capacity 0 gives %s, count %d",
              fkv_status_string(st), cnt);
    }
    compare_caches(h, "introspection");
}

static void op_stats(harness *h, input *in)
{
    unsigned m = in_u8(in);
    if (m & 1) {
        CHECK(h, fkv_reset_stats(h->real) == FKV_OK, "reset_stats");
        CHECK(h, fkv_reset_stats(h->twin) == FKV_OK, "reset_stats (twin)");
    } else {
        CHECK(h, fkv_reset_stats(NULL) == FKV_ERR_INVALID_ARGUMENT,
              "reset_stats(NULL)");
        CHECK(h, fkv_sync(h->real) == FKV_OK, "sync");
        CHECK(h, fkv_sync(h->twin) == FKV_OK, "sync (twin)");
        CHECK(h, fkv_set_stream(h->real, NULL) == FKV_OK, "set_stream");
        CHECK(h, fkv_set_stream(h->twin, NULL) == FKV_OK, "set_stream");
    }
    compare_caches(h, "stats");
}

/* fkv_create with one bad option must fail and leave *cache NULL; a larger
 * struct whose extra bytes are zero must be accepted. */
static void op_create(harness *h, input *in)
{
    unsigned m = in_u8(in), v = in_u8(in);
    struct {
        fkv_options o;
        unsigned char extra[16];
    } big;
    memset(&big, 0, sizeof big);
    big.o = h->o;
    fkv_options *o = &big.o;
    int bad = 1;
    switch (m % 16) {
    case 0: o->num_layers = -(int32_t)(v & 3); break;
    case 1: o->num_kv_heads = 0; break;
    case 2: o->num_q_heads = (v & 1) ? 0 : -o->num_kv_heads; break;
    case 3: o->head_dim = (v & 1) ? 32 : 96; break;
    case 4: o->dtype = (fkv_dtype)(3 + (v & 7)); break;
    case 5: o->softmax_scale = (v & 1) ? -1.0f : (float)INFINITY; break;
    case 6: o->page_tokens = (v & 1) ? 0 : 1025; break;
    case 7: o->sink_tokens = o->budget_tokens + o->page_tokens; break;
    case 8: /* not a multiple of page_tokens, or negative */
        o->budget_tokens = o->page_tokens > 1 ? o->budget_tokens + 1 : -1;
        break;
    case 9: o->correction_threshold = (float)NAN; break;
    case 10: o->policy = (fkv_policy)(5 + (v & 7)); break; /* 4: EXTERNAL */
    case 11: o->max_sequences = (v & 1) ? 0 : (1 << 20) + 1; break;
    case 12: o->max_tokens_per_sequence = -(int64_t)(v & 7); break;
    case 13: o->struct_size = v & 15; break;
    case 14: /* unknown non-zero bytes past the struct this library knows */
        o->struct_size = sizeof big;
        big.extra[v & 15] = (unsigned char)(1 + (v >> 4));
        break;
    default: /* zero bytes past it: valid */
        o->struct_size = sizeof big;
        bad = 0;
        break;
    }
    fkv_cache *c = (fkv_cache *)&big; /* must be overwritten */
    fkv_status st = fkv_create(o, &c);
    if (bad) {
        CHECK(h, st != FKV_OK && c == NULL,
              "fkv_create with bad option %u gave %s and %s handle", m % 16,
              fkv_status_string(st), c ? "a" : "no");
        check_message(h, NULL, st, "fkv_create");
    } else {
        CHECK(h, st == FKV_OK && c != NULL,
              "fkv_create with a larger zeroed struct gave %s",
              fkv_status_string(st));
        fkv_destroy(c);
    }
    CHECK(h, fkv_create(NULL, &c) == FKV_ERR_INVALID_ARGUMENT,
          "fkv_create(NULL opts)");
    CHECK(h, fkv_create(&h->o, NULL) == FKV_ERR_INVALID_ARGUMENT,
          "fkv_create(NULL cache)");
    compare_caches(h, "fkv_create");
}

/* ---------------------------------------------------------------------- */
/* Setup                                                                  */
/* ---------------------------------------------------------------------- */

static int setup(harness *h, input *in)
{
    memset(h, 0, sizeof *h);
    unsigned b0 = in_u8(in), b1 = in_u8(in), b2 = in_u8(in), b3 = in_u8(in),
             b4 = in_u8(in), b5 = in_u8(in);
    static const int pages[5] = { 4, 8, 16, 1, 2 };
    static const float thresholds[4] = { 0.9f, FKV_CORRECTION_OFF, 1.0f,
                                         -1.0f };
    fkv_options *o = &h->o;
    if (fkv_options_init(o, sizeof *o) != FKV_OK)
        fail(NULL, "fkv_options_init failed");
    /* Every option the harness relies on is set here, defaults or not. */
    o->backend = FKV_BACKEND_CPU;
    o->device = 0;
    o->policy = (fkv_policy)(b0 & 3);
    o->group_score = (fkv_group_score)((b0 >> 2) & 1);
    o->dtype = (fkv_dtype)(((b0 >> 3) & 3) % 3);
    o->correction_threshold = thresholds[(b0 >> 5) & 3];
    h->P = pages[b1 % 5];
    h->S = (int)((b1 / 5) % 2);
    h->W = (int)((b1 / 10) % 3);
    h->K = (int)((b1 / 30) % 4);
    h->Hkv = 1 + (int)(b2 & 1);
    h->G = 1 + (int)((b2 >> 1) % 3);
    h->L = 1 + (int)((b2 >> 3) & 1);
    h->D = HEAD_DIM;
    h->Hq = h->Hkv * h->G;
    o->num_layers = h->L;
    o->num_q_heads = h->Hq;
    o->num_kv_heads = h->Hkv;
    o->head_dim = h->D;
    o->page_tokens = h->P;
    o->sink_tokens = h->S * h->P;
    o->window_tokens = h->W * h->P;
    o->budget_tokens = (h->S + h->W + h->K) * h->P;
    o->max_sequences = 1 + (int)((b2 >> 4) & 3);
    h->max_tokens = (int64_t)h->P * (1 + (b3 & 15)) + ((b3 >> 4) & 3);
    if (h->max_tokens > 160)
        h->max_tokens = 160 + (b3 & 7);
    o->max_tokens_per_sequence = h->max_tokens;
    size_t block = 2 * (size_t)h->P * (size_t)h->D * (size_t)h->Hkv *
                   ref_dtype_bytes(o->dtype);
    /* No limit (32 MiB chunks: slow, so rarely), a limit that every valid
     * call fits in (every sequence at full length), or a tight one. */
    uint64_t all_blocks = (uint64_t)o->max_sequences * (uint64_t)h->L *
                          (uint64_t)((h->max_tokens + h->P - 1) / h->P);
    h->pool_ample = b4 < 160;
    o->host_pool_bytes = b4 < 16 ? 0
                       : b4 < 160 ? (all_blocks + (b4 & 3)) * block
                       : (uint64_t)((b4 & 31) + 1) * block / 2;
    o->softmax_scale = (b5 & 1) ? 0.0f : 0.05f + (float)(b5 >> 1) / 256.0f;
    h->esz = ref_dtype_bytes(o->dtype);
    h->tol = o->dtype == FKV_DTYPE_F32 ? 1e-4
           : o->dtype == FKV_DTYPE_F16 ? 4e-3 : 3e-2;
    h->lay.P = h->P;
    h->lay.S = h->S;
    h->lay.W = h->W;
    h->lay.K = h->K;
    ref_rng_seed(&h->rng, 0x9e3779b97f4a7c15ull ^ ((uint64_t)b0 << 8) ^ b1);

    fkv_status st = fkv_create(o, &h->real);
    if (st != FKV_OK) {
        CHECK(h, h->real == NULL, "failed fkv_create left a handle");
        fail(h, "fkv_create failed for a valid shape: %s",
             fkv_status_string(st));
    }
    CHECK(h, fkv_create(o, &h->twin) == FKV_OK, "fkv_create (twin)");
    fkv_options got;
    memset(&got, 0, sizeof got);
    got.struct_size = sizeof got;
    CHECK(h, fkv_get_options(h->real, &got) == FKV_OK, "get_options");
    CHECK(h, got.backend == FKV_BACKEND_CPU && got.policy == o->policy &&
                 got.dtype == o->dtype,
          "get_options does not give back the options");
    o->softmax_scale = got.softmax_scale; /* 0 resolved */

    h->kv_cap = (h->max_tokens + 2) * 4;
    size_t kvn = (size_t)h->kv_cap * (size_t)h->Hkv * (size_t)h->D;
    size_t qn = (size_t)(MAX_BATCH + 2) * (size_t)h->Hq * (size_t)h->D;
    h->kbuf = malloc(kvn * 4);
    h->vbuf = malloc(kvn * 4);
    h->kf = malloc(kvn * sizeof(float));
    h->vf = malloc(kvn * sizeof(float));
    h->qbuf = malloc(qn * 4);
    h->obuf_r = malloc(qn * 4);
    h->obuf_t = malloc(qn * 4);
    h->qf = malloc(qn * sizeof(float));
    h->of = malloc(qn * sizeof(float));
    h->pages_r = malloc(64 * sizeof(int32_t));
    h->pages_t = malloc(64 * sizeof(int32_t));
    h->mask = malloc((size_t)h->max_tokens + 1);
    h->ref = malloc((size_t)h->D * sizeof(double));
    CHECK(h, h->kbuf && h->vbuf && h->kf && h->vf && h->qbuf && h->obuf_r &&
                 h->obuf_t && h->qf && h->of && h->pages_r && h->pages_t &&
                 h->mask && h->ref, "out of memory in the harness");
    return 0;
}

static void teardown(harness *h)
{
    fkv_destroy(h->real);
    fkv_destroy(h->twin);
    for (int i = 0; i < h->nrec; i++)
        for (int l = 0; l < 2; l++) {
            free(h->rec[i].k[l]);
            free(h->rec[i].v[l]);
        }
    free(h->kbuf); free(h->vbuf); free(h->kf); free(h->vf);
    free(h->qbuf); free(h->obuf_r); free(h->obuf_t); free(h->qf);
    free(h->of); free(h->pages_r); free(h->pages_t); free(h->mask);
    free(h->ref);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    input in = { data, size, 0 };
    harness h;
    setup(&h, &in);
    for (int ops = 0; ops < MAX_OPS && !in_done(&in); ops++) {
        unsigned op = in_u8(&in) % 13;
        call c;
        switch (op) {
        case 0: op_open(&h, &in); break;
        case 1: op_close(&h, &in); break;
        case 2: pick_batch(&h, &in, &c); do_append(&h, &in, &c, 1); break;
        case 3: pick_batch(&h, &in, &c); do_append(&h, &in, &c, 2); break;
        case 4: pick_batch(&h, &in, &c); do_attend(&h, &in, &c); break;
        case 5: pick_batch(&h, &in, &c); do_select(&h, &in, &c, 0); break;
        case 6: pick_batch(&h, &in, &c); do_recall(&h, &in, &c); break;
        case 7: case 8: op_step(&h, &in); break;
        case 9: op_reserve(&h, &in); break;
        case 10: op_introspect(&h, &in); break;
        case 11: op_stats(&h, &in); break;
        default: op_create(&h, &in); break;
        }
    }
    teardown(&h);
    return 0;
}

#ifdef FKV_FUZZ_REPLAY
/* Without libFuzzer: run every file named, or every file in every directory
 * named, once. */
#include <dirent.h>
#include <sys/stat.h>

static int replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "fuzz_calls: cannot open %s\n", path);
        return 1;
    }
    static uint8_t buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    LLVMFuzzerTestOneInput(buf, n);
    return 0;
}

int main(int argc, char **argv)
{
    int files = 0, errors = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            fprintf(stderr, "fuzz_calls: cannot stat %s\n", argv[i]);
            errors++;
            continue;
        }
        if (!S_ISDIR(st.st_mode)) {
            errors += replay_file(argv[i]);
            files++;
            continue;
        }
        DIR *d = opendir(argv[i]);
        if (!d) {
            errors++;
            continue;
        }
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.')
                continue;
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", argv[i], e->d_name);
            errors += replay_file(path);
            files++;
        }
        closedir(d);
    }
    printf("fuzz_calls: replayed %d inputs, %d unreadable; %llu calls "
           "(%llu rejected), %llu head outputs and %llu selections checked "
           "against the reference\n", files, errors, counts.calls,
           counts.rejected, counts.outputs, counts.selections);
    return errors ? 1 : 0;
}
#endif
