//! The scheduler: workers (one or more per device) take tensors from one queue, each holding
//! a reservation on its device's memory budget while it works, so tensors in flight never add
//! up to more than the budget; a writer thread appends finished factors to the adapter. While
//! a worker computes, the kernel reads the next tensor's pages ahead (MADV_WILLNEED), and on a
//! GPU a second worker's copies overlap the first one's SVD.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use super::fit::{after_out_of_memory, Fit, Placement, Retry};
use super::job::{other_item, Finished, JobError, LoraJob};
use super::journal::{FactorPlaces, Journal};
use super::settings::ExtractSettings;
use crate::adapter::AdapterWriter;
use crate::backend::{Backend, DeviceWorkers};
use crate::checkpoint::{Checkpoint, DType};
use crate::error::{Error, Result};
use crate::factor::Factoring;
use crate::linalg::rank::RankPolicy;
use crate::plan::{Action, Plan};
use crate::report::{StageSeconds, WorkerTime};

/// Bytes reserved on one device's budget.
pub(super) struct Ledger {
    /// None: no bound.
    capacity: Option<u64>,
    used: Mutex<u64>,
    freed: Condvar,
}

pub(super) struct Reservation<'a> {
    ledger: &'a Ledger,
    bytes: u64,
}

impl Ledger {
    pub fn new(capacity: Option<u64>) -> Ledger {
        Ledger {
            capacity,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Waits until `bytes` fit beside what others hold. A request above the capacity waits
    /// for the device to be free and then takes all of it (the fit check keeps requests
    /// within the budget; this only guards the arithmetic).
    pub fn reserve(&self, bytes: u64) -> Reservation<'_> {
        let Some(cap) = self.capacity else {
            return Reservation {
                ledger: self,
                bytes: 0,
            };
        };
        let bytes = bytes.min(cap);
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used + bytes > cap {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += bytes;
        Reservation {
            ledger: self,
            bytes,
        }
    }

    /// The whole budget: the holder runs alone on the device.
    pub fn reserve_all(&self) -> Reservation<'_> {
        self.reserve(self.capacity.unwrap_or(0))
    }

    #[cfg(test)]
    fn used(&self) -> u64 {
        *self.used.lock().unwrap()
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut used = self.ledger.used.lock().unwrap_or_else(|p| p.into_inner());
            *used -= self.bytes;
            self.ledger.freed.notify_all();
        }
    }
}

/// What every worker reads.
pub(super) struct Shared<'a> {
    pub s: &'a ExtractSettings,
    pub base: &'a Checkpoint,
    pub ft: &'a Checkpoint,
    pub plan: &'a Plan,
    /// placements[i] is for plan.items[i] (LoRA targets only matter).
    pub placements: &'a [Placement],
    pub r_adapter: usize,
    pub out_dtype: DType,
    pub bar: &'a indicatif::ProgressBar,
    /// The ranks this run decomposes at (a budget's second pass has them per tensor).
    pub policy: &'a RankPolicy,
    /// Only the spectra (a budget's first pass, analyze): no factors, no residual.
    pub spectrum_only: bool,
    /// skip[i]: plan item i is done already (resumed from the journal).
    pub skip: &'a [bool],
}

/// What the workers and the writer hand back.
pub(super) struct Outcome {
    /// None when the run had none (spectra only).
    pub writer: Option<AdapterWriter>,
    /// By plan index; None for tensors with nothing to do (unchanged, not selected).
    pub finished: Vec<Option<Finished>>,
    pub workers: Vec<WorkerTime>,
    /// Summed over workers, the writer's time in `write`.
    pub stages: StageSeconds,
}

/// The order tensors are taken in: the plan's (sequential reads) for one worker; largest first
/// for several, so that no worker is left with a big matrix at the end.
fn queue(sh: &Shared<'_>, workers: usize) -> Vec<usize> {
    let mut order: Vec<usize> = sh
        .plan
        .items
        .iter()
        .enumerate()
        // A tied lm_head comes with its embedding (the writer derives it).
        .filter(|(n, i)| i.action != Action::Unchanged && !i.is_tied_copy() && !sh.skip[*n])
        .map(|(n, _)| n)
        .collect();
    if workers > 1 {
        // Stable: equal sizes keep plan order.
        order.sort_by_key(|&n| std::cmp::Reverse(sh.plan.items[n].input_bytes()));
    }
    order
}

