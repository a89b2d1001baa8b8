//! A GGUF base model's tokenizer, rebuilt from `tokenizer.ggml.*` as the `tokenizer.json` and
//! `tokenizer_config.json` of a Hugging Face model directory.
//!
//! - Byte-level BPE (`tokenizer.ggml.model = "gpt2"`: Llama 3, Qwen2/3, GPT-2 style): the vocabulary
//!   and merges as stored, the pre-tokenizer split named by `tokenizer.ggml.pre`.
//! - SentencePiece (`"llama"`: Llama 2, Mistral, TinyLlama): what transformers' SentencePiece →
//!   fast converter makes of such a model: BPE with byte fallback (`<0x0A>` pieces) over
//!   `▁`-prefixed text, merges as stored or, since llama.cpp keeps only the piece scores,
//!   recovered from them the way transformers' `generate_merges` does (every split of a piece
//!   into two pieces, best piece score first), the legacy `Prepend("▁")` + `Replace(" ", "▁")`
//!   normaliser (a space prefix on each text fragment, as llama.cpp's SPM tokenizer adds it after
//!   every special token) unless `tokenizer.ggml.add_space_prefix` is false, and the decoder
//!   that undoes it. BOS is added unless `add_bos_token` is false (llama.cpp's SPM default).
//!
//! CONTROL and UNKNOWN tokens become special added tokens, USER_DEFINED ones plain added
//! tokens, both matched whole before the model sees the text, as llama.cpp does.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value as Json};

use crate::gguf::value::Value;

/// The pre-tokenizer splits of Llama 3 (llama.cpp's `llama-bpe`) and Qwen2 (digits one by one);
/// `gpt-2` is `ByteLevel`'s own split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's word-boundary mark.
const SPACE_MARK: &str = "\u{2581}";

/// llama.cpp's token types (`llama_token_type`) that the rebuilt tokenizer treats specially.
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// How text becomes pieces before the merges.
enum Kind {
    /// Byte-level BPE with this `tokenizer.json` pre-tokenizer.
    ByteLevel { pre_tokenizer: Json },
    /// SentencePiece BPE with byte fallback.
    SentencePiece { add_space_prefix: bool },
}

/// `tokenizer.ggml.*` and `tokenizer.chat_template` of a GGUF file.
pub(super) struct Vocab {
    kind: Kind,
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<(String, String)>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
}

