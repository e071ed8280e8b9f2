/*
 * badinput: every invalid call returns its specific status, leaves a
 * message in fkv_last_error (fkv_last_error(NULL, ...) for calls without a
 * handle) and leaves the cache exactly as it was: the same attend output
 * bit for bit and the same sequence lengths (docs/design.md section 6).
 *
 * SPDX-License-Identifier: MIT
 */
#include <stddef.h>

#include "tests.h"

#include <stddef.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { F_APPEND, F_ATTEND, F_SELECT, F_RECALL, F_COUNT };
static const char *const k_fn_names[F_COUNT] = {"fkv_append", "fkv_attend",
                                                "fkv_select", "fkv_recall"};

#define BI_MAX_TOKENS 2048

typedef struct bi_fixture {
    tst_model m;
    tst_snapshot snap;
    int s0, s1;
    /* Device buffers big enough for any call here. */
    void *k, *v, *q, *out;
} bi_fixture;

/* Two layers, two sequences (300 and 200 tokens, beyond the budget of
 * 128), FREEKV; max 4 sequences of 1024 tokens. */
static void bi_setup(bi_fixture *f)
{
    fkv_options o;
    int slots[2], n[2] = {300, 200};
    size_t kvn, qn;
    float *tmp;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    tst_geometry(&o, 16, 32, 32, 128);
    o.max_sequences = 4;
    o.max_tokens_per_sequence = 1024;
    tst_model_init(&f->m, &o, 7000);
    f->s0 = slots[0] = tst_open(&f->m);
    f->s1 = slots[1] = tst_open(&f->m);
    tst_prefill(&f->m, 2, slots, n);
    kvn = (size_t)BI_MAX_TOKENS * 2 * 64;
    qn = (size_t)4 * 4 * 64;
    tmp = (float *)calloc(kvn, sizeof(float));
    ref_random_tensor(&f->m.rng, REF_F32, tmp, kvn, 1.0);
    f->k = tst_dev_from_floats(FKV_DTYPE_F32, tmp, kvn);
    f->v = tst_dev_from_floats(FKV_DTYPE_F32, tmp, kvn);
    f->q = tst_dev_from_floats(FKV_DTYPE_F32, tmp, qn);
    f->out = tst_dev_from_floats(FKV_DTYPE_F32, tmp, qn);
    free(tmp);
    tst_snapshot_take(&f->m, &f->snap);
}

static void bi_teardown(bi_fixture *f)
{
    tst_dev_free(f->k);
    tst_dev_free(f->v);
    tst_dev_free(f->q);
    tst_dev_free(f->out);
    tst_snapshot_free(&f->snap);
    tst_model_free(&f->m);
}

static fkv_status bi_call(bi_fixture *f, int fn, int layer,
                          const fkv_batch *b)
{
    switch (fn) {
    case F_APPEND:
        return fkv_append(f->m.c, layer, b, f->k, f->v);
    case F_ATTEND:
        return fkv_attend(f->m.c, layer, b, f->q, f->out);
    case F_SELECT:
        return fkv_select(f->m.c, layer, b, f->q);
    default:
        return fkv_recall(f->m.c, layer, b);
    }
}

static void bi_expect(bi_fixture *f, fkv_status got, fkv_status want,
                      const char *what)
{
    tst_expect_error(f->m.c, got, want, what);
    tst_snapshot_check(&f->m, &f->snap);
}

static fkv_batch batch_of(const fkv_seq_id *ids, int n, const int32_t *nt)
{
    fkv_batch b;
    b.num_seqs = n;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = nt;
    return b;
}

/* ---------------------------------------------------------------------- */

