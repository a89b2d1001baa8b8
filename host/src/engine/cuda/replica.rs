//! The cuda engine as one rank of [`DataParallel`](crate::engine::parallel::DataParallel):
//! each rank loads the model onto its own GPU, and the ranks sum gradients with NCCL.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use cudarc::nccl::safe::Id;

use super::CudaBackend;
use crate::engine::parallel::{DataParallel, Replica, ReplicaFactory};
use crate::engine::{Backend, Batch, PassStats};

struct CudaReplica {
    rank: usize,
    world: usize,
    id: Id,
    backend: CudaBackend,
}

impl Replica for CudaReplica {
    fn connect(&mut self) -> Result<()> {
        self.backend.connect(self.rank, self.world, self.id)
    }

    fn shard_pass(
        &mut self,
        batches: &[Batch],
        window_len: usize,
        loss_scale: f32,
    ) -> Result<PassStats> {
        self.backend.shard_pass(batches, window_len, loss_scale)
    }

    fn backend(&mut self) -> &mut dyn Backend {
        &mut self.backend
    }
}

/// GPUs the driver sees.
pub fn device_count() -> Result<usize> {
    cudarc::driver::result::init()
        .and_then(|_| cudarc::driver::result::device::get_count())
        .map(|n| n as usize)
        .map_err(|e| anyhow!("the CUDA driver cannot count GPUs ({e})"))
}

/// Why NCCL cannot be used, if it cannot.
pub fn nccl_missing() -> Option<String> {
    // SAFETY: only dlopens the library to see whether it exists.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        None
    } else {
        Some(
            "libnccl (NVIDIA NCCL, needed for more than one GPU) not found on the library path"
                .into(),
        )
    }
}

/// `world` ranks on GPUs `0..world`, rank `r` built by `build(r)` on GPU `r`.
pub fn data_parallel(
    world: usize,
    build: impl Fn(usize) -> Result<CudaBackend> + Send + Sync + 'static,
) -> Result<DataParallel> {
    if let Some(why) = nccl_missing() {
        return Err(anyhow!("{world} GPUs: {why}; use --num_gpus 1"));
    }
    let id = Id::new().map_err(|e| anyhow!("NCCL: cannot create a communicator id ({e:?})"))?;
    let factory: ReplicaFactory = Arc::new(move |rank| {
        Ok(Box::new(CudaReplica {
            rank,
            world,
            id,
            backend: build(rank)?,
        }) as Box<dyn Replica>)
    });
    DataParallel::spawn("cuda", world, factory)
}