impl Vocab {
    /// Reads the tokenizer metadata through `get` (a GGUF file's key lookup).
    pub fn from_metadata<'a>(get: impl Fn(&str) -> Option<&'a Value>) -> Result<Self> {
        let model = get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .context("metadata tokenizer.ggml.model is missing or not a string")?;
        let Some(Value::ArrayString(tokens)) = get("tokenizer.ggml.tokens") else {
            bail!("metadata tokenizer.ggml.tokens is missing");
        };
        let types = match get("tokenizer.ggml.token_type") {
            Some(Value::ArrayI32(t)) if t.len() == tokens.len() => t.clone(),
            Some(Value::ArrayI32(t)) => bail!(
                "metadata tokenizer.ggml.token_type has {} entries for {} tokens",
                t.len(),
                tokens.len()
            ),
            _ => vec![1; tokens.len()],
        };
        let stored_merges = match get("tokenizer.ggml.merges") {
            Some(Value::ArrayString(m)) => Some(parse_merges(m)?),
            _ => None,
        };
        let id = |key: &str| -> Result<Option<u32>> {
            Ok(number(get(key), key)?
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len()))
        };
        let flag = |key: &str| match get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        };
        let (kind, merges, default_add_bos) = match model {
            "gpt2" => {
                let merges = stored_merges.context(
                    "metadata tokenizer.ggml.merges is missing (a BPE vocabulary needs them)",
                )?;
                let pre = get("tokenizer.ggml.pre")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let kind = Kind::ByteLevel {
                    pre_tokenizer: byte_level_pre_tokenizer(pre)?,
                };
                (kind, merges, false)
            }
            "llama" => {
                let merges = match stored_merges {
                    Some(m) => m,
                    None => {
                        let Some(Value::ArrayF32(scores)) = get("tokenizer.ggml.scores") else {
                            bail!(
                                "metadata tokenizer.ggml.scores is missing: a SentencePiece \
                                 vocabulary without tokenizer.ggml.merges needs the piece scores"
                            );
                        };
                        if scores.len() != tokens.len() {
                            bail!(
                                "metadata tokenizer.ggml.scores has {} entries for {} tokens",
                                scores.len(),
                                tokens.len()
                            );
                        }
                        merges_from_scores(tokens, scores)
                    }
                };
                let add_space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                (Kind::SentencePiece { add_space_prefix }, merges, true)
            }
            other => bail!(
                "its tokenizer is tokenizer.ggml.model = {other:?}; ferrotune rebuilds byte-level \
                 BPE (\"gpt2\": Llama 3, Qwen) and SentencePiece (\"llama\": Llama 2, Mistral) \
                 tokenizers from GGUF; use the Hugging Face model directory instead"
            ),
        };
        let unk = id("tokenizer.ggml.unknown_token_id")?
            .or_else(|| types.iter().position(|&t| t == UNKNOWN).map(|i| i as u32));
        Ok(Vocab {
            kind,
            tokens: tokens.clone(),
            types,
            merges,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            unk,
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(default_add_bos),
            add_eos: flag("tokenizer.ggml.add_eos_token").unwrap_or(false),
            chat_template: get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// `tokenizer.json`.
    pub fn tokenizer_json(&self) -> Result<Json> {
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        let spm = matches!(self.kind, Kind::SentencePiece { .. });
        for (id, (text, &ty)) in self.tokens.iter().zip(&self.types).enumerate() {
            vocab.insert(text.clone(), json!(id));
            let special = ty == CONTROL || (spm && ty == UNKNOWN);
            if special || ty == USER_DEFINED {
                added.push(json!({
                    "id": id, "content": text, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": !spm && ty == USER_DEFINED, "special": special
                }));
            }
        }
        let merges: Vec<Json> = self.merges.iter().map(|(a, b)| json!([a, b])).collect();
        let text = |id: Option<u32>| id.map(|i| self.tokens[i as usize].clone());
        let (normalizer, pre_tokenizer, decoder, model) = match &self.kind {
            Kind::ByteLevel { pre_tokenizer } => (
                Json::Null,
                pre_tokenizer.clone(),
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                       "use_regex": true}),
                json!({
                    "type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab, "merges": merges,
                }),
            ),
            Kind::SentencePiece { add_space_prefix } => {
                let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
                let mut normalizers = Vec::new();
                if *add_space_prefix {
                    normalizers.push(json!({"type": "Prepend", "prepend": SPACE_MARK}));
                }
                normalizers.push(replace(" ", SPACE_MARK));
                let mut decoders = vec![
                    replace(SPACE_MARK, " "),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if *add_space_prefix {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                (
                    json!({"type": "Sequence", "normalizers": normalizers}),
                    Json::Null,
                    json!({"type": "Sequence", "decoders": decoders}),
                    json!({
                        "type": "BPE", "dropout": null, "unk_token": text(self.unk),
                        "continuing_subword_prefix": null, "end_of_word_suffix": null,
                        "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                        "vocab": vocab, "merges": merges,
                    }),
                )
            }
        };
        let post_processor = match self.kind {
            // BOS/EOS of byte-level vocabularies come from tokenizer_config.json's flags.
            Kind::ByteLevel { .. } => Json::Null,
            Kind::SentencePiece { .. } => self.template_processing()?,
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": decoder,
            "model": model,
        }))
    }

    /// The post-processor transformers' `LlamaTokenizerFast` builds from `add_bos_token` and
    /// `add_eos_token`; null when it adds nothing.
    fn template_processing(&self) -> Result<Json> {
        use tokenizers::processors::template::TemplateProcessing;
        let bos = self.bos.filter(|_| self.add_bos);
        let eos = self.eos.filter(|_| self.add_eos);
        if bos.is_none() && eos.is_none() {
            return Ok(Json::Null);
        }
        let named = |id: Option<u32>| id.map(|i| (self.tokens[i as usize].clone(), i));
        let (bos, eos) = (named(bos), named(eos));
        let piece = |t: &Option<(String, u32)>, type_id: u32| {
            t.as_ref().map(|(text, _)| format!("{text}:{type_id}"))
        };
        let single: Vec<String> = [piece(&bos, 0), Some("$A:0".into()), piece(&eos, 0)]
            .into_iter()
            .flatten()
            .collect();
        let pair: Vec<String> = [
            piece(&bos, 0),
            Some("$A:0".into()),
            piece(&eos, 0),
            piece(&bos, 1),
            Some("$B:1".into()),
            piece(&eos, 1),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut specials: Vec<(String, u32)> = bos.into_iter().chain(eos).collect();
        specials.dedup();
        let template = TemplateProcessing::builder()
            .try_single(single)
            .map_err(|e| anyhow!("BOS/EOS template: {e}"))?
            .try_pair(pair)
            .map_err(|e| anyhow!("BOS/EOS template: {e}"))?
            .special_tokens(specials)
            .build()
            .map_err(|e| anyhow!("BOS/EOS template: {e}"))?;
        serde_json::to_value(&template).context("serialising the BOS/EOS template")
    }

    /// `tokenizer_config.json`.
    pub fn config_json(&self) -> Json {
        let text = |id: Option<u32>| id.map(|i| json!(self.tokens[i as usize]));
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
        });
        if let Kind::SentencePiece { add_space_prefix } = self.kind {
            // Informational (the class above reads tokenizer.json as it is): transformers'
            // name for the space-prefix switch and the legacy normaliser it implies.
            config["add_prefix_space"] = json!(add_space_prefix);
            config["legacy"] = json!(true);
        }
        for (key, id) in [
            ("bos_token", self.bos),
            ("eos_token", self.eos),
            ("pad_token", self.pad),
            ("unk_token", self.unk),
        ] {
            if let Some(t) = text(id) {
                config[key] = t;
            }
        }
        if let Some(template) = &self.chat_template {
            config["chat_template"] = json!(template);
        }
        config
    }
}

