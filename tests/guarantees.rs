//! What phlora promises under concurrency, signals, closed pipes and hostile files
//! (docs/guarantees.md), each case met as a user meets it: through the binary. Every test here
//! failed before the fix it names.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::extract_cmd;
use phlora::verify::CheckKind;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits (at most a minute) until `done` holds.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn journaled(out: &Path) -> usize {
    std::fs::read_to_string(out.join(".phlora-journal/tensors.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// A small synth pair in ROOT, and the adapter an undisturbed run writes of it (ROOT/whole).
fn pair_and_reference(root: &Path, tag: &str) -> Vec<u8> {
    common::synth_pair(root, tag, 64, 2);
    let whole = root.join("whole");
    let o = common::extract_pair(root, &whole, &["--rank", "8"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    common::adapter_bytes(&whole)
}

/// A synth model folder's first shard.
fn first_shard(dir: &Path) -> PathBuf {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    shards.remove(0)
}

/// Issue 15 case 1: a second run on an OUT another run holds — `--resume`, `--force` or plain
/// — exits with an error naming the holder, touches nothing, and the first run's adapter is
/// the undisturbed one (before: 48 of 69 tensors had wrong factors, with exit 0).
#[test]
fn a_second_run_on_a_busy_out_is_refused_and_the_first_is_unharmed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let reference = pair_and_reference(root, "lock-busy");
    let (out, go) = (root.join("out"), root.join("go"));
    let mut first = extract_cmd(root, &out, &["--rank", "8", "--quiet"])
        .env("PHLORA_TEST_HOLD_AFTER", format!("1:{}", go.display()))
        .spawn()
        .unwrap();
    wait_until("the first run's first record", || journaled(&out) >= 1);
    for extra in [&["--resume"][..], &["--force"], &[]] {
        let o = common::extract_pair(root, &out, &[&["--rank", "8"][..], extra].concat(), &[]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} ran: {err}");
        assert!(
            err.contains("in use by another phlora run")
                && err.contains(&format!("pid {}", first.id())),
            "{extra:?}: {err}"
        );
    }
    std::fs::write(&go, b"").unwrap();
    assert!(first.wait().unwrap().success());
    assert!(
        common::adapter_bytes(&out) == reference,
        "the first run's adapter was disturbed"
    );
    assert!(!out.join(".phlora-lock").exists(), "the lock is released");
}

/// Issue 15 (deliver): a lock left by a run killed with kill -9 (abort: no cleanup) is taken
/// over by the next run, which says so, and the resumed adapter is the undisturbed one.
#[test]
fn a_stale_lock_from_a_killed_run_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let reference = pair_and_reference(root, "lock-stale");
    let out = root.join("out");
    let o = common::extract_pair(
        root,
        &out,
        &["--rank", "8"],
        &[("PHLORA_TEST_CRASH_AFTER", "2")],
    );
    assert!(!o.status.success());
    let lock = std::fs::read_to_string(out.join(".phlora-lock")).unwrap();
    assert!(
        lock.contains("\"pid\""),
        "the killed run's lock is left: {lock}"
    );
    let o = extract_cmd(root, &out, &["--rank", "8", "--resume"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("taking over the lock left by") && err.contains("which is gone"),
        "{err}"
    );
    assert!(common::adapter_bytes(&out) == reference);
}

/// Issue 15 case 7: `--out` naming an input folder by another spelling (absolute, a symlink,
/// `base/x/..`, the folder of a single-file base) is refused before anything is written; the
/// guard compared path text before, and `merge --force` replaced the base.
#[test]
fn an_output_that_is_an_input_by_another_spelling_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "same-folder", 64, 1);
    let adapter = root.join("adapter");
    let o = common::extract_pair(root, &adapter, &["--rank", "4"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let base = root.join("base");
    std::os::unix::fs::symlink(&base, root.join("link")).unwrap();
    let listing = |p: &Path| {
        let mut v: Vec<(PathBuf, u64)> = std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| (e.path(), e.metadata().unwrap().len()))
            .collect();
        v.sort();
        v
    };
    let before = listing(&base);
    let spellings = [
        std::fs::canonicalize(&base).unwrap(),
        root.join("link"),
        base.join("x/.."),
        base.join("./"),
    ];
    for out in &spellings {
        let o = common::merge(&base, &adapter, out, &["--force"]);
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains("is the base folder"),
            "merge {out:?}: {err}"
        );
        let o = common::extract_pair(root, out, &["--rank", "4", "--force"], &[]);
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains("is the base folder"),
            "extract {out:?}: {err}"
        );
    }
    let o = common::merge(&base, &adapter, &adapter.join("x/.."), &[]);
    assert!(
        stderr(&o).contains("is the adapter folder"),
        "{}",
        stderr(&o)
    );
    // A single-file base: its folder is the input folder.
    let single = root.join("single");
    std::fs::create_dir(&single).unwrap();
    let shard = first_shard(&base);
    std::fs::copy(&shard, single.join("model.safetensors")).unwrap();
    let o = common::merge(
        &single.join("model.safetensors"),
        &adapter,
        &single,
        &["--force"],
    );
    assert!(stderr(&o).contains("is the base folder"), "{}", stderr(&o));
    assert_eq!(listing(&base), before, "the base folder was written");
    assert!(!base.join("x").exists());
}

/// Appends a copy of line `n` (from 0) of a journal's records to their end.
fn duplicate_record(out: &Path, n: usize) {
    let path = out.join(".phlora-journal/tensors.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().nth(n).unwrap().to_string();
    std::fs::write(&path, format!("{text}{line}\n")).unwrap();
}

/// Issue 15 case 2: a duplicated journal line made `--resume` write an adapter whose
/// safetensors offsets overlap, with exit 0. The records are now checked as a set (each tensor
/// once, byte ranges tiling the data file): the duplicate and what follows are computed again.
#[test]
fn a_duplicated_journal_record_is_computed_again_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let reference = pair_and_reference(root, "dup-resume");
    let out = root.join("out");
    let o = common::extract_pair(
        root,
        &out,
        &["--rank", "8"],
        &[("PHLORA_TEST_CRASH_AFTER", "4")],
    );
    assert!(!o.status.success());
    duplicate_record(&out, 1);
    let o = extract_cmd(root, &out, &["--rank", "8", "--resume"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("a second time"), "{err}");
    assert!(common::adapter_bytes(&out) == reference);
}

/// Issue 15 case 2, for `combine`: a part with a duplicated record is refused (a finished
/// part has no torn tail to recompute), and OUT holds no adapter.
#[test]
fn a_part_with_a_duplicated_record_is_refused_by_combine() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "dup-combine", 64, 2);
    let parts: Vec<PathBuf> = (1..=2).map(|i| root.join(format!("part{i}"))).collect();
    for (i, part) in parts.iter().enumerate() {
        let shard = format!("{}/2", i + 1);
        let o = common::extract_pair(root, part, &["--rank", "8", "--shard", &shard], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    duplicate_record(&parts[1], 0);
    let combined = root.join("combined");
    let o = common::phlora(&[
        "combine",
        "--out",
        combined.to_str().unwrap(),
        parts[0].to_str().unwrap(),
        parts[1].to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("a second time") && err.contains("part is damaged"),
        "{err}"
    );
    assert!(!combined.join("adapter_config.json").exists());
    assert!(!combined.join("adapter_model.safetensors").exists());
    // Another part's journal, whole and sound, in this part (a part copied over another):
    // its tensors are not this shard's, and would be staged twice.
    for f in ["tensors.jsonl", "tensors.bin"] {
        let j = |p: &Path| p.join(".phlora-journal").join(f);
        std::fs::copy(j(&parts[0]), j(&parts[1])).unwrap();
    }
    let o = common::phlora(&[
        "combine",
        "--out",
        combined.to_str().unwrap(),
        parts[0].to_str().unwrap(),
        parts[1].to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("not this part's"),
        "{err}"
    );
    assert!(!combined.join("adapter_config.json").exists());
}

/// Sets elements of tensor `key` in a safetensors file to `value` (in the tensor's dtype).
fn poke(file: &Path, key: &str, elements: std::ops::Range<usize>, value: f32) {
    let mut bytes = std::fs::read(file).unwrap();
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info = meta.info(key).unwrap_or_else(|| panic!("no {key}"));
    let dtype = phlora::checkpoint::DType::from_safetensors(info.dtype).unwrap();
    let mut v = Vec::new();
    phlora::checkpoint::dtype::encode_into(dtype, &[value], &mut v);
    for e in elements {
        let at = 8 + header_len + info.data_offsets.0 + e * v.len();
        bytes[at..at + v.len()].copy_from_slice(&v);
    }
    std::fs::write(file, bytes).unwrap();
}

fn merge_into(base: &Path, adapter: &Path, out: &Path) -> Output {
    common::merge(base, adapter, out, &[])
}

fn verify_cmd(root: &Path, adapter: &Path) -> Output {
    common::phlora(&[
        "verify",
        "--base",
        root.join("base").to_str().unwrap(),
        "--ft",
        root.join("ft").to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ])
}

/// Issue 15 case 3: merge wrote NaN/Inf into the merged checkpoint with exit 0 (one NaN in a
/// lora_B, `lora_alpha: 1e308`, factors whose product overflows), and verify blamed the
/// fine-tune's file. Now both refuse, naming the adapter's tensor or config, and merge leaves
/// no checkpoint.
#[test]
fn non_finite_updates_are_refused_naming_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "nan", 64, 1);
    let clean = root.join("clean");
    let o = common::extract_pair(root, &clean, &["--rank", "4"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let a_key = key.replace("lora_B", "lora_A");
    let base = root.join("base");
    type Damage<'a> = &'a dyn Fn(&Path);
    let cases: [(&str, Damage, &str); 3] = [
        (
            "nan",
            &|ad| poke(&ad.join("adapter_model.safetensors"), key, 5..6, f32::NAN),
            key,
        ),
        (
            "alpha",
            &|ad| {
                let p = ad.join("adapter_config.json");
                let text = std::fs::read_to_string(&p).unwrap();
                let mut c: serde_json::Value = serde_json::from_str(&text).unwrap();
                c["lora_alpha"] = serde_json::json!(1e308);
                std::fs::write(&p, c.to_string()).unwrap();
            },
            "adapter_config.json",
        ),
        (
            "overflow",
            &|ad| {
                let f = ad.join("adapter_model.safetensors");
                poke(&f, key, 0..4, 1e30);
                poke(&f, &a_key, 0..64, 1e30);
            },
            key,
        ),
    ];
    for (name, damage, blamed) in cases {
        let adapter = root.join(name);
        common::copy_files(&clean, &adapter, false);
        damage(&adapter);
        let out = root.join(format!("merged-{name}"));
        let o = merge_into(&base, &adapter, &out);
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains(blamed),
            "merge {name}: {err}"
        );
        assert!(
            !out.join("config.json").exists() && !out.join("model.safetensors.index.json").exists(),
            "{name}: a merged checkpoint was published"
        );
        let o = verify_cmd(root, &adapter);
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains(blamed),
            "verify {name}: {err}"
        );
        assert!(
            !err.contains("/ft/"),
            "verify {name} blames the fine-tune: {err}"
        );
    }
}

/// Issue 15 case 4: `--budget 1` and `--include '*norm*'` wrote `target_modules: []`, which
/// PEFT refuses, with exit 0. Both are errors that say why, and leave no adapter or folder;
/// a budget that starves some targets says they got rank 0 (it called them tensors a LoRA
/// cannot carry).
#[test]
fn an_adapter_with_no_lora_target_is_an_error_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "no-target", 64, 2);
    for (args, why) in [
        (&["--budget", "1"][..], "the cheapest LoRA target"),
        (
            &["--include", "*norm*"][..],
            "no layer weight a LoRA can carry",
        ),
    ] {
        let out = root.join("out");
        let o = common::extract_pair(root, &out, args, &[]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}: {err}");
        assert!(
            err.contains(why) && err.contains("PEFT refuses"),
            "{args:?}: {err}"
        );
        assert!(!out.exists(), "{args:?} left {out:?}");
    }
    let out = root.join("starved");
    let o = extract_cmd(root, &out, &["--budget", "300"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("got rank 0 under --budget"), "{err}");
    assert!(!err.contains("a LoRA cannot carry"), "{err}");
}

/// Runs a command, failing the test if it has not ended within 30 s (it is killed then).
fn output_within_30s(mut cmd: std::process::Command) -> Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            child.kill().unwrap();
            panic!("{cmd:?} still runs after 30 s (blocked?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "{path:?}");
}

/// Issue 15 case 11: a FIFO named `model.safetensors`, `config.json` or the index blocked
/// extract and inspect forever in open(2) (deaf to the first SIGTERM). Non-regular files are
/// refused by name, without blocking.
#[test]
fn a_fifo_in_place_of_an_input_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "fifo", 64, 1);
    let ft = root.join("ft");
    let shard = first_shard(&ft);
    let shard = shard.file_name().unwrap().to_str().unwrap();
    for name in ["config.json", "model.safetensors.index.json", shard] {
        let hostile = root.join(format!("ft-{name}"));
        common::copy_files(&ft, &hostile, true);
        std::fs::remove_file(hostile.join(name)).unwrap();
        mkfifo(&hostile.join(name));
        let mut cmd = common::phlora_cmd();
        cmd.args(["inspect"]).arg(&hostile);
        let o = output_within_30s(cmd);
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains("not a regular file") && err.contains(name),
            "inspect {name}: {err}"
        );
        let mut cmd = extract_cmd(root, &root.join("out"), &["--rank", "4"]);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        cmd = common::phlora_cmd();
        for a in args {
            cmd.arg(if a == ft.as_os_str() {
                hostile.clone().into_os_string()
            } else {
                a
            });
        }
        let o = output_within_30s(cmd);
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains("not a regular file") && err.contains(name),
            "extract {name}: {err}"
        );
        assert!(!root.join("out").exists());
    }
    // An adapter's config or weights as a FIFO, for verify and merge.
    let adapter = root.join("adapter");
    let o = common::extract_pair(root, &adapter, &["--rank", "4"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let hostile = root.join(format!("adapter-{name}"));
        common::copy_files(&adapter, &hostile, true);
        std::fs::remove_file(hostile.join(name)).unwrap();
        mkfifo(&hostile.join(name));
        for command in ["verify", "merge"] {
            let mut cmd = common::phlora_cmd();
            cmd.args([command, "--base"])
                .arg(root.join("base"))
                .arg("--adapter")
                .arg(&hostile);
            if command == "verify" {
                cmd.arg("--ft").arg(&ft);
            } else {
                cmd.arg("--out").arg(root.join("merged"));
            }
            let o = output_within_30s(cmd);
            let err = stderr(&o);
            assert!(
                !o.status.success() && err.contains("not a regular file") && err.contains(name),
                "{command} {name}: {err}"
            );
        }
    }
}

