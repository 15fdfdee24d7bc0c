#!/usr/bin/env bash
# The prepared device check: what a short GPU lending runs, in one command, on a host with the
# NVIDIA driver, CUDA libraries, bash, coreutils, grep, sed and awk (no Rust, no Python).
#
#     scripts/gpu-build.sh                      # here, where cargo is: writes gpu-bin/
#     scripts/gpu-check.sh RESULTS              # there (carry gpu-bin): on the GPU
#     DEVICE=cpu scripts/gpu-check.sh RESULTS   # anywhere: the same plumbing at small sizes (CI)
#
# Stages, each under its own time limit (seconds on a GPU / on the CPU); a stage that fails or
# runs out of time says so, and the next one still runs:
#   probe   20 / 30   the device opens (kernels compile under NVRTC, handles open)
#   tests  150 / 60   the test binaries with GPU bodies, PHLORA_TEST_DEVICE=$DEVICE (on a GPU with
#                     --include-ignored: the GPU-only tests are ignored elsewhere)
#   bench   60 / 20   phlora bench at Llama-3-70B's four shapes, r 64 (targets on 28672×8192),
#                     and the ΔW kernel against a device copy
#   e2e    110 / 40   a small synth pair on the CPU and on DEVICE, compared (`phlora compare`);
#                     determinism with cmp: a rerun, --in-flight 1 vs 2, killed + --resume,
#                     two shards + combine; a bound that streams matrices in row blocks
#   70b    rest       Llama-3-70B shapes (as many layers as the time left allows) against
#                     `phlora floor`, and under --max-vram 4G with peak memory sampled by
#                     nvidia-smi (on the CPU: 1/8 of the widths, --max-ram, peak RSS);
#                     LAYERS70=N sets the layers (and LIMIT the time) for a longer run
# In all ≤ 8 minutes on an H200 (LIMIT, default 450 s, plus ≤ 5 s per stage to stop one that
# overruns) and ≤ 3 on two CPU cores.
#
# RESULTS gets result.json (every stage and check, with figures), table.txt (printed last),
# the raw JSON of each phlora run, and logs. PACK=DIR also puts result.json, table.txt and all
# of RESULTS as gpu-check.tar.gz into DIR (three files, for a device tool that brings back few):
#
#     PACK=$OUT scripts/gpu-check.sh /tmp/gpu-check
#
# Exit 1 if a check failed or a stage ran out of time; a missed speed target is shown as
# "miss" and does not fail the run.
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: $0 RESULTS_FOLDER   (env: DEVICE=cuda|cpu, BIN, LIMIT, PACK)" >&2; exit 2; }
# Folders as the caller means them, before the script moves to the repository root.
R=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "gpu-check: cannot create $1" >&2; exit 2; }
export R
if [ -n "${PACK:-}" ]; then
    PACK=$(mkdir -p "$PACK" && cd "$PACK" && pwd) || { echo "gpu-check: cannot create PACK" >&2; exit 2; }
fi
if [ -n "${BIN:-}" ]; then
    BIN=$(cd "$BIN" && pwd) || { echo "gpu-check: no folder BIN=$BIN" >&2; exit 2; }
fi
cd "$(dirname "$0")/.."
export DEVICE=${DEVICE:-cuda}
case $DEVICE in cuda | cpu) ;; *) echo "gpu-check: DEVICE must be cuda or cpu" >&2; exit 2 ;; esac
export BIN=${BIN:-gpu-bin}
export P=$BIN/phlora
for f in "$P" "$BIN/test-lib" "$BIN/test-linalg" "$BIN/test-extract"; do
    [ -x "$f" ] || { echo "gpu-check: $f is missing: run scripts/gpu-build.sh first" >&2; exit 2; }
done
if [ -n "${WORK:-}" ]; then OWN_WORK=""; else WORK=$(mktemp -d); OWN_WORK=1; fi
export WORK
if [ "$DEVICE" = cuda ]; then LIMIT=${LIMIT:-450}; else LIMIT=${LIMIT:-175}; fi
START=$(date +%s)
: >"$R/checks.tsv"
: >"$R/figures.tsv"

