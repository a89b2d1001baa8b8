//! The model's tokenizer and what transformers reads beside it: the BOS/EOS/PAD tokens, the
//! `add_bos_token`/`add_eos_token` switches and the chat template(s).
//!
//! Precedence follows transformers: `tokenizer_config.json` names the special tokens,
//! `special_tokens_map.json` fills what it leaves out, and `generation_config.json` (which only
//! knows ids) is the last resort for EOS/BOS. A token named there but missing from
//! `tokenizer.json` is an error, not a silent "no EOS".

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokenizers::{Encoding, Tokenizer};

/// A special token: its text (what templates and formatters write) and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// A tokenizer plus the special-token facts the data pipeline needs.
#[derive(Clone)]
pub struct TokenizerInfo {
    pub tokenizer: Tokenizer,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    pub pad: Option<SpecialToken>,
    pub unk: Option<SpecialToken>,
    /// `add_bos_token` from `tokenizer_config.json` when given: it overrides the post-processor,
    /// as transformers' Llama/Gemma tokenizers do when they rebuild their post-processor.
    pub add_bos_token: Option<bool>,
    /// `add_eos_token` from `tokenizer_config.json` when given.
    pub add_eos_token: Option<bool>,
    /// Chat templates the model ships, by name (`default` for a plain string or
    /// `chat_template.jinja`), in the order found.
    pub chat_templates: Vec<(String, String)>,
}

