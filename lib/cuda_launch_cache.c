/* The launch cache (cuda_launch_cache.h; FKV_CUDA_EXPERIMENTAL).
 *
 * Why it is safe: a graph is only ever built from (or updated to) a record
 * that was just enqueued kernel by kernel without error, and it is
 * launched only for a call whose record is byte-identical to it: the same
 * kernels, grids, shared memory and argument bytes, in the same order,
 * which is what the direct launches would have enqueued. Everything a
 * launch reads that changes between steps is in device memory (the
 * launches take only values that a captured step may replay:
 * kernels/kernels.h), so the same record does the same work.
 *
 * Why a record becomes a graph only when it repeats: a call whose
 * arguments change every time (an engine that passes fresh q and out
 * buffers each step) then never pays for graphs it cannot reuse; it pays
 * the recording (a copy of about 1.5 KiB per kernel) and a comparison.
 * Why a slot keeps its graph when the record changes: a serving engine's
 * batch changes now and then and then holds; the graph of the old batch
 * is then updated node by node to the new one, instead of being
 * instantiated again for every layer. */
#include "cuda_launch_cache.h"

#include <string.h>

/* Op i of r as kernel node parameters; args (FKV_RECORD_ARGS entries)
 * point into r's blob, which CUDA copies when it takes the parameters. */
static void node_params(const fkv_launch_record *r, int32_t i, void **args,
                        struct cudaKernelNodeParams *p)
{
    const fkv_record_op *op = &r->op[i];
    const unsigned char *blob = (const unsigned char *)r->blob;
    for (int32_t j = 0; j < op->nargs; j++)
        args[j] = (void *)(blob + op->arg_off[j]);
    memset(p, 0, sizeof *p);
    p->func = (void *)op->func;
    p->gridDim.x = op->grid[0];
    p->gridDim.y = op->grid[1];
    p->gridDim.z = op->grid[2];
    p->blockDim.x = op->block[0];
    p->blockDim.y = op->block[1];
    p->blockDim.z = op->block[2];
    p->sharedMemBytes = op->smem;
    p->kernelParams = args;
}

/* r's launches as a chain of kernel nodes, instantiated without node
 * priorities: the graph's kernels run at the priority of the stream it is
 * launched into, as the direct launches do. */
static cudaError_t build_graph(fkv_launch_slot *s, const fkv_launch_record *r)
{
    cudaError_t e = cudaGraphCreate(&s->graph, 0);
    for (int32_t i = 0; e == cudaSuccess && i < r->n_ops; i++) {
        void *args[FKV_RECORD_ARGS];
        struct cudaKernelNodeParams p;
        node_params(r, i, args, &p);
        e = cudaGraphAddKernelNode(&s->node[i], s->graph, i ? &s->node[i - 1] : NULL,
                                   i ? 1 : 0, &p);
    }
    s->n_nodes = r->n_ops;
    if (e == cudaSuccess)
        e = cudaGraphInstantiate(&s->exec, s->graph, 0);
    return e;
}

/* An executable graph of as many kernels made r's, node by node (which
 * leaves launches already enqueued as they were). */
static cudaError_t update_graph(fkv_launch_slot *s, const fkv_launch_record *r)
{
    cudaError_t e = cudaSuccess;
    for (int32_t i = 0; e == cudaSuccess && i < r->n_ops; i++) {
        void *args[FKV_RECORD_ARGS];
        struct cudaKernelNodeParams p;
        node_params(r, i, args, &p);
        e = cudaGraphExecKernelNodeSetParams(s->exec, s->node[i], &p);
    }
    return e;
}

static void drop_graph(fkv_launch_slot *s)
{
    /* Not a synchronisation: an executable graph still in flight is freed
     * when it completes. */
    if (s->exec && cudaGraphExecDestroy(s->exec) != cudaSuccess)
        (void)cudaGetLastError();
    if (s->graph && cudaGraphDestroy(s->graph) != cudaSuccess)
        (void)cudaGetLastError();
    s->exec = NULL;
    s->graph = NULL;
    s->n_nodes = 0;
    s->fresh = false;
}

