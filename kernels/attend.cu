// Decode attention over the pages a query attends (docs/design.md s.2),
// flash-decoding style, in two launches:
//  split    grid (splits, kv_heads * group chunks, n), 4 warps: one KV head of
//           one sequence, the query heads of one chunk of its GQA group, one
//           contiguous range of its attended pages; online softmax in float;
//           writes each query head's partial (max, sum, unnormalised
//           accumulator);
//  combine  grid (q_heads, n), D threads: merges the partials into out.
// With one split the split kernel normalises and writes out itself, and the
// combine launch is skipped.
// Fused (fkv_dev_state.fused_combine, behind FKV_CUDA_EXPERIMENTAL): one
// launch. Each split block writes its partials, then takes a ticket from
// the counter of its (sequence, KV head, group chunk); the block that
// draws the last ticket merges all splits' partials into out and puts the
// counter back to 0 (docs/design.md s.6, "Fused combine"). Its splits are
// ranges of rows (parts of pages allowed), not of whole pages.
//
// Memory is the bound, so the split kernel reads each K/V byte once and
// keeps many bytes in flight:
//  - the query heads of a GQA group share the block that reads their KV
//    head. f16/bf16 use tensor cores (mma.sync), up to 8 heads per block, so
//    the arithmetic stays far below the memory time at any group size; f32
//    (no exact tensor-core path) uses CUDA cores, up to 4 heads per block;
//  - each warp streams its rows of K and V through its own part of a
//    cp.async ring in shared memory, kStages steps deep, so loads stay in
//    flight while it computes (the bytes in flight do not cost registers);
//    copies are whole 128-byte lines. The warp syncs by itself (__syncwarp);
//    block barriers are only for the page table and the final merge.
//
// The attended pages of a (sequence, KV head) form a virtual list in token
// order: sink pages, selected pages, window pages, partial page (DENSE: all
// pages in order). Every page of it has P rows except the partial page,
// which is always last. A block turns the pages of its range into unit
// addresses (a table in shared memory, 128 pages at a time); its warps then
// take steps of kStep consecutive rows of the table in turn.
//
// Softmax runs in base 2 (scale * log2(e) folded into the logits), so the
// maxima in part_ml are in log2 units (read only by combine below).
//
// Fetch (template flag; fkv_launch_attend's fetch: FREEKV's and SYNC's
// fkv_attend, which launch no correction gather): a selected page the
// correction plan listed (st.fetch_src at its position in the set, just
// written by the selection's tail or the plan launch) is read from its pool
// unit (mapped host memory) instead of its slot, and
// every lane writes the 16-byte pieces it copied into the ring back to the
// slot, so the unit crosses PCIe once and the other splits' HBM reads
// overlap its latency. Only the first group chunk's block writes (the
// others read the same unit from the pool too).
//
// Assumes unit addresses are 16-byte aligned (rows then are: D * sizeof(T)
// is a multiple of 128 bytes). q and out need only element alignment.
#include <math_constants.h>

#include "common.cuh"
#include "launch.cuh"

namespace {

using fkv::kWarp;
using fkv::cp_async16;
using fkv::cp_async_commit;
using fkv::cp_async_wait;
using fkv::region_table;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr int kTablePages = kThreads;  // one page address per thread per refill
constexpr int kStages = 3;             // cp.async ring depth, in steps
// Shared memory per SM assumed at compile time, for __launch_bounds__'
// register budget only; the split grid is sized from the device's own
// figures (fkv_dev_limits) at run time.
constexpr int kSmemPerSmHint = 220 * 1024;
constexpr float kLog2e = 1.4426950408889634f;

// ---- small device helpers ---------------------------------------------------

__device__ __forceinline__ uint4 lds16(uint32_t addr) {
    uint4 w;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w) : "r"(addr));
    return w;
}
__device__ __forceinline__ void stg16(unsigned char *dst, const uint4 &v) {
    *reinterpret_cast<uint4 *>(dst) = v;
}
__device__ __forceinline__ uint32_t word(const uint4 &v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Reference for exp2(x - m) where m may be -inf (nothing seen yet): 0 then,
// not NaN.
__device__ __forceinline__ float ref_max(float m) { return m == -CUDART_INF_F ? 0.f : m; }

// Page (in pg) and row within it of table row `base + off`, given base's
// (pg, in); off is small, so no division.
__device__ __forceinline__ int32_t row_in(int32_t &pg, int32_t in, int32_t off, int32_t P) {
    in += off;
    while (in >= P) { in -= P; ++pg; }
    return in;
}
__device__ __forceinline__ const unsigned char *
row_at(const unsigned char *const *table, int32_t pg, int32_t in, int32_t off, int32_t P,
       int32_t row_bytes) {
    in = row_in(pg, in, off, P);
    return table[pg] + (uint64_t)in * row_bytes;
}

// ---- CUDA-core engine (f32) -----------------------------------------------
//
// A row takes kLanes lanes, 16 bytes each, so one load instruction of a warp
// reads whole rows. Each lane keeps q and the accumulator of its channels for
// each of the block's GB heads; logits are reduced over the row's lanes.

// 16 bytes of T as floats (exact conversions).
template <typename T> __device__ __forceinline__ void unpack(const uint4 &v, float *f);
template <> __device__ __forceinline__ void unpack<float>(const uint4 &v, float *f) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
}

