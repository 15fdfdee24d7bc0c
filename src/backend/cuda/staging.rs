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
        // Page-locked host memory is the host's, not the device's: its failure is its own
        // error (ulimit -l, a container's locked-memory limit), never an out-of-memory retry.
        let pinned = || {
            // SAFETY: the buffers are written before any copy reads them (only the prefix
            // each chunk fills is sent).
            unsafe { ctx.alloc_pinned::<u8>(CHUNK_BYTES) }.map_err(|source| CudaError::PinnedHost {
                bytes: CHUNK_BYTES,
                source,
            })
        };
        Ok(Staging {
            host: [pinned()?, pinned()?],
            copied: [ctx.new_event(blocking)?, ctx.new_event(blocking)?],
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The copies read the pinned buffers asynchronously and record `copied`, not the
        // buffers' own events (which cudarc waits on when freeing them): wait here, or the
        // DMA engine could read freed memory.
        for event in &self.copied {
            if let Err(e) = event.synchronize() {
                tracing::warn!("waiting for a staging copy before freeing its buffer: {e}");
            }
        }
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

/// The steps of double-buffered staging, so that their order and the clean-up after an error
/// are written once ([`stage_chunks`]) and tested on the CPU.
pub(super) trait ChunkSteps {
    type Error;
    /// Waits until buffer `slot`'s previous copy to the device has completed.
    fn wait(&mut self, slot: usize) -> Result<(), Self::Error>;
    /// Fills buffer `slot` with rows r0..r1 of both inputs.
    fn fill(&mut self, slot: usize, r0: usize, r1: usize) -> Result<(), Self::Error>;
    /// Queues buffer `slot`'s copies to the device and records its event.
    fn send(&mut self, slot: usize, r0: usize, r1: usize) -> Result<(), Self::Error>;
    /// Queues the work on chunk `c` (rows r0..r1), which reads the device copy.
    fn work(&mut self, c: usize, r0: usize, r1: usize) -> Result<(), Self::Error>;
    /// Waits for everything queued on the stream.
    fn drain(&mut self) -> Result<(), Self::Error>;
}

/// Chunks of `chunk` rows through two alternating buffers. Whatever happens, the stream is
/// drained before this returns: after an error, copies already queued may still be reading a
/// pinned buffer that the caller is about to refill or free.
pub(super) fn stage_chunks<S: ChunkSteps>(
    steps: &mut S,
    rows: usize,
    chunk: usize,
) -> Result<(), S::Error> {
    let mut each = || {
        for (c, r0) in (0..rows).step_by(chunk.max(1)).enumerate() {
            let (r1, slot) = ((r0 + chunk).min(rows), c % 2);
            steps.wait(slot)?;
            steps.fill(slot, r0, r1)?;
            steps.send(slot, r0, r1)?;
            steps.work(c, r0, r1)?;
        }
        Ok(())
    };
    match each() {
        Ok(()) => steps.drain(),
        Err(e) => {
            // The first error is the one to report; a drain failing too adds nothing.
            let _ = steps.drain();
            Err(e)
        }
    }
}

/// What runs on the stream after each chunk's copies: (chunk, first row, elements, base on
/// the device, fine-tune on the device).
type ChunkWork<'a> =
    dyn FnMut(usize, usize, usize, &CudaSlice<u8>, &CudaSlice<u8>) -> Result<(), CudaError> + 'a;

/// One worker's staging of one tensor: the pinned buffers, the device copies, and the timings.
struct Streamed<'a, 'w> {
    cuda: &'a Cuda,
    input: &'a DeltaInput<'a>,
    staging: &'a mut Staging,
    base_dev: CudaSlice<u8>,
    ft_dev: CudaSlice<u8>,
    each: &'a mut ChunkWork<'w>,
    read_seconds: f64,
    h2d_seconds: f64,
}

impl Streamed<'_, '_> {
    fn byte_ranges(
        &self,
        r0: usize,
        r1: usize,
    ) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let cols = self.input.cols;
        let (bs, fs) = (self.input.base_dtype.size(), self.input.ft_dtype.size());
        (
            r0 * cols * bs..r1 * cols * bs,
            r0 * cols * fs..r1 * cols * fs,
        )
    }
}

impl ChunkSteps for Streamed<'_, '_> {
    type Error = CudaError;

    fn wait(&mut self, slot: usize) -> Result<(), CudaError> {
        let clock = Instant::now();
        self.staging.copied[slot].synchronize()?;
        self.h2d_seconds += clock.elapsed().as_secs_f64();
        Ok(())
    }

    fn fill(&mut self, slot: usize, r0: usize, r1: usize) -> Result<(), CudaError> {
        let clock = Instant::now();
        let (b, f) = self.byte_ranges(r0, r1);
        let host = self.staging.host[slot].as_mut_slice()?;
        let (hb, hf) = host.split_at_mut(b.len());
        parallel_copy(hb, &self.input.base[b.clone()]);
        parallel_copy(&mut hf[..f.len()], &self.input.ft[f]);
        self.read_seconds += clock.elapsed().as_secs_f64();
        // The bytes are in the pinned buffer: the rows' pages may go.
        if let Some(done) = self.input.rows_read {
            done(r0, r1);
        }
        Ok(())
    }

    fn send(&mut self, slot: usize, r0: usize, r1: usize) -> Result<(), CudaError> {
        let (b, f) = self.byte_ranges(r0, r1);
        let stream = &self.cuda.stream;
        let host = &self.staging.host[slot].as_mut_slice()?[..];
        // SAFETY: the device buffers hold a whole chunk of each input; the pinned source is not
        // written again until `copied[slot]` (recorded right after) has completed, and not
        // freed before (Staging's Drop, stage_chunks' drain).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                self.base_dev.device_ptr_mut(stream).0,
                &host[..b.len()],
                stream.cu_stream(),
            )?;
            cudarc::driver::result::memcpy_htod_async(
                self.ft_dev.device_ptr_mut(stream).0,
                &host[b.len()..b.len() + f.len()],
                stream.cu_stream(),
            )?;
        }
        self.staging.copied[slot].record(stream)?;
        Ok(())
    }

    fn work(&mut self, c: usize, r0: usize, r1: usize) -> Result<(), CudaError> {
        (self.each)(
            c,
            r0,
            (r1 - r0) * self.input.cols,
            &self.base_dev,
            &self.ft_dev,
        )
    }

    fn drain(&mut self) -> Result<(), CudaError> {
        let clock = Instant::now();
        self.cuda.stream.synchronize()?;
        self.h2d_seconds += clock.elapsed().as_secs_f64();
        Ok(())
    }
}

