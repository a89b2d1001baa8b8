//! A layer's seven projections: where each frozen weight sits in its buffer with its adapter's
//! folds, and the [`Linear`] view (weight, adapter, bias, dropout, strides) every GEMM call of
//! the forward and backward takes.

use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr};
use ferrotune_kernels::device::bf16;

use super::buffers::LayerActs;
use super::linear::{self, Dropout, DxTerm, Fold, Linear, Lora};
use super::stacks::Stack;
use super::{BiasWeight, CudaBackend, ProjWeight};
use crate::engine::cpu::dropout::{site_seed, Site};
use crate::engine::cpu::EngineOptions;
use crate::job::PROJECTIONS;

/// Indices in [`PROJECTIONS`]: o_proj and down_proj (their `low`s are parked with the residual;
/// their input gradients fold their adapters), gate and up (their adapters fold into the
/// frozen GEMMs).
pub(super) const O_PROJ: usize = 3;
pub(super) const GATE_PROJ: usize = 4;
pub(super) const UP_PROJ: usize = 5;
pub(super) const DOWN_PROJ: usize = 6;

impl CudaBackend {
    /// Layer `l`'s seven projections in [`PROJECTIONS`] order: q, k, v, o, gate, up, down.
    pub(super) fn linears(
        &self,
        l: usize,
        tokens: usize,
        acts: &LayerActs,
    ) -> [Linear; PROJECTIONS.len()] {
        std::array::from_fn(|j| self.linear(l, j, tokens, acts))
    }

    pub(super) fn linear(&self, l: usize, j: usize, tokens: usize, acts: &LayerActs) -> Linear {
        let (inp, out) = self
            .cfg
            .projection_shape(PROJECTIONS[j])
            .expect("known projection");
        let s = &self.stream;
        let layer = &self.layers[l];
        let (base, nf4) = match (&layer.proj[j], &self.nf4) {
            (ProjWeight::Bf16(w), _) => (w.device_ptr(s).0, None),
            (ProjWeight::Nf4(q), Some((quant, buf))) => {
                (buf.device_ptr(s).0, Some(q.ptrs(s, &quant.maps)))
            }
            (ProjWeight::Nf4(_), None) => unreachable!("NF4 weights are loaded with their buffer"),
        };
        let has_lora = layer.lora[j].is_some();
        let layout = WeightLayout::of(self.fold_r, j, has_lora, (out, inp));
        let (w, w_ld) = (base + (2 * layout.at) as u64, layout.ld);
        // gate and up read the MLP's norm output, which sits between the fold columns; o and
        // down's output gradient is the residual's, with spare columns for the dx folds.
        let x_ld = match j {
            GATE_PROJ | UP_PROJ => self.norm2_layout().1,
            _ => inp,
        };
        let dy_ld = match j {
            O_PROJ | DOWN_PROJ => self.dres_ld(),
            _ => out,
        };
        let fold = fold_of(self.fold_r, j, has_lora);
        let stack = self.stacks.as_ref().and_then(|st| st.layout.of(j));
        let dx_term = match stack {
            _ if dx_folds(self.fold_r, j, has_lora) => DxTerm::Folded,
            // The gate/up input-gradient terms stay per projection (their t's land apart).
            Some(Stack::Qkv) => DxTerm::Stacked,
            _ => DxTerm::Add,
        };
        let r = self.options.r;
        // A stacked group's `low`s sit side by side in the first member's block.
        let (low, low_ld) = match stack {
            Some(st) => {
                let first = st.members().start;
                let at = (2 * (j - first) * r) as u64;
                (acts.low(s, first, tokens, r) + at, st.members().len() * r)
            }
            None => (acts.low(s, j, tokens, r), r),
        };
        let extras = self.extras.as_ref().expect("prepared with the buffers");
        let ptr16 = |x: &CudaSlice<bf16>| x.device_ptr(s).0;
        let bias = layer.bias[j].as_ref().map(|b| match b {
            BiasWeight::Frozen(v) => linear::Bias {
                value: ptr16(v),
                grad: None,
            },
            BiasWeight::Trainable(i) => {
                let (value, grad) = self.train.ptrs(s, *i);
                let ones = extras
                    .ones
                    .as_ref()
                    .expect("allocated for trainable biases");
                linear::Bias {
                    value,
                    grad: Some((grad, ptr16(ones))),
                }
            }
        });
        let dropout = self.dropout_pass.map(|pass| {
            let (threshold, scale) = ferrotune_kernels::reference::dropout::dropout_params(
                self.options.lora_dropout as f32,
            );
            let site = Site {
                pass,
                layer: l,
                module: j,
            };
            Dropout {
                seed: site_seed(self.options.dropout_seed, site),
                threshold,
                scale,
                scratch: ptr16(extras.dropout.as_ref().expect("allocated for dropout")),
            }
        });
        let lora = layer.lora[j].map(|(ia, ib)| {
            let (a, grad_a) = self.train.ptrs(s, ia);
            let (b, grad_b) = self.train.ptrs(s, ib);
            Lora {
                a,
                b,
                grad_a,
                grad_b,
                low,
                low_ld,
                r,
                scale: self.options.lora_scale() as f32,
                dropout,
            }
        });
        Linear {
            n: tokens,
            inp,
            out,
            w,
            w_ld,
            x_ld,
            dy_ld,
            nf4,
            bias,
            lora,
            fold,
            dx_term,
            nf4_ready: false,
        }
    }
}

