//! `compare`: two adapters of the same pair (CPU and GPU, two GPUs, two library versions) side
//! by side, module by module: ‖s·B·A − s'·B'·A'‖ / ‖s·B·A‖ computed from the r×r Gram matrices in
//! f64 (B·A is never formed, and singular-vector signs do not matter), and from the two
//! report.json files the residual certificates and ‖ΔW‖ of every tensor. The tolerances are
//! the ones docs/determinism.md promises across devices.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use faer::Mat;
use serde::Serialize;

use crate::adapter::read::{Adapter, LoraModule};
use crate::error::{Error, Result};

/// How far two adapters of one pair may be apart and still agree.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Tolerances {
    /// ‖ΔB·A‖/‖B·A‖ per module (docs/determinism.md: within 1e-2; TF32 products measure ~1e-3).
    pub product: f64,
    /// |Δresidual| / max(residual, 1e-3) per tensor: the certificates are exact, so only
    /// rounding separates them.
    pub residual: f64,
    /// |Δ‖ΔW‖| / ‖ΔW‖ per tensor: the ΔW kernels' reductions.
    pub delta_norm: f64,
}

impl Default for Tolerances {
    fn default() -> Self {
        Tolerances {
            product: 1e-2,
            residual: 1e-5,
            delta_norm: 1e-6,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ModuleDiff {
    pub module: String,
    pub rank: (usize, usize),
    /// ‖s·B·A − s'·B'·A'‖ / ‖s·B·A‖ (0 when both are zero, 1 when only the reference is).
    pub product: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_norm: Option<f64>,
    pub passed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub reference: PathBuf,
    pub other: PathBuf,
    pub tolerances: Tolerances,
    pub modules: Vec<ModuleDiff>,
    pub worst_product: f64,
    pub worst_residual: f64,
    pub worst_delta_norm: f64,
    /// Tensors in both reports whose figures were compared (0 when a report.json is missing).
    pub report_tensors: usize,
    pub passed: bool,
}

/// ⟨s·B·A, s'·B'·A'⟩ = s·s'·tr((BᵀB')(A'Aᵀ)) in f64, for B [m, r], A [r, n].
fn inner(b: &Mat<f64>, a: &Mat<f64>, b2: &Mat<f64>, a2: &Mat<f64>) -> f64 {
    let bb = b.transpose() * b2;
    let aa = a2 * a.transpose();
    (0..bb.nrows())
        .map(|i| {
            (0..bb.ncols())
                .map(|j| bb[(i, j)] * aa[(j, i)])
                .sum::<f64>()
        })
        .sum()
}

/// A module's factors per expert (one pair for an ordinary module), scaled, in f64.
fn scaled_factors(adapter: &Adapter, m: &LoraModule) -> Vec<(Mat<f64>, Mat<f64>)> {
    let (a, b) = adapter.factors(m);
    let (r, experts) = (m.rank, m.experts.max(1));
    (0..experts)
        .map(|e| {
            // Expert e: A's rows e·r + k, B's columns k·E + e (read.rs).
            let a_e = Mat::<f64>::from_fn(r, a.ncols(), |k, j| f64::from(a[(e * r + k, j)]));
            let b_e = Mat::<f64>::from_fn(b.nrows(), r, |i, k| {
                m.scaling * f64::from(b[(i, k * experts + e)])
            });
            (b_e, a_e)
        })
        .collect()
}

/// ‖X − Y‖ / ‖X‖ for X = the reference's update, Y the other's, from Gram matrices.
fn product_difference(x: &[(Mat<f64>, Mat<f64>)], y: &[(Mat<f64>, Mat<f64>)]) -> f64 {
    let (mut xx, mut yy, mut xy) = (0.0, 0.0, 0.0);
    for ((bx, ax), (by, ay)) in x.iter().zip(y) {
        xx += inner(bx, ax, bx, ax);
        yy += inner(by, ay, by, ay);
        xy += inner(bx, ax, by, ay);
    }
    let diff = (xx + yy - 2.0 * xy).max(0.0);
    if xx > 0.0 {
        (diff / xx).sqrt()
    } else if yy > 0.0 {
        1.0
    } else {
        0.0
    }
}

/// (residual, ‖ΔW‖) per tensor name from the report.json beside an adapter (empty without one).
fn report_figures(dir: &Path) -> Result<BTreeMap<String, (Option<f64>, f64)>> {
    let rows = crate::report::tensor_rows_beside(dir)?.unwrap_or_default();
    Ok(rows
        .iter()
        .filter_map(|t| {
            let name = t["name"].as_str()?.to_string();
            Some((name, (t["residual"].as_f64(), t["delta_norm"].as_f64()?)))
        })
        .collect())
}

fn relative(a: f64, b: f64, floor: f64) -> f64 {
    (a - b).abs() / b.abs().max(floor)
}

/// Compares `other` with `reference`. Adapters of different modules, shapes or layouts are an
/// error (they are not two extractions of one pair), not a failed comparison.
pub fn compare(reference: &Path, other: &Path, tol: Tolerances) -> Result<CompareReport> {
    let (ra, oa) = (Adapter::open(reference)?, Adapter::open(other)?);
    let by_param: BTreeMap<&str, &LoraModule> =
        oa.modules.iter().map(|m| (m.param.as_str(), m)).collect();
    let mismatch = |what: String| {
        Error::Settings(format!(
            "{} and {} are not adapters of the same modules: {what}",
            reference.display(),
            other.display()
        ))
    };
    if by_param.len() != ra.modules.len() {
        return Err(mismatch(format!(
            "{} modules against {}",
            ra.modules.len(),
            by_param.len()
        )));
    }
    let (rf, of) = (report_figures(reference)?, report_figures(other)?);
    let mut report_tensors = 0;
    let mut modules = Vec::with_capacity(ra.modules.len());
    for m in &ra.modules {
        let o = by_param
            .get(m.param.as_str())
            .ok_or_else(|| mismatch(format!("{} is only in the first", m.param)))?;
        let (ma, mb) = (Adapter::weight_shape(m), Adapter::weight_shape(o));
        if ma != mb || m.layout != o.layout || m.experts != o.experts {
            return Err(mismatch(format!("{} differs in shape or layout", m.param)));
        }
        let product = product_difference(&scaled_factors(&ra, m), &scaled_factors(&oa, o));
        let figures = rf.get(&m.param).zip(of.get(&m.param));
        report_tensors += usize::from(figures.is_some());
        let residual = figures.and_then(|((x, _), (y, _))| Some(relative((*y)?, (*x)?, 1e-3)));
        let delta_norm = figures.map(|((_, x), (_, y))| relative(*y, *x, 1e-30));
        let passed = product <= tol.product
            && residual.map_or(true, |d| d <= tol.residual)
            && delta_norm.map_or(true, |d| d <= tol.delta_norm);
        modules.push(ModuleDiff {
            module: m.module.clone(),
            rank: (m.rank, o.rank),
            product,
            residual,
            delta_norm,
            passed,
        });
    }
    let worst =
        |f: fn(&ModuleDiff) -> Option<f64>| modules.iter().filter_map(f).fold(0.0f64, f64::max);
    Ok(CompareReport {
        reference: reference.to_path_buf(),
        other: other.to_path_buf(),
        tolerances: tol,
        worst_product: worst(|d| Some(d.product)),
        worst_residual: worst(|d| d.residual),
        worst_delta_norm: worst(|d| d.delta_norm),
        report_tensors,
        passed: modules.iter().all(|d| d.passed),
        modules,
    })
}

impl CompareReport {
    /// The modules that failed (all of them with `all`), and one summary line.
    pub fn table(&self, all: bool) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let shown: Vec<&ModuleDiff> = self.modules.iter().filter(|d| all || !d.passed).collect();
        if !shown.is_empty() {
            let width = crate::report::name_width(shown.iter().map(|d| d.module.as_str()));
            let _ = writeln!(
                s,
                "{:<width$}  {:>9}  {:>9}  {:>9}  ok",
                "module", "ΔB·A", "Δresidual", "Δ‖ΔW‖"
            );
            let opt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2e}"));
            for d in shown {
                let _ = writeln!(
                    s,
                    "{:<width$}  {:>9.2e}  {:>9}  {:>9}  {}",
                    d.module,
                    d.product,
                    opt(d.residual),
                    opt(d.delta_norm),
                    if d.passed { "yes" } else { "NO" }
                );
            }
        }
        let t = &self.tolerances;
        let _ = writeln!(
            s,
            "{} vs {}: {} modules; worst ΔB·A {:.2e} (≤ {:.0e}), worst Δresidual {:.2e} (≤ {:.0e}), worst Δ‖ΔW‖ {:.2e} (≤ {:.0e}) over {} of them in both reports: {}",
            self.other.display(),
            self.reference.display(),
            self.modules.len(),
            self.worst_product,
            t.product,
            self.worst_residual,
            t.residual,
            self.worst_delta_norm,
            t.delta_norm,
            self.report_tensors,
            if self.passed { "agree" } else { "DIFFER" }
        );
        if self.report_tensors < self.modules.len() {
            let _ = writeln!(
                s,
                "{} module(s) have no row of their name in both report.json files (a report missing, or fused experts reported per expert): only their products were compared",
                self.modules.len() - self.report_tensors
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        let m = crate::rng::normal_matrix(rows, cols, seed);
        Mat::from_fn(rows, cols, |i, j| f64::from(m[(i, j)]))
    }

    #[test]
    fn the_gram_difference_equals_the_formed_one() {
        // Seeds 1..4; shapes tall, wide, 1×n and rank 1, and two experts summed.
        for (m, n, r) in [(40, 9, 3), (5, 30, 4), (1, 17, 1), (12, 12, 12)] {
            let x = vec![(seeded(m, r, 1), seeded(r, n, 2))];
            let mut y = x.clone();
            y[0].0 = &y[0].0 + seeded(m, r, 3) * 0.01;
            y[0].1 = &y[0].1 * 1.5;
            let formed = |v: &[(Mat<f64>, Mat<f64>)]| &v[0].0 * &v[0].1;
            let want = (formed(&x) - formed(&y)).norm_l2() / formed(&x).norm_l2();
            let got = product_difference(&x, &y);
            assert!(
                (got - want).abs() <= 1e-10 * want.max(1.0),
                "{m}×{n} r{r}: {got} vs {want}"
            );
            assert_eq!(product_difference(&x, &x), 0.0);
        }
        let two = vec![
            (seeded(6, 2, 5), seeded(2, 7, 6)),
            (seeded(6, 2, 7), seeded(2, 7, 8)),
        ];
        let mut other = two.clone();
        other[1].1 = &other[1].1 * 2.0;
        let ba = |v: &[(Mat<f64>, Mat<f64>)], i: usize| &v[i].0 * &v[i].1;
        let d1 = (ba(&two, 1) - ba(&other, 1)).norm_l2();
        let want = d1 / (ba(&two, 0).norm_l2().powi(2) + ba(&two, 1).norm_l2().powi(2)).sqrt();
        assert!((product_difference(&two, &other) - want).abs() <= 1e-12);
    }

    #[test]
    fn zero_updates_compare_as_equal_and_a_lost_one_as_all_different() {
        let zero = vec![(Mat::<f64>::zeros(4, 2), Mat::<f64>::zeros(2, 3))];
        let some = vec![(seeded(4, 2, 9), seeded(2, 3, 10))];
        assert_eq!(product_difference(&zero, &zero), 0.0);
        assert_eq!(product_difference(&zero, &some), 1.0);
        assert!((product_difference(&some, &zero) - 1.0).abs() < 1e-12);
    }
}
