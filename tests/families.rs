//! One synthetic pair per model family, with the family's real tensor names and layouts, and
//! a reconstruction test for each: the adapter's factors are read back with the safetensors
//! crate and multiplied out here, by the formulas PEFT uses (FORMATS.md), independently of
//! phlora's own reader; each matrix (each expert, each conv filter bank) must be as close to
//! ΔW as the rank allows (Eckart–Young), and verify → merge → verify closes the loop.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use faer::Mat;
use phlora::checkpoint::DType;
use phlora::extract::{extract, ExtractSettings};
use phlora::verify::CheckKind;

const R: usize = 4;

/// How a tensor's ΔW is laid out, and so how its update is rebuilt from the adapter.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// [out, in]: B·A.
    Linear,
    /// [vocab, dim]: (B·A)ᵀ from lora_embedding_A/B.
    Embedding,
    /// [out, in, k…]: B [out, r, 1…] · A [r, in, k…].
    Conv,
    /// [E, out, in] (transformers v5): ΔW_e = Σ_k B[:, k·E+e]·A[e·r+k, :].
    Fused,
    /// [E, in, out] (gpt-oss): each slice is ΔW_eᵀ.
    FusedInOut,
    /// 1-D: a bias or a norm, not a LoRA target.
    Vector,
}

struct Family {
    config: serde_json::Value,
    tensors: Vec<(String, Vec<usize>, Kind)>,
}

/// The matrices ΔW is made of: one for a plain weight, one per expert, a conv as [out, in·k…].
fn matrices(shape: &[usize], kind: Kind) -> Vec<(usize, usize)> {
    match kind {
        Kind::Fused | Kind::FusedInOut => vec![(shape[1], shape[2]); shape[0]],
        Kind::Vector => vec![],
        _ => vec![(shape[0], shape[1..].iter().product())],
    }
}

/// Writes base and fine-tune folders: every matrix changes by a rank-3 part plus noise, every
/// vector a little.
fn write_pair(root: &Path, fam: &Family, seed: u64) -> (PathBuf, PathBuf) {
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (k, (name, shape, kind)) in fam.tensors.iter().enumerate() {
        let sd = seed + 101 * k as u64;
        let n: usize = shape.iter().product();
        let b = normal(n, sd);
        let d: Vec<f32> = if *kind == Kind::Vector {
            normal(n, sd + 1).iter().map(|x| 0.01 * x).collect()
        } else {
            matrices(shape, *kind)
                .iter()
                .enumerate()
                .flat_map(|(e, &(m, c))| {
                    // Ranks 1..3 by tensor, so that ranks chosen per tensor differ.
                    let sigma = [1.0, 0.5 + 0.1 * e as f64, 0.25];
                    let sigma = &sigma[..sigma.len().min(m).min(c).min(1 + k % 3)];
                    to_row_major_f32(&spectrum_matrix(m, c, sigma, 1e-4, sd + 7 * e as u64 + 1))
                })
                .collect()
        };
        base.push(tensor(name, DType::F32, shape, b.clone()));
        let f: Vec<f32> = b.iter().zip(&d).map(|(x, y)| x + y).collect();
        ft.push(tensor(name, DType::F32, shape, f));
    }
    let (b, f) = (root.join("base"), root.join("ft"));
    for (dir, t) in [(&b, &base), (&f, &ft)] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), fam.config.to_string()).unwrap();
        write_single(&dir.join("model.safetensors"), t);
    }
    (b, f)
}

fn module(name: &str) -> &str {
    name.rsplit_once('.').unwrap().0
}

/// PEFT's keys for a fused parameter: with several parameters of one experts module
/// targeted, the one registered first (gate_up_proj) is nested one `base_layer` deeper.
fn fused_key(name: &str, siblings: usize, which: &str) -> String {
    let m = module(name);
    let nested = siblings > 1 && name.ends_with("gate_up_proj");
    let path = if nested {
        format!("{m}.base_layer")
    } else {
        m.to_string()
    };
    format!("base_model.model.{path}.lora_{which}.weight")
}

