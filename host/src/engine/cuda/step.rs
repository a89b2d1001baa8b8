//! One pass over a batch: the buffers for its shape, the layer schedule forward and backward,
//! and where checkpointing recomputes and the offload parks and fetches.

use anyhow::Result;
use cudarc::driver::CudaEvent;
use ferrotune_kernels::device::{CopyJob, CopyTable};

use super::buffers::{Buffers, Sizes};
use super::extras::{Extras, Needs};
use super::forward::MlpUpTo;
use super::linear::{self, Linear, Low};
use super::offload::{Group, Parked};
use super::{oom, pool, BiasWeight, CudaBackend};
use crate::engine::{Batch, PassStats};

impl CudaBackend {
    /// The device buffers of one batch shape: activations, gradients and the optional extras.
    fn allocate(&mut self, sizes: Sizes, batch: &Batch) -> Result<()> {
        let dims = self.dims(batch.batch_size, batch.seq_len);
        let keep_all = !self.options.gradient_checkpointing;
        self.bufs = Some(Buffers::new(
            &self.stream,
            sizes,
            self.cfg.num_hidden_layers,
            keep_all,
            self.offload.is_some(),
            &dims,
        )?);
        let needs = Needs {
            dropout: self.options.lora_dropout > 0.0,
            bias_grads: self.layers.iter().any(|w| {
                w.bias
                    .iter()
                    .any(|b| matches!(b, Some(BiasWeight::Trainable(_))))
            }),
            qk_norm: self.cfg.qk_norm,
        };
        let slots = if keep_all {
            self.cfg.num_hidden_layers
        } else {
            1
        };
        let heads = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        self.extras = Some(Extras::new(&self.stream, &sizes, heads, slots, needs)?);
        Ok(())
    }

    /// Buffers for this batch shape (reallocated only when the shape changes); a shape that
    /// does not fit fails with the flags that lower the need ([`oom::batch`]).
    fn prepare(&mut self, batch: &Batch) -> Result<()> {
        let sizes = Sizes::new(&self.cfg, batch.batch_size, batch.seq_len, self.options.r);
        if self.bufs.as_ref().map(|b| b.sizes) != Some(sizes) {
            let previous = self.bufs.take().and_then(|b| b.offload);
            self.extras = None;
            if let Err(e) = self.allocate(sizes, batch) {
                // What the model, adapters and optimizer hold without this shape's buffers.
                (self.bufs, self.extras) = (None, None);
                let held = self
                    .stream
                    .synchronize()
                    .ok()
                    .and_then(|()| pool::used_now(&self.ctx).ok().map(|bytes| bytes as usize));
                let memory = oom::BatchMemory {
                    batch: batch.batch_size,
                    seq: batch.seq_len,
                    free_at_start: self.free_at_start,
                    held,
                    checkpointing: self.options.gradient_checkpointing,
                    load_in_4bit: self.nf4.is_some(),
                };
                return Err(oom::batch(e, &memory));
            }
            if let Some(wanted) = self.offload {
                let b = self.bufs.as_ref().expect("just allocated");
                let offload = self.offload_buffers(b, wanted, previous)?;
                self.bufs.as_mut().expect("just allocated").offload = Some(offload);
            }
        }
        let b = self.bufs.as_mut().expect("just allocated");
        let s = &self.stream;
        s.memcpy_htod(&batch.input_ids, &mut b.ids)?;
        s.memcpy_htod(&batch.position_ids, &mut b.positions)?;
        s.memcpy_htod(&batch.segment_ids, &mut b.segments)?;
        s.memcpy_htod(&batch.targets, &mut b.targets)?;
        self.kernels.rope_cos_sin(
            s,
            &b.positions.slice(..),
            &self.inv_freq.slice(..),
            &mut b.cos.slice_mut(..),
            &mut b.sin.slice_mut(..),
        )?;
        Ok(())
    }

