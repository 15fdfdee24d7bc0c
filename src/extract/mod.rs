//! The extract pipeline: plan → schedule → load → delta → decompose → rank → factor → sink.
//! Data flows one way: this file plans and assembles the adapter, `fit` sizes each tensor's
//! memory, `engine` schedules tensors onto workers and the writer, `job` does one tensor.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

mod added;
mod assemble;
pub mod budget;
mod engine;
mod fit;
mod fused;
mod job;
mod journal;
pub mod shard;
mod sink_bench;
pub use sink_bench::{bench_sink, SinkBench};

pub use fit::BASELINE_RAM;

use crate::adapter::{self, AdapterConfig, AdapterWriter};
use crate::backend::{self, Backend, CudaOptions, Device, DeviceWorkers, WorkerRequest, Workers};
use crate::checkpoint::{Checkpoint, DType};
use crate::error::{Error, Result};
use crate::factor::Factoring;
use crate::linalg::rank::{RankPolicy, PORTABLE_RANKS};
use crate::linalg::{Method, SvdSettings};
use crate::plan::{Action, Form, Plan, PlanItem, PlanOptions};
use crate::report::TensorAction;
use crate::report::{RunReport, StageSeconds, Summary, TensorReport};

/// Which loaders an adapter must satisfy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Target {
    /// PEFT: per-module ranks through rank_pattern, norms through modules_to_save.
    Peft,
    /// vLLM: one rank from its allowed set (a fixed --rank must be one; chosen ranks are
    /// zero-padded up to one), no modules_to_save.
    Vllm,
    /// What vLLM, SGLang, LoRAX and TGI all load: like Vllm, any rank padded up to an allowed one.
    Portable,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Peft => "peft",
            Target::Vllm => "vllm",
            Target::Portable => "portable",
        }
    }
}

/// Everything `extract` needs, validated.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
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
    /// GPU ordinals to run on (None: all visible, or the one `device` names).
    pub devices: Option<Vec<usize>>,
    /// Tensors in flight per device (None: 2 per GPU, 1 on the CPU).
    pub in_flight: Option<usize>,
    pub plan: PlanOptions,
    /// `base_model_name_or_path`; `None`: from the base's config.json, else the base path.
    pub base_name: Option<String>,
    /// Which loaders the adapter is for.
    pub target: Target,
    /// Replace an adapter already in OUT.
    pub overwrite: bool,
    /// Continue an interrupted run from its journal in OUT.
    pub resume: bool,
    /// Compute only this share of the plan, as a part for `combine`.
    pub shard: Option<shard::Shard>,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Split the adapter's weights into files of at most this many tensor bytes, with an
    /// index (None: one adapter_model.safetensors). Only the layout: not part of a journal's
    /// fingerprint, so a resume or a combine may choose another.
    #[serde(default)]
    pub max_shard_size: Option<u64>,
}

impl ExtractSettings {
    /// The devices and workers these settings ask for.
    pub fn worker_request(&self) -> WorkerRequest {
        WorkerRequest {
            device: self.device,
            devices: self.devices.clone(),
            in_flight: self.in_flight,
            options: self.cuda,
        }
    }

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
            devices: None,
            in_flight: None,
            plan: PlanOptions::all(),
            base_name: None,
            target: Target::Peft,
            overwrite: false,
            resume: false,
            shard: None,
            progress: false,
            max_shard_size: None,
        }
    }
}

