//! The extract pipeline: plan → load → delta → decompose → rank → factor → sink.
//! Data flows one way; each stage is a module of its own and this file only orchestrates.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;

use crate::adapter::{self, AdapterConfig, AdapterWriter};
use crate::backend::{self, Backend, CudaOptions, DeltaInput, DeltaStats, Device, Resolved};
use crate::checkpoint::dtype::decode_into;
use crate::checkpoint::{Checkpoint, DType, TensorEntry};
use crate::error::{Error, Result};
use crate::factor::Layout;
use crate::linalg::{self, blocked, rank::RankPolicy, rsvd, Method, SvdSettings};
use crate::plan::{Action, Plan, PlanItem, PlanOptions};
use crate::report::{RunReport, StageSeconds, Summary, TensorReport};

/// Everything `extract` needs, validated.
#[derive(Clone, Debug)]
pub struct ExtractSettings {
    pub base: PathBuf,
    pub ft: PathBuf,
    pub out: PathBuf,
    pub rank: RankPolicy,
    pub svd: SvdSettings,
    /// `None`: the fine-tune's dtype.
    pub out_dtype: Option<DType>,
    pub device: Device,
    /// How the randomized SVD runs on a GPU (ignored on the CPU).
    pub cuda: CudaOptions,
    /// Bound on host memory for the computation (None: no bound). A matrix whose f32 ΔW and
    /// sketches would not fit is streamed through the SVD in row blocks instead.
    pub max_ram: Option<u64>,
    /// The same for device memory (None: the backend's default, most of the free memory).
    pub max_vram: Option<u64>,
    pub plan: PlanOptions,
    /// `base_model_name_or_path`; `None`: from the base's config.json, else the base path.
    pub base_name: Option<String>,
    /// Replace an adapter already in OUT.
    pub overwrite: bool,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
}

impl ExtractSettings {
    pub fn new(base: PathBuf, ft: PathBuf, out: PathBuf, rank: usize) -> Self {
        ExtractSettings {
            base,
            ft,
            out,
            rank: RankPolicy::Fixed(rank),
            svd: SvdSettings::default(),
            out_dtype: None,
            device: Device::Auto,
            cuda: CudaOptions::default(),
            max_ram: None,
            max_vram: None,
            plan: PlanOptions {
                include: Vec::new(),
                exclude: Vec::new(),
                embeddings: true,
                norms: true,
            },
            base_name: None,
            overwrite: false,
            progress: false,
        }
    }
}

/// Runs the whole extraction and returns the report (also written to OUT/report.json).
pub fn extract(s: &ExtractSettings) -> Result<RunReport> {
    let base = Checkpoint::open(&s.base)?;
    let ft = Checkpoint::open(&s.ft)?;
    let plan = Plan::build(&base, &ft, &s.plan)?;
    match backend::resolve(s.device, s.cuda)? {
        Resolved::Cpu(cpu) => run(&cpu, s, &base, &ft, &plan),
        Resolved::Cuda(gpu) => run(gpu.as_ref(), s, &base, &ft, &plan),
    }
}

/// Says once when a memory bound has nothing to bound on this backend.
fn warn_unused_bounds<B: Backend>(be: &B, s: &ExtractSettings) {
    if be.delta_in_host_memory() && s.max_vram.is_some() {
        tracing::warn!(
            "--max-vram has no effect on {}: ΔW is in host memory (--max-ram bounds it)",
            be.name()
        );
    }
    if !be.delta_in_host_memory() && s.max_ram.is_some() {
        tracing::warn!(
            "--max-ram has no effect on {}: ΔW is in device memory (--max-vram bounds it)",
            be.name()
        );
    }
}

