#!/usr/bin/env python3
"""The search the --budget rules were chosen by: a family of allocations, scored in-process.

For each fine-tune made by make_finetune.py, takes the exact SVD of every matrix's ΔW (torch,
f32), allocates ranks for the budget of each uniform rank r with the rule
    weight(module) = ‖ΔW‖^(−2a) · ‖W_base‖^(−2b),  directions by weight·σ² per parameter,
under a floor of a fraction of the uniform rank (phlora's greedy, re-implemented here), loads
W_base + U_r·S_r·V_rᵀ (norms from the fine-tune, as modules_to_save does) and scores it with
eval_adapter.py's metrics. No adapter files, no PEFT: fast enough to try many rules; confirm a
choice through phlora and PEFT with rank_rules.py. (a, b) = (0, 0) is `frobenius`, (1, 0)
`relative`, (0, 1) `base`, (0.35, 0.15) `balanced`.

    PYTHONPATH=DIR python3 scripts/rank_search.py --models /tmp/ft \
        --rules 'balanced=0.35,0.15' --rules 'relative=1,0' --floors 0.5,0.875 --ranks 8,16

One JSON line per (fine-tune, r, rule, floor) on stdout.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import eval_adapter as ev  # noqa: E402


def uniform_rank(mods, budget):
    longest = max(len(m["s"]) for m in mods)
    for r in range(longest, -1, -1):
        if sum(min(r, len(m["s"])) * m["cost"] for m in mods) <= budget:
            return r
    return 0


def allocate(mods, budget, a, b, floor):
    """phlora's greedy: floor first, then directions by weighted σ² per parameter."""
    ranks = [min(floor, len(m["s"])) for m in mods]
    spent = sum(r * m["cost"] for r, m in zip(ranks, mods))
    items = []
    for t, m in enumerate(mods):
        w = m["dd"] ** (-a) * m["ww"] ** (-b) / m["cost"]
        items += [(-(w * m["s"][i] ** 2), t, i) for i in range(ranks[t], len(m["s"]))]
    for _, t, i in sorted(items):
        if ranks[t] == i and spent + mods[t]["cost"] <= budget:
            ranks[t] += 1
            spent += mods[t]["cost"]
    return ranks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True)
    ap.add_argument("--kinds", default="sort,domain,random")
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--rules", action="append", default=[], help="NAME=A,B (repeatable)")
    ap.add_argument("--floors", default="0.875", help="fractions of the uniform rank")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    rules = [("uniform", None)]
    for spec in args.rules or ["balanced=0.35,0.15"]:
        name, _, ab = spec.partition("=")
        a, b = (float(x) for x in ab.split(","))
        rules.append((name, (a, b)))
    floors = [float(x) for x in args.floors.split(",")]
    base_dir = os.path.join(args.models, "base")
    base_sd = load_file(os.path.join(base_dir, "model.safetensors"))
    names = [n for n in base_sd if base_sd[n].dim() == 2]
    for kind in args.kinds.split(","):
        folder = os.path.join(args.models, kind)
        ft_sd = load_file(os.path.join(folder, "model.safetensors"))
        rows = ev.read_eval(os.path.join(folder, "eval.jsonl"), 0)
        ft = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ref, targets, owner = ev.answer_logprobs(ft, rows, 64, "cpu")
        mods = []
        for n in names:
            w = base_sd[n].float()
            d = ft_sd[n].float() - w
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            mods.append({"name": n, "u": u, "sv": s, "vh": vh, "s": s.tolist(), "cost": sum(w.shape),
                         "dd": float((d ** 2).sum()), "ww": float((w ** 2).sum()),
                         "type": n.split(".")[-2]})
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        start = {k: v.clone() for k, v in model.state_dict().items()}

        def score(ranks):
            sd = dict(start)
            for m, r in zip(mods, ranks):
                sd[m["name"]] = start[m["name"]] + (m["u"][:, :r] * m["sv"][:r]) @ m["vh"][:r]
            for k in sd:
                if k in base_sd and base_sd[k].dim() == 1:
                    sd[k] = ft_sd[k].float()
            model.load_state_dict(sd)
            return ev.compare(ref, ev.answer_logprobs(model, rows, 64, "cpu")[0], targets, owner, len(rows))

        for r in [int(x) for x in args.ranks.split(",")]:
            budget = sum(min(r, len(m["s"])) * m["cost"] for m in mods)
            ru = uniform_rank(mods, budget)
            for name, ab in rules:
                for frac in [0.0] if ab is None else floors:
                    ranks = ([min(r, len(m["s"])) for m in mods] if ab is None
                             else allocate(mods, budget, ab[0], ab[1], int(ru * frac)))
                    by_type = {}
                    for m, x in zip(mods, ranks):
                        by_type.setdefault(m["type"], []).append(x)
                    print(json.dumps({"kind": kind, "r": r, "rule": name, "floor": frac, **score(ranks),
                                      "embed": by_type.get("embed_tokens"), "lm_head": by_type.get("lm_head"),
                                      "v_proj": by_type.get("v_proj")}), flush=True)


if __name__ == "__main__":
    main()
