//! The CUDA backend: the same primitives as the CPU, on one NVIDIA GPU. cudarc loads libcuda,
//! libnvrtc, libcublas and libcusolver at run time (nothing CUDA is needed to build), kernels
//! come from `kernels/*.cu` through NVRTC, dense algebra from cuBLAS and cuSOLVER.
//!
//! Matrices are column-major f32 buffers; like the CPU's, a matrix may be kept as the storage
//! of its transpose (ΔW arrives row-major), and GEMMs fold that into their operation flags.

mod bench;
mod blas;
pub mod error;
mod factor;
pub mod kernels;
mod options;
mod pool;
mod solver;
mod staging;

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cusolver::DnHandle;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use faer::{Mat, MatRef};

use super::{
    eigh_descending, Backend, BackendError, BackendResult, DeltaInput, DeltaStats, Op, SvdParts,
};
pub use bench::DeltaBench;
use blas::Operand;
pub use error::CudaError;
pub use factor::EncodedFactor;
use kernels::Kernels;
pub use options::{CudaOptions, Orth, SmallSvd};

/// f32 elements of the residual's scratch: ΔW's columns are copied into it in blocks.
const RESIDUAL_SCRATCH_ELEMS: usize = 32 << 20;

/// Device memory per device outside the tensors' ledger: the CUDA context and the modules
/// loaded into it (phlora's kernels, cuBLAS's and cuSOLVER's). An allowance until measured:
/// `scripts/gpu-check.sh` samples nvidia-smi's peak under `--max-vram` beside the memory pool's
/// high-water mark (report.json's `device_pool_peak_bytes`); the difference is this plus each
/// worker's cuBLAS workspace (cuBLAS allocates it outside the pool).
pub const CONTEXT_VRAM: u64 = 640 << 20;

/// Device memory per worker outside the tensors' ledger, whatever the tensor: its input
/// staging on the device (at most one chunk of each input), the residual's scratch, cuBLAS's
/// workspace (32 MiB, NVIDIA's figure for Hopper) and cuSOLVER's (k×k problems; an allowance).
pub const WORKER_VRAM: u64 =
    staging::CHUNK_BYTES as u64 + 4 * RESIDUAL_SCRATCH_ELEMS as u64 + (32 << 20) + (64 << 20);

/// A dense f32 matrix on the GPU: `store` is rows×cols column-major when `transposed` is
/// false, and the storage of the transpose (cols×rows) when it is true.
pub struct CudaMat {
    buf: CudaSlice<f32>,
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl CudaMat {
    /// Storage shape (rows, cols) and leading dimension.
    fn storage(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// The operand for op(self), folding the storage orientation into the flag.
    fn operand(&self, op: Op, stream: &CudaStream) -> Operand {
        let (ptr, _sync) = self.buf.device_ptr(stream);
        let flip = match op {
            Op::N => self.transposed,
            Op::T => !self.transposed,
        };
        Operand {
            ptr,
            ld: self.storage().0,
            op: if flip { Op::T } else { Op::N },
        }
    }

    fn ptr(&self, stream: &CudaStream) -> u64 {
        self.buf.device_ptr(stream).0
    }

    /// The operand for rows r0.. of self (as it is, not transposed): the storage offset by r0
    /// rows, or by r0 columns of the stored transpose.
    fn rows_from(&self, r0: usize, stream: &CudaStream) -> Operand {
        let o = self.operand(Op::N, stream);
        let offset = match o.op {
            Op::N => r0,
            Op::T => r0 * o.ld,
        };
        Operand {
            ptr: o.ptr + (offset * 4) as u64,
            ..o
        }
    }
}

/// One GPU, its stream, library handles and kernels.
pub struct Cuda {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    kernels: Kernels,
    options: CudaOptions,
    /// How the ΔW kernel runs (kernels::DELTA_* bits); `phlora bench` measures every mode.
    delta_mode: u32,
    /// "cuda:N (name, sm_XY"; the options complete it in `name()`.
    device_label: String,
    ordinal: usize,
    /// Pinned host buffers for the inputs (staging.rs).
    staging: staging::StagingSlot,
}

/// Versions and identity of the device and libraries, for reports and BENCHMARKS.md.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CudaInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
    pub driver_version: Option<i32>,
    pub nvrtc_version: Option<(i32, i32)>,
    pub cublas_version: Option<i32>,
    pub cusolver_version: Option<i32>,
}

/// The library functions phlora calls. cudarc resolves each on first use and panics if one is
/// missing, so they are all looked up while probing: an older or partial installation is then
/// a clear error (and `auto` falls back to the CPU) instead of a panic mid-run.
const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcDestroyProgram",
    "nvrtcVersion",
];
const CUBLAS_SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasGemmEx",
    "cublasDgemm_v2",
    "cublasSgeam",
    "cublasDgeam",
    "cublasStrsm_v2",
    "cublasScopy_v2",
    "cublasGetVersion_v2",
];
const CUSOLVER_SYMBOLS: &[&str] = &[
    "cusolverDnCreate",
    "cusolverDnDestroy",
    "cusolverDnSetStream",
    "cusolverDnSetDeterministicMode",
    "cusolverDnSpotrf_bufferSize",
    "cusolverDnSpotrf",
    "cusolverDnDsyevd_bufferSize",
    "cusolverDnDsyevd",
    "cusolverDnDgeqrf_bufferSize",
    "cusolverDnDgeqrf",
    "cusolverDnDorgqr_bufferSize",
    "cusolverDnDorgqr",
    "cusolverDnDgesvd_bufferSize",
    "cusolverDnDgesvd",
    "cusolverDnSgesvd_bufferSize",
    "cusolverDnSgesvd",
    "cusolverGetVersion",
];

