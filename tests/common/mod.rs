//! Helpers shared by the integration tests: small checkpoints from f32 data, adapter
//! readers, seeded random matrices and an f64 reference SVD.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use faer::Mat;
use phlora::checkpoint::dtype::{decode_into, encode_into};
use phlora::checkpoint::writer::{write_file, HeaderEntry};
use phlora::checkpoint::DType;

/// A tensor to write: name, dtype, shape, values (row-major).
pub type T = (String, DType, Vec<usize>, Vec<f32>);

pub fn tensor(name: &str, dtype: DType, shape: &[usize], values: Vec<f32>) -> T {
    assert_eq!(shape.iter().product::<usize>(), values.len());
    (name.to_string(), dtype, shape.to_vec(), values)
}

fn entries(tensors: &[T]) -> Vec<(HeaderEntry, Vec<u8>)> {
    tensors
        .iter()
        .map(|(name, dtype, shape, values)| {
            let mut bytes = Vec::new();
            encode_into(*dtype, values, &mut bytes);
            (
                HeaderEntry {
                    name: name.clone(),
                    dtype: dtype.as_str(),
                    shape: shape.clone(),
                    nbytes: bytes.len(),
                },
                bytes,
            )
        })
        .collect()
}

/// Writes a single-file checkpoint.
pub fn write_single(path: &Path, tensors: &[T]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_file(path, &entries(tensors), &BTreeMap::new()).unwrap();
}

/// Writes a sharded model folder with an index, `per_shard` tensors per shard.
pub fn write_sharded(dir: &Path, tensors: &[T], per_shard: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let chunks: Vec<&[T]> = tensors.chunks(per_shard).collect();
    let mut weight_map = BTreeMap::new();
    for (k, chunk) in chunks.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", k + 1, chunks.len());
        write_file(&dir.join(&name), &entries(chunk), &BTreeMap::new()).unwrap();
        for t in *chunk {
            weight_map.insert(t.0.clone(), name.clone());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// Seeded N(0, 1) values.
pub fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = phlora::rng::Rng::new(seed);
    let mut v = vec![0f32; n];
    rng.fill_normal(&mut v);
    v
}

/// A fresh seed per call site and run (tests must not depend on one lucky seed), derived from
/// a run seed that `PHLORA_TEST_SEED` replays: every seed is printed with the run seed, so a
/// failure's output says how to repeat it exactly.
pub fn fresh_seed(tag: &str) -> u64 {
    // One run seed per test process, so that one PHLORA_TEST_SEED replays every test in it.
    static RUN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let run = *RUN.get_or_init(|| match std::env::var("PHLORA_TEST_SEED") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("PHLORA_TEST_SEED={v}: expected an unsigned integer")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    });
    let seed = phlora::rng::seed_for(run, tag);
    eprintln!("{tag}: seed {seed} (replay with PHLORA_TEST_SEED={run})");
    seed
}

/// m×n = Σ_i σ_i u_i v_iᵀ (orthonormal u, v) + noise·N(0,1), as f64.
pub fn spectrum_matrix(m: usize, n: usize, sigma: &[f64], noise: f64, seed: u64) -> Mat<f64> {
    let r = sigma.len();
    let u = orthonormal(m, r, seed);
    let v = orthonormal(n, r, seed ^ 0x55);
    let g = normal(m * n, seed ^ 0xAA);
    Mat::from_fn(m, n, |i, j| {
        (0..r)
            .map(|k| u[(i, k)] * sigma[k] * v[(j, k)])
            .sum::<f64>()
            + noise * g[i * n + j] as f64
    })
}

pub fn orthonormal(m: usize, r: usize, seed: u64) -> Mat<f64> {
    let g = normal(m * r, seed);
    let a = Mat::<f64>::from_fn(m, r, |i, j| g[i * r + j] as f64);
    if r == 0 {
        return a;
    }
    faer::linalg::solvers::Qr::new(a.as_ref()).compute_thin_Q()
}

/// Singular values of an f64 matrix, descending (the exact reference).
pub fn singular_values(a: &Mat<f64>) -> Vec<f64> {
    a.as_ref().singular_values().unwrap()
}

