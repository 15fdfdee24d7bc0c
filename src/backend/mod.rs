//! Compute backends. The randomized SVD and the pipeline are written once over the narrow set
//! of primitives in [`Backend`]; `Cpu` implements them with faer + rayon, `Cuda` with NVRTC
//! kernels, cuBLAS and cuSOLVER. [`resolve`] is the one place that decides which runs.

pub mod cpu;
pub mod cuda;

use faer::Mat;

use crate::checkpoint::DType;

pub use cpu::Cpu;
pub use cuda::{Cuda, CudaOptions};

/// Whether a GEMM operand is used as it is or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// A failure inside a backend primitive; the caller adds the tensor's name.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub message: String,
    /// The device ran out of memory: the scheduler may retry the tensor in smaller blocks.
    pub out_of_memory: bool,
}

impl BackendError {
    pub fn new(message: impl Into<String>) -> Self {
        BackendError {
            message: message.into(),
            out_of_memory: false,
        }
    }

    pub fn out_of_memory(message: impl Into<String>) -> Self {
        BackendError {
            message: message.into(),
            out_of_memory: true,
        }
    }
}

pub type BackendResult<T> = std::result::Result<T, BackendError>;

/// The two raw tensors whose difference is ΔW = ft − base, a rows×cols row-major matrix.
pub struct DeltaInput<'a> {
    pub base: &'a [u8],
    pub base_dtype: DType,
    pub ft: &'a [u8],
    pub ft_dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// Called with `(first_row, end_row)` once those rows' input bytes have been read, so the
    /// caller can drop their pages while the rest is still being formed.
    pub rows_read: Option<&'a (dyn Fn(usize, usize) + Sync)>,
}

impl DeltaInput<'_> {
    /// The byte counts must be those of a rows×cols matrix of each dtype.
    pub fn check_sizes(&self) -> BackendResult<()> {
        let n = self.rows * self.cols;
        if self.base.len() != n * self.base_dtype.size()
            || self.ft.len() != n * self.ft_dtype.size()
        {
            return Err(BackendError::new(format!(
                "byte counts {} and {} do not match a {}×{} matrix",
                self.base.len(),
                self.ft.len(),
                self.rows,
                self.cols
            )));
        }
        Ok(())
    }
}

/// What the delta step learns in the same pass over the data.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeltaStats {
    /// ‖ΔW‖²_F, accumulated in f64.
    pub sumsq: f64,
    /// Elements of ΔW that are NaN or ±Inf.
    pub nonfinite: usize,
    /// Seconds spent bringing the input bytes into memory (page faults, the copy into pinned
    /// staging), out of the delta's wall time.
    pub read_seconds: f64,
    /// Seconds the host waited for host-to-device copies (GPU only).
    pub h2d_seconds: f64,
}

impl DeltaStats {
    /// The statistics of two parts, in this order.
    pub fn merge(self, other: DeltaStats) -> DeltaStats {
        DeltaStats {
            sumsq: self.sumsq + other.sumsq,
            nonfinite: self.nonfinite + other.nonfinite,
            read_seconds: self.read_seconds + other.read_seconds,
            h2d_seconds: self.h2d_seconds + other.h2d_seconds,
        }
    }
}

/// A thin SVD: A ≈ U·diag(s)·Vᵀ with U m×p, V n×p, s descending.
pub struct SvdParts<M> {
    pub u: M,
    pub s: Vec<f32>,
    pub v: M,
}

/// Where a backend's data lives and what its device memory holds: what the scheduler and the
/// input floor ask of a backend, kept apart from the arithmetic of [`Backend`]. The defaults
/// describe a backend that computes in host memory.
pub trait DeviceMemory {
    /// Brings both inputs into this backend's memory and lets them go, timing the reads (and
    /// copies): the input floor `phlora floor` measures. The default reads every byte once
    /// (what any use of the inputs costs at least).
    fn load(&self, input: &DeltaInput<'_>) -> BackendResult<DeltaStats> {
        input.check_sizes()?;
        let clock = std::time::Instant::now();
        std::hint::black_box(cpu::read_all(input.base) ^ cpu::read_all(input.ft));
        Ok(DeltaStats {
            read_seconds: clock.elapsed().as_secs_f64(),
            ..DeltaStats::default()
        })
    }

    /// Whether ΔW and the sketches live in host memory (and so count against `--max-ram`).
    fn delta_in_host_memory(&self) -> bool {
        true
    }

    /// Device memory a run may use when the user gives no bound (None: no device memory).
    fn memory_budget(&self) -> Option<u64> {
        None
    }

    /// Device memory the process takes besides the tensors in flight, with `workers` workers
    /// on the device (context, library handles, each worker's own buffers); taken off the
    /// device's bound before tensors share it. 0 where ΔW is in host memory.
    fn memory_overhead(&self, _workers: usize) -> u64 {
        0
    }

