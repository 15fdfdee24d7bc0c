//! `--budget` rules, `analyze --budget`, lm_head's logit shift and the low-energy warning,
//! through the binary as a user runs it.

mod common;

use std::path::Path;

use common::*;
use phlora::checkpoint::DType;

fn report(out: &Path) -> serde_json::Value {
    read_json(&out.join("report.json"))
}

/// The run succeeded; else its stderr, with what it was.
fn assert_ok(o: &std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The report's row for one tensor.
fn tensor_row<'a>(rep: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    rep["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no row for {name}"))
}

fn ranks(rep: &serde_json::Value) -> Vec<(String, u64)> {
    rep["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| Some((t["name"].as_str()?.to_string(), t["rank"].as_u64()?)))
        .collect()
}

#[test]
fn every_rule_keeps_its_budget_and_floor_repeats_itself_and_loads_through_rank_pattern() {
    let dir = tempfile::tempdir().unwrap();
    synth_pair(dir.path(), "rules", 64, 2);
    let uniform = dir.path().join("uniform");
    let o = extract_pair(dir.path(), &uniform, &["--rank", "8"], &[]);
    assert_ok(&o, "--rank 8");
    let params: u64 = report(&uniform)["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| {
            let r = t["rank"].as_u64()?;
            Some(r * (t["shape"][0].as_u64()? + t["shape"][1].as_u64()?))
        })
        .sum();
    let budget = params.to_string();
    let analysis = dir.path().join("analysis");
    let o = phlora_cmd()
        .args([
            "analyze",
            "--device",
            "cpu",
            "--quiet",
            "--max-rank",
            "256",
            "--budget",
            &budget,
        ])
        .arg("--base")
        .arg(dir.path().join("base"))
        .arg("--ft")
        .arg(dir.path().join("ft"))
        .arg("--out")
        .arg(&analysis)
        .output()
        .unwrap();
    assert_ok(&o, "analyze --budget");
    let planned = read_json(&analysis.join("analysis.json"));
    for rule in ["balanced", "relative", "frobenius", "base", "uniform"] {
        assert!(
            analysis.join(format!("allocation_{rule}.png")).exists(),
            "{rule}"
        );
        let out = dir.path().join(format!("rule-{rule}"));
        let args = ["--budget", &budget, "--rank-rule", rule];
        let o = extract_pair(dir.path(), &out, &args, &[]);
        assert_ok(&o, rule);
        let rep = report(&out);
        let b = &rep["budget"];
        assert_eq!(b["rule"], rule);
        let spent: u64 = b["spent"].as_u64().unwrap();
        assert!(spent <= params, "{rule}: spent {spent} of {params}");
        // The floor (⅞ of the uniform rank, 8·7/8) holds for every LoRA target.
        assert_eq!(b["uniform_rank"], 8, "{rule}");
        assert_eq!(b["min_rank"], 7, "{rule}");
        let got = ranks(&rep);
        assert!(got.iter().all(|(_, r)| *r >= 7), "{rule}: {got:?}");
        // What analyze said it would allocate is what extract allocated.
        let said = planned["budget"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["rule"] == rule)
            .unwrap();
        let said: Vec<(String, u64)> = said["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap()))
            .collect();
        assert_eq!(said, got, "{rule}");
        // The same command, the same bytes.
        let again = dir.path().join(format!("{rule}-again"));
        assert!(extract_pair(dir.path(), &again, &args, &[])
            .status
            .success());
        assert_eq!(adapter_bytes(&out), adapter_bytes(&again), "{rule}");
        // Each tensor's factors have its rank, and the config says so (r or rank_pattern).
        let cfg = read_json(&out.join("adapter_config.json"));
        let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
        for (name, r) in &got {
            let module = name.trim_end_matches(".weight");
            let a = tensors
                .iter()
                .find(|(k, _)| {
                    k.contains(&format!("{module}.lora_A"))
                        || k.contains(&format!("{module}.lora_embedding_A"))
                })
                .unwrap_or_else(|| panic!("{rule}: no A for {module}"));
            assert_eq!(a.1.shape[0] as u64, *r, "{rule}: {}", a.0);
            let pattern = cfg["rank_pattern"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.replace("\\.", "."), v))
                .find(|(k, _)| *k == module || module.ends_with(&format!(".{k}")))
                .map(|(_, v)| v.as_u64().unwrap());
            assert_eq!(
                pattern.unwrap_or(cfg["r"].as_u64().unwrap()),
                *r,
                "{rule}: {module}"
            );
        }
        // --portable pads every tensor to one rank vLLM accepts, with the same product.
        let portable = dir.path().join(format!("{rule}-portable"));
        let o = extract_pair(
            dir.path(),
            &portable,
            &[&args[..], &["--portable"]].concat(),
            &[],
        );
        assert_ok(&o, rule);
        let cfg = read_json(&portable.join("adapter_config.json"));
        let r = cfg["r"].as_u64().unwrap();
        assert!(
            phlora::linalg::rank::PORTABLE_RANKS.contains(&(r as usize)),
            "{rule}: {r}"
        );
        assert!(
            cfg["rank_pattern"].as_object().is_none_or(|p| p.is_empty()),
            "{rule}: {cfg}"
        );
        // (Portable drops the norms, so compare the LoRA targets' certificates.)
        let residuals = |out: &Path| -> Vec<(String, f64)> {
            report(out)["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|t| Some((t["name"].as_str()?.to_string(), t["residual"].as_f64()?)))
                .filter(|(n, _)| {
                    n.ends_with("proj.weight") || n.contains("embed") || n.contains("lm_head")
                })
                .collect()
        };
        let (p, q) = (residuals(&portable), residuals(&out));
        assert_eq!(p.len(), q.len(), "{rule}");
        for ((n, a), (_, b)) in p.iter().zip(&q) {
            assert!((a - b).abs() < 1e-6, "{rule}: {n} {a} vs {b}");
        }
    }
    // A floor the budget cannot pay for is refused, and no adapter written.
    let out = dir.path().join("floor");
    let o = extract_pair(
        dir.path(),
        &out,
        &["--budget", &budget, "--min-rank", "9"],
        &[],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--min-rank 9"));
    assert!(!out.join("adapter_model.safetensors").exists());
}

/// A Llama-shaped pair whose lm_head ΔW is a logit shift 1·cᵀ plus a rank-2 change, and one
/// other changed layer; `softcap` adds Gemma 2's final_logit_softcapping to the config.
fn shifted_pair(root: &Path, seed: u64, softcap: bool) -> (Vec<f32>, Vec<f32>) {
    shifted_pair_with(root, seed, softcap, 0.1)
}

/// [`shifted_pair`] with the rank-2 part of lm_head's ΔW scaled by `planted` (0: a pure shift).
fn shifted_pair_with(root: &Path, seed: u64, softcap: bool, planted: f32) -> (Vec<f32>, Vec<f32>) {
    let (v, h) = (512usize, 256usize);
    let c = normal(h, seed);
    let u = normal(v * 2, seed + 1);
    let w = normal(2 * h, seed + 2);
    let base_head = normal(v * h, seed + 3);
    let ft_head: Vec<f32> = (0..v * h)
        .map(|k| {
            let (i, j) = (k / h, k % h);
            base_head[k] + 0.5 * c[j] + planted * (u[2 * i] * w[j] + u[2 * i + 1] * w[h + j])
        })
        .collect();
    let q = normal(h * h, seed + 4);
    let dq: Vec<f32> = q
        .iter()
        .zip(normal(h * h, seed + 5))
        .map(|(a, b)| a + 0.01 * b)
        .collect();
    let embed = normal(v * h, seed + 6);
    for (side, head, qq) in [("base", &base_head, &q), ("ft", &ft_head, &dq)] {
        let folder = root.join(side);
        std::fs::create_dir_all(&folder).unwrap();
        write_single(
            &folder.join("model.safetensors"),
            &[
                tensor("lm_head.weight", DType::F32, &[v, h], head.clone()),
                tensor(
                    "model.embed_tokens.weight",
                    DType::F32,
                    &[v, h],
                    embed.clone(),
                ),
                tensor(
                    "model.layers.0.self_attn.q_proj.weight",
                    DType::F32,
                    &[h, h],
                    qq.clone(),
                ),
            ],
        );
        let mut cfg = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "tie_word_embeddings": false, "vocab_size": v, "hidden_size": h});
        if softcap {
            cfg["final_logit_softcapping"] = serde_json::json!(30.0);
        }
        std::fs::write(folder.join("config.json"), cfg.to_string()).unwrap();
    }
    (base_head, ft_head)
}

