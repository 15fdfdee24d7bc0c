//! The logit shift taken out of an output head's ΔW before its SVD.
//!
//! For lm_head (rows = the vocabulary), the component of ΔW along the all-ones direction of
//! its rows, 1·cᵀ/m with c = ΔWᵀ·1, moves every logit of a token by the same amount cᵀh/m,
//! which softmax ignores. Fine-tunes put much of lm_head's ΔW there; decomposing
//! P·ΔW, P = I − 11ᵀ/m, instead gives its rank to directions that change probabilities.
//! P is never formed: each product with ΔW is followed (or preceded) by P applied to an m×k
//! matrix, Y − 1·(1ᵀY)/m, two thin GEMMs. The same randomized SVD runs on top
//! ([`rsvd::sketch_svd`]), on ΔW held whole or in row blocks.

use super::blocked::RowBlocks;
use super::rsvd::{self, DeltaProducts};
use super::OnDevice;
use crate::backend::{Backend, BackendResult, Op};

/// P = I − 11ᵀ/m for one m×n ΔW, with ΔW's column sums.
pub struct RowCentering<M> {
    rows: usize,
    /// m×1 ones, and m×1 of −1/m.
    ones: M,
    minus_mean: M,
    /// c = ΔWᵀ·1 (n×1), in full f32 GEMMs.
    col_sums: M,
    /// ‖ΔW‖² − ‖P·ΔW‖² (= ‖c‖²/m): the energy taken out.
    pub removed_sumsq: f64,
}

fn filled<B: Backend>(be: &B, rows: usize, value: f32) -> BackendResult<B::Mat> {
    be.upload(faer::Mat::<f32>::from_fn(rows, 1, |_, _| value).as_ref())
}

fn sumsq<B: Backend>(be: &B, v: &B::Mat) -> BackendResult<f64> {
    let h = be.download(v)?;
    Ok((0..h.nrows())
        .flat_map(|i| (0..h.ncols()).map(move |j| (i, j)))
        .map(|(i, j)| f64::from(h[(i, j)]).powi(2))
        .sum())
}

impl<M> RowCentering<M> {
    fn new<B: Backend<Mat = M>>(
        be: &B,
        rows: usize,
        ones: M,
        col_sums: M,
        removed_sumsq: f64,
    ) -> BackendResult<Self> {
        Ok(RowCentering {
            rows,
            ones,
            minus_mean: filled(be, rows, -1.0 / rows.max(1) as f32)?,
            col_sums,
            removed_sumsq,
        })
    }

    /// For a ΔW held whole, of ‖ΔW‖² `delta_sumsq`. The energy taken out is measured as
    /// ‖ΔW‖² − ‖ΔW − 1·μᵀ‖² (μ = c/m; one pass of the residual primitive, f64 sums of f32
    /// differences), not as ‖c‖²/m: with c from f32 GEMMs that leaves a few 1e-6·‖ΔW‖² of a
    /// pure shift behind (measured 1.1e-6 at m = 512), where this is off by m·‖δμ‖², ~1e-12.
    pub fn of_whole<B: Backend<Mat = M>>(
        be: &B,
        delta: &M,
        delta_sumsq: f64,
    ) -> BackendResult<Self> {
        let (m, _) = be.shape(delta);
        let ones = filled(be, m, 1.0)?;
        let c = be.gemm(delta, Op::T, &ones, Op::N)?;
        let per_row =
            be.upload(faer::Mat::<f32>::from_fn(1, 1, |_, _| 1.0 / m.max(1) as f32).as_ref())?;
        let mean_t = be.gemm(&per_row, Op::N, &c, Op::T)?; // μᵀ, 1×n
        let leftover = be.residual_sumsq(delta, &ones, &mean_t)?;
        Self::new(be, m, ones, c, (delta_sumsq - leftover).max(0.0))
    }

