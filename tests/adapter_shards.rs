//! `--max-shard-size`: the adapter's weights split into `adapter_model-0000i-of-0000n` files
//! plus an index, holding exactly the tensors of the single-file adapter, byte for byte;
//! verify, merge and inspect read the layout; replacing an adapter of the other layout leaves
//! no stale weights file behind; combine and resume may choose the layout anew.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{merge_ok, phlora, read_json, synth_pair, verify_pair};

fn extract(root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    common::extract_pair(root, out, &[&["--rank", "8"][..], extra].concat(), &[])
}

fn ok(o: std::process::Output) -> std::process::Output {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// name → (dtype, shape, raw bytes).
type RawTensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

/// Every tensor of a safetensors file.
fn raw_tensors(path: &Path) -> RawTensors {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

/// Weights files in `out`, sorted.
fn weights_files(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("adapter_model"))
        .collect();
    names.sort();
    names
}

/// The tensors of a sharded adapter, checked against its index: every shard named and
/// present, each key in the shard the index names, total_size the sum of the tensor bytes.
fn sharded_tensors(out: &Path) -> (RawTensors, usize) {
    let index = read_json(&out.join("adapter_model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let mut files: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    let n = files.len();
    let mut all = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        assert_eq!(
            *f,
            format!("adapter_model-{:05}-of-{n:05}.safetensors", i + 1)
        );
        for (name, t) in raw_tensors(&out.join(f)) {
            assert_eq!(
                map[&name].as_str(),
                Some(*f),
                "{name} is not where the index says"
            );
            assert!(all.insert(name, t).is_none());
        }
    }
    assert_eq!(
        all.len(),
        map.len(),
        "the index names tensors no shard holds"
    );
    let total: usize = all.values().map(|t| t.2.len()).sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
    (all, n)
}

#[test]
fn sharded_adapter_holds_the_single_files_tensors_and_verifies_and_merges_alike() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    synth_pair(root, "adapter-shards", 128, 2);
    let single = root.join("single");
    ok(extract(root, &single, &[]));
    let want = raw_tensors(&single.join("adapter_model.safetensors"));
    let largest = want.values().map(|t| t.2.len()).max().unwrap();
    let total: usize = want.values().map(|t| t.2.len()).sum();

    let limit = 3 * largest;
    let sharded = root.join("sharded");
    ok(extract(
        root,
        &sharded,
        &["--max-shard-size", &limit.to_string()],
    ));
    assert!(!sharded.join("adapter_model.safetensors").exists());
    let (got, n) = sharded_tensors(&sharded);
    assert!(
        n >= total / limit,
        "{n} shards for {total} bytes at {limit} per shard"
    );
    assert!(
        got == want,
        "the shards do not hold the single file's tensors"
    );
    for f in weights_files(&sharded)
        .iter()
        .filter(|f| f.contains("-of-"))
    {
        let bytes: usize = raw_tensors(&sharded.join(f))
            .values()
            .map(|t| t.2.len())
            .sum();
        assert!(bytes <= limit, "{f} holds {bytes} bytes, over {limit}");
    }
    // The config and report do not depend on the layout.
    for f in ["adapter_config.json", "report.json"] {
        let (a, b) = (read_json(&single.join(f)), read_json(&sharded.join(f)));
        if f == "adapter_config.json" {
            assert_eq!(a, b);
        } else {
            // Everything but the timings.
            let rows = |r: &serde_json::Value| -> Vec<serde_json::Value> {
                let mut rows = r["tensors"].as_array().unwrap().clone();
                for row in &mut rows {
                    let row = row.as_object_mut().unwrap();
                    for timing in ["seconds", "stages", "worker"] {
                        row.remove(timing);
                    }
                }
                rows
            };
            assert_eq!(rows(&a), rows(&b));
        }
    }

    // A limit below the largest tensor: that tensor gets a file of its own.
    let tiny = root.join("tiny");
    ok(extract(root, &tiny, &["--max-shard-size", "1"]));
    let (got, n) = sharded_tensors(&tiny);
    assert_eq!(n, want.len(), "one tensor per shard");
    assert!(got == want);
    // A limit above the total: the single file, no index.
    let roomy = root.join("roomy");
    ok(extract(root, &roomy, &["--max-shard-size", "1G"]));
    assert_eq!(weights_files(&roomy), ["adapter_model.safetensors"]);
    assert!(
        std::fs::read(roomy.join("adapter_model.safetensors")).unwrap()
            == std::fs::read(single.join("adapter_model.safetensors")).unwrap()
    );

    // verify reads the sharded adapter and finds the same figures.
    let (base, ft) = (root.join("base"), root.join("ft"));
    let a = verify_pair(&base, &ft, &single).unwrap();
    let b = verify_pair(&base, &ft, &sharded).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    assert!(!b.tensors.is_empty());
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(x.name, y.name);
        assert_eq!(
            x.rel_error_delta.to_bits(),
            y.rel_error_delta.to_bits(),
            "{}",
            x.name
        );
    }
    // merge writes the same model from either layout.
    let (m1, m2) = (root.join("m1"), root.join("m2"));
    merge_ok(&base, &single, &m1);
    merge_ok(&base, &sharded, &m2);
    let files = |d: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect();
        v.sort();
        v
    };
    assert!(files(&m1) == files(&m2), "merge differs between layouts");
    // inspect lists the sharded adapter's tensors.
    let o = ok(phlora(&["inspect", sharded.to_str().unwrap()]));
    let text = String::from_utf8_lossy(&o.stdout);
    let key = want.keys().next().unwrap();
    assert!(text.contains(key.as_str()), "{text}");
}