template <typename T, int D, int GB> struct simt_engine {
    static constexpr int kHeads = GB;
    static constexpr int kVec = 16 / sizeof(T);                         // elements per load
    static constexpr int kRowVecs = D / kVec;                           // loads per row
    static constexpr int kLanes = kRowVecs < kWarp ? kRowVecs : kWarp;  // lanes per row
    static constexpr int kRows = kWarp / kLanes;                        // rows per warp load
    static constexpr int kLoads = kRowVecs / kLanes;                    // loads per lane per row
    static constexpr int kChans = kLoads * kVec;                        // channels per lane
    static constexpr int kUnroll = 4 / kLoads;  // rows per lane per step: 64 B of K, 64 of V
    static constexpr int kStep = kRows * kUnroll;
    static constexpr int kSlots = kUnroll * kLoads * 2;  // ring slots per lane and step
    // Register budget: 128 (4 blocks) unless q and the accumulators need more.
    static constexpr int kMaxBlocks = GB * kChans > 24 ? 3 : 4;
    static_assert(kRowVecs % kLanes == 0 && kUnroll >= 1, "unsupported shape");

    int sub, sl;  // row of a warp load, channel group within the row
    float qf[GB][kChans], acc[GB][kChans], m[GB], l[GB];

    // Channel of element e of load j: load j of a row's lanes covers
    // 16 * kLanes contiguous bytes.
    __device__ __forceinline__ int chan(int j, int e) const { return (sl + j * kLanes) * kVec + e; }

    __device__ __forceinline__ simt_engine(int lane) : sub(lane / kLanes), sl(lane % kLanes) {}

    // q: the first head's row; scaled for base-2 softmax.
    __device__ __forceinline__ void load_q(const T *q, int nq, float qscale) {
#pragma unroll
        for (int k = 0; k < GB; k++) {
#pragma unroll
            for (int j = 0; j < kLoads; j++)
#pragma unroll
                for (int e = 0; e < kVec; e++) {
                    qf[k][j * kVec + e] = k < nq ? fkv::to_f(q[k * D + chan(j, e)]) * qscale : 0.f;
                    acc[k][j * kVec + e] = 0.f;
                }
            m[k] = -CUDART_INF_F;  // the lanes of a row group agree on m and l
            l[k] = 0.f;
        }
    }

    // The pieces this lane moves in a step (issue copies them, write_back
    // stores them): for each, f(ok, off, col, k_slot, v_slot) with row
    // `base + off` of the table (ok: inside `rows`), its byte column and the
    // K and V ring slots (slot i of lane p at stage + (i * kThreads + p) * 16;
    // stage is the warp's part of a ring stage). A lane uses its own slots.
    template <typename F>
    __device__ __forceinline__ void pieces(uint32_t stage, int lane, int32_t rows, int32_t base,
                                           F &&f) const {
        auto slot = [&](int i) { return stage + (uint32_t)(i * kThreads + lane) * 16; };
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            const int32_t off = u * kRows + sub;
#pragma unroll
            for (int j = 0; j < kLoads; j++)
                f(base + off < rows, off, (sl + j * kLanes) * 16, slot((u * kLoads + j) * 2),
                  slot((u * kLoads + j) * 2 + 1));
        }
    }

    __device__ __forceinline__ void compute(uint32_t stage, int lane, int32_t rows, int32_t base) {
        auto slot = [&](int i) { return stage + (uint32_t)(i * kThreads + lane) * 16; };
        // Logits: partial dots, then a butterfly over the row's lanes.
        float s[GB][kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            float kf[kChans];
#pragma unroll
            for (int j = 0; j < kLoads; j++) unpack<T>(lds16(slot((u * kLoads + j) * 2)), kf + j * kVec);
#pragma unroll
            for (int k = 0; k < GB; k++) {
                float d = 0.f;
#pragma unroll
                for (int c = 0; c < kChans; c++) d = fmaf(qf[k][c], kf[c], d);
                s[k][u] = d;
            }
        }
#pragma unroll
        for (int o = kLanes / 2; o > 0; o >>= 1)
#pragma unroll
            for (int k = 0; k < GB; k++)
#pragma unroll
                for (int u = 0; u < kUnroll; u++) s[k][u] += __shfl_xor_sync(0xffffffffu, s[k][u], o);
        // Online softmax, one rescale per step and head; s becomes p.
#pragma unroll
        for (int k = 0; k < GB; k++) {
            float mx = m[k];
#pragma unroll
            for (int u = 0; u < kUnroll; u++) {
                if (base + u * kRows + sub >= rows) s[k][u] = -CUDART_INF_F;  // zero-filled row
                mx = fmaxf(mx, s[k][u]);
            }
            const float mr = ref_max(mx), corr = exp2f(m[k] - mr);
            l[k] *= corr;
#pragma unroll
            for (int c = 0; c < kChans; c++) acc[k][c] *= corr;
#pragma unroll
            for (int u = 0; u < kUnroll; u++) {
                s[k][u] = exp2f(s[k][u] - mr);
                l[k] += s[k][u];
            }
            m[k] = mx;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            float vf[kChans];
#pragma unroll
            for (int j = 0; j < kLoads; j++) unpack<T>(lds16(slot((u * kLoads + j) * 2 + 1)), vf + j * kVec);
#pragma unroll
            for (int k = 0; k < GB; k++)
#pragma unroll
                for (int c = 0; c < kChans; c++) acc[k][c] = fmaf(s[k][u], vf[c], acc[k][c]);
        }
    }

    // Merges the warp's row groups (lanes kLanes apart hold the same
    // channels) and stores the warp's result: acc_out[head][D], ml_out[head][2].
    __device__ __forceinline__ void finish(float *acc_out, float *ml_out, int lane) {
#pragma unroll
        for (int o = kLanes; o < kWarp; o <<= 1)
#pragma unroll
            for (int k = 0; k < GB; k++) {
                const float mo = __shfl_xor_sync(0xffffffffu, m[k], o);
                const float lo = __shfl_xor_sync(0xffffffffu, l[k], o);
                const float mx = fmaxf(m[k], mo), mr = ref_max(mx);
                const float a = exp2f(m[k] - mr), b = exp2f(mo - mr);
                l[k] = l[k] * a + lo * b;
#pragma unroll
                for (int c = 0; c < kChans; c++)
                    acc[k][c] = acc[k][c] * a + __shfl_xor_sync(0xffffffffu, acc[k][c], o) * b;
                m[k] = mx;
            }
        if (lane < kLanes) {
#pragma unroll
            for (int k = 0; k < GB; k++)
#pragma unroll
                for (int j = 0; j < kLoads; j++)
#pragma unroll
                    for (int e = 0; e < kVec; e++) acc_out[k * D + chan(j, e)] = acc[k][j * kVec + e];
        }
        if (lane == 0) {
#pragma unroll
            for (int k = 0; k < GB; k++) {
                ml_out[k * 2] = m[k];
                ml_out[k * 2 + 1] = l[k];
            }
        }
    }
};

// ---- tensor-core engine (f16, bf16) -----------------------------------------
//
// Per 8-token tile, with gid = lane / 4 and tid = lane % 4 (the mma fragment
// coordinates), heads on the 8-wide side:
//   S  [16 x 8 tokens]  = Q [16 x D] . K^T         m16n8k16 over D
//                         (rows 0-7 the block's heads, 8-15 zero)
//   O^T [D x 8 heads]  += V^T [D x 8 tokens] . P^T  m16n8k8, D/16 row tiles
// S's accumulator (head gid, tokens 2tid, 2tid+1) is exactly P^T's B
// fragment, so P never leaves registers. The dot products do not care how D
// is ordered, so each lane's fragments are whole 16-byte pieces of rows:
//   K row gid:           chunks 4i + tid   (i < D/32), fed to the QK mma;
//   V rows 2tid, 2tid+1: chunks 8h + gid   (h < D/64), paired by byte
//                        permutes into V^T fragments.
// Q takes K's chunk order; output channel of accumulator row r of row tile
// mt is 8 * (8 * (mt / 4) + r % 8) + 2 * (mt % 4) + r / 8.
template <typename T> struct mma_ops;
template <> struct mma_ops<__nv_bfloat16> {
    static __device__ __forceinline__ void k16(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0,
                                               uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ void k8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
        asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5}, {%6}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(b0));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
               (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16;
    }
    static __device__ __forceinline__ unsigned short bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
};
template <> struct mma_ops<__half> {
    static __device__ __forceinline__ void k16(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0,
                                               uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ void k8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
        asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5}, {%6}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(b0));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        return (uint32_t)__half_as_ushort(__float2half_rn(lo)) |
               (uint32_t)__half_as_ushort(__float2half_rn(hi)) << 16;
    }
    static __device__ __forceinline__ unsigned short bits(__half x) { return __half_as_ushort(x); }
};

