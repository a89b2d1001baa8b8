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

/// The chat template of the SentencePiece test tokenizer (Llama 2's `[INST]` shape).
pub const LLAMA2_CHAT_TEMPLATE: &str = "{% for m in messages %}{% if m['role'] == 'user' %}\
{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}\
{% endif %}{% endfor %}";

/// Writes the tokenizer files of a SentencePiece BPE vocabulary like Llama 2's, as transformers'
/// SentencePiece → fast converter writes them: `<unk> <s> </s>`, the 256 byte pieces
/// `<0x00>…<0xFF>`, then `learned` pieces trained on `texts` (word-initial `▁`), scored `-id` as
/// SentencePiece scores BPE pieces; the merges derived from the scores by brute force over all
/// pairs of pieces (best score of the piece they make first, longer left part first), the legacy
/// `Prepend("▁")` + `Replace(" ", "▁")` normaliser, the byte-fallback decoder and a BOS
/// post-processor. Returns the pieces, for a `tokenizer.model` (`gguf::sentencepiece`). GGUF base
/// model tests use it as the original a SentencePiece GGUF must reproduce.
pub fn write_sentencepiece_tokenizer_files<S: AsRef<str> + Sync>(
    dir: &Path,
    texts: &[S],
    learned: usize,
) -> Result<Vec<crate::gguf::sentencepiece::Piece>> {
    use crate::gguf::sentencepiece::{Piece, PieceType};
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::{DecoderWrapper, NormalizerWrapper, PostProcessorWrapper};

    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(learned)
        .min_frequency(2)
        .show_progress(false)
        .build();
    let mut trained = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        Metaspace,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)))
    .build()
    .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
    trained
        .train(&mut trainer, texts.iter().map(|t| -> &str { t.as_ref() }))
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let mut by_id: Vec<(String, u32)> = trained.get_vocab(false).into_iter().collect();
    by_id.sort_by_key(|(_, id)| *id);

    let mut texts_of: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    texts_of.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    texts_of.extend(by_id.into_iter().map(|(t, _)| t));
    let pieces: Vec<Piece> = texts_of
        .iter()
        .enumerate()
        .map(|(id, text)| Piece {
            text: text.clone(),
            score: if id < 3 { 0.0 } else { -(id as f32) },
            kind: match id {
                0 => PieceType::Unknown,
                1 | 2 => PieceType::Control,
                3..259 => PieceType::Byte,
                _ => PieceType::Normal,
            },
        })
        .collect();
    let id_of: std::collections::HashMap<&str, usize> = texts_of
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, usize)> = Vec::new();
    for (a, left) in texts_of.iter().enumerate() {
        for (b, right) in texts_of.iter().enumerate() {
            if let Some(&made) = id_of.get(format!("{left}{right}").as_str()) {
                merges.push((a, b, made));
            }
        }
    }
    merges.sort_by(|x, y| {
        pieces[y.2].score.total_cmp(&pieces[x.2].score).then(
            texts_of[y.0]
                .chars()
                .count()
                .cmp(&texts_of[x.0].chars().count()),
        )
    });
    let vocab: serde_json::Map<String, serde_json::Value> = texts_of
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), serde_json::json!(i)))
        .collect();
    let special = |id: usize| {
        serde_json::json!({"id": id, "content": texts_of[id], "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    };
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|m| serde_json::json!([texts_of[m.0], texts_of[m.1]]))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0), special(1), special(2)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let config = serde_json::json!({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": true, "add_eos_token": false, "legacy": true,
        "chat_template": LLAMA2_CHAT_TEMPLATE,
    });
    let map = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"});
    for (name, value) in [
        ("tokenizer.json", tokenizer),
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", map),
    ] {
        std::fs::write(dir.join(name), value.to_string())
            .with_context(|| format!("{}: cannot write {name}", dir.display()))?;
    }
    Ok(pieces)
}
