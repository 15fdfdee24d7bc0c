//! Thin wrappers over the cuSOLVER dense calls the backend uses, all in f64 (the fallback
//! QR, the small eigenproblem and the exact SVD are where accuracy matters more than speed).

use std::sync::Arc;

use cudarc::cusolver::sys::{
    self, cublasFillMode_t, cusolverDeterministicMode_t, cusolverDnHandle_t, cusolverEigMode_t,
};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};

use super::error::{dim, CudaError, SolverCall};

/// Same inputs, same bits (geqrf, syevd and gesvd may otherwise take faster non-deterministic
/// paths): each worker has its own cuBLAS handle and stream too, so a GPU's adapter does not
/// depend on timing (docs/determinism.md).
pub(super) fn deterministic(h: cusolverDnHandle_t) -> Result<(), CudaError> {
    let mode = cusolverDeterministicMode_t::CUSOLVER_DETERMINISTIC_RESULTS;
    // SAFETY: h is a live handle of this worker.
    unsafe { sys::cusolverDnSetDeterministicMode(h, mode) }
        .result()
        .solver("cusolverDnSetDeterministicMode")
}

/// U, s and Vᵀ of a thin SVD, on the device.
pub type SvdBuffers<T> = (CudaSlice<T>, CudaSlice<T>, CudaSlice<T>);

fn info_ok(
    stream: &Arc<CudaStream>,
    info: &CudaSlice<i32>,
    call: &'static str,
) -> Result<(), CudaError> {
    let info = stream.clone_dtoh(info)?[0];
    if info == 0 {
        Ok(())
    } else {
        Err(CudaError::SolverInfo { call, info })
    }
}

/// Eigendecomposition of the symmetric k×k `a` (lower triangle used) in place: on return `a`
/// holds the eigenvectors and `w` the eigenvalues, ascending.
pub fn syevd(
    h: cusolverDnHandle_t,
    stream: &Arc<CudaStream>,
    k: usize,
    a: &mut CudaSlice<f64>,
    w: &mut CudaSlice<f64>,
) -> Result<(), CudaError> {
    let n = dim(k, "syevd n")?;
    let jobz = cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
    let uplo = cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let (ap, _a) = a.device_ptr_mut(stream);
    let (wp, _w) = w.device_ptr_mut(stream);
    let mut lwork = 0;
    // SAFETY: a is k×k, w has k slots; the workspace is sized by the query.
    unsafe {
        sys::cusolverDnDsyevd_bufferSize(h, jobz, uplo, n, ap as _, n, wp as _, &mut lwork)
            .result()
            .solver("cusolverDnDsyevd_bufferSize")?;
        let mut work = stream.alloc_zeros::<f64>(lwork.max(1) as usize)?;
        let mut info = stream.alloc_zeros::<i32>(1)?;
        {
            let (wk, _wk) = work.device_ptr_mut(stream);
            let (ip, _ip) = info.device_ptr_mut(stream);
            sys::cusolverDnDsyevd(
                h, jobz, uplo, n, ap as _, n, wp as _, wk as _, lwork, ip as _,
            )
            .result()
            .solver("cusolverDnDsyevd")?;
        }
        info_ok(stream, &info, "cusolverDnDsyevd")
    }
}

/// Replaces the m×n (m ≥ n) `a` by the Q of its Householder QR.
pub fn householder_q(
    h: cusolverDnHandle_t,
    stream: &Arc<CudaStream>,
    m: usize,
    n: usize,
    a: &mut CudaSlice<f64>,
) -> Result<(), CudaError> {
    let (mi, ni) = (dim(m, "geqrf m")?, dim(n, "geqrf n")?);
    let (ap, _a) = a.device_ptr_mut(stream);
    let mut tau = stream.alloc_zeros::<f64>(n.max(1))?;
    let mut info = stream.alloc_zeros::<i32>(1)?;
    let (tp, _t) = tau.device_ptr_mut(stream);
    let (ip, _i) = info.device_ptr_mut(stream);
    // SAFETY: a is m×n with leading dimension m, tau has n slots; workspaces sized by query.
    unsafe {
        let mut lw = 0;
        sys::cusolverDnDgeqrf_bufferSize(h, mi, ni, ap as _, mi, &mut lw)
            .result()
            .solver("cusolverDnDgeqrf_bufferSize")?;
        let mut lw2 = 0;
        sys::cusolverDnDorgqr_bufferSize(h, mi, ni, ni, ap as _, mi, tp as _, &mut lw2)
            .result()
            .solver("cusolverDnDorgqr_bufferSize")?;
        let lwork = lw.max(lw2).max(1);
        let mut work = stream.alloc_zeros::<f64>(lwork as usize)?;
        let (wk, _wk) = work.device_ptr_mut(stream);
        sys::cusolverDnDgeqrf(h, mi, ni, ap as _, mi, tp as _, wk as _, lwork, ip as _)
            .result()
            .solver("cusolverDnDgeqrf")?;
        sys::cusolverDnDorgqr(h, mi, ni, ni, ap as _, mi, tp as _, wk as _, lwork, ip as _)
            .result()
            .solver("cusolverDnDorgqr")?;
    }
    drop((_a, _t, _i));
    info_ok(stream, &info, "cusolverDnDgeqrf/orgqr")
}