/// Runs every tensor of the plan on the workers; `budgets[d]` bounds device d.
pub(super) fn run_all<B: Factoring>(
    groups: &[DeviceWorkers<B>],
    budgets: &[Option<u64>],
    sh: &Shared<'_>,
    writer: Option<AdapterWriter>,
    journal: Option<&mut Journal>,
) -> Result<Outcome> {
    let total_workers: usize = groups.iter().map(|g| g.workers.len()).sum();
    let shared_queue = Queue {
        order: queue(sh, total_workers),
        next: AtomicUsize::new(0),
        cancel: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        workers: total_workers,
    };
    let queue = &shared_queue;
    let (order, cancel) = (&queue.order, &queue.cancel);
    let ledgers: Vec<Ledger> = budgets.iter().map(|&b| Ledger::new(b)).collect();
    let (tx, rx) = sync_channel::<Finished>(2 * total_workers);
    let started = Instant::now();

    // Every queued tensor and each tied lm_head derived from one reach the writer.
    let copies = sh.plan.tied_copies();
    let done_later = order.len() + copies.iter().filter(|(e, _)| !sh.skip[*e]).count();
    let (writer_result, times) = std::thread::scope(|scope| {
        let writer_thread = scope.spawn(|| write_all(writer, journal, rx, sh, done_later, cancel));
        let mut handles = Vec::new();
        for (d, group) in groups.iter().enumerate() {
            for (w, be) in group.workers.iter().enumerate() {
                let label = worker_label(be, w);
                let (tx, ledger) = (tx.clone(), &ledgers[d]);
                handles.push(scope.spawn(move || {
                    be.scope(|| WorkerLoop::new(be, sh, ledger, label).drain(queue, &tx))
                }));
            }
        }
        drop(tx);
        let times: Vec<std::thread::Result<(WorkerTime, StageSeconds)>> =
            handles.into_iter().map(|h| h.join()).collect();
        (writer_thread.join(), times)
    });

    let wall = started.elapsed().as_secs_f64();
    let mut stages = StageSeconds::default();
    let mut workers = Vec::new();
    for t in times {
        let (mut time, mut st) = t.map_err(|p| {
            Error::Internal(format!(
                "a worker thread panicked: {}",
                crate::error::panic_message(&*p)
            ))
        })?;
        // Whatever a worker did not spend on its tensors it spent waiting.
        st.idle = (wall - st.busy()).max(0.0);
        time.busy_seconds = st.busy();
        time.idle_seconds = st.idle;
        stages.add(&st);
        workers.push(time);
    }
    let written = writer_result.map_err(|p| {
        Error::Internal(format!(
            "the writer thread panicked: {}",
            crate::error::panic_message(&*p)
        ))
    })?;
    let mut errors = shared_queue
        .errors
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    // The first failure in plan order, whatever the timing.
    errors.sort_by_key(|e| e.0);
    if let Some((_, e)) = errors.into_iter().next() {
        return Err(e);
    }
    let (writer, finished, write_seconds) = written?;
    stages.write = write_seconds;
    Ok(Outcome {
        writer,
        finished,
        workers,
        stages,
    })
}

/// "cuda:1 #0", "cpu #1": the device's short name (the first word of the backend's name).
fn worker_label<B: Backend>(be: &B, worker: usize) -> String {
    let name = be.name();
    let device = name.split_whitespace().next().unwrap_or("device");
    format!("{} #{worker}", device.trim_end_matches(','))
}