/// The matrices of ΔW and of the adapter's update for one tensor, rebuilt from the files.
fn rebuilt(
    name: &str,
    shape: &[usize],
    kind: Kind,
    delta: &[f32],
    factors: &HashMap<String, Loaded>,
    fused_siblings: usize,
) -> Vec<(Mat<f64>, Mat<f64>)> {
    let m = module(name);
    let key = |which: &str| match kind {
        Kind::Embedding => format!("base_model.model.{m}.lora_embedding_{which}"),
        Kind::Fused | Kind::FusedInOut => fused_key(name, fused_siblings, which),
        _ => format!("base_model.model.{m}.lora_{which}.weight"),
    };
    let (a, b) = (&factors[&key("A")], &factors[&key("B")]);
    let at = |t: &Loaded, i: usize, j: usize| {
        let cols: usize = t.shape[1..].iter().product();
        f64::from(t.values[i * cols + j])
    };
    let mut out = Vec::new();
    for (e, (rows, cols)) in matrices(shape, kind).into_iter().enumerate() {
        let off = e * rows * cols;
        let d = Mat::from_fn(rows, cols, |i, j| f64::from(delta[off + i * cols + j]));
        let u = match kind {
            Kind::Linear | Kind::Conv => {
                assert_eq!(a.shape[1..].iter().product::<usize>(), cols, "{name}: A");
                assert!(
                    b.shape[2..].iter().all(|&x| x == 1),
                    "{name}: B {:?}",
                    b.shape
                );
                let r = a.shape[0];
                Mat::from_fn(rows, cols, |i, j| {
                    (0..r).map(|k| at(b, i, k) * at(a, k, j)).sum()
                })
            }
            Kind::Embedding => {
                let r = a.shape[0];
                Mat::from_fn(rows, cols, |i, j| {
                    (0..r).map(|k| at(b, j, k) * at(a, k, i)).sum()
                })
            }
            Kind::Fused | Kind::FusedInOut => {
                let experts = shape[0];
                assert_eq!(a.shape[0] % experts, 0, "{name}: A {:?}", a.shape);
                let r = a.shape[0] / experts;
                assert_eq!(b.shape[1], r * experts, "{name}: B {:?}", b.shape);
                // PEFT: A.reshape(E, r, in), B.reshape(out, r, E).
                let w = |o: usize, i: usize| -> f64 {
                    (0..r)
                        .map(|k| at(b, o, k * experts + e) * at(a, e * r + k, i))
                        .sum()
                };
                if kind == Kind::Fused {
                    Mat::from_fn(rows, cols, w)
                } else {
                    Mat::from_fn(rows, cols, |i, o| w(o, i))
                }
            }
            Kind::Vector => unreachable!(),
        };
        out.push((d, u));
    }
    out
}

fn extract_family(fam: &Family, tag: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), fam, fresh_seed(tag));
    let out = dir.path().join("adapter");
    let st = cpu_settings(&b, &f, &out, R);
    extract(&st).unwrap();
    (dir, b, f, out)
}

/// Extracts a family's pair at rank R and checks every LoRA target by reconstruction, then
/// verify, merge and verify again.
fn check_family(fam: &Family, tag: &str) -> serde_json::Value {
    let (dir, b, f, out) = extract_family(fam, tag);
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    let (bt, ftt) = (
        read_safetensors(&b.join("model.safetensors")),
        read_safetensors(&f.join("model.safetensors")),
    );
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["r"], R, "{cfg}");
    assert_eq!(cfg["lora_alpha"], R as f64, "scaling 1: {cfg}");
    for (name, shape, kind) in &fam.tensors {
        if *kind == Kind::Vector {
            continue;
        }
        let delta: Vec<f32> = ftt[name]
            .values
            .iter()
            .zip(&bt[name].values)
            .map(|(x, y)| x - y)
            .collect();
        let siblings = fam
            .tensors
            .iter()
            .filter(|(n, _, k)| {
                matches!(k, Kind::Fused | Kind::FusedInOut) && module(n) == module(name)
            })
            .count();
        for (e, (d, u)) in rebuilt(name, shape, *kind, &delta, &factors, siblings)
            .into_iter()
            .enumerate()
        {
            let best = optimum(&singular_values(&d), R);
            let err = (&d - &u).norm_l2() / d.norm_l2();
            assert!(
                err <= 1.01 * best + 1e-5,
                "{tag} {name} [{e}]: relative error {err} vs the rank-{R} optimum {best}"
            );
        }
    }
    let v = verify_pair(&b, &f, &out).unwrap();
    assert_lora_within(&v, 1e-2, tag);
    let merged = dir.path().join("merged");
    merge_ok(&b, &out, &merged);
    // The merged model is base + B·A: against it, the adapter's update is exact (f32).
    let v = verify_pair(&b, &merged, &out).unwrap();
    assert_lora_within(&v, 1e-5, tag);
    cfg
}

fn llama_attention(t: &mut Vec<(String, Vec<usize>, Kind)>, l: usize, h: usize) {
    t.push((
        format!("model.layers.{l}.input_layernorm.weight"),
        vec![h],
        Kind::Vector,
    ));
    for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        t.push((
            format!("model.layers.{l}.self_attn.{p}.weight"),
            vec![h, h],
            Kind::Linear,
        ));
    }
    t.push((
        format!("model.layers.{l}.post_attention_layernorm.weight"),
        vec![h],
        Kind::Vector,
    ));
}

