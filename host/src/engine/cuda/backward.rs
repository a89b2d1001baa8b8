//! A decoder layer's backward, hand-written: the MLP half (down, SwiGLU, gate/up, the second
//! RMSNorm, o_proj), the attention, then RoPE, q/k/v and the first RMSNorm into the residual
//! gradient `dres`.

use anyhow::Result;
use cudarc::driver::{CudaSlice, DevicePtr};
use ferrotune_kernels::device::bf16;

use super::attention;
use super::buffers::Buffers;
use super::forward::Norm;
use super::linear::LowGrad;
use super::stacks::Stack;
use super::swiglu_lora;
use super::CudaBackend;

impl CudaBackend {
    /// Where [`Self::down_backward`] leaves `d_act`: the second half of `mlp` (the first takes
    /// the SwiGLU output that down's `dA` reads).
    fn d_act_ptr(&self, b: &Buffers) -> u64 {
        b.mlp.device_ptr(&self.stream).0 + (2 * b.sizes.tokens * b.sizes.inter) as u64
    }

    /// The down projection's backward from ∂L/∂xs[l+1] in `dres`: `d_act` (see
    /// [`Self::d_act_ptr`]), its adapter's `t` (returned, for its `dA` once the SwiGLU output is
    /// recomputed) and `dB`. It reads nothing a recompute writes, so with the residual parked it
    /// runs before the recompute ([`Self::mlp_half_backward`]'s `up_ready`).
    pub(super) fn down_backward(
        &mut self,
        b: &mut Buffers,
        l: usize,
        slot: usize,
    ) -> Result<Option<LowGrad>> {
        let s = self.stream.clone();
        let p16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let [.., down] = self.linears(l, b.sizes.tokens, &b.acts[slot]);
        let (d_act, t_acc) = (self.d_act_ptr(b), b.t_acc.device_ptr(&s).0);
        down.backward(
            &mut self.gemm,
            &self.kernels,
            p16(&b.dres),
            Some((d_act, false)),
            (p16(&b.t), self.options.r),
            t_acc,
        )
    }

