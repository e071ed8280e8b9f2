#!/usr/bin/env python3
"""SASS instructions of every kernel in CUDA sources, without a GPU.

    scripts/kernel_sizes.py [--arch sm_90] [--filter TEXT] [FILE.cu ...]

Compiles each file (default: kernels/*.cu) to a cubin with nvcc (-O3, the
project's include paths) and prints, per kernel instantiation, the size of
its .text section in instructions (16 bytes each on sm_70 and later), the
figure ncu's source page counts too. Needs nvcc and readelf (binutils).

Why: the selection kernel runs one block per SM at small batches and
executes its code once per launch, so its code size shows in its time
(docs/benchmarks.md, 2026-12-03); this checks a change's code size before
a GPU is at hand.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

from ncu_kernels import short  # the same kernel names as the ncu summaries


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                             text=True, check=True).stdout.split("\n")
        return out[:len(names)]
    except (OSError, subprocess.CalledProcessError):
        return names


def sizes(cu, arch, tmp):
    cubin = os.path.join(tmp, os.path.basename(cu) + ".cubin")
    subprocess.run(["nvcc", "-O3", "-std=c++17", "-Iinclude", "-Ilib", "-Ikernels",
                    "-DFKV_WITH_CUDA", f"-arch={arch}", "-cubin", "-o", cubin, cu], check=True)
    out = subprocess.run(["readelf", "-SW", cubin], capture_output=True, text=True,
                         check=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.search(r"\.text\.(\S+)\s+\S+\s+[0-9a-f]+\s+[0-9a-f]+\s+([0-9a-f]+)", line)
        if m and int(m.group(2), 16):
            rows.append((m.group(1), int(m.group(2), 16) // 16))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--filter", default="", help="only kernels whose name holds TEXT")
    a = ap.parse_args()
    files = a.files or sorted(glob.glob("kernels/*.cu"))
    with tempfile.TemporaryDirectory() as tmp:
        for cu in files:
            rows = sizes(cu, a.arch, tmp)
            names = demangle([r[0] for r in rows])
            for (_, n), name in zip(rows, names):
                if a.filter in name:
                    print(f"{n:7d}  {cu}  {short(name)}")


if __name__ == "__main__":
    sys.exit(main())