START_TEST(bi_null_cache)
{
    bi_fixture f;
    fkv_seq_id ids[1], sid = 0;
    fkv_batch b;
    fkv_options o;
    fkv_stats st;
    int64_t len;
    int32_t pages[4], cnt;
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    b = batch_of(ids, 1, NULL);
    o.struct_size = sizeof o;
    st.struct_size = sizeof st;
#define NULLC(call)                                                          \
    tst_expect_error(NULL, (call), FKV_ERR_INVALID_ARGUMENT, #call)
    NULLC(fkv_append(NULL, 0, &b, f.k, f.v));
    NULLC(fkv_attend(NULL, 0, &b, f.q, f.out));
    NULLC(fkv_select(NULL, 0, &b, f.q));
    NULLC(fkv_recall(NULL, 0, &b));
    NULLC(fkv_seq_open(NULL, &sid));
    NULLC(fkv_seq_close(NULL, ids[0]));
    NULLC(fkv_seq_length(NULL, ids[0], &len));
    NULLC(fkv_get_options(NULL, &o));
    NULLC(fkv_set_stream(NULL, NULL));
    NULLC(fkv_get_stats(NULL, &st));
    NULLC(fkv_reset_stats(NULL));
    NULLC(fkv_get_selected_pages(NULL, 0, ids[0], 0, pages, 4, &cnt));
#undef NULLC
    tst_snapshot_check(&f.m, &f.snap);
    bi_teardown(&f);
}
END_TEST

/* _i: the function. */
START_TEST(bi_null_batch)
{
    bi_fixture f;
    char what[64];
    bi_setup(&f);
    snprintf(what, sizeof what, "%s(batch NULL)", k_fn_names[_i]);
    bi_expect(&f, bi_call(&f, _i, 0, NULL), FKV_ERR_INVALID_ARGUMENT, what);
    bi_teardown(&f);
}
END_TEST

START_TEST(bi_null_k)
{
    bi_fixture f;
    fkv_seq_id ids[1];
    fkv_batch b;
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    b = batch_of(ids, 1, NULL);
    bi_expect(&f, fkv_append(f.m.c, 0, &b, NULL, f.v),
              FKV_ERR_INVALID_ARGUMENT, "fkv_append(k NULL)");
    bi_teardown(&f);
}
END_TEST

START_TEST(bi_null_v)
{
    bi_fixture f;
    fkv_seq_id ids[1];
    fkv_batch b;
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    b = batch_of(ids, 1, NULL);
    bi_expect(&f, fkv_append(f.m.c, 0, &b, f.k, NULL),
              FKV_ERR_INVALID_ARGUMENT, "fkv_append(v NULL)");
    bi_teardown(&f);
}
END_TEST

/* _i: 0 attend, 1 select. */
START_TEST(bi_null_q)
{
    bi_fixture f;
    fkv_seq_id ids[2];
    fkv_batch b;
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    ids[1] = f.m.seq[f.s1].id;
    b = batch_of(ids, 2, NULL);
    if (_i == 0) {
        bi_expect(&f, fkv_attend(f.m.c, 0, &b, NULL, f.out),
                  FKV_ERR_INVALID_ARGUMENT, "fkv_attend(q NULL)");
    } else {
        /* fkv_select(q NULL) keeps the selection of the attend just made
         * (the snapshot's attends made one); after a call that changes the
         * pending selection it is an error. The snapshot's repeated query
         * keeps the active sets, so these calls change no attend output. */
        if (_i == 1)
            tst_ok(fkv_select(f.m.c, 0, &b, f.q));
        else
            tst_ok(fkv_recall(f.m.c, 0, &b));
        bi_expect(&f, fkv_select(f.m.c, 0, &b, NULL), FKV_ERR_INVALID_STATE,
                  _i == 1 ? "fkv_select(q NULL) after fkv_select(q)"
                          : "fkv_select(q NULL) after fkv_recall");
    }
    bi_teardown(&f);
}
END_TEST

START_TEST(bi_null_out)
{
    bi_fixture f;
    fkv_seq_id ids[2];
    fkv_batch b;
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    ids[1] = f.m.seq[f.s1].id;
    b = batch_of(ids, 2, NULL);
    bi_expect(&f, fkv_attend(f.m.c, 1, &b, f.q, NULL),
              FKV_ERR_INVALID_ARGUMENT, "fkv_attend(out NULL)");
    bi_teardown(&f);
}
END_TEST

/* _i: the function. */
START_TEST(bi_null_seq_ids)
{
    bi_fixture f;
    fkv_batch b;
    char what[64];
    bi_setup(&f);
    b = batch_of(NULL, 2, NULL);
    snprintf(what, sizeof what, "%s(seq_ids NULL)", k_fn_names[_i]);
    bi_expect(&f, bi_call(&f, _i, 0, &b), FKV_ERR_INVALID_ARGUMENT, what);
    bi_teardown(&f);
}
END_TEST

/* _i: negative batch size on each function. */
START_TEST(bi_negative_num_seqs)
{
    bi_fixture f;
    fkv_seq_id ids[2];
    fkv_batch b;
    char what[64];
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    ids[1] = f.m.seq[f.s1].id;
    b = batch_of(ids, -1, NULL);
    snprintf(what, sizeof what, "%s(num_seqs -1)", k_fn_names[_i]);
    bi_expect(&f, bi_call(&f, _i, 0, &b), FKV_ERR_INVALID_ARGUMENT, what);
    bi_teardown(&f);
}
END_TEST

/* _i: function x {layer -1, layer == num_layers}. */
START_TEST(bi_layer_out_of_range)
{
    bi_fixture f;
    fkv_seq_id ids[2];
    fkv_batch b;
    char what[64];
    int fn = _i / 2, layer;
    bi_setup(&f);
    layer = (_i & 1) ? f.m.L : -1;
    ids[0] = f.m.seq[f.s0].id;
    ids[1] = f.m.seq[f.s1].id;
    b = batch_of(ids, 2, NULL);
    snprintf(what, sizeof what, "%s(layer %d)", k_fn_names[fn], layer);
    bi_expect(&f, bi_call(&f, fn, layer, &b), FKV_ERR_OUT_OF_RANGE, what);
    bi_teardown(&f);
}
END_TEST

START_TEST(bi_selected_pages_bad)
{
    bi_fixture f;
    int32_t pages[16], cnt;
    fkv_seq_id id;
    bi_setup(&f);
    id = f.m.seq[f.s0].id;
    tst_expect_error(f.m.c, fkv_get_selected_pages(f.m.c, -1, id, 0, pages,
                                                   16, &cnt),
                     FKV_ERR_OUT_OF_RANGE, "selected pages, layer -1");
    tst_expect_error(f.m.c, fkv_get_selected_pages(f.m.c, f.m.L, id, 0, pages,
                                                   16, &cnt),
                     FKV_ERR_OUT_OF_RANGE, "selected pages, layer L");
    tst_expect_error(f.m.c, fkv_get_selected_pages(f.m.c, 0, id, -1, pages,
                                                   16, &cnt),
                     FKV_ERR_OUT_OF_RANGE, "selected pages, kv head -1");
    tst_expect_error(f.m.c, fkv_get_selected_pages(f.m.c, 0, id, f.m.KVH,
                                                   pages, 16, &cnt),
                     FKV_ERR_OUT_OF_RANGE, "selected pages, kv head KVH");
    tst_expect_error(f.m.c, fkv_get_selected_pages(f.m.c, 0, id, 0, pages,
                                                   16, NULL),
                     FKV_ERR_INVALID_ARGUMENT, "selected pages, count NULL");
    tst_expect_error(f.m.c, fkv_get_selected_pages(f.m.c, 0, id, 0, NULL,
                                                   16, &cnt),
                     FKV_ERR_INVALID_ARGUMENT,
                     "selected pages, pages NULL with capacity 16");
    tst_expect_error(f.m.c, fkv_get_selected_pages(f.m.c, 0, id, 0, pages,
                                                   -1, &cnt),
                     FKV_ERR_INVALID_ARGUMENT,
                     "selected pages, capacity -1");
    tst_expect_error(f.m.c, fkv_get_selected_pages(f.m.c, 0, 987654, 0,
                                                   pages, 16, &cnt),
                     FKV_ERR_UNKNOWN_SEQUENCE, "selected pages, unknown id");
    tst_snapshot_check(&f.m, &f.snap);
    bi_teardown(&f);
}
END_TEST

/* _i: function; the batch names an open sequence and a never opened id. */
START_TEST(bi_unknown_sequence)
{
    bi_fixture f;
    fkv_seq_id ids[2];
    fkv_batch b;
    char what[64];
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    ids[1] = 987654321;
    b = batch_of(ids, 2, NULL);
    snprintf(what, sizeof what, "%s(unknown id)", k_fn_names[_i]);
    bi_expect(&f, bi_call(&f, _i, 0, &b), FKV_ERR_UNKNOWN_SEQUENCE, what);
    bi_teardown(&f);
}
END_TEST

START_TEST(bi_unknown_sequence_calls)
{
    bi_fixture f;
    int64_t len;
    bi_setup(&f);
    tst_expect_error(f.m.c, fkv_seq_length(f.m.c, 987654321, &len),
                     FKV_ERR_UNKNOWN_SEQUENCE, "fkv_seq_length(unknown)");
    tst_expect_error(f.m.c, fkv_seq_close(f.m.c, 987654321),
                     FKV_ERR_UNKNOWN_SEQUENCE, "fkv_seq_close(unknown)");
    tst_expect_error(f.m.c, fkv_seq_length(f.m.c, -1, &len),
                     FKV_ERR_UNKNOWN_SEQUENCE, "fkv_seq_length(-1)");
    tst_snapshot_check(&f.m, &f.snap);
    bi_teardown(&f);
}
END_TEST

/* _i: function; the batch names an open sequence and a closed one. */
START_TEST(bi_closed_sequence)
{
    bi_fixture f;
    fkv_seq_id ids[2];
    fkv_batch b;
    char what[64];
    int c;
    int n = 40;
    bi_setup(&f);
    c = tst_open(&f.m);
    tst_prefill(&f.m, 1, &c, &n);
    tst_close(&f.m, c);
    ids[0] = f.m.seq[f.s1].id;
    ids[1] = f.m.seq[c].id;
    b = batch_of(ids, 2, NULL);
    snprintf(what, sizeof what, "%s(closed id)", k_fn_names[_i]);
    bi_expect(&f, bi_call(&f, _i, 0, &b), FKV_ERR_UNKNOWN_SEQUENCE, what);
    bi_teardown(&f);
}
END_TEST

/* _i: function; the same id twice in one batch. */
START_TEST(bi_duplicate_sequence)
{
    bi_fixture f;
    fkv_seq_id ids[3];
    fkv_batch b;
    char what[64];
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    ids[1] = f.m.seq[f.s1].id;
    ids[2] = f.m.seq[f.s0].id;
    b = batch_of(ids, 3, NULL);
    snprintf(what, sizeof what, "%s(duplicate id)", k_fn_names[_i]);
    bi_expect(&f, bi_call(&f, _i, 0, &b), FKV_ERR_INVALID_ARGUMENT, what);
    bi_teardown(&f);
}
END_TEST

START_TEST(bi_num_tokens_zero)
{
    bi_fixture f;
    fkv_seq_id ids[2];
    int32_t nt[2] = {5, 0};
    fkv_batch b;
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    ids[1] = f.m.seq[f.s1].id;
    b = batch_of(ids, 2, nt);
    bi_expect(&f, fkv_append(f.m.c, 0, &b, f.k, f.v),
              FKV_ERR_INVALID_ARGUMENT, "fkv_append(num_tokens {5, 0})");
    bi_teardown(&f);
}
END_TEST

START_TEST(bi_num_tokens_negative)
{
    bi_fixture f;
    fkv_seq_id ids[2];
    int32_t nt[2] = {5, -1};
    fkv_batch b;
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    ids[1] = f.m.seq[f.s1].id;
    b = batch_of(ids, 2, nt);
    bi_expect(&f, fkv_append(f.m.c, 1, &b, f.k, f.v),
              FKV_ERR_INVALID_ARGUMENT, "fkv_append(num_tokens {5, -1})");
    bi_teardown(&f);
}
END_TEST

START_TEST(bi_token_capacity)
{
    bi_fixture f;
    fkv_seq_id ids[1];
    int32_t nt[1] = {1024 - 300 + 1};
    fkv_batch b;
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    b = batch_of(ids, 1, nt);
    bi_expect(&f, fkv_append(f.m.c, 0, &b, f.k, f.v), FKV_ERR_CAPACITY,
              "fkv_append past max_tokens_per_sequence");
    /* Exactly at capacity is fine. */
    nt[0] = 1024 - 300;
    tst_ok(fkv_append(f.m.c, 0, &b, f.k, f.v));
    bi_teardown(&f);
}
END_TEST

/* Only the last sequence of the batch overflows: nothing is appended to
 * the others either. */
START_TEST(bi_token_capacity_last_only)
{
    bi_fixture f;
    fkv_seq_id ids[2];
    int32_t nt[2] = {10, 1024 - 200 + 1};
    fkv_batch b;
    bi_setup(&f);
    ids[0] = f.m.seq[f.s0].id;
    ids[1] = f.m.seq[f.s1].id;
    b = batch_of(ids, 2, nt);
    bi_expect(&f, fkv_append(f.m.c, _i, &b, f.k, f.v), FKV_ERR_CAPACITY,
              "fkv_append where only the last sequence overflows");
    bi_teardown(&f);
}
END_TEST

START_TEST(bi_attend_before_append)
{
    bi_fixture f;
    fkv_seq_id ids[2];
    fkv_batch b;
    int e, one = 3;
    bi_setup(&f);
    e = tst_open(&f.m);
    ids[0] = f.m.seq[e].id;
    b = batch_of(ids, 1, NULL);
    bi_expect(&f, fkv_attend(f.m.c, 0, &b, f.q, f.out), FKV_ERR_INVALID_STATE,
              "fkv_attend before any append");
    ids[0] = f.m.seq[f.s0].id;
    ids[1] = f.m.seq[e].id;
    b = batch_of(ids, 2, NULL);
    bi_expect(&f, fkv_attend(f.m.c, 0, &b, f.q, f.out), FKV_ERR_INVALID_STATE,
              "fkv_attend of a batch with an empty sequence");
    /* Appended on layer 0 only: layer 1 is still empty. */
    tst_append_rand(&f.m, 0, 1, &e, &one);
    ids[0] = f.m.seq[e].id;
    b = batch_of(ids, 1, NULL);
    bi_expect(&f, fkv_attend(f.m.c, 1, &b, f.q, f.out), FKV_ERR_INVALID_STATE,
              "fkv_attend on a layer without tokens");
    tst_ok(fkv_attend(f.m.c, 0, &b, f.q, f.out));
    bi_teardown(&f);
}
END_TEST

static fkv_status create_with(fkv_options *o)
{
    fkv_cache *c = (fkv_cache *)(void *)o; /* must come back NULL */
    fkv_status st = fkv_create(o, &c);
    if (st == FKV_OK) {
        fkv_destroy(c);
        return st;
    }
    ck_assert_msg(c == NULL, "fkv_create failed but *cache is not NULL");
    return st;
}

START_TEST(bi_create_bad_dtype)
{
    fkv_options o;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    o.dtype = (fkv_dtype)7;
    tst_expect_error(NULL, create_with(&o), FKV_ERR_UNSUPPORTED,
                     "fkv_create(dtype 7)");
    /* -1 is FKV_DTYPE_UNSET: not a dtype but a forgotten field. */
    o.dtype = (fkv_dtype)-2;
    tst_expect_error(NULL, create_with(&o), FKV_ERR_UNSUPPORTED,
                     "fkv_create(dtype -2)");
}
END_TEST

START_TEST(bi_create_bad_head_dim)
{
    static const int dims[] = {100, 96, 32, 512};
    fkv_options o;
    size_t i;
    for (i = 0; i < sizeof dims / sizeof dims[0]; ++i) {
        char what[64];
        tst_options(&o, 1, 4, 2, dims[i], FKV_DTYPE_F32);
        snprintf(what, sizeof what, "fkv_create(head_dim %d)", dims[i]);
        tst_expect_error(NULL, create_with(&o), FKV_ERR_UNSUPPORTED, what);
    }
}
END_TEST

START_TEST(bi_create_bad_backend)
{
    fkv_options o;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    fkv_status st;
    o.backend = (fkv_backend)9;
    /* Not a backend at all: UNSUPPORTED ("backend not supported") or
     * INVALID_ARGUMENT are both fair readings of the header. */
    st = create_with(&o);
    ck_assert_msg(st == FKV_ERR_UNSUPPORTED || st == FKV_ERR_INVALID_ARGUMENT,
                  "fkv_create(backend 9) returned %d (%s)", (int)st,
                  fkv_status_string(st));
    tst_expect_error(NULL, st, st, "fkv_create(backend 9)");
}
END_TEST

START_TEST(bi_options_size_too_small)
{
    fkv_options o;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    /* Smaller than the first published fkv_options (which ended with
     * host_pool_bytes). */
    o.struct_size = offsetof(fkv_options, host_alloc) - sizeof(uint64_t);
    tst_expect_error(NULL, create_with(&o), FKV_ERR_VERSION_MISMATCH,
                     "fkv_create(struct_size too small)");
    o.struct_size = 0;
    tst_expect_error(NULL, create_with(&o), FKV_ERR_VERSION_MISMATCH,
                     "fkv_create(struct_size 0)");
}
END_TEST

START_TEST(bi_options_size_larger_nonzero_tail)
{
    struct {
        fkv_options o;
        unsigned char tail[32];
    } big;
    memset(&big, 0, sizeof big);
    tst_options(&big.o, 1, 4, 2, 64, FKV_DTYPE_F32);
    big.o.struct_size = sizeof(fkv_options) + sizeof big.tail;
    big.tail[5] = 1; /* an option this library does not know, set */
    tst_expect_error(NULL, create_with(&big.o), FKV_ERR_VERSION_MISMATCH,
                     "fkv_create(larger struct with a non-zero unknown field)");
}
END_TEST

/* _i: which invalid option. */
START_TEST(bi_options_invalid)
{
    fkv_options o;
    const char *what = "";
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32); /* page 16 sink 32 win 64 */
    switch (_i) {
    case 0:
        o.num_q_heads = 6;
        o.num_kv_heads = 4;
        what = "num_q_heads 6 with num_kv_heads 4";
        break;
    case 1:
        o.budget_tokens = 80; /* < sink 32 + window 64 */
        what = "sink + window > budget";
        break;
    case 2:
        o.budget_tokens = 264; /* not a multiple of 16 */
        what = "budget not a multiple of page";
        break;
    case 3:
        o.sink_tokens = 40;
        what = "sink not a multiple of page";
        break;
    case 4:
        o.window_tokens = 56;
        what = "window not a multiple of page";
        break;
    case 5:
        o.num_layers = 0;
        what = "num_layers 0";
        break;
    case 6:
        o.num_kv_heads = 0;
        what = "num_kv_heads 0";
        break;
    case 7:
        o.num_q_heads = 0;
        what = "num_q_heads 0";
        break;
    case 8:
        o.page_tokens = 0;
        what = "page_tokens 0";
        break;
    default:
        o.num_q_heads = 2;
        o.num_kv_heads = 4; /* fewer query heads than KV heads */
        what = "num_q_heads 2 with num_kv_heads 4";
        break;
    }
    tst_expect_error(NULL, create_with(&o), FKV_ERR_INVALID_ARGUMENT, what);
}
END_TEST

