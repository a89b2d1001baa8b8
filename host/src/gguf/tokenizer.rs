//! Tokenizer metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) from a Hugging Face model
//! directory, as llama.cpp's converter derives it:
//! - byte-level BPE (Llama 3, Qwen2/3): model `gpt2`, `pre` identified by hashing the token ids
//!   of llama.cpp's pre-tokenizer probe text (`get_vocab_base_pre`), merges from tokenizer.json;
//! - SentencePiece vocabularies (Llama 2, Mistral: BPE with byte fallback; or a Unigram
//!   tokenizer.json): model `llama` with real scores, which llama.cpp's SPM tokenizer uses to pick
//!   the next merge. From `tokenizer.model` when the directory has one (the converter's
//!   `_create_vocab_sentencepiece`: its scores and types, added tokens CONTROL/USER_DEFINED with
//!   score -1000); else from a Unigram vocabulary's log-probabilities; else, for BPE with byte
//!   fallback, from the merge ranks (the token made by merge r scores -r, tokens no merge makes
//!   score below every merge). llama.cpp's `LlamaHfVocab` writes -1000 for every token there,
//!   which makes its SPM tokenizer merge left to right instead of by rank;
//! - special ids from tokenizer_config.json, else config.json; `add_bos_token`/`add_eos_token`
//!   from tokenizer.json's post-processor, else tokenizer_config.json; the chat template from
//!   tokenizer_config.json, chat_template.jinja or chat_template.json.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use super::sentencepiece::{self, Piece, PieceType};
use super::value::Value;

/// llama.cpp's `llama_token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum TokenType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// The probe text of llama.cpp's `get_vocab_base_pre` (convert_hf_to_gguf.py): its token ids
/// identify a BPE pre-tokenizer.
const PRE_PROBE: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// Probe digests of the pre-tokenizers of the model families trained here (from llama.cpp's
/// table in convert_hf_to_gguf.py; the reference model of each is named).
const KNOWN_PRE: [(&str, &str); 7] = [
    (
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
        "llama-bpe",
    ), // Meta-Llama-3-8B
    (
        "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d",
        "smaug-bpe",
    ), // Smaug-Llama-3-70B
    (
        "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
        "qwen2",
    ), // Qwen1.5-7B
    (
        "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c",
        "qwen2",
    ), // Qwen3-Embedding
    (
        "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e",
        "tekken",
    ), // Mistral-Nemo
    (
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
        "gpt-2",
    ), // gpt2
    (
        "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4",
        "gpt-2",
    ), // ruGPT3XL
];

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{} is not valid JSON", path.display())
    })?))
}

struct AddedToken {
    id: u32,
    content: String,
    special: bool,
}

