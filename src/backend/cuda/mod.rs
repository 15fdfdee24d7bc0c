//! The CUDA backend: the same primitives as the CPU, on one NVIDIA GPU. cudarc loads libcuda,
//! libnvrtc, libcublas and libcusolver at run time (nothing CUDA is needed to build), kernels
//! come from `kernels/*.cu` through NVRTC, dense algebra from cuBLAS and cuSOLVER.
//!
//! Matrices are column-major f32 buffers; like the CPU's, a matrix may be kept as the storage
//! of its transpose (ΔW arrives row-major), and GEMMs fold that into their operation flags.

mod blas;
pub mod error;
pub mod kernels;
mod solver;

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cusolver::DnHandle;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use faer::{Mat, MatRef};

use super::{
    eigh_descending, Backend, BackendError, BackendResult, DeltaInput, DeltaStats, Op, SvdParts,
};
use blas::Operand;
pub use error::CudaError;
use kernels::Kernels;

/// How the randomized SVD's steps run on the GPU (the variants `phlora bench --variants`
/// compares).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// The sketch and power-iteration GEMMs with ΔW on TF32 tensor cores (inputs rounded to a
    /// 10-bit mantissa); the Gram matrices, small products and the residual stay plain f32.
    pub tf32: bool,
    pub orth: Orth,
    pub small: SmallSvd,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            tf32: true,
            orth: Orth::CholeskyQr2,
            small: SmallSvd::DeviceEigh,
        }
    }
}

/// How a tall sketch is orthonormalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orth {
    /// Two Cholesky-QR passes on GEMMs (k×k Cholesky on the host, in f64), falling back to
    /// Householder when the Gram matrix is too ill-conditioned.
    CholeskyQr2,
    /// cuSOLVER geqrf + orgqr in f64 every time.
    Householder,
}

/// How the small k×n SVD of B = QᵀΔW is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmallSvd {
    /// B·Bᵀ in f64 on the GPU, cuSOLVER syevd.
    DeviceEigh,
    /// B·Bᵀ in f64 on the GPU, eigendecomposition on the host (faer).
    HostEigh,
    /// cuSOLVER gesvd of Bᵀ in f32.
    Gesvd,
}

impl std::fmt::Display for CudaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let orth = match self.orth {
            Orth::CholeskyQr2 => "cholqr2",
            Orth::Householder => "householder",
        };
        let small = match self.small {
            SmallSvd::DeviceEigh => "eigh",
            SmallSvd::HostEigh => "host-eigh",
            SmallSvd::Gesvd => "gesvd",
        };
        let prec = if self.tf32 { "tf32" } else { "f32" };
        write!(f, "{prec}+{orth}+{small}")
    }
}

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

