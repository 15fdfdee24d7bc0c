//! What can go wrong on the device, by layer (candle-style nested error).

use cudarc::cublas::result::CublasError;
use cudarc::cusolver::result::CusolverError;
use cudarc::driver::DriverError;
use cudarc::nvrtc::CompileError;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("{0} was not found on the library path (install the NVIDIA driver / CUDA 12 or 13 libraries, or set LD_LIBRARY_PATH)")]
    MissingLibrary(&'static str),
    #[error("{lib} has no {symbol} (too old a CUDA installation?)")]
    MissingSymbol {
        lib: &'static str,
        symbol: &'static str,
    },
    #[error("no CUDA device {ordinal}: {count} device(s) visible")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("NVRTC could not compile {file}: {reason}")]
    Compile { file: &'static str, reason: String },
    #[error("cuBLAS {call}: {source}")]
    Blas {
        call: &'static str,
        source: CublasError,
    },
    #[error("cuSOLVER {call}: {source}")]
    Solver {
        call: &'static str,
        source: CusolverError,
    },
    #[error("cuSOLVER {call} reported info = {info}")]
    SolverInfo { call: &'static str, info: i32 },
    #[error("{0} is too large for the 32-bit sizes of cuBLAS/cuSOLVER")]
    TooLarge(String),
    #[error("the CUDA libraries failed while being probed: {0}")]
    Panicked(String),
    /// Page-locked host memory for the input staging: a host limit, not the device's memory.
    #[error("could not allocate {} of page-locked host memory for the input staging ({source}): the host's locked-memory limit (`ulimit -l`, a container's memlock limit) or free RAM is too low", crate::size::format_size(*bytes as u64))]
    PinnedHost { bytes: usize, source: DriverError },
}

impl CudaError {
    /// An allocation failed on the device (the driver's, cuBLAS's or cuSOLVER's own). A failed
    /// page-locked host allocation is not one: smaller row blocks would not help it.
    pub fn is_out_of_memory(&self) -> bool {
        use cudarc::cublas::sys::cublasStatus_t;
        use cudarc::cusolver::sys::cusolverStatus_t;
        use cudarc::driver::sys::cudaError_enum;
        match self {
            CudaError::Driver(DriverError(code)) => {
                *code == cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY
            }
            CudaError::Blas { source, .. } => {
                source.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED
            }
            CudaError::Solver { source, .. } => {
                source.0 == cusolverStatus_t::CUSOLVER_STATUS_ALLOC_FAILED
            }
            _ => false,
        }
    }

    pub(crate) fn compile(file: &'static str, e: CompileError) -> Self {
        let reason = match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        CudaError::Compile { file, reason }
    }
}

impl From<CudaError> for crate::backend::BackendError {
    fn from(e: CudaError) -> Self {
        if e.is_out_of_memory() {
            crate::backend::BackendError::out_of_memory(e.to_string())
        } else {
            crate::backend::BackendError::new(e.to_string())
        }
    }
}

/// Adds the call's name to a cuBLAS status.
pub(crate) trait BlasCall<T> {
    fn blas(self, call: &'static str) -> Result<T, CudaError>;
}

impl<T> BlasCall<T> for Result<T, CublasError> {
    fn blas(self, call: &'static str) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::Blas { call, source })
    }
}

/// Adds the call's name to a cuSOLVER status.
pub(crate) trait SolverCall<T> {
    fn solver(self, call: &'static str) -> Result<T, CudaError>;
}

impl<T> SolverCall<T> for Result<T, CusolverError> {
    fn solver(self, call: &'static str) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::Solver { call, source })
    }
}

/// A dimension as cuBLAS/cuSOLVER's `int`.
pub(crate) fn dim(n: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(n).map_err(|_| CudaError::TooLarge(format!("{what} = {n}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::cudaError_enum;

    #[test]
    fn only_device_allocations_count_as_out_of_device_memory() {
        let oom = || DriverError(cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY);
        assert!(CudaError::Driver(oom()).is_out_of_memory());
        let pinned = CudaError::PinnedHost {
            bytes: 64 << 20,
            source: oom(),
        };
        // (Formatting a DriverError asks libcuda for its text, so the message is not checked
        // here: only the classification the retry goes by.)
        assert!(!pinned.is_out_of_memory());
    }
}