/// Both checkpoints, opened and paired.
fn open_pair(s: &ExtractSettings) -> Result<(Checkpoint, Checkpoint, Plan)> {
    let base = Checkpoint::open(&s.base)?;
    let ft = Checkpoint::open(&s.ft)?;
    let plan = Plan::build(&base, &ft, &s.plan)?;
    if let Some(item) = plan
        .items
        .iter()
        .find(|i| i.action == Action::LoraEmbedding)
        .filter(|_| s.plan.lora_bias)
    {
        return Err(Error::Settings(format!(
            "--lora-bias: PEFT refuses lora_bias on an adapter with an embedding LoRA (`{}`); add --no-embeddings (the embedding's change is then reported as not carried), or drop --lora-bias",
            item.name
        )));
    }
    let model_type = ft
        .config()
        .and_then(|c| c.get("model_type"))
        .and_then(|m| m.as_str());
    if s.target == Target::Peft && !s.plan.fuse_experts {
        warn_per_expert_for_peft(&plan, model_type);
    }
    let fused_param = plan.items.iter().find_map(|i| match &i.form {
        Form::Expert(e) => Some(e.param.as_str()),
        _ => None,
    });
    if let Some(param) = fused_param {
        if s.target != Target::Peft {
            return Err(Error::Settings(format!(
                "--target {}: `{param}` is a fused 3-D expert parameter, which only PEFT's target_parameters can carry (vLLM and LoRAX load MoE LoRA per expert, `experts.N.<proj>`); use --target peft, or leave the experts out with --exclude '*.experts.*_proj'",
                s.target.as_str()
            )));
        }
        if s.plan.lora_bias {
            return Err(Error::Settings(format!(
                "--lora-bias: `{param}` is a fused 3-D expert parameter, and PEFT refuses lora_bias on any adapter with target_parameters; drop --lora-bias, or leave the experts out with --exclude '*.experts.*_proj'"
            )));
        }
    }
    Ok((base, ft, plan))
}

/// Per-expert `gate_proj`/`up_proj`/`down_proj` weights that PEFT under transformers v5 will not
/// apply as written: Qwen2-MoE's experts (PEFT does not convert that type), or, for the types it
/// converts, a dense MLP or shared expert of the same names (the conversion drops their LoRA).
fn warn_per_expert_for_peft(plan: &Plan, model_type: Option<&str>) {
    let expert = plan.items.iter().find(|i| {
        crate::names::per_expert_weight(&i.name)
            .is_some_and(|(_, _, proj)| crate::names::fused_target(proj).is_some())
    });
    let Some(expert) = expert else {
        return;
    };
    let namesake = plan.items.iter().find(|i| {
        i.action == Action::LoraLinear
            && crate::names::per_expert_weight(&i.name).is_none()
            && crate::names::fused_target(crate::names::last_segment(&i.module)).is_some()
    });
    if model_type == Some("qwen2_moe") {
        tracing::warn!(
            "{}: the experts are written per expert (what vLLM loads); PEFT under transformers v5 does not apply a per-expert Qwen2-MoE adapter (it fuses the experts in memory): pass --fuse-experts for PEFT",
            expert.name
        );
    } else if let Some(other) = namesake {
        tracing::warn!(
            "{}: when PEFT under transformers v5 converts these per-expert weights to fused experts, it also turns `{}` (a dense MLP or shared expert of the same name) into the experts' parameter and drops its LoRA: pass --fuse-experts for PEFT (vLLM loads the per-expert form)",
            expert.name,
            other.module
        );
    }
}

/// The first worker of the first device: it answers for all about memory and names.
fn first_worker<B: Backend>(groups: &[DeviceWorkers<B>]) -> Result<&B> {
    groups
        .first()
        .and_then(|g| g.workers.first())
        .ok_or_else(|| Error::Device("no worker to run on".into()))
}

/// Runs the whole extraction and returns the report (also written to OUT/report.json).
pub fn extract(s: &ExtractSettings) -> Result<RunReport> {
    if s.shard.is_some() {
        return Err(Error::Settings(
            "a shard run writes a part, not an adapter: call extract_part".into(),
        ));
    }
    match extract_any(s)? {
        Ran::Adapter(report) => Ok(*report),
        Ran::Part(_) => unreachable!("no shard was asked for"),
    }
}

/// A shard run (`--shard I/N`): this share of the tensors, journaled into OUT as a part.
pub fn extract_part(s: &ExtractSettings) -> Result<shard::PartReport> {
    if s.shard.is_none() {
        return Err(Error::Settings("extract_part needs a shard".into()));
    }
    match extract_any(s)? {
        Ran::Part(part) => Ok(part),
        Ran::Adapter(_) => unreachable!("a shard was asked for"),
    }
}

/// How a run ended: with the adapter, or (a shard run) with its part.
enum Ran {
    Adapter(Box<RunReport>),
    Part(shard::PartReport),
}

