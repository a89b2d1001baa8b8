//! The merged model as a [`TensorSource`]: each base tensor plus its LoRA update, computed in
//! f32 when read and rounded to the tensor's stored dtype, so a GGUF converted from it equals a
//! GGUF converted from the merged 16-bit save.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::peft::{LoraAdapter, LoraDelta};
use super::safetensors_dir::{SafetensorsDir, StoreDtype};
use crate::gguf::convert::TensorSource;

pub struct MergedModel<'a> {
    pub base: &'a SafetensorsDir,
    pub adapter: &'a LoraAdapter,
}

impl<'a> MergedModel<'a> {
    /// Checks that every adapter target exists in the base, so no update is silently dropped.
    pub fn new(base: &'a SafetensorsDir, adapter: &'a LoraAdapter) -> Result<Self> {
        for name in adapter.targets().chain(adapter.replaced()) {
            if base.meta(name).is_none() {
                bail!(
                    "adapter {} updates {name}, which the base model does not have; pass the base model the adapter was trained on",
                    adapter.dir.display()
                );
            }
        }
        Ok(MergedModel { base, adapter })
    }

    /// The merged tensor in f32, before rounding to its storage dtype.
    pub fn merged_f32(&self, name: &str) -> Result<Vec<f32>> {
        let meta = self
            .base
            .meta(name)
            .ok_or_else(|| anyhow::anyhow!("no tensor {name} in the base model"))?;
        if let Some(replacement) = self.adapter.replacement(name)? {
            if replacement.len() != meta.shape.iter().product::<usize>() {
                bail!(
                    "adapter tensor for {name} has {} values, the base {:?}",
                    replacement.len(),
                    meta.shape
                );
            }
            return Ok(replacement);
        }
        let mut w = self.base.read_f32(name)?;
        if let Some(delta) = self.adapter.delta(name, &meta.shape)? {
            add_low_rank(&mut w, meta.shape[1], &delta);
        }
        Ok(w)
    }

    /// The merged tensor rounded to `dtype` (in place, no second copy, on all cores), failing
    /// on the first value that is not finite there.
    pub fn merged_in(&self, name: &str, dtype: StoreDtype) -> Result<Vec<f32>> {
        const CHUNK: usize = 1 << 14;
        let mut w = self.merged_f32(name)?;
        let first_bad = w
            .par_chunks_mut(CHUNK)
            .enumerate()
            .filter_map(|(c, chunk)| {
                let mut bad = None;
                for (i, v) in chunk.iter_mut().enumerate() {
                    let before = *v;
                    *v = dtype.round(before);
                    if bad.is_none() && !v.is_finite() {
                        bad = Some((c * CHUNK + i, before, *v));
                    }
                }
                bad
            })
            .min_by_key(|(i, _, _)| *i);
        if let Some((i, before, v)) = first_bad {
            bail!(
                "{name}: value {i} is {v} after merging the adapter ({before} in f32); the adapter is diverged or the value overflows {} — check the training loss, or export a model stored in bfloat16/float32",
                dtype.name()
            );
        }
        Ok(w)
    }
}

/// `w[o, :] += scale · Σ_k B[o, k] · A[k, :]`, rows in parallel; the product is accumulated in
/// f32 before scaling, as PEFT's `weight + (B @ A) * scaling`.
pub fn add_low_rank(w: &mut [f32], inp: usize, d: &LoraDelta) {
    w.par_chunks_mut(inp).enumerate().for_each_init(
        || vec![0f32; inp],
        |acc, (o, row)| {
            acc.fill(0.0);
            for k in 0..d.r {
                let b = d.b[o * d.r + k];
                let a = &d.a[k * inp..(k + 1) * inp];
                for (s, &x) in acc.iter_mut().zip(a) {
                    *s += b * x;
                }
            }
            for (v, s) in row.iter_mut().zip(acc.iter()) {
                *v += s * d.scale;
            }
        },
    );
}

impl TensorSource for MergedModel<'_> {
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.base.tensors()
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let dtype = self
            .base
            .meta(name)
            .map(|m| m.dtype)
            .unwrap_or(StoreDtype::F32);
        self.merged_in(name, dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_rank_update_matches_a_dense_product() {
        // w 2×3, r 2: B = [[1,2],[3,4]], A = [[1,0,1],[0,1,1]].
        let mut w = vec![0.5f32; 6];
        let d = LoraDelta {
            a: vec![1., 0., 1., 0., 1., 1.],
            b: vec![1., 2., 3., 4.],
            r: 2,
            scale: 0.5,
        };
        add_low_rank(&mut w, 3, &d);
        assert_eq!(w, [1.0, 1.5, 2.0, 2.0, 2.5, 4.0]);
    }
}
