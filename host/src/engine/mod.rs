//! The training step, behind one trait with two implementations (DESIGN.md §2): `cpu` (candle-core,
//! the reference, what CI runs) and `cuda` (feature `cuda`). The training loop in `crate::train`
//! only talks to [`Backend`].

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod optimizer_state;
pub mod parallel;
pub mod select;

use anyhow::{bail, ensure, Result};

/// One micro-batch, laid out row-major as `[batch_size, seq_len]`.
///
/// `targets[i]` is the token the model must predict at position `i` (already shifted by one), or
/// [`IGNORE`] where no loss is taken (prompt tokens with completion-only training, padding, and the
/// last token of each packed sample). Attention is causal and only between positions of the same
/// row with the same `segment_ids` value, so packed samples never see each other.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub targets: Vec<i32>,
    /// Position of each token inside its own sample (restarts at 0 for each packed sample).
    pub position_ids: Vec<u32>,
    /// Which packed sample of its row each token belongs to; padding has its own segment.
    pub segment_ids: Vec<u32>,
}

/// Target value meaning "no loss here" (PyTorch's -100 convention).
pub const IGNORE: i32 = -100;

impl Batch {
    /// Tokens that contribute to the loss.
    pub fn trainable_tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }

    /// Before an engine touches it: every per-token vector has `batch_size·seq_len` entries,
    /// token ids and targets (other than [`IGNORE`]) lie inside a `vocab`-sized vocabulary.
    pub fn check(&self, vocab: usize) -> Result<()> {
        let n = self.batch_size * self.seq_len;
        ensure!(n > 0, "empty batch");
        for (what, len) in [
            ("input_ids", self.input_ids.len()),
            ("targets", self.targets.len()),
            ("position_ids", self.position_ids.len()),
            ("segment_ids", self.segment_ids.len()),
        ] {
            ensure!(
                len == n,
                "batch {what} has {len} entries, expected batch_size·seq_len = {n}"
            );
        }
        if let Some(id) = self.input_ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {id} is outside the model's vocabulary ({vocab}); tokenizer and model do not match");
        }
        if let Some(t) = self
            .targets
            .iter()
            .find(|&&t| t != IGNORE && (t < 0 || t as usize >= vocab))
        {
            bail!("target {t} is outside the model's vocabulary ({vocab}) and is not -100");
        }
        Ok(())
    }
}

/// What one forward(+backward) pass measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PassStats {
    /// Sum of per-token cross-entropy over trainable tokens (not averaged).
    pub loss_sum: f64,
    /// Number of trainable tokens in the batch.
    pub tokens: usize,
}

/// A tensor copied to host memory, for checkpoints and exports.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

/// Device memory a backend has used (GPU backends).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryStats {
    /// The device, for reports ("NVIDIA H200 (sm_90)").
    pub device: String,
    /// Most device memory in use by this backend at once, in bytes (allocations it made,
    /// library workspaces included; the CUDA context itself not).
    pub peak_bytes: u64,
    /// Most bytes held by live allocations at once since loading finished (the memory pool's
    /// high watermark): what `torch.cuda.max_memory_allocated` counts after
    /// `reset_peak_memory_stats`, the figure the Python stacks report.
    pub peak_allocated_bytes: Option<u64>,
    /// The frozen weights are held as NF4 (`--load_in_4bit`, or a pre-quantised base, which
    /// implies it): what the memory figures were measured with.
    pub nf4_base: bool,
}

/// A training backend owns the model's weights, the trainable LoRA (and bias) parameters, their
/// gradients and the optimizer state.
pub trait Backend {
    /// Short name for logs ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// Runs forward and backward on `batch`, adding `loss_scale · ∂(loss_sum)/∂θ` to the
    /// accumulated gradients. The trainer passes `1 / trainable tokens of the whole accumulation
    /// window`, so gradient accumulation is exact, not a mean of per-micro-batch means.
    fn forward_backward(&mut self, batch: &Batch, loss_scale: f32) -> Result<PassStats>;

    /// Forward and backward over a whole accumulation window. One device runs the micro-batches
    /// in order and checks `stop` before each; a data-parallel backend spreads them over its
    /// ranks and sums the gradients. `None`: `stop` said so before the window was done (the
    /// caller abandons the step; the gradients are not applied).
    fn forward_backward_window(
        &mut self,
        window: &[&Batch],
        loss_scale: f32,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<PassStats>> {
        let mut total = PassStats::default();
        for batch in window {
            if stop() {
                return Ok(None);
            }
            let pass = self.forward_backward(batch, loss_scale)?;
            total.loss_sum += pass.loss_sum;
            total.tokens += pass.tokens;
        }
        Ok(Some(total))
    }

    /// Devices an accumulation window is spread over (1 unless data-parallel).
    fn world_size(&self) -> usize {
        1
    }

    /// Forward only (evaluation); gradients are untouched.
    fn eval_loss(&mut self, batch: &Batch) -> Result<PassStats>;

    /// L2 norm of all accumulated gradients.
    fn grad_norm(&mut self) -> Result<f64>;

    /// Applies one optimizer step with learning rate `lr` to gradients multiplied by `grad_scale`
    /// (gradient clipping), then zeroes the gradients.
    fn optimizer_step(&mut self, lr: f64, grad_scale: f64) -> Result<()>;

    /// Trainable parameters by their PEFT names
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), in a fixed order.
    fn export_trainable(&self) -> Result<Vec<(String, HostTensor)>>;

    /// Replaces trainable parameters (resume); names and shapes must match `export_trainable`.
    fn import_trainable(&mut self, params: &[(String, HostTensor)]) -> Result<()>;

    /// Optimizer state as named tensors plus a JSON blob of scalars (step counts), for checkpoints.
    fn export_optimizer(&self) -> Result<(Vec<(String, HostTensor)>, serde_json::Value)>;

    /// Restores what `export_optimizer` produced.
    fn import_optimizer(
        &mut self,
        tensors: &[(String, HostTensor)],
        scalars: &serde_json::Value,
    ) -> Result<()>;

    /// Device memory use, where the backend has a device of its own.
    fn memory_stats(&self) -> Option<MemoryStats> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            batch_size: 2,
            seq_len: 3,
            input_ids: vec![0, 1, 2, 3, 4, 9],
            targets: vec![1, 2, IGNORE, 4, 9, IGNORE],
            position_ids: vec![0, 1, 2, 0, 1, 0],
            segment_ids: vec![0, 0, 0, 0, 0, 1],
        }
    }

    #[test]
    fn batches_are_checked_against_their_shape_and_the_vocabulary() {
        assert!(batch().check(10).is_ok());
        let err = |b: Batch, vocab| b.check(vocab).unwrap_err().to_string();
        assert!(err(batch(), 9).contains("token id 9 is outside the model's vocabulary (9)"));
        let mut b = batch();
        b.input_ids[5] = 0;
        assert!(err(b, 9).contains("target 9 is outside"));
        let mut b = batch();
        b.targets[0] = -1;
        assert!(err(b, 10).contains("target -1"));
        let mut b = batch();
        b.segment_ids.pop();
        assert!(
            err(b, 10).contains("batch segment_ids has 5 entries, expected batch_size·seq_len = 6")
        );
        let b = Batch {
            batch_size: 0,
            ..batch()
        };
        assert!(err(b, 10).contains("empty batch"));
    }
}
