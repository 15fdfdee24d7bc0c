#!/usr/bin/env bash
# End to end on Llama-3-70B layer shapes (hidden 8192, intermediate 28672, 64 heads, 8 kv
# heads, vocab 128256), against the input floor measured in the same run:
#
#   1. synth a pair with LAYERS layers (default 4: 2 × 11 GB), read it once into the page cache;
#   2. phlora floor: both checkpoints read once into device memory by extract's own loader;
#   3. phlora extract -r 64 (default settings), then again under a small memory bound
#      (SMALL, default 4G of VRAM on a GPU / 3G of RAM on the CPU): peak device memory sampled
#      with nvidia-smi (GPU) or peak RSS (CPU), checked against the bound;
#   4. a table, and the extrapolation to 80 layers (by bytes: every layer has the same shapes,
#      so floor and extract scale with the input; the embeddings are a fixed part, counted in
#      both runs, which makes the per-byte extrapolation slightly pessimistic).
#
# Env: BIN (folder with phlora; default gpu-bin if present, else target/release), DEVICE (cuda or
# cpu; default cuda), LAYERS, VOCAB, SMALL, WORK (where the pair goes; default a temp folder,
# removed at the end unless KEEP=1). Exit 1 if a run fails or a bound is exceeded.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$([ -x gpu-bin/phlora ] && echo gpu-bin || echo target/release)}
DEVICE=${DEVICE:-cuda}
LAYERS=${LAYERS:-4}
VOCAB=${VOCAB:-128256}
WORK=${WORK:-$(mktemp -d)}
# The GPU default bound fits every layer matrix whole but not the 128256×8192 embedding and
# lm_head (4.2 GB of f32 ΔW each), which then stream through the device in row blocks.
if [ "$DEVICE" = cpu ]; then SMALL=${SMALL:-3G}; BOUND=--max-ram; else SMALL=${SMALL:-4G}; BOUND=--max-vram; fi
P=$BIN/phlora
FAILED=0
pair=$WORK/pair-70b-l$LAYERS

echo "== synth: $LAYERS layers of Llama-3-70B shapes, vocab $VOCAB"
if [ ! -f "$pair/ft/model.safetensors.index.json" ]; then
    /usr/bin/time -f "synth %e s" "$P" -q synth --out "$pair" --hidden 8192 --intermediate 28672 \
        --layers "$LAYERS" --heads 64 --kv-heads 8 --vocab "$VOCAB" --delta-rank 64 || exit 1
