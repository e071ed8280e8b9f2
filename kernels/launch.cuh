// How the launchers of the attend and recall paths enqueue a kernel: on the
// stream, as always, or into this thread's launch record (kernels.h,
// "recorded launches"; FKV_CUDA_EXPERIMENTAL), from which the host enqueues
// the call's kernels together, as a CUDA graph where the call repeats.
#pragma once

#include <string.h>

#include <type_traits>
#include <utility>

#include "kernels.h"

namespace fkv {

// Appends one argument of type P (the kernel's parameter type) at the next
// 8-byte boundary of the blob. The caller checked that it fits.
template <typename P>
inline void record_arg(fkv_launch_record &r, fkv_record_op &op, const P &v) {
    unsigned char *blob = reinterpret_cast<unsigned char *>(r.blob);
    op.arg_off[op.nargs++] = r.bytes;
    memcpy(blob + r.bytes, &v, sizeof(P));
    // Zero the padding up to the next boundary: records are compared byte
    // for byte, so what they hold beyond the values must not vary.
    const uint32_t end = (uint32_t)((r.bytes + sizeof(P) + 7) & ~(size_t)7);
    memset(blob + r.bytes + sizeof(P), 0, end - r.bytes - sizeof(P));
    r.bytes = end;
}

template <typename... P>
constexpr size_t record_bytes() {
    return (0 + ... + ((sizeof(P) + 7) & ~(size_t)7));
}

// Appends the launch to r; the caller checked that it fits.
template <typename... P>
void record_launch(fkv_launch_record &r, void (*kernel)(P...), dim3 grid, dim3 block,
                   size_t smem, const std::decay_t<P> &...args) {
    fkv_record_op &op = r.op[r.n_ops++];
    op.func = reinterpret_cast<const void *>(kernel);
    op.grid[0] = grid.x, op.grid[1] = grid.y, op.grid[2] = grid.z;
    op.block[0] = block.x, op.block[1] = block.y, op.block[2] = block.z;
    op.smem = (uint32_t)smem;
    op.nargs = 0;
    (record_arg(r, op, args), ...);
}

// kernel<<<grid, block, smem, stream>>>(args...) then cudaGetLastError(),
// unless this thread records (fkv_record_begin): then the launch is
// recorded, each argument converted to its parameter's type first. A launch
// that does not fit the record, or is for another stream, spills it: what
// is recorded goes first, then this launch and the rest of the call go
// straight to their streams.
template <typename... P, typename... A>
cudaError_t enqueue(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                    cudaStream_t stream, A &&...args) {
    static_assert(sizeof...(P) == sizeof...(A), "one value per kernel parameter");
    static_assert(sizeof...(P) <= FKV_RECORD_ARGS, "more arguments than a record keeps");
    constexpr size_t need = record_bytes<std::decay_t<P>...>();
    static_assert(need <= FKV_RECORD_BYTES, "arguments larger than a record");
    fkv_launch_record *r = fkv_recording();
    if (r && !r->spilled) {
        if (stream == r->stream && r->n_ops < FKV_RECORD_OPS &&
            r->bytes + need <= FKV_RECORD_BYTES) {
            record_launch<P...>(*r, kernel, grid, block, smem,
                                static_cast<std::decay_t<P>>(std::forward<A>(args))...);
            return cudaSuccess;
        }
        const cudaError_t e = fkv_record_enqueue(r);
        r->spilled = 1;
        if (e != cudaSuccess) return e;
    }
    kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
    return cudaGetLastError();
}

} // namespace fkv
