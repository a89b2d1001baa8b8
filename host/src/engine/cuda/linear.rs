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
//!
//! With a [`Fold`] the adapter's output term rides in the frozen GEMM along K instead of a
//! second GEMM that reads and rewrites `y` (perf-notes §16–17): `y = [x | s·low]·[W | B]ᵀ`;
//! with [`DxTerm::Folded`] its input-gradient term does the same in the backward:
//! `dx = [dy | s·t]·[W ; A]`. Projections that share an input (q/k/v, gate/up) can stack their
//! `A`s (`super::stacks`, [`DxTerm::Stacked`]): the same adapter products ([`lows_product`],
//! [`dx_product`], [`grad_a_product`]) then run once for the whole stack.

use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::CudaStream;
use ferrotune_kernels::device::{bf16, Kernels, LoraAdapter};

use super::gemm::{Gemm, Operand, OutType, Output, Problem};
use super::nf4::Nf4Ptrs;
use super::raw::{copy_rows_bf16, strided_len, Borrowed};

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
    /// bf16 `x·Aᵀ` `[N, r]`, rows `low_ld` apart (the stacked projections' side by side),
    /// written by the forward.
    pub low: u64,
    pub low_ld: usize,
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

/// Where an adapter's `r` columns sit when its output term is folded into the frozen GEMM
/// along K: `y = [s·low | x]·[B | W]ᵀ` (`Before`) or `[x | s·low]·[W | B]ᵀ` (`After`) — one
/// fp32 accumulation and one rounding, no read-modify-write of `y`, for `r/in` more FLOPs. The
/// input buffer has the `r` columns beside `x` (rows `x_ld` apart), the weight beside `W` (rows
/// `w_ld` apart), on the same side, so the GEMM reads one contiguous span of each row. The
/// gate and up projections share one input buffer `[s·low_gate | x | s·low_up]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    Before,
    After,
}

/// One projection of `n` rows: `inp → out` features, weight `w` (bf16 `[out, in]`, rows `w_ld`
/// apart; with `nf4` the buffer it is dequantised into before use), inputs `x_ld` apart,
/// output gradients `dy_ld` apart.
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    pub n: usize,
    pub inp: usize,
    pub out: usize,
    pub w: u64,
    pub w_ld: usize,
    pub x_ld: usize,
    pub dy_ld: usize,
    pub nf4: Option<Nf4Ptrs>,
    pub bias: Option<Bias>,
    pub lora: Option<Lora>,
    /// Set only with an adapter and without dropout.
    pub fold: Option<Fold>,
    /// How the backward adds the adapter's input-gradient term `s·(t·A)`.
    pub dx_term: DxTerm,
    /// With `nf4`: the shared buffer already holds this weight as the input gradient reads it
    /// (a checkpointing recompute dequantised it last), so the backward skips the
    /// dequantisation. Not with [`DxTerm::Folded`], whose `A` rows the forward does not fill.
    pub nf4_ready: bool,
}

/// How [`Linear::backward`] adds the adapter's input-gradient term `s·(t·A)` to `dx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DxTerm {
    /// A second GEMM after the frozen `dy·W` (`beta = 1`; with dropout, through the mask).
    Add,
    /// In the frozen GEMM along K: `dx = [dy | s·t]·[W ; A]`, with `s·t` in `r` spare columns
    /// of `dy` (`dy_ld ≥ out + r`) and `A` in `r` spare rows below `W` (no dropout).
    Folded,
    /// Left to the caller, which adds the terms of the projections sharing this input in one
    /// GEMM over their stacked `A`s ([`dx_product`]; no dropout).
    Stacked,
}

/// Where [`Linear::backward`] left the adapter's `t = dy·B` `[N, r]` for [`Linear::grad_a`]:
/// rows `ld` apart, and the factor `dA` still applies (`s`, or 1 when it holds `s·t`).
#[derive(Debug, Clone, Copy)]
pub struct LowGrad {
    pub ptr: u64,
    pub ld: usize,
    pub alpha: f32,
}

/// Which pass a dequantised weight serves: the forward reads a folded adapter's `B` columns,
/// the input gradient its `A` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Forward,
    InputGradient,
}

/// A strided bf16 row copy: `rows` rows of `cols` values, `(address, row stride)` each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCopy {
    pub dst: (u64, usize),
    pub src: (u64, usize),
    pub cols: usize,
    pub rows: usize,
}

/// Whether [`Linear::forward_from`] computes the adapter's `low` or finds it in place (parked
/// and fetched back by the offload, so a checkpointing recompute skips the `x·Aᵀ` GEMM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Low {
    Compute,
    Ready,
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