template <typename T, int D> struct mma_engine {
    using ops = mma_ops<T>;
    static constexpr int kHeads = 8;
    static constexpr int kKChunks = D / 32;  // K pieces per lane per tile
    static constexpr int kVChunks = D / 64;  // V pieces per lane per row, 2 rows per tile
    static constexpr int kTiles = D == 64 ? 2 : 1;  // 8-token tiles per step: >= 128 B per lane
    static constexpr int kStep = 8 * kTiles;
    static constexpr int kTileSlots = kKChunks + 2 * kVChunks;
    static constexpr int kSlots = kTiles * kTileSlots;
    static constexpr int kMTiles = D / 16;  // QK k-steps, PV row tiles
    // Register budget: the accumulators grow with D (about 96, 140 and 190
    // registers: 4, 3 and 2 blocks of 128 threads).
    static constexpr int kMaxBlocks = D == 64 ? 4 : D == 128 ? 3 : 2;

    int gid, tid;
    float qscale;
    uint32_t qa[kKChunks][4];    // q of head gid, K's chunk order, packed pairs
    float o[kMTiles][4];         // O^T accumulators
    float m, l;                  // head gid (l: this lane's tokens only)

    __device__ __forceinline__ mma_engine(int lane) : gid(lane / 4), tid(lane % 4) {}

    __device__ __forceinline__ void load_q(const T *q, int nq, float qs) {
        qscale = qs;  // applied to S, so q stays exact
#pragma unroll
        for (int i = 0; i < kKChunks; i++) {
            const T *src = q + gid * D + (4 * i + tid) * 8;
#pragma unroll
            for (int w = 0; w < 4; w++)
                qa[i][w] = gid < nq ? (uint32_t)ops::bits(src[2 * w]) |
                                          ((uint32_t)ops::bits(src[2 * w + 1]) << 16)
                                    : 0u;
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; mt++) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;
        m = -CUDART_INF_F;
        l = 0.f;
    }
    // A tile's K (and its V) is kept row-major in kKChunks slots: copy
    // instruction j moves flat pieces 32j..32j+31 (512 contiguous bytes of
    // whole rows) into slot j, and the fragments gather from there. Within
    // each 128-byte group the pieces are XOR-permuted so that the gathers
    // below are free of bank conflicts (the XOR was found by exhaustive
    // search for D = 64, 128, 256); a permutation within the group keeps the
    // copy coalesced (scattering a line over several groups splits it into
    // 16-byte L2 requests: 4.5 times the requests, 20% less bandwidth).
    static constexpr int kRowChunks = D / 8;  // 16-byte pieces per row
    static __device__ __forceinline__ uint32_t piece(uint32_t stage, int s, int f) {
        const int j = f >> 5, pos = f & 31, k = pos >> 3;
        const int sw = (((j >> 1) ^ (k >> 1)) & 1) << 1 | ((j ^ (j >> 2) ^ k ^ (k >> 1)) & 1) << 2;
        return stage + (uint32_t)((s + j) * kThreads + (pos ^ sw)) * 16;
    }

    // The pieces this lane moves in a step (issue copies them, write_back
    // stores them): for each, f(ok, off, col, k_slot, v_slot) as in
    // simt_engine::pieces, for the K piece and the V piece of flat piece f
    // of tile tl (stage: the warp's part of a ring stage).
    template <typename F>
    __device__ __forceinline__ void pieces(uint32_t stage, int lane, int32_t rows, int32_t base,
                                           F &&fn) const {
#pragma unroll
        for (int tl = 0; tl < kTiles; tl++) {
            const int s0 = tl * kTileSlots;
#pragma unroll
            for (int j = 0; j < kKChunks; j++) {
                const int f = 32 * j + lane, r = f / kRowChunks, c = f % kRowChunks;
                fn(base + tl * 8 + r < rows, tl * 8 + r, c * 16, piece(stage, s0, f),
                   piece(stage, s0 + kKChunks, f));
            }
        }
    }

    __device__ __forceinline__ void compute(uint32_t stage, int lane, int32_t rows, int32_t base) {
#pragma unroll
        for (int tl = 0; tl < kTiles; tl++) {
            const int s0 = tl * kTileSlots;
            float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int i = 0; i < kKChunks; i++) {
                // K row gid, piece 4i + tid: d pairs for k-steps 2i and 2i+1.
                const uint4 kc = lds16(piece(stage, s0, gid * kRowChunks + 4 * i + tid));
                ops::k16(s, qa[i][0], qa[i][1], kc.x, kc.y);
                ops::k16(s, qa[i][2], qa[i][3], kc.z, kc.w);
            }
            // Tokens 2tid, 2tid+1 of head gid; rows past the end were zero-filled.
            const int32_t r0 = base + tl * 8 + 2 * tid;
            const float s0v = r0 < rows ? s[0] * qscale : -CUDART_INF_F;
            const float s1v = r0 + 1 < rows ? s[1] * qscale : -CUDART_INF_F;
            float mx = fmaxf(s0v, s1v);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, m);
            const float mr = ref_max(mx), corr = exp2f(m - mr);
            const float p0 = exp2f(s0v - mr), p1 = exp2f(s1v - mr);
            l = l * corr + p0 + p1;
            m = mx;
            // O^T columns are heads 2tid, 2tid+1: their lanes' rescale factors.
            const float ca = __shfl_sync(0xffffffffu, corr, 8 * tid);
            const float cb = __shfl_sync(0xffffffffu, corr, 8 * tid + 4);
            const uint32_t pb = ops::pack(p0, p1);
#pragma unroll
            for (int h = 0; h < kVChunks; h++) {
                // V rows 2tid and 2tid+1, piece 8h + gid.
                const int f = 2 * tid * kRowChunks + 8 * h + gid;
                const uint4 x = lds16(piece(stage, s0 + kKChunks, f));
                const uint4 y = lds16(piece(stage, s0 + kKChunks, f + kRowChunks));
#pragma unroll
                for (int w = 0; w < 4; w++) {
                    float(&c)[4] = o[4 * h + w];
                    c[0] *= ca; c[1] *= cb; c[2] *= ca; c[3] *= cb;
                    const uint32_t xa = word(x, w), ya = word(y, w);
                    ops::k8(c, __byte_perm(xa, ya, 0x5410), __byte_perm(xa, ya, 0x7632), pb);
                }
            }
        }
        (void)lane;
    }

    __device__ __forceinline__ void finish(float *acc_out, float *ml_out, int lane) {
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
#pragma unroll
        for (int mt = 0; mt < kMTiles; mt++) {
            const int ch = 8 * (8 * (mt / 4) + gid) + 2 * (mt % 4);
            acc_out[(2 * tid) * D + ch] = o[mt][0];
            acc_out[(2 * tid + 1) * D + ch] = o[mt][1];
            acc_out[(2 * tid) * D + ch + 1] = o[mt][2];
            acc_out[(2 * tid + 1) * D + ch + 1] = o[mt][3];
        }
        if (tid == 0) {
            ml_out[gid * 2] = m;
            ml_out[gid * 2 + 1] = l;
        }
        (void)lane;
    }
};

