#!/usr/bin/env python3
"""Plot bench/decode's CSV: decode-step latency against context length.

One line per (policy, batch) -- per (FREEKV threshold, batch) when the
run swept --thresholds: median step latency (ms) over the contexts that ran, log-scale x; the GEMMs alone (the step's lower bound from the
model's work) as grey dotted lines, one per batch.

    python3 bench/plot_decode.py decode.csv [-o decode.png] [--logy]

Needs matplotlib (the Agg backend: no display).
"""
import argparse
import csv
import sys
from collections import defaultdict

POLICIES = ["FREEKV", "SYNC", "RESIDENT", "DENSE"]
COLORS = {"FREEKV": "tab:blue", "SYNC": "tab:red", "RESIDENT": "tab:green",
          "DENSE": "tab:purple"}
STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="the file written by decode --csv")
    ap.add_argument("-o", "--output",
                    help="PNG to write (default: the CSV's name, .png)")
    ap.add_argument("--logy", action="store_true", help="log-scale y too")
    opts = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(opts.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r.get("status") == "ok"
          and number(r.get("step_ms_median")) is not None]
    if not ok:
        sys.exit(f"{opts.csv}: no configuration ran (status ok)")

    lines = defaultdict(list)  # (policy, batch, label) -> [(context, ms)]
    gemm = defaultdict(dict)   # batch -> {context: ms}
    taus = {r.get("threshold") for r in ok if r["policy"] == "FREEKV"}
    for r in ok:
        ctx, batch = int(r["context"]), int(r["batch"])
        label = r["policy"]
        if r["policy"] == "FREEKV" and len(taus) > 1:
            t = number(r.get("threshold"))
            label += " tau " + ("off" if t is not None and t <= -2 else
                                r.get("threshold", "?"))
        lines[(r["policy"], batch, label)].append(
            (ctx, float(r["step_ms_median"])))
        g = number(r.get("gemm_ms"))
        if g is not None:
            gemm[batch][ctx] = g

    batches = sorted({b for _, b, _ in lines})
    style = {b: STYLES[i % len(STYLES)] for i, b in enumerate(batches)}
    marker = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(batches)}

    fig, ax = plt.subplots(figsize=(9, 6))
    order = sorted(lines, key=lambda k: (POLICIES.index(k[0])
                                         if k[0] in POLICIES else 9, k[1],
                                         k[2]))
    for policy, batch, label in order:
        pts = sorted(lines[(policy, batch, label)])
        ax.plot([p[0] for p in pts], [p[1] for p in pts],
                color=COLORS.get(policy, "black"), linestyle=style[batch],
                marker=marker[batch], label=f"{label} batch {batch}")
    for batch in batches:
        pts = sorted(gemm[batch].items())
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="grey",
                    linestyle=":", linewidth=1,
                    label=f"GEMMs alone, batch {batch}")

    ax.set_xscale("log", base=2)
    if opts.logy:
        ax.set_yscale("log")
    contexts = sorted({c for pts in lines.values() for c, _ in pts})
    ax.set_xticks(contexts)
    ax.set_xticklabels([f"{c // 1024}K" if c % 1024 == 0 else str(c)
                        for c in contexts])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step latency, median (ms)")
    first = ok[0]
    ax.set_title(f"libfreekv decode: {first.get('model', '?')}, "
                 f"{first.get('layers', '?')} layers, budget "
                 f"{first.get('budget', '?')}, trace {first.get('trace', '?')}, "
                 f"threshold {first.get('threshold', '?')}; {first.get('backend', '?')} "
                 f"({first.get('device', '?')})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out = opts.output or (opts.csv[:-4] if opts.csv.endswith(".csv")
                          else opts.csv) + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
