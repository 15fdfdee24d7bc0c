//! The randomized SVD of a ΔW that is never held whole: ΔW arrives in row blocks, formed anew
//! from the checkpoints on every pass, so the working set is one block plus the m×k and n×k
//! sketches. Same sketch (same seed → same Ω) and same steps as [`super::rsvd`]; only sums over
//! blocks change order, so the results agree with the unblocked ones to rounding.
//!
//! Cost: 2q + 2 passes over the inputs (one per product with ΔW), plus one for the residual.

use super::OnDevice;
use crate::backend::{Backend, BackendResult, Op};

/// ΔW as row blocks.
pub trait RowBlocks<B: Backend> {
    /// (rows, cols) of the whole ΔW.
    fn shape(&self) -> (usize, usize);
    /// Rows per block (the last one may be shorter).
    fn block_rows(&self) -> usize;
    /// Rows r0..r1 of ΔW, on the backend.
    fn block(&self, r0: usize, r1: usize) -> BackendResult<B::Mat>;
}

/// (r0, r1) of each block.
pub fn ranges(rows: usize, step: usize) -> impl Iterator<Item = (usize, usize)> {
    let step = step.max(1);
    (0..rows)
        .step_by(step)
        .map(move |r0| (r0, (r0 + step).min(rows)))
}

/// ΔW·X, block by block (rows of the result follow the blocks).
fn times<B: Backend>(be: &B, src: &dyn RowBlocks<B>, x: &B::Mat) -> BackendResult<B::Mat> {
    let (m, _) = src.shape();
    let parts = ranges(m, src.block_rows())
        .map(|(r0, r1)| be.gemm_delta(&src.block(r0, r1)?, Op::N, x, Op::N))
        .collect::<BackendResult<Vec<_>>>()?;
    be.stack_rows(&parts)
}

/// Σ_b over row blocks: ΔWᵀ·Q = Σ ΔW_bᵀ·Q_b (n×k), or with `q_first` Qᵀ·ΔW = Σ Q_bᵀ·ΔW_b
/// (k×n, the projection B).
fn transposed_times<B: Backend>(
    be: &B,
    src: &dyn RowBlocks<B>,
    q: &B::Mat,
    q_first: bool,
) -> BackendResult<B::Mat> {
    let (m, _) = src.shape();
    let mut acc: Option<B::Mat> = None;
    for (r0, r1) in ranges(m, src.block_rows()) {
        let qb = be.row_range(q, r0, r1)?;
        let blk = src.block(r0, r1)?;
        let part = if q_first {
            be.gemm_delta(&qb, Op::T, &blk, Op::N)? // k×n
        } else {
            be.gemm_delta(&blk, Op::T, &qb, Op::N)? // n×k
        };
        acc = Some(match acc {
            None => part,
            Some(a) => be.add(&a, &part)?,
        });
    }
    Ok(acc.expect("a matrix has at least one row"))
}

/// The blocked counterpart of [`super::rsvd::randomized_svd`].
pub fn blocked_randomized_svd<B: Backend>(
    be: &B,
    src: &dyn RowBlocks<B>,
    rank: usize,
    k: usize,
    power_iters: usize,
    seed: u64,
) -> BackendResult<OnDevice<B::Mat>> {
    let (_, n) = src.shape();
    let basis = |y: B::Mat, last: bool| {
        if last {
            be.orthonormalize(y)
        } else {
            be.range_basis(y)
        }
    };
    let omega = be.gaussian(n, k, seed)?;
    let mut q = basis(times(be, src, &omega)?, power_iters == 0)?; // m×k
    drop(omega);
    for i in 0..power_iters {
        let z = be.range_basis(transposed_times(be, src, &q, false)?)?; // n×k
        q = basis(times(be, src, &z)?, i + 1 == power_iters)?; // m×k
    }
    let b = transposed_times(be, src, &q, true)?; // k×n
    super::rsvd::from_projection(be, &q, &b, rank, k)
}

/// ‖ΔW − left·right‖²_F, block by block (one more pass over the inputs).
pub fn blocked_residual_sumsq<B: Backend>(
    be: &B,
    src: &dyn RowBlocks<B>,
    left: &B::Mat,
    right: &B::Mat,
) -> BackendResult<f64> {
    let (m, _) = src.shape();
    let mut total = 0.0;
    for (r0, r1) in ranges(m, src.block_rows()) {
        let lb = be.row_range(left, r0, r1)?;
        total += be.residual_sumsq(&src.block(r0, r1)?, &lb, right)?;
    }
    Ok(total)
}
