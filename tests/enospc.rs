//! A real full disk (ENOSPC): OUT on a tmpfs too small for the adapter and its journal. The run
//! fails with an error naming the file and the cause, leaves no adapter and no staging folder,
//! keeps the journal; with room made, `--resume` completes to the bytes of a run that never
//! failed.
//!
//! Mounting needs root (or CAP_SYS_ADMIN), so the test is ignored by default; `.ci/run` runs it
//! with `--ignored` where `mount -t tmpfs` works and says so when it does not.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{adapter_bytes, synth_pair};

/// A tmpfs mounted at a fresh folder, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "mount -t tmpfs failed: run as root, or leave this test ignored"
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn extract(root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    common::extract_pair(root, out, &[&["--rank", "16"][..], extra].concat(), &[])
}

#[test]
#[ignore = "mounts a tmpfs: needs root; .ci/run runs it with --ignored"]
fn a_full_disk_fails_cleanly_and_resumes_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    synth_pair(root, "enospc", 256, 3);
    let reference = root.join("reference");
    let o = extract(root, &reference, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let adapter = std::fs::metadata(reference.join("adapter_model.safetensors"))
        .unwrap()
        .len();

    // Room for about half the journal: the run fails part way.
    let small = adapter / 2 / 1024;
    let fs = Tmpfs::mount(&root.join("disk"), &format!("{small}k"));
    let out = fs.0.join("out");
    let o = extract(root, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the run succeeded on a full disk");
    assert!(
        err.contains("No space left on device") && err.contains(out.to_str().unwrap()),
        "the error should name the file and the cause: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("--resume"),
        "the error should say how to go on: {err}"
    );
    assert!(!out.join("adapter_config.json").exists(), "no adapter");
    assert!(!out.join("adapter_model.safetensors").exists());
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        leftovers.iter().all(|n| n == ".phlora-journal"),
        "only the journal stays: {leftovers:?}"
    );

    // Room enough for the journal and the adapter: the resume completes.
    fs.resize(&format!("{}k", adapter * 4 / 1024 + 1024));
    let o = extract(root, &out, &["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        adapter_bytes(&out) == adapter_bytes(&reference),
        "the resumed adapter differs from the reference"
    );

    // Room for the journal but not for the adapter staged beside it: the disk fills later in
    // the run, where the staged adapter and the journal grow together; still no adapter, and
    // a resume writes it once there is room.
    let out2 = fs.0.join("out2");
    std::fs::remove_dir_all(&out).unwrap();
    let journal_only = adapter + adapter / 4;
    fs.resize(&format!("{}k", journal_only / 1024));
    let o = extract(root, &out2, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.success() {
        panic!("the run fit in {journal_only} bytes; the test's sizes need adjusting");
    }
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!out2.join("adapter_config.json").exists());
    fs.resize(&format!("{}k", adapter * 4 / 1024 + 1024));
    let o = extract(root, &out2, &["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(adapter_bytes(&out2) == adapter_bytes(&reference));
}