// ---- engine choice ------------------------------------------------------------

// Query heads per block, at most, for a dtype.
inline int32_t heads_per_block_max(int32_t dtype) { return dtype == FKV_DTYPE_F32 ? 4 : 8; }

// ceil(G / max) blocks per KV head, each of ceil(G / chunks) query heads.
inline int32_t group_chunks(int32_t group, int32_t dtype) {
    const int32_t hmax = heads_per_block_max(dtype);
    return group > 1 ? (group + hmax - 1) / hmax : 1;
}

template <class E> __host__ __device__ constexpr size_t ring_bytes() {
    return (size_t)kStages * E::kSlots * kThreads * 16;
}
// The ring, then the page table's read addresses (and with Fetch its
// write-back addresses).
template <class E, bool Fetch = false> __host__ __device__ constexpr size_t smem_bytes() {
    return ring_bytes<E>() + (Fetch ? 2 : 1) * kTablePages * sizeof(void *);
}
// Blocks of this engine an SM holds: what shared memory allows, at most the
// engine's register budget (E::kMaxBlocks: 65536 / (128 threads * regs)).
// The compile-time figure (Hopper's shared memory) is the register hint of
// __launch_bounds__; blocks_on() is the same for a given device.
template <class E> __host__ __device__ constexpr int blocks_per_sm() {
    return kSmemPerSmHint / smem_bytes<E>() < 1 ? 1
           : kSmemPerSmHint / smem_bytes<E>() > E::kMaxBlocks ? E::kMaxBlocks
                                                              : (int)(kSmemPerSmHint / smem_bytes<E>());
}
template <class E> int blocks_on(const fkv_dev_limits &lim) {
    const long long per_block = (long long)smem_bytes<E>() + (lim.smem_reserved_per_block > 0
                                                                  ? lim.smem_reserved_per_block
                                                                  : 0);
    const long long fit = lim.smem_per_sm > 0 ? lim.smem_per_sm / per_block : 1;
    return fit < 1 ? 1 : fit > E::kMaxBlocks ? E::kMaxBlocks : (int)fit;
}

// Copies the pieces of a step (walked by the engine's pieces) from rows
// base.. of table into the lane's ring slots. Rows past `rows` copy 0 bytes
// (cp.async zero-fills) from table[0], an address that is always valid.
template <typename T, int D, class E>
__device__ __forceinline__ void issue(const E &e, uint32_t stage, int lane,
                                      const unsigned char *const *table, int32_t rows, int32_t P,
                                      uint64_t v_off, int32_t base) {
    const int32_t pg0 = (uint32_t)base / (uint32_t)P, in0 = base - pg0 * P;
    e.pieces(stage, lane, rows, base, [&](bool ok, int32_t off, int col, uint32_t ks, uint32_t vs) {
        const unsigned char *row =
            ok ? row_at(table, pg0, in0, off, P, D * sizeof(T)) + col : table[0];
        cp_async16(ks, row, ok ? 16 : 0);
        cp_async16(vs, ok ? row + v_off : row, ok ? 16 : 0);
    });
}

// Fetch: stores the pieces this lane copied in a step (by issue, walked by
// the engine's pieces) of rows whose page has a write-back address in dst
// (0: none). After the lane's copies of the step have landed, before the
// stage is refilled.
template <typename T, int D, class E>
__device__ __forceinline__ void write_back(const E &e, uint32_t stage, int lane,
                                           unsigned char *const *dst, int32_t rows, int32_t P,
                                           uint64_t v_off, int32_t base) {
    const int32_t pg0 = (uint32_t)base / (uint32_t)P, in0 = base - pg0 * P;
    e.pieces(stage, lane, rows, base, [&](bool ok, int32_t off, int col, uint32_t ks, uint32_t vs) {
        if (!ok) return;
        int32_t pg = pg0;
        const int32_t in = row_in(pg, in0, off, P);
        unsigned char *row = dst[pg];
        if (!row) return;
        unsigned char *to = row + (uint64_t)in * D * sizeof(T) + col;
        stg16(to, lds16(ks));
        stg16(to + v_off, lds16(vs));
    });
}

// ---- kernels ------------------------------------------------------------------

// The device address of virtual page v of KV head h (see the top comment).
__device__ __forceinline__ const unsigned char *
virtual_unit(const fkv_dev_geometry &g, const fkv::layer_view &lv,
             const fkv::page_ranges &r, int32_t h, int32_t nsel, int32_t v) {
    if (g.policy == FKV_POLICY_DENSE) return lv.store_unit(h, v);
    if (v < r.sink_end) return lv.resident_unit(h, v);
    v -= r.sink_end;
    if (v < nsel) {
        if (g.store) return lv.store_unit(h, lv.k_array(g.off_active_pages, h)[v]);
        return lv.slot_unit(h, lv.k_array(g.off_active_slot, h)[v]);
    }
    // Window pages, then the partial page (page `sealed`).
    return lv.resident_unit(h, r.window_first + (v - nsel));
}

