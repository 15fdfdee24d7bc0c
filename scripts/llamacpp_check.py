#!/usr/bin/env python3
"""phlora's GGUF LoRA in llama.cpp itself, against PEFT and the fine-tune, on fixed tokens.

For each (base, fine-tune) pair: `phlora extract --target llama.cpp` writes the PEFT adapter
and adapter.gguf; llama.cpp's own convert_hf_to_gguf.py converts the base and the fine-tune to
GGUF (f32); llama-cpp-python runs the base with adapter.gguf applied, the base alone and the
fine-tune, on the same token ids; transformers runs the base, the fine-tune and the base with
the PEFT adapter (PeftModel). Reported per pair:

  exact    max |logit| difference between llama.cpp (base.gguf + adapter.gguf) and the HF base
           with only the adapter's LoRA products added (what GGUF LoRA carries), against the
           same difference with no adapter (base.gguf against the HF base: the two runtimes'
           own floor). The GGUF is exact when the two are of one size; an f32 GGUF fails the
           run above 20× the floor (and 1e-3), a cast one (--gguf-type) is only reported.
  KL       mean KL(fine-tune ‖ model) over the scored positions, and top-1 agreement with the
           fine-tune, for llama.cpp + adapter.gguf (against ft.gguf in llama.cpp), for PEFT
           (against the HF fine-tune), and for the GGUF's part applied in transformers
           (`carried`). The gap between PEFT and the others is what GGUF LoRA leaves out
           (norms, …; phlora prints its share of ‖ΔW‖²); llama.cpp and `carried` agree when
           llama.cpp applies the GGUF as written.
  official with --official: the same adapter converted by llama.cpp's convert_lora_to_gguf.py,
           its exactness, or the error it stops with.

Pairs: `--pair NAME=BASE:FT[:EVAL.jsonl]` (EVAL as scripts/eval_adapter.py reads it: token
ids and an answer mask; the answer positions are scored), or `--family F` to build a small
random pair of that transformers architecture here (llama, mistral, qwen2, qwen3, gemma,
gemma2, gemma3; weights, norms included, moved by a low-rank change plus noise; seeded).
The models need no tokenizer: the conversion writes a placeholder vocabulary of vocab_size
tokens (token ids are fed directly).

  PYTHONPATH=/tmp/pyx /tmp/lcpenv/bin/python scripts/llamacpp_check.py \\
      --llama-cpp /tmp/lcp-src/llama_cpp_python-0.3.36/vendor/llama.cpp \\
      --phlora target/release/phlora --work /tmp/lcc --family qwen2 --pair ftq=/tmp/ftq/base:/tmp/ftq/sort:/tmp/ftq/sort/eval.jsonl

Needs torch, transformers, peft, safetensors, numpy and llama-cpp-python (built from its sdist,
whose vendor/llama.cpp is the --llama-cpp tree). Not part of CI. Exits 1 when llama.cpp's
update is not exact (above 20× the floor and 1e-3), or a run fails.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np

FAMILIES = {
    # transformers config class, its causal-LM class, extra config
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 64,
                                                     "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 64,
                                                        "query_pre_attn_scalar": 16}),
}

# Runs llama.cpp's convert_hf_to_gguf.py with a placeholder vocabulary (no tokenizer needed).
CONVERT = textwrap.dedent('''
    import sys
    sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
    sys.path.insert(0, {tree!r})
    import convert_hf_to_gguf as c
    import gguf
    import conversion.base as base

    def placeholder_vocab(self):
        hp = self.hparams
        n = hp.get("vocab_size") or hp.get("text_config", {{}}).get("vocab_size")
        w = self.gguf_writer
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([f"<t{{i}}>" for i in range(n)])
        w.add_token_scores([0.0] * n)
        w.add_token_types([gguf.TokenType.NORMAL] * n)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)

    # Model classes are imported on demand: patch the one main() asks for.
    found = c.get_model_class
    def patched(*a, **kw):
        cls = found(*a, **kw)
        for k in cls.__mro__:
            if "set_vocab" in k.__dict__:
                k.set_vocab = placeholder_vocab
        return cls
    c.get_model_class = patched
    c.main()
''')


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def make_family_pair(family, root, seed):
    import torch
    import transformers
    cfg_name, cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=family.startswith("gemma"), **extra)
    cfg.architectures = [cls_name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).to(torch.float32)
    base, ft = os.path.join(root, "base"), os.path.join(root, "ft")
    model.save_pretrained(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = p.abs().mean().item() + 1e-3
            if p.dim() == 2:
                r = 4
                u = torch.randn(p.shape[0], r, generator=g)
                v = torch.randn(r, p.shape[1], generator=g)
                p += 0.3 * scale * (u @ v) / math.sqrt(r) + 0.02 * scale * torch.randn(p.shape, generator=g)
            else:
                p += 0.01 * scale * torch.randn(p.shape, generator=g)
    model.save_pretrained(ft)
    # Gemma 3's converter sizes token_embd by the tokenizer's vocabulary: a placeholder one.
    vocab = {"model": {"vocab": {f"<t{i}>": i for i in range(cfg.vocab_size)}}, "added_tokens": []}
    for d in (base, ft):
        json.dump(vocab, open(os.path.join(d, "tokenizer.json"), "w"))
    return base, ft


def read_eval(path, limit, vocab, seed):
    if path:
        rows = [json.loads(l) for l in open(path)][:limit]
        return [(r["input_ids"], r["answer_mask"]) for r in rows]
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, vocab, 24).tolist(), [1] * 24) for _ in range(limit)]


def hf_logits(model, rows):
    import torch
    out = []
    with torch.no_grad():
        for ids, _ in rows:
            out.append(model(torch.tensor([ids])).logits[0].double().numpy())
    return out


def _llama_logits(conn, gguf_path, rows, lora):
    import llama_cpp
    kw = dict(model_path=gguf_path, logits_all=True, n_ctx=256, n_threads=2, n_batch=256,
              verbose=False)
    if lora:
        kw["lora_path"] = lora
    llm = llama_cpp.Llama(**kw)
    out = []
    for ids, _ in rows:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
    conn.send(out)


def llama_logits(gguf_path, rows, lora=None):
    """llama.cpp's logits, in a child process: a refused adapter aborts the process on its
    first decode (llama-cpp-python does not raise), and that is reported, not fatal here."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")  # fork after torch's threads can deadlock
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_llama_logits, args=(child, gguf_path, rows, lora))
    p.start()
    child.close()
    try:
        out = parent.recv()
    except EOFError:
        out = None
    p.join()
    if out is None or p.exitcode != 0:
        raise RuntimeError(f"llama.cpp on {os.path.basename(gguf_path)}"
                           f"{' + ' + os.path.basename(lora) if lora else ''} died (exit code {p.exitcode})")
    return out


