//! How the randomized SVD runs on the GPU: the variants `phlora bench --variants` compares.

/// How the randomized SVD's steps run on the GPU (the variants `phlora bench --variants`
/// compares).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Orth {
    /// Two Cholesky-QR passes on GEMMs (k×k Cholesky on the host, in f64), falling back to
    /// Householder when the Gram matrix is too ill-conditioned.
    CholeskyQr2,
    /// cuSOLVER geqrf + orgqr in f64 every time.
    Householder,
}

/// How the small k×n SVD of B = QᵀΔW is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
