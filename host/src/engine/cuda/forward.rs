//! A decoder layer's forward, in two halves (attention, MLP) so checkpointing can recompute
//! either alone; the RMSNorm outputs go to one shared `norm` buffer.

use anyhow::Result;
use cudarc::driver::{CudaSlice, DevicePtr};
use ferrotune_kernels::device::bf16;

use super::attention;
use super::buffers::Buffers;
use super::linear::Low;
use super::stacks::Stack;
use super::CudaBackend;

impl CudaBackend {
    /// Layer `l` forward, first half: from its input to its attention output — RMSNorm, q/k/v
    /// (with Qwen3's q/k norm), RoPE, attention. Activations go to `acts[slot]`.
    pub(super) fn attention_half(&mut self, b: &mut Buffers, l: usize, slot: usize) -> Result<()> {
        self.qkv(b, l, slot, Low::Compute)?;
        let a = &mut b.acts[slot];
        let dims = self.dims(b.sizes.batch, b.sizes.seq);
        attention::forward(
            &self.stream,
            &self.kernels,
            &dims,
            (&a.q, &a.k, &a.v),
            (&mut a.attn, &mut a.lse),
            &b.segments,
            &mut b.attn,
        )
    }

    /// Layer `l`'s attention operands into `acts[slot]`: RMSNorm (left in `norm`), q/k/v (with
    /// Qwen3's q/k norm) and RoPE. `Low::Ready`: the q/k/v adapters' `low`s are in place (a
    /// recompute with [`Parked::AttentionOutput`], which parks them but not q/k/v).
    ///
    /// [`Parked::AttentionOutput`]: super::offload::Parked::AttentionOutput
    pub(super) fn qkv(&mut self, b: &mut Buffers, l: usize, slot: usize, low: Low) -> Result<()> {
        let s = self.stream.clone();
        let sz = b.sizes;
        let n = sz.tokens;
        let eps = self.cfg.rms_norm_eps as f32;
        let ptr16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        self.layer_norm(b, l, slot, Norm::Attention)?;
        let a = &mut b.acts[slot];
        let w = &self.layers[l];
        let [q, k, v, ..] = self.linears(l, n, a);
        let (n1, qp, kp, vp) = (ptr16(&b.norm), ptr16(&a.q), ptr16(&a.k), ptr16(&a.v));
        let (nh, nkv, d) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let kern = &self.kernels;
        // Stacked adapters: all three x·Aᵀ in one GEMM, into their side-by-side `low`s.
        let low = match (low, self.stacks.as_ref().filter(|st| st.has(Stack::Qkv))) {
            (Low::Compute, Some(st)) => {
                let low = q.lora.expect("stacked adapters").low;
                let x = (n1, sz.hidden);
                st.lows(&mut self.gemm, (l, Stack::Qkv), n, x, low, 1.0)?;
                Low::Ready
            }
            (low, _) => low,
        };
        // Qwen3: q/k land pre-norm in the extras, and their per-head RMSNorm writes a.q/a.k.
        let qk = match (&w.qk_norm, self.extras.as_mut()) {
            (Some(norms), Some(e)) => Some((norms, &mut e.qk[slot])),
            _ => None,
        };
        let (qo, ko) = match &qk {
            Some((_, x)) => (ptr16(&x.q_raw), ptr16(&x.k_raw)),
            None => (qp, kp),
        };
        q.forward_from(&mut self.gemm, kern, n1, qo, None, low)?;
        k.forward_from(&mut self.gemm, kern, n1, ko, None, low)?;
        v.forward_from(&mut self.gemm, kern, n1, vp, None, low)?;
        if let Some(((qn, kn), x)) = qk {
            // Rows of head_dim: [N, H·d] is [N·H, d].
            kern.rmsnorm_fwd(
                &s,
                &x.q_raw.slice(..),
                &qn.slice(..),
                (&mut a.q.slice_mut(..), d),
                &mut x.rstd_q.slice_mut(..),
                n * nh,
                d,
                eps,
            )?;
            kern.rmsnorm_fwd(
                &s,
                &x.k_raw.slice(..),
                &kn.slice(..),
                (&mut a.k.slice_mut(..), d),
                &mut x.rstd_k.slice_mut(..),
                n * nkv,
                d,
                eps,
            )?;
        }
        self.kernels.rope_apply(
            &s,
            &mut a.q.slice_mut(..),
            sz.qd,
            nh,
            Some((&mut a.k.slice_mut(..), sz.kvd, nkv)),
            &b.cos.slice(..),
            &b.sin.slice(..),
            n,
            d,
            false,
        )?;
        Ok(())
    }

    /// Layer `l`'s o_proj plus the residual: `h = x + o_proj(attn)` (in `acts[slot]`).
    pub(super) fn o_proj(&mut self, b: &mut Buffers, l: usize, slot: usize) -> Result<()> {
        let s = self.stream.clone();
        let ptr16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let x = ptr16(&b.xs[b.x_index(l)]);
        let [.., o, _, _, _] = self.linears(l, b.sizes.tokens, &b.acts[slot]);
        let (attn, h) = (ptr16(&b.acts[slot].attn), ptr16(&b.acts[slot].h));
        o.forward(&mut self.gemm, &self.kernels, attn, h, Some(x))
    }