def lora_only(base_model, adapter_dir, left_out):
    """The HF base with the scaling·B·A of each module the GGUF carries added (phlora's report
    names what it leaves out: norms, tensors saved whole, an embedding or head of a tied base)."""
    import torch
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    st = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    with torch.no_grad():
        for key, a in st.items():
            for sa, sb, emb in [(".lora_A.weight", ".lora_B.weight", False),
                                (".lora_embedding_A", ".lora_embedding_B", True)]:
                if not key.endswith(sa):
                    continue
                module = key[len("base_model.model."):-len(sa)]
                if module + ".weight" in left_out:
                    continue
                b = st[key[: -len(sa)] + sb]
                pk = get_pattern_key(ranks.keys(), module) if ranks else None
                r = ranks.get(pk, cfg["r"]) if pk else cfg["r"]
                pk = get_pattern_key(alphas.keys(), module) if alphas else None
                al = alphas.get(pk, cfg["lora_alpha"]) if pk else cfg["lora_alpha"]
                s = al / (math.sqrt(r) if cfg.get("use_rslora") else r)
                d = s * (b.double() @ a.double())
                base_model.get_submodule(module).weight += (d.T if emb else d).to(torch.float32)
    return base_model


def kl_and_top1(ref, cand, rows):
    kls, agree, n = [], 0, 0
    for r, c, (_, mask) in zip(ref, cand, rows):
        # the logits at position t predict token t+1: score the positions before answer tokens
        for t in range(len(mask) - 1):
            if not mask[t + 1]:
                continue
            p = np.exp(r[t] - r[t].max()); p /= p.sum()
            lq = c[t] - c[t].max(); lq -= np.log(np.exp(lq).sum())
            lp = np.log(p + 1e-300)
            kls.append(float((p * (lp - lq)).sum()))
            agree += int(r[t].argmax() == c[t].argmax())
            n += 1
    return float(np.mean(kls)), agree / max(n, 1)


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def check_pair(name, base, ft, eval_path, args):
    import torch
    import transformers
    from peft import PeftModel
    work = os.path.join(args.work, name)
    os.makedirs(work, exist_ok=True)
    ad = os.path.join(work, "adapter")
    run([args.phlora, "extract", "--base", base, "--ft", ft, "--out", ad, "--target", "llama.cpp",
         "--force", "--quiet", "--out-dtype", "f32", *args.extract.split()])
    export = json.load(open(os.path.join(ad, "report.json")))["gguf"]
    ggufs = {w: convert_base(f, os.path.join(work, f"{w}.gguf"), args)
             for w, f in [("base", base), ("ft", ft)]}
    cfg = json.load(open(os.path.join(base, "config.json")))
    vocab = cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]
    rows = read_eval(eval_path, args.limit, vocab, args.seed)
    load = lambda p: transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
    hf_base, hf_ft = hf_logits(load(base), rows), hf_logits(load(ft), rows)
    peft = hf_logits(PeftModel.from_pretrained(load(base), ad).eval(), rows)
    left = {l["name"] for l in export["left_out"]}
    reference = hf_logits(lora_only(load(base), ad, left).eval(), rows)
    lc_base = llama_logits(ggufs["base"], rows)
    lc_ft = llama_logits(ggufs["ft"], rows)
    lc_ad = llama_logits(ggufs["base"], rows, lora=os.path.join(ad, "adapter.gguf"))
    floor = max_diff(lc_base, hf_base)
    exact = max_diff(lc_ad, reference)
    kl_lc, top1_lc = kl_and_top1(lc_ft, lc_ad, rows)
    kl_peft, top1_peft = kl_and_top1(hf_ft, peft, rows)
    kl_none, top1_none = kl_and_top1(lc_ft, lc_base, rows)
    # What the GGUF carries, applied in transformers: the part of the gap to PEFT that is the
    # left-out tensors, not llama.cpp.
    kl_carried, top1_carried = kl_and_top1(hf_ft, reference, rows)
    share = sum(l["sq_norm"] or 0 for l in export["left_out"]) / max(
        export["carried_sq_norm"] + sum(l["sq_norm"] or 0 for l in export["left_out"]), 1e-300)
    result = dict(pair=name, arch=export["architecture"], modules=export["modules"],
                  left_out=len(export["left_out"]), left_out_share=share,
                  floor=floor, exact=exact, kl_llamacpp=kl_lc, top1_llamacpp=top1_lc,
                  kl_peft=kl_peft, top1_peft=top1_peft, kl_base=kl_none, top1_base=top1_none,
                  kl_carried_hf=kl_carried, top1_carried_hf=top1_carried,
                  tensor_type=export["tensor_type"],
                  # A cast (f16, bf16, q8_0) is reported, not judged.
                  ok=exact <= max(20 * floor, 1e-3) or export["tensor_type"] != "f32")
    official = official_logits(ad, base, ggufs["base"], rows, work, args, result)
    if official is not None:
        result["official_exact"] = max_diff(official, reference)
        result["official_kl"], result["official_top1"] = kl_and_top1(lc_ft, official, rows)
    return result


