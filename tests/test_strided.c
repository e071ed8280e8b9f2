/*
 * strided: fkv_append_strided takes K and V in other layouts ([heads,
 * tokens, D], padded rows) and the cache then attends exactly as if they
 * had been appended contiguously (float64 reference); bad descriptors are
 * rejected and change nothing.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <stdlib.h>
#include <string.h>

/* Packs rows [total][KVH][D] (floats) into dst in the dtype with the given
 * strides (elements); dst holds `elems` elements, zero elsewhere. */
static void *pack(tst_model *m, const float *src, int total, int64_t ts,
                  int64_t hs, size_t elems)
{
    float *tmp = (float *)calloc(elems, sizeof(float));
    void *dst = malloc(elems * ref_dtype_bytes((int)m->dt));
    int r, h, d;
    for (r = 0; r < total; ++r)
        for (h = 0; h < m->KVH; ++h)
            for (d = 0; d < m->D; ++d)
                tmp[r * ts + h * hs + d] =
                    src[((size_t)r * m->KVH + h) * m->D + d];
    ref_encode((int)m->dt, tmp, dst, elems);
    free(tmp);
    return dst;
}

/* Appends ntok[i] random tokens per sequence at layer in layout `layout`:
 * 0 contiguous, 1 [heads, tokens, D], 2 rows padded by 24 elements. */
static void strided_append(tst_model *m, int layer, int nseq,
                           const int *slots, const int *ntok, int layout)
{
    fkv_seq_id ids[TST_MAX_SEQS];
    int32_t nt[TST_MAX_SEQS];
    int total = 0, i;
    size_t row = (size_t)m->KVH * m->D, elems;
    int64_t ts, hs;
    float *k, *v;
    void *pk, *pv, *dk, *dv;
    size_t bytes;
    fkv_tensor kt, vt;
    fkv_batch b;
    for (i = 0; i < nseq; ++i) {
        ids[i] = m->seq[slots[i]].id;
        nt[i] = ntok[i];
        total += ntok[i];
    }
    k = (float *)malloc(sizeof(float) * row * total);
    v = (float *)malloc(sizeof(float) * row * total);
    ref_random_tensor(&m->rng, (int)m->dt, k, row * total, 1.0);
    ref_random_tensor(&m->rng, (int)m->dt, v, row * total, 1.0);
    if (layout == 1) {
        ts = m->D;
        hs = (int64_t)total * m->D;
        elems = row * total;
    } else if (layout == 2) {
        ts = (int64_t)row + 24;
        hs = m->D;
        elems = (size_t)ts * total;
    } else {
        ts = (int64_t)row;
        hs = m->D;
        elems = row * total;
    }
    pk = pack(m, k, total, ts, hs, elems);
    pv = pack(m, v, total, ts, hs, elems);
    /* The backend's memory (device memory on CUDA). */
    bytes = elems * ref_dtype_bytes((int)m->dt);
    dk = tst_dev_alloc(bytes);
    dv = tst_dev_alloc(bytes);
    tst_dev_put(dk, pk, bytes);
    tst_dev_put(dv, pv, bytes);
    memset(&kt, 0, sizeof kt);
    kt.struct_size = sizeof kt;
    kt.data = dk;
    kt.token_stride = ts;
    kt.head_stride = hs;
    vt = kt;
    vt.data = dv;
    b.num_seqs = nseq;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = nt;
    tst_ok(fkv_append_strided(m->c, layer, &b, &kt, &vt));
    tst_model_add(m, layer, nseq, slots, ntok, k, v);
    free(k);
    free(v);
    tst_dev_free(dk);
    tst_dev_free(dv);
    free(pk);
    free(pv);
}

/* Prefill and decode through fkv_append_strided; _i: the layout, f32 and
 * bf16. */
START_TEST(strided_matches_reference)
{
    fkv_options o;
    tst_model m;
    int slots[2], n[2] = {300, 77}, one[2] = {1, 1}, t, l;
    fkv_dtype dt = _i >= 3 ? FKV_DTYPE_BF16 : FKV_DTYPE_F32;
    size_t pl;
    float *q, *prev;
    tst_options(&o, 2, 4, 2, 64, dt);
    tst_model_init(&m, &o, 18000 + _i);
    pl = (size_t)2 * m.QH * m.D;
    q = (float *)malloc(sizeof(float) * pl * m.L);
    prev = (float *)malloc(sizeof(float) * pl * m.L);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    for (l = 0; l < m.L; ++l)
        strided_append(&m, l, 2, slots, n, _i % 3);
    for (t = 0; t < 20; ++t) {
        for (l = 0; l < m.L; ++l) {
            strided_append(&m, l, 2, slots, one, (_i + t) % 3);
            tst_next_query(&m, l, 2, slots, t ? prev + l * pl : NULL,
                           q + l * pl);
            tst_attend_check(&m, l, 2, slots, q + l * pl, tst_tol(dt));
            tst_select(&m, l, 2, slots, q + l * pl);
            tst_recall(&m, l, 2, slots);
        }
        memcpy(prev, q, sizeof(float) * pl * m.L);
    }
    free(q);
    free(prev);
    tst_model_free(&m);
}
END_TEST

START_TEST(strided_bad_input)
{
    fkv_options o;
    tst_model m;
    tst_snapshot snap;
    int s, n = 100;
    fkv_seq_id id;
    float buf[2 * 64] = {0};
    fkv_tensor kt, vt;
    fkv_batch b = {1, 0, &id, NULL};
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    tst_model_init(&m, &o, 18100);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    id = m.seq[s].id;
    tst_snapshot_take(&m, &snap);
    memset(&kt, 0, sizeof kt);
    kt.struct_size = sizeof kt;
    kt.data = buf;
    kt.token_stride = 128;
    kt.head_stride = 64;
    vt = kt;
    tst_expect_error(m.c, fkv_append_strided(m.c, 0, &b, NULL, &vt),
                     FKV_ERR_INVALID_ARGUMENT, "k NULL");
    vt.data = NULL;
    tst_expect_error(m.c, fkv_append_strided(m.c, 0, &b, &kt, &vt),
                     FKV_ERR_INVALID_ARGUMENT, "v->data NULL");
    vt.data = buf;
    vt.head_stride = -64;
    tst_expect_error(m.c, fkv_append_strided(m.c, 0, &b, &kt, &vt),
                     FKV_ERR_INVALID_ARGUMENT, "negative stride");
    vt.head_stride = 64;
    kt.struct_size = 8;
    tst_expect_error(m.c, fkv_append_strided(m.c, 0, &b, &kt, &vt),
                     FKV_ERR_VERSION_MISMATCH, "struct_size 8");
    kt.struct_size = sizeof kt;
    tst_expect_error(m.c, fkv_append_strided(m.c, 5, &b, &kt, &vt),
                     FKV_ERR_OUT_OF_RANGE, "layer 5");
    tst_snapshot_check(&m, &snap);
    tst_snapshot_free(&snap);
    tst_model_free(&m);
}
END_TEST

Suite *suite_strided(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "strided"));
    TCase *tc = tst_tcase(s, "strided");
    tcase_add_test(tc, strided_bad_input);
    tcase_add_loop_test(tc, strided_matches_reference, 0, 6);
    return s;
}