#[test]
fn llama() {
    let (h, i, v) = (16, 24, 40);
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        Kind::Embedding,
    )];
    llama_attention(&mut t, 0, h);
    for (p, s) in [
        ("gate_proj", [i, h]),
        ("up_proj", [i, h]),
        ("down_proj", [h, i]),
    ] {
        t.push((
            format!("model.layers.0.mlp.{p}.weight"),
            s.to_vec(),
            Kind::Linear,
        ));
    }
    t.push(("model.norm.weight".into(), vec![h], Kind::Vector));
    t.push(("lm_head.weight".into(), vec![v, h], Kind::Linear));
    let cfg = check_family(
        &Family {
            config: serde_json::json!({"model_type": "llama", "hidden_size": h}),
            tensors: t,
        },
        "llama",
    );
    assert!(cfg.get("target_parameters").is_none(), "{cfg}");
}

#[test]
fn mixtral_per_expert_linears() {
    let (h, i, e) = (16, 24, 3);
    let mut t = Vec::new();
    llama_attention(&mut t, 0, h);
    t.push((
        "model.layers.0.block_sparse_moe.gate.weight".into(),
        vec![e, h],
        Kind::Linear,
    ));
    for x in 0..e {
        for (w, s) in [("w1", [i, h]), ("w2", [h, i]), ("w3", [i, h])] {
            let name = format!("model.layers.0.block_sparse_moe.experts.{x}.{w}.weight");
            t.push((name, s.to_vec(), Kind::Linear));
        }
    }
    let fam = Family {
        config: serde_json::json!({"model_type": "mixtral", "hidden_size": h}),
        tensors: t,
    };
    check_family(&fam, "mixtral");

    // Ranks per tensor: every expert takes the experts' largest rank, which is the adapter's
    // r (PEFT converts per-expert adapters at r, without rank_pattern); the router's pattern
    // leaves its block's name open (v5 renames block_sparse_moe to mlp in memory).
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), &fam, fresh_seed("mixtral-energy"));
    let out = dir.path().join("adapter");
    let mut st = cpu_settings(&b, &f, &out, R);
    st.rank = phlora::linalg::rank::RankPolicy::Energy {
        target: 0.99999,
        max_rank: 8,
    };
    let report = extract(&st).unwrap();
    let cfg = read_json(&out.join("adapter_config.json"));
    let rank_of = |n: &str| {
        report
            .tensors
            .iter()
            .find(|t| t.name == n)
            .unwrap()
            .rank
            .unwrap()
    };
    let experts_rank = (0..e)
        .flat_map(|x| {
            ["w1", "w2", "w3"]
                .map(|w| format!("model.layers.0.block_sparse_moe.experts.{x}.{w}.weight"))
        })
        .map(|n| rank_of(&n))
        .max()
        .unwrap();
    assert_eq!(cfg["r"], experts_rank, "{cfg}");
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    for (k, t) in &factors {
        if k.contains(".experts.") {
            let r = if k.contains("lora_A") {
                t.shape[0]
            } else {
                t.shape[1]
            };
            assert_eq!(r, experts_rank, "{k}");
        }
    }
    let patterns = cfg["rank_pattern"].as_object().unwrap();
    assert!(patterns.keys().all(|k| !k.contains("experts")), "{cfg}");
    let router = rank_of("model.layers.0.block_sparse_moe.gate.weight");
    // The router's true rank is 1 (ranks follow the tensor's place), the experts' up to 3.
    assert_ne!(router, experts_rank);
    assert_eq!(
        patterns[r"model\.layers\.0\.[^.]+\.gate\.weight"], router,
        "{cfg}"
    );
    assert!(
        !patterns.is_empty()
            && report
                .tensors
                .iter()
                .filter_map(|t| t.rank)
                .any(|r| r != experts_rank),
        "the ranks chosen should differ: {cfg}"
    );
    let v = verify_pair(&b, &f, &out).unwrap();
    assert_lora_within(&v, 1e-2, "");
}

/// A Qwen2-MoE-style MLP stored per expert: the router `gate` [E, H], then each expert's
/// gate_proj, up_proj [I, H] and down_proj [H, I].
fn per_expert_mlp(
    t: &mut Vec<(String, Vec<usize>, Kind)>,
    mlp: &str,
    e: usize,
    h: usize,
    i: usize,
) {
    t.push((format!("{mlp}.gate.weight"), vec![e, h], Kind::Linear));
    for x in 0..e {
        for (p, s) in [
            ("gate_proj", [i, h]),
            ("up_proj", [i, h]),
            ("down_proj", [h, i]),
        ] {
            t.push((
                format!("{mlp}.experts.{x}.{p}.weight"),
                s.to_vec(),
                Kind::Linear,
            ));
        }
    }
}

