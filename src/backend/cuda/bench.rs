//! Device-side measurements for `phlora bench`: the ΔW kernel against a device copy.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{kernels, Cuda, CudaError, CudaOptions};

/// The ΔW kernel's speed on device-resident inputs against a device-to-device copy of the same
/// bytes (bytes read + written, per second), measured back to back.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeltaBench {
    pub rows: usize,
    pub cols: usize,
    pub dtype: &'static str,
    /// The mode extract uses.
    pub mode: u32,
    pub kernel_seconds: f64,
    pub kernel_bytes_per_s: f64,
    pub copy_bytes_per_s: f64,
    /// (mode, seconds, bytes per second) for every mode.
    pub modes: Vec<(u32, f64, f64)>,
}

impl Cuda {
    /// Times the ΔW kernel (inputs already on the device) and a copy, `reps` times each after
    /// a warm-up; medians.
    pub fn bench_delta(
        &self,
        rows: usize,
        cols: usize,
        dtype: crate::checkpoint::DType,
        reps: usize,
    ) -> Result<DeltaBench, CudaError> {
        let n = rows * cols;
        let in_bytes = n * dtype.size();
        let mut base = self.stream.alloc_zeros::<u8>(in_bytes)?;
        let mut ft = self.stream.alloc_zeros::<u8>(in_bytes)?;
        // Finite, non-zero inputs (0x3f3f… and 0x4040… are ordinary numbers in every dtype).
        // SAFETY: the memsets cover exactly the allocations.
        unsafe {
            let (b, _b) = base.device_ptr_mut(&self.stream);
            cudarc::driver::result::memset_d8_async(b, 0x3f, in_bytes, self.stream.cu_stream())?;
            let (f, _f) = ft.device_ptr_mut(&self.stream);
            cudarc::driver::result::memset_d8_async(f, 0x40, in_bytes, self.stream.cu_stream())?;
        }
        let out = self.alloc(n)?;
        let out_ptr = out.device_ptr(&self.stream).0;
        let blocks = self.kernels.grid(n.div_ceil(8)).grid_dim.0 as usize;
        let mut part_sum = self.alloc_f64(blocks)?;
        // SAFETY: written by each launch before it is read.
        let mut part_bad = unsafe { self.stream.alloc::<u32>(blocks) }?;
        let partials = (
            part_sum.device_ptr_mut(&self.stream).0,
            part_bad.device_ptr_mut(&self.stream).0,
            blocks,
        );
        let time = |f: &mut dyn FnMut() -> Result<(), CudaError>| -> Result<f64, CudaError> {
            f()?;
            self.sync()?;
            let mut ts = Vec::new();
            for _ in 0..reps.max(1) {
                let t = std::time::Instant::now();
                f()?;
                self.sync()?;
                ts.push(t.elapsed().as_secs_f64());
            }
            ts.sort_by(f64::total_cmp);
            Ok(ts[ts.len() / 2])
        };
        let moved = (2 * in_bytes + 4 * n) as f64;
        let mut modes = Vec::new();
        for mode in 0..4u32 {
            let seconds = time(&mut || {
                self.kernels
                    .delta(
                        &self.stream,
                        &base,
                        dtype,
                        &ft,
                        dtype,
                        out_ptr,
                        n,
                        partials,
                        mode,
                    )
                    .map(|_| ())
            })?;
            modes.push((mode, seconds, moved / seconds));
        }
        let kernel_seconds = modes[self.delta_mode as usize].1;
        // A copy moving as many bytes: read 2·in + write 4n ≈ copy of (2·in + 4n)/2 bytes.
        let copy_bytes = (2 * in_bytes + 4 * n) / 2;
        let src = self.stream.alloc_zeros::<u8>(copy_bytes)?;
        let mut dst = self.stream.alloc_zeros::<u8>(copy_bytes)?;
        let copy_seconds = time(&mut || Ok(self.stream.memcpy_dtod(&src, &mut dst)?))?;
        Ok(DeltaBench {
            rows,
            cols,
            dtype: dtype.as_str(),
            mode: self.delta_mode,
            modes,
            kernel_seconds,
            kernel_bytes_per_s: moved / kernel_seconds,
            copy_bytes_per_s: (2 * copy_bytes) as f64 / copy_seconds,
        })
    }

    /// Changes how the ΔW kernel runs (kernels::DELTA_* bits; tests and benches).
    pub fn set_delta_mode(&mut self, mode: u32) {
        self.delta_mode = mode & (kernels::DELTA_PAIRED | kernels::DELTA_F32_PARTIALS);
    }

    /// Changes how the randomized SVD runs (the bench's variants).
    pub fn set_options(&mut self, options: CudaOptions) {
        self.options = options;
    }
}
