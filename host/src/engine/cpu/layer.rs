//! One pre-norm decoder layer — forward with the activations its backward needs, and the
//! hand-written backward that chains the block backwards of the sibling modules:
//!
//! ```text
//! n1 = rms(x)·w₁ ; q,k,v = proj(n1) ; [q,k = rms_head(q,k)] ; q,k = rope(q,k)
//! h  = x + o_proj(attn(q,k,v))
//! n2 = rms(h)·w₂ ; out = h + down(silu(gate(n2)) ⊙ up(n2))
//! ```

use anyhow::Result;
use candle_core::Tensor;

use super::attention::{self, AttnCache};
use super::dropout::{self, Site};
use super::linear::{Adapter, Linear, LinearCache};
use super::mlp::{swiglu, swiglu_backward};
use super::norm::{rms_norm, rms_norm_backward};
use super::params::Param;
use super::rope;
use crate::model::ModelConfig;

/// Indices into [`crate::job::PROJECTIONS`].
pub const Q: usize = 0;
pub const K: usize = 1;
pub const V: usize = 2;
pub const O: usize = 3;
pub const GATE: usize = 4;
pub const UP: usize = 5;
pub const DOWN: usize = 6;

/// A projection's bias: frozen base weight or a trainable parameter (index into the params).
#[derive(Debug)]
pub enum BiasSlot {
    Frozen(Tensor),
    Trainable(usize),
}

/// One projection: frozen weight `[out, in]`, optional bias, optional adapter `(A, B)` indices.
#[derive(Debug)]
pub struct Proj {
    pub weight: Tensor,
    pub bias: Option<BiasSlot>,
    pub lora: Option<(usize, usize)>,
}

/// A layer's frozen weights and where its trainable tensors are.
#[derive(Debug)]
pub struct LayerWeights {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    /// Qwen3's per-head q/k RMSNorm weights `[head_dim]`.
    pub qk_norm: Option<(Tensor, Tensor)>,
    /// In [`crate::job::PROJECTIONS`] order.
    pub proj: Vec<Proj>,
}

/// Everything a pass shares across layers.
pub struct PassCtx<'a> {
    pub cfg: &'a ModelConfig,
    pub params: &'a [Param],
    pub lora_scale: f64,
    pub batch: usize,
    pub seq: usize,
    /// `[B, 1, T, head_dim]`.
    pub cos: Tensor,
    pub sin: Tensor,
    /// From [`attention::mask`].
    pub mask: Tensor,
    /// `(seed, p, pass)` when LoRA dropout is active in this pass.
    pub dropout: Option<(u64, f64, u64)>,
}

/// Activations kept from the forward for the backward.
pub struct LayerCache {
    x: Tensor,
    n1: Tensor,
    rstd1: Tensor,
    lin: Vec<LinearCache>,
    /// Pre-norm q/k `[B, T, heads, d]` and their rstd (Qwen3 only).
    q_raw: Option<(Tensor, Tensor)>,
    k_raw: Option<(Tensor, Tensor)>,
    /// Post-RoPE `[B, H, T, d]`, `[B, Hkv, T, d]`, and `v` `[B, Hkv, T, d]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: AttnCache,
    /// o_proj input `[N, H·d]`.
    attn_flat: Tensor,
    h: Tensor,
    n2: Tensor,
    rstd2: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
}

impl LayerWeights {
    fn linear<'a>(&'a self, j: usize, ctx: &'a PassCtx) -> Linear<'a> {
        let p = &self.proj[j];
        Linear {
            weight: &p.weight,
            bias: p.bias.as_ref().map(|b| match b {
                BiasSlot::Frozen(t) => t,
                BiasSlot::Trainable(i) => &ctx.params[*i].tensor,
            }),
            adapter: p.lora.map(|(a, b)| Adapter {
                a: &ctx.params[a].tensor,
                b: &ctx.params[b].tensor,
                scale: ctx.lora_scale,
            }),
        }
    }