/// A numeric metadata value of any width.
pub(super) fn number(value: Option<&Value>, key: &str) -> Result<Option<f64>> {
    Ok(match value {
        None => None,
        Some(v) => Some(match v {
            Value::U8(x) => *x as f64,
            Value::I8(x) => *x as f64,
            Value::U16(x) => *x as f64,
            Value::I16(x) => *x as f64,
            Value::U32(x) => *x as f64,
            Value::I32(x) => *x as f64,
            Value::U64(x) => *x as f64,
            Value::I64(x) => *x as f64,
            Value::F32(x) => *x as f64,
            Value::F64(x) => *x,
            other => bail!("metadata {key} is {other:?}, expected a number"),
        }),
    })
}

fn byte_level_pre_tokenizer(pre: &str) -> Result<Json> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
             "invert": false},
            byte_level(false)
        ]})
    };
    Ok(match pre {
        "gpt-2" => byte_level(true),
        "default" => {
            tracing::warn!(
                "tokenizer.ggml.pre = \"default\" (not identified by the converter): \
                 assuming GPT-2's byte-level pre-tokenizer"
            );
            byte_level(true)
        }
        "llama-bpe" | "llama3" | "smaug-bpe" => split(LLAMA3_SPLIT),
        "qwen2" => split(QWEN2_SPLIT),
        other => bail!(
            "tokenizer.ggml.pre = {other:?} is not one ferrotune can rebuild (gpt-2, \
             llama-bpe, smaug-bpe, qwen2); use the Hugging Face model directory instead"
        ),
    })
}

/// `tokenizer.ggml.merges` entries ("left right") as pairs.
fn parse_merges(merges: &[String]) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| {
                    format!("metadata tokenizer.ggml.merges[{i}] = {m:?} is not \"left right\"")
                })
        })
        .collect()
}

