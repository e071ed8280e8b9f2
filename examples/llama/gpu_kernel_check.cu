/*
 * Kernel-level part of `llama selfcheck-gpu`: every kernel of the CUDA path
 * (and the backend's cuBLAS GEMM orientation) on small random inputs
 * against a float64 reference written here, so that a failing end-to-end
 * comparison can be traced to one kernel. Shapes cross the kernels' edges:
 * rows not a multiple of the block, tokens out of the vocabulary, prefill
 * attention across its 32-key tiles and its 4096-query launch chunks, head
 * dims 64/128/256, GQA and MHA, f32 and bf16 inputs.
 *
 * SPDX-License-Identifier: MIT
 */
#include "gpu_kernels.cuh"

#include <cublas_v2.h>
#include <math.h>
#include <string.h>
#include <vector>

extern "C" int llama_gpu_kernel_check(int *checks);

namespace {

int failures, count;

uint64_t rng_state = 0x243f6a8885a308d3ull;
float urand() /* [-1, 1) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

float bf16_round(float x)
{
    return __bfloat162float(__float2bfloat16_rn(x));
}

void report(const char *name, double err, double tol)
{
    int pass = err <= tol;
    failures += !pass;
    count++;
    printf("selfcheck-gpu: kernel %-40s max err %.3e (limit %.1e): %s\n",
           name, err, tol, pass ? "PASS" : "FAIL");
    fflush(stdout);
}

template <typename T> T *to_dev(const std::vector<T> &h)
{
    T *d = NULL;
    GPU_CHECK(cudaMalloc((void **)&d, h.size() * sizeof(T) + 1));
    GPU_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T),
                         cudaMemcpyHostToDevice));
    return d;
}

template <typename T> std::vector<T> from_dev(const T *d, size_t n)
{
    std::vector<T> h(n);
    GPU_CHECK(cudaDeviceSynchronize());
    GPU_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

std::vector<__nv_bfloat16> to_bf16(const std::vector<float> &f)
{
    std::vector<__nv_bfloat16> b(f.size());
    for (size_t i = 0; i < f.size(); i++)
        b[i] = __float2bfloat16_rn(f[i]);
    return b;
}

std::vector<float> rand_vec(size_t n, float scale, bool round_bf16)
{
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++)
        v[i] = round_bf16 ? bf16_round(urand() * scale) : urand() * scale;
    return v;
}

void check_embed(cudaStream_t s)
{
    const int V = 50, H = 300, n = 7;
    std::vector<float> table = rand_vec((size_t)V * H, 1.0f, true);
    std::vector<int32_t> tok = {0, 49, 7, -1, 50, 3, 3};
    __nv_bfloat16 *dt = to_dev(to_bf16(table));
    int32_t *dk = to_dev(tok);
    float *dx = NULL;
    GPU_CHECK(cudaMalloc((void **)&dx, sizeof(float) * n * H));
    gpu_embed(dk, n, dt, V, H, dx, s);
    std::vector<float> x = from_dev(dx, (size_t)n * H);
    double err = 0;
    for (int i = 0; i < n; i++)
        for (int d = 0; d < H; d++) {
            double want = (tok[i] >= 0 && tok[i] < V)
                              ? table[(size_t)tok[i] * H + d]
                              : 0.0;
            err = fmax(err, fabs(x[(size_t)i * H + d] - want));
        }
    report("embed (incl. out-of-vocab ids)", err, 0.0);
    cudaFree(dt);
    cudaFree(dk);
    cudaFree(dx);
}

void check_rmsnorm(cudaStream_t s)
{
    const int n = 5, H = 300;
    const float eps = 1e-6f;
    std::vector<float> x = rand_vec((size_t)n * H, 3.0f, false);
    std::vector<float> w = rand_vec(H, 1.0f, false);
    float *dx = to_dev(x), *dw = to_dev(w);
    __nv_bfloat16 *dout = NULL;
    GPU_CHECK(cudaMalloc((void **)&dout, 2 * n * H));
    gpu_rmsnorm(dx, n, H, dw, eps, dout, s);
    std::vector<__nv_bfloat16> o = from_dev(dout, (size_t)n * H);
    double err = 0;
    for (int i = 0; i < n; i++) {
        double ss = 0;
        for (int d = 0; d < H; d++)
            ss += (double)x[(size_t)i * H + d] * x[(size_t)i * H + d];
        double inv = 1.0 / sqrt(ss / H + eps);
        for (int d = 0; d < H; d++) {
            double want = x[(size_t)i * H + d] * inv * w[d];
            double got = __bfloat162float(o[(size_t)i * H + d]);
            err = fmax(err, fabs(got - want) / fmax(1.0, fabs(want)));
        }
    }
    report("rmsnorm (hidden 300)", err, 8e-3); /* bf16 output: 2^-8 */
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dout);
}

