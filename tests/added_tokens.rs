//! `--added-tokens`: a fine-tune whose vocabulary grew. The LoRA covers the rows both share,
//! its factors are shaped for the resized model (zero on the new rows), the new rows are
//! written whole to added_tokens.safetensors, and verify reads the pair as the resized model.
//! Without the option a grown vocabulary is an error that names the tensor.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use faer::Mat;
use phlora::checkpoint::DType;
use phlora::extract::{extract, ExtractSettings};

const R: usize = 4;
const H: usize = 16;
const V: usize = 40;
const NEW: usize = 3;

/// Which checkpoints store lm_head (the others tie it to the embeddings).
#[derive(Clone, Copy, PartialEq)]
enum Heads {
    Both,
    Neither,
    /// The base ties; the fine-tune stores its own (untied while fine-tuning).
    FineTuneOnly,
}

/// A llama-like pair whose fine-tune has NEW more vocabulary rows: the shared rows change by
/// a rank-3 part plus noise, the new rows are fresh values.
fn write_pair(root: &Path, heads: Heads, seed: u64) -> (PathBuf, PathBuf) {
    let mut base = Vec::new();
    let mut ft = Vec::new();
    let push = |name: &str, rows_ft: usize, sd: u64, grows: bool| {
        let rows_base = if grows { V } else { rows_ft };
        let b = normal(rows_base * H, sd);
        let d = to_row_major_f32(&spectrum_matrix(
            rows_base,
            H,
            &[1.0, 0.5, 0.25],
            1e-4,
            sd + 1,
        ));
        let mut f: Vec<f32> = b.iter().zip(&d).map(|(x, y)| x + y).collect();
        f.extend(normal((rows_ft - rows_base) * H, sd + 2));
        (
            tensor(name, DType::F32, &[rows_base, H], b),
            tensor(name, DType::F32, &[rows_ft, H], f),
        )
    };
    let (b, f) = push("model.embed_tokens.weight", V + NEW, seed, true);
    base.push(b);
    ft.push(f);
    let (b, f) = push(
        "model.layers.0.self_attn.q_proj.weight",
        H,
        seed + 10,
        false,
    );
    base.push(b);
    ft.push(f);
    match heads {
        Heads::Both => {
            let (b, f) = push("lm_head.weight", V + NEW, seed + 20, true);
            base.push(b);
            ft.push(f);
        }
        Heads::FineTuneOnly => {
            // Untied while fine-tuning: the base's embedding plus its own low-rank change.
            let d = to_row_major_f32(&spectrum_matrix(V, H, &[1.0, 0.5, 0.25], 1e-4, seed + 21));
            let mut f: Vec<f32> = base[0].3.iter().zip(&d).map(|(x, y)| x + y).collect();
            f.extend(normal(NEW * H, seed + 22));
            ft.push(tensor("lm_head.weight", DType::F32, &[V + NEW, H], f));
        }
        Heads::Neither => {}
    }
    let config = |tied: bool| {
        serde_json::json!({
            "model_type": "llama", "hidden_size": H, "architectures": ["LlamaForCausalLM"],
            "tie_word_embeddings": tied
        })
    };
    let (bd, fd) = (root.join("base"), root.join("ft"));
    for (dir, t, tied) in [
        (&bd, &base, heads != Heads::Both),
        (&fd, &ft, heads == Heads::Neither),
    ] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), config(tied).to_string()).unwrap();
        write_single(&dir.join("model.safetensors"), t);
    }
    std::fs::write(fd.join("tokenizer.json"), r#"{"added_tokens": ["<new>"]}"#).unwrap();
    (bd, fd)
}

fn settings(b: &Path, f: &Path, out: &Path, added: bool) -> ExtractSettings {
    let mut st = cpu_settings(b, f, out, R);
    st.plan.added_tokens = added;
    st
}

