/*
 * Soak test: continuous batching on the CPU backend for many decode steps,
 * asserting that memory stays flat.
 *
 * Up to --max-seqs sequences are open at once. Each is opened with a random
 * prompt (prefilled in one fkv_append per layer), decodes a random number
 * of tokens (one full decode step per token for every layer: fkv_append,
 * fkv_attend, fkv_select, fkv_recall, on a batch of all open sequences) and
 * is closed when it is done; a new one takes its place. Every step's
 * outputs must be finite.
 *
 * Memory criterion: RSS (/proc/self/statm) and the cache's host_bytes are
 * sampled every --sample steps. The first --warmup steps (default: a fifth
 * of the run, at least 1000) let the pool and the allocator reach the
 * working set of the maximum sequence lengths. After that, every sample
 * must stay within the maximum seen during warm-up plus a small bound:
 * host_bytes may not grow at all (the pool holds at most max_seqs full
 * sequences, which warm-up reaches; a closed sequence's blocks are reused)
 * and RSS may grow by at most --rss-slack KiB (default 1024) for allocator
 * noise. A leak of one block per sequence, or of anything per step,
 * exceeds both within a few thousand steps.
 *
 * Prints one summary line; exits 1 on a failed call, a non-finite output or
 * growth beyond the bound, 2 on bad command-line arguments.
 *
 *   soak [--steps N] [--max-seqs N] [--max-len N] [--policy 0-3]
 *        [--warmup N] [--sample N] [--rss-slack KiB] [--seed N]
 *
 * SPDX-License-Identifier: MIT
 */
#include "freekv.h"
#include "reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_SEQS 64

static long page_kib(void)
{
    long p = sysconf(_SC_PAGESIZE);
    return (p > 0 ? p : 4096) / 1024;
}

/* Resident set in KiB, from /proc/self/statm; -1 when unavailable. */
static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f)
        return -1;
    long size = 0, resident = -1;
    if (fscanf(f, "%ld %ld", &size, &resident) != 2)
        resident = -1;
    fclose(f);
    return resident < 0 ? -1 : resident * page_kib();
}

static int parse_long(const char *s, long long lo, long long hi,
                      long long *out)
{
    char *end;
    long long v = strtoll(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi)
        return 0;
    *out = v;
    return 1;
}

static int failed(fkv_cache *c, fkv_status st, const char *what,
                  long long step)
{
    char msg[256];
    fkv_last_error(c, msg, sizeof msg);
    fprintf(stderr, "soak: FAIL at step %lld: %s: %s: %s\n", step, what,
            fkv_status_string(st), msg);
    return 1;
}

typedef struct seq {
    fkv_seq_id id;
    int64_t len, target;
    int qslot; /* row of qbase: the sequence's own query direction */
} seq;

