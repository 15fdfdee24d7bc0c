//! Where phlora meets other tools: models named by Hugging Face id from the local hub cache,
//! and `phlora check`, the pre-flight check of an adapter against each engine's loading rules.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use phlora::checkpoint::DType;

const COMMIT_BASE: &str = "1111111111111111111111111111111111111111";
const COMMIT_FT: &str = "2222222222222222222222222222222222222222";

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Puts the model folder `model` into the hub cache `cache` as `models--org--NAME`, the way
/// the hub writes it: files as blobs with relative symlinks (`linked`) or as copies, and
/// `refs/main` naming the commit.
fn cache_model(cache: &Path, model: &Path, name: &str, commit: &str, linked: bool) -> PathBuf {
    let repo = cache.join(format!("models--org--{name}"));
    let snap = repo.join("snapshots").join(commit);
    fs::create_dir_all(&snap).unwrap();
    fs::create_dir_all(repo.join("blobs")).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), commit).unwrap();
    for e in fs::read_dir(model).unwrap().flatten() {
        let file = e.file_name();
        if linked {
            let blob = format!("blob-{}", file.to_string_lossy());
            fs::copy(e.path(), repo.join("blobs").join(&blob)).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(&file)).unwrap();
        } else {
            fs::copy(e.path(), snap.join(&file)).unwrap();
        }
    }
    snap
}

fn with_cache(cache: &Path, args: &[&str]) -> Output {
    phlora_cmd()
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .output()
        .unwrap()
}