#[test]
fn qwen2_moe_with_a_shared_expert() {
    let (h, i, e) = (16, 12, 3);
    let mut t = Vec::new();
    llama_attention(&mut t, 0, h);
    let mlp = "model.layers.0.mlp";
    per_expert_mlp(&mut t, mlp, e, h, i);
    for (p, s) in [
        ("gate_proj", [2 * i, h]),
        ("up_proj", [2 * i, h]),
        ("down_proj", [h, 2 * i]),
    ] {
        t.push((
            format!("{mlp}.shared_expert.{p}.weight"),
            s.to_vec(),
            Kind::Linear,
        ));
    }
    // A 1×n matrix: the shared expert's gate.
    t.push((
        format!("{mlp}.shared_expert_gate.weight"),
        vec![1, h],
        Kind::Linear,
    ));
    let cfg = check_family(
        &Family {
            config: serde_json::json!({"model_type": "qwen2_moe", "hidden_size": h}),
            tensors: t,
        },
        "qwen2-moe",
    );
    let targets: Vec<String> = serde_json::from_value(cfg["target_modules"].clone()).unwrap();
    for m in ["shared_expert_gate", "gate_proj", "up_proj", "down_proj"] {
        assert!(targets.iter().any(|t| t == m), "{m} in {targets:?}");
    }
    // transformers v5 makes the router a class target_modules cannot wrap: a target parameter.
    assert!(!targets.iter().any(|t| t == "gate"), "{targets:?}");
    assert_eq!(
        cfg["target_parameters"],
        serde_json::json!(["gate.weight"]),
        "{cfg}"
    );
}

/// transformers v5 fused experts [E, 2I, H] and [E, H, I] as PEFT target_parameters.
#[test]
fn fused_experts_in_peft_target_parameters_layout() {
    let (h, i, e) = (16, 12, 4);
    let mut t = Vec::new();
    llama_attention(&mut t, 0, h);
    let mlp = "model.layers.0.mlp";
    t.push((format!("{mlp}.gate.weight"), vec![e, h], Kind::Linear));
    t.push((
        format!("{mlp}.experts.gate_up_proj"),
        vec![e, 2 * i, h],
        Kind::Fused,
    ));
    t.push((
        format!("{mlp}.experts.down_proj"),
        vec![e, h, i],
        Kind::Fused,
    ));
    // Layer 1 changes only its down_proj: no nesting there.
    llama_attention(&mut t, 1, h);
    t.push((
        "model.layers.1.mlp.experts.down_proj".into(),
        vec![e, h, i],
        Kind::Fused,
    ));
    let cfg = check_family(
        &Family {
            config: serde_json::json!({"model_type": "qwen3_moe", "hidden_size": h}),
            tensors: t,
        },
        "fused-v5",
    );
    let params: Vec<String> = serde_json::from_value(cfg["target_parameters"].clone()).unwrap();
    assert_eq!(
        params,
        [
            "gate.weight",
            "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.experts.down_proj",
            "model.layers.1.mlp.experts.down_proj"
        ]
    );
    let targets: Vec<String> = serde_json::from_value(cfg["target_modules"].clone()).unwrap();
    assert!(!targets.iter().any(|t| t == "experts"), "{targets:?}");
}

/// gpt-oss stores experts transposed ([E, H, 2I], [E, I, H]) next to their biases; the router
/// is `mlp.router`, and attention has 1-D `sinks`.
#[test]
fn gpt_oss_transposed_experts() {
    let (h, i, e) = (16, 12, 4);
    let mut t = Vec::new();
    llama_attention(&mut t, 0, h);
    t.push((
        "model.layers.0.self_attn.sinks".into(),
        vec![4],
        Kind::Vector,
    ));
    let mlp = "model.layers.0.mlp";
    t.push((format!("{mlp}.router.weight"), vec![e, h], Kind::Linear));
    t.push((format!("{mlp}.router.bias"), vec![e], Kind::Vector));
    t.push((
        format!("{mlp}.experts.gate_up_proj"),
        vec![e, h, 2 * i],
        Kind::FusedInOut,
    ));
    t.push((
        format!("{mlp}.experts.gate_up_proj_bias"),
        vec![e * 2 * i],
        Kind::Vector,
    ));
    t.push((
        format!("{mlp}.experts.down_proj"),
        vec![e, i, h],
        Kind::FusedInOut,
    ));
    let cfg = check_family(
        &Family {
            config: serde_json::json!({"model_type": "gpt_oss", "hidden_size": h}),
            tensors: t,
        },
        "gpt-oss",
    );
    assert_eq!(
        cfg["fan_in_fan_out"], false,
        "PEFT's ParamWrapper refuses it: {cfg}"
    );
}

/// A small conv net: Conv2d weights [out, in, kh, kw] get PEFT's conv LoRA shapes.
#[test]
fn conv_net() {
    let t = vec![
        (
            "features.0.weight".to_string(),
            vec![8, 3, 3, 3],
            Kind::Conv,
        ),
        ("features.0.bias".into(), vec![8], Kind::Vector),
        ("features.3.weight".into(), vec![16, 8, 3, 3], Kind::Conv),
        ("features.6.weight".into(), vec![16, 16, 1, 1], Kind::Conv),
        ("classifier.weight".into(), vec![10, 16], Kind::Linear),
    ];
    let fam = Family {
        config: serde_json::json!({}),
        tensors: t,
    };
    check_family(&fam, "conv");
    let (_dir, _b, _f, out) = extract_family(&fam, "conv-shapes");
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    assert_eq!(
        factors["base_model.model.features.3.lora_A.weight"].shape,
        [R, 8, 3, 3]
    );
    assert_eq!(
        factors["base_model.model.features.3.lora_B.weight"].shape,
        [16, R, 1, 1]
    );
}