    /// [`Self::mlp_half`] backward after [`Self::down_backward`] (`t_down`): from `d_act` to the
    /// attention output's gradient in `d_attn` (`dres` then holds ∂L/∂h, the residual's part of
    /// `∂L/∂xs[l]`). `norm2_current`: `norm` still holds this layer's second RMSNorm output (its
    /// forward or recompute wrote it last), so the backward does not compute it again.
    /// `up_ready`: the recompute ran after `down_backward`, so an NF4 buffer still holds up's
    /// weight, dequantised last — up's backward goes first and reuses it.
    pub(super) fn mlp_half_backward(
        &mut self,
        b: &mut Buffers,
        l: usize,
        slot: usize,
        norm2_current: bool,
        t_down: Option<LowGrad>,
        up_ready: bool,
    ) -> Result<()> {
        let s = self.stream.clone();
        let dres_ld = self.dres_ld();
        let sz = b.sizes;
        let (n, hd, i) = (sz.tokens, sz.hidden, sz.inter);
        let p16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let a = &mut b.acts[slot];
        let w = &self.layers[l];
        let [.., o, gate, mut up, down] = self.linears(l, n, a);
        up.nf4_ready = up_ready;
        let t = (p16(&b.t), self.options.r);
        let t_acc = b.t_acc.device_ptr(&s).0;

        // SwiGLU backward in place (gate/up become their gradients, act is recomputed for dA of
        // the down projection); fused with the gate/up adapters' t and dB where it applies, which
        // then leaves both t's side by side.
        let fused = swiglu_lora::applies(&gate, &up);
        let (mut act, d_act) = b.mlp.split_at_mut(n * i);
        let fused_t = if fused {
            let tensors = swiglu_lora::MlpTensors {
                d_act: d_act.slice(..n * i),
                gate: a.gate.slice_mut(..),
                up: a.up.slice_mut(..),
                act: act.slice_mut(..),
            };
            // After the `t` of down's backward (`[N, r]` at the start of `b.t`), which its `dA`
            // reads below: `b.t` holds 3·N·r.
            let t_pair = t.0 + (2 * n * self.options.r) as u64;
            let pair = [&gate, &up];
            let k = &self.kernels;
            Some(swiglu_lora::backward(
                &s,
                k,
                pair,
                tensors,
                &mut b.t_acc,
                t_pair,
            )?)
        } else {
            self.kernels.swiglu_bwd(
                &s,
                (&d_act.slice(..n * i), i),
                (&mut a.gate.slice_mut(..), i),
                (&mut a.up.slice_mut(..), i),
                Some((&mut act, i)),
                n,
                i,
            )?;
            None
        };
        // act is the first half of `mlp`.
        down.grad_a(&mut self.gemm, &self.kernels, p16(&b.mlp), t_down)?;
        if !norm2_current {
            // n2 again (each layer's is not kept); rstd2 is rewritten with the same values.
            self.layer_norm(b, l, slot, Norm::Mlp)?;
        }
        let norm = self.norm2_ptr(b);
        let x_ld = self.norm2_layout().1;
        let (a, g, kr) = (&b.acts[slot], &mut self.gemm, &self.kernels);
        // Stacked adapters keep their t's side by side (gate's, then up's) for one dA GEMM.
        let stack = self.stacks.as_mut().filter(|st| st.has(Stack::GateUp));
        let (d_gate, d_up, dn) = (p16(&a.gate), p16(&a.up), p16(&b.dn));
        // Both t's (gate's, up's) when they sit side by side: from the fused kernel, or from
        // the projections' backward into the stack's layout. Otherwise there is one t buffer
        // (and dropout scratch), so each dA runs right after its own backward.
        let pair = match (fused_t, &stack) {
            (Some([t_gate, t_up]), _) => {
                up.backward_input(g, kr, d_up, Some((dn, false)), Some(t_up))?;
                gate.backward_input(g, kr, d_gate, Some((dn, true)), Some(t_gate))?;
                Some([t_gate, t_up])
            }
            (None, Some(st)) => {
                let ld = st.rows(Stack::GateUp);
                let up_at = (t.0 + (2 * self.options.r) as u64, ld);
                let t_up = up.backward(g, kr, d_up, Some((dn, false)), up_at, t_acc)?;
                let t_gate = gate.backward(g, kr, d_gate, Some((dn, true)), (t.0, ld), t_acc)?;
                Some([t_gate, t_up].map(|t| t.expect("stacked adapters")))
            }
            (None, None) => {
                let t_up = up.backward(g, kr, d_up, Some((dn, false)), t, t_acc)?;
                up.grad_a(g, kr, norm, t_up)?;
                let t_gate = gate.backward(g, kr, d_gate, Some((dn, true)), t, t_acc)?;
                gate.grad_a(g, kr, norm, t_gate)?;
                None
            }
        };
        match (pair, stack) {
            (Some([t_gate, _]), Some(st)) => {
                let scale = self.options.lora_scale() as f32;
                let grads = [&gate, &up].map(|lin| lin.lora.expect("stacked adapters").grad_a);
                // gate's t first: the pair's layout is the stack's.
                st.grad_a(
                    g,
                    kr,
                    Stack::GateUp,
                    n,
                    t_gate.ptr,
                    (norm, x_ld),
                    &grads,
                    scale,
                )?;
            }
            (Some([t_gate, t_up]), None) => {
                up.grad_a(g, kr, norm, Some(t_up))?;
                gate.grad_a(g, kr, norm, Some(t_gate))?;
            }
            (None, _) => {}
        }
        self.kernels.rmsnorm_bwd(
            &s,
            &a.h.slice(..),
            &w.norm2.slice(..),
            &a.rstd2.slice(..),
            &b.dn.slice(..),
            (&mut b.dres.slice_mut(..), dres_ld),
            n,
            hd,
            true,
        )?;

        // o_proj: into the attention output's gradient.
        let d_attn = Some((p16(&b.d_attn), false));
        let t_o = o.backward(g, kr, p16(&b.dres), d_attn, t, t_acc)?;
        o.grad_a(g, kr, p16(&a.attn), t_o)?;
        Ok(())
    }

    /// The attention backward of the layer in `acts[slot]`: `d_attn` into dq, dk, dv, with the
    /// inverse RoPE applied to dq and dk (folded into the attention's dQ conversion).
    pub(super) fn attention_backward(&mut self, b: &mut Buffers, slot: usize) -> Result<()> {
        let sz = b.sizes;
        let a = &b.acts[slot];
        let dims = self.dims(sz.batch, sz.seq);
        attention::backward(
            &self.stream,
            &self.kernels,
            &dims,
            (&a.q, &a.k, &a.v),
            (&a.attn, &a.lse),
            &b.d_attn,
            (&mut b.dq, &mut b.dk, &mut b.dv),
            &b.segments,
            &mut b.attn,
            // Free until the next layer's MLP: the act half of `mlp` is dead from here.
            &mut b.mlp,
            (&b.cos, &b.sin),
        )?;
        Ok(())
    }

