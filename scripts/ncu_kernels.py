#!/usr/bin/env python3
"""Sums `ncu --csv --metrics gpu__time_duration.sum` output per kernel.

    scripts/ncu_kernels.py NCU_OUTPUT

NCU_OUTPUT may hold the profiled program's own output too: only ncu's CSV
lines (those that start with a double quote) are read. Prints one line per
(kernel, stream, grid): launches, total and mean microseconds, longest
total first, and the sum of all.
"""
import collections
import csv
import re
import sys


def short(name):
    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "")
    name = name.replace("<unnamed>::", "")
    head = name.split("(")[0]
    return head[:70]


def main(path):
    with open(path, errors="replace") as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    if not rows:
        sys.exit(f"{path}: no ncu CSV lines")
    hdr = rows[0]
    ki, vi, ui = (hdr.index(k) for k in ("Kernel Name", "Metric Value", "Metric Unit"))
    si, gi = hdr.index("Stream"), hdr.index("Grid Size")
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
    total = collections.defaultdict(float)
    count = collections.Counter()
    for r in rows[1:]:
        if len(r) <= vi:
            continue
        key = (short(r[ki]), r[si], r[gi])
        total[key] += float(r[vi].replace(",", "")) * scale.get(r[ui], 1.0)
        count[key] += 1
    for key, t in sorted(total.items(), key=lambda kv: -kv[1]):
        name, stream, grid = key
        print(f"{name:70s} stream {stream:>3s} grid {grid:14s} {count[key]:5d} launches "
              f"{t:10.1f} us {t / count[key]:8.2f} us each")
    print(f"{'all':70s} {sum(count.values()):5d} launches {sum(total.values()):10.1f} us")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