#[test]
fn fused_experts_are_refused_for_vllm_with_the_reason() {
    let (h, i, e) = (16, 12, 2);
    let fam = Family {
        config: serde_json::json!({"model_type": "qwen3_moe", "hidden_size": h}),
        tensors: vec![(
            "model.layers.0.mlp.experts.down_proj".into(),
            vec![e, h, i],
            Kind::Fused,
        )],
    };
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), &fam, fresh_seed("fused-vllm"));
    let mut st = cpu_settings(&b, &f, &dir.path().join("out"), R);
    st.target = phlora::extract::Target::Vllm;
    let err = extract(&st).unwrap_err().to_string();
    assert!(
        err.contains("target_parameters") && err.contains("--exclude"),
        "{err}"
    );
    assert!(!dir.path().join("out").join("adapter_config.json").exists());
}

#[test]
fn fused_experts_against_the_wrong_hidden_size_are_an_error() {
    let (h, i, e) = (16, 12, 2);
    let fam = Family {
        // Says gpt-oss (experts [E, in, out]) but the tensor is v5 [E, out, in].
        config: serde_json::json!({"model_type": "gpt_oss", "hidden_size": h}),
        tensors: vec![(
            "model.layers.0.mlp.experts.down_proj".into(),
            vec![e, h, i],
            Kind::Fused,
        )],
    };
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), &fam, fresh_seed("fused-wrong"));
    let st = cpu_settings(&b, &f, &dir.path().join("out"), R);
    let err = extract(&st).unwrap_err().to_string();
    assert!(
        err.contains("experts.down_proj") && err.contains("hidden size"),
        "{err}"
    );
}

/// DeepSeek-V3 style FP8: an F8_E4M3 base with `_scale_inv` block scales (blocks of 8 here,
/// from the config) and a BF16 fine-tune. ΔW is formed from the dequantised base; the scale
/// tensors are read with their weights, not reported on their own.
#[test]
fn fp8_block_scaled_base() {
    use phlora::checkpoint::fp8::{e4m3_to_f32, f32_to_e4m3};
    use phlora::checkpoint::writer::{write_file, HeaderEntry};
    let dir = tempfile::tempdir().unwrap();
    let seed = fresh_seed("fp8");
    let block = 8;
    let shapes = [
        ("model.layers.0.mlp.down_proj.weight", [16, 20]),
        ("model.layers.0.self_attn.q_proj.weight", [12, 16]),
    ];
    let config = serde_json::json!({
        "model_type": "deepseek_v3",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [block, block]}
    });
    let (mut base_entries, mut ft_tensors, mut dequant) = (Vec::new(), Vec::new(), Vec::new());
    for (k, (name, [m, n])) in shapes.iter().enumerate() {
        let w = normal(m * n, seed + k as u64);
        let (sm, sn) = (m.div_ceil(block), n.div_ceil(block));
        // One scale per block: its largest |w| maps to 448.
        let mut scale = vec![0f32; sm * sn];
        for i in 0..*m {
            for j in 0..*n {
                let s = &mut scale[(i / block) * sn + j / block];
                *s = s.max(w[i * n + j].abs() / 448.0);
            }
        }
        let codes: Vec<u8> = (0..m * n)
            .map(|x| f32_to_e4m3(w[x] / scale[(x / n / block) * sn + (x % n) / block]))
            .collect();
        let wq: Vec<f32> = (0..m * n)
            .map(|x| e4m3_to_f32(codes[x]) * scale[(x / n / block) * sn + (x % n) / block])
            .collect();
        let d = to_row_major_f32(&spectrum_matrix(
            *m,
            *n,
            &[0.5, 0.2, 0.1],
            1e-3,
            seed + 50 + k as u64,
        ));
        let f: Vec<f32> = wq.iter().zip(&d).map(|(a, b)| a + b).collect();
        let mut scale_bytes = Vec::new();
        for s in &scale {
            scale_bytes.extend_from_slice(&s.to_le_bytes());
        }
        base_entries.push((
            HeaderEntry {
                name: name.to_string(),
                dtype: "F8_E4M3",
                shape: vec![*m, *n],
                nbytes: codes.len(),
            },
            codes,
        ));
        base_entries.push((
            HeaderEntry {
                name: format!("{name}_scale_inv"),
                dtype: "F32",
                shape: vec![sm, sn],
                nbytes: scale_bytes.len(),
            },
            scale_bytes,
        ));
        ft_tensors.push(tensor(name, DType::BF16, &[*m, *n], f.clone()));
        dequant.push((name.to_string(), *m, *n, wq));
    }
    let (b, f) = (dir.path().join("base"), dir.path().join("ft"));
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("config.json"), config.to_string()).unwrap();
    write_file(
        &b.join("model.safetensors"),
        &base_entries,
        &Default::default(),
    )
    .unwrap();
    std::fs::create_dir_all(&f).unwrap();
    write_single(&f.join("model.safetensors"), &ft_tensors);
    let out = dir.path().join("adapter");
    let st = cpu_settings(&b, &f, &out, R);
    let report = extract(&st).unwrap();
    assert_eq!(
        report.tensors.len(),
        2,
        "the scales are not tensors of their own"
    );
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    let ftt = read_safetensors(&f.join("model.safetensors"));
    for (name, m, n, wq) in &dequant {
        let module = name.strip_suffix(".weight").unwrap();
        let a = &factors[&format!("base_model.model.{module}.lora_A.weight")];
        let bf = &factors[&format!("base_model.model.{module}.lora_B.weight")];
        assert_eq!(a.dtype, "BF16", "FP8 inputs give BF16 factors");
        let d = Mat::from_fn(*m, *n, |i, j| {
            f64::from(ftt[name].values[i * n + j]) - f64::from(wq[i * n + j])
        });
        let u = Mat::from_fn(*m, *n, |i, j| {
            (0..R)
                .map(|k| f64::from(bf.values[i * R + k]) * f64::from(a.values[k * n + j]))
                .sum::<f64>()
        });
        let best = optimum(&singular_values(&d), R);
        let err = (&d - &u).norm_l2() / d.norm_l2();
        // BF16 factors round at ~4e-3 relative.
        assert!(err <= best + 1e-2, "{name}: {err} vs the optimum {best}");
    }
    // An FP8 weight whose scale is missing is an error that names it.
    let broken: Vec<_> = base_entries
        .iter()
        .filter(|(h, _)| !h.name.ends_with("_scale_inv"))
        .cloned()
        .collect();
    write_file(&b.join("model.safetensors"), &broken, &Default::default()).unwrap();
    let err = extract(&ExtractSettings {
        out: dir.path().join("b2"),
        ..st
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("_scale_inv") && err.contains("down_proj"),
        "{err}"
    );
}

