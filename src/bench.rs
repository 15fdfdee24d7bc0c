//! `phlora bench`: randomized-SVD throughput on synthetic ΔW of known spectrum, on any
//! backend, against the GEMM rate measured in the same run and the exact optimum.
//!
//! ΔW = L·D·R with D = diag(σ) and L, R Householder reflections (I − 2uuᵀ, I − 2vvᵀ): dense,
//! yet its singular values are exactly σ, so the Eckart–Young optimum is known without an
//! exact SVD. A Gaussian sketch is rotation-invariant, so the randomized SVD's accuracy on it
//! is what it would be on any matrix with that spectrum.

use std::time::Instant;

use faer::Mat;
use rayon::prelude::*;

use crate::backend::{Backend, BackendResult, Op};
use crate::checkpoint::DType;
use crate::factor::Factoring;
use crate::factor::Layout;
use crate::linalg::{decompose_on_device, rsvd::nominal_flops, Method, SvdSettings};

/// The spectrum's power-law exponent: σᵢ = (1 + i)^-0.8, a decaying head and a long tail
/// like a fine-tuning delta's.
pub const DECAY: f64 = 0.8;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    pub shapes: Vec<(usize, usize)>,
    pub ranks: Vec<usize>,
    pub oversample: Option<usize>,
    pub power_iters: usize,
    /// Timed repetitions after one warm-up; the median is reported.
    pub reps: usize,
    pub seed: u64,
}

impl BenchSettings {
    pub fn default_shapes() -> Vec<(usize, usize)> {
        // Llama-3-70B: attention q/o, k/v, MLP up/gate, MLP down.
        vec![(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)]
    }
}

/// One measured (shape, rank[, variant]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchRow {
    pub device: String,
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
    pub sketch: usize,
    pub power_iters: usize,
    /// Median seconds of the decomposition, factors still on the device.
    pub seconds: f64,
    /// Median seconds to bring U and V to the host afterwards.
    pub download_seconds: f64,
    /// Nominal GEMM flops with ΔW (2·m·n·k·(2q+2)) over `seconds`.
    pub gflops: f64,
    /// Rate of one ΔW·Ω product of the same shape and precision, measured in this run.
    pub gemm_gflops: f64,
    /// ‖ΔW − U_r·S_r·V_rᵀ‖ / ‖ΔW‖, computed directly in f32.
    pub residual: f64,
    /// The Eckart–Young optimum at this rank, from the known spectrum.
    pub optimum: f64,
}

impl BenchRow {
    pub fn of_gemm(&self) -> f64 {
        self.gflops / self.gemm_gflops
    }
    pub fn residual_ratio(&self) -> f64 {
        if self.optimum > 0.0 {
            self.residual / self.optimum
        } else {
            f64::NAN
        }
    }
}

/// The known-spectrum test matrix (column-major, f32) and its singular values.
pub fn known_spectrum_delta(m: usize, n: usize, seed: u64) -> (Mat<f32>, Vec<f64>) {
    let t = m.min(n);
    let sigma: Vec<f64> = (0..t).map(|i| (1.0 + i as f64).powf(-DECAY)).collect();
    let unit = |len: usize, s: u64| -> Vec<f64> {
        let v: Vec<f64> = (0..len as u64)
            .map(|i| f64::from(crate::rng::normal_at(s, i)))
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|x| x / norm).collect()
    };
    let u = unit(m, crate::rng::derive(seed, 1));
    let v = unit(n, crate::rng::derive(seed, 2));
    // (I − 2uuᵀ)·D·(I − 2vvᵀ) = D − 2u·aᵀ − 2b·vᵀ + 4c·u·vᵀ with a = Dᵀu, b = Dv, c = uᵀDv.
    let a: Vec<f64> = (0..n)
        .map(|j| if j < t { u[j] * sigma[j] } else { 0.0 })
        .collect();
    let b: Vec<f64> = (0..m)
        .map(|i| if i < t { sigma[i] * v[i] } else { 0.0 })
        .collect();
    let c: f64 = (0..t).map(|k| u[k] * sigma[k] * v[k]).sum();
    let mut w = Mat::<f32>::zeros(m, n);
    w.par_col_iter_mut().enumerate().for_each(|(j, col)| {
        for (i, x) in col.iter_mut().enumerate() {
            let d = if i == j { sigma[i] } else { 0.0 };
            *x = (d - 2.0 * u[i] * a[j] - 2.0 * b[i] * v[j] + 4.0 * c * u[i] * v[j]) as f32;
        }
    });
    (w, sigma)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Times `f` once to warm up, then `reps` times; the median, with the backend synchronised.
fn timed<B: Backend, T>(
    be: &B,
    reps: usize,
    mut f: impl FnMut() -> BackendResult<T>,
) -> BackendResult<(f64, T)> {
    let mut last = f()?;
    be.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        last = f()?;
        be.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((median(times), last))
}

/// A ΔW already on the backend, with its spectrum.
pub struct Prepared<M> {
    pub delta: M,
    pub sigma: Vec<f64>,
    pub rows: usize,
    pub cols: usize,
}

