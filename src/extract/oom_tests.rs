//! The out-of-memory retry, on a CPU backend that plays a device with little memory: its ΔW
//! allocation fails above a size, as cudaMalloc would.

use std::sync::atomic::{AtomicUsize, Ordering};

use faer::{Mat, MatRef};

use super::*;
use crate::backend::cpu::CpuMat;
use crate::backend::{
    Backend, BackendError, BackendResult, Cpu, DeltaInput, DeltaStats, Op, SvdParts,
};

struct SmallDevice {
    cpu: Cpu,
    /// ΔW blocks above this many elements fail with an out-of-memory error.
    max_elems: usize,
    /// Shared, so a test can read it after the run has consumed the device.
    refusals: std::sync::Arc<AtomicUsize>,
    /// Calls of return_cached_memory (the pool trim before each retry).
    trims: std::sync::Arc<AtomicUsize>,
    /// What memory_overhead reports for one worker (context and its buffers, on a GPU).
    overhead: u64,
    /// A ΔW of this shape is refused once (memory that tensors beside it held), then fits.
    refuse_once: Option<(usize, usize)>,
    refused_once: std::sync::atomic::AtomicBool,
    /// The last keep_cached_memory (the pool's release threshold).
    kept: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// A ΔW of this shape panics (a bug in a backend).
    panic_on: Option<(usize, usize)>,
}

impl SmallDevice {
    fn new(max_elems: usize) -> SmallDevice {
        SmallDevice {
            cpu: Cpu::new(),
            max_elems,
            refusals: Default::default(),
            trims: Default::default(),
            overhead: 0,
            refuse_once: None,
            refused_once: Default::default(),
            kept: Default::default(),
            panic_on: None,
        }
    }
}

impl crate::backend::DeviceMemory for SmallDevice {
    fn delta_in_host_memory(&self) -> bool {
        false
    }

    fn memory_overhead(&self, workers: usize) -> u64 {
        self.overhead * workers as u64
    }