fn extract_any(s: &ExtractSettings) -> Result<Ran> {
    if s.shard.is_some() {
        shard::check_part_paths(s)?;
    }
    crate::outdir::ensure_not_input(&s.out, &[(&s.base, "base"), (&s.ft, "fine-tune")])?;
    // Held to the end: a second run on OUT (a requeued task, a --resume while this one
    // runs) is refused before it touches anything. An OUT it created goes again if empty.
    let _lock = crate::outdir::OutLock::acquire(&s.out, "extract")?;
    let (base, ft, plan) = open_pair(s)?;
    // Set once this run holds a journal (a refused --resume leaves the old one alone).
    let mut journal_held = false;
    let result = match backend::resolve_workers(&s.worker_request())? {
        Workers::Cpu(groups) => run(&groups, s, &base, &ft, &plan, &mut journal_held),
        Workers::Cuda(groups) => run(&groups, s, &base, &ft, &plan, &mut journal_held),
    };
    // The journal is for runs that can go on: interrupted, or stopped by the disk or the
    // device. An error in the inputs or settings would only come back on --resume.
    match result {
        Err(e @ (Error::Io { .. } | Error::Device(_))) if journal_held => {
            Err(Error::Resumable {
                error: Box::new(e),
                hint: format!(
                    "the finished tensors are kept in {}: fix the cause (free disk space, …) and run the same command with --resume",
                    s.out.join(journal::JOURNAL_DIR).display()
                ),
            })
        }
        Err(e) if journal_held && !matches!(e, Error::Interrupted(_)) => {
            journal::Journal::discard(&s.out);
            Err(e)
        }
        other => other,
    }
}

/// What each device's tensors in flight may share, the smallest of those (fits are decided for
/// it, so that any device can take any tensor and the output does not depend on which one did),
/// and what the process takes on a device besides them (the same on every device). `budgets`
/// also lets each device's allocator keep that share of freed memory for reuse.
struct Budgets {
    per_device: Vec<Option<u64>>,
    smallest: Option<u64>,
    overhead: u64,
}

fn budgets<B: Backend>(groups: &[DeviceWorkers<B>], s: &ExtractSettings) -> Result<Budgets> {
    let mut per_device = Vec::with_capacity(groups.len());
    let mut overhead = 0;
    for g in groups {
        let be = &g.workers[0];
        overhead = be.memory_overhead(g.workers.len());
        if s.max_vram.is_none() {
            // The default bound is read from the free memory once the context exists.
            overhead -= be.memory_overhead(0);
        }
        let share = match budget_of(be, s) {
            Some(bound) if overhead > 0 && bound <= overhead => {
                return Err(Error::Settings(format!(
                    "{} on {} leaves nothing for the tensors: the CUDA context and {} worker(s)' own buffers take about {} there; raise it, or lower --in-flight",
                    s.max_vram.map_or("the free device memory".to_string(), |b| format!("--max-vram {}", crate::size::format_size(b))),
                    be.name(),
                    g.workers.len(),
                    crate::size::format_size(overhead)
                )));
            }
            bound => bound.map(|b| b - overhead),
        };
        per_device.push(share);
    }
    let smallest = per_device.iter().copied().flatten().min();
    for (g, share) in groups.iter().zip(&per_device) {
        // Speed only: a failure is said and the run goes on.
        if let Some(Err(e)) = share.map(|b| g.workers[0].keep_cached_memory(b)) {
            tracing::warn!(
                "{}: cannot set the memory pool's release threshold: {e}",
                g.workers[0].name()
            );
        }
    }
    Ok(Budgets {
        per_device,
        smallest,
        overhead,
    })
}

/// How each LoRA target's ΔW fits at the ranks of `policy`, decided (and a bound no tensor
/// can meet refused) before any work; placements[i] is for plan.items[i].
fn placements<B: Backend>(
    first: &B,
    s: &ExtractSettings,
    budgets: &Budgets,
    plan: &Plan,
    policy: &RankPolicy,
    r_adapter: usize,
) -> Result<Vec<fit::Placement>> {
    plan.items
        .iter()
        .map(|item| match item.action {
            Action::LoraLinear | Action::LoraEmbedding => {
                let (rows, cols) = item.matrix();
                let rank = policy.rank_for(&item.name, rows, cols);
                fit::fit_of(
                    first,
                    s,
                    budgets.smallest,
                    budgets.overhead,
                    item,
                    rank.max(1),
                    r_adapter,
                )
            }
            _ => Ok(fit::Placement::none()),
        })
        .collect()
}

