//! The run report: one row per tensor, a summary, JSON for scripts and a table for people.

use std::fmt::Write as _;

use serde::Serialize;

use crate::linalg::Method;

#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    pub name: String,
    /// lora, lora-embedding, save-whole, not-carried, unchanged.
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub shape: Vec<usize>,
    /// ‖ΔW‖_F.
    pub delta_norm: f64,
    /// The rank decomposed (≤ the adapter's r; the factors are zero-padded to r).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// Preserved energy E_r = Σ_{i≤r} σᵢ² / ‖ΔW‖²_F.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// ‖ΔW − B·A‖_F / ‖ΔW‖_F, recomputed directly from the factors as written (after the
    /// cast to the output dtype): an exact certificate, not an estimate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// Sketch width k = r + p of the randomized SVD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sketch: Option<usize>,
    /// Rows per block when ΔW did not fit `--max-ram` whole and was streamed in row blocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row_blocks: Option<usize>,
    /// This tensor's ‖ΔW‖² over Σ ‖ΔW‖² of the whole model.
    pub share: f64,
    pub seconds: f64,
}

impl TensorReport {
    pub fn new(name: &str, action: &'static str, shape: &[usize]) -> Self {
        TensorReport {
            name: name.to_string(),
            action,
            reason: None,
            shape: shape.to_vec(),
            delta_norm: 0.0,
            rank: None,
            energy: None,
            residual: None,
            method: None,
            sketch: None,
            row_blocks: None,
            share: 0.0,
            seconds: 0.0,
        }
    }
}

/// Where the time went, summed over tensors (seconds).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StageSeconds {
    /// Reading both inputs (page faults on the maps) and forming ΔW in f32.
    pub delta: f64,
    pub svd_randomized: f64,
    pub svd_exact: f64,
    /// Splitting into B and A and casting to the output dtype.
    pub factor: f64,
    /// The direct residual certificate ‖ΔW − B·A‖.
    pub residual: f64,
    /// Appending factors to the adapter's staging file.
    pub write: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub tensors: usize,
    pub lora: usize,
    pub unchanged: usize,
    pub saved_whole: usize,
    pub not_carried: usize,
    pub filtered_out: usize,
    /// Σ ‖ΔW‖²_F over every changed tensor.
    pub delta_sumsq: f64,
    /// Shares of Σ ‖ΔW‖²: in LoRA targets, in modules saved whole, in tensors not carried.
    pub share_lora_targets: f64,
    pub share_saved_whole: f64,
    pub share_not_carried: f64,
    /// √(Σ residual² + Σ not-carried ‖ΔW‖²) / √(Σ ‖ΔW‖²): how far the adapter is from the
    /// whole fine-tune, over every tensor.
    pub total_relative_error: f64,
    /// Worst per-tensor residual among LoRA targets.
    pub max_residual: f64,
    pub input_bytes: u64,
    pub seconds: f64,
    /// Nominal randomized-SVD flops 2·m·n·k·(2q+2) / randomized-SVD seconds.
    pub svd_gflops: f64,
    pub stages: StageSeconds,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub phlora_version: &'static str,
    pub base: String,
    pub ft: String,
    pub out: String,
    pub device: String,
    pub rank: usize,
    pub svd: &'static str,
    pub oversample: Option<usize>,
    pub power_iters: usize,
    pub seed: u64,
    pub out_dtype: String,
    pub summary: Summary,
    pub tensors: Vec<TensorReport>,
}

impl RunReport {
    /// A table for people: the changed tensors, then the summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let width = self
            .tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(6)
            .clamp(6, 60);
        let _ = writeln!(
            s,
            "{:<width$}  {:<14}  {:>13}  {:>4}  {:>10}  {:>7}  {:>8}  {:>7}",
            "tensor", "action", "shape", "rank", "‖ΔW‖", "E_r", "residual", "seconds"
        );
        for t in &self.tensors {
            if t.action == "unchanged" {
                continue;
            }
            let shape = t
                .shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("×");
            let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
            let _ = writeln!(
                s,
                "{:<width$}  {:<14}  {:>13}  {:>4}  {:>10.4e}  {:>7}  {:>8}  {:>7.3}",
                shorten(&t.name, width),
                t.action,
                shape,
                t.rank.map_or("-".to_string(), |r| r.to_string()),
                t.delta_norm,
                opt(t.energy, 4),
                opt(t.residual, 4),
                t.seconds
            );
        }
        let m = &self.summary;
        let _ = writeln!(
            s,
            "{} tensors: {} LoRA, {} saved whole, {} not carried, {} unchanged, {} filtered out",
            m.tensors, m.lora, m.saved_whole, m.not_carried, m.unchanged, m.filtered_out
        );
        let _ = writeln!(
            s,
            "‖ΔW‖² shares: LoRA targets {:.2}%, saved whole {:.2}%, not carried {:.2}%; total relative error {:.4}, worst tensor residual {:.4}",
            100.0 * m.share_lora_targets,
            100.0 * m.share_saved_whole,
            100.0 * m.share_not_carried,
            m.total_relative_error,
            m.max_residual
        );
        let streamed = self
            .tensors
            .iter()
            .filter(|t| t.row_blocks.is_some())
            .count();
        if streamed > 0 {
            let _ = writeln!(
                s,
                "{streamed} matrices did not fit --max-ram whole and were streamed in row blocks"
            );
        }
        let st = &m.stages;
        let _ = writeln!(
            s,
            "{:.2} s on {}, {:.1} MB/s of input; delta {:.2} s, SVD {:.2} s ({:.1} GFLOP/s randomized), factor {:.2} s, residual {:.2} s, write {:.2} s",
            m.seconds,
            self.device,
            m.input_bytes as f64 / 1e6 / m.seconds.max(1e-9),
            st.delta,
            st.svd_randomized + st.svd_exact,
            m.svd_gflops,
            st.factor,
            st.residual,
            st.write
        );
        s
    }
}

fn shorten(name: &str, width: usize) -> String {
    if name.chars().count() <= width {
        name.to_string()
    } else {
        let tail: String = name
            .chars()
            .rev()
            .take(width - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}
