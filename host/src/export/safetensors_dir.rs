//! A Hugging Face model directory's safetensors weights, read one tensor at a time as f32 (bf16,
//! f16 and f32 storage; the NF4 weights of a pre-quantised bitsandbytes checkpoint are listed
//! with their 16-bit shape and dtype and dequantised when read, as `crate::model::bnb4` says).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::os::unix::fs::FileExt;

use super::bnb_nf4::{Nf4Weight, QuantState, RawTensor, QUANT_STATE_KEY};
use crate::gguf::convert::TensorSource;
use crate::model::bnb4::Prequantized;

/// Values per parallel work item when converting between f32 and a storage dtype: large enough
/// that scheduling costs nothing next to the conversion.
const PAR_MIN: usize = 1 << 14;

/// Storage dtypes the export path reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    BF16,
}

impl StoreDtype {
    /// The safetensors crate's dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            StoreDtype::F32 => safetensors::Dtype::F32,
            StoreDtype::F16 => safetensors::Dtype::F16,
            StoreDtype::BF16 => safetensors::Dtype::BF16,
        }
    }

    /// safetensors' dtype name in file headers.
    pub fn name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "F32",
            StoreDtype::F16 => "F16",
            StoreDtype::BF16 => "BF16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            _ => 2,
        }
    }

    /// Encodes f32 values in this dtype (round to nearest even), on all cores.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        use crate::gguf::quant::{f32_to_bf16_bits, f32_to_f16_bits};
        let size = self.size();
        let mut out = vec![0u8; values.len() * size];
        out.par_chunks_exact_mut(size)
            .zip(values.par_iter())
            .with_min_len(PAR_MIN)
            .for_each(|(o, &v)| match self {
                StoreDtype::F32 => o.copy_from_slice(&v.to_le_bytes()),
                StoreDtype::F16 => o.copy_from_slice(&f32_to_f16_bits(v).to_le_bytes()),
                StoreDtype::BF16 => o.copy_from_slice(&f32_to_bf16_bits(v).to_le_bytes()),
            });
        out
    }

    /// The nearest value this dtype stores (round to nearest even).
    pub fn round(self, v: f32) -> f32 {
        use crate::gguf::quant::{
            bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits,
        };
        match self {
            StoreDtype::F32 => v,
            StoreDtype::F16 => f16_bits_to_f32(f32_to_f16_bits(v)),
            StoreDtype::BF16 => bf16_bits_to_f32(f32_to_bf16_bits(v)),
        }
    }

    /// Decodes stored bytes to f32, on all cores.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; bytes.len() / self.size()];
        self.decode_into(bytes, &mut out);
        out
    }

    /// Decodes stored bytes into `out` (one value per `size()` bytes), on all cores.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        use crate::gguf::quant::{bf16_bits_to_f32, f16_bits_to_f32};
        let values = out.par_iter_mut().with_min_len(PAR_MIN);
        match self {
            StoreDtype::F32 => values
                .zip(bytes.par_chunks_exact(4))
                .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            StoreDtype::F16 => values
                .zip(bytes.par_chunks_exact(2))
                .for_each(|(o, b)| *o = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))),
            StoreDtype::BF16 => values
                .zip(bytes.par_chunks_exact(2))
                .for_each(|(o, b)| *o = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))),
        }
    }
}

/// Stored bytes read per positioned read when a tensor is decoded to f32: the f32 values and
/// one chunk are resident, never the whole stored tensor beside them (for a bf16 embedding of
/// a 128k vocabulary that would be another 0.5 GB at the export's peak).
const DECODE_CHUNK: usize = 16 << 20;