#[test]
fn hub_ids_resolve_from_the_cache_and_name_the_base_in_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pair");
    synth_pair(&root, "hub_ids", 32, 1);
    let cache = tmp.path().join("hub");
    // The base through symlinks into blobs, the fine-tune as copies (a cache on a filesystem
    // without links).
    cache_model(&cache, &root.join("base"), "base", COMMIT_BASE, true);
    cache_model(&cache, &root.join("ft"), "ft", COMMIT_FT, false);

    let by_path = tmp.path().join("by-path");
    let o = extract_pair(&root, &by_path, &["-r", "4"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let by_id = tmp.path().join("by-id");
    let ft_id = format!("org/ft@{COMMIT_FT}");
    let o = with_cache(
        &cache,
        &[
            "extract",
            "--base",
            "org/base",
            "--ft",
            &ft_id,
            "--out",
            by_id.to_str().unwrap(),
            "-r",
            "4",
            "--device",
            "cpu",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The same factors, and the config names the base by id and commit.
    let weights = |d: &Path| fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(weights(&by_id) == weights(&by_path), "the factors differ");
    let config = read_json(&by_id.join("adapter_config.json"));
    assert_eq!(config["base_model_name_or_path"], "org/base");
    assert_eq!(config["revision"], COMMIT_BASE);
    let by_path_config = read_json(&by_path.join("adapter_config.json"));
    assert!(by_path_config["revision"].is_null());

    // Every other command that takes a model takes the id too.
    let o = with_cache(
        &cache,
        &["inspect", "org/ft", "--base", "org/base@main", "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = with_cache(
        &cache,
        &[
            "verify",
            "--base",
            "org/base",
            "--ft",
            "org/ft",
            "--adapter",
            by_id.to_str().unwrap(),
            "--min-cos",
            "0.5",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = tmp.path().join("merged");
    let o = with_cache(
        &cache,
        &[
            "merge",
            "--base",
            "org/base",
            "--adapter",
            by_id.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = with_cache(
        &cache,
        &[
            "analyze",
            "--base",
            "org/base",
            "--ft",
            "org/ft",
            "--out",
            tmp.path().join("analysis").to_str().unwrap(),
            "--device",
            "cpu",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_hub_id_the_cache_cannot_serve_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pair");
    synth_pair(&root, "hub_errors", 32, 1);
    let cache = tmp.path().join("hub");
    let snap = cache_model(&cache, &root.join("base"), "base", COMMIT_BASE, true);
    let out = tmp.path().join("out");
    let run = |base: &str| {
        with_cache(
            &cache,
            &[
                "extract",
                "--base",
                base,
                "--ft",
                root.join("ft").to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--device",
                "cpu",
            ],
        )
    };
    let refused = |o: &Output, needles: &[&str]| {
        let e = stderr(o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        for n in needles {
            assert!(e.contains(n), "missing {n:?} in: {e}");
        }
        assert!(!e.contains("panicked"), "{e}");
        assert!(!out.join("adapter_config.json").exists());
    };
    // Not in the cache: where it looked and the command that fetches it.
    refused(
        &run("org/missing"),
        &[
            "models--org--missing",
            "HF_HUB_CACHE",
            "hf download org/missing",
        ],
    );
    // A revision the cache does not have, and a ref naming a snapshot that is gone.
    refused(&run("org/base@v9"), &["revision `v9`"]);
    fs::write(cache.join("models--org--base/refs/old"), COMMIT_FT).unwrap();
    refused(&run("org/base@old"), &[COMMIT_FT, "not in the cache"]);
    // Neither a path nor an id.
    refused(&run("./no/such/base"), &["no such file", "ORG/NAME"]);
    // A broken link: a blob the snapshot points to went away.
    let weights: Vec<PathBuf> = fs::read_dir(&snap)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    let blob = fs::canonicalize(&weights[0]).unwrap();
    fs::remove_file(&blob).unwrap();
    refused(
        &run("org/base"),
        &[
            "incomplete",
            "broken link",
            &format!("--revision {COMMIT_BASE}"),
        ],
    );
}

/// `phlora check --json` of `adapter`: (exit code, report).
fn check(adapter: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let o = phlora_cmd()
        .arg("check")
        .arg(adapter)
        .args(["--json", "--quiet"])
        .args(extra)
        .output()
        .unwrap();
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    let report =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&o)));
    (o.status.code(), report)
}

fn verdict<'a>(report: &'a serde_json::Value, engine: &str) -> &'a serde_json::Value {
    report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["engine"] == engine)
        .unwrap_or_else(|| panic!("no verdict for {engine}: {report}"))
}

/// The rules that fired for `engine`, with their severities.
fn rules(report: &serde_json::Value, engine: &str) -> Vec<(String, String)> {
    verdict(report, engine)["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap().to_string(),
                f["severity"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn has(report: &serde_json::Value, engine: &str, rule: &str, severity: &str) -> bool {
    rules(report, engine)
        .iter()
        .any(|(r, s)| r == rule && s == severity)
}

/// Runs a fix command the report printed, on the pair in `root`, writing to `out`.
fn run_fix(fix: &str, root: &Path, out: &Path, merged: &Path) {
    // The placeholders are whole words (a temporary path may hold "FT" or "OUT").
    let (base, ft, bin) = (root.join("base"), root.join("ft"), phlora_bin());
    let command: Vec<&str> = fix
        .split("   (")
        .next()
        .unwrap()
        .split(' ')
        .map(|word| match word {
            "BASE" => base.to_str().unwrap(),
            "FT" => ft.to_str().unwrap(),
            "OUT" => out.to_str().unwrap(),
            "MERGED" => merged.to_str().unwrap(),
            "phlora" => bin.to_str().unwrap(),
            w => w,
        })
        .collect();
    let command = command.join(" ");
    let o = std::process::Command::new("sh")
        .args(["-c", &format!("{command} --device cpu --quiet --force")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{command}: {}", stderr(&o));
}

fn phlora_bin() -> PathBuf {
    std::env::var_os("PHLORA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_phlora")))
}

#[test]
fn check_reads_phloras_targets_as_each_engine_does() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pair");
    synth_pair(&root, "check_targets", 32, 2);
    let base = root.join("base");
    let extract = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let o = extract_pair(&root, &out, extra, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        out
    };
    // PEFT's target: norms through modules_to_save, which vLLM and SGLang refuse, LoRAX
    // ignores, llama.cpp drops; LoRAX ignores the embedding LoRA too.
    let peft = extract("peft", &["-r", "16"]);
    let (code, r) = check(&peft, &["--base", base.to_str().unwrap()]);
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(verdict(&r, "peft")["as_peft"], true, "{r}");
    assert!(has(&r, "vllm", "vllm.modules_to_save", "refused"), "{r}");
    assert!(
        has(&r, "sglang", "sglang.modules_to_save", "refused"),
        "{r}"
    );
    assert!(has(&r, "lorax", "lorax.embeddings", "differs"), "{r}");
    assert!(has(&r, "llama.cpp", "llama.cpp.norms", "differs"), "{r}");
    assert_eq!(verdict(&r, "llama.cpp")["loads"], true);
    // PEFT alone takes it: exit 0. Ranks per module: SGLang refuses the patterns, llama.cpp
    // has one alpha, LoRAX pads the odd ranks.
    assert_eq!(check(&peft, &["--for", "peft"]).0, Some(0));
    let energy = extract("energy", &["--energy", "0.9", "--no-norms"]);
    let (_, r) = check(&energy, &[]);
    assert!(has(&r, "sglang", "sglang.patterns", "refused"), "{r}");
    assert!(
        has(&r, "llama.cpp", "llama.cpp.alpha_pattern", "differs"),
        "{r}"
    );
    // --target vllm: vLLM takes it; a sharded one it does not.
    let vllm = extract("vllm", &["-r", "16", "--target", "vllm"]);
    let (code, r) = check(&vllm, &["--for", "vllm", "--base", base.to_str().unwrap()]);
    assert_eq!(
        (code, &verdict(&r, "vllm")["as_peft"]),
        (Some(0), &true.into()),
        "{r}"
    );
    let sharded = extract(
        "sharded",
        &["-r", "16", "--target", "vllm", "--max-shard-size", "20K"],
    );
    let (code, r) = check(&sharded, &["--for", "vllm"]);
    assert_eq!(code, Some(3));
    assert!(has(&r, "vllm", "vllm.sharded", "refused"), "{r}");
    // Against another base: every engine refuses factors that do not fit.
    let other = tmp.path().join("other");
    synth_pair(&other, "check_other", 48, 2);
    let (code, r) = check(&vllm, &["--base", other.join("base").to_str().unwrap()]);
    assert_eq!(code, Some(3));
    for engine in ["peft", "vllm", "sglang", "lorax", "llama.cpp"] {
        assert!(has(&r, engine, "base.shape", "refused"), "{engine}: {r}");
    }
}

#[test]
fn every_fix_check_prints_writes_an_adapter_the_engines_load_as_peft_does() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pair");
    synth_pair(&root, "check_fixes", 32, 2);
    let base = root.join("base");
    let start = tmp.path().join("start");
    let o = extract_pair(&root, &start, &["--energy", "0.9"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Another tool's adapter (no report.json): the fix goes through the merged model.
    let foreign = tmp.path().join("foreign");
    copy_files(&start, &foreign, false);
    fs::remove_file(foreign.join("report.json")).unwrap();
    for (adapter, tag) in [(&start, "phlora"), (&foreign, "foreign")] {
        let (_, r) = check(adapter, &["--base", base.to_str().unwrap()]);
        assert_eq!(r["from_phlora"], tag == "phlora");
        let mut fixes: Vec<(String, Vec<String>)> = Vec::new();
        for v in r["verdicts"].as_array().unwrap() {
            if let Some(fix) = v["fix"].as_str() {
                fixes.push((
                    fix.to_string(),
                    vec![v["engine"].as_str().unwrap().to_string()],
                ));
            }
        }
        assert!(fixes.len() >= 3, "{r}");
        let every: Vec<String> = fixes.iter().flat_map(|f| f.1.clone()).collect();
        fixes.push((
            r["fix_all"].as_str().expect("a fix for all").to_string(),
            every,
        ));
        for (i, (fix, engines)) in fixes.iter().enumerate() {
            if tag == "foreign" {
                assert!(fix.starts_with("phlora merge"), "{fix}");
            }
            let out = tmp.path().join(format!("{tag}-fix{i}"));
            run_fix(
                fix,
                &root,
                &out,
                &tmp.path().join(format!("{tag}-merged{i}")),
            );
            let (_, again) = check(&out, &["--base", base.to_str().unwrap()]);
            for e in engines {
                assert_eq!(
                    verdict(&again, e)["as_peft"],
                    true,
                    "{fix} for {e}: {again}"
                );
            }
        }
    }
}

/// Rewrites an adapter's config with `edit`.
fn edit_config(adapter: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = adapter.join("adapter_config.json");
    let mut c = read_json(&path);
    edit(&mut c);
    fs::write(&path, c.to_string()).unwrap();
}

#[test]
fn check_names_what_other_tools_adapters_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pair");
    synth_pair(&root, "check_foreign", 32, 1);
    let made = tmp.path().join("made");
    let o = extract_pair(
        &root,
        &made,
        &["-r", "16", "--target", "portable", "--no-embeddings"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Each variant stands for another tool's adapter: no report.json.
    let variant = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = tmp.path().join(name);
        copy_files(&made, &dir, false);
        fs::remove_file(dir.join("report.json")).unwrap();
        edit_config(&dir, |c| edit(c));
        check(&dir, &[]).1
    };
    let r = variant("dora", &|c| c["use_dora"] = true.into());
    assert!(
        has(&r, "vllm", "vllm.dora", "refused") && has(&r, "sglang", "sglang.dora", "refused"),
        "{r}"
    );
    let r = variant("rslora", &|c| c["use_rslora"] = true.into());
    for (engine, rule) in [
        ("sglang", "sglang.rslora"),
        ("lorax", "lorax.rslora"),
        ("llama.cpp", "llama.cpp.rslora"),
    ] {
        assert!(has(&r, engine, rule, "differs"), "{engine}: {r}");
    }
    assert_eq!(
        verdict(&r, "vllm")["as_peft"],
        true,
        "vLLM scales rsLoRA: {r}"
    );
    let r = variant("regex", &|c| {
        c["target_modules"] = ".*\\.(q_proj|v_proj)".into()
    });
    assert!(has(&r, "sglang", "sglang.target_regex", "refused"), "{r}");
    assert!(has(&r, "peft", "peft.untargeted", "differs"), "{r}");
    let r = variant("no_alpha", &|c| {
        c.as_object_mut().unwrap().remove("lora_alpha");
    });
    assert!(
        has(&r, "llama.cpp", "llama.cpp.alpha", "refused")
            && has(&r, "vllm", "vllm.required", "refused"),
        "{r}"
    );
    let r = variant("big_rank", &|c| c["r"] = 600.into());
    assert!(
        has(&r, "vllm", "vllm.rank", "refused") && has(&r, "peft", "peft.rank", "refused"),
        "{r}"
    );
    // Another PEFT type: SGLang asserts LORA, the others read its factors as a LoRA, PEFT
    // loads it by its own type's rules; no phlora command rewrites it.
    let r = variant("not_lora", &|c| c["peft_type"] = "LOHA".into());
    assert!(has(&r, "sglang", "peft_type", "refused"), "{r}");
    assert!(has(&r, "peft", "peft_type", "note"), "{r}");
    for engine in ["vllm", "lorax", "llama.cpp"] {
        assert!(has(&r, engine, "peft_type", "differs"), "{engine}: {r}");
        let fix = verdict(&r, engine)["fix"].as_str().unwrap();
        assert!(fix.starts_with("none from phlora"), "{engine}: {fix}");
    }
    // A tokenizer's added_tokens.json: only ids at or above the base vocabulary are new.
    let base = root.join("base");
    let tokens = |name: &str, id: u64| {
        let dir = tmp.path().join(name);
        copy_files(&made, &dir, false);
        fs::write(
            dir.join("added_tokens.json"),
            format!("{{\"<tok>\": {id}}}"),
        )
        .unwrap();
        check(&dir, &["--for", "sglang", "--base", base.to_str().unwrap()]).1
    };
    let inside = tokens("tokens_inside", 10);
    assert!(
        !has(&inside, "sglang", "sglang.added_tokens", "refused"),
        "{inside}"
    );
    let new = tokens("tokens_new", 1024);
    assert!(
        has(&new, "sglang", "sglang.added_tokens", "refused"),
        "{new}"
    );
    let r = variant("layers_pattern", &|c| c["layers_pattern"] = "layers".into());
    assert!(has(&r, "peft", "peft.targets", "refused"), "{r}");

    // A lora_B.bias and a DoRA magnitude in the file.
    let extra = tmp.path().join("extra");
    copy_files(&made, &extra, false);
    let file = extra.join("adapter_model.safetensors");
    let mut tensors: Vec<T> = read_safetensors(&file)
        .into_iter()
        .map(|(k, t)| tensor(&k, DType::F32, &t.shape, t.values))
        .collect();
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    tensors.push(tensor(
        &format!("{q}.lora_B.bias"),
        DType::F32,
        &[32],
        vec![0.0; 32],
    ));
    tensors.push(tensor(
        &format!("{q}.lora_magnitude_vector"),
        DType::F32,
        &[32],
        vec![1.0; 32],
    ));
    write_single(&file, &tensors);
    let (code, r) = check(&extra, &[]);
    assert_eq!(code, Some(3));
    assert!(has(&r, "vllm", "vllm.keys", "refused"), "{r}");
    assert!(has(&r, "llama.cpp", "llama.cpp.keys", "refused"), "{r}");
    assert!(
        has(&r, "lorax", "lorax.dora", "differs") && has(&r, "lorax", "lorax.lora_bias", "differs"),
        "{r}"
    );
}

#[test]
fn check_refuses_what_is_not_an_adapter_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| phlora_cmd().arg("check").args(args).output().unwrap();
    let refused = |o: &Output, code: i32, needle: &str| {
        let e = stderr(o);
        assert_eq!(o.status.code(), Some(code), "{e}");
        assert!(e.contains(needle), "missing {needle:?}: {e}");
        assert!(!e.contains("panicked"), "{e}");
    };
    let empty = tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    refused(
        &run(&[empty.to_str().unwrap()]),
        1,
        "no adapter_config.json",
    );
    fs::write(empty.join("adapter_config.json"), "{not json").unwrap();
    refused(
        &run(&[empty.to_str().unwrap()]),
        1,
        "adapter_config.json: not valid JSON",
    );
    fs::write(
        empty.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": "eight"}"#,
    )
    .unwrap();
    refused(&run(&[empty.to_str().unwrap()]), 1, "wrong type");
    fs::write(
        empty.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 8}"#,
    )
    .unwrap();
    refused(
        &run(&[empty.to_str().unwrap()]),
        1,
        "adapter_model.safetensors",
    );
    fs::write(empty.join("adapter_model.bin"), b"\x80\x02").unwrap();
    refused(&run(&[empty.to_str().unwrap()]), 1, "safetensors only");
    std::os::unix::fs::symlink("gone.safetensors", empty.join("adapter_model.safetensors"))
        .unwrap();
    refused(
        &run(&[empty.to_str().unwrap()]),
        1,
        "adapter_model.safetensors",
    );
    refused(&run(&["./no/such/adapter"]), 1, "no such file");
    refused(
        &run(&[empty.to_str().unwrap(), "--for", "tgi"]),
        2,
        "expected peft, vllm",
    );
}

#[test]
fn the_architecture_decides_embeddings_in_vllm_and_the_fix_leaves_them_out() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pair");
    synth_pair(&root, "check_arch", 32, 1);
    let out = tmp.path().join("vllm");
    let o = extract_pair(&root, &out, &["-r", "16", "--target", "vllm"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same weights under an architecture whose vLLM model declares no embedding modules.
    let qwen2 = tmp.path().join("qwen2");
    copy_files(&root.join("base"), &qwen2, false);
    let mut config = read_json(&qwen2.join("config.json"));
    config["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    fs::write(qwen2.join("config.json"), config.to_string()).unwrap();
    let (_, llama) = check(
        &out,
        &[
            "--for",
            "vllm",
            "--base",
            root.join("base").to_str().unwrap(),
        ],
    );
    assert_eq!(verdict(&llama, "vllm")["as_peft"], true, "{llama}");
    let (code, r) = check(&out, &["--for", "vllm", "--base", qwen2.to_str().unwrap()]);
    assert_eq!(code, Some(3));
    assert!(has(&r, "vllm", "vllm.embeddings", "refused"), "{r}");
    let fix = verdict(&r, "vllm")["fix"].as_str().unwrap().to_string();
    assert!(
        fix.contains("--no-embeddings") && fix.contains("lm_head"),
        "{fix}"
    );
    let fixed = tmp.path().join("fixed");
    run_fix(&fix, &root, &fixed, &tmp.path().join("merged"));
    let (code, again) = check(
        &fixed,
        &["--for", "vllm", "--base", qwen2.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{again}");
    assert_eq!(verdict(&again, "vllm")["as_peft"], true, "{again}");
}

/// GPT-2's Conv1D weights are [in, out] (fan_in_fan_out): the factors phlora writes for them
/// fit the base, and a base of other sizes does not.
#[test]
fn conv1d_factors_are_checked_against_the_base_in_their_own_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = fresh_seed("check_conv1d");
    let shapes: [(&str, [usize; 2]); 3] = [
        ("transformer.h.0.attn.c_attn.weight", [16, 48]),
        ("transformer.h.0.mlp.c_fc.weight", [16, 40]),
        ("transformer.h.0.mlp.c_proj.weight", [40, 16]),
    ];
    let write = |dir: &Path, scale: f32, grow: usize| {
        let tensors: Vec<T> = shapes
            .iter()
            .enumerate()
            .map(|(k, (name, [i, o]))| {
                let base = normal(i * (o + grow), seed + k as u64);
                let delta = normal(i * (o + grow), seed + 100 + k as u64);
                let values = base
                    .iter()
                    .zip(&delta)
                    .map(|(b, d)| b + scale * d)
                    .collect();
                tensor(name, DType::F32, &[*i, o + grow], values)
            })
            .collect();
        write_single(&dir.join("model.safetensors"), &tensors);
        let config = r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}"#;
        fs::write(dir.join("config.json"), config).unwrap();
    };
    let root = tmp.path().join("pair");
    write(&root.join("base"), 0.0, 0);
    write(&root.join("ft"), 0.1, 0);
    let other = tmp.path().join("other");
    write(&other, 0.0, 8);
    let out = tmp.path().join("adapter");
    let o = extract_pair(&root, &out, &["-r", "8", "--target", "vllm"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        read_json(&out.join("adapter_config.json"))["fan_in_fan_out"],
        true
    );
    let (code, r) = check(&out, &["--base", root.join("base").to_str().unwrap()]);
    assert!(!has(&r, "peft", "base.shape", "refused"), "{r}");
    // PEFT takes it as it is (exit 3: SGLang and LoRAX have no Conv1D LoRA layers).
    assert_eq!(
        (code, &verdict(&r, "peft")["as_peft"]),
        (Some(3), &true.into()),
        "{r}"
    );
    let (_, r) = check(&out, &["--base", other.to_str().unwrap()]);
    assert!(has(&r, "vllm", "base.shape", "refused"), "{r}");
}

/// Tied embeddings: llama.cpp's output layer is token_embd, so it refuses an lm_head LoRA and
/// aborts on an embedding LoRA; the fix leaves both out, and llama.cpp then takes the adapter.
#[test]
fn llama_cpp_on_tied_embeddings_refuses_head_and_embedding_lora_and_the_fix_leaves_them_out() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pair");
    synth_pair_with(&root, "check_tied", 32, 1, &["--tie-embeddings"]);
    let out = tmp.path().join("adapter");
    let o = extract_pair(&root, &out, &["-r", "8"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let base = root.join("base");
    let (code, r) = check(
        &out,
        &["--for", "llama.cpp", "--base", base.to_str().unwrap()],
    );
    assert_eq!(code, Some(3), "{r}");
    assert!(has(&r, "llama.cpp", "llama.cpp.lm_head", "refused"), "{r}");
    assert!(
        has(&r, "llama.cpp", "llama.cpp.tied_embeddings", "refused"),
        "{r}"
    );
    let fix = verdict(&r, "llama.cpp")["fix"]
        .as_str()
        .unwrap()
        .to_string();
    let fixed = tmp.path().join("fixed");
    run_fix(&fix, &root, &fixed, &tmp.path().join("merged"));
    let (code, again) = check(
        &fixed,
        &["--for", "llama.cpp", "--base", base.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{fix}: {again}");
    assert_eq!(
        verdict(&again, "llama.cpp")["as_peft"],
        true,
        "{fix}: {again}"
    );
}