START_TEST(bi_stats_struct_size)
{
    bi_fixture f;
    fkv_stats st;
    fkv_options o;
    bi_setup(&f);
    memset(&st, 0, sizeof st);
    st.struct_size = 0;
    tst_expect_error(f.m.c, fkv_get_stats(f.m.c, &st),
                     FKV_ERR_VERSION_MISMATCH, "fkv_get_stats(struct_size 0)");
    /* 0.1's fkv_stats ended at device_bytes. */
    st.struct_size = offsetof(fkv_stats, pages_recalled_critical) -
                     sizeof(uint64_t);
    tst_expect_error(f.m.c, fkv_get_stats(f.m.c, &st),
                     FKV_ERR_VERSION_MISMATCH,
                     "fkv_get_stats(struct_size too small)");
    /* A 0.1 caller's struct: accepted, nothing written past its end. */
    st.struct_size = offsetof(fkv_stats, pages_recalled_critical);
    st.pages_recalled_critical = 0xdeadbeefu;
    tst_ok(fkv_get_stats(f.m.c, &st));
    ck_assert_uint_eq(st.pages_recalled_critical, 0xdeadbeefu);
    ck_assert_uint_eq(st.struct_size,
                      offsetof(fkv_stats, pages_recalled_critical));
    ck_assert_uint_gt(st.host_bytes, 0);
    tst_expect_error(f.m.c, fkv_get_stats(f.m.c, NULL),
                     FKV_ERR_INVALID_ARGUMENT, "fkv_get_stats(NULL)");
    memset(&o, 0, sizeof o);
    o.struct_size = 8;
    tst_expect_error(f.m.c, fkv_get_options(f.m.c, &o),
                     FKV_ERR_VERSION_MISMATCH,
                     "fkv_get_options(struct_size 8)");
    tst_expect_error(f.m.c, fkv_get_options(f.m.c, NULL),
                     FKV_ERR_INVALID_ARGUMENT, "fkv_get_options(NULL)");
    tst_snapshot_check(&f.m, &f.snap);
    bi_teardown(&f);
}
END_TEST

