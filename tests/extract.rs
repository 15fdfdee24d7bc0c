//! End-to-end extraction on small checkpoints: the PEFT format, the residual certificate,
//! input layouts and dtypes, and every kind of bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use phlora::checkpoint::DType;
use phlora::extract::{extract, ExtractSettings};
use phlora::linalg::Method;
use phlora::report::TensorAction;

const H: usize = 32;
const I: usize = 48;
const V: usize = 64;

/// A small Llama-named pair: ΔW of each changed matrix is a planted rank-4 part plus a little
/// noise. `q_proj` of layer 1 is unchanged; layer 0's q_proj bias changed (not carried).
fn fixture_tensors(dtype: DType, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut names: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![V, H])];
    for l in 0..2 {
        names.push((format!("model.layers.{l}.input_layernorm.weight"), vec![H]));
        names.push((
            format!("model.layers.{l}.self_attn.q_proj.weight"),
            vec![H, H],
        ));
        if l == 0 {
            names.push((format!("model.layers.{l}.self_attn.q_proj.bias"), vec![H]));
        }
        names.push((format!("model.layers.{l}.mlp.up_proj.weight"), vec![I, H]));
        names.push((format!("model.layers.{l}.mlp.down_proj.weight"), vec![H, I]));
    }
    names.push(("model.norm.weight".into(), vec![H]));
    names.push(("lm_head.weight".into(), vec![V, H]));
    let mut base = Vec::new();
    let mut ft = Vec::new();
    for (k, (name, shape)) in names.iter().enumerate() {
        let s = seed.wrapping_add(k as u64 * 1000);
        let n: usize = shape.iter().product();
        let b: Vec<f32> = if shape.len() == 1 {
            normal(n, s).iter().map(|x| 1.0 + 0.05 * x).collect()
        } else {
            normal(n, s).iter().map(|x| 0.02 * x).collect()
        };
        let d: Vec<f32> = if name == "model.layers.1.self_attn.q_proj.weight" {
            vec![0.0; n]
        } else if shape.len() == 1 {
            normal(n, s + 1).iter().map(|x| 0.05 * x).collect()
        } else {
            let a = spectrum_matrix(shape[0], shape[1], &[1.0, 0.5, 0.25, 0.125], 1e-3, s + 2);
            to_row_major_f32(&a)
        };
        let f: Vec<f32> = b.iter().zip(&d).map(|(x, y)| x + y).collect();
        base.push(tensor(name, dtype, shape, b));
        ft.push(tensor(name, dtype, shape, f));
    }
    (base, ft)
}

fn config_json(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let c = serde_json::json!({"_name_or_path": name, "architectures": ["LlamaForCausalLM"], "model_type": "llama"});
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
}

/// Writes the fixture as model folders; sharded or single-file.
fn fixture(root: &Path, dtype: DType, seed: u64, sharded: bool) -> (PathBuf, PathBuf) {
    let (base, ft) = fixture_tensors(dtype, seed);
    let (bd, fd) = (root.join("base"), root.join("ft"));
    for (dir, tensors, name) in [(&bd, &base, "org/base-model"), (&fd, &ft, "org/ft-model")] {
        config_json(dir, name);
        if sharded {
            write_sharded(dir, tensors, 3);
        } else {
            write_single(&dir.join("model.safetensors"), tensors);
        }
    }
    (bd, fd)
}

fn settings(base: &Path, ft: &Path, out: &Path, rank: usize) -> ExtractSettings {
    let mut s = ExtractSettings::new(
        base.to_path_buf(),
        ft.to_path_buf(),
        out.to_path_buf(),
        rank,
    );
    s.device = phlora::backend::Device::Cpu;
    s
}

fn lora_modules() -> Vec<&'static str> {
    vec![
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
        "lm_head",
    ]
}

