//! Writes a random model of Llama-3.2-1B's shape (bf16, 2 shards), the tiny tokenizer and a random
//! rank-16 PEFT adapter, for timing `ferrotune export` (docs/export.md, "Performance"):
//!
//!     cargo run -p ferrotune --example export_bench_model -- DIR
//!     /usr/bin/time -v ferrotune export --adapter DIR/adapter --base DIR/base --save_gguf \
//!         --quantization q8_0 q4_k_m --save_path DIR/out

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::DType;
use ferrotune::data::tiny_tokenizer::{train_tiny_tokenizer, write_tokenizer_files};
use ferrotune::model::tiny::{write_random_model, TinySpec};
use rand::{Rng, SeedableRng};

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: export_bench_model DIR");
    let dir = Path::new(&dir);
    let spec = TinySpec {
        model_type: "llama".into(),
        vocab_size: 128_256,
        hidden_size: 2048,
        intermediate_size: 8192,
        num_hidden_layers: 16,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        tie_word_embeddings: true,
        shards: 2,
        dtype: DType::BF16,
        init_std: 0.02,
        ..TinySpec::default()
    };
    write_random_model(&dir.join("base"), &spec, 1)?;
    let texts: Vec<String> = (0..100)
        .map(|i| format!("sample text number {i}"))
        .collect();
    write_tokenizer_files(&dir.join("base"), &train_tiny_tokenizer(&texts, 300)?, 2048)?;

    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter)?;
    let r = 16;
    let (h, i, kv) = (2048, 8192, 512);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for l in 0..spec.num_hidden_layers {
        for (m, out, inp) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            let p = format!("base_model.model.model.layers.{l}.{m}");
            for (name, shape) in [("lora_A", vec![r, inp]), ("lora_B", vec![out, r])] {
                let n: usize = shape.iter().product();
                let bytes = (0..n)
                    .flat_map(|_| rng.random_range(-0.01f32..0.01).to_le_bytes())
                    .collect();
                data.push((format!("{p}.{name}.weight"), shape, bytes));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    std::fs::write(
        adapter.join("adapter_model.safetensors"),
        safetensors::serialize(views, Some(meta))?,
    )?;
    std::fs::write(
        adapter.join("adapter_config.json"),
        serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 16, "use_rslora": false,
            "base_model_name_or_path": dir.join("base")})
        .to_string(),
    )?;
    Ok(())
}
