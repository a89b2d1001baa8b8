//! Typed GGUF metadata values and their little-endian encoding (GGUF v3).

use std::io::{self, Write};

/// GGUF's `gguf_type` tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_tag(tag: u32) -> Option<ValueType> {
        use ValueType::*;
        [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ]
        .into_iter()
        .find(|t| *t as u32 == tag)
    }
}

/// One metadata value. Arrays hold one element type (GGUF has no mixed arrays), which the
/// variants enforce; nested arrays are not needed by any key written here.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    ArrayU32(Vec<u32>),
    ArrayI32(Vec<i32>),
    ArrayF32(Vec<f32>),
    ArrayString(Vec<String>),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
            Value::ArrayU32(_)
            | Value::ArrayI32(_)
            | Value::ArrayF32(_)
            | Value::ArrayString(_) => ValueType::Array,
        }
    }

    /// Writes the type tag and the payload.
    pub fn write(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&(self.value_type() as u32).to_le_bytes())?;
        match self {
            Value::U8(v) => w.write_all(&[*v]),
            Value::I8(v) => w.write_all(&v.to_le_bytes()),
            Value::U16(v) => w.write_all(&v.to_le_bytes()),
            Value::I16(v) => w.write_all(&v.to_le_bytes()),
            Value::U32(v) => w.write_all(&v.to_le_bytes()),
            Value::I32(v) => w.write_all(&v.to_le_bytes()),
            Value::F32(v) => w.write_all(&v.to_le_bytes()),
            Value::Bool(v) => w.write_all(&[*v as u8]),
            Value::String(s) => write_string(w, s),
            Value::U64(v) => w.write_all(&v.to_le_bytes()),
            Value::I64(v) => w.write_all(&v.to_le_bytes()),
            Value::F64(v) => w.write_all(&v.to_le_bytes()),
            Value::ArrayU32(items) => write_array(w, ValueType::U32, items, |w, v| {
                w.write_all(&v.to_le_bytes())
            }),
            Value::ArrayI32(items) => write_array(w, ValueType::I32, items, |w, v| {
                w.write_all(&v.to_le_bytes())
            }),
            Value::ArrayF32(items) => write_array(w, ValueType::F32, items, |w, v| {
                w.write_all(&v.to_le_bytes())
            }),
            Value::ArrayString(items) => {
                write_array(w, ValueType::String, items, |w, v| write_string(w, v))
            }
        }
    }

    pub fn as_u32(&self) -> Option<u32> {
        match self {
            Value::U32(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// GGUF strings: u64 byte length, then UTF-8 bytes, no terminator.
pub fn write_string(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_array<W: Write, T>(
    w: &mut W,
    elem: ValueType,
    items: &[T],
    mut one: impl FnMut(&mut W, &T) -> io::Result<()>,
) -> io::Result<()> {
    w.write_all(&(elem as u32).to_le_bytes())?;
    w.write_all(&(items.len() as u64).to_le_bytes())?;
    for item in items {
        one(w, item)?;
    }
    Ok(())
}