#[test]
fn adapter_matches_the_peft_format() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = fixture(dir.path(), DType::BF16, fresh_seed("format"), false);
    let out = dir.path().join("adapter");
    let report = extract(&settings(&b, &f, &out, 8)).unwrap();

    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["base_model_name_or_path"], "org/base-model");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(cfg["use_dora"], false);
    assert_eq!(cfg["rank_pattern"], serde_json::json!({}));
    // Longest first: PEFT rewrites a key at the first listed name it contains.
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["input_layernorm", "norm"])
    );
    // layers.1.q_proj is unchanged, so a plain "q_proj" would give it a LoRA with no
    // weights: the config must name exact module paths.
    let target = cfg["target_modules"]
        .as_str()
        .expect("a regex when a module has no factors");
    for m in lora_modules() {
        assert!(
            target.contains(&phlora::adapter::regex_escape(m)),
            "{m} in {target}"
        );
    }
    assert!(!target.contains("layers\\.1\\.self_attn"));

    let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
    let mut want: HashMap<String, Vec<usize>> = HashMap::new();
    for m in lora_modules() {
        let (rows, cols) = match m {
            "model.embed_tokens" | "lm_head" => (V, H),
            m if m.ends_with("up_proj") => (I, H),
            m if m.ends_with("down_proj") => (H, I),
            _ => (H, H),
        };
        if m == "model.embed_tokens" {
            want.insert(format!("base_model.model.{m}.lora_embedding_A"), vec![8, V]);
            want.insert(format!("base_model.model.{m}.lora_embedding_B"), vec![H, 8]);
        } else {
            want.insert(format!("base_model.model.{m}.lora_A.weight"), vec![8, cols]);
            want.insert(format!("base_model.model.{m}.lora_B.weight"), vec![rows, 8]);
        }
    }
    for n in [
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.norm.weight",
    ] {
        want.insert(format!("base_model.model.{n}"), vec![H]);
    }
    let got: HashMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    assert_eq!(got, want);
    assert!(tensors.values().all(|t| t.dtype == "BF16"));
    let raw = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(&raw).unwrap();
    assert_eq!(md.metadata().as_ref().unwrap()["format"], "pt");

    // Norms saved whole hold the fine-tune's values exactly.
    let ft_norm = read_safetensors(&f.join("model.safetensors"))["model.norm.weight"]
        .values
        .clone();
    assert_eq!(
        tensors["base_model.model.model.norm.weight"].values,
        ft_norm
    );

    let m = &report.summary;
    assert_eq!(
        (m.lora, m.unchanged, m.saved_whole, m.not_carried),
        (7, 1, 3, 1)
    );
    assert!(m.share_not_carried > 0.0 && m.share_saved_whole > 0.0);
    let bias = report
        .tensors
        .iter()
        .find(|t| t.name.ends_with("q_proj.bias"))
        .unwrap();
    assert_eq!(bias.action, TensorAction::NotCarried);
    // Each not-carried tensor says what share of Σ‖ΔW‖² it holds; shares add up.
    assert!(bias.share > 0.0);
    assert!((bias.share - m.share_not_carried).abs() < 1e-12);
    let total: f64 = report.tensors.iter().map(|t| t.share).sum();
    assert!((total - 1.0).abs() < 1e-9, "{total}");
    assert!(out.join("report.json").is_file());
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".phlora")));
}

#[test]
fn target_modules_are_plain_names_when_every_module_has_factors() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = fixture(dir.path(), DType::F32, fresh_seed("names"), false);
    let out = dir.path().join("adapter");
    let mut s = settings(&b, &f, &out, 4);
    s.plan.exclude = vec![phlora::plan::Glob::new("*.self_attn.*")];
    s.plan.norms = false;
    let report = extract(&s).unwrap();
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["down_proj", "embed_tokens", "lm_head", "up_proj"])
    );
    assert_eq!(cfg["modules_to_save"], serde_json::Value::Null);
    assert_eq!(report.summary.filtered_out, 3);
    assert_eq!(
        report.summary.not_carried, 3,
        "three norms left out by --no-norms"
    );
}

/// B·A of module `m` from an adapter file's tensors, in f64, row-major: ΔW (rows×cols) for a
/// linear layer, ΔEᵀ (dim×vocab) for an embedding. Returns (product, its column count).
fn lora_product(a: &HashMap<String, Loaded>, m: &str) -> (Vec<f64>, usize) {
    let (ka, kb) = if m.contains("embed") {
        (
            format!("base_model.model.{m}.lora_embedding_A"),
            format!("base_model.model.{m}.lora_embedding_B"),
        )
    } else {
        (
            format!("base_model.model.{m}.lora_A.weight"),
            format!("base_model.model.{m}.lora_B.weight"),
        )
    };
    let (fa, fb) = (&a[&ka], &a[&kb]);
    let (r, p, q) = (fa.shape[0], fb.shape[0], fa.shape[1]);
    let prod = (0..p * q)
        .map(|idx| {
            let (i, j) = (idx / q, idx % q);
            (0..r)
                .map(|k| fb.values[i * r + k] as f64 * fa.values[k * q + j] as f64)
                .sum()
        })
        .collect();
    (prod, q)
}

/// ΔW from the checkpoints as written, and B·A from the adapter as written, in f64.
fn direct_residuals(base: &Path, ft: &Path, adapter: &Path) -> HashMap<String, f64> {
    let b = read_safetensors(&base.join("model.safetensors"));
    let f = read_safetensors(&ft.join("model.safetensors"));
    let a = read_safetensors(&adapter.join("adapter_model.safetensors"));
    let mut out = HashMap::new();
    for m in lora_modules() {
        let name = format!("{m}.weight");
        let (rows, cols) = (f[&name].shape[0], f[&name].shape[1]);
        let (ba, ba_cols) = lora_product(&a, m);
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..rows {
            for j in 0..cols {
                let d = f[&name].values[i * cols + j] as f64 - b[&name].values[i * cols + j] as f64;
                // An embedding's product is ΔEᵀ.
                let x = if m.contains("embed") {
                    ba[j * ba_cols + i]
                } else {
                    ba[i * ba_cols + j]
                };
                num += (d - x).powi(2);
                den += d * d;
            }
        }
        out.insert(name, (num / den).sqrt());
    }
    out
}