/// The first of `names` that `lib` does not export, if any.
fn missing_symbol(lib: &libloading::Library, names: &[&'static str]) -> Option<&'static str> {
    // SAFETY: only looks the names up; nothing is called.
    names
        .iter()
        .copied()
        .find(|name| unsafe { lib.get::<*const ()>(name.as_bytes()) }.is_err())
}

pub(crate) fn libraries_present() -> Result<(), CudaError> {
    // SAFETY: these dlopen the libraries and look names up; nothing is called through them.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(CudaError::MissingLibrary("libcuda (the NVIDIA driver)"));
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(CudaError::MissingLibrary("libnvrtc"));
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(CudaError::MissingLibrary("libcublas"));
        }
        if !cudarc::cusolver::sys::is_culib_present() {
            return Err(CudaError::MissingLibrary("libcusolver"));
        }
        for (lib, library, names) in [
            ("libnvrtc", cudarc::nvrtc::sys::culib(), NVRTC_SYMBOLS),
            ("libcublas", cudarc::cublas::sys::culib(), CUBLAS_SYMBOLS),
            (
                "libcusolver",
                cudarc::cusolver::sys::culib(),
                CUSOLVER_SYMBOLS,
            ),
        ] {
            if let Some(symbol) = missing_symbol(library, names) {
                return Err(CudaError::MissingSymbol { lib, symbol });
            }
        }
    }
    Ok(())
}

impl Cuda {
    /// Probes the libraries and device `ordinal`, compiles the kernels (once per process) and
    /// opens the library handles. Never panics: cudarc's panics on a broken installation are
    /// caught and reported as errors.
    pub fn new(ordinal: usize, options: CudaOptions) -> Result<Cuda, CudaError> {
        libraries_present()?;
        let attempt = std::panic::catch_unwind(|| Self::open(ordinal, options));
        attempt.unwrap_or_else(|p| Err(CudaError::Panicked(crate::error::panic_message(&*p))))
    }

    /// Visible CUDA devices (0 when the driver is missing or broken).
    pub fn device_count() -> usize {
        if libraries_present().is_err() {
            return 0;
        }
        std::panic::catch_unwind(|| CudaContext::device_count().map_or(0, |n| n.max(0) as usize))
            .unwrap_or(0)
    }

    /// Another worker on the same GPU: its own stream, library handles and staging buffers, so
    /// its copies and kernels overlap this one's. Buffers never cross workers.
    pub fn another_worker(&self) -> Result<Cuda, CudaError> {
        let ctx = self.stream.context().clone();
        let attempt = std::panic::catch_unwind(|| Self::open_on(ctx, self.ordinal, self.options));
        attempt.unwrap_or_else(|p| Err(CudaError::Panicked(crate::error::panic_message(&*p))))
    }

