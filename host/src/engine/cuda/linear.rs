//! A frozen linear layer with an optional LoRA adapter, as cuBLASLt calls on raw device
//! addresses (row-major bf16): `y = x·Wᵀ + b [+ residual] + s·(drop(x)·Aᵀ)·Bᵀ`, `W [out, in]`,
//! `A [r, in]`, `B [out, r]` (bf16 shadows of the fp32 masters), `s` the LoRA scale, `b` an
//! optional bias (added in the GEMM's epilogue) and `drop` LoRA dropout (PEFT: on the adapter's
//! input only).
//!
//! Always low-rank first, the full ΔW never exists, and `W` never gets a gradient:
//! - forward keeps `low = drop(x)·Aᵀ` `[N, r]` for the backward;
//! - `t = dy·B` `[N, r]`; `dx (+)= dy·W + s·(t·A) ⊙ mask`;
//! - `dB += s·dyᵀ·low`, `dA += s·tᵀ·drop(x)`, `db += Σ_rows dy` (fp32 gradients, accumulated
//!   in place: `beta = 1`).
//!
//! NF4 weights (`--load_in_4bit`) are dequantised into a shared bf16 buffer right before each
//! GEMM that reads them (the forward and the input gradient); the dropout mask is regenerated
//! from its seed wherever it is needed, never stored.

use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::CudaStream;
use ferrotune_kernels::device::{bf16, Kernels};

use super::gemm::{Gemm, Operand, OutType, Output, Problem};
use super::nf4::Nf4Ptrs;
use super::raw::Borrowed;

/// LoRA dropout of one adapter in one pass: the kernel's mask parameters, the seed of this
/// (pass, layer, projection), and a scratch buffer of `[N, in]` bf16 for the dropped input.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub seed: u64,
    pub threshold: u32,
    pub scale: f32,
    pub scratch: u64,
}

/// Device addresses of one adapter.
#[derive(Debug, Clone, Copy)]
pub struct Lora {
    /// bf16 `A [r, in]` and `B [out, r]`.
    pub a: u64,
    pub b: u64,
    /// fp32 gradients of `A` and `B`.
    pub grad_a: u64,
    pub grad_b: u64,
    /// bf16 `x·Aᵀ` `[N, r]`, written by the forward.
    pub low: u64,
    pub r: usize,
    pub scale: f32,
    pub dropout: Option<Dropout>,
}

/// A projection bias: bf16 values `[out]` and, when it trains, its fp32 gradient and a bf16
/// vector of `N` ones (the row sum `Σ_rows dy` is the GEMM `ones·dy`).
#[derive(Debug, Clone, Copy)]
pub struct Bias {
    pub value: u64,
    pub grad: Option<(u64, u64)>,
}

/// One projection of `n` rows: `inp → out` features, weight `w` (bf16 `[out, in]`; with `nf4`
/// the buffer it is dequantised into before use).
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    pub n: usize,
    pub inp: usize,
    pub out: usize,
    pub w: u64,
    pub nf4: Option<Nf4Ptrs>,
    pub bias: Option<Bias>,
    pub lora: Option<Lora>,
}

#[allow(clippy::too_many_arguments)]
fn mm(
    g: &mut Gemm,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    d: Output,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let p = Problem {
        m,
        n,
        k,
        batch: 1,
        a,
        b,
        d,
        alpha,
        beta,
    };
    // SAFETY: the callers pass addresses of buffers sized for these shapes (see `Buffers`).
    unsafe { g.run(&p) }
}

/// `out = (accumulate ? out : 0) + mask ⊙ x / (1-p)` over `len` bf16 values at raw addresses.
fn dropout(
    stream: &Arc<CudaStream>,
    k: &Kernels,
    d: &Dropout,
    x: u64,
    out: u64,
    len: usize,
    accumulate: bool,
) -> Result<()> {
    // SAFETY: `x` and `out` address `len` values of live activation buffers (the layer input or
    // a gradient, and the dropout scratch or dX), distinct, on this stream.
    unsafe {
        let x = Borrowed::<bf16>::new(stream, x, len);
        let mut out = Borrowed::<bf16>::new(stream, out, len);
        k.dropout_apply(
            stream,
            &x.view(),
            &mut out.view_mut(),
            d.threshold,
            d.scale,
            d.seed,
            accumulate,
        )?;
    }
    Ok(())
}

impl Linear {
    fn dequantize(&self, g: &Gemm, k: &Kernels) -> Result<()> {
        match &self.nf4 {
            Some(q) => q.dequantize(g.stream(), k, self.w),
            None => Ok(()),
        }
    }

    /// `y = x·Wᵀ + b (+ residual) + s·(drop(x)·Aᵀ)·Bᵀ`; `residual` may not alias `y`'s rows
    /// differently.
    pub fn forward(
        &self,
        g: &mut Gemm,
        k: &Kernels,
        x: u64,
        y: u64,
        residual: Option<u64>,
    ) -> Result<()> {
        let (n, i, o) = (self.n, self.inp, self.out);
        self.dequantize(g, k)?;
        let mut d = Output::new(y, o, OutType::Bf16);
        if let Some(b) = self.bias {
            d = d.bias(b.value);
        }
        let beta = match residual {
            Some(c) => {
                d = d.plus(c);
                1.0
            }
            None => 0.0,
        };
        mm(
            g,
            n,
            o,
            i,
            Operand::new(x, i),
            Operand::new(self.w, i).t(),
            d,
            1.0,
            beta,
        )?;
        self.forward_low(g, k, x)?;
        if let Some(l) = self.lora {
            mm(
                g,
                n,
                o,
                l.r,
                Operand::new(l.low, l.r),
                Operand::new(l.b, l.r).t(),
                Output::new(y, o, OutType::Bf16),
                l.scale,
                1.0,
            )?;
        }
        Ok(())
    }

