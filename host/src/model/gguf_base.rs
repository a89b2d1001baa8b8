//! A GGUF file (llama.cpp, Ollama) as the base model. It is dequantised once into a Hugging Face
//! model directory in ferrotune's cache (`config.json`, `model.safetensors` in f32, `tokenizer.json`,
//! `tokenizer_config.json` with the chat template), which every later step reads like any
//! other model directory: the engines, `ferrotune format`, merged exports.
//!
//! What is undone of llama.cpp's conversion: tensor names (`blk.3.attn_q.weight` →
//! `model.layers.3.self_attn.q_proj.weight`), the q/k row permutation of the `llama`
//! architecture (ggml rotates adjacent pairs, Hugging Face half-split rows), and the
//! quantisation (every ggml type the quantizers here write decodes). The tokenizer is rebuilt
//! from `tokenizer.ggml.*` for byte-level BPE vocabularies (`gpt2` model: Llama 3, Qwen2/3,
//! GPT-2-style); SentencePiece vocabularies (`llama` model) are refused with a clear error.
//!
//! The cache entry is keyed by the file's path, size and modification time, written into a
//! staging directory and renamed into place, so an interrupted conversion is redone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use crate::gguf::reader::GgufFile;
use crate::gguf::value::Value;

/// Bump when the conversion changes, so cached directories are rebuilt.
const LAYOUT_VERSION: &str = "gguf-base-v1";

/// The pre-tokenizer splits of Llama 3 (llama.cpp's `llama-bpe`) and Qwen2 (digits one by one);
/// `gpt-2` is `ByteLevel`'s own split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The model directory for `gguf`, converting it into `cache_root` on first use.
pub fn materialise(gguf: &Path, cache_root: &Path) -> Result<PathBuf> {
    let meta =
        std::fs::metadata(gguf).with_context(|| format!("{}: cannot read", gguf.display()))?;
    let canonical = std::fs::canonicalize(gguf).unwrap_or_else(|_| gguf.to_path_buf());
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut key = Sha256::new();
    key.update(LAYOUT_VERSION.as_bytes());
    key.update(canonical.as_os_str().as_encoded_bytes());
    key.update(meta.len().to_le_bytes());
    key.update(mtime.to_le_bytes());
    let stem = gguf
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let digest: String = key.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let target = cache_root.join(format!("{stem}-{digest}"));
    if target.join("config.json").is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(cache_root)
        .with_context(|| format!("{}: cannot create", cache_root.display()))?;
    tracing::info!(
        "--model_name {}: dequantising the GGUF into {} (once)",
        gguf.display(),
        target.display()
    );
    let file = GgufFile::open(gguf)?;
    let converted = convert(&file).with_context(|| format!("{}", gguf.display()))?;
    let staged = crate::checkpoint::atomic::StagingDir::create(&target)?;
    staged.write("config.json", &pretty(&converted.config))?;
    staged.write("tokenizer.json", &pretty(&converted.tokenizer))?;
    staged.write(
        "tokenizer_config.json",
        &pretty(&converted.tokenizer_config),
    )?;
    staged.write("model.safetensors", &converted.weights)?;
    staged.write(
        "source.json",
        &pretty(&json!({"gguf": canonical, "bytes": meta.len(), "layout": LAYOUT_VERSION})),
    )?;
    staged.commit()
}

fn pretty(value: &Json) -> Vec<u8> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    text.push('\n');
    text.into_bytes()
}

/// A GGUF model as the files of a Hugging Face model directory.
struct Converted {
    config: Json,
    tokenizer: Json,
    tokenizer_config: Json,
    /// `model.safetensors` bytes (f32).
    weights: Vec<u8>,
}

