//! LoRA factors on the device: B = U·√S and A = √S·Vᵀ scaled, cast to the output dtype and
//! laid out as PEFT tensors by one kernel; only the encoded bytes come back to the host.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{Cuda, CudaError, CudaMat};
use crate::backend::{Backend, BackendError, BackendResult};

impl Cuda {
    pub(super) fn factor_on_device(
        &self,
        t: &crate::linalg::OnDevice<CudaMat>,
        layout: crate::factor::Layout,
        r_out: usize,
        dtype: crate::checkpoint::DType,
    ) -> BackendResult<crate::factor::DeviceFactors<CudaMat>> {
        use crate::factor::Layout;
        let r = t.s.len();
        if r > r_out || t.u.cols != r || t.v.cols != r {
            return Err(BackendError::new(format!(
                "factor: rank {r} does not fit the adapter rank {r_out}"
            )));
        }
        // Plain column-major U (rows×r) and V (cols×r).
        let u = self.first_cols(&t.u, r)?;
        let v = self.first_cols(&t.v, r)?;
        let (rows, cols) = (u.rows, v.rows);
        let root: Vec<f32> = t.s.iter().map(|s| s.max(0.0).sqrt()).collect();
        let scale = self
            .stream
            .clone_htod(if root.is_empty() {
                &[0.0f32][..]
            } else {
                &root[..]
            })
            .map_err(CudaError::from)?;
        let d2h_seconds = std::cell::Cell::new(0.0);
        // One factor tensor: encoded bytes on the host, rounded f32 left on the device.
        let tensor =
            |src: &CudaMat, transpose_out: bool| -> Result<(Vec<u8>, CudaSlice<f32>), CudaError> {
                let n = src.rows * r_out;
                // SAFETY: fully written by the kernel (n elements of each).
                let mut bits = unsafe { self.stream.alloc::<u8>((n * dtype.size()).max(1)) }?;
                let rounded = self.alloc(n)?;
                self.kernels.factor_cast(
                    &self.stream,
                    src.ptr(&self.stream),
                    src.rows,
                    r,
                    r_out,
                    &scale,
                    transpose_out,
                    dtype,
                    bits.device_ptr_mut(&self.stream).0,
                    rounded.device_ptr(&self.stream).0,
                )?;
                // The copy alone is timed: the cast kernel (and any queued work) first.
                self.stream.synchronize()?;
                let clock = std::time::Instant::now();
                let mut bytes = self.stream.clone_dtoh(&bits)?;
                d2h_seconds.set(d2h_seconds.get() + clock.elapsed().as_secs_f64());
                bytes.truncate(n * dtype.size());
                Ok((bytes, rounded))
            };
        // The row-major [r_out, len] tensor is the column-major storage of a len×r_out matrix,
        // the row-major [len, r_out] one that of its transpose.
        let mat = |buf, rows, cols, transposed| CudaMat {
            buf,
            rows,
            cols,
            transposed,
        };
        Ok(match layout {
            Layout::Linear => {
                let (a_bytes, a_round) = tensor(&v, false)?; // A = √S·Vᵀ [r_out, cols]
                let (b_bytes, b_round) = tensor(&u, true)?; // B = U·√S [rows, r_out]
                crate::factor::DeviceFactors {
                    a_shape: [r_out, cols],
                    a_bytes,
                    b_shape: [rows, r_out],
                    b_bytes,
                    left: mat(b_round, rows, r_out, true),
                    right: mat(a_round, r_out, cols, true),
                    d2h_seconds: d2h_seconds.get(),
                }
            }
            Layout::Embedding => {
                let (a_bytes, a_round) = tensor(&u, false)?; // A = (U·√S)ᵀ [r_out, rows]
                let (b_bytes, b_round) = tensor(&v, true)?; // B = (√S·Vᵀ)ᵀ [cols, r_out]
                crate::factor::DeviceFactors {
                    a_shape: [r_out, rows],
                    a_bytes,
                    b_shape: [cols, r_out],
                    b_bytes,
                    left: mat(a_round, rows, r_out, false),
                    right: mat(b_round, r_out, cols, false),
                    d2h_seconds: d2h_seconds.get(),
                }
            }
        })
    }
}
