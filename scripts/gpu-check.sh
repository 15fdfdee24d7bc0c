#!/usr/bin/env bash
# The GPU checks, on a host with an NVIDIA GPU and no Rust toolchain. Build first where cargo
# is (scripts/gpu-build.sh writes gpu-bin/), carry gpu-bin/ over, then run from the repo root:
#
#     scripts/gpu-check.sh     # logs in a temp folder; packed into $LOG/gpu-check-logs.tar.gz if OUT is set
#
# 1. the test binaries with PHLORA_TEST_DEVICE=cuda (every test body on CPU and GPU);
# 2. phlora bench on the GPU: default shapes and ranks, the ΔW kernel's bandwidth, and the
#    variants (tf32/f32 × CholeskyQR2/Householder × eigh/host eigh/gesvd) on 28672×8192 r=64;
# 3. end to end: a synth pair extracted on CPU and GPU, reconstructions compared, and each
#    adapter loaded and merged by PEFT (scripts/compare_adapters.py).
# 4. Llama-3-70B layer shapes against the input floor, and under a small --max-vram
#    (scripts/bench-70b.sh; LAYERS70 layers, default 4; SKIP_70B=1 skips it).
# A short table comes last. Exit status 1 if any check failed. QUICK=1 skips the 1B pair,
# SKIP_BENCH=1 the benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-gpu-bin}
LOG=$(mktemp -d)
WORK=$(mktemp -d)
ROWS=()
FAILED=0
row() { ROWS+=("$(printf '%-30s %-5s %s' "$1" "$2" "$3")"); [ "$2" = ok ] || FAILED=1; }

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
ldconfig -p | grep -E 'lib(cuda|nvrtc|cublas|cusolver)\.so' | sed 's/^/  /'

echo "== tests on the GPU"
export PHLORA_TEST_DEVICE=cuda PHLORA_BIN=$BIN/phlora
for t in lib linalg extract; do
    timeout 300 "$BIN/test-$t" --test-threads=4 >"$LOG/test-$t.log" 2>&1
    rc=$?
    grep -E "^test .*(FAILED|ok)$|panicked|test result" "$LOG/test-$t.log" | grep -v " ok$" | head -20
    counts=$(awk '/^test result:/ { print $4 " passed, " $6 " failed" }' "$LOG/test-$t.log")
    [ $rc -eq 0 ] && row "tests $t (cuda)" ok "$counts" || row "tests $t (cuda)" FAIL "rc=$rc ${counts:-no result}"
done
# The variant and TF32 figures the tests print.
"$BIN/test-linalg" --test-threads=1 --nocapture tf32_error every_gpu_variant 2>&1 | grep -E "residual" | tail -40 >"$LOG/variants-tests.txt"

echo "== bench"
if [ -n "${SKIP_BENCH:-}" ]; then
    echo "skipped (SKIP_BENCH)"
elif timeout 300 "$BIN/phlora" bench --device cuda --json >"$LOG/bench.json" 2>"$LOG/bench.txt"; then
    cat "$LOG/bench.txt"
    line=$(python3 - "$LOG/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
x = [t for t in r["rows"] if (t["rows"], t["cols"], t["rank"]) == (28672, 8192, 64)][0]
d = r["delta_kernel"]
print(f"28672x8192 r64 {x['seconds']*1e3:.2f} ms (+{x['download_seconds']*1e3:.2f} dl), "
      f"res/opt {x['residual']/x['optimum']:.4f}; dW kernel {d['kernel_bytes_per_s']/1e12:.2f} TB/s "
      f"= {100*d['kernel_bytes_per_s']/d['copy_bytes_per_s']:.0f}% of copy")
PY
)
    row "bench (default)" ok "$line"
    info=$(python3 - "$LOG/bench.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))["cuda"]
print(f"{c['name']} cc{c['compute_capability']} driver {c['driver_version']} "
      f"nvrtc {c['nvrtc_version']} cublas {c['cublas_version']} cusolver {c['cusolver_version']}")
PY
)
    row "device and libraries" ok "$info"
