//! The randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1): a Gaussian sketch
//! Y = ΔW·Ω with k = r + p columns, q power iterations re-orthonormalised at each half-step
//! (so small singular values are not lost to rounding), then the exact SVD of the small
//! B = QᵀΔW. Because B is formed exactly, Σσ̃ᵢ² is the energy ΔW keeps in span(Q).
//!
//! Cost: about 2·m·n·k·(2q + 2) flops in six GEMMs with ΔW (q = 2), plus QRs of m×k and n×k.

use super::orth::{orthonormalize, range_basis, short_wide_svd};
use super::{Method, OnDevice};
use crate::backend::{Backend, BackendResult, Op};

/// Flops of the GEMMs with ΔW, the figure throughput is quoted against.
pub fn nominal_flops(m: usize, n: usize, k: usize, power_iters: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64 * (2 * power_iters + 2) as f64
}

/// The products with ΔW the randomized SVD is made of, so that the algorithm is written once
/// whether ΔW is held whole or streamed in row blocks ([`super::blocked`]).
pub trait DeltaProducts<B: Backend> {
    /// (rows, cols) of ΔW.
    fn shape(&self) -> (usize, usize);
    /// ΔW·X.
    fn times(&self, x: &B::Mat) -> BackendResult<B::Mat>;
    /// ΔWᵀ·Q.
    fn transposed_times(&self, q: &B::Mat) -> BackendResult<B::Mat>;
    /// Qᵀ·ΔW.
    fn projection(&self, q: &B::Mat) -> BackendResult<B::Mat>;
}

/// ΔW held whole on the backend.
pub(crate) struct Whole<'a, B: Backend>(&'a B, &'a B::Mat);

impl<'a, B: Backend> Whole<'a, B> {
    pub(crate) fn new(be: &'a B, delta: &'a B::Mat) -> Self {
        Whole(be, delta)
    }
}

impl<B: Backend> DeltaProducts<B> for Whole<'_, B> {
    fn shape(&self) -> (usize, usize) {
        self.0.shape(self.1)
    }
    fn times(&self, x: &B::Mat) -> BackendResult<B::Mat> {
        self.0.gemm_delta(self.1, Op::N, x, Op::N)
    }
    fn transposed_times(&self, q: &B::Mat) -> BackendResult<B::Mat> {
        self.0.gemm_delta(self.1, Op::T, q, Op::N)
    }
    fn projection(&self, q: &B::Mat) -> BackendResult<B::Mat> {
        self.0.gemm_delta(q, Op::T, self.1, Op::N)
    }
}

pub fn randomized_svd<B: Backend>(
    be: &B,
    a: &B::Mat,
    rank: usize,
    k: usize,
    power_iters: usize,
    seed: u64,
) -> BackendResult<OnDevice<B::Mat>> {
    sketch_svd(be, &Whole(be, a), rank, k, power_iters, seed)
}

/// The algorithm itself, over any way of forming the products with ΔW.
pub fn sketch_svd<B: Backend>(
    be: &B,
    delta: &dyn DeltaProducts<B>,
    rank: usize,
    k: usize,
    power_iters: usize,
    seed: u64,
) -> BackendResult<OnDevice<B::Mat>> {
    let (_m, n) = delta.shape();
    // Only the last basis must be orthonormal to working precision (B = QᵀΔW relies on it);
    // the ones inside the power iterations only carry a subspace forward, for which one
    // Cholesky-QR pass is enough.
    let basis = |y: B::Mat, last: bool| {
        if last {
            orthonormalize(be, y)
        } else {
            range_basis(be, y)
        }
    };
    let omega = be.gaussian(n, k, seed)?;
    let mut q = basis(delta.times(&omega)?, power_iters == 0)?; // m×k
    drop(omega);
    for i in 0..power_iters {
        let z = range_basis(be, delta.transposed_times(&q)?)?; // n×k
        q = basis(delta.times(&z)?, i + 1 == power_iters)?; // m×k
    }
    let b = delta.projection(&q)?; // k×n
    from_projection(be, &q, &b, rank, k)
}

/// The last step: from Q (m×k, orthonormal) and B = QᵀΔW (k×n), the top-r SVD of ΔW ≈ Q·B.
fn from_projection<B: Backend>(
    be: &B,
    q: &B::Mat,
    b: &B::Mat,
    rank: usize,
    k: usize,
) -> BackendResult<OnDevice<B::Mat>> {
    let small = short_wide_svd(be, b)?; // B = Ub·S·Vᵀ, Ub k×k, V n×k
    let r = rank.min(small.s.len());
    // Only the kept directions: U_r = Q·Ub[:, :r].
    let ub_r = be.first_cols(&small.u, r)?;
    let u = be.gemm(q, Op::N, &ub_r, Op::N)?; // m×r
    Ok(OnDevice {
        u,
        s: small.s[..r].to_vec(),
        v: be.first_cols(&small.v, r)?,
        method: Method::Randomized,
        sketch: k,
    })
}
