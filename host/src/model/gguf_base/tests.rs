use std::path::Path;

use super::*;
use crate::cli::choices::Bias;
use crate::data::TokenizerInfo;
use crate::engine::cpu::{CpuBackend, EngineOptions};
use crate::engine::{Backend, Batch, IGNORE};
use crate::export::safetensors_dir::SafetensorsDir;
use crate::gguf::convert::GgufPlan;
use crate::gguf::names::{gguf_name, hf_name, permute_qk, unpermute_qk, Mapped};
use crate::gguf::preset::Preset;
use crate::job::PROJECTIONS;
use crate::model::tiny::{write_tiny_chat_model, TinySpec};
use crate::model::{Model, ModelConfig};

#[test]
fn names_and_the_qk_permutation_invert_the_exporter() {
    for hf in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.k_proj.bias",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.1.self_attn.q_norm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.layers.12.mlp.down_proj.weight",
    ] {
        let Mapped::Tensor(gguf) = gguf_name(hf).unwrap() else {
            panic!("{hf} is skipped")
        };
        assert_eq!(hf_name(&gguf).unwrap(), hf);
    }
    assert!(hf_name("blk.0.attn_unknown.weight").is_err());
    let data: Vec<f32> = (0..8 * 3).map(|v| v as f32).collect();
    let there = permute_qk(&data, 8, 2).unwrap();
    assert_ne!(there, data);
    assert_eq!(unpermute_qk(&there, 8, 2).unwrap(), data);
}

/// A tiny Llama with the demo's byte-level BPE tokenizer and chat template.
fn tiny_model(dir: &Path) {
    let texts: Vec<&str> = crate::demo::DATASET.lines().collect();
    write_tiny_chat_model(dir, &texts, 320, 512, TinySpec::default(), 4).unwrap();
}

fn loss(model_dir: &Path, batch: &Batch) -> f64 {
    let model = Model::load(model_dir).unwrap();
    let options = EngineOptions {
        r: 4,
        lora_alpha: 8.0,
        use_rslora: false,
        lora_dropout: 0.0,
        bias: Bias::None,
        target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        init_seed: 1,
        dropout_seed: 1,
        gradient_checkpointing: false,
    };
    let shapes = crate::engine::cpu::trainable_shapes(&model.config, &options).unwrap();
    let optimizer = Box::new(crate::optim::Sgd::new(crate::optim::param_specs(
        &shapes, 0.0,
    )));
    let mut backend = CpuBackend::new(model, options, optimizer).unwrap();
    let stats = backend.eval_loss(batch).unwrap();
    stats.loss_sum / stats.tokens as f64
}

