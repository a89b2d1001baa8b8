//! The LoRA `A`s of the projections that read one input (q/k/v the first RMSNorm's output,
//! gate/up the second's), stacked per layer, so one GEMM computes all their `x·Aᵀ` in the
//! forward and one all their `dA` in the backward (and, for q/k/v, one adds their three
//! input-gradient terms to `dn`), instead of one skinny GEMM each (perf-notes §18). The stacks are copies of the bf16 shadows, refreshed before each
//! pass together with the fold copies ([`super::linear::Linear::fold_copies`]) by one batched
//! launch.

use std::ops::Range;
use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use ferrotune_kernels::device::{bf16, Kernels};

use super::gemm::Gemm;
use super::linear::{self, RowCopy};
use super::raw::Borrowed;

/// A group of projections (consecutive indices in `PROJECTIONS`) that share their input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    Qkv,
    GateUp,
}

impl Stack {
    pub const ALL: [Stack; 2] = [Stack::Qkv, Stack::GateUp];

    /// The projections it stacks, in order.
    pub fn members(self) -> Range<usize> {
        match self {
            Stack::Qkv => 0..3,
            Stack::GateUp => 4..6,
        }
    }
}

/// Where each layer's stacks sit in one buffer: per layer `[A_q; A_k; A_v]` then `[A_gate;
/// A_up]` (each present group; rows `hidden` wide), in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackLayout {
    r: usize,
    hidden: usize,
    present: [bool; 2],
}

impl StackLayout {
    /// The groups in `present` (indexed as [`Stack::ALL`]).
    pub fn new(r: usize, hidden: usize, present: [bool; 2]) -> Self {
        StackLayout { r, hidden, present }
    }

    pub fn has(&self, st: Stack) -> bool {
        self.present[st as usize]
    }

    fn groups(&self) -> impl Iterator<Item = Stack> + '_ {
        Stack::ALL.into_iter().filter(|&st| self.has(st))
    }

    /// Whether projection `j` is stacked, and in which group.
    pub fn of(&self, j: usize) -> Option<Stack> {
        self.groups().find(|st| st.members().contains(&j))
    }

    /// Rows of a group's stack (`members · r`): also its `x·Aᵀ` columns.
    pub fn rows(&self, st: Stack) -> usize {
        st.members().len() * self.r
    }

    fn per_layer(&self) -> usize {
        self.groups().map(|st| self.rows(st) * self.hidden).sum()
    }

    /// Rows of the widest present group (its `dA` scratch).
    fn widest(&self) -> usize {
        self.groups().map(|st| self.rows(st)).max().unwrap_or(0)
    }

    /// First element of layer `l`'s stack of `st` (which must be present).
    pub fn at(&self, l: usize, st: Stack) -> usize {
        debug_assert!(self.has(st));
        let before: usize = self
            .groups()
            .take_while(|&g| g != st)
            .map(|g| self.rows(g) * self.hidden)
            .sum();
        l * self.per_layer() + before
    }

    /// The copies that refresh layer `l`'s stacks (at `base`, the buffer's address) from the
    /// shadows (`a_of(j)`: projection `j`'s `A` `[r, hidden]`).
    pub fn copies(&self, base: u64, l: usize, a_of: impl Fn(usize) -> u64) -> Vec<RowCopy> {
        let bytes = |elements: usize| (elements * std::mem::size_of::<bf16>()) as u64;
        let mut out = Vec::new();
        for st in self.groups() {
            for (i, j) in st.members().enumerate() {
                out.push(RowCopy {
                    dst: (
                        base + bytes(self.at(l, st) + i * self.r * self.hidden),
                        self.hidden,
                    ),
                    src: (a_of(j), self.hidden),
                    cols: self.hidden,
                    rows: self.r,
                });
            }
        }
        out
    }
}

/// The stacks of every layer ([`StackLayout`]) and the scratch of a group's stacked `dA`.
pub struct Stacks {
    pub layout: StackLayout,
    buf: CudaSlice<bf16>,
    /// fp32 `[rows, hidden]` of the widest group: its stacked `dA` before it is split.
    grad_scratch: CudaSlice<f32>,
}

impl Stacks {
    /// Stacks of `layers` layers; `None` when no group is stacked.
    pub fn new(
        stream: &Arc<CudaStream>,
        layers: usize,
        layout: StackLayout,
    ) -> Result<Option<Self>> {
        if layout.widest() == 0 {
            return Ok(None);
        }
        Ok(Some(Stacks {
            layout,
            buf: stream.alloc_zeros(layers * layout.per_layer())?,
            grad_scratch: stream.alloc_zeros(layout.widest() * layout.hidden)?,
        }))
    }

    pub fn has(&self, st: Stack) -> bool {
        self.layout.has(st)
    }

    pub fn rows(&self, st: Stack) -> usize {
        self.layout.rows(st)
    }

    /// Address of layer `l`'s stack of `st`.
    pub fn ptr(&self, stream: &CudaStream, l: usize, st: Stack) -> u64 {
        let at = self.layout.at(l, st) * std::mem::size_of::<bf16>();
        self.buf.device_ptr(stream).0 + at as u64
    }

    /// [`StackLayout::copies`] into this buffer.
    pub fn copies(
        &self,
        stream: &CudaStream,
        l: usize,
        a_of: impl Fn(usize) -> u64,
    ) -> Vec<RowCopy> {
        self.layout.copies(self.buf.device_ptr(stream).0, l, a_of)
    }
}