impl std::fmt::Debug for TokenizerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerInfo")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("add_bos_token", &self.add_bos_token)
            .field("add_eos_token", &self.add_eos_token)
            .field(
                "chat_templates",
                &self
                    .chat_templates
                    .iter()
                    .map(|(n, _)| n)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The JSON files beside `tokenizer.json`, each optional.
#[derive(Debug, Default, Clone)]
pub struct TokenizerFiles {
    pub tokenizer_config: Option<Value>,
    pub special_tokens_map: Option<Value>,
    pub generation_config: Option<Value>,
    /// `chat_template.jinja`, where newer transformers versions save the template.
    pub chat_template_jinja: Option<String>,
}

impl TokenizerFiles {
    /// Reads whichever of the files exist in `dir`; a file that exists but is not valid JSON is
    /// an error naming it.
    pub fn read(dir: &Path) -> Result<Self> {
        Ok(Self {
            tokenizer_config: read_json_opt(&dir.join("tokenizer_config.json"))?,
            special_tokens_map: read_json_opt(&dir.join("special_tokens_map.json"))?,
            generation_config: read_json_opt(&dir.join("generation_config.json"))?,
            chat_template_jinja: read_text_opt(&dir.join("chat_template.jinja"))?,
        })
    }
}

impl TokenizerInfo {
    /// Loads `tokenizer.json` and its companion files from a Hugging Face model directory.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("tokenizer.json");
        if !path.is_file() {
            bail!(
                "{}: no tokenizer.json; ferrotune needs the fast-tokenizer file that \
                 transformers writes (save the tokenizer with `save_pretrained` in a recent version)",
                path.display()
            );
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", path.display()))?;
        let files = TokenizerFiles::read(model_dir)?;
        Self::from_parts(tokenizer, &files)
            .with_context(|| format!("tokenizer files in {}", model_dir.display()))
    }

    /// Builds the info from an already loaded tokenizer and its companion files (the GGUF loader
    /// uses this with metadata it converted).
    pub fn from_parts(tokenizer: Tokenizer, files: &TokenizerFiles) -> Result<Self> {
        let config = files.tokenizer_config.as_ref();
        let map = files.special_tokens_map.as_ref();
        let generation = files.generation_config.as_ref();
        let lookup = |key: &str, gen_key: Option<&str>| -> Result<Option<SpecialToken>> {
            let text = config
                .and_then(|c| token_text(c.get(key)))
                .or_else(|| map.and_then(|m| token_text(m.get(key))));
            if let Some(text) = text {
                let id = tokenizer.token_to_id(&text).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{key} {text:?} is not a token of tokenizer.json; fix {key} in \
                         tokenizer_config.json/special_tokens_map.json"
                    )
                })?;
                return Ok(Some(SpecialToken { text, id }));
            }
            let id = gen_key.and_then(|k| generation.and_then(|g| first_id(g.get(k))));
            Ok(match id {
                Some(id) => match tokenizer.id_to_token(id) {
                    Some(text) => Some(SpecialToken { text, id }),
                    None => bail!(
                        "generation_config.json: {} {id} is outside the vocabulary",
                        gen_key.unwrap_or(key)
                    ),
                },
                None => None,
            })
        };
        let bos = lookup("bos_token", Some("bos_token_id"))?;
        let eos = lookup("eos_token", Some("eos_token_id"))?;
        let pad = lookup("pad_token", Some("pad_token_id"))?;
        let unk = lookup("unk_token", None)?;
        let flag = |key: &str| config.and_then(|c| c.get(key)).and_then(Value::as_bool);
        let mut chat_templates = Vec::new();
        match config.and_then(|c| c.get("chat_template")) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => chat_templates.push(("default".to_string(), s.clone())),
            Some(Value::Array(list)) => {
                for entry in list {
                    let name = entry.get("name").and_then(Value::as_str);
                    let body = entry.get("template").and_then(Value::as_str);
                    match (name, body) {
                        (Some(n), Some(b)) => chat_templates.push((n.to_string(), b.to_string())),
                        _ => bail!(
                            "tokenizer_config.json: chat_template list entries need \"name\" and \
                             \"template\" strings"
                        ),
                    }
                }
            }
            Some(_) => bail!("tokenizer_config.json: chat_template must be a string or a list"),
        }
        if let Some(body) = &files.chat_template_jinja {
            if !chat_templates.iter().any(|(n, _)| n == "default") {
                chat_templates.insert(0, ("default".to_string(), body.clone()));
            }
        }
        Ok(Self {
            tokenizer,
            bos,
            eos,
            pad,
            unk,
            add_bos_token: flag("add_bos_token"),
            add_eos_token: flag("add_eos_token"),
            chat_templates,
        })
    }

    /// Tokenizes `text`. With `add_special_tokens` the post-processor runs (BOS for Llama-style
    /// tokenizers), adjusted by `add_bos_token`/`add_eos_token` when the config sets them.
    /// Special-token text inside `text` (e.g. `<|eot_id|>`) becomes the special token, as in
    /// transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Tokens> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        let mut tokens = Tokens::from(&enc);
        if add_special_tokens {
            self.apply_special_token_flags(&mut tokens, &enc);
        }
        Ok(tokens)
    }

    fn apply_special_token_flags(&self, tokens: &mut Tokens, enc: &Encoding) {
        if let Some(bos) = &self.bos {
            let starts_with_bos = tokens.ids.first() == Some(&bos.id);
            match self.add_bos_token {
                Some(true) if !starts_with_bos => {
                    tokens.ids.insert(0, bos.id);
                    tokens.offsets.insert(0, (0, 0));
                }
                Some(false) if starts_with_bos && enc.get_special_tokens_mask()[0] == 1 => {
                    tokens.ids.remove(0);
                    tokens.offsets.remove(0);
                }
                _ => {}
            }
        }
        if let (Some(eos), Some(true)) = (&self.eos, self.add_eos_token) {
            if tokens.ids.last() != Some(&eos.id) {
                let end = tokens.offsets.last().map_or(0, |o| o.1);
                tokens.ids.push(eos.id);
                tokens.offsets.push((end, end));
            }
        }
    }

    /// The id padding uses: PAD, else EOS, else 0. Padding never reaches the loss or attention
    /// of real tokens, so any valid id works.
    pub fn pad_id(&self) -> u32 {
        self.pad
            .as_ref()
            .or(self.eos.as_ref())
            .map(|t| t.id)
            .unwrap_or(0)
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("tokenizer: cannot decode: {e}"))
    }
}

/// A special token entry as transformers writes it: a string, or an `AddedToken` object with
/// `content`, or null.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` may be a number or a list of numbers (Llama 3.1 lists three); the first wins.
fn first_id(value: Option<&Value>) -> Option<u32> {
    match value? {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::Array(a) => a.iter().find_map(|v| first_id(Some(v))),
        _ => None,
    }
}

/// Token ids with the byte range of the input each one came from (`(0, 0)`-like empty ranges
/// for tokens the post-processor added).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

impl From<&Encoding> for Tokens {
    fn from(enc: &Encoding) -> Self {
        Self {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        }
    }
}

pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{}: invalid JSON; fix or remove the file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