fn run<B: Backend>(
    be: &B,
    s: &ExtractSettings,
    base: &Checkpoint,
    ft: &Checkpoint,
    plan: &Plan,
) -> Result<RunReport> {
    let started = Instant::now();
    warn_unused_bounds(be, s);
    let out_dtype = s.out_dtype.unwrap_or_else(|| dominant_lora_dtype(plan));
    let r_adapter = s.rank.adapter_rank();
    // Factors are zero-padded to r, so a rank beyond every matrix's size only wastes memory
    // and disk (r = 100000 would ask for gigabytes per tensor).
    let useful = plan
        .items
        .iter()
        .filter(|i| matches!(i.action, Action::LoraLinear | Action::LoraEmbedding))
        .map(|i| i.shape[0].min(i.shape[1]))
        .max();
    if let Some(useful) = useful.filter(|&u| r_adapter > u) {
        return Err(Error::Settings(format!(
            "--rank {r_adapter} exceeds the rank of every target matrix (at most {useful} here)"
        )));
    }
    // How each LoRA target's ΔW fits the memory bound, decided (and a bound no tensor can
    // meet refused) before any work; fits[i] is for plan.items[i].
    let fits = plan
        .items
        .iter()
        .map(|item| match item.action {
            Action::LoraLinear | Action::LoraEmbedding => {
                let rank = s.rank.rank_for(item.shape[0], item.shape[1]);
                fit_of(be, s, item, rank, r_adapter)
            }
            _ => Ok(Fit::Whole),
        })
        .collect::<Result<Vec<Fit>>>()?;
    let mut writer = AdapterWriter::create(&s.out, s.overwrite)?;
    let total_bytes: u64 = plan.items.iter().map(|i| i.input_bytes()).sum();
    let bar = progress_bar(s.progress, total_bytes, plan.items.len());

    let mut rows: Vec<TensorReport> = Vec::with_capacity(plan.items.len());
    let mut written_modules: Vec<String> = Vec::new();
    let mut whole: Vec<&PlanItem> = Vec::new();
    let mut any_whole_changed = false;
    let mut svd_flops = 0f64;
    let mut stages = StageSeconds::default();

    for (done, (item, &fit)) in plan.items.iter().zip(&fits).enumerate() {
        let t0 = Instant::now();
        let mut row = TensorReport::new(&item.name, item.action.label(), &item.shape);
        match &item.action {
            Action::Unchanged => {}
            Action::SaveWhole | Action::NotCarried(_) => {
                let stats = host_delta(base, ft, item)?;
                row.delta_norm = stats.sumsq.sqrt();
                if stats.sumsq == 0.0 {
                    row.action = "unchanged";
                } else if item.action == Action::SaveWhole {
                    any_whole_changed = true;
                } else if let Action::NotCarried(reason) = &item.action {
                    row.reason = Some(reason.clone());
                }
                if item.action == Action::SaveWhole {
                    whole.push(item);
                }
            }
            Action::LoraLinear | Action::LoraEmbedding => {
                let job = LoraJob {
                    be,
                    s,
                    base,
                    ft,
                    item,
                    fit,
                    r_adapter,
                    out_dtype,
                };
                if let Some(module) = job.run(&mut row, &mut writer, &mut stages, &mut svd_flops)? {
                    written_modules.push(module);
                }
            }
        }
        base.release(&item.base);
        ft.release(&item.ft);
        release_free_heap();
        row.seconds = t0.elapsed().as_secs_f64();
        tracing::debug!(tensor = %item.name, action = row.action, seconds = row.seconds, "done");
        rows.push(row);
        bar.inc(item.input_bytes());
        bar.set_message(format!("{}/{} tensors", done + 1, plan.items.len()));
    }
    bar.finish_and_clear();

    // Norms are saved whole only if one changed; then every norm is written, so that PEFT's
    // suffix matching on modules_to_save finds a tensor for each module it wraps.
    let mut modules_to_save = None;
    if any_whole_changed {
        for item in &whole {
            let dtype = item.ft.float_dtype().expect("validated by the planner");
            writer.add(
                adapter::whole_key(&item.name),
                dtype.as_str(),
                item.shape.clone(),
                ft.bytes(&item.ft),
            )?;
        }
        modules_to_save = Some(adapter::modules_to_save(
            plan.norm_module_names().into_iter().collect(),
        ));
        // rows[i] reports plan.items[i].
        for (row, item) in rows.iter_mut().zip(&plan.items) {
            if item.action == Action::SaveWhole && row.action == "unchanged" {
                row.reason = Some(
                    "unchanged, but written whole: PEFT wraps every norm named in modules_to_save"
                        .into(),
                );
            }
        }
    } else {
        for row in rows.iter_mut().filter(|r| r.action == "save-whole") {
            row.action = "unchanged";
        }
    }
    if writer.num_tensors() == 0 {
        return Err(Error::Settings(format!(
            "nothing to write: no selected tensor differs between {} and {}",
            s.base.display(),
            s.ft.display()
        )));
    }

    let summary = summarize(&rows, plan, started, total_bytes, svd_flops, stages);
    if summary.delta_sumsq > 0.0 {
        for row in &mut rows {
            row.share = row.delta_norm * row.delta_norm / summary.delta_sumsq;
        }
    }
    if summary.not_carried > 0 {
        tracing::warn!(
            "{} changed tensor(s) a LoRA cannot carry hold {:.3}% of ‖ΔW‖² and are not in the adapter; see report.json",
            summary.not_carried,
            100.0 * summary.share_not_carried
        );
    }
    let targets = adapter::target_modules(&written_modules, |last| {
        let mut paths: Vec<String> = ft
            .tensors()
            .iter()
            .map(|t| crate::plan::module_of(&t.name))
            .filter(|m| crate::plan::last_segment(m) == last)
            .map(str::to_string)
            .collect();
        paths.dedup();
        paths
    });
    let config = AdapterConfig::new(
        base_model_name(s, base),
        task_type(base, ft),
        r_adapter,
        targets,
        modules_to_save,
    );
    let report = RunReport {
        phlora_version: env!("CARGO_PKG_VERSION"),
        base: s.base.display().to_string(),
        ft: s.ft.display().to_string(),
        out: s.out.display().to_string(),
        device: be.name(),
        rank: r_adapter,
        svd: s.svd.method.as_str(),
        oversample: (s.svd.method == Method::Randomized).then(|| s.svd.oversample_for(r_adapter)),
        power_iters: s.svd.power_iters,
        seed: s.svd.seed,
        out_dtype: out_dtype.to_string(),
        summary,
        tensors: rows,
    };
    let config_json = serde_json::to_string_pretty(&config).expect("config serializes");
    let report_json = serde_json::to_string_pretty(&report).expect("report serializes");
    writer.commit(&config_json, &report_json)?;
    Ok(report)
}