else
    cat "$LOG/bench.txt"; row "bench (default)" FAIL "see bench.txt"
fi
if [ -n "${SKIP_BENCH:-}" ]; then
    :
elif timeout 200 "$BIN/phlora" bench --device cuda --shapes 28672x8192 --ranks 64 --variants --no-delta \
    --json >"$LOG/variants.json" 2>"$LOG/variants.txt"; then
    cat "$LOG/variants.txt"
    best=$(python3 - "$LOG/variants.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))["variants"]
ok = [t for t in v if t["residual"] <= 1.01 * t["optimum"]]
b = min(ok, key=lambda t: t["seconds"])
print(f"fastest within +1%: {b['device'].split(', ')[-1].rstrip(')')} {b['seconds']*1e3:.2f} ms")
PY
)
    row "bench --variants" ok "$best"
else
    cat "$LOG/variants.txt"; row "bench --variants" FAIL "see variants.txt"
fi

echo "== end to end"
e2e() { # tag layers
    local tag=$1 layers=$2 pair=$WORK/pair-$1
    "$BIN/phlora" -q synth --out "$pair" --layers "$layers" --force || { row "e2e $tag" FAIL "synth"; return; }
    for dev in cpu cuda; do
        timeout 300 "$BIN/phlora" -q extract --base "$pair/base" --ft "$pair/ft" --out "$WORK/$tag-$dev" \
            --device $dev --json >"$LOG/e2e-$tag-$dev.json" 2>"$LOG/e2e-$tag-$dev.err" ||
            { row "e2e $tag $dev" FAIL "$(tail -1 "$LOG/e2e-$tag-$dev.err")"; return; }
    done
    "$BIN/phlora" -q extract --base "$pair/base" --ft "$pair/ft" --out "$WORK/$tag-cuda-f32" \
        --device cuda --gemm f32 --json >"$LOG/e2e-$tag-cuda-f32.json" 2>&1
    local peft=() others=("$WORK/$tag-cuda" "$WORK/$tag-cuda-f32")
    if [ "$tag" = small ]; then
        peft=(--base "$pair/base" --ft "$pair/ft")
        # A device budget that fits the MLP matrices whole but not the 32000×2048 embedding and
        # lm_head: those two go through the blocked randomized SVD on the GPU.
        "$BIN/phlora" -q extract --base "$pair/base" --ft "$pair/ft" --out "$WORK/$tag-cuda-blocked" \
            --device cuda --max-vram 700M --json >"$LOG/e2e-$tag-cuda-blocked.json" 2>&1 &&
            others+=("$WORK/$tag-cuda-blocked")
        blocked=$(python3 -c 'import json,sys; print(sum(1 for t in json.load(open(sys.argv[1]))["tensors"] if t.get("row_blocks")))' \
            "$WORK/$tag-cuda-blocked/report.json" 2>/dev/null)
        [ "${blocked:-0}" -ge 2 ] && row "e2e $tag --max-vram 700M" ok "$blocked matrices streamed in row blocks" ||
            row "e2e $tag --max-vram 700M" FAIL "streamed: ${blocked:-none} (see e2e-$tag-cuda-blocked.json)"
    fi
    # One worker per GPU against the default two: the same bytes.
    "$BIN/phlora" -q extract --base "$pair/base" --ft "$pair/ft" --out "$WORK/$tag-cuda-1" \
        --device cuda --in-flight 1 --json >"$LOG/e2e-$tag-cuda-1.json" 2>&1
    if cmp -s "$WORK/$tag-cuda/adapter_model.safetensors" "$WORK/$tag-cuda-1/adapter_model.safetensors"; then
        row "e2e $tag in-flight 1 vs 2" ok "identical adapters"
    else
        row "e2e $tag in-flight 1 vs 2" FAIL "adapters differ"; others+=("$WORK/$tag-cuda-1")
    fi
    if [ "$tag" = small ]; then
        # Determinism on the GPU (README): a second run, a run killed after 5 tensors and
        # resumed, and two shards combined all give the first run's bytes.
        local d=ok why="" same=()
        "$BIN/phlora" -q extract --base "$pair/base" --ft "$pair/ft" --out "$WORK/$tag-cuda-again" \
            --device cuda >/dev/null 2>&1 && same+=("$WORK/$tag-cuda-again")
        PHLORA_TEST_CRASH_AFTER=5 "$BIN/phlora" -q extract --base "$pair/base" --ft "$pair/ft" \
            --out "$WORK/$tag-cuda-resumed" --device cuda >/dev/null 2>&1
        "$BIN/phlora" -q extract --base "$pair/base" --ft "$pair/ft" --out "$WORK/$tag-cuda-resumed" \
            --device cuda --resume >/dev/null 2>&1 && same+=("$WORK/$tag-cuda-resumed")
        for i in 1 2; do
            "$BIN/phlora" -q extract --base "$pair/base" --ft "$pair/ft" --out "$WORK/$tag-part$i" \
                --device cuda --shard $i/2 >/dev/null 2>&1
        done
        "$BIN/phlora" -q combine "$WORK/$tag-part1" "$WORK/$tag-part2" --out "$WORK/$tag-cuda-combined" \
            >/dev/null 2>&1 && same+=("$WORK/$tag-cuda-combined")
        [ ${#same[@]} -eq 3 ] || { d=FAIL; why="only ${#same[@]} of 3 runs finished; "; }
        for o in "${same[@]}"; do
            cmp -s "$WORK/$tag-cuda/adapter_model.safetensors" "$o/adapter_model.safetensors" ||
                { d=FAIL; why+="$(basename "$o") differs; "; }
        done
        row "e2e $tag GPU determinism" $d "${why:-again, resumed, 2 shards combined: identical to the first run}"
    fi
    if timeout 300 python3 scripts/compare_adapters.py "$WORK/$tag-cpu" "${others[@]}" \
        "${peft[@]}" >"$LOG/compare-$tag.txt" 2>&1; then st=ok; else st=FAIL; fi
    cat "$LOG/compare-$tag.txt" | grep -v Warning
    local t
    t=$(python3 - "$LOG/e2e-$tag-cpu.json" "$LOG/e2e-$tag-cuda.json" <<'PY'
import json, sys
c, g = (json.load(open(p))["summary"] for p in sys.argv[1:3])
print(f"cpu {c['seconds']:.2f} s, gpu {g['seconds']:.2f} s (delta {g['stages']['delta']:.2f}, "
      f"svd {g['stages']['svd_randomized']:.2f}, residual {g['stages']['residual']:.2f}), "
      f"total err cpu {c['total_relative_error']:.5f} gpu {g['total_relative_error']:.5f}")
PY
)
    row "e2e $tag ($layers layers)" $st "$t"
}
e2e small 2
[ -n "${QUICK:-}" ] || e2e 1b 16   # QUICK=1: the 2-layer pair only

echo "== Llama-3-70B shapes against the input floor (scripts/bench-70b.sh)"
if [ -n "${SKIP_70B:-}" ]; then
    echo "skipped (SKIP_70B)"
else
    BIN=$BIN DEVICE=cuda LAYERS=${LAYERS70:-4} WORK=$WORK timeout 900 scripts/bench-70b.sh >"$LOG/bench-70b.txt" 2>&1
    rc=$?
    cat "$LOG/bench-70b.txt"
    line=$(grep -E "^target:|^80 layers" "$LOG/bench-70b.txt" | tr '\n' ' ')
    [ $rc -eq 0 ] && row "70B shapes (${LAYERS70:-4} layers)" ok "$line" || row "70B shapes" FAIL "rc=$rc $line"
fi

echo
echo "== summary (logs in $LOG)"
printf '%-30s %-5s %s\n' check ok? detail
for r in "${ROWS[@]}"; do echo "$r"; done
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu-check-logs.tar.gz" -C "$LOG" .
exit $FAILED