#[test]
fn report_residual_equals_a_direct_recomputation_from_the_files() {
    for (out_dtype, method) in [
        (None, Method::Randomized),
        (Some(DType::F32), Method::Randomized),
        (Some(DType::F16), Method::Exact),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (b, f) = fixture(dir.path(), DType::BF16, fresh_seed("certificate"), false);
        let out = dir.path().join("adapter");
        let mut s = settings(&b, &f, &out, 8);
        s.out_dtype = out_dtype;
        s.svd.method = method;
        let report = extract(&s).unwrap();
        let direct = direct_residuals(&b, &f, &out);
        for (name, want) in &direct {
            let row = report.tensors.iter().find(|t| &t.name == name).unwrap();
            let got = row.residual.unwrap();
            assert!(
                (got - want).abs() <= 1e-5 + 1e-3 * want,
                "{name} {out_dtype:?}: report {got} vs direct {want}"
            );
            // Planted rank 4 < r = 8: only the 1e-3 noise and the factor rounding remain.
            assert!(got < 0.08, "{name}: residual {got}");
            let e = row.energy.unwrap();
            assert!(e > 0.99 && e <= 1.0, "{name}: E_r {e}");
        }
    }
}

#[test]
fn sharded_and_single_file_inputs_give_the_same_adapter() {
    let seed = fresh_seed("layouts");
    let dir = tempfile::tempdir().unwrap();
    let (b1, f1) = fixture(&dir.path().join("single"), DType::BF16, seed, false);
    let (b2, f2) = fixture(&dir.path().join("sharded"), DType::BF16, seed, true);
    assert!(b2.join("model-00002-of-00004.safetensors").is_file());
    let (o1, o2) = (dir.path().join("o1"), dir.path().join("o2"));
    extract(&settings(&b1, &f1, &o1, 8)).unwrap();
    extract(&settings(&b2, &f2, &o2, 8)).unwrap();
    let a1 = std::fs::read(o1.join("adapter_model.safetensors")).unwrap();
    let a2 = std::fs::read(o2.join("adapter_model.safetensors")).unwrap();
    assert!(a1 == a2, "adapters differ");
    // A bare .safetensors file works too.
    let o3 = dir.path().join("o3");
    extract(&settings(
        &b1.join("model.safetensors"),
        &f1.join("model.safetensors"),
        &o3,
        8,
    ))
    .unwrap();
    assert!(std::fs::read(o3.join("adapter_model.safetensors")).unwrap() == a1);
}

#[test]
fn bf16_f16_and_f32_inputs_all_work() {
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let dir = tempfile::tempdir().unwrap();
        let (b, f) = fixture(dir.path(), dtype, fresh_seed("dtypes"), true);
        let out = dir.path().join("adapter");
        let report = extract(&settings(&b, &f, &out, 8)).unwrap();
        assert_eq!(report.out_dtype, dtype.as_str());
        let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
        assert!(
            tensors.values().all(|t| t.dtype == dtype.as_str()),
            "{dtype}"
        );
        assert!(
            report.summary.max_residual < 0.08,
            "{dtype}: {}",
            report.summary.max_residual
        );
        assert_eq!(report.summary.lora, 7);
    }
}

// ---- bad input -------------------------------------------------------------------------

/// Runs an extraction that must fail; checks the message and that OUT holds no adapter.
fn assert_fails(s: &ExtractSettings, must_contain: &[&str]) -> String {
    let err = extract(s).expect_err("extraction should fail").to_string();
    for m in must_contain {
        assert!(err.contains(m), "error `{err}` should mention `{m}`");
    }
    assert!(
        !s.out.join("adapter_config.json").exists(),
        "no adapter_config.json after `{err}`"
    );
    assert!(!s.out.join("adapter_model.safetensors").exists());
    if s.out.is_dir() {
        for e in std::fs::read_dir(&s.out).unwrap() {
            let n = e.unwrap().file_name();
            assert!(
                !n.to_string_lossy().starts_with(".phlora"),
                "staging left behind: {n:?}"
            );
        }
    }
    err
}

fn bad_pair(tag: &str, sharded: bool) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = fixture(dir.path(), DType::BF16, fresh_seed(tag), sharded);
    let out = dir.path().join("adapter");
    (dir, b, f, out)
}

/// Writes base and fine-tune as bare `b.safetensors` / `f.safetensors`; returns their paths
/// and the (not yet existing) output folder.
fn write_bare_pair(dir: &Path, base: &[T], ft: &[T]) -> (PathBuf, PathBuf, PathBuf) {
    let (b, f) = (dir.join("b.safetensors"), dir.join("f.safetensors"));
    write_single(&b, base);
    write_single(&f, ft);
    (b, f, dir.join("adapter"))
}

