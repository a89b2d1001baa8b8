//! Final artefacts from a trained adapter (DESIGN §1: … → checkpoint → export → publish):
//! the PEFT adapter, the merged 16-bit model in Hugging Face's layout, the merged model in
//! bitsandbytes' NF4 layout (`merged_4bit`), and GGUF files for
//! llama.cpp/Ollama (`crate::gguf`). Everything streams tensor by tensor from memory-mapped
//! safetensors, so memory stays near one tensor whatever the model size. See docs/export.md.

pub mod adapter;
pub mod bnb_nf4;
pub mod command;
pub mod hf_save;
pub mod merge;
pub mod peft;
pub mod progress;
pub mod publish;
pub mod push;
pub mod run;
pub mod safetensors_dir;
pub mod spooled_shards;

pub use run::{check_final_exports, run_exports, run_final_exports, ExportRequest};