/// Both checkpoints tie lm_head to the embeddings (no `lm_head.weight` stored): the adapter
/// carries the embedding's change on lm_head too, with the embedding's factors transposed, and
/// the report counts that ΔW once.
#[test]
fn tied_embeddings_get_an_lm_head_lora() {
    let (h, v) = (16, 40);
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        Kind::Embedding,
    )];
    llama_attention(&mut t, 0, h);
    let fam = Family {
        config: serde_json::json!({
            "model_type": "llama", "hidden_size": h,
            "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": true
        }),
        tensors: t,
    };
    let (_dir, b, f, out) = extract_family(&fam, "tied");
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    let emb_a = &factors["base_model.model.model.embed_tokens.lora_embedding_A"];
    let emb_b = &factors["base_model.model.model.embed_tokens.lora_embedding_B"];
    let head_a = &factors["base_model.model.lm_head.lora_A.weight"];
    let head_b = &factors["base_model.model.lm_head.lora_B.weight"];
    assert_eq!(
        (head_a.shape.clone(), head_b.shape.clone()),
        (vec![R, h], vec![v, R])
    );
    for k in 0..R {
        for j in 0..h {
            assert_eq!(
                head_a.values[k * h + j],
                emb_b.values[j * R + k],
                "A = embedding Bᵀ"
            );
        }
        for i in 0..v {
            assert_eq!(
                head_b.values[i * R + k],
                emb_a.values[k * v + i],
                "B = embedding Aᵀ"
            );
        }
    }
    // lm_head's B·A is ΔE ([vocab, dim]) as well as the rank allows.
    let (bt, ftt) = (
        read_safetensors(&b.join("model.safetensors")),
        read_safetensors(&f.join("model.safetensors")),
    );
    let name = "model.embed_tokens.weight";
    let d = Mat::from_fn(v, h, |i, j| {
        f64::from(ftt[name].values[i * h + j]) - f64::from(bt[name].values[i * h + j])
    });
    let u = Mat::from_fn(v, h, |i, j| {
        (0..R)
            .map(|k| f64::from(head_b.values[i * R + k]) * f64::from(head_a.values[k * h + j]))
            .sum::<f64>()
    });
    let best = optimum(&singular_values(&d), R);
    assert!((&d - &u).norm_l2() / d.norm_l2() <= 1.01 * best + 1e-5);
    let report = read_json(&out.join("report.json"));
    let rows = report["tensors"].as_array().unwrap();
    let row = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap().clone();
    assert_eq!(row("lm_head.weight")["action"], "lora");
    assert_eq!(row("lm_head.weight")["residual"], row(name)["residual"]);
    // Counted once: the shares of the carried tensors add up to 1 without lm_head.
    let shares: f64 = rows
        .iter()
        .filter(|r| r["name"] != "lm_head.weight")
        .map(|r| r["share"].as_f64().unwrap())
        .sum();
    assert!((shares - 1.0).abs() < 1e-9, "{shares}");
}

