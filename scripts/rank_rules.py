#!/usr/bin/env python3
"""How each --budget rule fares against one uniform rank, by what the model does.

For each fine-tune made by make_finetune.py and each uniform rank r, extracts `--rank r`,
then the same parameter count with `--budget` under each rule (and any extra variants), and
scores every adapter with eval_adapter.py (PEFT) on the fine-tune's eval set: answer top-1
agreement with the fine-tune, KL(ft ‖ adapted), task accuracy, and from report.json the total
Frobenius error and the ranks of embed_tokens, lm_head and the v_proj.

    cargo build --release
    PYTHONPATH=DIR python3 scripts/rank_rules.py --models /tmp/ft --work /tmp/rules \
        --kinds sort,domain,random --ranks 8,16,32

Writes WORK/results.jsonl (one line per adapter) and prints a Markdown table; the last line
is JSON with every row. Extra variants: --variant 'NAME=ARGS' (ARGS added to the extract
command line, e.g. 'relative-floor0=--rank-rule relative --min-rank 0').
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

EXTRA = []
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def extract(phlora, base, ft, out, args):
    cmd = [phlora, "extract", "--base", base, "--ft", ft, "--out", out, "--device", "cpu",
           "--force", "--quiet"] + EXTRA + args
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {run.returncode}\n{run.stderr}")
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f), run.stderr


def params_of(report):
    return sum(t["rank"] * (t["shape"][0] + t["shape"][1])
               for t in report["tensors"] if t.get("rank") and t["action"].startswith("lora"))


def ranks_of(report):
    def pick(pred):
        return [t.get("rank") or 0 for t in report["tensors"] if pred(t["name"])]
    return {
        "embed": pick(lambda n: "embed_tokens" in n),
        "lm_head": pick(lambda n: n.startswith("lm_head")),
        "v_proj": pick(lambda n: "v_proj" in n),
    }


def evaluate(base, ft, adapter, eval_set):
    cmd = [sys.executable, os.path.join(HERE, "eval_adapter.py"), "--base", base, "--ft", ft,
           "--adapter", adapter, "--eval", eval_set]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {run.returncode}\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="make_finetune.py's output folder")
    ap.add_argument("--work", required=True, help="folder for the adapters and results")
    ap.add_argument("--kinds", default="sort,domain,random")
    ap.add_argument("--ranks", default="8,16,32")
    ap.add_argument("--rules", default="balanced,relative,frobenius,base,uniform")
    ap.add_argument("--variant", action="append", default=[], help="NAME=EXTRA ARGS")
    ap.add_argument("--extra", default="", help="added to every extract command, e.g. --remove-logit-shift")
    ap.add_argument("--energies", default="", help="also --energy T for these T, against uniform at the same count")
    ap.add_argument("--phlora", default=os.path.join(ROOT, "target", "release", "phlora"))
    args = ap.parse_args()
    EXTRA.extend(shlex.split(args.extra))
    os.makedirs(args.work, exist_ok=True)
    base = os.path.join(args.models, "base")
    rules = {
        "relative": ["--rank-rule", "relative"],
        "frobenius": ["--rank-rule", "frobenius"],
        "frobenius-floor0": ["--rank-rule", "frobenius", "--min-rank", "0"],
        "relative-floor0": ["--rank-rule", "relative", "--min-rank", "0"],
        "base": ["--rank-rule", "base"],
        "balanced": ["--rank-rule", "balanced"],
        "uniform": ["--rank-rule", "uniform"],
    }
    chosen = [(r, rules[r]) for r in args.rules.split(",") if r]
    for v in args.variant:
        name, _, extra = v.partition("=")
        chosen.append((name, shlex.split(extra)))
    rows = []
    results = open(os.path.join(args.work, "results.jsonl"), "a")

    def record(kind, label, r, report, out, ft, eval_set):
        ev = evaluate(base, ft, out, eval_set)
        row = {"kind": kind, "rank": r, "adapter": label, "params": params_of(report),
               "frobenius_error": round(report["summary"]["total_relative_error"], 4),
               **ranks_of(report), **ev["adapter"],
               "fine_tune_accuracy": ev["fine_tune"]["accuracy"], "base": ev["base"]}
        rows.append(row)
        results.write(json.dumps(row) + "\n")
        results.flush()
        print(f"{kind:7} r={r:<3} {label:24} params {row['params']:>8}  agree {row['agreement']:.4f}  "
              f"kl {row['kl']:.4f}  acc {row['accuracy']:.4f}  frob {row['frobenius_error']:.4f}  "
              f"embed {row['embed']} lm_head {row['lm_head']} v {row['v_proj']}", file=sys.stderr, flush=True)

    for kind in args.kinds.split(","):
        ft = os.path.join(args.models, kind)
        eval_set = os.path.join(ft, "eval.jsonl")
        for r in [int(x) for x in args.ranks.split(",") if x]:
            out = os.path.join(args.work, f"{kind}-r{r}-uniform")
            report, _ = extract(args.phlora, base, ft, out, ["--rank", str(r)])
            params = params_of(report)
            record(kind, f"--rank {r}", r, report, out, ft, eval_set)
            for label, extra in chosen:
                out = os.path.join(args.work, f"{kind}-r{r}-{label}")
                report, _ = extract(args.phlora, base, ft, out, ["--budget", str(params)] + extra)
                assert params_of(report) <= params, (label, params_of(report), params)
                record(kind, label, r, report, out, ft, eval_set)
        for t in [x for x in args.energies.split(",") if x]:
            out = os.path.join(args.work, f"{kind}-e{t}")
            report, _ = extract(args.phlora, base, ft, out, ["--energy", t])
            params = params_of(report)
            record(kind, f"--energy {t}", 0, report, out, ft, eval_set)
            out = os.path.join(args.work, f"{kind}-e{t}-uniform")
            report, _ = extract(args.phlora, base, ft, out,
                                ["--budget", str(params), "--rank-rule", "uniform"])
            record(kind, f"uniform at --energy {t}'s count", 0, report, out, ft, eval_set)
    print("| fine-tune | r | adapter | params | agreement | KL | accuracy | ‖ΔW−BA‖/‖ΔW‖ | embed | lm_head | v_proj |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['kind']} | {row['rank']} | {row['adapter']} | {row['params']} | {row['agreement']:.3f} | "
              f"{row['kl']:.3f} | {row['accuracy']:.3f} | {row['frobenius_error']:.3f} | "
              f"{','.join(map(str, row['embed']))} | {','.join(map(str, row['lm_head']))} | "
              f"{','.join(map(str, row['v_proj']))} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
