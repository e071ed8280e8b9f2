/*
 * The llama example's CUDA forward backend (llama_cuda_backend).
 *
 * Weights are converted to bf16 on the device at create (norm weights stay
 * f32); the Q/K/V and gate/up projections are fused into one GEMM each.
 * Every GEMM goes through cublasGemmEx (bf16 in, f32 compute, f32 out) on
 * the backend's one stream; the residual adds are the GEMMs' beta = 1.
 * The residual stream is f32; Q/K/V are handed to libfreekv in the cache's
 * dtype as device pointers, and the stream is given to fkv_set_stream.
 *
 * Decode with rc->cuda_graph: the whole step (embedding, every layer with
 * its four libfreekv calls, the head) is captured once for a set of slots
 * (after one eager step of that set, the warm-up) and replayed per step; tokens and positions reach it through device
 * buffers copied before each launch. Before capture every sequence is
 * reserved (fkv_seq_reserve) for GRAPH_RESERVE more tokens and the cache is
 * drained (fkv_sync); after replays, fkv_sync runs before any eager call
 * (docs/api.md section 8). A different slot set, an eager call or the end
 * of the reservation recaptures.
 *
 * Tensor parallel (--tp, gpu_tp.h): a shard holds cfg with q_heads,
 * kv_heads and intermediate divided by the number of ranks and the slices
 * of the weights that go with them; tp_reduce adds the ranks' partial o and
 * down projections (NCCL all-reduce on the stream, captured with the rest
 * of the step). With one rank it does nothing.
 *
 * CUDA or cuBLAS failures inside kernels' launchers exit with a message
 * (an example may exit; the library never does); the backend's own calls
 * return -1 with the message in err.
 *
 * SPDX-License-Identifier: MIT
 */
#include "gpu_kernels.cuh"

#include <cublas_v2.h>
#include <math.h>
#include <string.h>

#include "freekv.h"
extern "C" {
#include "engine.h"
#include "gpu_tp.h"
}
#ifdef LLAMA_WITH_NCCL
#include <nccl.h>
#endif

/* Tokens reserved per sequence ahead of a capture; the environment's
 * LLAMA_GRAPH_RESERVE (>= 1) overrides it, so that selfcheck-gpu can make
 * replays run out of the reservation and recapture. */
#define GRAPH_RESERVE 1024
/* Prompt tokens per GEMM chunk: bounds the prefill's scratch for 32K
 * prompts (only attention needs the whole prompt at once). */
#define PREFILL_CHUNK 4096
/* cuBLAS workspace given explicitly, so that it allocates nothing while a
 * graph is being captured. */
#define BLAS_WORKSPACE (32u << 20)