/// Issue 15 case 5: a folder with `model.safetensors` and an index naming other shards is
/// refused (phlora read the index; transformers loads model.safetensors): the adapter would
/// have been computed against other weights than the model loads.
#[test]
fn a_folder_with_both_a_single_file_and_an_index_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "ambiguous", 64, 1);
    let ft = root.join("ft");
    let shard = first_shard(&ft);
    std::fs::copy(&shard, ft.join("model.safetensors")).unwrap();
    let o = common::extract_pair(root, &root.join("out"), &["--rank", "4"], &[]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("ambiguous"), "{err}");
    let o = common::phlora(&["inspect", ft.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("ambiguous"));
}

/// A base whose files are symlinks (a Hugging Face cache snapshot): merge copied none of its
/// side files (config.json, tokenizer), as DirEntry's file type does not follow the link.
#[test]
fn merge_copies_a_symlinked_base_folder_s_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "symlinked", 64, 1);
    let adapter = root.join("adapter");
    let o = common::extract_pair(root, &adapter, &["--rank", "4"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (blobs, snapshot) = (root.join("base"), root.join("snapshot"));
    std::fs::create_dir(&snapshot).unwrap();
    for e in std::fs::read_dir(&blobs).unwrap().flatten() {
        std::os::unix::fs::symlink(e.path(), snapshot.join(e.file_name())).unwrap();
    }
    let out = root.join("merged");
    let o = merge_into(&snapshot, &adapter, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        std::fs::read(blobs.join("config.json")).unwrap()
    );
}

/// Every tensor of a model folder's safetensors files.
fn read_model(dir: &Path) -> std::collections::HashMap<String, common::Loaded> {
    let mut all = std::collections::HashMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".safetensors") {
            all.extend(common::read_safetensors(&e.path()));
        }
    }
    all
}