impl Cuda {
    /// Streams both inputs to the device chunk by chunk, through the pinned buffers, and
    /// calls `each(chunk, first_row, elements, base_dev, ft_dev)` after each chunk's copies
    /// are queued (work it queues on the stream sees the chunk). Returns (read, h2d) seconds;
    /// the copies are complete when it returns, with or without an error.
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
        let base_dev = unsafe { self.stream.alloc::<u8>((chunk * cols * bs).max(1)) }?;
        let ft_dev = unsafe { self.stream.alloc::<u8>((chunk * cols * fs).max(1)) }?;
        let mut slot = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Staging::new(self)?);
        }
        let mut steps = Streamed {
            cuda: self,
            input,
            staging: slot.as_mut().expect("allocated above"),
            base_dev,
            ft_dev,
            each,
            read_seconds: 0.0,
            h2d_seconds: 0.0,
        };
        stage_chunks(&mut steps, rows, chunk)?;
        Ok((steps.read_seconds, steps.h2d_seconds))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the steps; fails at the step named `fail_at` for chunk `fail_chunk`.
    #[derive(Default)]
    struct Script {
        log: Vec<String>,
        fail_at: &'static str,
        fail_chunk: usize,
        chunk: usize,
    }

    impl Script {
        fn step(&mut self, what: &'static str, at: usize) -> Result<(), String> {
            self.log.push(format!("{what} {at}"));
            if what == self.fail_at && self.chunk == self.fail_chunk {
                return Err(format!("{what} failed"));
            }
            Ok(())
        }
    }

    impl ChunkSteps for Script {
        type Error = String;
        fn wait(&mut self, slot: usize) -> Result<(), String> {
            self.step("wait", slot)
        }
        fn fill(&mut self, slot: usize, _: usize, _: usize) -> Result<(), String> {
            self.step("fill", slot)
        }
        fn send(&mut self, slot: usize, _: usize, _: usize) -> Result<(), String> {
            self.step("send", slot)
        }
        fn work(&mut self, c: usize, _: usize, _: usize) -> Result<(), String> {
            let r = self.step("work", c);
            self.chunk += 1;
            r
        }
        fn drain(&mut self) -> Result<(), String> {
            self.log.push("drain".into());
            Ok(())
        }
    }

    #[test]
    fn buffers_alternate_and_each_is_waited_on_before_it_is_refilled() {
        let mut s = Script::default();
        stage_chunks(&mut s, 10, 4).unwrap();
        let want = [
            "wait 0", "fill 0", "send 0", "work 0", "wait 1", "fill 1", "send 1", "work 1",
            "wait 0", "fill 0", "send 0", "work 2", "drain",
        ];
        assert_eq!(s.log, want);
        let mut one = Script::default();
        stage_chunks(&mut one, 3, 8).unwrap();
        assert_eq!(one.log, ["wait 0", "fill 0", "send 0", "work 0", "drain"]);
    }

    #[test]
    fn every_error_after_a_copy_is_queued_drains_the_stream_first() {
        // A failure at any step of any chunk: the error comes back, after one drain, and
        // nothing runs after it.
        for fail_at in ["wait", "fill", "send", "work"] {
            for fail_chunk in 0..3 {
                let mut s = Script {
                    fail_at,
                    fail_chunk,
                    ..Script::default()
                };
                let err = stage_chunks(&mut s, 12, 4).unwrap_err();
                assert_eq!(err, format!("{fail_at} failed"));
                assert_eq!(
                    s.log.last().map(String::as_str),
                    Some("drain"),
                    "{fail_at} {fail_chunk}: {:?}",
                    s.log
                );
                assert_eq!(s.log.iter().filter(|l| *l == "drain").count(), 1);
                let failed = s.log.iter().rposition(|l| l.starts_with(fail_at)).unwrap();
                assert_eq!(
                    failed,
                    s.log.len() - 2,
                    "{fail_at} {fail_chunk}: {:?}",
                    s.log
                );
            }
        }
    }
}
