#!/usr/bin/env python3
"""`phlora merge` against PEFT on which modules an adapter's config targets.

A tiny Llama and a fine-tune of it (a rank-2 change to every attention and MLP matrix) are
saved, phlora extracts a rank-4 adapter, and its config is edited into variants that target
fewer modules than the file has factors for: layers_to_transform (with and without
layers_pattern), exclude_modules, a target_modules regex. For each, PEFT's merge_and_unload
and `phlora merge` must change the same weights, to the same values.

    pip install --target DIR torch transformers peft safetensors
    cargo build --release
    PYTHONPATH=DIR python3 scripts/peft_targets_check.py [--phlora target/release/phlora]

Exit status 0 when every variant agrees (relative difference below --tol), 1 otherwise.
"""
import argparse
import copy
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

VARIANTS = [
    ("as written", {}),
    ("layers_to_transform [0, 2]", {"layers_to_transform": [0, 2]}),
    ("layers_to_transform 1, layers_pattern", {"layers_to_transform": 1, "layers_pattern": "layers"}),
    ("exclude_modules [o_proj, layers.0.mlp.up_proj]",
     {"exclude_modules": ["o_proj", "model.layers.0.mlp.up_proj"]}),
    ("target_modules regex", {"target_modules": r".*\.(q|v)_proj"}),
]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return r


def merged_weights(folder):
    sd = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        sd.update(load_file(f))
    return sd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phlora", default="target/release/phlora")
    ap.add_argument("--tol", type=float, default=1e-5)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="phlora-targets-")
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                               head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                u, v = torch.randn(p.shape[0], 2), torch.randn(2, p.shape[1])
                p += 0.02 * u @ v
    base.save_pretrained(f"{tmp}/base")
    ft.save_pretrained(f"{tmp}/ft")
    run([a.phlora, "extract", "--base", f"{tmp}/base", "--ft", f"{tmp}/ft", "--out",
         f"{tmp}/adapter", "--rank", "4", "--no-embeddings", "--no-norms", "--device", "cpu",
         "--quiet"])
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    failed = False
    print(f"{'variant':<48} {'PEFT changed':>12} {'phlora changed':>14} {'max rel diff':>13}")
    for i, (name, edit) in enumerate(VARIANTS):
        adapter = f"{tmp}/adapter-{i}"
        shutil.copytree(f"{tmp}/adapter", adapter)
        path = f"{adapter}/adapter_config.json"
        config = json.load(open(path))
        config.update(edit)
        json.dump(config, open(path, "w"))
        model = AutoModelForCausalLM.from_pretrained(f"{tmp}/base", dtype=torch.float32)
        peft_sd = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
        run([a.phlora, "merge", "--base", f"{tmp}/base", "--adapter", adapter, "--out",
             f"{tmp}/merged-{i}", "--quiet"])
        ours = merged_weights(f"{tmp}/merged-{i}")
        changed = lambda sd: {k for k, v in sd.items() if k in base_sd and not torch.equal(v, base_sd[k])}
        peft_changed, our_changed = changed(peft_sd), changed(ours)
        worst = max(((ours[k] - peft_sd[k]).abs().max() / peft_sd[k].abs().max().clamp(min=1e-30)).item()
                    for k in ours if k in peft_sd)
        ok = peft_changed == our_changed and worst < a.tol
        failed |= not ok
        print(f"{name:<48} {len(peft_changed):>12} {len(our_changed):>14} {worst:>13.2e}"
              f"{'' if ok else '  FAIL'}")
        if peft_changed != our_changed:
            print(f"  only PEFT: {sorted(peft_changed - our_changed)}")
            print(f"  only phlora: {sorted(our_changed - peft_changed)}")
    shutil.rmtree(tmp)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