/// Whether this tensor's ΔW fits the memory that holds it (host: `--max-ram`; device:
/// `--max-vram`, by default most of the GPU's free memory) whole, or in how many rows per block.
fn fit_of<B: Backend>(
    be: &B,
    s: &ExtractSettings,
    item: &PlanItem,
    rank: usize,
    r_adapter: usize,
) -> Result<Fit> {
    let on_host = be.delta_in_host_memory();
    let (flag, budget) = if on_host {
        ("--max-ram", s.max_ram)
    } else {
        ("--max-vram", s.max_vram.or_else(|| be.memory_budget()))
    };
    let Some(max) = budget else {
        return Ok(Fit::Whole);
    };
    let (m, n) = (item.shape[0], item.shape[1]);
    let k = s.svd.sketch_width(rank, m, n) as u64;
    let input_bytes = (item.base_dtype().size() + item.ft_dtype().size()) as u64;
    let (m, n) = (m as u64, n as u64);
    let need = memory_need(m, n, k, r_adapter as u64, input_bytes, on_host);
    let exact = s.svd.runs_exact(rank, item.shape[0], item.shape[1]);
    fit_in(max, &need, flag, &item.name, (m, n), exact)
}

/// The decision itself, given the budget and what the tensor needs.
fn fit_in(
    max: u64,
    need: &MemoryNeed,
    flag: &str,
    name: &str,
    (m, n): (u64, u64),
    exact: bool,
) -> Result<Fit> {
    if need.fixed + need.whole <= max {
        return Ok(Fit::Whole);
    }
    let rows = max.saturating_sub(need.fixed) / need.per_row;
    if rows == 0 {
        return Err(Error::Settings(format!(
            "{flag} {} is too small for {name} ({m}×{n}): it needs at least {}",
            crate::size::format_size(max),
            crate::size::format_size(need.fixed + need.per_row)
        )));
    }
    if exact {
        return Err(Error::Settings(format!(
            "{name} ({m}×{n}) does not fit {flag} {} whole, and the exact SVD needs it whole: \
             raise {flag} or use --svd randomized with a rank below {}",
            crate::size::format_size(max),
            m.min(n)
        )));
    }
    Ok(Fit::Blocked(rows as usize))
}

/// How a tensor's ΔW is held during its decomposition.
#[derive(Clone, Copy, Debug)]
enum Fit {
    Whole,
    /// Streamed in blocks of this many rows.
    Blocked(usize),
}

