/*
 * dense_layers: fkv_options.dense_layers makes chosen layers attend every
 * token, whatever the policy. A dense layer's output equals the float64
 * full-attention reference; the other layers give what a cache without the
 * option gives (a twin cache fed the same tensors) and what the reference
 * simulation of the policy says; a dense layer recalls and corrects
 * nothing; select/recall/set_pages on it are no-ops; a failed call leaves
 * the cache as it was; callers built with 0.1's or 0.2's fkv_options get
 * no dense layer.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DL_LAYERS 3

static const fkv_policy k_policies[4] = {
    FKV_POLICY_FREEKV, FKV_POLICY_SYNC, FKV_POLICY_RESIDENT, FKV_POLICY_DENSE};

/* Flags with only `layer` set; static: the models keep the pointer. */
static uint8_t g_flags[DL_LAYERS];

static void dl_options(fkv_options *o, fkv_policy policy)
{
    tst_options(o, DL_LAYERS, 4, 2, 64, FKV_DTYPE_F32);
    o->policy = policy;
}

static const uint8_t *one_dense(int layer)
{
    memset(g_flags, 0, sizeof g_flags);
    g_flags[layer] = 1;
    return g_flags;
}

/* N(0,1) K and V for `tokens` tokens of one sequence. */
static void rand_kv(ref_rng *r, const tst_model *m, int tokens, float *k,
                    float *v)
{
    size_t n = (size_t)tokens * m->KVH * m->D;
    ref_random_tensor(r, (int)m->dt, k, n, 1.0);
    ref_random_tensor(r, (int)m->dt, v, n, 1.0);
}

/* _i: policy (_i / 2); layer 0 (even) or the last layer (odd) dense.
 * Prefill past the budget, then decode steps with drifting queries. */
