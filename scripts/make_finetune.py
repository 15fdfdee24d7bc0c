#!/usr/bin/env python3
"""Genuinely fine-tuned small models for measuring adapters by what the model does.

Trains a tiny Llama-shaped base on a synthetic language, then fully fine-tunes it in several
ways that stress an extracted adapter differently, and writes Hugging Face folders (bf16
safetensors + config.json) with a tokenizer-free eval set beside each fine-tune:

    OUT/base/                    the pretrained base
    OUT/<kind>/                  the full fine-tune of the base
    OUT/<kind>/eval.jsonl        {"input_ids": [...], "answer_mask": [0/1 per token]}

Kinds (each a full fine-tune of every weight, embeddings and lm_head included):
  sort     a sequence task: BOS x1..xk SEP sorted(x) EOS, on held-out inputs. Answer tokens:
           the sorted list and EOS.
  domain   a broad domain shift: a second synthetic language (new emission and transition
           statistics everywhere). Answer tokens: every next token after the first 4.
  random   random labels (the high-rank stress case): 4096 random keys, each mapped to one of
           64 labels at random, memorised (2.5× the steps). Eval: 2048 of the memorised keys (random labels
           have nothing to generalise). Answer token: the label.

Deterministic from --seed (same machine, same torch). Not part of CI:

    pip install --target DIR torch transformers safetensors
    PYTHONPATH=DIR python3 scripts/make_finetune.py --out /tmp/ft
    PYTHONPATH=DIR python3 scripts/eval_adapter.py --base /tmp/ft/base --ft /tmp/ft/sort \
        --adapter ADAPTER --eval /tmp/ft/sort/eval.jsonl

The last line printed is JSON with the seconds each stage took and each fine-tune's task
accuracy and loss on its eval set.
"""
import argparse
import json
import math
import os
import time

import torch

PAD, BOS, SEP, EOS = 0, 1, 2, 3
VOCAB = 512
SEQ = 64
# Tokens the tasks use: sort draws values from DIGITS, random labels from LABELS.
DIGITS = range(16, 80)
LABELS = range(400, 464)


def config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=SEQ * 2, tie_word_embeddings=False, rms_norm_eps=1e-5,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )


class Language:
    """A hidden-state Markov language: each state emits from its own sparse Zipf
    distribution over the vocabulary and moves to a few likely next states."""

    def __init__(self, gen, states=24, support=48):
        self.trans = torch.zeros(states, states)
        for i in range(states):
            nxt = torch.randperm(states, generator=gen)[:4]
            self.trans[i, nxt] = torch.tensor([0.55, 0.25, 0.12, 0.08])
        self.emit = torch.zeros(states, VOCAB)
        zipf = 1.0 / torch.arange(1, support + 1).float()
        for i in range(states):
            toks = 4 + torch.randperm(VOCAB - 4, generator=gen)[:support]
            self.emit[i, toks] = zipf / zipf.sum()
        self.states = states

    def sample(self, gen, n, length):
        out = torch.empty(n, length, dtype=torch.long)
        out[:, 0] = BOS
        state = torch.randint(self.states, (n,), generator=gen)
        for t in range(1, length):
            out[:, t] = torch.multinomial(self.emit[state], 1, generator=gen).squeeze(1)
            state = torch.multinomial(self.trans[state], 1, generator=gen).squeeze(1)
        return out


def sort_examples(gen, n):
    """BOS x1..xk SEP sorted EOS, padded to a common length; mask on the answer."""
    rows, masks = [], []
    for _ in range(n):
        k = int(torch.randint(4, 9, (1,), generator=gen))
        xs = [DIGITS[int(i)] for i in torch.randint(len(DIGITS), (k,), generator=gen)]
        ids = [BOS] + xs + [SEP] + sorted(xs) + [EOS]
        mask = [0] * (k + 2) + [1] * (k + 1)
        rows.append(ids)
        masks.append(mask)
    return rows, masks


def random_label_table(gen, n=4096, key_len=6):
    keys = 4 + torch.randint(VOCAB - 200, (n, key_len), generator=gen)
    labels = torch.randint(len(LABELS), (n,), generator=gen) + LABELS[0]
    rows = [[BOS] + k.tolist() + [SEP, int(l), EOS] for k, l in zip(keys, labels)]
    masks = [[0] * (key_len + 2) + [1, 0] for _ in range(n)]
    return rows, masks


def pad(rows, masks):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m)
    return ids, mask


