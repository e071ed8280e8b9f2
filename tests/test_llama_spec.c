/* The llama engine's speculative decoding (examples/llama/speculate.c): on
 * a tiny random model, greedy speculative output (drafts verified with one
 * fkv_append + fkv_attend_tokens per layer, rejected tokens dropped with
 * fkv_seq_truncate) must equal plain greedy decoding, token for token,
 * under every policy whose budget holds the whole context. The reference is
 * plain decoding (fkv_attend one token at a time), which suite_llama checks
 * against a float64 forward. The model comes from llama_model_random (the
 * weights' source does not matter to this comparison; test_llama.c's
 * checkpoint writer is static to that file). CPU backend only.
 *
 * SPDX-License-Identifier: MIT */
#include "tests.h"

#include "../examples/llama/engine.h"
#include "../examples/llama/speculate.h"

#include <stdlib.h>
#include <string.h>

#define SP_PROMPT 40
#define SP_TOKENS 48
#define SP_DRAFT 6

static void sp_model(llama_model *m)
{
    llama_config c;
    char err[256];
    memset(&c, 0, sizeof c);
    c.hidden = 64;
    c.intermediate = 128;
    c.layers = 2;
    c.q_heads = 2;
    c.kv_heads = 1;
    c.head_dim = 64;
    c.vocab = 64;
    c.rope_theta = 10000;
    c.rms_norm_eps = 1e-6;
    ck_assert_msg(llama_model_random(&c, LLAMA_F32, 7, m, err, sizeof err) == 0, "%s", err);
}

static void sp_backend(const llama_model *m, fkv_policy policy, llama_backend **b)
{
    llama_run_config rc;
    fkv_options o;
    char err[256];
    memset(&rc, 0, sizeof rc);
    rc.max_batch = 2;
    rc.max_context = SP_PROMPT + SP_TOKENS + SP_DRAFT + 1;
    rc.threads = 1;
    ck_assert_msg(llama_cpu_backend.create(m, &rc, b, err, sizeof err) == 0, "%s", err);
    fkv_options_init(&o, sizeof o);
    o.dtype = FKV_DTYPE_F32;
    o.policy = policy;
    /* The budget holds the whole context: every policy attends to every
     * token, so speculative and plain decoding see the same keys. */
    o.page_tokens = 8;
    o.sink_tokens = 8;
    o.window_tokens = 32;
    o.budget_tokens = 256;
    ck_assert_msg(llama_cpu_backend.cache_open(*b, &o, err, sizeof err) == 0, "%s", err);
}

static void sp_prompt(int32_t *t)
{
    uint64_t s = 12345;
    int i;
    /* A repeating phrase gives the n-gram drafter something to copy. */
    for (i = 0; i < SP_PROMPT; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        t[i] = i < 16 ? (int32_t)(s % 64) : t[i % 16];
    }
}

/* Oracle drafter that knows the plain output and is wrong on purpose at
 * every third draft position: exercises both acceptance and truncation. */
typedef struct sp_oracle {
    const int32_t *truth;   /* prompt then plain output */
    int64_t total;
} sp_oracle;

static int32_t sp_draft_oracle(void *ctx, const int32_t *hist, int64_t len, int32_t max,
                               int32_t *draft)
{
    const sp_oracle *o = ctx;
    int32_t i;
    (void)hist;
    for (i = 0; i < max && len + i < o->total; i++)
        draft[i] = (len + i) % 3 == 0 ? (o->truth[len + i] + 1) % 64 : o->truth[len + i];
    return i;
}