def official_logits(ad, base, base_gguf, rows, work, args, result):
    """With --official: llama.cpp's logits with the adapter converted by its own
    convert_lora_to_gguf.py, or None (its error, or llama.cpp's crash, in `result`)."""
    if not args.official:
        return None
    out = os.path.join(work, "official.gguf")
    try:
        run([sys.executable, os.path.join(args.llama_cpp, "convert_lora_to_gguf.py"), ad,
             "--base", base, "--outfile", out, "--outtype", "f32"], cwd=args.llama_cpp)
        return llama_logits(base_gguf, rows, lora=out)
    except RuntimeError as e:
        result["official_error"] = str(e).strip().splitlines()[-1][:200]
        return None


def convert_base(folder, path, args):
    script = os.path.join(os.path.dirname(path), "convert.py")
    open(script, "w").write(CONVERT.format(tree=args.llama_cpp))
    run([sys.executable, script, "--", folder, "--outfile", path, "--outtype", "f32"],
        cwd=args.llama_cpp)
    return path


def check_peft_adapter(name, base, args):
    """A LoRA written by PEFT itself on BASE (per-module ranks and alphas, rsLoRA, random
    factors), converted by `phlora convert` in each of --types, in llama.cpp against PeftModel."""
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    work = os.path.join(args.work, name)
    os.makedirs(work, exist_ok=True)
    ad = os.path.join(work, "peft-adapter")
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    config = LoraConfig(r=16, lora_alpha=24, use_rslora=True, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        rank_pattern={"q_proj": 8, "down_proj": 32}, alpha_pattern={"v_proj": 4})
    model = get_peft_model(load(), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.2)
    model.save_pretrained(ad)
    cfg = json.load(open(os.path.join(base, "config.json")))
    rows = read_eval(None, args.limit, cfg["vocab_size"], args.seed)
    peft = hf_logits(PeftModel.from_pretrained(load(), ad).eval(), rows)
    base_gguf = convert_base(base, os.path.join(work, "base.gguf"), args)
    floor = max_diff(llama_logits(base_gguf, rows), hf_logits(load(), rows))
    result = dict(pair=name, arch="peft", floor=floor, ok=True)
    for t in args.types.split(","):
        out = os.path.join(work, f"adapter-{t}.gguf")
        run([args.phlora, "convert", ad, "--to", "gguf", "--base", base, "--out", out,
             "--type", t, "--force", "--quiet"])
        result[f"exact_{t}"] = max_diff(llama_logits(base_gguf, rows, lora=out), peft)
        if t == "f32":
            result["ok"] = result["exact_f32"] <= max(20 * floor, 1e-3)
    official = official_logits(ad, base, base_gguf, rows, work, args, result)
    if official is not None:
        result["official_exact"] = max_diff(official, peft)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp's source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--phlora", default="target/release/phlora")
    ap.add_argument("--work", required=True)
    ap.add_argument("--pair", action="append", default=[], help="NAME=BASE:FT[:EVAL.jsonl]")
    ap.add_argument("--family", action="append", default=[], choices=sorted(FAMILIES))
    ap.add_argument("--peft-adapter", action="append", default=[], metavar="NAME=BASE",
                    help="a LoRA made by PEFT on BASE, converted by phlora convert in each of --types")
    ap.add_argument("--types", default="f32,f16,bf16,q8_0", help="for --peft-adapter")
    ap.add_argument("--extract", default="--rank 16", help="more extract arguments (quoted)")
    ap.add_argument("--limit", type=int, default=64, help="sequences scored per pair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--official", action="store_true", help="also llama.cpp's convert_lora_to_gguf.py")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    args.llama_cpp = os.path.abspath(args.llama_cpp)
    args.phlora = os.path.abspath(args.phlora)
    pairs = []
    for spec in args.pair:
        name, rest = spec.split("=", 1)
        parts = rest.split(":")
        pairs.append((name, parts[0], parts[1], parts[2] if len(parts) > 2 else None))
    for i, fam in enumerate(args.family):
        root = os.path.join(args.work, f"pair-{fam}")
        base, ft = make_family_pair(fam, root, args.seed + 100 * i)
        pairs.append((fam, base, ft, None))
    results, failed = [], False
    jobs = [(check_pair, (n, b, f, e, args)) for n, b, f, e in pairs]
    jobs += [(check_peft_adapter, (*spec.split("=", 1), args)) for spec in args.peft_adapter]
    for fn, job in jobs:
        name = job[0]
        try:
            r = fn(*job)
        except Exception as e:  # one pair's failure is reported, the others still run
            r = dict(pair=name, ok=False, error=f"{type(e).__name__}: {str(e)[-600:]}")
        results.append(r)
        failed |= not r["ok"]
        print(json.dumps(r), flush=True)
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)
    print(f"\n{'pair':10} {'arch':7} {'mods':>4} {'left%':>6} {'floor':>8} {'exact':>8} "
          f"{'KL lcpp':>8} {'KL carr':>8} {'KL peft':>8} {'KL base':>8} {'top1 lcpp':>9} {'top1 carr':>9} {'top1 peft':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['pair']:10} ERROR {r['error']}")
            continue
        if r["arch"] == "peft":
            print(f"{r['pair']:10} a PEFT-made LoRA, phlora convert: floor {r['floor']:.1e}, "
                  + ", ".join(f"{k[6:]} {v:.1e}" for k, v in r.items() if k.startswith("exact_"))
                  + (f"; official {r['official_exact']:.1e}" if "official_exact" in r else "")
                  + (f"; official: {r['official_error']}" if "official_error" in r else ""))
            continue
        print(f"{r['pair']:10} {r['arch']:7} {r['modules']:4d} {100*r['left_out_share']:6.2f} "
              f"{r['floor']:8.1e} {r['exact']:8.1e} {r['kl_llamacpp']:8.1e} {r['kl_carried_hf']:8.1e} "
              f"{r['kl_peft']:8.1e} {r['kl_base']:8.4f} {r['top1_llamacpp']:9.3f} "
              f"{r['top1_carried_hf']:9.3f} {r['top1_peft']:9.3f}"
              + (f"  official: {r['official_exact']:.1e}, KL {r['official_kl']:.1e}, top1 {r['official_top1']:.3f}"
                 if "official_exact" in r else "")
              + (f"  official: {r['official_error']}" if "official_error" in r else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
