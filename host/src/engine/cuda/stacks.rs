//! The LoRA `A`s of the projections that read one input (q/k/v the first RMSNorm's output,
//! gate/up the second's), stacked per layer, so one GEMM computes all their `x·Aᵀ` in the
//! forward and one adds all their input-gradient terms in the backward, instead of one skinny
//! GEMM each (perf-notes §18). The stacks are copies of the bf16 shadows, refreshed before each
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

/// Per layer `[A_q; A_k; A_v]` then `[A_gate; A_up]` (each present group; rows `hidden` wide).
pub struct Stacks {
    buf: CudaSlice<bf16>,
    /// fp32 `[rows, hidden]` of the largest group: its stacked `dA` before it is split.
    grad_scratch: CudaSlice<f32>,
    r: usize,
    hidden: usize,
    present: [bool; 2],
}

impl Stacks {
    /// Stacks for the groups in `present` (indexed as [`Stack::ALL`]) of `layers` layers; `None`
    /// when no group is stacked.
    pub fn new(
        stream: &Arc<CudaStream>,
        layers: usize,
        hidden: usize,
        r: usize,
        present: [bool; 2],
    ) -> Result<Option<Self>> {
        if !present.contains(&true) {
            return Ok(None);
        }
        let rows: usize = Stack::ALL
            .iter()
            .filter(|&&st| present[st as usize])
            .map(|st| st.members().len() * r)
            .sum();
        let widest = Stack::ALL
            .iter()
            .filter(|&&st| present[st as usize])
            .map(|st| st.members().len() * r)
            .max()
            .unwrap_or(0);
        Ok(Some(Stacks {
            buf: stream.alloc_zeros(layers * rows * hidden)?,
            grad_scratch: stream.alloc_zeros(widest * hidden)?,
            r,
            hidden,
            present,
        }))
    }

    fn per_layer(&self) -> usize {
        Stack::ALL
            .iter()
            .filter(|&&st| self.has(st))
            .map(|&st| self.rows(st) * self.hidden)
            .sum()
    }

    pub fn has(&self, st: Stack) -> bool {
        self.present[st as usize]
    }

    /// Whether projection `j` is stacked, and in which group.
    pub fn of(&self, j: usize) -> Option<Stack> {
        Stack::ALL
            .into_iter()
            .find(|&st| self.has(st) && st.members().contains(&j))
    }

    /// Rows of a group's stack (`members · r`): also its `x·Aᵀ` columns.
    pub fn rows(&self, st: Stack) -> usize {
        st.members().len() * self.r
    }

    /// Address of layer `l`'s stack of `st` (which must be present).
    pub fn ptr(&self, stream: &CudaStream, l: usize, st: Stack) -> u64 {
        debug_assert!(self.has(st));
        let before = match st {
            Stack::Qkv => 0,
            Stack::GateUp if self.has(Stack::Qkv) => self.rows(Stack::Qkv) * self.hidden,
            Stack::GateUp => 0,
        };
        let at = l * self.per_layer() + before;
        self.buf.device_ptr(stream).0 + (at * std::mem::size_of::<bf16>()) as u64
    }

    /// The copies that refresh layer `l`'s stacks from the shadows (`a_of(j)`: projection `j`'s
    /// `A` `[r, hidden]`).
    pub fn copies(
        &self,
        stream: &CudaStream,
        l: usize,
        a_of: impl Fn(usize) -> u64,
    ) -> Vec<RowCopy> {
        let mut out = Vec::new();
        for st in Stack::ALL.into_iter().filter(|&st| self.has(st)) {
            let base = self.ptr(stream, l, st);
            for (i, j) in st.members().enumerate() {
                let at = (i * self.r * self.hidden * std::mem::size_of::<bf16>()) as u64;
                out.push(RowCopy {
                    dst: (base + at, self.hidden),
                    src: (a_of(j), self.hidden),
                    cols: self.hidden,
                    rows: self.r,
                });
            }
        }
        out
    }
}

impl Stacks {
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
        let (rows, block) = (self.rows(st), self.r * self.hidden);
        anyhow::ensure!(grads.len() == st.members().len(), "one gradient per member");
        let scratch = self.grad_scratch.device_ptr(&stream).0;
        linear::stacked_grad_a(g, (n, self.hidden), t, x, rows, scratch, alpha)?;
        // SAFETY: the scratch holds `rows · hidden` values (sized for the widest group); each
        // gradient is a distinct `[r, hidden]` slot of the trainable arena; all live, ordered by
        // this stream.
        unsafe {
            let src = Borrowed::<f32>::new(&stream, scratch, rows * self.hidden);
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