/// The LoRA rank when the gate/up adapters fold into their frozen GEMMs ([`Fold`]): their
/// `r` columns must keep 16-byte rows (`r % 8 == 0`) and the input dense for dropout.
pub(super) fn fold_rank(o: &EngineOptions) -> Option<usize> {
    (o.r > 0 && o.r.is_multiple_of(8) && o.lora_dropout == 0.0).then_some(o.r)
}

/// How projection `j` folds its adapter (`has_lora`) when folding is on (`fold_r`): gate's
/// columns before its input, up's after, so both read one span of `[s·low_gate | x | s·low_up]`.
fn fold_of(fold_r: Option<usize>, j: usize, has_lora: bool) -> Option<Fold> {
    match (fold_r, j, has_lora) {
        (Some(_), GATE_PROJ, true) => Some(Fold::Before),
        (Some(_), UP_PROJ, true) => Some(Fold::After),
        _ => None,
    }
}

/// Whether projection `j`'s adapter (`has_lora`) folds into its input gradient when folding is
/// on (`fold_r`): o and down, whose output gradient is the residual's ([`DxTerm::Folded`]).
fn dx_folds(fold_r: Option<usize>, j: usize, has_lora: bool) -> bool {
    fold_r.is_some() && has_lora && matches!(j, O_PROJ | DOWN_PROJ)
}

/// Where projection `j`'s weight `[out, in]` sits in its device buffer with its folds: `W`
/// starts `at` elements in, its rows `ld` apart, the buffer `len` elements — `r` spare columns
/// on the side of a [`Fold`] (for `B`), `r` spare rows below for a [`dx_folds`] (for `A`). The
/// bf16 weights are stored so; NF4 ones are dequantised into this layout.
pub(super) struct WeightLayout {
    at: usize,
    ld: usize,
    pub(super) len: usize,
}

impl WeightLayout {
    pub(super) fn of(
        fold_r: Option<usize>,
        j: usize,
        has_lora: bool,
        (out, inp): (usize, usize),
    ) -> Self {
        let r = fold_r.unwrap_or(0);
        let (at, ld, len) = match fold_of(fold_r, j, has_lora) {
            Some(Fold::Before) => (r, inp + r, out * (inp + r)),
            Some(Fold::After) => (0, inp + r, out * (inp + r)),
            None if dx_folds(fold_r, j, has_lora) => (0, inp, (out + r) * inp),
            None => (0, inp, out * inp),
        };
        WeightLayout { at, ld, len }
    }

    /// Whether the buffer is larger than the weight's `numel` values.
    pub(super) fn padded(&self, numel: usize) -> bool {
        self.len > numel
    }