START_TEST(dense_layer_outputs)
{
    const fkv_policy policy = k_policies[_i / 2];
    const int dense = _i % 2 ? DL_LAYERS - 1 : 0;
    fkv_options oa, ob;
    tst_model a, b;
    ref_rng r;
    int sa[2], sb[2], l, t, i;
    int ntok[2] = {700, 430};
    size_t row, qs, pl;
    float *k, *v, *q, *prev, *oa_out, *ob_out;
    double *ref;
    fkv_stats st;

    dl_options(&oa, policy);
    oa.dense_layers = one_dense(dense);
    dl_options(&ob, policy);
    tst_model_init(&a, &oa, 4000 + (uint64_t)_i);
    tst_model_init(&b, &ob, 4000 + (uint64_t)_i);
    ref_rng_seed(&r, 77 + (uint64_t)_i);
    for (i = 0; i < 2; ++i) {
        sa[i] = tst_open(&a);
        sb[i] = tst_open(&b);
    }
    row = (size_t)a.KVH * a.D;
    qs = (size_t)a.QH * a.D;
    pl = 2 * qs;
    k = (float *)calloc((size_t)(ntok[0] + ntok[1]) * row, sizeof(float));
    v = (float *)calloc((size_t)(ntok[0] + ntok[1]) * row, sizeof(float));
    q = (float *)calloc(pl * DL_LAYERS, sizeof(float));
    prev = (float *)calloc(pl * DL_LAYERS, sizeof(float));
    oa_out = (float *)calloc(pl, sizeof(float));
    ob_out = (float *)calloc(pl, sizeof(float));
    ref = (double *)calloc(pl, sizeof(double));
    for (l = 0; l < DL_LAYERS; ++l) {
        rand_kv(&r, &a, ntok[0] + ntok[1], k, v);
        tst_ok(tst_append(&a, l, 2, sa, ntok, k, v));
        tst_ok(tst_append(&b, l, 2, sb, ntok, k, v));
    }
    for (t = 0; t < 14; ++t) {
        for (l = 0; l < DL_LAYERS; ++l) {
            float *ql = q + l * pl;
            rand_kv(&r, &a, 2, k, v);
            tst_ok(tst_append(&a, l, 2, sa, NULL, k, v));
            tst_ok(tst_append(&b, l, 2, sb, NULL, k, v));
            tst_next_query(&a, l, 2, sa, t ? prev + l * pl : NULL, ql);
            /* A's output against the simulation, which attends the dense
             * layer over every token (full reference) and the others by
             * the policy. */
            tst_ok(tst_attend_raw(&a, l, 2, sa, ql, oa_out));
            tst_sim_attend(&a, l, 2, sa, ql, ref);
            for (i = 0; i < 2; ++i) {
                tst_assert_close(&a, oa_out + i * qs, ref + i * qs,
                                 tst_tol(a.dt), l == dense
                                                    ? "dense layer"
                                                    : "policy layer");
                tst_check_selected(&a, l, sa[i]);
            }
            /* The other layers: exactly what the twin gives. */
            tst_ok(tst_attend_raw(&b, l, 2, sb, ql, ob_out));
            if (l != dense) {
                if (g_test_backend == FKV_BACKEND_CPU) {
                    ck_assert_msg(memcmp(oa_out, ob_out,
                                         pl * sizeof(float)) == 0,
                                  "layer %d differs from the cache without "
                                  "dense layers (step %d)", l, t);
                } else {
                    size_t e;
                    for (e = 0; e < pl; ++e)
                        ref[e] = ob_out[e];
                    for (i = 0; i < 2; ++i)
                        tst_assert_close(&a, oa_out + i * qs, ref + i * qs,
                                         tst_tol(a.dt),
                                         "twin without dense layers");
                }
            }
            tst_select(&a, l, 2, sa, ql);
            tst_recall(&a, l, 2, sa);
            tst_select(&b, l, 2, sb, ql);
            tst_recall(&b, l, 2, sb);
        }
        memcpy(prev, q, sizeof(float) * pl * DL_LAYERS);
    }
    /* The simulation counts no recall, check or correction on the dense
     * layer. */
    tst_stats(&a, &st);
    if (policy == FKV_POLICY_FREEKV || policy == FKV_POLICY_SYNC)
        ck_assert_msg(st.pages_recalled == a.sim_recalled,
                      "pages_recalled %llu, simulation %llu",
                      (unsigned long long)st.pages_recalled,
                      (unsigned long long)a.sim_recalled);
    if (policy == FKV_POLICY_FREEKV) {
        ck_assert_uint_eq(st.corrections, a.sim_corrections);
        ck_assert_uint_eq(st.heads_checked, a.sim_checks);
        ck_assert_uint_eq(st.heads_checked,
                          (uint64_t)14 * 2 * (DL_LAYERS - 1) * a.KVH);
    }
    free(k);
    free(v);
    free(q);
    free(prev);
    free(oa_out);
    free(ob_out);
    free(ref);
    tst_model_free(&a);
    tst_model_free(&b);
}
END_TEST

/* Every layer dense under FREEKV and SYNC: attention is full, nothing is
 * ever recalled, checked or corrected. */
START_TEST(dense_layers_all)
{
    fkv_options o;
    tst_model m;
    static const uint8_t all[DL_LAYERS] = {1, 2, 255};
    int slot, t, l;
    float q[4 * 64];
    fkv_stats st;
    int ntok = 600;
    dl_options(&o, _i ? FKV_POLICY_SYNC : FKV_POLICY_FREEKV);
    o.dense_layers = all;
    tst_model_init(&m, &o, 4100 + (uint64_t)_i);
    slot = tst_open(&m);
    tst_prefill(&m, 1, &slot, &ntok);
    for (t = 0; t < 6; ++t)
        for (l = 0; l < DL_LAYERS; ++l) {
            tst_append_rand(&m, l, 1, &slot, NULL);
            tst_rand_query(&m, 1, q);
            tst_attend_check(&m, l, 1, &slot, q, tst_tol(m.dt));
            tst_select(&m, l, 1, &slot, q);
            tst_recall(&m, l, 1, &slot);
        }
    tst_stats(&m, &st);
    ck_assert_uint_eq(st.pages_recalled, 0);
    ck_assert_uint_eq(st.bytes_recalled, 0);
    ck_assert_uint_eq(st.pages_recalled_critical, 0);
    ck_assert_uint_eq(st.corrections, 0);
    ck_assert_uint_eq(st.heads_checked, 0);
    ck_assert_uint_eq(st.steps, 6);
    tst_model_free(&m);
}
END_TEST