#[test]
fn missing_checkpoint() {
    let (dir, b, _, out) = bad_pair("missing", false);
    let missing = dir.path().join("nope");
    assert_fails(&settings(&b, &missing, &out, 8), &["nope"]);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_fails(
        &settings(&empty, &b, &out, 8),
        &["empty", "no model.safetensors"],
    );
}

#[test]
fn truncated_and_corrupted_shards() {
    let (_d, b, f, out) = bad_pair("truncated", true);
    let shard = f.join("model-00002-of-00004.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    file.set_len(len - 100).unwrap();
    assert_fails(
        &settings(&b, &f, &out, 8),
        &["model-00002-of-00004.safetensors", "truncated"],
    );

    let (_d, b, f, out) = bad_pair("corrupted", true);
    let shard = b.join("model-00003-of-00004.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    for x in &mut bytes[8..40] {
        *x = 0xFF;
    }
    std::fs::write(&shard, &bytes).unwrap();
    assert_fails(
        &settings(&b, &f, &out, 8),
        &[
            "model-00003-of-00004.safetensors",
            "not a valid safetensors",
        ],
    );

    let (_d, b, f, out) = bad_pair("huge-header", true);
    let shard = b.join("model-00001-of-00004.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&shard, &bytes).unwrap();
    assert_fails(
        &settings(&b, &f, &out, 8),
        &["model-00001-of-00004.safetensors"],
    );

    let (_d, b, f, out) = bad_pair("tiny-file", true);
    std::fs::write(b.join("model-00001-of-00004.safetensors"), b"abc").unwrap();
    assert_fails(
        &settings(&b, &f, &out, 8),
        &["model-00001-of-00004.safetensors", "too short"],
    );
}

#[test]
fn header_offsets_out_of_range() {
    let (dir, b, _f, out) = bad_pair("offsets", false);
    let header = br#"{"lm_head.weight":{"dtype":"F32","shape":[4,4],"data_offsets":[0,4096]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 64]);
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    assert_fails(
        &settings(&b.join("model.safetensors"), &bad, &out, 8),
        &["bad.safetensors"],
    );
    // Overlapping offsets.
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 12]);
    std::fs::write(&bad, &bytes).unwrap();
    assert_fails(
        &settings(&b.join("model.safetensors"), &bad, &out, 8),
        &["bad.safetensors", "offsets"],
    );
}