void check_rope(cudaStream_t s, int dtype)
{
    const int n = 6, nq = 4, nkv = 2, D = 64, heads = nq + 2 * nkv;
    std::vector<int32_t> pos = {0, 1, 7, 100, 4095, 32767};
    std::vector<float> inv(D / 2);
    for (int j = 0; j < D / 2; j++)
        inv[j] = (float)(1.0 / pow(500000.0, 2.0 * j / D));
    std::vector<float> qkv = rand_vec((size_t)n * heads * D, 2.0f, false);
    float *dqkv = to_dev(qkv), *dinv = to_dev(inv);
    int32_t *dpos = to_dev(pos);
    const size_t es = dtype == GPU_F32 ? 4 : 2;
    void *dq, *dk, *dv;
    GPU_CHECK(cudaMalloc(&dq, es * n * nq * D));
    GPU_CHECK(cudaMalloc(&dk, es * n * nkv * D));
    GPU_CHECK(cudaMalloc(&dv, es * n * nkv * D));
    gpu_rope_split(dqkv, n, dpos, dinv, nq, nkv, D, dtype, dq, dk, dv, s);
    GPU_CHECK(cudaDeviceSynchronize());
    std::vector<char> hq(es * n * nq * D), hk(es * n * nkv * D),
        hv(es * n * nkv * D);
    GPU_CHECK(cudaMemcpy(hq.data(), dq, hq.size(), cudaMemcpyDeviceToHost));
    GPU_CHECK(cudaMemcpy(hk.data(), dk, hk.size(), cudaMemcpyDeviceToHost));
    GPU_CHECK(cudaMemcpy(hv.data(), dv, hv.size(), cudaMemcpyDeviceToHost));
    auto get = [&](const std::vector<char> &b, size_t i) -> double {
        if (dtype == GPU_F32)
            return ((const float *)b.data())[i];
        return __bfloat162float(((const __nv_bfloat16 *)b.data())[i]);
    };
    double err = 0;
    for (int t = 0; t < n; t++)
        for (int h = 0; h < heads; h++)
            for (int d = 0; d < D; d++) {
                const float *src = &qkv[((size_t)t * heads + h) * D];
                double want;
                if (h < nq + nkv) {
                    /* HF: angle = f32(pos * inv_freq); rotate-half. */
                    int j = d % (D / 2);
                    double ang = (double)((float)pos[t] * inv[j]);
                    double c = cos(ang), sn = sin(ang);
                    want = d < D / 2 ? src[d] * c - src[d + D / 2] * sn
                                     : src[d] * c + src[d - D / 2] * sn;
                } else {
                    want = src[d];
                }
                double got;
                if (h < nq)
                    got = get(hq, ((size_t)t * nq + h) * D + d);
                else if (h < nq + nkv)
                    got = get(hk, ((size_t)t * nkv + h - nq) * D + d);
                else
                    got = get(hv, ((size_t)t * nkv + h - nq - nkv) * D + d);
                err = fmax(err, fabs(got - want) / fmax(1.0, fabs(want)));
            }
    report(dtype == GPU_F32 ? "rope_split f32 (pos up to 32767)"
                            : "rope_split bf16 (pos up to 32767)",
           err, dtype == GPU_F32 ? 1e-5 : 8e-3);
    cudaFree(dqkv);
    cudaFree(dinv);
    cudaFree(dpos);
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(dv);
}