#define BLAS_CHECK(call)                                                       \
    do {                                                                       \
        cublasStatus_t blas_s_ = (call);                                       \
        if (blas_s_ != CUBLAS_STATUS_SUCCESS) {                                \
            fprintf(stderr, "llama: cuBLAS error at %s:%d: %s: %s\n",          \
                    __FILE__, __LINE__, #call,                                 \
                    cublasGetStatusString(blas_s_));                           \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

/* Checked CUDA call in a function with err/errlen that returns int. */
#define CU(call)                                                               \
    do {                                                                       \
        cudaError_t cu_e_ = (call);                                            \
        if (cu_e_ != cudaSuccess) {                                            \
            llama_errf(err, errlen, "CUDA: %s: %s (%s)", #call,                \
                       cudaGetErrorString(cu_e_), cudaGetErrorName(cu_e_));    \
            return -1;                                                         \
        }                                                                      \
    } while (0)

#define FKV(call, what)                                                        \
    do {                                                                       \
        if (llama_fkv_check((call), b->cache, (what), err, errlen) != 0)      \
            return -1;                                                         \
    } while (0)

typedef __nv_bfloat16 bf16;

typedef struct gpu_layer {
    float *attn_norm, *ffn_norm; /* [hidden] */
    bf16 *wqkv;                  /* [(nq + 2 nkv) D, hidden] */
    bf16 *wo;                    /* [hidden, nq D] */
    bf16 *wgu;                   /* [2 I, hidden]: gate rows, then up rows */
    bf16 *wdown;                 /* [hidden, I] */
} gpu_layer;

/* A slot's prompt K/V kept for replay_prefill: [layers][2][n][nkv][D]. */
typedef struct gpu_kept {
    void *kv;
    int64_t n;
    int dtype;
} gpu_kept;

struct llama_backend {
    llama_config cfg; /* a shard's: its q_heads, kv_heads, intermediate */
    int tp_rank, tp_size;
    void *comm; /* ncclComm_t when tp_size > 1 */
    llama_run_config rc;
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;

    bf16 *embed, *lm_head; /* lm_head == embed when tied */
    float *norm;
    gpu_layer *L;
    float *inv_freq; /* [D / 2] */
    uint64_t wbytes;

    fkv_cache *cache;
    int dtype; /* the cache's (GPU_* == FKV_DTYPE_* values) */
    size_t esz;
    fkv_seq_id *seq; /* [max_batch] */
    int64_t *pos;    /* [max_batch]: tokens the slot holds */
    int64_t *reserved; /* [max_batch]: fkv_seq_reserve'd so far */
    gpu_kept *kept;  /* [max_batch] */

    /* Decode buffers for max_batch sequences (cache-dtype ones sized f32). */
    int32_t *d_io;   /* [2 B]: tokens, then positions */
    int32_t *h_io;   /* pinned mirror */
    float *x, *qkv, *gu, *logits;
    bf16 *hb, *att_bf, *act;
    void *q, *k, *v, *att;
    float *h_logits; /* pinned [B, vocab] */

    /* Prefill buffers, grown on demand (never on the decode path). */
    int64_t pf_cap;
    float *pf_x, *pf_qkv, *pf_gu;
    bf16 *pf_hb, *pf_att, *pf_act;
    void *pf_q, *pf_k, *pf_v;
    int32_t *pf_pos, *pf_tok;

    /* Graph state. */
    cudaGraphExec_t exec;
    int64_t graph_reserve;
    int32_t g_n;
    int32_t g_slots[64];
    fkv_seq_id g_ids[64];
    int dirty; /* replays since the last fkv_sync */
    /* The slots of the last eager step: a set is captured only after one
     * eager step of it has loaded every kernel (lazy module loading) and
     * let cuBLAS pick its kernels for this batch size. */
    int32_t w_n;
    int32_t w_slots[64];
    fkv_seq_id w_ids[64];
};

static int qkv_rows(const llama_config *c)
{
    return (c->q_heads + 2 * c->kv_heads) * c->head_dim;
}

/* Y[n, out] (+)= X[n, in] . W[out, in]^T, f32 out; see the column-major
 * reading in the comment of gemm's callers: cuBLAS sees W as [in, out]. */
static void gemm(llama_backend *b, const bf16 *W, int out, int in,
                 const bf16 *X, int n, float *Y, float beta)
{
    const float alpha = 1.0f;
    BLAS_CHECK(cublasGemmEx(b->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in,
                            &alpha, W, CUDA_R_16BF, in, X, CUDA_R_16BF, in,
                            &beta, Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

/* ------------------------------------------------------------------------ */
/* Create / destroy                                                         */
/* ------------------------------------------------------------------------ */

extern "C" int llama_cuda_available(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n > 0;
}

static int dev_alloc(void **p, size_t bytes, llama_backend *b, char *err,
                     size_t errlen)
{
    (void)b;
    *p = NULL;
    CU(cudaMalloc(p, bytes ? bytes : 1));
    return 0;
}

/* Uploads a tensor (any dtype) and converts it to bf16 or f32 at dst. */
static int upload(const llama_tensor *t, void *dst, int dst_dtype,
                  void *staging, llama_backend *b, char *err, size_t errlen)
{
    CU(cudaMemcpyAsync(staging, t->data, t->nbytes, cudaMemcpyHostToDevice,
                       b->stream));
    long long count = 1;
    for (int i = 0; i < t->ndim; i++)
        count *= t->shape[i];
    /* llama_dtype and the GPU_* codes share their values (F32 0, F16 1,
     * BF16 2). */
    gpu_convert(staging, (int)t->dtype, dst, dst_dtype, count, b->stream);
    /* The staging buffer is reused by the next upload: stream order keeps
     * the copy after this conversion. */
    return 0;
}

/* Uploads rows [r0, r0 + nr) x columns [c0, c0 + nc) of a 2-D tensor
 * [rows, cols] and converts them to bf16 at dst ([nr, nc], dense): a
 * shard's slice of a projection (the whole tensor with one rank). */
static int upload_slice(const llama_tensor *t, int64_t r0, int64_t nr,
                        int64_t c0, int64_t nc, bf16 *dst, void *staging,
                        llama_backend *b, char *err, size_t errlen)
{
    const size_t esz = t->dtype == LLAMA_F32 ? 4 : 2;
    const int64_t cols = t->shape[1];
    const char *src = (const char *)t->data + ((size_t)r0 * cols + c0) * esz;
    /* Pageable (mapped) source: the copy is staged by the driver. */
    CU(cudaMemcpy2DAsync(staging, (size_t)nc * esz, src, (size_t)cols * esz,
                         (size_t)nc * esz, (size_t)nr, cudaMemcpyHostToDevice,
                         b->stream));
    gpu_convert(staging, (int)t->dtype, dst, GPU_BF16, (long long)nr * nc,
                b->stream);
    return 0;
}

/* x[count] = the sum over the ranks of their x (in place, on the stream):
 * after the o and down projections, whose residual only rank 0 adds. */
static int tp_reduce(llama_backend *b, float *x, size_t count, char *err,
                     size_t errlen)
{
    if (b->tp_size <= 1)
        return 0;
#ifdef LLAMA_WITH_NCCL
    ncclResult_t r = ncclAllReduce(x, x, count, ncclFloat, ncclSum,
                                   (ncclComm_t)b->comm, b->stream);
    if (r != ncclSuccess) {
        llama_errf(err, errlen, "NCCL: ncclAllReduce (rank %d of %d): %s",
                   b->tp_rank, b->tp_size, ncclGetErrorString(r));
        return -1;
    }
    return 0;
#else
    (void)x;
    (void)count;
    llama_errf(err, errlen, "cuda backend: built without NCCL");
    return -1;
#endif
}

static void cuda_destroy(llama_backend *b);

static int cuda_create(const llama_model *m, const llama_run_config *rc,
                       llama_backend **out, char *err, size_t errlen)
{
    return llama_cuda_shard_create(m, rc, 0, 1, NULL, out, err, errlen);
}

extern "C" int llama_cuda_shard_create(const llama_model *m,
                                       const llama_run_config *rc, int rank,
                                       int size, void *comm,
                                       llama_backend **out, char *err,
                                       size_t errlen)
{
    *out = NULL;
    const llama_config *full = &m->cfg;
    if (size < 1 || rank < 0 || rank >= size ||
        full->kv_heads % size != 0 || full->intermediate % size != 0) {
        llama_errf(err, errlen, "cuda backend: cannot split kv_heads %d and "
                   "intermediate %d over %d GPUs (rank %d)",
                   (int)full->kv_heads, (int)full->intermediate, size, rank);
        return -1;
    }
    if (full->q_heads % full->kv_heads != 0) {
        llama_errf(err, errlen, "cuda backend: q_heads %d not a multiple of "
                   "kv_heads %d", (int)full->q_heads, (int)full->kv_heads);
        return -1;
    }
    /* The shard's own shape: everything below sizes from it. */
    llama_config shard = *full;
    shard.q_heads /= size;
    shard.kv_heads /= size;
    shard.intermediate /= size;
    const llama_config *c = &shard;
    if (rc->max_batch < 1 || rc->max_batch > 64) {
        llama_errf(err, errlen, "cuda backend: max_batch %d not in [1, 64]",
                   (int)rc->max_batch);
        return -1;
    }
    if (c->head_dim != 64 && c->head_dim != 128 && c->head_dim != 256) {
        llama_errf(err, errlen,
                   "cuda backend: head_dim %d unsupported (64, 128 or 256)",
                   (int)c->head_dim);
        return -1;
    }
    if (c->q_heads % c->kv_heads != 0) {
        llama_errf(err, errlen, "cuda backend: q_heads %d not a multiple of "
                   "kv_heads %d", (int)c->q_heads, (int)c->kv_heads);
        return -1;
    }
    if (!llama_cuda_available()) {
        llama_errf(err, errlen, "cuda backend: no usable CUDA device");
        return -1;
    }
    llama_backend *b = (llama_backend *)calloc(1, sizeof *b);
    if (!b) {
        llama_errf(err, errlen, "cuda backend: out of host memory");
        return -1;
    }
    *out = b; /* destroy frees a partial backend on failure */
    b->cfg = *c;
    b->rc = *rc;
    b->tp_rank = rank;
    b->tp_size = size;
    b->comm = comm;
    b->dtype = GPU_BF16;
    b->esz = 2;
    b->graph_reserve = GRAPH_RESERVE;
    {
        const char *gr = getenv("LLAMA_GRAPH_RESERVE");
        if (gr && atoll(gr) >= 1)
            b->graph_reserve = atoll(gr);
    }
    CU(cudaGetDevice(&b->device));
    CU(cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking));
    if (cublasCreate(&b->blas) != CUBLAS_STATUS_SUCCESS) {
        b->blas = NULL;
        llama_errf(err, errlen, "cuBLAS: cublasCreate failed");
        goto fail;
    }
    if (dev_alloc(&b->blas_ws, BLAS_WORKSPACE, b, err, errlen))
        goto fail;
    /* cublasSetStream resets the workspace: set the stream first. */
    BLAS_CHECK(cublasSetStream(b->blas, b->stream));
    BLAS_CHECK(cublasSetWorkspace(b->blas, b->blas_ws, BLAS_WORKSPACE));
    BLAS_CHECK(cublasSetMathMode(b->blas, CUBLAS_DEFAULT_MATH));

    {
        const int H = c->hidden, I = c->intermediate, D = c->head_dim;
        const int V = c->vocab, Lq = c->q_heads * D, R = qkv_rows(c);
        size_t most = m->embed->nbytes;
        for (int l = 0; l < c->layers; l++) {
            const llama_layer *ly = &m->layer[l];
            const llama_tensor *ts[] = {ly->wq, ly->wk, ly->wv, ly->wo,
                                        ly->w_gate, ly->w_up, ly->w_down};
            for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
                if (ts[i]->nbytes > most)
                    most = ts[i]->nbytes;
        }
        if (m->lm_head->nbytes > most)
            most = m->lm_head->nbytes;
        void *staging = NULL;
        if (dev_alloc(&staging, most, b, err, errlen))
            goto fail;
        int rcode = 0;
#define UP(t, dst, dt) \
    if (!rcode) rcode = upload((t), (dst), (dt), staging, b, err, errlen)
#define AL(p, bytes)                                                      \
    if (!rcode) {                                                         \
        rcode = dev_alloc((void **)&(p), (bytes), b, err, errlen);        \
        if (!rcode) b->wbytes += (bytes);                                 \
    }
        AL(b->embed, (size_t)V * H * 2);
        UP(m->embed, b->embed, GPU_BF16);
        if (m->lm_head == m->embed) {
            b->lm_head = b->embed;
        } else {
            AL(b->lm_head, (size_t)V * H * 2);
            UP(m->lm_head, b->lm_head, GPU_BF16);
        }
        AL(b->norm, (size_t)H * 4);
        UP(m->norm, b->norm, GPU_F32);
        b->L = (gpu_layer *)calloc((size_t)c->layers, sizeof *b->L);
        if (!b->L && !rcode) {
            llama_errf(err, errlen, "cuda backend: out of host memory");
            rcode = -1;
        }
/* This rank's rows [r * nr, (r + 1) * nr) or columns of a projection. */
#define ROWS(t, nr, dst) \
    if (!rcode) rcode = upload_slice((t), (int64_t)rank * (nr), (nr), 0, H, \
                                     (dst), staging, b, err, errlen)
#define COLS(t, nc, dst) \
    if (!rcode) rcode = upload_slice((t), 0, H, (int64_t)rank * (nc), (nc), \
                                     (dst), staging, b, err, errlen)
        const int Lk = c->kv_heads * D;
        for (int l = 0; l < c->layers && !rcode; l++) {
            const llama_layer *ly = &m->layer[l];
            gpu_layer *g = &b->L[l];
            AL(g->attn_norm, (size_t)H * 4);
            UP(ly->attn_norm, g->attn_norm, GPU_F32);
            AL(g->ffn_norm, (size_t)H * 4);
            UP(ly->ffn_norm, g->ffn_norm, GPU_F32);
            /* Column-parallel: this rank's query heads, then its KV heads'
             * K and V rows (head h of the shard = head rank * n + h). */
            AL(g->wqkv, (size_t)R * H * 2);
            ROWS(ly->wq, Lq, g->wqkv);
            ROWS(ly->wk, Lk, g->wqkv + (size_t)Lq * H);
            ROWS(ly->wv, Lk, g->wqkv + (size_t)(Lq + Lk) * H);
            /* Row-parallel: the columns of o that read those heads. */
            AL(g->wo, (size_t)H * Lq * 2);
            COLS(ly->wo, Lq, g->wo);
            AL(g->wgu, (size_t)2 * I * H * 2);
            ROWS(ly->w_gate, I, g->wgu);
            ROWS(ly->w_up, I, g->wgu + (size_t)I * H);
            AL(g->wdown, (size_t)H * I * 2);
            COLS(ly->w_down, I, g->wdown);
        }
#undef ROWS
#undef COLS
#undef UP
#undef AL
        /* The uploads read host memory and the staging buffer: wait before
         * freeing it (create is not on the decode path). */
        cudaError_t e = cudaStreamSynchronize(b->stream);
        cudaFree(staging);
        if (rcode)
            goto fail;
        if (e != cudaSuccess) {
            llama_errf(err, errlen, "CUDA: uploading the weights: %s",
                       cudaGetErrorString(e));
            goto fail;
        }

        /* Inverse frequencies from the shared host code (llama3 scaling
         * included), computed once. */
        double *invd = (double *)malloc(sizeof(double) * (size_t)(D / 2));
        float *invf = (float *)malloc(sizeof(float) * (size_t)(D / 2));
        if (!invd || !invf) {
            free(invd);
            free(invf);
            llama_errf(err, errlen, "cuda backend: out of host memory");
            goto fail;
        }
        llama_rope_inv_freq(c, invd);
        for (int i = 0; i < D / 2; i++)
            invf[i] = (float)invd[i];
        free(invd);
        if (dev_alloc((void **)&b->inv_freq, sizeof(float) * (D / 2), b, err,
                      errlen)) {
            free(invf);
            goto fail;
        }
        e = cudaMemcpy(b->inv_freq, invf, sizeof(float) * (D / 2),
                       cudaMemcpyHostToDevice);
        free(invf);
        if (e != cudaSuccess) {
            llama_errf(err, errlen, "CUDA: copying inv_freq: %s",
                       cudaGetErrorString(e));
            goto fail;
        }

        /* Decode buffers for max_batch tokens. */
        const size_t B = (size_t)rc->max_batch;
        if (dev_alloc((void **)&b->d_io, sizeof(int32_t) * 2 * B, b, err,
                      errlen) ||
            dev_alloc((void **)&b->x, sizeof(float) * B * H, b, err, errlen) ||
            dev_alloc((void **)&b->qkv, sizeof(float) * B * R, b, err,
                      errlen) ||
            dev_alloc((void **)&b->gu, sizeof(float) * B * 2 * I, b, err,
                      errlen) ||
            dev_alloc((void **)&b->logits, sizeof(float) * B * V, b, err,
                      errlen) ||
            dev_alloc((void **)&b->hb, 2 * B * H, b, err, errlen) ||
            dev_alloc((void **)&b->att_bf, 2 * B * Lq, b, err, errlen) ||
            dev_alloc((void **)&b->act, 2 * B * I, b, err, errlen) ||
            dev_alloc(&b->q, 4 * B * Lq, b, err, errlen) ||
            dev_alloc(&b->k, 4 * B * c->kv_heads * D, b, err, errlen) ||
            dev_alloc(&b->v, 4 * B * c->kv_heads * D, b, err, errlen) ||
            dev_alloc(&b->att, 4 * B * Lq, b, err, errlen))
            goto fail;
        if (cudaMallocHost((void **)&b->h_io, sizeof(int32_t) * 2 * B) !=
                cudaSuccess ||
            cudaMallocHost((void **)&b->h_logits, sizeof(float) * B * V) !=
                cudaSuccess) {
            llama_errf(err, errlen, "CUDA: cudaMallocHost failed");
            goto fail;
        }
    }
    b->seq = (fkv_seq_id *)calloc((size_t)rc->max_batch, sizeof *b->seq);
    b->pos = (int64_t *)calloc((size_t)rc->max_batch, sizeof *b->pos);
    b->reserved = (int64_t *)calloc((size_t)rc->max_batch, sizeof *b->reserved);
    b->kept = (gpu_kept *)calloc((size_t)rc->max_batch, sizeof *b->kept);
    if (!b->seq || !b->pos || !b->reserved || !b->kept) {
        llama_errf(err, errlen, "cuda backend: out of host memory");
        goto fail;
    }
    return 0;
fail:
    cuda_destroy(b);
    *out = NULL;
    return -1;
}

static void graph_drop(llama_backend *b)
{
    if (b->exec)
        cudaGraphExecDestroy(b->exec);
    b->exec = NULL;
    b->g_n = 0;
}

/* After replays: the library's host view is refreshed before any eager
 * call (docs/api.md section 8). */
static int settle(llama_backend *b, char *err, size_t errlen)
{
    if (b->cache && b->dirty) {
        b->dirty = 0;
        FKV(fkv_sync(b->cache), "fkv_sync");
    }
    return 0;
}

static void prefill_free(llama_backend *b)
{
    void *ps[] = {b->pf_x, b->pf_qkv, b->pf_gu, b->pf_hb, b->pf_att,
                  b->pf_act, b->pf_q, b->pf_k, b->pf_v, b->pf_pos,
                  b->pf_tok};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++)
        cudaFree(ps[i]);
    b->pf_x = b->pf_qkv = b->pf_gu = NULL;
    b->pf_hb = b->pf_att = b->pf_act = NULL;
    b->pf_q = b->pf_k = b->pf_v = NULL;
    b->pf_pos = b->pf_tok = NULL;
    b->pf_cap = 0;
}

static void cache_close(llama_backend *b)
{
    char e[8];
    (void)settle(b, e, sizeof e);
    graph_drop(b);
    if (b->cache)
        fkv_destroy(b->cache); /* waits for its outstanding work */
    b->cache = NULL;
    for (int32_t i = 0; b->pos && i < b->rc.max_batch; i++) {
        b->pos[i] = 0;
        b->reserved[i] = 0;
    }
}

/* Teardown ignores the statuses of frees: nothing useful can follow a
 * failed free, and a sticky error was reported by the call that caused it. */
static void cuda_destroy(llama_backend *b)
{
    if (!b)
        return;
    if (b->stream)
        (void)cudaStreamSynchronize(b->stream);
    cache_close(b);
    if (b->L) {
        for (int l = 0; l < b->cfg.layers; l++) {
            gpu_layer *g = &b->L[l];
            cudaFree(g->attn_norm);
            cudaFree(g->ffn_norm);
            cudaFree(g->wqkv);
            cudaFree(g->wo);
            cudaFree(g->wgu);
            cudaFree(g->wdown);
        }
        free(b->L);
    }
    if (b->lm_head != b->embed)
        cudaFree(b->lm_head);
    cudaFree(b->embed);
    cudaFree(b->norm);
    cudaFree(b->inv_freq);
    void *ds[] = {b->d_io, b->x, b->qkv, b->gu, b->logits, b->hb, b->att_bf,
                  b->act, b->q, b->k, b->v, b->att};
    for (size_t i = 0; i < sizeof ds / sizeof ds[0]; i++)
        cudaFree(ds[i]);
    cudaFreeHost(b->h_io);
    cudaFreeHost(b->h_logits);
    prefill_free(b);
    for (int32_t i = 0; b->kept && i < b->rc.max_batch; i++)
        cudaFree(b->kept[i].kv);
    free(b->kept);
    free(b->seq);
    free(b->pos);
    free(b->reserved);
    if (b->blas)
        cublasDestroy(b->blas);
    cudaFree(b->blas_ws);
    if (b->stream)
        cudaStreamDestroy(b->stream);
    free(b);
}

/* ------------------------------------------------------------------------ */
/* Cache and slots                                                          */
/* ------------------------------------------------------------------------ */

static int cuda_cache_open(llama_backend *b, const fkv_options *opts,
                           char *err, size_t errlen)
{
    cache_close(b);
    fkv_options o = *opts;
    o.backend = FKV_BACKEND_CUDA;
    o.device = b->device;
    o.num_layers = b->cfg.layers;
    o.num_q_heads = b->cfg.q_heads;
    o.num_kv_heads = b->cfg.kv_heads;
    o.head_dim = b->cfg.head_dim;
    o.max_sequences = b->rc.max_batch;
    o.max_tokens_per_sequence = b->rc.max_context;
    if (o.dtype != FKV_DTYPE_F32 && o.dtype != FKV_DTYPE_F16 &&
        o.dtype != FKV_DTYPE_BF16) {
        llama_errf(err, errlen, "cuda backend: unknown dtype %d",
                   (int)o.dtype);
        return -1;
    }
    fkv_status st = fkv_create(&o, &b->cache);
    if (st != FKV_OK) {
        char msg[512];
        fkv_last_error(NULL, msg, sizeof msg);
        llama_errf(err, errlen, "fkv_create: %s: %s", fkv_status_string(st),
                   msg);
        b->cache = NULL;
        return -1;
    }
    b->dtype = (int)o.dtype; /* FKV_DTYPE_* == GPU_* */
    b->esz = llama_fkv_dtype_size(o.dtype);
    FKV(fkv_set_stream(b->cache, (void *)b->stream), "fkv_set_stream");
    for (int32_t i = 0; i < b->rc.max_batch; i++) {
        FKV(fkv_seq_open(b->cache, &b->seq[i]), "fkv_seq_open");
        b->pos[i] = 0;
        b->reserved[i] = 0;
    }
    return 0;
}

static int check_slot(llama_backend *b, int32_t slot, char *err,
                      size_t errlen)
{
    if (!b->cache) {
        llama_errf(err, errlen, "cuda backend: no cache open");
        return -1;
    }
    if (slot < 0 || slot >= b->rc.max_batch) {
        llama_errf(err, errlen, "cuda backend: slot %d not in [0, %d)",
                   (int)slot, (int)b->rc.max_batch);
        return -1;
    }
    return 0;
}

static int cuda_slot_reset(llama_backend *b, int32_t slot, char *err,
                           size_t errlen)
{
    if (check_slot(b, slot, err, errlen) || settle(b, err, errlen))
        return -1;
    graph_drop(b); /* the graph names the slot's old sequence id */
    FKV(fkv_seq_close(b->cache, b->seq[slot]), "fkv_seq_close");
    FKV(fkv_seq_open(b->cache, &b->seq[slot]), "fkv_seq_open");
    b->pos[slot] = 0;
    b->reserved[slot] = 0;
    return 0;
}

static int need_empty(llama_backend *b, int32_t slot, const char *what,
                      char *err, size_t errlen)
{
    if (check_slot(b, slot, err, errlen))
        return -1;
    /* An eager append follows: a captured graph is not replayed across
     * eager library calls (docs/api.md section 8); decode recaptures. */
    if (settle(b, err, errlen))
        return -1;
    graph_drop(b);
    if (b->pos[slot] != 0) {
        llama_errf(err, errlen, "cuda backend: %s into slot %d, which holds "
                   "%lld tokens (reset it first)", what, (int)slot,
                   (long long)b->pos[slot]);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Prefill                                                                  */
/* ------------------------------------------------------------------------ */

static int prefill_grow(llama_backend *b, int64_t n, char *err, size_t errlen)
{
    if (n <= b->pf_cap)
        return 0;
    CU(cudaStreamSynchronize(b->stream)); /* the old buffers may be in use */
    prefill_free(b);
    const llama_config *c = &b->cfg;
    const size_t N = (size_t)n, C = (size_t)(n < PREFILL_CHUNK ? n
                                                               : PREFILL_CHUNK);
    const size_t H = c->hidden, I = c->intermediate, D = c->head_dim;
    const size_t Lq = (size_t)c->q_heads * D, Lk = (size_t)c->kv_heads * D;
    if (dev_alloc((void **)&b->pf_x, 4 * N * H, b, err, errlen) ||
        dev_alloc((void **)&b->pf_qkv, 4 * C * qkv_rows(c), b, err, errlen) ||
        dev_alloc((void **)&b->pf_gu, 4 * C * 2 * I, b, err, errlen) ||
        dev_alloc((void **)&b->pf_hb, 2 * C * H, b, err, errlen) ||
        dev_alloc((void **)&b->pf_att, 2 * N * Lq, b, err, errlen) ||
        dev_alloc((void **)&b->pf_act, 2 * C * I, b, err, errlen) ||
        dev_alloc(&b->pf_q, 4 * N * Lq, b, err, errlen) ||
        dev_alloc(&b->pf_k, 4 * N * Lk, b, err, errlen) ||
        dev_alloc(&b->pf_v, 4 * N * Lk, b, err, errlen) ||
        dev_alloc((void **)&b->pf_pos, 4 * N, b, err, errlen) ||
        dev_alloc((void **)&b->pf_tok, 4 * N, b, err, errlen)) {
        prefill_free(b);
        return -1;
    }
    b->pf_cap = n;
    return 0;
}

static int append_prompt(llama_backend *b, int32_t slot, int32_t layer,
                         int64_t n, const void *k, const void *v, char *err,
                         size_t errlen)
{
    int32_t nt = (int32_t)n;
    fkv_batch bt = {1, 0, &b->seq[slot], &nt};
    FKV(fkv_append(b->cache, layer, &bt, k, v), "fkv_append (prompt)");
    return 0;
}

static int cuda_prefill(llama_backend *b, int32_t slot, const int32_t *tokens,
                        int64_t n, float *logits, char *err, size_t errlen)
{
    if (need_empty(b, slot, "prefill", err, errlen))
        return -1;
    const llama_config *c = &b->cfg;
    if (n < 1 || n > b->rc.max_context || n > INT32_MAX) {
        llama_errf(err, errlen, "cuda backend: prompt of %lld tokens not in "
                   "[1, %lld]", (long long)n, (long long)b->rc.max_context);
        return -1;
    }
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab) {
            llama_errf(err, errlen, "cuda backend: token %d at %lld not in "
                       "[0, %d)", (int)tokens[i], (long long)i,
                       (int)c->vocab);
            return -1;
        }
    if (prefill_grow(b, n, err, errlen))
        return -1;
    const int H = c->hidden, I = c->intermediate, D = c->head_dim;
    const int nq = c->q_heads, nkv = c->kv_heads, Lq = nq * D, R = qkv_rows(c);
    const size_t kvl = (size_t)n * nkv * D; /* elements of K of one layer */
    cudaStream_t s = b->stream;
    /* Residual beta: the all-reduce adds every rank's x, so only rank 0's
     * projections add the residual (the others write their partial sum). */
    const float rb = b->tp_rank == 0 ? 1.0f : 0.0f;

    /* Kept K/V for replay_prefill: allocated before anything is appended. */
    gpu_kept *kp = &b->kept[slot];
    if (b->rc.keep_prefill) {
        CU(cudaStreamSynchronize(s));
        cudaFree(kp->kv);
        kp->kv = NULL;
        kp->n = 0;
        if (dev_alloc(&kp->kv, 2 * kvl * b->esz * c->layers, b, err, errlen))
            return -1;
        kp->n = n;
        kp->dtype = b->dtype;
    }

    /* Tokens and positions 0..n-1 (pinned staging is not needed: prefill is
     * off the decode path, a synchronous copy is fine). */
    int32_t *hpos = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
    if (!hpos) {
        llama_errf(err, errlen, "cuda backend: out of host memory");
        return -1;
    }
    for (int64_t i = 0; i < n; i++)
        hpos[i] = (int32_t)i;
    cudaError_t e = cudaMemcpyAsync(b->pf_pos, hpos, sizeof(int32_t) * n,
                                    cudaMemcpyHostToDevice, s);
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(b->pf_tok, tokens, sizeof(int32_t) * n,
                            cudaMemcpyHostToDevice, s);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(s); /* before hpos is freed */
    free(hpos);
    CU(e);
    gpu_embed(b->pf_tok, (int)n, b->embed, c->vocab, H,
              b->pf_x, s);

    for (int32_t l = 0; l < c->layers; l++) {
        const gpu_layer *g = &b->L[l];
        void *kl = b->pf_k, *vl = b->pf_v;
        if (b->rc.keep_prefill) {
            kl = (char *)kp->kv + (size_t)l * 2 * kvl * b->esz;
            vl = (char *)kl + kvl * b->esz;
        }
        for (int64_t c0 = 0; c0 < n; c0 += PREFILL_CHUNK) {
            int cn = (int)(n - c0 < PREFILL_CHUNK ? n - c0 : PREFILL_CHUNK);
            gpu_rmsnorm(b->pf_x + (size_t)c0 * H, cn, H, g->attn_norm,
                        (float)c->rms_norm_eps, b->pf_hb, s);
            gemm(b, g->wqkv, R, H, b->pf_hb, cn, b->pf_qkv, 0.0f);
            gpu_rope_split(b->pf_qkv, cn, b->pf_pos + c0, b->inv_freq, nq,
                           nkv, D, b->dtype,
                           (char *)b->pf_q + (size_t)c0 * Lq * b->esz,
                           (char *)kl + (size_t)c0 * nkv * D * b->esz,
                           (char *)vl + (size_t)c0 * nkv * D * b->esz, s);
        }
        gpu_prefill_attention(b->dtype, b->pf_q, kl, vl, (int)n, nq, nkv, D,
                              1.0f / sqrtf((float)D), b->pf_att, s);
        if (append_prompt(b, slot, l, n, kl, vl, err, errlen))
            return -1;
        for (int64_t c0 = 0; c0 < n; c0 += PREFILL_CHUNK) {
            int cn = (int)(n - c0 < PREFILL_CHUNK ? n - c0 : PREFILL_CHUNK);
            float *xc = b->pf_x + (size_t)c0 * H;
            gemm(b, g->wo, H, Lq, b->pf_att + (size_t)c0 * Lq, cn, xc, rb);
            if (tp_reduce(b, xc, (size_t)cn * H, err, errlen))
                return -1;
            gpu_rmsnorm(xc, cn, H, g->ffn_norm, (float)c->rms_norm_eps,
                        b->pf_hb, s);
            gemm(b, g->wgu, 2 * I, H, b->pf_hb, cn, b->pf_gu, 0.0f);
            gpu_swiglu(b->pf_gu, cn, I, b->pf_act, s);
            gemm(b, g->wdown, H, I, b->pf_act, cn, xc, rb);
            if (tp_reduce(b, xc, (size_t)cn * H, err, errlen))
                return -1;
        }
    }
    b->pos[slot] = n;
    if (logits) {
        /* The last token's logits only. */
        gpu_rmsnorm(b->pf_x + (size_t)(n - 1) * H, 1, H, b->norm,
                    (float)c->rms_norm_eps, b->pf_hb, s);
        gemm(b, b->lm_head, c->vocab, H, b->pf_hb, 1, b->logits, 0.0f);
        CU(cudaMemcpyAsync(b->h_logits, b->logits, sizeof(float) * c->vocab,
                           cudaMemcpyDeviceToHost, s));
    }
    CU(cudaStreamSynchronize(s));
    if (logits)
        memcpy(logits, b->h_logits, sizeof(float) * c->vocab);
    return 0;
}

static int cuda_replay_prefill(llama_backend *b, int32_t slot, char *err,
                               size_t errlen)
{
    if (need_empty(b, slot, "replay_prefill", err, errlen))
        return -1;
    gpu_kept *kp = &b->kept[slot];
    if (!kp->kv || kp->n < 1) {
        llama_errf(err, errlen, "cuda backend: slot %d has no kept prefill "
                   "(keep_prefill off, or no prefill yet)", (int)slot);
        return -1;
    }
    const llama_config *c = &b->cfg;
    const int64_t n = kp->n;
    if (n > b->rc.max_context) {
        llama_errf(err, errlen, "cuda backend: kept prompt longer than the "
                   "context");
        return -1;
    }
    const size_t kvl = (size_t)n * c->kv_heads * c->head_dim;
    const size_t kesz = llama_fkv_dtype_size((fkv_dtype)kp->dtype);
    if (kp->dtype != b->dtype && prefill_grow(b, n, err, errlen))
        return -1;
    for (int32_t l = 0; l < c->layers; l++) {
        const char *kl = (const char *)kp->kv + (size_t)l * 2 * kvl * kesz;
        const void *k = kl, *v = kl + kvl * kesz;
        if (kp->dtype != b->dtype) { /* the cache's dtype changed */
            gpu_convert(k, kp->dtype, b->pf_k, b->dtype, (long long)kvl,
                        b->stream);
            gpu_convert(v, kp->dtype, b->pf_v, b->dtype, (long long)kvl,
                        b->stream);
            k = b->pf_k;
            v = b->pf_v;
        }
        if (append_prompt(b, slot, l, n, k, v, err, errlen))
            return -1;
    }
    CU(cudaStreamSynchronize(b->stream));
    b->pos[slot] = n;
    return 0;
}

static int cuda_fill_random(llama_backend *b, int32_t slot, int64_t n,
                            uint64_t seed, char *err, size_t errlen)
{
    if (need_empty(b, slot, "fill_random", err, errlen))
        return -1;
    if (n < 1 || n > b->rc.max_context) {
        llama_errf(err, errlen, "cuda backend: %lld random tokens not in "
                   "[1, %lld]", (long long)n, (long long)b->rc.max_context);
        return -1;
    }
    const llama_config *c = &b->cfg;
    const int64_t chunk = n < PREFILL_CHUNK ? n : PREFILL_CHUNK;
    if (prefill_grow(b, chunk, err, errlen))
        return -1;
    const long long per = (long long)c->kv_heads * c->head_dim;
    for (int32_t l = 0; l < c->layers; l++)
        for (int64_t t0 = 0; t0 < n; t0 += chunk) {
            int64_t cn = n - t0 < chunk ? n - t0 : chunk;
            unsigned long long sd =
                seed * 0x100000001b3ull + (unsigned long long)l * 1000003ull +
                (unsigned long long)t0;
            gpu_random_fill(b->pf_k, b->dtype, cn * per, sd * 2 + 0,
                            b->stream);
            gpu_random_fill(b->pf_v, b->dtype, cn * per, sd * 2 + 1,
                            b->stream);
            if (append_prompt(b, slot, l, cn, b->pf_k, b->pf_v, err, errlen))
                return -1;
        }
    CU(cudaStreamSynchronize(b->stream));
    b->pos[slot] = n;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Decode                                                                   */
/* ------------------------------------------------------------------------ */

/* Enqueues one decode step of batch bt (n sequences) reading tokens and
 * positions from d_io; the logits land in b->logits. No host
 * synchronisation and no allocation: this is what a graph captures. */
static int decode_step(llama_backend *b, const fkv_batch *bt, char *err,
                       size_t errlen)
{
    const llama_config *c = &b->cfg;
    const int n = bt->num_seqs;
    const int H = c->hidden, I = c->intermediate, D = c->head_dim;
    const int nq = c->q_heads, nkv = c->kv_heads, Lq = nq * D, R = qkv_rows(c);
    cudaStream_t s = b->stream;
    const int32_t *d_tok = b->d_io, *d_pos = b->d_io + b->rc.max_batch;
    const float eps = (float)c->rms_norm_eps;
    const float rb = b->tp_rank == 0 ? 1.0f : 0.0f; /* see cuda_prefill */

    gpu_embed(d_tok, n, b->embed, c->vocab, H, b->x, s);
    for (int32_t l = 0; l < c->layers; l++) {
        const gpu_layer *g = &b->L[l];
        gpu_rmsnorm(b->x, n, H, g->attn_norm, eps, b->hb, s);
        gemm(b, g->wqkv, R, H, b->hb, n, b->qkv, 0.0f);
        gpu_rope_split(b->qkv, n, d_pos, b->inv_freq, nq, nkv, D, b->dtype,
                       b->q, b->k, b->v, s);
        FKV(fkv_append(b->cache, l, bt, b->k, b->v), "fkv_append");
        FKV(fkv_attend(b->cache, l, bt, b->q, b->att), "fkv_attend");
        /* q NULL: the attend's query; its selection is kept (nothing is
         * launched). */
        FKV(fkv_select(b->cache, l, bt, NULL), "fkv_select");
        FKV(fkv_recall(b->cache, l, bt), "fkv_recall");
        const bf16 *att = (const bf16 *)b->att;
        if (b->dtype != GPU_BF16) {
            gpu_convert(b->att, b->dtype, b->att_bf, GPU_BF16,
                        (long long)n * Lq, s);
            att = b->att_bf;
        }
        gemm(b, g->wo, H, Lq, att, n, b->x, rb);
        if (tp_reduce(b, b->x, (size_t)n * H, err, errlen))
            return -1;
        gpu_rmsnorm(b->x, n, H, g->ffn_norm, eps, b->hb, s);
        gemm(b, g->wgu, 2 * I, H, b->hb, n, b->gu, 0.0f);
        gpu_swiglu(b->gu, n, I, b->act, s);
        gemm(b, g->wdown, H, I, b->act, n, b->x, rb);
        if (tp_reduce(b, b->x, (size_t)n * H, err, errlen))
            return -1;
    }
    gpu_rmsnorm(b->x, n, H, b->norm, eps, b->hb, s);
    gemm(b, b->lm_head, c->vocab, H, b->hb, n, b->logits, 0.0f);
    return 0;
}

static int warm_matches(const llama_backend *b, int32_t n,
                        const int32_t *slots)
{
    if (b->w_n != n)
        return 0;
    for (int32_t i = 0; i < n; i++)
        if (b->w_slots[i] != slots[i] || b->w_ids[i] != b->seq[slots[i]])
            return 0;
    return 1;
}

static int graph_matches(const llama_backend *b, int32_t n,
                         const int32_t *slots)
{
    if (!b->exec || b->g_n != n)
        return 0;
    for (int32_t i = 0; i < n; i++)
        if (b->g_slots[i] != slots[i] || b->g_ids[i] != b->seq[slots[i]] ||
            b->pos[slots[i]] + 1 > b->reserved[slots[i]])
            return 0;
    return 1;
}

/* Reserves, drains and captures one step of these slots. */
static int graph_capture(llama_backend *b, int32_t n, const int32_t *slots,
                         char *err, size_t errlen)
{
    if (settle(b, err, errlen))
        return -1;
    graph_drop(b);
    for (int32_t i = 0; i < n; i++) {
        int32_t s = slots[i];
        int64_t want = b->pos[s] + b->graph_reserve;
        if (want > b->rc.max_context)
            want = b->rc.max_context;
        FKV(fkv_seq_reserve(b->cache, b->seq[s], want), "fkv_seq_reserve");
        b->reserved[s] = want;
        b->g_slots[i] = s;
        b->g_ids[i] = b->seq[s];
    }
    /* No eager work of the library may still run when capture begins. */
    FKV(fkv_sync(b->cache), "fkv_sync");
    CU(cudaStreamSynchronize(b->stream));

    fkv_batch bt = {n, 0, b->g_ids, NULL};
    cudaGraph_t graph = NULL;
    /* Tensor parallel: every rank's thread captures at the same time, which
     * global mode forbids (it bars other threads' unsafe calls). */
    CU(cudaStreamBeginCapture(b->stream, b->tp_size > 1
                                             ? cudaStreamCaptureModeThreadLocal
                                             : cudaStreamCaptureModeGlobal));
    int rc = decode_step(b, &bt, err, errlen);
    cudaError_t e = cudaStreamEndCapture(b->stream, &graph); /* always */
    /* The captured calls counted one token on the host: the device, read
     * back by the next fkv_sync, is the truth. */
    b->dirty = 1;
    if (rc != 0 || e != cudaSuccess) {
        if (graph)
            cudaGraphDestroy(graph);
        (void)cudaGetLastError();
        if (rc == 0)
            llama_errf(err, errlen, "CUDA: capturing the decode step: %s",
                       cudaGetErrorString(e));
        return -1;
    }
    /* UseNodePriority: replays keep the priority of the stream each kernel
     * was captured on (libfreekv's side stream is its highest); without it
     * every node of the graph runs at the launch stream's priority. */
    e = cudaGraphInstantiateWithFlags(&b->exec, graph,
                                      cudaGraphInstantiateFlagUseNodePriority);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        b->exec = NULL;
        llama_errf(err, errlen, "CUDA: cudaGraphInstantiate: %s",
                   cudaGetErrorString(e));
        return -1;
    }
    b->g_n = n;
    return 0;
}

static int cuda_decode(llama_backend *b, int32_t n, const int32_t *slots,
                       const int32_t *tokens, float *logits, char *err,
                       size_t errlen)
{
    const llama_config *c = &b->cfg;
    if (!b->cache) {
        llama_errf(err, errlen, "cuda backend: no cache open");
        return -1;
    }
    if (n < 1 || n > b->rc.max_batch) {
        llama_errf(err, errlen, "cuda backend: batch of %d not in [1, %d]",
                   (int)n, (int)b->rc.max_batch);
        return -1;
    }
    for (int32_t i = 0; i < n; i++) {
        if (check_slot(b, slots[i], err, errlen))
            return -1;
        for (int32_t j = 0; j < i; j++)
            if (slots[j] == slots[i]) {
                llama_errf(err, errlen, "cuda backend: slot %d twice in a "
                           "batch", (int)slots[i]);
                return -1;
            }
        if (tokens[i] < 0 || tokens[i] >= c->vocab) {
            llama_errf(err, errlen, "cuda backend: token %d not in [0, %d)",
                       (int)tokens[i], (int)c->vocab);
            return -1;
        }
        if (b->pos[slots[i]] + 1 > b->rc.max_context) {
            llama_errf(err, errlen, "cuda backend: slot %d is full (%lld "
                       "tokens)", (int)slots[i],
                       (long long)b->pos[slots[i]]);
            return -1;
        }
    }
    /* Graph mode: replay the set's graph; capture it when the previous
     * step of the same set ran eagerly (warm-up); else run this step
     * eagerly. */
    int replay = 0;
    if (b->rc.cuda_graph) {
        if (graph_matches(b, n, slots)) {
            replay = 1;
        } else if (warm_matches(b, n, slots)) {
            if (graph_capture(b, n, slots, err, errlen))
                return -1;
            replay = 1;
        } else {
            /* Eager library calls: after replays, fkv_sync first, and the
             * old graph is not replayed across them. */
            if (settle(b, err, errlen))
                return -1;
            graph_drop(b);
        }
    }

    /* Inputs through the device buffers the kernels (and graph) read. */
    for (int32_t i = 0; i < n; i++) {
        b->h_io[i] = tokens[i];
        b->h_io[b->rc.max_batch + i] = (int32_t)b->pos[slots[i]];
    }
    CU(cudaMemcpyAsync(b->d_io, b->h_io, sizeof(int32_t) * 2 * b->rc.max_batch,
                       cudaMemcpyHostToDevice, b->stream));
    if (replay) {
        CU(cudaGraphLaunch(b->exec, b->stream));
        b->dirty = 1;
    } else {
        fkv_seq_id ids[64];
        for (int32_t i = 0; i < n; i++)
            ids[i] = b->seq[slots[i]];
        fkv_batch bt = {n, 0, ids, NULL};
        b->w_n = 0; /* a failed step warms nothing up */
        if (decode_step(b, &bt, err, errlen))
            return -1;
        b->w_n = n;
        for (int32_t i = 0; i < n; i++) {
            b->w_slots[i] = slots[i];
            b->w_ids[i] = ids[i];
        }
    }
    CU(cudaMemcpyAsync(b->h_logits, b->logits,
                       sizeof(float) * (size_t)n * c->vocab,
                       cudaMemcpyDeviceToHost, b->stream));
    /* The sampler needs the logits: the one wait of a step (it also keeps
     * h_io unchanged until the copy above has read it). */
    CU(cudaStreamSynchronize(b->stream));
    memcpy(logits, b->h_logits, sizeof(float) * (size_t)n * c->vocab);
    for (int32_t i = 0; i < n; i++)
        b->pos[slots[i]]++;
    return 0;
}

static int cuda_stats(llama_backend *b, fkv_stats *st, char *err,
                      size_t errlen)
{
    if (!b->cache) {
        llama_errf(err, errlen, "cuda backend: no cache open");
        return -1;
    }
    if (settle(b, err, errlen))
        return -1;
    st->struct_size = sizeof *st;
    FKV(fkv_get_stats(b->cache, st), "fkv_get_stats");
    return 0;
}

static uint64_t cuda_weight_bytes(llama_backend *b)
{
    return b->wbytes;
}

extern "C" const llama_backend_ops llama_cuda_backend = {
    "cuda",
    cuda_create,
    cuda_destroy,
    cuda_cache_open,
    cuda_slot_reset,
    cuda_prefill,
    cuda_replay_prefill,
    cuda_fill_random,
    cuda_decode,
    cuda_stats,
    cuda_weight_bytes,
};
