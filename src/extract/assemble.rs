//! Assembling the adapter from every tensor's result: the report rows, the norms saved whole,
//! lora_B biases, target_modules / target_parameters, ranks and their patterns, the config and
//! the report — then the commit. A single run, a resumed one and `combine` all end here.

use std::collections::HashMap;
use std::time::Instant;

use super::engine::Outcome;
use super::pair::{base_model_name, task_type};
use super::settings::{ExtractSettings, Target};
use super::{added, fused, memory};
use crate::adapter::{self, AdapterConfig, AdapterWriter};
use crate::checkpoint::{Checkpoint, DType};
use crate::error::{Error, Result};
use crate::linalg::rank::{RankPolicy, PORTABLE_RANKS};
use crate::linalg::Method;
use crate::plan::{Action, Form, Plan, PlanItem};
use crate::report::LowEnergy;
use crate::report::{RunReport, StageSeconds, Summary, TensorAction, TensorReport};

/// What the run that computed the tensors knows besides them.
pub(super) struct Context {
    pub started: Instant,
    pub input_bytes: u64,
    pub r_adapter: usize,
    pub out_dtype: DType,
    /// The devices, for the report.
    pub device: String,
    /// What --budget resolved to.
    pub allocation: Option<crate::report::BudgetAllocation>,
    /// The device allocator's high-water mark (the largest over the devices).
    pub device_memory_peak: Option<u64>,
}

pub(super) fn assemble(
    s: &ExtractSettings,
    base: &Checkpoint,
    ft: &Checkpoint,
    plan: &Plan,
    outcome: Outcome,
    cx: &Context,
) -> Result<RunReport> {
    let mut writer = outcome.writer.expect("extract runs with a writer");
    // rows[i] reports plan.items[i].
    let (mut rows, svd_flops, written_modules) = report_rows(plan, outcome.finished);
    let modules_to_save = save_norms(&mut writer, plan, ft, &mut rows)?;
    drop_orphan_biases(&mut writer, plan, &mut rows, &written_modules);
    if writer.num_tensors() == 0 {
        return Err(Error::Settings(format!(
            "nothing to write: no selected tensor differs between {} and {}",
            s.base.display(),
            s.ft.display()
        )));
    }
    if written_modules.is_empty() {
        return Err(no_lora_target(s, plan, &rows));
    }
    let mut summary = summarize(
        &rows,
        plan,
        cx.started,
        cx.input_bytes,
        svd_flops,
        outcome.stages,
    );
    summary.workers = outcome.workers;
    summary.device_pool_peak_bytes = cx.device_memory_peak;
    if summary.delta_sumsq > 0.0 {
        for row in &mut rows {
            row.share = row.delta_norm * row.delta_norm / summary.delta_sumsq;
        }
    }
    warn_left_out(s, plan, &rows, &summary);
    summary.low_energy = low_energy(&rows, plan);
    if let Some(low) = &summary.low_energy {
        tracing::warn!("{}", low.message());
    }
    if let Some((share, n)) = logit_shift_removed(&rows) {
        tracing::info!(
            "{n} output head(s) decomposed without their logit shift, which changes no probability: it held {:.1}% of their ‖ΔW‖² (report.json: logit_shift; verify compares that ΔW modulo the shift)",
            100.0 * share
        );
    }
    let targets = Targets::split(s, plan, written_modules);
    let ranks = Ranks::of(s, plan, &rows, cx.r_adapter)?;
    let written_rank = ranks.written(&mut writer);
    let mut config = AdapterConfig::new(
        base_model_name(s, base),
        task_type(base, ft),
        ranks.config_rank,
        adapter::target_modules(&targets.modules, |last| paths_named(ft, last)),
        modules_to_save,
    );
    config.revision = s.base_revision.clone();
    config.lora_bias = rows.iter().any(|r| r.action == TensorAction::LoraBias);
    config.target_parameters = targets.parameters(&ranks.fused);
    // GPT-2's Conv1D layers store [in, out] (PEFT sets fan_in_fan_out per layer anyway).
    config.fan_in_fan_out = rows
        .iter()
        .zip(&plan.items)
        .any(|(r, i)| i.form == Form::Conv1D && r.action == TensorAction::Lora);
    ranks.patterns(s, &targets, &mut config);
    let report = RunReport {
        phlora_version: env!("CARGO_PKG_VERSION"),
        base: s.base.display().to_string(),
        ft: s.ft.display().to_string(),
        out: s.out.display().to_string(),
        device: cx.device.clone(),
        rank: ranks.config_rank,
        svd: s.svd.method.as_str(),
        oversample: (s.svd.method == Method::Randomized)
            .then(|| s.svd.oversample_for(cx.r_adapter)),
        power_iters: s.svd.power_iters,
        seed: s.svd.seed,
        out_dtype: cx.out_dtype.to_string(),
        budget: cx.allocation.clone(),
        summary,
        tensors: rows,
        gguf: None,
    };
    let staged = added::stage(&mut writer, plan, ft)?;
    if !staged.is_empty() {
        tracing::info!(
            "added tokens: {} written beside the adapter; resize the base's embeddings to the fine-tune's vocabulary and copy the new rows in before loading it (docs/models.md: added tokens)",
            staged.join(", ")
        );
    }
    let config_json = serde_json::to_string_pretty(&config).expect("config serializes");
    let report_json = serde_json::to_string_pretty(&report).expect("report serializes");
    writer.commit(
        &config_json,
        &report_json,
        &|key| written_rank.get(key).copied(),
        s.max_shard_size,
    )?;
    Ok(report)
}

