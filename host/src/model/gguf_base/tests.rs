use std::path::Path;

use serde_json::json;

use super::*;
use crate::cli::choices::Bias;
use crate::data::tiny_tokenizer::write_sentencepiece_tokenizer_files;
use crate::data::TokenizerInfo;
use crate::engine::cpu::{CpuBackend, EngineOptions};
use crate::engine::{Backend, Batch, IGNORE};
use crate::export::safetensors_dir::SafetensorsDir;
use crate::gguf::convert::GgufPlan;
use crate::gguf::names::{gguf_name, hf_name, permute_qk, unpermute_qk, Mapped};
use crate::gguf::preset::Preset;
use crate::gguf::reader::GgufFile;
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
fn other_architectures_tokenizers_and_rotary_layouts_are_refused() {
    use crate::gguf::types::GgmlType;
    use crate::gguf::writer::{GgufWriter, TensorInfo};
    let tmp = tempfile::tempdir().unwrap();
    let write_with = |name: &str,
                      arch: &str,
                      model: &str,
                      extra: Vec<(String, Value)>,
                      freqs: Option<[f32; 2]>| {
        let path = tmp.path().join(name);
        let mut meta = vec![
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
        meta.extend(extra);
        let mut infos = vec![TensorInfo::new(
            "token_embd.weight",
            vec![2, 4],
            GgmlType::F32,
        )];
        if freqs.is_some() {
            infos.push(TensorInfo::new("rope_freqs.weight", vec![2], GgmlType::F32));
        }
        let mut w = GgufWriter::create(&path, &meta, infos).unwrap();
        w.write_tensor("token_embd.weight", &[0u8; 32]).unwrap();
        if let Some(f) = freqs {
            let bytes: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_tensor("rope_freqs.weight", &bytes).unwrap();
        }
        w.finish().unwrap();
        path
    };
    let write = |name: &str, arch: &str, model: &str, extra: Vec<(String, Value)>| {
        write_with(name, arch, model, extra, None)
    };
    let error = |path: &Path| {
        format!(
            "{:#}",
            materialise(path, &tmp.path().join("c")).unwrap_err()
        )
    };
    let t5 = write("t5.gguf", "llama", "t5", vec![]);
    let err = error(&t5);
    assert!(err.contains("\"t5\"") && err.contains("t5.gguf"), "{err}");
    // A SentencePiece vocabulary needs its scores when the file has no merges.
    let spm = write("spm.gguf", "llama", "llama", vec![]);
    let err = error(&spm);
    assert!(err.contains("tokenizer.ggml.scores"), "{err}");
    let phi = write("phi.gguf", "phi3", "gpt2", vec![]);
    let err = error(&phi);
    assert!(err.contains("phi3") && err.contains("qwen2"), "{err}");
    let yarn = write(
        "yarn.gguf",
        "llama",
        "gpt2",
        vec![(
            "llama.rope.scaling.type".into(),
            Value::String("yarn".into()),
        )],
    );
    let err = error(&yarn);
    assert!(err.contains("llama.rope.scaling.type = \"yarn\""), "{err}");
    // A factor next to rope_freqs is llama.cpp's linear scaling on top of the divisors.
    let both = write_with(
        "both.gguf",
        "llama",
        "gpt2",
        vec![("llama.rope.scaling.factor".into(), Value::F32(4.0))],
        Some([1.0, 8.0]),
    );
    let err = error(&both);
    assert!(
        err.contains("llama.rope.scaling.factor = 4") && err.contains("rope_freqs.weight"),
        "{err}"
    );
    let partial = write(
        "partial.gguf",
        "llama",
        "gpt2",
        vec![("llama.rope.dimension_count".into(), Value::U32(2))],
    );
    let err = error(&partial);
    assert!(err.contains("llama.rope.dimension_count = 2"), "{err}");
    assert!(!tmp.path().join("c").read_dir().unwrap().any(|e| e
        .unwrap()
        .path()
        .join("config.json")
        .exists()));
}

/// `file` rewritten without the metadata `drop` names (llama.cpp's converter, for instance,
/// writes no merges for a SentencePiece vocabulary).
fn rewrite_without(file: &Path, out: &Path, drop: &[&str]) {
    use crate::gguf::writer::{GgufWriter, TensorInfo};
    let gguf = GgufFile::open(file).unwrap();
    let meta: Vec<(String, Value)> = gguf
        .metadata
        .iter()
        .filter(|(k, _)| !drop.contains(&k.as_str()))
        .cloned()
        .collect();
    assert!(
        meta.len() < gguf.metadata.len(),
        "{drop:?} were in the file"
    );
    let infos = gguf
        .tensors
        .iter()
        .map(|t| TensorInfo::new(t.name.clone(), t.shape.clone(), t.ty))
        .collect();
    let mut w = GgufWriter::create(out, &meta, infos).unwrap();
    for t in &gguf.tensors {
        w.write_tensor(&t.name, &gguf.read_tensor_bytes(t).unwrap())
            .unwrap();
    }
    w.finish().unwrap();
}

/// Texts that exercise the SentencePiece path: words, leading and repeated spaces, newlines
/// (byte pieces `<0x0A>`), accents and CJK (byte fallback for characters outside the pieces),
/// an emoji (four byte pieces) and special-token text inside a string.
const SPM_TEXTS: [&str; 8] = [
    "Below is an instruction that describes a task.",
    "  two leading spaces and  a double one",
    "line one\nline two\n\nend",
    "unicode: café naïve 日本語",
    "a llama 🦙 emoji",
    "<s>special text</s> inside",
    "tab\there, numbers 12345",
    "",
];

/// The tokenizer transformers builds from the GGUF's metadata (merges derived from the scores by
/// its `generate_merges`) gives the ids ours gives. Its `LlamaTokenizer` prefixes a space only at the start of the
/// input (Metaspace "first") where llama.cpp and the legacy normaliser prefix every fragment
/// after a special token and add one more before leading spaces, so the texts compared are the
/// ones without those two cases. transformers' AutoTokenizer also loads the converted directory
/// and reproduces every id of our pipeline, special tokens included. Needs python3 with transformers; skipped without it, except
/// under `CI=true` where `.ci/run` installs it.
fn transformers_agrees(gguf: &Path, model_dir: &Path) {
    let ours = TokenizerInfo::load(model_dir).unwrap();
    let available = std::process::Command::new("python3")
        .args(["-c", "import transformers, gguf"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "python3 with transformers and gguf is required under CI=true (.ci/run installs them)"
        );
        eprintln!("skipped: python3 with transformers and gguf is not installed");
        return;
    }
    let texts: Vec<&str> = SPM_TEXTS
        .iter()
        .copied()
        .filter(|t| !t.starts_with(' ') && !t.contains("<s>"))
        .collect();
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| ours.encode(t, false).unwrap().ids)
        .collect();
    let full: Vec<Vec<u32>> = SPM_TEXTS
        .iter()
        .map(|t| ours.encode(t, true).unwrap().ids)
        .collect();
    let cases = gguf.with_extension("cases.json");
    let body = json!({"texts": texts, "ids": ids, "model_dir": model_dir,
                      "full": {"texts": SPM_TEXTS, "ids": full}});
    std::fs::write(&cases, body.to_string()).unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/check_gguf_tokenizer.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(gguf)
        .arg(&cases)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "transformers tokenizes the GGUF differently:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Llama-2-style SentencePiece model exported with our GGUF writer and loaded back as the base
/// model encodes every text to the ids of the original tokenizer.json and decodes them back:
/// with the merges the writer stores, with llama.cpp's layout (no merges: recovered from the
/// tokenizer.model scores), and with no tokenizer.model at all (merges recovered from the
/// writer's merge-rank scores).
#[test]
fn a_sentencepiece_gguf_loads_back_with_the_same_tokenizer() {
    use crate::gguf::sentencepiece::encode_model;
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("hf");
    let spec = TinySpec {
        vocab_size: 512,
        ..TinySpec::default()
    };
    crate::model::tiny::write_random_model(&original, &spec, 3).unwrap();
    let texts: Vec<&str> = crate::demo::DATASET.lines().collect();
    let model_proto = write_sentencepiece_tokenizer_files(&original, &texts, 200).unwrap();
    assert!(
        model_proto.len() > 400,
        "the trained pieces fill the vocabulary"
    );
    let fixture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(original.join("tokenizer.json")).unwrap()).unwrap();
    assert!(fixture["model"]["merges"].as_array().unwrap().len() > 100);
    let want = TokenizerInfo::load(&original).unwrap();
    let check = |dir: &Path, case: &str| {
        let got = TokenizerInfo::load(dir).unwrap();
        for text in SPM_TEXTS {
            let ids = want.encode(text, true).unwrap().ids;
            assert_eq!(got.encode(text, true).unwrap().ids, ids, "{case}: {text:?}");
            let plain = want.tokenizer.encode(text, false).unwrap();
            let back = got.tokenizer.encode(text, false).unwrap();
            assert_eq!(back.get_ids(), plain.get_ids(), "{case}: {text:?}");
            assert_eq!(
                got.tokenizer.decode(back.get_ids(), false).unwrap(),
                want.tokenizer.decode(plain.get_ids(), false).unwrap(),
                "{case}: {text:?}"
            );
            if !text.contains("<s>") {
                assert_eq!(got.tokenizer.decode(back.get_ids(), true).unwrap(), text);
            }
        }
        let bytes = got.encode("🦙", false).unwrap().ids;
        assert_eq!(bytes.len(), 5, "{case}: ▁ and four byte pieces: {bytes:?}");
        assert_eq!(got.bos.as_ref().map(|t| t.id), Some(1), "{case}");
        assert_eq!(got.eos.as_ref().map(|t| t.id), Some(2), "{case}");
        assert_eq!(got.unk.as_ref().map(|t| t.id), Some(0), "{case}");
        assert_eq!(got.chat_templates, want.chat_templates, "{case}");
    };

    let cache = tmp.path().join("cache");
    let source = SafetensorsDir::open_model_dir(&original).unwrap();
    std::fs::write(original.join("tokenizer.model"), encode_model(&model_proto)).unwrap();
    let plan = GgufPlan::new(&original, &source, "spm").unwrap();
    let with_scores = tmp.path().join("spm.gguf");
    plan.write(&source, Preset::F32, &with_scores).unwrap();
    let file = GgufFile::open(&with_scores).unwrap();
    assert_eq!(
        file.get("tokenizer.ggml.model"),
        Some(&Value::String("llama".into()))
    );
    check(&materialise(&with_scores, &cache).unwrap(), "stored merges");

    let no_merges = tmp.path().join("spm-no-merges.gguf");
    rewrite_without(&with_scores, &no_merges, &["tokenizer.ggml.merges"]);
    let from_scores = materialise(&no_merges, &cache).unwrap();
    check(&from_scores, "scores");
    transformers_agrees(&no_merges, &from_scores);

    std::fs::remove_file(original.join("tokenizer.model")).unwrap();
    let plan = GgufPlan::new(&original, &source, "spm").unwrap();
    let ranked = tmp.path().join("spm-ranks.gguf");
    plan.write(&source, Preset::F32, &ranked).unwrap();
    let ranked_no_merges = tmp.path().join("spm-ranks-no-merges.gguf");
    rewrite_without(&ranked, &ranked_no_merges, &["tokenizer.ggml.merges"]);
    check(
        &materialise(&ranked_no_merges, &cache).unwrap(),
        "rank scores",
    );
}