/// The Eckart–Young optimum: ‖A − A_r‖ / ‖A‖.
pub fn optimum(s: &[f64], r: usize) -> f64 {
    let total: f64 = s.iter().map(|x| x * x).sum();
    let tail: f64 = s.iter().skip(r).map(|x| x * x).sum();
    if total == 0.0 {
        0.0
    } else {
        (tail / total).sqrt()
    }
}

/// Row-major f32 bytes of an f64 matrix.
/// The same matrix in f32.
pub fn to_f32(a: &Mat<f64>) -> Mat<f32> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] as f32)
}

/// σᵢ = (1 + i)^-exponent for i < len: a decaying spectrum like a fine-tuning delta's.
pub fn power_law(len: usize, exponent: f64) -> Vec<f64> {
    (0..len).map(|i| (1.0 + i as f64).powf(-exponent)).collect()
}

pub fn to_row_major_f32(a: &Mat<f64>) -> Vec<f32> {
    let mut v = Vec::with_capacity(a.nrows() * a.ncols());
    for i in 0..a.nrows() {
        for j in 0..a.ncols() {
            v.push(a[(i, j)] as f32);
        }
    }
    v
}

/// One tensor read back from a safetensors file.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Reads every tensor of a safetensors file with the safetensors crate (an independent reader).
pub fn read_safetensors(path: &Path) -> HashMap<String, Loaded> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = DType::from_safetensors(view.dtype()).expect("float tensor");
            let mut values = vec![0f32; view.shape().iter().product()];
            decode_into(dtype, view.data(), &mut values);
            (
                name,
                Loaded {
                    dtype: dtype.as_str().to_string(),
                    shape: view.shape().to_vec(),
                    values,
                },
            )
        })
        .collect()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// CUDA device 0 when PHLORA_TEST_DEVICE=cuda (the test fails if it is not usable), else None.
pub fn test_cuda(tf32: bool) -> Option<phlora::backend::Cuda> {
    match std::env::var("PHLORA_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            let options = phlora::backend::CudaOptions {
                tf32,
                ..Default::default()
            };
            Some(phlora::backend::Cuda::new(0, options).unwrap_or_else(|e| {
                panic!("PHLORA_TEST_DEVICE=cuda, but the GPU is not usable: {e}")
            }))
        }
        Ok("cpu") | Ok("") | Err(_) => None,
        Ok(other) => panic!("PHLORA_TEST_DEVICE={other}: expected cuda or cpu"),
    }
}

/// CUDA device 0 for a GPU-only test. Those are `#[ignore]`d, so a CPU machine shows them as
/// ignored, never as passed; one asked to run without
/// PHLORA_TEST_DEVICE=cuda it fails, saying how to run it, instead of passing.
pub fn require_cuda(tf32: bool) -> phlora::backend::Cuda {
    test_cuda(tf32).unwrap_or_else(|| {
        panic!("this test needs a GPU: run it with PHLORA_TEST_DEVICE=cuda (and --include-ignored)")
    })
}

/// Runs a generic test body on the CPU, and on CUDA device 0 (plain f32 GEMMs, so tolerances
/// are the CPU's) when PHLORA_TEST_DEVICE=cuda.
#[macro_export]
macro_rules! on_every_device {
    ($body:ident) => {{
        $body(&phlora::backend::Cpu::new());
        if let Some(gpu) = common::test_cuda(false) {
            $body(&gpu);
        }
    }};
}

/// Runs the binary under test; PHLORA_BIN overrides the build path (a GPU host runs the test
/// binaries from another folder).
pub fn phlora(args: &[&str]) -> std::process::Output {
    phlora_cmd().args(args).output().unwrap()
}

/// The binary under test as a command, for tests that set its environment or folder.
pub fn phlora_cmd() -> std::process::Command {
    let bin = std::env::var_os("PHLORA_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_phlora")));
    std::process::Command::new(bin)
}

/// Copies the files of a folder (not its subfolders) into `to`; `keep_mtime` as `cp -p` does.
pub fn copy_files(from: &Path, to: &Path, keep_mtime: bool) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if !e.path().is_file() {
            continue;
        }
        let dst = to.join(e.file_name());
        std::fs::copy(e.path(), &dst).unwrap();
        if keep_mtime {
            let mtime = e.metadata().unwrap().modified().unwrap();
            let f = std::fs::File::options().write(true).open(&dst).unwrap();
            f.set_modified(mtime).unwrap();
        }
    }
}

