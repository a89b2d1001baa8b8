//! Frozen base weights straight from the safetensors files to the GPU as bf16.
//!
//! The cpu engine's loader (`crate::model::Weights`) converts everything to f32 in host memory,
//! which for an 8B model means 32 GB of RAM and seconds of conversion before anything reaches
//! the GPU. Here each file is memory-mapped and a bf16 tensor is copied to the device from the
//! mapping itself; f32/f16 tensors are rounded to bf16 on the way (round to nearest even).
//! The NF4 weights of a pre-quantised bitsandbytes checkpoint (`crate::model::bnb4`) are read
//! as stored, for `super::nf4` to upload without requantising.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cudarc::driver::CudaSlice;
use ferrotune_kernels::device::bf16;
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::staging::Staging;
use crate::export::bnb_nf4::{self, QuantState, RawTensor, QUANT_STATE_KEY};
use crate::model::bnb4::Prequantized;
use crate::model::weights::safetensors_files;

/// The memory-mapped safetensors files of one model directory and where each tensor lives.
pub struct WeightFiles {
    maps: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, usize>,
    /// Set when the directory is a pre-quantised bitsandbytes 4-bit checkpoint.
    prequantized: Option<Prequantized>,
}

impl WeightFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for file in safetensors_files(dir)? {
            let f = std::fs::File::open(&file)
                .with_context(|| format!("cannot open {}", file.display()))?;
            // SAFETY: mapped read-only; like every mmap loader we assume nobody truncates the
            // file while the model loads.
            let map = unsafe { Mmap::map(&f) }
                .with_context(|| format!("cannot map {}", file.display()))?;
            let st = SafeTensors::deserialize(&map).with_context(|| {
                format!(
                    "{}: not a valid safetensors file (corrupt or truncated?)",
                    file.display()
                )
            })?;
            for name in st.names() {
                if index.insert(name.to_string(), maps.len()).is_some() {
                    bail!(
                        "tensor {name:?} appears in more than one shard ({})",
                        file.display()
                    );
                }
            }
            maps.push((file, map));
        }
        let prequantized = Prequantized::detect(dir, index.keys().map(String::as_str))?;
        Ok(WeightFiles {
            maps,
            index,
            prequantized,
        })
    }

    /// The checkpoint's 4-bit weights, when it is a pre-quantised bitsandbytes one.
    pub fn prequantized(&self) -> Option<&Prequantized> {
        self.prequantized.as_ref()
    }

    /// Whether tensor `name` is stored as NF4 codes (read it with [`Self::read_nf4`]).
    pub fn is_nf4(&self, name: &str) -> bool {
        self.prequantized.as_ref().is_some_and(|p| p.is_nf4(name))
    }

    /// NF4 weight `name` as stored, checked against the shape config.json implies.
    pub fn read_nf4(&self, name: &str, shape: &[usize]) -> Result<bnb_nf4::Nf4Weight> {
        let p = self
            .prequantized
            .as_ref()
            .with_context(|| format!("{name} is not a 4-bit weight"))?;
        p.read(name, Some(shape), |entry| self.raw(entry))
    }

    /// Entry `name` as stored (`None`: no such entry).
    fn raw(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let st = SafeTensors::deserialize(&self.maps[i].1)?;
        let view = st.tensor(name)?;
        Ok(Some(RawTensor {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            bytes: Cow::Borrowed(view.data()),
        }))
    }

    /// Tensor `name` in its file (for messages) as stored, checked against the shape config.json
    /// implies.
    fn stored(&self, name: &str, shape: &[usize]) -> Result<(&Path, TensorView<'_>)> {
        let &i = self.index.get(name).with_context(|| {
            format!("weight {name:?} is missing from the model's safetensors files")
        })?;
        let (file, map) = &self.maps[i];
        let view = SafeTensors::deserialize(map)?.tensor(name)?;
        if view.shape() != shape {
            bail!(
                "weight {name:?} has shape {:?} but config.json implies {shape:?}",
                view.shape()
            );
        }
        Ok((file, view))
    }

    /// A weight the checkpoint stores 4-bit where the engine keeps a 16-bit one (a quantised
    /// `lm_head`, when `llm_int8_skip_modules` did not skip it): dequantised as bitsandbytes
    /// does, on the host.
    fn dequantized(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        if !self.is_nf4(name) {
            return Ok(None);
        }
        Ok(Some(self.read_nf4(name, shape)?.dequantize()))
    }

    /// Uploads tensor `name` as bf16, checking its shape against what config.json implies.
    pub fn upload(
        &self,
        staging: &mut Staging,
        name: &str,
        shape: &[usize],
    ) -> Result<CudaSlice<bf16>> {
        if let Some(v) = self.dequantized(name, shape)? {
            let v: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            return staging.upload(&v);
        }
        let (file, view) = self.stored(name, shape)?;
        let data = view.data();
        match view.dtype() {
            Dtype::BF16 => {
                // SAFETY: bf16 is a plain 16-bit value; every bit pattern is valid.
                let (head, body, tail) = unsafe { data.align_to::<bf16>() };
                if head.is_empty() && tail.is_empty() {
                    staging.upload(body)
                } else {
                    let v: Vec<bf16> = data
                        .chunks_exact(2)
                        .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                        .collect();
                    staging.upload(&v)
                }
            }
            Dtype::F32 => {
                let v: Vec<bf16> = data
                    .chunks_exact(4)
                    .map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect();
                staging.upload(&v)
            }
            Dtype::F16 => {
                let v: Vec<bf16> = data
                    .chunks_exact(2)
                    .map(|b| bf16::from_f32(half::f16::from_le_bytes([b[0], b[1]]).to_f32()))
                    .collect();
                staging.upload(&v)
            }
            other => bail!(
                "{}: tensor {name:?} is {other:?}; the cuda engine loads bf16, f16 or f32 weights",
                file.display()
            ),
        }
    }

    /// Tensor `name` as f32 on the host (small tensors the engine trains, e.g. biases).
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(v) = self.dequantized(name, shape)? {
            return Ok(v);
        }
        let (file, view) = self.stored(name, shape)?;
        let data = view.data();
        Ok(match view.dtype() {
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            other => bail!(
                "{}: tensor {name:?} is {other:?}; the cuda engine loads bf16, f16 or f32 weights",
                file.display()
            ),
        })
    }

    /// Total scalars of the model (for the parameter count in logs): an NF4 weight counts its
    /// 16-bit shape, its companion tensors nothing.
    pub fn numel(&self) -> Result<usize> {
        let mut n = 0;
        for (_, map) in &self.maps {
            let st = SafeTensors::deserialize(map)?;
            for (name, view) in st.tensors() {
                n += match &self.prequantized {
                    Some(p) if p.is_companion(&name) => 0,
                    Some(p) if p.is_nf4(&name) => {
                        let state = self
                            .raw(&format!("{name}.{QUANT_STATE_KEY}"))?
                            .with_context(|| format!("{name}: no quant state"))?;
                        QuantState::parse(&name, &state.bytes)?
                            .shape
                            .iter()
                            .product::<usize>()
                    }
                    _ => view.shape().iter().product::<usize>(),
                };
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::bnb_nf4::Nf4Weight;
    use crate::export::safetensors_dir::StoreDtype;
    use crate::model::bnb4::write_prequantized;
    use crate::model::tiny::{write_random_model, TinySpec};

    /// Host side only (no GPU): what the engine would upload from a pre-quantised checkpoint.
    #[test]
    fn prequantised_weights_are_read_as_stored_and_counted_at_their_16bit_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("bf16"), tmp.path().join("bnb-4bit"));
        let spec = TinySpec {
            dtype: candle_core::DType::BF16,
            ..TinySpec::default()
        };
        write_random_model(&src, &spec, 2).unwrap();
        write_prequantized(&src, &dst, true).unwrap();
        let (dense, files) = (
            WeightFiles::open(&src).unwrap(),
            WeightFiles::open(&dst).unwrap(),
        );
        assert!(dense.prequantized().is_none());
        assert_eq!(files.numel().unwrap(), dense.numel().unwrap());
        let (name, shape) = ("model.layers.0.mlp.down_proj.weight", [64, 96]);
        assert!(files.is_nf4(name) && !files.is_nf4("model.embed_tokens.weight"));
        let w = files.read_nf4(name, &shape).unwrap();
        let values = dense.read_f32(name, &shape).unwrap();
        assert_eq!(
            w,
            Nf4Weight::quantize(&values, &shape, StoreDtype::BF16).unwrap()
        );
        // A 16-bit read of a 4-bit tensor gets bitsandbytes' dequantisation.
        assert_eq!(files.read_f32(name, &shape).unwrap(), w.dequantize());
        let err = files.read_nf4(name, &[96, 64]).unwrap_err().to_string();
        assert!(err.contains("config.json implies [96, 64]"), "{err}"); // Dense reads check the shape and name a missing tensor.
        let err = dense.read_f32(name, &[96, 64]).unwrap_err().to_string();
        assert!(
            err.contains("has shape [64, 96] but config.json implies [96, 64]"),
            "{err}"
        );
        let err = dense.read_f32("model.nope", &[1]).unwrap_err().to_string();
        assert!(err.contains("\"model.nope\" is missing"), "{err}");
    }
}
