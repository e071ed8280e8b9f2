#!/bin/bash
# The real-model sweep of docs/accuracy.md on a machine with a GPU, in
# parallel: float64 references (torch on the GPU), the engine's evals on the
# CUDA path (16 windows, 8K and 32K, every policy, budget and threshold),
# emulated selections, one CPU-backend eval at 32K. JSON lines land in
# $OUT/acc; scripts/real_model_sweep.py $OUT/acc makes the tables.
#   MODEL=DIR PYLIB=DIR scripts/device-accuracy.sh [SECONDS]
# SECONDS (default 500) bounds the whole run; jobs not finished by then are
# stopped (the tables say how many windows each cell holds).
# EXTRA_JOBS=FILE adds lines "CTX WINDOW eval-args..." run after the sweep.
set -u
OUT=${OUT:-device-out}; mkdir -p "$OUT/acc" "$OUT/logs"
export OUT MODEL=${MODEL:?} PYLIB=${PYLIB:?} PYTHON=${PYTHON:-python3}
export LLAMA=${LLAMA:-build/examples/llama}
END=${1:-500}; T0=$SECONDS
left() { echo $((END - (SECONDS - T0))); }
W="_pydecimal turtle inspect typing pydoc tarfile doctest argparse _pyio pickletools zipfile datetime subprocess difflib enum mailbox"
STEPS=${STEPS:-256}
export STEPS
job() { # ctx window eval-args...
    local n=$1 w=$2; shift 2
    WINDOWS=$w OUT=$OUT/acc timeout 300 scripts/real_model_eval.sh engine "$n" "$STEPS" 1 \
        "$@" >>"$OUT/logs/eval.txt" 2>&1
}
export -f job
{
    if [ -z "${ONLY_EXTRA:-}" ]; then
        for n in 32768 8192; do
            for sw in "" "--sink 128 --window 128"; do
                for w in $W; do
                    echo "$n $w --backend cuda --policies dense,resident,sync,freekv --budgets 1024,2048,4096,8192 $sw"
                done
            done
        done
        for n in 32768 8192; do for th in 0.8 off; do for w in $W; do
            echo "$n $w --backend cuda --policies freekv --no-dense --threshold $th --budgets 1024,2048,4096,8192"
        done; done; done
        for w in _pydecimal turtle inspect typing; do
            echo "32768 $w --backend cuda --policies dense,resident,freekv --budgets 2048,4096 --dtype f32"
        done
    fi
    [ -n "${EXTRA_JOBS:-}" ] && cat "$EXTRA_JOBS"
} >"$OUT/logs/jobs.txt"
if [ -z "${ONLY_EXTRA:-}" ]; then
    (for n in 32768 8192; do
        OUT=$OUT/acc timeout "$(left)" scripts/real_model_eval.sh reference "$n" "$STEPS" 16 --torch-cuda
    done) >"$OUT/logs/ref.txt" 2>&1 &
    (for n in 8192 32768; do for w in $W; do echo "$n $w"; done; done |
        OMP_NUM_THREADS=1 timeout "$(left)" xargs -P 3 -L 1 bash -c 'WINDOWS=$1 OUT=$OUT/acc nice \
            scripts/real_model_eval.sh emulate $0 64 1 --torch-cuda --budgets 2048,4096 \
            --sinkwindow 128/128,512/512 --modes quest,oracle,quest-oracle-last,dense-last,rescore:2,rescore:4') \
        >"$OUT/logs/emul.txt" 2>&1 &
    (WINDOWS=typing OUT=$OUT/acc timeout "$(left)" scripts/real_model_eval.sh engine 32768 "$STEPS" 1 \
        --backend cpu --threads 4 --policies dense,resident,freekv --budgets 2048,4096) \
        >"$OUT/logs/cpu32k.txt" 2>&1 &
fi
OMP_NUM_THREADS=1 timeout "$(left)" xargs -P "${JOBS:-3}" -L 1 bash -c 'job "$@"' _ <"$OUT/logs/jobs.txt"
wait
wc -l "$OUT"/acc/*.jsonl
