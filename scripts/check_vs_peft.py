#!/usr/bin/env python3
"""Holds `phlora check --for peft` to what PEFT itself does with each adapter.

For every BASE ADAPTER pair: loads BASE with transformers and the adapter with
`PeftModel.from_pretrained` (each in its own process, so warnings do not leak between runs),
records an exception (refused), the keys PEFT's `load_state_dict(strict=False)` left unused
(dropped silently: PEFT warns only about missing keys), and "Found missing adapter keys"
(a module left at its init), then compares with phlora's verdict:

    refused  an exception           phlora: loads = false
    differs  keys dropped or missing phlora: loads, not as_peft
    ok       neither                phlora: as_peft

    pip install torch transformers peft   # not part of CI
    python3 scripts/check_vs_peft.py [--phlora BIN] BASE ADAPTER [BASE ADAPTER ...]

Exit status 0 when every verdict agrees.
"""
import argparse
import json
import os
import subprocess
import sys


def load_with_peft(base, adapter):
    """What PEFT does with the adapter: (outcome, detail)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import logging
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    for name in ("peft", "transformers"):
        logging.getLogger(name).addHandler(Collect())
    unused = []
    original = PeftModel.load_state_dict

    def recording(self, state_dict, strict=True, **kw):
        result = original(self, state_dict, strict=strict, **kw)
        unused.extend(k for k in result.unexpected_keys if "lora_" in k)
        return result

    PeftModel.load_state_dict = recording
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            PeftModel.from_pretrained(model, adapter)
        except Exception as e:  # what a user sees: PEFT refuses the adapter
            return "refused", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    messages += [str(w.message) for w in caught]
    missing = [m for m in messages if "missing adapter keys" in m]
    if unused or missing:
        return "differs", f"{len(unused)} keys unused; " + (missing[0][:120] if missing else "")
    return "ok", ""


def phlora_verdict(phlora, base, adapter):
    out = subprocess.run(
        [phlora, "check", adapter, "--for", "peft", "--base", base, "--json", "--quiet"],
        capture_output=True, text=True,
    )
    if not out.stdout:
        return "error", out.stderr.strip()
    v = json.loads(out.stdout)["verdicts"][0]
    outcome = "refused" if not v["loads"] else ("differs" if not v["as_peft"] else "ok")
    return outcome, ",".join(f["rule"] for f in v["findings"] if f["severity"] != "note")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(load_with_peft(sys.argv[2], sys.argv[3])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phlora", default="target/release/phlora")
    ap.add_argument("pairs", nargs="+", metavar="BASE ADAPTER")
    a = ap.parse_args()
    if len(a.pairs) % 2:
        ap.error("give BASE ADAPTER pairs")
    disagree = 0
    print("| adapter | PEFT | phlora check --for peft | agree |\n| --- | --- | --- | --- |")
    for base, adapter in zip(a.pairs[::2], a.pairs[1::2]):
        child = subprocess.run([sys.executable, __file__, "--child", base, adapter],
                               capture_output=True, text=True)
        if child.returncode != 0 or not child.stdout.strip():
            actual = ("error", child.stderr.strip().splitlines()[-1] if child.stderr else "")
        else:
            actual = tuple(json.loads(child.stdout.strip().splitlines()[-1]))
        predicted = phlora_verdict(a.phlora, base, adapter)
        agree = actual[0] == predicted[0]
        disagree += not agree
        print(f"| {os.path.basename(adapter.rstrip('/'))} | {actual[0]} {actual[1]} | "
              f"{predicted[0]} {predicted[1]} | {'yes' if agree else '**no**'} |")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