/// Everything `tokenizer.*` for the model in `dir`; `vocab_size` is the embedding rows
/// (config.json), which may exceed the tokenizer's vocabulary (padding rows become UNUSED).
pub fn tokenizer_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let tok_path = dir.join("tokenizer.json");
    let tok = read_json(&tok_path)?.with_context(|| {
        format!(
            "{} is missing: GGUF export needs the Hugging Face fast tokenizer",
            tok_path.display()
        )
    })?;
    let tok_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let config = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);
    let model = &tok["model"];
    let unigram = match model["type"].as_str() {
        Some("BPE") => false,
        Some("Unigram") => true,
        _ => bail!(
            "{}: tokenizer model {:?} is neither BPE nor Unigram; GGUF export supports the tokenizers of the llama family",
            tok_path.display(),
            model["type"]
        ),
    };
    let added: Vec<AddedToken> = tok["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some(AddedToken {
                        id: t["id"].as_u64()? as u32,
                        content: t["content"].as_str()?.to_string(),
                        special: t["special"].as_bool().unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let mut by_id: HashMap<u32, String> = HashMap::new();
    // Unigram scores by id (`vocab: [[piece, log-probability], …]`, ids in list order).
    let mut unigram_scores: HashMap<u32, f32> = HashMap::new();
    if let Some(vocab) = model["vocab"].as_object() {
        for (text, id) in vocab {
            if let Some(id) = id.as_u64() {
                by_id.insert(id as u32, text.clone());
            }
        }
    } else if let Some(vocab) = model["vocab"].as_array() {
        for (id, entry) in vocab.iter().enumerate() {
            if let (Some(text), Some(score)) = (entry[0].as_str(), entry[1].as_f64()) {
                by_id.insert(id as u32, text.to_string());
                unigram_scores.insert(id as u32, score as f32);
            }
        }
    }
    for a in &added {
        by_id.insert(a.id, a.content.clone());
    }
    if let Some(max) = by_id.keys().max() {
        if *max as usize >= vocab_size {
            bail!(
                "{}: token id {max} does not fit the model's vocab_size {vocab_size}",
                tok_path.display()
            );
        }
    }
    let added_by_id: HashMap<u32, &AddedToken> = added.iter().map(|a| (a.id, a)).collect();

    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    let mut meta: Vec<(String, Value)> = Vec::new();
    let (mut tokens, mut types) = (
        Vec::with_capacity(vocab_size),
        Vec::with_capacity(vocab_size),
    );
    if byte_fallback || unigram {
        let spm_path = dir.join("tokenizer.model");
        let source = if spm_path.is_file() {
            SpmSource::Model(sentencepiece::read_pieces(&spm_path)?)
        } else if unigram {
            SpmSource::Unigram {
                scores: unigram_scores,
                unk_id: model["unk_id"].as_u64().map(|v| v as u32),
            }
        } else {
            SpmSource::MergeRanks(merge_rank_scores(model, &by_id)?)
        };
        if let SpmSource::Model(pieces) = &source {
            // Training tokenized with tokenizer.json: the GGUF must hold the same vocabulary.
            for (id, piece) in pieces.iter().enumerate() {
                if let Some(text) = by_id.get(&(id as u32)) {
                    if added_by_id.contains_key(&(id as u32)) || *text == piece.text {
                        continue;
                    }
                    bail!(
                        "{}: id {id} is {:?} there but {text:?} in tokenizer.json; the two files are from different tokenizers",
                        spm_path.display(),
                        piece.text
                    );
                }
            }
        }
        let mut scores = Vec::with_capacity(vocab_size);
        for id in 0..vocab_size as u32 {
            let (text, score, ty) = source.entry(id, by_id.get(&id), added_by_id.get(&id));
            tokens.push(text);
            types.push(ty as i32);
            scores.push(score);
        }
        meta.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        meta.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
        meta.push(("tokenizer.ggml.tokens".into(), Value::ArrayString(tokens)));
        meta.push(("tokenizer.ggml.scores".into(), Value::ArrayF32(scores)));
        meta.push(("tokenizer.ggml.token_type".into(), Value::ArrayI32(types)));
        if let Some(prefix) = tok_config["add_prefix_space"].as_bool() {
            meta.push((
                "tokenizer.ggml.add_space_prefix".into(),
                Value::Bool(prefix),
            ));
        }
    } else {
        for id in 0..vocab_size as u32 {
            let (text, ty) = match (by_id.get(&id), added_by_id.get(&id)) {
                (None, _) => (format!("[PAD{id}]"), TokenType::Unused),
                (Some(t), Some(a)) if a.special || looks_special(t) => {
                    (t.clone(), TokenType::Control)
                }
                (Some(t), Some(_)) => (t.replace('\u{2581}', " "), TokenType::UserDefined),
                (Some(t), None) => (t.clone(), TokenType::Normal),
            };
            tokens.push(text);
            types.push(ty as i32);
        }
        meta.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        meta.push((
            "tokenizer.ggml.pre".into(),
            Value::String(pre_tokenizer_name(&tok_path)?),
        ));
        meta.push(("tokenizer.ggml.tokens".into(), Value::ArrayString(tokens)));
        meta.push(("tokenizer.ggml.token_type".into(), Value::ArrayI32(types)));
    }
    let merges = merges(model).with_context(|| format!("{}: model.merges", tok_path.display()))?;
    if !merges.is_empty() {
        meta.push(("tokenizer.ggml.merges".into(), Value::ArrayString(merges)));
    }
    special_tokens(&tok, &tok_config, &config, &added, &mut meta);
    if let Some(template) = chat_template(dir, &tok_config)? {
        meta.push(("tokenizer.chat_template".into(), Value::String(template)));
    }
    Ok(meta)
}

