//! The CPU backend: faer for dense linear algebra, rayon for the element-wise passes.

use faer::linalg::solvers::{Qr, Svd};
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use super::{Backend, BackendError, BackendResult, DeltaInput, DeltaStats, Op, SvdParts};
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

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }
}

fn par() -> Par {
    Par::rayon(0)
}

fn op_view(m: &CpuMat, op: Op) -> MatRef<'_, f32> {
    match op {
        Op::N => m.view(),
        Op::T => m.view().transpose(),
    }
}

impl Backend for Cpu {
    type Mat = CpuMat;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
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
        let (rows, cols) = (input.rows, input.cols);
        let (bs, fs) = (input.base_dtype.size(), input.ft_dtype.size());
        if input.base.len() != rows * cols * bs || input.ft.len() != rows * cols * fs {
            return Err(BackendError(format!(
                "byte counts {} and {} do not match a {rows}×{cols} matrix",
                input.base.len(),
                input.ft.len()
            )));
        }
        // Storage is cols×rows column-major: column i holds row i of ΔW.
        let mut store = Mat::<f32>::zeros(cols, rows);
        // Per-row partial sums are added in row order afterwards, so the result does not
        // depend on how rayon split the work.
        let per_row: Vec<DeltaStats> = store
            .par_col_iter_mut()
            .enumerate()
            .map_init(
                || vec![0f32; cols],
                |scratch, (i, col)| {
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
        let stats = per_row
            .iter()
            .fold(DeltaStats::default(), |a, b| DeltaStats {
                sumsq: a.sumsq + b.sumsq,
                nonfinite: a.nonfinite + b.nonfinite,
            });
        Ok((
            CpuMat {
                store,
                transposed: true,
            },
            stats,
        ))
    }

    fn gemm(&self, a: &CpuMat, op_a: Op, b: &CpuMat, op_b: Op) -> BackendResult<CpuMat> {
        let (a, b) = (op_view(a, op_a), op_view(b, op_b));
        if a.ncols() != b.nrows() {
            return Err(BackendError(format!(
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

    fn orthonormalize(&self, y: CpuMat) -> BackendResult<CpuMat> {
        let (m, n) = y.view().shape();
        if m < n {
            return Err(BackendError(format!(
                "cannot orthonormalize a wide {m}×{n} matrix"
            )));
        }
        Ok(CpuMat::new(Qr::new(y.view()).compute_thin_Q()))
    }

    fn thin_svd(&self, a: &CpuMat) -> BackendResult<SvdParts<CpuMat>> {
        let svd = Svd::new_thin(a.view()).map_err(|e| BackendError(format!("SVD: {e:?}")))?;
        let s = svd.S().column_vector().iter().copied().collect();
        Ok(SvdParts {
            u: CpuMat::new(svd.U().to_owned()),
            s,
            v: CpuMat::new(svd.V().to_owned()),
        })
    }

    fn residual_sumsq(&self, delta: &CpuMat, b: &CpuMat, a: &CpuMat) -> BackendResult<f64> {
        let (d, b, a) = (delta.view(), b.view(), a.view());
        if b.nrows() != d.nrows() || a.ncols() != d.ncols() || b.ncols() != a.nrows() {
            return Err(BackendError(
                "residual: factor shapes do not match ΔW".into(),
            ));
        }
        // Row blocks bound the scratch to BLOCK×n; each block is an independent GEMM.
        const BLOCK: usize = 256;
        let m = d.nrows();
        let blocks: Vec<usize> = (0..m).step_by(BLOCK).collect();
        let partial: Vec<f64> = blocks
            .par_iter()
            .map(|&r0| {
                let h = BLOCK.min(m - r0);
                let mut t = d.subrows(r0, h).to_owned();
                faer::linalg::matmul::matmul(
                    t.as_mut(),
                    Accum::Add,
                    b.subrows(r0, h),
                    a,
                    -1.0f32,
                    Par::Seq,
                );
                let mut s = 0f64;
                for j in 0..t.ncols() {
                    for &x in t.col(j).iter() {
                        s += f64::from(x) * f64::from(x);
                    }
                }
                s
            })
            .collect();
        // Summed in block order: deterministic whatever the thread count.
        Ok(partial.iter().sum())
    }
}