/// Reads `len` stored bytes of `dtype` at `start` of `file` and decodes them to f32, `chunk`
/// bytes (rounded down to whole values) at a time.
fn read_decoded(
    file: &File,
    start: u64,
    len: usize,
    dtype: StoreDtype,
    chunk: usize,
) -> std::io::Result<Vec<f32>> {
    let size = dtype.size();
    let chunk = (chunk / size).max(1) * size;
    let mut out = vec![0f32; len / size];
    let mut buf = vec![0u8; chunk.min(len)];
    for (i, values) in out.chunks_mut(chunk / size).enumerate() {
        let bytes = &mut buf[..values.len() * size];
        file.read_exact_at(bytes, start + (i * chunk) as u64)?;
        dtype.decode_into(bytes, values);
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StoreDtype,
    file: usize,
    /// Absolute byte range in the file.
    start: u64,
    len: usize,
}

/// Tensors are read with positioned reads into owned buffers rather than through a memory map:
/// resident memory then holds only the tensor being processed, not every page touched so far.
pub struct SafetensorsDir {
    files: Vec<(PathBuf, File)>,
    /// Tensors in file order, then data order.
    metas: Vec<TensorMeta>,
    by_name: HashMap<String, usize>,
    /// A pre-quantised bitsandbytes base: which metas are NF4, and the stored entries they are
    /// read from (codes and companions, by full name).
    nf4: Option<(Prequantized, HashMap<String, RawEntry>)>,
}

/// A stored entry that is not a 16/32-bit float tensor (4-bit codes, u8 absmax, quant state).
#[derive(Debug, Clone)]
struct RawEntry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    file: usize,
    start: u64,
    len: usize,
}

impl SafetensorsDir {
    /// Opens the safetensors files of a model directory (index shards or `model.safetensors`),
    /// a pre-quantised bitsandbytes 4-bit one included.
    pub fn open_model_dir(dir: &Path) -> Result<Self> {
        let (files, entries) = open_entries(crate::model::weights::safetensors_files(dir)?)?;
        let prequantized = Prequantized::detect(dir, entries.iter().map(|(n, _)| n.as_str()))?;
        let Some(prequantized) = prequantized else {
            return Self::from_entries(files, entries);
        };
        let (mut floats, mut raw) = (Vec::new(), HashMap::new());
        for (name, entry) in entries {
            if prequantized.is_nf4(&name) || prequantized.is_companion(&name) {
                raw.insert(name, entry.into_raw());
            } else {
                floats.push((name, entry));
            }
        }
        // Each NF4 weight is listed where its codes are stored, with the quant state's shape
        // and dtype: what a 16-bit save of the model holds there.
        let mut ordered = Vec::with_capacity(floats.len() + prequantized.weights.len());
        let mut out = Self::from_entries(files, floats)?;
        for name in &prequantized.weights {
            let state_name = format!("{name}.{QUANT_STATE_KEY}");
            let state = out.read_raw(&raw[&state_name], &state_name)?;
            let state = QuantState::parse(name, &state)?;
            let codes = raw
                .get(name)
                .with_context(|| format!("{name} is missing"))?;
            ordered.push(TensorMeta {
                name: name.clone(),
                shape: state.shape,
                dtype: state.dtype,
                file: codes.file,
                start: codes.start,
                len: 0,
            });
        }
        ordered.append(&mut out.metas);
        ordered.sort_by_key(|m| (m.file, m.start));
        out.by_name = ordered
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        out.metas = ordered;
        out.nf4 = Some((prequantized, raw));
        Ok(out)
    }

    pub fn open_files(paths: Vec<PathBuf>) -> Result<Self> {
        let (files, entries) = open_entries(paths)?;
        Self::from_entries(files, entries)
    }