    fn dropout_mask(
        &self,
        j: usize,
        layer: usize,
        ctx: &PassCtx,
        x: &Tensor,
    ) -> Result<Option<Tensor>> {
        match ctx.dropout {
            Some((seed, p, pass)) if self.proj[j].lora.is_some() => {
                let (rows, cols) = x.dims2()?;
                let site = Site {
                    pass,
                    layer,
                    module: j,
                };
                Ok(Some(dropout::mask(seed, site, p, rows, cols)?))
            }
            _ => Ok(None),
        }
    }

    fn project(
        &self,
        j: usize,
        layer: usize,
        ctx: &PassCtx,
        x: &Tensor,
    ) -> Result<(Tensor, LinearCache)> {
        let mask = self.dropout_mask(j, layer, ctx, x)?;
        Ok(self.linear(j, ctx).forward(x, mask)?)
    }

    /// Forward of layer `layer` on `x` (`[N, hidden]`); returns the output and the cache.
    pub fn forward(&self, layer: usize, x: &Tensor, ctx: &PassCtx) -> Result<(Tensor, LayerCache)> {
        let mut cache = self.up_to_down(layer, x, ctx)?;
        let (down, cd) = self.project(DOWN, layer, ctx, &cache.act)?;
        cache.lin.push(cd);
        Ok(((&cache.h + down)?, cache))
    }

    /// The cache alone, for a checkpointing recompute: the layer's output is the next layer's
    /// input, already kept, so the down projection computes only its adapter's `x·Aᵀ` (the
    /// backward reads nothing else of it) and skips its frozen matmul.
    pub fn recompute(&self, layer: usize, x: &Tensor, ctx: &PassCtx) -> Result<LayerCache> {
        let mut cache = self.up_to_down(layer, x, ctx)?;
        let mask = self.dropout_mask(DOWN, layer, ctx, &cache.act)?;
        let cd = self.linear(DOWN, ctx).forward_low(&cache.act, mask)?;
        cache.lin.push(cd);
        Ok(cache)
    }

    /// The forward up to the down projection's input (`act`); the cache's `lin` lacks the down
    /// projection's entry.
    fn up_to_down(&self, layer: usize, x: &Tensor, ctx: &PassCtx) -> Result<LayerCache> {
        let cfg = ctx.cfg;
        let (b, t, d) = (ctx.batch, ctx.seq, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let eps = cfg.rms_norm_eps;

        let (n1, rstd1) = rms_norm(x, &self.input_norm, eps)?;
        let (q, cq) = self.project(Q, layer, ctx, &n1)?;
        let (k, ck) = self.project(K, layer, ctx, &n1)?;
        let (v, cv) = self.project(V, layer, ctx, &n1)?;

        let heads = |y: Tensor,
                     n: usize,
                     norm: Option<&Tensor>|
         -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
            let y = y.reshape((b, t, n, d))?;
            let (y, raw) = match norm {
                Some(w) => {
                    let (yn, rstd) = rms_norm(&y, w, eps)?;
                    (yn, Some((y, rstd)))
                }
                None => (y, None),
            };
            Ok((y.transpose(1, 2)?.contiguous()?, raw))
        };
        let (qn, kn) = match &self.qk_norm {
            Some((qw, kw)) => (Some(qw), Some(kw)),
            None => (None, None),
        };
        let (q, q_raw) = heads(q, nh, qn)?;
        let (k, k_raw) = heads(k, nkv, kn)?;
        let (v, _) = heads(v, nkv, None)?;
        let q = rope::apply(&q, &ctx.cos, &ctx.sin)?;
        let k = rope::apply(&k, &ctx.cos, &ctx.sin)?;

        let (o, attn) = attention::forward(&q, &k, &v, &ctx.mask)?;
        let attn_flat = o.transpose(1, 2)?.contiguous()?.reshape((b * t, nh * d))?;
        let (o, co) = self.project(O, layer, ctx, &attn_flat)?;
        let h = (x + o)?;

        let (n2, rstd2) = rms_norm(&h, &self.post_norm, eps)?;
        let (gate, cg) = self.project(GATE, layer, ctx, &n2)?;
        let (up, cu) = self.project(UP, layer, ctx, &n2)?;
        let act = swiglu(&gate, &up)?;

        Ok(LayerCache {
            x: x.clone(),
            n1,
            rstd1,
            lin: vec![cq, ck, cv, co, cg, cu],
            q_raw,
            k_raw,
            q,
            k,
            v,
            attn,
            attn_flat,
            h,
            n2,
            rstd2,
            gate,
            up,
            act,
        })
    }