// The fused kernel's ending, in the block that drew the last ticket: merges
// the nq heads' partials of all splits (including its own, read back) into
// out. smem: the ring's space, free again. Partials are read with ld.cg
// (L2, never a stale L1 line); the ticket's fences order them.
template <typename T, int D, int H>
__device__ __forceinline__ void combine_in_block(const fkv_dev_geometry &g, const fkv_dev_state &st,
                                                 int32_t slot, int32_t row, int32_t qh0,
                                                 int32_t nq, int32_t splits, float *smem,
                                                 T *__restrict__ out) {
    constexpr int kC = D / kWarp;  // channels per lane, contiguous
    static_assert(kC % 2 == 0 && (kC == 2 || kC % 4 == 0), "channel split");
    float *c_acc = smem;                     // [kWarps][H][D]
    float *c_m = c_acc + kWarps * H * D;     // [H] reference maxima
    float *c_l = c_m + H;                    // [H] sums
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const uint64_t part0 = ((uint64_t)slot * g.q_heads + qh0) * st.max_splits;
    const float2 *ml = reinterpret_cast<const float2 *>(st.part_ml);

    // Per head: the largest max, then the sum of the rescaled sums.
    for (int k = warp; k < nq; k += kWarps) {
        const float2 *mk = ml + part0 + (uint64_t)k * st.max_splits;
        float mx = -CUDART_INF_F;
        for (int32_t s = lane; s < splits; s += kWarp) mx = fmaxf(mx, __ldcg(mk + s).x);
        const float mr = ref_max(fkv::warp_max(mx));
        float sum = 0.f;
        for (int32_t s = lane; s < splits; s += kWarp) {
            const float2 p = __ldcg(mk + s);
            sum = fmaf(exp2f(p.x - mr), p.y, sum);
        }
        sum = fkv::warp_sum(sum);
        if (lane == 0) {
            c_m[k] = mr;
            c_l[k] = sum;
        }
    }
    __syncthreads();

    // Accumulators: warp w takes splits w, w + kWarps, ...; a lane holds kC
    // channels of each head, so the loads of all heads are in flight at once.
    float a[H][kC];
#pragma unroll
    for (int k = 0; k < H; k++)
#pragma unroll
        for (int c = 0; c < kC; c++) a[k][c] = 0.f;
    for (int32_t s = warp; s < splits; s += kWarps) {
#pragma unroll
        for (int k = 0; k < H; k++) {
            if (k >= nq) continue;
            const uint64_t part = part0 + (uint64_t)k * st.max_splits + s;
            const float w = exp2f(__ldcg(ml + part).x - c_m[k]);
            const float *src = st.part_acc + part * D + lane * kC;
            float v[kC];
            if constexpr (kC == 2) {
                const float2 x = __ldcg(reinterpret_cast<const float2 *>(src));
                v[0] = x.x; v[1] = x.y;
            } else {
#pragma unroll
                for (int c = 0; c < kC; c += 4) {
                    const float4 x = __ldcg(reinterpret_cast<const float4 *>(src + c));
                    v[c] = x.x; v[c + 1] = x.y; v[c + 2] = x.z; v[c + 3] = x.w;
                }
            }
#pragma unroll
            for (int c = 0; c < kC; c++) a[k][c] = fmaf(w, v[c], a[k][c]);
        }
    }
#pragma unroll
    for (int k = 0; k < H; k++)
#pragma unroll
        for (int c = 0; c < kC; c++) c_acc[(warp * H + k) * D + lane * kC + c] = a[k][c];
    __syncthreads();
    for (int x = threadIdx.x; x < nq * D; x += kThreads) {
        const int k = x / D, d = x % D;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; w++) v += c_acc[(w * H + k) * D + d];
        out[((uint64_t)row * g.q_heads + qh0 + k) * D + d] = fkv::from_f<T>(v / c_l[k]);
    }
}