/// Where a SentencePiece-style vocabulary's scores and types come from.
enum SpmSource {
    /// `tokenizer.model`.
    Model(Vec<Piece>),
    /// A Unigram tokenizer.json.
    Unigram {
        scores: HashMap<u32, f32>,
        unk_id: Option<u32>,
    },
    /// BPE with byte fallback and no tokenizer.model: scores by id from the merge ranks.
    MergeRanks(HashMap<u32, f32>),
}

impl SpmSource {
    /// (text, score, type) of token `id`: `text` from tokenizer.json, `added` if it is an
    /// added token there.
    fn entry(
        &self,
        id: u32,
        text: Option<&String>,
        added: Option<&&AddedToken>,
    ) -> (String, f32, TokenType) {
        match self {
            SpmSource::Model(pieces) => {
                // _create_vocab_sentencepiece: added tokens override the pieces with score -1000;
                // ids past the model are [PAD] with the converter's initial score -10000.
                if let Some(a) = added {
                    return if a.special || looks_special(&a.content) {
                        (a.content.clone(), -1000.0, TokenType::Control)
                    } else {
                        (
                            a.content.replace('\u{2581}', " "),
                            -1000.0,
                            TokenType::UserDefined,
                        )
                    };
                }
                match pieces.get(id as usize) {
                    Some(p) => {
                        let ty = match p.kind {
                            PieceType::Unknown => TokenType::Unknown,
                            PieceType::Control => TokenType::Control,
                            PieceType::Unused => TokenType::Unused,
                            PieceType::Byte => TokenType::Byte,
                            // The converter types user-defined pieces of the model NORMAL.
                            PieceType::Normal | PieceType::UserDefined => TokenType::Normal,
                        };
                        (p.text.clone(), p.score, ty)
                    }
                    None => (format!("[PAD{id}]"), -10000.0, TokenType::Unused),
                }
            }
            SpmSource::Unigram { scores, unk_id } => match (text, added) {
                (Some(t), Some(a)) => (t.clone(), -1000.0, added_type(a)),
                (Some(t), None) => {
                    let score = scores.get(&id).copied().unwrap_or(-1000.0);
                    let ty = if Some(id) == *unk_id {
                        TokenType::Unknown
                    } else if is_byte_token(t) {
                        TokenType::Byte
                    } else {
                        TokenType::Normal
                    };
                    (t.clone(), score, ty)
                }
                (None, _) => (format!("[PAD{id}]"), -1000.0, TokenType::Unused),
            },
            SpmSource::MergeRanks(scores) => match (text, added) {
                (Some(t), Some(a)) => (t.clone(), -1000.0, added_type(a)),
                (Some(t), None) => {
                    let ty = if is_byte_token(t) {
                        TokenType::Byte
                    } else {
                        TokenType::Normal
                    };
                    let floor = -(scores.len() as f32) - 1.0;
                    (t.clone(), scores.get(&id).copied().unwrap_or(floor), ty)
                }
                (None, _) => (format!("[PAD{id}]"), -1000.0, TokenType::Unused),
            },
        }
    }
}

/// LlamaHfVocab's type of an added token.
fn added_type(a: &AddedToken) -> TokenType {
    if a.special {
        TokenType::Control
    } else {
        TokenType::UserDefined
    }
}

