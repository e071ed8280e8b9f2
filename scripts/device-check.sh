#!/bin/bash
# Runs the test suite (CPU and GPU runs) and compute-sanitizer's memcheck and
# racecheck on a machine with a GPU, with logs and a summary under $OUT.
#   scripts/device-check.sh [test-binary]   (default build/tests/freekv_tests)
# Budget-conscious: each step has a time limit and the summary comes last.
set -u
out=${OUT:-device-out}
mkdir -p "$out"
bin=${1:-build/tests/freekv_tests}
suite=${SANITIZE_SUITE:-gpu:freekv}
limit=${STEP_LIMIT:-90}
summary=()

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1

step() { # name, command...
    local name=$1; shift
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    summary+=("$name: rc=$rc in $((SECONDS - t0)) s: $(grep -E '^[0-9]+%: Checks|GPU suite|ERROR SUMMARY|RACECHECK SUMMARY' "$out/$name.log" | tr '\n' ' ')")
}

step check "$bin"
FKV_TEST_GPU_ONLY=1 CK_RUN_SUITE=$suite step memcheck \
    compute-sanitizer --tool memcheck --error-exitcode 9 "$bin"
FKV_TEST_GPU_ONLY=1 CK_RUN_SUITE=$suite step racecheck \
    compute-sanitizer --tool racecheck --error-exitcode 9 "$bin"

cat "$out/gpu.txt"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
