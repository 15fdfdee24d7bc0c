//! The CPU backend: faer for dense linear algebra, rayon for the element-wise passes.

use faer::linalg::solvers::{Qr, Svd};
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use super::{
    eigh_descending, Backend, BackendError, BackendResult, DeltaInput, DeltaStats, Op, SvdParts,
};
use crate::checkpoint::dtype::decode_into;

/// A dense f32 matrix. ΔW arrives row-major, which is the column-major storage of ΔWᵀ, so it
/// is kept as that storage with a flag instead of being transposed in memory.
pub struct CpuMat {
    store: Mat<f32>,
    transposed: bool,
}

impl CpuMat {
    pub fn new(m: Mat<f32>) -> Self {
        CpuMat {
            store: m,
            transposed: false,
        }
    }

    /// The logical matrix.
    pub fn view(&self) -> MatRef<'_, f32> {
        if self.transposed {
            self.store.transpose()
        } else {
            self.store.as_ref()
        }
    }
}

/// The CPU backend. With a pool of its own, several `Cpu` workers share the cores between
/// them (parallelism across tensors); without, one worker uses rayon's global pool (inside
/// each GEMM). Never both: that would oversubscribe the cores.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
}

impl Cpu {
    pub fn new() -> Self {
        Cpu { pool: None }
    }

    /// `workers` CPU workers that split the global pool's threads between them (at least one
    /// thread each).
    pub fn workers(workers: usize) -> crate::Result<Vec<Cpu>> {
        if workers <= 1 {
            return Ok(vec![Cpu::new()]);
        }
        let threads = (rayon::current_num_threads() / workers).max(1);
        (0..workers)
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(move |t| format!("phlora-cpu{i}-{t}"))
                    .build()
                    .map(|p| Cpu {
                        pool: Some(std::sync::Arc::new(p)),
                    })
                    .map_err(|e| crate::Error::Device(format!("cannot start CPU worker {i}: {e}")))
            })
            .collect()
    }
}

fn par() -> Par {
    Par::rayon(0)
}

/// Reads every byte (a parallel XOR of 8-byte words), returning the XOR so it is not elided.
pub(crate) fn read_all(bytes: &[u8]) -> u64 {
    bytes
        .par_chunks(1 << 20)
        .map(|c| {
            let mut words = c.chunks_exact(8);
            let mut x = words.by_ref().fold(0u64, |a, w| {
                a ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))
            });
            for &b in words.remainder() {
                x ^= u64::from(b);
            }
            x
        })
        .reduce(|| 0, |a, b| a ^ b)
}

/// Reads one byte of every page, in parallel, so the pages of a mapped file are resident.
pub(crate) fn touch_pages(bytes: &[u8]) {
    const PAGE: usize = 4096;
    bytes.par_chunks(1 << 20).for_each(|c| {
        for i in (0..c.len()).step_by(PAGE) {
            // SAFETY: i < c.len(); a volatile read keeps the load from being optimised away.
            unsafe { std::ptr::read_volatile(c.as_ptr().add(i)) };
        }
    });
}

fn op_view(m: &CpuMat, op: Op) -> MatRef<'_, f32> {
    match op {
        Op::N => m.view(),
        Op::T => m.view().transpose(),
    }
}

fn to_f64(a: MatRef<'_, f32>) -> Mat<f64> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| f64::from(a[(i, j)]))
}

fn to_f32(a: MatRef<'_, f64>) -> Mat<f32> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] as f32)
}