fi
du -sh "$pair/base" "$pair/ft"
# From page cache, as the benchmark asks: read both once.
cat "$pair"/base/*.safetensors "$pair"/ft/*.safetensors >/dev/null

# Peak memory of a command: device memory used (nvidia-smi, sampled every 50 ms, minus what was
# in use before) on a GPU; the process's peak RSS on the CPU. Prints "seconds peak_MiB".
measure() { # out-json, then phlora arguments
    local json=$1; shift
    if [ "$DEVICE" = cpu ]; then
        /usr/bin/time -f "%e %M" -o "$json.time" "$P" "$@" >"$json" 2>"$json.err" || return 1
        awk '{ printf "%s %.0f\n", $1, $2 / 1024 }' "$json.time"
    else
        local before samples pid
        before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
        samples=$json.vram
        (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; sleep 0.05; done) >"$samples" 2>/dev/null &
        pid=$!
        local t0=$(date +%s.%N)
        "$P" "$@" >"$json" 2>"$json.err"
        local rc=$?
        local t1=$(date +%s.%N)
        kill $pid 2>/dev/null; wait $pid 2>/dev/null
        [ $rc -eq 0 ] || return 1
        local peak=$(sort -n "$samples" | tail -1)
        echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') $((peak - before))"
    fi
}

echo "== input floor (twice: the second run is the one reported, all of it from page cache)"
for pass in 1 2; do
    read -r floor_wall floor_peak < <(measure "$WORK/floor.json" floor --base "$pair/base" --ft "$pair/ft" --device "$DEVICE" --json) ||
        { cat "$WORK/floor.json.err"; exit 1; }
    cat "$WORK/floor.json.err"
done

echo "== extract -r 64"
read -r ex_wall ex_peak < <(measure "$WORK/extract.json" -q extract --base "$pair/base" --ft "$pair/ft" \
    --out "$WORK/adapter" --rank 64 --device "$DEVICE" --force --json --profile) ||
    { cat "$WORK/extract.json.err"; exit 1; }
cat "$WORK/extract.json.err"

echo "== extract -r 64 $BOUND $SMALL"
read -r sm_wall sm_peak < <(measure "$WORK/small.json" -q extract --base "$pair/base" --ft "$pair/ft" \
    --out "$WORK/adapter-small" --rank 64 --device "$DEVICE" "$BOUND" "$SMALL" --force --json --profile) ||
    { cat "$WORK/small.json.err"; exit 1; }
cat "$WORK/small.json.err"

python3 - "$WORK" "$LAYERS" "$SMALL" "$floor_peak" "$ex_peak" "$sm_peak" "$DEVICE" <<'PY' || FAILED=1
import json, re, sys
work, layers, small, floor_peak, ex_peak, sm_peak, device = sys.argv[1:]
layers = int(layers)
units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT])i?B?", small, re.I)
bound = float(m.group(1)) * units[m.group(2).upper()]
floor = json.load(open(f"{work}/floor.json"))
ex = json.load(open(f"{work}/extract.json"))["summary"]
sm_report = json.load(open(f"{work}/adapter-small/report.json"))
sm = sm_report["summary"]
blocked = sum(1 for t in sm_report["tensors"] if t.get("row_blocks"))
gb = floor["bytes"] / 1e9
fl = floor["seconds"]
ok = True
print()
print(f"{'run':<28} {'seconds':>8} {'× floor':>8} {'GB/s':>7} {'peak MiB':>9}  notes")
print(f"{'input floor':<28} {fl:>8.2f} {1:>8.2f} {gb / fl:>7.2f} {floor_peak:>9}  {floor['device']}, {floor['workers']} worker(s)")
print(f"{'extract r64':<28} {ex['seconds']:>8.2f} {ex['seconds'] / fl:>8.2f} {gb / ex['seconds']:>7.2f} {ex_peak:>9}  "
      f"worst residual {ex['max_residual']:.4f}, total error {ex['total_relative_error']:.4f}")
within = int(sm_peak) * 2**20 <= bound
ok &= within
print(f"{'extract r64 bound ' + small:<28} {sm['seconds']:>8.2f} {sm['seconds'] / fl:>8.2f} {gb / sm['seconds']:>7.2f} {sm_peak:>9}  "
      f"{blocked} matrices in row blocks; peak {'within' if within else 'OVER'} the bound")
st = ex["stages"]
busy = {k: v for k, v in st.items() if k not in ("idle", "write")}
print(f"stages of extract r64 (worker-seconds): " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
# Extrapolation: all layers are alike, so per-byte rates carry over to 80 layers.
scale = lambda s: s * (80 * layer_bytes + fixed) / floor["bytes"]
emb = [t for t in sm_report["tensors"] if "embed" in t["name"] or "lm_head" in t["name"]]
fixed = sum(2 * t["shape"][0] * t["shape"][1] * 2 for t in emb if len(t["shape"]) == 2)
layer_bytes = (floor["bytes"] - fixed) / layers
print(f"80 layers ({(80 * layer_bytes + fixed) / 1e9:.0f} GB of input), by bytes: floor {scale(fl):.1f} s, "
      f"extract {scale(ex['seconds']):.1f} s ({ex['seconds'] / fl:.2f}× the floor)")
target = 1.3
print(f"target: extract within {target}× of the floor: {'met' if ex['seconds'] <= target * fl else 'NOT met'} "
      f"({ex['seconds'] / fl:.2f}×)")
sys.exit(0 if ok else 1)
PY
[ -n "${KEEP:-}" ] || rm -rf "$pair" "$WORK/adapter" "$WORK/adapter-small"
exit $FAILED
