//! Dataset rows → training batches: `source` reads rows, the formatter plugin turns each row into
//! a [`Sample`], the chat template and tokenizer turn samples into token ids with a loss mask
//! (`encode`), and `batch` packs or pads them into [`crate::engine::Batch`]es. `pipeline` runs
//! the whole chain for the trainer ([`prepare`]).

pub mod batch;
pub mod display;
pub mod encode;
#[cfg(test)]
mod hf_parity;
pub mod identity;
pub mod pipeline;
pub mod raw_text;
pub mod sample;
pub mod source;
pub mod template;
#[cfg(test)]
mod test_support;
pub mod tiny_tokenizer;
pub mod tokenize;

pub use batch::{BatchOptions, Batcher, DataPosition, PositionedBatch};
pub use display::render_for_display;
pub use encode::{EncodeOptions, Encoder, TokenizedSample};
pub use pipeline::{
    prepare, prepare_with, preview, DataStats, PluginRows, PreparedData, RowFormatter,
};
pub use sample::{Message, Sample};
pub use template::ChatTemplate;
pub use tokenize::TokenizerInfo;