    /// Float entries only: anything else is refused, naming the tensor and its dtype.
    fn from_entries(files: Vec<(PathBuf, File)>, entries: Vec<(String, Entry)>) -> Result<Self> {
        let mut metas = Vec::with_capacity(entries.len());
        let mut by_name = HashMap::new();
        for (name, entry) in entries {
            let meta = match entry {
                Entry::Float(m) => m,
                Entry::Raw(r) => bail!(
                    "{}: tensor {name} is {:?}; export reads F32, F16 and BF16 weights (and \
                     bitsandbytes NF4 weights with their quant state)",
                    files[r.file].0.display(),
                    r.dtype
                ),
            };
            by_name.insert(name, metas.len());
            metas.push(meta);
        }
        Ok(SafetensorsDir {
            files,
            metas,
            by_name,
            nf4: None,
        })
    }

    /// Whether tensor `name` is stored as NF4 (a pre-quantised base); [`Self::read_f32`]
    /// dequantises it.
    pub fn is_nf4(&self, name: &str) -> bool {
        self.nf4.as_ref().is_some_and(|(p, _)| p.is_nf4(name))
    }

    /// The pre-quantised base's `quantization_config`, if it is one.
    pub fn prequantized(&self) -> Option<&Prequantized> {
        self.nf4.as_ref().map(|(p, _)| p)
    }

    /// NF4 weight `name` as stored (codes and absmax, checked against config.json).
    pub fn read_nf4(&self, name: &str) -> Result<Nf4Weight> {
        let (p, raw) = self
            .nf4
            .as_ref()
            .with_context(|| format!("{name} is not a 4-bit weight"))?;
        p.read(name, None, |entry| {
            let Some(r) = raw.get(entry) else {
                return Ok(None);
            };
            Ok(Some(RawTensor {
                dtype: r.dtype,
                shape: r.shape.clone(),
                bytes: Cow::Owned(self.read_raw(r, entry)?),
            }))
        })
    }

    fn read_raw(&self, r: &RawEntry, name: &str) -> Result<Vec<u8>> {
        let (path, file) = &self.files[r.file];
        let mut buf = vec![0u8; r.len];
        file.read_exact_at(&mut buf, r.start)
            .with_context(|| format!("{}: cannot read tensor {name}", path.display()))?;
        Ok(buf)
    }

    pub fn metas(&self) -> &[TensorMeta] {
        &self.metas
    }

    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.by_name.get(name).map(|&i| &self.metas[i])
    }

    /// The stored bytes of one tensor (16/32-bit ones: an NF4 weight has no such bytes).
    pub fn bytes(&self, name: &str) -> Result<Vec<u8>> {
        let meta = self
            .meta(name)
            .with_context(|| format!("no tensor {name} in the weights"))?;
        if self.is_nf4(name) {
            bail!("{name} is stored 4-bit (NF4); read_f32 dequantises it");
        }
        let (path, file) = &self.files[meta.file];
        let mut buf = vec![0u8; meta.len];
        file.read_exact_at(&mut buf, meta.start)
            .with_context(|| format!("{}: cannot read tensor {name}", path.display()))?;
        Ok(buf)
    }
}

/// One header entry: a 16/32-bit float tensor, or another dtype the bitsandbytes layout uses.
enum Entry {
    Float(TensorMeta),
    Raw(RawEntry),
}

impl Entry {
    /// The entry as stored, whatever its dtype (a companion of a 4-bit weight may be F32).
    fn into_raw(self) -> RawEntry {
        match self {
            Entry::Float(m) => RawEntry {
                dtype: m.dtype.safetensors(),
                shape: m.shape,
                file: m.file,
                start: m.start,
                len: m.len,
            },
            Entry::Raw(r) => r,
        }
    }
}

/// Every entry of every file, in file order then data order, names unique across files.
#[allow(clippy::type_complexity)]
fn open_entries(paths: Vec<PathBuf>) -> Result<(Vec<(PathBuf, File)>, Vec<(String, Entry)>)> {
    let mut files = Vec::new();
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for path in paths {
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut entries = read_header(&file)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        entries.sort_by_key(|(_, e)| match e {
            Entry::Float(m) => m.start,
            Entry::Raw(r) => r.start,
        });
        for (name, mut entry) in entries {
            match &mut entry {
                Entry::Float(m) => m.file = files.len(),
                Entry::Raw(r) => r.file = files.len(),
            }
            if !seen.insert(name.clone()) {
                bail!("tensor {name} appears in two safetensors files");
            }
            out.push((name, entry));
        }
        files.push((path, file));
    }
    Ok((files, out))
}

