//! The workflow after extract: verify an adapter against the pair (phlora's and hand-made ones
//! with rank_pattern, alpha_pattern, use_rslora), catch a corrupted one, and merge.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use phlora::checkpoint::DType;
use phlora::extract::{extract, ExtractSettings};
use phlora::report::TensorAction;
use phlora::verify::CheckKind;
use phlora::verify::{verify, VerifySettings};

const H: usize = 24;
const I: usize = 40;
const V: usize = 56;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A Llama-named pair: every matrix changes by a rank-3 part plus noise, norms change a little,
/// one bias changes (a LoRA cannot carry it), layer 1's o_proj does not change.
fn pair(root: &Path, dtype: DType, seed: u64) -> (PathBuf, PathBuf) {
    let mut names: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![V, H])];
    for l in 0..2 {
        names.push((format!("model.layers.{l}.input_layernorm.weight"), vec![H]));
        for p in ["q_proj", "o_proj"] {
            names.push((format!("model.layers.{l}.self_attn.{p}.weight"), vec![H, H]));
        }
        names.push((format!("model.layers.{l}.self_attn.q_proj.bias"), vec![H]));
        names.push((format!("model.layers.{l}.mlp.up_proj.weight"), vec![I, H]));
        names.push((format!("model.layers.{l}.mlp.down_proj.weight"), vec![H, I]));
    }
    names.push(("model.norm.weight".into(), vec![H]));
    names.push(("lm_head.weight".into(), vec![V, H]));
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (k, (name, shape)) in names.iter().enumerate() {
        let sd = seed.wrapping_add(k as u64 * 7919);
        let n: usize = shape.iter().product();
        let b: Vec<f32> = if shape.len() == 1 {
            normal(n, sd).iter().map(|x| 1.0 + 0.05 * x).collect()
        } else {
            normal(n, sd).iter().map(|x| 0.02 * x).collect()
        };
        let d: Vec<f32> = if name.contains("layers.1.self_attn.o_proj") {
            vec![0.0; n]
        } else if shape.len() == 1 {
            normal(n, sd + 1).iter().map(|x| 0.01 * x).collect()
        } else {
            to_row_major_f32(&spectrum_matrix(
                shape[0],
                shape[1],
                &[1.0, 0.5, 0.25],
                1e-3,
                sd + 2,
            ))
        };
        let f: Vec<f32> = b.iter().zip(&d).map(|(x, y)| x + y).collect();
        base.push(tensor(name, dtype, shape, b));
        ft.push(tensor(name, dtype, shape, f));
    }
    let (bd, fd) = (root.join("base"), root.join("ft"));
    for (dir, t) in [(&bd, &base), (&fd, &ft)] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#,
        )
        .unwrap();
        write_sharded(dir, t, 4);
    }
    (bd, fd)
}

fn extracted(
    root: &Path,
    dtype: DType,
    seed: u64,
    rank: usize,
) -> (PathBuf, PathBuf, PathBuf, phlora::report::RunReport) {
    let (b, f) = pair(root, dtype, seed);
    let out = root.join("adapter");
    let mut st = ExtractSettings::new(b.clone(), f.clone(), out.clone(), rank);
    st.device = phlora::backend::Device::Cpu;
    let report = extract(&st).unwrap();
    (b, f, out, report)
}

fn settings(b: &Path, f: &Path, a: &Path) -> VerifySettings {
    VerifySettings {
        base: b.to_path_buf(),
        ft: f.to_path_buf(),
        adapter: a.to_path_buf(),
        min_cos: None,
        max_error: None,
        min_weight_cos: None,
    }
}

