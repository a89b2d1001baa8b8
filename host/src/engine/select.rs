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

/// `--num_gpus` against what was found: how many devices the job spreads over.
pub fn world_size(device: &Resolved, requested: Option<usize>) -> Result<usize> {
    let usage = |m: String| -> anyhow::Error { crate::cli::UsageError::new(m).into() };
    match device {
        Resolved::Cpu => match requested {
            None | Some(1) => Ok(1),
            Some(n) => Err(usage(format!(
                "--num_gpus {n}: the job runs on the cpu; drop --num_gpus or train on a machine \
                 with GPUs (--device cuda)"
            ))),
        },
        Resolved::Cuda(_) => {
            let visible = visible_gpus()?;
            match requested {
                Some(n) if n > visible => Err(usage(format!(
                    "--num_gpus {n}: only {visible} GPU(s) visible; pass --num_gpus {visible} \
                     or fewer (CUDA_VISIBLE_DEVICES selects which)"
                ))),
                Some(n) => Ok(n),
                None => Ok(visible),
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn visible_gpus() -> Result<usize> {
    super::cuda::replica::device_count()
}

#[cfg(not(feature = "cuda"))]
fn visible_gpus() -> Result<usize> {
    unreachable!("select::resolve gives cuda only in cuda builds")
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

    #[test]
    fn num_gpus_on_the_cpu_is_one_or_a_clear_error() {
        assert_eq!(world_size(&Resolved::Cpu, None).unwrap(), 1);
        assert_eq!(world_size(&Resolved::Cpu, Some(1)).unwrap(), 1);
        let err = world_size(&Resolved::Cpu, Some(2)).unwrap_err().to_string();
        assert!(
            err.starts_with("--num_gpus 2: ") && err.contains("cpu"),
            "{err}"
        );
    }
}
