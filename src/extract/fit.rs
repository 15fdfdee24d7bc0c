//! How a tensor's decomposition fits the memory that holds it: whole, in row blocks, or not
//! at all; what it reserves from the device's budget while it runs; what to try after the
//! device runs out of memory anyway.

use super::settings::ExtractSettings;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::plan::PlanItem;

/// A tensor's fit and the bytes it holds while it is worked on.
#[derive(Clone, Copy, Debug)]
pub(super) struct Placement {
    pub fit: Fit,
    /// What it needs, for the out-of-memory retry.
    pub need: MemoryNeed,
    /// Counted against the budget of the device it runs on (what tensors in flight share, the
    /// process's own overhead already taken off), so they never add up to more than it.
    pub bytes: u64,
}

impl Placement {
    /// A tensor that is not decomposed (saved whole, unchanged, not carried).
    pub(super) fn none() -> Placement {
        Placement {
            fit: Fit::Whole,
            need: MemoryNeed {
                fixed: 0,
                sketches: 0,
                per_row_delta: 0,
                whole: 0,
                per_row: 0,
            },
            bytes: 0,
        }
    }
}

/// What to try after the device ran out of memory on a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Retry {
    /// Run it again, alone on the device, in this fit: half the rows per block while ΔW's
    /// block dominates, else (the first time only) the same fit, since what ran out may have
    /// been the memory of tensors in flight beside it or the allocator's cache.
    Again(Fit),
    /// ΔW's block is no longer the largest thing the tensor holds (its sketches and factors
    /// are larger) and it already ran alone: smaller blocks would re-read the tensor for
    /// little memory.
    BlockNotDominant { block: u64, sketches: u64 },
    /// One row per block already, and it already ran alone.
    AtOneRow,
    /// The exact SVD, which needs ΔW whole, and it already ran alone.
    ExactNeedsWhole,
}

/// Halve the block while it is what holds most of the tensor's memory, never below one row
/// (never for the exact SVD); `first`: no retry has run yet (the tensor has not yet run alone
/// on the device).
pub(super) fn after_out_of_memory(
    fit: Fit,
    rows: usize,
    need: &MemoryNeed,
    first: bool,
    exact: bool,
) -> Retry {
    let current = match fit {
        Fit::Whole => rows,
        Fit::Blocked(step) => step.min(rows),
    };
    let block = current as u64 * need.per_row_delta;
    if !exact && current > 1 && block > need.sketches {
        return Retry::Again(Fit::Blocked(current.div_ceil(2)));
    }
    if first {
        return Retry::Again(fit);
    }
    if exact {
        return Retry::ExactNeedsWhole;
    }
    if current <= 1 {
        return Retry::AtOneRow;
    }
    Retry::BlockNotDominant {
        block,
        sketches: need.sketches,
    }
}

/// Whether this tensor's ΔW fits the memory that holds it (host: `--max-ram`; device:
/// `--max-vram`, by default most of the GPU's free memory) whole, or in how many rows per block.
/// `budget`: what the tensors in flight share (the bound less `overhead`, which messages add
/// back so that they speak of the bound the user gave).
#[allow(clippy::too_many_arguments)]
pub(super) fn fit_of<B: Backend>(
    be: &B,
    s: &ExtractSettings,
    budget: Option<u64>,
    overhead: u64,
    item: &PlanItem,
    rank: usize,
    r_adapter: usize,
) -> Result<Placement> {
    let on_host = be.delta_in_host_memory();
    let flag = match (on_host, s.max_vram) {
        (true, _) => "--max-ram",
        (false, Some(_)) => "--max-vram",
        (false, None) => "the device's free memory (90% of it, the default of --max-vram)",
    };
    let (m, n) = item.matrix();
    let k = s.svd.sketch_width(rank, m, n) as u64;
    let input_bytes = (item.base_dtype().size() + item.ft_dtype().size()) as u64;
    let exact = s.svd.runs_exact(rank, m, n);
    let (m, n) = (m as u64, n as u64);
    let need = memory_need(m, n, k, r_adapter as u64, input_bytes, on_host);
    let Some(max) = budget else {
        return Ok(Placement {
            fit: Fit::Whole,
            need,
            bytes: 0,
        });
    };
    let fit = fit_in(max, overhead, &need, flag, &item.name, (m, n), exact)?;
    Ok(Placement {
        fit,
        need,
        bytes: need.bytes(fit),
    })
}