    /// From ΔW's column sums, computed where its rows were read (the first pass over a ΔW
    /// formed in row blocks, in f64: ‖c‖²/m is exact enough), for a ΔW of `rows` rows.
    pub fn of_column_sums<B: Backend<Mat = M>>(
        be: &B,
        rows: usize,
        sums: &[f64],
    ) -> BackendResult<Self> {
        let c = faer::Mat::<f32>::from_fn(sums.len(), 1, |j, _| sums[j] as f32);
        let removed = sums.iter().map(|x| x * x).sum::<f64>() / rows.max(1) as f64;
        let (ones, c) = (filled(be, rows, 1.0)?, be.upload(c.as_ref())?);
        Self::new(be, rows, ones, c, removed)
    }

    /// P·Y = Y − 1·(1ᵀY)/m for an m×k Y.
    fn project<B: Backend<Mat = M>>(&self, be: &B, y: &M) -> BackendResult<M> {
        let sums = be.gemm(&self.ones, Op::T, y, Op::N)?; // 1×k
        be.add(y, &be.gemm(&self.minus_mean, Op::N, &sums, Op::N)?)
    }

    /// P·ΔW formed whole (for the exact SVD of a small matrix).
    pub fn apply_whole<B: Backend<Mat = M>>(&self, be: &B, delta: &M) -> BackendResult<M> {
        be.add(
            delta,
            &be.gemm(&self.minus_mean, Op::N, &self.col_sums, Op::T)?,
        )
    }

    /// ‖P·ΔW − B·A‖² from `raw` = ‖ΔW − B·A‖²: P is a projection along 1, so the difference
    /// is ‖1ᵀ(ΔW − B·A)‖²/m = ‖c − Aᵀ(Bᵀ1)‖²/m (B = left m×r, A = right r×n).
    pub fn residual_sumsq<B: Backend<Mat = M>>(
        &self,
        be: &B,
        raw: f64,
        left: &M,
        right: &M,
    ) -> BackendResult<f64> {
        let minus_bt1 = be.gemm(left, Op::T, &filled(be, self.rows, -1.0)?, Op::N)?; // −Bᵀ1, r×1
        let d = be.add(&self.col_sums, &be.gemm(right, Op::T, &minus_bt1, Op::N)?)?; // n×1
        Ok((raw - sumsq(be, &d)? / self.rows.max(1) as f64).max(0.0))
    }
}

/// The products of P·ΔW, from those of ΔW.
pub(crate) struct Centered<'a, B: Backend> {
    be: &'a B,
    inner: &'a dyn DeltaProducts<B>,
    p: &'a RowCentering<B::Mat>,
}

impl<'a, B: Backend> Centered<'a, B> {
    pub(crate) fn new(
        be: &'a B,
        inner: &'a dyn DeltaProducts<B>,
        p: &'a RowCentering<B::Mat>,
    ) -> Self {
        Centered { be, inner, p }
    }
}

impl<B: Backend> DeltaProducts<B> for Centered<'_, B> {
    fn shape(&self) -> (usize, usize) {
        self.inner.shape()
    }
    fn times(&self, x: &B::Mat) -> BackendResult<B::Mat> {
        self.p.project(self.be, &self.inner.times(x)?)
    }
    fn transposed_times(&self, q: &B::Mat) -> BackendResult<B::Mat> {
        self.inner.transposed_times(&self.p.project(self.be, q)?)
    }
    fn projection(&self, q: &B::Mat) -> BackendResult<B::Mat> {
        self.inner.projection(&self.p.project(self.be, q)?)
    }
}

/// The top-`rank` SVD of P·ΔW for a ΔW in row blocks (always randomized, as
/// [`super::blocked`]; held whole: [`super::decompose_whole_on_device`]).
pub fn decompose_blocked<B: Backend>(
    be: &B,
    src: &dyn RowBlocks<B>,
    p: &RowCentering<B::Mat>,
    rank: usize,
    k: usize,
    power_iters: usize,
    seed: u64,
) -> BackendResult<OnDevice<B::Mat>> {
    let blocks = super::blocked::Blocked::new(be, src);
    rsvd::sketch_svd(
        be,
        &Centered {
            be,
            inner: &blocks,
            p,
        },
        rank,
        k,
        power_iters,
        seed,
    )
}