/// A Llama 3.1 model (rope_type llama3) exported with our writer carries `rope_freqs.weight`
/// and no rope parameters; loaded back as the base model it has the same rope_scaling and the
/// same loss, at positions far enough out that dropping the scaling changes the loss.
#[test]
fn a_llama_3_1_gguf_loads_back_with_its_rope_scaling() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("hf");
    let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let spec = TinySpec {
        head_dim: Some(32),
        rope_theta: 500_000.0,
        rope_scaling: Some(scaling.clone()),
        max_position_embeddings: 131_072,
        // Weights large enough for attention to depend on the rotary phases.
        init_std: 0.5,
        ..TinySpec::default()
    };
    let texts: Vec<&str> = crate::demo::DATASET.lines().collect();
    write_tiny_chat_model(&original, &texts, 320, 512, spec, 4).unwrap();
    let source = SafetensorsDir::open_model_dir(&original).unwrap();
    let plan = GgufPlan::new(&original, &source, "tiny").unwrap();
    let file = tmp.path().join("tiny.gguf");
    plan.write(&source, Preset::F32, &file).unwrap();
    let gguf = GgufFile::open(&file).unwrap();
    assert!(gguf.tensor("rope_freqs.weight").is_some());
    assert!(!gguf
        .metadata
        .iter()
        .any(|(k, _)| k.contains("rope.scaling")));

    let dir = materialise(&file, &tmp.path().join("cache")).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["rope_scaling"], scaling);
    assert_eq!(
        ModelConfig::from_dir(&dir).unwrap().rope_scaling,
        ModelConfig::from_dir(&original).unwrap().rope_scaling
    );

    let info = TokenizerInfo::load(&original).unwrap();
    let ids = info
        .encode("Below is an instruction. ### Response: 42 apples", true)
        .unwrap()
        .ids;
    let n = ids.len();
    let batch = Batch {
        batch_size: 1,
        seq_len: n,
        input_ids: ids.clone(),
        targets: ids[1..].iter().map(|&t| t as i32).chain([IGNORE]).collect(),
        // Far positions: the low frequencies llama3 scaling divides by 8 have turned by then.
        position_ids: (20_000..20_000 + n as u32).collect(),
        segment_ids: vec![0; n],
    };
    let want = loss(&original, &batch);
    let got = loss(&dir, &batch);
    // F32 weights and the same f32 divisors: the same loss up to summation order.
    assert!(((got - want) / want).abs() < 1e-9, "loss {got} vs {want}");
    // The comparison can tell: without the scaling the loss moves far beyond that.
    let unscaled = tmp.path().join("unscaled");
    std::fs::create_dir_all(&unscaled).unwrap();
    for name in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(dir.join(name), unscaled.join(name)).unwrap();
    }
    let mut plain = config.clone();
    plain.as_object_mut().unwrap().remove("rope_scaling");
    std::fs::write(unscaled.join("config.json"), plain.to_string()).unwrap();
    let off = loss(&unscaled, &batch);
    assert!(
        ((off - want) / want).abs() > 1e-4,
        "unscaled loss {off} vs {want}"
    );
}
