//! QLoRA base weights (`--load_in_4bit`): each projection weight is NF4-quantised on the GPU at
//! load time with bitsandbytes' semantics (blocks of 64, absmax double-quantised: 8-bit codes
//! in blocks of 256 with the mean subtracted), and the bf16 copy is freed at once. A GEMM that
//! reads the weight first dequantises it into one bf16 buffer shared by every projection, so
//! the resident base weights cost ~0.52 bytes per parameter plus that one buffer.
//!
//! A pre-quantised bitsandbytes checkpoint (`*-bnb-4bit`, see `crate::model::bnb4`) needs no
//! quantisation: its packed codes, absmax codes, nested absmax and offset are this layout
//! already and are uploaded as stored; a checkpoint with plain f32 absmax keeps them plain.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use ferrotune_kernels::device::{
    bf16, Kernels, Nf4Absmax, Nf4DoubleQuant, QuantMaps, REDUCE_PARTS,
};
use ferrotune_kernels::quant::{signed_map, NF4_BLOCK, Q8_BLOCK};

use super::kernel_load::KernelLoad;
use super::raw::Borrowed;
use super::staging::Staging;
use super::weights::WeightFiles;
use super::{CudaBackend, ProjWeight};
use crate::export::bnb_nf4::{self, DoubleQuant};
use crate::export::safetensors_dir::StoreDtype;
use crate::job::PROJECTIONS;

/// One weight matrix in NF4.
pub struct Nf4Weight {
    pub numel: usize,
    /// Two 4-bit codes per byte `[numel/2]`.
    pub packed: CudaSlice<u8>,
    pub scales: Nf4Scales,
}

/// The block absmaxes of an [`Nf4Weight`].
pub enum Nf4Scales {
    /// Double-quantised (what `--load_in_4bit` makes, and most `*-bnb-4bit` checkpoints hold).
    Double(Box<DoubleScales>),
    /// fp32 absmax per block (a checkpoint saved with `bnb_4bit_use_double_quant=False`).
    Plain(CudaSlice<f32>),
}

/// Double-quantised block absmaxes: `code2[qabsmax[b]] * absmax2[b / 256] + offset`.
pub struct DoubleScales {
    /// 8-bit code of each 64-value block's absmax `[numel/64]`.
    pub qabsmax: CudaSlice<u8>,
    /// fp32 scale per 256 absmax codes.
    pub absmax2: CudaSlice<f32>,
    /// The mean subtracted from the absmax values before coding (device scalar).
    pub offset: CudaSlice<f32>,
    /// The codes' own code book, when a checkpoint stores one that differs from the shared
    /// signed dynamic map (bitsandbytes dequantises with the stored one).
    pub code2: Option<CudaSlice<f32>>,
}

/// Device addresses of an [`Nf4Weight`] (what a [`super::linear::Linear`] carries).
#[derive(Debug, Clone, Copy)]
pub struct Nf4Ptrs {
    pub numel: usize,
    pub packed: u64,
    pub scales: ScalePtrs,
}

/// Device addresses of [`Nf4Scales`].
#[derive(Debug, Clone, Copy)]
pub enum ScalePtrs {
    Double {
        qabsmax: u64,
        absmax2: u64,
        offset: u64,
        /// The absmax codes' code book (the signed dynamic map).
        code2: u64,
    },
    Plain(u64),
}

/// What quantisation needs besides the weight: the maps and reduction scratch.
pub struct Nf4Quantizer {
    pub maps: QuantMaps,
    partials: CudaSlice<f32>,
}

impl Nf4Quantizer {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(Nf4Quantizer {
            maps: QuantMaps::upload(stream)?,
            partials: stream.alloc_zeros(REDUCE_PARTS)?,
        })
    }

    /// Quantises `w` (consumed: its memory is released once the stream has quantised it).
    pub fn quantize(
        &mut self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        w: CudaSlice<bf16>,
        name: &str,
    ) -> Result<Nf4Weight> {
        let n = w.len();
        ensure!(
            n.is_multiple_of(NF4_BLOCK),
            "--load_in_4bit: {name} has {n} values, not a multiple of the NF4 block ({NF4_BLOCK})"
        );
        let blocks = n / NF4_BLOCK;
        let mut packed = stream.alloc_zeros::<u8>(n / 2)?;
        let mut absmax = stream.alloc_zeros::<f32>(blocks)?;
        kernels.nf4_quantize(
            stream,
            &w.slice(..),
            &mut packed.slice_mut(..),
            &mut absmax.slice_mut(..),
        )?;
        // Freed in stream order (cudarc frees asynchronously on the owning stream).
        drop(w);
        let mut qabsmax = stream.alloc_zeros::<u8>(blocks)?;
        let mut absmax2 = stream.alloc_zeros::<f32>(blocks.div_ceil(Q8_BLOCK))?;
        let mut offset = stream.alloc_zeros::<f32>(1)?;
        kernels.nf4_double_quantize(
            stream,
            &absmax.slice(..),
            &self.maps,
            &mut self.partials.slice_mut(..),
            &mut offset.slice_mut(..),
            &mut qabsmax.slice_mut(..),
            &mut absmax2.slice_mut(..),
        )?;
        drop(absmax);
        Ok(Nf4Weight {
            numel: n,
            packed,
            scales: Nf4Scales::Double(Box::new(DoubleScales {
                qabsmax,
                absmax2,
                offset,
                code2: None,
            })),
        })
    }
}

