//! GGUF LoRA for llama.cpp (`extract --target llama.cpp`, `convert --to gguf`): the file read
//! back with phlora's GGUF reader and checked against the PEFT adapter it comes from, read
//! with the safetensors crate: llama.cpp's metadata, names, shapes, and per module that
//! llama.cpp's update (scale = alpha / rank, 1 for alpha 0) · lora_b · lora_a equals PEFT's
//! scaling · B·A with Q/K rows permuted as llama.cpp's converter permutes the base's.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use phlora::gguf::{self, TensorType, Value};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tensor of the GGUF as a row-major matrix [ne1, ne0].
struct GgufMatrix {
    rows: usize,
    cols: usize,
    values: Vec<f32>,
    dtype: TensorType,
}

fn read_gguf(path: &Path) -> (gguf::File, HashMap<String, GgufMatrix>) {
    let bytes = std::fs::read(path).unwrap();
    let file = gguf::parse(&bytes).unwrap();
    let mut out = HashMap::new();
    for t in &file.tensors {
        assert_eq!(t.ne.len(), 2, "{}: LoRA factors are 2-D", t.name);
        let data = file.data(&bytes, t);
        let mut values = Vec::new();
        match t.dtype {
            TensorType::Q8_0 => gguf::decode_q8_0(data, &mut values),
            other => {
                let d = match other {
                    TensorType::F32 => phlora::checkpoint::DType::F32,
                    TensorType::F16 => phlora::checkpoint::DType::F16,
                    _ => phlora::checkpoint::DType::BF16,
                };
                values = vec![0f32; data.len() / d.size()];
                phlora::checkpoint::dtype::decode_into(d, data, &mut values);
            }
        }
        let (cols, rows) = (t.ne[0] as usize, t.ne[1] as usize);
        assert_eq!(values.len(), rows * cols);
        out.insert(
            t.name.clone(),
            GgufMatrix {
                rows,
                cols,
                values,
                dtype: t.dtype,
            },
        );
    }
    (file, out)
}

fn string(f: &gguf::File, key: &str) -> String {
    match f.get(key) {
        Some(Value::String(s)) => s.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

/// PEFT's `get_pattern_key` for phlora's escaped full-path keys and plain suffix keys.
fn pattern<T: Copy>(
    patterns: Option<&serde_json::Value>,
    module: &str,
    f: fn(&serde_json::Value) -> T,
) -> Option<T> {
    let map = patterns?.as_object()?;
    map.iter().find_map(|(k, v)| {
        let key = k.replace("\\.", ".");
        (module == key || module.ends_with(&format!(".{key}"))).then(|| f(v))
    })
}

/// llama.cpp's converter (`LlamaModel.permute`): W.reshape(h, 2, d/2, …).swapaxes(1, 2):
/// row (hh, i, j) of the result is row (hh, j, i) of W.
fn permuted_rows(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads;
    let mut order = Vec::with_capacity(rows);
    for hh in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                order.push(hh * d + j * (d / 2) + i);
            }
        }
    }
    order
}

/// The GGUF's module names for the synth pair's HF modules.
fn gguf_name(module: &str) -> Option<String> {
    let map = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    match module {
        "model.embed_tokens" => return Some("token_embd.weight".into()),
        "lm_head" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, proj) = rest.split_once('.')?;
    let (_, g) = map.iter().find(|(hf, _)| *hf == proj)?;
    Some(format!("blk.{layer}.{g}.weight"))
}

/// What a conversion reported leaving out (`gguf` in report.json, or convert --json).
fn left_out_names(export: &serde_json::Value) -> Vec<String> {
    export["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect()
}

/// How a GGUF is expected to look.
struct Expect<'a> {
    arch: &'a str,
    /// Q and K heads of the row permutation (None: not permuted).
    heads: Option<(usize, usize)>,
    /// Parameters the conversion reported leaving out.
    left_out: Vec<String>,
    tol: f64,
}