/// One report row per plan item (in plan order), the SVDs' flops, and the modules that got
/// LoRA factors.
fn report_rows(
    plan: &Plan,
    finished: Vec<Option<super::job::Finished>>,
) -> (Vec<TensorReport>, f64, Vec<String>) {
    let mut svd_flops = 0f64;
    let mut written_modules: Vec<String> = Vec::new();
    let mut rows: Vec<TensorReport> = Vec::with_capacity(plan.items.len());
    for (item, done) in plan.items.iter().zip(finished) {
        match done {
            Some(done) => {
                svd_flops += done.flops;
                written_modules.extend(done.module);
                rows.push(done.row);
            }
            None => rows.push(TensorReport::new(
                &item.name,
                item.action.outcome(),
                &item.shape,
            )),
        }
    }
    (rows, svd_flops, written_modules)
}

/// Norms are saved whole only if one changed; then every norm is written, so that PEFT's
/// suffix matching on modules_to_save finds a tensor for each module it wraps. Returns
/// modules_to_save.
fn save_norms(
    writer: &mut AdapterWriter,
    plan: &Plan,
    ft: &Checkpoint,
    rows: &mut [TensorReport],
) -> Result<Option<Vec<String>>> {
    let whole: Vec<(usize, &PlanItem)> = plan
        .items
        .iter()
        .enumerate()
        .filter(|(_, i)| i.action == Action::SaveWhole)
        .collect();
    let any_whole_changed = whole
        .iter()
        .any(|&(n, _)| rows[n].action == TensorAction::SaveWhole);
    if !any_whole_changed {
        for row in rows
            .iter_mut()
            .filter(|r| r.action == TensorAction::SaveWhole)
        {
            row.action = TensorAction::Unchanged;
        }
        return Ok(None);
    }
    for &(index, item) in &whole {
        let dtype = item.ft.float_dtype().expect("validated by the planner");
        writer.add(
            2 * index as u64,
            adapter::whole_key(&item.name),
            dtype.as_str(),
            item.shape.clone(),
            ft.bytes(&item.ft),
        )?;
    }
    for (row, item) in rows.iter_mut().zip(&plan.items) {
        if item.action == Action::SaveWhole && row.action == TensorAction::Unchanged {
            row.reason = Some(
                "unchanged, but written whole: PEFT wraps every norm named in modules_to_save"
                    .into(),
            );
        }
    }
    Ok(Some(adapter::modules_to_save(
        plan.norm_module_names().into_iter().collect(),
    )))
}

/// A lora_B.bias needs its layer's factors: a layer whose weight did not change (or got rank 0
/// under a budget) has none, so its bias is not carried after all.
fn drop_orphan_biases(
    writer: &mut AdapterWriter,
    plan: &Plan,
    rows: &mut [TensorReport],
    written_modules: &[String],
) {
    for (row, item) in rows.iter_mut().zip(&plan.items) {
        if row.action == TensorAction::LoraBias && !written_modules.contains(&item.module) {
            writer.remove(&adapter::lora_b_bias_key(&item.module));
            row.action = TensorAction::NotCarried;
            row.residual = None;
            row.reason = Some(
                "bias of a layer with no LoRA factors (its weight did not change, or got rank 0): lora_B.bias needs them"
                    .into(),
            );
        }
    }
}

