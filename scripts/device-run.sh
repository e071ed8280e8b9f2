#!/bin/bash
# Runs the tests, sanitizers and benchmarks on a machine with a GPU, each
# step under a time limit, logs in $OUT/logs (default device-out/logs),
# packed into $OUT/logs.tgz, and a one-line summary per step last.
#   scripts/device-run.sh STEP...
# steps: check memcheck racecheck synccheck (the test binary: the whole run,
#        then the GPU suite under compute-sanitizer), attend recall decode
#        decode-paper accuracy (the benchmarks), decode-spec (BOUNDED m
#        0.05 at speculative masses 0, 0.01, 0.02),
#        decode-var (DECODE_BIN,
#        DECODE_NAME: another build's decode), plot (a PNG per decode CSV);
#        check-exp memcheck-exp (the same with FKV_CUDA_EXPERIMENTAL=1);
#        llama-selfcheck llama-eval llama-bench (the engine example:
#        LLAMA_BIN, LLAMA_MODEL, LLAMA_TEXT; LLAMA_BENCH_ARGS);
#        suites-san (racecheck and synccheck of each suite in SAN_SUITES,
#        all at once, FKV_CUDA_EXPERIMENTAL as set by the caller; SAN_LIMIT;
#        logs named TOOL-gpu_SUITE.log: the device tool returns no file
#        whose name holds a colon); probe (bench/mapped_probe);
#        recall-bulk (bench/recall with --bulk-gather, 2-8 blocks);
#        host-pool (bench/host_pool); host-costs (bench/host_costs: the
#        runtime calls' host time, graph launches too); ncu (per-kernel times of two eager
#        decode steps, paper trace, for each NCU_SET item: ncu
#        --clock-control none, NCU_ARGS adds bench/decode flags; summed per
#        kernel by scripts/ncu_kernels.py into ncu-NAME.txt); ncu-source
#        (source counters of the kernels matching NCU_KERNEL, default
#        select_kernel, in two eager steps of DECODE_BIN, default
#        build/bench/decode, for each NCU_SOURCE_SET item
#        name=policy:context:batch: the source page as CSV and its summary
#        by scripts/ncu_source.py; the SASS page and, where the kernel's
#        object NCU_OBJECT (default build/kernels/select.cu.o) and nvdisasm
#        are there, the stall samples by statement of NCU_FRAME (default
#        select.cu:1-99999) by scripts/ncu_stalls.py; samples every 32
#        cycles; build with NVCCFLAGS="-O3 -lineinfo");
#        x2 (issue 15 on a two-GPU machine; run check too, whose GPU suite
#        then has the multi-device suite: bench/decode at 128K batch 8, the
#        engine's bench at 128K batch 8, and --tp 2 against one GPU at 32K
#        and 128K; LLAMA_BIN; HOST_MEM_GIB; NCCL_NVLS_ENABLE=0).
# DECODE_ARGS / ACCURACY_ARGS pass flags; *_LIMIT set the time limits.
# Binaries come from build/ (make check; make bench), built beforehand
# where Check is installed (the test binary links its static archives).
set -u
out=${OUT:-device-out}
logs=$out/logs
mkdir -p "$logs"
summary=()
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader >"$logs/gpu.txt" 2>&1
free -g >>"$logs/gpu.txt"

step() { # name, limit, command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    summary+=("$name: rc=$rc in $((SECONDS - t0)) s $(grep -E '^[0-9]+%: Checks|GPU suite|Multi-device suite|ERROR SUMMARY|RACECHECK SUMMARY|^selfcheck-gpu: (PASS|FAIL)' "$logs/$name.log" | tr '\n' ' ')")
}

