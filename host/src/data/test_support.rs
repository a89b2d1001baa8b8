//! Fixtures for the data pipeline's tests: a tiny tokenizer trained once per test binary, model
//! directories holding it, and a formatter like the built-in `alpaca` one.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

use super::sample::Sample;
use super::tiny_tokenizer::{train_tiny_tokenizer, write_tokenizer_files};
use super::tokenize::TokenizerInfo;

/// Text the tiny tokenizer is trained on: the words the tests use, so they tokenize compactly.
const CORPUS: &[&str] = &[
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response:",
    "What is the capital of France? The capital of France is Paris.",
    "Add two and three. Two plus three is five.",
    "hello world, hello there. How are you? I am fine, thank you.",
    "user assistant system You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
];

/// The tiny tokenizer (trained on first use).
pub fn tiny_tokenizer() -> Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| train_tiny_tokenizer(CORPUS, 400).expect("training the tiny tokenizer"))
        .clone()
}

/// Writes a model directory's tokenizer files (Llama-3 template, BOS/EOS/PAD) into `dir`.
pub fn write_model_dir(dir: &Path) {
    write_tokenizer_files(dir, &tiny_tokenizer(), 2048).expect("writing tokenizer files");
}

/// [`TokenizerInfo`] of a fresh model directory in a temporary folder.
pub fn tiny_info() -> TokenizerInfo {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path());
    TokenizerInfo::load(dir.path()).unwrap()
}

/// A stand-in for the `alpaca` formatter plugin: instruction/input/output → the unsloth-cli text
/// (without EOS, which the host appends). A row missing a column is an error naming it, as the
/// plugin reports it.
pub fn alpaca_formatter(rows: &[String]) -> Result<Vec<(usize, Sample)>> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let v: serde_json::Value = serde_json::from_str(row)?;
            let col = |c: &str| {
                v.get(c)
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("row {i}: missing column {c:?}"))
            };
            let text = format!(
                "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}",
                col("instruction")?,
                col("input")?,
                col("output")?
            );
            Ok((i, Sample::Text { text }))
        })
        .collect()
}

/// A stand-in for the `text` formatter: the `text` column as a text sample.
pub fn text_formatter(rows: &[String]) -> Result<Vec<(usize, Sample)>> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let v: serde_json::Value = serde_json::from_str(row)?;
            let text = v["text"]
                .as_str()
                .ok_or_else(|| anyhow!("row {i}: missing column \"text\""))?;
            Ok((
                i,
                Sample::Text {
                    text: text.to_string(),
                },
            ))
        })
        .collect()
}

/// Writes a snappy-compressed Parquet file of UTF-8 string columns.
pub fn write_parquet(path: &Path, columns: &[(&str, &[&str])]) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let fields: String = columns
        .iter()
        .map(|(name, _)| format!("REQUIRED BYTE_ARRAY {name} (UTF8);"))
        .collect();
    let schema = std::sync::Arc::new(
        parquet::schema::parser::parse_message_type(&format!("message m {{ {fields} }}")).unwrap(),
    );
    let props = std::sync::Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut writer =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut column) = group.next_column().unwrap() {
        let values: Vec<ByteArray> = columns[i].1.iter().map(|v| ByteArray::from(*v)).collect();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        column.close().unwrap();
        i += 1;
    }
    group.close().unwrap();
    writer.close().unwrap();
}
