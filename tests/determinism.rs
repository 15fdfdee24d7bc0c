//! Determinism on the CPU path: the same inputs and seed give a bitwise identical adapter
//! whatever the thread count (rayon's pool) and the number of tensors in flight.

mod common;

use std::path::Path;

fn extract_with(b: &Path, f: &Path, out: &Path, threads: usize, in_flight: &str) -> Vec<u8> {
    let o = common::phlora_cmd()
        .env("RAYON_NUM_THREADS", threads.to_string())
        .args([
            "extract",
            "--base",
            b.to_str().unwrap(),
            "--ft",
            f.to_str().unwrap(),
        ])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--rank",
            "8",
            "--device",
            "cpu",
        ])
        .args([
            "--in-flight",
            in_flight,
            "--quiet",
            "--force",
            "--seed",
            "7",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    bytes.extend(std::fs::read(out.join("adapter_config.json")).unwrap());
    bytes
}

#[test]
fn the_adapter_does_not_depend_on_threads_or_tensors_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    common::synth_pair(dir.path(), "determinism", 256, 2);
    let (b, f) = (dir.path().join("base"), dir.path().join("ft"));
    let out = dir.path().join("adapter");
    let first = extract_with(&b, &f, &out, 1, "1");
    for (threads, in_flight) in [(2, "2"), (3, "1"), (8, "3")] {
        let again = extract_with(&b, &f, &out, threads, in_flight);
        assert!(
            again == first,
            "{threads} threads, {in_flight} in flight: the adapter differs from 1 thread, 1 in flight"
        );
    }
}
