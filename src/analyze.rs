//! `analyze`: the energy profile of a fine-tune, without writing an adapter. Per LoRA target:
//! the preserved energy E_r at chosen ranks, the rank each energy needs, and the head of the
//! spectrum; written as JSON and CSV, with an energy-versus-rank plot by module type and a
//! layer × module heatmap of the rank needed for one energy (`plot.rs`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::extract::budget::allocate_budget;
use crate::extract::{SpectraSettings, TensorSpectrum};
use crate::linalg::rank::{rank_for_energy, RankRule};
use crate::report::BudgetAllocation;

#[derive(Clone, Debug)]
pub struct AnalyzeSettings {
    /// Base, fine-tune, filters, the singular values computed, device and memory bounds.
    pub spectra: SpectraSettings,
    pub ranks: Vec<usize>,
    pub energies: Vec<f64>,
    /// The energy of the heatmap.
    pub heatmap_energy: f64,
    /// Singular values kept per tensor in the report.
    pub head: usize,
    /// `--budget`: what each rule would allocate, with this floor (None: the default).
    pub budget: Option<u64>,
    pub min_rank: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorProfile {
    pub name: String,
    /// The module's last name (q_proj, up_proj, embed_tokens, ...).
    pub module_type: String,
    /// The first number in the path (the layer), if any.
    pub layer: Option<usize>,
    pub shape: Vec<usize>,
    pub delta_norm: f64,
    /// How many singular values were computed (the cap, or min(rows, cols)).
    pub computed: usize,
    /// E_r at each requested rank (null beyond what was computed).
    pub energy_at: BTreeMap<usize, Option<f64>>,
    /// The smallest rank reaching each energy (null if beyond what was computed). Keys are the
    /// energies as written on the command line.
    pub rank_for: BTreeMap<String, Option<usize>>,
    pub spectrum_head: Vec<f32>,
    /// E_r for r = 1..computed (for the plots).
    #[serde(skip)]
    pub curve: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AnalysisReport {
    pub base: String,
    pub ft: String,
    pub device: String,
    pub cap: usize,
    pub ranks: Vec<usize>,
    pub energies: Vec<f64>,
    pub heatmap_energy: f64,
    pub seconds: f64,
    pub tensors: Vec<TensorProfile>,
    /// `--budget`: each rule's allocation.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub budget: Vec<BudgetAllocation>,
    /// Files written.
    pub files: Vec<String>,
}

fn energy_key(t: f64) -> String {
    format!("{t}")
}

fn profile(t: &TensorSpectrum, s: &AnalyzeSettings) -> TensorProfile {
    let total = t.delta_norm * t.delta_norm;
    let full = t.s.len() >= t.shape[0].min(t.shape[1]);
    let mut curve = Vec::with_capacity(t.s.len());
    let mut kept = 0.0;
    for &x in &t.s {
        kept += f64::from(x) * f64::from(x);
        curve.push(if total > 0.0 {
            (kept / total).min(1.0)
        } else {
            1.0
        });
    }
    let energy_at = s
        .ranks
        .iter()
        .map(|&r| {
            let e = if total == 0.0 {
                Some(1.0)
            } else if r <= curve.len() {
                Some(curve[r - 1])
            } else if full {
                Some(1.0)
            } else {
                None
            };
            (r, e)
        })
        .collect();
    let rank_for = s
        .energies
        .iter()
        .map(|&e| (energy_key(e), rank_for_energy(&t.s, total, e)))
        .collect();
    let module_type = t.module.rsplit('.').next().unwrap_or(&t.module).to_string();
    TensorProfile {
        name: t.name.clone(),
        module_type,
        layer: crate::names::layer_of(&t.name),
        shape: t.shape.clone(),
        delta_norm: t.delta_norm,
        computed: t.s.len(),
        energy_at,
        rank_for,
        spectrum_head: t.s.iter().take(s.head).copied().collect(),
        curve,
    }
}

/// Computes the spectra and each profile (and, with `--budget`, every rule's allocation); the
/// command writes the files.
pub fn analyze(s: &AnalyzeSettings) -> Result<AnalysisReport> {
    let started = std::time::Instant::now();
    let (spectra, device) = crate::extract::spectra(&s.spectra)?;
    let tensors: Vec<TensorProfile> = spectra.iter().map(|t| profile(t, s)).collect();
    if tensors.is_empty() {
        return Err(Error::Settings(
            "no LoRA target to analyze (check --include/--exclude)".into(),
        ));
    }
    let budget = match s.budget {
        Some(params) => RankRule::ALL
            .iter()
            .map(|&rule| allocate_budget(&spectra, params, rule, s.min_rank))
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    Ok(AnalysisReport {
        base: s.spectra.base.display().to_string(),
        ft: s.spectra.ft.display().to_string(),
        device,
        cap: s.spectra.max_rank,
        ranks: s.ranks.clone(),
        energies: s.energies.clone(),
        heatmap_energy: s.heatmap_energy,
        seconds: started.elapsed().as_secs_f64(),
        tensors,
        budget,
        files: Vec::new(),
    })
}

impl AnalysisReport {
    /// analysis.csv: one row per tensor; an empty cell where a value is beyond the ranks
    /// computed.
    pub fn csv(&self) -> String {
        let mut header = [
            "tensor",
            "module_type",
            "layer",
            "rows",
            "cols",
            "delta_norm",
            "computed",
        ]
        .map(String::from)
        .to_vec();
        header.extend(self.ranks.iter().map(|k| format!("E_r{k}")));
        header.extend(self.energies.iter().map(|e| format!("rank_for_{e}")));
        let mut w = csv::Writer::from_writer(Vec::new());
        let opt = |v: Option<String>| v.unwrap_or_default();
        let mut write = |row: Vec<String>| w.write_record(row).expect("writes to memory");
        write(header);
        for t in &self.tensors {
            let mut row = vec![
                t.name.clone(),
                t.module_type.clone(),
                opt(t.layer.map(|l| l.to_string())),
                t.shape[0].to_string(),
                t.shape[1].to_string(),
                format!("{:.6e}", t.delta_norm),
                t.computed.to_string(),
            ];
            row.extend(
                self.ranks
                    .iter()
                    .map(|k| opt(t.energy_at[k].map(|e| format!("{e:.6}")))),
            );
            row.extend(
                self.energies
                    .iter()
                    .map(|e| opt(t.rank_for[&energy_key(*e)].map(|x| x.to_string()))),
            );
            write(row);
        }
        String::from_utf8(w.into_inner().expect("writes to memory")).expect("UTF-8 in, UTF-8 out")
    }

    /// A table for people: per module type, the median rank each energy needs.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut types: Vec<&str> = Vec::new();
        for t in &self.tensors {
            if !types.contains(&t.module_type.as_str()) {
                types.push(&t.module_type);
            }
        }
        let mut s = String::new();
        let _ = write!(s, "{:<14} {:>7}", "module", "tensors");
        for e in &self.energies {
            let _ = write!(s, " {:>9}", format!("r@{e}"));
        }
        s.push_str("   (median rank needed; >cap: beyond the computed ranks)\n");
        for ty in types {
            let of: Vec<&TensorProfile> = self
                .tensors
                .iter()
                .filter(|t| t.module_type == ty)
                .collect();
            let _ = write!(s, "{:<14} {:>7}", ty, of.len());
            for e in &self.energies {
                let mut v: Vec<usize> = of
                    .iter()
                    .map(|t| t.rank_for[&energy_key(*e)].unwrap_or(usize::MAX))
                    .collect();
                v.sort_unstable();
                let m = v[v.len() / 2];
                let cell = if m == usize::MAX {
                    format!(">{}", self.cap)
                } else {
                    m.to_string()
                };
                let _ = write!(s, " {cell:>9}");
            }
            s.push('\n');
        }
        if !self.budget.is_empty() {
            s.push_str(&self.budget_table());
        }
        let _ = writeln!(
            s,
            "{} tensors in {:.2} s on {}",
            self.tensors.len(),
            self.seconds,
            self.device
        );
        s
    }

    /// `--budget`: each module's rank under each rule, and what each spends.
    fn budget_table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let first = &self.budget[0];
        let _ = writeln!(
            s,
            "\n--budget {}: ranks per rule (floor {}, the uniform rank it is worth: {})",
            first.params, first.min_rank, first.uniform_rank
        );
        let width = crate::report::name_width(self.tensors.iter().map(|t| t.name.as_str()));
        let _ = write!(s, "{:<width$}", "tensor");
        for a in &self.budget {
            let _ = write!(s, " {:>10}", a.rule.as_str());
        }
        s.push('\n');
        let maps: Vec<_> = self.budget.iter().map(|a| a.rank_map()).collect();
        for t in &self.tensors {
            let _ = write!(s, "{:<width$}", t.name);
            for m in &maps {
                let _ = write!(s, " {:>10}", m.get(&t.name).copied().unwrap_or(0));
            }
            s.push('\n');
        }
        let _ = write!(s, "{:<width$}", "parameters");
        for a in &self.budget {
            let _ = write!(s, " {:>10}", a.spent);
        }
        s.push('\n');
        s
    }
}