/// One CholeskyQR pass in place: G = YᵀY = LLᵀ, Y ← Y·L⁻ᵀ. Returns false (Y untouched or
/// garbage, the caller falls back) when G is not positive definite or `accept` refuses L's
/// diagonal.
fn cholesky_qr_pass(y: &mut Mat<f32>, accept: &dyn Fn(&[f32]) -> bool) -> bool {
    use faer::linalg::solvers::Llt;
    use faer::Side;
    let k = y.ncols();
    let mut g = Mat::<f32>::zeros(k, k);
    faer::linalg::matmul::matmul(
        g.as_mut(),
        Accum::Replace,
        y.transpose(),
        y.as_ref(),
        1.0,
        par(),
    );
    let Ok(llt) = Llt::new(g.as_ref(), Side::Lower) else {
        return false;
    };
    let l = llt.L();
    let diag: Vec<f32> = (0..k).map(|i| l[(i, i)]).collect();
    if !accept(&diag) {
        return false;
    }
    // Y·L⁻ᵀ = (L⁻¹·Yᵀ)ᵀ: a lower-triangular solve on the transposed view.
    faer::linalg::triangular_solve::solve_lower_triangular_in_place(
        l,
        y.as_mut().transpose_mut(),
        par(),
    );
    true
}

/// The Q of a Householder QR, in f64 because faer's f32 Householder QR loses ~1e-3 of
/// ‖Y − QR‖/‖Y‖ on steep inputs.
fn householder_q(y: MatRef<'_, f32>) -> CpuMat {
    CpuMat::new(to_f32(
        Qr::new(to_f64(y).as_ref()).compute_thin_Q().as_ref(),
    ))
}

impl super::DeviceMemory for Cpu {}

impl Backend for Cpu {
    type Mat = CpuMat;

    fn name(&self) -> String {
        let threads = self
            .pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
        format!(
            "cpu ({threads} thread{})",
            if threads == 1 { "" } else { "s" }
        )
    }