pub fn prepare<B: Backend>(
    be: &B,
    m: usize,
    n: usize,
    seed: u64,
) -> BackendResult<Prepared<B::Mat>> {
    let (w, sigma) = known_spectrum_delta(m, n, seed);
    Ok(Prepared {
        delta: be.upload(w.as_ref())?,
        sigma,
        rows: m,
        cols: n,
    })
}

/// Measures one rank on a prepared ΔW.
pub fn measure<B: Factoring>(
    be: &B,
    p: &Prepared<B::Mat>,
    rank: usize,
    s: &BenchSettings,
) -> BackendResult<BenchRow> {
    let (m, n) = (p.rows, p.cols);
    let rank = rank.min(m).min(n);
    let svd = SvdSettings {
        method: Method::Randomized,
        oversample: s.oversample,
        power_iters: s.power_iters,
        seed: s.seed,
    };
    let k = svd.sketch_width(rank, m, n);
    // The GEMM ceiling: one ΔW·Ω of this sketch width, in the precision the SVD uses.
    let omega = be.gaussian(n, k, s.seed)?;
    let (gemm_s, _) = timed(be, s.reps, || be.gemm_delta(&p.delta, Op::N, &omega, Op::N))?;
    drop(omega);
    let (seconds, on_device) = timed(be, s.reps, || {
        decompose_on_device(be, &p.delta, rank, &svd, s.seed)
    })?;
    let (download_seconds, t) = timed(be, s.reps, || on_device.download(be))?;
    let f = be.factor(&on_device, Layout::Linear, rank, DType::F32)?;
    let total: f64 = p.sigma.iter().map(|x| x * x).sum();
    let res = be.residual_sumsq(&p.delta, &f.left, &f.right)?;
    // An empty f64 sum is −0.0; adding +0.0 keeps the printed optimum a plain 0.
    let tail: f64 = p.sigma[rank.min(p.sigma.len())..]
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        + 0.0;
    let flops = if t.method == Method::Randomized {
        nominal_flops(m, n, t.sketch, s.power_iters)
    } else {
        0.0
    };
    Ok(BenchRow {
        device: be.name(),
        rows: m,
        cols: n,
        rank,
        sketch: t.sketch,
        power_iters: s.power_iters,
        seconds,
        download_seconds,
        gflops: flops / seconds / 1e9,
        gemm_gflops: 2.0 * m as f64 * n as f64 * k as f64 / gemm_s / 1e9,
        residual: (res / total).sqrt(),
        optimum: (tail / total).sqrt(),
    })
}

/// The ranks that make sense for an m×n matrix: clamped to min(m, n), duplicates dropped.
pub fn clamped_ranks(ranks: &[usize], m: usize, n: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for &r in ranks {
        let r = r.min(m).min(n);
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// Every shape × rank of the settings.
pub fn run<B: Factoring>(be: &B, s: &BenchSettings) -> BackendResult<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for &(m, n) in &s.shapes {
        let p = prepare(be, m, n, s.seed)?;
        for r in clamped_ranks(&s.ranks, m, n) {
            rows.push(measure(be, &p, r, s)?);
        }
    }
    Ok(rows)
}

/// A fixed-width table of rows, one line each.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = format!(
        "{:<13} {:>5} {:>6} {:>10} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>8}  {}\n",
        "shape",
        "rank",
        "sketch",
        "time ms",
        "dl ms",
        "GFLOP/s",
        "GEMM",
        "ofGEMM",
        "residual",
        "optimum",
        "ratio",
        "device"
    );
    for r in rows {
        // The exact fallback (sketch as wide as the matrix) has no nominal flop count.
        let (gflops, of_gemm) = if r.sketch > 0 {
            (
                format!("{:.0}", r.gflops),
                format!("{:.0}%", 100.0 * r.of_gemm()),
            )
        } else {
            ("exact".into(), "-".into())
        };
        out.push_str(&format!(
            "{:<13} {:>5} {:>6} {:>10.3} {:>9.3} {:>9} {:>9.0} {:>6} {:>9.5} {:>9.5} {:>8.5}  {}\n",
            format!("{}x{}", r.rows, r.cols),
            r.rank,
            r.sketch,
            r.seconds * 1e3,
            r.download_seconds * 1e3,
            gflops,
            r.gemm_gflops,
            of_gemm,
            r.residual,
            r.optimum,
            r.residual_ratio(),
            r.device
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_known_spectrum_matrix_has_exactly_that_spectrum() {
        for &(m, n) in &[(40, 25), (25, 40), (1, 9)] {
            let (w, sigma) = known_spectrum_delta(m, n, 5);
            let w64 = Mat::<f64>::from_fn(m, n, |i, j| f64::from(w[(i, j)]));
            let s = w64.singular_values().unwrap();
            for (k, (&got, &want)) in s.iter().zip(&sigma).enumerate() {
                assert!((got - want).abs() < 1e-6, "{m}×{n} σ{k}: {got} vs {want}");
            }
            // Dense: the reflections spread D over every entry.
            let zeros = w
                .col_iter()
                .flat_map(|c| c.iter().copied())
                .filter(|&x| x == 0.0)
                .count();
            assert!(zeros == 0, "{zeros} zero entries");
        }
    }
}
