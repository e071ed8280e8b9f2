/*
 * Runs every suite on the CPU backend (Check's fork mode), then, when a
 * CUDA cache can be created, the same suites again on the CUDA backend in
 * CK_NOFORK mode (CUDA is undefined after fork) with suite names prefixed
 * "gpu:", plus the GPU-only suites (suite_cuda; suite_multidevice where two
 * devices exist). Exits non-zero on any
 * failure or error.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef Suite *(*suite_fn)(const char *prefix);

static const suite_fn k_suites[] = {
    suite_reference, suite_api,      suite_dense,     suite_selection,
    suite_freekv,    suite_policies, suite_dtypes,    suite_sequences,
    suite_always,    suite_badinput, suite_stats,     suite_accuracy,
    suite_faults,    suite_defects,   suite_truncate,  suite_multitoken,
    suite_fork,      suite_external,  suite_critical,  suite_strided,
    suite_llama,     suite_llama_spec,
    suite_correction, suite_dense_layers,
};

static SRunner *make_runner(const char *prefix)
{
    SRunner *sr = NULL;
    size_t i;
    for (i = 0; i < sizeof k_suites / sizeof k_suites[0]; ++i) {
        Suite *s = k_suites[i](prefix);
        if (!sr)
            sr = srunner_create(s);
        else
            srunner_add_suite(sr, s);
    }
    return sr;
}

/* 1 when a CUDA cache can be created; otherwise 0 and why in buf. */
static int probe_cuda(char *buf, size_t len)
{
    fkv_options o;
    fkv_cache *c = NULL;
    fkv_status st;
    char msg[512];
    if (fkv_options_init(&o, sizeof o) != FKV_OK) {
        snprintf(buf, len, "fkv_options_init failed");
        return 0;
    }
    o.backend = FKV_BACKEND_CUDA;
    o.num_layers = 1;
    o.num_q_heads = 2;
    o.num_kv_heads = 1;
    o.head_dim = 64;
    o.dtype = FKV_DTYPE_F32;
    o.page_tokens = 16;
    o.sink_tokens = 16;
    o.window_tokens = 16;
    o.budget_tokens = 64;
    o.max_sequences = 1;
    o.max_tokens_per_sequence = 256;
    st = fkv_create(&o, &c);
    if (st == FKV_OK) {
        fkv_destroy(c);
        return 1;
    }
    msg[0] = '\0';
    fkv_last_error(NULL, msg, sizeof msg);
    snprintf(buf, len, "%s%s%s", fkv_status_string(st), msg[0] ? ": " : "",
             msg);
    return 0;
}

int main(void)
{
    SRunner *sr;
    int failed = 0;
    char why[768];
    int ndev = 0;

    /* FKV_TEST_GPU_ONLY=1 skips the CPU run (for compute-sanitizer). */
    if (!getenv("FKV_TEST_GPU_ONLY")) {
        g_test_backend = FKV_BACKEND_CPU;
        sr = make_runner("");
        srunner_run_all(sr, CK_NORMAL);
        failed += srunner_ntests_failed(sr);
        srunner_free(sr);
    }

    if (probe_cuda(why, sizeof why)) {
        char dev_why[256];
        if (!tst_dev_init(dev_why, sizeof dev_why)) {
            printf("GPU suite: FAILED (a CUDA cache can be created but the "
                   "tests cannot reach device memory: %s)\n",
                   dev_why);
            failed += 1;
        } else {
            g_test_backend = FKV_BACKEND_CUDA;
            sr = make_runner("gpu:");
            /* The GPU-only cases, in this run alone. */
            srunner_add_suite(sr, suite_cuda("gpu:"));
            ndev = tst_cuda_device_count();
            if (ndev >= 2)
                srunner_add_suite(sr, suite_multidevice("gpu:"));
            srunner_set_fork_status(sr, CK_NOFORK);
            srunner_run_all(sr, CK_NORMAL);
            failed += srunner_ntests_failed(sr);
            srunner_free(sr);
            if (ndev < 2)
                printf("Multi-device suite: skipped (%d CUDA device%s; "
                       "it needs 2)\n", ndev, ndev == 1 ? "" : "s");
        }
    } else {
        printf("GPU suite: skipped (%s)\n", why);
    }
    fflush(stdout);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