void check_swiglu(cudaStream_t s)
{
    const int n = 3, I = 100;
    std::vector<float> gu = rand_vec((size_t)n * 2 * I, 6.0f, false);
    float *dgu = to_dev(gu);
    __nv_bfloat16 *dout = NULL;
    GPU_CHECK(cudaMalloc((void **)&dout, 2 * n * I));
    gpu_swiglu(dgu, n, I, dout, s);
    std::vector<__nv_bfloat16> o = from_dev(dout, (size_t)n * I);
    double err = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < I; j++) {
            double g = gu[(size_t)i * 2 * I + j], u = gu[(size_t)i * 2 * I + I + j];
            double want = g / (1.0 + exp(-g)) * u;
            double got = __bfloat162float(o[(size_t)i * I + j]);
            err = fmax(err, fabs(got - want) / fmax(1.0, fabs(want)));
        }
    report("swiglu (gate | up)", err, 8e-3);
    cudaFree(dgu);
    cudaFree(dout);
}

void check_convert(cudaStream_t s)
{
    const long long n = 1000;
    std::vector<float> f = rand_vec((size_t)n, 100.0f, false);
    float *df = to_dev(f);
    __nv_bfloat16 *db = NULL;
    __half *dh = NULL;
    float *dback = NULL;
    GPU_CHECK(cudaMalloc((void **)&db, 2 * n));
    GPU_CHECK(cudaMalloc((void **)&dh, 2 * n));
    GPU_CHECK(cudaMalloc((void **)&dback, 4 * n));
    gpu_convert(df, GPU_F32, db, GPU_BF16, n, s);
    gpu_convert(df, GPU_F32, dh, GPU_F16, n, s);
    gpu_convert(dh, GPU_F16, dback, GPU_F32, n, s);
    std::vector<__nv_bfloat16> b = from_dev(db, (size_t)n);
    std::vector<float> back = from_dev(dback, (size_t)n);
    double err = 0;
    for (long long i = 0; i < n; i++) {
        err = fmax(err, fabs((double)__bfloat162float(b[i]) - bf16_round(f[i])));
        err = fmax(err, fabs((double)back[i] -
                             __half2float(__float2half_rn(f[i]))));
    }
    report("convert f32->bf16, f32->f16->f32", err, 0.0);
    cudaFree(df);
    cudaFree(db);
    cudaFree(dh);
    cudaFree(dback);
}

/* Y[n, out] = Y0 + X W^T through the same cublasGemmEx call as
 * gpu_backend.cu's gemm(). */
void check_gemm(cudaStream_t s)
{
    const int out = 70, in = 96, n = 5;
    std::vector<float> W = rand_vec((size_t)out * in, 1.0f, true);
    std::vector<float> X = rand_vec((size_t)n * in, 1.0f, true);
    std::vector<float> Y0 = rand_vec((size_t)n * out, 1.0f, false);
    __nv_bfloat16 *dW = to_dev(to_bf16(W)), *dX = to_dev(to_bf16(X));
    float *dY = to_dev(Y0);
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        report("gemm: cublasCreate failed", 1.0, 0.0);
        return;
    }
    cublasSetStream(h, s);
    const float alpha = 1.0f, beta = 1.0f;
    cublasStatus_t st = cublasGemmEx(
        h, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &alpha, dW, CUDA_R_16BF, in,
        dX, CUDA_R_16BF, in, &beta, dY, CUDA_R_32F, out, CUBLAS_COMPUTE_32F,
        CUBLAS_GEMM_DEFAULT);
    std::vector<float> Y = from_dev(dY, (size_t)n * out);
    double err = st == CUBLAS_STATUS_SUCCESS ? 0.0 : 1e9;
    for (int i = 0; i < n; i++)
        for (int o = 0; o < out; o++) {
            double want = Y0[(size_t)i * out + o];
            for (int k = 0; k < in; k++)
                want += (double)X[(size_t)i * in + k] * W[(size_t)o * in + k];
            err = fmax(err, fabs(Y[(size_t)i * out + o] - want) /
                                fmax(1.0, fabs(want)));
        }
    report("gemm orientation + beta=1 residual", err, 1e-4);
    cublasDestroy(h);
    cudaFree(dW);
    cudaFree(dX);
    cudaFree(dY);
}