/// ΔW on the shared rows and the adapter's update there, for a [vocab, dim] matrix whose
/// factors are `(rows of the update) = f(i, j)`; the update's new rows must be exactly zero.
fn check_update(name: &str, d: Mat<f64>, update: impl Fn(usize, usize) -> f64) {
    let u = Mat::from_fn(V, H, &update);
    let best = optimum(&singular_values(&d), R);
    let err = (&d - &u).norm_l2() / d.norm_l2();
    assert!(
        err <= 1.01 * best + 1e-5,
        "{name}: {err} vs the rank-{R} optimum {best}"
    );
    for i in V..V + NEW {
        for j in 0..H {
            assert_eq!(update(i, j), 0.0, "{name}: new row {i} must have no update");
        }
    }
}

/// (B·A)[i, j] of a linear LoRA: A [r, in], B [out, r].
fn lora_product<'a>(a: &'a Loaded, b: &'a Loaded) -> impl Fn(usize, usize) -> f64 + 'a {
    let (r, cols) = (a.shape[0], a.shape[1]);
    move |i, j| {
        (0..r)
            .map(|k| f64::from(b.values[i * r + k]) * f64::from(a.values[k * cols + j]))
            .sum()
    }
}

fn delta(base: &Loaded, ft: &Loaded) -> Mat<f64> {
    Mat::from_fn(V, H, |i, j| {
        f64::from(ft.values[i * H + j]) - f64::from(base.values[i * H + j])
    })
}

/// merge writes the resized model: the base's rows plus the update, then the added rows (plus
/// their update, zero), in a header rewritten for the new shapes; config.json says the new
/// vocabulary. Checked with the safetensors crate and against base + adapter (verify).
fn merge_and_check(root: &Path, b: &Path, f: &Path, out: &Path) -> serde_json::Value {
    let merged = root.join("merged");
    merge_ok(b, out, &merged);
    let m = read_safetensors(&merged.join("model.safetensors"));
    let ftt = read_safetensors(&f.join("model.safetensors"));
    for (name, t) in &ftt {
        let mt = m
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the merged model"));
        assert_eq!(mt.shape, t.shape, "{name}");
        if t.shape[0] == V + NEW {
            // The new rows are the fine-tune's, exactly (f32 throughout).
            assert_eq!(mt.values[V * H..], t.values[V * H..], "{name}");
        }
    }
    let v = verify_pair(b, &merged, out).unwrap();
    assert_lora_within(&v, 1e-5, "");
    assert!(merged.join("tokenizer.json").is_file());
    let cfg = read_json(&merged.join("config.json"));
    assert_eq!(cfg["vocab_size"], V + NEW, "{cfg}");
    cfg
}

#[test]
fn a_grown_vocabulary_is_an_error_that_names_the_tensor_and_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), Heads::Both, fresh_seed("grown-error"));
    let out = dir.path().join("adapter");
    let err = extract(&settings(&b, &f, &out, false))
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.embed_tokens.weight"), "{err}");
    assert!(err.contains("--added-tokens"), "{err}");
    assert!(err.contains("grew by 3 rows"), "{err}");
    assert!(!out.join("adapter_config.json").exists());
}