# --- helpers (exported: each stage runs in its own bash under `timeout`) ---------------------

# check STAGE NAME STATUS DETAIL: one line of the table (STATUS ok, FAIL, miss or n/a).
check() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$R/checks.tsv"; }
# figure STAGE KEY NUMBER: a measured figure for result.json.
figure() { [ -n "$3" ] && printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$R/figures.tsv"; return 0; }
# jnum FILE KEY: the first number under "KEY" in a phlora JSON file (keys are chosen unique).
jnum() { grep -o "\"$2\": *-\?[0-9][0-9.eE+-]*" "$1" 2>/dev/null | head -1 | sed 's/.*: *//'; }
# jstr FILE KEY: the first string under "KEY".
jstr() { grep -o "\"$2\": *\"[^\"]*\"" "$1" 2>/dev/null | head -1 | sed 's/.*: *"//; s/"$//'; }
# calc EXPR: floating-point arithmetic (awk); cmp_le A B: A ≤ B.
calc() { awk "BEGIN { printf \"%.6g\", $1 }"; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 <= b + 0) }'; }
# ph ARGS: phlora on the chosen device, errors kept in the stage log.
ph() { "$P" -q "$@"; }
export -f check figure jnum jstr calc le ph

# --- stages ------------------------------------------------------------------------------

stage_probe() {
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader \
            >"$R/nvidia-smi.txt" 2>&1
        figure probe memory_used_mib_before "$(nvidia-smi --query-gpu=memory.used \
            --format=csv,noheader,nounits -i 0 2>/dev/null | head -1)"
    fi
    if ph bench --device "$DEVICE" --shapes 256x128 --ranks 8 --reps 1 --no-delta --json \
        >"$R/probe.json" 2>"$R/probe.log"; then
        check probe device ok "$(jstr "$R/probe.json" device)"
    else
        check probe device FAIL "$(tail -1 "$R/probe.log")"
    fi
}

stage_tests() {
    local t counts rc each
    for t in lib linalg extract; do
        # At most half the stage each, so one binary that hangs leaves time for the others, and
        # never past the stage's end (this timeout, not the stage's, stops it and its children).
        each=$((STAGE_LIMIT / 2))
        left=$((STAGE_DEADLINE - $(date +%s) - 2))
        [ $left -lt $each ] && each=$left
        [ $each -ge 1 ] || { check tests "test-$t" FAIL "not run: no time left in the stage"; continue; }
        if [ "$DEVICE" = cuda ]; then
            PHLORA_TEST_DEVICE=cuda PHLORA_BIN=$P timeout -k 5 $each "$BIN/test-$t" --test-threads=4 --include-ignored \
                >"$R/test-$t.log" 2>&1
        else
            env -u PHLORA_TEST_DEVICE PHLORA_BIN=$P timeout -k 5 $each "$BIN/test-$t" --test-threads=2 >"$R/test-$t.log" 2>&1
        fi
        rc=$?
        if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            check tests "test-$t" FAIL "ran out of its $each s: $(grep -c ' ok$' "$R/test-$t.log") tests had passed"
            continue
        fi
        counts=$(awk '/^test result:/ { printf "%s passed, %s failed, %s ignored", $4, $6, $8 }' "$R/test-$t.log")
        if [ $rc -eq 0 ] && [ -n "$counts" ]; then
            check tests "test-$t" ok "$counts"
        else
            check tests "test-$t" FAIL "rc=$rc ${counts:-no result}: $(grep -m3 -E 'FAILED|panicked' "$R/test-$t.log" | tr '\n' ' ')"
        fi
        figure tests "test_${t}_failed" "$(awk '/^test result:/ { print $6 }' "$R/test-$t.log")"
    done
}

