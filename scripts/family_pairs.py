"""Small synthetic (base, fine-tune) pairs of the model families `phlora synth` does not write:
Mixtral-style per-expert MoE with a router, transformers-v5 fused experts, gpt-oss's [in, out]
experts, GPT-2's Conv1D layers, and a fine-tune that grew the vocabulary (added tokens).
For scripts/same-bytes.sh (FAMILY_PAIRS=DIR). Needs torch and safetensors; outside CI.

    python3 scripts/family_pairs.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

H, I, E, V, L = 64, 96, 4, 256, 2
g = torch.Generator().manual_seed(7)


def rand(*shape, scale=0.02):
    return torch.randn(*shape, generator=g) * scale


def low_rank(rows, cols, rank=6, scale=0.01):
    return (rand(rows, rank, scale=1.0) @ rand(rank, cols, scale=1.0)) * scale / rank


def write(folder, tensors, config):
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous().to(torch.bfloat16) for k, v in tensors.items()},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def pair(out, name, base, config, ft_extra=None):
    ft = {}
    for k, w in base.items():
        if w.dim() == 2 and "norm" not in k:
            ft[k] = w + low_rank(*w.shape)
        elif w.dim() == 3:
            ft[k] = w + torch.stack([low_rank(*w.shape[1:]) for _ in range(w.shape[0])])
        else:
            ft[k] = w + rand(*w.shape, scale=0.001)
    if ft_extra:
        ft = ft_extra(ft)
    write(os.path.join(out, name, "base"), base, config)
    write(os.path.join(out, name, "ft"), ft, config)


def attention(p):
    return {f"{p}.self_attn.{n}.weight": rand(H, H) for n in ["q_proj", "k_proj", "v_proj", "o_proj"]}


def common(layers):
    t = {"model.embed_tokens.weight": rand(V, H), "model.norm.weight": 1 + rand(H),
         "lm_head.weight": rand(V, H)}
    for i in range(layers):
        t[f"model.layers.{i}.input_layernorm.weight"] = 1 + rand(H)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = 1 + rand(H)
        t.update(attention(f"model.layers.{i}"))
    return t


def llama_config(model_type, **extra):
    c = {"model_type": model_type, "architectures": ["MixtralForCausalLM"], "hidden_size": H,
         "intermediate_size": I, "num_hidden_layers": L, "vocab_size": V,
         "num_attention_heads": 4, "num_key_value_heads": 4}
    c.update(extra)
    return c


def mixtral(out):
    t = common(L)
    for i in range(L):
        p = f"model.layers.{i}.block_sparse_moe"
        t[f"{p}.gate.weight"] = rand(E, H)
        for e in range(E):
            t[f"{p}.experts.{e}.w1.weight"] = rand(I, H)
            t[f"{p}.experts.{e}.w3.weight"] = rand(I, H)
            t[f"{p}.experts.{e}.w2.weight"] = rand(H, I)
    pair(out, "mixtral", t, llama_config("mixtral", num_local_experts=E))


def qwen2_moe(out):
    t = common(L)
    for i in range(L):
        p = f"model.layers.{i}.mlp"
        t[f"{p}.gate.weight"] = rand(E, H)
        for e in range(E):
            t[f"{p}.experts.{e}.gate_proj.weight"] = rand(I, H)
            t[f"{p}.experts.{e}.up_proj.weight"] = rand(I, H)
            t[f"{p}.experts.{e}.down_proj.weight"] = rand(H, I)
        t[f"{p}.shared_expert.gate_proj.weight"] = rand(I, H)
        t[f"{p}.shared_expert.up_proj.weight"] = rand(I, H)
        t[f"{p}.shared_expert.down_proj.weight"] = rand(H, I)
    pair(out, "qwen2moe", t, llama_config("qwen2_moe", num_experts=E))


def fused(out, name, model_type, in_out):
    t = common(L)
    for i in range(L):
        p = f"model.layers.{i}.mlp"
        t[f"{p}.gate.weight"] = rand(E, H)
        if in_out:  # gpt-oss: each expert [in, out]
            t[f"{p}.experts.gate_up_proj"] = rand(E, H, 2 * I)
            t[f"{p}.experts.down_proj"] = rand(E, I, H)
        else:  # transformers v5: each expert [out, in]
            t[f"{p}.experts.gate_up_proj"] = rand(E, 2 * I, H)
            t[f"{p}.experts.down_proj"] = rand(E, H, I)
    pair(out, name, t, llama_config(model_type, num_experts=E, num_local_experts=E))


def gpt2(out):
    t = {"transformer.wte.weight": rand(V, H), "transformer.wpe.weight": rand(128, H),
         "transformer.ln_f.weight": 1 + rand(H), "transformer.ln_f.bias": rand(H)}
    for i in range(L):
        p = f"transformer.h.{i}"
        t[f"{p}.ln_1.weight"] = 1 + rand(H)
        t[f"{p}.ln_2.weight"] = 1 + rand(H)
        t[f"{p}.attn.c_attn.weight"] = rand(H, 3 * H)
        t[f"{p}.attn.c_attn.bias"] = rand(3 * H)
        t[f"{p}.attn.c_proj.weight"] = rand(H, H)
        t[f"{p}.mlp.c_fc.weight"] = rand(H, 4 * H)
        t[f"{p}.mlp.c_proj.weight"] = rand(4 * H, H)
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": H,
              "n_layer": L, "vocab_size": V}
    pair(out, "gpt2", t, config)


def added_tokens(out):
    t = common(L)
    for i in range(L):
        p = f"model.layers.{i}.mlp"
        t[f"{p}.gate_proj.weight"] = rand(I, H)
        t[f"{p}.up_proj.weight"] = rand(I, H)
        t[f"{p}.down_proj.weight"] = rand(H, I)

    def grow(ft):
        for k in ["model.embed_tokens.weight", "lm_head.weight"]:
            ft[k] = torch.cat([ft[k], rand(8, H)])
        return ft

    pair(out, "added", t, llama_config("llama", architectures=["LlamaForCausalLM"]), grow)
    with open(os.path.join(out, "added", "ft", "config.json")) as f:
        c = json.load(f)
    c["vocab_size"] = V + 8
    with open(os.path.join(out, "added", "ft", "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    with open(os.path.join(out, "added", "ft", "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": {}}, f)


if __name__ == "__main__":
    out = sys.argv[1]
    mixtral(out)
    qwen2_moe(out)
    fused(out, "fused", "qwen3_moe", in_out=False)
    fused(out, "gptoss", "gpt_oss", in_out=True)
    gpt2(out)
    added_tokens(out)
