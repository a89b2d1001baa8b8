//! Errors of the GPU path.

use cudarc::driver::DriverError;

use crate::arch::GpuArch;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "libnvrtc (CUDA 12 or 13) was not found: install the CUDA runtime libraries or \
         `pip install nvidia-cuda-nvrtc`, and put the directory holding libnvrtc.so.* on \
         LD_LIBRARY_PATH"
    )]
    NvrtcMissing,
    #[error("NVRTC could not compile {module}.cu for {target}:\n{log}")]
    Compile {
        module: &'static str,
        target: String,
        log: String,
    },
    #[error("NVRTC {call} failed: {detail}")]
    Nvrtc { call: &'static str, detail: String },
    #[error("GPU with compute capability {0} is not supported: ferrotune's kernels need sm_80 or newer (A100, RTX 30/40, H100/H200)")]
    UnsupportedArch(GpuArch),
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    /// A launch whose arguments do not fit the kernel's layout contract (a caller bug).
    #[error("{kernel}: {msg}")]
    Shape { kernel: &'static str, msg: String },
}