#[test]
fn verify_agrees_with_the_certificate_extract_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f, a, report) = extracted(dir.path(), DType::BF16, fresh_seed("verify-agrees"), 2);
    let v = verify(&settings(&b, &f, &a)).unwrap();
    assert!(v.passed);
    assert_eq!(v.modules, report.summary.lora);
    assert_eq!(v.not_carried, report.summary.not_carried);
    // Two independent computations of the same numbers: extract's residual certificate and
    // verify's merge in row blocks.
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 + 1e-5 * y.abs();
    assert!(
        close(v.total_relative_error, report.summary.total_relative_error),
        "{} vs {}",
        v.total_relative_error,
        report.summary.total_relative_error
    );
    assert!(close(v.share_not_carried, report.summary.share_not_carried));
    for t in &v.tensors {
        let r = report.tensors.iter().find(|r| r.name == t.name).unwrap();
        assert!(close(t.delta_norm, r.delta_norm), "{}", t.name);
        if let Some(res) = r.residual {
            assert!(
                close(t.rel_error_delta, res),
                "{}: {} vs {res}",
                t.name,
                t.rel_error_delta
            );
            // cos(ΔŴ, ΔW) of the best rank-r approximation is √(1 − residual²).
            assert!(
                (t.cos_delta - (1.0 - res * res).sqrt()).abs() < 1e-3,
                "{}",
                t.name
            );
            assert!(
                t.cos_weight > 0.9 && t.cos_weight <= 1.0 + 1e-12,
                "{}",
                t.name
            );
        }
        if t.kind == CheckKind::SavedWhole {
            assert!(
                t.rel_error_delta < 1e-6,
                "{}: norms are saved exactly",
                t.name
            );
        }
    }
    // Rank 2 misses the third planted direction (σ = 0.25 of 1, 0.5): cos ≈ 0.97.
    let o = phlora(&[
        "verify",
        "--base",
        s(&b),
        "--ft",
        s(&f),
        "--adapter",
        s(&a),
        "--min-cos",
        "0.9",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = phlora(&[
        "verify",
        "--base",
        s(&b),
        "--ft",
        s(&f),
        "--adapter",
        s(&a),
        "--min-cos",
        "0.99",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("FAILED") && err.contains(" NO"), "{err}");
}

#[test]
fn verify_catches_a_corrupted_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f, a, _) = extracted(dir.path(), DType::F32, fresh_seed("verify-corrupt"), 3);
    let model = a.join("adapter_model.safetensors");
    // B of one module negated: the update points the other way.
    let key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight";
    rewrite_adapter(&a, |tensors| {
        for x in &mut tensors.get_mut(key).unwrap().values {
            *x = -*x;
        }
    });
    let mut st = settings(&b, &f, &a);
    st.min_cos = Some(0.9);
    let v = verify(&st).unwrap();
    assert!(!v.passed);
    let bad = v
        .tensors
        .iter()
        .find(|t| t.name == "model.layers.0.mlp.up_proj.weight")
        .unwrap();
    assert!(bad.cos_delta < -0.9 && !bad.passed, "{bad:?}");
    assert!(bad.rel_error_delta > 1.9, "{bad:?}");
    assert!(v
        .tensors
        .iter()
        .filter(|t| t.name != bad.name)
        .all(|t| t.passed));

    // A config whose r disagrees with the factors is an error that names the module.
    let cfg_path = a.join("adapter_config.json");
    let mut cfg = read_json(&cfg_path);
    cfg["r"] = serde_json::json!(5);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = verify(&settings(&b, &f, &a)).err().unwrap().to_string();
    assert!(err.contains("rank 3") && err.contains("r = 5"), "{err}");
    // So is a missing factor file.
    std::fs::remove_file(&model).unwrap();
    let o = phlora(&["verify", "--base", s(&b), "--ft", s(&f), "--adapter", s(&a)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("adapter_model.safetensors") && !err.contains("panicked"),
        "{err}"
    );
}

/// An adapter another tool could have written: per-module ranks and alphas through
/// rank_pattern / alpha_pattern, rsLoRA scaling, and whose product is exactly ΔW.
#[test]
fn verify_honours_rank_and_alpha_patterns_and_rslora() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fresh_seed("patterns");
    // (module, rows, cols, rank, alpha)
    let modules = [
        ("model.layers.0.self_attn.q_proj", H, H, 2, 6.0),
        ("model.layers.0.mlp.up_proj", I, H, 4, 16.0),
    ];
    let (mut base, mut ft, mut factors) = (Vec::new(), Vec::new(), Vec::new());
    for (k, &(m, rows, cols, r, alpha)) in modules.iter().enumerate() {
        let sd = seed.wrapping_add(100 * k as u64);
        let a = normal(r * cols, sd);
        let bm = normal(rows * r, sd + 1);
        let scaling = alpha / (r as f64).sqrt(); // use_rslora
        let w = normal(rows * cols, sd + 2);
        let mut wf = w.clone();
        for i in 0..rows {
            for j in 0..cols {
                let dot: f64 = (0..r)
                    .map(|t| f64::from(bm[i * r + t]) * f64::from(a[t * cols + j]))
                    .sum();
                wf[i * cols + j] += (scaling * dot) as f32;
            }
        }
        base.push(tensor(&format!("{m}.weight"), DType::F32, &[rows, cols], w));
        ft.push(tensor(
            &format!("{m}.weight"),
            DType::F32,
            &[rows, cols],
            wf,
        ));
        factors.push(tensor(
            &format!("base_model.model.{m}.lora_A.weight"),
            DType::F32,
            &[r, cols],
            a,
        ));
        factors.push(tensor(
            &format!("base_model.model.{m}.lora_B.weight"),
            DType::F32,
            &[rows, r],
            bm,
        ));
    }
    let (b, f, a) = (
        dir.path().join("base.safetensors"),
        dir.path().join("ft.safetensors"),
        dir.path().join("adapter"),
    );
    write_single(&b, &base);
    write_single(&f, &ft);
    std::fs::create_dir_all(&a).unwrap();
    write_single(&a.join("adapter_model.safetensors"), &factors);
    // Keys in file order, as PEFT tries them: `q_proj` must win over the catch-all `.*proj`.
    let cfg = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 16.0, "use_rslora": true,
        "target_modules": ["q_proj", "up_proj"],
        "rank_pattern": {"q_proj": 2, ".*proj": 4}, "alpha_pattern": {"self_attn.q_proj": 6.0}}"#;
    std::fs::write(a.join("adapter_config.json"), cfg).unwrap();
    let v = verify(&settings(&b, &f, &a)).unwrap();
    assert_eq!(v.modules, 2);
    for t in &v.tensors {
        assert!(t.rel_error_delta < 1e-5, "{t:?}");
        assert!(t.cos_delta > 1.0 - 1e-9, "{t:?}");
    }
    let q = v
        .tensors
        .iter()
        .find(|t| t.name.contains("q_proj"))
        .unwrap();
    assert!((q.scaling.unwrap() - 6.0 / 2f64.sqrt()).abs() < 1e-12);
    // Without rsLoRA the same factors are scaled by α/r instead: a different update.
    let plain = cfg.replace(r#""use_rslora": true"#, r#""use_rslora": false"#);
    std::fs::write(a.join("adapter_config.json"), plain).unwrap();
    let v = verify(&settings(&b, &f, &a)).unwrap();
    assert!(
        v.tensors.iter().all(|t| t.rel_error_delta > 0.2),
        "{:?}",
        v.tensors
    );
}

fn header(bytes: &[u8]) -> &[u8] {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    &bytes[..8 + n]
}

#[test]
fn merge_equals_base_plus_ba_to_the_dtype_rounding_in_the_base_layout() {
    for dtype in [DType::BF16, DType::F32] {
        let dir = tempfile::tempdir().unwrap();
        let (b, f, a, _) = extracted(dir.path(), dtype, fresh_seed("merge"), 3);
        let out = dir.path().join("merged");
        let o = phlora(&[
            "merge",
            "--base",
            s(&b),
            "--adapter",
            s(&a),
            "--out",
            s(&out),
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["copied_files"], serde_json::json!(["config.json"]));
        // The layout: the same files, index and headers.
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&out), names(&b));
        assert_eq!(
            std::fs::read(out.join("model.safetensors.index.json")).unwrap(),
            std::fs::read(b.join("model.safetensors.index.json")).unwrap()
        );
        let factors = read_safetensors(&a.join("adapter_model.safetensors"));
        let mut checked = 0;
        for shard in names(&b).iter().filter(|n| n.ends_with(".safetensors")) {
            let (bb, mb) = (
                std::fs::read(b.join(shard)).unwrap(),
                std::fs::read(out.join(shard)).unwrap(),
            );
            assert_eq!(header(&bb), header(&mb), "{shard}");
            let (base, merged, ft) = (
                read_safetensors(&b.join(shard)),
                read_safetensors(&out.join(shard)),
                read_safetensors(&f.join(shard)),
            );
            for (name, w) in &base {
                let m = &merged[name];
                let module = name.trim_end_matches(".weight");
                let key = |k: &str| format!("base_model.model.{module}.{k}");
                let lora = factors
                    .get(&key("lora_A.weight"))
                    .map(|a| (a, &factors[&key("lora_B.weight")], false))
                    .or_else(|| {
                        factors
                            .get(&key("lora_embedding_A"))
                            .map(|a| (a, &factors[&key("lora_embedding_B")], true))
                    });
                if let Some((fa, fb, transposed)) = lora {
                    // ΔW = B·A (scaling 1 in phlora's adapters), transposed for embeddings.
                    let (r, cols) = (fa.shape[0], w.shape[1]);
                    for i in 0..w.shape[0] {
                        for j in 0..cols {
                            let dot: f64 = (0..r)
                                .map(|k| {
                                    let (x, y) = if transposed {
                                        (fa.values[k * fa.shape[1] + i], fb.values[j * r + k])
                                    } else {
                                        (fb.values[i * r + k], fa.values[k * cols + j])
                                    };
                                    f64::from(x) * f64::from(y)
                                })
                                .sum();
                            let want = f64::from(w.values[i * cols + j]) + dot;
                            let got = f64::from(m.values[i * cols + j]);
                            // Half an ulp of the dtype, and f32 arithmetic on the way.
                            let tol = if dtype == DType::BF16 {
                                2f64.powi(-8)
                            } else {
                                1e-6
                            } * want.abs()
                                + 1e-7;
                            assert!(
                                (got - want).abs() <= tol,
                                "{dtype:?} {name}[{i},{j}]: {got} vs {want}"
                            );
                        }
                    }
                    checked += 1;
                } else if factors.contains_key(&format!("base_model.model.{name}")) {
                    assert_eq!(
                        m.values, ft[name].values,
                        "{name}: the saved norm replaces the base's"
                    );
                } else {
                    assert_eq!(m.values, w.values, "{name}: untouched tensors are copied");
                }
            }
        }
        assert_eq!(checked, summary["merged"].as_u64().unwrap() as usize);
        // And the merged model is what verify expects of this adapter, to the dtype's rounding.
        let v = verify(&settings(&b, &out, &a)).unwrap();
        let limit = if dtype == DType::BF16 { 0.1 } else { 1e-5 };
        assert_lora_within(&v, limit, "");
        // Nothing outside the adapter differs between the base and the merged model.
        assert!(v.tensors.iter().all(|t| t.kind != CheckKind::NotCarried));
    }
}

