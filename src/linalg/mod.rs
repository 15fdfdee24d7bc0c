//! Decompositions, written once over the [`Backend`](crate::backend::Backend) primitives:
//! the randomized SVD ([`rsvd`]), the exact thin SVD ([`exact`]), and rank policies ([`rank`]).

pub mod blocked;
pub mod center;
pub mod exact;
pub mod orth;
pub mod rank;
pub mod rsvd;

use crate::backend::{Backend, BackendResult};

/// Which SVD to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Randomized,
    Exact,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Randomized => "randomized",
            Method::Exact => "exact",
        }
    }
}

/// Settings of the SVD step.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct SvdSettings {
    pub method: Method,
    /// Extra sketch columns p beyond the rank; `None` means p = max(r, 8).
    pub oversample: Option<usize>,
    /// Power iterations q.
    pub power_iters: usize,
    /// The run's seed; each tensor's sketch uses a seed derived from it and the tensor name.
    pub seed: u64,
}

impl Default for SvdSettings {
    fn default() -> Self {
        SvdSettings {
            method: Method::Randomized,
            oversample: None,
            power_iters: 2,
            seed: 0,
        }
    }
}

impl SvdSettings {
    pub fn oversample_for(&self, rank: usize) -> usize {
        self.oversample.unwrap_or(rank.max(8))
    }

    /// Sketch width k = r + p for an m×n ΔW, at most min(m, n).
    pub fn sketch_width(&self, rank: usize, m: usize, n: usize) -> usize {
        (rank + self.oversample_for(rank)).min(m.min(n))
    }

    /// Whether the exact SVD runs: asked for, or a sketch as wide as the matrix.
    pub fn runs_exact(&self, rank: usize, m: usize, n: usize) -> bool {
        self.method == Method::Exact || self.sketch_width(rank, m, n) >= m.min(n)
    }
}

/// The top-r part of an SVD, on the host: ΔW ≈ U·diag(s)·Vᵀ, U m×r, V n×r.
#[derive(Clone, Debug)]
pub struct Truncated {
    pub u: faer::Mat<f32>,
    pub s: Vec<f32>,
    pub v: faer::Mat<f32>,
    /// What actually ran: randomized falls back to exact when the sketch would be as wide
    /// as the matrix.
    pub method: Method,
    /// Sketch width k = r + p (0 for exact).
    pub sketch: usize,
}

/// The same, still on the backend (what the decomposition itself produces; `phlora bench`
/// times this apart from the download).
pub struct OnDevice<M> {
    pub u: M,
    pub s: Vec<f32>,
    pub v: M,
    pub method: Method,
    pub sketch: usize,
}

impl<M> OnDevice<M> {
    /// The leading `r` directions (all of them if there are no more).
    pub fn truncate<B: Backend<Mat = M> + ?Sized>(
        mut self,
        be: &B,
        r: usize,
    ) -> BackendResult<Self> {
        if r >= self.s.len() {
            return Ok(self);
        }
        self.u = be.first_cols(&self.u, r)?;
        self.v = be.first_cols(&self.v, r)?;
        self.s.truncate(r);
        Ok(self)
    }

    pub fn download<B: Backend<Mat = M> + ?Sized>(&self, be: &B) -> BackendResult<Truncated> {
        Ok(Truncated {
            u: be.download(&self.u)?,
            s: self.s.clone(),
            v: be.download(&self.v)?,
            method: self.method,
            sketch: self.sketch,
        })
    }
}

/// Decomposes a rows×cols ΔW at rank `rank` (already ≤ min(rows, cols)).
pub fn decompose<B: Backend>(
    be: &B,
    delta: &B::Mat,
    rank: usize,
    settings: &SvdSettings,
    seed: u64,
) -> BackendResult<Truncated> {
    decompose_on_device(be, delta, rank, settings, seed)?.download(be)
}

/// [`decompose`] without the download of the factors.
pub fn decompose_on_device<B: Backend>(
    be: &B,
    delta: &B::Mat,
    rank: usize,
    settings: &SvdSettings,
    seed: u64,
) -> BackendResult<OnDevice<B::Mat>> {
    decompose_whole_on_device(be, delta, None, rank, settings, seed)
}

/// The top-`rank` SVD of a ΔW held whole, or of P·ΔW without its logit shift when `p` is
/// given ([`center`]): exact for small matrices, else randomized.
pub fn decompose_whole_on_device<B: Backend>(
    be: &B,
    delta: &B::Mat,
    p: Option<&center::RowCentering<B::Mat>>,
    rank: usize,
    settings: &SvdSettings,
    seed: u64,
) -> BackendResult<OnDevice<B::Mat>> {
    let (m, n) = be.shape(delta);
    if settings.runs_exact(rank, m, n) {
        return match p {
            None => exact::exact_svd(be, delta, rank),
            Some(p) => exact::exact_svd(be, &p.apply_whole(be, delta)?, rank),
        };
    }
    let k = settings.sketch_width(rank, m, n);
    let whole = rsvd::Whole::new(be, delta);
    match p {
        None => rsvd::sketch_svd(be, &whole, rank, k, settings.power_iters, seed),
        Some(p) => {
            let centred = center::Centered::new(be, &whole, p);
            rsvd::sketch_svd(be, &centred, rank, k, settings.power_iters, seed)
        }
    }
}
