/* Internal interface of the llama example engine (examples/llama/).
 *
 * The engine is: a loader (config.json + safetensors, model.c / json.c), a
 * forward backend (CPU: cpu.c; CUDA: the *.cu / gpu_* files, built with
 * LLAMA_WITH_CUDA) and the modes (main.c: generate, eval, bench).
 *
 * Every backend keeps its KV cache in libfreekv: the backend owns the
 * fkv_cache, runs its own causal attention for the prompt, appends the
 * prompt's K (after RoPE) and V with one fkv_append per layer, and decodes
 * with fkv_append, fkv_attend, fkv_select, fkv_recall in every layer.
 *
 * Errors: every call that can fail returns 0 on success and -1 on failure
 * with a message in err[errlen] (always NUL terminated); nothing aborts. */
#ifndef LLAMA_ENGINE_H
#define LLAMA_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "freekv.h"

/* ------------------------------------------------------------------------ */
/* Model configuration (config.json)                                         */
/* ------------------------------------------------------------------------ */

typedef struct llama_rope_scaling {
    int enabled;                 /* rope_scaling.rope_type == "llama3" */
    double factor;
    double low_freq_factor;
    double high_freq_factor;
    double original_max_position_embeddings;
} llama_rope_scaling;

typedef struct llama_config {
    int32_t hidden;         /* hidden_size */
    int32_t intermediate;   /* intermediate_size */
    int32_t layers;         /* num_hidden_layers */
    int32_t q_heads;        /* num_attention_heads */
    int32_t kv_heads;       /* num_key_value_heads (default q_heads) */
    int32_t head_dim;       /* head_dim (default hidden / q_heads) */
    int32_t vocab;          /* vocab_size */
    int64_t max_position;   /* max_position_embeddings (0: unknown) */
    double rope_theta;      /* default 10000 */
    double rms_norm_eps;    /* default 1e-6 */
    int tie_embeddings;     /* tie_word_embeddings (default 0) */
    llama_rope_scaling rope_scaling;
} llama_config;

/* ------------------------------------------------------------------------ */
/* Weights (safetensors, mapped read-only)                                  */
/* ------------------------------------------------------------------------ */

typedef enum llama_dtype {
    LLAMA_F32 = 0,
    LLAMA_F16 = 1,
    LLAMA_BF16 = 2
} llama_dtype;

#define LLAMA_MAX_DIMS 4

typedef struct llama_tensor {
    char *name;                      /* owned by the model */
    llama_dtype dtype;
    int32_t ndim;
    int64_t shape[LLAMA_MAX_DIMS];   /* row-major, as in the file */
    const void *data;                /* into the mapped file */
    size_t nbytes;
} llama_tensor;

/* One decoder layer; each points into llama_model.tensors. Projections are
 * [out_features, in_features] (HF nn.Linear layout). */
typedef struct llama_layer {
    const llama_tensor *attn_norm;   /* input_layernorm [hidden] */
    const llama_tensor *wq;          /* [q_heads * head_dim, hidden] */
    const llama_tensor *wk;          /* [kv_heads * head_dim, hidden] */
    const llama_tensor *wv;          /* [kv_heads * head_dim, hidden] */
    const llama_tensor *wo;          /* [hidden, q_heads * head_dim] */
    const llama_tensor *ffn_norm;    /* post_attention_layernorm [hidden] */
    const llama_tensor *w_gate;      /* [intermediate, hidden] */
    const llama_tensor *w_up;        /* [intermediate, hidden] */
    const llama_tensor *w_down;      /* [hidden, intermediate] */
} llama_layer;

typedef struct llama_mapping {
    void *addr;
    size_t size;
} llama_mapping;

typedef struct llama_model {
    llama_config cfg;
    llama_tensor *tensors;           /* every tensor of every shard */
    int32_t n_tensors;
    llama_mapping *maps;             /* one per shard (munmap on free) */
    int32_t n_maps;
    const llama_tensor *embed;       /* model.embed_tokens.weight [vocab, hidden] */
    const llama_tensor *norm;        /* model.norm.weight [hidden] */
    const llama_tensor *lm_head;     /* lm_head.weight, or embed when tied */
    llama_layer *layer;              /* [cfg.layers] */
    /* Random-weight models (bench): tensors' data lives here, not in maps. */
    void *owned;
} llama_model;

/* Loads DIR/config.json and DIR/model.safetensors, or the shards named by
 * DIR/model.safetensors.index.json. Validates model_type ("llama"), every
 * tensor's presence, dtype and shape, and every header's offsets. */
int llama_model_load(const char *dir, llama_model *m, char *err, size_t errlen);

/* A model of the given shape with random weights of dtype (seed), for
 * bench; layer tensors' names are those of a checkpoint. */
int llama_model_random(const llama_config *cfg, llama_dtype dtype,
                       uint64_t seed, llama_model *m, char *err,
                       size_t errlen);

/* Frees what a successful load or random model holds; a zeroed model is a
 * no-op. */
void llama_model_free(llama_model *m);

/* Element i of a 1-D/flattened tensor as float (any dtype). */
float llama_tensor_get(const llama_tensor *t, size_t i);

