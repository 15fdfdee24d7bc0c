//! The device's default memory pool, from which cudarc's stream-ordered allocations
//! (cuMemAllocAsync) come. By default the pool hands freed memory back to the device at every
//! synchronisation, so a multi-GB ΔW would be unmapped and mapped again for each tensor; up to
//! the tensors' share of the device bound is kept instead (the scheduler bounds what is live,
//! so what the pool holds stays near the bound), and it is trimmed before an out-of-memory
//! retry.

use cudarc::driver::sys::{self, CUdevice_attribute, CUmemPool_attribute, CUmemoryPool};
use cudarc::driver::CudaContext;

use super::CudaError;

/// The device's default pool; None when the device has no pools (cudarc then allocates with
/// cuMemAlloc, which caches nothing).
fn default_pool(ctx: &CudaContext) -> Result<Option<CUmemoryPool>, CudaError> {
    ctx.bind_to_thread()?;
    let pools = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)?;
    if pools == 0 {
        return Ok(None);
    }
    let mut pool: CUmemoryPool = std::ptr::null_mut();
    // SAFETY: an out-parameter for the device's own pool.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result()?;
    Ok(Some(pool))
}

/// Keeps up to `bytes` of freed memory in the pool across synchronisations (its release
/// threshold).
pub(super) fn keep_freed_memory(ctx: &CudaContext, bytes: u64) -> Result<(), CudaError> {
    let Some(pool) = default_pool(ctx)? else {
        return Ok(());
    };
    let mut threshold = bytes;
    // SAFETY: the attribute takes a u64 by pointer.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()?;
    Ok(())
}

/// Hands the pool's unused memory back to the device (after the stream is synchronised, so
/// frees queued on it have happened).
pub(super) fn trim(ctx: &CudaContext) -> Result<(), CudaError> {
    if let Some(pool) = default_pool(ctx)? {
        // SAFETY: only unused memory is released; live allocations are untouched.
        unsafe { sys::cuMemPoolTrimTo(pool, 0) }.result()?;
    }
    Ok(())
}

/// The most memory the pool has held at once (bytes), since the process started.
pub(super) fn reserved_high_water(ctx: &CudaContext) -> Result<Option<u64>, CudaError> {
    let Some(pool) = default_pool(ctx)? else {
        return Ok(None);
    };
    let mut high = 0u64;
    // SAFETY: the attribute is a u64 read by pointer.
    unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            (&mut high as *mut u64).cast(),
        )
    }
    .result()?;
    Ok(Some(high))
}
