// Launch records (kernels.h, "recorded launches"; no kernel here): which
// record this thread's launches go to, enqueueing a record as it is, and
// comparing and copying records.
#include <string.h>

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

extern "C" int32_t fkv_record_same(const fkv_launch_record *a, const fkv_launch_record *b) {
    if (a->n_ops != b->n_ops || a->bytes != b->bytes) return 0;
    for (int32_t i = 0; i < a->n_ops; i++) {
        const fkv_record_op &x = a->op[i], &y = b->op[i];
        if (x.func != y.func || x.smem != y.smem || x.nargs != y.nargs ||
            memcmp(x.grid, y.grid, sizeof x.grid) != 0 ||
            memcmp(x.block, y.block, sizeof x.block) != 0 ||
            memcmp(x.arg_off, y.arg_off, (size_t)x.nargs * sizeof x.arg_off[0]) != 0)
            return 0;
    }
    return memcmp(a->blob, b->blob, a->bytes) == 0;
}

extern "C" void fkv_record_copy(fkv_launch_record *to, const fkv_launch_record *from) {
    to->stream = from->stream;
    to->n_ops = from->n_ops;
    to->spilled = from->spilled;
    to->bytes = from->bytes;
    memcpy(to->op, from->op, (size_t)from->n_ops * sizeof from->op[0]);
    memcpy(to->blob, from->blob, from->bytes);
}
