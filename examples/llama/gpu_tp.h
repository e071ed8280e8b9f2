/* Tensor-parallel decoding of the llama example (--tp N, gpu_tp.c): N GPUs
 * of one process, one worker thread and one CUDA backend shard per GPU.
 *
 * A shard is the CUDA backend (gpu_backend.cu) on device `rank` holding
 * 1/N of the heads and of the MLP: the q/k/v and gate/up rows of its heads
 * (column-parallel), the matching columns of o and down (row-parallel), and
 * its own libfreekv cache with num_kv_heads / N KV heads and the matching
 * query heads (opts.device = rank). Embedding, norms and lm_head are
 * replicated. After the o and down projections the shards' partial sums
 * are added by an NCCL all-reduce (f32, in place on the residual stream;
 * only rank 0 adds the residual itself), so every rank holds the same
 * hidden state and the same logits.
 *
 * CUDA builds only; without NCCL (LLAMA_WITH_NCCL unset) create fails with
 * "built without NCCL".
 *
 * SPDX-License-Identifier: MIT */
#ifndef LLAMA_GPU_TP_H
#define LLAMA_GPU_TP_H

#include "engine.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most GPUs of one --tp run. */
#define LLAMA_TP_MAX 8

/* The --tp backend; rc->tp (2..LLAMA_TP_MAX) is the number of GPUs. Its
 * stats and weight_bytes are rank 0's: one device's share. */
extern const llama_backend_ops llama_cuda_tp_backend;

/* 1 when this build has NCCL (and so --tp). */
int llama_tp_available(void);

/* One shard of the CUDA backend (gpu_backend.cu): rank of size on device
 * `rank`, comm an ncclComm_t (NULL when size is 1). Called on the thread
 * that drives that device (the current device must be `rank`). The
 * returned backend is driven with llama_cuda_backend's other calls. */
int llama_cuda_shard_create(const llama_model *m, const llama_run_config *rc,
                            int rank, int size, void *comm,
                            llama_backend **out, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* LLAMA_GPU_TP_H */