/* The array is copied at fkv_create (the caller frees its own); flags are
 * read as 0 / non-zero; fkv_get_options returns the cache's copy. */
START_TEST(dense_layers_copied)
{
    fkv_options o, got;
    tst_model m;
    uint8_t *flags = (uint8_t *)malloc(DL_LAYERS);
    int slot, ntok = 700, g;
    float q[4 * 64];
    int pages[64];
    dl_options(&o, FKV_POLICY_RESIDENT);
    flags[0] = 0;
    flags[1] = 0;
    flags[2] = 7;
    o.dense_layers = flags;
    tst_model_init(&m, &o, 4200);
    memset(flags, 0, DL_LAYERS);
    free(flags);
    m.o.dense_layers = one_dense(2); /* the model's view of the cache */
    memset(&got, 0, sizeof got);
    got.struct_size = sizeof got;
    tst_ok(fkv_get_options(m.c, &got));
    ck_assert_ptr_nonnull(got.dense_layers);
    ck_assert_int_eq(got.dense_layers[0], 0);
    ck_assert_int_eq(got.dense_layers[1], 0);
    ck_assert_int_eq(got.dense_layers[2], 1);
    slot = tst_open(&m);
    tst_prefill(&m, 1, &slot, &ntok);
    tst_good_query(&m, 1, 1, &slot, q);
    tst_attend_check(&m, 1, 1, &slot, q, tst_tol(m.dt));
    ck_assert_int_gt(tst_selected(&m, 1, slot, 0, pages, 64), 0);
    tst_rand_query(&m, 1, q);
    tst_attend_check(&m, 2, 1, &slot, q, tst_tol(m.dt));
    for (g = 0; g < m.KVH; ++g)
        ck_assert_int_eq(tst_selected(&m, 2, slot, g, pages, 64), 0);
    tst_model_free(&m);
}
END_TEST

/* fkv_select and fkv_recall on a dense layer succeed and change nothing;
 * they still reject bad arguments. */
START_TEST(dense_layer_noop_calls)
{
    fkv_options o;
    tst_model m;
    int slot, ntok = 700;
    fkv_seq_id id;
    fkv_batch b;
    float q[4 * 64];
    void *dq;
    tst_snapshot snap;
    fkv_stats st;
    dl_options(&o, FKV_POLICY_FREEKV);
    o.dense_layers = one_dense(1);
    tst_model_init(&m, &o, 4300);
    slot = tst_open(&m);
    tst_prefill(&m, 1, &slot, &ntok);
    tst_rand_query(&m, 1, q);
    tst_attend_check(&m, 1, 1, &slot, q, tst_tol(m.dt));
    tst_snapshot_take(&m, &snap);
    tst_ok(fkv_reset_stats(m.c));
    id = m.seq[slot].id;
    b.num_seqs = 1;
    b.reserved = 0;
    b.seq_ids = &id;
    b.num_tokens = NULL;
    dq = tst_dev_from_floats(m.dt, q, (size_t)m.QH * m.D);
    tst_ok(fkv_select(m.c, 1, &b, dq));
    tst_ok(fkv_recall(m.c, 1, &b));
    /* q NULL too: a dense layer selects nothing. */
    tst_ok(fkv_select(m.c, 1, &b, NULL));
    tst_expect_error(m.c, fkv_recall(m.c, 1, NULL), FKV_ERR_INVALID_ARGUMENT,
                     "fkv_recall with batch NULL");
    tst_dev_free(dq);
    tst_stats(&m, &st);
    ck_assert_uint_eq(st.pages_recalled, 0);
    tst_snapshot_check(&m, &snap);
    tst_snapshot_free(&snap);
    tst_model_free(&m);
}
END_TEST