int main(int argc, char **argv)
{
    long long steps = 20000, max_seqs = 4, max_len = 256, policy = 0,
              warmup = -1, sample = 100, rss_slack = 1024, seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        int ok = 1;
        if (!strcmp(a, "--help")) {
            printf("usage: soak [--steps N] [--max-seqs N] [--max-len N] "
                   "[--policy 0-3] [--warmup N] [--sample N] "
                   "[--rss-slack KiB] [--seed N]\n");
            return 0;
        }
        static const struct { const char *name; long long lo, hi; } opt[] = {
            { "--steps", 1, 1LL << 40 },    { "--max-seqs", 1, MAX_SEQS },
            { "--max-len", 16, 1 << 20 },   { "--policy", 0, 3 },
            { "--warmup", 0, 1LL << 40 },   { "--sample", 1, 1LL << 30 },
            { "--rss-slack", 0, 1LL << 30 }, { "--seed", 0, 1LL << 62 },
        };
        long long *dst[] = { &steps, &max_seqs, &max_len, &policy, &warmup,
                             &sample, &rss_slack, &seed };
        int k = 0;
        while (k < 8 && strcmp(a, opt[k].name))
            k++;
        if (k < 8)
            ok = parse_long(v, opt[k].lo, opt[k].hi, dst[k]);
        else {
            fprintf(stderr, "usage: soak [--steps N] [--max-seqs N] "
                    "[--max-len N] [--policy 0-3] [--warmup N] [--sample N] "
                    "[--rss-slack KiB] [--seed N]\n");
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "soak: bad value '%s' for %s\n", v, a);
            return 2;
        }
        i++;
    }
    if (max_len <= 2 * max_seqs) {
        fprintf(stderr, "soak: --max-len must exceed twice --max-seqs\n");
        return 2;
    }
    if (warmup < 0)
        warmup = steps / 5 > 1000 ? steps / 5 : 1000;
    if (warmup >= steps)
        warmup = steps / 2;

    /* A small model shape so that a million steps take minutes. */
    const int L = 2, Hkv = 2, G = 2, Hq = Hkv * G, D = 64;
    fkv_options o;
    if (fkv_options_init(&o, sizeof o) != FKV_OK)
        return failed(NULL, FKV_ERR_INTERNAL, "fkv_options_init", 0);
    o.backend = FKV_BACKEND_CPU;
    o.num_layers = L;
    o.num_q_heads = Hq;
    o.num_kv_heads = Hkv;
    o.head_dim = D;
    o.dtype = FKV_DTYPE_BF16;
    o.softmax_scale = 0.0f;
    o.page_tokens = 8;
    o.sink_tokens = 8;
    o.window_tokens = 16;
    o.budget_tokens = 48; /* K = 3 selected pages */
    o.correction_threshold = 0.9f;
    o.policy = (fkv_policy)policy;
    o.group_score = FKV_GROUP_MEAN_SOFTMAX;
    o.max_sequences = (int32_t)max_seqs;
    o.max_tokens_per_sequence = max_len;
    /* A limit of twice the working set (every sequence at full length):
     * the pool then grows in chunks of a quarter of it, so host_bytes shows
     * growth early, and a leak of pool blocks ends in FKV_ERR_CAPACITY. */
    uint64_t block = 2ull * (uint64_t)o.page_tokens * (uint64_t)D *
                     (uint64_t)Hkv * ref_dtype_bytes(o.dtype);
    o.host_pool_bytes = 2ull * (uint64_t)max_seqs * (uint64_t)L *
                        (uint64_t)((max_len + o.page_tokens - 1) /
                                   o.page_tokens) * block;

    fkv_cache *c = NULL;
    fkv_status st = fkv_create(&o, &c);
    if (st != FKV_OK)
        return failed(NULL, st, "fkv_create", 0);

    ref_rng rng;
    ref_rng_seed(&rng, (uint64_t)seed);
    size_t kv_row = (size_t)Hkv * (size_t)D, q_row = (size_t)Hq * (size_t)D;
    size_t esz = ref_dtype_bytes(o.dtype);
    /* All buffers up front: the loop allocates nothing itself, so RSS
     * growth is the library's. */
    float *kf = malloc((size_t)max_len * kv_row * sizeof(float));
    float *qf = malloc((size_t)max_seqs * q_row * sizeof(float));
    float *qbase = malloc((size_t)max_seqs * q_row * sizeof(float));
    int free_q[MAX_SEQS], nfree_q = 0;
    for (int i = (int)max_seqs - 1; i >= 0; i--)
        free_q[nfree_q++] = i;
    float *of = malloc((size_t)max_seqs * q_row * sizeof(float));
    void *kb = malloc((size_t)max_len * kv_row * esz);
    void *vb = malloc((size_t)max_len * kv_row * esz);
    void *qb = malloc((size_t)max_seqs * q_row * esz);
    void *ob = malloc((size_t)max_seqs * q_row * esz);
    if (!kf || !qf || !qbase || !of || !kb || !vb || !qb || !ob) {
        fprintf(stderr, "soak: out of memory\n");
        return 1;
    }
    /* Keys and values: a fixed random block, reused (only the cache's
     * memory matters here, not the values' variety); queries are fresh. */
    ref_random_tensor(&rng, o.dtype, kf, (size_t)max_len * kv_row, 1.0);
    ref_encode(o.dtype, kf, kb, (size_t)max_len * kv_row);
    ref_random_tensor(&rng, o.dtype, kf, (size_t)max_len * kv_row, 1.0);
    ref_encode(o.dtype, kf, vb, (size_t)max_len * kv_row);

    seq seqs[MAX_SEQS];
    int nseq = 0;
    fkv_seq_id ids[MAX_SEQS];
    long long opened = 0, closed = 0, tokens = 0, done = 0;
    long rss_warm_max = 0, rss_after_max = 0, rss_first = -1, rss_last = 0;
    uint64_t host_warm_max = 0, host_after_max = 0, host_last = 0;
    int rc = 0;
    fkv_stats s;

    for (long long step = 0; step < steps && rc == 0; step++) {
        /* Refill: every free slot gets a new sequence with a prompt. */
        while (nseq < max_seqs) {
            seq *q = &seqs[nseq];
            st = fkv_seq_open(c, &q->id);
            if (st != FKV_OK) {
                rc = failed(c, st, "fkv_seq_open", step);
                break;
            }
            int64_t prompt = 1 + ref_rng_below(&rng, (int)(max_len / 2));
            q->target = prompt + 1 +
                        ref_rng_below(&rng, (int)(max_len - prompt));
            q->len = prompt;
            q->qslot = free_q[--nfree_q];
            ref_random_tensor(&rng, FKV_DTYPE_F32,
                              qbase + (size_t)q->qslot * q_row, q_row, 1.0);
            fkv_batch b = { 1, 0, &q->id, NULL };
            int32_t nt = (int32_t)prompt;
            b.num_tokens = &nt;
            for (int l = 0; l < L && rc == 0; l++) {
                st = fkv_append(c, l, &b, kb, vb);
                if (st != FKV_OK)
                    rc = failed(c, st, "prefill fkv_append", step);
            }
            nseq++;
            opened++;
        }
        if (rc)
            break;
        /* Queries: the sequence's direction plus noise, so that most
         * steps keep the speculative selection (cosine about 0.97) and
         * some heads are corrected. */
        for (int i = 0; i < nseq; i++) {
            ids[i] = seqs[i].id;
            const float *base = qbase + (size_t)seqs[i].qslot * q_row;
            for (size_t j = 0; j < q_row; j++)
                qf[(size_t)i * q_row + j] =
                    base[j] + 0.25f * (float)ref_rng_normal(&rng);
        }
        fkv_batch b = { (int32_t)nseq, 0, ids, NULL };
        ref_encode(o.dtype, qf, qb, (size_t)nseq * q_row);
        /* One decode step: the token's keys and values are a row of the
         * fixed block chosen by the step. */
        size_t row = (size_t)(step % (max_len - max_seqs)) * kv_row * esz;
        for (int l = 0; l < L && rc == 0; l++) {
            if ((st = fkv_append(c, l, &b, (char *)kb + row,
                                 (char *)vb + row)) != FKV_OK)
                rc = failed(c, st, "fkv_append", step);
            else if ((st = fkv_attend(c, l, &b, qb, ob)) != FKV_OK)
                rc = failed(c, st, "fkv_attend", step);
            else if ((st = fkv_select(c, l, &b, qb)) != FKV_OK)
                rc = failed(c, st, "fkv_select", step);
            else if ((st = fkv_recall(c, l, &b)) != FKV_OK)
                rc = failed(c, st, "fkv_recall", step);
            if (rc == 0) {
                ref_decode(o.dtype, ob, of, (size_t)nseq * q_row);
                for (size_t j = 0; j < (size_t)nseq * q_row; j++)
                    if (!isfinite(of[j])) {
                        fprintf(stderr, "soak: FAIL at step %lld: a "
                                "non-finite output\n", step);
                        rc = 1;
                        break;
                    }
            }
        }
        if (rc)
            break;
        tokens += nseq;
        done++;
        /* Close the sequences that reached their length. */
        for (int i = 0; i < nseq;) {
            if (++seqs[i].len >= seqs[i].target) {
                if ((st = fkv_seq_close(c, seqs[i].id)) != FKV_OK) {
                    rc = failed(c, st, "fkv_seq_close", step);
                    break;
                }
                free_q[nfree_q++] = seqs[i].qslot;
                seqs[i] = seqs[--nseq];
                closed++;
            } else {
                i++;
            }
        }

        if ((step + 1) % sample == 0 || step + 1 == steps) {
            memset(&s, 0, sizeof s);
            s.struct_size = sizeof s;
            if ((st = fkv_get_stats(c, &s)) != FKV_OK) {
                rc = failed(c, st, "fkv_get_stats", step);
                break;
            }
            long r = rss_kib();
            if (rss_first < 0)
                rss_first = r;
            rss_last = r;
            host_last = s.host_bytes;
            if (step < warmup) {
                if (r > rss_warm_max) rss_warm_max = r;
                if (s.host_bytes > host_warm_max) host_warm_max = s.host_bytes;
            } else {
                if (r > rss_after_max) rss_after_max = r;
                if (s.host_bytes > host_after_max)
                    host_after_max = s.host_bytes;
                if (s.host_bytes > host_warm_max) {
                    fprintf(stderr, "soak: FAIL at step %lld: host_bytes "
                            "%llu grew beyond the warm-up maximum %llu\n",
                            step, (unsigned long long)s.host_bytes,
                            (unsigned long long)host_warm_max);
                    rc = 1;
                } else if (r >= 0 && r > rss_warm_max + rss_slack) {
                    fprintf(stderr, "soak: FAIL at step %lld: RSS %ld KiB "
                            "grew beyond the warm-up maximum %ld KiB + %lld "
                            "KiB\n", step, r, rss_warm_max, rss_slack);
                    rc = 1;
                }
            }
        }
    }

    for (int i = 0; i < nseq; i++)
        fkv_seq_close(c, seqs[i].id);
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    fkv_get_stats(c, &s);
    printf("soak: %s: %lld of %lld steps (policy %lld, %lld seqs max, max len %lld): "
           "%lld tokens, %lld opened, %lld closed, %llu corrections; RSS KiB "
           "first %ld, warm-up max %ld, after max %ld, last %ld; host_bytes "
           "warm-up max %llu, after max %llu, last %llu (warm-up %lld "
           "steps, RSS slack %lld KiB)\n",
           rc ? "FAIL" : "ok", done, steps, policy, max_seqs, max_len, tokens,
           opened, closed, (unsigned long long)s.corrections, rss_first,
           rss_warm_max, rss_after_max, rss_last,
           (unsigned long long)host_warm_max,
           (unsigned long long)host_after_max,
           (unsigned long long)host_last, warmup, rss_slack);
    fkv_destroy(c);
    free(kf); free(qf); free(qbase); free(of);
    free(kb); free(vb); free(qb); free(ob);
    return rc;
}