/// Bytes a tensor's decomposition holds in host memory (CPU backend).
struct MemoryNeed {
    /// Whatever the layout: sketches (Y, Q, Z, B and their temporaries), factors, and the
    /// process's own baseline.
    fixed: u64,
    /// ΔW in f32, whole.
    whole: u64,
    /// One row of a block: its f32 ΔW and the input pages it is formed from.
    per_row: u64,
}

/// The process's own memory besides tensors (binary, allocator arenas, decode chunks): an
/// allowance. On the 1B pair under `--max-ram 200M` the peak RSS (117 MiB) less the largest
/// whole tensor's ΔW, sketches and factors leaves ~30 MiB (BENCHMARKS.md).
pub const BASELINE_RAM: u64 = 64 << 20;

/// Device memory besides ΔW and the sketches: the ΔW kernel's input staging (2 × 64 MiB), the
/// residual's scratch (128 MiB), cuBLAS/cuSOLVER workspaces (an allowance, not measured).
pub const BASELINE_VRAM: u64 = 512 << 20;

/// `input_bytes`: bytes per element of base + fine-tune.
fn memory_need(m: u64, n: u64, k: u64, r_out: u64, input_bytes: u64, on_host: bool) -> MemoryNeed {
    if on_host {
        MemoryNeed {
            fixed: BASELINE_RAM + 4 * k * 3 * (m + n) + 8 * r_out * (m + n),
            whole: 4 * m * n,
            per_row: n * (4 + input_bytes),
        }
    } else {
        // Sketches twice over: f64 copies for the fallback QR and the small eigenproblem.
        MemoryNeed {
            fixed: BASELINE_VRAM + 4 * k * 6 * (m + n) + 8 * r_out * (m + n),
            whole: 4 * m * n,
            per_row: 4 * n,
        }
    }
}

/// Where a tensor's ΔW comes from during the SVD and the residual.
enum Source<'a, B: Backend> {
    Whole(B::Mat),
    Blocked(CheckpointBlocks<'a, B>),
}

impl<B: Backend> Source<'_, B> {
    fn decompose(
        &self,
        be: &B,
        rank: usize,
        svd: &SvdSettings,
        seed: u64,
    ) -> backend::BackendResult<linalg::OnDevice<B::Mat>> {
        match self {
            Source::Whole(delta) => linalg::decompose_on_device(be, delta, rank, svd, seed),
            Source::Blocked(src) => {
                let k = svd.sketch_width(rank, src.item.shape[0], src.item.shape[1]);
                blocked::blocked_randomized_svd(be, src, rank, k, svd.power_iters, seed)
            }
        }
    }

    fn residual_sumsq(&self, be: &B, left: &B::Mat, right: &B::Mat) -> backend::BackendResult<f64> {
        match self {
            Source::Whole(delta) => be.residual_sumsq(delta, left, right),
            Source::Blocked(src) => blocked::blocked_residual_sumsq(be, src, left, right),
        }
    }
}

/// A tensor's ΔW in row blocks, each formed from the two checkpoints when asked for (its input
/// pages released as soon as they are read).
struct CheckpointBlocks<'a, B: Backend> {
    be: &'a B,
    base: &'a Checkpoint,
    ft: &'a Checkpoint,
    item: &'a PlanItem,
    step: usize,
}

impl<B: Backend> blocked::RowBlocks<B> for CheckpointBlocks<'_, B> {
    fn shape(&self) -> (usize, usize) {
        (self.item.shape[0], self.item.shape[1])
    }

    fn block_rows(&self) -> usize {
        self.step
    }

    fn block(&self, r0: usize, r1: usize) -> backend::BackendResult<B::Mat> {
        Ok(self.form(r0, r1)?.0)
    }
}

impl<B: Backend> CheckpointBlocks<'_, B> {
    /// Rows r0..r1 of ΔW and their statistics, releasing the input pages as they are read.
    fn form(&self, r0: usize, r1: usize) -> backend::BackendResult<(B::Mat, DeltaStats)> {
        let item = self.item;
        let cols = item.shape[1];
        let (bs, fs) = (item.base_dtype().size(), item.ft_dtype().size());
        let rows_read = |a: usize, b: usize| {
            let (a, b) = (r0 + a, r0 + b);
            self.base
                .release_range(&item.base, a * cols * bs, b * cols * bs);
            self.ft
                .release_range(&item.ft, a * cols * fs, b * cols * fs);
        };
        let input = DeltaInput {
            base: &self.base.bytes(&item.base)[r0 * cols * bs..r1 * cols * bs],
            base_dtype: item.base_dtype(),
            ft: &self.ft.bytes(&item.ft)[r0 * cols * fs..r1 * cols * fs],
            ft_dtype: item.ft_dtype(),
            rows: r1 - r0,
            cols,
            rows_read: Some(&rows_read),
        };
        self.be.delta(&input)
    }
}