/// Exported to GGUF with our writer and loaded back as the base model, the tiny model has the
/// same configuration, tokenizer and chat template, and the same loss within the format's
/// rounding.
#[test]
fn an_exported_gguf_loads_back_as_the_base_model() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("hf");
    tiny_model(&original);
    let source = SafetensorsDir::open_model_dir(&original).unwrap();
    let plan = GgufPlan::new(&original, &source, "tiny").unwrap();
    let info = TokenizerInfo::load(&original).unwrap();
    let text = "Below is an instruction. ### Response:\n    Hi there, 42 apples!";
    let ids = info
        .tokenizer
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let n = ids.len();
    let batch = Batch {
        batch_size: 1,
        seq_len: n,
        input_ids: ids.clone(),
        targets: ids[1..].iter().map(|&t| t as i32).chain([IGNORE]).collect(),
        position_ids: (0..n as u32).collect(),
        segment_ids: vec![0; n],
    };
    let want = loss(&original, &batch);
    let cfg = ModelConfig::from_dir(&original).unwrap();
    for (preset, tolerance) in [(Preset::F16, 1e-3), (Preset::Q8_0, 2e-2)] {
        let file = tmp.path().join(format!("tiny.{}.gguf", preset.file_tag()));
        plan.write(&source, preset, &file).unwrap();
        let cache = tmp.path().join("cache");
        let dir = materialise(&file, &cache).unwrap();
        // Converted once: a second call finds the same directory.
        assert_eq!(materialise(&file, &cache).unwrap(), dir);

        let got_cfg = ModelConfig::from_dir(&dir).unwrap();
        assert_eq!(
            (
                got_cfg.hidden_size,
                got_cfg.num_key_value_heads,
                got_cfg.head_dim
            ),
            (cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim)
        );
        assert_eq!(
            (got_cfg.vocab_size, got_cfg.tie_word_embeddings),
            (cfg.vocab_size, cfg.tie_word_embeddings)
        );
        assert_eq!(got_cfg.rms_norm_eps as f32, cfg.rms_norm_eps as f32);

        let got_info = TokenizerInfo::load(&dir).unwrap();
        let got_ids = got_info.tokenizer.encode(text, false).unwrap();
        assert_eq!(got_ids.get_ids(), ids.as_slice(), "{preset:?}");
        assert_eq!(
            got_info.bos.as_ref().map(|t| t.id),
            info.bos.as_ref().map(|t| t.id)
        );
        assert_eq!(
            got_info.eos.as_ref().map(|t| t.id),
            info.eos.as_ref().map(|t| t.id)
        );
        assert_eq!(got_info.chat_templates, info.chat_templates);

        // Every weight comes back under its name, in place (a wrong q/k un-permutation or
        // name would be far off), within the format's rounding.
        let (orig, back) = (
            crate::model::Weights::load(&original).unwrap(),
            crate::model::Weights::load(&dir).unwrap(),
        );
        let mut names: Vec<&str> = orig.names().collect();
        names.sort();
        let mut back_names: Vec<&str> = back.names().collect();
        back_names.sort();
        assert_eq!(names, back_names);
        for name in names {
            let values = |w: &crate::model::Weights| -> Vec<f32> {
                let t = w.tensor(name).unwrap();
                t.flatten_all().unwrap().to_vec1().unwrap()
            };
            let (a, b) = (values(&orig), values(&back));
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            let bound = match preset {
                Preset::F16 => scale * 1e-3,
                _ => scale / 100.0,
            };
            assert!(
                worst <= bound,
                "{preset:?} {name}: off by {worst} (scale {scale})"
            );
        }

        let got = loss(&dir, &batch);
        assert!(
            ((got - want) / want).abs() < tolerance,
            "{preset:?}: loss {got} vs {want}"
        );
    }
}

#[test]
fn sentencepiece_vocabularies_and_other_architectures_are_refused() {
    use crate::gguf::types::GgmlType;
    use crate::gguf::writer::{GgufWriter, TensorInfo};
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, arch: &str, model: &str| {
        let path = tmp.path().join(name);
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String(arch.into()),
            ),
            (format!("{arch}.embedding_length"), Value::U32(4)),
            (format!("{arch}.attention.head_count"), Value::U32(1)),
            (format!("{arch}.feed_forward_length"), Value::U32(4)),
            (format!("{arch}.block_count"), Value::U32(0)),
            (format!("{arch}.context_length"), Value::U32(8)),
            (
                "tokenizer.ggml.model".to_string(),
                Value::String(model.into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::ArrayString(vec!["a".into(), "b".into()]),
            ),
        ];
        let info = TensorInfo::new("token_embd.weight", vec![2, 4], GgmlType::F32);
        let mut w = GgufWriter::create(&path, &meta, vec![info]).unwrap();
        w.write_tensor("token_embd.weight", &[0u8; 32]).unwrap();
        w.finish().unwrap();
        path
    };
    let spm = write("spm.gguf", "llama", "llama");
    let err = format!(
        "{:#}",
        materialise(&spm, &tmp.path().join("c")).unwrap_err()
    );
    assert!(
        err.contains("SentencePiece") && err.contains("spm.gguf"),
        "{err}"
    );
    let phi = write("phi.gguf", "phi3", "gpt2");
    let err = format!(
        "{:#}",
        materialise(&phi, &tmp.path().join("c")).unwrap_err()
    );
    assert!(err.contains("phi3") && err.contains("qwen2"), "{err}");
    assert!(!tmp.path().join("c").read_dir().unwrap().any(|e| e
        .unwrap()
        .path()
        .join("config.json")
        .exists()));
}