    fn open(ordinal: usize, options: CudaOptions) -> Result<Cuda, CudaError> {
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        // Each worker's stream does its work in order and no buffer is shared between
        // streams, so cudarc's cross-stream event tracking would only add overhead.
        // SAFETY: buffers are used only on the stream of the worker that made them.
        unsafe { ctx.disable_event_tracking() };
        Self::open_on(ctx, ordinal, options)
    }

    fn open_on(
        ctx: Arc<CudaContext>,
        ordinal: usize,
        options: CudaOptions,
    ) -> Result<Cuda, CudaError> {
        let stream = ctx.new_stream()?;
        let (major, minor) = ctx.compute_capability()?;
        let sms = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        let kernels = Kernels::load(&ctx, &format!("compute_{major}{minor}"), sms)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|source| CudaError::Blas {
            call: "cublasCreate",
            source,
        })?;
        let solver = DnHandle::new(stream.clone()).map_err(|source| CudaError::Solver {
            call: "cusolverDnCreate",
            source,
        })?;
        solver::deterministic(solver.cu())?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(Cuda {
            stream,
            blas,
            solver,
            kernels,
            options,
            // One group per step, exact f64 sums: 3.62 TB/s = 87% of a device copy on an
            // H200, ahead of the paired-loads mode (3.21 TB/s; BENCHMARKS.md).
            delta_mode: 0,
            device_label: format!("cuda:{ordinal} ({name}, sm_{major}{minor}"),
            ordinal,
            staging: std::sync::Mutex::new(None),
        })
    }

    pub fn options(&self) -> CudaOptions {
        self.options
    }

    pub fn info(&self) -> CudaInfo {
        let ctx = self.stream.context();
        let mut driver = 0;
        // SAFETY: out-parameters only.
        let driver_version = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) }
            .result()
            .ok()
            .map(|_| driver);
        let (mut maj, mut min) = (0, 0);
        // SAFETY: out-parameters only.
        let nvrtc_version = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut maj, &mut min) }
            .result()
            .ok()
            .map(|_| (maj, min));
        CudaInfo {
            ordinal: ctx.ordinal(),
            name: ctx.name().unwrap_or_default(),
            compute_capability: ctx.compute_capability().unwrap_or((0, 0)),
            memory_bytes: ctx.total_mem().unwrap_or(0),
            driver_version,
            nvrtc_version,
            cublas_version: blas::version(*self.blas.handle()),
            cusolver_version: solver::version(),
        }
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>, CudaError> {
        // SAFETY: every buffer from here is fully written before it is read.
        Ok(unsafe { self.stream.alloc::<f32>(n.max(1)) }?)
    }

    fn alloc_f64(&self, n: usize) -> Result<CudaSlice<f64>, CudaError> {
        // SAFETY: as for alloc.
        Ok(unsafe { self.stream.alloc::<f64>(n.max(1)) }?)
    }

    fn mat(&self, buf: CudaSlice<f32>, rows: usize, cols: usize) -> CudaMat {
        CudaMat {
            buf,
            rows,
            cols,
            transposed: false,
        }
    }

    /// C = op(A)·op(B) into a fresh matrix.
    fn gemm_with(
        &self,
        tf32: bool,
        a: &CudaMat,
        op_a: Op,
        b: &CudaMat,
        op_b: Op,
    ) -> Result<CudaMat, BackendError> {
        let (m, ka) = logical(a, op_a);
        let (kb, n) = logical(b, op_b);
        if ka != kb {
            return Err(BackendError::new(format!(
                "gemm shapes do not agree: {m}×{ka} · {kb}×{n}"
            )));
        }
        let c = self.alloc(m * n)?;
        let cp = c.device_ptr(&self.stream).0;
        blas::sgemm(
            *self.blas.handle(),
            tf32,
            (m, n, ka),
            1.0,
            a.operand(op_a, &self.stream),
            b.operand(op_b, &self.stream),
            0.0,
            cp,
            m,
        )?;
        Ok(self.mat(c, m, n))
    }

    /// The plain (not transposed) storage of a matrix, copying only when it is kept
    /// transposed.
    fn plain(&self, a: CudaMat) -> Result<CudaMat, CudaError> {
        if !a.transposed {
            return Ok(a);
        }
        let out = self.alloc(a.rows * a.cols)?;
        let (sr, sc) = a.storage();
        blas::transpose_f32(
            *self.blas.handle(),
            sr,
            sc,
            a.ptr(&self.stream),
            out.device_ptr(&self.stream).0,
        )?;
        Ok(self.mat(out, a.rows, a.cols))
    }

    fn widen(&self, a: &CudaSlice<f32>) -> Result<CudaSlice<f64>, CudaError> {
        let mut y = self.alloc_f64(a.len())?;
        self.kernels.to_f64(&self.stream, a, &mut y)?;
        Ok(y)
    }

    fn narrow(&self, a: &CudaSlice<f64>) -> Result<CudaSlice<f32>, CudaError> {
        let mut y = self.alloc(a.len())?;
        self.kernels.to_f32(&self.stream, a, &mut y)?;
        Ok(y)
    }

    /// One Cholesky-QR pass in place, all on the device: G = YᵀY = LLᵀ (cuSOLVER potrf),
    /// Y ← Y·L⁻ᵀ (cuBLAS trsm). Returns false, Y untouched, when G is not positive definite
    /// or `accept` refuses diag(L). Y must be plain.
    fn cholesky_qr_in_place(
        &self,
        y: &mut CudaMat,
        accept: &dyn Fn(&[f32]) -> bool,
    ) -> Result<bool, BackendError> {
        let (m, k) = (y.rows, y.cols);
        let mut g = self.gemm_with(false, y, Op::T, y, Op::N)?;
        let info = solver::potrf_f32(self.solver.cu(), &self.stream, k, &mut g.buf)?;
        if info != 0 {
            return Ok(false);
        }
        let diag = self.alloc(k)?;
        blas::strided_copy(
            *self.blas.handle(),
            k,
            g.ptr(&self.stream),
            k + 1,
            diag.device_ptr(&self.stream).0,
        )?;
        let diag = self.stream.clone_dtoh(&diag).map_err(CudaError::from)?;
        if !accept(&diag) {
            return Ok(false);
        }
        let yp = y.buf.device_ptr_mut(&self.stream).0;
        blas::solve_right_lower_transposed(*self.blas.handle(), m, k, g.ptr(&self.stream), yp)?;
        Ok(true)
    }

    /// The thin Householder Q in f64 (cuSOLVER geqrf + orgqr) of a plain tall Y.
    fn householder(&self, y: &CudaMat) -> Result<CudaMat, BackendError> {
        let (m, k) = (y.rows, y.cols);
        let mut a64 = self.widen(&y.buf)?;
        solver::householder_q(self.solver.cu(), &self.stream, m, k, &mut a64)?;
        Ok(self.mat(self.narrow(&a64)?, m, k))
    }

    /// B·Bᵀ (k×k) in f64 on the device, B a plain k×n matrix.
    fn gram_f64(&self, b: &CudaMat) -> Result<CudaSlice<f64>, CudaError> {
        let (k, n) = (b.rows, b.cols);
        let b64 = self.widen(&b.buf)?;
        let g = self.alloc_f64(k * k)?;
        let bp = b64.device_ptr(&self.stream).0;
        let operand = |op| Operand { ptr: bp, ld: k, op };
        blas::dgemm(
            *self.blas.handle(),
            (k, k, n),
            operand(Op::N),
            operand(Op::T),
            g.device_ptr(&self.stream).0,
            k,
        )?;
        Ok(g)
    }

    /// A plain copy of a short, wide B (k×n) when it is stored transposed.
    fn plain_short_wide(&self, b: &CudaMat) -> Result<Option<CudaMat>, BackendError> {
        if !b.transposed {
            return Ok(None);
        }
        Ok(Some(self.plain(CudaMat {
            buf: b.buf.try_clone().map_err(CudaError::from)?,
            ..*b
        })?))
    }

    /// B's SVD through gesvd of Bᵀ (n×k, tall) = U'·S·V'ᵀ, so B = V'·S·U'ᵀ: Ub = V', V = U'.
    fn gesvd_short_wide(&self, b: &CudaMat) -> BackendResult<SvdParts<CudaMat>> {
        let (k, n) = (b.rows, b.cols);
        let mut bt = self.alloc(k * n)?;
        blas::transpose_f32(
            *self.blas.handle(),
            k,
            n,
            b.ptr(&self.stream),
            bt.device_ptr(&self.stream).0,
        )?;
        let (u, s, vt) = solver::gesvd_f32(self.solver.cu(), &self.stream, n, k, &mut bt)?;
        let s = self.stream.clone_dtoh(&s).map_err(CudaError::from)?;
        Ok(SvdParts {
            u: CudaMat {
                buf: vt,
                rows: k,
                cols: k,
                transposed: true,
            },
            s,
            v: self.mat(u, n, k),
        })
    }

    /// Rows r0..r0+rows of `a` into a fresh plain matrix, on the device.
    fn row_block(&self, a: &CudaMat, r0: usize, rows: usize) -> Result<CudaMat, CudaError> {
        let out = self.alloc(rows * a.cols)?;
        let op = out.device_ptr(&self.stream).0;
        let into = Operand {
            ptr: op,
            ld: rows,
            op: Op::N,
        };
        let from = a.rows_from(r0, &self.stream);
        blas::geam(
            *self.blas.handle(),
            (rows, a.cols),
            1.0,
            from,
            0.0,
            into,
            op,
            rows,
        )?;
        Ok(self.mat(out, rows, a.cols))
    }

    /// Synchronises the stream (for timings).
    pub fn sync(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // With several GPUs the dropping thread may have another device's context bound, and
        // cuBLAS, cuSOLVER and cudarc's frees act in the current one: bind this worker's first,
        // let its queued work finish, then free its staging (its own Drop waits on the copies)
        // before the handles and the stream go with the fields.
        if let Err(e) = self.stream.context().bind_to_thread() {
            tracing::warn!(
                "{}: cannot bind its context to free it: {e}",
                self.device_label
            );
        }
        if let Err(e) = self.stream.synchronize() {
            tracing::warn!(
                "{}: waiting for its work before freeing it: {e}",
                self.device_label
            );
        }
        let staging = self
            .staging
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(staging);
    }
}

