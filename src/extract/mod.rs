//! The extract pipeline: plan → schedule → load → delta → decompose → rank → factor → sink.
//! Data flows one way: this file plans and assembles the adapter, `fit` sizes each tensor's
//! memory, `engine` schedules tensors onto workers and the writer, `job` does one tensor.

use std::time::Instant;

mod added;
mod assemble;
pub mod budget;
mod engine;
mod fit;
mod fused;
mod job;
mod journal;
mod memory;
mod pair;
mod place;
mod schedule;
mod settings;
pub mod shard;
mod sink_bench;
mod spectra;

pub use settings::{ExtractSettings, Shard, Target};

use pair::{dominant_lora_dtype, open_pair};
use schedule::{budgets, device_names, first_worker, placements, progress_bar, warn_unused_bounds};
use settings::side_files;
pub use sink_bench::{bench_sink, SinkBench};
pub use spectra::{spectra, SpectraSettings, TensorSpectrum};

pub use fit::BASELINE_RAM;

use crate::adapter::AdapterWriter;
use crate::backend::{self, DeviceWorkers, Workers};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::factor::Factoring;
use crate::linalg::rank::RankPolicy;
use crate::plan::Plan;
use crate::report::RunReport;

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
    let result = match result {
        Ok(Ran::Adapter(report)) => with_gguf(s, *report).map(|r| Ran::Adapter(Box::new(r))),
        other => other,
    };
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

/// `--target llama.cpp`: adapter.gguf from the adapter just committed (still under the lock),
/// and report.json again with what it carries and leaves out.
fn with_gguf(s: &ExtractSettings, mut report: RunReport) -> Result<RunReport> {
    use crate::adapter::gguf::{convert, GGUF_FILE};
    let Some(g) = s.gguf else {
        return Ok(report);
    };
    let path = s.out.join(GGUF_FILE);
    let export = convert(&s.out, &s.base, &path, g.tensor_type).map_err(|e| match e {
        Error::Interrupted(what) => Error::Interrupted(format!(
            "{what}; the PEFT adapter in {} is complete: `phlora convert {} --to gguf --base BASE` writes it",
            s.out.display(),
            s.out.display()
        )),
        e => Error::checkpoint(
            &path,
            format!(
                "not written: {e}. The PEFT adapter in {} is complete; `phlora convert {} --to gguf --base BASE` converts it once the cause is fixed",
                s.out.display(),
                s.out.display()
            ),
        )
    })?;
    if let Some(w) = export.warning() {
        tracing::warn!("{w}");
    }
    report.gguf = Some(export);
    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    let report_path = s.out.join(crate::adapter::REPORT_FILE);
    // (Not an Io error: that would say to --resume, and the journal went at the commit.)
    crate::staging::write_atomically(&report_path, json.as_bytes()).map_err(|e| {
        Error::checkpoint(
            &report_path,
            format!("adapter.gguf is written, report.json not updated with it: {e}"),
        )
    })?;
    Ok(report)
}

/// One extraction on these workers, from checks to the adapter (or a shard's part). Longer
/// than a screen, and on purpose: each step is a call, and the budget's first pass and the
/// extraction share the closures over the run's state (placements, progress, the writer).
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
    check_rank(s, plan, r_adapter)?;
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
    let fingerprint = journal::Fingerprint::of(s, base, ft)?;
    let (mut journal, resumed) =
        open_journal(s, plan, &fingerprint, writer.as_mut(), journal_held)?;
    let skip = skipped(s, plan, &resumed);
    let no_skip = vec![false; plan.items.len()];
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
        RankPolicy::Budget { .. } => {
            // Spectra first (no factors), then the ranks, then the extraction at those ranks.
            let pass = engine::run_all(
                groups,
                &budgets.per_device,
                &shared(&placements, &s.rank, true, &no_skip),
                writer,
                None,
            )?;
            writer = pass.writer;
            let (ranks, chosen) = budget::ranks_from_spectra(&s.rank, plan, &pass.finished)?;
            allocated = ranks;
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
        return Err(interrupted(s, plan, &outcome, &skip));
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
    let report = write_adapter(s, (base, ft, plan), outcome, &context)?;
    journal.remove();
    Ok(Ran::Adapter(Box::new(report)))
}

/// The adapter assembled and committed; an interrupt while it is written says how to resume
/// (every tensor is journaled by then).
fn write_adapter(
    s: &ExtractSettings,
    (base, ft, plan): (&Checkpoint, &Checkpoint, &Plan),
    outcome: engine::Outcome,
    context: &assemble::Context,
) -> Result<RunReport> {
    assemble::assemble(s, base, ft, plan, outcome, context).map_err(|e| match e {
        Error::Interrupted(what) => Error::Interrupted(format!(
            "{what}; all {} tensors are finished and kept in {}: run the same command with --resume to write it",
            plan.items.len(),
            journal::Journal::dir(&s.out).display()
        )),
        e => e,
    })
}

/// A run stopped by an interrupt: how much is finished, and how to go on.
fn interrupted(
    s: &ExtractSettings,
    plan: &Plan,
    outcome: &engine::Outcome,
    skip: &[bool],
) -> Error {
    let done = outcome.finished.iter().flatten().count() + skip.iter().filter(|&&d| d).count();
    Error::Interrupted(format!(
        "{done} of {} tensors are finished and kept in {}; run the same command with --resume to continue",
        plan.items.len(),
        journal::Journal::dir(&s.out).display()
    ))
}

/// A fixed rank beyond every target matrix's size, or a budget below any rank 1: refused.
fn check_rank(s: &ExtractSettings, plan: &Plan, r_adapter: usize) -> Result<()> {
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
    Ok(())
}

/// The journal: a fresh one, or the interrupted run's, with what it finished (staged into
/// the writer as it is read) by plan index. `held` is set as soon as this run holds one, so
/// that a failure while the resumed records are finished is resumable too.
fn open_journal(
    s: &ExtractSettings,
    plan: &Plan,
    fingerprint: &journal::Fingerprint,
    mut writer: Option<&mut AdapterWriter>,
    held: &mut bool,
) -> Result<(journal::Journal, Vec<Option<job::Finished>>)> {
    let mut resumed = Resumed::new(plan, &s.out);
    let mut journal = if s.resume {
        journal::Journal::resume(&s.out, fingerprint, |j| {
            resumed.take(plan, j, writer.as_deref_mut())
        })?
    } else {
        let old = journal::Journal::dir(&s.out);
        if old.exists() && !s.overwrite {
            return Err(Error::checkpoint(
                &old,
                "holds the journal of an interrupted run: pass --resume to continue it, or --force to start over",
            ));
        }
        journal::Journal::start(&s.out, fingerprint)?
    };
    *held = true;
    let resumed = resumed.finish(&mut journal, writer)?;
    Ok((journal, resumed))
}

/// The tensors this run does not compute: done already (resumed), or another shard's.
fn skipped(s: &ExtractSettings, plan: &Plan, resumed: &[Option<job::Finished>]) -> Vec<bool> {
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
    if s.resume {
        tracing::info!(
            "resuming: {} of {} tensors were finished by the interrupted run",
            skip.iter().filter(|&&d| d).count(),
            plan.items.len()
        );
    }
    skip
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

#[cfg(test)]
mod oom_tests;
