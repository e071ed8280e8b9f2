/* The launch cache (on since 0.5.0; docs/design.md section 11): an
 * eager fkv_attend or fkv_recall records its kernels (kernels.h, "recorded
 * launches"); when a call's record is the same, byte for byte, as the last
 * one of its slot (a layer's attend or recall), its kernels are enqueued as
 * one CUDA graph built from that record, so that they cost about one launch
 * of host time instead of one each. Every other call enqueues its record as
 * it is, kernel by kernel, as without the cache. A slot's graph is
 * instantiated at its call's first repeat (the only allocation, inside
 * CUDA, in an engine's first steps) and updated in place after. */
#ifndef FKV_CUDA_LAUNCH_CACHE_H
#define FKV_CUDA_LAUNCH_CACHE_H

#include <stdbool.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "internal.h"
#include "kernels.h"

typedef struct fkv_launch_slot {
    /* the slot's last record enqueued; none: no ops (a call with fewer
     * than two kernels is never kept, so it matches no call) */
    fkv_launch_record *seen;
    /* A chain of n_nodes kernel nodes (graph, node: its template, kept to
     * update exec's nodes in place) and its executable graph; NULL: not
     * built, or building it failed (`broken`: the slot enqueues directly
     * until its record changes). `fresh`: exec holds seen's launches; else
     * those of an earlier record, which an update of each node's
     * parameters turns into seen's where the kernel counts agree. */
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cudaGraphNode_t node[FKV_RECORD_OPS];
    int32_t n_nodes;
    bool fresh, broken;
} fkv_launch_slot;

typedef struct fkv_launch_cache {
    int32_t n_slots;          /* 0: off */
    fkv_launch_slot *slot;
    fkv_launch_record *scratch; /* the call being recorded */
    fkvi_launch_cache_counts counts;
} fkv_launch_cache;

/* Slot of layer l's fkv_attend and fkv_recall. */
#define FKV_LAUNCH_SLOT_ATTEND(l) (2 * (l))
#define FKV_LAUNCH_SLOT_RECALL(l) (2 * (l) + 1)

/* n_slots records (and the scratch) from m; false when out of memory. */
bool fkvi_launch_cache_init(fkv_launch_cache *lc, const fkvi_mem *m,
                            int32_t n_slots);
/* Frees the graphs and records (the device may still run a graph: CUDA
 * frees an executable graph in flight when it completes). */
void fkvi_launch_cache_free(fkv_launch_cache *lc, const fkvi_mem *m);
/* Host memory the cache holds (its records), for fkv_stats.host_bytes. */
size_t fkvi_launch_cache_bytes(const fkv_launch_cache *lc);
/* Starts recording this thread's launches on `stream` into the scratch. */
void fkvi_launch_cache_begin(fkv_launch_cache *lc, cudaStream_t stream);
/* Stops recording and enqueues what was recorded on the stream: one graph
 * launch where slot's last record was the same and its graph exists or can
 * be built now, else the recorded launches one by one. `e`: the call's
 * status so far (an error: the recorded launches are enqueued, as they
 * would have been without the cache, and e is returned). */
cudaError_t fkvi_launch_cache_end(fkv_launch_cache *lc, int32_t slot,
                                  cudaError_t e);

#endif /* FKV_CUDA_LAUNCH_CACHE_H */