/// Warnings for what the adapter leaves out: norms a non-PEFT target cannot save, tensors a
/// LoRA cannot carry, and LoRA targets a budget gave rank 0.
fn warn_left_out(s: &ExtractSettings, plan: &Plan, rows: &[TensorReport], summary: &Summary) {
    let dropped_norms: Vec<&TensorReport> = rows
        .iter()
        .zip(&plan.items)
        .filter(|(r, i)| {
            r.action == TensorAction::NotCarried && crate::names::is_norm_module(&i.module)
        })
        .map(|(r, _)| r)
        .collect();
    if s.target != Target::Peft && !dropped_norms.is_empty() {
        let share: f64 = dropped_norms.iter().map(|r| r.share).sum();
        tracing::warn!(
            "--target {} writes no modules_to_save (vLLM refuses them): {} changed norm(s) holding {:.3}% of ‖ΔW‖² are left out; small as that is, saving norms raised top-1 agreement from 0.887 to 0.946 on one measured fine-tune (FORMATS.md), so expect some quality loss",
            s.target.as_str(),
            dropped_norms.len(),
            100.0 * share
        );
    }
    // Not carried: what a LoRA cannot carry, and LoRA targets a budget gave rank 0.
    let (starved, starved_share) = rows
        .iter()
        .zip(&plan.items)
        .filter(|(r, i)| r.action == TensorAction::NotCarried && i.action.is_lora())
        .fold((0, 0.0), |(n, sh), (r, _)| (n + 1, sh + r.share));
    if summary.not_carried > starved {
        tracing::warn!(
            "{} changed tensor(s) a LoRA cannot carry hold {:.3}% of ‖ΔW‖² and are not in the adapter; see report.json",
            summary.not_carried - starved,
            100.0 * (summary.share_not_carried - starved_share).max(0.0)
        );
    }
    if starved > 0 {
        tracing::warn!(
            "{starved} changed LoRA target(s) got rank 0 under --budget and are not in the adapter; they hold {:.3}% of ‖ΔW‖² (see report.json)",
            100.0 * starved_share
        );
    }
}

/// The modules with factors, by how the config names them: target_modules, and the ones PEFT
/// must take as target_parameters.
struct Targets {
    modules: Vec<String>,
    /// MoE routers (`mlp.gate`): transformers v5 makes several of them router classes that
    /// target_modules cannot wrap. Their keys are the same.
    routers: Vec<String>,
    /// With --fuse-experts, the other MLP layers named like experts (a dense MLP, a shared
    /// expert), by path: PEFT's conversion to transformers v5 turns every
    /// `gate_proj`/`up_proj`/`down_proj` in target_modules into the fused experts'
    /// parameters, which would drop their LoRA (seen with DeepSeek-V3).
    mlp_params: Vec<String>,
}