// Fused: partials, then the ticket, then (last block only) the combine.
// Unfused (the split launch of the two-launch path): partials only.
// Fetch: the correction's listed units read from the pool (top comment).
template <typename T, int D, class E, bool Fused, bool Fetch>
__global__ void __launch_bounds__(kThreads, blocks_per_sm<E>())
split_kernel(const fkv_dev_geometry g, const fkv_dev_state st, const fkv_dev_batch b,
             int32_t layer, const T *__restrict__ q, T *__restrict__ out,
             int32_t pps, int32_t splits, int32_t chunks, const region_table regions) {
    constexpr int H = E::kHeads;
    // Ring [stage][slot][thread] of 16-byte pieces (consecutive lanes,
    // consecutive banks), then the page table. After the rows, the ring's
    // space holds the warps' results for the block merge.
    extern __shared__ uint4 smem[];
    const unsigned char **table =
        reinterpret_cast<const unsigned char **>(smem + kStages * E::kSlots * kThreads);
    unsigned char **dst_table =  // Fetch only
        reinterpret_cast<unsigned char **>(smem + kStages * E::kSlots * kThreads) + kTablePages;
    float *w_acc = reinterpret_cast<float *>(smem);  // [kWarps][H][D]
    float *w_ml = w_acc + kWarps * H * D;            // [kWarps][H][2]
    static_assert((kWarps * H * D + kWarps * H * 2) * sizeof(float) <= ring_bytes<E>(), "merge space");
    static_assert(kTablePages * sizeof(void *) >= sizeof(unsigned int), "ticket flag space");

    const int32_t split = blockIdx.x, i = blockIdx.z;
    const int32_t h = blockIdx.y / chunks;
    const int32_t per_block = (g.group + chunks - 1) / chunks;
    const int32_t qh0 = h * g.group + (blockIdx.y % chunks) * per_block;
    const int32_t nq = min(per_block, (h + 1) * g.group - qh0);  // heads of this block
    const int32_t slot = b.slot[i];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

    const fkv::layer_view lv = Fused ? fkv::layer_view(g, regions.base[i])
                                     : fkv::layer_view(g, st, slot, layer);
    const fkv::page_ranges r(g, fkv::seq_len(g, st, slot, layer));
    const bool dense = g.policy == FKV_POLICY_DENSE;
    int32_t nsel = 0;
    if (!dense) {
        nsel = lv.h_array(g.off_active_count)[h];  // -1: no selection yet
        nsel = min(max(nsel, 0), g.select_pages);
    }
    // Fetch: whether this head's plan listed units, and the pool unit of
    // each selected position (0: its slot holds it); the head's first group
    // chunk writes the slots.
    int32_t listed = 0;
    const uint64_t *fetch_src = nullptr;
    if constexpr (Fetch) {
        if (!dense && !g.store) {
            const uint64_t head = (uint64_t)slot * g.kv_heads + h;
            listed = st.work_count[head];
            fetch_src = st.fetch_src + head * g.select_pages;
        }
    }
    const bool writer = blockIdx.y % chunks == 0;
    const int32_t has_partial = r.partial > 0;
    const int32_t n_virtual = dense ? r.sealed + has_partial
                                    : r.sink_end + nsel + (r.sealed - r.window_first) + has_partial;
    // Virtual rows attended: all but the partial page's empty tail and the
    // b.cut[i] last tokens (fkv_attend_tokens' causal limit; those lie in
    // the window and partial page, in token order, at the virtual end).
    const int32_t total_rows = n_virtual * g.page - (has_partial ? g.page - r.partial : 0) - b.cut[i];
    // Unfused: pps whole pages per split. Fused: pps rows per split, so that
    // a short list still fills the GPU; rows [row_begin, row_end), in the
    // pages [v_begin, v_end). The last split takes whatever lies beyond the
    // others, so that a bound that is too small costs speed, never tokens.
    int32_t v_begin, v_end, row_begin = 0, row_end = 0;
    if constexpr (Fused) {
        const int32_t all = max(total_rows, 0);
        row_begin = min(split * pps, all);
        row_end = split == splits - 1 ? all : min(row_begin + pps, all);
        v_begin = row_begin / g.page;
        v_end = row_end > row_begin ? (row_end + g.page - 1) / g.page : v_begin;
    } else {
        v_begin = split * pps;
        v_end = split == splits - 1 ? n_virtual : min(v_begin + pps, n_virtual);
    }

    E e(lane);
    e.load_q(q + ((uint64_t)b.row[i] * g.q_heads + qh0) * D, nq, g.scale * kLog2e);

    const int32_t P = g.page;
    const uint64_t v_off = (uint64_t)P * D * sizeof(T);  // V rows follow the K rows
    // This warp's part of ring stage s.
    const uint32_t ring = (uint32_t)__cvta_generic_to_shared(smem) + warp * kWarp * 16;
    auto stage = [&](int s) { return ring + (uint32_t)(s * E::kSlots * kThreads * 16); };

    for (int32_t cb = v_begin; cb < v_end; cb += kTablePages) {
        const int32_t ce = min(cb + kTablePages, v_end);
        if (cb != v_begin) __syncthreads();  // the last table's readers are done
        unsigned char *dst = nullptr;
        if ((int32_t)threadIdx.x < ce - cb) {
            const int32_t v = cb + threadIdx.x;
            const unsigned char *u = virtual_unit(g, lv, r, h, nsel, v);
            if constexpr (Fetch) {
                // Only selected pages can be listed.
                const int32_t sel = v - r.sink_end;
                const unsigned char *src =
                    listed > 0 && sel >= 0 && sel < nsel
                        ? reinterpret_cast<const unsigned char *>(fetch_src[sel])
                        : nullptr;
                if (src) {
                    if (writer) dst = const_cast<unsigned char *>(u);
                    u = src;
                }
                dst_table[threadIdx.x] = dst;
            }
            table[threadIdx.x] = u;
        }
        bool writes = false;
        if constexpr (Fetch) writes = __syncthreads_or(dst != nullptr);
        else __syncthreads();
        int32_t rows = min((ce - cb) * P, total_rows - cb * P);
        int32_t lo = 0;  // first row of the chunk this split attends
        if constexpr (Fused) {
            rows = min(rows, row_end - cb * P);
            if (cb == v_begin) lo = row_begin - cb * P;
        }
        if (rows < 0) rows = 0;
        // Warp w takes steps w, w + kWarps, ...: nk of them.
        int32_t steps = (rows + E::kStep - 1) / E::kStep;
        if constexpr (Fused) steps = rows > lo ? (rows - lo + E::kStep - 1) / E::kStep : 0;
        const int32_t nk = steps > warp ? (steps - warp + kWarps - 1) / kWarps : 0;
        auto base_of = [&](int32_t k) { return lo + (warp + k * kWarps) * E::kStep; };

#pragma unroll
        for (int k = 0; k < kStages - 1; k++) {
            if (k < nk) issue<T, D>(e, stage(k), lane, table, rows, P, v_off, base_of(k));
            cp_async_commit();  // empty groups keep the count uniform
        }
        for (int32_t k = 0; k < nk; k++) {
            const int32_t kn = k + kStages - 1;
            __syncwarp();  // the warp is done reading the stage it refills
            if (kn < nk) issue<T, D>(e, stage(kn % kStages), lane, table, rows, P, v_off, base_of(kn));
            cp_async_commit();
            cp_async_wait<kStages - 1>();  // this lane's copies of step k have landed
            if constexpr (Fetch)
                if (writes) write_back<T, D>(e, stage(k % kStages), lane, dst_table, rows, P, v_off, base_of(k));
            __syncwarp();                  // and so have the other lanes'
            e.compute(stage(k % kStages), lane, rows, base_of(k));
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the ring
    e.finish(w_acc + warp * H * D, w_ml + warp * H * 2, lane);
    __syncthreads();

    for (int x = threadIdx.x; x < nq * D; x += kThreads) {
        const int k = x / D, d = x % D;
        float mx = -CUDART_INF_F;
#pragma unroll
        for (int w = 0; w < kWarps; w++) mx = fmaxf(mx, w_ml[(w * H + k) * 2]);
        const float mr = ref_max(mx);
        float sum = 0.f, a = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; w++) {
            const float f = exp2f(w_ml[(w * H + k) * 2] - mr);
            sum = fmaf(f, w_ml[(w * H + k) * 2 + 1], sum);
            a = fmaf(f, w_acc[(w * H + k) * D + d], a);
        }
        const int32_t qh = qh0 + k;
        if (splits == 1) {
            out[((uint64_t)b.row[i] * g.q_heads + qh) * D + d] = fkv::from_f<T>(a / sum);
        } else {
            // An empty range leaves m = -inf, l = 0 and a zero accumulator.
            const uint64_t part = ((uint64_t)slot * g.q_heads + qh) * st.max_splits + split;
            st.part_acc[part * D + d] = a;
            if (d == 0) {
                st.part_ml[part * 2] = mx;
                st.part_ml[part * 2 + 1] = sum;
            }
        }
    }
    if constexpr (Fused) {
        if (splits == 1) return;
        // Release: every thread's partial stores are made visible at device
        // scope before the ticket; thread 0's own fence after the barrier
        // also covers the stores the barrier ordered before it.
        __threadfence();
        __syncthreads();
        // The page table's space (the merge above no longer needs it).
        volatile unsigned int *is_last = reinterpret_cast<volatile unsigned int *>(table);
        if (threadIdx.x == 0) {
            unsigned int *ticket = st.part_ticket + (uint64_t)slot * g.q_heads + blockIdx.y;
            __threadfence();
            const unsigned int t = atomicAdd(ticket, 1u);
            const bool last = t == (unsigned int)splits - 1;
            // Every split has arrived: no block of this launch touches the
            // counter again, and the next launch (stream order) sees 0.
            if (last) atomicExch(ticket, 0u);
            // Acquire: the other splits' partials before this block's loads.
            __threadfence();
            *is_last = last;
        }
        __syncthreads();
        if (!*is_last) return;
        combine_in_block<T, D, H>(g, st, slot, b.row[i], qh0, nq, splits,
                                  reinterpret_cast<float *>(smem), out);
    }
}

// One block per (query head, sequence), a thread per channel. The splits'
// (max, sum) pairs are read once, by the whole block, into shared memory
// (dynamic: [splits] float2): read from global memory in the loops they
// were a chain of dependent L2 round trips per split (13.6 us of a 22 us
// attend at batch 1 on the H200). The sums run in split order, as before.
template <typename T, int D>
__global__ void __launch_bounds__(D)
combine_kernel(const fkv_dev_state st, const fkv_dev_batch b, int32_t q_heads,
               int32_t splits, T *__restrict__ out) {
    extern __shared__ float2 ml_s[];
    const int32_t qh = blockIdx.x, i = blockIdx.y, d = threadIdx.x;
    const uint64_t part = ((uint64_t)b.slot[i] * q_heads + qh) * st.max_splits;
    const float2 *ml = reinterpret_cast<const float2 *>(st.part_ml) + part;
    const float *__restrict__ acc = st.part_acc + part * D + d;
    for (int32_t s = d; s < splits; s += D) ml_s[s] = ml[s];
    __syncthreads();

    float mx = -CUDART_INF_F;
    for (int32_t s = 0; s < splits; s++) mx = fmaxf(mx, ml_s[s].x);
    const float mr = ref_max(mx);
    float sum = 0.f, a = 0.f;
#pragma unroll 8
    for (int32_t s = 0; s < splits; s++) {
        const float2 p = ml_s[s];
        const float w = exp2f(p.x - mr);
        sum = fmaf(w, p.y, sum);
        a = fmaf(w, acc[(uint64_t)s * D], a);
    }
    out[((uint64_t)b.row[i] * q_heads + qh) * D + d] = fkv::from_f<T>(a / sum);
}

// ---- host side ----------------------------------------------------------------

template <typename T, int D, class E, bool Fused, bool Fetch>
cudaError_t launch_split(const fkv_dev_geometry &g, const fkv_dev_state &st,
                         const fkv_dev_batch &b, int32_t layer, const T *q, T *out, int32_t pps,
                         int32_t splits, int32_t chunks, const region_table &regions,
                         cudaStream_t stream) {
    // Above 48 KiB: the opt-in was set once for this kernel (fkv_attend_init).
    constexpr size_t smem = smem_bytes<E, Fetch>();
    const dim3 grid(splits, g.kv_heads * chunks, b.n);
    return fkv::enqueue(split_kernel<T, D, E, Fused, Fetch>, grid, kThreads, smem, stream, g, st, b,
                   layer, q, out, pps, splits, chunks, regions);
}

template <typename T, int D, class E>
cudaError_t launch(const fkv_dev_geometry &g, const fkv_dev_state &st, const fkv_dev_batch &b,
                   int32_t layer, const void *q, void *out, int32_t pps, int32_t splits,
                   int32_t chunks, const region_table &regions, int32_t fetch,
                   cudaStream_t stream) {
    const T *qt = static_cast<const T *>(q);
    T *ot = static_cast<T *>(out);
    if (st.fused_combine)
        return fetch ? launch_split<T, D, E, true, true>(g, st, b, layer, qt, ot, pps, splits,
                                                         chunks, regions, stream)
                     : launch_split<T, D, E, true, false>(g, st, b, layer, qt, ot, pps, splits,
                                                          chunks, regions, stream);
    cudaError_t e = fetch ? launch_split<T, D, E, false, true>(g, st, b, layer, qt, ot, pps,
                                                               splits, chunks, regions, stream)
                          : launch_split<T, D, E, false, false>(g, st, b, layer, qt, ot, pps,
                                                                splits, chunks, regions, stream);
    if (e == cudaSuccess && splits > 1)
        e = fkv::enqueue(combine_kernel<T, D>, dim3(g.q_heads, b.n), D, splits * sizeof(float2),
                    stream, st, b, g.q_heads, splits, ot);
    return e;
}

// The opt-in shared memory of one split kernel: the same value for every
// cache (it depends on the instantiation only), so caches sharing the
// kernel never undo each other's setting.
template <typename T, int D, class E, bool Fused, bool Fetch> cudaError_t init_split() {
    return cudaFuncSetAttribute(split_kernel<T, D, E, Fused, Fetch>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)smem_bytes<E, Fetch>());
}
template <typename T, int D, class E> cudaError_t init_engine(const fkv_dev_limits &lim) {
    if (lim.smem_per_block_optin > 0 && smem_bytes<E, true>() > (size_t)lim.smem_per_block_optin)
        return cudaErrorInvalidValue;
    cudaError_t e = init_split<T, D, E, false, false>();
    if (e == cudaSuccess) e = init_split<T, D, E, true, false>();
    if (e == cudaSuccess) e = init_split<T, D, E, false, true>();
    if (e == cudaSuccess) e = init_split<T, D, E, true, true>();
    return e;
}

