//! How a tensor's decomposition fits the memory that holds it: whole, in row blocks, or not
//! at all; what it reserves from the device's budget while it runs; what to try after the
//! device runs out of memory anyway.

use super::ExtractSettings;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::plan::PlanItem;

/// A tensor's fit and the bytes it holds while it is worked on.
#[derive(Clone, Copy, Debug)]
pub(super) struct Placement {
    pub fit: Fit,
    /// Counted against the budget of the device it runs on (each worker's baseline included,
    /// so tensors in flight on one device never add up to more than the budget).
    pub bytes: u64,
}

/// What to try after the device ran out of memory on a tensor in this fit: half the rows
/// per block (a whole ΔW becomes blocks of half its rows), until one row per block.
pub(super) fn after_out_of_memory(fit: Fit, rows: usize) -> Option<Fit> {
    match fit {
        Fit::Whole if rows > 1 => Some(Fit::Blocked(rows.div_ceil(2))),
        Fit::Blocked(step) if step > 1 => Some(Fit::Blocked(step / 2)),
        _ => None,
    }
}

/// Whether this tensor's ΔW fits the memory that holds it (host: `--max-ram`; device:
/// `--max-vram`, by default most of the GPU's free memory) whole, or in how many rows per block.
pub(super) fn fit_of<B: Backend>(
    be: &B,
    s: &ExtractSettings,
    budget: Option<u64>,
    item: &PlanItem,
    rank: usize,
    r_adapter: usize,
) -> Result<Placement> {
    let on_host = be.delta_in_host_memory();
    let flag = if on_host { "--max-ram" } else { "--max-vram" };
    let Some(max) = budget else {
        return Ok(Placement {
            fit: Fit::Whole,
            bytes: 0,
        });
    };
    let (m, n) = item.matrix();
    let k = s.svd.sketch_width(rank, m, n) as u64;
    let input_bytes = (item.base_dtype().size() + item.ft_dtype().size()) as u64;
    let (m, n) = (m as u64, n as u64);
    let need = memory_need(m, n, k, r_adapter as u64, input_bytes, on_host);
    let exact = s.svd.runs_exact(rank, m as usize, n as usize);
    let fit = fit_in(max, &need, flag, &item.name, (m, n), exact)?;
    Ok(Placement {
        fit,
        bytes: need.bytes(fit),
    })
}

/// The decision itself, given the budget and what the tensor needs.
pub(super) fn fit_in(
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
pub(super) enum Fit {
    Whole,
    /// Streamed in blocks of this many rows.
    Blocked(usize),
}

/// Bytes a tensor's decomposition holds (host memory on the CPU, device memory on a GPU).
pub(super) struct MemoryNeed {
    /// Whatever the layout: sketches (Y, Q, Z, B and their temporaries), factors, and the
    /// process's own baseline.
    fixed: u64,
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

/// Device memory per worker besides ΔW and the sketches: the ΔW kernel's input staging
/// (64 MiB), the residual's scratch (128 MiB), cuBLAS/cuSOLVER workspaces and a share of the
/// context (an allowance; scripts/bench-70b.sh checks the peak against --max-vram on a GPU).
pub const BASELINE_VRAM: u64 = 512 << 20;

/// `input_bytes`: bytes per element of base + fine-tune.
pub(super) fn memory_need(
    m: u64,
    n: u64,
    k: u64,
    r_out: u64,
    input_bytes: u64,
    on_host: bool,
) -> MemoryNeed {
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
    fn out_of_memory_halves_the_rows_per_block_down_to_one() {
        assert!(matches!(
            after_out_of_memory(Fit::Whole, 1000),
            Some(Fit::Blocked(500))
        ));
        assert!(matches!(
            after_out_of_memory(Fit::Whole, 3),
            Some(Fit::Blocked(2))
        ));
        assert!(matches!(
            after_out_of_memory(Fit::Blocked(3), 1000),
            Some(Fit::Blocked(1))
        ));
        assert!(after_out_of_memory(Fit::Blocked(1), 1000).is_none());
        assert!(after_out_of_memory(Fit::Whole, 1).is_none());
        let n = need(100, 1000, 10);
        assert_eq!(n.bytes(Fit::Whole), 1100);
        assert_eq!(n.bytes(Fit::Blocked(7)), 170);
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