impl Targets {
    fn split(s: &ExtractSettings, plan: &Plan, mut modules: Vec<String>) -> Targets {
        let routers: Vec<String> = if s.target == Target::Peft {
            modules
                .iter()
                .filter(|m| crate::plan::is_router(m, &plan.items))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        modules.retain(|m| !routers.contains(m));
        let mlp_params: Vec<String> = if s.plan.fuse_experts {
            modules
                .iter()
                .filter(|m| crate::names::fused_target(crate::names::last_segment(m)).is_some())
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        modules.retain(|m| !mlp_params.contains(m));
        Targets {
            modules,
            routers,
            mlp_params,
        }
    }

    /// target_parameters: routers by suffix (`gate.weight`: transformers v5 renames some MoE
    /// blocks in memory, Mixtral's block_sparse_moe becomes mlp, and a suffix matches either),
    /// the MLP layers by path, and the fused expert parameters.
    fn parameters(&self, fused: &[fused::FusedParam]) -> Option<Vec<String>> {
        let mut router_names: Vec<String> = self
            .routers
            .iter()
            .map(|m| format!("{}.weight", crate::names::last_segment(m)))
            .collect();
        router_names.sort();
        router_names.dedup();
        let params: Vec<String> = router_names
            .into_iter()
            .chain(self.mlp_params.iter().map(|m| format!("{m}.weight")))
            .chain(fused.iter().map(|p| p.param.clone()))
            .collect();
        (!params.is_empty()).then_some(params)
    }

    /// The key PEFT matches a module's rank_pattern entry against.
    fn pattern_key(&self, module: &str) -> String {
        if self.routers.iter().any(|m| m == module) {
            crate::plan::router_pattern(module)
        } else if self.mlp_params.iter().any(|m| m == module) {
            // A target parameter's pattern is matched against the parameter's path.
            regex::escape(&format!("{module}.weight"))
        } else {
            crate::names::expert_group(module).unwrap_or_else(|| regex::escape(module))
        }
    }
}

/// paths of `ft`'s modules whose last segment is `last`.
fn paths_named(ft: &Checkpoint, last: &str) -> Vec<String> {
    let mut paths: Vec<String> = ft
        .tensors()
        .iter()
        .map(|t| crate::names::module_of(&t.name))
        .filter(|m| crate::names::last_segment(m) == last)
        .map(str::to_string)
        .collect();
    paths.dedup();
    paths
}

/// Ranks per module: one uniform r, or the most common one with rank_pattern (and
/// alpha_pattern, so that every scaling is 1) for the others; or, portable, all padded to one
/// rank vLLM accepts.
struct Ranks {
    /// (module or fused parameter, rank).
    modules: Vec<(String, usize)>,
    /// Fused expert parameters: one rank per parameter (its largest expert's), ranked and
    /// patterned by their path like modules.
    fused: Vec<fused::FusedParam>,
    config_rank: usize,
    /// The rank every factor is padded to (a portable adapter).
    pad_to: Option<usize>,
}

impl Ranks {
    fn of(
        s: &ExtractSettings,
        plan: &Plan,
        rows: &[TensorReport],
        r_adapter: usize,
    ) -> Result<Ranks> {
        let module_ranks: Vec<(String, usize)> = rows
            .iter()
            .zip(&plan.items)
            .filter(|(r, i)| {
                matches!(r.action, TensorAction::Lora | TensorAction::LoraEmbedding)
                    && !matches!(i.form, Form::Expert(_))
            })
            .filter_map(|(r, item)| Some((item.module.clone(), r.rank?)))
            .collect();
        let fused = fused::fused_params(rows, plan, s.rank.uniform().then_some(r_adapter));
        fused::warn_unknown_order(&fused);
        // Per-expert MoE weights all take one rank, the largest expert's (smaller experts are
        // zero-padded at commit), and it is the adapter's r: PEFT converts a per-expert
        // adapter to transformers v5's fused experts at the config's r, without rank_pattern,
        // and vLLM needs one rank per module anyway.
        let experts_rank = module_ranks
            .iter()
            .filter(|(m, _)| crate::names::expert_group(m).is_some())
            .map(|(_, r)| *r)
            .max();
        let modules: Vec<(String, usize)> = module_ranks
            .into_iter()
            .map(|(m, r)| {
                let shared = crate::names::expert_group(&m).and(experts_rank);
                (m, shared.unwrap_or(r))
            })
            .chain(fused.iter().map(|p| (p.param.clone(), p.rank)))
            .collect();
        let (config_rank, pad_to) = adapter_ranks(
            &s.rank,
            r_adapter,
            &modules,
            experts_rank,
            s.target != Target::Peft,
        )?;
        Ok(Ranks {
            modules,
            fused,
            config_rank,
            pad_to,
        })
    }

    /// The rank each factor is written at, by tensor key; the fused parameters' staged keys
    /// renamed to PEFT's.
    fn written(&self, writer: &mut AdapterWriter) -> HashMap<String, usize> {
        let mut written_rank: HashMap<String, usize> = self
            .modules
            .iter()
            .flat_map(|(m, r)| {
                let r = self.pad_to.unwrap_or(*r);
                [
                    adapter::lora_a_key(m),
                    adapter::lora_b_key(m),
                    adapter::embedding_a_key(m),
                    adapter::embedding_b_key(m),
                ]
                .map(|k| (k, r))
            })
            .collect();
        for (p, keys) in self.fused.iter().zip(fused::peft_keys(&self.fused)) {
            for (staged, key) in p.staged_keys().iter().zip(keys) {
                writer.rename(staged, &key);
                written_rank.insert(key, self.pad_to.unwrap_or(p.rank));
            }
        }
        written_rank
    }

    /// rank_pattern and alpha_pattern for the modules off the config's rank. Under one rank
    /// every factor is padded to it, except a fused parameter whose experts stack parts
    /// (gate_up_proj from per-expert gate and up: twice the rank).
    fn patterns(&self, s: &ExtractSettings, targets: &Targets, config: &mut AdapterConfig) {
        if self.pad_to.is_some() {
            return;
        }
        let patterned = |m: &String| !s.rank.uniform() || self.fused.iter().any(|p| &p.param == m);
        for (module, r) in self
            .modules
            .iter()
            .filter(|(m, r)| *r != self.config_rank && patterned(m))
        {
            let key = targets.pattern_key(module);
            config.rank_pattern.insert(key.clone(), *r);
            config.alpha_pattern.insert(key, *r as f64);
        }
    }
}

/// Below these, an adapter keeps too little to be trusted: the LoRA targets' share of
/// ‖ΔW‖² kept (1 − residual²), and one module's.
const LOW_KEPT_TOTAL: f64 = 0.8;
const LOW_KEPT_MODULE: f64 = 0.5;

/// When the adapter keeps less than [`LOW_KEPT_TOTAL`] of its LoRA targets' ‖ΔW‖², or some
/// module less than [`LOW_KEPT_MODULE`] of its own: the worst modules (a target a budget gave
/// rank 0 keeps nothing). None when it keeps enough.
fn low_energy(rows: &[TensorReport], plan: &Plan) -> Option<LowEnergy> {
    let targets: Vec<(&TensorReport, f64)> = rows
        .iter()
        .zip(&plan.items)
        .filter(|(r, i)| {
            i.action.is_lora()
                && !i.is_tied_copy()
                && (r.residual.is_some() || r.action == TensorAction::NotCarried)
        })
        .map(|(r, _)| (r, r.residual.map_or(0.0, |e| (1.0 - e * e).max(0.0))))
        .collect();
    let total: f64 = targets.iter().map(|(r, _)| r.carried_sumsq()).sum();
    if total <= 0.0 {
        return None;
    }
    let kept = targets
        .iter()
        .map(|(r, k)| k * r.carried_sumsq())
        .sum::<f64>()
        / total;
    let mut worst: Vec<(String, f64)> = targets.iter().map(|(r, k)| (r.name.clone(), *k)).collect();
    worst.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let below = worst.iter().filter(|w| w.1 < LOW_KEPT_MODULE).count();
    if kept >= LOW_KEPT_TOTAL && below == 0 {
        return None;
    }
    worst.truncate(3);
    Some(LowEnergy {
        kept,
        modules_below_half: below,
        worst,
    })
}

/// The share of ‖ΔW‖² the removed logit shifts held, over the heads it was removed from.
fn logit_shift_removed(rows: &[TensorReport]) -> Option<(f64, usize)> {
    let heads: Vec<&TensorReport> = rows.iter().filter(|r| r.logit_shift.is_some()).collect();
    let all: f64 = heads.iter().map(|r| r.delta_norm * r.delta_norm).sum();
    let removed: f64 = heads
        .iter()
        .map(|r| r.delta_norm * r.delta_norm * r.logit_shift.unwrap_or(0.0))
        .sum();
    (all > 0.0).then(|| (removed / all, heads.len()))
}

/// Why an adapter would have no LoRA target (PEFT refuses one: NoMatchingPeftModuleError), for
/// the error that stops it.
fn no_lora_target(s: &ExtractSettings, plan: &Plan, rows: &[TensorReport]) -> Error {
    let starved = rows
        .iter()
        .zip(&plan.items)
        .any(|(r, i)| i.action.is_lora() && r.action == TensorAction::NotCarried);
    let why = match (&s.rank, starved) {
        _ if !plan.items.iter().any(|i| i.action.is_lora()) => {
            "the selected tensors hold no layer weight a LoRA can carry (only norms, biases, …): widen --include or --exclude".to_string()
        }
        (RankPolicy::Budget { params, .. }, true) => {
            format!("--budget {params} gave every LoRA target rank 0: raise it")
        }
        _ => "every selected layer weight is unchanged".into(),
    };
    Error::Settings(format!(
        "no tensor gets LoRA factors, and PEFT refuses an adapter without a LoRA target (NoMatchingPeftModuleError): {why}; no adapter is written"
    ))
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
    m.peak_rss_bytes = memory::peak_rss_bytes();
    m.svd_gflops = if stages.svd_randomized > 0.0 {
        flops / stages.svd_randomized / 1e9
    } else {
        0.0
    };
    m.stages = stages;
    m
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
