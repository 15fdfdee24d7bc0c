#!/usr/bin/env bash
# Reproduces the CPU figures of BENCHMARKS.md: SVD throughput against faer's GEMM rate, and
# extraction of the ~1B Llama-shaped synth pair (4 and 16 layers; randomized and exact) with
# peak RSS. Needs ~7 GB of disk under bench-data/ and about 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
bin=target/release/phlora
mkdir -p bench-data

echo "== SVD throughput (cargo bench --bench svd_throughput)"
cargo bench --bench svd_throughput 2>/dev/null | grep -v '^$'

for L in 4 16; do
    [ -f bench-data/l$L/ft/model.safetensors.index.json ] || $bin synth --out bench-data/l$L --layers $L
done

run() { # name, then extract arguments
    local name=$1; shift
    /usr/bin/time -v $bin -q extract --force --json "$@" >bench-data/$name.json 2>bench-data/$name.time
    python3 - "$name" <<'PY'
import json, re, sys
name = sys.argv[1]
s = json.load(open(f"bench-data/{name}.json"))["summary"]
t = open(f"bench-data/{name}.time").read()
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
print(f"{name:>12}: {s['seconds']:7.1f} s  peak RSS {rss:6.0f} MiB  total rel. error {s['total_relative_error']:.5f}  "
      f"worst {s['max_residual']:.5f}  SVD {s['svd_gflops']:.1f} GFLOP/s")
PY
}
echo "== extraction, rank 64"
run l4-rsvd --base bench-data/l4/base --ft bench-data/l4/ft --out bench-data/out-l4 --rank 64
run l16-rsvd --base bench-data/l16/base --ft bench-data/l16/ft --out bench-data/out-l16 --rank 64
run l16-exact --base bench-data/l16/base --ft bench-data/l16/ft --out bench-data/out-l16-exact --rank 64 --svd exact