/// One LoRA target through delta → decompose → factor → residual → sink.
struct LoraJob<'a, B: Backend> {
    be: &'a B,
    s: &'a ExtractSettings,
    base: &'a Checkpoint,
    ft: &'a Checkpoint,
    item: &'a PlanItem,
    fit: Fit,
    r_adapter: usize,
    out_dtype: DType,
}

impl<B: Backend> LoraJob<'_, B> {
    /// Fills `row`; returns the module path if factors were written (None: unchanged).
    fn run(
        &self,
        row: &mut TensorReport,
        writer: &mut AdapterWriter,
        stages: &mut StageSeconds,
        svd_flops: &mut f64,
    ) -> Result<Option<String>> {
        let (be, item, ft) = (self.be, self.item, self.ft);
        let (rows, cols) = (item.shape[0], item.shape[1]);
        let backend_err = |e: backend::BackendError| tensor_err(ft, &item.ft, e);
        let linalg_err = |e: backend::BackendError| Error::Linalg {
            tensor: item.name.clone(),
            reason: e.0,
        };
        let r = self.s.rank.rank_for(rows, cols);
        let clock = Instant::now();
        let (source, stats) = match self.fit {
            Fit::Whole => {
                let (delta, stats) = self.blocks(rows).form(0, rows).map_err(backend_err)?;
                check_finite(self.base, ft, item, &stats)?;
                (Source::Whole(delta), stats)
            }
            Fit::Blocked(step) => {
                // ΔW is never formed whole: a first pass for ‖ΔW‖ and the finite check (so an
                // unchanged matrix, e.g. a frozen embedding, costs one read, not 2q + 4), then
                // each product of the SVD and the residual re-form the blocks.
                let stats = host_delta(self.base, ft, item)?;
                row.row_blocks = Some(step);
                (Source::Blocked(self.blocks(step)), stats)
            }
        };
        // The decomposition holds all that is needed now: drop what is left of the pages.
        self.base.release(&item.base);
        ft.release(&item.ft);
        row.delta_norm = stats.sumsq.sqrt();
        stages.delta += lap(clock);
        if stats.sumsq == 0.0 {
            row.action = "unchanged";
            return Ok(None);
        }

        let clock = Instant::now();
        let seed = crate::rng::seed_for(self.s.svd.seed, &item.name);
        let t = source
            .decompose(be, r, &self.s.svd, seed)
            .map_err(linalg_err)?;
        match t.method {
            Method::Randomized => {
                stages.svd_randomized += lap(clock);
                *svd_flops += rsvd::nominal_flops(rows, cols, t.sketch, self.s.svd.power_iters);
            }
            Method::Exact => stages.svd_exact += lap(clock),
        }

        let clock = Instant::now();
        let layout = if item.action == Action::LoraEmbedding {
            Layout::Embedding
        } else {
            Layout::Linear
        };
        let f = be
            .factor(&t, layout, self.r_adapter, self.out_dtype)
            .map_err(backend_err)?;
        stages.factor += lap(clock);

        let clock = Instant::now();
        let res = source
            .residual_sumsq(be, &f.left, &f.right)
            .map_err(backend_err)?;
        stages.residual += lap(clock);

        let clock = Instant::now();
        let (a_key, b_key) = match layout {
            Layout::Linear => (
                adapter::lora_a_key(&item.module),
                adapter::lora_b_key(&item.module),
            ),
            Layout::Embedding => (
                adapter::embedding_a_key(&item.module),
                adapter::embedding_b_key(&item.module),
            ),
        };
        let dtype = self.out_dtype.as_str();
        writer.add(a_key, dtype, f.a_shape.to_vec(), &f.a_bytes)?;
        writer.add(b_key, dtype, f.b_shape.to_vec(), &f.b_bytes)?;
        stages.write += lap(clock);

        let kept: f64 = t.s.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        row.rank = Some(r);
        row.energy = Some((kept / stats.sumsq).min(1.0));
        row.residual = Some((res / stats.sumsq).sqrt());
        row.method = Some(t.method);
        row.sketch = (t.method == Method::Randomized).then_some(t.sketch);
        Ok(Some(item.module.clone()))
    }

    /// ΔW of this tensor as row blocks formed from the checkpoints.
    fn blocks(&self, step: usize) -> CheckpointBlocks<'_, B> {
        CheckpointBlocks {
            be: self.be,
            base: self.base,
            ft: self.ft,
            item: self.item,
            step,
        }
    }
}

