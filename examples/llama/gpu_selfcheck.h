/* `llama selfcheck-gpu`: the CUDA backend's logits against the CPU
 * backend's, eager and with --graph (see gpu_selfcheck.c).
 * SPDX-License-Identifier: MIT */
#ifndef LLAMA_GPU_SELFCHECK_H
#define LLAMA_GPU_SELFCHECK_H

/* argv[0] is the mode's name; options: [--model DIR] [--text FILE]
 * [--prefill N] [--steps M] [-v]. Prints one line per case and a verdict;
 * returns the process exit status: 0 pass (or "skipped" without a CUDA
 * build or device), 1 a case failed, 2 bad arguments or a setup error. */
int llama_gpu_selfcheck(int argc, char **argv);

/* The kernel-level checks (gpu_kernel_check.cu): each kernel against a
 * float64 reference; prints one line per check, sets *checks to their
 * number and returns how many failed. CUDA builds only. */
int llama_gpu_kernel_check(int *checks);

#endif /* LLAMA_GPU_SELFCHECK_H */
