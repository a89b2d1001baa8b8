//! `--device auto|cpu|cuda` → the backend that runs the job.
//!
//! `auto` takes the GPU when this build has the cuda engine and a usable GPU is present
//! (driver, runtime compiler and cuBLASLt found, sm_80 or newer), else the cpu; `cuda` without
//! one is an error naming what is missing.

use anyhow::Result;

use crate::cli::choices::Device;

/// Where a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Cpu,
    /// The GPU's description ("NVIDIA H200 (sm_90)").
    Cuda(String),
}

/// Resolves `--device` against this build and machine.
pub fn resolve(requested: Device) -> Result<Resolved> {
    match (requested, gpu()) {
        (Device::Cpu, _) => Ok(Resolved::Cpu),
        (Device::Auto, Ok(name)) | (Device::Cuda, Ok(name)) => Ok(Resolved::Cuda(name)),
        (Device::Auto, Err(why)) => {
            tracing::info!("--device auto: using the cpu ({why})");
            Ok(Resolved::Cpu)
        }
        (Device::Cuda, Err(why)) => Err(crate::cli::UsageError::new(format!(
            "--device cuda: {why}; use --device cpu (or auto) to train on the CPU"
        ))
        .into()),
    }
}

#[cfg(feature = "cuda")]
fn gpu() -> std::result::Result<String, String> {
    super::cuda::probe()
}

#[cfg(not(feature = "cuda"))]
fn gpu() -> std::result::Result<String, String> {
    Err("this ferrotune was built without the cuda engine (cargo feature `cuda`)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available_and_cuda_without_a_gpu_is_a_clear_error() {
        assert_eq!(resolve(Device::Cpu).unwrap(), Resolved::Cpu);
        // CI machines have no GPU; where one exists, both must agree on it.
        match gpu() {
            Err(why) => {
                assert_eq!(resolve(Device::Auto).unwrap(), Resolved::Cpu);
                let err = resolve(Device::Cuda).unwrap_err().to_string();
                assert!(err.contains("--device cuda") && err.contains(&why), "{err}");
            }
            Ok(name) => {
                assert_eq!(resolve(Device::Auto).unwrap(), Resolved::Cuda(name.clone()));
                assert_eq!(resolve(Device::Cuda).unwrap(), Resolved::Cuda(name));
            }
        }
    }
}
