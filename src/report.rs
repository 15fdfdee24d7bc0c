//! The run report: one row per tensor, a summary, JSON for scripts and a table for people.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::linalg::rank::RankRule;
use crate::linalg::Method;

/// What became of a tensor, as report.json names it (`action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TensorAction {
    /// Carried as lora_A/lora_B.
    Lora,
    /// Carried as lora_embedding_A/B.
    LoraEmbedding,
    /// Saved whole (modules_to_save).
    SaveWhole,
    /// Carried exactly as lora_B.bias.
    LoraBias,
    /// Changed, but the adapter cannot carry it (its share of ‖ΔW‖² is reported).
    NotCarried,
    /// Identical in both checkpoints.
    Unchanged,
}

impl TensorAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TensorAction::Lora => "lora",
            TensorAction::LoraEmbedding => "lora-embedding",
            TensorAction::SaveWhole => "save-whole",
            TensorAction::LoraBias => "lora-bias",
            TensorAction::NotCarried => "not-carried",
            TensorAction::Unchanged => "unchanged",
        }
    }
}

impl std::fmt::Display for TensorAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorReport {
    pub name: String,
    pub action: TensorAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub shape: Vec<usize>,
    /// ‖ΔW‖_F.
    pub delta_norm: f64,
    /// The rank decomposed (≤ the adapter's r; the factors are zero-padded to r).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// An output head decomposed without its logit shift: the share of its ‖ΔW‖² that the
    /// shift held (removed; it changes no probability). Its energy and residual are then of
    /// P·ΔW, ΔW without the shift (the residual² is ‖ΔW − B·A‖² less the shift's part, so
    /// exact to about 1e-7·‖ΔW‖²/‖P·ΔW‖²).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logit_shift: Option<f64>,
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
    /// Rows per block when ΔW did not fit the memory bound whole (or the device ran out of
    /// memory on it) and was streamed in row blocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row_blocks: Option<usize>,
    /// This tensor's ‖ΔW‖² over Σ ‖ΔW‖² of the whole model.
    pub share: f64,
    /// Wall time of this tensor on its worker.
    pub seconds: f64,
    /// Which worker ran it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    pub stages: StageSeconds,
}

impl TensorReport {
    /// ‖ΔW‖² the adapter is to carry: without the logit shift where that was removed.
    pub fn carried_sumsq(&self) -> f64 {
        self.delta_norm * self.delta_norm * (1.0 - self.logit_shift.unwrap_or(0.0))
    }

    pub fn new(name: &str, action: TensorAction, shape: &[usize]) -> Self {
        TensorReport {
            name: name.to_string(),
            action,
            reason: None,
            shape: shape.to_vec(),
            delta_norm: 0.0,
            logit_shift: None,
            rank: None,
            energy: None,
            residual: None,
            method: None,
            sketch: None,
            row_blocks: None,
            share: 0.0,
            seconds: 0.0,
            worker: None,
            stages: StageSeconds::default(),
        }
    }
}

/// Where the time went (seconds). In the summary, summed over workers: with several workers
/// the stages add up to workers × wall time, idle included.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct StageSeconds {
    /// Bringing the input bytes into memory: page faults on the maps (disk or page cache),
    /// and on a GPU the copy into pinned staging buffers.
    pub read: f64,
    /// Waiting for host-to-device copies (GPU).
    pub h2d: f64,
    /// Forming ΔW in f32 with its norm (and, for row-blocked matrices, the first pass).
    pub delta: f64,
    pub svd_randomized: f64,
    pub svd_exact: f64,
    /// Splitting into B and A and casting to the output dtype.
    pub factor: f64,
    /// The direct residual certificate ‖ΔW − B·A‖.
    pub residual: f64,
    /// Copying the encoded factors back from the device (GPU).
    pub d2h: f64,
    /// Appending factors to the adapter's staging file (the writer thread, beside the
    /// workers; not part of their sum).
    pub write: f64,
    /// Workers waiting: for memory under the budget, for the writer, or at the end for the
    /// others to finish.
    pub idle: f64,
}