/* Causal GQA attention, float64, for query position p of head h. */
void ref_attention(const std::vector<float> &q, const std::vector<float> &k,
                   const std::vector<float> &v, int nq, int nkv, int D,
                   int p, int h, double scale, double *out)
{
    const int g = h / (nq / nkv);
    std::vector<double> sc(p + 1);
    double mx = -INFINITY;
    for (int j = 0; j <= p; j++) {
        double dot = 0;
        for (int d = 0; d < D; d++)
            dot += (double)q[((size_t)p * nq + h) * D + d] *
                   k[((size_t)j * nkv + g) * D + d];
        sc[j] = dot * scale;
        mx = fmax(mx, sc[j]);
    }
    double sum = 0;
    for (int j = 0; j <= p; j++)
        sum += (sc[j] = exp(sc[j] - mx));
    for (int d = 0; d < D; d++) {
        double a = 0;
        for (int j = 0; j <= p; j++)
            a += sc[j] * v[((size_t)j * nkv + g) * D + d];
        out[d] = a / sum;
    }
}

void check_attention(cudaStream_t s, int dtype, int n, int nq, int nkv, int D)
{
    /* Inputs rounded to bf16 so that both dtypes see the same values;
     * q scaled up so that the softmax is not flat. */
    std::vector<float> q = rand_vec((size_t)n * nq * D, 2.0f, true);
    std::vector<float> k = rand_vec((size_t)n * nkv * D, 2.0f, true);
    std::vector<float> v = rand_vec((size_t)n * nkv * D, 1.0f, true);
    void *dq, *dk, *dv;
    if (dtype == GPU_F32) {
        dq = to_dev(q);
        dk = to_dev(k);
        dv = to_dev(v);
    } else {
        dq = to_dev(to_bf16(q));
        dk = to_dev(to_bf16(k));
        dv = to_dev(to_bf16(v));
    }
    __nv_bfloat16 *dout = NULL;
    GPU_CHECK(cudaMalloc((void **)&dout, 2 * (size_t)n * nq * D));
    const double scale = 1.0 / sqrt((double)D);
    gpu_prefill_attention(dtype, dq, dk, dv, n, nq, nkv, D, (float)scale,
                          dout, s);
    std::vector<__nv_bfloat16> o = from_dev(dout, (size_t)n * nq * D);
    /* Every position when small; else the edges of tiles and launch
     * chunks plus a spread. */
    std::vector<int> ps;
    if (n <= 300) {
        for (int p = 0; p < n; p++)
            ps.push_back(p);
    } else {
        int edges[] = {0, 1, 31, 32, 33, 63, 64, 4095, 4096, 4097};
        for (int e : edges)
            if (e < n)
                ps.push_back(e);
        for (int i = 0; i < 16; i++)
            ps.push_back((int)((long long)(n - 1) * i / 15));
    }
    std::vector<double> want(D);
    double err = 0;
    for (int p : ps)
        for (int h = 0; h < nq; h++) {
            ref_attention(q, k, v, nq, nkv, D, p, h, scale, want.data());
            for (int d = 0; d < D; d++)
                err = fmax(err, fabs((double)__bfloat162float(
                                         o[((size_t)p * nq + h) * D + d]) -
                                     want[d]));
        }
    char name[96];
    snprintf(name, sizeof name, "prefill attention %s n=%d q%d/kv%d d%d",
             dtype == GPU_F32 ? "f32" : "bf16", n, nq, nkv, D);
    report(name, err, 8e-3); /* |out| <= 1, bf16 output: 2^-9 + f32 sums */
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dout);
}

} /* namespace */

extern "C" int llama_gpu_kernel_check(int *checks)
{
    failures = 0;
    count = 0;
    cudaStream_t s;
    GPU_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    check_embed(s);
    check_rmsnorm(s);
    check_rope(s, GPU_F32);
    check_rope(s, GPU_BF16);
    check_swiglu(s);
    check_convert(s);
    check_gemm(s);
    check_attention(s, GPU_BF16, 1, 4, 2, 64);
    check_attention(s, GPU_BF16, 45, 4, 2, 64);
    check_attention(s, GPU_F32, 100, 8, 2, 64);
    check_attention(s, GPU_BF16, 70, 4, 1, 128);
    check_attention(s, GPU_BF16, 33, 2, 2, 256);
    check_attention(s, GPU_BF16, 4100, 4, 2, 64); /* two launch chunks */
    GPU_CHECK(cudaStreamDestroy(s));
    *checks = count;
    return failures;
}