/// Parses a safetensors header: u64 length, then JSON `{name: {dtype, shape, data_offsets}}`.
fn read_header(file: &File) -> Result<Vec<(String, Entry)>> {
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)?;
    let n = u64::from_le_bytes(len);
    let file_len = file.metadata()?.len();
    if n > 100 << 20 || 8 + n > file_len {
        bail!("header length {n} does not fit the file");
    }
    let mut text = vec![0u8; n as usize];
    file.read_exact_at(&mut text, 8)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = info["dtype"].as_str().unwrap_or("?");
        let dtype = match dtype_name {
            "F32" => Some(StoreDtype::F32),
            "F16" => Some(StoreDtype::F16),
            "BF16" => Some(StoreDtype::BF16),
            // Packed 4-bit codes, 8-bit absmax codes, quant state JSON (bitsandbytes).
            "U8" => None,
            other => bail!("tensor {name} is {other}; export reads F32, F16 and BF16 weights"),
        };
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .with_context(|| format!("tensor {name}: no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|d| d as usize)
                    .with_context(|| format!("tensor {name}: bad shape"))
            })
            .collect::<Result<_>>()?;
        let offsets = info["data_offsets"]
            .as_array()
            .with_context(|| format!("tensor {name}: no data_offsets"))?;
        let (begin, end) = match offsets.as_slice() {
            [b, e] => (b.as_u64().unwrap_or(u64::MAX), e.as_u64().unwrap_or(0)),
            _ => bail!("tensor {name}: bad data_offsets"),
        };
        let len = shape.iter().product::<usize>() * dtype.map_or(1, StoreDtype::size);
        if end < begin || end - begin != len as u64 || data_start + end > file_len {
            bail!("tensor {name}: data_offsets [{begin}, {end}] do not match its shape {shape:?} or the file");
        }
        let start = data_start + begin;
        let entry = match dtype {
            Some(dtype) => Entry::Float(TensorMeta {
                name: name.clone(),
                shape,
                dtype,
                file: 0,
                start,
                len,
            }),
            None => Entry::Raw(RawEntry {
                dtype: safetensors::Dtype::U8,
                shape,
                file: 0,
                start,
                len,
            }),
        };
        out.push((name, entry));
    }
    Ok(out)
}

impl TensorSource for SafetensorsDir {
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.metas
            .iter()
            .map(|m| (m.name.clone(), m.shape.clone()))
            .collect()
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let meta = self
            .meta(name)
            .with_context(|| format!("no tensor {name} in the weights"))?;
        if self.is_nf4(name) {
            // bitsandbytes' dequantize_4bit: exactly the values the cpu engine trains on.
            return Ok(self.read_nf4(name)?.dequantize());
        }
        let (path, file) = &self.files[meta.file];
        read_decoded(file, meta.start, meta.len, meta.dtype, DECODE_CHUNK)
            .with_context(|| format!("{}: cannot read tensor {name}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn chunked_reads_decode_like_one_read() {
        let values: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
        for dtype in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
            let stored = dtype.encode(&values);
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(b"header!").unwrap();
            file.write_all(&stored).unwrap();
            let whole = dtype.decode(&stored);
            assert_eq!(whole.len(), values.len());
            // Chunks below one value, odd sizes, a partial last chunk, one chunk for all.
            for chunk in [1, 2, 6, 7, 64, 1 << 20] {
                let got = read_decoded(&file, 7, stored.len(), dtype, chunk).unwrap();
                assert_eq!(got, whole, "{dtype:?}, chunk {chunk}");
            }
        }
    }
}
