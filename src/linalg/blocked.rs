//! The randomized SVD of a ΔW that is never held whole: ΔW arrives in row blocks, formed anew
//! from the checkpoints on every pass, so the working set is one block plus the m×k and n×k
//! sketches. The algorithm is [`super::rsvd`]'s, with its products with ΔW summed over blocks:
//! same seed → same Ω, and the results agree with the unblocked ones to rounding.
//!
//! Cost: 2q + 2 passes over the inputs (one per product with ΔW), plus one for the residual.

use super::rsvd::{sketch_svd, DeltaProducts};
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

/// The randomized SVD's products with ΔW, summed over row blocks.
pub(crate) struct Blocked<'a, B: Backend> {
    be: &'a B,
    src: &'a dyn RowBlocks<B>,
}

impl<'a, B: Backend> Blocked<'a, B> {
    pub(crate) fn new(be: &'a B, src: &'a dyn RowBlocks<B>) -> Self {
        Blocked { be, src }
    }

    /// Σ_b f(block b, rows b of Q) over the blocks; Q is cut once per pass.
    fn sum_over_blocks(
        &self,
        q: &B::Mat,
        f: impl Fn(&B::Mat, &B::Mat) -> BackendResult<B::Mat>,
    ) -> BackendResult<B::Mat> {
        let (m, _) = self.src.shape();
        let step = self.src.block_rows();
        let mut acc: Option<B::Mat> = None;
        for ((r0, r1), qb) in ranges(m, step).zip(self.be.split_rows(q, step)?) {
            let part = f(&self.src.block(r0, r1)?, &qb)?;
            acc = Some(match acc {
                None => part,
                Some(a) => self.be.add(&a, &part)?,
            });
        }
        Ok(acc.expect("a matrix has at least one row"))
    }
}

impl<B: Backend> DeltaProducts<B> for Blocked<'_, B> {
    fn shape(&self) -> (usize, usize) {
        self.src.shape()
    }

    /// Rows of ΔW·X follow the blocks.
    fn times(&self, x: &B::Mat) -> BackendResult<B::Mat> {
        let (m, _) = self.src.shape();
        let parts = ranges(m, self.src.block_rows())
            .map(|(r0, r1)| {
                self.be
                    .gemm_delta(&self.src.block(r0, r1)?, Op::N, x, Op::N)
            })
            .collect::<BackendResult<Vec<_>>>()?;
        self.be.stack_rows(&parts)
    }

    /// ΔWᵀ·Q = Σ_b ΔW_bᵀ·Q_b (n×k).
    fn transposed_times(&self, q: &B::Mat) -> BackendResult<B::Mat> {
        self.sum_over_blocks(q, |blk, qb| self.be.gemm_delta(blk, Op::T, qb, Op::N))
    }

    /// Qᵀ·ΔW = Σ_b Q_bᵀ·ΔW_b (k×n).
    fn projection(&self, q: &B::Mat) -> BackendResult<B::Mat> {
        self.sum_over_blocks(q, |blk, qb| self.be.gemm_delta(qb, Op::T, blk, Op::N))
    }
}

/// The randomized SVD ([`sketch_svd`]) of a ΔW delivered in row blocks.
pub fn blocked_randomized_svd<B: Backend>(
    be: &B,
    src: &dyn RowBlocks<B>,
    rank: usize,
    k: usize,
    power_iters: usize,
    seed: u64,
) -> BackendResult<OnDevice<B::Mat>> {
    sketch_svd(be, &Blocked { be, src }, rank, k, power_iters, seed)
}

/// ‖ΔW − left·right‖²_F, block by block (one more pass over the inputs).
pub fn blocked_residual_sumsq<B: Backend>(
    be: &B,
    src: &dyn RowBlocks<B>,
    left: &B::Mat,
    right: &B::Mat,
) -> BackendResult<f64> {
    let (m, _) = src.shape();
    let step = src.block_rows();
    let mut total = 0.0;
    for ((r0, r1), lb) in ranges(m, step).zip(be.split_rows(left, step)?) {
        total += be.residual_sumsq(&src.block(r0, r1)?, &lb, right)?;
    }
    Ok(total)
}
