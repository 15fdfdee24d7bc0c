//! Where phlora meets other tools: models named by Hugging Face id from the local hub cache,
//! and `phlora check`, the pre-flight check of an adapter against each engine's loading rules.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

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