    /// [`Self::attention_half`] backward after the attention's (which rotated dq and dk back
    /// through RoPE already): Qwen3's q/k norm and the q/k/v projections into `∂L/∂xs[l]`
    /// (added to `dres`; layer 0 stops at the adapters: the embedding is frozen). The layer's
    /// backward is [`Self::mlp_half_backward`], [`Self::attention_backward`], then this.
    /// `norm1_current`: `norm` still holds the layer's first RMSNorm output (a q/k/v recompute
    /// left it there).
    pub(super) fn qkv_backward(
        &mut self,
        b: &mut Buffers,
        l: usize,
        slot: usize,
        norm1_current: bool,
    ) -> Result<()> {
        let s = self.stream.clone();
        let sz = b.sizes;
        let (n, hd) = (sz.tokens, sz.hidden);
        let p16 = |x: &CudaSlice<bf16>| x.device_ptr(&s).0;
        let xi = b.x_index(l);
        let a = &mut b.acts[slot];
        let w = &self.layers[l];
        let [q, k, v, ..] = self.linears(l, n, a);
        let kr = &self.kernels;
        let (t, t_acc) = (p16(&b.t), b.t_acc.device_ptr(&s).0);
        let r = self.options.r;
        let (nh, nkv, d) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        // Qwen3: through the per-head q/k RMSNorm to the projections' outputs.
        let (dqp, dkp) = match (&w.qk_norm, self.extras.as_mut()) {
            (Some((qn, kn)), Some(e)) => {
                let x = &e.qk[slot];
                let dq_raw = e.dq_raw.as_mut().expect("allocated with qk norm");
                let dk_raw = e.dk_raw.as_mut().expect("allocated with qk norm");
                kr.rmsnorm_bwd(
                    &s,
                    &x.q_raw.slice(..),
                    &qn.slice(..),
                    &x.rstd_q.slice(..),
                    &b.dq.slice(..),
                    (&mut dq_raw.slice_mut(..), d),
                    n * nh,
                    d,
                    false,
                )?;
                kr.rmsnorm_bwd(
                    &s,
                    &x.k_raw.slice(..),
                    &kn.slice(..),
                    &x.rstd_k.slice(..),
                    &b.dk.slice(..),
                    (&mut dk_raw.slice_mut(..), d),
                    n * nkv,
                    d,
                    false,
                )?;
                (p16(&*dq_raw), p16(&*dk_raw))
            }
            _ => (p16(&b.dq), p16(&b.dk)),
        };
        let need_dx = l > 0;
        let dn = p16(&b.dn);
        // n1 again, for the q/k/v adapters' dA.
        if !norm1_current {
            self.layer_norm(b, l, slot, Norm::Attention)?;
        }
        let (a, g, kr) = (&b.acts[slot], &mut self.gemm, &self.kernels);
        // Stacked adapters keep their t's side by side, for one GEMM of their dx terms and
        // one of their dA.
        let norm = p16(&b.norm);
        let stack = self.stacks.as_mut().filter(|st| st.has(Stack::Qkv));
        let t_ld = stack.as_ref().map_or(r, |st| st.rows(Stack::Qkv));
        let projections = [(&q, dqp, false), (&k, dkp, true), (&v, p16(&b.dv), true)];
        for (j, (lin, dy, acc)) in projections.into_iter().enumerate() {
            let t_at = if stack.is_some() {
                t + (2 * j * r) as u64
            } else {
                t
            };
            let dx = need_dx.then_some((dn, acc));
            let t = lin.backward(g, kr, dy, dx, (t_at, t_ld), t_acc)?;
            if stack.is_none() {
                lin.grad_a(g, kr, norm, t)?;
            }
        }
        if let Some(st) = stack {
            let scale = self.options.lora_scale() as f32;
            if need_dx {
                st.dx(g, (l, Stack::Qkv), n, t, dn, scale)?;
            }
            let grads = [&q, &k, &v].map(|lin| lin.lora.expect("stacked adapters").grad_a);
            st.grad_a(g, kr, Stack::Qkv, n, t, (norm, hd), &grads, scale)?;
        }
        if need_dx {
            let x = &b.xs[xi];
            self.kernels.rmsnorm_bwd(
                &s,
                &x.slice(..),
                &w.norm1.slice(..),
                &a.rstd1.slice(..),
                &b.dn.slice(..),
                (&mut b.dres.slice_mut(..), self.dres_ld()),
                n,
                hd,
                true,
            )?;
        }
        Ok(())
    }
}