    pub(super) fn pass(&mut self, batch: &Batch, loss_scale: Option<f32>) -> Result<PassStats> {
        batch.check(self.cfg.vocab_size)?;
        self.prepare(batch)?;
        let train = loss_scale.is_some();
        self.dropout_pass = (train && self.options.lora_dropout > 0.0).then_some(self.passes);
        let mut bufs = self.bufs.take().expect("prepared");
        let result = self.pass_in(&mut bufs, loss_scale);
        self.bufs = Some(bufs);
        self.dropout_pass = None;
        if train && result.is_ok() {
            self.passes += 1;
        }
        let loss_sum = result?;
        self.sample_memory()?;
        Ok(PassStats {
            loss_sum,
            tokens: batch.trainable_tokens(),
        })
    }

    fn pass_in(&mut self, b: &mut Buffers, loss_scale: Option<f32>) -> Result<f64> {
        let layers = self.cfg.num_hidden_layers;
        // Folded bf16 weights and the stacks take the adapters' current A and B (NF4 weights
        // at each dequantisation), in one launch.
        if self.fold_r.is_some() {
            if self.refresh.is_none() {
                self.refresh = Some(self.refresh_table(b)?);
            }
            let table = self.refresh.as_ref().expect("built above");
            self.kernels.copy_rows_batch(&self.stream, table)?;
        }
        let train = loss_scale.is_some();
        let keep_all = train && !self.options.gradient_checkpointing;
        let parked = b.offload.as_ref().filter(|_| train).map(|o| o.parked);
        let attention_groups = parked.and_then(Parked::attention_groups);
        let attention_parked = attention_groups.is_some();
        let x0 = b.x_index(0);
        self.kernels.embedding_gather(
            &self.stream,
            &b.ids.slice(..),
            &self.embed.slice(..),
            &mut b.xs[x0].slice_mut(..),
            self.cfg.hidden_size,
        )?;
        // Offload: layer l's input goes out right after it is produced; layer l then writes
        // its output over layer l-1's input, which must have reached the host by then. With the
        // attention parked too, its results go out after the layer's attention (the next
        // layer waits for them before its attention overwrites them) and the residual with
        // o_proj's and down's `x·Aᵀ` after the MLP (awaited before the next layer's o_proj).
        // The last layer parks nothing: its backward comes first and finds everything still on
        // the GPU.
        let (mut input_out, mut attention_out, mut residual_out): (
            Option<CudaEvent>,
            Option<CudaEvent>,
            Option<CudaEvent>,
        ) = (None, None, None);
        for l in 0..layers {
            let slot = if keep_all { l } else { 0 };
            let last = l + 1 == layers;
            if parked.is_some() {
                // The previous layer's copies, awaited after this layer's input is sent off.
                let earlier = [input_out.take(), attention_out.take()];
                if !last {
                    input_out = Some(self.park(b, l, &[Group::Input])?);
                }
                for done in earlier.into_iter().flatten() {
                    self.stream.wait(&done)?;
                }
            }
            self.attention_half(b, l, slot)?;
            if let (Some(groups), false) = (&attention_groups, last) {
                attention_out = Some(self.park(b, l, groups)?);
            }
            if let Some(done) = residual_out.take() {
                self.stream.wait(&done)?;
            }
            self.o_proj(b, l, slot)?;
            self.mlp_half(b, l, slot, MlpUpTo::NextInput)?;
            if attention_parked && !last {
                residual_out = Some(self.park(b, l, &[Group::Residual])?);
            }
        }
        let loss = self.head(b, loss_scale)?;
        if train {
            // Offload: each layer's backward fetches the layer below's input as it starts (into
            // the xs buffer it no longer needs); with the attention parked, the residual and
            // the o/down lows after its MLP backward (their last reader), the attention output and
            // operands right after its attention backward (their buffers are dead from there)
            // and the q/k/v lows at its end. Each is awaited right before its first read: the
            // residual by the recompute, which then starts at the second RMSNorm.
            let mut input_in: Option<CudaEvent> = None;
            let (mut residual_in, mut output_in, mut operands_in, mut lows_in) =
                (None, None, None, None);
            for l in (0..layers).rev() {
                if parked.is_some() {
                    if let Some(ready) = input_in.take() {
                        self.stream.wait(&ready)?;
                    }
                    if l > 0 {
                        input_in = Some(self.fetch(b, l - 1, &[Group::Input])?);
                    }
                }
                let slot = if keep_all { l } else { 0 };
                // Checkpointing recomputes each layer before its backward, except the last: the
                // head touches none of its activations, they are still the forward's. With the
                // residual parked (and down's `low` with it), down's backward needs nothing the
                // recompute writes and goes first, so the recompute's last NF4 dequantisation,
                // up's, is still in the buffer for up's backward.
                let recompute = !keep_all && l + 1 < layers;
                let up_ready = recompute && attention_parked;
                let t_down = if up_ready {
                    if let Some(ready) = residual_in.take() {
                        self.stream.wait(&ready)?;
                    }
                    let t_down = self.down_backward(b, l, slot)?;
                    self.mlp_half(b, l, 0, MlpUpTo::GateUp)?;
                    t_down
                } else {
                    if recompute {
                        self.attention_half(b, l, 0)?;
                        self.o_proj(b, l, 0)?;
                        self.mlp_half(b, l, 0, MlpUpTo::DownLow)?;
                    }
                    self.down_backward(b, l, slot)?
                };
                // o_proj's dA reads the attention output at the end of the MLP backward.
                if let Some(ready) = output_in.take() {
                    self.stream.wait(&ready)?;
                }
                // `norm` still holds this layer's second norm output when its recompute ran
                // last, or its forward (the last layer; the head writes `hn`).
                let norm2_current = !keep_all || l + 1 == layers;
                self.mlp_half_backward(b, l, slot, norm2_current, t_down, up_ready)?;
                if attention_parked && l > 0 {
                    residual_in = Some(self.fetch(b, l - 1, &[Group::Residual])?);
                }
                for ready in [operands_in.take(), lows_in.take()].into_iter().flatten() {
                    self.stream.wait(&ready)?;
                }
                // Parked without q/k/v: they are recomputed from the input and the fetched
                // `low`s, leaving n1 in `norm` for the q/k/v backward.
                let qkv_recomputed = up_ready && parked.is_some_and(Parked::recomputes_qkv);
                if qkv_recomputed {
                    self.qkv(b, l, 0, Low::Ready)?;
                }
                self.attention_backward(b, slot)?;
                let below = attention_groups.filter(|_| l > 0);
                if let Some([output, operands, _]) = below {
                    output_in = Some(self.fetch(b, l - 1, &[output])?);
                    operands_in = Some(self.fetch(b, l - 1, &[operands])?);
                }
                self.qkv_backward(b, l, slot, qkv_recomputed)?;
                if let Some([_, _, lows]) = below {
                    lows_in = Some(self.fetch(b, l - 1, &[lows])?);
                }
                if self.reduce_in_pass {
                    if let Some(r) = self.reducer.as_mut() {
                        r.layer_done(l, &self.stream, &mut self.train.grads)?;
                    }
                }
            }
        }
        Ok(loss)
    }

    /// Every copy [`Self::pass_in`] refreshes before a pass: the folds of the bf16 weights
    /// ([`Linear::fold_copies`]) and the stacks.
    fn refresh_table(&self, b: &Buffers) -> Result<CopyTable> {
        let mut jobs = Vec::new();
        for l in 0..self.cfg.num_hidden_layers {
            let linears = self.linears(l, b.sizes.tokens, &b.acts[0]);
            let mut copies: Vec<linear::RowCopy> = linears
                .iter()
                .filter(|lin| lin.nf4.is_none())
                .flat_map(Linear::fold_copies)
                .collect();
            if let Some(st) = &self.stacks {
                let a_of = |j: usize| linears[j].lora.expect("stacked adapters").a;
                copies.extend(st.copies(&self.stream, l, a_of));
            }
            for c in copies {
                jobs.push(CopyJob::new(c.dst, c.src, c.cols, c.rows)?);
            }
        }
        // SAFETY: the jobs address the weight buffers, the trainable shadows and the stacks,
        // which live (unmoved) as long as the backend that owns this table.
        Ok(unsafe { CopyTable::new(&self.stream, &jobs)? })
    }
}