#[test]
fn index_naming_a_missing_shard() {
    let (_d, b, f, out) = bad_pair("index", true);
    let path = f.join("model.safetensors.index.json");
    let mut index = read_json(&path);
    index["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors".into();
    std::fs::write(&path, index.to_string()).unwrap();
    assert_fails(
        &settings(&b, &f, &out, 8),
        &[
            "model-00009-of-00009.safetensors",
            "lm_head.weight",
            "index",
        ],
    );
}

#[test]
fn tensor_in_one_checkpoint_only() {
    let seed = fresh_seed("one-side");
    let dir = tempfile::tempdir().unwrap();
    let (base, mut ft) = fixture_tensors(DType::BF16, seed);
    ft.push(tensor(
        "model.extra.weight",
        DType::BF16,
        &[4, 4],
        vec![0.5; 16],
    ));
    let (b, f, out) = write_bare_pair(dir.path(), &base, &ft);
    let s = settings(&b, &f, &out, 8);
    assert_fails(
        &s,
        &["model.extra.weight", "f.safetensors", "not in the base"],
    );
    let s2 = settings(&f, &b, &out, 8);
    assert_fails(&s2, &["model.extra.weight", "not in the fine-tune"]);
    // Excluding it is the documented way out.
    let mut s3 = s;
    s3.plan.exclude = vec![phlora::plan::Glob::new("model.extra.*")];
    extract(&s3).unwrap();
}

#[test]
fn shape_mismatch_from_a_resized_vocabulary() {
    let seed = fresh_seed("vocab");
    let dir = tempfile::tempdir().unwrap();
    let (base, mut ft) = fixture_tensors(DType::BF16, seed);
    ft[0] = tensor(
        "model.embed_tokens.weight",
        DType::BF16,
        &[V + 2, H],
        vec![0.01; (V + 2) * H],
    );
    let (b, f, out) = write_bare_pair(dir.path(), &base, &ft);
    assert_fails(
        &settings(&b, &f, &out, 8),
        &[
            "model.embed_tokens.weight",
            "[66, 32]",
            "[64, 32]",
            "vocabulary",
        ],
    );
}

#[test]
fn unsupported_dtype() {
    use phlora::checkpoint::writer::{write_file, HeaderEntry};
    let dir = tempfile::tempdir().unwrap();
    let entry = |name: &str| HeaderEntry {
        name: name.into(),
        dtype: "I32",
        shape: vec![4],
        nbytes: 16,
    };
    let mut lin = Vec::new();
    phlora::checkpoint::dtype::encode_into(DType::F32, &normal(16, 3), &mut lin);
    let lin_entry = HeaderEntry {
        name: "l.weight".into(),
        dtype: "F32",
        shape: vec![4, 4],
        nbytes: 64,
    };
    let meta = Default::default();
    write_file(
        &dir.path().join("b.safetensors"),
        &[
            (entry("ids"), vec![1; 16]),
            (lin_entry.clone(), lin.clone()),
        ],
        &meta,
    )
    .unwrap();
    write_file(
        &dir.path().join("f.safetensors"),
        &[
            (entry("ids"), vec![2; 16]),
            (lin_entry.clone(), lin.clone()),
        ],
        &meta,
    )
    .unwrap();
    let out = dir.path().join("adapter");
    let s = settings(
        &dir.path().join("b.safetensors"),
        &dir.path().join("f.safetensors"),
        &out,
        2,
    );
    assert_fails(&s, &["ids", "I32", "not supported", "f.safetensors"]);
    // An unchanged non-float tensor is fine (compared byte for byte); here nothing changed at all.
    write_file(
        &dir.path().join("f.safetensors"),
        &[(entry("ids"), vec![1; 16]), (lin_entry, lin)],
        &meta,
    )
    .unwrap();
    assert_fails(&s, &["nothing to write"]);
}

#[test]
fn nan_or_inf_in_a_delta() {
    for (side, value) in [("fine-tune", f32::NAN), ("base", f32::INFINITY)] {
        let seed = fresh_seed("nan");
        let dir = tempfile::tempdir().unwrap();
        let (mut base, mut ft) = fixture_tensors(DType::BF16, seed);
        let target = if side == "base" { &mut base } else { &mut ft };
        let t = target
            .iter_mut()
            .find(|t| t.0 == "model.layers.1.mlp.up_proj.weight")
            .unwrap();
        t.3[17] = value;
        let (b, f, out) = write_bare_pair(dir.path(), &base, &ft);
        let file = if side == "base" {
            "b.safetensors"
        } else {
            "f.safetensors"
        };
        assert_fails(
            &settings(&b, &f, &out, 8),
            &[
                "model.layers.1.mlp.up_proj.weight",
                "NaN or Inf",
                side,
                file,
            ],
        );
        assert!(
            !out.exists(),
            "an output folder created by the failed run is removed again"
        );
    }
}

#[test]
fn unwritable_output_folder() {
    let (dir, b, f, _) = bad_pair("unwritable", false);
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("adapter");
    let err = extract(&settings(&b, &f, &out, 8))
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("a-file"), "{err}");
    let err = extract(&settings(&b, &f, &file, 8))
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("not a folder"), "{err}");
}

#[test]
fn a_rank_beyond_every_matrix_is_refused() {
    let (_d, b, f, out) = bad_pair("rank", false);
    // The largest target here is 64×32: rank 33 could only ever add zero padding.
    assert_fails(&settings(&b, &f, &out, 33), &["--rank 33", "at most 32"]);
    extract(&settings(&b, &f, &out, 32)).unwrap();
}

#[test]
fn an_existing_adapter_is_kept_unless_forced() {
    let (_d, b, f, out) = bad_pair("force", false);
    extract(&settings(&b, &f, &out, 8)).unwrap();
    let before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let err = extract(&settings(&b, &f, &out, 4))
        .expect_err("must refuse")
        .to_string();
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        before
    );
    let mut s = settings(&b, &f, &out, 4);
    s.overwrite = true;
    extract(&s).unwrap();
    assert_eq!(read_json(&out.join("adapter_config.json"))["r"], 4);
}

// ---- the binary ------------------------------------------------------------------------

/// `phlora extract --base B --ft F --out OUT` followed by `extra`.
fn phlora_extract(b: &Path, f: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "extract",
        "--base",
        b.to_str().unwrap(),
        "--ft",
        f.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    phlora(&args)
}

