//! One tensor's work: ΔW from the two checkpoints (whole, or in row blocks re-formed on every
//! pass), its decomposition, factors and residual certificate.

use std::time::Instant;

use rayon::prelude::*;

use super::fit::Fit;
use super::place::{self, FactorTensors};
use super::settings::ExtractSettings;
use crate::adapter;
use crate::backend::{self, Backend, DeltaInput, DeltaStats};
use crate::checkpoint::dtype::decode_into;
use crate::checkpoint::{Checkpoint, DType, TensorEntry};
use crate::error::{Error, Result};
use crate::factor::Factoring;
use crate::linalg::center::{self, RowCentering};
use crate::linalg::rank::RankPolicy;
use crate::linalg::{self, blocked, rsvd, Method, SvdSettings};
use crate::plan::{Action, Form, PlanItem};
use crate::report::TensorAction;
use crate::report::{StageSeconds, TensorReport};

/// Where a tensor's ΔW comes from during the SVD and the residual. Blocked ΔW carries its
/// column sums from the first pass when its logit shift is removed.
enum Source<'a, B: Backend> {
    Whole(B::Mat),
    Blocked(CheckpointBlocks<'a, B>, Option<Vec<f64>>),
}

impl<B: Backend> Source<'_, B> {
    /// The top-`rank` SVD of ΔW, or of P·ΔW when `p` removes the logit shift.
    fn decompose(
        &self,
        be: &B,
        p: Option<&RowCentering<B::Mat>>,
        rank: usize,
        svd: &SvdSettings,
        seed: u64,
    ) -> backend::BackendResult<linalg::OnDevice<B::Mat>> {
        match (self, p) {
            (Source::Whole(delta), p) => {
                linalg::decompose_whole_on_device(be, delta, p, rank, svd, seed)
            }
            (Source::Blocked(src, _), p) => {
                let (rows, cols) = src.item.matrix();
                let k = svd.sketch_width(rank, rows, cols);
                match p {
                    None => {
                        blocked::blocked_randomized_svd(be, src, rank, k, svd.power_iters, seed)
                    }
                    Some(p) => {
                        center::decompose_blocked(be, src, p, rank, k, svd.power_iters, seed)
                    }
                }
            }
        }
    }

    /// P for removing the logit shift, from ΔW's column sums (a GEMM on ΔW held whole, of
    /// ‖ΔW‖² `sumsq`; the first pass's sums for row blocks, which carry them only when asked).
    fn centering(
        &self,
        be: &B,
        sumsq: f64,
    ) -> backend::BackendResult<Option<RowCentering<B::Mat>>> {
        match self {
            Source::Whole(delta) => RowCentering::of_whole(be, delta, sumsq).map(Some),
            Source::Blocked(src, Some(sums)) => {
                RowCentering::of_column_sums(be, src.item.matrix().0, sums).map(Some)
            }
            Source::Blocked(_, None) => Ok(None),
        }
    }

    /// ‖ΔW − B·A‖² (or ‖P·ΔW − B·A‖²).
    fn residual_sumsq(
        &self,
        be: &B,
        p: Option<&RowCentering<B::Mat>>,
        left: &B::Mat,
        right: &B::Mat,
    ) -> backend::BackendResult<f64> {
        let raw = match self {
            Source::Whole(delta) => be.residual_sumsq(delta, left, right)?,
            Source::Blocked(src, _) => blocked::blocked_residual_sumsq(be, src, left, right)?,
        };
        match p {
            None => Ok(raw),
            Some(p) => p.residual_sumsq(be, raw, left, right),
        }
    }
}

/// A tensor's ΔW in row blocks, each formed from the two checkpoints when asked for (its input
/// pages released as soon as they are read).
pub(super) struct CheckpointBlocks<'a, B: Backend> {
    be: &'a B,
    base: &'a Checkpoint,
    ft: &'a Checkpoint,
    item: &'a PlanItem,
    step: usize,
}

