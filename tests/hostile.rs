//! Hostile inputs: crafted and randomly mutated checkpoints and indexes. Every case must end in
//! a clear error that names the file (and the tensor where there is one) or in a correct
//! result — never a panic, a hang or an unbounded allocation. The mutation loop is a seeded,
//! stable-toolchain stand-in for `fuzz/` (cargo fuzz), which needs nightly.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use common::*;
use phlora::checkpoint::{Checkpoint, DType};
use phlora::extract::extract;
use phlora::plan::{Plan, PlanOptions};
use phlora::report::TensorAction;
use phlora::verify::CheckKind;

/// A safetensors file from a raw header and data, with no validation at all.
fn raw_file(path: &Path, header: &[u8], data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// Opens a checkpoint, plans it against itself and reads every tensor's bytes: the result, or
/// the panic message as an Err.
fn open_and_read(path: &Path) -> Result<phlora::error::Result<usize>, String> {
    catch_unwind(AssertUnwindSafe(|| {
        let ck = Checkpoint::open(path)?;
        Plan::build(&ck, &ck, &PlanOptions::all())?;
        let mut sum = 0usize;
        for t in ck.tensors() {
            sum = sum.wrapping_add(ck.bytes(t).iter().map(|&b| b as usize).sum::<usize>());
        }
        Ok(sum)
    }))
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// Opening `path` must fail with an error that names the file and says `what`.
fn refused(path: &Path, what: &str) {
    let e = match open_and_read(path) {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(_)) => panic!(
            "{} was accepted; expected an error saying {what:?}",
            path.display()
        ),
        Err(p) => panic!("{} panicked: {p}", path.display()),
    };
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(e.contains(&*name), "the error names the file: {e}");
    assert!(e.contains(what), "expected {what:?} in: {e}");
}

#[test]
fn crafted_headers_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let t = |off: [usize; 2]| {
        format!(
            r#"{{"w":{{"dtype":"F32","shape":[2,2],"data_offsets":[{},{}]}}}}"#,
            off[0], off[1]
        )
    };

    // A length prefix far beyond the file, or beyond what any header may be: refused before
    // anything of that size is allocated.
    for (name, n) in [("huge.safetensors", u64::MAX), ("big.safetensors", 1 << 40)] {
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(p(name), bytes).unwrap();
        refused(&p(name), "not a valid safetensors file");
    }
    std::fs::write(p("short.safetensors"), [1u8, 2, 3]).unwrap();
    refused(&p("short.safetensors"), "too short");

    let overlap = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    raw_file(&p("overlap.safetensors"), overlap, &[0u8; 24]);
    refused(&p("overlap.safetensors"), "overlap");

    // 12 bytes for an F32 [2, 2] (16 needed).
    raw_file(&p("count.safetensors"), t([0, 12]).as_bytes(), &[0u8; 12]);
    refused(&p("count.safetensors"), "byte count");

    raw_file(&p("utf8.safetensors"), b"{\"\xff\xfe\":{}}", &[]);
    refused(&p("utf8.safetensors"), "not a valid safetensors file");

    raw_file(&p("array.safetensors"), b"[1, 2, 3]", &[]);
    refused(&p("array.safetensors"), "not a valid safetensors file");

    raw_file(
        &p("dtype.safetensors"),
        br#"{"w":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}"#,
        &[0u8; 4],
    );
    refused(&p("dtype.safetensors"), "not a valid safetensors file");

    // A shape whose element count overflows usize.
    raw_file(
        &p("overflow.safetensors"),
        br#"{"w":{"dtype":"F32","shape":[18446744073709551615,18446744073709551615],"data_offsets":[0,4]}}"#,
        &[0u8; 4],
    );
    refused(&p("overflow.safetensors"), "not a valid safetensors file");

    // Trailing bytes the header does not cover.
    raw_file(&p("padded.safetensors"), t([0, 16]).as_bytes(), &[0u8; 20]);
    refused(&p("padded.safetensors"), "not a valid safetensors file");
}