    /// Lets the device's allocator keep up to `bytes` of freed memory for reuse (set to what
    /// the tensors share, so a multi-GB ΔW is not unmapped and mapped again for each tensor).
    fn keep_cached_memory(&self, _bytes: u64) -> BackendResult<()> {
        Ok(())
    }

    /// Hands memory the device's allocator keeps cached back to the device (before an
    /// out-of-memory retry); a no-op where nothing is cached.
    fn return_cached_memory(&self) -> BackendResult<()> {
        Ok(())
    }

    /// The most device memory this process's allocator has held at once (None: no device
    /// memory, or not known).
    fn device_memory_peak(&self) -> Option<u64> {
        None
    }
}

/// The primitives the decomposition needs. Matrices are dense f32 and live on the backend.
pub trait Backend: DeviceMemory + Sync {
    type Mat: Send;

    fn name(&self) -> String;

    /// Runs a worker's whole share of the work in this backend's context: its own thread pool
    /// (CPU) or its device bound to the calling thread (GPU).
    fn scope<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        work()
    }

    fn shape(&self, a: &Self::Mat) -> (usize, usize);
    fn upload(&self, host: faer::MatRef<'_, f32>) -> BackendResult<Self::Mat>;
    fn download(&self, a: &Self::Mat) -> BackendResult<faer::Mat<f32>>;

    /// ΔW = ft − base in f32, fused with the ‖ΔW‖² reduction and a non-finite count.
    fn delta(&self, input: &DeltaInput<'_>) -> BackendResult<(Self::Mat, DeltaStats)>;

    /// op(A)·op(B), at full f32 accuracy.
    fn gemm(&self, a: &Self::Mat, op_a: Op, b: &Self::Mat, op_b: Op) -> BackendResult<Self::Mat>;

    /// op(A)·op(B) for the randomized SVD's products with ΔW, where a backend may trade
    /// accuracy that the result cannot show for speed (TF32 on a GPU).
    fn gemm_delta(
        &self,
        a: &Self::Mat,
        op_a: Op,
        b: &Self::Mat,
        op_b: Op,
    ) -> BackendResult<Self::Mat> {
        self.gemm(a, op_a, b, op_b)
    }

    /// A rows×cols matrix of standard normal samples, element (i, j) equal to
    /// `rng::normal_at(seed, j·rows + i)` on every backend.
    fn gaussian(&self, rows: usize, cols: usize, seed: u64) -> BackendResult<Self::Mat> {
        self.upload(crate::rng::normal_matrix(rows, cols, seed).as_ref())
    }

    /// The first `r` columns of a matrix (all of them when r ≥ its width).
    fn first_cols(&self, a: &Self::Mat, r: usize) -> BackendResult<Self::Mat>;

    /// The matrix cut into blocks of `step` rows (the last may be shorter), each a matrix of
    /// its own. The default goes through the host, once for the whole matrix.
    fn split_rows(&self, a: &Self::Mat, step: usize) -> BackendResult<Vec<Self::Mat>> {
        let h = self.download(a)?;
        let step = step.max(1);
        (0..h.nrows())
            .step_by(step)
            .map(|r0| self.upload(h.as_ref().subrows(r0, step.min(h.nrows() - r0))))
            .collect()
    }

    /// The matrices one above the other (same width). The default goes through the host.
    fn stack_rows(&self, parts: &[Self::Mat]) -> BackendResult<Self::Mat> {
        let hosts = parts
            .iter()
            .map(|p| self.download(p))
            .collect::<BackendResult<Vec<_>>>()?;
        let cols = hosts.first().map_or(0, |h| h.ncols());
        if hosts.iter().any(|h| h.ncols() != cols) {
            return Err(BackendError::new("stack_rows: widths differ"));
        }
        let rows: usize = hosts.iter().map(|h| h.nrows()).sum();
        let mut out = Mat::<f32>::zeros(rows, cols);
        let mut r0 = 0;
        for h in &hosts {
            out.as_mut()
                .subrows_mut(r0, h.nrows())
                .copy_from(h.as_ref());
            r0 += h.nrows();
        }
        self.upload(out.as_ref())
    }

    /// a + b (same shape). The default goes through the host.
    fn add(&self, a: &Self::Mat, b: &Self::Mat) -> BackendResult<Self::Mat> {
        let (x, y) = (self.download(a)?, self.download(b)?);
        if x.shape() != y.shape() {
            return Err(BackendError::new("add: shapes differ"));
        }
        self.upload((&x + &y).as_ref())
    }

    /// Waits for all queued work (for timings); a no-op where work is synchronous.
    fn synchronize(&self) -> BackendResult<()> {
        Ok(())
    }

    /// Whether [`linalg::orth`](crate::linalg::orth) may try CholeskyQR before Householder
    /// (a backend can be set to Householder only, to compare them).
    fn uses_cholesky_qr(&self) -> bool {
        true
    }

    /// An independent copy of a matrix, in plain (untransposed) storage.
    fn plain_copy(&self, a: &Self::Mat) -> BackendResult<Self::Mat>;

    /// One CholeskyQR pass on a tall Y in place: G = YᵀY = LLᵀ, then, if `accept` takes L's
    /// diagonal, Y ← Y·L⁻ᵀ. Returns whether it ran (false: G not positive definite or
    /// refused, Y unchanged or garbage; the caller starts again from its own copy).
    fn cholesky_qr_pass(
        &self,
        y: &mut Self::Mat,
        accept: &dyn Fn(&[f32]) -> bool,
    ) -> BackendResult<bool>;

    /// The thin Q of a Householder QR of a tall matrix.
    fn householder_q(&self, y: &Self::Mat) -> BackendResult<Self::Mat>;

    /// The thin SVD of a whole matrix (the exact mode, and the reference in tests).
    fn thin_svd(&self, a: &Self::Mat) -> BackendResult<SvdParts<Self::Mat>>;

    /// The eigendecomposition of B·Bᵀ (k×k, formed in f64) of a short, wide k×n B, as B's
    /// singular values (descending, √ of the eigenvalues clamped at 0) and the matching
    /// left singular vectors Ub (k×k, on the host).
    fn gram_eigh(&self, b: &Self::Mat) -> BackendResult<(Vec<f64>, Mat<f32>)>;

    /// V = Bᵀ·Ub·diag(1/s), n×k, with the columns where `s` is 0 zeroed.
    fn right_vectors(&self, b: &Self::Mat, ub: &Mat<f32>, s: &[f64]) -> BackendResult<Self::Mat>;

    /// B's SVD taken directly, for a backend set to bypass the eigendecomposition (CUDA's
    /// gesvd, a benchmark alternative); None takes the eigh route of
    /// [`linalg::orth::short_wide_svd`](crate::linalg::orth::short_wide_svd).
    fn direct_short_wide_svd(&self, _b: &Self::Mat) -> Option<BackendResult<SvdParts<Self::Mat>>> {
        None
    }

    /// ‖ΔW − B·A‖²_F in f64, computed directly (the report's error certificate).
    fn residual_sumsq(&self, delta: &Self::Mat, b: &Self::Mat, a: &Self::Mat)
        -> BackendResult<f64>;
}

/// The device a user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Device {
    /// A GPU when one is usable, else the CPU (with one warning).
    Auto,
    Cpu,
    /// Every visible CUDA device (or those `--devices` names).
    AllCuda,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl Device {
    pub fn parse(s: &str) -> Option<Device> {
        match s {
            "auto" => Some(Device::Auto),
            "cpu" => Some(Device::Cpu),
            "cuda" => Some(Device::AllCuda),
            _ => s.strip_prefix("cuda:")?.parse().ok().map(Device::Cuda),
        }
    }
}

/// What [`Device`] resolved to on this machine.
pub enum Resolved {
    Cpu(Cpu),
    Cuda(Box<Cuda>),
}

/// The one place that decides CPU vs GPU. `cuda[:N]` fails with the reason when that GPU is
/// not usable; `auto` takes GPU 0 when it is usable and otherwise warns once and uses the CPU.
pub fn resolve(device: Device, options: CudaOptions) -> crate::Result<Resolved> {
    match device {
        Device::Cpu => Ok(Resolved::Cpu(Cpu::new())),
        Device::AllCuda => resolve(Device::Cuda(0), options),
        Device::Cuda(n) => Cuda::new(n, options)
            .map(|c| Resolved::Cuda(Box::new(c)))
            .map_err(|e| crate::Error::Device(format!("--device cuda:{n} is not usable: {e}"))),
        Device::Auto => match Cuda::new(0, options) {
            Ok(c) => Ok(Resolved::Cuda(Box::new(c))),
            Err(e) => {
                tracing::warn!("no usable CUDA GPU, running on the CPU: {e}");
                Ok(Resolved::Cpu(Cpu::new()))
            }
        },
    }
}

/// The workers of one device. They share its memory (one budget), each with its own stream
/// or thread pool.
pub struct DeviceWorkers<B> {
    pub workers: Vec<B>,
}

/// What an extraction runs on: one group of CPU workers, or one group per GPU.
pub enum Workers {
    Cpu(Vec<DeviceWorkers<Cpu>>),
    Cuda(Vec<DeviceWorkers<Cuda>>),
}

/// Which devices to use, and how many tensors each works on at once.
#[derive(Clone, Debug)]
pub struct WorkerRequest {
    pub device: Device,
    /// GPU ordinals (`--devices`); None: all visible.
    pub devices: Option<Vec<usize>>,
    /// Tensors in flight per device; None: 2 on a GPU (copies of one overlap the SVD of the
    /// other), and 2 on a CPU with at least 2 cores (each worker with half the cores: on 2
    /// cores 1.5× faster than one worker with both, BENCHMARKS.md).
    pub in_flight: Option<usize>,
    pub options: CudaOptions,
}

/// Default tensors in flight per GPU.
pub const GPU_IN_FLIGHT: usize = 2;
/// Default CPU workers (at most one per core).
pub const CPU_IN_FLIGHT: usize = 2;

/// The one place that decides the workers of an extraction (see [`resolve`] for one device).
pub fn resolve_workers(req: &WorkerRequest) -> crate::Result<Workers> {
    use crate::Error;
    let per_gpu = req.in_flight.unwrap_or(GPU_IN_FLIGHT).max(1);
    let cpu = || {
        Ok(Workers::Cpu(vec![DeviceWorkers {
            workers: Cpu::workers(
                req.in_flight
                    .unwrap_or(CPU_IN_FLIGHT.min(rayon::current_num_threads()))
                    .max(1),
            )?,
        }]))
    };
    let gpus = |ordinals: &[usize]| -> crate::Result<Workers> {
        let mut groups = Vec::new();
        for &n in ordinals {
            let first = Cuda::new(n, req.options)
                .map_err(|e| Error::Device(format!("cuda:{n} is not usable: {e}")))?;
            let mut workers = Vec::with_capacity(per_gpu);
            for _ in 1..per_gpu {
                match first.another_worker() {
                    Ok(w) => workers.push(w),
                    Err(e) => {
                        tracing::warn!(
                            "cuda:{n}: {} worker(s) instead of {per_gpu}: {e}",
                            workers.len() + 1
                        );
                        break;
                    }
                }
            }
            workers.insert(0, first);
            groups.push(DeviceWorkers { workers });
        }
        Ok(Workers::Cuda(groups))
    };
    let listed = |ordinals: &[usize]| -> crate::Result<()> {
        let mut seen = std::collections::HashSet::new();
        match ordinals.iter().find(|&&n| !seen.insert(n)) {
            Some(n) => Err(Error::Settings(format!("--devices lists GPU {n} twice"))),
            None if ordinals.is_empty() => Err(Error::Settings("--devices is empty".into())),
            None => Ok(()),
        }
    };
    match (req.device, &req.devices) {
        (Device::Cpu, Some(_)) => Err(Error::Settings(
            "--devices selects GPUs; it does not go with --device cpu".into(),
        )),
        (Device::Cpu, None) => cpu(),
        (Device::Cuda(n), Some(list)) if list != &[n] => Err(Error::Settings(format!(
            "--device cuda:{n} and --devices {list:?} disagree; give one of them"
        ))),
        (Device::Cuda(n), _) => gpus(&[n]),
        (Device::AllCuda | Device::Auto, Some(list)) => {
            listed(list)?;
            gpus(list)
        }
        (Device::AllCuda, None) => {
            let count = Cuda::device_count();
            if count == 0 {
                // The probe says why (no driver, no device, a missing library).
                return gpus(&[0]);
            }
            gpus(&(0..count).collect::<Vec<_>>())
        }
        (Device::Auto, None) => {
            let count = Cuda::device_count();
            if count == 0 {
                let why = Cuda::new(0, req.options)
                    .err()
                    .map_or_else(|| "no CUDA device".to_string(), |e| e.to_string());
                tracing::warn!("no usable CUDA GPU, running on the CPU: {why}");
                return cpu();
            }
            match gpus(&(0..count).collect::<Vec<_>>()) {
                Ok(w) => Ok(w),
                Err(e) => {
                    tracing::warn!("no usable CUDA GPU, running on the CPU: {e}");
                    cpu()
                }
            }
        }
    }
}

/// The eigendecomposition of a symmetric k×k G = B·Bᵀ as singular values of B (descending,
/// √ of the clamped eigenvalues) and the matching left singular vectors Ub.
pub(crate) fn eigh_descending(g: Mat<f64>) -> BackendResult<(Vec<f64>, Mat<f32>)> {
    let k = g.nrows();
    let evd = g
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| BackendError::new(format!("eigendecomposition of B·Bᵀ: {e:?}")))?;
    // faer sorts eigenvalues ascending; singular values go descending.
    let order: Vec<usize> = (0..k).rev().collect();
    let s64 = order
        .iter()
        .map(|&i| evd.S().column_vector()[i].max(0.0).sqrt())
        .collect();
    let ub = Mat::<f32>::from_fn(k, k, |i, j| evd.U()[(i, order[j])] as f32);
    Ok((s64, ub))
}