    /// Backward of one layer: returns `∂L/∂x` (only when `need_dx`; layer 0's input is the frozen
    /// embedding, so it needs none) and appends `(param index, gradient)` pairs to `grads`.
    pub fn backward(
        &self,
        d_out: &Tensor,
        c: &LayerCache,
        ctx: &PassCtx,
        need_dx: bool,
        grads: &mut Vec<(usize, Tensor)>,
    ) -> Result<Option<Tensor>> {
        let cfg = ctx.cfg;
        let (b, t, d) = (ctx.batch, ctx.seq, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);

        let mut lin_back =
            |j: usize, dy: &Tensor, x: &Tensor, need: bool| -> Result<Option<Tensor>> {
                let bias_trainable = matches!(self.proj[j].bias, Some(BiasSlot::Trainable(_)));
                let (dx, g) =
                    self.linear(j, ctx)
                        .backward(dy, x, &c.lin[j], need, bias_trainable)?;
                if let Some(BiasSlot::Trainable(i)) = self.proj[j].bias {
                    grads.push((i, g.bias.expect("bias gradient requested")));
                }
                if let Some((ia, ib)) = self.proj[j].lora {
                    grads.push((ia, g.a.expect("adapter has gradients")));
                    grads.push((ib, g.b.expect("adapter has gradients")));
                }
                Ok(dx)
            };

        // MLP half.
        let d_act = lin_back(DOWN, d_out, &c.act, true)?.expect("dx requested");
        let (d_gate, d_up) = swiglu_backward(&d_act, &c.gate, &c.up)?;
        let dn2 = lin_back(GATE, &d_gate, &c.n2, true)?.expect("dx requested");
        let dn2 = (dn2 + lin_back(UP, &d_up, &c.n2, true)?.expect("dx requested"))?;
        let dh = (d_out + rms_norm_backward(&dn2, &c.h, &self.post_norm, &c.rstd2)?)?;

        // Attention half.
        let d_attn = lin_back(O, &dh, &c.attn_flat, true)?.expect("dx requested");
        let d_o = d_attn
            .reshape((b, t, nh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let (dq, dk, dv) = attention::backward(&d_o, &c.q, &c.k, &c.v, &c.attn)?;
        let unheads = |dy: Tensor,
                       n: usize,
                       raw: &Option<(Tensor, Tensor)>,
                       norm: Option<&Tensor>,
                       rot: bool|
         -> Result<Tensor> {
            let dy = if rot {
                rope::apply_backward(&dy, &ctx.cos, &ctx.sin)?
            } else {
                dy
            };
            let mut dy = dy.transpose(1, 2)?.contiguous()?; // [B, T, n, d]
            if let (Some((y, rstd)), Some(w)) = (raw, norm) {
                dy = rms_norm_backward(&dy, y, w, rstd)?;
            }
            Ok(dy.reshape((b * t, n * d))?)
        };
        let (qn, kn) = match &self.qk_norm {
            Some((qw, kw)) => (Some(qw), Some(kw)),
            None => (None, None),
        };
        let dq = unheads(dq, nh, &c.q_raw, qn, true)?;
        let dk = unheads(dk, nkv, &c.k_raw, kn, true)?;
        let dv = unheads(dv, nkv, &None, None, false)?;
        let dn1q = lin_back(Q, &dq, &c.n1, need_dx)?;
        let dn1k = lin_back(K, &dk, &c.n1, need_dx)?;
        let dn1v = lin_back(V, &dv, &c.n1, need_dx)?;
        if !need_dx {
            return Ok(None);
        }
        let dn1 = ((dn1q.expect("dx requested") + dn1k.expect("dx requested"))?
            + dn1v.expect("dx requested"))?;
        let dx = (dh + rms_norm_backward(&dn1, &c.x, &self.input_norm, &c.rstd1)?)?;
        Ok(Some(dx))
    }
}
