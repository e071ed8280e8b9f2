/*
 * attend_grid (CPU run of a CUDA build; no device needed): the CUDA decode
 * attention's split grid (kernels/attend.cu, fkv_attend_grid) is host
 * arithmetic on the geometry and the device's limits, so its contract is
 * checked here for made-up devices (1 to 132 SMs, two shared-memory sizes),
 * every batch size, bounds of 1 to 300 pages and several caps:
 *  - the split count is at least 1 and at most the cap;
 *  - the splits cover the bound and none is empty at it:
 *    (splits - 1) * pps < bound <= splits * pps;
 *  - at least 4 pages per split wherever the bound has 4 (docs/design.md
 *    s.6, "Split count");
 *  - at most 2 blocks per SM unless one split of the batch is more;
 *  - fkv_attend_splits at one sequence and the largest bound (what
 *    lib/cuda_create.c sizes the partials with) is at least every grid a
 *    smaller batch or bound launches, and it never grows with the batch.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#ifdef FKV_WITH_CUDA

#include <string.h>

#include "kernels.h"

#define AG_MAX_BOUND 300

/* ck_assert_msg marks a point (a message to the runner) on every pass;
 * millions of grid checks made that most of CI's time, so the checks
 * here reach Check only when they fail. */
#define AG_CHECK(cond, ...)                                                  \
    do {                                                                     \
        if (!(cond))                                                         \
            ck_abort_msg(__VA_ARGS__);                                       \
    } while (0)

static void ag_geometry(fkv_dev_geometry *g, int kv_heads, int group,
                        int head_dim, fkv_dtype dtype)
{
    memset(g, 0, sizeof *g);
    g->kv_heads = kv_heads;
    g->group = group;
    g->q_heads = kv_heads * group;
    g->head_dim = head_dim;
    g->dtype = dtype;
    g->page = 32;
}

START_TEST(attend_grid_contract)
{
    static const struct {
        int kv_heads, group, head_dim;
        fkv_dtype dtype;
    } geos[] = {
        {8, 4, 128, FKV_DTYPE_BF16}, {8, 4, 128, FKV_DTYPE_F32},
        {1, 1, 64, FKV_DTYPE_F16},   {32, 1, 128, FKV_DTYPE_BF16},
        {4, 8, 64, FKV_DTYPE_F32},   {2, 16, 256, FKV_DTYPE_BF16},
    };
    static const int sms[] = {1, 16, 108, 132};
    /* H100/H200-like and A100-like shared memory per SM. */
    static const int smem[][2] = {{233472, 1024}, {167936, 1024}};
    const size_t ngeo = sizeof geos / sizeof geos[0];
    const int gi = _i; /* loop test: one geometry per iteration */
    ck_assert_int_lt(gi, (int)ngeo);
    fkv_dev_geometry g;
    ag_geometry(&g, geos[gi].kv_heads, geos[gi].group, geos[gi].head_dim,
                geos[gi].dtype);
    for (size_t si = 0; si < sizeof sms / sizeof sms[0]; si++) {
        for (size_t mi = 0; mi < 2; mi++) {
            fkv_dev_limits lim;
            memset(&lim, 0, sizeof lim);
            lim.sm_count = sms[si];
            lim.smem_per_sm = smem[mi][0];
            lim.smem_reserved_per_block = smem[mi][1];
            lim.smem_per_block_optin = smem[mi][0] - smem[mi][1];
            lim.cc_major = 9;
            const int32_t most = fkv_attend_splits(&g, &lim, 1, AG_MAX_BOUND);
            ck_assert_int_ge(most, 1);
            int32_t prev_sizing = most;
            for (int n = 1; n <= FKV_DEV_MAX_BATCH; n++) {
                const int32_t sizing =
                    fkv_attend_splits(&g, &lim, n, AG_MAX_BOUND);
                AG_CHECK(sizing <= prev_sizing,
                              "geo %d sms %d: splits grow with the batch "
                              "(%d at %d, %d before)",
                              gi, sms[si], sizing, n, prev_sizing);
                prev_sizing = sizing;
                const int32_t caps[] = {0, most, 3, 1};
                for (int bound = 1; bound <= AG_MAX_BOUND; bound++) {
                    for (size_t ci = 0; ci < sizeof caps / sizeof caps[0];
                         ci++) {
                        const int32_t cap = caps[ci];
                        int32_t pps = -1;
                        const int32_t splits =
                            fkv_attend_grid(&g, &lim, n, bound, cap, &pps);
                        AG_CHECK(
                            splits >= 1 && (cap < 1 || splits <= cap),
                            "geo %d sms %d n %d bound %d cap %d: %d splits",
                            gi, sms[si], n, bound, cap, splits);
                        AG_CHECK(
                            splits <= most,
                            "geo %d sms %d n %d bound %d: %d splits, sized "
                            "for %d",
                            gi, sms[si], n, bound, splits, most);
                        AG_CHECK(
                            pps >= 1 && (int64_t)(splits - 1) * pps < bound &&
                                (int64_t)splits * pps >= bound,
                            "geo %d sms %d n %d bound %d cap %d: %d splits "
                            "of %d pages",
                            gi, sms[si], n, bound, cap, splits, pps);
                        if (bound >= 4)
                            AG_CHECK(pps >= 4,
                                          "geo %d n %d bound %d: %d pages "
                                          "per split",
                                          gi, n, bound, pps);
                        /* A split is n x kv_heads blocks or more (GQA
                         * chunks multiply it). */
                        const int64_t per_split = (int64_t)n * g.kv_heads;
                        if (splits > 1)
                            AG_CHECK(
                                (int64_t)splits * per_split <=
                                    2 * (int64_t)sms[si],
                                "geo %d sms %d n %d bound %d: %d splits of "
                                "%lld blocks",
                                gi, sms[si], n, bound, splits,
                                (long long)per_split);
                        AG_CHECK(
                            fkv_attend_grid(&g, &lim, n, bound, cap, NULL) ==
                                splits,
                            "geo %d n %d bound %d: another count without "
                            "pages_per_split",
                            gi, n, bound);
                    }
                }
            }
        }
    }
}
END_TEST

void tst_add_attend_grid(Suite *s)
{
    tcase_add_loop_test(tst_tcase(s, "attend_grid"), attend_grid_contract, 0,
                        6);
}

#endif /* FKV_WITH_CUDA */
