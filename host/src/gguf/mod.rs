//! Native GGUF (llama.cpp's model format): a streaming v3 writer, ggml's quantization types
//! bit-exact with its reference quantizers, and the llama-family conversion (tensor names,
//! hyper-parameter and tokenizer metadata, per-tensor type choice of each preset).
//! See docs/export.md for what each preset writes.

pub mod arch;
pub mod convert;
pub mod names;
pub mod preset;
pub mod quant;
pub mod reader;
pub mod sentencepiece;
pub mod tokenizer;
pub mod types;
pub mod value;
pub mod writer;

pub use reader::GgufFile;
pub use types::GgmlType;
pub use value::Value;
pub use writer::{GgufWriter, TensorInfo};