// Calls f(engine tag) with the engine the geometry's launches use: the
// tensor-core engine for f16/bf16, the CUDA-core one with the block's query
// heads (1-4) for f32.
template <class E> struct engine_tag { using type = E; };
template <typename T, int D, typename F>
cudaError_t with_engine(const fkv_dev_geometry &g, F &&f) {
    if constexpr (sizeof(T) == 2) {
        return f(engine_tag<mma_engine<T, D>>{});
    } else {
        const int32_t chunks = group_chunks(g.group, g.dtype);
        switch ((g.group + chunks - 1) / chunks) {
        case 1: return f(engine_tag<simt_engine<T, D, 1>>{});
        case 2: return f(engine_tag<simt_engine<T, D, 2>>{});
        case 3: return f(engine_tag<simt_engine<T, D, 3>>{});
        default: return f(engine_tag<simt_engine<T, D, 4>>{});
        }
    }
}

// Resident blocks per SM of the split kernel for this geometry on this
// device (the grid target of fkv_attend_splits).
template <typename T, int D> int target_blocks_per_sm(const fkv_dev_limits &lim) {
    if constexpr (sizeof(T) == 4) return blocks_on<simt_engine<T, D, 4>>(lim);
    else return blocks_on<mma_engine<T, D>>(lim);
}

} // namespace

extern "C" cudaError_t fkv_attend_init(const fkv_dev_geometry *g, const fkv_dev_limits *lim) {
    if (!g || !lim || g->group < 1) return cudaErrorInvalidValue;
    return fkv::dispatch_dtype(g->dtype, [&](auto dtype_tag) {
        using T = decltype(dtype_tag);
        return fkv::dispatch_head_dim(g->head_dim, [&](auto dim_tag) -> cudaError_t {
            constexpr int D = decltype(dim_tag)::value;
            return with_engine<T, D>(*g, [&](auto e_tag) {
                return init_engine<T, D, typename decltype(e_tag)::type>(*lim);
            });
        });
    });
}