/// `--fuse-experts`: Qwen2-MoE's per-expert weights written as the fused parameters
/// transformers v5 builds from them in memory (`experts.gate_up_proj` [E, 2I, H] with gate's
/// rows first, `experts.down_proj` [E, H, I]), gate and up as a block-diagonal pair of rank
/// 2R; the shared expert's layers become target parameters by path. Rebuilt here by PEFT's formulas, then verify
/// and merge read the fused modules against the per-expert checkpoints.
#[test]
fn per_expert_weights_fused_for_transformers_v5() {
    let (h, i, e) = (16, 12, 3);
    let mlp = "model.layers.0.mlp";
    let mut t = Vec::new();
    llama_attention(&mut t, 0, h);
    per_expert_mlp(&mut t, mlp, e, h, i);
    for (p, s) in [("gate_proj", [i, h]), ("down_proj", [h, i])] {
        t.push((
            format!("{mlp}.shared_expert.{p}.weight"),
            s.to_vec(),
            Kind::Linear,
        ));
    }
    let fam = Family {
        config: serde_json::json!({"model_type": "qwen2_moe", "hidden_size": h, "num_experts": e}),
        tensors: t,
    };
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), &fam, fresh_seed("fuse-experts"));
    let out = dir.path().join("adapter");
    let mut st = cpu_settings(&b, &f, &out, R);
    st.plan.fuse_experts = true;
    extract(&st).unwrap();

    let cfg = read_json(&out.join("adapter_config.json"));
    let params: Vec<String> = serde_json::from_value(cfg["target_parameters"].clone()).unwrap();
    for p in [
        "gate.weight".to_string(),
        format!("{mlp}.experts.gate_up_proj"),
        format!("{mlp}.experts.down_proj"),
    ] {
        assert!(params.contains(&p), "{p} in {params:?}");
    }
    // The shared expert's layers are target parameters by path too: PEFT's conversion to v5
    // would turn a `gate_proj` in target_modules into the experts' parameter.
    for p in ["gate_proj", "down_proj"] {
        let path = format!("{mlp}.shared_expert.{p}.weight");
        assert!(params.contains(&path), "{path} in {params:?}");
    }
    let targets = cfg["target_modules"].to_string();
    assert!(
        !targets.contains("gate_proj") && !targets.contains("down_proj"),
        "{targets}"
    );
    let key = regex::escape(&format!("{mlp}.experts.gate_up_proj"));
    assert_eq!(cfg["rank_pattern"][&key], 2 * R, "{cfg}");
    assert_eq!(cfg["alpha_pattern"][&key], (2 * R) as f64, "{cfg}");
    assert!(cfg["rank_pattern"].as_object().unwrap().len() == 1, "{cfg}");

    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    let (bt, ftt) = (
        read_safetensors(&b.join("model.safetensors")),
        read_safetensors(&f.join("model.safetensors")),
    );
    let gate_up = (
        &factors[&format!("base_model.model.{mlp}.experts.base_layer.lora_A.weight")],
        &factors[&format!("base_model.model.{mlp}.experts.base_layer.lora_B.weight")],
    );
    let down = (
        &factors[&format!("base_model.model.{mlp}.experts.lora_A.weight")],
        &factors[&format!("base_model.model.{mlp}.experts.lora_B.weight")],
    );
    assert_eq!(gate_up.0.shape, vec![2 * R * e, h]);
    assert_eq!(gate_up.1.shape, vec![2 * i, 2 * R * e]);
    assert_eq!(down.0.shape, vec![R * e, i]);
    assert_eq!(down.1.shape, vec![h, R * e]);
    for x in 0..e {
        for (p, (a, bb), offset) in [
            ("gate_proj", gate_up, 0),
            ("up_proj", gate_up, i),
            ("down_proj", down, 0),
        ] {
            let name = format!("{mlp}.experts.{x}.{p}.weight");
            let (rows, cols) = (ftt[&name].shape[0], ftt[&name].shape[1]);
            let d = Mat::from_fn(rows, cols, |r, c| {
                f64::from(ftt[&name].values[r * cols + c])
                    - f64::from(bt[&name].values[r * cols + c])
            });
            // PEFT: A.reshape(E, r, in), B.reshape(out, r, E); scaling 2R/2R or R/R = 1.
            let r = a.shape[0] / e;
            let u = Mat::from_fn(rows, cols, |o, c| {
                (0..r)
                    .map(|k| {
                        f64::from(bb.values[(offset + o) * r * e + k * e + x])
                            * f64::from(a.values[(x * r + k) * cols + c])
                    })
                    .sum::<f64>()
            });
            let best = optimum(&singular_values(&d), R);
            let err = (&d - &u).norm_l2() / d.norm_l2();
            assert!(err <= 1.01 * best + 1e-5, "{name}: {err} vs {best}");
        }
    }

    let v = verify_pair(&b, &f, &out).unwrap();
    let experts: Vec<_> = v
        .tensors
        .iter()
        .filter(|t| t.name.contains(".experts."))
        .collect();
    assert_eq!(experts.len(), 3 * e, "{experts:?}");
    assert!(
        experts
            .iter()
            .all(|t| t.kind == CheckKind::Lora && t.rel_error_delta < 1e-2),
        "{experts:?}"
    );
    let merged = dir.path().join("merged");
    merge_ok(&b, &out, &merged);
    let v = verify_pair(&b, &merged, &out).unwrap();
    assert_lora_within(&v, 1e-5, "");
}