for s in "$@"; do
    case $s in
    check) step check "${CHECK_LIMIT:-150}" build/tests/freekv_tests ;;
    memcheck) FKV_TEST_GPU_ONLY=1 step memcheck "${MEMCHECK_LIMIT:-240}" compute-sanitizer --tool memcheck \
            --report-api-errors no --error-exitcode 9 build/tests/freekv_tests ;;
    racecheck) FKV_TEST_GPU_ONLY=1 CK_RUN_SUITE=gpu:freekv step racecheck 120 \
            compute-sanitizer --tool racecheck --error-exitcode 9 build/tests/freekv_tests ;;
    synccheck) FKV_TEST_GPU_ONLY=1 CK_RUN_SUITE=gpu:freekv step synccheck 120 \
            compute-sanitizer --tool synccheck --error-exitcode 9 build/tests/freekv_tests ;;
    check-exp) FKV_CUDA_EXPERIMENTAL=1 step check-exp "${CHECK_LIMIT:-150}" build/tests/freekv_tests ;;
    memcheck-exp) FKV_CUDA_EXPERIMENTAL=1 FKV_TEST_GPU_ONLY=1 step memcheck-exp "${MEMCHECK_LIMIT:-240}" \
            compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 \
            build/tests/freekv_tests ;;
    llama-selfcheck) step llama-selfcheck 240 "$LLAMA_BIN" selfcheck-gpu \
            --model "$LLAMA_MODEL" --text "$LLAMA_TEXT" ;;
    llama-eval) for be in cuda cpu; do
            step "llama-eval-$be" 200 "$LLAMA_BIN" eval --backend $be --model "$LLAMA_MODEL" \
                --text "$LLAMA_TEXT" --prefill 8192 --steps 128 \
                --policies dense,resident,sync,freekv --budgets 1024,2048,4096 --json
        done ;;
    llama-bench) # LLAMA_BENCH_SET: context:batch[:graph] items; LLAMA_BENCH_ARGS adds flags
        for item in ${LLAMA_BENCH_SET:-32768:1 32768:1:graph 32768:8 32768:8:graph 131072:1 131072:4}; do
            IFS=: read -r ctx b g <<<"$item"
            step "llama-bench-$ctx-$b${g:+-graph}" 200 "$LLAMA_BIN" bench --backend cuda \
                ${g:+--graph} --shape llama3-8b --batch "$b" --context "$ctx" --steps 20 \
                --policies dense,resident,sync,freekv ${LLAMA_BENCH_ARGS:-}
        done ;;
    suites-san) # every (tool, suite) at once: racecheck runs are slow
        for t in racecheck synccheck; do for su in ${SAN_SUITES:?}; do
            FKV_TEST_GPU_ONLY=1 CK_RUN_SUITE=$su timeout "${SAN_LIMIT:-480}" \
                compute-sanitizer --tool $t --error-exitcode 9 build/tests/freekv_tests \
                >"$logs/$t-${su//:/_}.log" 2>&1 &
        done; done
        wait
        for f in "$logs"/racecheck-gpu_*.log "$logs"/synccheck-gpu_*.log; do
            [ -e "$f" ] && summary+=("$(basename "$f" .log): $(grep -E '^[0-9]+%: Checks|SUMMARY' "$f" | tr '\n' ' ')")
        done ;;
    attend) step attend "${ATTEND_LIMIT:-150}" build/bench/attend --csv "$logs/attend.csv" ;;
    recall) step recall "${RECALL_LIMIT:-150}" build/bench/recall --csv "$logs/recall.csv" ;;
    recall-bulk) step recall-bulk "${RECALL_LIMIT:-150}" build/bench/recall --bulk-gather \
            --blocks 2,4,8 --conc-blocks 2,4,8 --csv "$logs/recall-bulk.csv" ;;
    probe) step probe "${PROBE_LIMIT:-90}" build/bench/mapped_probe --csv "$logs/probe.csv" ;;
    host-costs) step host-costs "${HOST_COSTS_LIMIT:-90}" build/bench/host_costs ;;
    host-pool) step host-pool "${HOST_POOL_LIMIT:-90}" build/bench/host_pool \
            --csv "$logs/host_pool.csv" ;;
    ncu) # NCU_SET: name=policy:context:batch[:criterion] items; bench/decode
        # brackets its eager timed steps with cudaProfilerStart/Stop, so
        # --profile-from-start off sees those steps only (GEMMs included)
        for item in ${NCU_SET:-freekv-32k-b1=FREEKV:32768:1 resident-32k-b1=RESIDENT:32768:1}; do
            name=${item%%=*}; IFS=: read -r pol ctx b crit <<<"${item#*=}"
            step "ncu-$name" "${NCU_LIMIT:-150}" ncu --clock-control none --profile-from-start off \
                --metrics gpu__time_duration.sum --csv \
                build/bench/decode --contexts "$ctx" --batches "$b" --policies "$pol" \
                --criterion "${crit:-cosine}" --trace paper --steps 2 --warmup 3 \
                --churn-steps 0 ${NCU_ARGS:-}
            python3 scripts/ncu_kernels.py "$logs/ncu-$name.log" >"$logs/ncu-$name.txt" 2>&1
        done ;;
    ncu-source)
        for item in ${NCU_SOURCE_SET:-freekv-32k-b1=FREEKV:32768:1 resident-32k-b1=RESIDENT:32768:1}; do
            name=${item%%=*}; IFS=: read -r pol ctx b <<<"${item#*=}"
            step "ncu-source-$name" "${NCU_LIMIT:-150}" ncu --clock-control none \
                --profile-from-start off -k regex:"${NCU_KERNEL:-select_kernel}" -c 2 \
                --section SpeedOfLight --section SourceCounters --section WarpStateStats \
                --warp-sampling-interval 0 \
                --import-source yes -f -o "$logs/ncu-source-$name" "${DECODE_BIN:-build/bench/decode}" \
                --contexts "$ctx" --batches "$b" --policies "$pol" --trace paper --steps 2 \
                --warmup 2 --churn-steps 0
            ncu -i "$logs/ncu-source-$name.ncu-rep" --page source --csv --print-source cuda,sass \
                >"$logs/ncu-source-$name.csv" 2>&1
            python3 scripts/ncu_source.py "$logs/ncu-source-$name.csv" \
                >"$logs/ncu-source-$name.txt" 2>&1
            ncu -i "$logs/ncu-source-$name.ncu-rep" --page source --csv --print-source sass \
                >"$logs/ncu-sass-$name.csv" 2>&1
            obj=$(realpath -e "${NCU_OBJECT:-build/kernels/select.cu.o}" 2>/dev/null)
            dis=()
            if [ -n "$obj" ] && command -v nvdisasm >/dev/null; then
                tmp=$(mktemp -d)
                (cd "$tmp" && cuobjdump -xelf all "$obj" >/dev/null 2>&1)
                for cubin in "$tmp"/*sm_90*.cubin; do
                    [ -f "$cubin" ] && nvdisasm -gi -c "$cubin" >"$logs/ncu-dis-$name.txt" 2>&1 &&
                        dis=(--disasm "$logs/ncu-dis-$name.txt" --frame "${NCU_FRAME:-select.cu:1-99999}")
                done
                rm -rf "$tmp"
            fi
            kernels=$(grep -o '^"Kernel Name","[^"]*' "$logs/ncu-sass-$name.csv" | cut -d'"' -f4 | sort -u)
            while IFS= read -r k; do
                [ -n "$k" ] && python3 scripts/ncu_stalls.py "$logs/ncu-sass-$name.csv" "$k" \
                    "${dis[@]}" --source-root kernels
            done <<<"$kernels" >"$logs/ncu-stalls-$name.txt" 2>&1
            rm -f "$logs/ncu-source-$name.ncu-rep"
        done ;;
    x2) # issue 15: what needs two GPUs' host memory or two GPUs
        export NCCL_NVLS_ENABLE=0 # the device's KINDS.md: no NVLink multicast
        step x2-decode-128k-b8 "${DECODE_LIMIT:-300}" build/bench/decode --contexts 131072 \
            --batches 8 --trace paper --graph --steps 20 --warmup 3 --churn-steps 0 \
            --policies FREEKV,SYNC,RESIDENT,DENSE --host-mem-gib "${HOST_MEM_GIB:-220}" \
            --csv "$logs/x2-decode-128k-b8.csv" # rows that do not fit: reported, not run
        step x2-llama-128k-b8 300 "$LLAMA_BIN" bench --backend cuda --graph --shape llama3-8b \
            --batch 8 --context 131072 --steps 10 --policies freekv,sync
        for ctx in 32768 131072; do for tp in 1 2; do
            step "x2-llama-tp$tp-$ctx" 300 "$LLAMA_BIN" bench --backend cuda --graph --tp $tp \
                --shape llama3-8b --batch 1 --context $ctx --steps 20 --policies freekv,resident
        done; done ;;
    decode-var) # DECODE_BIN, DECODE_NAME: a variant build's decode
        step "$DECODE_NAME" "${DECODE_LIMIT:-300}" "$DECODE_BIN" \
            --csv "$logs/$DECODE_NAME.csv" ${DECODE_ARGS:-} ;;
    decode) step decode "${DECODE_LIMIT:-300}" build/bench/decode --csv "$logs/decode.csv" \
            ${DECODE_ARGS:-} ;;
    decode-paper) step decode-paper "${DECODE_LIMIT:-300}" build/bench/decode --trace paper \
            --csv "$logs/decode-paper.csv" ${DECODE_ARGS:-} ;;
    decode-spec) # BOUNDED's speculative_min_mass, 32K
        for sm in 0 0.01 0.02; do
            step "decode-spec-$sm" "${DECODE_LIMIT:-300}" \
                build/bench/decode --trace paper --graph --contexts 32768 --batches 1,8 \
                --policies FREEKV,RESIDENT --criterion bounded --min-mass 0.05 \
                --spec-mass $sm --csv "$logs/decode-spec-$sm.csv" ${DECODE_ARGS:-}
        done ;;
    plot) for f in "$logs"/decode*.csv; do
              python3 bench/plot_decode.py "$f" -o "$out/$(basename "$f" .csv).png" \
                  >>"$logs/plot.log" 2>&1
          done ;;
    accuracy) step accuracy "${ACCURACY_LIMIT:-300}" build/bench/accuracy --backend cuda \
            --csv "$logs/accuracy-cuda.csv" ${ACCURACY_ARGS:-} ;;
    *) echo "unknown step $s" >&2 ;;
    esac
done
printf '%s\n' "${summary[@]}" >>"$logs/summary.txt"
if [ -z "${NO_PACK:-}" ]; then # NO_PACK=1: several runs in parallel, pack later
    tar -C "$out" -czf "$out/logs.tgz" logs
    cp "$logs/summary.txt" "$out/"
fi
cat "$logs/gpu.txt"
printf '%s\n' "${summary[@]}"
