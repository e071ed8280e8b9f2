// Launch records (kernels.h, "recorded launches"; no kernel here): which
// record this thread's launches go to, and enqueueing a record as it is.
#include "kernels.h"

namespace {
// Per thread: a cache is used by one thread at a time, and its call sets
// and clears this around its own launches only.
thread_local fkv_launch_record *t_record = nullptr;
} // namespace

extern "C" void fkv_record_begin(fkv_launch_record *r, cudaStream_t stream) {
    r->stream = stream;
    r->n_ops = 0;
    r->spilled = 0;
    r->bytes = 0;
    t_record = r;
}

extern "C" void fkv_record_end(void) { t_record = nullptr; }

extern "C" fkv_launch_record *fkv_recording(void) { return t_record; }

extern "C" cudaError_t fkv_record_enqueue(const fkv_launch_record *r) {
    if (r->spilled) return cudaSuccess;
    const unsigned char *blob = reinterpret_cast<const unsigned char *>(r->blob);
    for (int32_t i = 0; i < r->n_ops; i++) {
        const fkv_record_op &op = r->op[i];
        void *args[FKV_RECORD_ARGS];
        for (int32_t j = 0; j < op.nargs; j++)
            args[j] = const_cast<unsigned char *>(blob + op.arg_off[j]);
        const cudaError_t e = cudaLaunchKernel(op.func, dim3(op.grid[0], op.grid[1], op.grid[2]),
                                               dim3(op.block[0], op.block[1], op.block[2]),
                                               args, op.smem, r->stream);
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}
