//! Resume: a run killed (abort, as kill -9) or interrupted (SIGINT, as Ctrl-C) after some
//! tensors leaves its journal in OUT and no adapter; `--resume` redoes only the rest, and the
//! adapter is byte for byte the one an uninterrupted run writes. A resume against changed
//! inputs is refused, and a journal is never silently overwritten.

mod common;

use std::path::Path;

/// `phlora extract` on the pair in `root` into `out`, with extra arguments and environment.
fn extract(root: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let args = [&["--rank", "8", "--in-flight", "2"][..], extra].concat();
    common::extract_pair(root, out, &args, env)
}

fn journaled(out: &Path) -> usize {
    std::fs::read_to_string(out.join(".phlora-journal/tensors.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn a_killed_run_resumes_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "resume-kill", 256, 3);
    let whole = root.join("whole");
    let o = extract(root, &whole, &[], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !whole.join(".phlora-journal").exists(),
        "the journal goes once the adapter is in"
    );

    let out = root.join("out");
    let o = extract(root, &out, &[], &[("PHLORA_TEST_CRASH_AFTER", "5")]);
    assert!(!o.status.success());
    assert!(
        !out.join("adapter_config.json").exists(),
        "no adapter after a crash"
    );
    assert!(journaled(&out) >= 5);
    // A torn last record (the crash hit mid-write) is ignored.
    let lines = out.join(".phlora-journal/tensors.jsonl");
    let mut text = std::fs::read(&lines).unwrap();
    text.extend_from_slice(b"{\"index\": 3, \"row\": {\"na");
    std::fs::write(&lines, text).unwrap();

    // Without --resume, the journal is not overwritten by accident.
    let o = extract(root, &out, &[], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--resume"), "{err}");

    let o = extract(root, &out, &["--resume"], &[]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        common::adapter_bytes(&out) == common::adapter_bytes(&whole),
        "the resumed adapter differs"
    );
    assert!(!out.join(".phlora-journal").exists());
    assert!(
        std::fs::read_dir(&out).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".phlora")),
        "a killed run's staging folder is cleaned up"
    );
}

/// A journal whose bytes rotted or whose record lies (a reversed byte range): the record fails
/// its checks, it and the later ones are computed again, and the adapter is still the
/// uninterrupted run's. Without the checksum the flipped byte would reach the adapter; a record
/// that has none (an older journal) is computed again too.
#[test]
fn a_corrupt_journal_record_is_computed_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "resume-corrupt", 256, 3);
    let whole = root.join("whole");
    assert!(extract(root, &whole, &[], &[]).status.success());
    for (case, corrupt) in [
        ("a flipped factor byte", 0usize),
        ("a reversed byte range", 1),
        ("a flipped byte in a record without its checksum", 2),
    ] {
        let out = root.join(format!("out{corrupt}"));
        let o = extract(root, &out, &[], &[("PHLORA_TEST_CRASH_AFTER", "6")]);
        assert!(!o.status.success());
        let journal = out.join(".phlora-journal");
        let text = std::fs::read_to_string(journal.join("tensors.jsonl")).unwrap();
        let mut lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // The third record with factors.
        let victim = lines
            .iter()
            .enumerate()
            .filter(|(_, r)| !r["factors"].is_null())
            .nth(2)
            .map(|(i, _)| i)
            .expect("three records with factors");
        let (from, to) = (
            lines[victim]["factors"]["a"][0].as_u64().unwrap(),
            lines[victim]["factors"]["a"][1].as_u64().unwrap(),
        );
        if corrupt == 0 || corrupt == 2 {
            let data = journal.join("tensors.bin");
            let mut bytes = std::fs::read(&data).unwrap();
            bytes[((from + to) / 2) as usize] ^= 0x40;
            std::fs::write(&data, bytes).unwrap();
        }
        if corrupt == 2 {
            // As an older journal has it: no checksum to catch the flip, so not trusted.
            lines[victim]
                .as_object_mut()
                .unwrap()
                .remove("sum")
                .unwrap();
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            std::fs::write(journal.join("tensors.jsonl"), text).unwrap();
        } else if corrupt == 1 {
            lines[victim]["factors"]["a"] = serde_json::json!([to, from]);
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            std::fs::write(journal.join("tensors.jsonl"), text).unwrap();
        }
        let o = extract(root, &out, &["--resume"], &[]);
        assert!(
            o.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            common::adapter_bytes(&out) == common::adapter_bytes(&whole),
            "{case}: the resumed adapter differs"
        );
    }
}