static void sp_case(fkv_policy policy)
{
    llama_model m;
    llama_backend *b = NULL;
    int32_t prompt[SP_PROMPT], plain[SP_TOKENS], spec[SP_TOKENS];
    int32_t truth[SP_PROMPT + SP_TOKENS];
    llama_spec_stats st;
    sp_oracle orc;
    char err[256];
    int i;
    sp_model(&m);
    sp_prompt(prompt);
    sp_backend(&m, policy, &b);
    ck_assert_msg(llama_greedy_generate(&llama_cpu_backend, b, 1, 64, prompt, SP_PROMPT, SP_TOKENS,
                                        plain, err, sizeof err) == 0, "%s", err);

    /* The n-gram drafter. */
    ck_assert_msg(llama_spec_generate(&llama_cpu_backend, &llama_cpu_verify, b, 0, 64, prompt, SP_PROMPT, SP_TOKENS,
                                      SP_DRAFT, NULL, NULL, spec, &st, err, sizeof err) == 0,
                  "%s", err);
    for (i = 0; i < SP_TOKENS; i++)
        ck_assert_msg(spec[i] == plain[i], "policy %d n-gram: token %d: %d, plain %d", policy, i,
                      spec[i], plain[i]);
    ck_assert_int_gt(st.drafted, 0);

    /* The oracle with mistakes: some accepted, some truncated, fewer
     * verify steps than tokens. */
    memcpy(truth, prompt, sizeof prompt);
    memcpy(truth + SP_PROMPT, plain, sizeof plain);
    orc.truth = truth;
    orc.total = SP_PROMPT + SP_TOKENS;
    ck_assert_msg(llama_cpu_backend.slot_reset(b, 0, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(llama_spec_generate(&llama_cpu_backend, &llama_cpu_verify, b, 0, 64, prompt, SP_PROMPT, SP_TOKENS,
                                      SP_DRAFT, sp_draft_oracle, &orc, spec, &st, err,
                                      sizeof err) == 0, "%s", err);
    for (i = 0; i < SP_TOKENS; i++)
        ck_assert_msg(spec[i] == plain[i], "policy %d oracle: token %d: %d, plain %d", policy, i,
                      spec[i], plain[i]);
    ck_assert_int_gt(st.accepted, 0);
    ck_assert_int_lt(st.accepted, st.drafted);
    ck_assert_int_gt(st.truncated, 0);
    ck_assert_int_lt(st.steps, SP_TOKENS - 1);
    llama_cpu_backend.destroy(b);
    llama_model_free(&m);
}

START_TEST(test_spec_dense) { sp_case(FKV_POLICY_DENSE); }
END_TEST
START_TEST(test_spec_freekv) { sp_case(FKV_POLICY_FREEKV); }
END_TEST
START_TEST(test_spec_sync) { sp_case(FKV_POLICY_SYNC); }
END_TEST
START_TEST(test_spec_resident) { sp_case(FKV_POLICY_RESIDENT); }
END_TEST

/* verify rejects bad input and leaves the slot as it was. */
START_TEST(test_spec_verify_errors)
{
    llama_model m;
    llama_backend *b = NULL;
    int32_t prompt[SP_PROMPT], toks[LLAMA_MAX_VERIFY + 1] = {0};
    float *logits = malloc((size_t)(LLAMA_MAX_VERIFY + 1) * 64 * sizeof *logits);
    char err[256];
    ck_assert_ptr_nonnull(logits);
    sp_model(&m);
    sp_prompt(prompt);
    sp_backend(&m, FKV_POLICY_DENSE, &b);
    err[0] = 0;
    ck_assert_int_eq(llama_cpu_verify.verify(b, 0, toks, 1, logits, err, sizeof err), -1);
    ck_assert_ptr_nonnull(strstr(err, "prefilled"));
    ck_assert_int_eq(llama_cpu_backend.prefill(b, 0, prompt, SP_PROMPT, logits, err, sizeof err), 0);
    ck_assert_int_eq(llama_cpu_verify.verify(b, 0, toks, LLAMA_MAX_VERIFY + 1, logits, err, sizeof err), -1);
    toks[1] = 64;
    ck_assert_int_eq(llama_cpu_verify.verify(b, 0, toks, 2, logits, err, sizeof err), -1);
    ck_assert_int_eq(llama_cpu_verify.truncate(b, 0, SP_PROMPT + 1, err, sizeof err), -1);
    /* The slot still holds the prompt: 2 tokens verify, then truncate. */
    toks[1] = 3;
    ck_assert_int_eq(llama_cpu_verify.verify(b, 0, toks, 2, logits, err, sizeof err), 0);
    ck_assert_int_eq(llama_cpu_verify.truncate(b, 0, SP_PROMPT, err, sizeof err), 0);
    llama_cpu_backend.destroy(b);
    llama_model_free(&m);
    free(logits);
}
END_TEST

Suite *suite_llama_spec(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "llama_spec"));
    TCase *tc = tst_tcase(s, "speculate");
    tcase_add_test(tc, test_spec_dense);
    tcase_add_test(tc, test_spec_freekv);
    tcase_add_test(tc, test_spec_sync);
    tcase_add_test(tc, test_spec_resident);
    tcase_add_test(tc, test_spec_verify_errors);
    return s;
}