#[test]
fn hostile_folders_and_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    // A symlink loop, as the model file and as the folder itself.
    let looped = root.join("loop");
    std::fs::create_dir_all(&looped).unwrap();
    std::os::unix::fs::symlink("model.safetensors", looped.join("model.safetensors")).unwrap();
    let e = open_and_read(&looped)
        .expect("no panic")
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::os::unix::fs::symlink(root.join("self"), root.join("self")).unwrap();
    let e = open_and_read(&root.join("self"))
        .expect("no panic")
        .unwrap_err()
        .to_string();
    assert!(e.contains("self"), "{e}");

    // Indexes: not JSON, an empty weight_map, a shard outside the folder, a shard that is a
    // folder, a tensor its shard does not hold.
    let sharded = root.join("sharded");
    write_sharded(
        &sharded,
        &[
            tensor("a", DType::F32, &[2, 2], vec![1.0; 4]),
            tensor("b", DType::F32, &[2], vec![2.0; 2]),
        ],
        1,
    );
    let index = sharded.join("model.safetensors.index.json");
    let good = std::fs::read_to_string(&index).unwrap();
    let cases: [(&str, &str); 5] = [
        ("{not json", "not a valid index file"),
        (r#"{"weight_map": {}}"#, "weight_map is empty"),
        (
            r#"{"weight_map": {"a": "../escape.safetensors"}}"#,
            "outside the model folder",
        ),
        (r#"{"weight_map": {"a": "."}}"#, "is not a regular file"),
        (
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}}"#,
            "does not",
        ),
    ];
    for (text, what) in cases {
        std::fs::write(&index, text).unwrap();
        let e = match open_and_read(&sharded) {
            Ok(Err(e)) => e.to_string(),
            other => panic!("{text}: {:?}", other.map(|r| r.map(|_| ()))),
        };
        assert!(
            e.contains("model.safetensors.index.json") && e.contains(what),
            "{text}: {e}"
        );
    }
    std::fs::write(&index, &good).unwrap();
    assert!(matches!(open_and_read(&sharded), Ok(Ok(_))));
    // A shard that is a folder.
    std::fs::create_dir_all(sharded.join("dir.safetensors")).unwrap();
    std::fs::write(&index, r#"{"weight_map": {"a": "dir.safetensors"}}"#).unwrap();
    let e = open_and_read(&sharded)
        .expect("no panic")
        .unwrap_err()
        .to_string();
    assert!(e.contains("dir.safetensors"), "{e}");
}

/// Zero-size tensors, 1×1 and 1×n matrices, a 0-dim scalar: extracted without a panic, and
/// what changed is carried exactly (rank 1 suffices for every one of these).
#[test]
fn degenerate_shapes_extract_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fresh_seed("degenerate");
    let shapes: [(&str, Vec<usize>); 7] = [
        ("model.layers.0.self_attn.q_proj.weight", vec![1, 1]),
        ("model.layers.0.self_attn.k_proj.weight", vec![1, 7]),
        ("model.layers.0.self_attn.v_proj.weight", vec![7, 1]),
        ("model.layers.0.self_attn.o_proj.weight", vec![0, 4]),
        ("model.layers.0.mlp.up_proj.weight", vec![4, 0]),
        ("model.layers.0.input_layernorm.weight", vec![0]),
        ("model.scale", vec![]),
    ];
    let (b, f) = write_single_pair(dir.path(), &shapes, seed, |_, b| {
        b.iter().map(|x| x + 0.5).collect()
    });
    let out = dir.path().join("adapter");
    let st = cpu_settings(&b, &f, &out, 1);
    let report = catch_unwind(AssertUnwindSafe(|| extract(&st)))
        .expect("no panic")
        .unwrap();
    for row in &report.tensors {
        if row.action == TensorAction::Lora {
            // A constant shift of a 1×n or n×1 matrix is rank 1: carried exactly.
            assert!(row.residual.unwrap() < 1e-5, "{row:?}");
        }
    }
    let by = |n: &str| report.tensors.iter().find(|t| t.name == n).unwrap();
    assert_eq!(
        by("model.layers.0.self_attn.q_proj.weight").action,
        TensorAction::Lora
    );
    assert_eq!(
        by("model.layers.0.self_attn.o_proj.weight").action,
        TensorAction::Unchanged
    );
    let v = verify_pair(&b, &f, &out).unwrap();
    assert!(
        v.tensors
            .iter()
            .filter(|t| t.kind == CheckKind::Lora)
            .all(|t| t.rel_error_delta < 1e-5),
        "{:?}",
        v.tensors
    );
}