impl<B: Backend> blocked::RowBlocks<B> for CheckpointBlocks<'_, B> {
    fn shape(&self) -> (usize, usize) {
        self.item.matrix()
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
        self.form_measured(r0, r1, false).map(|(d, s, _)| (d, s))
    }

    /// [`form`](Self::form), with ‖W_base‖² of those rows when `base_norm` (read from the
    /// maps before the backend releases them: no second read from disk).
    fn form_measured(
        &self,
        r0: usize,
        r1: usize,
        base_norm: bool,
    ) -> backend::BackendResult<(B::Mat, DeltaStats, Option<f64>)> {
        let item = self.item;
        let cols = item.matrix().1;
        let (bs, fs) = (item.stored_size(false), item.stored_size(true));
        let rows_read = |a: usize, b: usize| {
            let (a, b) = (r0 + a, r0 + b);
            self.base
                .release_range(&item.base, a * cols * bs, b * cols * bs);
            self.ft
                .release_range(&item.ft, a * cols * fs, b * cols * fs);
        };
        // Views into the maps (FP8: dequantised here, on the host).
        let (base_rows, ft_rows) = (
            item.side_rows(self.base, false, r0, r1),
            item.side_rows(self.ft, true, r0, r1),
        );
        let input = DeltaInput {
            base: &base_rows,
            base_dtype: item.base_dtype(),
            ft: &ft_rows,
            ft_dtype: item.ft_dtype(),
            rows: r1 - r0,
            cols,
            rows_read: Some(&rows_read),
        };
        let base_sumsq = base_norm.then(|| sumsq_of(item.base_dtype(), &base_rows));
        let (delta, stats) = self.be.delta(&input)?;
        Ok((delta, stats, base_sumsq))
    }
}

/// A tensor's result, handed to the writer thread.
pub(super) struct Finished {
    /// Its index in the plan (and so its place in the report and the adapter file).
    pub index: usize,
    pub row: TensorReport,
    /// The LoRA factors, when there are any (None: unchanged, or not a LoRA target).
    pub factors: Option<FactorTensors>,
    /// The module path, for target_modules.
    pub module: Option<String>,
    /// The leading singular values (spectrum-only runs).
    pub spectrum: Option<Vec<f32>>,
    /// ‖W_base‖² (spectrum-only runs).
    pub base_sumsq: Option<f64>,
    /// A tensor written as it is: a `lora_B.bias`.
    pub extra: Option<ExtraTensor>,
    pub stages: StageSeconds,
    pub flops: f64,
}

impl Finished {
    /// Nothing done yet: the plan's action, and its note as the reason.
    pub fn new(index: usize, item: &PlanItem) -> Finished {
        let mut row = TensorReport::new(&item.name, item.action.outcome(), &item.shape);
        row.reason = item.note.clone();
        Finished::of_row(index, row)
    }

    /// Only a report row so far.
    pub fn of_row(index: usize, row: TensorReport) -> Finished {
        Finished {
            index,
            row,
            factors: None,
            module: None,
            spectrum: None,
            base_sumsq: None,
            extra: None,
            stages: StageSeconds::default(),
            flops: 0.0,
        }
    }
}

/// What a tensor that needs no decomposition comes to (and why, when the report says so):
/// unchanged, only a logit shift, or rank 0 under a budget.
fn nothing_to_decompose(
    sumsq: f64,
    without_shift: f64,
    cap: usize,
) -> Option<(TensorAction, Option<&'static str>)> {
    if sumsq == 0.0 {
        Some((TensorAction::Unchanged, None))
    } else if without_shift <= 1e-6 * sumsq {
        // What is left of a pure shift is rounding: ~1e-12 of ‖ΔW‖² (whole), ~1e-14 (blocks).
        Some((
            TensorAction::Unchanged,
            Some("only a logit shift, which changes no probability"),
        ))
    } else if cap == 0 {
        Some((TensorAction::NotCarried, Some("rank 0 under --budget")))
    } else {
        None
    }
}

