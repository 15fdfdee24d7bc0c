#!/usr/bin/env python3
"""Does an extracted adapter do what the fine-tune does? Measured on the answer tokens.

Loads the base with the adapter through PEFT (and, with --merged, a merged checkpoint through
transformers) and compares each with the fine-tune on an eval set of token ids:

  agreement   top-1 agreement with the fine-tune at the answer tokens (the fine-tune's argmax
              is the reference, right or wrong)
  kl          mean KL(fine-tune ‖ candidate) per answer token, in nats
  accuracy    top-1 accuracy against the eval set's own tokens (the task score), beside the
              fine-tune's own and the base's
  exact       the share of examples whose every answer token is predicted right

The eval set is JSONL, one example per line, token ids only (no tokenizer is loaded):
  {"input_ids": [1, 17, 40, 2, 17, 40, 3], "answer_mask": [0, 0, 0, 0, 1, 1, 1]}
  {"input_ids": [...], "answer_start": 4}        answer = tokens from index 4 on
  {"input_ids": [...]}                           answer = every token after the first
A mask entry of 1 marks a token the model predicts from the tokens before it. Use it for the
seed's "downstream check" on your own model: tokenize prompts and the fine-tune's answers
with your tokenizer and write them here.

    PYTHONPATH=DIR python3 scripts/eval_adapter.py --base BASE --ft FT --adapter ADAPTER \
        --eval FT/eval.jsonl [--merged MERGED] [--device cuda]

The last line printed is JSON: {"examples", "answer_tokens", "fine_tune": {...},
"base": {...}, "adapter": {...}, "merged": {...}}. Exit status 2 on bad input.
"""
import argparse
import json
import sys

import torch


def fail(message):
    print(f"eval_adapter.py: {message}", file=sys.stderr)
    sys.exit(2)


def read_eval(path, limit):
    rows = []
    try:
        f = open(path)
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                ids = [int(x) for x in ex["input_ids"]]
            except (ValueError, KeyError, TypeError) as e:
                fail(f"{path}:{n}: expected a JSON object with input_ids ({e})")
            if "answer_mask" in ex:
                mask = [int(bool(x)) for x in ex["answer_mask"]]
                if len(mask) != len(ids):
                    fail(f"{path}:{n}: answer_mask has {len(mask)} entries for {len(ids)} ids")
            else:
                start = int(ex.get("answer_start", 1))
                mask = [0] * min(start, len(ids)) + [1] * max(0, len(ids) - start)
            mask[0] = 0  # nothing predicts the first token
            if len(ids) < 2 or not any(mask):
                fail(f"{path}:{n}: no answer token to score")
            rows.append((ids, mask))
            if limit and len(rows) == limit:
                break
    if not rows:
        fail(f"{path}: no examples")
    return rows


def batches(rows, size):
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        width = max(len(r[0]) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        att = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, (r, m) in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(m)] = torch.tensor(m, dtype=torch.bool)
            att[j, : len(r)] = 1
        yield ids, mask, att


@torch.no_grad()
def answer_logprobs(model, rows, size, device):
    """Log-probabilities at the answer positions (predicting token t from < t), and targets."""
    out, targets, owner = [], [], []
    for b, (ids, mask, att) in enumerate(batches(rows, size)):
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float().cpu()
        keep = mask[:, 1:]
        out.append(torch.log_softmax(logits[:, :-1][keep], -1))
        targets.append(ids[:, 1:][keep])
        owner.append((torch.arange(ids.shape[0]) + b * size).unsqueeze(1).expand_as(keep)[keep])
    return torch.cat(out), torch.cat(targets), torch.cat(owner)


def compare(ref, cand, targets, owner, n):
    top = cand.argmax(-1)
    right = (top == targets).float()
    per_example = torch.zeros(n).index_add_(0, owner, 1 - right)
    kl = (ref.exp() * (ref - cand)).sum(-1)
    return {
        "agreement": round((top == ref.argmax(-1)).float().mean().item(), 4),
        "kl": round(kl.mean().item(), 4),
        "accuracy": round(right.mean().item(), 4),
        "exact": round((per_example == 0).float().mean().item(), 4),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the base model's folder")
    ap.add_argument("--ft", required=True, help="the fine-tune's folder (the reference)")
    ap.add_argument("--adapter", help="a PEFT adapter folder (phlora extract's output)")
    ap.add_argument("--merged", help="a merged checkpoint folder (phlora merge's output)")
    ap.add_argument("--eval", required=True, help="JSONL of token ids (see above)")
    ap.add_argument("--limit", type=int, default=0, help="score only the first N examples")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    rows = read_eval(args.eval, args.limit)
    dtype = getattr(torch, args.dtype)

    def load(folder):
        return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype).to(args.device).eval()

    ref, targets, owner = answer_logprobs(load(args.ft), rows, args.batch, args.device)
    result = {"examples": len(rows), "answer_tokens": int(targets.numel())}
    result["fine_tune"] = compare(ref, ref, targets, owner, len(rows))
    base = load(args.base)
    vocab = base.get_input_embeddings().weight.shape[0]
    if max(max(r[0]) for r in rows) >= vocab:
        fail(f"{args.eval}: token ids beyond the base's vocabulary ({vocab})")
    result["base"] = compare(ref, answer_logprobs(base, rows, args.batch, args.device)[0], targets, owner, len(rows))
    if args.adapter:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(base, args.adapter).to(args.device).eval()
        result["adapter"] = compare(ref, answer_logprobs(adapted, rows, args.batch, args.device)[0],
                                    targets, owner, len(rows))
        del adapted
    if args.merged:
        result["merged"] = compare(ref, answer_logprobs(load(args.merged), rows, args.batch, args.device)[0],
                                   targets, owner, len(rows))
    for who in ("fine_tune", "base", "adapter", "merged"):
        if who in result:
            print(f"{who:10} " + "  ".join(f"{k} {v}" for k, v in result[who].items()), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