#[test]
fn untied_vocabulary_grown_in_both_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), Heads::Both, fresh_seed("grown-untied"));
    let out = dir.path().join("adapter");
    extract(&settings(&b, &f, &out, true)).unwrap();

    let (bt, ftt) = (
        read_safetensors(&b.join("model.safetensors")),
        read_safetensors(&f.join("model.safetensors")),
    );
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    // The embedding: lora_embedding_A [r, V+NEW], B [dim, r]; ΔE = (B·A)ᵀ.
    let emb = "model.embed_tokens.weight";
    let a = &factors["base_model.model.model.embed_tokens.lora_embedding_A"];
    let bb = &factors["base_model.model.model.embed_tokens.lora_embedding_B"];
    assert_eq!(
        (a.shape.clone(), bb.shape.clone()),
        (vec![R, V + NEW], vec![H, R])
    );
    let ba = lora_product(a, bb);
    check_update(emb, delta(&bt[emb], &ftt[emb]), |i, j| ba(j, i));
    // lm_head: A [r, dim], B [V+NEW, r]; ΔW = B·A.
    let head = "lm_head.weight";
    let a = &factors["base_model.model.lm_head.lora_A.weight"];
    let bb = &factors["base_model.model.lm_head.lora_B.weight"];
    assert_eq!(
        (a.shape.clone(), bb.shape.clone()),
        (vec![R, H], vec![V + NEW, R])
    );
    check_update(head, delta(&bt[head], &ftt[head]), lora_product(a, bb));

    // The new rows, exactly, under the checkpoint names; the vocabulary sizes in the metadata.
    let path = out.join("added_tokens.safetensors");
    let added = read_safetensors(&path);
    assert_eq!(added.len(), 2, "{:?}", added.keys().collect::<Vec<_>>());
    for name in [emb, head] {
        assert_eq!(added[name].shape, vec![NEW, H]);
        assert_eq!(added[name].values, ftt[name].values[V * H..]);
    }
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["base_vocab_size"], V.to_string());
    assert_eq!(meta["vocab_size"], (V + NEW).to_string());
    // The fine-tune's tokenizer travels with the new rows.
    assert!(out.join("tokenizer.json").is_file());

    // verify reads base + added rows as the resized model: the new rows are exact, the shared
    // rows as good as the rank allows.
    let v = verify_pair(&b, &f, &out).unwrap();
    for name in [emb, head] {
        let t = v.tensors.iter().find(|t| t.name == name).unwrap();
        assert_eq!(t.shape, vec![V + NEW, H]);
        assert!(t.rel_error_delta < 1e-2, "{t:?}");
    }
    let report = read_json(&out.join("report.json"));
    let row = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == emb)
        .unwrap()
        .clone();
    assert!(
        row["reason"].as_str().unwrap().contains("adds 3 rows"),
        "{row}"
    );

    merge_and_check(dir.path(), &b, &f, &out);
}

/// verify notices added rows that are not the fine-tune's.
#[test]
fn verify_sees_wrong_added_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), Heads::Both, fresh_seed("grown-wrong"));
    let out = dir.path().join("adapter");
    extract(&settings(&b, &f, &out, true)).unwrap();
    let good = verify_pair(&b, &f, &out).unwrap();
    let path = out.join("added_tokens.safetensors");
    let mut added = read_safetensors(&path);
    for t in added.values_mut() {
        t.values.iter_mut().for_each(|x| *x = 0.0);
    }
    let tensors: Vec<_> = ["model.embed_tokens.weight", "lm_head.weight"]
        .iter()
        .map(|n| tensor(n, DType::F32, &added[*n].shape, added[*n].values.clone()))
        .collect();
    write_single(&path, &tensors);
    let bad = verify_pair(&b, &f, &out).unwrap();
    let err = |v: &phlora::verify::VerifyReport| {
        v.tensors
            .iter()
            .find(|t| t.name == "model.embed_tokens.weight")
            .unwrap()
            .rel_error_delta
    };
    assert!(
        err(&bad) > 10.0 * err(&good),
        "{} vs {}",
        err(&bad),
        err(&good)
    );

    // And without the file, verify says what is missing.
    std::fs::remove_file(&path).unwrap();
    let e = verify_pair(&b, &f, &out).unwrap_err().to_string();
    assert!(e.contains("added_tokens.safetensors"), "{e}");
}

