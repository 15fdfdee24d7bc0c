#!/usr/bin/env python3
"""Resolves Hugging Face ids with huggingface_hub's own offline rules and with phlora, and
compares the snapshot each picks: a cache built as the hub builds it (blobs, relative symlinks,
refs/main, a branch, refs/pr/1, a bare commit), then `snapshot_download(..., local_files_only=
True)` against `phlora -v inspect ID` (whose debug line names the snapshot).

    pip install huggingface_hub      # not part of CI
    phlora synth --out pair && python3 scripts/hub_vs_huggingface_hub.py target/release/phlora pair/base

Prints a table; exit status 0 when every id resolves to the same snapshot, or fails in both.
"""
import os, shutil, subprocess, sys, json
from huggingface_hub import snapshot_download
P = sys.argv[1] if len(sys.argv) > 1 else "target/release/phlora"
MODEL = sys.argv[2] if len(sys.argv) > 2 else "pair/base"  # any model folder (phlora synth)
import tempfile
root = os.path.join(tempfile.mkdtemp(), "hub")
A, B = "a" * 40, "b" * 40
def model(repo, refs, snaps, files=None):
    d = os.path.join(root, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(d, "blobs"), exist_ok=True)
    src = MODEL
    for ref, c in refs.items():
        os.makedirs(os.path.dirname(os.path.join(d, "refs", ref)), exist_ok=True)
        open(os.path.join(d, "refs", ref), "w").write(c)
    files = files or os.listdir(src)
    for c in snaps:
        s = os.path.join(d, "snapshots", c); os.makedirs(s, exist_ok=True)
        for f in files:
            blob = os.path.join(d, "blobs", f + c[:4]); shutil.copy(os.path.join(src, f), blob)
            os.symlink(os.path.relpath(blob, s), os.path.join(s, f))
model("org/m", {"main": A, "dev": B, "refs/pr/1": B}, [A, B])
model("org/only-hash", {}, [A])
cases = [("org/m", None), ("org/m", "main"), ("org/m", "dev"), ("org/m", "refs/pr/1"), ("org/m", B),
         ("org/only-hash", A), ("org/only-hash", None), ("org/m", "v9"), ("org/missing", None)]
bad = 0
for repo, rev in cases:
    try:
        hub = snapshot_download(repo, revision=rev, cache_dir=root, local_files_only=True)
    except Exception as e:
        hub = f"error ({type(e).__name__})"
    arg = repo + (f"@{rev}" if rev else "")
    o = subprocess.run([P, "-v", "inspect", arg], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_CACHE": root})
    line = [l for l in o.stderr.splitlines() if "commit" in l and arg in l]
    ph = line[0].split(", ", 1)[1].strip() if line and o.returncode == 0 else f"error (exit {o.returncode})"
    same = (hub == ph) or (hub.startswith("error") and ph.startswith("error"))
    bad += not same
    print(f"| {arg} | {hub.replace(root, 'CACHE')} | {ph.replace(root, 'CACHE')} | {'yes' if same else '**no**'} |")
sys.exit(bad)