fn logical(a: &CudaMat, op: Op) -> (usize, usize) {
    match op {
        Op::N => (a.rows, a.cols),
        Op::T => (a.cols, a.rows),
    }
}

impl crate::backend::DeviceMemory for Cuda {
    fn load(&self, input: &DeltaInput<'_>) -> BackendResult<DeltaStats> {
        self.load_streamed(input)
    }

    fn delta_in_host_memory(&self) -> bool {
        false
    }

    fn memory_budget(&self) -> Option<u64> {
        // 90% of what is free now: other processes and fragmentation keep the rest.
        let (free, _) = self.stream.context().mem_get_info().ok()?;
        Some(free as u64 / 10 * 9)
    }

    fn memory_overhead(&self, workers: usize) -> u64 {
        CONTEXT_VRAM + workers as u64 * WORKER_VRAM
    }

    fn keep_cached_memory(&self, bytes: u64) -> BackendResult<()> {
        Ok(pool::keep_freed_memory(self.stream.context(), bytes)?)
    }

    fn return_cached_memory(&self) -> BackendResult<()> {
        // Every worker's queued frees on this device first (they return memory to the pool).
        self.stream
            .context()
            .synchronize()
            .map_err(CudaError::from)?;
        Ok(pool::trim(self.stream.context())?)
    }

