#!/usr/bin/env python3
"""Compares phlora adapters extracted from the same pair on different devices.

    compare_adapters.py REFERENCE OTHER [OTHER...] [--base BASE --ft FT]

For every LoRA module: ‖B·A − B_ref·A_ref‖ / ‖B_ref·A_ref‖ (reconstructions, so singular-vector
signs do not matter), and the per-tensor residuals of the reports side by side. With --base and
--ft (a folder with config.json), it also loads each adapter with PEFT onto the base model,
merges it, and checks that the merged weights are base + B·A: PEFT reads what phlora wrote.

Needs torch and safetensors (and transformers + peft for the PEFT check). Exit status 1 if a
comparison fails its tolerance.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file


def products(adapter_dir, device):
    t = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"), device=device)
    out = {}
    for k, a in t.items():
        if k.endswith("lora_A.weight"):
            b = t[k.replace("lora_A", "lora_B")]
            out[k[: -len(".lora_A.weight")]] = b.double() @ a.double()
        elif k.endswith("lora_embedding_A"):
            b = t[k.replace("lora_embedding_A", "lora_embedding_B")]
            out[k[: -len(".lora_embedding_A")]] = b.double() @ a.double()
    return out


def residuals(adapter_dir):
    r = json.load(open(os.path.join(adapter_dir, "report.json")))
    return {t["name"]: t["residual"] for t in r["tensors"] if t.get("residual") is not None}, r


def peft_check(base, ft, adapter_dir, device):
    """Loads the adapter with PEFT, merges it, and returns the worst relative difference between
    PEFT's merged weight − base and phlora's B·A (both in f32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged = model.state_dict()
    prods = products(adapter_dir, device)
    worst = 0.0
    checked = 0
    for key, ba in prods.items():
        name = key.replace("base_model.model.", "") + ".weight"
        if name not in merged:
            raise SystemExit(f"PEFT: {name} not in the merged model")
        got = (merged[name].double() - base_sd[name].double())
        want = ba if got.shape == ba.shape else ba.T
        rel = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        worst = max(worst, rel)
        checked += 1
    return checked, worst


def main():
    p = argparse.ArgumentParser()
    p.add_argument("reference")
    p.add_argument("others", nargs="+")
    p.add_argument("--base")
    p.add_argument("--ft")
    p.add_argument("--tol", type=float, default=1e-2, help="reconstruction tolerance")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok = True
    ref = products(a.reference, device)
    ref_res, ref_rep = residuals(a.reference)
    for other in a.others:
        got = products(other, device)
        if set(got) != set(ref):
            print(f"{other}: module sets differ")
            ok = False
            continue
        worst = max(
            ((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)).item() for k in ref
        )
        res, rep = residuals(other)
        # Residuals are certificates: they agree to rounding (relative to at least 1e-3, so a
        # nearly exact fit's tiny residual is not held to a relative bound).
        dres = max(abs(res[k] - ref_res[k]) / max(ref_res[k], 1e-3) for k in ref_res)
        ok &= dres < 1e-5
        # ‖ΔW‖ of every tensor: the delta kernels' reductions against the CPU's.
        norms = {t["name"]: t.get("delta_norm") for t in rep["tensors"]}
        ref_norms = {t["name"]: t.get("delta_norm") for t in ref_rep["tensors"]}
        dnorm = max(
            abs(norms[k] - v) / max(v, 1e-30) for k, v in ref_norms.items() if v is not None
        )
        ok &= dnorm < 1e-6
        print(f"  worst ‖ΔW‖ difference {dnorm:.2e} (relative) [{'ok' if dnorm < 1e-6 else 'FAIL'}]")
        status = "ok" if worst < a.tol else "FAIL"
        ok &= worst < a.tol
        print(
            f"{os.path.basename(other)} vs {os.path.basename(a.reference)}: worst ‖ΔBA‖/‖BA‖ "
            f"{worst:.2e}, worst residual difference {dres:.2e} (relative"
            f"{'' if dres < 1e-5 else ', over 1e-5: FAIL'}), "
            f"time {rep['summary']['seconds']:.2f} s vs {ref_rep['summary']['seconds']:.2f} s "
            f"[{status}]"
        )
    if a.base:
        for adapter in [a.reference] + a.others:
            try:
                checked, worst = peft_check(a.base, a.ft, adapter, device)
                status = "ok" if worst < 1e-3 else "FAIL"
                ok &= worst < 1e-3
                print(
                    f"PEFT {os.path.basename(adapter)}: loaded and merged, {checked} modules, "
                    f"worst ‖merged − base − BA‖/‖BA‖ {worst:.2e} [{status}]"
                )
            except Exception as e:  # report, do not hide
                ok = False
                print(f"PEFT {os.path.basename(adapter)}: FAILED: {type(e).__name__}: {e}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