/// SentencePiece BPE scores are merge priorities: the piece made by merge `r` (first merge 0)
/// scores `-r`, so llama.cpp's SPM tokenizer, which merges the best-scoring pair first, merges
/// in the order of tokenizer.json's merges. Returns the score of every id some merge makes.
fn merge_rank_scores(model: &Json, by_id: &HashMap<u32, String>) -> Result<HashMap<u32, f32>> {
    let Some(list) = model["merges"].as_array() else {
        return Ok(HashMap::new());
    };
    let ids: HashMap<&str, u32> = by_id.iter().map(|(id, t)| (t.as_str(), *id)).collect();
    let mut scores = HashMap::new();
    for (rank, m) in list.iter().enumerate() {
        let merged = match m {
            Json::String(s) => s
                .split_once(' ')
                .map(|(a, b)| format!("{a}{b}"))
                .with_context(|| format!("merge {rank} {s:?} is not \"left right\""))?,
            Json::Array(pair) if pair.len() == 2 => format!(
                "{}{}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            ),
            other => bail!("unknown merge entry {other}"),
        };
        if let Some(&id) = ids.get(merged.as_str()) {
            scores.entry(id).or_insert(-(rank as f32));
        }
    }
    Ok(scores)
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// The converter's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Merges as "left right" strings; the pair-list format (transformers ≥ 4.45) encodes spaces
/// inside a part as U+0120-shifted characters, as the converter does.
fn merges(model: &Json) -> Result<Vec<String>> {
    let Some(list) = model["merges"].as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => {
                let part = |v: &Json| -> Result<String> {
                    let s = v.as_str().context("merge part is not a string")?;
                    Ok(s.chars()
                        .map(|c| {
                            if c == ' ' {
                                char::from_u32(' ' as u32 + 256).unwrap()
                            } else {
                                c
                            }
                        })
                        .collect())
                };
                Ok(format!("{} {}", part(&pair[0])?, part(&pair[1])?))
            }
            other => bail!("unknown merge entry {other}"),
        })
        .collect()
}

/// Identifies the BPE pre-tokenizer by the ids it gives the probe text (as llama.cpp does).
/// Unknown pre-tokenizers get llama.cpp's `default` (GPT-2 splitting) with a warning, so that
/// custom test tokenizers still export.
fn pre_tokenizer_name(tok_path: &Path) -> Result<String> {
    let tokenizer = tokenizers::Tokenizer::from_file(tok_path)
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
    let enc = tokenizer
        .encode(PRE_PROBE, true)
        .map_err(|e| anyhow::anyhow!("cannot tokenize with {}: {e}", tok_path.display()))?;
    let ids: Vec<String> = enc.get_ids().iter().map(|i| i.to_string()).collect();
    let digest: String = Sha256::digest(format!("[{}]", ids.join(", ")).as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    match KNOWN_PRE.iter().find(|(h, _)| *h == digest) {
        Some((_, name)) => Ok(name.to_string()),
        None => {
            tracing::warn!(
                digest,
                "{}: BPE pre-tokenizer not recognised; writing tokenizer.ggml.pre = \"default\"",
                tok_path.display()
            );
            Ok("default".into())
        }
    }
}

fn token_content(v: &Json) -> Option<&str> {
    v.as_str().or_else(|| v["content"].as_str())
}

fn special_tokens(
    tok: &Json,
    tok_config: &Json,
    config: &Json,
    added: &[AddedToken],
    meta: &mut Vec<(String, Value)>,
) {
    let mut add_bos: Option<bool> = None;
    let mut add_eos: Option<bool> = None;
    let bos = token_content(&tok_config["bos_token"]);
    let eos = token_content(&tok_config["eos_token"]);
    let post = &tok["post_processor"];
    let processors: Vec<&Json> = match post["processors"].as_array() {
        Some(list) => list.iter().collect(),
        None if !post.is_null() => vec![post],
        None => vec![],
    };
    for p in processors {
        match p["type"].as_str() {
            Some("ByteLevel") => {
                add_bos.get_or_insert(false);
                add_eos.get_or_insert(false);
            }
            Some("TemplateProcessing") => {
                let single = p["single"].as_array().cloned().unwrap_or_default();
                if single.len() > 1 {
                    if let Some(first) = single[0]["SpecialToken"]["id"].as_str() {
                        add_bos = Some(Some(first) == bos);
                    }
                    if let Some(last) = single[single.len() - 1]["SpecialToken"]["id"].as_str() {
                        add_eos = Some(Some(last) == eos);
                    }
                }
            }
            _ => {}
        }
    }
    if add_bos.is_none() {
        add_bos = tok_config["add_bos_token"].as_bool();
    }
    if add_eos.is_none() {
        add_eos = tok_config["add_eos_token"].as_bool();
    }
    // GGUF's key names (gguf-py `Keys.Tokenizer`), spelling included.
    let keys = [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("sep", "seperator_token_id"),
        ("pad", "padding_token_id"),
        ("mask", "mask_token_id"),
    ];
    for (typ, key) in keys {
        let from_tokenizer = token_content(&tok_config[format!("{typ}_token")])
            .and_then(|content| added.iter().find(|a| a.content == content).map(|a| a.id));
        let id =
            from_tokenizer.or_else(|| config[format!("{typ}_token_id")].as_u64().map(|v| v as u32));
        if let Some(id) = id {
            meta.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    if let Some(v) = add_bos {
        meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(v)));
    }
    if let Some(v) = add_eos {
        meta.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(v)));
    }
}

