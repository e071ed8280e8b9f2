#!/usr/bin/env python3
"""Tables of docs/accuracy.md's H200 sweep from the JSON lines that
scripts/real_model_eval.sh writes (engine-N-M.jsonl, reference-N-M.jsonl,
emulate-N-M.jsonl in DIR, default build/accuracy-real).

  scripts/real_model_sweep.py [DIR]

A policy's ratio is its ppl over DENSE's on the same window with the same
sink, window, dtype and backend (runs without DENSE, --no-dense, take the
DENSE of another run of that window and dtype)."""
import collections
import glob
import json
import os
import re
import statistics as st
import sys


def rows(pattern):
    out = []
    for p in sorted(glob.glob(pattern)):
        n = int(re.search(r"-(\d+)-\d+\.jsonl$", p).group(1))
        for line in open(p):
            if line.startswith("{"):
                r = json.loads(line)
                r["ctx"] = n
                r["win"] = os.path.basename(r["text"]).rsplit(".", 1)[0]
                out.append(r)
    return out


def dense_vs_reference(eng, ref):
    refs = {(r["ctx"], r["win"]): r["ppl"] for r in ref}
    seen = {}
    for r in eng:
        if r["policy"] == "dense":
            seen.setdefault((r["ctx"], r["win"], r["backend"], r["dtype"]), r["ppl"])
    print("| context | backend, cache | windows | DENSE / reference: mean | largest deviation |")
    print("|---|---|---|---|---|")
    g = collections.defaultdict(list)
    for (n, w, be, dt), p in seen.items():
        if (n, w) in refs:
            g[(n, be, dt)].append(p / refs[(n, w)] - 1)
    for k in sorted(g):
        v = g[k]
        print("| %d | %s, %s | %d | %+.1e | %.1e |" % (k[0], k[1], k[2], len(v),
              st.mean(v), max(abs(x) for x in v)))
    print()


def label(r):
    p = r["policy"].upper()
    if r["policy"] == "freekv":
        t = r["threshold"]
        p += " off" if t is None or t == "off" or (isinstance(t, float) and t < -0.5) \
            else " %.2g" % t
        if r.get("criterion", "cosine") != "cosine":
            m = r.get("min_mass")
            if m is None:  # older engines: the flag in the run's arguments
                a = r.get("args", "").split()
                m = float(a[a.index("--min-mass") + 1]) if "--min-mass" in a else 0.002
            p = "FREEKV %s m %g" % (r["criterion"], m)
    if r.get("dense_layers"):
        p += ", dense layers " + ",".join(str(x) for x in r["dense_layers"])
    return p


def policy_tables(eng):
    dense = {}
    for r in eng:
        if r["policy"] == "dense":
            dense[(r["ctx"], r["win"], r["sink"], r["window"], r["dtype"], r["backend"])] = r["ppl"]
            dense.setdefault((r["ctx"], r["win"], r["dtype"], r["backend"]), r["ppl"])
    g = collections.defaultdict(list)
    for r in eng:
        if r["policy"] == "dense":
            continue
        d = dense.get((r["ctx"], r["win"], r["sink"], r["window"], r["dtype"], r["backend"])) \
            or dense.get((r["ctx"], r["win"], r["dtype"], r["backend"]))
        if not d:
            continue
        r["r"] = r["ppl"] / d
        g[(r["ctx"], r["sink"], r["window"], r["dtype"], r["backend"])].append(r)
    for key in sorted(g):
        n, sink, window, dt, be = key
        print("#### prefill %d, 256 steps, %s (%s), page 32, sink %d, window %d"
              % (n, dt, be, sink, window))
        print()
        print("| policy | budget | windows | ratio mean | median | worst (window) | corrected checks | pages recalled / step | of them inside attend |")
        print("|---|---|---|---|---|---|---|---|---|")
        cells = collections.defaultdict(list)
        for r in g[key]:
            cells[(r["budget"], label(r))].append(r)
        for (b, lab) in sorted(cells, key=lambda k: (k[0], k[1])):
            rs = cells[(b, lab)]
            ra = [r["r"] for r in rs]
            worst = max(rs, key=lambda r: r["r"])
            hc = sum(r["heads_checked"] for r in rs)
            co = sum(r["corrections"] for r in rs)
            print("| %s | %d | %d | %.4f | %.4f | %.4f (%s) | %s | %.1f | %.1f |" % (
                lab, b, len(rs), st.mean(ra), st.median(ra), worst["r"], worst["win"],
                "%.0f%%" % (100.0 * co / hc) if hc else "-",
                st.mean(r["pages_recalled_per_step"] for r in rs),
                st.mean(r["pages_recalled_critical_per_step"] for r in rs)))
        print()


def emulation(em):
    g = collections.defaultdict(list)
    for r in em:
        if r["policy"].startswith("emul-"):
            g[(r["ctx"], r["sink"], r["window"], r["budget"])].append(r)
    for key in sorted(g):
        n, sink, window, b = key
        modes = collections.defaultdict(list)
        for r in g[key]:
            modes[r["policy"][5:]].append(r["ratio"])
        print("| %d | %d/%d | %d | %s |" % (n, sink, window, b, " | ".join(
            "%s %.4f / %.4f (%d)" % (m, st.mean(v), max(v), len(v))
            for m, v in sorted(modes.items()))))
    print()


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "build/accuracy-real"
    eng = rows(os.path.join(d, "engine-*.jsonl"))
    ref = rows(os.path.join(d, "reference-*.jsonl"))
    em = rows(os.path.join(d, "emulate-*.jsonl"))
    if ref:
        dense_vs_reference(eng, ref)
    policy_tables(eng)
    if em:
        print("Emulated selections (context | sink/window | budget | mode mean / worst ratio (windows)):")
        print()
        emulation(em)


if __name__ == "__main__":
    main()