/// The decision itself, given the budget and what the tensor needs.
pub(super) fn fit_in(
    max: u64,
    overhead: u64,
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
            crate::size::format_size(max + overhead),
            crate::size::format_size(need.fixed + need.per_row + overhead)
        )));
    }
    if exact {
        return Err(Error::Settings(format!(
            "{name} ({m}×{n}) does not fit {flag} {} whole, and the exact SVD needs it whole: \
             raise {flag} or use --svd randomized with a rank below {}",
            crate::size::format_size(max + overhead),
            m.min(n)
        )));
    }
    Ok(Fit::Blocked(rows as usize))
}

/// How a tensor's ΔW is held during its decomposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fit {
    Whole,
    /// Streamed in blocks of this many rows.
    Blocked(usize),
}

/// Bytes a tensor's decomposition holds (host memory on the CPU, device memory on a GPU).
#[derive(Clone, Copy, Debug)]
pub(super) struct MemoryNeed {
    /// Whatever the layout: sketches (Y, Q, Z, B and their temporaries), factors, and the
    /// process's own baseline.
    fixed: u64,
    /// Of `fixed`, the sketches and factors alone (what a smaller block cannot shrink).
    sketches: u64,
    /// ΔW's own bytes per row (f32).
    per_row_delta: u64,
    /// ΔW in f32, whole.
    whole: u64,
    /// One row of a block: its f32 ΔW and the input pages it is formed from.
    per_row: u64,
}

impl MemoryNeed {
    pub(super) fn bytes(&self, fit: Fit) -> u64 {
        match fit {
            Fit::Whole => self.fixed + self.whole,
            Fit::Blocked(rows) => self.fixed + rows as u64 * self.per_row,
        }
    }
}

/// The process's own memory besides tensors (binary, allocator arenas, decode chunks): an
/// allowance. On the 1B pair under `--max-ram 200M` the peak RSS (117 MiB) less the largest
/// whole tensor's ΔW, sketches and factors leaves ~30 MiB (BENCHMARKS.md).
pub const BASELINE_RAM: u64 = 64 << 20;