/* Makes s's executable graph hold r's launches (r is s->seen): as it is,
 * updated in place where it has r's kernel count (a batch that changed
 * and then repeats: far cheaper than a new instance), else built anew.
 * False where none can be had: the slot enqueues directly until its record
 * changes. The calls run with this thread's capture mode relaxed: if
 * another stream is being captured in global mode, a call CUDA deems
 * unsafe would end that capture (the engine's), not just fail here. */
static bool graph_for(fkv_launch_cache *lc, fkv_launch_slot *s,
                      const fkv_launch_record *r)
{
    if (s->exec && s->fresh)
        return true;
    if (s->broken)
        return false;
    enum cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    if (s->exec && s->n_nodes == r->n_ops) {
        if (update_graph(s, r) == cudaSuccess) {
            lc->counts.graphs_updated++;
            s->fresh = true;
        } else {
            (void)cudaGetLastError();
        }
    }
    if (!s->fresh) {
        drop_graph(s);
        if (build_graph(s, r) == cudaSuccess) {
            lc->counts.graphs_built++;
            s->fresh = true;
        } else {
            /* Not an error of the call: the launches go as they are. */
            (void)cudaGetLastError();
            drop_graph(s);
            s->broken = true;
        }
    }
    if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess)
        (void)cudaGetLastError();
    return s->fresh;
}

bool fkvi_launch_cache_init(fkv_launch_cache *lc, const fkvi_mem *m,
                            int32_t n_slots)
{
    memset(lc, 0, sizeof *lc);
    lc->slot = fkvi_alloc(m, (size_t)n_slots, sizeof *lc->slot);
    lc->scratch = fkvi_alloc(m, 1, sizeof *lc->scratch);
    if (!lc->slot || !lc->scratch) {
        fkvi_launch_cache_free(lc, m);
        return false;
    }
    lc->n_slots = n_slots;
    for (int32_t i = 0; i < n_slots; i++) {
        lc->slot[i].seen = fkvi_alloc(m, 1, sizeof *lc->slot[i].seen);
        if (!lc->slot[i].seen) {
            fkvi_launch_cache_free(lc, m);
            return false;
        }
    }
    return true;
}

void fkvi_launch_cache_free(fkv_launch_cache *lc, const fkvi_mem *m)
{
    for (int32_t i = 0; lc->slot && i < lc->n_slots; i++) {
        drop_graph(&lc->slot[i]);
        fkvi_free(m, lc->slot[i].seen);
    }
    fkvi_free(m, lc->slot);
    fkvi_free(m, lc->scratch);
    memset(lc, 0, sizeof *lc);
}

size_t fkvi_launch_cache_bytes(const fkv_launch_cache *lc)
{
    if (lc->n_slots == 0)
        return 0;
    return (size_t)lc->n_slots * (sizeof *lc->slot + sizeof *lc->slot[0].seen) +
           sizeof *lc->scratch;
}

void fkvi_launch_cache_begin(fkv_launch_cache *lc, cudaStream_t stream)
{
    fkv_record_begin(lc->scratch, stream);
}

cudaError_t fkvi_launch_cache_end(fkv_launch_cache *lc, int32_t slot,
                                  cudaError_t e)
{
    fkv_record_end();
    const fkv_launch_record *r = lc->scratch;
    if (e != cudaSuccess) {
        /* Direct launches before the failure would have been enqueued. */
        (void)fkv_record_enqueue(r);
        return e;
    }
    /* One kernel gains nothing from a graph; a spilled record has been
     * enqueued already. */
    lc->counts.spilled_calls += r->spilled != 0;
    if (r->spilled || r->n_ops < 2 || slot < 0 || slot >= lc->n_slots)
        return fkv_record_enqueue(r);
    fkv_launch_slot *s = &lc->slot[slot];
    if (fkv_record_same(s->seen, r)) {
        if (!graph_for(lc, s, r))
            return fkv_record_enqueue(r);
        e = cudaGraphLaunch(s->exec, r->stream);
        if (e == cudaSuccess)
            lc->counts.graph_launches++;
        return e;
    }
    /* Another record than last time: as it is, and kept for the next call;
     * the graph stays, to be updated to it if it repeats. */
    s->fresh = false;
    s->broken = false;
    e = fkv_record_enqueue(r);
    if (e == cudaSuccess)
        fkv_record_copy(s->seen, r);
    else
        s->seen->n_ops = 0;
    return e;
}
