//! Scheduling: the memory each device's tensors may share, where each tensor runs (whole or in
//! row blocks), and the progress bar over the bytes read.

use super::fit;
use super::settings::ExtractSettings;
use crate::backend::{Backend, DeviceWorkers};
use crate::error::{Error, Result};
use crate::linalg::rank::RankPolicy;
use crate::plan::{Action, Plan};

/// The first worker of the first device: it answers for all about memory and names.
pub(super) fn first_worker<B: Backend>(groups: &[DeviceWorkers<B>]) -> Result<&B> {
    groups
        .first()
        .and_then(|g| g.workers.first())
        .ok_or_else(|| Error::Device("no worker to run on".into()))
}

/// What each device's tensors in flight may share, the smallest of those (fits are decided for
/// it, so that any device can take any tensor and the output does not depend on which one did),
/// and what the process takes on a device besides them (the same on every device). `budgets`
/// also lets each device's allocator keep that share of freed memory for reuse.
pub(super) struct Budgets {
    pub per_device: Vec<Option<u64>>,
    pub smallest: Option<u64>,
    pub overhead: u64,
}

pub(super) fn budgets<B: Backend>(
    groups: &[DeviceWorkers<B>],
    s: &ExtractSettings,
) -> Result<Budgets> {
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
pub(super) fn placements<B: Backend>(
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

/// The memory a device's tensors in flight share: `--max-ram` for ΔW in host memory,
/// `--max-vram` (else most of the free memory) on a GPU.
pub(super) fn budget_of<B: Backend>(be: &B, s: &ExtractSettings) -> Option<u64> {
    if be.delta_in_host_memory() {
        s.max_ram
    } else {
        s.max_vram.or_else(|| be.memory_budget())
    }
}

/// "cpu (1 thread) × 2 workers", "cuda:0 (…) + cuda:1 (…), 2 workers each".
pub(super) fn device_names<B: Backend>(groups: &[DeviceWorkers<B>]) -> String {
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
pub(super) fn warn_unused_bounds<B: Backend>(be: &B, s: &ExtractSettings) {
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

pub(super) fn progress_bar(
    enabled: bool,
    total_bytes: u64,
    tensors: usize,
) -> indicatif::ProgressBar {
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