    fn scope<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(work),
            None => work(),
        }
    }

    fn shape(&self, a: &CpuMat) -> (usize, usize) {
        a.view().shape()
    }

    fn upload(&self, host: MatRef<'_, f32>) -> BackendResult<CpuMat> {
        Ok(CpuMat::new(host.to_owned()))
    }

    fn download(&self, a: &CpuMat) -> BackendResult<Mat<f32>> {
        Ok(a.view().to_owned())
    }

    fn delta(&self, input: &DeltaInput<'_>) -> BackendResult<(CpuMat, DeltaStats)> {
        input.check_sizes()?;
        let (rows, cols) = (input.rows, input.cols);
        let (bs, fs) = (input.base_dtype.size(), input.ft_dtype.size());
        // Storage is cols×rows column-major: column i holds row i of ΔW. Rows go in chunks of
        // ~16 MB of output so the caller can release each chunk's input pages early.
        let mut store = Mat::<f32>::zeros(cols, rows);
        let chunk = ((16usize << 20) / (4 * cols.max(1))).max(1);
        let mut per_row: Vec<DeltaStats> = Vec::with_capacity(rows);
        let mut read_seconds = 0.0;
        for r0 in (0..rows).step_by(chunk) {
            let r1 = (r0 + chunk).min(rows);
            // Fault the chunk's input pages in first, so the time spent reading is known
            // apart from the time spent computing (the decode below then finds them resident).
            let clock = std::time::Instant::now();
            touch_pages(&input.ft[r0 * cols * fs..r1 * cols * fs]);
            touch_pages(&input.base[r0 * cols * bs..r1 * cols * bs]);
            read_seconds += clock.elapsed().as_secs_f64();
            let part: Vec<DeltaStats> = store
                .as_mut()
                .subcols_mut(r0, r1 - r0)
                .par_col_iter_mut()
                .enumerate()
                .map_init(
                    || vec![0f32; cols],
                    |scratch, (di, col)| {
                        let i = r0 + di;
                        let out = col
                            .try_as_col_major_mut()
                            .expect("owned columns are contiguous")
                            .as_slice_mut();
                        decode_into(
                            input.ft_dtype,
                            &input.ft[i * cols * fs..(i + 1) * cols * fs],
                            out,
                        );
                        decode_into(
                            input.base_dtype,
                            &input.base[i * cols * bs..(i + 1) * cols * bs],
                            scratch,
                        );
                        let mut s = DeltaStats::default();
                        for (o, b) in out.iter_mut().zip(scratch.iter()) {
                            *o -= *b;
                            if o.is_finite() {
                                s.sumsq += f64::from(*o) * f64::from(*o);
                            } else {
                                s.nonfinite += 1;
                            }
                        }
                        s
                    },
                )
                .collect();
            per_row.extend(part);
            if let Some(done) = input.rows_read {
                done(r0, r1);
            }
        }
        // Per-row partial sums are added in row order, so the result does not depend on how
        // rayon split the work.
        let stats = per_row
            .iter()
            .fold(DeltaStats::default(), |a, b| a.merge(*b));
        let stats = DeltaStats {
            read_seconds,
            ..stats
        };
        Ok((
            CpuMat {
                store,
                transposed: true,
            },
            stats,
        ))
    }

    fn first_cols(&self, a: &CpuMat, r: usize) -> BackendResult<CpuMat> {
        let v = a.view();
        Ok(CpuMat::new(v.subcols(0, r.min(v.ncols())).to_owned()))
    }

    fn gemm(&self, a: &CpuMat, op_a: Op, b: &CpuMat, op_b: Op) -> BackendResult<CpuMat> {
        let (a, b) = (op_view(a, op_a), op_view(b, op_b));
        if a.ncols() != b.nrows() {
            return Err(BackendError::new(format!(
                "gemm shapes do not agree: {}×{} · {}×{}",
                a.nrows(),
                a.ncols(),
                b.nrows(),
                b.ncols()
            )));
        }
        let mut c = Mat::<f32>::zeros(a.nrows(), b.ncols());
        faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, a, b, 1.0, par());
        Ok(CpuMat::new(c))
    }

    fn plain_copy(&self, a: &CpuMat) -> BackendResult<CpuMat> {
        Ok(CpuMat::new(a.view().to_owned()))
    }

    fn cholesky_qr_pass(
        &self,
        y: &mut CpuMat,
        accept: &dyn Fn(&[f32]) -> bool,
    ) -> BackendResult<bool> {
        if y.transposed {
            *y = self.plain_copy(y)?;
        }
        Ok(cholesky_qr_pass(&mut y.store, accept))
    }

    fn householder_q(&self, y: &CpuMat) -> BackendResult<CpuMat> {
        Ok(householder_q(y.view()))
    }

    fn thin_svd(&self, a: &CpuMat) -> BackendResult<SvdParts<CpuMat>> {
        // In f64: faer's f32 QR (the first step of its SVD of a tall matrix) loses ~1e-3 of
        // relative accuracy on steep or rank-deficient inputs, which the exact mode — the
        // reference — cannot afford.
        let svd = Svd::new_thin(to_f64(a.view()).as_ref())
            .map_err(|e| BackendError::new(format!("SVD: {e:?}")))?;
        let s = svd.S().column_vector().iter().map(|&x| x as f32).collect();
        Ok(SvdParts {
            u: CpuMat::new(to_f32(svd.U())),
            s,
            v: CpuMat::new(to_f32(svd.V())),
        })
    }

    fn gram_eigh(&self, b: &CpuMat) -> BackendResult<(Vec<f64>, Mat<f32>)> {
        let b64 = to_f64(b.view());
        let k = b64.nrows();
        let mut g = Mat::<f64>::zeros(k, k);
        faer::linalg::matmul::matmul(
            g.as_mut(),
            Accum::Replace,
            b64.as_ref(),
            b64.transpose(),
            1.0,
            par(),
        );
        drop(b64);
        eigh_descending(g)
    }

    fn right_vectors(&self, b: &CpuMat, ub: &Mat<f32>, s: &[f64]) -> BackendResult<CpuMat> {
        let b = b.view();
        let mut v = Mat::<f32>::zeros(b.ncols(), ub.ncols());
        faer::linalg::matmul::matmul(
            v.as_mut(),
            Accum::Replace,
            b.transpose(),
            ub.as_ref(),
            1.0,
            par(),
        );
        for (j, &sj) in s.iter().enumerate() {
            let c = if sj > 0.0 { (1.0 / sj) as f32 } else { 0.0 };
            v.col_mut(j).iter_mut().for_each(|x| *x *= c);
        }
        Ok(CpuMat::new(v))
    }

    fn residual_sumsq(&self, delta: &CpuMat, b: &CpuMat, a: &CpuMat) -> BackendResult<f64> {
        let (m, n) = delta.view().shape();
        if b.view().nrows() != m || a.view().ncols() != n || b.view().ncols() != a.view().nrows() {
            return Err(BackendError::new("residual: factor shapes do not match ΔW"));
        }
        // Work in ΔW's storage orientation, so each block is a contiguous run of columns:
        // stored ΔWᵀ = Aᵀ·Bᵀ when ΔW is kept transposed.
        let (d, left, right) = if delta.transposed {
            (
                delta.store.as_ref(),
                a.view().transpose(),
                b.view().transpose(),
            )
        } else {
            (delta.store.as_ref(), b.view(), a.view())
        };
        const BLOCK: usize = 256;
        let cols = d.ncols();
        let starts: Vec<usize> = (0..cols).step_by(BLOCK).collect();
        let partial: Vec<f64> = starts
            .par_iter()
            .map(|&c0| {
                let w = BLOCK.min(cols - c0);
                let mut t = d.subcols(c0, w).to_owned();
                faer::linalg::matmul::matmul(
                    t.as_mut(),
                    Accum::Add,
                    left,
                    right.subcols(c0, w),
                    -1.0f32,
                    Par::Seq,
                );
                let mut s = 0f64;
                for j in 0..w {
                    let col = t
                        .col(j)
                        .try_as_col_major()
                        .expect("owned columns are contiguous")
                        .as_slice();
                    s += col
                        .iter()
                        .map(|&x| f64::from(x) * f64::from(x))
                        .sum::<f64>();
                }
                s
            })
            .collect();
        // Summed in block order: deterministic whatever the thread count.
        Ok(partial.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::dtype::encode_into;
    use crate::checkpoint::DType;
    use std::sync::Mutex;

    #[test]
    fn delta_reports_every_row_range_once_and_in_order() {
        // Wide rows make several 16 MB chunks: 3000 rows × 2048 cols × 4 B = 24 MB.
        let (rows, cols) = (3000, 2048);
        let mut rng = crate::rng::Rng::new(5);
        let mut b = vec![0f32; rows * cols];
        let mut f = vec![0f32; rows * cols];
        rng.fill_normal(&mut b);
        rng.fill_normal(&mut f);
        let (mut bb, mut fb) = (Vec::new(), Vec::new());
        encode_into(DType::BF16, &b, &mut bb);
        encode_into(DType::F32, &f, &mut fb);
        let seen = Mutex::new(Vec::new());
        let record = |r0: usize, r1: usize| seen.lock().unwrap().push((r0, r1));
        let input = DeltaInput {
            base: &bb,
            base_dtype: DType::BF16,
            ft: &fb,
            ft_dtype: DType::F32,
            rows,
            cols,
            rows_read: Some(&record),
        };
        let (d, stats) = Cpu::new().delta(&input).unwrap();
        let ranges = seen.into_inner().unwrap();
        assert!(ranges.len() > 1, "{ranges:?}");
        assert_eq!(ranges.first().unwrap().0, 0);
        assert_eq!(ranges.last().unwrap().1, rows);
        assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0));
        let view = d.view();
        let mut sumsq = 0f64;
        for &(i, j) in &[(0, 0), (1234, 77), (2999, 2047)] {
            let want = f[i * cols + j]
                - crate::checkpoint::dtype::round_trip(DType::BF16, b[i * cols + j]);
            assert_eq!(view[(i, j)], want);
        }
        for i in 0..rows {
            for j in 0..cols {
                sumsq += f64::from(view[(i, j)]).powi(2);
            }
        }
        assert!((stats.sumsq - sumsq).abs() <= 1e-9 * sumsq);
        assert_eq!(stats.nonfinite, 0);
    }
}