/// --fuse-experts refuses what it cannot do, naming the reason: vLLM targets, Mixtral's
/// w1/w2/w3 experts (PEFT converts those itself), and a model without per-expert weights.
#[test]
fn fuse_experts_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let o = phlora(&[
        "extract",
        "--base",
        "b",
        "--ft",
        "f",
        "--out",
        "o",
        "--fuse-experts",
        "--target",
        "vllm",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--fuse-experts"),
        "{err}"
    );

    let h = 8;
    let cases = [
        (
            "model.layers.0.block_sparse_moe.experts.0.w1.weight",
            "`w1`",
        ),
        (
            "model.layers.0.mlp.gate_proj.weight",
            "no per-expert weight",
        ),
    ];
    for (k, (name, want)) in cases.iter().enumerate() {
        let fam = Family {
            config: serde_json::json!({"model_type": "mixtral", "hidden_size": h}),
            tensors: vec![(name.to_string(), vec![h, h], Kind::Linear)],
        };
        let root = dir.path().join(k.to_string());
        let (b, f) = write_pair(&root, &fam, fresh_seed("fuse-refusals") + k as u64);
        let mut st = cpu_settings(&b, &f, &root.join("out"), R);
        st.plan.fuse_experts = true;
        let e = extract(&st).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        assert!(!root.join("out").join("adapter_config.json").exists());
    }
}

/// The base ties lm_head, the fine-tune stores its own (untied while fine-tuning): lm_head's
/// LoRA is against the base's embedding, and merge stores an untied lm_head (before, it was
/// folded into the embedding's update and lost).
#[test]
fn base_tied_fine_tune_untied_merges_untied() {
    let (h, v) = (16, 40);
    let dir = tempfile::tempdir().unwrap();
    let seed = fresh_seed("untie");
    let emb = normal(v * h, seed);
    let change = |s: u64| to_row_major_f32(&spectrum_matrix(v, h, &[1.0, 0.5], 1e-4, s));
    let plus = |a: &[f32], d: Vec<f32>| a.iter().zip(d).map(|(x, y)| x + y).collect::<Vec<_>>();
    let q = normal(h * h, seed + 3);
    let (b, f) = (dir.path().join("base"), dir.path().join("ft"));
    let config = |tied: bool| {
        serde_json::json!({"model_type": "llama", "hidden_size": h,
            "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": tied})
        .to_string()
    };
    write_single(
        &b.join("model.safetensors"),
        &[
            tensor(
                "model.embed_tokens.weight",
                DType::F32,
                &[v, h],
                emb.clone(),
            ),
            tensor(
                "model.layers.0.self_attn.q_proj.weight",
                DType::F32,
                &[h, h],
                q.clone(),
            ),
        ],
    );
    write_single(
        &f.join("model.safetensors"),
        &[
            tensor(
                "model.embed_tokens.weight",
                DType::F32,
                &[v, h],
                plus(&emb, change(seed + 1)),
            ),
            tensor(
                "model.layers.0.self_attn.q_proj.weight",
                DType::F32,
                &[h, h],
                q,
            ),
            tensor(
                "lm_head.weight",
                DType::F32,
                &[v, h],
                plus(&emb, change(seed + 2)),
            ),
        ],
    );
    std::fs::write(b.join("config.json"), config(true)).unwrap();
    std::fs::write(f.join("config.json"), config(false)).unwrap();
    let out = dir.path().join("adapter");
    let st = cpu_settings(&b, &f, &out, R);
    extract(&st).unwrap();
    let merged = dir.path().join("merged");
    merge_ok(&b, &out, &merged);
    assert_eq!(
        read_json(&merged.join("config.json"))["tie_word_embeddings"],
        false
    );
    let m = read_safetensors(&merged.join("model.safetensors"));
    let ft = read_safetensors(&f.join("model.safetensors"));
    // Both rank-2 changes are carried at rank 4 (the noise is not): merged ≈ fine-tune, the
    // embedding and lm_head each, relative to their change from the base's embedding.
    let dist = |x: &[f32], y: &[f32]| -> f64 {
        x.iter()
            .zip(y)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    for name in ["lm_head.weight", "model.embed_tokens.weight"] {
        let err = dist(&m[name].values, &ft[name].values) / dist(&ft[name].values, &emb);
        assert!(err < 1e-2, "{name}: {err}");
    }
}