/// Seeded mutations of a valid two-shard checkpoint (header bytes, lengths, offsets, data,
/// truncation, index text): each must open, plan and read cleanly, or be refused with an
/// error — no panic. The seed is printed; a failure names the case to replay.
#[test]
fn mutated_checkpoints_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fresh_seed("mutations");
    let good = dir.path().join("good");
    write_sharded(
        &good,
        &[
            tensor(
                "model.layers.0.self_attn.q_proj.weight",
                DType::BF16,
                &[4, 4],
                normal(16, seed),
            ),
            tensor(
                "model.layers.0.input_layernorm.weight",
                DType::F16,
                &[4],
                normal(4, seed + 1),
            ),
            tensor(
                "model.embed_tokens.weight",
                DType::F32,
                &[8, 4],
                normal(32, seed + 2),
            ),
        ],
        2,
    );
    let files: Vec<PathBuf> = {
        let mut v: Vec<_> = std::fs::read_dir(&good)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut rng = phlora::rng::Rng::new(seed);
    let mut below = |n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
    let (mut opened, mut refused) = (0, 0);
    for case in 0..4000 {
        let case_dir = dir.path().join("case");
        let _ = std::fs::remove_dir_all(&case_dir);
        std::fs::create_dir_all(&case_dir).unwrap();
        let victim = below(files.len());
        for (k, (f, bytes)) in files.iter().zip(&originals).enumerate() {
            let mut bytes = bytes.clone();
            if k == victim {
                // Mostly the header and its length: that is where parsing happens.
                let header_end = if f.extension().is_some_and(|e| e == "json") {
                    bytes.len()
                } else {
                    (8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize)
                        .min(bytes.len())
                };
                match below(6) {
                    0 => {
                        let at = below(header_end);
                        bytes[at] = below(256) as u8;
                    }
                    1 => {
                        // A digit in the header: offsets, shapes and lengths change.
                        let digits: Vec<usize> = (0..header_end)
                            .filter(|&i| bytes[i].is_ascii_digit())
                            .collect();
                        if !digits.is_empty() {
                            let at = digits[below(digits.len())];
                            bytes[at] = b'0' + below(10) as u8;
                        }
                    }
                    2 => bytes.truncate(below(bytes.len())),
                    3 => bytes.extend(std::iter::repeat_n(0u8, 1 + below(64))),
                    4 => {
                        let at = below(8.min(bytes.len()));
                        bytes[at] = below(256) as u8;
                    }
                    _ => {
                        for _ in 0..1 + below(8) {
                            let at = below(bytes.len());
                            bytes[at] ^= 1 << below(8);
                        }
                    }
                }
            }
            std::fs::write(case_dir.join(f.file_name().unwrap()), bytes).unwrap();
        }
        match open_and_read(&case_dir) {
            Ok(Ok(_)) => opened += 1,
            Ok(Err(e)) => {
                refused += 1;
                let msg = e.to_string();
                assert!(
                    msg.contains(&*case_dir.to_string_lossy()),
                    "case {case} (seed {seed}): the error does not name the file: {msg}"
                );
            }
            Err(p) => panic!("case {case} (seed {seed}) panicked: {p}"),
        }
    }
    // Both outcomes occur, or the mutations are not reaching the parser.
    assert!(
        opened > 50 && refused > 50,
        "opened {opened}, refused {refused}"
    );
}

