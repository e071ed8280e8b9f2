#!/usr/bin/env python3
"""Markdown tables of docs/accuracy.md section 1 from the JSON lines that
scripts/real_model_eval.sh writes (default directory build/accuracy-real).

  scripts/real_model_tables.py [DIR]
"""
import glob
import json
import math
import os
import statistics
import sys


def load(pattern):
    rows = []
    for p in sorted(glob.glob(pattern)):
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError:  # a run still writing its lines
                        print("skipped a partial line in %s" % p,
                              file=sys.stderr)
    return rows


def short(path):
    return os.path.basename(path)


def thr(r):
    t = r.get("threshold")
    if r["policy"] != "freekv":
        return ""
    return " off" if t in ("off", None) or (isinstance(t, (int, float)) and t <= -1) \
        else " %.2g" % float(t)


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "build/accuracy-real"
    # Reference lines, from reference-*.jsonl and emulate-*.jsonl; one with
    # per-step NLLs also gives the ppl of any shorter run (causal model).
    ref = {}
    for r in load(os.path.join(d, "reference-*.jsonl")) + \
            load(os.path.join(d, "emulate-*.jsonl")):
        if r["policy"] != "reference":
            continue
        ref[(r["text"], r["prefill"], r["steps"])] = r
        for m in (64, 128, 256):
            if len(r.get("nll_steps", [])) >= m:
                ref.setdefault((r["text"], r["prefill"], m), dict(
                    r, steps=m, ppl=math.exp(statistics.mean(r["nll_steps"][:m]))))
    eng = load(os.path.join(d, "engine-*.jsonl"))
    dense = {}
    for r in eng:
        if r["policy"] == "dense":
            dense[(r["text"], r["prefill"], r["steps"], r["dtype"])] = r

    # DENSE against the float64 reference.
    groups = {}
    for (t, n, m, dt), r in dense.items():
        if (t, n, m) in ref:
            groups.setdefault((n, m, dt), []).append(
                (short(t), ref[(t, n, m)]["ppl"], r["ppl"]))
    for (n, m, dt), v in sorted(groups.items()):
        print("\n#### DENSE (%s) against the float64 reference, prefill %d, %d steps\n"
              % (dt, n, m))
        print("| window | reference ppl | DENSE ppl | relative difference |")
        print("|---|---|---|---|")
        for name, a, b in sorted(v):
            print("| %s | %.6f | %.6f | %+.2e |" % (name, a, b, b / a - 1))
        rel = [abs(b / a - 1) for _, a, b in v]
        print("| **%d windows** | mean %.4f | mean %.4f | max abs %.2e |"
              % (len(v), statistics.mean(a for _, a, _ in v),
                 statistics.mean(b for _, _, b in v), max(rel)))

    # Ratios to DENSE of the same window and dtype.
    cells = {}
    for r in eng:
        if r["policy"] == "dense":
            continue
        k = (r["text"], r["prefill"], r["steps"], r["dtype"])
        if k not in dense:
            continue
        ratio = math.exp(r["nll"] - dense[k]["nll"])
        key = (r["prefill"], r["steps"], r["dtype"], r["sink"], r["window"], r["page"])
        row = r["policy"] + thr(r)
        cells.setdefault(key, {}).setdefault((row, r["budget"]), []).append(
            (ratio, short(r["text"]), r))
    order = ["resident", "sync", "freekv 0.9", "freekv 0.8", "freekv off"]
    for key in sorted(cells):
        n, m, dt, s, w, p = key
        c = cells[key]
        budgets = sorted({b for _, b in c})
        print("\n#### prefill %d, %d steps, %s, page %d, sink %d, window %d "
              "(%d windows)\n" % (n, m, dt, p, s, w,
                                  max(len(v) for v in c.values())))
        print("ppl ratio to DENSE: mean / median / worst (window); FREEKV: "
              "corrected share of head checks; pages recalled per step "
              "(all layers and KV heads).\n")
        print("| policy | budget | mean | median | worst | worst window | "
              "corrections / checks | pages recalled / step |")
        print("|---|---|---|---|---|---|---|---|")
        rows = sorted({r for r, _ in c}, key=lambda x: order.index(x)
                      if x in order else 99)
        for row in rows:
            for b in budgets:
                v = c.get((row, b))
                if not v:
                    continue
                rs = [x[0] for x in v]
                worst = max(v, key=lambda x: x[0])
                corr = sum(x[2]["corrections"] for x in v)
                chk = sum(x[2]["heads_checked"] for x in v)
                pr = statistics.mean(x[2]["pages_recalled_per_step"] for x in v)
                cc = "%.1f%%" % (100.0 * corr / chk) if chk else "-"
                print("| %s | %d | %.4f | %.4f | %.4f | %s | %s | %.1f |"
                      % (row, b, statistics.mean(rs), statistics.median(rs),
                         worst[0], worst[1], cc, pr))

    # Emulated selection (scripts/hf_reference.py --emulate).
    em = load(os.path.join(d, "emulate-*.jsonl"))
    eg = {}
    for r in em:
        if r["policy"].startswith("emul-"):
            eg.setdefault((r["prefill"], r["steps"], r["sink"], r["window"],
                           r["page"], r["budget"]), {}).setdefault(
                r["policy"][5:], []).append(r)
    # The emulation's Quest selection against the library's RESIDENT.
    res = {(r["text"], r["prefill"], r["steps"], r["budget"], r["sink"],
            r["window"]): r for r in eng
           if r["policy"] == "resident" and r["dtype"] == "f32"}
    pairs = []
    for r in em:
        if r["policy"] != "emul-quest":
            continue
        k = (r["text"], r["prefill"], r["steps"], r["budget"], r["sink"],
             r["window"])
        dk = (r["text"], r["prefill"], r["steps"], "f32")
        if k in res and dk in dense:
            pairs.append((short(r["text"]), r["budget"], r["sink"], r["window"],
                          r["ratio"], math.exp(res[k]["nll"] - dense[dk]["nll"])))
    if pairs:
        print("\n#### Emulated Quest selection against the library's RESIDENT\n")
        print("ppl ratio to dense: emulation (float64, scripts/hf_reference.py) "
              "and engine (f32, RESIDENT against DENSE).\n")
        print("| window | budget | sink/window | emulation | engine | difference |")
        print("|---|---|---|---|---|---|")
        for w, b, sk, wn, a, e in sorted(pairs):
            print("| %s | %d | %d/%d | %.5f | %.5f | %+.1e |" % (w, b, sk, wn, a, e, e - a))
    for key in sorted(eg):
        n, m, s, w, p, b = key
        g = eg[key]
        print("\n#### Emulated selection, prefill %d, %d steps, page %d, sink %d, "
              "window %d, budget %d (%d windows)\n"
              % (n, m, p, s, w, b, len(g.get("quest", []))))
        print("Share of the dense attention mass per layer (mean over query "
              "heads, steps and windows) and ppl ratio to the float64 dense "
              "reference. quest = libfreekv's selection with the current "
              "query (RESIDENT/SYNC); oracle = the K pages of largest true "
              "mass per KV head; quest-oracle-last = quest but the oracle in "
              "the last layer.\n")
        print("| layer | sink | window+partial | quest: selected | quest: missing "
              "| oracle: selected | oracle: missing | worst head (quest missing) |")
        print("|---|---|---|---|---|---|---|---|")
        qs, os_ = g.get("quest", []), g.get("oracle", [])
        L = len(qs[0]["mass"])
        H = len(qs[0]["mass"][0])
        for l in range(L):
            def avg(rows, j, h=None):
                if h is None:
                    return statistics.mean(statistics.mean(r["mass"][l][hh][j]
                                                           for hh in range(H))
                                           for r in rows)
                return statistics.mean(r["mass"][l][h][j] for r in rows)
            wh = max(range(H), key=lambda h: avg(qs, 3, h))
            print("| %d | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.1f%% | "
                  "head %d: %.1f%% |"
                  % (l, 100 * avg(qs, 0), 100 * avg(qs, 1), 100 * avg(qs, 2),
                     100 * avg(qs, 3), 100 * avg(os_, 2), 100 * avg(os_, 3),
                     wh, 100 * avg(qs, 3, wh)))
        for mode, rows in sorted(g.items()):
            rs = [r["ratio"] for r in rows]
            print("\n%s: ppl ratio mean %.4f, median %.4f, worst %.4f (%s)"
                  % (mode, statistics.mean(rs), statistics.median(rs), max(rs),
                     short(max(rows, key=lambda r: r["ratio"])["text"])))


if __name__ == "__main__":
    main()
