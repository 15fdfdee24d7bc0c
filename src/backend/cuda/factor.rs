//! One LoRA factor on the device: a matrix's leading columns scaled by √S, cast to the output
//! dtype and laid out as a PEFT tensor by one kernel; only the encoded bytes come back to the
//! host. Which factor is which (PEFT's layouts) is `crate::factor`'s business.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{Cuda, CudaError, CudaMat};
use crate::backend::{BackendError, BackendResult};
use crate::checkpoint::DType;

/// A factor tensor as written, and the same rounded values kept on the device.
pub struct EncodedFactor {
    /// The row-major tensor's bytes in the output dtype.
    pub bytes: Vec<u8>,
    /// M = src[:, :r]·diag(scale), zero-padded to len×r_out, rounded through the dtype.
    pub rounded: CudaMat,
    /// Seconds spent copying the bytes back to the host.
    pub d2h_seconds: f64,
}

impl CudaMat {
    /// The transpose, as a view of the same storage.
    pub fn transpose(self) -> CudaMat {
        CudaMat {
            rows: self.cols,
            cols: self.rows,
            transposed: !self.transposed,
            ..self
        }
    }
}

impl Cuda {
    /// M = src[:, :r]·diag(scale) (src len×r, plain; r = scale.len() ≤ r_out), zero-padded
    /// to r_out columns and rounded through `dtype`, encoded as the row-major tensor Mᵀ
    /// [r_out, len] (`transpose_out` false) or M [len, r_out] (true).
    pub fn encode_scaled(
        &self,
        src: &CudaMat,
        scale: &[f32],
        r_out: usize,
        transpose_out: bool,
        dtype: DType,
    ) -> BackendResult<EncodedFactor> {
        let r = scale.len();
        if r > r_out || src.cols != r || src.transposed {
            return Err(BackendError::new(format!(
                "factor: a plain {}×{} matrix with {r} scales does not fit rank {r_out}",
                src.rows, src.cols
            )));
        }
        let scale: CudaSlice<f32> = self
            .stream
            .clone_htod(if scale.is_empty() {
                &[0.0f32][..]
            } else {
                scale
            })
            .map_err(CudaError::from)?;
        let n = src.rows * r_out;
        // SAFETY: fully written by the kernel (n elements of each).
        let mut bits = unsafe { self.stream.alloc::<u8>((n * dtype.size()).max(1)) }
            .map_err(CudaError::from)?;
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
        self.stream.synchronize().map_err(CudaError::from)?;
        let clock = std::time::Instant::now();
        let mut bytes = self.stream.clone_dtoh(&bits).map_err(CudaError::from)?;
        let d2h_seconds = clock.elapsed().as_secs_f64();
        bytes.truncate(n * dtype.size());
        // The row-major [r_out, len] tensor is the column-major storage of M (len×r_out), the
        // row-major [len, r_out] one that of Mᵀ.
        Ok(EncodedFactor {
            bytes,
            rounded: CudaMat {
                buf: rounded,
                rows: src.rows,
                cols: r_out,
                transposed: transpose_out,
            },
            d2h_seconds,
        })
    }
}