fn lap(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

fn summarize(
    rows: &[TensorReport],
    plan: &Plan,
    started: Instant,
    input_bytes: u64,
    flops: f64,
    stages: StageSeconds,
) -> Summary {
    let mut m = Summary {
        tensors: rows.len(),
        filtered_out: plan.filtered_out,
        input_bytes,
        ..Default::default()
    };
    let (mut lora, mut whole, mut lost, mut not_carried) = (0f64, 0f64, 0f64, 0f64);
    for r in rows {
        let sq = r.delta_norm * r.delta_norm;
        match r.action {
            "lora" | "lora-embedding" => {
                m.lora += 1;
                lora += sq;
                let res = r.residual.unwrap_or(0.0);
                lost += res * res * sq;
                m.max_residual = m.max_residual.max(res);
            }
            "save-whole" => {
                m.saved_whole += 1;
                whole += sq;
            }
            "not-carried" => {
                m.not_carried += 1;
                not_carried += sq;
            }
            _ => m.unchanged += 1,
        }
    }
    let total = lora + whole + not_carried;
    m.delta_sumsq = total;
    if total > 0.0 {
        m.share_lora_targets = lora / total;
        m.share_saved_whole = whole / total;
        m.share_not_carried = not_carried / total;
        m.total_relative_error = ((lost + not_carried) / total).sqrt();
    }
    m.seconds = started.elapsed().as_secs_f64();
    m.svd_gflops = if stages.svd_randomized > 0.0 {
        flops / stages.svd_randomized / 1e9
    } else {
        0.0
    };
    m.stages = stages;
    m
}

/// ‖ΔW‖² of a tensor that is not decomposed, computed in chunks on the host.
fn host_delta(base: &Checkpoint, ft: &Checkpoint, item: &PlanItem) -> Result<DeltaStats> {
    const CHUNK: usize = 1 << 16;
    let (bd, fd) = (item.base_dtype(), item.ft_dtype());
    let (bb, fb) = (base.bytes(&item.base), ft.bytes(&item.ft));
    let n = item.ft.numel();
    let parts: Vec<DeltaStats> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            let mut x = vec![0f32; hi - lo];
            let mut y = vec![0f32; hi - lo];
            decode_into(bd, &bb[lo * bd.size()..hi * bd.size()], &mut x);
            decode_into(fd, &fb[lo * fd.size()..hi * fd.size()], &mut y);
            // Only the sums are kept: the pages can go (a memory bound counts them).
            base.release_range(&item.base, lo * bd.size(), hi * bd.size());
            ft.release_range(&item.ft, lo * fd.size(), hi * fd.size());
            let mut s = DeltaStats::default();
            for (a, b) in x.iter().zip(&y) {
                let d = b - a;
                if d.is_finite() {
                    s.sumsq += f64::from(d) * f64::from(d);
                } else {
                    s.nonfinite += 1;
                }
            }
            s
        })
        .collect();
    let stats = parts.iter().fold(DeltaStats::default(), |a, b| DeltaStats {
        sumsq: a.sumsq + b.sumsq,
        nonfinite: a.nonfinite + b.nonfinite,
    });
    check_finite(base, ft, item, &stats)?;
    Ok(stats)
}

/// NaN or Inf in ΔW is an error that names the checkpoint holding it.
fn check_finite(
    base: &Checkpoint,
    ft: &Checkpoint,
    item: &PlanItem,
    stats: &DeltaStats,
) -> Result<()> {
    if stats.nonfinite == 0 {
        return Ok(());
    }
    let has_nonfinite = |ck: &Checkpoint, t: &TensorEntry| {
        let dtype = t.float_dtype().expect("validated by the planner");
        ck.bytes(t).chunks(dtype.size() * 4096).any(|c| {
            let mut v = vec![0f32; c.len() / dtype.size()];
            decode_into(dtype, c, &mut v);
            v.iter().any(|x| !x.is_finite())
        })
    };
    let (which, ck, t) = if has_nonfinite(ft, &item.ft) {
        ("the fine-tune", ft, &item.ft)
    } else if has_nonfinite(base, &item.base) {
        ("the base", base, &item.base)
    } else {
        ("the difference (overflow)", ft, &item.ft)
    };
    Err(Error::tensor(
        ck.path_of(t),
        &item.name,
        format!("ΔW has {} NaN or Inf values, from {which}", stats.nonfinite),
    ))
}