    fn keep_cached_memory(&self, bytes: u64) -> BackendResult<()> {
        self.kept.store(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn return_cached_memory(&self) -> BackendResult<()> {
        self.trims.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl crate::factor::Factoring for SmallDevice {}

impl Backend for SmallDevice {
    type Mat = CpuMat;
    fn name(&self) -> String {
        "small-device".into()
    }
    fn shape(&self, a: &CpuMat) -> (usize, usize) {
        self.cpu.shape(a)
    }
    fn upload(&self, host: MatRef<'_, f32>) -> BackendResult<CpuMat> {
        self.cpu.upload(host)
    }
    fn download(&self, a: &CpuMat) -> BackendResult<Mat<f32>> {
        self.cpu.download(a)
    }
    fn delta(&self, input: &DeltaInput<'_>) -> BackendResult<(CpuMat, DeltaStats)> {
        if self.panic_on == Some((input.rows, input.cols)) {
            panic!("simulated bug on a {}×{} ΔW", input.rows, input.cols);
        }
        if self.refuse_once == Some((input.rows, input.cols))
            && !self.refused_once.swap(true, Ordering::Relaxed)
        {
            self.refusals.fetch_add(1, Ordering::Relaxed);
            return Err(BackendError::out_of_memory("simulated: held by others"));
        }
        if input.rows * input.cols > self.max_elems {
            self.refusals.fetch_add(1, Ordering::Relaxed);
            return Err(BackendError::out_of_memory(format!(
                "simulated: no room for {} elements",
                input.rows * input.cols
            )));
        }
        self.cpu.delta(input)
    }
    fn first_cols(&self, a: &CpuMat, r: usize) -> BackendResult<CpuMat> {
        self.cpu.first_cols(a, r)
    }
    fn gemm(&self, a: &CpuMat, op_a: Op, b: &CpuMat, op_b: Op) -> BackendResult<CpuMat> {
        self.cpu.gemm(a, op_a, b, op_b)
    }
    fn plain_copy(&self, a: &CpuMat) -> BackendResult<CpuMat> {
        self.cpu.plain_copy(a)
    }
    fn cholesky_qr_pass(
        &self,
        y: &mut CpuMat,
        accept: &dyn Fn(&[f32]) -> bool,
    ) -> BackendResult<bool> {
        self.cpu.cholesky_qr_pass(y, accept)
    }
    fn householder_q(&self, y: &CpuMat) -> BackendResult<CpuMat> {
        self.cpu.householder_q(y)
    }
    fn thin_svd(&self, a: &CpuMat) -> BackendResult<SvdParts<CpuMat>> {
        self.cpu.thin_svd(a)
    }
    fn gram_eigh(&self, b: &CpuMat) -> BackendResult<(Vec<f64>, Mat<f32>)> {
        self.cpu.gram_eigh(b)
    }
    fn right_vectors(&self, b: &CpuMat, ub: &Mat<f32>, s: &[f64]) -> BackendResult<CpuMat> {
        self.cpu.right_vectors(b, ub, s)
    }
    fn residual_sumsq(&self, d: &CpuMat, b: &CpuMat, a: &CpuMat) -> BackendResult<f64> {
        self.cpu.residual_sumsq(d, b, a)
    }
}

fn pair(dir: &std::path::Path) -> (Checkpoint, Checkpoint, ExtractSettings) {
    let mut synth = crate::synth::SynthSettings::tiny(dir.join("pair"));
    synth.layers = 1;
    synth.vocab = 512;
    let made = crate::synth::synth(&synth).unwrap();
    let s = ExtractSettings::new(made.base, made.ft, dir.join("out"), 8);
    let base = Checkpoint::open(&s.base).unwrap();
    let ft = Checkpoint::open(&s.ft).unwrap();
    (base, ft, s)
}

fn run_on(
    be: SmallDevice,
    s: &ExtractSettings,
    base: &Checkpoint,
    ft: &Checkpoint,
) -> Result<RunReport> {
    let plan = Plan::build(base, ft, &s.plan)?;
    let ran = run(
        &[DeviceWorkers { workers: vec![be] }],
        s,
        base,
        ft,
        &plan,
        &mut false,
    );
    match ran? {
        super::Ran::Adapter(report) => Ok(*report),
        super::Ran::Part(_) => unreachable!("no shard"),
    }
}

#[test]
fn out_of_device_memory_is_retried_in_row_blocks_with_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, mut s) = pair(dir.path());
    let roomy = SmallDevice::new(usize::MAX);
    let free = run_on(roomy, &s, &base, &ft).unwrap();
    // The 512×256 embedding and lm_head (131072 elements) and the 688×256 MLP matrices
    // (176128) do not fit; the 256×256 attention matrices do.
    s.out = dir.path().join("out-small");
    let small = SmallDevice::new(100_000);
    let (refusals, trims) = (small.refusals.clone(), small.trims.clone());
    let report = run_on(small, &s, &base, &ft).unwrap();
    // Each refusal was retried once, after the pool was trimmed.
    let refused = refusals.load(Ordering::Relaxed);
    assert!(refused >= 3, "{refused}");
    assert_eq!(trims.load(Ordering::Relaxed), refused);
    let blocked: Vec<(&str, usize)> = report
        .tensors
        .iter()
        .filter_map(|t| t.row_blocks.map(|r| (t.name.as_str(), r)))
        .collect();
    assert!(
        blocked.iter().any(|(n, _)| n.contains("mlp.up_proj")),
        "{blocked:?}"
    );
    assert!(
        blocked.iter().any(|(n, _)| n.contains("embed_tokens")),
        "{blocked:?}"
    );
    assert!(
        !blocked.iter().any(|(n, _)| n.contains("q_proj")),
        "{blocked:?}"
    );
    for (name, rows) in &blocked {
        let t = report.tensors.iter().find(|t| t.name == *name).unwrap();
        assert!(rows * t.shape[1] <= 100_000, "{name}: {rows} rows");
    }
    for (x, y) in report.tensors.iter().zip(&free.tensors) {
        assert_eq!(x.name, y.name);
        if let (Some(a), Some(b)) = (x.residual, y.residual) {
            assert!((a - b).abs() <= 1e-4 * b + 1e-7, "{}: {a} vs {b}", x.name);
        }
    }
    assert!(s.out.join("adapter_config.json").is_file());
}

#[test]
fn out_of_device_memory_stops_once_the_block_no_longer_dominates_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, s) = pair(dir.path());
    // Nothing fits: every ΔW is refused, however small the block.
    let tiny = SmallDevice::new(10);
    let (refusals, trims) = (tiny.refusals.clone(), tiny.trims.clone());
    let err = run_on(tiny, &s, &base, &ft).unwrap_err().to_string();
    assert!(
        err.contains("ran out of memory") && err.contains("no longer holds most of the memory"),
        "{err}"
    );
    assert!(
        err.contains("simulated") && err.contains("lower the rank"),
        "{err}"
    );
    assert!(!s.out.join("adapter_config.json").exists());
    // The first tensor to fail is refused whole, then once in half-size blocks (which no
    // longer dominate its sketches): 2 tries, not the ~9 halvings down to one row; a second
    // worker's tensor in flight may add its own two.
    let tries = refusals.load(Ordering::Relaxed);
    assert!((2..=4).contains(&tries), "{tries} refusals");
    // Every refusal but the last was retried, after a trim.
    assert_eq!(trims.load(Ordering::Relaxed), tries - 1);
}