/// A tensor written as it is (a `lora_B.bias`), under its adapter key.
pub(super) struct ExtraTensor {
    pub key: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Why a tensor failed: out of device memory (the scheduler may retry smaller) or for good.
pub(super) enum JobError {
    OutOfMemory(String),
    Failed(Error),
}

impl From<Error> for JobError {
    fn from(e: Error) -> Self {
        JobError::Failed(e)
    }
}

/// One LoRA target through delta → decompose → factor → residual.
pub(super) struct LoraJob<'a, B: Factoring> {
    pub be: &'a B,
    pub s: &'a ExtractSettings,
    pub base: &'a Checkpoint,
    pub ft: &'a Checkpoint,
    pub index: usize,
    pub item: &'a PlanItem,
    pub fit: Fit,
    pub r_adapter: usize,
    pub out_dtype: DType,
    pub policy: &'a RankPolicy,
    pub spectrum_only: bool,
}

/// The energy policy's first sketch is for this rank (or the cap, if lower); it doubles until
/// the target is reached or the cap is.
const ENERGY_FIRST_RANK: usize = 32;

impl<B: Factoring> LoraJob<'_, B> {
    pub fn run(&self) -> std::result::Result<Finished, JobError> {
        let (be, item) = (self.be, self.item);
        let mut done = Finished::new(self.index, item);
        let (rows, cols) = item.matrix();
        let cap = self.policy.rank_for(&item.name, rows, cols);
        let clock = Instant::now();
        let (source, stats) = self.form_delta(&mut done)?;
        // The decomposition holds all that is needed now: drop what is left of the pages.
        self.base.release(&item.base);
        self.ft.release(&item.ft);
        done.row.delta_norm = stats.sumsq.sqrt();
        // An output head decomposed without its logit shift: P·ΔW is what the adapter
        // carries, and what its energy and residual are measured against.
        let centering = match item.remove_logit_shift && stats.sumsq > 0.0 {
            true => source
                .centering(be, stats.sumsq)
                .map_err(|e| self.backend_err(e))?,
            false => None,
        };
        let removed = centering
            .as_ref()
            .map_or(0.0, |p| p.removed_sumsq.min(stats.sumsq));
        let sumsq = stats.sumsq - removed;
        if centering.is_some() {
            done.row.logit_shift = Some(removed / stats.sumsq);
        }
        done.stages.read += stats.read_seconds;
        done.stages.h2d += stats.h2d_seconds;
        done.stages.delta += (lap(clock) - stats.read_seconds - stats.h2d_seconds).max(0.0);
        if let Some((action, reason)) = nothing_to_decompose(stats.sumsq, sumsq, cap) {
            done.row.action = action;
            if reason.is_some() {
                done.row.reason = reason.map(str::to_string);
            }
            return Ok(done);
        }
        let p = centering.as_ref();
        let (t, r) = self.decompose(&source, p, sumsq, cap, &mut done)?;
        if self.spectrum_only {
            done.row.rank = Some(r);
            done.spectrum = Some(t.s.clone());
            return Ok(done);
        }
        let clock = Instant::now();
        let layout = place::layout_of(item);
        // A uniform policy pads every tensor to the adapter's rank; others keep their own
        // (rank_pattern; a portable adapter is padded when it is committed).
        let r_out = if self.policy.uniform() {
            self.r_adapter
        } else {
            r
        };
        let f = be
            .factor(&t, layout, r_out, self.out_dtype)
            .map_err(|e| self.backend_err(e))?;
        done.stages.d2h += f.d2h_seconds;
        done.stages.factor += (lap(clock) - f.d2h_seconds).max(0.0);
        let clock = Instant::now();
        let res = source
            .residual_sumsq(be, p, &f.left, &f.right)
            .map_err(|e| self.backend_err(e))?;
        done.stages.residual += lap(clock);
        let kept: f64 = t.s.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let row = &mut done.row;
        row.rank = Some(r);
        row.energy = Some((kept / sumsq).min(1.0));
        row.residual = Some((res / sumsq).sqrt());
        row.method = Some(t.method);
        row.sketch = (t.method == Method::Randomized).then_some(t.sketch);
        // A fused parameter's experts are target_parameters, not target_modules.
        done.module = (!matches!(item.form, Form::Expert(_))).then(|| item.module.clone());
        done.factors = Some(place::factor_tensors(item, layout, f, self.out_dtype));
        Ok(done)
    }

    /// ΔW, whole or (too large for its share of memory) as row blocks re-formed on every pass,
    /// with its statistics; ‖W_base‖² too for a budget's rules, measured in its first pass.
    fn form_delta(
        &self,
        done: &mut Finished,
    ) -> std::result::Result<(Source<'_, B>, DeltaStats), JobError> {
        let (item, ft) = (self.item, self.ft);
        let rows = item.matrix().0;
        match self.fit {
            Fit::Whole => {
                let (delta, stats, base_sumsq) = self
                    .blocks(rows)
                    .form_measured(0, rows, self.spectrum_only)
                    .map_err(|e| self.backend_err(e))?;
                check_finite(self.base, ft, item, &stats)?;
                done.base_sumsq = base_sumsq;
                Ok((Source::Whole(delta), stats))
            }
            Fit::Blocked(step) => {
                // ΔW is never formed whole: a first pass for ‖ΔW‖, ‖W_base‖², the finite
                // check (so an unchanged matrix, e.g. a frozen embedding, costs one read, not
                // 2q + 4) and the column sums a logit shift needs; then each product of the SVD
                // and the residual re-form the blocks.
                let first = host_delta(self.base, ft, item, item.remove_logit_shift)?;
                done.row.row_blocks = Some(step);
                if self.spectrum_only {
                    done.base_sumsq = Some(first.base_sumsq);
                }
                Ok((
                    Source::Blocked(self.blocks(step), first.col_sums),
                    first.stats,
                ))
            }
        }
    }

    /// The truncated SVD at the policy's rank (for an energy target, the smallest rank that
    /// reaches it within `cap`), with its flops and time in `done`.
    fn decompose(
        &self,
        source: &Source<'_, B>,
        p: Option<&RowCentering<B::Mat>>,
        sumsq: f64,
        cap: usize,
        done: &mut Finished,
    ) -> std::result::Result<(linalg::OnDevice<B::Mat>, usize), JobError> {
        let (be, item, svd) = (self.be, self.item, &self.s.svd);
        let (rows, cols) = item.matrix();
        let clock = Instant::now();
        let seed = crate::rng::seed_for(svd.seed, &item.name);
        let mut flops = 0.0;
        let mut at_rank = |r: usize| {
            let t = source
                .decompose(be, p, r, svd, seed)
                .map_err(|e| self.linalg_err(e))?;
            flops += rsvd::nominal_flops(rows, cols, t.sketch, svd.power_iters);
            Ok::<_, JobError>(t)
        };
        let (t, r) = match *self.policy {
            RankPolicy::Energy { target, .. } => {
                let (t, r, reached) = crate::linalg::rank::decompose_to_energy(
                    target,
                    sumsq,
                    ENERGY_FIRST_RANK,
                    cap,
                    &mut at_rank,
                    |t| &t.s,
                    |t, r| t.truncate(be, r).map_err(|e| self.backend_err(e)),
                )?;
                if !reached {
                    done.row.reason = Some(format!(
                        "energy {target} not reached within the rank cap {cap}"
                    ));
                }
                (t, r)
            }
            _ => (at_rank(cap)?, cap),
        };
        match t.method {
            Method::Randomized => {
                done.stages.svd_randomized += lap(clock);
                done.flops += flops;
            }
            // The exact SVD's flops are not the randomized formula's.
            Method::Exact => done.stages.svd_exact += lap(clock),
        }
        Ok((t, r))
    }

    /// A backend failure: out of device memory (retried smaller), else the tensor's error.
    fn backend_err(&self, e: backend::BackendError) -> JobError {
        if e.out_of_memory {
            JobError::OutOfMemory(e.message)
        } else {
            JobError::Failed(tensor_err(self.ft, &self.item.ft, e))
        }
    }

    /// A decomposition failure (out of device memory: retried smaller).
    fn linalg_err(&self, e: backend::BackendError) -> JobError {
        if e.out_of_memory {
            JobError::OutOfMemory(e.message)
        } else {
            JobError::Failed(Error::Linalg {
                tensor: self.item.name.clone(),
                reason: e.message,
            })
        }
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

/// The result for a tied lm_head, derived from its embedding's: the same ΔW stored as
/// [vocab, dim], so the embedding's factors transposed are its LoRA (lm_head B = embedding Aᵀ,
/// A = embedding Bᵀ) with the same rank, energy and residual certificate — no second read or
/// SVD of the largest matrix.
pub(super) fn tied_copy(source: &Finished, index: usize, item: &PlanItem) -> Finished {
    let mut row = source.row.clone();
    row.name = item.name.clone();
    row.shape = item.shape.clone();
    row.seconds = 0.0;
    row.stages = StageSeconds::default();
    if row.action == TensorAction::LoraEmbedding {
        row.action = TensorAction::Lora;
        row.reason = item.note.clone();
    }
    let factors = source.factors.as_ref().map(|f| {
        let elem =
            |bytes: &[u8], shape: &[usize]| bytes.len() / shape.iter().product::<usize>().max(1);
        FactorTensors {
            a_key: adapter::lora_a_key(&item.module),
            a_shape: vec![f.b_shape[1], f.b_shape[0]],
            a_bytes: transpose(
                &f.b_bytes,
                f.b_shape[0],
                f.b_shape[1],
                elem(&f.b_bytes, &f.b_shape),
            ),
            b_key: adapter::lora_b_key(&item.module),
            b_shape: vec![f.a_shape[1], f.a_shape[0]],
            b_bytes: transpose(
                &f.a_bytes,
                f.a_shape[0],
                f.a_shape[1],
                elem(&f.a_bytes, &f.a_shape),
            ),
            dtype: f.dtype,
            expert: None,
        }
    });
    Finished {
        index,
        row,
        module: factors.as_ref().map(|_| item.module.clone()),
        factors,
        spectrum: source.spectrum.clone(),
        base_sumsq: source.base_sumsq,
        extra: None,
        stages: StageSeconds::default(),
        flops: 0.0,
    }
}

/// A row-major [rows, cols] matrix of `elem`-byte values, transposed.
fn transpose(bytes: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for i in 0..rows {
        for j in 0..cols {
            let (from, to) = ((i * cols + j) * elem, (j * rows + i) * elem);
            out[to..to + elem].copy_from_slice(&bytes[from..from + elem]);
        }
    }
    out
}

/// What the host's pass over a pair gives: ΔW's statistics, ‖W_base‖², and ΔW's column sums
/// when asked for (f64 sums throughout).
pub(super) struct HostDelta {
    pub stats: DeltaStats,
    pub base_sumsq: f64,
    pub col_sums: Option<Vec<f64>>,
}

/// One pass over a tensor's pair in chunks of rows on the host, releasing the pages as it
/// goes: ‖ΔW‖² (for a tensor that is not decomposed, or the first pass of a blocked one),
/// ‖W_base‖², and with `columns` the column sums of ΔW.
pub(super) fn host_delta(
    base: &Checkpoint,
    ft: &Checkpoint,
    item: &PlanItem,
    columns: bool,
) -> Result<HostDelta> {
    const CHUNK: usize = 1 << 16;
    let (bd, fd) = (item.base_dtype(), item.ft_dtype());
    let (bs, fs) = (item.stored_size(false), item.stored_size(true));
    let (rows, cols) = item.matrix();
    let step = (CHUNK / cols.max(1)).max(1);
    let empty = || HostDelta {
        stats: DeltaStats::default(),
        base_sumsq: 0.0,
        col_sums: columns.then(|| vec![0f64; cols]),
    };
    // Folded per rayon split, not collected per chunk: a 128K-row lm_head has 16K chunks.
    let whole = (0..rows.div_ceil(step))
        .into_par_iter()
        .fold(empty, |mut acc, c| {
            let (r0, r1) = (c * step, ((c + 1) * step).min(rows));
            let n = (r1 - r0) * cols;
            let mut x = vec![0f32; n];
            let mut y = vec![0f32; n];
            decode_into(bd, &item.side_rows(base, false, r0, r1), &mut x);
            decode_into(fd, &item.side_rows(ft, true, r0, r1), &mut y);
            // Only the sums are kept: the pages can go (a memory bound counts them).
            base.release_range(&item.base, r0 * cols * bs, r1 * cols * bs);
            ft.release_range(&item.ft, r0 * cols * fs, r1 * cols * fs);
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                let d = b - a;
                if a.is_finite() {
                    acc.base_sumsq += f64::from(*a) * f64::from(*a);
                }
                if d.is_finite() {
                    acc.stats.sumsq += f64::from(d) * f64::from(d);
                    if let Some(cs) = acc.col_sums.as_mut() {
                        cs[i % cols] += f64::from(d);
                    }
                } else {
                    acc.stats.nonfinite += 1;
                }
            }
            acc
        })
        .reduce(empty, |a, b| HostDelta {
            stats: a.stats.merge(b.stats),
            base_sumsq: a.base_sumsq + b.base_sumsq,
            col_sums: a.col_sums.zip(b.col_sums).map(|(mut x, y)| {
                x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                x
            }),
        });
    check_finite(base, ft, item, &whole.stats)?;
    Ok(whole)
}

