//! `--shard I/N` and `combine`: N processes each compute a share of the tensors (balanced by
//! bytes read) into a part, and combine joins the parts into the adapter a single run writes,
//! byte for byte. Missing, repeated or foreign parts are refused by name.

mod common;

use std::path::Path;

use common::{adapter_bytes, phlora, phlora_cmd, synth_pair};

fn run(args: &[&str]) -> std::process::Output {
    let o = phlora(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn extract(root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    common::extract_pair(root, out, extra, &[])
}

#[test]
fn parts_combine_into_the_single_run_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    synth_pair(root, "shard", 256, 3);
    for policy in [&["--rank", "8"][..], &["--energy", "0.9"][..]] {
        let whole = root.join("whole");
        let o = extract(root, &whole, &[policy, &["--force"]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let n = 3;
        let mut parts = Vec::new();
        for i in 1..=n {
            let part = root.join(format!("part{i}"));
            let shard = format!("{i}/{n}");
            let o = extract(
                root,
                &part,
                &[policy, &["--shard", &shard, "--force", "--json"]].concat(),
            );
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            // Balanced: every shard has work.
            assert!(report["tensors"].as_u64().unwrap() > 0, "{report}");
            assert!(
                !part.join("adapter_config.json").exists(),
                "a part is not an adapter"
            );
            parts.push(part);
        }
        let combined = root.join("combined");
        // Parts in any order.
        let mut args = vec!["combine", "--out", combined.to_str().unwrap(), "--force"];
        args.extend(parts.iter().rev().map(|p| p.to_str().unwrap()));
        run(&args);
        assert!(
            adapter_bytes(&combined) == adapter_bytes(&whole),
            "{policy:?}: the combined adapter differs from the single run's"
        );

        // A missing part, a repeated one.
        let o = phlora(&[
            "combine",
            "--out",
            root.join("x").to_str().unwrap(),
            parts[0].to_str().unwrap(),
            parts[2].to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("shard 2/3 is missing"),
            "{err}"
        );
        let o = phlora(&[
            "combine",
            "--out",
            root.join("x").to_str().unwrap(),
            parts[0].to_str().unwrap(),
            parts[0].to_str().unwrap(),
            parts[1].to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("given twice"), "{err}");
    }
    // A part of another run (other settings).
    let other = root.join("other");
    let o = extract(root, &other, &["--rank", "4", "--shard", "2/3"]);
    assert!(o.status.success());
    let o = phlora(&[
        "combine",
        "--out",
        root.join("y").to_str().unwrap(),
        root.join("part1").to_str().unwrap(),
        other.to_str().unwrap(),
        root.join("part3").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a part of the same run"),
        "{err}"
    );
}

#[test]
fn shard_arguments_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0/3", "4/3", "3", "a/b", "1/0"] {
        let o = extract(dir.path(), &dir.path().join("o"), &["--shard", bad]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--shard"),
            "{bad}: {err}"
        );
    }
}

/// Parts computed with paths relative to one folder combine from another folder, and the
/// adapter still names the base as it was typed.
#[test]
fn relative_paths_combine_from_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    synth_pair(root, "shard-relative", 128, 2);
    let in_root = |args: &[&str]| {
        let o = phlora_cmd().current_dir(root).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let common_args = [
        "--base", "base", "--ft", "ft", "--rank", "4", "--device", "cpu", "--quiet",
    ];
    in_root(&[&["extract", "--out", "whole"][..], &common_args].concat());
    for i in 1..=2 {
        let (out, shard) = (format!("p{i}"), format!("{i}/2"));
        in_root(
            &[
                &["extract", "--out", &out, "--shard", &shard][..],
                &common_args,
            ]
            .concat(),
        );
    }
    // From the test's own folder, with absolute part paths.
    let combined = root.join("combined");
    run(&[
        "combine",
        "--out",
        combined.to_str().unwrap(),
        root.join("p1").to_str().unwrap(),
        root.join("p2").to_str().unwrap(),
    ]);
    assert!(adapter_bytes(&combined) == adapter_bytes(&root.join("whole")));
}

/// Parts computed on two machines that hold the models at different paths (copies that keep
/// their mtimes) combine on a third, told where the models are with --base/--ft; a copy with
/// new mtimes, or models that are not where the parts read them, are refused with the way out.
#[test]
fn parts_from_different_mount_points_combine_with_base_and_ft() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let a = root.join("node-a");
    synth_pair(&a, "shard-mounts", 128, 2);
    let b = root.join("node-b");
    for m in ["base", "ft"] {
        common::copy_files(&a.join(m), &b.join(m), true);
    }
    let whole = root.join("whole");
    let o = extract(&a, &whole, &["--rank", "4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (i, node) in [(1, &a), (2, &b)] {
        let part = root.join(format!("part{i}"));
        let shard = format!("{i}/2");
        let o = extract(node, &part, &["--rank", "4", "--shard", &shard]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let parts = [root.join("part1"), root.join("part2")];
    let combine = |out: &Path, extra: &[&str]| {
        let mut args = vec!["combine", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend(parts.iter().map(|p| p.to_str().unwrap()));
        phlora(&args)
    };
    // The models move (node-a's paths are gone here): told where they are, combine works.
    let c = root.join("node-c");
    std::fs::rename(&a, &c).unwrap();
    let o = combine(&root.join("nowhere"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--base"), "{err}");
    let (cb, cf) = (c.join("base"), c.join("ft"));
    let here = ["--base", cb.to_str().unwrap(), "--ft", cf.to_str().unwrap()];
    let combined = root.join("combined");
    let o = combine(&combined, &here);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(adapter_bytes(&combined) == adapter_bytes(&whole));

    // A copy that did not keep the mtimes is not taken for the same files.
    let d = root.join("node-d");
    for m in ["base", "ft"] {
        common::copy_files(&c.join(m), &d.join(m), false);
    }
    let (db, df) = (d.join("base"), d.join("ft"));
    let o = combine(
        &root.join("refused"),
        &["--base", db.to_str().unwrap(), "--ft", df.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not the files the parts read"),
        "{err}"
    );
    assert!(!root.join("refused").join("adapter_config.json").exists());
}