/// Seeded mutations of an adapter (its config, its factors): verify reads each
/// one to a report or refuses it with an error — no panic.
#[test]
fn mutated_adapters_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let seed = fresh_seed("adapter-mutations");
    let names = [
        ("model.embed_tokens.weight", vec![8, 4]),
        ("model.layers.0.self_attn.q_proj.weight", vec![4, 4]),
        ("model.layers.0.input_layernorm.weight", vec![4]),
    ];
    let (b, f) = write_single_pair(dir.path(), &names, seed, |k, b| {
        b.iter()
            .zip(normal(b.len(), seed + 10 + k as u64))
            .map(|(x, y)| x + 0.1 * y)
            .collect()
    });
    let mut rng = phlora::rng::Rng::new(seed);
    let mut below = |n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
    // The single file, and shards with their index (--max-shard-size).
    for (layout, max_shard_size) in [("single", None), ("sharded", Some(1))] {
        let good = dir.path().join(format!("adapter-{layout}"));
        let mut st = cpu_settings(&b, &f, &good, 2);
        st.max_shard_size = max_shard_size;
        extract(&st).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(&good)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("adapter_"))
            .collect();
        files.sort();
        assert!(
            files.len() >= if max_shard_size.is_some() { 4 } else { 2 },
            "{files:?}"
        );
        let originals: Vec<Vec<u8>> = files
            .iter()
            .map(|n| std::fs::read(good.join(n)).unwrap())
            .collect();
        let (mut read, mut refused) = (0, 0);
        let mut converted = 0;
        let case_dir = dir.path().join(format!("case-{layout}"));
        // What convert --to gguf reads of the base: its config, and its weights (they size
        // the tensors saved whole).
        let base_config = dir.path().join("base-config");
        std::fs::create_dir_all(&base_config).unwrap();
        std::fs::copy(&b, base_config.join("model.safetensors")).unwrap();
        std::fs::write(
            base_config.join("config.json"),
            r#"{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 1, "hidden_size": 4, "vocab_size": 8}"#,
        )
        .unwrap();
        let gguf_out = dir.path().join(format!("{layout}.gguf"));
        std::fs::create_dir_all(&case_dir).unwrap();
        for case in 0..600 {
            let victim = below(files.len());
            for (k, (name, bytes)) in files.iter().zip(&originals).enumerate() {
                let mut bytes = bytes.clone();
                if k == victim {
                    match below(3) {
                        0 => {
                            let at = below(bytes.len());
                            bytes[at] = below(256) as u8;
                        }
                        1 => {
                            let digits: Vec<usize> = (0..bytes.len().min(4096))
                                .filter(|&i| bytes[i].is_ascii_digit())
                                .collect();
                            if !digits.is_empty() {
                                let at = digits[below(digits.len())];
                                bytes[at] = b'0' + below(10) as u8;
                            }
                        }
                        _ => bytes.truncate(below(bytes.len())),
                    }
                }
                std::fs::write(case_dir.join(name), bytes).unwrap();
            }
            // `check` reads the same files its own way (any config, any key): an error or a
            // report, never a panic.
            let checked = catch_unwind(AssertUnwindSafe(|| {
                phlora::check::check(&case_dir, Some(&b), &phlora::check::Engine::ALL)
            }));
            assert!(
                checked.is_ok(),
                "{layout} case {case} (seed {seed}): check panicked"
            );
            // So does the GGUF conversion: a file or an error (and then no file).
            let _ = std::fs::remove_file(&gguf_out);
            let gguf = catch_unwind(AssertUnwindSafe(|| {
                phlora::adapter::gguf::convert(&case_dir, &base_config, &gguf_out, None)
            }));
            match gguf {
                Ok(Ok(_)) => converted += 1,
                Ok(Err(_)) => assert!(
                    !gguf_out.exists(),
                    "{layout} case {case}: a failed conversion left a file"
                ),
                Err(_) => panic!("{layout} case {case} (seed {seed}): convert panicked"),
            }
            match catch_unwind(AssertUnwindSafe(|| verify_pair(&b, &f, &case_dir))) {
                Ok(Ok(_)) => read += 1,
                Ok(Err(_)) => refused += 1,
                Err(p) => panic!(
                    "{layout} case {case} (seed {seed}) panicked: {:?}",
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                ),
            }
        }
        assert!(
            read > 20 && refused > 20,
            "{layout}: read {read}, refused {refused}"
        );
        assert!(
            converted > 20 && converted < 600,
            "{layout}: {converted} of 600 converted"
        );
    }
}

/// `b.safetensors` and `f.safetensors` in `dir`, F32: tensor k has seeded normal base values
/// (seed + k) and the fine-tune's `change(k, base)`.
fn write_single_pair(
    dir: &Path,
    shapes: &[(&str, Vec<usize>)],
    seed: u64,
    change: impl Fn(usize, &[f32]) -> Vec<f32>,
) -> (PathBuf, PathBuf) {
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (k, (name, shape)) in shapes.iter().enumerate() {
        let b = normal(shape.iter().product(), seed + k as u64);
        ft.push(tensor(name, DType::F32, shape, change(k, &b)));
        base.push(tensor(name, DType::F32, shape, b));
    }
    let (b, f) = (dir.join("b.safetensors"), dir.join("f.safetensors"));
    write_single(&b, &base);
    write_single(&f, &ft);
    (b, f)
}