# bench_row FILE ROWS COLS RANK: that row's object of a bench JSON, for jnum.
bench_row() {
    awk -v RS='}' -v r="\"rows\": $2," -v c="\"cols\": $3," -v k="\"rank\": $4," \
        'index($0, r) && index($0, c) && index($0, k) { print; exit }' "$1"
}
export -f bench_row

stage_bench() {
    # Llama-3-70B's four layer shapes at r 64; the target is set on the MLP's 28672×8192.
    local shapes=8192x8192,1024x8192,28672x8192,8192x28672 rank=64 m=28672 n=8192
    [ "$DEVICE" = cpu ] && shapes=2048x1024,1024x2048 rank=16 m=2048 n=1024
    if ! ph bench --device "$DEVICE" --shapes $shapes --ranks $rank --json >"$R/bench.json" 2>"$R/bench.log"; then
        check bench "rsvd r$rank" FAIL "$(tail -1 "$R/bench.log")"
        return
    fi
    bench_row "$R/bench.json" $m $n $rank >"$R/bench-row.json"
    local s res opt ratio ms shape=${m}x$n
    s=$(jnum "$R/bench-row.json" seconds)
    res=$(jnum "$R/bench-row.json" residual)
    opt=$(jnum "$R/bench-row.json" optimum)
    [ -n "$s" ] && [ -n "$res" ] && [ -n "$opt" ] ||
        { check bench "rsvd $shape r$rank" FAIL "no $shape r$rank row in bench.json"; return; }
    ratio=$(calc "$res / $opt")
    ms=$(calc "$s * 1000")
    figure bench rsvd_ms "$ms"
    figure bench rsvd_residual_over_optimum "$ratio"
    figure bench rsvd_gflops "$(jnum "$R/bench-row.json" gflops)"
    if le "$ratio" 1.01; then
        check bench "rsvd $shape r$rank" ok "$ms ms, residual $ratio x the optimum (<= 1.01); all shapes in bench.log"
    else
        check bench "rsvd $shape r$rank" FAIL "residual $ratio x the optimum (over 1.01)"
    fi
    if [ "$DEVICE" = cuda ]; then
        le "$ms" 4 && check bench "rsvd time <= 4 ms" ok "$ms ms" || check bench "rsvd time <= 4 ms" miss "$ms ms"
        local k c frac
        k=$(jnum "$R/bench.json" kernel_bytes_per_s)
        c=$(jnum "$R/bench.json" copy_bytes_per_s)
        if [ -n "$k" ] && [ -n "$c" ]; then
            frac=$(calc "$k / $c")
            figure bench delta_kernel_tb_per_s "$(calc "$k / 1e12")"
            figure bench device_copy_tb_per_s "$(calc "$c / 1e12")"
            figure bench delta_kernel_fraction_of_copy "$frac"
            le 0.85 "$frac" && st=ok || st=miss
            check bench "dW kernel >= 85% of a copy" $st "$(calc "$k / 1e12") TB/s = $(calc "100 * $frac")% of $(calc "$c / 1e12") TB/s"
        else
            check bench "dW kernel >= 85% of a copy" FAIL "no delta_kernel figures in bench.json"
        fi
    else
        check bench "dW kernel vs copy" n/a "GPU only"
    fi
}

# e2e_run TAG ARGS: extract the small pair into $WORK/TAG (JSON in $R/e2e-TAG.json).
e2e_run() {
    local tag=$1; shift
    ph extract --base "$WORK/pair/base" --ft "$WORK/pair/ft" --out "$WORK/$tag" --json "$@" \
        >"$R/e2e-$tag.json" 2>"$R/e2e-$tag.log"
}
export -f e2e_run