/// The writer thread: journals each finished tensor, appends its factors to the adapter (in
/// any order; the file is ordered at commit) and keeps its result by its plan index.
fn write_all(
    mut writer: Option<AdapterWriter>,
    mut journal: Option<&mut Journal>,
    rx: Receiver<Finished>,
    sh: &Shared<'_>,
    queued: usize,
    cancel: &AtomicBool,
) -> Result<(Option<AdapterWriter>, Vec<Option<Finished>>, f64)> {
    let mut finished: Vec<Option<Finished>> = (0..sh.plan.items.len()).map(|_| None).collect();
    let mut seconds = 0.0;
    let total = sh.plan.items.len();
    // Unchanged and resumed tensors count as done from the start.
    let mut count = total - queued;
    let journal_data = journal.as_ref().map(|j| j.data_path());
    let copies: std::collections::HashMap<usize, usize> =
        sh.plan.tied_copies().into_iter().collect();
    // Each tensor a worker finished, then the tied lm_head derived from it, if any.
    let arrivals = rx.into_iter().flat_map(|done| {
        let copy = copies
            .get(&done.index)
            .map(|&c| super::job::tied_copy(&done, c, &sh.plan.items[c]));
        std::iter::once(done).chain(copy)
    });
    for mut done in arrivals {
        let clock = Instant::now();
        let item = &sh.plan.items[done.index];
        // The journal holds the factors' bytes: the adapter is written from there at commit,
        // not from a second copy.
        let kept = match (journal.as_mut(), &journal_data) {
            (Some(j), Some(data)) if !sh.spectrum_only => j
                .record(&done)
                .and_then(|at| stage_journaled(writer.as_mut(), &mut done, data, at)),
            (Some(j), _) => j
                .record(&done)
                .and_then(|_| stage(writer.as_mut(), &mut done, true)),
            (None, _) => stage(writer.as_mut(), &mut done, sh.spectrum_only),
        };
        if let Err(e) = kept {
            // Workers stop taking tensors; the channel closes as they finish.
            cancel.store(true, Ordering::Relaxed);
            return Err(e);
        }
        seconds += clock.elapsed().as_secs_f64();
        count += 1;
        if !item.is_tied_copy() {
            sh.bar.inc(item.input_bytes());
        }
        sh.bar.set_message(format!("{count}/{total} tensors"));
        let index = done.index;
        finished[index] = Some(done);
    }
    Ok((writer, finished, seconds))
}

/// [`stage`] for a tensor the journal holds: its factors are referenced where they lie in the
/// journal's data file (`at`), and only what else it writes is copied.
pub(super) fn stage_journaled(
    writer: Option<&mut AdapterWriter>,
    done: &mut Finished,
    data: &Path,
    at: Option<FactorPlaces>,
) -> Result<()> {
    let Some(writer) = writer else {
        return Ok(());
    };
    let order = 2 * done.index as u64;
    if let (Some(f), Some(at)) = (done.factors.as_ref(), at) {
        let a = (data, at.a.0, f.a_bytes.len());
        let b = (data, at.b.0, f.b_bytes.len());
        let (a_key, b_key) = (f.a_key.clone(), f.b_key.clone());
        writer.add_factor_in(order, a_key, f.dtype, f.a_shape.clone(), a, 0, f.expert);
        writer.add_factor_in(order + 1, b_key, f.dtype, f.b_shape.clone(), b, 1, f.expert);
        done.factors = None;
    }
    stage(Some(writer), done, false)
}

/// Hands a finished tensor's factors (A, then B, at its place in the plan) and any tensor it
/// writes as it is (a `lora_B.bias`) to the adapter writer. (A budget's first pass only
/// looks: what it would write, the second pass writes.)
pub(super) fn stage(
    writer: Option<&mut AdapterWriter>,
    done: &mut Finished,
    spectrum_only: bool,
) -> Result<()> {
    let Some(writer) = writer else {
        return Ok(());
    };
    let order = 2 * done.index as u64;
    if let Some(f) = done.factors.take() {
        writer.add_factor(order, f.a_key, f.dtype, f.a_shape, &f.a_bytes, 0, f.expert)?;
        writer.add_factor(
            order + 1,
            f.b_key,
            f.dtype,
            f.b_shape,
            &f.b_bytes,
            1,
            f.expert,
        )?;
    }
    if let Some(x) = done.extra.take().filter(|_| !spectrum_only) {
        writer.add(order, x.key, x.dtype, x.shape, &x.bytes)?;
    }
    Ok(())
}