    /// Only what the backward keeps from the forward: the adapter's `low = drop(x)·Aᵀ` (nothing
    /// without an adapter). For a checkpointing recompute of a projection whose output nothing
    /// reads, it skips the frozen GEMM (and its NF4 dequantisation).
    pub fn forward_low(&self, g: &mut Gemm, k: &Kernels, x: u64) -> Result<()> {
        let (n, i) = (self.n, self.inp);
        if let Some(l) = self.lora {
            let xa = self.adapter_input(g, k, &l, x)?;
            mm(
                g,
                n,
                l.r,
                i,
                Operand::new(xa, i),
                Operand::new(l.a, i).t(),
                Output::new(l.low, l.r, OutType::Bf16),
                1.0,
                0.0,
            )?;
        }
        Ok(())
    }

    /// The adapter's input: `x`, or `drop(x)` written to the dropout scratch.
    fn adapter_input(&self, g: &Gemm, k: &Kernels, l: &Lora, x: u64) -> Result<u64> {
        match &l.dropout {
            Some(d) => {
                dropout(g.stream(), k, d, x, d.scratch, self.n * self.inp, false)?;
                Ok(d.scratch)
            }
            None => Ok(x),
        }
    }

    /// Input gradient into `dx` (`accumulate`: add to it), the adapter's `t = dy·B` into
    /// `t`, `dB` and the bias gradient. `dA` needs the layer input and is [`Linear::grad_a`],
    /// called with the same `t` (separate because the down projection's input is recomputed
    /// only after `dx`).
    pub fn backward(
        &self,
        g: &mut Gemm,
        k: &Kernels,
        dy: u64,
        dx: Option<(u64, bool)>,
        t: u64,
    ) -> Result<()> {
        let (n, i, o) = (self.n, self.inp, self.out);
        if let Some((dx, acc)) = dx {
            self.dequantize(g, k)?;
            let beta = if acc { 1.0 } else { 0.0 };
            mm(
                g,
                n,
                i,
                o,
                Operand::new(dy, o),
                Operand::new(self.w, i),
                Output::new(dx, i, OutType::Bf16),
                1.0,
                beta,
            )?;
        }
        if let Some((grad, ones)) = self.bias.and_then(|b| b.grad) {
            // db [1, out] += ones[1, N]·dy
            mm(
                g,
                1,
                o,
                n,
                Operand::new(ones, n),
                Operand::new(dy, o),
                Output::new(grad, o, OutType::F32),
                1.0,
                1.0,
            )?;
        }
        if let Some(l) = self.lora {
            mm(
                g,
                n,
                l.r,
                o,
                Operand::new(dy, o),
                Operand::new(l.b, l.r),
                Output::new(t, l.r, OutType::Bf16),
                1.0,
                0.0,
            )?;
            if let Some((dx, _)) = dx {
                match &l.dropout {
                    // dx += s·(t·A) ⊙ mask: the product goes to the scratch, the mask adds it.
                    Some(d) => {
                        mm(
                            g,
                            n,
                            i,
                            l.r,
                            Operand::new(t, l.r),
                            Operand::new(l.a, i),
                            Output::new(d.scratch, i, OutType::Bf16),
                            l.scale,
                            0.0,
                        )?;
                        dropout(g.stream(), k, d, d.scratch, dx, n * i, true)?;
                    }
                    None => mm(
                        g,
                        n,
                        i,
                        l.r,
                        Operand::new(t, l.r),
                        Operand::new(l.a, i),
                        Output::new(dx, i, OutType::Bf16),
                        l.scale,
                        1.0,
                    )?,
                }
            }
            // dB [out, r] += s·dyᵀ·low
            mm(
                g,
                o,
                l.r,
                n,
                Operand::new(dy, o).t(),
                Operand::new(l.low, l.r),
                Output::new(l.grad_b, l.r, OutType::F32),
                l.scale,
                1.0,
            )?;
        }
        Ok(())
    }

    /// `dA [r, in] += s·tᵀ·drop(x)` with `t` from [`Linear::backward`] (the dropout mask is
    /// regenerated from its seed).
    pub fn grad_a(&self, g: &mut Gemm, k: &Kernels, x: u64, t: u64) -> Result<()> {
        if let Some(l) = self.lora {
            let (n, i) = (self.n, self.inp);
            let xa = self.adapter_input(g, k, &l, x)?;
            mm(
                g,
                l.r,
                i,
                n,
                Operand::new(t, l.r).t(),
                Operand::new(xa, i),
                Output::new(l.grad_a, i, OutType::F32),
                l.scale,
                1.0,
            )?;
        }
        Ok(())
    }
}