impl StageSeconds {
    /// The stages of a worker's own time, with their names, in pipeline order.
    pub fn worker_stages(&self) -> [(&'static str, f64); 10] {
        [
            ("read", self.read),
            ("host-to-device", self.h2d),
            ("delta", self.delta),
            ("svd (randomized)", self.svd_randomized),
            ("svd (exact)", self.svd_exact),
            ("factor", self.factor),
            ("residual", self.residual),
            ("device-to-host", self.d2h),
            ("idle", self.idle),
            ("write (writer thread)", self.write),
        ]
    }

    pub fn busy(&self) -> f64 {
        self.read
            + self.h2d
            + self.delta
            + self.svd_randomized
            + self.svd_exact
            + self.factor
            + self.residual
            + self.d2h
    }

    pub fn add(&mut self, o: &StageSeconds) {
        self.read += o.read;
        self.h2d += o.h2d;
        self.delta += o.delta;
        self.svd_randomized += o.svd_randomized;
        self.svd_exact += o.svd_exact;
        self.factor += o.factor;
        self.residual += o.residual;
        self.d2h += o.d2h;
        self.write += o.write;
        self.idle += o.idle;
    }
}

/// One worker's share of a run.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerTime {
    /// "cuda:0 #1", "cpu #0".
    pub worker: String,
    pub tensors: usize,
    pub busy_seconds: f64,
    /// Waiting for memory or the writer, and at the end for the other workers.
    pub idle_seconds: f64,
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
    /// Set when the LoRA targets keep too little of their ‖ΔW‖² (a high-rank fine-tune, or
    /// too small a rank): the same as the warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_energy: Option<LowEnergy>,
    pub input_bytes: u64,
    pub seconds: f64,
    /// The process's peak resident memory (host), up to the summary.
    pub peak_rss_bytes: u64,
    /// On a GPU: the most device memory phlora's allocations held at once (the memory pool's
    /// high-water mark; the CUDA context and library handles come on top).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_pool_peak_bytes: Option<u64>,
    /// Nominal randomized-SVD flops 2·m·n·k·(2q+2) / randomized-SVD seconds.
    pub svd_gflops: f64,
    pub stages: StageSeconds,
    pub workers: Vec<WorkerTime>,
}

/// An adapter that keeps little of what it should carry.
#[derive(Clone, Debug, Serialize)]
pub struct LowEnergy {
    /// Share of the LoRA targets' ‖ΔW‖² kept, 1 − Σ residual²·‖ΔW‖² / Σ ‖ΔW‖².
    pub kept: f64,
    /// Modules that keep less than half of their own.
    pub modules_below_half: usize,
    /// The modules that keep least, with what each keeps (E_r from the certificate).
    pub worst: Vec<(String, f64)>,
}

impl LowEnergy {
    pub fn message(&self) -> String {
        let worst = self
            .worst
            .iter()
            .map(|(n, e)| format!("{n} {e:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "the adapter keeps {:.0}% of its LoRA targets' ‖ΔW‖² ({} module(s) below half; least: {worst}): this fine-tune is higher-rank than the adapter, so expect it to behave unlike the fine-tune. `phlora analyze` shows the rank each module needs; try a higher --rank or --budget, or check the result with scripts/eval_adapter.py",
            100.0 * self.kept,
            self.modules_below_half
        )
    }
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
    /// What --budget resolved to: the rule, the floor, what it spent, the ranks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetAllocation>,
    pub summary: Summary,
    pub tensors: Vec<TensorReport>,
    /// `--target llama.cpp`: what adapter.gguf carries and leaves out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf: Option<crate::adapter::gguf::GgufExport>,
}

impl RunReport {
    /// A table for people: the changed tensors, then the summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let width = crate::report::name_width(self.tensors.iter().map(|t| t.name.as_str()));
        let _ = writeln!(
            s,
            "{:<width$}  {:<14}  {:>13}  {:>4}  {:>10}  {:>7}  {:>8}  {:>7}",
            "tensor", "action", "shape", "rank", "‖ΔW‖", "E_r", "residual", "seconds"
        );
        for t in &self.tensors {
            if t.action == TensorAction::Unchanged {
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
                "{streamed} matrices did not fit the memory bound whole and were streamed in row blocks"
            );
        }
        let st = &m.stages;
        let _ = writeln!(
            s,
            "{:.2} s on {}, {:.1} MB/s of input; read {:.2} s, delta {:.2} s, SVD {:.2} s ({:.1} GFLOP/s randomized), factor {:.2} s, residual {:.2} s, write {:.2} s, idle {:.2} s",
            m.seconds,
            self.device,
            m.input_bytes as f64 / 1e6 / m.seconds.max(1e-9),
            st.read + st.h2d,
            st.delta,
            st.svd_randomized + st.svd_exact,
            m.svd_gflops,
            st.factor + st.d2h,
            st.residual,
            st.write,
            st.idle
        );
        s
    }

