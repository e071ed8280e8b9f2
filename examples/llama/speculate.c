/* Greedy speculative decoding (speculate.h): an n-gram copy drafter, plain
 * greedy decoding for comparison, and the draft / verify / truncate loop.
 *
 * SPDX-License-Identifier: MIT */
#include "speculate.h"

#include <stdlib.h>
#include <string.h>

int32_t llama_argmax(const float *logits, int32_t vocab)
{
    int32_t i, best = 0;
    for (i = 1; i < vocab; i++)
        if (logits[i] > logits[best])
            best = i;
    return best;
}

int32_t llama_draft_ngram(void *ctx, const int32_t *hist, int64_t len, int32_t max,
                          int32_t *draft)
{
    int64_t g, i, j;
    (void)ctx;
    /* Longer matching suffixes predict better; fall back to shorter ones. */
    for (g = len - 1 < 3 ? len - 1 : 3; g >= 1; g--)
        for (i = len - 1 - g; i >= 0; i--) {
            int32_t m = 0;
            for (j = 0; j < g && hist[i + j] == hist[len - g + j]; j++)
                ;
            if (j < g)
                continue;
            /* Past the history's end the copy continues into its own draft
             * (a repeating phrase drafts its whole period and beyond). */
            for (; m < max; m++)
                draft[m] = i + g + m < len ? hist[i + g + m] : draft[i + g + m - len];
            return m;
        }
    return 0;
}

int llama_greedy_generate(const llama_backend_ops *ops, llama_backend *b, int32_t slot,
                          int32_t vocab, const int32_t *prompt, int64_t n, int64_t tokens,
                          int32_t *out, char *err, size_t errlen)
{
    float *logits = malloc((size_t)vocab * sizeof *logits);
    int64_t i;
    int rc = -1;
    if (!logits) {
        llama_errf(err, errlen, "greedy: out of memory");
        return -1;
    }
    if (ops->prefill(b, slot, prompt, n, logits, err, errlen))
        goto out;
    for (i = 0; i < tokens; i++) {
        out[i] = llama_argmax(logits, vocab);
        if (i + 1 < tokens && ops->decode(b, 1, &slot, &out[i], logits, err, errlen))
            goto out;
    }
    rc = 0;
out:
    free(logits);
    return rc;
}

int llama_spec_generate(const llama_backend_ops *ops, const llama_verify_ops *vops,
                        llama_backend *b, int32_t slot,
                        int32_t vocab, const int32_t *prompt, int64_t n, int64_t tokens,
                        int32_t draft, llama_drafter drafter, void *drafter_ctx,
                        int32_t *out, llama_spec_stats *st, char *err, size_t errlen)
{
    llama_spec_stats s;
    float *logits = NULL;
    int32_t *hist = NULL, in[LLAMA_MAX_VERIFY];
    int64_t count = 0, len;
    int rc = -1;
    memset(&s, 0, sizeof s);
    if (!vops || !vops->verify || !vops->truncate) {
        llama_errf(err, errlen, "speculate: the %s backend has no multi-token verify step", ops->name);
        return -1;
    }
    if (draft < 1 || draft >= LLAMA_MAX_VERIFY || n < 1 || tokens < 1) {
        llama_errf(err, errlen, "speculate: draft %d (must be in [1, %d]), prompt %lld, tokens %lld",
                   draft, LLAMA_MAX_VERIFY - 1, (long long)n, (long long)tokens);
        return -1;
    }
    if (!drafter)
        drafter = llama_draft_ngram;
    /* Scratch for the whole run, before the loop: no allocation per step. */
    logits = malloc((size_t)LLAMA_MAX_VERIFY * vocab * sizeof *logits);
    hist = malloc((size_t)(n + tokens) * sizeof *hist);
    if (!logits || !hist) {
        llama_errf(err, errlen, "speculate: out of memory");
        goto out;
    }
    memcpy(hist, prompt, (size_t)n * sizeof *hist);
    if (ops->prefill(b, slot, prompt, n, logits, err, errlen))
        goto out;
    out[count++] = hist[n] = llama_argmax(logits, vocab);
    len = n + 1; /* hist[len - 1] is the pending token, not yet in the cache */
    while (count < tokens) {
        int64_t room = tokens - count - 1; /* drafts beyond it are wasted */
        int32_t k = drafter(drafter_ctx, hist, len, (int32_t)(room < draft ? room : draft), in + 1);
        int32_t a = 0, i;
        if (k < 0 || k > draft || k > room)
            k = 0;
        in[0] = hist[len - 1];
        if (vops->verify(b, slot, in, k + 1, logits, err, errlen))
            goto out;
        /* logits row i is the target's prediction after in[i]. */
        while (a < k && in[a + 1] == llama_argmax(logits + (size_t)a * vocab, vocab))
            a++;
        s.steps++;
        s.drafted += k;
        s.accepted += a;
        if (a < k) {
            /* The cache holds the pending token and k draft tokens; keep
             * the pending one and the a accepted. */
            if (vops->truncate(b, slot, len + a, err, errlen))
                goto out;
            s.truncated++;
        }
        for (i = 1; i <= a; i++)
            out[count++] = hist[len++] = in[i];
        out[count++] = hist[len++] = llama_argmax(logits + (size_t)a * vocab, vocab);
    }
    rc = 0;
out:
    if (st)
        *st = s;
    free(logits);
    free(hist);
    return rc;
}
