//! Compute backends. The randomized SVD and the pipeline are written once over the narrow set
//! of primitives in [`Backend`]; `Cpu` implements them with faer + rayon, and a CUDA backend
//! slots in behind the same trait. [`Device`] is the one place that decides which runs.

pub mod cpu;

use crate::checkpoint::DType;

pub use cpu::Cpu;

/// Whether a GEMM operand is used as it is or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// A failure inside a backend primitive; the caller adds the tensor's name.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

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

/// What the delta step learns in the same pass over the data.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeltaStats {
    /// ‖ΔW‖²_F, accumulated in f64.
    pub sumsq: f64,
    /// Elements of ΔW that are NaN or ±Inf.
    pub nonfinite: usize,
}

/// A thin SVD: A ≈ U·diag(s)·Vᵀ with U m×p, V n×p, s descending.
pub struct SvdParts<M> {
    pub u: M,
    pub s: Vec<f32>,
    pub v: M,
}

/// The primitives the decomposition needs. Matrices are dense f32 and live on the backend.
pub trait Backend: Sync {
    type Mat: Send;

    fn name(&self) -> String;
    fn shape(&self, a: &Self::Mat) -> (usize, usize);
    fn upload(&self, host: faer::MatRef<'_, f32>) -> BackendResult<Self::Mat>;
    fn download(&self, a: &Self::Mat) -> BackendResult<faer::Mat<f32>>;

    /// ΔW = ft − base in f32, fused with the ‖ΔW‖² reduction and a non-finite count.
    fn delta(&self, input: &DeltaInput<'_>) -> BackendResult<(Self::Mat, DeltaStats)>;

    /// op(A)·op(B).
    fn gemm(&self, a: &Self::Mat, op_a: Op, b: &Self::Mat, op_b: Op) -> BackendResult<Self::Mat>;

    /// An orthonormal basis of the columns of a tall (m ≥ n) matrix, same shape.
    fn orthonormalize(&self, y: Self::Mat) -> BackendResult<Self::Mat>;

    /// The thin SVD of a whole matrix (the exact mode, and the reference in tests).
    fn thin_svd(&self, a: &Self::Mat) -> BackendResult<SvdParts<Self::Mat>>;

    /// The SVD of a short, wide k×n matrix (the randomized SVD's B = QᵀΔW), through the
    /// eigendecomposition of B·Bᵀ formed in f64: accurate for σᵢ/σ₁ ≫ 10⁻⁸, and several
    /// times cheaper than a bidiagonal SVD of B. Directions with σᵢ ≤ 10⁻⁶·σ₁ carry no
    /// information in f32 and come back with zero right vectors.
    fn short_wide_svd(&self, b: &Self::Mat) -> BackendResult<SvdParts<Self::Mat>>;

    /// ‖ΔW − B·A‖²_F in f64, computed directly (the report's error certificate).
    fn residual_sumsq(&self, delta: &Self::Mat, b: &Self::Mat, a: &Self::Mat)
        -> BackendResult<f64>;
}

/// The device a user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// A GPU when one is usable, else the CPU (with one warning).
    Auto,
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl Device {
    pub fn parse(s: &str) -> Option<Device> {
        match s {
            "auto" => Some(Device::Auto),
            "cpu" => Some(Device::Cpu),
            "cuda" => Some(Device::Cuda(0)),
            _ => s.strip_prefix("cuda:")?.parse().ok().map(Device::Cuda),
        }
    }
}

/// What [`Device`] resolved to on this machine.
pub enum Resolved {
    Cpu(Cpu),
}

/// The one place that decides CPU vs GPU.
pub fn resolve(device: Device) -> crate::Result<Resolved> {
    match device {
        Device::Cpu => Ok(Resolved::Cpu(Cpu::new())),
        // No CUDA backend is compiled into this build yet, so `auto` means the CPU; the
        // warning comes once the GPU probe exists and finds nothing.
        Device::Auto => Ok(Resolved::Cpu(Cpu::new())),
        Device::Cuda(n) => Err(crate::Error::Device(format!(
            "cuda:{n} was requested, but this build of phlora has no CUDA backend yet; use --device cpu or auto"
        ))),
    }
}