#[test]
fn an_interrupted_run_stops_cleanly_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "resume-sigint", 256, 3);
    let whole = root.join("whole");
    assert!(extract(root, &whole, &[], &[]).status.success());
    let out = root.join("out");
    let o = extract(root, &out, &[], &[("PHLORA_TEST_INTERRUPT_AFTER", "4")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted") && err.contains("--resume"),
        "{err}"
    );
    assert!(!out.join("adapter_config.json").exists());
    let kept = journaled(&out);
    assert!(kept >= 4, "{kept}");
    let o = extract(root, &out, &["--resume"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(common::adapter_bytes(&out) == common::adapter_bytes(&whole));
}

#[test]
fn a_resume_against_changed_inputs_or_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "resume-changed", 256, 3);
    let out = root.join("out");
    let o = extract(root, &out, &[], &[("PHLORA_TEST_CRASH_AFTER", "2")]);
    assert!(!o.status.success());
    // Other settings.
    let o = extract(root, &out, &["--resume", "--seed", "9"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    // Named field by field: the seed is in the SVD's settings.
    assert!(
        !o.status.success() && err.contains("settings differ (svd)"),
        "{err}"
    );
    // A journal of an older format (settings as a Debug string, no format number) is refused
    // by name, not misread.
    let fp = out.join(".phlora-journal").join("inputs.json");
    let mut old = common::read_json(&fp);
    let kept = old.clone();
    old.as_object_mut().unwrap().remove("format");
    old["settings"] = serde_json::json!("Fixed(16) | SvdSettings { … }");
    std::fs::write(&fp, old.to_string()).unwrap();
    let o = extract(root, &out, &["--resume"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("journal is of format 0") && err.contains("--force"),
        "{err}"
    );
    std::fs::write(&fp, kept.to_string()).unwrap();
    // A changed fine-tune (rewritten: new mtime).
    let ft = std::fs::read_dir(root.join("ft"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let bytes = std::fs::read(&ft).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&ft, &bytes).unwrap();
    let o = extract(root, &out, &["--resume"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("changed"), "{err}");
    assert!(
        err.contains(".safetensors changed"),
        "names the file: {err}"
    );
    // --force starts over.
    let o = extract(root, &out, &["--force"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // --resume with no journal says so.
    let o = extract(root, &out, &["--resume"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no journal"), "{err}");
}

/// A write that fails (here: a file-size limit, EFBIG, standing in for a full disk) ends the
/// run with an error that names the file; OUT holds no adapter and no staging folder, the
/// journal keeps what was finished, and `--resume` completes to the same bytes.
#[test]
fn a_failed_write_leaves_nothing_half_written_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::synth_pair(root, "resume-efbig", 256, 3);
    let whole = root.join("whole");
    assert!(extract(root, &whole, &[], &[]).status.success());
    let out = root.join("out");
    // bash: ulimit -f counts 1024-byte blocks; SIGXFSZ ignored, so write() fails with EFBIG.
    let script = format!(
        "ulimit -f 96; trap '' XFSZ; exec {} extract --base {} --ft {} --out {} --rank 8 --device cpu --in-flight 2 --quiet",
        common::phlora_cmd().get_program().to_string_lossy(),
        root.join("base").display(),
        root.join("ft").display(),
        out.display()
    );
    let o = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&*out.to_string_lossy()) && err.contains("cannot"),
        "{err}"
    );
    assert!(!out.join("adapter_config.json").exists());
    assert!(!out.join("adapter_model.safetensors").exists());
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".phlora-journal")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let o = extract(root, &out, &["--resume"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(common::adapter_bytes(&out) == common::adapter_bytes(&whole));
}

/// Tied embeddings: the lm_head's LoRA is derived from the embedding's and journaled right
/// after it. A crash between the two leaves the embedding without its copy; the resume derives
/// it, and the adapter is still the uninterrupted run's.
#[test]
fn a_crash_between_a_tied_embedding_and_its_lm_head_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let seed = common::fresh_seed("resume-tied").to_string();
    let o = common::phlora(&[
        "synth",
        "--out",
        root.to_str().unwrap(),
        "--hidden",
        "128",
        "--intermediate",
        "256",
        "--layers",
        "2",
        "--vocab",
        "2048",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--tie-embeddings",
        "--seed",
        &seed,
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let whole = root.join("whole");
    assert!(extract(root, &whole, &[], &[]).status.success());
    // A run that crashed with everything journaled, cut back to end right after the
    // embedding's record: what a crash between the embedding and its lm_head leaves.
    let out = root.join("out");
    let records = out.join(".phlora-journal/tensors.jsonl");
    let total = 21; // 2 layers × 9, the embedding, the final norm, lm_head
    let o = extract(
        root,
        &out,
        &[],
        &[("PHLORA_TEST_CRASH_AFTER", &total.to_string())],
    );
    assert!(
        !o.status.success(),
        "the run should have stopped after its last record"
    );
    let text = std::fs::read_to_string(&records).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), total);
    let embedding = lines
        .iter()
        .position(|l| l.contains("\"name\":\"model.embed_tokens.weight\""))
        .expect("the embedding is journaled");
    assert!(
        lines[embedding + 1].contains("\"name\":\"lm_head.weight\""),
        "the tied lm_head is journaled right after its embedding"
    );
    let cut: String = lines[..=embedding]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&records, cut).unwrap();
    let o = extract(root, &out, &["--resume"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        common::adapter_bytes(&out) == common::adapter_bytes(&whole),
        "the resumed adapter differs"
    );
}