/// The tensors in the order workers take them, shared by every worker.
struct Queue {
    order: Vec<usize>,
    /// The next position in `order` to take.
    next: AtomicUsize,
    /// Set by the first failure: the others take no new tensor.
    cancel: AtomicBool,
    /// (plan index, error) of each failure.
    errors: Mutex<Vec<(usize, Error)>>,
    workers: usize,
}

/// One worker's state.
struct WorkerLoop<'a, B: Factoring> {
    be: &'a B,
    sh: &'a Shared<'a>,
    ledger: &'a Ledger,
    label: String,
    time: WorkerTime,
    stages: StageSeconds,
}

impl<B: Factoring> WorkerLoop<'_, B> {
    fn new<'a>(
        be: &'a B,
        sh: &'a Shared<'a>,
        ledger: &'a Ledger,
        label: String,
    ) -> WorkerLoop<'a, B> {
        WorkerLoop {
            be,
            sh,
            ledger,
            time: WorkerTime {
                worker: label.clone(),
                tensors: 0,
                busy_seconds: 0.0,
                idle_seconds: 0.0,
            },
            label,
            stages: StageSeconds::default(),
        }
    }

    /// Takes tensors from the queue until it is empty, a worker failed, the writer went away
    /// or an interrupt came; each result goes to the writer.
    fn drain(mut self, queue: &Queue, tx: &SyncSender<Finished>) -> (WorkerTime, StageSeconds) {
        let sh = self.sh;
        while !queue.cancel.load(Ordering::Relaxed) && !crate::interrupt::requested() {
            let at = queue.next.fetch_add(1, Ordering::Relaxed);
            let Some(&index) = queue.order.get(at) else {
                break;
            };
            // The disk reads ahead what some worker takes next.
            if let Some(&ahead) = queue.order.get(at + queue.workers) {
                let item = &sh.plan.items[ahead];
                sh.base.prefetch(&item.base);
                sh.ft.prefetch(&item.ft);
            }
            match self.one(index) {
                Ok(done) => {
                    let clock = Instant::now();
                    let sent = tx.send(done);
                    self.stages.idle += clock.elapsed().as_secs_f64();
                    if sent.is_err() {
                        break; // the writer failed; its error is reported
                    }
                }
                Err(e) => {
                    queue.cancel.store(true, Ordering::Relaxed);
                    queue
                        .errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((index, e));
                    break;
                }
            }
        }
        (self.time, self.stages)
    }

    /// The fit to retry a tensor in after the device ran out of memory on it, or the error
    /// that says why there is none.
    fn after_out_of_memory(
        &self,
        item: &crate::plan::PlanItem,
        fit: Fit,
        placement: &Placement,
        why: &str,
        first: bool,
    ) -> Result<Fit> {
        let sh = self.sh;
        let (rows, cols) = item.matrix();
        let exact =
            sh.s.svd
                .runs_exact(sh.policy.rank_for(&item.name, rows, cols), rows, cols);
        let held = |f: Fit| match f {
            Fit::Blocked(r) if r < rows => format!("in blocks of {r} rows"),
            _ => "whole".to_string(),
        };
        let because = match after_out_of_memory(fit, rows, &placement.need, first, exact) {
            Retry::Again(next) => {
                tracing::warn!(
                    "{}: out of memory on {} ({why}); retrying it alone on the device, {}",
                    self.label,
                    item.name,
                    held(next)
                );
                return Ok(next);
            }
            Retry::ExactNeedsWhole => {
                " even alone on the device, and the exact SVD cannot run in row blocks;".to_string()
            }
            Retry::BlockNotDominant { block, sketches } => format!(
                " alone on the device {}, where ΔW's block ({}) no longer holds most of the memory (the sketches and factors hold {}): smaller blocks would not help; lower the rank or --oversample,",
                held(fit),
                crate::size::format_size(block),
                crate::size::format_size(sketches)
            ),
            Retry::AtOneRow => " even alone on the device in blocks of one row;".to_string(),
        };
        Err(Error::tensor(
            sh.ft.path_of(&item.ft),
            &item.name,
            format!(
                "{} ran out of memory ({why}){because} free memory on the device or lower --max-vram",
                self.label
            ),
        ))
    }

    /// One tensor, start to finish, under a reservation on the device's budget. After an
    /// out-of-memory from the device it waits to be alone on the device and retries in
    /// blocks of half as many rows, down to one row per block.
    fn one(&mut self, index: usize) -> Result<Finished> {
        let sh = self.sh;
        let item = &sh.plan.items[index];
        let clock = Instant::now();
        let mut done = match item.action {
            Action::LoraLinear | Action::LoraEmbedding => {
                let placement = sh.placements[index];
                let mut fit = placement.fit;
                let mut held = self.ledger.reserve(placement.bytes);
                let mut retries = 0;
                loop {
                    let job = LoraJob {
                        be: self.be,
                        s: sh.s,
                        base: sh.base,
                        ft: sh.ft,
                        index,
                        item,
                        fit,
                        r_adapter: sh.r_adapter,
                        out_dtype: sh.out_dtype,
                        policy: sh.policy,
                        spectrum_only: sh.spectrum_only,
                    };
                    match job.run() {
                        Ok(done) => break done,
                        Err(JobError::Failed(e)) => return Err(e),
                        Err(JobError::OutOfMemory(why)) => {
                            let next = self.after_out_of_memory(
                                item,
                                fit,
                                &placement,
                                &why,
                                retries == 0,
                            )?;
                            retries += 1;
                            drop(held);
                            held = self.ledger.reserve_all();
                            // Alone on the device now: what the allocator keeps cached is free
                            // for the retry.
                            if let Err(e) = self.be.return_cached_memory() {
                                tracing::warn!(
                                    "{}: cannot trim the device's memory pool: {e}",
                                    self.label
                                );
                            }
                            fit = next;
                        }
                    }
                }
            }
            _ => other_item(sh.base, sh.ft, index, item, sh.out_dtype)?,
        };
        sh.base.release(&item.base);
        sh.ft.release(&item.ft);
        super::memory::release_free_heap();
        done.row.seconds = clock.elapsed().as_secs_f64();
        done.row.worker = Some(self.label.clone());
        done.row.stages = done.stages;
        self.stages.add(&done.stages);
        self.time.tensors += 1;
        tracing::debug!(tensor = %item.name, action = %done.row.action, seconds = done.row.seconds, worker = %self.label, "done");
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reservations_never_exceed_the_capacity() {
        let ledger = Arc::new(Ledger::new(Some(100)));
        let peak = Arc::new(Mutex::new(0u64));
        std::thread::scope(|s| {
            for i in 0..8u64 {
                let (ledger, peak) = (&ledger, &peak);
                s.spawn(move || {
                    for _ in 0..50 {
                        let _r = ledger.reserve(30 + i * 5);
                        let used = ledger.used();
                        let mut p = peak.lock().unwrap();
                        *p = (*p).max(used);
                        assert!(used <= 100, "{used}");
                    }
                });
            }
        });
        assert!(*peak.lock().unwrap() <= 100);
        assert_eq!(ledger.used(), 0, "every reservation is returned");
    }

    #[test]
    fn an_exclusive_reservation_waits_for_the_others() {
        let ledger = Ledger::new(Some(100));
        let first = ledger.reserve(40);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let _all = ledger.reserve_all();
                ledger.used()
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(
                ledger.used(),
                40,
                "the exclusive request has not been granted yet"
            );
            drop(first);
            assert_eq!(waiter.join().unwrap(), 100);
        });
        let unbounded = Ledger::new(None);
        let _a = unbounded.reserve(u64::MAX);
        let _b = unbounded.reserve(u64::MAX);
    }
}