/// Byte offset of `cols` bf16 columns.
fn cols(cols: usize) -> u64 {
    (cols * std::mem::size_of::<bf16>()) as u64
}

impl Linear {
    /// NF4: `W` into the shared buffer, with the folded adapter copies its use reads.
    fn dequantize(&self, g: &Gemm, k: &Kernels, with: Use) -> Result<()> {
        let Some(q) = &self.nf4 else {
            return Ok(());
        };
        if self.nf4_ready && with == Use::InputGradient {
            anyhow::ensure!(
                self.dx_term != DxTerm::Folded,
                "a reused NF4 weight lacks its adapter's A rows"
            );
            return Ok(());
        }
        q.dequantize(g.stream(), k, (self.w, self.inp, self.w_ld))?;
        match with {
            Use::Forward => self.fill(g.stream(), k, self.b_columns()),
            Use::InputGradient => self.fill(g.stream(), k, self.a_rows()),
        }
    }

    /// The copies that put the adapter's current shadows where the folds read them: `B` into
    /// the weight's columns, `A` into its rows, as `(dst, src, cols, rows)` with strides (none
    /// without folds). Needed after every change of the shadows (the engine batches them for
    /// every bf16 weight before each pass); NF4 weights take them at each dequantisation.
    pub fn fold_copies(&self) -> Vec<RowCopy> {
        [self.b_columns(), self.a_rows()]
            .into_iter()
            .flatten()
            .collect()
    }

    /// With a [`Fold`]: `B` `[out, r]` into the weight's `r` columns (inside its `[out, w_ld]`
    /// buffer).
    fn b_columns(&self) -> Option<RowCopy> {
        let (fold, l) = self.fold.zip(self.lora)?;
        Some(RowCopy {
            dst: (self.w_side(fold, l.r), self.w_ld),
            src: (l.b, l.r),
            cols: l.r,
            rows: self.out,
        })
    }

    /// With [`DxTerm::Folded`]: `A` `[r, in]` into the `r` rows after the weight's `out`
    /// (`[out + r, in]`).
    fn a_rows(&self) -> Option<RowCopy> {
        let l = self.lora.filter(|_| self.dx_term == DxTerm::Folded)?;
        Some(RowCopy {
            dst: (self.w + cols(self.out * self.w_ld), self.inp),
            src: (l.a, self.inp),
            cols: self.inp,
            rows: l.r,
        })
    }

    /// Runs one of [`Linear::b_columns`] / [`Linear::a_rows`] (nothing when it is `None`).
    fn fill(&self, stream: &Arc<CudaStream>, k: &Kernels, c: Option<RowCopy>) -> Result<()> {
        if let Some(c) = c {
            // SAFETY: `RowCopy`s of a Linear address its live weight buffer and adapter shadows
            // (see `b_columns`, `a_rows`), ordered by this stream.
            unsafe { copy_rows_bf16(stream, k, c.dst, c.src, c.cols, c.rows)? };
        }
        Ok(())
    }

    /// First of the weight's `r` adapter columns.
    fn w_side(&self, fold: Fold, r: usize) -> u64 {
        match fold {
            Fold::Before => self.w - cols(r),
            Fold::After => self.w + cols(self.inp),
        }
    }