/// Checks every module of the PEFT adapter in `adapter` against the GGUF at `path`: each is
/// in the GGUF (its update PEFT's) or reported left out. Returns the modules in the GGUF,
/// the worst relative error, and the largest rank written.
fn check_against_peft(adapter: &Path, path: &Path, x: &Expect) -> (Vec<String>, f64, usize) {
    let config = read_json(&adapter.join("adapter_config.json"));
    let st = read_safetensors(&adapter.join("adapter_model.safetensors"));
    let (file, tensors) = read_gguf(path);
    assert_eq!(string(&file, "general.type"), "adapter");
    assert_eq!(string(&file, "adapter.type"), "lora");
    assert_eq!(string(&file, "general.architecture"), x.arch);
    assert_eq!(
        file.get("adapter.lora.alpha"),
        Some(&Value::F32(0.0)),
        "FLOAT32, scale 1"
    );
    let (r0, alpha0) = (
        config["r"].as_u64().unwrap() as usize,
        config["lora_alpha"].as_f64().unwrap(),
    );
    let rslora = config["use_rslora"].as_bool().unwrap_or(false);
    let mut found = Vec::new();
    let (mut worst, mut largest) = (0f64, 0usize);
    for (key, a) in &st {
        let (module, b_key, embedding) = if let Some(m) = key.strip_suffix(".lora_A.weight") {
            (m, format!("{m}.lora_B.weight"), false)
        } else if let Some(m) = key.strip_suffix(".lora_embedding_A") {
            (m, format!("{m}.lora_embedding_B"), true)
        } else {
            continue;
        };
        let b = &st[&b_key];
        let module = module.strip_prefix("base_model.model.").unwrap();
        let name = gguf_name(module).unwrap_or_else(|| panic!("{module}: no GGUF name"));
        let (Some(la), Some(lb)) = (
            tensors.get(&format!("{name}.lora_a")),
            tensors.get(&format!("{name}.lora_b")),
        ) else {
            assert!(
                x.left_out.contains(&format!("{module}.weight")),
                "{module} is neither in the GGUF nor reported left out"
            );
            continue;
        };
        found.push(name.clone());
        let r = pattern(config.get("rank_pattern"), module, |v| {
            v.as_u64().unwrap() as usize
        })
        .unwrap_or(r0);
        let alpha =
            pattern(config.get("alpha_pattern"), module, |v| v.as_f64().unwrap()).unwrap_or(alpha0);
        let scaling = alpha / if rslora { (r as f64).sqrt() } else { r as f64 };
        // PEFT's update in the base weight's orientation [out, in] (an embedding: [vocab, embd]).
        let (ra, ca) = (a.shape[0], a.shape[1]);
        let (rb, cb) = (b.shape[0], b.shape[1]);
        assert_eq!(ra, cb);
        let ba = |i: usize, j: usize| -> f64 {
            (0..ra)
                .map(|k| b.values[i * cb + k] as f64 * a.values[k * ca + j] as f64)
                .sum::<f64>()
                * scaling
        };
        let (out, inn) = if embedding { (ca, rb) } else { (rb, ca) };
        let peft = |i: usize, j: usize| if embedding { ba(j, i) } else { ba(i, j) };
        let order: Vec<usize> = match x.heads {
            Some((q, _)) if name.contains("attn_q") => permuted_rows(out, q),
            Some((_, k)) if name.contains("attn_k") => permuted_rows(out, k),
            _ => (0..out).collect(),
        };
        // llama-adapter.cpp's shape checks, and the product it applies.
        let rank = lb.cols; // b->ne[0]
        largest = largest.max(rank);
        if embedding {
            assert_eq!(
                (la.rows, la.cols),
                (out, rank),
                "{name}: lora_a is [vocab, r]"
            );
            assert_eq!(
                (lb.rows, lb.cols),
                (inn, rank),
                "{name}: lora_b is [embd, r]"
            );
        } else {
            assert_eq!(
                (la.rows, la.cols),
                (rank, inn),
                "{name}: lora_a ne = [in, r]"
            );
            assert_eq!(
                (lb.rows, lb.cols),
                (out, rank),
                "{name}: lora_b ne = [r, out]"
            );
        }
        let (mut diff, mut norm) = (0f64, 0f64);
        for (i, &src) in order.iter().enumerate() {
            for j in 0..inn {
                let got: f64 = (0..rank)
                    .map(|k| {
                        if embedding {
                            la.values[i * rank + k] as f64 * lb.values[j * rank + k] as f64
                        } else {
                            lb.values[i * rank + k] as f64 * la.values[k * inn + j] as f64
                        }
                    })
                    .sum();
                let want = peft(src, j);
                diff += (got - want).powi(2);
                norm += want.powi(2);
            }
        }
        let rel = (diff / norm.max(1e-30)).sqrt();
        assert!(
            rel < x.tol,
            "{name} ({:?}): llama.cpp's update differs from PEFT's by {rel:.2e}",
            la.dtype
        );
        worst = worst.max(rel);
    }
    assert_eq!(
        2 * found.len(),
        tensors.len(),
        "every GGUF pair is a module of the adapter"
    );
    found.sort();
    (found, worst, largest)
}

