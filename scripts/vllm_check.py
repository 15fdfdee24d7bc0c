#!/usr/bin/env python3
"""Reads phlora adapters with vLLM's own LoRA loader and checks what vLLM makes of them.

For each adapter folder (with the base and fine-tuned checkpoints it was extracted from), runs
vLLM's `PEFTHelper.from_local_dir` + `validate_legal` (the config checks vLLM applies when an
adapter is requested) and `LoRAModel.from_local_checkpoint` (key parsing, per-module rank and
scaling from rank_pattern/alpha_pattern, the embedding vocabulary check), then rebuilds every
module's update from vLLM's LoRALayerWeights (scaling · B·A; an embedding's (B·A)ᵀ) and compares
it with ΔW of the checkpoints. This runs vLLM's parsing code on the CPU, not a vLLM model: the
model-side mapping (packed qkv/gate_up modules, the fused 3-D MoE layout) is not exercised.

    pip install --no-deps vllm   # plus the modules its lora package imports (see docs/loaders.md)
    python3 scripts/vllm_check.py WORK/llama/{base,ft,adapter} [...]

Each argument triple is BASE FT ADAPTER. Exit status 0 when every adapter loads and every
module's relative error is below --tol.
"""
import argparse
import os
import sys

import torch
from safetensors import safe_open


def tensors(folder):
    """Every tensor of a checkpoint folder (single file or shards), by name."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k).float()
    return out


def check(base_dir, ft_dir, adapter_dir, tol):
    import vllm.lora.lora_model
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    vllm.lora.lora_model.PIN_MEMORY = False  # pinned host memory needs a GPU driver

    helper = PEFTHelper.from_local_dir(adapter_dir, max_position_embeddings=None)
    helper.validate_legal(LoRAConfig(max_lora_rank=512))
    base, ft = tensors(base_dir), tensors(ft_dir)
    vocab = next((t.shape[0] for k, t in base.items() if k.endswith("embed_tokens.weight")), None)
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # The loader rejects modules the model does not expect; here every module of the adapter
    # is expected (what a model would list is not known without the model).
    expected = set()
    for k in keys:
        module = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        expected.add(module.rsplit(".", 1)[-1])
        if ".experts" in module:
            expected.add(module[module.find(".experts") + 1:])
    model = LoRAModel.from_local_checkpoint(adapter_dir, expected, helper, device="cpu",
                                            dtype=torch.float32, model_vocab_size=vocab)
    worst, checked = 0.0, 0
    for name, lora in model.loras.items():
        weight = f"{name}.weight"
        if weight not in ft:  # a tied lm_head: the embedding matrix
            weight = next(k for k in ft if k.endswith("embed_tokens.weight"))
        base_w = base.get(weight, base.get(weight.replace("lm_head", "model.embed_tokens")))
        delta = ft[weight] - base_w
        update = lora.scaling * (lora.lora_b @ lora.lora_a)
        if update.shape != delta.shape:
            update = update.T  # an embedding: lora_embedding_A [r, vocab], B [dim, r]
        rel = ((update - delta).norm() / delta.norm().clamp_min(1e-30)).item()
        worst, checked = max(worst, rel), checked + 1
    return dict(adapter=adapter_dir, modules=checked, rank=helper.r,
                patterns=len(helper.rank_pattern), worst=worst, ok=worst < tol)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="BASE FT ADAPTER, repeated")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest relative error per module")
    args = ap.parse_args()
    if len(args.dirs) % 3:
        sys.exit("give BASE FT ADAPTER triples")
    rows = []
    for i in range(0, len(args.dirs), 3):
        try:
            rows.append(check(*args.dirs[i:i + 3], args.tol))
        except Exception as e:  # a refusal is a result
            rows.append(dict(adapter=args.dirs[i + 2], ok=False, error=f"{type(e).__name__}: {e}"))
    print(f"\n{'adapter':<40} {'modules':>7} {'r':>4} {'patterns':>8} {'worst err':>10}  result")
    for r in rows:
        if "error" in r:
            print(f"{r['adapter'][-40:]:<40} {'-':>7} {'-':>4} {'-':>8} {'-':>10}  FAIL: {r['error'][:300]}")
        else:
            print(f"{r['adapter'][-40:]:<40} {r['modules']:>7} {r['rank']:>4} {r['patterns']:>8} "
                  f"{r['worst']:>10.2e}  {'ok' if r['ok'] else 'FAIL'}")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