    /// First of the input's `r` adapter columns beside `x`.
    fn x_side(&self, fold: Fold, r: usize, x: u64) -> u64 {
        match fold {
            Fold::Before => x - cols(r),
            Fold::After => x + cols(self.inp),
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
        self.forward_from(g, k, x, y, residual, Low::Compute)
    }

    /// [`Linear::forward`], with the adapter's `low` computed or already in place (`Low`).
    pub fn forward_from(
        &self,
        g: &mut Gemm,
        k: &Kernels,
        x: u64,
        y: u64,
        residual: Option<u64>,
        low: Low,
    ) -> Result<()> {
        let (n, i, o) = (self.n, self.inp, self.out);
        self.dequantize(g, k, Use::Forward)?;
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
        if let (Some(fold), Some(l)) = (self.fold, self.lora) {
            // s·low into the input's adapter columns, copied out for the backward's dB (which
            // then needs no scale), or a parked s·low copied in; then one GEMM over [x | s·low]
            // and [W | B].
            let side = self.x_side(fold, l.r, x);
            let (from, to) = match low {
                Low::Compute => {
                    let x = (x, self.x_ld);
                    lows_product(g, (n, i), x, l.a, l.r, (side, self.x_ld), l.scale)?;
                    ((side, self.x_ld), (l.low, l.low_ld))
                }
                Low::Ready => ((l.low, l.low_ld), (side, self.x_ld)),
            };
            // SAFETY: `low` is `[N, r]`; the side columns lie in the input buffer (`x_ld` ≥
            // in + r); both live, ordered by this stream.
            unsafe { copy_rows_bf16(g.stream(), k, to, from, l.r, n)? };
            let (a, w) = match fold {
                Fold::Before => (side, self.w_side(fold, l.r)),
                Fold::After => (x, self.w),
            };
            return mm(
                g,
                n,
                o,
                i + l.r,
                Operand::new(a, self.x_ld),
                Operand::new(w, self.w_ld).t(),
                d,
                1.0,
                beta,
            );
        }
        mm(
            g,
            n,
            o,
            i,
            Operand::new(x, self.x_ld),
            Operand::new(self.w, self.w_ld).t(),
            d,
            1.0,
            beta,
        )?;
        if low == Low::Compute {
            self.forward_low(g, k, x)?;
        }
        if let Some(l) = self.lora {
            mm(
                g,
                n,
                o,
                l.r,
                Operand::new(l.low, l.low_ld),
                Operand::new(l.b, l.r).t(),
                Output::new(y, o, OutType::Bf16),
                l.scale,
                1.0,
            )?;
        }
        Ok(())
    }

    /// Only what the backward keeps from the forward: the adapter's `low = drop(x)·Aᵀ` (`s·low`
    /// when folded; nothing without an adapter). For a checkpointing recompute of a projection
    /// whose output nothing reads, it skips the frozen GEMM (and its NF4 dequantisation).
    pub fn forward_low(&self, g: &mut Gemm, k: &Kernels, x: u64) -> Result<()> {
        let (n, i) = (self.n, self.inp);
        if let Some(l) = self.lora {
            let scale = if self.fold.is_some() { l.scale } else { 1.0 };
            let xa = self.adapter_input(g, k, &l, x)?;
            lows_product(g, (n, i), xa, l.a, l.r, (l.low, l.low_ld), scale)?;
        }
        Ok(())
    }

    /// The adapter's input and its row stride: `x`, or `drop(x)` written to the dropout
    /// scratch (dropout runs only on dense inputs: it disables folding).
    fn adapter_input(&self, g: &Gemm, k: &Kernels, l: &Lora, x: u64) -> Result<(u64, usize)> {
        match &l.dropout {
            Some(d) => {
                anyhow::ensure!(self.x_ld == self.inp, "LoRA dropout needs dense inputs");
                dropout(g.stream(), k, d, x, d.scratch, self.n * self.inp, false)?;
                Ok((d.scratch, self.inp))
            }
            None => Ok((x, self.x_ld)),
        }
    }

    /// Input gradient into `dx` (`accumulate`: add to it), the adapter's `t = dy·B` into
    /// `t` (address, row stride; into `dy`'s spare columns when the input gradient is folded),
    /// `dB` and the bias gradient. `dA` needs the layer input and is [`Linear::grad_a`], called
    /// with what this returns (separate because the down projection's input is recomputed only
    /// after `dx`).
    ///
    /// `t_acc`: an fp32 scratch of at least `[N, r]`, zero on entry and left so, through which
    /// the one-pass kernel sums `t` (ranks 16/32/64: `Linear::tdb_fuses`).
    pub fn backward(
        &self,
        g: &mut Gemm,
        k: &Kernels,
        dy: u64,
        dx: Option<(u64, bool)>,
        t: (u64, usize),
        t_acc: u64,
    ) -> Result<Option<LowGrad>> {
        let (n, o) = (self.n, self.out);
        let dy_op = Operand::new(dy, self.dy_ld);
        let folded = self.dx_term == DxTerm::Folded;
        let fused = self.lora.is_some_and(|l| self.tdb_fuses(&l));
        // t = dy·B, as s·t in dy's spare columns when dx folds it in.
        let low_grad = match self.lora {
            Some(l) => {
                let (t, ld, alpha) = if folded {
                    (dy + cols(o), self.dy_ld, l.scale)
                } else {
                    (t.0, t.1, 1.0)
                };
                if fused {
                    self.fused_tdb(g.stream(), k, &l, dy, t_acc, (t, ld, alpha))?;
                } else {
                    mm(
                        g,
                        n,
                        l.r,
                        o,
                        dy_op,
                        Operand::new(l.b, l.r),
                        Output::new(t, ld, OutType::Bf16),
                        alpha,
                        0.0,
                    )?;
                }
                Some(LowGrad {
                    ptr: t,
                    ld,
                    alpha: if folded { 1.0 } else { l.scale },
                })
            }
            None => None,
        };
        self.backward_input(g, k, dy, dx, low_grad)?;
        if let Some(l) = self.lora.filter(|_| !fused) {
            // dB [out, r] += s·dyᵀ·low
            mm(
                g,
                o,
                l.r,
                n,
                dy_op.t(),
                Operand::new(l.low, l.low_ld),
                Output::new(l.grad_b, l.r, OutType::F32),
                self.grad_b_scale(&l),
                1.0,
            )?;
        }
        Ok(low_grad)
    }

    /// Whether the adapter's `t` and `dB` come from one pass over `dy` (the kernels'
    /// `lora_tdb`, perf-notes §28) instead of two GEMMs that each read it: a rank the kernel
    /// is built for and rows of 16-byte chunks.
    fn tdb_fuses(&self, l: &Lora) -> bool {
        Kernels::lora_grads_support(l.r)
            && [self.out, self.dy_ld, l.low_ld]
                .iter()
                .all(|x| x.is_multiple_of(8))
    }

    /// `t_acc += dy·B` and `dB += s·dyᵀ·low` in one kernel, then `t = bf16(alpha·t_acc)` at
    /// `(ptr, ld)` and `t_acc = 0`.
    fn fused_tdb(
        &self,
        stream: &Arc<CudaStream>,
        k: &Kernels,
        l: &Lora,
        dy: u64,
        t_acc: u64,
        (t, ld, alpha): (u64, usize, f32),
    ) -> Result<()> {
        let (n, o, r) = (self.n, self.out, l.r);
        // SAFETY: `dy` holds `[N, out]` at `dy_ld`, `B`/`dB` `[out, r]` are the adapter's shadow
        // and gradient, `low` `[N, r]` at `low_ld` the forward's, `t_acc` the caller's `[N, r]`
        // scratch and `t` `[N, r]` at `ld` (the `t` buffer or dy's spare columns, which the
        // kernel does not read); all live for the pass and ordered by this stream.
        let (dy_v, b, low, mut grad_b, mut acc, mut tv) = unsafe {
            (
                Borrowed::<bf16>::new(stream, dy, strided_len(n, self.dy_ld, o)),
                Borrowed::<bf16>::new(stream, l.b, o * r),
                Borrowed::<bf16>::new(stream, l.low, strided_len(n, l.low_ld, r)),
                Borrowed::<f32>::new(stream, l.grad_b, o * r),
                Borrowed::<f32>::new(stream, t_acc, n * r),
                Borrowed::<bf16>::new(stream, t, strided_len(n, ld, r)),
            )
        };
        let mut adapter = LoraAdapter {
            b: b.view(),
            low: (low.view(), l.low_ld),
            grad_b: grad_b.view_mut(),
        };
        let rank_scale = (r, self.grad_b_scale(l));
        k.lora_tdb(
            stream,
            (&dy_v.view(), self.dy_ld),
            &mut adapter,
            &mut acc.view_mut(),
            rank_scale,
            n,
            o,
        )?;
        k.lora_t_store(
            stream,
            &mut acc.view_mut(),
            (&mut tv.view_mut(), ld),
            (n, r),
            alpha,
        )?;
        Ok(())
    }

    /// The factor of `dB = ·dyᵀ·low`: `s`, or 1 when the folded forward kept `s·low`.
    pub fn grad_b_scale(&self, l: &Lora) -> f32 {
        if self.fold.is_some() {
            1.0
        } else {
            l.scale
        }
    }

    /// The part of [`Linear::backward`] after the adapter's `t` (at `low_grad`) and `dB`: the
    /// input gradient into `dx` and the bias gradient. Called alone where something else
    /// computed `t` and `dB` (the fused SwiGLU backward, `super::swiglu_lora`).
    pub fn backward_input(
        &self,
        g: &mut Gemm,
        k: &Kernels,
        dy: u64,
        dx: Option<(u64, bool)>,
        low_grad: Option<LowGrad>,
    ) -> Result<()> {
        let (n, i, o) = (self.n, self.inp, self.out);
        let dy_op = Operand::new(dy, self.dy_ld);
        let fold_r = match (self.dx_term, self.lora) {
            (DxTerm::Folded, Some(l)) => l.r,
            _ => 0,
        };
        if let Some((dx, acc)) = dx {
            self.dequantize(g, k, Use::InputGradient)?;
            let beta = if acc { 1.0 } else { 0.0 };
            mm(
                g,
                n,
                i,
                o + fold_r,
                dy_op,
                Operand::new(self.w, self.w_ld),
                Output::new(dx, i, OutType::Bf16),
                1.0,
                beta,
            )?;
            if let (Some(l), Some(t), DxTerm::Add) = (self.lora, low_grad, self.dx_term) {
                match &l.dropout {
                    // dx += s·(t·A) ⊙ mask: the product goes to the scratch, the mask adds it.
                    Some(d) => {
                        let to = (d.scratch, 0.0);
                        dx_product(g, (n, i), (t.ptr, t.ld), l.a, l.r, to, l.scale)?;
                        dropout(g.stream(), k, d, d.scratch, dx, n * i, true)?;
                    }
                    None => dx_product(g, (n, i), (t.ptr, t.ld), l.a, l.r, (dx, 1.0), l.scale)?,
                }
            }
        }
        if let Some((grad, ones)) = self.bias.and_then(|b| b.grad) {
            // db [1, out] += ones[1, N]·dy
            mm(
                g,
                1,
                o,
                n,
                Operand::new(ones, n),
                dy_op,
                Output::new(grad, o, OutType::F32),
                1.0,
                1.0,
            )?;
        }
        Ok(())
    }

    /// `dA [r, in] += s·tᵀ·drop(x)` with `t` from [`Linear::backward`] (the dropout mask is
    /// regenerated from its seed). Nothing without an adapter.
    pub fn grad_a(&self, g: &mut Gemm, k: &Kernels, x: u64, t: Option<LowGrad>) -> Result<()> {
        if let (Some(l), Some(t)) = (self.lora, t) {
            let (n, i) = (self.n, self.inp);
            let xa = self.adapter_input(g, k, &l, x)?;
            let to = (l.grad_a, 1.0);
            grad_a_product(g, (n, i), (t.ptr, t.ld), xa, l.r, to, t.alpha)?;
        }
        Ok(())
    }
}

/// `low = alpha·x·Aᵀ` `[N, rows]` (rows `low.1` apart), with `x` `[N, inp]` (address, row
/// stride) and `A` `[rows, inp]`: one adapter's (`rows = r`) or a stack of adapters sharing `x`
/// (`rows = count·r`, their `low`s side by side).
pub fn lows_product(
    g: &mut Gemm,
    (n, inp): (usize, usize),
    x: (u64, usize),
    a: u64,
    rows: usize,
    low: (u64, usize),
    alpha: f32,
) -> Result<()> {
    mm(
        g,
        n,
        rows,
        inp,
        Operand::new(x.0, x.1),
        Operand::new(a, inp).t(),
        Output::new(low.0, low.1, OutType::Bf16),
        alpha,
        0.0,
    )
}

/// `dx = alpha·T·A + beta·dx` `[N, inp]` (`dx`: address and `beta`), with `T` `[N, rows]`
/// (address, row stride) and `A` `[rows, inp]`: one adapter's input-gradient term or a stack's
/// ([`DxTerm::Stacked`], their `t`s side by side).
pub fn dx_product(
    g: &mut Gemm,
    (n, inp): (usize, usize),
    t: (u64, usize),
    a: u64,
    rows: usize,
    (dx, beta): (u64, f32),
    alpha: f32,
) -> Result<()> {
    mm(
        g,
        n,
        inp,
        rows,
        Operand::new(t.0, t.1),
        Operand::new(a, inp),
        Output::new(dx, inp, OutType::Bf16),
        alpha,
        beta,
    )
}

/// `out = alpha·Tᵀ·x + beta·out`, fp32 `[rows, inp]` (`out`: address and `beta`), with `T`
/// `[N, rows]` and `x` `[N, inp]` (address, row stride each): one adapter's `dA` or a stack's,
/// whose `[r, inp]` blocks then go to each adapter's gradient
/// ([`super::stacks::Stacks::grad_a`]).
pub fn grad_a_product(
    g: &mut Gemm,
    (n, inp): (usize, usize),
    t: (u64, usize),
    x: (u64, usize),
    rows: usize,
    (out, beta): (u64, f32),
    alpha: f32,
) -> Result<()> {
    mm(
        g,
        rows,
        inp,
        n,
        Operand::new(t.0, t.1).t(),
        Operand::new(x.0, x.1),
        Output::new(out, inp, OutType::F32),
        alpha,
        beta,
    )
}
