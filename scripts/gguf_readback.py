#!/usr/bin/env python3
"""Reads a GGUF LoRA back with gguf-py (PyPI `gguf`, llama.cpp's own Python reader) and checks
it against the PEFT adapter it was converted from, with llama.cpp's rules and none of phlora's
code: the metadata llama.cpp's loader reads (general.type, general.architecture, adapter.type,
adapter.lora.alpha as FLOAT32), every tensor's name (gguf-py's HF → GGUF name map), its shape
as llama-adapter.cpp checks it, and per module that llama.cpp's update
scale · lora_b · lora_a (scale = alpha / rank, or 1 when alpha is 0) equals PEFT's
scaling · B·A (rank_pattern / alpha_pattern by PEFT's own get_pattern_key, rsLoRA), with the
Q/K rows permuted as convert_hf_to_gguf.py's LlamaModel.permute permutes the base's.

    PYTHONPATH=/tmp/ggufpy:/tmp/pyx python3 scripts/gguf_readback.py ADAPTER_DIR BASE_DIR [--gguf FILE]

Exits 1 when a check fails. Modules of the adapter that the GGUF leaves out are listed (phlora
convert says why); every pair in the GGUF must match a module of the adapter.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

import gguf
from gguf.constants import GGUFValueType
from peft.utils.other import get_pattern_key

ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
}
# convert_lora_to_gguf.py's prefixes for a multimodal model's language model.
PREFIXES = [("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", "")]
# Relative error of the product allowed per tensor type (the cast of scale·B and A).
TOLERANCE = {"F32": 1e-5, "F16": 3e-3, "BF16": 2e-2, "Q8_0": 3e-2}


def permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def field_value(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None, None
    kind = f.types[0]
    if kind == GGUFValueType.STRING:
        return kind, bytes(f.parts[f.data[0]]).decode()
    return kind, f.parts[f.data[0]][0]


def gguf_tensors(reader):
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)  # BF16 and Q8_0 come as bytes
        # numpy shape = ne reversed
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = (data.astype(np.float64).reshape(shape), t.tensor_type.name)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter")
    ap.add_argument("base")
    ap.add_argument("--gguf", help="default: ADAPTER/adapter.gguf")
    args = ap.parse_args()
    path = args.gguf or os.path.join(args.adapter, "adapter.gguf")
    cfg = json.load(open(os.path.join(args.adapter, "adapter_config.json")))
    base_cfg = json.load(open(os.path.join(args.base, "config.json")))
    text = base_cfg.get("text_config", base_cfg)
    arch = ARCH[base_cfg["architectures"][0]]
    heads = text.get("num_attention_heads")
    kv_heads = text.get("num_key_value_heads", heads)
    failures = []

    reader = gguf.GGUFReader(path)
    for key, want in [
        ("general.type", "adapter"),
        ("adapter.type", "lora"),
        ("general.architecture", arch),
    ]:
        kind, value = field_value(reader, key)
        if value != want:
            failures.append(f"metadata {key} = {value!r}, llama.cpp wants {want!r}")
    kind, alpha = field_value(reader, "adapter.lora.alpha")
    if kind is not None and kind != GGUFValueType.FLOAT32:
        failures.append(f"adapter.lora.alpha is {kind.name}: llama.cpp aborts unless FLOAT32")
    alpha = float(alpha or 0.0)

    st = {k: v.to(torch.float64).numpy() for k, v in load_file(
        os.path.join(args.adapter, "adapter_model.safetensors")).items()}
    tensors = gguf_tensors(reader)
    n_layers = text["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    r_default, alpha_default = cfg["r"], cfg["lora_alpha"]
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    checked, left_out, seen = 0, [], set()
    worst = 0.0
    for key in sorted(st):
        for a_suffix, b_suffix, embedding in [
            (".lora_A.weight", ".lora_B.weight", False),
            (".lora_embedding_A", ".lora_embedding_B", True),
        ]:
            if not key.endswith(a_suffix):
                continue
            module = key[len("base_model.model."):-len(a_suffix)]
            A, B = st[key], st[key[: -len(a_suffix)] + b_suffix]
            r_m = ranks[get_pattern_key(ranks.keys(), module)] if ranks and get_pattern_key(ranks.keys(), module) in ranks else r_default
            a_m = alphas[get_pattern_key(alphas.keys(), module)] if alphas and get_pattern_key(alphas.keys(), module) in alphas else alpha_default
            scaling = a_m / (math.sqrt(r_m) if cfg.get("use_rslora") else r_m)
            peft = scaling * (B @ A)
            if embedding:
                peft = peft.T  # [vocab, embd]
            text = module
            for prefix, to in PREFIXES:
                if text.startswith(prefix):
                    text = to + text[len(prefix):]
                    break
            name = name_map.get_name(text + ".weight", try_suffixes=(".weight",))
            if name is None or name + ".lora_a" not in tensors:
                left_out.append(module)
                continue
            seen.add(name)
            if arch == "llama" and name.endswith("attn_q.weight"):
                peft = permute(peft, heads, heads)
            if arch == "llama" and name.endswith("attn_k.weight"):
                peft = permute(peft, heads, kv_heads)
            la, ta = tensors[name + ".lora_a"]
            lb, tb = tensors[name + ".lora_b"]
            rank = lb.shape[-1]  # b->ne[0]
            scale = alpha / rank if alpha != 0 else 1.0
            if embedding:
                # llama-adapter.cpp: base.ne[0] == b.ne[1] (embd), base.ne[1] == a.ne[1] (vocab)
                ok = la.shape == (peft.shape[0], rank) and lb.shape == (peft.shape[1], rank)
                got = scale * (la @ lb.T)
            else:
                # base.ne[0] == a.ne[0] (in), base.ne[1] == b.ne[1] (out), a.ne[1] == b.ne[0] (r)
                ok = la.shape == (rank, peft.shape[1]) and lb.shape == (peft.shape[0], rank)
                got = scale * (lb @ la)
            if not ok:
                failures.append(f"{name}: lora_a {la.shape}, lora_b {lb.shape} do not fit {peft.shape}")
                continue
            denom = max(np.linalg.norm(peft), 1e-30)
            rel = float(np.linalg.norm(got - peft) / denom)
            tol = max(TOLERANCE[ta], TOLERANCE[tb])
            worst = max(worst, rel / tol)
            if rel > tol:
                failures.append(f"{name}: ‖llama.cpp − PEFT‖/‖PEFT‖ = {rel:.2e} > {tol:.0e} ({ta}/{tb})")
            checked += 1
    pairs = {n[: -len(".lora_a")] for n in tensors if n.endswith(".lora_a")}
    for extra in sorted(pairs - seen):
        failures.append(f"{extra}: in the GGUF but no module of the adapter")
    for n in tensors:
        if not (n.endswith(".lora_a") or n.endswith(".lora_b")):
            failures.append(f"{n}: neither lora_a nor lora_b (llama.cpp refuses it)")
    print(f"{path}: {checked} modules match PEFT's update (worst at {worst:.2f} of its tolerance), "
          f"alpha {alpha}, {len(left_out)} adapter modules not in the GGUF"
          + (f": {', '.join(left_out[:4])}{' …' if len(left_out) > 4 else ''}" if left_out else ""))
    for f in failures:
        print("FAIL", f)
    if checked == 0:
        print("FAIL nothing was checked")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