/// Both tie: the embedding's new rows are written once; lm_head's LoRA is the embedding's
/// transposed, zero on the new rows.
#[test]
fn tied_vocabulary_grown() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), Heads::Neither, fresh_seed("grown-tied"));
    let out = dir.path().join("adapter");
    extract(&settings(&b, &f, &out, true)).unwrap();
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    let bb = &factors["base_model.model.lm_head.lora_B.weight"];
    assert_eq!(bb.shape, vec![V + NEW, R]);
    assert!(bb.values[V * R..].iter().all(|&x| x == 0.0));
    let added = read_safetensors(&out.join("added_tokens.safetensors"));
    assert_eq!(
        added.keys().collect::<Vec<_>>(),
        ["model.embed_tokens.weight"]
    );
    let v = verify_pair(&b, &f, &out).unwrap();
    let t = v
        .tensors
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap();
    assert!(t.rel_error_delta < 1e-2, "{t:?}");
    // Still tied: lm_head's LoRA is the embedding's, merged through it.
    let cfg = merge_and_check(dir.path(), &b, &f, &out);
    assert_eq!(cfg["tie_word_embeddings"], true, "{cfg}");
    let m = read_safetensors(&dir.path().join("merged/model.safetensors"));
    assert!(!m.contains_key("lm_head.weight"));
}

/// The base ties lm_head, the fine-tune stores its own with the new rows: lm_head's ΔW is
/// against the base's embedding, and both matrices' new rows are written.
#[test]
fn base_tied_fine_tune_untied_vocabulary_grown() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), Heads::FineTuneOnly, fresh_seed("grown-half"));
    let out = dir.path().join("adapter");
    extract(&settings(&b, &f, &out, true)).unwrap();
    let (bt, ftt) = (
        read_safetensors(&b.join("model.safetensors")),
        read_safetensors(&f.join("model.safetensors")),
    );
    let factors = read_safetensors(&out.join("adapter_model.safetensors"));
    let a = &factors["base_model.model.lm_head.lora_A.weight"];
    let bb = &factors["base_model.model.lm_head.lora_B.weight"];
    check_update(
        "lm_head.weight",
        delta(&bt["model.embed_tokens.weight"], &ftt["lm_head.weight"]),
        lora_product(a, bb),
    );
    let added = read_safetensors(&out.join("added_tokens.safetensors"));
    assert_eq!(
        added["lm_head.weight"].values,
        ftt["lm_head.weight"].values[V * H..]
    );
    let v = verify_pair(&b, &f, &out).unwrap();
    assert!(v.tensors.iter().any(|t| t.name == "lm_head.weight"));
    assert_lora_within(&v, 1e-2, "");
    // The merged model stores lm_head, untied: base embedding + lm_head's update, then the
    // fine-tune's new lm_head rows.
    let cfg = merge_and_check(dir.path(), &b, &f, &out);
    assert_eq!(cfg["tie_word_embeddings"], false, "{cfg}");
    let m = read_safetensors(&dir.path().join("merged/model.safetensors"));
    let d = Mat::from_fn(V, H, |i, j| {
        f64::from(m["lm_head.weight"].values[i * H + j])
            - f64::from(bt["model.embed_tokens.weight"].values[i * H + j])
    });
    let want = delta(&bt["model.embed_tokens.weight"], &ftt["lm_head.weight"]);
    let best = optimum(&singular_values(&want), R);
    assert!((&want - &d).norm_l2() / want.norm_l2() <= 1.01 * best + 1e-5);
}

/// A stale added_tokens.safetensors from an earlier run in OUT does not survive --force.
#[test]
fn overwriting_removes_stale_added_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = write_pair(dir.path(), Heads::Both, fresh_seed("grown-stale"));
    let out = dir.path().join("adapter");
    extract(&settings(&b, &f, &out, true)).unwrap();
    assert!(out.join("added_tokens.safetensors").is_file());
    // Same vocabulary now: the fine-tune is the base with one layer changed.
    let mut st = settings(&b, &b, &out, true);
    st.ft = dir.path().join("ft2");
    std::fs::create_dir_all(&st.ft).unwrap();
    let mut t: Vec<_> = read_safetensors(&b.join("model.safetensors"))
        .into_iter()
        .map(|(n, l)| {
            let v = if n.contains("q_proj") {
                l.values.iter().map(|x| x + 0.1).collect()
            } else {
                l.values.clone()
            };
            tensor(&n, DType::F32, &l.shape, v)
        })
        .collect();
    t.sort_by(|x, y| x.0.cmp(&y.0));
    write_single(&st.ft.join("model.safetensors"), &t);
    std::fs::copy(b.join("config.json"), st.ft.join("config.json")).unwrap();
    st.overwrite = true;
    extract(&st).unwrap();
    assert!(!out.join("added_tokens.safetensors").exists());
}