START_TEST(bi_null_out_params)
{
    bi_fixture f;
    bi_setup(&f);
    tst_expect_error(f.m.c, fkv_seq_length(f.m.c, f.m.seq[f.s0].id, NULL),
                     FKV_ERR_INVALID_ARGUMENT, "fkv_seq_length(NULL)");
    tst_expect_error(f.m.c, fkv_seq_open(f.m.c, NULL),
                     FKV_ERR_INVALID_ARGUMENT, "fkv_seq_open(NULL)");
    tst_snapshot_check(&f.m, &f.snap);
    bi_teardown(&f);
}
END_TEST

/* host_pool_bytes: room for 64 (sequence, layer, page) blocks. A small
 * append fits; one that needs more fails and changes nothing, also when
 * only the last sequence of the batch needs more. */
START_TEST(bi_host_pool_exhausted)
{
    fkv_options o;
    tst_model m;
    tst_snapshot snap;
    int slots[2], n[2] = {160, 16};
    const size_t block = (size_t)2 * 2 * 16 * 64 * sizeof(float); /* 16 KiB */
    void *k, *v;
    float *tmp;
    fkv_seq_id ids[2];
    int32_t nt[2];
    fkv_batch b;
    fkv_status st;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    tst_geometry(&o, 16, 32, 32, 128);
    o.host_pool_bytes = 64 * block;
    o.max_sequences = 2;
    o.max_tokens_per_sequence = 4096;
    tst_model_init(&m, &o, 7100);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, n); /* 11 blocks */
    tst_snapshot_take(&m, &snap);
    tmp = (float *)calloc((size_t)2000 * 2 * 64, sizeof(float));
    ref_random_tensor(&m.rng, REF_F32, tmp, (size_t)2000 * 2 * 64, 1.0);
    k = tst_dev_from_floats(FKV_DTYPE_F32, tmp, (size_t)2000 * 2 * 64);
    v = tst_dev_from_floats(FKV_DTYPE_F32, tmp, (size_t)2000 * 2 * 64);
    ids[0] = m.seq[slots[0]].id;
    ids[1] = m.seq[slots[1]].id;
    /* 16 + 1984 tokens: 126 more blocks than the pool holds. */
    nt[0] = 16;
    nt[1] = 1984;
    b = batch_of(ids, 2, nt);
    st = fkv_append(m.c, 0, &b, k, v);
    ck_assert_msg(st == FKV_ERR_OUT_OF_MEMORY || st == FKV_ERR_CAPACITY,
                  "append past host_pool_bytes returned %d (%s)", (int)st,
                  fkv_status_string(st));
    tst_expect_error(m.c, st, st, "append past host_pool_bytes");
    tst_snapshot_check(&m, &snap);
    /* Still usable: a small append succeeds. */
    nt[0] = 16;
    nt[1] = 16;
    tst_ok(fkv_append(m.c, 0, &b, k, v));
    tst_dev_free(k);
    tst_dev_free(v);
    free(tmp);
    tst_snapshot_free(&snap);
    tst_model_free(&m);
}
END_TEST

