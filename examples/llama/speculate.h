/* Greedy speculative decoding over a llama backend (speculate.c).
 *
 * Each step drafts up to `draft` tokens after the pending token, verifies
 * the pending token and the draft in ONE multi-token forward
 * (vops->verify: fkv_append of them all + fkv_attend_tokens per layer),
 * accepts the longest draft prefix equal to the target's argmax, truncates
 * the rejected tokens (vops->truncate: one fkv_seq_truncate for every layer)
 * and takes the target's argmax after the accepted prefix as the next
 * pending token. The output is that of plain greedy decoding.
 *
 * SPDX-License-Identifier: MIT */
#ifndef LLAMA_SPECULATE_H
#define LLAMA_SPECULATE_H

#include "engine.h"

/* Proposes up to max tokens to follow hist[len] into draft; returns how
 * many (0..max). */
typedef int32_t (*llama_drafter)(void *ctx, const int32_t *hist, int64_t len,
                                 int32_t max, int32_t *draft);

/* The default drafter (ctx unused): n-gram copy over the history (prompt
 * and output so far). Finds the latest earlier occurrence of the longest
 * suffix (up to 3 tokens) of hist and proposes the tokens that followed it
 * (continuing periodically past the end of hist); no second model. */
int32_t llama_draft_ngram(void *ctx, const int32_t *hist, int64_t len,
                          int32_t max, int32_t *draft);

typedef struct llama_spec_stats {
    int64_t steps;      /* verify calls */
    int64_t drafted;    /* draft tokens verified */
    int64_t accepted;   /* of them, accepted */
    int64_t truncated;  /* verify steps that dropped rejected tokens */
} llama_spec_stats;

/* Argmax of logits[vocab] (the lowest index among equal maxima). */
int32_t llama_argmax(const float *logits, int32_t vocab);

/* Plain greedy decoding of `tokens` tokens into out after the prompt on an
 * empty slot: prefill, then decode one token per step. */
int llama_greedy_generate(const llama_backend_ops *ops, llama_backend *b, int32_t slot,
                          int32_t vocab, const int32_t *prompt, int64_t n,
                          int64_t tokens, int32_t *out, char *err, size_t errlen);

/* Speculative greedy decoding of `tokens` tokens into out on an empty slot
 * with drafts of up to `draft` tokens (1..LLAMA_MAX_VERIFY - 1) from
 * drafter (NULL: llama_draft_ngram); vops: the backend's verify steps
 * (NULL: an error). The slot's max_context must hold
 * n + tokens + draft tokens. st may be NULL. */
int llama_spec_generate(const llama_backend_ops *ops, const llama_verify_ops *vops,
                        llama_backend *b, int32_t slot,
                        int32_t vocab, const int32_t *prompt, int64_t n, int64_t tokens,
                        int32_t draft, llama_drafter drafter, void *drafter_ctx,
                        int32_t *out, llama_spec_stats *st, char *err, size_t errlen);

#endif /* LLAMA_SPECULATE_H */
