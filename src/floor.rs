//! The input floor: the time to read both checkpoints once into device memory, with the
//! loader extract uses (memory maps → pinned buffers → host-to-device copies on each
//! worker's stream; on the CPU, page faults), on the same workers. An extraction cannot beat
//! it; `scripts/gpu-check.sh` (stage 70b) reports extract's time over it, measured in the same run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::backend::{self, Backend, DeltaInput, DeviceWorkers, WorkerRequest, Workers};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::plan::{Plan, PlanOptions};

#[derive(Clone, Debug, serde::Serialize)]
pub struct FloorReport {
    pub device: String,
    pub workers: usize,
    pub tensors: usize,
    /// Both checkpoints.
    pub bytes: u64,
    pub seconds: f64,
    pub bytes_per_s: f64,
    /// Summed over workers: copying out of the maps (page faults included) and waiting for
    /// host-to-device copies.
    pub read_seconds: f64,
    pub h2d_seconds: f64,
}

/// Reads every tensor of the pair once (both checkpoints; what extract reads at least).
pub fn measure(
    base_path: &std::path::Path,
    ft_path: &std::path::Path,
    req: &WorkerRequest,
) -> Result<FloorReport> {
    let base = Checkpoint::open(base_path)?;
    let ft = Checkpoint::open(ft_path)?;
    let plan = Plan::build(&base, &ft, &PlanOptions::all())?;
    match backend::resolve_workers(req)? {
        Workers::Cpu(g) => run(&g, &base, &ft, &plan),
        Workers::Cuda(g) => run(&g, &base, &ft, &plan),
    }
}

fn run<B: Backend>(
    groups: &[DeviceWorkers<B>],
    base: &Checkpoint,
    ft: &Checkpoint,
    plan: &Plan,
) -> Result<FloorReport> {
    // Largest first, as extract schedules several workers.
    // Tensors in a dtype phlora does not read are equal in both (the planner checked) and
    // extract skips them too, as it does a tied lm_head (the embedding, read once).
    let readable = |n: &usize| {
        let i = &plan.items[*n];
        i.action != crate::plan::Action::Unchanged && !i.is_tied_copy()
    };
    let mut order: Vec<usize> = (0..plan.items.len()).filter(readable).collect();
    order.sort_by_key(|&n| std::cmp::Reverse(plan.items[n].input_bytes()));
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<Result<(f64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = groups
            .iter()
            .flat_map(|g| g.workers.iter())
            .map(|be| {
                let (order, next) = (&order, &next);
                scope.spawn(move || {
                    be.scope(|| {
                        let (mut read, mut h2d) = (0.0, 0.0);
                        while let Some(&n) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                            let item = &plan.items[n];
                            let (rows, cols) = item.matrix();
                            let (base_rows, ft_rows) = (
                                item.side_rows(base, false, 0, rows),
                                item.side_rows(ft, true, 0, rows),
                            );
                            let input = DeltaInput {
                                base: &base_rows,
                                base_dtype: item.base_dtype(),
                                ft: &ft_rows,
                                ft_dtype: item.ft_dtype(),
                                rows,
                                cols,
                                rows_read: None,
                            };
                            let stats = be.load(&input).map_err(|e| {
                                Error::tensor(ft.path_of(&item.ft), &item.name, e.message)
                            })?;
                            base.release(&item.base);
                            ft.release(&item.ft);
                            read += stats.read_seconds;
                            h2d += stats.h2d_seconds;
                        }
                        Ok((read, h2d))
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Device("a worker panicked".into())))
            })
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let (mut read_seconds, mut h2d_seconds) = (0.0, 0.0);
    for r in results {
        let (r, h) = r?;
        read_seconds += r;
        h2d_seconds += h;
    }
    let bytes: u64 = order.iter().map(|&n| plan.items[n].input_bytes()).sum();
    let first = groups.first().and_then(|g| g.workers.first());
    Ok(FloorReport {
        device: first.map_or_else(String::new, |w| w.name()),
        workers: groups.iter().map(|g| g.workers.len()).sum(),
        tensors: order.len(),
        bytes,
        seconds,
        bytes_per_s: bytes as f64 / seconds.max(1e-12),
        read_seconds,
        h2d_seconds,
    })
}
