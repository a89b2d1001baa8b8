//! A frozen linear layer with an optional LoRA adapter, as cuBLASLt calls on raw device
//! addresses (row-major bf16): `y = x·Wᵀ [+ residual] + s·(x·Aᵀ)·Bᵀ`, `W [out, in]`,
//! `A [r, in]`, `B [out, r]` (bf16 shadows of the fp32 masters), `s` the LoRA scale.
//!
//! Always low-rank first, the full ΔW never exists, and `W` never gets a gradient:
//! - forward keeps `low = x·Aᵀ` `[N, r]` for the backward;
//! - `t = dy·B` `[N, r]`; `dx (+)= dy·W + s·t·A`;
//! - `dB += s·dyᵀ·low`, `dA += s·tᵀ·x` (fp32 gradients, accumulated in place: `beta = 1`).

use anyhow::Result;

use super::gemm::{Gemm, Operand, OutType, Output, Problem};

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
}

/// One projection of `n` rows: `inp → out` features, weight `w` (bf16 `[out, in]`).
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    pub n: usize,
    pub inp: usize,
    pub out: usize,
    pub w: u64,
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

impl Linear {
    /// `y = x·Wᵀ (+ residual) + s·(x·Aᵀ)·Bᵀ`; `residual` may not alias `y`'s rows differently.
    pub fn forward(&self, g: &mut Gemm, x: u64, y: u64, residual: Option<u64>) -> Result<()> {
        let (n, i, o) = (self.n, self.inp, self.out);
        let mut d = Output::new(y, o, OutType::Bf16);
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
        if let Some(l) = self.lora {
            mm(
                g,
                n,
                l.r,
                i,
                Operand::new(x, i),
                Operand::new(l.a, i).t(),
                Output::new(l.low, l.r, OutType::Bf16),
                1.0,
                0.0,
            )?;
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

    /// Input gradient into `dx` (`accumulate`: add to it), the adapter's `t = dy·B` into
    /// `t`, and `dB`. `dA` needs the layer input and is [`Linear::grad_a`], called with the same
    /// `t` (separate because the down projection's input is recomputed only after `dx`).
    pub fn backward(&self, g: &mut Gemm, dy: u64, dx: Option<(u64, bool)>, t: u64) -> Result<()> {
        let (n, i, o) = (self.n, self.inp, self.out);
        if let Some((dx, acc)) = dx {
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
                mm(
                    g,
                    n,
                    i,
                    l.r,
                    Operand::new(t, l.r),
                    Operand::new(l.a, i),
                    Output::new(dx, i, OutType::Bf16),
                    l.scale,
                    1.0,
                )?;
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

    /// `dA [r, in] += s·tᵀ·x` with `t` from [`Linear::backward`].
    pub fn grad_a(&self, g: &mut Gemm, x: u64, t: u64) -> Result<()> {
        if let Some(l) = self.lora {
            let (n, i) = (self.n, self.inp);
            mm(
                g,
                l.r,
                i,
                n,
                Operand::new(t, l.r).t(),
                Operand::new(x, i),
                Output::new(l.grad_a, i, OutType::F32),
                l.scale,
                1.0,
            )?;
        }
        Ok(())
    }
}