/// The merges a SentencePiece BPE vocabulary implies, as transformers derives them
/// (`generate_merges`): for each piece in id order, every split into two pieces of the
/// vocabulary (ordered by the ids of left, then right), then all of them ordered by the score
/// of the piece they make, best first, longer left part first on equal scores, the order above
/// kept on ties. A token spelled twice counts once, at its first position with its last score
/// (a Python dict built from the list).
pub(super) fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let mut id_of: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (id, (token, &score)) in tokens.iter().zip(scores).enumerate() {
        if id_of.insert(token, id).is_none() {
            order.push(token);
        }
        score_of.insert(token, score);
    }
    struct Merge<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges: Vec<Merge<'_>> = Vec::new();
    for piece in order {
        let score = score_of[piece];
        let total = piece.chars().count();
        let start = merges.len();
        for (chars, (at, _)) in piece.char_indices().enumerate().skip(1) {
            let (left, right) = piece.split_at(at);
            if id_of.contains_key(left) && id_of.contains_key(right) {
                merges.push(Merge {
                    left,
                    right,
                    score,
                    left_chars: chars,
                    right_chars: total - chars,
                });
            }
        }
        merges[start..].sort_by_key(|m| (id_of[m.left], id_of[m.right]));
    }
    // Stable: ties keep the order built above, as Python's sorted(reverse=True) does.
    merges.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges
        .into_iter()
        .map(|m| (m.left.to_string(), m.right.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// transformers' order: best piece score first; one piece's splits longer-left first;
    /// equal scores keep the order of the pieces; pieces without a split make no merge.
    #[test]
    fn merges_follow_the_piece_scores() {
        let tokens = strings(&[
            "<unk>",
            "a",
            "b",
            "c",
            "ab",
            "bc",
            "abc",
            "\u{2581}a",
            "\u{2581}",
        ]);
        let scores = [0.0, -10.0, -10.0, -10.0, -1.0, -2.0, -3.0, -1.0, -10.0];
        let got = merges_from_scores(&tokens, &scores);
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            got,
            [
                pair("a", "b"),
                pair("\u{2581}", "a"),
                pair("b", "c"),
                pair("ab", "c"),
                pair("a", "bc"),
            ]
        );
    }

    #[test]
    fn a_duplicate_token_counts_once_with_its_last_score() {
        let tokens = strings(&["a", "b", "ab", "c", "ac", "ab"]);
        let scores = [0.0, 0.0, -5.0, 0.0, -2.0, -1.0];
        let got = merges_from_scores(&tokens, &scores);
        assert_eq!(
            got,
            [
                ("a".to_string(), "b".to_string()),
                ("a".to_string(), "c".to_string())
            ]
        );
    }

    /// The switches llama.cpp keeps: no space prefix (normaliser and decoder without it), no
    /// BOS, EOS appended; a USER_DEFINED token is matched whole, the UNKNOWN one is special.
    #[test]
    fn sentencepiece_switches_shape_the_tokenizer() {
        let mut tokens = strings(&["<unk>", "<s>", "</s>", "<tool>"]);
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        tokens.extend(strings(&[
            "\u{2581}",
            "h",
            "i",
            "hi",
            "\u{2581}hi",
            "t",
            "o",
        ]));
        let n = tokens.len();
        let mut types = vec![2, 3, 3, 4];
        types.extend([6; 256]);
        types.extend([1; 7]);
        let scores: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();
        let meta = [
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", Value::ArrayString(tokens)),
            ("tokenizer.ggml.token_type", Value::ArrayI32(types)),
            ("tokenizer.ggml.scores", Value::ArrayF32(scores)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            ("tokenizer.ggml.add_eos_token", Value::Bool(true)),
            ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
        ];
        let get = |key: &str| meta.iter().find(|(k, _)| *k == key).map(|(_, v)| v);
        let vocab = Vocab::from_metadata(get).unwrap();
        let json = vocab.tokenizer_json().unwrap();
        let tokenizer: tokenizers::Tokenizer = json.to_string().parse().unwrap();
        let id = |t: &str| tokenizer.token_to_id(t).unwrap();
        let enc = tokenizer.encode("hi<tool> hi", true).unwrap();
        assert_eq!(
            enc.get_ids(),
            [id("hi"), id("<tool>"), id("\u{2581}hi"), id("</s>")]
        );
        assert_eq!(
            tokenizer.decode(enc.get_ids(), true).unwrap(),
            "hi<tool> hi"
        );
        assert_eq!(json["model"]["unk_token"], "<unk>");
        let special: Vec<&str> = json["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["special"] == true)
            .map(|t| t["content"].as_str().unwrap())
            .collect();
        assert_eq!(special, ["<unk>", "<s>", "</s>"]);
        let config = vocab.config_json();
        assert_eq!(
            (&config["add_bos_token"], &config["add_eos_token"]),
            (&json!(false), &json!(true))
        );
    }

    #[test]
    fn sentencepiece_metadata_without_merges_or_scores_is_refused() {
        let meta = [
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Value::ArrayString(strings(&["a", "b"])),
            ),
            ("tokenizer.ggml.scores", Value::ArrayF32(vec![0.0])),
        ];
        let get = |key: &str| meta.iter().find(|(k, _)| *k == key).map(|(_, v)| v);
        let err = Vocab::from_metadata(get).err().unwrap().to_string();
        assert!(err.contains("scores has 1 entries for 2 tokens"), "{err}");
    }
}