/* The pool grows on demand up to host_pool_bytes exactly (64 blocks of
 * one (sequence, layer, page) here), in several appends; one block more
 * fails and changes nothing. */
START_TEST(bi_host_pool_grows_to_limit)
{
    fkv_options o;
    tst_model m;
    tst_snapshot snap;
    int slots[2];
    const size_t block = (size_t)2 * 2 * 16 * 64 * sizeof(float); /* 16 KiB */
    int a1 = 176, b1 = 320, a2 = 528; /* 11 + 20 + 33 = 64 blocks */
    float kr[2 * 64], vr[2 * 64];
    fkv_status st;
    fkv_stats stats;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    tst_geometry(&o, 16, 32, 32, 128);
    o.host_pool_bytes = 64 * block;
    o.max_sequences = 2;
    o.max_tokens_per_sequence = 4096;
    tst_model_init(&m, &o, 7200);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_append_rand(&m, 0, 1, &slots[0], &a1);
    tst_append_rand(&m, 0, 1, &slots[1], &b1);
    tst_append_rand(&m, 0, 1, &slots[0], &a2);
    tst_stats(&m, &stats);
    ck_assert_msg(stats.host_bytes >= 64 * block, "host_bytes %llu",
                  (unsigned long long)stats.host_bytes);
    tst_snapshot_take(&m, &snap);
    memset(kr, 0, sizeof kr);
    memset(vr, 0, sizeof vr);
    st = tst_append(&m, 0, 1, &slots[1], NULL, kr, vr);
    ck_assert_msg(st == FKV_ERR_OUT_OF_MEMORY || st == FKV_ERR_CAPACITY,
                  "a 65th block past host_pool_bytes: status %d (%s)",
                  (int)st, fkv_status_string(st));
    tst_expect_error(m.c, st, st, "append past host_pool_bytes");
    tst_snapshot_check(&m, &snap);
    /* Closing a sequence returns its blocks: the append fits again. */
    tst_close(&m, slots[0]);
    tst_ok(tst_append(&m, 0, 1, &slots[1], NULL, kr, vr));
    tst_snapshot_free(&snap);
    tst_model_free(&m);
}
END_TEST

