//! Thin wrappers over the cuBLAS calls the backend uses, on raw device pointers.

use cudarc::cublas::sys::{
    self, cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t, cudaDataType_t,
};

use super::error::{dim, BlasCall, CudaError};
use crate::backend::Op;

/// A column-major operand: device pointer, leading dimension, and how it is used.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub ld: usize,
    pub op: Op,
}

fn op(o: Op) -> cublasOperation_t {
    match o {
        Op::N => cublasOperation_t::CUBLAS_OP_N,
        Op::T => cublasOperation_t::CUBLAS_OP_T,
    }
}

/// C (m×n, leading dimension ldc) = alpha·op(A)·op(B) + beta·C in f32 storage; `tf32` lets
/// the tensor cores round the inputs to TF32 (10-bit mantissa), else plain f32 FMA.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    handle: cublasHandle_t,
    tf32: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Operand,
    b: Operand,
    beta: f32,
    c: u64,
    ldc: usize,
) -> Result<(), CudaError> {
    let compute = if tf32 {
        cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    // SAFETY: the caller's pointers address matrices of these shapes and leading dimensions on
    // the handle's device; alpha and beta are host scalars (the default pointer mode).
    unsafe {
        cudarc::cublas::result::gemm_ex(
            handle,
            op(a.op),
            op(b.op),
            dim(m, "gemm m")?,
            dim(n, "gemm n")?,
            dim(k, "gemm k")?,
            (&alpha as *const f32).cast(),
            a.ptr as *const _,
            cudaDataType_t::CUDA_R_32F,
            dim(a.ld.max(1), "lda")?,
            b.ptr as *const _,
            cudaDataType_t::CUDA_R_32F,
            dim(b.ld.max(1), "ldb")?,
            (&beta as *const f32).cast(),
            c as *mut _,
            cudaDataType_t::CUDA_R_32F,
            dim(ldc.max(1), "ldc")?,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .blas("cublasGemmEx")
}

/// C (m×n) = op(A)·op(B) in f64.
pub fn dgemm(
    handle: cublasHandle_t,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: u64,
    ldc: usize,
) -> Result<(), CudaError> {
    let (alpha, beta) = (1.0f64, 0.0f64);
    // SAFETY: as for sgemm.
    unsafe {
        sys::cublasDgemm_v2(
            handle,
            op(a.op),
            op(b.op),
            dim(m, "gemm m")?,
            dim(n, "gemm n")?,
            dim(k, "gemm k")?,
            &alpha,
            a.ptr as *const f64,
            dim(a.ld.max(1), "lda")?,
            b.ptr as *const f64,
            dim(b.ld.max(1), "ldb")?,
            &beta,
            c as *mut f64,
            dim(ldc.max(1), "ldc")?,
        )
        .result()
    }
    .blas("cublasDgemm")
}

/// dst (cols×rows, contiguous) = srcᵀ, src rows×cols contiguous, in f32.
pub fn transpose_f32(
    handle: cublasHandle_t,
    rows: usize,
    cols: usize,
    src: u64,
    dst: u64,
) -> Result<(), CudaError> {
    let (one, zero) = (1.0f32, 0.0f32);
    // SAFETY: src holds rows·cols f32, dst has room for as many; B is unused (beta = 0) but
    // must be a valid pointer, so src is passed again with a leading dimension that fits.
    unsafe {
        sys::cublasSgeam(
            handle,
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            dim(cols, "geam m")?,
            dim(rows, "geam n")?,
            &one,
            src as *const f32,
            dim(rows.max(1), "lda")?,
            &zero,
            dst as *const f32,
            dim(cols.max(1), "ldb")?,
            dst as *mut f32,
            dim(cols.max(1), "ldc")?,
        )
        .result()
    }
    .blas("cublasSgeam")
}

/// dst (cols×rows, contiguous) = srcᵀ in f64.
pub fn transpose_f64(
    handle: cublasHandle_t,
    rows: usize,
    cols: usize,
    src: u64,
    dst: u64,
) -> Result<(), CudaError> {
    let (one, zero) = (1.0f64, 0.0f64);
    // SAFETY: as for transpose_f32.
    unsafe {
        sys::cublasDgeam(
            handle,
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            dim(cols, "geam m")?,
            dim(rows, "geam n")?,
            &one,
            src as *const f64,
            dim(rows.max(1), "lda")?,
            &zero,
            dst as *const f64,
            dim(cols.max(1), "ldb")?,
            dst as *mut f64,
            dim(cols.max(1), "ldc")?,
        )
        .result()
    }
    .blas("cublasDgeam")
}

/// C (m×n, leading dimension ldc) = alpha·op(A) + beta·op(B) in f32 (cublasSgeam): row
/// blocks, stacking and sums of matrices without leaving the device. With beta = 0, B is not
/// read; pass C as B (op N, ld ldc), the in-place form cuBLAS allows.
#[allow(clippy::too_many_arguments)]
pub fn geam(
    handle: cublasHandle_t,
    (m, n): (usize, usize),
    alpha: f32,
    a: Operand,
    beta: f32,
    b: Operand,
    c: u64,
    ldc: usize,
) -> Result<(), CudaError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: the caller's pointers address matrices of these shapes and leading dimensions on
    // the handle's device; alpha and beta are host scalars.
    unsafe {
        sys::cublasSgeam(
            handle,
            op(a.op),
            op(b.op),
            dim(m, "geam m")?,
            dim(n, "geam n")?,
            &alpha,
            a.ptr as *const f32,
            dim(a.ld.max(1), "lda")?,
            &beta,
            b.ptr as *const f32,
            dim(b.ld.max(1), "ldb")?,
            c as *mut f32,
            dim(ldc.max(1), "ldc")?,
        )
        .result()
    }
    .blas("cublasSgeam")
}

/// The cuBLAS library version, e.g. 130001.
pub fn version(handle: cublasHandle_t) -> Option<i32> {
    let mut v = 0;
    // SAFETY: a live handle and an out-parameter.
    unsafe { sys::cublasGetVersion_v2(handle, &mut v) }
        .result()
        .ok()
        .map(|_| v)
}

/// Y (m×k, contiguous) ← Y·L⁻ᵀ in place, L the lower triangle of a k×k matrix (the
/// Cholesky-QR step: Y = Q·Lᵀ).
pub fn solve_right_lower_transposed(
    handle: cublasHandle_t,
    m: usize,
    k: usize,
    l: u64,
    y: u64,
) -> Result<(), CudaError> {
    let one = 1.0f32;
    // SAFETY: l holds k×k f32 (leading dimension k), y holds m×k (leading dimension m).
    unsafe {
        sys::cublasStrsm_v2(
            handle,
            sys::cublasSideMode_t::CUBLAS_SIDE_RIGHT,
            sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
            cublasOperation_t::CUBLAS_OP_T,
            sys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
            dim(m, "trsm m")?,
            dim(k, "trsm n")?,
            &one,
            l as *const f32,
            dim(k.max(1), "lda")?,
            y as *mut f32,
            dim(m.max(1), "ldb")?,
        )
        .result()
    }
    .blas("cublasStrsm")
}

/// y[i] = x[i·stride] for i < n (a matrix diagonal, with stride = rows + 1).
pub fn strided_copy(
    handle: cublasHandle_t,
    n: usize,
    x: u64,
    stride: usize,
    y: u64,
) -> Result<(), CudaError> {
    // SAFETY: x holds at least (n − 1)·stride + 1 f32, y holds n.
    unsafe {
        sys::cublasScopy_v2(
            handle,
            dim(n, "copy n")?,
            x as *const f32,
            dim(stride, "incx")?,
            y as *mut f32,
            1,
        )
        .result()
    }
    .blas("cublasScopy")
}