/// `input_bytes`: bytes per element of base + fine-tune.
pub(super) fn memory_need(
    m: u64,
    n: u64,
    k: u64,
    r_out: u64,
    input_bytes: u64,
    on_host: bool,
) -> MemoryNeed {
    let per_row_delta = 4 * n;
    if on_host {
        let sketches = 4 * k * 3 * (m + n) + 8 * r_out * (m + n);
        MemoryNeed {
            fixed: BASELINE_RAM + sketches,
            sketches,
            per_row_delta,
            whole: 4 * m * n,
            per_row: n * (4 + input_bytes),
        }
    } else {
        // Sketches twice over: f64 copies for the fallback QR and the small eigenproblem. The
        // context and each worker's own buffers are the backend's memory_overhead, taken off
        // the bound before tensors share it.
        let sketches = 4 * k * 6 * (m + n) + 8 * r_out * (m + n);
        MemoryNeed {
            fixed: sketches,
            sketches,
            per_row_delta,
            whole: 4 * m * n,
            per_row: per_row_delta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(fixed: u64, whole: u64, per_row: u64) -> MemoryNeed {
        MemoryNeed {
            fixed,
            sketches: fixed / 2,
            per_row_delta: per_row,
            whole,
            per_row,
        }
    }

    #[test]
    fn out_of_memory_halves_the_block_while_it_dominates_and_never_below_one_row() {
        // 1000 rows of 10 bytes; sketches 50 bytes: blocks of 5 rows or fewer do not dominate.
        let n = need(100, 10_000, 10);
        let retry = |fit| after_out_of_memory(fit, 1000, &n, false, false);
        assert_eq!(retry(Fit::Whole), Retry::Again(Fit::Blocked(500)));
        assert_eq!(retry(Fit::Blocked(500)), Retry::Again(Fit::Blocked(250)));
        assert_eq!(retry(Fit::Blocked(7)), Retry::Again(Fit::Blocked(4)));
        assert_eq!(
            retry(Fit::Blocked(5)),
            Retry::BlockNotDominant {
                block: 50,
                sketches: 50
            }
        );
        // A block wider than the matrix counts as the matrix.
        assert_eq!(retry(Fit::Blocked(5000)), Retry::Again(Fit::Blocked(500)));
        // 8 tries to the stop at 4 rows, where halving down to one row would take 10 (and on
        // a real tensor, each try re-reads it).
        let (mut fit, mut tries) = (Fit::Whole, 0);
        while let Retry::Again(f) = after_out_of_memory(fit, 1000, &n, tries == 0, false) {
            fit = f;
            tries += 1;
        }
        assert_eq!((tries, fit), (8, Fit::Blocked(4)));
        let tiny = need(0, 30, 10);
        assert_eq!(
            after_out_of_memory(Fit::Whole, 3, &tiny, false, false),
            Retry::Again(Fit::Blocked(2))
        );
        assert_eq!(
            after_out_of_memory(Fit::Blocked(1), 3, &tiny, false, false),
            Retry::AtOneRow
        );
        assert_eq!(
            after_out_of_memory(Fit::Whole, 1, &tiny, false, false),
            Retry::AtOneRow
        );
        assert_eq!(n.bytes(Fit::Whole), 10_100);
        assert_eq!(n.bytes(Fit::Blocked(7)), 170);
    }

    #[test]
    fn the_first_out_of_memory_always_retries_alone() {
        // ΔW (4 rows × 10 bytes) smaller than its sketches (50): not halved, but run once more
        // alone on the device, whole; then a clear stop.
        let n = need(100, 40, 10);
        assert_eq!(
            after_out_of_memory(Fit::Whole, 4, &n, true, false),
            Retry::Again(Fit::Whole)
        );
        assert_eq!(
            after_out_of_memory(Fit::Whole, 4, &n, false, false),
            Retry::BlockNotDominant {
                block: 40,
                sketches: 50
            }
        );
        assert_eq!(
            after_out_of_memory(Fit::Blocked(1), 4, &n, true, false),
            Retry::Again(Fit::Blocked(1))
        );
        assert_eq!(
            after_out_of_memory(Fit::Whole, 1, &n, false, false),
            Retry::AtOneRow
        );
        // The exact SVD is never cut into blocks, however large ΔW: once alone, then a stop.
        let big = need(100, 10_000, 10);
        assert_eq!(
            after_out_of_memory(Fit::Whole, 1000, &big, true, true),
            Retry::Again(Fit::Whole)
        );
        assert_eq!(
            after_out_of_memory(Fit::Whole, 1000, &big, false, true),
            Retry::ExactNeedsWhole
        );
    }

    #[test]
    fn a_tensor_fits_whole_in_blocks_or_not_at_all() {
        let n = need(100, 1000, 10);
        let fit = |max| fit_in(max, 0, &n, "--max-vram", "t", (100, 10), false);
        assert!(matches!(fit(1100), Ok(Fit::Whole)));
        assert!(matches!(fit(1099), Ok(Fit::Blocked(99))));
        assert!(matches!(fit(110), Ok(Fit::Blocked(1))));
        let err = fit(109).err().unwrap().to_string();
        assert!(
            err.contains("--max-vram") && err.contains("needs at least 110 B"),
            "{err}"
        );
        let exact = fit_in(500, 0, &n, "--max-ram", "t", (100, 10), true);
        assert!(exact
            .err()
            .unwrap()
            .to_string()
            .contains("exact SVD needs it whole"));
    }

    #[test]
    fn the_device_model_counts_a_28672x8192_matrix_like_the_gpu_holds_it() {
        // ΔW 0.94 GB whole; sketches at k = 128 (f32 and f64 copies) and factors: ~132 MB. The
        // context and each worker's buffers are not the tensor's: they come off the bound first.
        let (m, n) = (28672u64, 8192u64);
        let d = memory_need(m, n, 128, 64, 4, false);
        assert_eq!(d.whole, 4 * m * n);
        assert_eq!(d.fixed, 4 * 128 * 6 * (m + n) + 8 * 64 * (m + n));
        assert_eq!(d.sketches, d.fixed);
        // On the host a row also holds its input pages.
        assert_eq!(memory_need(m, n, 128, 64, 4, true).per_row, 8 * n);
        let fit = |max| fit_in(max, 0, &d, "--max-vram", "mlp", (m, n), false).unwrap();
        assert!(matches!(fit(1_100_000_000), Fit::Whole));
        match fit(1_000_000_000) {
            Fit::Blocked(rows) => assert!(rows > 0 && (rows as u64) < m, "{rows}"),
            Fit::Whole => panic!("1 GB cannot hold 0.94 GB of ΔW beside 0.13 GB of sketches"),
        }
        // A message speaks of the bound the user gave, overhead included.
        let tiny = need(100, 1000, 10);
        let err = fit_in(50, 1000, &tiny, "--max-vram", "t", (100, 10), false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("--max-vram 1.0 KiB") || err.contains("--max-vram 1050 B"),
            "{err}"
        );
        assert!(
            err.contains("needs at least 1110 B") || err.contains("needs at least 1.1 KiB"),
            "{err}"
        );
    }
}