fn edit_config(adapter: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let p = adapter.join("adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&p, c.to_string()).unwrap();
}

/// Issue 15 case 6: verify and merge applied every module's factors, ignoring
/// `layers_to_transform` (merge then differed from PEFT's merge_and_unload by 9% on untouched
/// layers); an invalid regex in `target_modules` was accepted. Now the config says which
/// modules are wrapped, by PEFT 0.21's rules, and a bad regex is refused naming the file.
#[test]
fn verify_and_merge_apply_only_the_modules_the_config_targets() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "layers", 64, 2);
    let adapter = root.join("adapter");
    let o = common::extract_pair(
        root,
        &adapter,
        &["--rank", "4", "--no-embeddings", "--no-norms"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    edit_config(&adapter, |c| {
        c["layers_to_transform"] = serde_json::json!([0])
    });
    let out = root.join("merged");
    let o = merge_into(&root.join("base"), &adapter, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let (base, merged) = (read_model(&root.join("base")), read_model(&out));
    for proj in ["self_attn.q_proj", "mlp.down_proj"] {
        let key = |l: usize| format!("model.layers.{l}.{proj}.weight");
        assert_eq!(
            merged[&key(1)].values,
            base[&key(1)].values,
            "layer 1 {proj} was changed"
        );
        assert_ne!(
            merged[&key(0)].values,
            base[&key(0)].values,
            "layer 0 {proj} was not merged"
        );
    }
    let v = common::verify_pair(&root.join("base"), &root.join("ft"), &adapter).unwrap();
    let kind = |name: &str| v.tensors.iter().find(|t| t.name == name).map(|t| t.kind);
    assert_eq!(
        kind("model.layers.1.self_attn.q_proj.weight"),
        Some(CheckKind::NotCarried)
    );
    assert_eq!(
        kind("model.layers.0.self_attn.q_proj.weight"),
        Some(CheckKind::Lora)
    );

    // A config that targets none of the file's modules: PEFT would load it as a no-op.
    let none = root.join("targets-none");
    common::copy_files(&adapter, &none, false);
    edit_config(&none, |c| {
        c["target_modules"] = serde_json::json!(["nothing_here"])
    });
    let o = verify_cmd(root, &none);
    assert!(
        !o.status.success() && stderr(&o).contains("targets none"),
        "{}",
        stderr(&o)
    );

    for (field, value) in [("target_modules", "("), ("rank_pattern", "{\"(\": 2}")] {
        let bad = root.join(format!("bad-{field}"));
        common::copy_files(&adapter, &bad, false);
        edit_config(&bad, |c| {
            c["layers_to_transform"] = serde_json::Value::Null;
            c[field] = serde_json::from_str(value).unwrap_or_else(|_| serde_json::json!(value));
        });
        for o in [
            verify_cmd(root, &bad),
            merge_into(&root.join("base"), &bad, &root.join("m2")),
        ] {
            let err = stderr(&o);
            assert!(!o.status.success(), "{field}: {err}");
            assert!(
                err.contains("adapter_config.json") && err.contains(field),
                "{field}: {err}"
            );
            assert_eq!(
                err.trim_end().lines().count(),
                1,
                "{field}: one line: {err}"
            );
        }
    }
}

/// Issue 15 case 8: without --force, extract overwrote a stray report.json in OUT and deleted
/// stray `adapter_model-0000N-of-…` files. Any file the commit would replace or remove now
/// needs --force; and merge --force removes weights of another layout (a stale
/// model.safetensors beside new shards would make the folder ambiguous).
#[test]
fn files_in_out_are_replaced_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "stray", 64, 1);
    for stray in [
        "report.json",
        "adapter_model-00001-of-00002.safetensors",
        "adapter.gguf",
    ] {
        let out = root.join(format!("out-{stray}"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join(stray), b"mine").unwrap();
        let o = common::extract_pair(root, &out, &["--rank", "4"], &[]);
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains(stray) && err.contains("--force"),
            "{stray}: {err}"
        );
        assert_eq!(
            std::fs::read(out.join(stray)).unwrap(),
            b"mine",
            "{stray} was touched"
        );
        let o = common::extract_pair(root, &out, &["--rank", "4", "--force"], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let adapter = root.join("out-report.json");
    let merged = root.join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    std::fs::write(merged.join("model.safetensors"), b"stale").unwrap();
    let o = merge_into(&root.join("base"), &adapter, &merged);
    assert!(
        !o.status.success() && stderr(&o).contains("model.safetensors"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(merged.join("model.safetensors")).unwrap(),
        b"stale"
    );
    let o = common::merge(&root.join("base"), &adapter, &merged, &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !merged.join("model.safetensors").exists(),
        "the stale single file is left beside the shards"
    );
    let o = common::phlora(&["inspect", merged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The write end of a pipe whose read end is already closed: every write fails with EPIPE.
fn closed_pipe() -> std::process::Stdio {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe fills two descriptors, which are owned from here on.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] is a descriptor pipe just opened; closing it is all this does.
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is open and owned by nothing else.
    std::process::Stdio::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) })
}

fn dev_full() -> std::process::Stdio {
    std::fs::File::options()
        .write(true)
        .open("/dev/full")
        .unwrap()
        .into()
}

/// Issue 15 case 9: `extract … 2>&1 | head -1`, `2>/dev/full` and a `--json` command writing
/// to a closed pipe panicked (rc 101, "failed printing to stderr"). A closed pipe ends quietly
/// (exit 0) and the work is done; a full disk on stdout is an error.
#[test]
fn closed_pipes_and_full_disks_on_stdout_and_stderr_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "pipes", 64, 1);
    let run = |out: &str, stdout: std::process::Stdio, stderr: std::process::Stdio| {
        let out = root.join(out);
        let status = extract_cmd(root, &out, &["--rank", "4", "--json", "-v"])
            .stdout(stdout)
            .stderr(stderr)
            .status()
            .unwrap();
        (status, out)
    };
    for (name, stdout, stderr) in [
        ("stderr-closed", std::process::Stdio::null(), closed_pipe()),
        ("stderr-full", std::process::Stdio::null(), dev_full()),
        ("stdout-closed", closed_pipe(), std::process::Stdio::null()),
        ("both-closed", closed_pipe(), closed_pipe()),
    ] {
        let (status, out) = run(name, stdout, stderr);
        assert_eq!(status.code(), Some(0), "{name}: {status:?}");
        assert!(
            out.join("adapter_config.json").is_file(),
            "{name}: no adapter"
        );
    }
    let o = extract_cmd(root, &root.join("stdout-full"), &["--rank", "4", "--json"])
        .stdout(dev_full())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("stdout") && err.contains("No space left"),
        "{err}"
    );
    // The other commands that print results.
    let ft = root.join("ft");
    for args in [
        vec!["inspect", ft.to_str().unwrap(), "--json"],
        vec!["inspect", ft.to_str().unwrap()],
        vec!["--help"],
    ] {
        let status = common::phlora_cmd()
            .args(&args)
            .stdout(closed_pipe())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(0), "{args:?}");
    }
    let o = common::phlora_cmd()
        .args(["verify", "--base"])
        .arg(root.join("base"))
        .arg("--ft")
        .arg(&ft)
        .arg("--adapter")
        .arg(root.join("stderr-closed"))
        .arg("--json")
        .stdout(closed_pipe())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// Issue 15 case 10: a non-UTF-8 `--out` with `--shard` panicked in the part marker (and