    /// `--profile`: where the time went, per stage and per worker, and the slowest tensors.
    pub fn profile(&self) -> String {
        let mut s = String::new();
        let m = &self.summary;
        let workers = m.workers.len().max(1);
        let total = m.seconds * workers as f64;
        let _ = writeln!(
            s,
            "time breakdown: {:.3} s wall × {workers} worker(s) on {}",
            m.seconds, self.device
        );
        for (name, secs) in m.stages.worker_stages() {
            let _ = writeln!(
                s,
                "  {name:<22} {secs:>9.3} s  {:>5.1}%",
                100.0 * secs / total.max(1e-12)
            );
        }
        let (bound, _) = m.stages.worker_stages()[..8]
            .iter()
            .copied()
            .fold(("nothing", 0.0), |a, b| if b.1 > a.1 { b } else { a });
        let _ = writeln!(
            s,
            "  largest stage: {bound}; input {:.1} MB/s over the wall time",
            m.input_bytes as f64 / 1e6 / m.seconds.max(1e-9)
        );
        for w in &m.workers {
            let _ = writeln!(
                s,
                "  worker {:<12} {:>5} tensors  busy {:>8.3} s  idle {:>8.3} s",
                w.worker, w.tensors, w.busy_seconds, w.idle_seconds
            );
        }
        let mut slow: Vec<&TensorReport> =
            self.tensors.iter().filter(|t| t.seconds > 0.0).collect();
        slow.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        if !slow.is_empty() {
            let _ = writeln!(
                s,
                "slowest tensors (read / delta / svd / factor / residual s):"
            );
        }
        for t in slow.iter().take(8) {
            let st = &t.stages;
            let _ = writeln!(
                s,
                "  {:>8.3} s  {}  ({:.3} / {:.3} / {:.3} / {:.3} / {:.3})",
                t.seconds,
                t.name,
                st.read + st.h2d,
                st.delta,
                st.svd_randomized + st.svd_exact,
                st.factor + st.d2h,
                st.residual
            );
        }
        s
    }
}

/// The width of a table's name column: the longest name, within 6..=60 characters.
/// The per-tensor rows of the report.json beside an adapter, as JSON (None: there is none,
/// e.g. another tool's adapter); a report that is not JSON is an error naming it.
pub fn tensor_rows_beside(
    adapter_dir: &std::path::Path,
) -> crate::error::Result<Option<Vec<serde_json::Value>>> {
    let path = adapter_dir.join("report.json");
    if crate::checkpoint::input::kind(&path) == crate::checkpoint::input::Kind::Missing {
        return Ok(None);
    }
    let text = crate::checkpoint::input::read_string(&path)?;
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| crate::error::Error::checkpoint(&path, format!("not a phlora report: {e}")))?;
    Ok(Some(match v["tensors"].take() {
        serde_json::Value::Array(rows) => rows,
        _ => Vec::new(),
    }))
}

pub fn name_width<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names.map(str::len).max().unwrap_or(6).clamp(6, 60)
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

/// What a budget resolved to, as report.json and analysis.json record it.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetAllocation {
    pub rule: RankRule,
    /// The budget Σ r·(in + out), and what the ranks spend of it (before any padding to a
    /// common rank: --portable, fused experts).
    pub params: u64,
    pub spent: u64,
    /// The floor under every module's rank (capped by its size).
    pub min_rank: usize,
    /// The largest uniform rank the same budget pays for (the comparison it is made against).
    pub uniform_rank: usize,
    /// Per tensor, in plan order.
    pub ranks: Vec<(String, usize)>,
}

impl BudgetAllocation {
    pub fn rank_map(&self) -> std::collections::HashMap<String, usize> {
        self.ranks.iter().cloned().collect()
    }
}