fn chat_template(dir: &Path, tok_config: &Json) -> Result<Option<String>> {
    match &tok_config["chat_template"] {
        Json::String(s) => return Ok(Some(s.clone())),
        Json::Array(list) => {
            let default = list.iter().find(|t| t["name"].as_str() == Some("default"));
            return Ok(default
                .and_then(|t| t["template"].as_str())
                .map(String::from));
        }
        _ => {}
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some(
            std::fs::read_to_string(&jinja)
                .with_context(|| format!("cannot read {}", jinja.display()))?,
        ));
    }
    Ok(read_json(&dir.join("chat_template.json"))?
        .and_then(|j| j["chat_template"].as_str().map(String::from)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specials_look_like_llama_cpp_says() {
        assert!(looks_special("<|im_start|>") && looks_special("<pad>") && !looks_special("hello"));
        assert!(is_byte_token("<0x0A>") && !is_byte_token("<0xZZ>") && !is_byte_token("<s>"));
    }

    #[test]
    fn pair_merges_shift_spaces() {
        let model: Json = serde_json::json!({"merges": [["a b", "c"], ["Ġ", "t"]]});
        assert_eq!(merges(&model).unwrap(), ["a\u{120}b c", "Ġ t"]);
        let model: Json = serde_json::json!({"merges": ["h e", "l l"]});
        assert_eq!(merges(&model).unwrap(), ["h e", "l l"]);
    }

    #[test]
    fn template_processing_sets_add_bos() {
        let tok = serde_json::json!({"post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel"},
            {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}]}
        ]}});
        let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}});
        let added = vec![
            AddedToken {
                id: 1,
                content: "<s>".into(),
                special: true,
            },
            AddedToken {
                id: 2,
                content: "</s>".into(),
                special: true,
            },
        ];
        let mut meta = Vec::new();
        special_tokens(
            &tok,
            &cfg,
            &serde_json::json!({"pad_token_id": 0}),
            &added,
            &mut meta,
        );
        let get = |k: &str| {
            meta.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("tokenizer.ggml.bos_token_id"), Some(Value::U32(1)));
        assert_eq!(get("tokenizer.ggml.eos_token_id"), Some(Value::U32(2)));
        assert_eq!(get("tokenizer.ggml.padding_token_id"), Some(Value::U32(0)));
        assert_eq!(get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
        assert_eq!(
            get("tokenizer.ggml.add_eos_token"),
            Some(Value::Bool(false))
        );
    }
}