/* Rotary inverse frequencies for head_dim/2 pairs, with llama3 scaling when
 * configured: inv_freq[head_dim / 2]. The CPU and CUDA paths share this. */
void llama_rope_inv_freq(const llama_config *cfg, double *inv_freq);

/* ------------------------------------------------------------------------ */
/* Forward backends                                                         */
/* ------------------------------------------------------------------------ */

/* How a backend is created. */
typedef struct llama_run_config {
    int32_t max_batch;      /* sequence slots 0..max_batch-1 (1..8) */
    int64_t max_context;    /* tokens per sequence (prompt + generated) */
    int keep_prefill;       /* keep each slot's prompt K/V for replay_prefill */
    int32_t threads;        /* CPU threads (0: OpenMP's default) */
    int32_t cuda_graph;     /* CUDA: replay decode steps from a captured graph (--graph); the CPU ignores it */
    int32_t tp;             /* llama_cuda_tp_backend (gpu_tp.h): GPUs (--tp); the others ignore it */
} llama_run_config;

typedef struct llama_backend llama_backend; /* a backend's private state */

/* One implementation per device. Slots are the engine's sequences; each
 * slot holds one fkv_seq_id of the current cache and its position. */
typedef struct llama_backend_ops {
    const char *name; /* "cpu", "cuda" */

    int (*create)(const llama_model *m, const llama_run_config *rc,
                  llama_backend **out, char *err, size_t errlen);
    void (*destroy)(llama_backend *b);

    /* (Re)creates the fkv_cache with opts: the backend fills in backend,
     * num_layers, num_q_heads, num_kv_heads, head_dim, max_sequences and
     * max_tokens_per_sequence; the caller sets the cache options (policy,
     * budget, page, sink, window, threshold) and opts->dtype (always). The
     * previous cache, if any, is destroyed; every slot is empty (position 0)
     * afterwards. */
    int (*cache_open)(llama_backend *b, const fkv_options *opts, char *err,
                      size_t errlen);

    /* Empties one slot (closes and reopens its sequence). */
    int (*slot_reset)(llama_backend *b, int32_t slot, char *err,
                      size_t errlen);

    /* Prompt of an empty slot: the engine's causal attention over tokens[n]
     * and one fkv_append per layer with the prompt's K/V. logits: the last
     * token's [vocab] f32 host logits, or NULL. With keep_prefill the K/V
     * are kept for replay_prefill. */
    int (*prefill)(llama_backend *b, int32_t slot, const int32_t *tokens,
                   int64_t n, float *logits, char *err, size_t errlen);

    /* Appends the K/V of the slot's last prefill (keep_prefill) into the
     * current cache of the empty slot: the same prompt under new options
     * without recomputing it. */
    int (*replay_prefill)(llama_backend *b, int32_t slot, char *err,
                          size_t errlen);

    /* Appends n tokens of random K/V (seed) to an empty slot, in place of a
     * real prefill (bench at long contexts). */
    int (*fill_random)(llama_backend *b, int32_t slot, int64_t n,
                       uint64_t seed, char *err, size_t errlen);

    /* One decode step of n distinct slots, one token each: fkv_append,
     * fkv_attend, fkv_select, fkv_recall in every layer. logits: [n, vocab]
     * f32 host memory. */
    int (*decode)(llama_backend *b, int32_t n, const int32_t *slots,
                  const int32_t *tokens, float *logits, char *err,
                  size_t errlen);

    /* The current cache's statistics (fkv_get_stats). */
    int (*stats)(llama_backend *b, fkv_stats *st, char *err, size_t errlen);

    /* Bytes of weights the backend holds (converted copies, device memory). */
    uint64_t (*weight_bytes)(llama_backend *b);
} llama_backend_ops;

extern const llama_backend_ops llama_cpu_backend;
#ifdef LLAMA_WITH_CUDA
/* CUDA path (engine-cuda): weights on the device, fkv_set_stream with the
 * backend's stream, device pointers to libfreekv. */
extern const llama_backend_ops llama_cuda_backend;
/* 1 when a CUDA device is usable (for --backend auto). */
int llama_cuda_available(void);
#endif

/* ------------------------------------------------------------------------ */
/* Helpers shared by the backends (util.c)                                  */
/* ------------------------------------------------------------------------ */

/* printf-style message into err (never overflows; err may be NULL). */
void llama_errf(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* "fkv_xxx: <status>: <fkv_last_error>" into err; returns -1 (or 0 on OK). */
int llama_fkv_check(fkv_status st, const fkv_cache *c, const char *what,
                    char *err, size_t errlen);

/* f32 <-> half conversions (round to nearest even). */
uint16_t llama_f32_to_f16(float f);
float llama_f16_to_f32(uint16_t h);
uint16_t llama_f32_to_bf16(float f);
float llama_bf16_to_f32(uint16_t h);

/* Converts n floats to dtype into dst (f32: copy). */
void llama_convert_from_f32(fkv_dtype dtype, const float *src, void *dst,
                            size_t n);
/* Converts n values of dtype to floats. */
void llama_convert_to_f32(fkv_dtype dtype, const void *src, float *dst,
                          size_t n);
/* Bytes per element of an fkv_dtype. */
size_t llama_fkv_dtype_size(fkv_dtype dtype);

#endif /* LLAMA_ENGINE_H */
