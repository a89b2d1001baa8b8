//! Summing the LoRA gradients over data-parallel ranks with NCCL, bucketed and overlapped with
//! the backward pass (issue 8).
//!
//! The trainable arena holds the layers' tensors in layer order, so once the backward of layer
//! `l` is done (on a window's last micro-batch) the gradients of layers `l..L` are final and
//! occupy one contiguous range `[start(l), start(l+1)..)`. Each time the final but unsummed
//! tail reaches [`BUCKET_VALUES`] it is all-reduced in place on a communication stream that
//! waits for the compute stream's progress, while the compute stream goes on with the layers
//! below. Whatever lies outside the layers is summed when the pass ends, and the compute stream
//! then waits for the communication stream, so the gradient norm and the optimizer step read
//! the sum.
//!
//! NCCL needs the same collectives in the same order on every rank: the bucket boundaries
//! depend only on the arena layout (identical on all ranks), and a rank with no micro-batch in
//! a window issues exactly the same sequence over its zero gradients ([`GradReducer::reduce_all`]).

use std::ops::Range;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::trainable::Slot;

/// Values per all-reduce (16 MiB of fp32, the order of PyTorch DDP's 25 MB buckets): large
/// enough to run at bus bandwidth, small enough to overlap most of the backward.
pub const BUCKET_VALUES: usize = 4 << 20;

/// Where each layer's gradients start in the arena, and what lies outside the layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    /// Arena offset of layer `l`'s first tensor; `layer_start[L]` is the end of the last layer.
    layer_start: Vec<usize>,
    len: usize,
    /// Overlapping is possible (layers are contiguous and in order in the arena).
    ordered: bool,
}

impl Buckets {
    /// From the arena's slots (in offset order) for a model of `layers` layers, `len` values long.
    pub fn new(slots: &[Slot], layers: usize, len: usize) -> Self {
        let layer_of = |name: &str| -> Option<usize> {
            let rest = name.split("model.layers.").nth(1)?;
            rest.split('.').next()?.parse().ok()
        };
        let mut first: Vec<Option<usize>> = vec![None; layers];
        let mut end = vec![0usize; layers];
        let mut ordered = true;
        let mut last_layer = None;
        let mut outside_after_layers = false;
        for s in slots {
            match layer_of(&s.name) {
                Some(l) if l < layers => {
                    if outside_after_layers || last_layer.is_some_and(|p| l < p) {
                        ordered = false;
                    }
                    last_layer = Some(l);
                    first[l].get_or_insert(s.offset);
                    end[l] = end[l].max(s.offset + s.numel());
                }
                _ => outside_after_layers |= last_layer.is_some(),
            }
        }
        // A layer without trainable tensors starts where the next one does.
        let mut layer_start = vec![0usize; layers + 1];
        layer_start[layers] = end.iter().copied().max().unwrap_or(0);
        for l in (0..layers).rev() {
            layer_start[l] = first[l].unwrap_or(layer_start[l + 1]);
        }
        if layer_start.windows(2).any(|w| w[0] > w[1]) {
            ordered = false;
        }
        Buckets {
            layer_start,
            len,
            ordered,
        }
    }

    /// The ranges summed by the end of layer `l`'s backward, given that `[pending, end of
    /// layers)` is already summed; returns the new `pending`.
    fn after_layer(&self, l: usize, pending: usize, out: &mut Vec<Range<usize>>) -> usize {
        let start = self.layer_start[l];
        if self.ordered && (pending - start >= BUCKET_VALUES || l == 0) && pending > start {
            out.push(start..pending);
            return start;
        }
        pending
    }

    /// What is left once the pass is over.
    fn at_end(&self, pending: usize, out: &mut Vec<Range<usize>>) {
        let layers = self.layer_start.len() - 1;
        let (first, end) = (self.layer_start[0], self.layer_start[layers]);
        if !self.ordered {
            out.push(0..self.len);
            return;
        }
        if pending > first {
            out.push(first..pending);
        }
        if first > 0 {
            out.push(0..first);
        }
        if self.len > end {
            out.push(end..self.len);
        }
    }

    /// The whole sequence of ranges one pass sums, in order (every rank issues these).
    pub fn schedule(&self) -> Vec<Range<usize>> {
        let layers = self.layer_start.len() - 1;
        let mut out = Vec::new();
        let mut pending = self.layer_start[layers];
        for l in (0..layers).rev() {
            pending = self.after_layer(l, pending, &mut out);
        }
        self.at_end(pending, &mut out);
        out
    }
}