/// `phlora extract` of the pair ROOT/base, ROOT/ft into OUT on the CPU, with more arguments.
pub fn extract_cmd(root: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = phlora_cmd();
    cmd.arg("extract")
        .arg("--base")
        .arg(root.join("base"))
        .arg("--ft")
        .arg(root.join("ft"))
        .arg("--out")
        .arg(out)
        .args(["--device", "cpu"])
        .args(extra);
    cmd
}

/// [`extract_cmd`], quietly, with environment variables; run to its end.
pub fn extract_pair(
    root: &Path,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    extract_cmd(root, out, &[&["--quiet"][..], extra].concat())
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// A small Llama-shaped synth pair in ROOT/base and ROOT/ft (fresh seed for `tag`).
pub fn synth_pair(root: &Path, tag: &str, hidden: usize, layers: usize) {
    synth_pair_with(root, tag, hidden, layers, &[]);
}

/// [`synth_pair`] with more `phlora synth` arguments (e.g. `--tie-embeddings`).
pub fn synth_pair_with(root: &Path, tag: &str, hidden: usize, layers: usize, extra: &[&str]) {
    let (seed, hidden, inter, layers) = (
        fresh_seed(tag).to_string(),
        hidden.to_string(),
        (2 * hidden).to_string(),
        layers.to_string(),
    );
    let o = phlora(
        &[
            "synth",
            "--out",
            root.to_str().unwrap(),
            "--hidden",
            &hidden,
            "--intermediate",
            &inter,
            "--layers",
            &layers,
            "--vocab",
            "1024",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--seed",
            &seed,
            "--quiet",
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Extract settings for the CPU at rank `rank`.
pub fn cpu_settings(
    base: &Path,
    ft: &Path,
    out: &Path,
    rank: usize,
) -> phlora::extract::ExtractSettings {
    let mut st = phlora::extract::ExtractSettings::new(
        base.to_path_buf(),
        ft.to_path_buf(),
        out.to_path_buf(),
        rank,
    );
    st.device = phlora::backend::Device::Cpu;
    st
}

/// The adapter's two files, concatenated: what "byte for byte the same adapter" compares.
pub fn adapter_bytes(out: &Path) -> Vec<u8> {
    let mut b = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    b.extend(std::fs::read(out.join("adapter_config.json")).unwrap());
    b
}

/// `phlora merge --base BASE --adapter ADAPTER --out OUT` with more arguments, run to its end.
pub fn merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    phlora_cmd()
        .arg("merge")
        .arg("--base")
        .arg(base)
        .arg("--adapter")
        .arg(adapter)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// [`merge`], which must succeed.
pub fn merge_ok(base: &Path, adapter: &Path, out: &Path) {
    let o = merge(base, adapter, out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Every LoRA module in a verify report (`lora`, `lora-embedding`) reproduces its ΔW to `tol`
/// relative error; the report is printed, after `what`, when one does not.
pub fn assert_lora_within(v: &phlora::verify::VerifyReport, tol: f64, what: &str) {
    // Not vacuous: there must be LoRA rows to hold to the bound.
    assert!(
        v.tensors.iter().any(|t| t.kind.is_lora()),
        "{what}: no LoRA module in the report: {:?}",
        v.tensors
    );
    assert!(
        v.tensors
            .iter()
            .filter(|t| t.kind.is_lora())
            .all(|t| t.rel_error_delta < tol),
        "{what}: {:?}",
        v.tensors
    );
}

/// verify with no thresholds: every tensor's figures, for the test to judge.
pub fn verify_pair(
    base: &Path,
    ft: &Path,
    adapter: &Path,
) -> phlora::error::Result<phlora::verify::VerifyReport> {
    phlora::verify::verify(&phlora::verify::VerifySettings {
        base: base.to_path_buf(),
        ft: ft.to_path_buf(),
        adapter: adapter.to_path_buf(),
        min_cos: None,
        max_error: None,
        min_weight_cos: None,
    })
}