/// Σ x² over the finite values of encoded rows (f64).
fn sumsq_of(dtype: DType, bytes: &[u8]) -> f64 {
    let mut x = vec![0f32; bytes.len() / dtype.size().max(1)];
    decode_into(dtype, bytes, &mut x);
    x.iter()
        .filter(|v| v.is_finite())
        .map(|&v| f64::from(v) * f64::from(v))
        .sum()
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
    let has_nonfinite = |ck: &Checkpoint, ft_side: bool| {
        let dtype = item.side_dtype(ft_side);
        let rows = item.side_rows(ck, ft_side, 0, item.matrix().0);
        rows.chunks(dtype.size() * 4096).any(|c| {
            let mut v = vec![0f32; c.len() / dtype.size()];
            decode_into(dtype, c, &mut v);
            v.iter().any(|x| !x.is_finite())
        })
    };
    let (which, ck, t) = if has_nonfinite(ft, true) {
        ("the fine-tune", ft, &item.ft)
    } else if has_nonfinite(base, false) {
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
    Error::tensor(ck.path_of(t), &t.name, e.message)
}

/// A tensor that is not decomposed (a norm saved whole, a change a LoRA cannot carry): its
/// ‖ΔW‖ only.
pub(super) fn other_item(
    base: &Checkpoint,
    ft: &Checkpoint,
    index: usize,
    item: &PlanItem,
    out_dtype: DType,
) -> Result<Finished> {
    let clock = Instant::now();
    let mut row = TensorReport::new(&item.name, item.action.outcome(), &item.shape);
    let stats = host_delta(base, ft, item, false)?.stats;
    row.delta_norm = stats.sumsq.sqrt();
    if stats.sumsq == 0.0 {
        row.action = TensorAction::Unchanged;
    } else if let Action::NotCarried(reason) = &item.action {
        row.reason = Some(reason.clone());
    }
    // A bias carried as lora_B.bias: ΔB itself, exactly (up to the output dtype).
    let extra = (item.action == Action::LoraBias && stats.sumsq > 0.0).then(|| {
        let n = item.ft.numel();
        let (mut b, mut f) = (vec![0f32; n], vec![0f32; n]);
        decode_into(item.base_dtype(), base.bytes(&item.base), &mut b);
        decode_into(item.ft_dtype(), ft.bytes(&item.ft), &mut f);
        let d: Vec<f32> = f.iter().zip(&b).map(|(x, y)| x - y).collect();
        let mut bytes = Vec::with_capacity(n * out_dtype.size());
        crate::checkpoint::dtype::encode_into(out_dtype, &d, &mut bytes);
        row.residual = Some(0.0);
        ExtraTensor {
            key: adapter::lora_b_bias_key(&item.module),
            dtype: out_dtype.as_str(),
            shape: item.shape.clone(),
            bytes,
        }
    });
    let mut done = Finished::of_row(index, row);
    done.extra = extra;
    done.stages.delta = lap(clock);
    Ok(done)
}

fn lap(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}