/// One rank's NCCL communicator and the bucket state of the current pass.
pub struct GradReducer {
    comm: Comm,
    buckets: Buckets,
    /// Start of the final gradients not yet handed to NCCL in this pass.
    pending: usize,
}

impl GradReducer {
    /// Joins the other ranks (blocks until all `world` have called it with the same `id`).
    pub fn connect(
        compute: &Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: Id,
        buckets: Buckets,
    ) -> Result<Self> {
        let side = compute.context().new_stream()?;
        let comm = Comm::from_rank(side, rank, world, id)
            .map_err(|e| anyhow!("NCCL: rank {rank} of {world} could not join ({e:?})"))?;
        let pending = buckets.layer_start[buckets.layer_start.len() - 1];
        Ok(Self {
            comm,
            buckets,
            pending,
        })
    }

    /// This rank and the number of ranks.
    pub fn rank_of(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.world_size())
    }

    /// Called after layer `l`'s backward of a window's last micro-batch.
    pub fn layer_done(
        &mut self,
        l: usize,
        compute: &CudaStream,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let mut ranges = Vec::new();
        self.pending = self.buckets.after_layer(l, self.pending, &mut ranges);
        self.sum(&ranges, compute, grads)
    }

    /// Called when that pass is over: sums the rest and makes `compute` wait for every sum.
    pub fn pass_done(&mut self, compute: &CudaStream, grads: &mut CudaSlice<f32>) -> Result<()> {
        let mut ranges = Vec::new();
        self.buckets.at_end(self.pending, &mut ranges);
        self.sum(&ranges, compute, grads)?;
        self.pending = self.buckets.layer_start[self.buckets.layer_start.len() - 1];
        compute.wait(&self.comm.stream().record_event(None)?)?;
        Ok(())
    }

    /// For a rank without a micro-batch in this window: the same collectives over its zeros.
    pub fn reduce_all(&mut self, compute: &CudaStream, grads: &mut CudaSlice<f32>) -> Result<()> {
        self.sum(&self.buckets.schedule(), compute, grads)?;
        compute.wait(&self.comm.stream().record_event(None)?)?;
        Ok(())
    }

    fn sum(
        &self,
        ranges: &[Range<usize>],
        compute: &CudaStream,
        grads: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        let side = self.comm.stream();
        side.wait(&compute.record_event(None)?)?;
        for r in ranges {
            let mut view = grads.slice_mut(r.clone());
            self.comm
                .all_reduce_in_place(&mut view, &ReduceOp::Sum)
                .map_err(|e| anyhow!("NCCL all-reduce of the gradients failed ({e:?})"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, offset: usize, n: usize) -> Slot {
        Slot {
            name: name.into(),
            shape: vec![n],
            offset,
            weight_decay: 0.0,
        }
    }

    fn lora(l: usize, offset: usize, n: usize) -> Slot {
        slot(
            &format!("base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight"),
            offset,
            n,
        )
    }

    #[test]
    fn buckets_cover_the_arena_once_from_the_last_layer_down() {
        let big = BUCKET_VALUES / 2;
        // Four layers of `big` values each: two layers per bucket.
        let slots: Vec<Slot> = (0..4).map(|l| lora(l, l * big, big)).collect();
        let b = Buckets::new(&slots, 4, 4 * big + 256);
        assert_eq!(
            b.schedule(),
            vec![2 * big..4 * big, 0..2 * big, 4 * big..4 * big + 256]
        );
    }

    #[test]
    fn out_of_order_arenas_are_summed_in_one_piece_at_the_end() {
        let slots = vec![lora(1, 0, 512), lora(0, 512, 512)];
        let b = Buckets::new(&slots, 2, 1024);
        assert_eq!(b.schedule(), vec![0..1024]);
        // Tensors outside the layers before them are fine; between them they are not.
        let slots = vec![
            slot("lm_head.bias", 0, 256),
            lora(0, 256, 256),
            lora(1, 512, 256),
        ];
        assert_eq!(
            Buckets::new(&slots, 2, 768).schedule(),
            vec![256..768, 0..256]
        );
        let slots = vec![lora(0, 0, 256), slot("x", 256, 256), lora(1, 512, 256)];
        assert_eq!(Buckets::new(&slots, 2, 768).schedule(), vec![0..768]);
    }

    #[test]
    fn small_models_sum_once_after_layer_zero() {
        let slots: Vec<Slot> = (0..3).map(|l| lora(l, l * 256, 256)).collect();
        assert_eq!(Buckets::new(&slots, 3, 768).schedule(), vec![0..768]);
    }
}