fn libraries_present() -> Result<(), CudaError> {
    // SAFETY: these only try to dlopen the library; nothing is called through it.
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
        match attempt {
            Ok(r) => r,
            Err(p) => Err(CudaError::Panicked(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into()),
            )),
        }
    }

    fn open(ordinal: usize, options: CudaOptions) -> Result<Cuda, CudaError> {
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream does all the work in order, so cudarc's cross-stream event tracking
        // would only add overhead.
        // SAFETY: no other stream of this context touches these buffers.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
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
            return Err(BackendError(format!(
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

    /// A small host matrix into a device matrix.
    fn upload_small(&self, host: MatRef<'_, f32>) -> Result<CudaMat, BackendError> {
        self.upload(host)
    }

    /// One Cholesky-QR pass in place, all on the device: G = YᵀY = LLᵀ (cuSOLVER potrf),
    /// Y ← Y·L⁻ᵀ (cuBLAS trsm). Returns false, Y untouched, when G is not safely positive
    /// definite (the CPU's guard: diag(L) ratio under `min_ratio`).
    fn cholesky_qr_pass(&self, y: &mut CudaMat, min_ratio: f64) -> Result<bool, BackendError> {
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
        let max = diag.iter().copied().fold(0f32, f32::max);
        let min = diag.iter().copied().fold(f32::INFINITY, f32::min);
        if !(max.is_finite() && f64::from(min) > min_ratio * f64::from(max)) {
            return Ok(false);
        }
        let yp = y.buf.device_ptr_mut(&self.stream).0;
        blas::solve_right_lower_transposed(*self.blas.handle(), m, k, g.ptr(&self.stream), yp)?;
        Ok(true)
    }

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

    /// SVD parts from the eigendecomposition of B·Bᵀ: V = Bᵀ·Ub·S⁻¹ (the scaling folded into
    /// the small k×k factor on the host), negligible directions zeroed.
    fn parts_from_eigh(
        &self,
        b: &CudaMat,
        s64: Vec<f64>,
        ub: Mat<f32>,
    ) -> Result<SvdParts<CudaMat>, BackendError> {
        let floor = s64.first().copied().unwrap_or(0.0) * 1e-6;
        let scaled = Mat::<f32>::from_fn(ub.nrows(), ub.ncols(), |i, j| {
            let sj = s64[j];
            if sj > floor && sj > 0.0 {
                (f64::from(ub[(i, j)]) / sj) as f32
            } else {
                0.0
            }
        });
        let scaled = self.upload_small(scaled.as_ref())?;
        let v = self.gemm_with(false, b, Op::T, &scaled, Op::N)?;
        Ok(SvdParts {
            u: self.upload_small(ub.as_ref())?,
            s: s64.iter().map(|&x| x as f32).collect(),
            v,
        })
    }

    /// Synchronises the stream (for timings).
    pub fn sync(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }
}

fn logical(a: &CudaMat, op: Op) -> (usize, usize) {
    match op {
        Op::N => (a.rows, a.cols),
        Op::T => (a.cols, a.rows),
    }
}

/// Rows of ΔW per upload chunk: ~64 MiB of input, a multiple of 8 so that each chunk's
/// offset in the output keeps the kernel's 16-byte alignment.
fn delta_chunk_rows(cols: usize, bytes_per_elem: usize) -> usize {
    let rows = (64usize << 20) / (cols.max(1) * bytes_per_elem.max(1));
    (rows / 8 * 8).max(8)
}

impl Backend for Cuda {
    type Mat = CudaMat;

    fn name(&self) -> String {
        format!("{}, {})", self.device_label, self.options)
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
        let (rows, cols) = (input.rows, input.cols);
        let (bs, fs) = (input.base_dtype.size(), input.ft_dtype.size());
        if input.base.len() != rows * cols * bs || input.ft.len() != rows * cols * fs {
            return Err(BackendError(format!(
                "byte counts {} and {} do not match a {rows}×{cols} matrix",
                input.base.len(),
                input.ft.len()
            )));
        }
        let out = self.alloc(rows * cols)?;
        let out_ptr = out.device_ptr(&self.stream).0;
        let chunk = delta_chunk_rows(cols, bs + fs).min(rows.max(1));
        // SAFETY: staging buffers, fully written by each chunk's copy before the kernel reads.
        let mut base_dev = unsafe { self.stream.alloc::<u8>((chunk * cols * bs).max(1)) }
            .map_err(CudaError::from)?;
        let mut ft_dev = unsafe { self.stream.alloc::<u8>((chunk * cols * fs).max(1)) }
            .map_err(CudaError::from)?;
        let blocks = self.kernels.grid((chunk * cols).div_ceil(8)).grid_dim.0 as usize;
        let mut part_sum = self.alloc_f64(blocks)?;
        // SAFETY: written by every launch before it is read.
        let mut part_bad = unsafe { self.stream.alloc::<u32>(blocks) }.map_err(CudaError::from)?;
        let mut stats = DeltaStats::default();
        for r0 in (0..rows).step_by(chunk) {
            let r1 = (r0 + chunk).min(rows);
            let n = (r1 - r0) * cols;
            let b_src = &input.base[r0 * cols * bs..r1 * cols * bs];
            let f_src = &input.ft[r0 * cols * fs..r1 * cols * fs];
            self.stream
                .memcpy_htod(b_src, &mut base_dev.slice_mut(0..b_src.len()))
                .map_err(CudaError::from)?;
            self.stream
                .memcpy_htod(f_src, &mut ft_dev.slice_mut(0..f_src.len()))
                .map_err(CudaError::from)?;
            self.kernels.delta(
                &self.stream,
                &base_dev,
                input.base_dtype,
                &ft_dev,
                input.ft_dtype,
                out_ptr + (r0 * cols * 4) as u64,
                n,
                &mut part_sum,
                &mut part_bad,
                self.delta_mode,
            )?;
            // The copies are complete once the partials are back: the rows' pages may go.
            let used = self.kernels.grid(n.div_ceil(8)).grid_dim.0 as usize;
            let sums = self.stream.clone_dtoh(&part_sum).map_err(CudaError::from)?;
            let bad = self.stream.clone_dtoh(&part_bad).map_err(CudaError::from)?;
            stats.sumsq += sums[..used].iter().sum::<f64>();
            stats.nonfinite += bad[..used].iter().map(|&x| x as usize).sum::<usize>();
            if let Some(done) = input.rows_read {
                done(r0, r1);
            }
        }
        Ok((
            CudaMat {
                buf: out,
                rows,
                cols,
                transposed: true,
            },
            stats,
        ))
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

    fn gemm_delta(&self, a: &CudaMat, op_a: Op, b: &CudaMat, op_b: Op) -> BackendResult<CudaMat> {
        self.gemm_with(self.options.tf32, a, op_a, b, op_b)
    }

    fn orthonormalize(&self, y: CudaMat) -> BackendResult<CudaMat> {
        let (m, n) = (y.rows, y.cols);
        if m < n {
            return Err(BackendError(format!(
                "cannot orthonormalize a wide {m}×{n} matrix"
            )));
        }
        let y = self.plain(y)?;
        if self.options.orth == Orth::CholeskyQr2 {
            // The passes work in place; the fallback starts again from Y itself.
            let mut q = CudaMat {
                buf: y.buf.try_clone().map_err(CudaError::from)?,
                ..y
            };
            if self.cholesky_qr_pass(&mut q, super::FIRST_PASS_MIN_RATIO)?
                && self.cholesky_qr_pass(&mut q, super::SECOND_PASS_MIN_RATIO)?
            {
                return Ok(q);
            }
        }
        self.householder(&y)
    }

    fn range_basis(&self, y: CudaMat) -> BackendResult<CudaMat> {
        if y.rows < y.cols || self.options.orth != Orth::CholeskyQr2 {
            return self.orthonormalize(y);
        }
        let mut q = self.plain(y)?;
        let keep = CudaMat {
            buf: q.buf.try_clone().map_err(CudaError::from)?,
            ..q
        };
        if self.cholesky_qr_pass(&mut q, super::FIRST_PASS_MIN_RATIO)? {
            return Ok(q);
        }
        self.householder(&keep)
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

    fn short_wide_svd(&self, b: &CudaMat) -> BackendResult<SvdParts<CudaMat>> {
        let (k, n) = (b.rows, b.cols);
        let b_plain;
        let b = if b.transposed {
            b_plain = self.plain(CudaMat {
                buf: b.buf.try_clone().map_err(CudaError::from)?,
                rows: k,
                cols: n,
                transposed: true,
            })?;
            &b_plain
        } else {
            b
        };
        match self.options.small {
            SmallSvd::DeviceEigh => {
                let mut g = self.gram_f64(b)?;
                let mut w = self.alloc_f64(k)?;
                solver::syevd(self.solver.cu(), &self.stream, k, &mut g, &mut w)?;
                let w = self.stream.clone_dtoh(&w).map_err(CudaError::from)?;
                let vecs = self.stream.clone_dtoh(&g).map_err(CudaError::from)?;
                // Ascending → descending.
                let s64: Vec<f64> = (0..k).rev().map(|i| w[i].max(0.0).sqrt()).collect();
                let ub = Mat::<f32>::from_fn(k, k, |i, j| vecs[(k - 1 - j) * k + i] as f32);
                self.parts_from_eigh(b, s64, ub)
            }
            SmallSvd::HostEigh => {
                let g = self.gram_f64(b)?;
                let g = self.stream.clone_dtoh(&g).map_err(CudaError::from)?;
                let g = Mat::<f64>::from_fn(k, k, |i, j| g[j * k + i]);
                let (s64, ub) = eigh_descending(g)?;
                self.parts_from_eigh(b, s64, ub)
            }
            SmallSvd::Gesvd => {
                // Bᵀ (n×k, tall) = U'·S·V'ᵀ, so B = V'·S·U'ᵀ: Ub = V', V = U'.
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
        }
    }

    fn factor(
        &self,
        t: &crate::linalg::OnDevice<CudaMat>,
        layout: crate::factor::Layout,
        r_out: usize,
        dtype: crate::checkpoint::DType,
    ) -> BackendResult<crate::factor::DeviceFactors<CudaMat>> {
        use crate::factor::Layout;
        let r = t.s.len();
        if r > r_out || t.u.cols != r || t.v.cols != r {
            return Err(BackendError(format!(
                "factor: rank {r} does not fit the adapter rank {r_out}"
            )));
        }
        // Plain column-major U (rows×r) and V (cols×r).
        let u = self.first_cols(&t.u, r)?;
        let v = self.first_cols(&t.v, r)?;
        let (rows, cols) = (u.rows, v.rows);
        let root: Vec<f32> = t.s.iter().map(|s| s.max(0.0).sqrt()).collect();
        let scale = self
            .stream
            .clone_htod(if root.is_empty() {
                &[0.0f32][..]
            } else {
                &root[..]
            })
            .map_err(CudaError::from)?;
        // One factor tensor: encoded bytes on the host, rounded f32 left on the device.
        let tensor =
            |src: &CudaMat, transpose_out: bool| -> Result<(Vec<u8>, CudaSlice<f32>), CudaError> {
                let n = src.rows * r_out;
                // SAFETY: fully written by the kernel (n elements of each).
                let mut bits = unsafe { self.stream.alloc::<u8>((n * dtype.size()).max(1)) }?;
                let rounded = self.alloc(n)?;
                self.kernels.factor_cast(
                    &self.stream,
                    src.ptr(&self.stream),
                    src.rows,
                    r,
                    r_out,
                    &scale,
                    transpose_out,
                    dtype,
                    bits.device_ptr_mut(&self.stream).0,
                    rounded.device_ptr(&self.stream).0,
                )?;
                let mut bytes = self.stream.clone_dtoh(&bits)?;
                bytes.truncate(n * dtype.size());
                Ok((bytes, rounded))
            };
        // The row-major [r_out, len] tensor is the column-major storage of a len×r_out matrix,
        // the row-major [len, r_out] one that of its transpose.
        let mat = |buf, rows, cols, transposed| CudaMat {
            buf,
            rows,
            cols,
            transposed,
        };
        Ok(match layout {
            Layout::Linear => {
                let (a_bytes, a_round) = tensor(&v, false)?; // A = √S·Vᵀ [r_out, cols]
                let (b_bytes, b_round) = tensor(&u, true)?; // B = U·√S [rows, r_out]
                crate::factor::DeviceFactors {
                    a_shape: [r_out, cols],
                    a_bytes,
                    b_shape: [rows, r_out],
                    b_bytes,
                    left: mat(b_round, rows, r_out, true),
                    right: mat(a_round, r_out, cols, true),
                }
            }
            Layout::Embedding => {
                let (a_bytes, a_round) = tensor(&u, false)?; // A = (U·√S)ᵀ [r_out, rows]
                let (b_bytes, b_round) = tensor(&v, true)?; // B = (√S·Vᵀ)ᵀ [cols, r_out]
                crate::factor::DeviceFactors {
                    a_shape: [r_out, rows],
                    a_bytes,
                    b_shape: [cols, r_out],
                    b_bytes,
                    left: mat(a_round, rows, r_out, false),
                    right: mat(b_round, r_out, cols, false),
                }
            }
        })
    }

    fn residual_sumsq(&self, delta: &CudaMat, b: &CudaMat, a: &CudaMat) -> BackendResult<f64> {
        let (m, n) = (delta.rows, delta.cols);
        if b.rows != m || a.cols != n || b.cols != a.rows {
            return Err(BackendError(
                "residual: factor shapes do not match ΔW".into(),
            ));
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
        let block = ((32usize << 20) / sr.max(1)).clamp(1, sc.max(1));
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

/// The ΔW kernel's speed on device-resident inputs against a device-to-device copy of the same
/// bytes (bytes read + written, per second), measured back to back.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeltaBench {
    pub rows: usize,
    pub cols: usize,
    pub dtype: &'static str,
    /// The mode extract uses.
    pub mode: u32,
    pub kernel_seconds: f64,
    pub kernel_bytes_per_s: f64,
    pub copy_bytes_per_s: f64,
    /// (mode, seconds, bytes per second) for every mode.
    pub modes: Vec<(u32, f64, f64)>,
}

impl Cuda {
    /// Times the ΔW kernel (inputs already on the device) and a copy, `reps` times each after
    /// a warm-up; medians.
    pub fn bench_delta(
        &self,
        rows: usize,
        cols: usize,
        dtype: crate::checkpoint::DType,
        reps: usize,
    ) -> Result<DeltaBench, CudaError> {
        let n = rows * cols;
        let in_bytes = n * dtype.size();
        let mut base = self.stream.alloc_zeros::<u8>(in_bytes)?;
        let mut ft = self.stream.alloc_zeros::<u8>(in_bytes)?;
        // Finite, non-zero inputs (0x3f3f… and 0x4040… are ordinary numbers in every dtype).
        // SAFETY: the memsets cover exactly the allocations.
        unsafe {
            let (b, _b) = base.device_ptr_mut(&self.stream);
            cudarc::driver::result::memset_d8_async(b, 0x3f, in_bytes, self.stream.cu_stream())?;
            let (f, _f) = ft.device_ptr_mut(&self.stream);
            cudarc::driver::result::memset_d8_async(f, 0x40, in_bytes, self.stream.cu_stream())?;
        }
        let out = self.alloc(n)?;
        let out_ptr = out.device_ptr(&self.stream).0;
        let blocks = self.kernels.grid(n.div_ceil(8)).grid_dim.0 as usize;
        let mut part_sum = self.alloc_f64(blocks)?;
        // SAFETY: written by each launch before it is read.
        let mut part_bad = unsafe { self.stream.alloc::<u32>(blocks) }?;
        let time = |f: &mut dyn FnMut() -> Result<(), CudaError>| -> Result<f64, CudaError> {
            f()?;
            self.sync()?;
            let mut ts = Vec::new();
            for _ in 0..reps.max(1) {
                let t = std::time::Instant::now();
                f()?;
                self.sync()?;
                ts.push(t.elapsed().as_secs_f64());
            }
            ts.sort_by(f64::total_cmp);
            Ok(ts[ts.len() / 2])
        };
        let moved = (2 * in_bytes + 4 * n) as f64;
        let mut modes = Vec::new();
        for mode in 0..4u32 {
            let seconds = time(&mut || {
                self.kernels.delta(
                    &self.stream,
                    &base,
                    dtype,
                    &ft,
                    dtype,
                    out_ptr,
                    n,
                    &mut part_sum,
                    &mut part_bad,
                    mode,
                )
            })?;
            modes.push((mode, seconds, moved / seconds));
        }
        let kernel_seconds = modes[self.delta_mode as usize].1;
        // A copy moving as many bytes: read 2·in + write 4n ≈ copy of (2·in + 4n)/2 bytes.
        let copy_bytes = (2 * in_bytes + 4 * n) / 2;
        let src = self.stream.alloc_zeros::<u8>(copy_bytes)?;
        let mut dst = self.stream.alloc_zeros::<u8>(copy_bytes)?;
        let copy_seconds = time(&mut || Ok(self.stream.memcpy_dtod(&src, &mut dst)?))?;
        Ok(DeltaBench {
            rows,
            cols,
            dtype: dtype.as_str(),
            mode: self.delta_mode,
            modes,
            kernel_seconds,
            kernel_bytes_per_s: moved / kernel_seconds,
            copy_bytes_per_s: (2 * copy_bytes) as f64 / copy_seconds,
        })
    }

    /// Changes how the ΔW kernel runs (kernels::DELTA_* bits; tests and benches).
    pub fn set_delta_mode(&mut self, mode: u32) {
        self.delta_mode = mode & (kernels::DELTA_PAIRED | kernels::DELTA_F32_PARTIALS);
    }

    /// Changes how the randomized SVD runs (the bench's variants).
    pub fn set_options(&mut self, options: CudaOptions) {
        self.options = options;
    }
}
