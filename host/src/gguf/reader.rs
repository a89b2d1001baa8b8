//! A GGUF v2/v3 reader for the files this module writes: metadata, tensor infos, and tensor data
//! read on demand (one tensor at a time). Used by the round-trip tests and `ferrotune` checks;
//! the independent check is the `gguf` Python package (tests/python/check_gguf.py).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::quant;
use super::types::GgmlType;
use super::value::{Value, ValueType};
use super::writer::{align_up, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC};

#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    /// Row-major shape (ggml's `ne` reversed).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorEntry {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorEntry>,
    pub data_start: u64,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut r = BufReader::new(file);
        Self::parse(&mut r, path)
            .with_context(|| format!("{} is not a valid GGUF file", path.display()))
    }

    fn parse(r: &mut BufReader<File>, path: &Path) -> Result<Self> {
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)?;
        ensure!(&magic == MAGIC, "bad magic {magic:?}");
        let version = read_u32(r)?;
        ensure!(
            version == 2 || version == 3,
            "unsupported GGUF version {version}"
        );
        let n_tensors = read_u64(r)?;
        let n_kv = read_u64(r)?;
        let mut metadata = Vec::new();
        for _ in 0..n_kv {
            let key = read_string(r)?;
            let value = read_value(r)?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = read_string(r)?;
            let n_dims = read_u32(r)? as usize;
            ensure!(
                (1..=4).contains(&n_dims),
                "tensor {name}: {n_dims} dimensions"
            );
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(read_u64(r)? as usize);
            }
            ne.reverse();
            let id = read_u32(r)?;
            let ty = GgmlType::from_id(id)
                .with_context(|| format!("tensor {name}: ggml type {id} not supported here"))?;
            let offset = read_u64(r)?;
            tensors.push(TensorEntry {
                name,
                shape: ne,
                ty,
                offset,
            });
        }
        let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some((_, Value::U32(a))) => *a as usize,
            Some(_) => bail!("{ALIGNMENT_KEY} is not a u32"),
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = align_up(r.stream_position()?, alignment);
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn read_tensor_bytes(&self, t: &TensorEntry) -> Result<Vec<u8>> {
        let row = *t.shape.last().unwrap_or(&1);
        let len = t.ty.row_bytes(row)? * (t.n_elements() / row.max(1));
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.data_start + t.offset))?;
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf)
            .with_context(|| format!("tensor {}: data truncated", t.name))?;
        Ok(buf)
    }

    /// The tensor's values, dequantized with this module's own decoders.
    pub fn read_tensor_f32(&self, t: &TensorEntry) -> Result<Vec<f32>> {
        let bytes = self.read_tensor_bytes(t)?;
        quant::dequantize(t.ty, &bytes, t.n_elements())
    }
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_string(r: &mut impl Read) -> Result<String> {
    let len = read_u64(r)? as usize;
    ensure!(len < 1 << 30, "string of {len} bytes");
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    String::from_utf8(b).context("string is not UTF-8")
}

fn read_n<const N: usize>(r: &mut impl Read) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_scalar(r: &mut impl Read, ty: ValueType) -> Result<Value> {
    Ok(match ty {
        ValueType::U8 => Value::U8(read_n::<1>(r)?[0]),
        ValueType::I8 => Value::I8(read_n::<1>(r)?[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(read_n(r)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(read_n(r)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(read_n(r)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(read_n(r)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(read_n(r)?)),
        ValueType::Bool => Value::Bool(read_n::<1>(r)?[0] != 0),
        ValueType::String => Value::String(read_string(r)?),
        ValueType::U64 => Value::U64(u64::from_le_bytes(read_n(r)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(read_n(r)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(read_n(r)?)),
        ValueType::Array => bail!("nested arrays are not supported"),
    })
}

fn read_value(r: &mut impl Read) -> Result<Value> {
    let tag = read_u32(r)?;
    let ty = ValueType::from_tag(tag).with_context(|| format!("unknown value type {tag}"))?;
    if ty != ValueType::Array {
        return read_scalar(r, ty);
    }
    let elem_tag = read_u32(r)?;
    let elem =
        ValueType::from_tag(elem_tag).with_context(|| format!("unknown array type {elem_tag}"))?;
    let n = read_u64(r)? as usize;
    ensure!(n < 1 << 28, "array of {n} elements");
    Ok(match elem {
        ValueType::U32 => Value::ArrayU32((0..n).map(|_| read_u32(r)).collect::<Result<_>>()?),
        ValueType::I32 => Value::ArrayI32(
            (0..n)
                .map(|_| Ok(i32::from_le_bytes(read_n(r)?)))
                .collect::<Result<_>>()?,
        ),
        ValueType::F32 => Value::ArrayF32(
            (0..n)
                .map(|_| Ok(f32::from_le_bytes(read_n(r)?)))
                .collect::<Result<_>>()?,
        ),
        ValueType::String => {
            Value::ArrayString((0..n).map(|_| read_string(r)).collect::<Result<_>>()?)
        }
        other => bail!("arrays of {other:?} are not supported by this reader"),
    })
}