/* Failed calls on a cache with a dense layer leave it exactly as it was. */
START_TEST(dense_layer_bad_input)
{
    fkv_options o;
    tst_model m;
    int slot, ntok = 500, big;
    tst_snapshot snap;
    fkv_seq_id id;
    fkv_batch b;
    float *k, *v;
    size_t row;
    dl_options(&o, FKV_POLICY_FREEKV);
    o.max_tokens_per_sequence = 1024;
    o.dense_layers = one_dense(DL_LAYERS - 1);
    tst_model_init(&m, &o, 4400);
    slot = tst_open(&m);
    tst_prefill(&m, 1, &slot, &ntok);
    tst_snapshot_take(&m, &snap);
    row = (size_t)m.KVH * m.D;
    big = 600; /* 500 + 600 > max_tokens_per_sequence */
    k = (float *)calloc((size_t)big * row, sizeof(float));
    v = (float *)calloc((size_t)big * row, sizeof(float));
    tst_expect_error(m.c, tst_append(&m, DL_LAYERS - 1, 1, &slot, &big, k, v),
                     FKV_ERR_CAPACITY, "append past the capacity");
    id = m.seq[slot].id;
    b.num_seqs = 1;
    b.reserved = 0;
    b.seq_ids = &id;
    b.num_tokens = NULL;
    tst_expect_error(m.c, fkv_attend(m.c, DL_LAYERS - 1, &b, NULL, NULL),
                     FKV_ERR_INVALID_ARGUMENT, "attend with q NULL");
    tst_expect_error(m.c, fkv_attend(m.c, DL_LAYERS, &b, k, v),
                     FKV_ERR_OUT_OF_RANGE, "attend past the last layer");
    tst_snapshot_check(&m, &snap);
    tst_snapshot_free(&snap);
    free(k);
    free(v);
    tst_model_free(&m);
}
END_TEST

/* A caller built against 0.1's or 0.2's fkv_options (a smaller
 * struct_size) gets no dense layer, whatever lies past its struct. */
START_TEST(dense_layers_old_struct_size)
{
    static const size_t sizes[2] = {offsetof(fkv_options, host_alloc),
                                    offsetof(fkv_options, dense_layers)};
    fkv_options o, got;
    fkv_cache *c = NULL;
    dl_options(&o, FKV_POLICY_FREEKV);
    o.dense_layers = one_dense(0); /* beyond the old struct: not read */
    o.struct_size = sizes[_i];
    tst_ok(fkv_create(&o, &c));
    memset(&got, 0xab, sizeof got);
    got.struct_size = sizeof got;
    tst_ok(fkv_get_options(c, &got));
    ck_assert_ptr_null(got.dense_layers);
    fkv_destroy(c);
    /* fkv_options_init of the old size leaves the new field alone. */
    memset(&o, 0xcd, sizeof o);
    tst_ok(fkv_options_init(&o, sizes[_i]));
    ck_assert_uint_eq(o.struct_size, sizes[_i]);
    {
        const unsigned char *tail = (const unsigned char *)&o + sizes[_i];
        size_t j;
        for (j = 0; j < sizeof o - sizes[_i]; ++j)
            ck_assert_int_eq(tail[j], 0xcd);
    }
    tst_ok(fkv_options_init(&o, sizeof o));
    ck_assert_ptr_null(o.dense_layers);
}
END_TEST

/* FKV_POLICY_EXTERNAL: fkv_set_pages on a dense layer is accepted and
 * ignored (it attends every token); other layers attend the pages set. */
