//! Named host tensors ↔ safetensors bytes (f32 and u8, little-endian), for adapters and
//! optimizer state.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};

use crate::engine::{HostData, HostTensor};

/// Serialises `tensors` with `metadata` in the safetensors header (PEFT writes `{"format":"pt"}`).
pub fn to_bytes(tensors: &[(String, HostTensor)], metadata: &[(&str, &str)]) -> Result<Vec<u8>> {
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, bytes) = match &t.data {
                HostData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                HostData::U8(v) => (Dtype::U8, v.clone()),
            };
            (name.clone(), dtype, t.shape.clone(), bytes)
        })
        .collect();
    let mut views = Vec::with_capacity(raw.len());
    for (name, dtype, shape, bytes) in &raw {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
            .with_context(|| format!("tensor {name}: shape {shape:?} does not fit its data"))?;
        views.push((name.as_str(), view));
    }
    let info: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize(views, Some(info)).context("serialising safetensors")
}

/// Reads every tensor of a safetensors file (f32, u8; bf16/f16 widened to f32), sorted by name.
pub fn read(path: &Path) -> Result<Vec<(String, HostTensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    from_bytes(&bytes).with_context(|| format!("{}: not a valid safetensors file", path.display()))
}

pub fn from_bytes(bytes: &[u8]) -> Result<Vec<(String, HostTensor)>> {
    let st = SafeTensors::deserialize(bytes)?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => HostData::F32(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::BF16 => HostData::F32(
                data.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            Dtype::F16 => HostData::F32(
                data.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            Dtype::U8 => HostData::U8(data.to_vec()),
            other => bail!("tensor {name}: dtype {other:?} is not supported here"),
        };
        out.push((
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data: values,
            },
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The header metadata of a safetensors file.
pub fn metadata(bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes)?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// `wanted`'s tensors from `found`, in `wanted`'s order, with matching shapes: what a resume
/// hands back to a backend that expects exactly its own parameter list.
pub fn align(
    found: Vec<(String, HostTensor)>,
    wanted: &[(String, Vec<usize>)],
    what: &str,
) -> Result<Vec<(String, HostTensor)>> {
    let mut by_name: HashMap<String, HostTensor> = found.into_iter().collect();
    let mut out = Vec::with_capacity(wanted.len());
    for (name, shape) in wanted {
        let tensor = by_name.remove(name).with_context(|| {
            format!("{what} has no tensor {name}: it was written for another model or LoRA setup")
        })?;
        if &tensor.shape != shape {
            bail!(
                "{what}: tensor {name} has shape {:?}, this run expects {shape:?} (another --r or model?)",
                tensor.shape
            );
        }
        out.push((name.clone(), tensor));
    }
    if let Some(extra) = by_name.keys().min() {
        bail!(
            "{what} has {} tensors this run does not train (e.g. {extra}); resume with the same \
             --target_modules and --bias",
            by_name.len()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_f32_and_u8_with_metadata() {
        let tensors = vec![
            (
                "b".to_string(),
                HostTensor {
                    shape: vec![2, 2],
                    data: HostData::F32(vec![1.0, -2.5, 3.25, f32::MIN_POSITIVE]),
                },
            ),
            (
                "a".to_string(),
                HostTensor {
                    shape: vec![3],
                    data: HostData::U8(vec![0, 7, 255]),
                },
            ),
        ];
        let bytes = to_bytes(&tensors, &[("format", "pt")]).unwrap();
        assert_eq!(metadata(&bytes).unwrap().get("format").unwrap(), "pt");
        let back = from_bytes(&bytes).unwrap();
        assert_eq!(back[0], tensors[1]);
        assert_eq!(back[1], tensors[0]);
    }

    #[test]
    fn align_names_what_does_not_match() {
        let t = |n: usize| HostTensor {
            shape: vec![n],
            data: HostData::F32(vec![0.0; n]),
        };
        let found = vec![("x".to_string(), t(2)), ("y".to_string(), t(3))];
        let ok = align(
            found.clone(),
            &[("y".into(), vec![3]), ("x".into(), vec![2])],
            "adapter",
        )
        .unwrap();
        assert_eq!(ok[0].0, "y");
        let err = align(found.clone(), &[("x".into(), vec![4])], "adapter").unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        let err = align(found.clone(), &[("z".into(), vec![2])], "adapter").unwrap_err();
        assert!(err.to_string().contains("no tensor z"), "{err}");
        let err = align(found, &[("x".into(), vec![2])], "adapter").unwrap_err();
        assert!(err.to_string().contains("does not train"), "{err}");
    }
}