// The two-launch path's split count (docs/design.md s.6, "Split count"):
// a grid of at most kSplitBlocksPerSm blocks per SM (the occupancy permits
// 3 at bf16 / D 128, but the third block per SM, made of shorter splits,
// cost more in the splits' starts and the combine than it hid), and at
// least kMinSplitPages pages per split, so a split's start (page table,
// first loads) is spread over enough rows. Both were swept on the H200
// (docs/benchmarks.md).
constexpr int32_t kSplitBlocksPerSm = 2;
constexpr int32_t kMinSplitPages = 4;

extern "C" int32_t fkv_attend_splits(const fkv_dev_geometry *g, const fkv_dev_limits *lim,
                                     int32_t n, int32_t bound_pages) {
    int32_t per_sm = kSplitBlocksPerSm;
    fkv::dispatch_dtype(g->dtype, [&](auto dtype_tag) {
        using T = decltype(dtype_tag);
        return fkv::dispatch_head_dim(g->head_dim, [&](auto dim_tag) {
            const int32_t fit = target_blocks_per_sm<T, decltype(dim_tag)::value>(*lim);
            if (fit < per_sm) per_sm = fit;
            return cudaSuccess;
        });
    });
    // floor(target / blocks per split) puts the grid in (target/2, target]
    // when it splits at all, and is non-increasing in n.
    const int64_t per_split = (int64_t)(n > 1 ? n : 1) * (g->kv_heads > 1 ? g->kv_heads : 1) *
                              group_chunks(g->group, g->dtype);
    const int32_t sms = lim->sm_count > 1 ? lim->sm_count : 1;
    int64_t splits = (int64_t)per_sm * sms / per_split;
    const int64_t by_pages = bound_pages / kMinSplitPages;
    if (splits > by_pages) splits = by_pages;
    if (splits < 1) splits = 1;
    return (int32_t)splits;
}

extern "C" int32_t fkv_attend_grid(const fkv_dev_geometry *g, const fkv_dev_limits *lim,
                                   int32_t n, int32_t bound_pages, int32_t max_splits,
                                   int32_t *pages_per_split) {
    const int32_t bound = bound_pages > 1 ? bound_pages : 1;
    int32_t splits = fkv_attend_splits(g, lim, n, bound);
    if (max_splits >= 1 && splits > max_splits) splits = max_splits;
    const int32_t pps = (bound + splits - 1) / splits;
    if (pages_per_split) *pages_per_split = pps;
    return (bound + pps - 1) / pps;  // no split empty at the bound
}

// The fused path's split count: the same grid target, but splits of
// kMinSplitRows rows or more instead of whole pages (a short list still
// fills the GPU), and at most kMaxCombineRows partial rows for the block
// that combines (it reads heads x splits of them alone). Both limits are
// guesses to measure on a GPU.
constexpr int32_t kMinSplitRows = 16;
constexpr int32_t kMaxCombineRows = 512;

extern "C" int32_t fkv_attend_splits_fused(const fkv_dev_geometry *g, const fkv_dev_limits *lim,
                                           int32_t n, int32_t bound_pages) {
    const int32_t P = g->page > 0 ? g->page : 1;
    const int64_t rows = (int64_t)(bound_pages > 1 ? bound_pages : 1) * P;
    const int32_t chunks = group_chunks(g->group, g->dtype);
    const int32_t heads = g->group > 0 ? (g->group + chunks - 1) / chunks : 1;
    // Without the page cap: the target over (sequence, head, chunk) blocks.
    int64_t splits = fkv_attend_splits(g, lim, n, 1 << 30);
    const int64_t by_rows = (rows + kMinSplitRows - 1) / kMinSplitRows;
    if (splits > by_rows) splits = by_rows;
    if (splits > kMaxCombineRows / heads) splits = kMaxCombineRows / heads;
    if (splits < 1) splits = 1;
    return (int32_t)splits;
}

extern "C" cudaError_t fkv_launch_attend(const fkv_dev_geometry *g, const fkv_dev_limits *lim,
                                         const fkv_dev_state *st,
                                         const fkv_dev_batch *b, int32_t layer,
                                         const void *q, void *out, int32_t bound_pages,
                                         unsigned char *const *seq_base_host,
                                         int32_t fetch, cudaStream_t stream) {
    return fkv::dispatch_dtype(g->dtype, [&](auto dtype_tag) {
        using T = decltype(dtype_tag);
        return fkv::dispatch_head_dim(g->head_dim, [&](auto dim_tag) -> cudaError_t {
            constexpr int D = decltype(dim_tag)::value;
            if (b->n == 0) return cudaSuccess;
            if (!lim || b->n < 0 || b->n > FKV_DEV_MAX_BATCH || st->max_splits < 1 ||
                g->group < 1 || g->kv_heads < 1)
                return cudaErrorInvalidValue;
            // The device's figures come from fkv_create (no query here);
            // max_splits was sized with the same ones.
            const int32_t bound = bound_pages > 1 ? bound_pages : 1;
            int32_t splits, pps;
            if (st->fused_combine) {
                // Rows per split, a multiple of kMinSplitRows; no split empty
                // at the bound.
                const int64_t rows = (int64_t)bound * g->page;
                splits = fkv_attend_splits_fused(g, lim, b->n, bound);
                if (splits > st->max_splits) splits = st->max_splits;
                int64_t rps = (rows + splits - 1) / splits;
                rps = (rps + kMinSplitRows - 1) / kMinSplitRows * kMinSplitRows;
                if (rps > INT32_MAX) return cudaErrorInvalidValue;
                splits = (int32_t)((rows + rps - 1) / rps);
                pps = (int32_t)rps;
            } else {
                splits = fkv_attend_grid(g, lim, b->n, bound, st->max_splits, &pps);
            }
            const int32_t chunks = group_chunks(g->group, g->dtype);
            region_table regions = {};
            if (st->fused_combine) {
                if (!st->part_ticket || g->kv_heads * chunks > g->q_heads ||
                    !fill_regions(*g, *st, *b, seq_base_host, regions))
                    return cudaErrorInvalidValue;
            }
            return with_engine<T, D>(*g, [&](auto e_tag) {
                return launch<T, D, typename decltype(e_tag)::type>(*g, *st, *b, layer, q, out,
                                                                     pps, splits, chunks, regions,
                                                                     fetch, stream);
            });
        });
    });
}
