//! Host-to-device input streaming for the ΔW kernel: the two checkpoints' bytes are copied
//! from the memory maps into pinned (page-locked) host buffers by all cores, then sent to the
//! device by asynchronous copies on the worker's stream. Two buffers alternate, so the host
//! fills one while the DMA engine drains the other (measured on an H200: pinned 55 GB/s,
//! pageable 6.9 GB/s).

use std::sync::Mutex;
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, DevicePtrMut, PinnedHostSlice};
use rayon::prelude::*;

use super::{Cuda, CudaError, CudaMat};
use crate::backend::{BackendResult, DeltaInput, DeltaStats};

/// Input bytes (base + fine-tune) per chunk: the size of each pinned buffer.
pub(super) const CHUNK_BYTES: usize = 64 << 20;

/// A worker's two pinned buffers and, for each, the event after its last copy to the device.
pub(super) struct Staging {
    host: [PinnedHostSlice<u8>; 2],
    copied: [CudaEvent; 2],
}

/// Allocated on first use (pinned allocation is slow, ~10 ms per 64 MiB) and kept.
pub(super) type StagingSlot = Mutex<Option<Staging>>;

impl Staging {
    fn new(cuda: &Cuda) -> Result<Staging, CudaError> {
        let ctx = cuda.stream.context();
        let blocking = Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC);
        // SAFETY: the buffers are written before any copy reads them (only the prefix each
        // chunk fills is sent).
        let host = unsafe {
            [
                ctx.alloc_pinned::<u8>(CHUNK_BYTES)?,
                ctx.alloc_pinned::<u8>(CHUNK_BYTES)?,
            ]
        };
        Ok(Staging {
            host,
            copied: [ctx.new_event(blocking)?, ctx.new_event(blocking)?],
        })
    }
}

/// Rows of ΔW per chunk: at most CHUNK_BYTES of input, and a multiple of 8 (or of anything
/// when cols is a multiple of 4) so that each chunk's offset in the output keeps the kernel's
/// 16-byte alignment. None: not even one row fits (over 8M columns of bf16 pairs).
pub(super) fn chunk_rows(cols: usize, bytes_per_elem: usize) -> Option<usize> {
    let fit = CHUNK_BYTES / (cols.max(1) * bytes_per_elem.max(1));
    if fit >= 8 {
        Some(fit / 8 * 8)
    } else if fit >= 1 && cols % 4 == 0 {
        Some(fit)
    } else {
        None
    }
}