#[test]
fn merge_refuses_bad_input_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _f, a, _) = extracted(dir.path(), DType::BF16, fresh_seed("merge-bad"), 2);
    let out = dir.path().join("merged");
    assert!(phlora(&[
        "merge",
        "--base",
        s(&b),
        "--adapter",
        s(&a),
        "--out",
        s(&out)
    ])
    .status
    .success());
    // An existing checkpoint is kept unless --force.
    let o = phlora(&[
        "merge",
        "--base",
        s(&b),
        "--adapter",
        s(&a),
        "--out",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(phlora(&[
        "merge",
        "--base",
        s(&b),
        "--adapter",
        s(&a),
        "--out",
        s(&out),
        "--force"
    ])
    .status
    .success());
    // An adapter for another model: the module is named, and OUT is not created.
    let cfg = a.join("adapter_config.json");
    let other = dir.path().join("other-adapter");
    std::fs::create_dir_all(&other).unwrap();
    // Its config targets its module (verify and merge apply only what the config targets).
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    config["target_modules"] = serde_json::json!(["up_proj"]);
    std::fs::write(other.join("adapter_config.json"), config.to_string()).unwrap();
    write_single(
        &other.join("adapter_model.safetensors"),
        &[
            tensor(
                "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight",
                DType::F32,
                &[2, H],
                vec![0.0; 2 * H],
            ),
            tensor(
                "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight",
                DType::F32,
                &[I, 2],
                vec![0.0; 2 * I],
            ),
        ],
    );
    let fresh = dir.path().join("fresh");
    let o = phlora(&[
        "merge",
        "--base",
        s(&b),
        "--adapter",
        s(&other),
        "--out",
        s(&fresh),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("layers.9.mlp.up_proj")
            && err.contains("no `model.layers.9.mlp.up_proj.weight`"),
        "{err}"
    );
    assert!(!fresh.exists(), "no output folder after a refused merge");
    assert!(!err.contains("panicked"), "{err}");
}

// ---- rank policies -------------------------------------------------------------------------

/// A pair of one 160×120 matrix with a slowly decaying spectrum (σᵢ = (1+i)^-0.35: reaching
/// 90% of the energy takes well over the energy policy's first sketch of 32), and two small
/// steep ones.
fn spectrum_pair(root: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let specs: [(&str, usize, usize, Vec<f64>); 3] = [
        (
            "model.layers.0.mlp.up_proj.weight",
            160,
            120,
            power_law(120, 0.35),
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            48,
            48,
            power_law(48, 1.5),
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            48,
            48,
            power_law(48, 0.8),
        ),
    ];
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (k, (name, m, n, sigma)) in specs.iter().enumerate() {
        let b = normal(m * n, seed + 10 * k as u64);
        let d = to_row_major_f32(&spectrum_matrix(
            *m,
            *n,
            sigma,
            0.0,
            seed + 10 * k as u64 + 1,
        ));
        let f: Vec<f32> = b.iter().zip(&d).map(|(x, y)| x + y).collect();
        base.push(tensor(name, DType::F32, &[*m, *n], b));
        ft.push(tensor(name, DType::F32, &[*m, *n], f));
    }
    let (b, f) = (root.join("base.safetensors"), root.join("ft.safetensors"));
    write_single(&b, &base);
    write_single(&f, &ft);
    (b, f)
}

/// Exact singular values of each LoRA target's ΔW, from the files (f64).
fn exact_spectra(b: &Path, f: &Path) -> std::collections::HashMap<String, Vec<f64>> {
    let (base, ft) = (read_safetensors(b), read_safetensors(f));
    ft.iter()
        .filter(|(_, t)| t.shape.len() == 2)
        .map(|(name, t)| {
            let (m, n) = (t.shape[0], t.shape[1]);
            let d = faer::Mat::<f64>::from_fn(m, n, |i, j| {
                f64::from(t.values[i * n + j]) - f64::from(base[name].values[i * n + j])
            });
            (name.clone(), singular_values(&d))
        })
        .collect()
}

fn energy_at(s: &[f64], r: usize) -> f64 {
    s[..r].iter().map(|x| x * x).sum::<f64>() / s.iter().map(|x| x * x).sum::<f64>()
}

fn run_policy(
    b: &Path,
    f: &Path,
    out: &Path,
    policy: phlora::linalg::rank::RankPolicy,
    portable: bool,
) -> phlora::report::RunReport {
    let mut st = ExtractSettings::new(b.to_path_buf(), f.to_path_buf(), out.to_path_buf(), 1);
    st.device = phlora::backend::Device::Cpu;
    st.rank = policy;
    st.target = if portable {
        phlora::extract::Target::Portable
    } else {
        phlora::extract::Target::Peft
    };
    extract(&st).unwrap()
}

#[test]
fn the_energy_policy_meets_its_target_on_every_tensor() {
    use phlora::linalg::rank::RankPolicy;
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = spectrum_pair(dir.path(), fresh_seed("energy"));
    let exact = exact_spectra(&b, &f);
    for target in [0.5, 0.9, 0.97] {
        let out = dir.path().join(format!("e{target}"));
        let report = run_policy(
            &b,
            &f,
            &out,
            RankPolicy::Energy {
                target,
                max_rank: 200,
            },
            false,
        );
        for t in report
            .tensors
            .iter()
            .filter(|t| t.action == TensorAction::Lora)
        {
            let s = &exact[&t.name];
            let r = t.rank.unwrap();
            let minimal = (1..=s.len()).find(|&k| energy_at(s, k) >= target).unwrap();
            assert!(
                energy_at(s, r) >= target - 1e-6,
                "{} T={target}: rank {r} keeps {}",
                t.name,
                energy_at(s, r)
            );
            // The sketch's σ are a hair under the true ones: at most one direction more.
            assert!(
                r <= minimal + 1,
                "{} T={target}: rank {r}, minimal {minimal}",
                t.name
            );
            assert!(t.energy.unwrap() >= target - 1e-6);
        }
        let up = report
            .tensors
            .iter()
            .find(|t| t.name.contains("up_proj"))
            .unwrap();
        if target == 0.97 {
            assert!(
                up.rank.unwrap() > 64,
                "needs the sketch to grow twice: {:?}",
                up.rank
            );
        }
        // The ranks differ per module: rank_pattern and alpha_pattern keep every scaling at 1,
        // and verify (which reads them as PEFT does) agrees with extract's certificate.
        let cfg = read_json(&out.join("adapter_config.json"));
        let patterns = cfg["rank_pattern"].as_object().unwrap();
        assert!(!patterns.is_empty(), "{cfg}");
        for (k, v) in patterns {
            assert_eq!(
                cfg["alpha_pattern"][k].as_f64().unwrap(),
                v.as_f64().unwrap()
            );
        }
        let v = verify(&settings(&b, &f, &out)).unwrap();
        assert!((v.total_relative_error - report.summary.total_relative_error).abs() < 1e-5);
    }
    // A cap below what the target needs: the cap, said in the report.
    let out = dir.path().join("capped");
    let report = run_policy(
        &b,
        &f,
        &out,
        RankPolicy::Energy {
            target: 0.99,
            max_rank: 8,
        },
        false,
    );
    let up = report
        .tensors
        .iter()
        .find(|t| t.name.contains("up_proj"))
        .unwrap();
    assert_eq!(up.rank, Some(8));
    assert!(
        up.reason.as_deref().unwrap_or("").contains("not reached"),
        "{up:?}"
    );
}

#[test]
fn a_frobenius_budget_is_kept_and_beats_every_uniform_rank_that_fits_it_in_energy() {
    use phlora::linalg::rank::{RankPolicy, RankRule};
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = spectrum_pair(dir.path(), fresh_seed("budget"));
    let exact = exact_spectra(&b, &f);
    for params in [500u64, 3_000, 12_000, 40_000] {
        let out = dir.path().join(format!("b{params}"));
        let report = run_policy(
            &b,
            &f,
            &out,
            RankPolicy::Budget {
                params,
                max_rank: 120,
                rule: RankRule::Frobenius,
                min_rank: Some(0),
            },
            false,
        );
        let loras: Vec<_> = report.tensors.iter().filter(|t| t.rank.is_some()).collect();
        let spent: u64 = loras
            .iter()
            .map(|t| (t.rank.unwrap() * (t.shape[0] + t.shape[1])) as u64)
            .sum();
        assert!(spent <= params, "budget {params}: spent {spent}");
        let kept = |ranks: &dyn Fn(&str, usize) -> usize| -> f64 {
            exact
                .iter()
                .map(|(name, s)| {
                    let e: f64 = s.iter().map(|x| x * x).sum();
                    energy_at(s, ranks(name, s.len()).min(s.len())) * e
                })
                .sum()
        };
        let ours = kept(&|name, _| {
            report
                .tensors
                .iter()
                .find(|t| t.name == name)
                .and_then(|t| t.rank)
                .unwrap_or(0)
        });
        for u in 1..=120usize {
            let cost: u64 = exact
                .iter()
                .map(|(name, s)| {
                    let t = report.tensors.iter().find(|t| &t.name == name).unwrap();
                    (u.min(s.len()) * (t.shape[0] + t.shape[1])) as u64
                })
                .sum();
            if cost <= params {
                let uniform = kept(&|_, _| u);
                assert!(
                    ours >= uniform * (1.0 - 1e-6),
                    "budget {params}: {ours} < uniform r={u} {uniform}"
                );
            }
        }
        let v = verify(&settings(&b, &f, &out)).unwrap();
        assert!((v.total_relative_error - report.summary.total_relative_error).abs() < 1e-5);
    }
}

#[test]
fn a_portable_adapter_has_one_allowed_rank_and_the_same_product() {
    use phlora::linalg::rank::{RankPolicy, PORTABLE_RANKS};
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = spectrum_pair(dir.path(), fresh_seed("portable"));
    let policy = RankPolicy::Energy {
        target: 0.9,
        max_rank: 200,
    };
    let plain = run_policy(&b, &f, &dir.path().join("plain"), policy.clone(), false);
    let out = dir.path().join("portable");
    let portable = run_policy(&b, &f, &out, policy, true);
    let cfg = read_json(&out.join("adapter_config.json"));
    let r = cfg["r"].as_u64().unwrap() as usize;
    assert!(PORTABLE_RANKS.contains(&r), "{r}");
    assert!(
        r >= portable
            .tensors
            .iter()
            .filter_map(|t| t.rank)
            .max()
            .unwrap()
    );
    assert_eq!(cfg["lora_alpha"].as_f64().unwrap(), r as f64);
    assert!(cfg["rank_pattern"].as_object().unwrap().is_empty());
    let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
    for (k, t) in &tensors {
        let axis = if k.ends_with("lora_A.weight") { 0 } else { 1 };
        assert_eq!(t.shape[axis], r, "{k}");
    }
    // Zero padding changes nothing: the same residuals, on the files, by verify.
    let v = verify(&settings(&b, &f, &out)).unwrap();
    assert!((v.total_relative_error - plain.summary.total_relative_error).abs() < 1e-6);
    // Policies do not mix, and bad values are refused.
    let x = dir.path().join("x");
    for (args, want) in [
        (
            vec!["--rank", "8", "--energy", "0.9"],
            "cannot be used with",
        ),
        (vec!["--energy", "1.5"], "expected 0 < T ≤ 1"),
        (vec!["--budget", "lots"], "'lots' for '--budget"),
        (
            vec!["--rank", "600", "--portable"],
            "--target portable: --rank 600",
        ),
    ] {
        let mut full = vec![
            "extract",
            "--base",
            s(&b),
            "--ft",
            s(&f),
            "--out",
            s(&x),
            "--device",
            "cpu",
        ];
        full.extend(args.iter().copied());
        let o = phlora(&full);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn analyze_reports_energies_and_ranks_that_match_the_exact_spectra() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = spectrum_pair(dir.path(), fresh_seed("analyze"));
    let exact = exact_spectra(&b, &f);
    let out = dir.path().join("analysis");
    let o = phlora(&[
        "analyze",
        "--base",
        s(&b),
        "--ft",
        s(&f),
        "--out",
        s(&out),
        "--device",
        "cpu",
        "--ranks",
        "1,4,16,64,200",
        "--energies",
        "0.5,0.9,0.99",
        "--max-rank",
        "120",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("median rank needed"), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report, read_json(&out.join("analysis.json")));
    let tensors = report["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 3);
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let s = &exact[name];
        for r in [1usize, 4, 16, 64] {
            let got = t["energy_at"][r.to_string()].as_f64().unwrap();
            assert!(
                (got - energy_at(s, r.min(s.len()))).abs() < 1e-3,
                "{name} r={r}: {got}"
            );
        }
        // 200 is beyond min(rows, cols) for every tensor here: all of the energy.
        assert!(
            (t["energy_at"]["200"].as_f64().unwrap() - 1.0).abs() < 1e-6
                || t["computed"].as_u64().unwrap() < 120
        );
        for target in [0.5, 0.9, 0.99] {
            let minimal = (1..=s.len()).find(|&k| energy_at(s, k) >= target).unwrap();
            match t["rank_for"][target.to_string()].as_u64() {
                Some(r) => assert!(
                    (r as usize) >= minimal && (r as usize) <= minimal + 1,
                    "{name} T={target}: {r} vs {minimal}"
                ),
                None => assert!(
                    minimal > 120,
                    "{name} T={target}: null but the exact rank is {minimal}"
                ),
            }
        }
        assert_eq!(t["layer"], serde_json::json!(0));
        assert!(t["spectrum_head"].as_array().unwrap().len() <= 16);
    }
    let csv = std::fs::read_to_string(out.join("analysis.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3);
    assert!(csv.starts_with("tensor,module_type,layer,rows,cols,delta_norm,computed,E_r1,"));
    for plot in ["energy_curves", "rank_heatmap"] {
        let svg = std::fs::read_to_string(out.join(format!("{plot}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let png = std::fs::read(out.join(format!("{plot}.png"))).unwrap();
        assert_eq!(&png[..8], &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        assert!(
            png.ends_with(&[0xAE, 0x42, 0x60, 0x82]),
            "{plot}.png ends with IEND's CRC"
        );
    }
    let o = phlora(&[
        "analyze",
        "--base",
        s(&b),
        "--ft",
        s(&f),
        "--out",
        s(&out),
        "--energies",
        "1.5",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected 0 < T ≤ 1"));
}

#[test]
fn target_vllm_refuses_what_vllm_rejects_and_drops_norms_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = pair(dir.path(), DType::BF16, fresh_seed("target-vllm"));
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "extract",
            "--base",
            s(&b),
            "--ft",
            s(&f),
            "--out",
            s(out),
            "--device",
            "cpu",
            "--json",
        ];
        args.extend_from_slice(extra);
        phlora(&args)
    };
    // A rank vLLM does not load is refused before any work, with the ranks it does load.
    let out = dir.path().join("r24");
    let o = run(&out, &["--rank", "24", "--target", "vllm"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("would reject r = 24")
            && err.contains("--rank 16 or --rank 32")
            && err.contains("--target portable"),
        "{err}"
    );
    assert!(!out.exists());
    // An allowed rank: no modules_to_save, norms reported as not carried, one warning line.
    let out = dir.path().join("r16");
    let o = run(&out, &["--rank", "16", "--target", "vllm"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("writes no modules_to_save").count(), 1, "{err}");
    let cfg = read_json(&out.join("adapter_config.json"));
    assert!(cfg["modules_to_save"].is_null(), "{cfg}");
    assert_eq!(cfg["r"], 16);
    let keys: Vec<String> = read_safetensors(&out.join("adapter_model.safetensors"))
        .into_keys()
        .collect();
    assert!(
        keys.iter().all(|k| k.ends_with("lora_A.weight")
            || k.ends_with("lora_B.weight")
            || k.ends_with("lora_embedding_A")
            || k.ends_with("lora_embedding_B")),
        "{keys:?}"
    );
    let report = read_json(&out.join("report.json"));
    let norms: Vec<&serde_json::Value> = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"].as_str().unwrap().contains("norm"))
        .collect();
    assert!(
        !norms.is_empty() && norms.iter().all(|t| t["action"] == "not-carried"),
        "{norms:?}"
    );
    // --target portable pads 24 up to 32 instead.
    let out = dir.path().join("p24");
    let o = run(&out, &["--rank", "24", "--target", "portable"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_json(&out.join("adapter_config.json"))["r"], 32);
}

/// GPT-2 names and Conv1D weights stored [in, out]: factors A [r, in], B [out, r] with
/// fan_in_fan_out, checked by reconstruction, by verify, and through merge.
#[test]
fn gpt2_conv1d_weights_get_fan_in_fan_out_factors() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fresh_seed("gpt2");
    let h = 16;
    let specs: Vec<(String, Vec<usize>)> = vec![
        ("transformer.wte.weight".into(), vec![40, h]),
        ("transformer.wpe.weight".into(), vec![12, h]),
        ("transformer.h.0.ln_1.weight".into(), vec![h]),
        ("transformer.h.0.attn.c_attn.weight".into(), vec![h, 3 * h]),
        ("transformer.h.0.attn.c_attn.bias".into(), vec![3 * h]),
        ("transformer.h.0.attn.c_proj.weight".into(), vec![h, h]),
        ("transformer.h.0.mlp.c_fc.weight".into(), vec![h, 4 * h]),
        ("transformer.h.0.mlp.c_proj.weight".into(), vec![4 * h, h]),
        ("transformer.ln_f.weight".into(), vec![h]),
    ];
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (k, (name, shape)) in specs.iter().enumerate() {
        let sd = seed + 31 * k as u64;
        let n: usize = shape.iter().product();
        let b = normal(n, sd);
        let d: Vec<f32> = if shape.len() == 2 {
            to_row_major_f32(&spectrum_matrix(
                shape[0],
                shape[1],
                &[1.0, 0.6, 0.3],
                1e-4,
                sd + 1,
            ))
        } else {
            normal(n, sd + 1).iter().map(|x| 0.01 * x).collect()
        };
        base.push(tensor(name, DType::F32, shape, b.clone()));
        ft.push(tensor(
            name,
            DType::F32,
            shape,
            b.iter().zip(&d).map(|(x, y)| x + y).collect(),
        ));
    }
    let (b, f) = (dir.path().join("base"), dir.path().join("ft"));
    for (d, t) in [(&b, &base), (&f, &ft)] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(
            d.join("config.json"),
            r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}"#,
        )
        .unwrap();
        write_single(&d.join("model.safetensors"), t);
    }
    let out = dir.path().join("adapter");
    let mut st = ExtractSettings::new(b.clone(), f.clone(), out.clone(), 3);
    st.device = phlora::backend::Device::Cpu;
    let report = extract(&st).unwrap();
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["fan_in_fan_out"], true, "{cfg}");
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    let (base_t, ft_t) = (
        read_safetensors(&b.join("model.safetensors")),
        read_safetensors(&f.join("model.safetensors")),
    );
    for m in [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ] {
        let w = format!("{m}.weight");
        let (rows, cols) = (ft_t[&w].shape[0], ft_t[&w].shape[1]); // [in, out]
        let a = &factors[&format!("base_model.model.{m}.lora_A.weight")];
        let bf = &factors[&format!("base_model.model.{m}.lora_B.weight")];
        assert_eq!(a.shape, vec![3, rows], "{m}: A is [r, in]");
        assert_eq!(bf.shape, vec![cols, 3], "{m}: B is [out, r]");
        // ΔW (stored [in, out]) = (B·A)ᵀ: entry (i, j) = Σ_k B[j, k]·A[k, i].
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..rows {
            for j in 0..cols {
                let d = f64::from(ft_t[&w].values[i * cols + j])
                    - f64::from(base_t[&w].values[i * cols + j]);
                let p: f64 = (0..3)
                    .map(|k| f64::from(bf.values[j * 3 + k]) * f64::from(a.values[k * rows + i]))
                    .sum();
                num += (d - p).powi(2);
                den += d * d;
            }
        }
        let rel = (num / den).sqrt();
        let reported = report
            .tensors
            .iter()
            .find(|t| t.name == w)
            .unwrap()
            .residual
            .unwrap();
        assert!(
            (rel - reported).abs() < 1e-5 && rel < 1e-2,
            "{m}: {rel} vs {reported}"
        );
    }
    // verify reads fan_in_fan_out the same way; merge → verify closes the loop.
    let v = verify(&settings(&b, &f, &out)).unwrap();
    assert!((v.total_relative_error - report.summary.total_relative_error).abs() < 1e-6);
    let merged = dir.path().join("merged");
    let o = phlora(&[
        "merge",
        "--base",
        s(&b),
        "--adapter",
        s(&out),
        "--out",
        s(&merged),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = verify(&settings(&b, &merged, &out)).unwrap();
    assert_lora_within(&v, 1e-5, "");
}

/// Mixtral names: per-expert w1/w2/w3 and the router are ordinary targets; under --energy the
/// experts of one module share the largest of their ranks (one rank_pattern entry per module).
#[test]
fn moe_experts_are_targets_and_share_a_rank_per_module() {
    use phlora::linalg::rank::RankPolicy;
    let dir = tempfile::tempdir().unwrap();
    let seed = fresh_seed("mixtral");
    let (h, i, e) = (16, 24, 4);
    let mut specs: Vec<(String, Vec<usize>, Vec<f64>)> = vec![
        (
            "model.layers.0.self_attn.q_proj.weight".into(),
            vec![h, h],
            vec![1.0, 0.5],
        ),
        (
            "model.layers.0.block_sparse_moe.gate.weight".into(),
            vec![e, h],
            vec![1.0],
        ),
    ];
    for x in 0..e {
        // Experts with different spectra: their ranks for E ≥ 0.9 differ.
        let sigma: Vec<f64> = (0..(2 + x)).map(|k| 1.0 / (1.0 + k as f64)).collect();
        for (w, shape) in [("w1", vec![i, h]), ("w2", vec![h, i]), ("w3", vec![i, h])] {
            specs.push((
                format!("model.layers.0.block_sparse_moe.experts.{x}.{w}.weight"),
                shape,
                sigma.clone(),
            ));
        }
    }
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (k, (name, shape, sigma)) in specs.iter().enumerate() {
        let sd = seed + 17 * k as u64;
        let b = normal(shape[0] * shape[1], sd);
        let d = to_row_major_f32(&spectrum_matrix(shape[0], shape[1], sigma, 0.0, sd + 1));
        base.push(tensor(name, DType::F32, shape, b.clone()));
        ft.push(tensor(
            name,
            DType::F32,
            shape,
            b.iter().zip(&d).map(|(x, y)| x + y).collect(),
        ));
    }
    let (b, f) = (
        dir.path().join("base.safetensors"),
        dir.path().join("ft.safetensors"),
    );
    write_single(&b, &base);
    write_single(&f, &ft);
    let out = dir.path().join("adapter");
    let report = run_policy(
        &b,
        &f,
        &out,
        RankPolicy::Energy {
            target: 0.9,
            max_rank: 16,
        },
        false,
    );
    assert_eq!(
        report.summary.lora,
        2 + 3 * e,
        "every expert and the router are LoRA targets"
    );
    let cfg = read_json(&out.join("adapter_config.json"));
    let targets: Vec<String> = serde_json::from_value(cfg["target_modules"].clone()).unwrap();
    for m in ["q_proj", "w1", "w2", "w3"] {
        assert!(targets.iter().any(|t| t == m), "{m} in {targets:?}");
    }
    // The router as a target parameter, by suffix (transformers v5 renames the block).
    assert_eq!(
        cfg["target_parameters"],
        serde_json::json!(["gate.weight"]),
        "{cfg}"
    );
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    for w in ["w1", "w2", "w3"] {
        let ranks: Vec<usize> = (0..e)
            .map(|x| factors[&format!("base_model.model.model.layers.0.block_sparse_moe.experts.{x}.{w}.lora_A.weight")].shape[0])
            .collect();
        let decomposed: Vec<usize> = (0..e)
            .map(|x| {
                report
                    .tensors
                    .iter()
                    .find(|t| {
                        t.name == format!("model.layers.0.block_sparse_moe.experts.{x}.{w}.weight")
                    })
                    .unwrap()
                    .rank
                    .unwrap()
            })
            .collect();
        assert!(ranks.iter().all(|&r| r == ranks[0]), "{w}: {ranks:?}");
        assert_eq!(
            ranks[0],
            *decomposed.iter().max().unwrap(),
            "{w}: the group's largest"
        );
        assert!(
            decomposed.iter().min() < decomposed.iter().max(),
            "{w}: the experts differ: {decomposed:?}"
        );
    }
    // At most one pattern per expert module (never one per expert), and PEFT's reading of the
    // config (verify) gives the same product.
    let patterns = cfg["rank_pattern"].as_object().unwrap();
    assert!(
        !patterns.keys().any(|k| k.contains(r"experts\.0\.")),
        "{patterns:?}"
    );
    for w in ["w1", "w2", "w3"] {
        let rank = factors[&format!(
            "base_model.model.model.layers.0.block_sparse_moe.experts.0.{w}.lora_A.weight"
        )]
            .shape[0];
        let group = patterns
            .iter()
            .find(|(k, _)| k.ends_with(&format!(r"experts\.\d+\.{w}")));
        match group {
            Some((_, r)) => assert_eq!(r.as_u64().unwrap() as usize, rank, "{w}"),
            None => assert_eq!(
                cfg["r"].as_u64().unwrap() as usize,
                rank,
                "{w}: at the default r"
            ),
        }
    }
    let v = verify(&settings(&b, &f, &out)).unwrap();
    assert!((v.total_relative_error - report.summary.total_relative_error).abs() < 1e-6);
}

/// lm_head tied to the embeddings in the base only, in the fine-tune only, or in both.
#[test]
fn tied_lm_heads_are_extracted_against_the_embedding_they_stand_for() {
    let seed = fresh_seed("tied");
    let (v, h) = (48, 16);
    let t = |name: &str, values: Vec<f32>| tensor(name, DType::F32, &[v, h], values);
    let delta = |k: u64| to_row_major_f32(&spectrum_matrix(v, h, &[1.0, 0.4], 1e-4, seed + k));
    let add = |x: &[f32], d: &[f32]| x.iter().zip(d).map(|(a, b)| a + b).collect::<Vec<f32>>();
    let embed = normal(v * h, seed);
    let head = normal(v * h, seed + 1);
    let (d_embed, d_head) = (delta(2), delta(3));
    for (case, base_head, ft_head) in [
        ("base-tied", false, true),
        ("ft-tied", true, false),
        ("both-tied", false, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut base = vec![t("model.embed_tokens.weight", embed.clone())];
        let mut ft = vec![t("model.embed_tokens.weight", add(&embed, &d_embed))];
        if base_head {
            base.push(t("lm_head.weight", head.clone()));
        }
        if ft_head {
            // Untied in the fine-tune: its lm_head started as the (tied) embedding.
            ft.push(t("lm_head.weight", add(&embed, &d_head)));
        }
        let (b, f) = (
            dir.path().join("base.safetensors"),
            dir.path().join("ft.safetensors"),
        );
        write_single(&b, &base);
        write_single(&f, &ft);
        let out = dir.path().join("adapter");
        let mut st = ExtractSettings::new(b.clone(), f.clone(), out.clone(), 2);
        st.device = phlora::backend::Device::Cpu;
        let report = extract(&st).unwrap_or_else(|e| panic!("{case}: {e}"));
        let head_row = report.tensors.iter().find(|r| r.name == "lm_head.weight");
        match case {
            "both-tied" => assert!(head_row.is_none(), "{case}"),
            _ => {
                let row = head_row.unwrap_or_else(|| panic!("{case}: no lm_head row"));
                assert_eq!(row.action, TensorAction::Lora, "{case}");
                assert!(
                    row.reason.as_deref().unwrap_or("").contains("ties lm_head"),
                    "{case}: {row:?}"
                );
                // In the base-tied case the planted ΔW is rank 2: the adapter carries it.
                if case == "base-tied" {
                    assert!(row.residual.unwrap() < 1e-2, "{case}: {row:?}");
                }
                let want = if case == "base-tied" {
                    &d_head
                } else {
                    // ft lm_head = ft embedding = embed + d_embed; base lm_head = head.
                    &add(&embed, &d_embed)
                        .iter()
                        .zip(&head)
                        .map(|(a, b)| a - b)
                        .collect::<Vec<f32>>()
                };
                let norm: f64 = want
                    .iter()
                    .map(|x| f64::from(*x).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(
                    (row.delta_norm - norm).abs() < 1e-4 * norm,
                    "{case}: ‖ΔW‖ {} vs {norm}",
                    row.delta_norm
                );
            }
        }
        let v = verify(&settings(&b, &f, &out)).unwrap();
        assert!(
            (v.total_relative_error - report.summary.total_relative_error).abs() < 1e-6,
            "{case}"
        );
    }
}

#[test]
fn lora_bias_carries_the_biases_of_targeted_layers_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = pair(dir.path(), DType::F32, fresh_seed("lora-bias"));
    let out = dir.path().join("adapter");
    let mut st = ExtractSettings::new(b.clone(), f.clone(), out.clone(), 3);
    st.device = phlora::backend::Device::Cpu;
    st.plan.lora_bias = true;
    // PEFT refuses lora_bias next to an embedding LoRA: said up front, nothing written.
    let err = extract(&st).unwrap_err().to_string();
    assert!(err.contains("--no-embeddings"), "{err}");
    assert!(!out.join("adapter_config.json").exists());
    st.plan.embeddings = false;
    let report = extract(&st).unwrap();
    let biases: Vec<_> = report
        .tensors
        .iter()
        .filter(|t| t.name.ends_with(".bias"))
        .collect();
    assert!(
        !biases.is_empty() && biases.iter().all(|t| t.action == TensorAction::LoraBias),
        "{biases:?}"
    );
    let left: Vec<&str> = report
        .tensors
        .iter()
        .filter(|t| t.action == TensorAction::NotCarried)
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(
        left,
        ["model.embed_tokens.weight"],
        "only the embedding is left behind"
    );
    assert_eq!(
        read_json(&out.join("adapter_config.json"))["lora_bias"],
        true
    );
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    let all = |d: &Path| {
        let mut m = std::collections::HashMap::new();
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                m.extend(read_safetensors(&p));
            }
        }
        m
    };
    let (bt, ft) = (all(&b), all(&f));
    for l in 0..2 {
        let name = format!("model.layers.{l}.self_attn.q_proj.bias");
        let lb =
            &factors[&format!("base_model.model.model.layers.{l}.self_attn.q_proj.lora_B.bias")];
        for k in 0..lb.values.len() {
            assert_eq!(
                lb.values[k],
                ft[&name].values[k] - bt[&name].values[k],
                "{name}[{k}] is ΔB as it is"
            );
        }
    }
    let v = verify(&settings(&b, &f, &out)).unwrap();
    assert_eq!(v.not_carried, 1, "the embedding");
    for t in v.tensors.iter().filter(|t| t.kind == CheckKind::LoraBias) {
        assert!(t.rel_error_delta < 1e-6, "{t:?}");
    }
    assert!((v.total_relative_error - report.summary.total_relative_error).abs() < 1e-6);
    // Merged, the biases are the fine-tune's.
    let merged = dir.path().join("merged");
    assert!(phlora(&[
        "merge",
        "--base",
        s(&b),
        "--adapter",
        s(&out),
        "--out",
        s(&merged)
    ])
    .status
    .success());
    let v = verify(&settings(&b, &merged, &out)).unwrap();
    assert!(v
        .tensors
        .iter()
        .filter(|t| t.kind == CheckKind::LoraBias)
        .all(|t| t.rel_error_delta < 1e-6));
    // vLLM rejects lora_B.bias: refused up front.
    let o = phlora(&[
        "extract",
        "--base",
        s(&b),
        "--ft",
        s(&f),
        "--out",
        s(&dir.path().join("v")),
        "--lora-bias",
        "--target",
        "vllm",
        "--rank",
        "8",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("rejects lora_B.bias"), "{err}");
}

/// A changed bias on a layer whose weight did not change has no lora_B to ride on: reported as
/// not carried, not written. And a budget's first pass writes nothing twice.
#[test]
fn lora_bias_needs_its_layers_factors() {
    use phlora::linalg::rank::RankPolicy;
    let dir = tempfile::tempdir().unwrap();
    let seed = fresh_seed("bias-alone");
    let h = 12;
    let w_changed = to_row_major_f32(&spectrum_matrix(h, h, &[1.0, 0.5], 0.0, seed));
    let (w0, w1) = (normal(h * h, seed + 1), normal(h * h, seed + 2));
    let (b0, b1) = (normal(h, seed + 3), normal(h, seed + 4));
    let bump = |x: &[f32]| x.iter().map(|v| v + 0.1).collect::<Vec<f32>>();
    let base = vec![
        tensor(
            "model.layers.0.self_attn.q_proj.weight",
            DType::F32,
            &[h, h],
            w0.clone(),
        ),
        tensor(
            "model.layers.0.self_attn.q_proj.bias",
            DType::F32,
            &[h],
            b0.clone(),
        ),
        tensor(
            "model.layers.0.self_attn.k_proj.weight",
            DType::F32,
            &[h, h],
            w1.clone(),
        ),
        tensor(
            "model.layers.0.self_attn.k_proj.bias",
            DType::F32,
            &[h],
            b1.clone(),
        ),
    ];
    let ft = vec![
        tensor(
            "model.layers.0.self_attn.q_proj.weight",
            DType::F32,
            &[h, h],
            w0.iter().zip(&w_changed).map(|(a, b)| a + b).collect(),
        ),
        tensor(
            "model.layers.0.self_attn.q_proj.bias",
            DType::F32,
            &[h],
            bump(&b0),
        ),
        tensor(
            "model.layers.0.self_attn.k_proj.weight",
            DType::F32,
            &[h, h],
            w1,
        ),
        tensor(
            "model.layers.0.self_attn.k_proj.bias",
            DType::F32,
            &[h],
            bump(&b1),
        ),
    ];
    let (b, f) = (
        dir.path().join("base.safetensors"),
        dir.path().join("ft.safetensors"),
    );
    write_single(&b, &base);
    write_single(&f, &ft);
    for (tag, policy) in [
        ("fixed", RankPolicy::Fixed(2)),
        (
            "budget",
            RankPolicy::Budget {
                params: 48,
                max_rank: 4,
                rule: phlora::linalg::rank::RankRule::Relative,
                min_rank: None,
            },
        ),
    ] {
        let out = dir.path().join(tag);
        let mut st = ExtractSettings::new(b.clone(), f.clone(), out.clone(), 2);
        st.device = phlora::backend::Device::Cpu;
        st.rank = policy;
        st.plan.lora_bias = true;
        let report = extract(&st).unwrap_or_else(|e| panic!("{tag}: {e}"));
        let row = |n: &str| report.tensors.iter().find(|t| t.name == n).unwrap();
        assert_eq!(
            row("model.layers.0.self_attn.q_proj.bias").action,
            TensorAction::LoraBias,
            "{tag}"
        );
        let k = row("model.layers.0.self_attn.k_proj.bias");
        assert_eq!(k.action, TensorAction::NotCarried, "{tag}: {k:?}");
        assert!(
            k.reason.as_deref().unwrap().contains("no LoRA factors"),
            "{tag}"
        );
        let keys: Vec<String> = read_safetensors(&out.join("adapter_model.safetensors"))
            .into_keys()
            .collect();
        assert!(
            !keys.iter().any(|k| k.contains("k_proj")),
            "{tag}: {keys:?}"
        );
        assert_eq!(
            keys.iter().filter(|k| k.ends_with("lora_B.bias")).count(),
            1,
            "{tag}: {keys:?}"
        );
        let v = verify(&settings(&b, &f, &out)).unwrap();
        assert_eq!(v.not_carried, 1, "{tag}");
        assert!(
            (v.total_relative_error - report.summary.total_relative_error).abs() < 1e-6,
            "{tag}"
        );
    }
}

/// `bench --sink`: the writer thread's work on a small slice of Llama-3-70B's factors; one row
/// per rank, the right number of tensors and bytes, and nothing left in DIR.
#[test]
fn bench_sink_measures_the_writer_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let o = phlora(&[
        "bench",
        "--sink",
        dir.path().to_str().unwrap(),
        "--ranks",
        "2,8",
        "--layers",
        "1",
        "--json",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    // One layer's 7 matrices, the embedding and lm_head; A [r, in] and B [out, r] in bf16.
    let per_rank: u64 = [
        8192 + 8192,
        1024 + 8192,
        1024 + 8192,
        8192 + 8192,
        28672 + 8192,
        28672 + 8192,
        8192 + 28672,
        8192 + 128_256,
        128_256 + 8192,
    ]
    .iter()
    .sum::<u64>()
        * 2;
    for (row, rank) in rows.iter().zip([2u64, 8]) {
        assert_eq!(row["tensors"], 9);
        assert_eq!(row["bytes"].as_u64(), Some(per_rank * rank));
        assert!(row["journal_seconds"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Rewrites an adapter's weights file after `edit` changed its tensors.
fn rewrite_adapter(dir: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Loaded>)) {
    let model = dir.join("adapter_model.safetensors");
    let mut tensors = read_safetensors(&model);
    edit(&mut tensors);
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let rewritten: Vec<T> = keys
        .into_iter()
        .map(|k| {
            let t = &tensors[k];
            tensor(
                k,
                DType::parse(&t.dtype).unwrap(),
                &t.shape,
                t.values.clone(),
            )
        })
        .collect();
    write_single(&model, &rewritten);
}

#[test]
fn compare_sees_through_signs_and_catches_a_changed_product_or_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f, a, _) = extracted(dir.path(), DType::F32, fresh_seed("compare"), 3);
    let run = |args: &[&str]| {
        let o = phlora(&[&["compare"], args].concat());
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!text.contains("panicked"), "{text}");
        (o.status.code(), text)
    };
    let copy = |tag: &str| {
        let to = dir.path().join(tag);
        copy_files(&a, &to, false);
        to
    };
    let up = "base_model.model.model.layers.0.mlp.up_proj";
    // The same adapter with one direction's sign flipped in both factors: B·A is unchanged.
    let flipped = copy("flipped");
    rewrite_adapter(&flipped, |t| {
        let a_t = t.get_mut(&format!("{up}.lora_A.weight")).unwrap();
        let cols = a_t.shape[1];
        a_t.values[..cols].iter_mut().for_each(|x| *x = -*x);
        let b_t = t.get_mut(&format!("{up}.lora_B.weight")).unwrap();
        let r = b_t.shape[1];
        b_t.values.iter_mut().step_by(r).for_each(|x| *x = -*x);
    });
    let (code, text) = run(&[s(&a), s(&flipped), "--json"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("agree"), "{text}");
    // One module's B scaled by 1.05: 5% apart, outside the 1e-2 default, inside 0.1.
    let scaled = copy("scaled");
    rewrite_adapter(&scaled, |t| {
        for x in &mut t.get_mut(&format!("{up}.lora_B.weight")).unwrap().values {
            *x *= 1.05;
        }
    });
    let (code, text) = run(&[s(&a), s(&flipped), s(&scaled)]);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("model.layers.0.mlp.up_proj") && text.contains("DIFFER"),
        "{text}"
    );
    assert!(text.contains("5.00e-2"), "{text}");
    let (code, text) = run(&[s(&a), s(&scaled), "--max-product-diff", "0.1"]);
    assert_eq!(code, Some(0), "{text}");
    // A residual certificate that moved: the factors agree, the reports do not.
    let certified = copy("certified");
    let report = certified.join("report.json");
    let mut r = read_json(&report);
    for t in r["tensors"].as_array_mut().unwrap() {
        if t["name"] == "model.layers.1.self_attn.q_proj.weight" {
            let x = t["residual"].as_f64().unwrap();
            t["residual"] = serde_json::json!(x * 1.001 + 1e-3);
        }
    }
    std::fs::write(&report, r.to_string()).unwrap();
    let (code, text) = run(&[s(&a), s(&certified), "--json"]);
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("model.layers.1.self_attn.q_proj"), "{text}");
    // Adapters of different modules are not two extractions of one pair: an error, exit 1.
    let subset = dir.path().join("subset");
    let o = phlora(&[
        "-q",
        "extract",
        "--base",
        s(&b),
        "--ft",
        s(&f),
        "--out",
        s(&subset),
        "--rank",
        "3",
        "--device",
        "cpu",
        "--include",
        "*.self_attn.*",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, text) = run(&[s(&a), s(&subset)]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("not adapters of the same modules"), "{text}");
    let (code, text) = run(&[s(&a), s(&dir.path().join("missing"))]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("missing"), "{text}");
}