def train(model, batches, steps, lr, label="train"):
    """AdamW with warmup and cosine decay; `batches(step)` gives (ids, loss mask)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    started = time.time()
    for step in range(steps):
        ids, mask = batches(step)
        logits = model(input_ids=ids).logits[:, :-1]
        target = ids[:, 1:]
        keep = mask[:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits[keep], target[keep])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"{label} step {step}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)",
                  flush=True)
    model.eval()


@torch.no_grad()
def task_score(model, ids, mask):
    logits = model(input_ids=ids).logits[:, :-1]
    target, keep = ids[:, 1:], mask[:, 1:].bool()
    loss = torch.nn.functional.cross_entropy(logits[keep], target[keep]).item()
    acc = (logits.argmax(-1)[keep] == target[keep]).float().mean().item()
    return {"loss": round(loss, 4), "accuracy": round(acc, 4)}


def save(model, folder, eval_rows=None):
    os.makedirs(folder, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    if eval_rows is not None:
        with open(os.path.join(folder, "eval.jsonl"), "w") as f:
            for ids, mask in zip(*eval_rows):
                f.write(json.dumps({"input_ids": ids, "answer_mask": mask}) + "\n")


def reload(folder):
    """The model as saved (bf16 weights in fp32 arithmetic): what the adapter is compared with."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="sort,domain,random")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--ft-steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import LlamaForCausalLM

    timings, scores = {}, {}
    gen = torch.Generator().manual_seed(args.seed)
    lang = Language(gen)
    base_path = os.path.join(args.out, "base")
    started = time.time()
    if os.path.exists(os.path.join(base_path, "config.json")):
        print(f"{base_path}: kept from an earlier run", flush=True)
    else:
        model = LlamaForCausalLM(config(args))
        data_gen = torch.Generator().manual_seed(args.seed + 1)

        def lm_batches(_):
            ids = lang.sample(data_gen, args.batch, SEQ)
            return ids, torch.ones_like(ids)

        train(model, lm_batches, args.base_steps, 3e-3, "base")
        save(model, base_path)
        timings["base_s"] = round(time.time() - started, 1)
    base = reload(base_path)
    held = lang.sample(torch.Generator().manual_seed(args.seed + 2), 256, SEQ)
    scores["base_on_its_language"] = task_score(base, held, torch.ones_like(held))

    for kind in args.kinds.split(","):
        started = time.time()
        model = reload(base_path)
        g = torch.Generator().manual_seed(args.seed + 100 + len(kind))
        steps = args.ft_steps
        if kind == "sort":
            def batches(_):
                return pad(*sort_examples(g, args.batch))
            ev = sort_examples(torch.Generator().manual_seed(args.seed + 7), 512)
            lr = 1e-3
        elif kind == "domain":
            other = Language(torch.Generator().manual_seed(args.seed + 11))

            def batches(_):
                ids = other.sample(g, args.batch, SEQ)
                return ids, torch.ones_like(ids)
            ev_ids = other.sample(torch.Generator().manual_seed(args.seed + 8), 256, SEQ)
            ev = (ev_ids.tolist(), [[0] * 4 + [1] * (SEQ - 4)] * len(ev_ids))
            lr = 1e-3
        elif kind == "random":
            rows, masks = random_label_table(torch.Generator().manual_seed(args.seed + 9))
            all_ids, all_mask = pad(rows, masks)

            def batches(_):
                pick = torch.randint(len(rows), (args.batch * 2,), generator=g)
                return all_ids[pick], all_mask[pick]
            ev = (rows[:2048], masks[:2048])
            lr = 2e-3
            steps = steps * 5 // 2  # memorising takes longer than learning a rule
        else:
            raise SystemExit(f"unknown kind {kind!r}: expected sort, domain or random")
        train(model, batches, steps, lr, kind)
        folder = os.path.join(args.out, kind)
        save(model, folder, ev)
        timings[f"{kind}_s"] = round(time.time() - started, 1)
        ft = reload(folder)
        ids, mask = pad(*ev)
        scores[kind] = {"fine_tune": task_score(ft, ids, mask), "base": task_score(base, ids, mask)}
        print(f"{kind}: {scores[kind]}", flush=True)
    print(json.dumps({"seed": args.seed, "hidden": args.hidden, "layers": args.layers,
                      "threads": args.threads, "timings": timings, "scores": scores}))


if __name__ == "__main__":
    main()