/// `src` into `dst` by all cores (a single core copies ~10 GB/s, well under the link).
fn parallel_copy(dst: &mut [u8], src: &[u8]) {
    const PIECE: usize = 1 << 20;
    dst.par_chunks_mut(PIECE)
        .zip(src.par_chunks(PIECE))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// What runs on the stream after each chunk's copies: (chunk, first row, elements, base on
/// the device, fine-tune on the device).
type ChunkWork<'a> =
    dyn FnMut(usize, usize, usize, &CudaSlice<u8>, &CudaSlice<u8>) -> Result<(), CudaError> + 'a;

impl Cuda {
    /// Streams both inputs to the device chunk by chunk, through the pinned buffers, and
    /// calls `each(chunk, first_row, elements, base_dev, ft_dev)` after each chunk's copies
    /// are queued (work it queues on the stream sees the chunk). Returns (read, h2d) seconds;
    /// the copies are complete when it returns.
    fn stream_inputs(
        &self,
        input: &DeltaInput<'_>,
        each: &mut ChunkWork<'_>,
    ) -> Result<(f64, f64), CudaError> {
        let (rows, cols) = (input.rows, input.cols);
        let (bs, fs) = (input.base_dtype.size(), input.ft_dtype.size());
        let chunk = chunk_rows(cols, bs + fs)
            .ok_or_else(|| CudaError::TooLarge(format!("a row of {cols} columns")))?
            .min(rows.max(1));
        // SAFETY: device staging, fully written by each chunk's copy before anything reads it.
        let mut base_dev = unsafe { self.stream.alloc::<u8>((chunk * cols * bs).max(1)) }?;
        let mut ft_dev = unsafe { self.stream.alloc::<u8>((chunk * cols * fs).max(1)) }?;
        let mut slot = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Staging::new(self)?);
        }
        let staging = slot.as_mut().expect("allocated above");
        let (mut read_seconds, mut h2d_seconds) = (0.0, 0.0);
        for (c, r0) in (0..rows).step_by(chunk).enumerate() {
            let r1 = (r0 + chunk).min(rows);
            let b_src = &input.base[r0 * cols * bs..r1 * cols * bs];
            let f_src = &input.ft[r0 * cols * fs..r1 * cols * fs];
            let s = c % 2;
            // This buffer's previous copy (two chunks ago) must be done before it is refilled.
            let clock = Instant::now();
            staging.copied[s].synchronize()?;
            h2d_seconds += clock.elapsed().as_secs_f64();
            let clock = Instant::now();
            let host = staging.host[s].as_mut_slice()?;
            let (hb, hf) = host.split_at_mut(b_src.len());
            parallel_copy(hb, b_src);
            parallel_copy(&mut hf[..f_src.len()], f_src);
            read_seconds += clock.elapsed().as_secs_f64();
            // The bytes are in the pinned buffer: the rows' pages may go.
            if let Some(done) = input.rows_read {
                done(r0, r1);
            }
            let host = &staging.host[s].as_mut_slice()?[..];
            // SAFETY: the device buffers hold a whole chunk of each input; the pinned source
            // is not written again until `copied[s]` (recorded right after) has completed.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    base_dev.device_ptr_mut(&self.stream).0,
                    &host[..b_src.len()],
                    self.stream.cu_stream(),
                )?;
                cudarc::driver::result::memcpy_htod_async(
                    ft_dev.device_ptr_mut(&self.stream).0,
                    &host[b_src.len()..b_src.len() + f_src.len()],
                    self.stream.cu_stream(),
                )?;
            }
            staging.copied[s].record(&self.stream)?;
            each(c, r0, (r1 - r0) * cols, &base_dev, &ft_dev)?;
        }
        let clock = Instant::now();
        self.stream.synchronize()?;
        h2d_seconds += clock.elapsed().as_secs_f64();
        Ok((read_seconds, h2d_seconds))
    }

    /// ΔW in f32 on the device, its ‖ΔW‖² and non-finite count, from inputs streamed in.
    pub(super) fn delta_streamed(
        &self,
        input: &DeltaInput<'_>,
    ) -> BackendResult<(CudaMat, DeltaStats)> {
        input.check_sizes()?;
        let (rows, cols) = (input.rows, input.cols);
        let (bs, fs) = (input.base_dtype.size(), input.ft_dtype.size());
        let out = self.alloc(rows * cols)?;
        let out_ptr = out.device_ptr(&self.stream).0;
        // One slot of partial sums per block per chunk: read back once, at the end.
        let chunk = chunk_rows(cols, bs + fs).unwrap_or(1).min(rows.max(1));
        let chunks = rows.div_ceil(chunk).max(1);
        let blocks = self.kernels.grid((chunk * cols).div_ceil(8)).grid_dim.0 as usize;
        let mut part_sum = self.alloc_f64(blocks * chunks)?;
        // SAFETY: every slot read below is written by its chunk's launch.
        let mut part_bad =
            unsafe { self.stream.alloc::<u32>(blocks * chunks) }.map_err(CudaError::from)?;
        let ps0 = part_sum.device_ptr_mut(&self.stream).0;
        let pb0 = part_bad.device_ptr_mut(&self.stream).0;
        let mut used = Vec::with_capacity(chunks);
        let (read_seconds, h2d_seconds) =
            self.stream_inputs(input, &mut |c, r0, n, base_dev, ft_dev| {
                let launched = self.kernels.delta(
                    &self.stream,
                    base_dev,
                    input.base_dtype,
                    ft_dev,
                    input.ft_dtype,
                    out_ptr + (r0 * cols * 4) as u64,
                    n,
                    (
                        ps0 + (c * blocks * 8) as u64,
                        pb0 + (c * blocks * 4) as u64,
                        blocks,
                    ),
                    self.delta_mode,
                )?;
                used.push(launched);
                Ok(())
            })?;
        let sums = self.stream.clone_dtoh(&part_sum).map_err(CudaError::from)?;
        let bad = self.stream.clone_dtoh(&part_bad).map_err(CudaError::from)?;
        // Chunk by chunk, block by block: the same order whatever the timing.
        let mut stats = DeltaStats {
            read_seconds,
            h2d_seconds,
            ..DeltaStats::default()
        };
        for (c, &u) in used.iter().enumerate() {
            let at = c * blocks;
            stats.sumsq += sums[at..at + u].iter().sum::<f64>();
            stats.nonfinite += bad[at..at + u].iter().map(|&x| x as usize).sum::<usize>();
        }
        Ok((
            CudaMat {
                buf: out,
                rows,
                cols,
                transposed: true,
            },
            stats,
        ))
    }

    /// The inputs streamed in and dropped: the input floor.
    pub(super) fn load_streamed(&self, input: &DeltaInput<'_>) -> BackendResult<DeltaStats> {
        input.check_sizes()?;
        let (read_seconds, h2d_seconds) = self.stream_inputs(input, &mut |_, _, _, _, _| Ok(()))?;
        Ok(DeltaStats {
            read_seconds,
            h2d_seconds,
            ..DeltaStats::default()
        })
    }
}