START_TEST(bi_cuda_unavailable)
{
    fkv_options o;
    fkv_cache *c = NULL;
    fkv_status st;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    o.backend = FKV_BACKEND_CUDA;
    st = fkv_create(&o, &c);
    if (st == FKV_OK) { /* a GPU exists: nothing to check here */
        fkv_destroy(c);
        return;
    }
    ck_assert_ptr_null(c);
    ck_assert_msg(st == FKV_ERR_UNSUPPORTED || st == FKV_ERR_DEVICE,
                  "CUDA backend unavailable: status %d (%s)", (int)st,
                  fkv_status_string(st));
    tst_expect_error(NULL, st, st, "fkv_create(CUDA) without a GPU");
}
END_TEST

Suite *suite_badinput(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "badinput"));
    TCase *tc = tst_tcase(s, "badinput");
    tcase_add_test(tc, bi_null_cache);
    tcase_add_loop_test(tc, bi_null_batch, 0, F_COUNT);
    tcase_add_test(tc, bi_null_k);
    tcase_add_test(tc, bi_null_v);
    tcase_add_loop_test(tc, bi_null_q, 0, 3);
    tcase_add_test(tc, bi_null_out);
    tcase_add_loop_test(tc, bi_null_seq_ids, 0, F_COUNT);
    tcase_add_loop_test(tc, bi_negative_num_seqs, 0, F_COUNT);
    tcase_add_loop_test(tc, bi_layer_out_of_range, 0, 2 * F_COUNT);
    tcase_add_test(tc, bi_selected_pages_bad);
    tcase_add_loop_test(tc, bi_unknown_sequence, 0, F_COUNT);
    tcase_add_test(tc, bi_unknown_sequence_calls);
    tcase_add_loop_test(tc, bi_closed_sequence, 0, F_COUNT);
    tcase_add_loop_test(tc, bi_duplicate_sequence, 0, F_COUNT);
    tcase_add_test(tc, bi_num_tokens_zero);
    tcase_add_test(tc, bi_num_tokens_negative);
    tcase_add_test(tc, bi_token_capacity);
    tcase_add_loop_test(tc, bi_token_capacity_last_only, 0, 2);
    tcase_add_test(tc, bi_attend_before_append);
    tcase_add_test(tc, bi_create_bad_dtype);
    tcase_add_test(tc, bi_create_bad_head_dim);
    tcase_add_test(tc, bi_create_bad_backend);
    tcase_add_test(tc, bi_options_size_too_small);
    tcase_add_test(tc, bi_options_size_larger_nonzero_tail);
    tcase_add_loop_test(tc, bi_options_invalid, 0, 10);
    tcase_add_test(tc, bi_stats_struct_size);
    tcase_add_test(tc, bi_null_out_params);
    tcase_add_test(tc, bi_host_pool_exhausted);
    tcase_add_test(tc, bi_host_pool_grows_to_limit);
    tcase_add_test(tc, bi_cuda_unavailable);
    return s;
}