impl Nf4Weight {
    /// Uploads a weight of a pre-quantised checkpoint as stored: no requantisation, so the
    /// engine computes with exactly the values bitsandbytes would. Through the pinned staging
    /// buffers, like the bf16 weights (the driver's pageable path runs at about half the rate).
    pub fn upload(staging: &mut Staging, w: &bnb_nf4::Nf4Weight, name: &str) -> Result<Self> {
        let n = w.numel();
        if !n.is_multiple_of(NF4_BLOCK) {
            bail!(
                "{name}: {n} values, not a multiple of the NF4 block ({NF4_BLOCK}); the cuda \
                 engine's NF4 kernels need whole blocks"
            );
        }
        let scales = match &w.absmax {
            bnb_nf4::Nf4Absmax::Plain(a) => Nf4Scales::Plain(staging.upload(a)?),
            bnb_nf4::Nf4Absmax::Double(d) => Nf4Scales::Double(Box::new(DoubleScales {
                qabsmax: staging.upload(&d.codes)?,
                absmax2: staging.upload(&d.nested_absmax)?,
                offset: staging.upload(&[d.offset])?,
                code2: if d.code[..] == signed_map()[..] {
                    None
                } else {
                    Some(staging.upload(&d.code[..])?)
                },
            })),
        };
        Ok(Nf4Weight {
            numel: n,
            packed: staging.upload(&w.packed)?,
            scales,
        })
    }

    /// The weight in bitsandbytes' layout on the host (`shape` and `dtype` describe the
    /// weight it was quantised from): what a `merged_4bit` save would store for it.
    pub fn to_host(
        &self,
        stream: &Arc<CudaStream>,
        shape: &[usize],
        dtype: StoreDtype,
    ) -> Result<bnb_nf4::Nf4Weight> {
        let absmax = match &self.scales {
            Nf4Scales::Plain(a) => bnb_nf4::Nf4Absmax::Plain(stream.clone_dtoh(a)?),
            Nf4Scales::Double(d) => {
                let DoubleScales {
                    qabsmax,
                    absmax2,
                    offset,
                    code2,
                } = &**d;
                let code = match code2 {
                    Some(c) => stream.clone_dtoh(c)?,
                    None => signed_map().to_vec(),
                };
                bnb_nf4::Nf4Absmax::Double(DoubleQuant {
                    codes: stream.clone_dtoh(qabsmax)?,
                    nested_absmax: stream.clone_dtoh(absmax2)?,
                    offset: stream.clone_dtoh(offset)?[0],
                    code: Box::new(code.try_into().expect("256 values")),
                })
            }
        };
        Ok(bnb_nf4::Nf4Weight {
            shape: shape.to_vec(),
            dtype,
            packed: stream.clone_dtoh(&self.packed)?,
            absmax,
        })
    }

    pub fn ptrs(&self, stream: &CudaStream, maps: &QuantMaps) -> Nf4Ptrs {
        let ptr = |s: &CudaSlice<f32>| s.device_ptr(stream).0;
        let scales = match &self.scales {
            Nf4Scales::Plain(a) => ScalePtrs::Plain(ptr(a)),
            Nf4Scales::Double(d) => ScalePtrs::Double {
                qabsmax: d.qabsmax.device_ptr(stream).0,
                absmax2: ptr(&d.absmax2),
                offset: ptr(&d.offset),
                code2: ptr(d.code2.as_ref().unwrap_or(&maps.signed)),
            },
        };
        Nf4Ptrs {
            numel: self.numel,
            packed: self.packed.device_ptr(stream).0,
            scales,
        }
    }
}