/// Thin SVD of the m×n (m ≥ n) `a` (destroyed): returns (U m×n, s n, Vᵀ n×n).
pub fn gesvd_f64(
    h: cusolverDnHandle_t,
    stream: &Arc<CudaStream>,
    m: usize,
    n: usize,
    a: &mut CudaSlice<f64>,
) -> Result<SvdBuffers<f64>, CudaError> {
    let (mi, ni) = (dim(m, "gesvd m")?, dim(n, "gesvd n")?);
    let mut u = stream.alloc_zeros::<f64>(m * n)?;
    let mut s = stream.alloc_zeros::<f64>(n)?;
    let mut vt = stream.alloc_zeros::<f64>(n * n)?;
    let mut rwork = stream.alloc_zeros::<f64>(n.max(2))?;
    let mut info = stream.alloc_zeros::<i32>(1)?;
    {
        let (ap, _a) = a.device_ptr_mut(stream);
        let (up, _u) = u.device_ptr_mut(stream);
        let (sp, _s) = s.device_ptr_mut(stream);
        let (vp, _v) = vt.device_ptr_mut(stream);
        let (rp, _r) = rwork.device_ptr_mut(stream);
        let (ip, _i) = info.device_ptr_mut(stream);
        // SAFETY: shapes as documented, m ≥ n as gesvd requires; workspace sized by query.
        unsafe {
            let mut lwork = 0;
            sys::cusolverDnDgesvd_bufferSize(h, mi, ni, &mut lwork)
                .result()
                .solver("cusolverDnDgesvd_bufferSize")?;
            let mut work = stream.alloc_zeros::<f64>(lwork.max(1) as usize)?;
            let (wk, _wk) = work.device_ptr_mut(stream);
            sys::cusolverDnDgesvd(
                h, b'S' as _, b'S' as _, mi, ni, ap as _, mi, sp as _, up as _, mi, vp as _, ni,
                wk as _, lwork, rp as _, ip as _,
            )
            .result()
            .solver("cusolverDnDgesvd")?;
        }
    }
    info_ok(stream, &info, "cusolverDnDgesvd")?;
    Ok((u, s, vt))
}

/// Thin SVD of the m×n (m ≥ n) f32 `a` (destroyed): returns (U m×n, s n, Vᵀ n×n).
pub fn gesvd_f32(
    h: cusolverDnHandle_t,
    stream: &Arc<CudaStream>,
    m: usize,
    n: usize,
    a: &mut CudaSlice<f32>,
) -> Result<SvdBuffers<f32>, CudaError> {
    let (mi, ni) = (dim(m, "gesvd m")?, dim(n, "gesvd n")?);
    let mut u = stream.alloc_zeros::<f32>(m * n)?;
    let mut s = stream.alloc_zeros::<f32>(n)?;
    let mut vt = stream.alloc_zeros::<f32>(n * n)?;
    let mut rwork = stream.alloc_zeros::<f32>(n.max(2))?;
    let mut info = stream.alloc_zeros::<i32>(1)?;
    {
        let (ap, _a) = a.device_ptr_mut(stream);
        let (up, _u) = u.device_ptr_mut(stream);
        let (sp, _s) = s.device_ptr_mut(stream);
        let (vp, _v) = vt.device_ptr_mut(stream);
        let (rp, _r) = rwork.device_ptr_mut(stream);
        let (ip, _i) = info.device_ptr_mut(stream);
        // SAFETY: as for gesvd_f64.
        unsafe {
            let mut lwork = 0;
            sys::cusolverDnSgesvd_bufferSize(h, mi, ni, &mut lwork)
                .result()
                .solver("cusolverDnSgesvd_bufferSize")?;
            let mut work = stream.alloc_zeros::<f32>(lwork.max(1) as usize)?;
            let (wk, _wk) = work.device_ptr_mut(stream);
            sys::cusolverDnSgesvd(
                h, b'S' as _, b'S' as _, mi, ni, ap as _, mi, sp as _, up as _, mi, vp as _, ni,
                wk as _, lwork, rp as _, ip as _,
            )
            .result()
            .solver("cusolverDnSgesvd")?;
        }
    }
    info_ok(stream, &info, "cusolverDnSgesvd")?;
    Ok((u, s, vt))
}

/// The cuSOLVER library version, e.g. 12000.
pub fn version() -> Option<i32> {
    let mut v = 0;
    // SAFETY: an out-parameter.
    unsafe { sys::cusolverGetVersion(&mut v) }
        .result()
        .ok()
        .map(|_| v)
}

/// Cholesky G = L·Lᵀ of the symmetric k×k `g` in place (lower triangle), in f32. Returns
/// cuSOLVER's info: 0, or the order of the first minor that is not positive definite.
pub fn potrf_f32(
    h: cusolverDnHandle_t,
    stream: &Arc<CudaStream>,
    k: usize,
    g: &mut CudaSlice<f32>,
) -> Result<i32, CudaError> {
    let n = dim(k, "potrf n")?;
    let uplo = cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let mut info = stream.alloc_zeros::<i32>(1)?;
    {
        let (gp, _g) = g.device_ptr_mut(stream);
        let (ip, _i) = info.device_ptr_mut(stream);
        // SAFETY: g is k×k with leading dimension k; the workspace is sized by the query.
        unsafe {
            let mut lwork = 0;
            sys::cusolverDnSpotrf_bufferSize(h, uplo, n, gp as _, n, &mut lwork)
                .result()
                .solver("cusolverDnSpotrf_bufferSize")?;
            let mut work = stream.alloc_zeros::<f32>(lwork.max(1) as usize)?;
            let (wk, _wk) = work.device_ptr_mut(stream);
            sys::cusolverDnSpotrf(h, uplo, n, gp as _, n, wk as _, lwork, ip as _)
                .result()
                .solver("cusolverDnSpotrf")?;
        }
    }
    Ok(stream.clone_dtoh(&info)?[0])
}
