#!/bin/sh
# Real-model accuracy sweep of docs/accuracy.md section 1: tinylm-code-32k on
# 16 windows of Python 3.11.7 standard-library sources, the engine example's
# eval mode (build/examples/llama) against the float64 reference
# (scripts/hf_reference.py). One JSON line per result in $OUT/*.jsonl;
# scripts/real_model_tables.py turns them into the tables.
#
#   scripts/real_model_eval.sh reference PREFILL STEPS [NWIN] [--torch-cuda]
#   scripts/real_model_eval.sh engine PREFILL STEPS [NWIN] [extra eval args]
#   scripts/real_model_eval.sh emulate PREFILL STEPS [NWIN] [extra args]
#
# Environment: MODEL (default ../shared/models/tinylm-code-32k),
# PYLIB (default: this Python's standard library), OUT (default
# build/accuracy-real), PYTHON (default python3), LLAMA (default
# build/examples/llama).
set -eu
MODEL=${MODEL:-../shared/models/tinylm-code-32k}
PYLIB=${PYLIB:-/root/.pyenv/versions/3.11.7/lib/python3.11}
OUT=${OUT:-build/accuracy-real}
PYTHON=${PYTHON:-python3}
LLAMA=${LLAMA:-build/examples/llama}
# The windows: one file each (every one >= 33 KB, so the 32K windows fit),
# read from byte offset 0. Different modules, different authors and styles.
# WINDOWS="name ..." runs a subset.
FILES=${WINDOWS:-"_pydecimal turtle inspect typing pydoc tarfile doctest argparse
_pyio pickletools zipfile datetime subprocess difflib enum mailbox"}
OFFSET=0
mode=$1; N=$2; M=$3; NWIN=${4:-16}
[ $# -ge 4 ] && shift 4 || shift 3
mkdir -p "$OUT"
i=0
for f in $FILES; do
    i=$((i + 1)); [ $i -gt "$NWIN" ] && break
    t=$PYLIB/$f.py
    case $mode in
    reference)
        $PYTHON scripts/hf_reference.py --model "$MODEL" --text "$t" \
            --offset $OFFSET --prefill "$N" --steps "$M" "$@" --json \
            >> "$OUT/reference-$N-$M.jsonl" ;;
    emulate)
        $PYTHON scripts/hf_reference.py --model "$MODEL" --text "$t" \
            --offset $OFFSET --prefill "$N" --steps "$M" --emulate "$@" \
            --json >> "$OUT/emulate-$N-$M.jsonl" ;;
    engine)
        "$LLAMA" eval --model "$MODEL" --text "$t" \
            --offset $OFFSET --prefill "$N" --steps "$M" "$@" --json |
            sed "s|^{|{\"text\":\"$t\",\"args\":\"$*\",|" \
            > "$OUT/.engine.$$"
        # One append per run: concurrent sweeps must not interleave lines.
        cat "$OUT/.engine.$$" >> "$OUT/engine-$N-$M.jsonl"
        rm -f "$OUT/.engine.$$" ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
    esac
done