fn llama(left_out: Vec<String>, tol: f64) -> Expect<'static> {
    Expect {
        arch: "llama",
        heads: Some((4, 2)),
        left_out,
        tol,
    }
}

/// `phlora convert ADAPTER --to gguf --base BASE [--out OUT] --quiet --json EXTRA…`.
fn convert_with(
    adapter: &Path,
    base: &Path,
    out: Option<&Path>,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "convert",
        adapter.to_str().unwrap(),
        "--to",
        "gguf",
        "--base",
        base.to_str().unwrap(),
        "--quiet",
        "--json",
    ];
    if let Some(out) = out {
        args.extend(["--out", out.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    phlora(&args)
}

fn convert(adapter: &Path, base: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    convert_with(adapter, base, Some(out), extra)
}

/// The names in `dir` that contain `part` (a file, or a temporary file beside it).
fn named_like(dir: &Path, part: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect()
}

fn export_of(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn extract_for_llama_cpp_writes_a_gguf_whose_updates_are_pefts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pair");
    synth_pair(&root, "gguf-energy", 64, 2);
    let out = dir.path().join("ad");
    let o = extract_cmd(
        &root,
        &out,
        &[
            "--energy",
            "0.9",
            "--max-rank",
            "16",
            "--target",
            "llama.cpp",
        ],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("left out: 5 norms"), "{err}");
    assert!(
        err.matches("WARN").count() == 1 && err.contains("of its ‖ΔW‖²"),
        "one warning: {err}"
    );
    let config = read_json(&out.join("adapter_config.json"));
    assert!(
        config["rank_pattern"]
            .as_object()
            .is_some_and(|p| !p.is_empty()),
        "per-module ranks"
    );
    let report = read_json(&out.join("report.json"));
    let left = report["gguf"]["left_out"].as_array().unwrap();
    assert_eq!(left.len(), 5);
    assert!(left
        .iter()
        .all(|l| l["reason"] == "norm" && l["sq_norm"].as_f64().unwrap() > 0.0));
    let x = llama(left_out_names(&report["gguf"]), 1e-5);
    let (found, _, _) = check_against_peft(&out, &out.join("adapter.gguf"), &x);
    // 2 layers × 7 projections, the embedding and the (untied) head.
    assert_eq!(found.len(), 16, "{found:?}");
    assert!(found.contains(&"token_embd.weight".into()) && found.contains(&"output.weight".into()));

    // Another scale per module: the GGUF keeps each one exactly (llama.cpp's converter would
    // write one alpha for all).
    let edited = dir.path().join("edited");
    copy_files(&out, &edited, false);
    std::fs::remove_file(edited.join("adapter.gguf")).unwrap();
    let mut c = read_json(&edited.join("adapter_config.json"));
    c["lora_alpha"] = 24.0.into();
    c["use_rslora"] = true.into();
    c["alpha_pattern"] =
        serde_json::json!({ "model\\.layers\\.1\\.mlp\\.down_proj": 3.0, "q_proj": 40.0 });
    std::fs::write(edited.join("adapter_config.json"), c.to_string()).unwrap();
    for (t, tol) in [("f32", 1e-5), ("f16", 3e-3), ("bf16", 2e-2), ("q8_0", 3e-2)] {
        let path = dir.path().join(format!("edited-{t}.gguf"));
        let export = export_of(&convert(&edited, &root.join("base"), &path, &["--type", t]));
        let x = llama(left_out_names(&export), tol);
        let (found, worst, _) = check_against_peft(&edited, &path, &x);
        assert_eq!(found.len(), 16, "{t}");
        assert!(worst > 0.0 || t == "f32", "{t}: a cast shows");
        // q8_0 needs ne[0] a multiple of 32: the others are f16, and counted.
        let (file, tensors) = read_gguf(&path);
        let off_block = file.tensors.iter().filter(|i| i.ne[0] % 32 != 0).count();
        let as_f16 = tensors
            .values()
            .filter(|m| m.dtype == TensorType::F16)
            .count();
        if t == "q8_0" {
            assert!(off_block > 0 && off_block < file.tensors.len());
            assert_eq!(export["f16_fallbacks"].as_u64(), Some(off_block as u64));
            assert_eq!(as_f16, off_block);
        } else {
            assert_eq!(export["f16_fallbacks"].as_u64(), Some(0), "{t}");
        }
    }
}

#[test]
fn a_tied_base_gets_no_embedding_or_head_lora_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pair");
    synth_pair_with(&root, "gguf-tied", 64, 1, &["--tie-embeddings"]);
    let out = dir.path().join("ad");
    let o = extract_cmd(
        &root,
        &out,
        &["--rank", "8", "--target", "llama.cpp", "--no-norms"],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("embedding LoRA on a tied base"), "{err}");
    let report = read_json(&out.join("report.json"));
    let x = llama(left_out_names(&report["gguf"]), 1e-5);
    let (found, _, _) = check_against_peft(&out, &out.join("adapter.gguf"), &x);
    assert_eq!(found.len(), 7, "the projections only: {found:?}");
    let left = report["gguf"]["left_out"].as_array().unwrap();
    assert!(
        left.iter()
            .any(|l| l["reason"] == "tied_embedding" && l["sq_norm"].as_f64().unwrap() > 0.0),
        "{left:?}"
    );
}

#[test]
fn other_families_padded_ranks_and_gemmas_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pair");
    synth_pair(&root, "gguf-families", 64, 1);
    // --target portable zero-pads every module to one rank: the GGUF drops the padding.
    let out = dir.path().join("portable");
    let o = extract_pair(
        &root,
        &out,
        &[
            "--energy",
            "0.8",
            "--max-rank",
            "32",
            "--portable",
            "--no-norms",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_json(&out.join("adapter_config.json"))["r"]
        .as_u64()
        .unwrap() as usize;
    let path = dir.path().join("portable.gguf");
    let export = export_of(&convert(&out, &root.join("base"), &path, &[]));
    let (found, _, largest) =
        check_against_peft(&out, &path, &llama(left_out_names(&export), 1e-5));
    assert_eq!(found.len(), 9);
    assert!(
        largest < r,
        "zero components dropped: rank {largest} written of r = {r}"
    );

    // The same factors on a Qwen2 base: llama.cpp's qwen2 rows are not permuted.
    let as_base = |class: &str, tie: bool| {
        let d = dir.path().join(class);
        std::fs::create_dir_all(&d).unwrap();
        let mut c = read_json(&root.join("base/config.json"));
        c["architectures"] = serde_json::json!([class]);
        c["tie_word_embeddings"] = tie.into();
        std::fs::write(d.join("config.json"), c.to_string()).unwrap();
        d
    };
    let path = dir.path().join("qwen2.gguf");
    let export = export_of(&convert(
        &out,
        &as_base("Qwen2ForCausalLM", false),
        &path,
        &[],
    ));
    assert_eq!(export["architecture"], "qwen2");
    let x = Expect {
        arch: "qwen2",
        heads: None,
        left_out: left_out_names(&export),
        tol: 1e-5,
    };
    assert_eq!(check_against_peft(&out, &path, &x).0.len(), 9);
    // Gemma: llama.cpp's output is token_embd even untied, so neither head nor embedding LoRA.
    let path = dir.path().join("gemma.gguf");
    let export = export_of(&convert(
        &out,
        &as_base("GemmaForCausalLM", false),
        &path,
        &[],
    ));
    let mut reasons: Vec<&str> = export["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["tied_embedding", "tied_head"], "{export}");
    let x = Expect {
        arch: "gemma",
        heads: None,
        left_out: left_out_names(&export),
        tol: 1e-5,
    };
    assert_eq!(check_against_peft(&out, &path, &x).0.len(), 7);
}

#[test]
fn what_llama_cpp_cannot_take_is_refused_before_any_work_or_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pair");
    synth_pair(&root, "gguf-refuse", 32, 1);
    // An architecture llama.cpp's names are not known for: refused before the extraction.
    let other = dir.path().join("other");
    copy_files(&root.join("base"), &other.join("base"), false);
    copy_files(&root.join("ft"), &other.join("ft"), false);
    let mut c = read_json(&other.join("base/config.json"));
    c["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    std::fs::write(other.join("base/config.json"), c.to_string()).unwrap();
    let out = dir.path().join("refused");
    let o = extract_pair(&other, &out, &["--rank", "4", "--target", "llama.cpp"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("FalconForCausalLM") && stderr(&o).contains("LlamaForCausalLM"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "nothing written");
    for bad in [
        &["--shard", "1/2"][..],
        &["--gguf-type", "f16", "--target", "peft"],
    ] {
        let args = [&["--rank", "4", "--target", "llama.cpp"][..], bad].concat();
        let o = extract_pair(&root, &dir.path().join("x"), &args, &[]);
        assert_ne!(o.status.code(), Some(0), "{bad:?}");
    }

    let ad = dir.path().join("ad");
    let o = extract_pair(&root, &ad, &["--rank", "4"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let base = root.join("base");
    let o = convert_with(&ad, &base, None, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        ad.join("adapter.gguf").exists(),
        "ADAPTER/adapter.gguf by default"
    );
    let o = convert_with(&ad, &base, None, &[]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "an existing file is not replaced without --force"
    );
    assert!(stderr(&o).contains("--force"));
    assert!(convert_with(&ad, &base, None, &["--force"])
        .status
        .success());
    // A scale f16 cannot hold, found while the file is written: an error naming the module,
    // and neither the file nor its temporary file is left.
    let huge = dir.path().join("huge");
    copy_files(&ad, &huge, false);
    let mut c = read_json(&huge.join("adapter_config.json"));
    c["lora_alpha"] = 1e9.into();
    std::fs::write(huge.join("adapter_config.json"), c.to_string()).unwrap();
    let target = dir.path().join("h.gguf");
    let o = convert(&huge, &base, &target, &["--type", "f16"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("beyond f16's range") && stderr(&o).contains("lora_b"),
        "{}",
        stderr(&o)
    );
    let left = named_like(dir.path(), "h.gguf");
    assert!(left.is_empty(), "{left:?}");
    // An interrupted writer's temporary file (its process gone) is removed by the next.
    let stale = dir.path().join(".h.gguf.partial-4000000");
    std::fs::write(&stale, b"half").unwrap();
    let o = convert(&huge, &base, &target, &["--type", "bf16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stale.exists() && target.exists());
    // A base of another size: a clear error, no file, no temporary file.
    let wrong = dir.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    let mut c = read_json(&base.join("config.json"));
    c["hidden_size"] = 48.into();
    std::fs::write(wrong.join("config.json"), c.to_string()).unwrap();
    let target = dir.path().join("w.gguf");
    let o = convert(&ad, &wrong, &target, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("hidden_size 48"), "{}", stderr(&o));
    let left = named_like(dir.path(), "w.gguf");
    assert!(left.is_empty(), "{left:?}");
    // A rerun as --target peft removes the GGUF of the older factors.
    let o = extract_pair(&root, &ad, &["--rank", "4", "--force"], &[]);
    assert!(o.status.success());
    assert!(
        !ad.join("adapter.gguf").exists(),
        "a stale adapter.gguf would not match the new factors"
    );
}