stage_e2e() {
    local synth=(--layers 2)
    [ "$DEVICE" = cpu ] && synth=(--layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --vocab 4096)
    ph synth --out "$WORK/pair" "${synth[@]}" --force 2>"$R/e2e-synth.log" ||
        { check e2e synth FAIL "$(tail -1 "$R/e2e-synth.log")"; return; }
    e2e_run cpu --device cpu || { check e2e "extract on cpu" FAIL "$(tail -1 "$R/e2e-cpu.log")"; return; }
    e2e_run dev --device "$DEVICE" || { check e2e "extract on $DEVICE" FAIL "$(tail -1 "$R/e2e-dev.log")"; return; }
    figure e2e cpu_seconds "$(jnum "$R/e2e-cpu.json" seconds)"
    figure e2e device_seconds "$(jnum "$R/e2e-dev.json" seconds)"
    figure e2e total_relative_error "$(jnum "$R/e2e-dev.json" total_relative_error)"
    # CPU against the device, within the tolerances docs/determinism.md promises across devices.
    local others=("$WORK/dev")
    if [ "$DEVICE" = cuda ]; then
        e2e_run dev-f32 --device cuda --gemm f32 && others+=("$WORK/dev-f32") ||
            check e2e "extract --gemm f32" FAIL "$(tail -1 "$R/e2e-dev-f32.log")"
    fi
    # A bound that fits the layer matrices whole but not the embedding and lm_head, which then
    # stream through the blocked randomized SVD.
    local bound=(--max-vram 1400M)
    [ "$DEVICE" = cpu ] && bound=(--max-ram 75M)
    if e2e_run dev-blocked --device "$DEVICE" "${bound[@]}"; then
        local blocked
        blocked=$(grep -c '"row_blocks"' "$WORK/dev-blocked/report.json")
        [ "$blocked" -ge 2 ] && check e2e "${bound[*]} streams row blocks" ok "$blocked matrices in row blocks" ||
            check e2e "${bound[*]} streams row blocks" FAIL "only $blocked matrices in row blocks"
        others+=("$WORK/dev-blocked")
    else
        check e2e "extract ${bound[*]}" FAIL "$(tail -1 "$R/e2e-dev-blocked.log")"
    fi
    local worst compared
    if "$P" compare "$WORK/cpu" "${others[@]}" --json >"$R/compare.json" 2>"$R/compare.log"; then
        worst=$(grep -o '"worst_product": *[0-9.eE+-]*' "$R/compare.json" | sed 's/.*: *//' | sort -g | tail -1)
        # Residuals and ‖ΔW‖ must have been compared too, not only the products.
        compared=$(grep -o '"report_tensors": *[0-9]*' "$R/compare.json" | sed 's/.*: *//' | sort -n | head -1)
        if [ "${compared:-0}" -gt 0 ]; then
            check e2e "cpu vs $DEVICE (compare)" ok "${#others[@]} adapters agree; worst ΔB·A $worst; residuals and ‖ΔW‖ of $compared tensors"
        else
            check e2e "cpu vs $DEVICE (compare)" FAIL "no tensor's residual was compared (report.json missing?)"
        fi
        figure e2e worst_product_difference "$worst"
    else
        check e2e "cpu vs $DEVICE (compare)" FAIL "$(grep -E 'DIFFER|error' "$R/compare.log" | head -2 | tr '\n' ' ')"
    fi
    # Determinism on DEVICE: each of these gives the first run's bytes.
    local same=() why="" o
    e2e_run again --device "$DEVICE" && same+=(again)
    e2e_run in-flight-1 --device "$DEVICE" --in-flight 1 && same+=(in-flight-1)
    # The first run must really be stopped part-way, or "resumed" would be a plain rerun.
    if PHLORA_TEST_CRASH_AFTER=5 e2e_run resumed --device "$DEVICE"; then
        why="the run meant to crash after 5 tensors finished; "
    fi
    e2e_run resumed --device "$DEVICE" --resume && same+=(resumed)
    e2e_run part1 --device "$DEVICE" --shard 1/2 && e2e_run part2 --device "$DEVICE" --shard 2/2 &&
        "$P" -q combine "$WORK/part1" "$WORK/part2" --out "$WORK/combined" >/dev/null 2>"$R/e2e-combine.log" &&
        same+=(combined)
    [ ${#same[@]} -eq 4 ] || why+="only ${#same[@]} of 4 runs finished (${same[*]}); "
    for o in "${same[@]}"; do
        cmp -s "$WORK/dev/adapter_model.safetensors" "$WORK/$o/adapter_model.safetensors" || why+="$o differs; "
    done
    [ -z "$why" ] && check e2e "determinism on $DEVICE (cmp)" ok "${same[*]}: identical to the first run" ||
        check e2e "determinism on $DEVICE (cmp)" FAIL "$why"
}

# measure NAME ARGS: runs phlora with JSON to $R/NAME.json; on a GPU samples device memory
# every 50 ms (nvidia-smi) and records the peak above what was in use before, in MiB. nvidia-smi
# index 0 is taken to be CUDA device 0 (the runs say --devices 0): true on a one-GPU host; on
# a MIG slice memory.used is the whole GPU's.
measure() {
    local name=$1; shift
    local before="" sampler=""
    if [ "$DEVICE" = cuda ]; then
        before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | grep -E '^[0-9]+$' | head -1)
        # One nvidia-smi sampling every 50 ms (a new process per sample would miss short peaks).
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 50 >"$R/$name.vram" 2>/dev/null &
        sampler=$!
    fi
    "$P" -q "$@" --json >"$R/$name.json" 2>"$R/$name.log"
    local rc=$?
    if [ -n "$sampler" ]; then
        kill "$sampler" 2>/dev/null
        wait "$sampler" 2>/dev/null
        local peak
        peak=$(grep -E '^[0-9]+$' "$R/$name.vram" | sort -n | tail -1)
        if [ -n "$peak" ] && [ -n "$before" ]; then echo $((peak - before)) >"$R/$name.peak"; fi
    fi
    return $rc
}
export -f measure

stage_70b() {
    local shapes layers small bound
    if [ "$DEVICE" = cuda ]; then
        shapes=(--hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8 --vocab 128256)
        # ~25 s per layer in all (synth, page cache, floor, two extractions); keep 40 s spare.
        layers=$(((STAGE_LIMIT - 40) / 25))
        [ $layers -gt 8 ] && layers=8
        layers=${LAYERS70:-$layers}
        small=4G bound=--max-vram
    else
        shapes=(--hidden 1024 --intermediate 3584 --heads 8 --kv-heads 1 --vocab 16032)
        layers=$(((STAGE_LIMIT - 10) / 10))
        [ $layers -gt 2 ] && layers=2
        small=100M bound=--max-ram
    fi
    [ $layers -ge 1 ] || { check 70b "70B shapes" FAIL "no time left for one layer (${STAGE_LIMIT} s)"; return; }
    local pair=$WORK/pair-70b
    ph synth --out "$pair" "${shapes[@]}" --layers $layers --delta-rank 64 --force 2>"$R/70b-synth.log" ||
        { check 70b synth FAIL "$(tail -1 "$R/70b-synth.log")"; return; }
    cat "$pair"/base/*.safetensors "$pair"/ft/*.safetensors >/dev/null # into the page cache
    local one=()
    [ "$DEVICE" = cuda ] && one=(--devices 0)
    measure floor floor --base "$pair/base" --ft "$pair/ft" --device "$DEVICE" "${one[@]}" ||
        { check 70b floor FAIL "$(tail -1 "$R/floor.log")"; return; }
    local fl gb
    fl=$(jnum "$R/floor.json" seconds)
    gb=$(calc "$(jnum "$R/floor.json" bytes) / 1e9")
    figure 70b layers "$layers"
    figure 70b input_gb "$gb"
    figure 70b floor_seconds "$fl"
    if measure extract extract --base "$pair/base" --ft "$pair/ft" --out "$WORK/a70" --rank 64 \
        --device "$DEVICE" "${one[@]}" --force; then
        local ex ratio
        ex=$(jnum "$R/extract.json" seconds)
        ratio=$(calc "$ex / $fl")
        figure 70b extract_seconds "$ex"
        figure 70b extract_over_floor "$ratio"
        figure 70b max_residual "$(jnum "$R/extract.json" max_residual)"
        if [ "$DEVICE" = cpu ]; then
            st=n/a # compute-bound on a few cores: the target is for a GPU
        else
            le "$ratio" 1.3 && st=ok || st=miss
        fi
        check 70b "extract <= 1.3x floor" $st "$layers layers, $gb GB: extract $(calc "$ex") s, floor $(calc "$fl") s = $ratio x"
    else
        check 70b "extract r64" FAIL "$(tail -1 "$R/extract.log")"
    fi
    if measure bounded extract --base "$pair/base" --ft "$pair/ft" --out "$WORK/a70-bounded" --rank 64 \
        --device "$DEVICE" "${one[@]}" "$bound" "$small" --force; then
        local peak limit blocked
        blocked=$(grep -c '"row_blocks"' "$WORK/a70-bounded/report.json")
        if [ "$DEVICE" = cuda ]; then
            peak=$(cat "$R/bounded.peak" 2>/dev/null)
            [ -n "$peak" ] || { check 70b "$bound $small holds" FAIL "no nvidia-smi samples"; return; }
            limit=4096
        else
            peak=$(calc "$(jnum "$R/bounded.json" peak_rss_bytes) / 1048576")
            limit=100
        fi
        figure 70b bounded_peak_mib "$peak"
        figure 70b bounded_seconds "$(jnum "$R/bounded.json" seconds)"
        le "$peak" "$limit" && st=ok || st=FAIL
        check 70b "$bound $small holds" $st "peak $peak MiB (limit $limit), $blocked matrices in row blocks"
        if [ "$DEVICE" = cuda ]; then
            # What the model allows outside the memory pool against what it took: the peak less
            # the pool's high-water mark (phlora's own allocations) is the context with its
            # modules (CONTEXT_VRAM, 640 MiB) and each worker's cuBLAS workspace (32 MiB).
            local pool ctx workers model
            pool=$(calc "$(jnum "$R/bounded.json" device_pool_peak_bytes) / 1048576")
            workers=$(grep -c '"busy_seconds"' "$R/bounded.json")
            model=$((640 + 32 * workers))
            ctx=$(calc "$peak - $pool")
            figure 70b pool_peak_mib "$pool"
            figure 70b outside_pool_mib "$ctx"
            le "$ctx" $model && st=ok || st=miss
            check 70b "outside the pool <= model" $st "peak $peak MiB = pool $pool MiB + $ctx MiB outside it (model: $model MiB for the context and $workers workers' cuBLAS workspaces)"
        fi
    else
        check 70b "extract $bound $small" FAIL "$(tail -1 "$R/bounded.log")"
    fi
}

export -f stage_probe stage_tests stage_bench stage_e2e stage_70b

# --- the run -----------------------------------------------------------------------------

# run_stage NAME GPU_LIMIT CPU_LIMIT (0: whatever is left of LIMIT).
STAGES=()
run_stage() {
    local name=$1 limit=$2
    [ "$DEVICE" = cpu ] && limit=$3
    local left=$((LIMIT - ($(date +%s) - START)))
    if [ "$limit" -eq 0 ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "== $name (limit ${limit} s)"
    local t0 rc status
    t0=$(date +%s)
    if [ "$limit" -le 0 ]; then
        rc=124
    else
        STAGE_LIMIT=$limit STAGE_DEADLINE=$((t0 + limit)) timeout -k 5 "$limit" bash -c "stage_$name" \
            >"$R/stage-$name.log" 2>&1
        rc=$?
    fi
    local secs=$(($(date +%s) - t0))
    if [ "$limit" -le 0 ]; then
        status=timeout
        check "$name" "stage" FAIL "not run: the check's LIMIT of $LIMIT s was spent"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status=timeout
        check "$name" "stage" FAIL "ran out of its ${limit} s (what it finished is above)"
    elif [ $rc -ne 0 ]; then
        status=failed
        check "$name" "stage" FAIL "the stage script exited $rc (stage-$name.log)"
    elif grep -q "^$name	[^	]*	FAIL" "$R/checks.tsv"; then
        status=failed
    else
        status=ok
    fi
    STAGES+=("$name	$status	$secs	$limit")
    grep "^$name	" "$R/checks.tsv" | cut -f2- | sed 's/\t/  /g; s/^/   /'
}
export STAGE_LIMIT=0 STAGE_DEADLINE=0

run_stage probe 20 30
run_stage tests 150 60
run_stage bench 60 20
run_stage e2e 110 40
run_stage 70b 0 0

# --- result.json and the table -----------------------------------------------------------

esc() { sed 's/\\/\\\\/g; s/"/\\"/g; s/\t/ /g' | tr -d '\000-\037'; }
commit=$(cat "$BIN/COMMIT" 2>/dev/null || echo unknown)
failed=0
{
    printf '{\n  "commit": "%s",\n  "device": "%s",\n  "date": "%s",\n' \
        "$(echo "$commit" | esc)" "$DEVICE" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf '  "limit_s": %s,\n  "seconds": %s,\n  "stages": [\n' "$LIMIT" "$(($(date +%s) - START))"
    n=0
    for s in "${STAGES[@]}"; do
        IFS=$'\t' read -r name status secs limit <<<"$s"
        [ "$status" = ok ] || failed=1
        [ $n -gt 0 ] && printf ',\n'
        n=$((n + 1))
        printf '    {"name": "%s", "status": "%s", "seconds": %s, "limit_s": %s,\n     "checks": [' \
            "$name" "$status" "$secs" "$limit"
        m=0
        while IFS=$'\t' read -r st cname cst detail; do
            [ "$st" = "$name" ] || continue
            [ $m -gt 0 ] && printf ', '
            m=$((m + 1))
            printf '\n       {"name": "%s", "status": "%s", "detail": "%s"}' \
                "$(echo "$cname" | esc)" "$cst" "$(echo "$detail" | esc)"
        done <"$R/checks.tsv"
        printf '],\n     "figures": {'
        m=0
        while IFS=$'\t' read -r st key value; do
            [ "$st" = "$name" ] || continue
            # Only plain numbers go into the JSON as numbers.
            [[ $value =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]] || continue
            [ $m -gt 0 ] && printf ', '
            m=$((m + 1))
            printf '"%s": %s' "$key" "$value"
        done <"$R/figures.tsv"
        printf '}}'
    done
    printf '\n  ],\n  "passed": %s\n}\n' "$([ $failed -eq 0 ] && echo true || echo false)"
} >"$R/result.json"
{
    echo "gpu-check on $DEVICE, commit $commit, $(($(date +%s) - START)) s of $LIMIT"
    printf '%-6s %-34s %-6s %s\n' stage check status detail
    while IFS=$'\t' read -r st cname cst detail; do
        printf '%-6s %-34s %-6s %s\n' "$st" "$cname" "$cst" "$detail"
    done <"$R/checks.tsv"
    echo "result: $([ $failed -eq 0 ] && echo passed || echo FAILED) (result.json in $R)"
} >"$R/table.txt"
echo
cat "$R/table.txt"
if [ -n "${PACK:-}" ]; then
    mkdir -p "$PACK" && cp "$R/result.json" "$R/table.txt" "$PACK/" &&
        tar czf "$PACK/gpu-check.tar.gz" -C "$R" . || echo "gpu-check: could not pack into $PACK" >&2
fi
# Only a folder this script made; a WORK the caller gave is theirs.
[ -n "${KEEP:-}" ] || [ -z "$OWN_WORK" ] || rm -rf "$WORK"
exit $failed
