#!/usr/bin/env bash
# Builds, here, what scripts/gpu-check.sh runs on a GPU host that has no Rust toolchain: the
# release `phlora` and only the test binaries that hold GPU test bodies (the library's unit
# tests, tests/linalg.rs, tests/extract.rs), stripped, in gpu-bin/ (ignored by git; name it in
# the device tool's `carry`). Prints each file's size and the total, and fails above 40 MiB
# (the host takes 64 MiB of working tree plus carried outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=40
GPU_TESTS="lib linalg extract"
cargo build --release --locked
rm -rf gpu-bin
mkdir -p gpu-bin
cp target/release/phlora gpu-bin/phlora
# The commit the check reports (the GPU host gets the working tree without .git).
if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || commit+=-dirty
else
    commit=unknown
fi
echo "$commit" >gpu-bin/COMMIT
cargo test --release --locked --no-run --message-format=json 2>/dev/null |
    GPU_TESTS="$GPU_TESTS" python3 -c '
import json, os, shutil, sys
wanted = set(os.environ["GPU_TESTS"].split())
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    name = "lib" if m["target"]["kind"] == ["lib"] else m["target"]["name"]
    if name in wanted:
        shutil.copy(m["executable"], f"gpu-bin/test-{name}")
'
for t in $GPU_TESTS; do
    [ -x "gpu-bin/test-$t" ] || { echo "gpu-build: no test binary for $t" >&2; exit 1; }
done
strip gpu-bin/phlora gpu-bin/test-*
ls -l gpu-bin/phlora gpu-bin/test-* | awk '{ printf "%8.1f MiB  %s\n", $5 / 1048576, $NF }'
total=$(du -cb gpu-bin/phlora gpu-bin/test-* | awk 'END { print $1 }')
awk -v t="$total" -v l="$LIMIT_MIB" 'BEGIN { printf "%8.1f MiB  total (limit %d MiB)\n", t / 1048576, l }'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu-build: gpu-bin/ is over ${LIMIT_MIB} MiB" >&2
    exit 1
fi