#[test]
fn shapes_that_are_not_added_tokens_stay_errors() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fresh_seed("not-added");
    let cases: [(&str, [usize; 2], [usize; 2]); 3] = [
        ("model.embed_tokens.weight", [V, H], [V - 2, H]),
        ("model.embed_tokens.weight", [V, H], [V + 1, H + 1]),
        ("model.layers.0.mlp.up_proj.weight", [V, H], [V + 1, H]),
    ];
    for (k, (name, bs, fs)) in cases.iter().enumerate() {
        let root = dir.path().join(k.to_string());
        let (bd, fd) = (root.join("base"), root.join("ft"));
        write_single(
            &bd.join("model.safetensors"),
            &[tensor(
                name,
                DType::F32,
                bs,
                normal(bs[0] * bs[1], seed + k as u64),
            )],
        );
        write_single(
            &fd.join("model.safetensors"),
            &[tensor(
                name,
                DType::F32,
                fs,
                normal(fs[0] * fs[1], seed + 50 + k as u64),
            )],
        );
        let err = extract(&settings(&bd, &fd, &root.join("out"), true))
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains("in the base"), "{err}");
        assert!(!err.contains("--added-tokens"), "{err}");
    }
}

/// A sharded base that ties lm_head, a fine-tune that unties it and adds tokens: merge grows
/// the embedding's shard, appends lm_head to it, and updates the index (weight_map and
/// total_size) and the config; every shard reads back with the safetensors crate.
#[test]
fn sharded_base_merges_into_an_untied_resized_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (b1, f) = write_pair(dir.path(), Heads::FineTuneOnly, fresh_seed("grown-sharded"));
    let b = dir.path().join("base-sharded");
    let mut tensors: Vec<_> = read_safetensors(&b1.join("model.safetensors"))
        .into_iter()
        .map(|(n, l)| tensor(&n, DType::F32, &l.shape, l.values))
        .collect();
    tensors.sort_by(|x, y| x.0.cmp(&y.0));
    write_sharded(&b, &tensors, 1);
    let data: usize = tensors.iter().map(|t| 4 * t.3.len()).sum();
    let index_path = b.join("model.safetensors.index.json");
    let mut index = read_json(&index_path);
    index["metadata"]["total_size"] = data.into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    std::fs::copy(b1.join("config.json"), b.join("config.json")).unwrap();

    let out = dir.path().join("adapter");
    extract(&settings(&b, &f, &out, true)).unwrap();
    let merged = dir.path().join("merged");
    merge_ok(&b, &out, &merged);
    let index = read_json(&merged.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map["lm_head.weight"], map["model.embed_tokens.weight"]);
    let mut shards: Vec<_> = map.values().map(|v| v.as_str().unwrap()).collect();
    shards.sort();
    shards.dedup();
    let total: usize = shards
        .iter()
        .map(|s| {
            let bytes = std::fs::read(merged.join(s)).unwrap();
            let (n, _) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            bytes.len() - 8 - n
        })
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(total, data + (NEW * H + (V + NEW) * H) * 4);
    let cfg = read_json(&merged.join("config.json"));
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["vocab_size"], V + NEW);
    let v = verify_pair(&b, &merged, &out).unwrap();
    assert!(v.tensors.iter().any(|t| t.name == "lm_head.weight"));
    assert_lora_within(&v, 1e-5, "");
}
