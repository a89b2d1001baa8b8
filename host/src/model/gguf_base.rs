//! A GGUF file (llama.cpp, Ollama) as the base model. It is dequantised once into a Hugging Face
//! model directory in ferrotune's cache (`config.json`, `model.safetensors` in f32, `tokenizer.json`,
//! `tokenizer_config.json` with the chat template), which every later step reads like any
//! other model directory: the engines, `ferrotune format`, merged exports.
//!
//! What is undone of llama.cpp's conversion: tensor names (`blk.3.attn_q.weight` →
//! `model.layers.3.self_attn.q_proj.weight`), the q/k row permutation of the `llama`
//! architecture (ggml rotates adjacent pairs, Hugging Face half-split rows), and the
//! quantisation (every ggml type the quantizers here write decodes). The tokenizer is rebuilt
//! from `tokenizer.ggml.*` ([`vocab`]: byte-level BPE and SentencePiece vocabularies), and
//! Llama 3.1 rope scaling from the `rope_freqs.weight` divisors llama.cpp stores instead of
//! its parameters ([`rope`]).
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
use crate::model::RopeScaling;

mod rope;
mod vocab;

use vocab::Vocab;

/// Bump when the conversion changes, so cached directories are rebuilt.
const LAYOUT_VERSION: &str = "gguf-base-v2";

/// The tensor in which llama.cpp stores Llama 3.1 rope scaling.
const ROPE_FREQS: &str = "rope_freqs.weight";

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
    let rotary_key = format!("{arch}.rope.dimension_count");
    if let Some(rotary) = number(file, &rotary_key)? {
        if rotary as usize != head_dim {
            bail!(
                "metadata {rotary_key} = {rotary} rotates part of each head (head_dim \
                 {head_dim}); ferrotune's models rotate whole heads"
            );
        }
    }
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
    if let Some(scaling) = rope_scaling(file, &arch, head_dim, &config)? {
        config["rope_scaling"] = scaling;
    }
    let tokenizer = Vocab::from_metadata(|key| file.get(key))?;
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
        tokenizer: tokenizer.tokenizer_json()?,
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
    vocab::number(file.get(key), key)
}

/// `rope_scaling` of config.json from `<arch>.rope.scaling.*` and `rope_freqs.weight`; `None`
/// when the model's RoPE is unscaled. Read as llama.cpp reads them: a missing type means linear,
/// a factor scales linearly unless the type is `none`, and `rope_freqs` divides on top of that.
/// Anything else fails naming the key and its value.
fn rope_scaling(
    file: &GgufFile,
    arch: &str,
    head_dim: usize,
    config: &Json,
) -> Result<Option<Json>> {
    let key = |k: &str| format!("{arch}.rope.scaling.{k}");
    let kind = match file.get(&key("type")) {
        None => None,
        Some(v) => Some(
            v.as_str()
                .with_context(|| format!("metadata {} is {v:?}, expected a string", key("type")))?,
        ),
    };
    if let Some(other) = kind.filter(|k| !matches!(*k, "none" | "linear")) {
        bail!(
            "metadata {} = {other:?} is not supported (none, linear, or Llama 3.1's \
             {ROPE_FREQS}); use the Hugging Face model directory instead",
            key("type")
        );
    }
    // llama.cpp: factor 0 or 1 is no scaling, and type none ignores the factor.
    let linear = match kind {
        Some("none") => None,
        _ => number(file, &key("factor"))?.filter(|&f| f != 0.0 && f != 1.0),
    };
    let Some(entry) = file.tensor(ROPE_FREQS) else {
        return Ok(linear.map(|factor| json!({"type": "linear", "factor": factor})));
    };
    if let Some(factor) = linear {
        bail!(
            "metadata {} = {factor} scales linearly on top of {ROPE_FREQS}; ferrotune's models \
             take one or the other",
            key("factor")
        );
    }
    let factors = file
        .read_tensor_f32(entry)
        .with_context(|| format!("tensor {ROPE_FREQS}"))?;
    let hints = rope::Hints {
        original_context: number(file, &key("original_context_length"))?,
    };
    let theta = config["rope_theta"].as_f64().unwrap_or(10_000.0);
    let recovered = rope::recover_llama3(&factors, head_dim, theta, hints)?;
    Ok(recovered.map(|scaling| match scaling {
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": integral(original_max_position_embeddings),
        }),
        other => unreachable!("recover_llama3 returns Llama3, not {other:?}"),
    }))
}

/// A whole number as a JSON integer (config.json spells context lengths that way).
fn integral(v: f64) -> Json {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

/// Every tensor dequantised to f32 under its Hugging Face name, as safetensors bytes.
/// `permute`: (q heads, k heads) whose rows llama.cpp interleaved.
fn weights(file: &GgufFile, permute: Option<(usize, usize)>) -> Result<Vec<u8>> {
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for entry in &file.tensors {
        if entry.name == ROPE_FREQS {
            // Read into config.json's rope_scaling instead.
            continue;
        }
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

#[cfg(test)]
mod tests;
