//! Random Hugging Face model directories (`config.json` + safetensors) for tests and `ferrotune
//! demo`: the same files a real checkpoint has, so they exercise the real loading path.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// The shape of a generated model. Defaults: a 2-layer GQA Llama with hidden 64.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// `llama`, `mistral`, `qwen2` or `qwen3`.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Written to config.json when set (Qwen3 style); else hidden_size / num_attention_heads.
    pub head_dim: Option<usize>,
    pub tie_word_embeddings: bool,
    pub rope_theta: f64,
    /// Written verbatim as `rope_scaling`.
    pub rope_scaling: Option<serde_json::Value>,
    /// Llama/Qwen3 `attention_bias` (Qwen2 always has q/k/v biases).
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    /// 1 → `model.safetensors`; more → `model-0000i-of-0000n.safetensors` + index.
    pub shards: usize,
    /// Storage dtype of the written tensors (F32, BF16 or F16).
    pub dtype: DType,
    /// Standard deviation of the linear/embedding weights (uniform distribution).
    pub init_std: f64,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            model_type: "llama".into(),
            vocab_size: 96,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: None,
            tie_word_embeddings: false,
            rope_theta: 10_000.0,
            rope_scaling: None,
            attention_bias: false,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            bos_token_id: 1,
            eos_token_id: 2,
            shards: 1,
            dtype: DType::F32,
            init_std: 0.08,
        }
    }
}

impl TinySpec {
    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn config_json(&self) -> serde_json::Value {
        let mut c = json!({
            "architectures": [match self.model_type.as_str() {
                "mistral" => "MistralForCausalLM",
                "qwen2" => "Qwen2ForCausalLM",
                "qwen3" => "Qwen3ForCausalLM",
                _ => "LlamaForCausalLM",
            }],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": match self.dtype {
                DType::BF16 => "bfloat16",
                DType::F16 => "float16",
                _ => "float32",
            },
        });
        if let Some(d) = self.head_dim {
            c["head_dim"] = json!(d);
        }
        c
    }

    /// Every weight name with its shape, in HF's naming.
    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>, Init)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let hd = self.head_dim();
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let qkv_bias = self.model_type == "qwen2" || self.attention_bias;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![v, h],
            Init::Weight,
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h], Init::Norm));
            for (name, o, inp) in [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h)] {
                out.push((
                    format!("{p}.self_attn.{name}.weight"),
                    vec![o, inp],
                    Init::Weight,
                ));
                if qkv_bias {
                    out.push((format!("{p}.self_attn.{name}.bias"), vec![o], Init::Weight));
                }
            }
            out.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q],
                Init::Weight,
            ));
            if self.attention_bias && self.model_type != "qwen2" {
                out.push((format!("{p}.self_attn.o_proj.bias"), vec![h], Init::Weight));
            }
            if self.model_type == "qwen3" {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd], Init::Norm));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd], Init::Norm));
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Init::Norm,
            ));
            out.push((
                format!("{p}.mlp.gate_proj.weight"),
                vec![i, h],
                Init::Weight,
            ));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h], Init::Weight));
            out.push((
                format!("{p}.mlp.down_proj.weight"),
                vec![h, i],
                Init::Weight,
            ));
        }
        out.push(("model.norm.weight".to_string(), vec![h], Init::Norm));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h], Init::Weight));
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
enum Init {
    /// Uniform with standard deviation `init_std`.
    Weight,
    /// 1 ± 0.2 uniform, so that tests notice a norm weight applied wrongly.
    Norm,
}

/// A tiny Llama with a real tokenizer: a byte-level BPE of at most `vocab_size` entries trained on
/// `texts` (Llama 3's special tokens and chat template), its files written with
/// `model_max_length`, and random weights for `spec` with the vocabulary and BOS/EOS ids set to
/// the tokenizer's. What the demo trains and the end-to-end tests use.
pub fn write_tiny_chat_model<S: AsRef<str> + Sync>(
    dir: &Path,
    texts: &[S],
    vocab_size: usize,
    model_max_length: usize,
    spec: TinySpec,
    seed: u64,
) -> Result<()> {
    use crate::data::tiny_tokenizer as tok;
    let tokenizer = tok::train_tiny_tokenizer(texts, vocab_size)?;
    tok::write_tokenizer_files(dir, &tokenizer, model_max_length)?;
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .with_context(|| format!("special token {t} missing from the tiny tokenizer"))
    };
    let spec = TinySpec {
        vocab_size: tokenizer.get_vocab_size(true),
        bos_token_id: id(tok::BOS)?,
        eos_token_id: id(tok::EOS)?,
        ..spec
    };
    write_random_model(dir, &spec, seed)
}

/// Writes `config.json` and random safetensors weights for `spec` into `dir` (created if needed).
/// The same `seed` always writes the same weights.
pub fn write_random_model(dir: &Path, spec: &TinySpec, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = serde_json::to_string_pretty(&spec.config_json())?;
    std::fs::write(dir.join("config.json"), config)
        .with_context(|| format!("cannot write {}/config.json", dir.display()))?;

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let half_width = spec.init_std * 3f64.sqrt();
    let mut tensors = Vec::new();
    for (name, shape, init) in spec.tensor_shapes() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let u: f64 = rng.random_range(-1.0..1.0);
                match init {
                    Init::Weight => (u * half_width) as f32,
                    Init::Norm => (1.0 + 0.2 * u) as f32,
                }
            })
            .collect();
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(spec.dtype)?;
        tensors.push((name, t));
    }

    let shards = spec.shards.max(1);
    if shards == 1 {
        let map: HashMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
        return Ok(());
    }
    let per_shard = tensors.len().div_ceil(shards);
    let files = tensors.len().div_ceil(per_shard);
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in tensors.chunks(per_shard).enumerate() {
        let file = format!("model-{:05}-of-{files:05}.safetensors", k + 1);
        for (name, _) in chunk {
            weight_map.insert(name.clone(), json!(file));
        }
        let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
        candle_core::safetensors::save(&map, dir.join(&file))?;
    }
    let index = json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    Ok(())
}
