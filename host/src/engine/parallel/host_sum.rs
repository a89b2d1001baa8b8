//! A data-parallel replica of the cpu engine whose gradient sum runs in host memory: what the
//! CPU-only tests use to check the sharding, the loss normalisation and checkpoint/resume
//! across rank counts, with the same [`DataParallel`](super::DataParallel) driver the GPUs use.

use std::sync::{Arc, Barrier, Mutex};

use anyhow::Result;

use super::Replica;
use crate::engine::cpu::CpuBackend;
use crate::engine::{Backend, Batch, PassStats};

/// The rendezvous of `world` ranks.
pub struct HostSum {
    barrier: Barrier,
    /// Each rank's flattened gradients, by rank.
    slots: Mutex<Vec<Vec<f32>>>,
}

impl HostSum {
    pub fn new(world: usize) -> Arc<Self> {
        Arc::new(Self {
            barrier: Barrier::new(world),
            slots: Mutex::new(vec![Vec::new(); world]),
        })
    }

    /// Replaces `grads` by the sum over ranks, added in rank order so every rank gets the
    /// same bits.
    pub fn all_reduce(&self, rank: usize, grads: &mut [&mut Vec<f32>]) {
        self.slots.lock().unwrap()[rank] = grads.iter().flat_map(|g| g.iter().copied()).collect();
        self.barrier.wait();
        let sum: Vec<f32> = {
            let slots = self.slots.lock().unwrap();
            let mut sum = vec![0.0f32; slots[0].len()];
            for slot in slots.iter() {
                sum.iter_mut().zip(slot).for_each(|(s, g)| *s += g);
            }
            sum
        };
        // Nobody may overwrite a slot before every rank has read them all.
        self.barrier.wait();
        let mut at = 0;
        for g in grads.iter_mut() {
            let n = g.len();
            g.copy_from_slice(&sum[at..at + n]);
            at += n;
        }
    }
}

pub struct CpuReplica {
    pub rank: usize,
    pub backend: CpuBackend,
    pub sum: Arc<HostSum>,
}

impl Replica for CpuReplica {
    fn shard_pass(
        &mut self,
        batches: &[Batch],
        _window_len: usize,
        loss_scale: f32,
    ) -> Result<PassStats> {
        let mut total = PassStats::default();
        for batch in batches {
            let pass = self.backend.forward_backward(batch, loss_scale)?;
            total.loss_sum += pass.loss_sum;
            total.tokens += pass.tokens;
        }
        let mut grads: Vec<&mut Vec<f32>> = self.backend.gradients_mut().collect();
        self.sum.all_reduce(self.rank, &mut grads);
        Ok(total)
    }

    fn backend(&mut self) -> &mut dyn Backend {
        &mut self.backend
    }
}
