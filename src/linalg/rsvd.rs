//! The randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1): a Gaussian sketch
//! Y = ΔW·Ω with k = r + p columns, q power iterations re-orthonormalised at each half-step
//! (so small singular values are not lost to rounding), then the exact SVD of the small
//! B = QᵀΔW. Because B is formed exactly, Σσ̃ᵢ² is the energy ΔW keeps in span(Q).
//!
//! Cost: about 2·m·n·k·(2q + 2) flops in six GEMMs with ΔW (q = 2), plus QRs of m×k and n×k.

use super::{Method, OnDevice};
use crate::backend::{Backend, BackendResult, Op};

/// Flops of the GEMMs with ΔW, the figure throughput is quoted against.
pub fn nominal_flops(m: usize, n: usize, k: usize, power_iters: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64 * (2 * power_iters + 2) as f64
}

pub fn randomized_svd<B: Backend>(
    be: &B,
    a: &B::Mat,
    rank: usize,
    k: usize,
    power_iters: usize,
    seed: u64,
) -> BackendResult<OnDevice<B::Mat>> {
    let (_m, n) = be.shape(a);
    // Only the last basis must be orthonormal to working precision (B = QᵀΔW relies on it);
    // the ones inside the power iterations only carry a subspace forward, for which one
    // Cholesky-QR pass is enough.
    let basis = |y: B::Mat, last: bool| {
        if last {
            be.orthonormalize(y)
        } else {
            be.range_basis(y)
        }
    };
    let omega = be.gaussian(n, k, seed)?;
    let mut q = basis(be.gemm_delta(a, Op::N, &omega, Op::N)?, power_iters == 0)?; // m×k
    drop(omega);
    for i in 0..power_iters {
        let z = be.range_basis(be.gemm_delta(a, Op::T, &q, Op::N)?)?; // n×k
        q = basis(be.gemm_delta(a, Op::N, &z, Op::N)?, i + 1 == power_iters)?; // m×k
    }
    let b = be.gemm_delta(&q, Op::T, a, Op::N)?; // k×n
    from_projection(be, &q, &b, rank, k)
}

/// The last step, shared with the blocked variant: from Q (m×k, orthonormal) and
/// B = QᵀΔW (k×n), the top-r SVD of ΔW ≈ Q·B.
pub(crate) fn from_projection<B: Backend>(
    be: &B,
    q: &B::Mat,
    b: &B::Mat,
    rank: usize,
    k: usize,
) -> BackendResult<OnDevice<B::Mat>> {
    let small = be.short_wide_svd(b)?; // B = Ub·S·Vᵀ, Ub k×k, V n×k
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