#[test]
fn the_device_overhead_comes_off_max_vram_before_the_tensors_share_it() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, mut s) = pair(dir.path());
    let blocked = |r: &RunReport| -> Vec<(String, usize)> {
        r.tensors
            .iter()
            .filter_map(|t| t.row_blocks.map(|b| (t.name.clone(), b)))
            .collect()
    };
    // 700 kB for the tensors: the embedding, lm_head and MLP matrices stream in row blocks.
    let share = 700_000;
    s.max_vram = Some(share);
    let plain = run_on(SmallDevice::new(usize::MAX), &s, &base, &ft).unwrap();
    assert!(!blocked(&plain).is_empty());
    // The same share, on a device whose context and worker take 50 MB first.
    let overhead = 50_000_000;
    let heavy = || SmallDevice {
        overhead,
        ..SmallDevice::new(usize::MAX)
    };
    s.out = dir.path().join("out-heavy");
    s.max_vram = Some(overhead + share);
    let dev = heavy();
    let kept = dev.kept.clone();
    let with_overhead = run_on(dev, &s, &base, &ft).unwrap();
    assert_eq!(blocked(&with_overhead), blocked(&plain));
    // The allocator may keep what the tensors share, no more.
    assert_eq!(kept.load(Ordering::Relaxed), share);
    // A bound the overhead alone fills is refused before any work, and a bound that leaves
    // too little for a tensor is reported as the user's bound, overhead included.
    s.out = dir.path().join("out-none");
    s.max_vram = Some(overhead);
    let err = run_on(heavy(), &s, &base, &ft).unwrap_err().to_string();
    assert!(err.contains("leaves nothing for the tensors"), "{err}");
    s.max_vram = Some(overhead + 1000);
    let err = run_on(heavy(), &s, &base, &ft).unwrap_err().to_string();
    let said = format!(
        "--max-vram {} is too small",
        crate::size::format_size(overhead + 1000)
    );
    assert!(err.contains(&said), "{err}");
    assert!(!s.out.join("adapter_config.json").exists());
}

#[test]
fn a_first_out_of_memory_is_retried_alone_even_when_the_block_does_not_dominate() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, mut s) = pair(dir.path());
    // At rank 32 a 256×256 attention matrix's sketches (~0.9 MB) outweigh its ΔW (256 kB):
    // halving would not help, but the memory may have been others'. One refusal, one trim, one
    // retry alone, whole; the adapter is written.
    s.rank = RankPolicy::Fixed(32);
    let dev = SmallDevice {
        refuse_once: Some((256, 256)),
        ..SmallDevice::new(usize::MAX)
    };
    let (refusals, trims) = (dev.refusals.clone(), dev.trims.clone());
    let report = run_on(dev, &s, &base, &ft).unwrap();
    assert_eq!(refusals.load(Ordering::Relaxed), 1);
    assert_eq!(trims.load(Ordering::Relaxed), 1);
    assert!(report.tensors.iter().all(|t| t.row_blocks.is_none()));
    assert!(s.out.join("adapter_config.json").is_file());
}

#[test]
fn a_worker_panic_is_an_internal_error_with_its_message_not_a_resumable_one() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft, s) = pair(dir.path());
    let dev = SmallDevice {
        panic_on: Some((256, 256)),
        ..SmallDevice::new(usize::MAX)
    };
    let err = run_on(dev, &s, &base, &ft).unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("a bug in phlora") && text.contains("simulated bug on a 256×256 ΔW"),
        "{text}"
    );
    assert!(
        !text.contains("--resume") && !text.contains("disk"),
        "{text}"
    );
    assert!(!s.out.join("adapter_config.json").exists());
}