/// One LoRA target's leading singular values (`phlora analyze`).
#[derive(Clone, Debug)]
pub struct TensorSpectrum {
    pub name: String,
    pub module: String,
    pub shape: Vec<usize>,
    /// Parameters per rank of its LoRA: in + out.
    pub cost: u64,
    /// A tied lm_head: the embedding whose factors it carries (and so whose rank it has).
    pub tied_to: Option<String>,
    pub delta_norm: f64,
    /// ‖W_base‖².
    pub base_sumsq: f64,
    /// Descending, at most the policy's rank for this tensor (empty: ΔW = 0).
    pub s: Vec<f32>,
}

/// The spectra of every LoRA target at the ranks of `s.rank` (its cap), without writing an
/// adapter: the same plan, workers and memory bounds as extract. Returns them in plan order
/// with the device's name.
pub fn spectra(s: &ExtractSettings) -> Result<(Vec<TensorSpectrum>, String)> {
    let (base, ft, plan) = open_pair(s)?;
    match backend::resolve_workers(&s.worker_request())? {
        Workers::Cpu(groups) => spectra_on(&groups, s, &base, &ft, &plan),
        Workers::Cuda(groups) => spectra_on(&groups, s, &base, &ft, &plan),
    }
}

fn spectra_on<B: Factoring>(
    groups: &[DeviceWorkers<B>],
    s: &ExtractSettings,
    base: &Checkpoint,
    ft: &Checkpoint,
    plan: &Plan,
) -> Result<(Vec<TensorSpectrum>, String)> {
    let first = first_worker(groups)?;
    let r_adapter = s.rank.adapter_rank();
    let budgets = budgets(groups, s)?;
    let placements = placements(first, s, &budgets, plan, &s.rank, r_adapter)?;
    let total_bytes = plan.input_bytes();
    let bar = progress_bar(s.progress, total_bytes, plan.items.len());
    let shared = engine::Shared {
        s,
        base,
        ft,
        plan,
        placements: &placements,
        r_adapter,
        out_dtype: DType::F32,
        bar: &bar,
        policy: &s.rank,
        spectrum_only: true,
        skip: &vec![false; plan.items.len()],
    };
    let outcome = engine::run_all(groups, &budgets.per_device, &shared, None, None)?;
    bar.finish_and_clear();
    let rows = spectrum_rows(plan, &outcome.finished);
    Ok((rows, device_names(groups)))
}

