#!/usr/bin/env python3
"""Where a kernel's warps wait: Nsight Compute's stall samples by source line.

    scripts/ncu_stalls.py SASS_CSV KERNEL [--disasm DIS.txt] [--top N]
                          [--frame FILE:FIRST-LAST] [--source-root DIR]

SASS_CSV is `ncu --import R.ncu-rep --page source --csv --print-source sass`
of a report collected with `--section SourceCounters --section
WarpStateStats --warp-sampling-interval 0` (the default interval leaves a
few dozen samples for a 10 us kernel). KERNEL is a substring of the
demangled name (with the template arguments, as ncu prints it); the samples
of every launch of that one instantiation are summed.

Prints the samples in all and by stall reason. With --disasm (`nvdisasm
-gi -c` of the kernel's cubin, which `cuobjdump -xelf all FILE.cu.o`
extracts from an object built with -lineinfo) it also prints the lines that
collected the most samples, each with its leading stall reasons: the
innermost inlined frame by default, or with --frame the first frame of a
call chain that lies in FILE between lines FIRST and LAST (e.g.
select.cu:646-770 attributes everything to the statements of select_head,
inlined callees included). The function is found in the disassembly by its
opcode sequence, so no names need to match. The source text printed beside
a line comes from --source-root as it is now: check out the commit the
binary was built from.

Why: at batch 1 the selection and attention kernels run a block per SM, so
their time is a chain of waits; samples say which waits (barriers, L2 or
host loads) a change must remove (docs/benchmarks.md, thirteenth session).
scripts/ncu_source.py reads the cuda,sass export instead: the first
launch's lines with instructions executed, and two builds compared; it
attributes to the innermost line only, where this adds the statement of a
caller that inlined the code (--frame) and sums every launch.
`scripts/device-run.sh ncu-source` runs both.
"""

import argparse
import collections
import csv
import os
import re
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def launches(path, kernel):
    """The instruction rows of each launch of `kernel`: (name, header, rows)."""
    out, name, hdr, rows = [], None, None, None
    with open(path, errors="replace") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                if name is not None and kernel in name:
                    out.append((name, hdr, rows))
                name, hdr, rows = row[1], None, []
            elif row[0] == "Address":
                hdr = row
            elif rows is not None:
                rows.append(row)
    if name is not None and kernel in name:
        out.append((name, hdr, rows))
    return out


def opcode(text):
    words = text.strip().rstrip(";").split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def disassembly(path, opcodes):
    """Per instruction of the function whose opcodes equal `opcodes`: the
    chain of (file, line) frames, innermost first."""
    funcs, cur, frames, fresh = [], None, [], False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(".text."):
                cur = []
                funcs.append(cur)
                continue
            m = re.match(r'\s*//## File "([^"]+)", line (\d+)', line)
            if m and cur is not None:
                if not fresh:
                    frames, fresh = [], True
                frames.append((os.path.basename(m.group(1)), int(m.group(2))))
                continue
            m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
            if m and cur is not None:
                fresh = False
                cur.append((list(frames), opcode(m.group(1))))
    for fn in funcs:
        if len(fn) == len(opcodes) and all(o == p for (_, o), p in zip(fn, opcodes)):
            return [frames for frames, _ in fn]
    return None


def source_text(root, cache, name, line):
    if name not in cache:
        path = next((os.path.join(d, name) for d, _, files in os.walk(root)
                     if name in files), None)
        cache[name] = open(path, errors="replace").read().split("\n") if path else []
    text = cache[name]
    return text[line - 1].strip() if 0 < line <= len(text) else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sass_csv")
    ap.add_argument("kernel")
    ap.add_argument("--disasm")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--frame", help="FILE:FIRST-LAST")
    ap.add_argument("--source-root", default=".")
    a = ap.parse_args()

    runs = launches(a.sass_csv, a.kernel)
    if not runs:
        sys.exit(f"{a.sass_csv}: no launch of a kernel named like {a.kernel!r}")
    names = {name for name, _, _ in runs}
    if len(names) > 1:
        sys.exit("several instantiations match; name one:\n  " + "\n  ".join(sorted(names)))
    name, hdr, first = runs[0]
    si = hdr.index(SAMPLES)
    reasons = [(i, h[len("stall_"):]) for i, h in enumerate(hdr)
               if h.startswith("stall_") and "Not Issued" not in h]
    per_ins = [0] * len(first)
    per_reason = [collections.Counter() for _ in first]
    for _, _, rows in runs:
        if len(rows) != len(first):
            sys.exit("launches of one kernel with different code")
        for k, row in enumerate(rows):
            per_ins[k] += int(row[si] or 0)
            for i, r in reasons:
                if row[i] not in ("", "-", "0"):
                    per_reason[k][r] += int(row[i])
    total = sum(per_ins) or 1
    overall = collections.Counter()
    for c in per_reason:
        overall.update(c)
    print(f"{name}\n{len(runs)} launches, {len(first)} SASS instructions, "
          f"{sum(per_ins)} samples")
    print("by reason: " + ", ".join(f"{r} {100 * n / total:.1f}%"
                                    for r, n in overall.most_common(8)))
    if not a.disasm:
        return
    frames = disassembly(a.disasm, [opcode(row[1]) for row in first])
    if frames is None:
        sys.exit(f"{a.disasm}: no function with this kernel's {len(first)} instructions")
    want = None
    if a.frame:
        m = re.fullmatch(r"(.+):(\d+)-(\d+)", a.frame)
        if not m:
            sys.exit("--frame FILE:FIRST-LAST")
        want = (m.group(1), int(m.group(2)), int(m.group(3)))
    by_line = collections.Counter()
    why = collections.defaultdict(collections.Counter)
    for k, chain in enumerate(frames):
        key = chain[0] if chain else ("?", 0)
        if want:
            key = next(((f, l) for f, l in chain
                        if f == want[0] and want[1] <= l <= want[2]), ("(outside)", 0))
        by_line[key] += per_ins[k]
        why[key].update(per_reason[k])
    cache = {}
    for (f, l), n in by_line.most_common(a.top):
        top = ", ".join(f"{r} {c}" for r, c in why[(f, l)].most_common(2))
        text = source_text(a.source_root, cache, f, l)[:64]
        print(f"{n:7d} {100 * n / total:5.1f}%  {f}:{l:<5d} {text:64s}  {top}")


if __name__ == "__main__":
    main()