    /// Layer `l` forward, MLP half: from the residual `h` (in `acts[slot]`) on — RMSNorm,
    /// gate/up, SwiGLU and down_proj, as far as `upto` (see [`MlpUpTo`]).
    pub(super) fn mlp_half(
        &mut self,
        b: &mut Buffers,
        l: usize,
        slot: usize,
        upto: MlpUpTo,
    ) -> Result<()> {
        let s = self.stream.clone();
        let sz = b.sizes;
        let (n, i) = (sz.tokens, sz.inter);
        let ptr16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let y = (upto == MlpUpTo::NextInput).then(|| ptr16(&b.xs[b.x_index(l + 1)]));
        let [.., gate, up, down] = self.linears(l, n, &b.acts[slot]);
        let h = ptr16(&b.acts[slot].h);
        self.layer_norm(b, l, slot, Norm::Mlp)?;
        let (a, norm) = (&b.acts[slot], self.norm2_ptr(b));
        // The parked recompute finds the gate/up adapters' `low`s fetched back; stacked ones
        // are computed in one GEMM (as s·low: the folds read them so).
        let stack = self.stacks.as_ref().filter(|st| st.has(Stack::GateUp));
        let low = match (upto, stack) {
            (MlpUpTo::GateUp, _) => Low::Ready,
            (_, Some(st)) => {
                let low = gate.lora.expect("stacked adapters").low;
                let scale = self.options.lora_scale() as f32;
                let x = (norm, self.norm2_layout().1);
                st.lows(&mut self.gemm, (l, Stack::GateUp), n, x, low, scale)?;
                Low::Ready
            }
            (_, None) => Low::Compute,
        };
        let (g, kr) = (&mut self.gemm, &self.kernels);
        gate.forward_from(g, kr, norm, ptr16(&a.gate), None, low)?;
        up.forward_from(g, kr, norm, ptr16(&a.up), None, low)?;
        if upto == MlpUpTo::GateUp {
            return Ok(());
        }
        self.kernels.swiglu_fwd(
            &s,
            (&a.gate.slice(..), i),
            (&a.up.slice(..), i),
            (&mut b.mlp.slice_mut(..n * i), i),
            n,
            i,
        )?;
        let act = ptr16(&b.mlp);
        match y {
            Some(y) => down.forward(&mut self.gemm, &self.kernels, act, y, Some(h)),
            None => down.forward_low(&mut self.gemm, &self.kernels, act),
        }
    }

    /// Where the MLP's norm output sits in [`Buffers::norm`]: (first column, row stride). With
    /// folded gate/up adapters the rows are `[s·low_gate | x | s·low_up]` ([`Fold`]).
    ///
    /// [`Fold`]: super::linear::Fold
    pub(super) fn norm2_layout(&self) -> (usize, usize) {
        let h = self.cfg.hidden_size;
        self.fold_r.map_or((0, h), |r| (r, h + 2 * r))
    }

    /// Row stride of [`Buffers::dres`]: with folds, `r` spare columns after the hidden ones
    /// hold `s·t` for the o/down input gradients ([`DxTerm::Folded`]).
    ///
    /// [`DxTerm::Folded`]: super::linear::DxTerm::Folded
    pub(super) fn dres_ld(&self) -> usize {
        self.cfg.hidden_size + self.fold_r.unwrap_or(0)
    }

    /// Address of the MLP's norm output (the gate/up input) in [`Buffers::norm`].
    pub(super) fn norm2_ptr(&self, b: &Buffers) -> u64 {
        b.norm.device_ptr(&self.stream).0 + (2 * self.norm2_layout().0) as u64
    }

    /// `norm` ← layer `l`'s first RMSNorm (of its input) or second (of the residual after
    /// attention, `h`, laid out as [`Self::norm2_layout`]), its rstd into `acts[slot]`.
    pub(super) fn layer_norm(
        &self,
        b: &mut Buffers,
        l: usize,
        slot: usize,
        which: Norm,
    ) -> Result<()> {
        let sz = b.sizes;
        let (x, a) = (&b.xs[b.x_index(l)], &mut b.acts[slot]);
        let w = &self.layers[l];
        let (input, weight, rstd, (col, ld)) = match which {
            Norm::Attention => (x, &w.norm1, &mut a.rstd1, (0, sz.hidden)),
            Norm::Mlp => (&a.h, &w.norm2, &mut a.rstd2, self.norm2_layout()),
        };
        self.kernels.rmsnorm_fwd(
            &self.stream,
            &input.slice(..),
            &weight.slice(..),
            (&mut b.norm.slice_mut(col..), ld),
            &mut rstd.slice_mut(..),
            sz.tokens,
            sz.hidden,
            self.cfg.rms_norm_eps as f32,
        )?;
        Ok(())
    }
}

/// How far [`CudaBackend::mlp_half`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MlpUpTo {
    /// The whole MLP into the next layer's input (the forward).
    NextInput,
    /// A checkpointing recompute: the next layer's input is already stored, so the down
    /// projection computes just its adapter's `low` (its frozen GEMM, a sixth of the layer's
    /// forward FLOPs, is skipped).
    DownLow,
    /// A recompute with the residual and the gate/up/down adapters' `low`s parked
    /// ([`Group::Residual`]): only the gate/up outputs the SwiGLU backward reads (which
    /// recomputes the SwiGLU output itself), their frozen GEMMs without the `x·Aᵀ` ones.
    ///
    /// [`Group::Residual`]: super::offload::Group::Residual
    GateUp,
}

/// A decoder layer's two RMSNorms: before attention and before the MLP.
#[derive(Debug, Clone, Copy)]
pub(super) enum Norm {
    Attention,
    Mlp,
}