    /// A bf16 weight `[out, in]` moved into a buffer of this layout (the spare columns/rows take
    /// the adapter's B/A before each pass).
    pub(super) fn place(
        &self,
        stream: &Arc<CudaStream>,
        w: CudaSlice<bf16>,
        (out, inp): (usize, usize),
    ) -> Result<CudaSlice<bf16>> {
        let mut buf = stream.alloc_zeros::<bf16>(self.len)?;
        if self.ld == inp {
            // Spare rows only: W is the buffer's dense head.
            stream.memcpy_dtod(&w, &mut buf.slice_mut(..out * inp))?;
            stream.synchronize()?;
            return Ok(buf);
        }
        // A strided copy by the copy engine, not a kernel: the weights upload while the kernels
        // are still compiling (kernel_load.rs).
        let row_bytes = 2 * inp;
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: w.device_ptr(stream).0,
            srcArray: std::ptr::null_mut(),
            srcPitch: row_bytes,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: buf.device_ptr(stream).0 + (2 * self.at) as u64,
            dstArray: std::ptr::null_mut(),
            dstPitch: 2 * self.ld,
            WidthInBytes: row_bytes,
            Height: out,
        };
        // SAFETY: `out` rows of `inp` values from `w` into rows `ld` apart starting `at` in, all
        // inside `buf` (`len` covers them); both live until the stream is synchronised below.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }.result()?;
        stream.synchronize()?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::opts;
    use super::*;

    #[test]
    fn projection_indices_name_their_projections() {
        assert_eq!(PROJECTIONS[O_PROJ], "o_proj");
        assert_eq!(PROJECTIONS[GATE_PROJ], "gate_proj");
        assert_eq!(PROJECTIONS[UP_PROJ], "up_proj");
        assert_eq!(PROJECTIONS[DOWN_PROJ], "down_proj");
    }

    #[test]
    fn folded_weights_are_laid_out_with_their_spare_columns_or_rows() {
        let (r, shape) = (Some(16), (100, 64));
        let at_ld_len = |j| {
            let l = WeightLayout::of(r, j, true, shape);
            (l.at, l.ld, l.len)
        };
        assert_eq!(at_ld_len(GATE_PROJ), (16, 80, 100 * 80));
        assert_eq!(at_ld_len(UP_PROJ), (0, 80, 100 * 80));
        assert_eq!(at_ld_len(DOWN_PROJ), (0, 64, 116 * 64));
        assert_eq!(at_ld_len(0), (0, 64, 100 * 64));
        let plain = WeightLayout::of(None, GATE_PROJ, true, shape);
        assert_eq!((plain.at, plain.ld, plain.len), (0, 64, 100 * 64));
        assert!(!plain.padded(100 * 64) && WeightLayout::of(r, O_PROJ, true, shape).padded(6400));
    }

    #[test]
    fn gate_and_up_fold_on_either_side_of_their_input_only_with_an_aligned_rank_and_no_dropout() {
        let mut o = opts();
        o.r = 16;
        assert_eq!(fold_rank(&o), Some(16));
        assert_eq!(fold_of(Some(16), GATE_PROJ, true), Some(Fold::Before));
        assert_eq!(fold_of(Some(16), UP_PROJ, true), Some(Fold::After));
        assert_eq!(fold_of(Some(16), UP_PROJ, false), None);
        assert_eq!(fold_of(Some(16), O_PROJ, true), None);
        assert_eq!(fold_of(None, GATE_PROJ, true), None);
        assert!(dx_folds(Some(16), O_PROJ, true) && dx_folds(Some(16), DOWN_PROJ, true));
        assert!(!dx_folds(Some(16), DOWN_PROJ, false) && !dx_folds(None, O_PROJ, true));
        assert!(!dx_folds(Some(16), GATE_PROJ, true));
        o.r = 12;
        assert_eq!(fold_rank(&o), None);
        o.r = 16;
        o.lora_dropout = 0.05;
        assert_eq!(fold_rank(&o), None);
    }
}