/// Each LoRA target's spectrum from a spectrum-only pass, in plan order.
fn spectrum_rows(plan: &Plan, finished: &[Option<job::Finished>]) -> Vec<TensorSpectrum> {
    let tied: HashMap<usize, usize> = plan
        .tied_copies()
        .into_iter()
        .map(|(e, c)| (c, e))
        .collect();
    plan.items
        .iter()
        .enumerate()
        .zip(finished)
        .filter(|((_, item), _)| item.action.is_lora())
        .map(|((i, item), done)| {
            let (rows, cols) = item.matrix();
            TensorSpectrum {
                name: item.name.clone(),
                module: item.module.clone(),
                shape: item.shape.clone(),
                cost: (rows + cols) as u64,
                tied_to: tied.get(&i).map(|&e| plan.items[e].name.clone()),
                delta_norm: done.as_ref().map_or(0.0, |d| d.row.carried_sumsq().sqrt()),
                base_sumsq: done.as_ref().and_then(|d| d.base_sumsq).unwrap_or(0.0),
                s: done
                    .as_ref()
                    .and_then(|d| d.spectrum.clone())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// The adapter's `r` and, for a portable adapter, the rank every factor is padded to.
fn adapter_ranks(
    policy: &RankPolicy,
    r_adapter: usize,
    modules: &[(String, usize)],
    pinned: Option<usize>,
    portable: bool,
) -> Result<(usize, Option<usize>)> {
    let largest = modules.iter().map(|m| m.1).max().unwrap_or(0);
    if portable {
        let wanted = if policy.uniform() { r_adapter } else { largest };
        let r = PORTABLE_RANKS
            .iter()
            .copied()
            .find(|&r| r >= wanted)
            .ok_or_else(|| {
                Error::Settings(format!(
                    "--portable: rank {wanted} is above the largest rank vLLM accepts ({})",
                    PORTABLE_RANKS[PORTABLE_RANKS.len() - 1]
                ))
            })?;
        return Ok((r, Some(r)));
    }
    if policy.uniform() {
        return Ok((r_adapter, None));
    }
    if let Some(r) = pinned {
        return Ok((r, None));
    }
    // The most common rank (the larger on a tie) needs no pattern entry.
    let mut count: HashMap<usize, usize> = HashMap::new();
    for (_, r) in modules {
        *count.entry(*r).or_default() += 1;
    }
    let common = count
        .into_iter()
        .max_by_key(|&(r, n)| (n, r))
        .map_or(largest.max(1), |(r, _)| r);
    Ok((common, None))
}

/// The memory a device's tensors in flight share: `--max-ram` for ΔW in host memory,
/// `--max-vram` (else most of the free memory) on a GPU.
fn budget_of<B: Backend>(be: &B, s: &ExtractSettings) -> Option<u64> {
    if be.delta_in_host_memory() {
        s.max_ram
    } else {
        s.max_vram.or_else(|| be.memory_budget())
    }
}

/// "cpu (1 thread) × 2 workers", "cuda:0 (…) + cuda:1 (…), 2 workers each".
fn device_names<B: Backend>(groups: &[DeviceWorkers<B>]) -> String {
    let names: Vec<String> = groups
        .iter()
        .filter_map(|g| g.workers.first().map(|w| w.name()))
        .collect();
    let per = groups.first().map_or(1, |g| g.workers.len());
    match (names.len(), per) {
        (_, 1) => names.join(" + "),
        (1, _) => format!("{} × {per} workers", names[0]),
        _ => format!("{}, {per} workers each", names.join(" + ")),
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

fn run<B: Factoring>(
    groups: &[DeviceWorkers<B>],
    s: &ExtractSettings,
    base: &Checkpoint,
    ft: &Checkpoint,
    plan: &Plan,
    journal_held: &mut bool,
) -> Result<Ran> {
    let started = Instant::now();
    let first = first_worker(groups)?;
    warn_unused_bounds(first, s);
    if s.shard.is_some() {
        shard::check_policy(&s.rank)?;
        shard::check_part_out(s)?;
    }
    let out_dtype = s.out_dtype.unwrap_or_else(|| dominant_lora_dtype(plan));
    let r_adapter = s.rank.adapter_rank();
    // Factors are zero-padded to r, so a rank beyond every matrix's size only wastes memory
    // and disk (r = 100000 would ask for gigabytes per tensor).
    let useful = plan
        .items
        .iter()
        .filter(|i| i.action.is_lora())
        .map(|i| i.matrix().0.min(i.matrix().1))
        .max();
    if let (Some(useful), RankPolicy::Fixed(_)) = (useful.filter(|&u| r_adapter > u), &s.rank) {
        return Err(Error::Settings(format!(
            "--rank {r_adapter} exceeds the rank of every target matrix (at most {useful} here)"
        )));
    }
    if let RankPolicy::Budget { params, .. } = s.rank {
        check_budget(plan, params)?;
    }
    let budgets = budgets(groups, s)?;
    let placements_for =
        |policy: &RankPolicy| placements(first, s, &budgets, plan, policy, r_adapter);
    let placements = placements_for(&s.rank)?;
    // A shard run writes no adapter, only its part (the journal).
    let mut writer = match s.shard {
        None => Some(AdapterWriter::create(
            &s.out,
            s.overwrite || s.resume,
            side_files(s),
        )?),
        Some(_) => None,
    };
    // The journal: a fresh one, or the interrupted run's with what it finished.
    let fingerprint = journal::Fingerprint::of(s, base, ft)?;
    let mut resumed = Resumed::new(plan, &s.out);
    let mut journal = if s.resume {
        journal::Journal::resume(&s.out, &fingerprint, |j| {
            resumed.take(plan, j, writer.as_mut())
        })?
    } else {
        let old = journal::Journal::dir(&s.out);
        if old.exists() && !s.overwrite {
            return Err(Error::checkpoint(
                &old,
                "holds the journal of an interrupted run: pass --resume to continue it, or --force to start over",
            ));
        }
        journal::Journal::start(&s.out, &fingerprint)?
    };
    *journal_held = true;
    let resumed = resumed.finish(&mut journal, writer.as_mut())?;
    // Done already, or another shard's.
    let owner = s
        .shard
        .map(|sh| (sh.index - 1, shard::assignment(plan, sh.count)));
    let skip: Vec<bool> = (0..plan.items.len())
        .map(|i| {
            let others = owner
                .as_ref()
                .is_some_and(|(me, o)| o[i].is_some_and(|k| k != *me));
            resumed[i].is_some() || others
        })
        .collect();
    let no_skip = vec![false; plan.items.len()];
    if s.resume {
        tracing::info!(
            "resuming: {} of {} tensors were finished by the interrupted run",
            skip.iter().filter(|&&d| d).count(),
            plan.items.len()
        );
    }
    let total_bytes = plan.input_bytes();
    let bar = progress_bar(s.progress, total_bytes, plan.items.len());
    let shared = |placements, policy, spectrum_only, skip| engine::Shared {
        s,
        base,
        ft,
        plan,
        placements,
        r_adapter,
        out_dtype,
        bar: &bar,
        policy,
        spectrum_only,
        skip,
    };
    let mut first_pass = None;
    let mut allocation = None;
    let allocated;
    let policy = match &s.rank {
        RankPolicy::Budget {
            params,
            max_rank,
            rule,
            min_rank,
        } => {
            // Spectra first (no factors), then the ranks, then the extraction at those ranks.
            let pass = engine::run_all(
                groups,
                &budgets.per_device,
                &shared(&placements, &s.rank, true, &no_skip),
                writer,
                None,
            )?;
            writer = pass.writer;
            let rows = spectrum_rows(plan, &pass.finished);
            let chosen = budget::allocate_budget(&rows, *params, *rule, *min_rank)?;
            allocated = RankPolicy::PerTensor {
                ranks: chosen.rank_map(),
                max_rank: *max_rank,
            };
            allocation = Some(chosen);
            first_pass = Some(pass.stages);
            bar.reset();
            &allocated
        }
        other => other,
    };
    let placements = placements_for(policy)?;
    let mut outcome = engine::run_all(
        groups,
        &budgets.per_device,
        &shared(&placements, policy, false, &skip),
        writer,
        Some(&mut journal),
    )?;
    if crate::interrupt::requested() {
        let done = outcome.finished.iter().flatten().count() + skip.iter().filter(|&&d| d).count();
        return Err(Error::Interrupted(format!(
            "{done} of {} tensors are finished and kept in {}; run the same command with --resume to continue",
            plan.items.len(),
            journal::Journal::dir(&s.out).display()
        )));
    }
    for (slot, done) in outcome.finished.iter_mut().zip(resumed) {
        if done.is_some() {
            *slot = done;
        }
    }
    if let Some(sh) = s.shard {
        // The part is the journal; combine assembles the adapter from all of them.
        let tensors = outcome.finished.iter().flatten().count();
        let part = shard::finish_part(s, sh, &fingerprint, tensors, started)?;
        return Ok(Ran::Part(part));
    }
    if let Some(st) = first_pass {
        outcome.stages.add(&st);
    }
    bar.finish_and_clear();
    let context = assemble::Context {
        started,
        input_bytes: total_bytes,
        r_adapter,
        out_dtype,
        device: device_names(groups),
        allocation,
        device_memory_peak: groups
            .iter()
            .filter_map(|g| g.workers.first()?.device_memory_peak())
            .max(),
    };
    let report = assemble::assemble(s, base, ft, plan, outcome, &context).map_err(|e| match e {
        // Stopped while the adapter was written: every tensor is journaled.
        Error::Interrupted(what) => Error::Interrupted(format!(
            "{what}; all {} tensors are finished and kept in {}: run the same command with --resume to write it",
            plan.items.len(),
            journal::Journal::dir(&s.out).display()
        )),
        e => e,
    })?;
    journal.remove();
    Ok(Ran::Adapter(Box::new(report)))
}

/// Files an adapter of these settings stages beside its weights (the fine-tune's tokenizer,
/// with added tokens).
fn side_files(s: &ExtractSettings) -> &'static [&'static str] {
    if s.plan.added_tokens {
        crate::adapter::TOKENIZER_FILES
    } else {
        &[]
    }
}

/// A budget below what the cheapest LoRA target's rank 1 costs can give nothing any rank:
/// refused before the spectra are computed.
fn check_budget(plan: &Plan, params: u64) -> Result<()> {
    let cheapest = plan
        .items
        .iter()
        .filter(|i| i.action.is_lora())
        .map(|i| (i.matrix().0 + i.matrix().1, &i.name))
        .min();
    match cheapest {
        Some((cost, name)) if (cost as u64) > params => Err(Error::Settings(format!(
            "--budget {params}: the cheapest LoRA target, `{name}`, needs {cost} parameters at rank 1, so every module would get rank 0 (PEFT refuses an adapter without a LoRA target); raise the budget"
        ))),
        _ => Ok(()),
    }
}

/// The interrupted run's finished tensors by plan index, each staged into the writer as the
/// journal is read (its factors stay in the journal, not in memory). A tied lm_head whose
/// embedding finished but which was not journaled itself is derived (and journaled) at the end.
struct Resumed {
    by_index: Vec<Option<job::Finished>>,
    /// The plan's (embedding, tied lm_head) pairs.
    tied: Vec<(usize, usize)>,
    /// Tied lm_heads derived from their embeddings as those were read, by plan index.
    derived: Vec<(usize, job::Finished)>,
    data: std::path::PathBuf,
}

impl Resumed {
    fn new(plan: &Plan, out: &std::path::Path) -> Resumed {
        Resumed {
            by_index: (0..plan.items.len()).map(|_| None).collect(),
            tied: plan.tied_copies(),
            derived: Vec::new(),
            data: journal::Journal::data_path_in(out),
        }
    }

    fn take(
        &mut self,
        plan: &Plan,
        (mut done, at): journal::Journaled,
        writer: Option<&mut AdapterWriter>,
    ) -> Result<()> {
        let index = done.index;
        if index >= plan.items.len() || plan.items[index].name != done.row.name {
            return Err(Error::Settings(format!(
                "the journal's tensor #{index} `{}` is not the plan's; start over with --force",
                done.row.name
            )));
        }
        for &(source, copy) in &self.tied {
            if source == index {
                self.derived
                    .push((copy, job::tied_copy(&done, copy, &plan.items[copy])));
            }
        }
        engine::stage_journaled(writer, &mut done, &self.data, at)?;
        self.by_index[index] = Some(done);
        Ok(())
    }

    fn finish(
        mut self,
        journal: &mut journal::Journal,
        mut writer: Option<&mut AdapterWriter>,
    ) -> Result<Vec<Option<job::Finished>>> {
        for (copy, mut derived) in std::mem::take(&mut self.derived) {
            if self.by_index[copy].is_none() {
                let at = journal.record(&derived)?;
                engine::stage_journaled(writer.as_deref_mut(), &mut derived, &self.data, at)?;
                self.by_index[copy] = Some(derived);
            }
        }
        Ok(self.by_index)
    }
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
    for (r, item) in rows.iter().zip(&plan.items) {
        // A tied lm_head is the embedding's matrix again: its ΔW is counted once.
        let sq = if item.is_tied_copy() {
            0.0
        } else {
            r.carried_sumsq()
        };
        match r.action {
            TensorAction::Lora | TensorAction::LoraEmbedding | TensorAction::LoraBias => {
                m.lora += 1;
                lora += sq;
                let res = r.residual.unwrap_or(0.0);
                lost += res * res * sq;
                m.max_residual = m.max_residual.max(res);
            }
            TensorAction::SaveWhole => {
                m.saved_whole += 1;
                whole += sq;
            }
            TensorAction::NotCarried => {
                m.not_carried += 1;
                not_carried += sq;
            }
            TensorAction::Unchanged => m.unchanged += 1,
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
    m.peak_rss_bytes = peak_rss_bytes();
    m.svd_gflops = if stages.svd_randomized > 0.0 {
        flops / stages.svd_randomized / 1e9
    } else {
        0.0
    };
    m.stages = stages;
    m
}

/// The most common fine-tune dtype among LoRA targets (BF16 if there are none).
fn dominant_lora_dtype(plan: &Plan) -> DType {
    let mut count: HashMap<DType, usize> = HashMap::new();
    for i in &plan.items {
        if i.action.is_lora() {
            // FP8 weights come dequantised; their factors are written in BF16.
            let d = if i.has_fp8() {
                DType::BF16
            } else {
                i.ft_dtype()
            };
            *count.entry(d).or_default() += 1;
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
pub(super) fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The process's peak resident memory so far (getrusage), for the report: what a memory
/// bound on a job (Slurm's --mem, a container limit) sees.
fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage only fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    // Kilobytes on Linux.
    (usage.ru_maxrss.max(0) as u64) * 1024
}

#[cfg(test)]
mod oom_tests;