#[test]
fn lm_heads_logit_shift_is_left_out_and_changes_no_probability() {
    let dir = tempfile::tempdir().unwrap();
    let (base_head, ft_head) = shifted_pair(dir.path(), fresh_seed("shift"), false);
    let (v, h) = (512usize, 256usize);
    let delta: Vec<f64> = ft_head
        .iter()
        .zip(&base_head)
        .map(|(a, b)| f64::from(*a) - f64::from(*b))
        .collect();
    let total: f64 = delta.iter().map(|x| x * x).sum();
    let col_mean = |j: usize| (0..v).map(|i| delta[i * h + j]).sum::<f64>() / v as f64;
    let shift: f64 = (0..h).map(|j| v as f64 * col_mean(j).powi(2)).sum();
    // Room for the sketches, not for lm_head's ΔW whole.
    let tight = (phlora::extract::BASELINE_RAM + (200 << 10)).to_string();
    for (tag, extra) in [
        ("whole", vec![]),
        ("blocked", vec!["--max-ram", &tight, "--in-flight", "1"]),
    ] {
        let out = dir.path().join(tag);
        let args = [
            &["--rank", "2", "--out-dtype", "f32", "--remove-logit-shift"][..],
            &extra,
        ]
        .concat();
        let o = extract_pair(dir.path(), &out, &args, &[]);
        assert_ok(&o, tag);
        let rep = report(&out);
        let head = tensor_row(&rep, "lm_head.weight");
        if tag == "blocked" {
            assert!(head["row_blocks"].as_u64().is_some(), "{head}");
        }
        let got = head["logit_shift"].as_f64().unwrap();
        assert!(
            (got - shift / total).abs() < 1e-5,
            "{tag}: {got} vs {}",
            shift / total
        );
        // Rank 2 carries all of P·ΔW: the certificate says so, and so do the probabilities.
        assert!(
            head["residual"].as_f64().unwrap().powi(2) < 1e-5,
            "{tag}: {head}"
        );
        let t = read_safetensors(&out.join("adapter_model.safetensors"));
        let (a, b) = (
            &t["base_model.model.lm_head.lora_A.weight"],
            &t["base_model.model.lm_head.lora_B.weight"],
        );
        let cfg = read_json(&out.join("adapter_config.json"));
        let scale = cfg["lora_alpha"].as_f64().unwrap() / cfg["r"].as_f64().unwrap();
        let x = normal(h, 99);
        let softmax = |w: &dyn Fn(usize, usize) -> f64| -> Vec<f64> {
            let z: Vec<f64> = (0..v)
                .map(|i| (0..h).map(|j| w(i, j) * f64::from(x[j])).sum())
                .collect();
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = z.iter().map(|z| (z - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|e| e / s).collect()
        };
        let ft = softmax(&|i, j| f64::from(ft_head[i * h + j]));
        let adapted = softmax(&|i, j| {
            let ba: f64 = (0..2)
                .map(|k| f64::from(b.values[i * 2 + k]) * f64::from(a.values[k * h + j]))
                .sum();
            f64::from(base_head[i * h + j]) + scale * ba
        });
        let worst = ft
            .iter()
            .zip(&adapted)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "{tag}: probabilities differ by {worst}");
        let weights_differ = (0..v * h).any(|k| {
            let (i, j) = (k / h, k % h);
            let ba: f64 = (0..2)
                .map(|r| f64::from(b.values[i * 2 + r]) * f64::from(a.values[r * h + j]))
                .sum();
            (scale * ba - delta[k]).abs() > 1e-3
        });
        assert!(weights_differ, "{tag}: the shift was carried after all");
        // verify reads report.json and compares modulo the shift: its figures are extract's.
        let v = verify_pair(&dir.path().join("base"), &dir.path().join("ft"), &out).unwrap();
        let vh = v
            .tensors
            .iter()
            .find(|t| t.name == "lm_head.weight")
            .unwrap();
        assert!(
            (vh.logit_shift.unwrap() - got).abs() < 1e-6,
            "{tag}: {vh:?}"
        );
        // extract's certificate subtracts the shift's part from ‖ΔW − B·A‖² formed in f32:
        // exact to ~1e-7·‖ΔW‖² in the square, which verify (in f64 throughout) is not.
        let res = head["residual"].as_f64().unwrap();
        assert!(
            (vh.rel_error_delta.powi(2) - res * res).abs() < 1e-5,
            "{tag}: {vh:?} against {res}"
        );
        let total = rep["summary"]["total_relative_error"].as_f64().unwrap();
        assert!(
            (v.total_relative_error.powi(2) - total * total).abs() < 1e-5,
            "{tag}: {} vs {total}",
            v.total_relative_error
        );
    }
    // A head changed by nothing but a shift: no LoRA, and verify does not call it uncarried.
    let pure = tempfile::tempdir().unwrap();
    shifted_pair_with(pure.path(), fresh_seed("pure-shift"), false, 0.0);
    let out = pure.path().join("out");
    let o = extract_pair(
        pure.path(),
        &out,
        &["--rank", "2", "--remove-logit-shift"],
        &[],
    );
    assert_ok(&o, "pure shift");
    let rep = report(&out);
    let head = tensor_row(&rep, "lm_head.weight");
    assert_eq!(head["action"], "unchanged", "{head}");
    let v = verify_pair(&pure.path().join("base"), &pure.path().join("ft"), &out).unwrap();
    assert!(
        v.tensors.iter().all(|t| t.name != "lm_head.weight"),
        "{:?}",
        v.tensors.iter().find(|t| t.name == "lm_head.weight")
    );
    assert_eq!(v.not_carried, 0);
    // Kept by default, and kept where softmax does not see the raw logits.
    let kept = dir.path().join("kept");
    assert!(extract_pair(dir.path(), &kept, &["--rank", "2"], &[])
        .status
        .success());
    let soft = tempfile::tempdir().unwrap();
    shifted_pair(soft.path(), fresh_seed("softcap"), true);
    let capped = soft.path().join("out");
    assert!(extract_pair(
        soft.path(),
        &capped,
        &["--rank", "2", "--remove-logit-shift"],
        &[]
    )
    .status
    .success());
    for out in [&kept, &capped] {
        let rep = report(out);
        let head = tensor_row(&rep, "lm_head.weight");
        assert!(head.get("logit_shift").is_none(), "{head}");
        assert!(
            head["residual"].as_f64().unwrap() > 0.1,
            "rank 2 cannot hold the shift too: {head}"
        );
    }
}

#[test]
fn an_adapter_that_keeps_little_says_so_and_one_that_keeps_enough_does_not() {
    let dir = tempfile::tempdir().unwrap();
    synth_pair(dir.path(), "low-energy", 64, 2);
    let out = dir.path().join("low");
    let o = extract_cmd(dir.path(), &out, &["--rank", "1"])
        .output()
        .unwrap();
    assert_ok(&o, "rank 1");
    let err = String::from_utf8_lossy(&o.stderr);
    let low = &report(&out)["summary"]["low_energy"];
    let kept = low["kept"].as_f64().unwrap();
    assert!(kept < 0.8, "{low}");
    assert_eq!(low["worst"].as_array().unwrap().len(), 3, "{low}");
    let worst = low["worst"][0][0].as_str().unwrap();
    assert!(
        err.contains("keeps") && err.contains(worst) && err.contains("phlora analyze"),
        "{err}"
    );
    // The full rank keeps everything: no warning.
    let out = dir.path().join("full");
    let o = extract_cmd(dir.path(), &out, &["--rank", "64"])
        .output()
        .unwrap();
    assert_ok(&o, "rank 64");
    assert!(report(&out)["summary"].get("low_energy").is_none());
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("keeps"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