#[test]
fn replacing_an_adapter_of_the_other_layout_leaves_no_stale_weights() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    synth_pair(root, "adapter-shards-replace", 64, 2);
    let out = root.join("out");
    ok(extract(root, &out, &["--max-shard-size", "1"]));
    let first = weights_files(&out);
    assert!(first.len() > 3, "{first:?}");
    // Without --force an index is an adapter too.
    std::fs::remove_file(out.join("adapter_config.json")).unwrap();
    let o = extract(root, &out, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("adapter_model.safetensors.index.json") && err.contains("--force"),
        "{err}"
    );

    ok(extract(root, &out, &["--force"]));
    assert_eq!(weights_files(&out), ["adapter_model.safetensors"]);
    // Back to shards of another count: neither the single file nor other shards remain.
    ok(extract(root, &out, &["--force", "--max-shard-size", "64K"]));
    let (tensors, n) = sharded_tensors(&out);
    assert!(!tensors.is_empty());
    let mut want: Vec<String> = (1..=n)
        .map(|i| format!("adapter_model-{i:05}-of-{n:05}.safetensors"))
        .collect();
    if n == 1 {
        want = vec!["adapter_model.safetensors".into()];
    } else {
        want.push("adapter_model.safetensors.index.json".into());
    }
    want.sort();
    assert_eq!(weights_files(&out), want);
}

#[test]
fn a_folder_with_both_layouts_or_a_missing_shard_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    synth_pair(root, "adapter-shards-bad", 64, 1);
    let (base, ft) = (root.join("base"), root.join("ft"));
    let sharded = root.join("sharded");
    ok(extract(root, &sharded, &["--max-shard-size", "1"]));
    let single = root.join("single");
    ok(extract(root, &single, &[]));

    let both = root.join("both");
    common::copy_files(&sharded, &both, false);
    std::fs::copy(
        single.join("adapter_model.safetensors"),
        both.join("adapter_model.safetensors"),
    )
    .unwrap();
    let err = verify_pair(&base, &ft, &both).unwrap_err().to_string();
    assert!(err.contains("both") && err.contains("index.json"), "{err}");

    let missing = root.join("missing");
    common::copy_files(&sharded, &missing, false);
    let gone = "adapter_model-00002-of-".to_string();
    let victim = weights_files(&missing)
        .into_iter()
        .find(|f| f.starts_with(&gone))
        .unwrap();
    std::fs::remove_file(missing.join(&victim)).unwrap();
    let err = verify_pair(&base, &ft, &missing).unwrap_err().to_string();
    assert!(
        err.contains("adapter_model.safetensors.index.json") && err.contains(&victim),
        "{err}"
    );

    for bad in ["0", "-1", "lots", "1Q"] {
        let flag = format!("--max-shard-size={bad}");
        let o = extract(root, &root.join("never"), &[&flag]);
        assert!(!o.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--max-shard-size") && !err.contains("panicked"),
            "{err}"
        );
        assert!(!root.join("never").exists());
    }
}

#[test]
fn combine_and_resume_choose_the_layout_anew() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    synth_pair(root, "adapter-shards-combine", 64, 2);
    let sharded = root.join("sharded");
    ok(extract(root, &sharded, &["--max-shard-size", "16K"]));
    let (want, n) = sharded_tensors(&sharded);
    assert!(n > 1);

    // Parts computed without the flag, combined with it: the single run's shards.
    let parts: Vec<PathBuf> = (1..=2).map(|i| root.join(format!("part{i}"))).collect();
    for (i, p) in parts.iter().enumerate() {
        ok(extract(root, p, &["--shard", &format!("{}/2", i + 1)]));
    }
    let combined = root.join("combined");
    let mut args = vec![
        "combine",
        "--out",
        combined.to_str().unwrap(),
        "--max-shard-size",
        "16K",
    ];
    args.extend(parts.iter().map(|p| p.to_str().unwrap()));
    ok(phlora(&args));
    assert_eq!(weights_files(&combined), weights_files(&sharded));
    for f in weights_files(&sharded) {
        assert!(
            std::fs::read(combined.join(&f)).unwrap() == std::fs::read(sharded.join(&f)).unwrap(),
            "{f} differs"
        );
    }

    // A run interrupted with one layout resumes with the other.
    let out = root.join("resumed");
    let o = common::extract_pair(
        root,
        &out,
        &["--rank", "8"],
        &[("PHLORA_TEST_CRASH_AFTER", "3")],
    );
    assert!(!o.status.success());
    ok(extract(
        root,
        &out,
        &["--resume", "--max-shard-size", "16K"],
    ));
    let (got, _) = sharded_tensors(&out);
    assert!(got == want, "the resumed shards differ");
}