/// Projection weight `name` (`shape` as config.json implies): NF4 as stored when the base is
/// pre-quantised (its 16-bit skip modules stay bf16, as bitsandbytes keeps them), else bf16,
/// NF4-quantised here when `quantizer` is given (`--load_in_4bit`).
pub(super) fn load_projection(
    staging: &mut Staging,
    kernels: &mut KernelLoad,
    files: &WeightFiles,
    quantizer: Option<&mut Nf4Quantizer>,
    name: &str,
    shape: &[usize],
) -> Result<ProjWeight> {
    let stream = &staging.stream().clone();
    if files.is_nf4(name) {
        let w = files.read_nf4(name, shape)?;
        return Ok(ProjWeight::Nf4(Nf4Weight::upload(staging, &w, name)?));
    }
    let w = files.upload(staging, name, shape)?;
    Ok(match quantizer.filter(|_| files.prequantized().is_none()) {
        // One projection at a time: its bf16 copy is gone before the next arrives.
        Some(q) => ProjWeight::Nf4(q.quantize(stream, kernels.ready()?, w, name)?),
        None => ProjWeight::Bf16(w),
    })
}

impl CudaBackend {
    /// Every NF4 projection weight, by its Hugging Face name, in bitsandbytes' layout on the
    /// host (parity tests: GPU-quantised against pre-quantised codes).
    pub fn nf4_weights(&self) -> Result<Vec<(String, bnb_nf4::Nf4Weight)>> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for (j, proj) in PROJECTIONS.iter().enumerate() {
                let ProjWeight::Nf4(w) = &layer.proj[j] else {
                    continue;
                };
                let group = if matches!(*proj, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
                    "self_attn"
                } else {
                    "mlp"
                };
                let (inp, out_f) = self.cfg.projection_shape(proj).context("projection")?;
                let name = format!("model.layers.{l}.{group}.{proj}.weight");
                out.push((
                    name,
                    w.to_host(&self.stream, &[out_f, inp], StoreDtype::BF16)?,
                ));
            }
        }
        Ok(out)
    }
}

impl Nf4Ptrs {
    /// Dequantises into the bf16 buffer at `out`: rows of `cols` values, `ld` apart (`ld >
    /// cols` leaves the folded LoRA B's columns between them).
    pub fn dequantize(
        &self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        (out, cols, ld): (u64, usize, usize),
    ) -> Result<()> {
        let n = self.numel;
        let out_len = (n / cols - 1) * ld + cols;
        let blocks = n / NF4_BLOCK;
        // SAFETY: every pointer comes from a live `Nf4Weight` (owned by the backend for its whole
        // life) or the shared dequantisation buffer sized for the largest projection with its folded
        // LoRA columns; all on
        // this stream, so no launch races with another.
        unsafe {
            let packed = Borrowed::<u8>::new(stream, self.packed, n / 2);
            let mut w = Borrowed::<bf16>::new(stream, out, out_len);
            match self.scales {
                ScalePtrs::Double {
                    qabsmax,
                    absmax2,
                    offset,
                    code2,
                } => {
                    let qabsmax = Borrowed::<u8>::new(stream, qabsmax, blocks);
                    let absmax2 = Borrowed::<f32>::new(stream, absmax2, blocks.div_ceil(Q8_BLOCK));
                    let offset = Borrowed::<f32>::new(stream, offset, 1);
                    let maps = BorrowedMaps::new(stream, code2);
                    let dq = Nf4DoubleQuant {
                        qabsmax: qabsmax.view(),
                        absmax2: absmax2.view(),
                        offset: offset.view(),
                    };
                    kernels.nf4_dequantize_rows(
                        stream,
                        &packed.view(),
                        Nf4Absmax::Double(&dq, &maps.maps),
                        (&mut w.view_mut(), cols, ld),
                        n,
                    )?;
                }
                ScalePtrs::Plain(absmax) => {
                    let absmax = Borrowed::<f32>::new(stream, absmax, blocks);
                    kernels.nf4_dequantize_rows(
                        stream,
                        &packed.view(),
                        Nf4Absmax::Plain(&absmax.view()),
                        (&mut w.view_mut(), cols, ld),
                        n,
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// A [`QuantMaps`] over a signed map owned elsewhere (the dequantiser reads only `signed`).
struct BorrowedMaps {
    maps: ManuallyDrop<QuantMaps>,
}

impl BorrowedMaps {
    /// # Safety
    /// `signed` must address the 256-value signed map for as long as this lives.
    unsafe fn new(stream: &Arc<CudaStream>, signed: u64) -> Self {
        BorrowedMaps {
            maps: ManuallyDrop::new(QuantMaps {
                signed: stream.upgrade_device_ptr(signed, 256),
                unsigned: stream.upgrade_device_ptr(signed, 256),
            }),
        }
    }
}

impl Drop for BorrowedMaps {
    fn drop(&mut self) {
        // SAFETY: taken once; `leak` gives the pointers up without freeing them.
        let maps = unsafe { ManuallyDrop::take(&mut self.maps) };
        let _ = maps.signed.leak();
        let _ = maps.unsigned.leak();
    }
}