START_TEST(dense_layer_external)
{
    fkv_options o;
    tst_model m;
    int slot, ntok = 700, g;
    fkv_seq_id id;
    fkv_batch b;
    float q[4 * 64];
    double ref[4 * 64];
    float out[4 * 64];
    int32_t counts[2] = {2, 1};
    int32_t pages[2 * 10];
    int *plist[2];
    int pcount[2];
    int p0[2] = {3, 5}, p1[1] = {4};
    dl_options(&o, FKV_POLICY_EXTERNAL);
    o.dense_layers = one_dense(0);
    tst_model_init(&m, &o, 4500);
    slot = tst_open(&m);
    tst_prefill(&m, 1, &slot, &ntok);
    id = m.seq[slot].id;
    b.num_seqs = 1;
    b.reserved = 0;
    b.seq_ids = &id;
    b.num_tokens = NULL;
    memset(pages, 0, sizeof pages);
    pages[0] = 5;
    pages[1] = 3;
    pages[m.lay.K] = 4;
    for (g = 0; g < 2; ++g)
        tst_ok(fkv_set_pages(m.c, g, &b, pages, counts, 0));
    tst_rand_query(&m, 1, q);
    /* Layer 0 (dense): every token. */
    tst_ok(tst_attend_raw(&m, 0, 1, &slot, q, out));
    tst_ref_output(&m, 0, slot, q, NULL, NULL, ref);
    tst_assert_close(&m, out, ref, tst_tol(m.dt), "dense layer 0");
    for (g = 0; g < 2; ++g) {
        int sel[16];
        ck_assert_int_eq(tst_selected(&m, 0, slot, g, sel, 16), 0);
    }
    /* Layer 1: sink, window, partial page and the pages set. */
    plist[0] = p0;
    plist[1] = p1;
    pcount[0] = 2;
    pcount[1] = 1;
    tst_ok(tst_attend_raw(&m, 1, 1, &slot, q, out));
    tst_ref_output(&m, 1, slot, q, plist, pcount, ref);
    tst_assert_close(&m, out, ref, tst_tol(m.dt), "external layer 1");
    tst_model_free(&m);
}
END_TEST

/* Fork and truncate with a dense layer (its pages: on the CUDA backend it
 * has no host pool blocks): parent and child decode as the reference
 * says, then the parent drops back over a page boundary and decodes
 * again. _i: policy. */
START_TEST(dense_layer_fork_truncate)
{
    fkv_options o;
    tst_model m;
    int slots[2], ntok = 709;
    fkv_stats before, after;
    dl_options(&o, k_policies[_i]);
    o.dense_layers = one_dense(DL_LAYERS - 1);
    tst_model_init(&m, &o, 4600 + (uint64_t)_i);
    slots[0] = tst_open(&m);
    tst_prefill(&m, 1, &slots[0], &ntok);
    tst_decode_steps(&m, 1, &slots[0], 3);
    slots[1] = tst_fork(&m, slots[0]);
    tst_decode_steps(&m, 2, slots, 4);
    tst_stats(&m, &before);
    tst_ok(fkv_seq_truncate(m.c, m.seq[slots[0]].id, 690));
    tst_model_truncate(&m, slots[0], 690);
    tst_stats(&m, &after);
    ck_assert_uint_le(after.host_bytes, before.host_bytes);
    tst_decode_steps(&m, 2, slots, 4);
    tst_close(&m, slots[1]);
    tst_decode_steps(&m, 1, &slots[0], 2);
    tst_model_free(&m);
}
END_TEST

Suite *suite_dense_layers(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "dense_layers"));
    TCase *tc = tst_tcase(s, "dense_layers");
    tcase_add_loop_test(tc, dense_layer_outputs, 0, 8);
    tcase_add_loop_test(tc, dense_layers_all, 0, 2);
    tcase_add_test(tc, dense_layers_copied);
    tcase_add_test(tc, dense_layer_noop_calls);
    tcase_add_test(tc, dense_layer_bad_input);
    tcase_add_loop_test(tc, dense_layers_old_struct_size, 0, 2);
    tcase_add_test(tc, dense_layer_external);
    tcase_add_loop_test(tc, dense_layer_fork_truncate, 0, 4);
    return s;
}
