#!/usr/bin/env python3
"""Holds `phlora check --for vllm` to vLLM's own adapter-loading code.

For every BASE ADAPTER pair, makes the calls vLLM's WorkerLoRAManager._load_adapter makes, on
the CPU and without a model: PEFTHelper.from_local_dir, validate_legal(LoRAConfig(max_lora_rank=
512)) and LoRAModel.from_local_checkpoint (key parsing, per-module rank and scaling, the
embedding vocabulary check). The first exception is vLLM's refusal; it is compared with check's
verdict (refused iff loads = false). The model-side checks — which embedding modules an
architecture declares, the 2-D or 3-D MoE wrapper — need a vLLM model and are not run: the
modules a model would expect are taken from the base's 2-D weights (so embed_tokens and lm_head
count as expected, as on Llama or Mixtral), and an adapter check refuses only for those rules
(vllm.embeddings, vllm.experts) is reported as "model-side".

    pip install --no-deps vllm==0.33.0   # plus the modules its lora package imports (docs/loaders.md)
    python3 scripts/check_vs_vllm.py [--phlora BIN] BASE ADAPTER [BASE ADAPTER ...]

Exit status 0 when every verdict that the loader decides agrees.
"""
import argparse
import json
import os
import subprocess
import sys

MODEL_SIDE = {"vllm.embeddings", "vllm.experts", "vllm.vocab"}


def base_shapes(folder):
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for k in f.keys():
                    out[k] = list(f.get_slice(k).get_shape())
    return out


def expected_modules(shapes):
    """What a vLLM model would list: the last name of every 2-D weight, and the experts."""
    expected = set()
    for k, shape in shapes.items():
        if ".experts" in k:
            expected.add("experts")
            parts = k[k.find(".experts.") + 1:].split(".")
            if len(parts) >= 4 and parts[1].isdigit() and len(shape) == 2:
                expected.add(".".join(parts[:-1]))  # experts.0.w1: the 2-D expert mapping
        elif k.endswith(".weight") and len(shape) == 2:
            expected.add(k[: -len(".weight")].rsplit(".", 1)[-1])
    return expected


def vllm_outcome(base, adapter):
    import torch
    import vllm.lora.lora_model
    import vllm.lora.lora_weights
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    vllm.lora.lora_model.PIN_MEMORY = False  # pinned host memory needs a GPU driver
    vllm.lora.lora_weights.PIN_MEMORY = False
    shapes = base_shapes(base)
    vocab = json.load(open(os.path.join(base, "config.json"))).get("vocab_size")
    try:
        helper = PEFTHelper.from_local_dir(adapter, max_position_embeddings=None)
        helper.validate_legal(LoRAConfig(max_lora_rank=512))
        model = LoRAModel.from_local_checkpoint(
            adapter, expected_modules(shapes), helper, device="cpu", dtype=torch.float32,
            model_vocab_size=vocab)
    except Exception as e:  # vLLM refuses the adapter
        return "refused", f"{type(e).__name__}: {str(e)[:160]}"
    return "loads", f"{len(model.loras)} modules"


def phlora_verdict(phlora, base, adapter):
    out = subprocess.run(
        [phlora, "check", adapter, "--for", "vllm", "--base", base, "--json", "--quiet"],
        capture_output=True, text=True)
    if not out.stdout:
        return "error", out.stderr.strip(), set()
    v = json.loads(out.stdout)["verdicts"][0]
    refusing = {f["rule"] for f in v["findings"] if f["severity"] == "refused"}
    return ("loads" if v["loads"] else "refused"), ",".join(sorted(refusing)), refusing


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phlora", default="target/release/phlora")
    ap.add_argument("pairs", nargs="+", metavar="BASE ADAPTER")
    a = ap.parse_args()
    if len(a.pairs) % 2:
        ap.error("give BASE ADAPTER pairs")
    disagree = 0
    print("| adapter | vLLM loader | phlora check --for vllm | agree |\n| --- | --- | --- | --- |")
    for base, adapter in zip(a.pairs[::2], a.pairs[1::2]):
        actual = vllm_outcome(base, adapter)
        predicted, rules, refusing = phlora_verdict(a.phlora, base, adapter)
        if actual[0] == predicted:
            agree = "yes"
        elif actual[0] == "loads" and refusing and refusing <= MODEL_SIDE:
            agree = "model-side (not run)"
        else:
            agree, disagree = "**no**", disagree + 1
        print(f"| {os.path.basename(adapter.rstrip('/'))} | {actual[0]} {actual[1]} | "
              f"{predicted} {rules} | {agree} |")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