fn convert(file: &GgufFile) -> Result<Converted> {
    let arch = string(file, "general.architecture")?;
    let model_type = match arch.as_str() {
        "llama" | "qwen2" | "qwen3" => arch.clone(),
        other => bail!(
            "GGUF architecture {other:?} is not supported as a base model; supported: llama \
             (Llama, Mistral), qwen2, qwen3"
        ),
    };
    if file.tensor("rope_freqs.weight").is_some() {
        bail!(
            "the file carries Llama 3.1-style rope scaling (rope_freqs.weight), whose \
             parameters GGUF does not keep; use the Hugging Face model directory instead"
        );
    }
    let u = |key: &str| -> Result<usize> {
        let full = format!("{arch}.{key}");
        number(file, &full)?
            .map(|v| v as usize)
            .with_context(|| format!("metadata {full} is missing"))
    };
    let heads = u("attention.head_count")?;
    let kv_heads =
        number(file, &format!("{arch}.attention.head_count_kv"))?.map_or(heads, |v| v as usize);
    let hidden = u("embedding_length")?;
    let head_dim = number(file, &format!("{arch}.attention.key_length"))?
        .map_or(hidden / heads.max(1), |v| v as usize);
    let embd = file
        .tensor("token_embd.weight")
        .context("no token_embd.weight tensor")?;
    let tied = file.tensor("output.weight").is_none();
    let has = |name: &str| file.tensor(name).is_some();
    let mut config = json!({
        "architectures": [match model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM", "qwen3" => "Qwen3ForCausalLM", _ => "LlamaForCausalLM"
        }],
        "model_type": model_type,
        "vocab_size": embd.shape[0],
        "hidden_size": hidden,
        "intermediate_size": u("feed_forward_length")?,
        "num_hidden_layers": u("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": number(file, &format!("{arch}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        "rope_theta": number(file, &format!("{arch}.rope.freq_base"))?.unwrap_or(10000.0),
        "max_position_embeddings": u("context_length")?,
        "tie_word_embeddings": tied,
        "attention_bias": model_type != "qwen2" && has("blk.0.attn_q.bias"),
        "torch_dtype": "float32",
    });
    if let Some(scaling) = file.get(&format!("{arch}.rope.scaling.type")) {
        match scaling.as_str() {
            Some("linear") => {
                let factor = number(file, &format!("{arch}.rope.scaling.factor"))?
                    .context("rope.scaling.factor is missing")?;
                config["rope_scaling"] = json!({"type": "linear", "factor": factor});
            }
            Some("none") | None => {}
            Some(other) => bail!("rope scaling {other:?} is not supported (linear only)"),
        }
    }
    let tokenizer = Tokenizer::from_metadata(file)?;
    for (key, id) in [
        ("bos_token_id", tokenizer.bos),
        ("eos_token_id", tokenizer.eos),
        ("pad_token_id", tokenizer.pad),
    ] {
        if let Some(id) = id {
            config[key] = json!(id);
        }
    }
    let permute = (arch == "llama").then_some((heads, kv_heads));
    Ok(Converted {
        weights: weights(file, permute)?,
        tokenizer: tokenizer.tokenizer_json(),
        tokenizer_config: tokenizer.config_json(),
        config,
    })
}

fn string(file: &GgufFile, key: &str) -> Result<String> {
    file.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("metadata {key} is missing or not a string"))
}

/// A numeric metadata value of any width.
fn number(file: &GgufFile, key: &str) -> Result<Option<f64>> {
    Ok(match file.get(key) {
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

/// Every tensor dequantised to f32 under its Hugging Face name, as safetensors bytes.
/// `permute`: (q heads, k heads) whose rows llama.cpp interleaved.
fn weights(file: &GgufFile, permute: Option<(usize, usize)>) -> Result<Vec<u8>> {
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for entry in &file.tensors {
        let hf = crate::gguf::names::hf_name(&entry.name)?;
        let mut data = file
            .read_tensor_f32(entry)
            .with_context(|| format!("tensor {} ({})", entry.name, entry.ty))?;
        let heads = match (permute, hf.as_str()) {
            (Some((q, _)), n) if n.contains(".self_attn.q_proj.") => Some(q),
            (Some((_, k)), n) if n.contains(".self_attn.k_proj.") => Some(k),
            _ => None,
        };
        if let Some(heads) = heads {
            data = crate::gguf::names::unpermute_qk(&data, entry.shape[0], heads)
                .with_context(|| format!("tensor {}", entry.name))?;
        }
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.insert(hf, (entry.shape.clone(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (shape, bytes))| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .with_context(|| format!("tensor {name}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize(views, metadata).context("writing model.safetensors")
}

/// `tokenizer.ggml.*` of a byte-level BPE vocabulary.
struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    /// The pre-tokenizer of `tokenizer.json`.
    pre_tokenizer: Json,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    chat_template: Option<String>,
}

/// llama.cpp's token types that are special (CONTROL) or added (USER_DEFINED).
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

impl Tokenizer {
    fn from_metadata(file: &GgufFile) -> Result<Self> {
        let model = string(file, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            bail!(
                "its tokenizer is tokenizer.ggml.model = {model:?}; ferrotune rebuilds byte-level \
                 BPE (\"gpt2\": Llama 3, Qwen) tokenizers from GGUF, not SentencePiece (\"llama\": \
                 Llama 2, Mistral); use the Hugging Face model directory instead"
            );
        }
        let Some(Value::ArrayString(tokens)) = file.get("tokenizer.ggml.tokens") else {
            bail!("metadata tokenizer.ggml.tokens is missing");
        };
        let types = match file.get("tokenizer.ggml.token_type") {
            Some(Value::ArrayI32(t)) => t.clone(),
            _ => vec![1; tokens.len()],
        };
        let merges = match file.get("tokenizer.ggml.merges") {
            Some(Value::ArrayString(m)) => m.clone(),
            _ => bail!("metadata tokenizer.ggml.merges is missing (a BPE vocabulary needs them)"),
        };
        let pre = file
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
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
        let pre_tokenizer = match pre {
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
        };
        let id = |key: &str| -> Result<Option<u32>> {
            Ok(number(file, key)?
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len()))
        };
        let flag = |key: &str| match file.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        };
        Ok(Tokenizer {
            tokens: tokens.clone(),
            types,
            merges,
            pre_tokenizer,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token"),
            add_eos: flag("tokenizer.ggml.add_eos_token"),
            chat_template: file
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    fn tokenizer_json(&self) -> Json {
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, (text, &ty)) in self.tokens.iter().zip(&self.types).enumerate() {
            vocab.insert(text.clone(), json!(id));
            if ty == CONTROL || ty == USER_DEFINED {
                added.push(json!({
                    "id": id, "content": text, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": ty == USER_DEFINED, "special": ty == CONTROL
                }));
            }
        }
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": self.pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": self.merges,
            },
        })
    }

    fn config_json(&self) -> Json {
        let text = |id: Option<u32>| id.map(|i| json!(self.tokens[i as usize]));
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            // The sequence's BOS comes from here (the rebuilt tokenizer has no post-processor).
            "add_bos_token": self.add_bos.unwrap_or(false),
            "add_eos_token": self.add_eos.unwrap_or(false),
        });
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

#[cfg(test)]
mod tests;
