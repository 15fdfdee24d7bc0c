#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU host that has no Rust toolchain: the release
# binary and the test binaries, stripped, in gpu-bin/ (ignored by git; carry it to the host).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
mkdir -p gpu-bin
rm -f gpu-bin/*
cp target/release/phlora gpu-bin/phlora
cargo test --release --locked --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        name = "lib" if m["target"]["kind"] == ["lib"] else name
        shutil.copy(m["executable"], f"gpu-bin/test-{name}")
        print("gpu-bin/test-" + name)
'
strip gpu-bin/*
du -sh gpu-bin