#[test]
fn cli_reports_errors_with_a_nonzero_exit_and_no_panic() {
    let (dir, b, _f, out) = bad_pair("cli", true);
    let missing = dir.path().join("missing-ft");
    let o = phlora_extract(&b, &missing, &out, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error:") && err.contains("missing-ft"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    let o = phlora(&[
        "extract", "--base", "a", "--ft", "b", "--out", "c", "--rank", "0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--rank"));
    let o = phlora(&[
        "extract", "--base", "a", "--ft", "b", "--out", "c", "--device", "tpu",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--device"));
    let o = phlora(&["extract", "--base", "a"]);
    assert_eq!(o.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn cli_extract_json_and_inspect() {
    let (_d, b, f, out) = bad_pair("cli-ok", true);
    let o = phlora_extract(&b, &f, &out, &["-q", "-r", "4", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["summary"]["lora"], 7);
    assert_eq!(v["rank"], 4);
    assert!(
        o.stderr.is_empty(),
        "quiet: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = phlora(&[
        "inspect",
        f.to_str().unwrap(),
        "--base",
        b.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("model.layers.0.self_attn.q_proj.bias") && text.contains("not carried"),
        "{text}"
    );
    assert!(text.contains("lora_embedding_A/B"));
}

// ---- devices -----------------------------------------------------------------------------

#[test]
fn device_choice_cuda_fails_clearly_without_a_gpu_and_auto_falls_back_with_one_warning() {
    let (dir, b, f, _) = bad_pair("devices", true);
    let gpu = phlora::backend::Cuda::new(0, Default::default());
    let out_cuda = dir.path().join("out-cuda");
    let out_auto = dir.path().join("out-auto");
    let args = |device| ["-r", "4", "--json", "--device", device];
    let cuda = phlora_extract(&b, &f, &out_cuda, &args("cuda"));
    let auto = phlora_extract(&b, &f, &out_auto, &args("auto"));
    let auto_err = String::from_utf8_lossy(&auto.stderr).to_string();
    assert!(auto.status.success(), "{auto_err}");
    let auto_report: serde_json::Value = serde_json::from_slice(&auto.stdout).unwrap();
    let device = auto_report["device"].as_str().unwrap().to_string();
    match gpu {
        Err(reason) => {
            eprintln!("no usable GPU here ({reason}): checking the CPU fallback");
            let err = String::from_utf8_lossy(&cuda.stderr);
            assert_eq!(cuda.status.code(), Some(1), "{err}");
            assert!(err.contains("cuda:0 is not usable"), "{err}");
            assert!(!err.contains("panicked"), "{err}");
            assert!(!out_cuda.join("adapter_config.json").exists());
            assert_eq!(
                auto_err.matches("no usable CUDA GPU").count(),
                1,
                "{auto_err}"
            );
            assert!(device.starts_with("cpu"), "{device}");
        }
        Ok(_) => {
            eprintln!("a usable GPU here: checking that both choices use it");
            assert!(
                cuda.status.success(),
                "{}",
                String::from_utf8_lossy(&cuda.stderr)
            );
            assert!(device.starts_with("cuda:0"), "{device}");
            assert!(!auto_err.contains("no usable CUDA GPU"), "{auto_err}");
        }
    }
}

#[test]
#[ignore = "needs a GPU: PHLORA_TEST_DEVICE=cuda cargo test -- --include-ignored"]
fn cpu_and_gpu_adapters_agree_on_reconstructions() {
    let _ = require_cuda(false);
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = fixture(dir.path(), DType::F32, fresh_seed("cpu-vs-gpu"), false);
    let mut reports = Vec::new();
    for (tag, device, tf32) in [
        ("cpu", phlora::backend::Device::Cpu, false),
        ("gpu-f32", phlora::backend::Device::Cuda(0), false),
        ("gpu-tf32", phlora::backend::Device::Cuda(0), true),
    ] {
        let out = dir.path().join(tag);
        // Rank 4 = the planted rank: the truncation is well determined (a wide gap to the
        // noise), so reconstructions can be compared across devices.
        let mut s = settings(&b, &f, &out, 4);
        s.device = device;
        s.cuda.tf32 = tf32;
        let report = extract(&s).unwrap();
        assert!(report
            .device
            .starts_with(if tag == "cpu" { "cpu" } else { "cuda:0" }));
        // The certificate is the truth about the files, on every device.
        let direct = direct_residuals(&b, &f, &out);
        for t in &report.tensors {
            if let (Some(res), Some(want)) = (t.residual, direct.get(&t.name)) {
                assert!(
                    (res - want).abs() < 1e-5 + 1e-4 * want,
                    "{tag} {}: {res} vs {want}",
                    t.name
                );
            }
        }
        reports.push((tag, out, report));
    }
    let products = |out: &Path| {
        let a = read_safetensors(&out.join("adapter_model.safetensors"));
        lora_modules()
            .into_iter()
            .map(|m| (m, lora_product(&a, m).0))
            .collect::<Vec<_>>()
    };
    let cpu = products(&reports[0].1);
    for (tag, out, _) in &reports[1..] {
        let tol = if *tag == "gpu-tf32" { 5e-3 } else { 1e-4 };
        for ((m, want), (_, got)) in cpu.iter().zip(products(out)) {
            let num: f64 = want.iter().zip(&got).map(|(x, y)| (x - y).powi(2)).sum();
            let den: f64 = want.iter().map(|x| x * x).sum();
            let rel = (num / den.max(1e-300)).sqrt();
            eprintln!("{tag} {m}: ‖BA − BA_cpu‖/‖BA_cpu‖ = {rel:.2e}");
            assert!(rel < tol, "{tag} {m}: reconstructions differ by {rel}");
        }
    }
}

// ---- memory bound ------------------------------------------------------------------------

#[test]
fn a_tight_max_ram_streams_big_matrices_in_row_blocks_with_the_same_result() {
    use phlora::extract::BASELINE_RAM;
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = fixture(dir.path(), DType::F32, fresh_seed("max-ram"), false);
    let free = extract(&settings(&b, &f, &dir.path().join("free"), 4)).unwrap();
    let mut s = settings(&b, &f, &dir.path().join("tight"), 4);
    // Room for the sketches of every matrix here, but not for the largest ΔW beside them.
    s.max_ram = Some(BASELINE_RAM + (20 << 10));
    let tight = extract(&s).unwrap();
    let blocked: Vec<&str> = tight
        .tensors
        .iter()
        .filter(|t| t.row_blocks.is_some())
        .map(|t| t.name.as_str())
        .collect();
    assert!(
        blocked.contains(&"model.embed_tokens.weight") && blocked.contains(&"lm_head.weight"),
        "{blocked:?}"
    );
    assert!(
        blocked.len() < tight.summary.lora,
        "some matrices still fit whole"
    );
    // Same seed, same sketch: the blocked SVD lands on the same factors up to rounding.
    for (x, y) in tight.tensors.iter().zip(&free.tensors) {
        assert_eq!(x.name, y.name);
        assert!(
            (x.delta_norm - y.delta_norm).abs() <= 1e-9 * y.delta_norm,
            "{}",
            x.name
        );
        if let (Some(a), Some(b)) = (x.residual, y.residual) {
            assert!((a - b).abs() <= 1e-4 * b + 1e-7, "{}: {a} vs {b}", x.name);
        }
    }
    // And its certificate is still the truth about the files.
    let direct = direct_residuals(&b, &f, &dir.path().join("tight"));
    for t in &tight.tensors {
        if let (Some(res), Some(want)) = (t.residual, direct.get(&t.name)) {
            assert!(
                (res - want).abs() < 1e-5 + 1e-4 * want,
                "{}: {res} vs {want}",
                t.name
            );
        }
    }
}

#[test]
fn a_max_ram_too_small_for_one_row_or_for_an_exact_svd_is_refused_before_writing() {
    use phlora::extract::BASELINE_RAM;
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = fixture(dir.path(), DType::F32, fresh_seed("max-ram-small"), false);
    let mut s = settings(&b, &f, &dir.path().join("out"), 4);
    s.max_ram = Some(BASELINE_RAM + 100);
    let err = assert_fails(&s, &["--max-ram", "too small", "needs at least"]);
    assert!(
        !dir.path().join("out").join("adapter_config.json").exists(),
        "{err}"
    );
    s.max_ram = Some(BASELINE_RAM + (20 << 10));
    s.svd.method = Method::Exact;
    assert_fails(&s, &["exact SVD needs it whole"]);
    let o = phlora_extract(&b, &f, &dir.path().join("cli"), &["--max-ram", "12X"]);
    let err = String::from_utf8_lossy(&o.stderr);
    // A malformed value is a usage error, refused by the argument parser before any work.
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'12X' for '--max-ram") && err.contains("expected a size"),
        "{err}"
    );
}

#[test]
fn a_bound_for_the_other_kind_of_memory_is_named_in_a_warning() {
    let (dir, b, f, _) = bad_pair("bounds", true);
    let out = dir.path().join("out");
    let o = phlora_extract(
        &b,
        &f,
        &out,
        &["-r", "4", "--device", "cpu", "--max-vram", "1G"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("--max-vram has no effect").count(), 1, "{err}");
}

// ---- scheduling ------------------------------------------------------------------------

/// The devices a scheduling test runs on: the CPU, and GPU 0 when PHLORA_TEST_DEVICE=cuda.
fn scheduling_devices() -> Vec<phlora::backend::Device> {
    let mut d = vec![phlora::backend::Device::Cpu];
    if test_cuda(true).is_some() {
        d.push(phlora::backend::Device::Cuda(0));
    }
    d
}

#[test]
fn tensors_in_flight_and_their_order_do_not_change_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = fixture(dir.path(), DType::BF16, fresh_seed("in-flight"), true);
    for device in scheduling_devices() {
        let run = |tag: &str, in_flight: usize, max_ram: Option<u64>| {
            let out = dir.path().join(format!("{device:?}-{tag}"));
            let mut s = settings(&b, &f, &out, 4);
            s.device = device;
            s.in_flight = Some(in_flight);
            s.max_ram = max_ram;
            let report = extract(&s).unwrap();
            let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
            (report, bytes)
        };
        let (one, one_bytes) = run("one", 1, None);
        // Three workers take the largest tensors first and finish in any order.
        let (three, three_bytes) = run("three", 3, None);
        assert_eq!(
            three.summary.workers.len(),
            3,
            "{:?}",
            three.summary.workers
        );
        let done: usize = three.summary.workers.iter().map(|w| w.tensors).sum();
        assert_eq!(done, one.summary.workers[0].tensors);
        // Workers on the CPU split the cores, so GEMMs may block differently: the file
        // layout must be identical, the values equal to rounding.
        let header = |bytes: &[u8]| {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            bytes[..8 + n].to_vec()
        };
        assert_eq!(
            header(&one_bytes),
            header(&three_bytes),
            "{device:?}: tensor layout"
        );
        for (x, y) in one.tensors.iter().zip(&three.tensors) {
            assert_eq!((&x.name, &x.action), (&y.name, &y.action));
            if let (Some(a), Some(b)) = (x.residual, y.residual) {
                assert!((a - b).abs() <= 1e-4 * b + 1e-7, "{}: {a} vs {b}", x.name);
            }
        }
        // The same workers twice: the same bytes, whatever the timing.
        let (_, again) = run("three-again", 3, None);
        assert!(again == three_bytes, "{device:?}: a rerun differs");
        // Under a bound the workers share it (and some matrices go in row blocks).
        if device == phlora::backend::Device::Cpu {
            let tight = Some(phlora::extract::BASELINE_RAM + (20 << 10));
            let (bounded, _) = run("three-bounded", 3, tight);
            assert!(bounded.tensors.iter().any(|t| t.row_blocks.is_some()));
        }
    }
}

#[test]
fn the_report_and_profile_say_where_the_time_went() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = fixture(dir.path(), DType::BF16, fresh_seed("profile"), false);
    let out = dir.path().join("out");
    let o = phlora_extract(
        &b,
        &f,
        &out,
        &[
            "-r",
            "4",
            "--device",
            "cpu",
            "--in-flight",
            "2",
            "--profile",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for stage in [
        "time breakdown",
        "read",
        "delta",
        "svd (randomized)",
        "residual",
        "idle",
        "write (writer thread)",
        "worker cpu #1",
        "slowest tensors",
    ] {
        assert!(err.contains(stage), "no `{stage}` in:\n{err}");
    }
    let report = read_json(&out.join("report.json"));
    let m = &report["summary"];
    let wall = m["seconds"].as_f64().unwrap();
    let workers = m["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    // Each worker's busy + idle time is its share of the wall time.
    for w in workers {
        let total = w["busy_seconds"].as_f64().unwrap() + w["idle_seconds"].as_f64().unwrap();
        assert!(total <= wall * 1.001 + 1e-3, "{w} vs wall {wall}");
        assert!(total >= 0.5 * wall, "{w} vs wall {wall}");
    }
    let st = &m["stages"];
    let svd = st["svd_randomized"].as_f64().unwrap();
    assert!(svd > 0.0, "{st}");
    // Per-tensor stages add up to no more than the tensor's time.
    for t in report["tensors"].as_array().unwrap() {
        let s = &t["stages"];
        let sum: f64 = [
            "read",
            "h2d",
            "delta",
            "svd_randomized",
            "svd_exact",
            "factor",
            "residual",
            "d2h",
        ]
        .iter()
        .map(|k| s[*k].as_f64().unwrap())
        .sum();
        assert!(sum <= t["seconds"].as_f64().unwrap() + 1e-6, "{t}");
    }
}

#[test]
fn device_lists_and_in_flight_are_validated() {
    let (dir, b, f, _) = bad_pair("device-lists", false);
    for (args, want) in [
        (
            vec!["--device", "cpu", "--devices", "0"],
            "--devices selects GPUs",
        ),
        (vec!["--device", "cuda:1", "--devices", "0"], "disagree"),
        (vec!["--devices", "0,0"], "lists GPU 0 twice"),
        (vec!["--in-flight", "0"], "--in-flight must be at least 1"),
        (vec!["--devices", "x"], "--devices"),
    ] {
        let out = dir.path().join("out");
        let o = phlora_extract(&b, &f, &out, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.join("adapter_config.json").exists());
    }
}

#[test]
fn the_input_floor_reads_every_byte_of_both_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = fixture(dir.path(), DType::F16, fresh_seed("floor"), true);
    let o = phlora(&[
        "floor",
        "--base",
        b.to_str().unwrap(),
        "--ft",
        f.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("input floor:"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Every tensor of both checkpoints, f16: 2 bytes per element each.
    let (base, _) = fixture_tensors(DType::F16, 0);
    let elements: usize = base.iter().map(|t| t.3.len()).sum();
    assert_eq!(
        r["bytes"].as_u64().unwrap() as usize,
        2 * 2 * elements,
        "{r}"
    );
    assert_eq!(r["tensors"].as_u64().unwrap() as usize, base.len(), "{r}");
    assert!(r["seconds"].as_f64().unwrap() > 0.0);
    // A bad path is named.
    let o = phlora(&[
        "floor",
        "--base",
        "/nonexistent/base",
        "--ft",
        f.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent/base"), "{err}");
}