fn read_text_opt(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// Files that travel with a trained adapter so it can be used without the base model's folder.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// The subset of [`TOKENIZER_FILES`] present in `model_dir` (for `--save_model` to copy).
pub fn tokenizer_files_in(model_dir: &Path) -> Vec<PathBuf> {
    TOKENIZER_FILES
        .iter()
        .map(|f| model_dir.join(f))
        .filter(|p| p.is_file())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_support::{tiny_tokenizer, write_model_dir};
    use crate::data::tiny_tokenizer::{BOS, EOS, EOT, PAD};

    fn files(config: Value) -> TokenizerFiles {
        TokenizerFiles {
            tokenizer_config: Some(config),
            ..Default::default()
        }
    }

    #[test]
    fn loads_special_tokens_and_template_from_a_model_dir() {
        let dir = tempfile::tempdir().unwrap();
        write_model_dir(dir.path());
        let info = TokenizerInfo::load(dir.path()).unwrap();
        let tok = tiny_tokenizer();
        assert_eq!(info.bos.as_ref().unwrap().text, BOS);
        assert_eq!(info.eos.as_ref().unwrap().id, tok.token_to_id(EOS).unwrap());
        assert_eq!(info.pad_id(), tok.token_to_id(PAD).unwrap());
        assert_eq!(info.add_bos_token, Some(true));
        assert_eq!(info.chat_templates[0].0, "default");
        // The post-processor adds BOS; special-token text in the input becomes the token.
        let ids = info.encode(&format!("hello{EOT}"), true).unwrap().ids;
        assert_eq!(ids[0], tok.token_to_id(BOS).unwrap());
        assert_eq!(*ids.last().unwrap(), tok.token_to_id(EOT).unwrap());
        assert_ne!(info.encode("hello", false).unwrap().ids[0], ids[0]);
    }

    #[test]
    fn token_objects_map_and_generation_config_fill_gaps_in_order() {
        let tok = tiny_tokenizer();
        let files = TokenizerFiles {
            tokenizer_config: Some(serde_json::json!({
                "bos_token": {"__type": "AddedToken", "content": BOS, "special": true},
            })),
            special_tokens_map: Some(serde_json::json!({ "pad_token": PAD })),
            generation_config: Some(serde_json::json!({
                "eos_token_id": [tok.token_to_id(EOT).unwrap(), tok.token_to_id(EOS).unwrap()],
                "bos_token_id": 12345,
            })),
            chat_template_jinja: Some("J".into()),
        };
        let info = TokenizerInfo::from_parts(tok.clone(), &files).unwrap();
        assert_eq!(
            info.bos.unwrap().text,
            BOS,
            "tokenizer_config wins over generation_config"
        );
        assert_eq!(
            info.eos.unwrap().text,
            EOT,
            "first id of the generation_config list"
        );
        assert_eq!(info.pad.unwrap().text, PAD);
        assert_eq!(
            info.chat_templates,
            vec![("default".to_string(), "J".to_string())]
        );
    }

    #[test]
    fn add_bos_token_false_removes_the_post_processor_bos() {
        let tok = tiny_tokenizer();
        let info = TokenizerInfo::from_parts(
            tok.clone(),
            &files(serde_json::json!({ "bos_token": BOS, "add_bos_token": false })),
        )
        .unwrap();
        let ids = info.encode("hello", true).unwrap().ids;
        assert_ne!(ids[0], tok.token_to_id(BOS).unwrap());
        assert_eq!(ids, info.encode("hello", false).unwrap().ids);
    }

    #[test]
    fn unknown_special_token_and_bad_template_shape_are_errors() {
        let tok = tiny_tokenizer();
        let err = TokenizerInfo::from_parts(
            tok.clone(),
            &files(serde_json::json!({ "eos_token": "</s>" })),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("eos_token \"</s>\" is not a token"), "{err}");
        let err = TokenizerInfo::from_parts(tok, &files(serde_json::json!({ "chat_template": 3 })))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chat_template must be a string or a list"),
            "{err}"
        );
    }

    #[test]
    fn missing_tokenizer_json_and_broken_config_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = TokenizerInfo::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no tokenizer.json"), "{err}");
        write_model_dir(dir.path());
        std::fs::write(dir.path().join("tokenizer_config.json"), "{oops").unwrap();
        let err = format!("{:#}", TokenizerInfo::load(dir.path()).unwrap_err());
        assert!(err.contains("tokenizer_config.json: invalid JSON"), "{err}");
    }
}