impl Stacks {
    /// The group's `x·Aᵀ` of its shared input `x` (address, row stride) in one GEMM, scaled by
    /// `alpha`, into `low`: its members' `low`s side by side (`[N, rows]`).
    pub fn lows(
        &self,
        g: &mut Gemm,
        (l, st): (usize, Stack),
        n: usize,
        x: (u64, usize),
        low: u64,
        alpha: f32,
    ) -> Result<()> {
        let (rows, a) = (self.rows(st), self.ptr(g.stream(), l, st));
        linear::lows_product(g, (n, self.layout.hidden), x, a, rows, (low, rows), alpha)
    }

    /// The group's input-gradient terms in one GEMM: `dx += scale·T·[A…]`, with `T` its
    /// members' `t`s side by side (`[N, rows]` at `t`).
    pub fn dx(
        &self,
        g: &mut Gemm,
        (l, st): (usize, Stack),
        n: usize,
        t: u64,
        dx: u64,
        scale: f32,
    ) -> Result<()> {
        let (rows, a) = (self.rows(st), self.ptr(g.stream(), l, st));
        linear::dx_product(
            g,
            (n, self.layout.hidden),
            (t, rows),
            a,
            rows,
            (dx, 1.0),
            scale,
        )
    }

    /// The group's `dA`s from its `t`s side by side (`[N, rows]` at `t`) and its shared input
    /// `x` (address, row stride): one GEMM into the scratch (`alpha`: the LoRA scale, the `t`s
    /// being unscaled), one launch adding each member's block to its gradient (`grads`, fp32
    /// `[r, hidden]` each, in member order).
    #[allow(clippy::too_many_arguments)]
    pub fn grad_a(
        &mut self,
        g: &mut Gemm,
        k: &Kernels,
        st: Stack,
        n: usize,
        t: u64,
        x: (u64, usize),
        grads: &[u64],
        alpha: f32,
    ) -> Result<()> {
        let stream = g.stream().clone();
        let (r, hidden) = (self.layout.r, self.layout.hidden);
        let (rows, block) = (self.rows(st), r * hidden);
        anyhow::ensure!(grads.len() == st.members().len(), "one gradient per member");
        let scratch = self.grad_scratch.device_ptr(&stream).0;
        let to = (scratch, 0.0);
        linear::grad_a_product(g, (n, hidden), (t, rows), x, rows, to, alpha)?;
        // SAFETY: the scratch holds `rows · hidden` values (sized for the widest group); each
        // gradient is a distinct `[r, hidden]` slot of the trainable arena; all live, ordered by
        // this stream.
        unsafe {
            let src = Borrowed::<f32>::new(&stream, scratch, rows * hidden);
            let mut dst: Vec<Borrowed<f32>> = grads
                .iter()
                .map(|&p| Borrowed::<f32>::new(&stream, p, block))
                .collect();
            let mut views: Vec<_> = dst.iter_mut().map(|d| d.view_mut()).collect();
            k.add_blocks_f32(&stream, &src.view(), &mut views)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layer_holds_its_groups_back_to_back() {
        let both = StackLayout::new(16, 64, [true, true]);
        assert_eq!((both.rows(Stack::Qkv), both.rows(Stack::GateUp)), (48, 32));
        // Layer 2: past two layers of 80 rows; gate/up after q/k/v's 48 rows.
        assert_eq!(both.at(2, Stack::Qkv), 2 * 80 * 64);
        assert_eq!(both.at(2, Stack::GateUp), 2 * 80 * 64 + 48 * 64);
        assert_eq!(
            (0..7).map(|j| both.of(j)).collect::<Vec<_>>(),
            [
                Some(Stack::Qkv),
                Some(Stack::Qkv),
                Some(Stack::Qkv),
                None,
                Some(Stack::GateUp),
                Some(Stack::GateUp),
                None
            ]
        );
        // Only gate/up stacked: they start each layer, and q/k/v run alone.
        let gu = StackLayout::new(8, 64, [false, true]);
        assert_eq!(gu.at(3, Stack::GateUp), 3 * 16 * 64);
        assert_eq!(gu.of(0), None);
        assert_eq!(StackLayout::new(8, 64, [false, false]).widest(), 0);
    }

    #[test]
    fn refresh_copies_put_each_adapter_at_its_rows() {
        let layout = StackLayout::new(16, 64, [true, true]);
        let a_of = |j: usize| 0x10_0000 * (j as u64 + 1);
        let copies = layout.copies(0x1000, 1, a_of);
        // q, k, v, gate, up in member order, r rows of `hidden` each, dense.
        let dst: Vec<u64> = copies.iter().map(|c| c.dst.0).collect();
        let row = 2 * 64; // bytes per stack row
        let layer = 0x1000 + 80 * row;
        assert_eq!(
            dst,
            [
                layer,
                layer + 16 * row,
                layer + 32 * row,
                layer + 48 * row,
                layer + 64 * row
            ]
        );
        let src: Vec<u64> = copies.iter().map(|c| c.src.0).collect();
        assert_eq!(src, [a_of(0), a_of(1), a_of(2), a_of(4), a_of(5)]);
        assert!(copies
            .iter()
            .all(|c| (c.rows, c.cols, c.dst.1) == (16, 64, 64)));
    }
}