fn tensor_err(ck: &Checkpoint, t: &TensorEntry, e: backend::BackendError) -> Error {
    Error::tensor(ck.path_of(t), &t.name, e.0)
}

/// The most common fine-tune dtype among LoRA targets (BF16 if there are none).
fn dominant_lora_dtype(plan: &Plan) -> DType {
    let mut count: HashMap<DType, usize> = HashMap::new();
    for i in &plan.items {
        if matches!(i.action, Action::LoraLinear | Action::LoraEmbedding) {
            *count.entry(i.ft_dtype()).or_default() += 1;
        }
    }
    let mut v: Vec<(DType, usize)> = count.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.as_str().cmp(b.0.as_str())));
    v.first().map_or(DType::BF16, |x| x.0)
}

fn base_model_name(s: &ExtractSettings, base: &Checkpoint) -> String {
    if let Some(n) = &s.base_name {
        return n.clone();
    }
    base.config()
        .and_then(|c| c.get("_name_or_path"))
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .map_or_else(|| s.base.display().to_string(), str::to_string)
}

fn task_type(base: &Checkpoint, ft: &Checkpoint) -> Option<String> {
    let causal = [ft, base].iter().any(|c| {
        c.config()
            .and_then(|c| c.get("architectures"))
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter()
                    .any(|x| x.as_str().is_some_and(|s| s.ends_with("ForCausalLM")))
            })
    });
    causal.then(|| "CAUSAL_LM".to_string())
}

fn progress_bar(enabled: bool, total_bytes: u64, tensors: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {msg} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    bar.set_message(format!("0/{tensors} tensors"));
    bar
}

/// Hands freed heap pages back to the OS after each tensor. Sub-megabyte blocks (factor
/// bytes, per-row scratch) otherwise fragment glibc's arenas, and resident memory creeps up
/// with the number of tensors (measured: +60 MB over 16 Llama layers).
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(fixed: u64, whole: u64, per_row: u64) -> MemoryNeed {
        MemoryNeed {
            fixed,
            whole,
            per_row,
        }
    }

    #[test]
    fn a_tensor_fits_whole_in_blocks_or_not_at_all() {
        let n = need(100, 1000, 10);
        let fit = |max| fit_in(max, &n, "--max-vram", "t", (100, 10), false);
        assert!(matches!(fit(1100), Ok(Fit::Whole)));
        assert!(matches!(fit(1099), Ok(Fit::Blocked(99))));
        assert!(matches!(fit(110), Ok(Fit::Blocked(1))));
        let err = fit(109).err().unwrap().to_string();
        assert!(
            err.contains("--max-vram") && err.contains("needs at least 110 B"),
            "{err}"
        );
        let exact = fit_in(500, &n, "--max-ram", "t", (100, 10), true);
        assert!(exact
            .err()
            .unwrap()
            .to_string()
            .contains("exact SVD needs it whole"));
    }

    #[test]
    fn the_device_model_counts_a_28672x8192_matrix_like_the_gpu_holds_it() {
        // ΔW 0.94 GB whole; sketches at k = 128 and 512 MiB of workspace on top.
        let (m, n) = (28672u64, 8192u64);
        let d = memory_need(m, n, 128, 64, 4, false);
        assert_eq!(d.whole, 4 * m * n);
        assert!(d.fixed > BASELINE_VRAM && d.fixed < BASELINE_VRAM + (200 << 20));
        // On the host a row also holds its input pages.
        assert_eq!(memory_need(m, n, 128, 64, 4, true).per_row, 8 * n);
        let fit = |max| fit_in(max, &d, "--max-vram", "mlp", (m, n), false).unwrap();
        assert!(matches!(fit(2 << 30), Fit::Whole));
        match fit(1 << 30) {
            Fit::Blocked(rows) => assert!(rows > 0 && (rows as u64) < m, "{rows}"),
            Fit::Whole => panic!("1 GiB cannot hold 0.94 GB of ΔW beside 0.6 GB of the rest"),
        }
    }
}
