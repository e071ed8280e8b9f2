#!/usr/bin/env python3
"""Summarises an Nsight Compute source-page export per kernel launch.

    scripts/ncu_source.py SOURCE_CSV [--against OTHER_CSV] [--top N]

SOURCE_CSV is what `ncu -i REPORT --page source --csv --print-source
cuda,sass` prints for a report taken with `--section SourceCounters`
(and `--import-source yes` for the source text; build with -lineinfo).
For the first launch in the file it prints the code size (distinct SASS
instructions), the warp instructions executed, the warp samples by stall
reason, and the source lines with the most samples and the most
instructions executed. With --against, the lines are compared by their
source text with OTHER_CSV's first launch (two builds of one kernel whose
line numbers differ): the largest differences in instructions executed.

Why: a kernel that runs one block per SM (the selection at small batches)
is bound by its chain of dependent steps and its code, which per-kernel
durations do not show (docs/benchmarks.md, 2026-12-03).
"""
import argparse
import collections
import csv
import sys


def first_launch(path):
    """(source-line rows, code size, table header) of the first launch: a
    launch's blocks are one per source file; a file seen again starts the
    next launch."""
    with open(path, errors="replace", newline="") as f:
        rows = list(csv.reader(f))
    files_seen, header, current = set(), None, None
    lines, addresses = [], set()
    for r in rows:
        if len(r) >= 2 and r[0] == "File Path":
            if r[1] in files_seen:
                break
            files_seen.add(r[1])
            current = r[1].rsplit("/", 1)[-1]
        elif r and r[0] == "Line No":
            header = r
        elif header and len(r) == len(header):
            if r[0].isdigit():  # a source line (its text: the first Source column)
                lines.append((current, int(r[0]), dict(zip(header, r)), r[1].strip()))
            elif r[2].startswith("0x"):
                addresses.add(r[2])
    if header is None:
        sys.exit(f"{path}: no source-page table (export with --page source --csv)")
    return lines, len(addresses), header


def number(row, key):
    try:
        return int(row.get(key, "0").replace(",", ""))
    except ValueError:
        return 0


SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def summary(path, top):
    lines, code, header = first_launch(path)
    stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    by_stall = collections.Counter()
    for _, _, row, _ in lines:
        for h in stalls:
            by_stall[h[len("stall_"):]] += number(row, h)
    samples = sum(number(r, SAMPLES) for _, _, r, _ in lines)
    executed = sum(number(r, EXECUTED) for _, _, r, _ in lines)
    print(f"{path}: {code} SASS instructions, {executed} warp instructions executed, "
          f"{samples} warp samples")
    shares = ", ".join(f"{k} {v} ({100.0 * v / samples:.0f}%)"
                       for k, v in by_stall.most_common() if v) if samples else "none"
    print(f"  samples by stall reason: {shares}")
    for key, title in ((SAMPLES, "samples"), (EXECUTED, "instructions executed")):
        print(f"  lines with the most {title}:")
        for f, n, row, text in sorted(lines, key=lambda x: -number(x[2], key))[:top]:
            print(f"    {number(row, key):8d}  {f}:{n}  {text[:90]}")
    return lines


def by_text(lines):
    total = collections.Counter()
    for f, _, row, text in lines:
        total[(f, text)] += number(row, EXECUTED)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--against")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    lines = summary(a.csv, a.top)
    if a.against:
        other = summary(a.against, 0)
        mine, theirs = by_text(lines), by_text(other)
        print(f"  instructions executed, {a.csv} minus {a.against}, by source text:")
        keys = sorted(set(mine) | set(theirs), key=lambda k: -abs(mine[k] - theirs[k]))
        for k in keys[:a.top]:
            print(f"    {mine[k] - theirs[k]:+8d}  {k[0]}  {k[1][:90]}")


if __name__ == "__main__":
    main()