    fn device_memory_peak(&self) -> Option<u64> {
        pool::reserved_high_water(self.stream.context())
            .ok()
            .flatten()
    }
}

impl Backend for Cuda {
    type Mat = CudaMat;

    fn name(&self) -> String {
        format!("{}, {})", self.device_label, self.options)
    }

    fn scope<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        // Raw cuBLAS/cuSOLVER calls run in the thread's current context.
        if let Err(e) = self.stream.context().bind_to_thread() {
            tracing::warn!("cannot bind {} to a worker thread: {e}", self.device_label);
        }
        work()
    }

    fn shape(&self, a: &CudaMat) -> (usize, usize) {
        (a.rows, a.cols)
    }

    fn upload(&self, host: MatRef<'_, f32>) -> BackendResult<CudaMat> {
        let (m, n) = host.shape();
        let mut data = Vec::with_capacity(m * n);
        for j in 0..n {
            data.extend(host.col(j).iter().copied());
        }
        if data.is_empty() {
            data.push(0.0);
        }
        let buf = self.stream.clone_htod(&data).map_err(CudaError::from)?;
        Ok(self.mat(buf, m, n))
    }

    fn download(&self, a: &CudaMat) -> BackendResult<Mat<f32>> {
        let data = self.stream.clone_dtoh(&a.buf).map_err(CudaError::from)?;
        let (sr, _) = a.storage();
        if a.transposed {
            return Ok(Mat::from_fn(a.rows, a.cols, |i, j| data[i * sr + j]));
        }
        // Column by column: contiguous copies instead of one closure call per element.
        let mut m = Mat::<f32>::zeros(a.rows, a.cols);
        for j in 0..a.cols {
            m.col_mut(j)
                .try_as_col_major_mut()
                .expect("owned columns are contiguous")
                .as_slice_mut()
                .copy_from_slice(&data[j * sr..j * sr + a.rows]);
        }
        Ok(m)
    }

    fn synchronize(&self) -> BackendResult<()> {
        Ok(self.sync()?)
    }

    fn gaussian(&self, rows: usize, cols: usize, seed: u64) -> BackendResult<CudaMat> {
        let mut buf = self.alloc(rows * cols)?;
        // The kernel fills the whole buffer (max(1, n) elements); an extra one is never read.
        self.kernels.gaussian(&self.stream, &mut buf, seed)?;
        Ok(self.mat(buf, rows, cols))
    }

    fn delta(&self, input: &DeltaInput<'_>) -> BackendResult<(CudaMat, DeltaStats)> {
        self.delta_streamed(input)
    }

    fn first_cols(&self, a: &CudaMat, r: usize) -> BackendResult<CudaMat> {
        let r = r.min(a.cols);
        if a.transposed {
            // Rare (only the exact mode's V): transpose the whole matrix, then cut.
            let plain = self.plain(CudaMat {
                buf: a.buf.try_clone().map_err(CudaError::from)?,
                ..*a
            })?;
            return self.first_cols(&plain, r);
        }
        // Column-major: the first r columns are the first rows·r elements.
        let n = a.rows * r;
        let mut out = self.alloc(n)?;
        if n > 0 {
            self.stream
                .memcpy_dtod(&a.buf.slice(0..n), &mut out.slice_mut(0..n))
                .map_err(CudaError::from)?;
        }
        Ok(self.mat(out, a.rows, r))
    }

    fn gemm(&self, a: &CudaMat, op_a: Op, b: &CudaMat, op_b: Op) -> BackendResult<CudaMat> {
        self.gemm_with(false, a, op_a, b, op_b)
    }

    // The blocked randomized SVD cuts, stacks and adds n×k sketches for every block of every
    // pass: on the device (cublasSgeam), not through pageable host memory.
    fn split_rows(&self, a: &CudaMat, step: usize) -> BackendResult<Vec<CudaMat>> {
        let step = step.max(1);
        (0..a.rows)
            .step_by(step)
            .map(|r0| Ok(self.row_block(a, r0, step.min(a.rows - r0))?))
            .collect()
    }

    fn stack_rows(&self, parts: &[CudaMat]) -> BackendResult<CudaMat> {
        let cols = parts.first().map_or(0, |p| p.cols);
        if parts.iter().any(|p| p.cols != cols) {
            return Err(BackendError::new("stack_rows: widths differ"));
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let out = self.alloc(rows * cols)?;
        let base = out.device_ptr(&self.stream).0;
        let mut r0 = 0;
        for p in parts {
            let at = base + (r0 * 4) as u64;
            let into = Operand {
                ptr: at,
                ld: rows,
                op: Op::N,
            };
            let from = p.operand(Op::N, &self.stream);
            blas::geam(
                *self.blas.handle(),
                (p.rows, cols),
                1.0,
                from,
                0.0,
                into,
                at,
                rows,
            )?;
            r0 += p.rows;
        }
        Ok(self.mat(out, rows, cols))
    }

    fn add(&self, a: &CudaMat, b: &CudaMat) -> BackendResult<CudaMat> {
        if (a.rows, a.cols) != (b.rows, b.cols) {
            return Err(BackendError::new("add: shapes differ"));
        }
        let out = self.alloc(a.rows * a.cols)?;
        let c = out.device_ptr(&self.stream).0;
        blas::geam(
            *self.blas.handle(),
            (a.rows, a.cols),
            1.0,
            a.operand(Op::N, &self.stream),
            1.0,
            b.operand(Op::N, &self.stream),
            c,
            a.rows,
        )?;
        Ok(self.mat(out, a.rows, a.cols))
    }

    fn gemm_delta(&self, a: &CudaMat, op_a: Op, b: &CudaMat, op_b: Op) -> BackendResult<CudaMat> {
        self.gemm_with(self.options.tf32, a, op_a, b, op_b)
    }

    fn uses_cholesky_qr(&self) -> bool {
        self.options.orth == Orth::CholeskyQr2
    }

    fn plain_copy(&self, a: &CudaMat) -> BackendResult<CudaMat> {
        Ok(self.plain(CudaMat {
            buf: a.buf.try_clone().map_err(CudaError::from)?,
            ..*a
        })?)
    }

    fn cholesky_qr_pass(
        &self,
        y: &mut CudaMat,
        accept: &dyn Fn(&[f32]) -> bool,
    ) -> BackendResult<bool> {
        if y.transposed {
            *y = self.plain_copy(y)?;
        }
        self.cholesky_qr_in_place(y, accept)
    }

    fn householder_q(&self, y: &CudaMat) -> BackendResult<CudaMat> {
        if y.transposed {
            return self.householder(&self.plain_copy(y)?);
        }
        self.householder(y)
    }

    fn thin_svd(&self, a: &CudaMat) -> BackendResult<SvdParts<CudaMat>> {
        // In f64 like the CPU's exact mode. gesvd wants a tall matrix: take whichever of the
        // storage and its transpose is tall, and swap U and V when that is Aᵀ.
        let (sr, sc) = a.storage();
        let stored64 = self.widen(&a.buf)?;
        let (mut tall, m, n, is_transpose_of_a) = if sr >= sc {
            (stored64, sr, sc, a.transposed)
        } else {
            let t = self.alloc_f64(sr * sc)?;
            blas::transpose_f64(
                *self.blas.handle(),
                sr,
                sc,
                stored64.device_ptr(&self.stream).0,
                t.device_ptr(&self.stream).0,
            )?;
            (t, sc, sr, !a.transposed)
        };
        let (u, s, vt) = solver::gesvd_f64(self.solver.cu(), &self.stream, m, n, &mut tall)?;
        let s: Vec<f32> = self
            .stream
            .clone_dtoh(&s)
            .map_err(CudaError::from)?
            .iter()
            .map(|&x| x as f32)
            .collect();
        let u = self.mat(self.narrow(&u)?, m, n);
        // V = (Vᵀ)ᵀ: keep Vᵀ's storage and mark it transposed.
        let v = CudaMat {
            buf: self.narrow(&vt)?,
            rows: n,
            cols: n,
            transposed: true,
        };
        Ok(if is_transpose_of_a {
            SvdParts { u: v, s, v: u }
        } else {
            SvdParts { u, s, v }
        })
    }

    fn gram_eigh(&self, b: &CudaMat) -> BackendResult<(Vec<f64>, Mat<f32>)> {
        let plain = self.plain_short_wide(b)?;
        let b = plain.as_ref().unwrap_or(b);
        let k = b.rows;
        match self.options.small {
            SmallSvd::HostEigh => {
                let g = self.gram_f64(b)?;
                let g = self.stream.clone_dtoh(&g).map_err(CudaError::from)?;
                eigh_descending(Mat::<f64>::from_fn(k, k, |i, j| g[j * k + i]))
            }
            SmallSvd::DeviceEigh | SmallSvd::Gesvd => {
                let mut g = self.gram_f64(b)?;
                let mut w = self.alloc_f64(k)?;
                solver::syevd(self.solver.cu(), &self.stream, k, &mut g, &mut w)?;
                let w = self.stream.clone_dtoh(&w).map_err(CudaError::from)?;
                let vecs = self.stream.clone_dtoh(&g).map_err(CudaError::from)?;
                // Ascending → descending.
                let s64: Vec<f64> = (0..k).rev().map(|i| w[i].max(0.0).sqrt()).collect();
                let ub = Mat::<f32>::from_fn(k, k, |i, j| vecs[(k - 1 - j) * k + i] as f32);
                Ok((s64, ub))
            }
        }
    }

    fn right_vectors(&self, b: &CudaMat, ub: &Mat<f32>, s: &[f64]) -> BackendResult<CudaMat> {
        // The scaling folded into the small k×k factor on the host: V = Bᵀ·(Ub·S⁻¹).
        let scaled = Mat::<f32>::from_fn(ub.nrows(), ub.ncols(), |i, j| {
            if s[j] > 0.0 {
                (f64::from(ub[(i, j)]) / s[j]) as f32
            } else {
                0.0
            }
        });
        let scaled = self.upload(scaled.as_ref())?;
        // GEMM reads B in either storage (unlike gram_eigh's raw pointers): no plain copy.
        self.gemm_with(false, b, Op::T, &scaled, Op::N)
    }

    fn direct_short_wide_svd(&self, b: &CudaMat) -> Option<BackendResult<SvdParts<CudaMat>>> {
        if self.options.small != SmallSvd::Gesvd {
            return None;
        }
        Some(
            self.plain_short_wide(b)
                .and_then(|plain| self.gesvd_short_wide(plain.as_ref().unwrap_or(b))),
        )
    }

    fn residual_sumsq(&self, delta: &CudaMat, b: &CudaMat, a: &CudaMat) -> BackendResult<f64> {
        let (m, n) = (delta.rows, delta.cols);
        if b.rows != m || a.cols != n || b.cols != a.rows {
            return Err(BackendError::new("residual: factor shapes do not match ΔW"));
        }
        // In ΔW's storage orientation, so each block is a contiguous run of columns:
        // stored ΔWᵀ = Aᵀ·Bᵀ when ΔW is kept transposed.
        let (sr, sc) = delta.storage();
        let (left, right, right_op) = if delta.transposed {
            (a.operand(Op::T, &self.stream), b, Op::T)
        } else {
            (b.operand(Op::N, &self.stream), a, Op::N)
        };
        let r = b.cols;
        let block = (RESIDUAL_SCRATCH_ELEMS / sr.max(1)).clamp(1, sc.max(1));
        let mut scratch = self.alloc(sr * block)?;
        let sp = scratch.device_ptr_mut(&self.stream).0;
        let blocks = self.kernels.grid(sr * block).grid_dim.0 as usize;
        let mut part = self.alloc_f64(blocks)?;
        let dp = delta.ptr(&self.stream);
        let mut total = 0.0f64;
        for c0 in (0..sc).step_by(block) {
            let w = block.min(sc - c0);
            // SAFETY: both ranges lie inside their buffers (w columns of sr rows).
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    sp,
                    dp + (c0 * sr * 4) as u64,
                    w * sr * 4,
                    self.stream.cu_stream(),
                )
            }
            .map_err(CudaError::from)?;
            // Columns c0..c0+w of the logical right factor R = op(store).
            let ro = right.operand(right_op, &self.stream);
            let rblock = match ro.op {
                Op::N => Operand {
                    ptr: ro.ptr + (c0 * ro.ld * 4) as u64,
                    ..ro
                },
                Op::T => Operand {
                    ptr: ro.ptr + (c0 * 4) as u64,
                    ..ro
                },
            };
            blas::sgemm(
                *self.blas.handle(),
                false,
                (sr, w, r),
                -1.0,
                left,
                rblock,
                1.0,
                sp,
                sr,
            )?;
            let used = self.kernels.sumsq(&self.stream, sp, sr * w, &mut part)?;
            let sums = self.stream.clone_dtoh(&part).map_err(CudaError::from)?;
            total += sums[..used].iter().sum::<f64>();
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvrtc_exports_every_function_phlora_calls() {
        // SAFETY: dlopen and name lookups only.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(
                std::env::var_os("PHLORA_REQUIRE_NVRTC").is_none(),
                "PHLORA_REQUIRE_NVRTC is set, but libnvrtc is not on the library path"
            );
            eprintln!("SKIPPED: libnvrtc not found");
            return;
        }
        // SAFETY: as above.
        let lib = unsafe { cudarc::nvrtc::sys::culib() };
        assert_eq!(missing_symbol(lib, NVRTC_SYMBOLS), None);
        assert_eq!(
            missing_symbol(lib, &["nvrtcNoSuchFunction"]),
            Some("nvrtcNoSuchFunction")
        );
    }

    #[test]
    fn without_the_driver_the_probe_says_what_is_missing() {
        // SAFETY: dlopen only.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("libcuda is present here: nothing to check");
            return;
        }
        let err = Cuda::new(0, CudaOptions::default())
            .err()
            .expect("no driver, no GPU");
        assert!(err.to_string().contains("libcuda"), "{err}");
    }
}