/// again on `--resume`); it is refused before any work, leaving nothing. Without --shard such
/// a path works.
#[test]
fn a_non_utf8_part_folder_is_refused_before_any_work() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "non-utf8", 64, 1);
    let out = root.join(std::ffi::OsStr::from_bytes(b"part-\xff"));
    for extra in [&[][..], &["--resume"]] {
        let args = [&["--rank", "4", "--shard", "1/2"][..], extra].concat();
        let o = common::extract_pair(root, &out, &args, &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains("not UTF-8"), "{err}");
        assert!(!out.exists());
    }
    let o = common::extract_pair(root, &out, &["--rank", "4"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("adapter_config.json").is_file());
}

/// Issue 15 case 12: merge ignored SIGINT/SIGTERM (it died and left a 50 MB
/// `.phlora-merge-PID`). It stops between two tensors, exits 130 and leaves nothing: no
/// staging folder, no checkpoint, no OUT it created.
#[test]
fn merge_stops_cleanly_on_sigterm_and_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "merge-signal", 64, 2);
    let adapter = root.join("adapter");
    let o = common::extract_pair(root, &adapter, &["--rank", "4"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let out = root.join(format!("merged-{signal}"));
        let child = common::phlora_cmd()
            .args(["merge", "--base"])
            .arg(root.join("base"))
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(&out)
            .env("PHLORA_TEST_MERGE_STALL_MS", "100")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let staging = out.join(format!(".phlora-merge-{}", child.id()));
        wait_until("the merge's staging folder", || staging.exists());
        // SAFETY: kill only sends a signal to the child this test started.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(130), "signal {signal}: {err}");
        assert!(err.contains("interrupted"), "{err}");
        assert!(!out.exists(), "signal {signal}: {out:?} is left");
    }
}

/// Issue 15 case 12: `synth --hidden 4000000000` panicked on allocation, and synth replaced an
/// existing pair silently.
#[test]
fn synth_refuses_impossible_sizes_and_an_existing_pair() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let o = common::phlora(&[
        "synth",
        "--out",
        root.join("huge").to_str().unwrap(),
        "--hidden",
        "4000000000",
        "--heads",
        "1",
        "--kv-heads",
        "1",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("needs") && err.contains("memory"), "{err}");
    assert!(!root.join("huge").exists());
    let small = [
        "--hidden",
        "64",
        "--intermediate",
        "128",
        "--layers",
        "1",
        "--vocab",
        "256",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--quiet",
    ];
    let pair = root.join("pair");
    let args = |extra: &[&'static str]| {
        let mut a = vec!["synth", "--out", pair.to_str().unwrap()];
        a.extend(small);
        a.extend(extra);
        a
    };
    assert!(common::phlora(&args(&[])).status.success());
    let config = std::fs::read(pair.join("ft/config.json")).unwrap();
    let o = common::phlora(&args(&["--seed", "9"]));
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(pair.join("ft/config.json")).unwrap(), config);
    assert!(common::phlora(&args(&["--seed", "9", "--force"]))
        .status
        .success());
}
