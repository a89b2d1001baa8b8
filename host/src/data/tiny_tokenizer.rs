//! A small byte-level BPE tokenizer trained in-process, with Llama-3-style special tokens and the
//! Llama-3 chat template, written out as the files a Hugging Face model directory holds. `ferrotune
//! demo` builds its tiny model's tokenizer with it, and tests use it to run the real pipeline
//! without a downloaded model.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

pub const BOS: &str = "<|begin_of_text|>";
pub const EOS: &str = "<|end_of_text|>";
pub const PAD: &str = "<|finetune_right_pad_id|>";
pub const START_HEADER: &str = "<|start_header_id|>";
pub const END_HEADER: &str = "<|end_header_id|>";
pub const EOT: &str = "<|eot_id|>";

/// The special tokens, in id order (they take ids 0..6).
pub const SPECIAL_TOKENS: [&str; 6] = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT];

/// Meta's Llama-3 instruct chat template (BOS, header markers, `<|eot_id|>` after each turn).
pub const LLAMA3_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// Trains a byte-level BPE on `texts` with at most `vocab_size` entries (special tokens and the
/// 256 byte symbols included), whose post-processor prepends BOS like Llama 3's.
pub fn train_tiny_tokenizer<S: AsRef<str> + Sync>(
    texts: &[S],
    vocab_size: usize,
) -> Result<Tokenizer> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        tokenizers::NormalizerWrapper,
        ByteLevel,
        TemplateProcessing,
        ByteLevel,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(byte_level))
    .with_decoder(Some(byte_level))
    .build()
    .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
    tokenizer
        .train(&mut trainer, texts.iter().map(|t| -> &str { t.as_ref() }))
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let bos_id = tokenizer
        .token_to_id(BOS)
        .ok_or_else(|| anyhow!("trained tokenizer lacks {BOS}"))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(|e| anyhow!("{e}"))?
        .try_pair(format!("{BOS} $A {BOS} $B"))
        .map_err(|e| anyhow!("{e}"))?
        .special_tokens(vec![(BOS, bos_id)])
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    tokenizer.with_post_processor(Some(post));
    Ok(Tokenizer::from(tokenizer))
}

/// Writes `tokenizer.json`, `tokenizer_config.json` (special tokens + the Llama-3 chat template)
/// and `special_tokens_map.json` into `dir`, as transformers' `save_pretrained` would.
pub fn write_tokenizer_files(
    dir: &Path,
    tokenizer: &Tokenizer,
    model_max_length: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow!("{}: cannot write tokenizer.json: {e}", dir.display()))?;
    let added: serde_json::Map<String, serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .map(|t| {
            let id = tokenizer
                .token_to_id(t)
                .expect("special tokens are in the vocabulary");
            (
                id.to_string(),
                serde_json::json!({
                    "content": t, "lstrip": false, "normalized": false, "rstrip": false,
                    "single_word": false, "special": true
                }),
            )
        })
        .collect();
    let config = serde_json::json!({
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": true,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    });
    let map = serde_json::json!({ "bos_token": BOS, "eos_token": EOS, "pad_token": PAD });
    for (name, value) in [
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", map),
    ] {
        let text = serde_json::to_string_pretty(&value).expect("JSON values serialise");
        std::fs::write(dir.join(name), text + "\n")
            .with_context(|| format!("{}: cannot write {name}", dir.display()))?;
    }
    Ok(())
}
