//! End-to-end tests of `ferrotune export`: a tiny random model, its tokenizer and a random PEFT
//! adapter are exported with the built binary; the merged model is compared with base + scale·B·A
//! computed here, and every GGUF preset is checked by llama.cpp's own reader (the `gguf` Python
//! package, tests/python/check_gguf.py). With CI=true a missing python3/gguf fails the test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::DType;
use ferrotune::data::tiny_tokenizer::{train_tiny_tokenizer, write_tokenizer_files};
use ferrotune::gguf::GgufFile;
use ferrotune::model::tiny::{write_random_model, TinySpec};
use rand::{Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

const ALL_PRESETS: [&str; 17] = [
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m",
    "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
];

fn ferrotune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .output()
        .expect("run ferrotune")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Rows of 256 and 512 values, so every k-quant applies without fallbacks.
fn spec(model_type: &str, dtype: DType) -> TinySpec {
    TinySpec {
        model_type: model_type.into(),
        vocab_size: 320,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        tie_word_embeddings: model_type == "qwen2",
        shards: 2,
        dtype,
        ..TinySpec::default()
    }
}

fn write_base(dir: &Path, spec: &TinySpec) {
    write_random_model(dir, spec, 7).unwrap();
    let texts: Vec<String> = (0..200)
        .map(|i| format!("the quick brown fox {i} jumps over the lazy dog {}", i * 7))
        .collect();
    let tokenizer = train_tiny_tokenizer(&texts, 300).unwrap();
    write_tokenizer_files(dir, &tokenizer, 512).unwrap();
}

/// A PEFT adapter with non-zero A and B for every projection of every layer.
fn write_adapter(
    dir: &Path,
    spec: &TinySpec,
    r: usize,
    magnitude: f32,
) -> HashMap<String, Vec<f32>> {
    std::fs::create_dir_all(dir).unwrap();
    let hd = spec.hidden_size / spec.num_attention_heads;
    let (h, i, q, kv) = (
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_attention_heads * hd,
        spec.num_key_value_heads * hd,
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for l in 0..spec.num_hidden_layers {
        for (module, out, inp) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            let p = format!("base_model.model.model.layers.{l}.{module}");
            let mut random = |n: usize| {
                (0..n)
                    .map(|_| rng.random_range(-magnitude..magnitude))
                    .collect::<Vec<f32>>()
            };
            tensors.push((format!("{p}.lora_A.weight"), vec![r, inp], random(r * inp)));
            tensors.push((format!("{p}.lora_B.weight"), vec![out, r], random(out * r)));
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(views, Some(meta)).unwrap(),
    )
    .unwrap();
    let config = json!({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "use_rslora": false,
        "use_dora": false, "bias": "none", "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": "unused/base",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    tensors.into_iter().map(|(n, _, v)| (n, v)).collect()
}

/// Every tensor of a Hugging Face model directory as f32, by name.
fn read_model(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                let data = view.data();
                let values: Vec<f32> = match view.dtype() {
                    Dtype::F32 => data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                    Dtype::BF16 => data
                        .chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                    Dtype::F16 => data
                        .chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                    other => panic!("{name}: {other:?}"),
                };
                out.insert(name, (view.shape().to_vec(), values));
            }
        }
    }
    out
}

fn run_python_checker(spec_path: &Path) {
    let have = Command::new("python3")
        .args(["-c", "import gguf, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but `python3 -c 'import gguf, numpy'` fails: .ci/run must `pip install gguf numpy`");
        }
        eprintln!(
            "SKIPPED the gguf-py check: python3 with the gguf and numpy packages is not installed"
        );
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/check_gguf.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(spec_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf-py check failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes our own dequantization of every tensor (file order) next to the GGUF for the checker.
fn dump_our_dequantization(gguf: &Path) -> PathBuf {
    let file = GgufFile::open(gguf).unwrap();
    let mut all = Vec::new();
    for t in &file.tensors {
        all.extend(
            file.read_tensor_f32(t)
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes()),
        );
    }
    let out = gguf.with_extension("ours.f32");
    std::fs::write(&out, all).unwrap();
    out
}

fn file_type(preset: &str) -> u32 {
    match preset {
        "f32" => 0,
        "f16" => 1,
        "q4_0" => 2,
        "q4_1" => 3,
        "q8_0" => 7,
        "q5_0" => 8,
        "q5_1" => 9,
        "q2_k" => 10,
        "q3_k_s" => 11,
        "q3_k_m" => 12,
        "q3_k_l" => 13,
        "q4_k_s" => 14,
        "q4_k_m" => 15,
        "q5_k_s" => 16,
        "q5_k_m" => 17,
        "q6_k" => 18,
        "bf16" => 32,
        other => panic!("{other}"),
    }
}

/// Tensor types llama-quantize picks for this 2-layer model (n_layer 2: use_more_bits is true
/// for layer 1 only), spelled out from llama.cpp's rules rather than computed by our code.
/// With tied embeddings `token_embd` is the output matrix and gets the output's type.
fn expected_types(preset: &str, tied: bool) -> serde_json::Value {
    let t = |pairs: &[(&str, &str)]| {
        json!(pairs
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>())
    };
    match preset {
        "q4_k_m" => t(&[
            ("output.weight", "Q6_K"),
            ("token_embd.weight", if tied { "Q6_K" } else { "Q4_K" }),
            ("blk.0.attn_v.weight", "Q4_K"),
            ("blk.1.attn_v.weight", "Q6_K"),
            ("blk.0.ffn_down.weight", "Q4_K"),
            ("blk.1.ffn_down.weight", "Q6_K"),
            ("blk.0.attn_q.weight", "Q4_K"),
            ("blk.1.ffn_up.weight", "Q4_K"),
        ]),
        "q3_k_m" => t(&[
            ("blk.0.attn_v.weight", "Q5_K"),
            ("blk.1.attn_v.weight", "Q5_K"),
            ("blk.0.ffn_down.weight", "Q4_K"),
            ("blk.0.attn_output.weight", "Q4_K"),
            ("blk.0.attn_q.weight", "Q3_K"),
            ("output.weight", "Q6_K"),
        ]),
        "q2_k" => t(&[
            ("blk.0.attn_v.weight", "Q3_K"),
            ("blk.0.ffn_down.weight", "Q3_K"),
            ("blk.0.attn_output.weight", "Q3_K"),
            ("blk.0.ffn_gate.weight", "Q2_K"),
        ]),
        "q4_0" => t(&[("output.weight", "Q6_K"), ("blk.0.attn_q.weight", "Q4_0")]),
        "q8_0" => t(&[("output.weight", "Q8_0"), ("blk.1.ffn_down.weight", "Q8_0")]),
        "bf16" => t(&[("token_embd.weight", "BF16")]),
        _ => json!({}),
    }
}

fn check_ggufs(out: &Path, name: &str, presets: &[&str], tied: bool, work: &Path) {
    let files: Vec<serde_json::Value> = presets
        .iter()
        .map(|p| {
            let path = out.join(format!("{name}.{}.gguf", p.to_uppercase()));
            assert!(path.is_file(), "{} missing", path.display());
            let ours = dump_our_dequantization(&path);
            json!({"path": path, "ours": ours, "file_type": file_type(p), "types": expected_types(p, tied)})
        })
        .collect();
    let spec = json!({"model_dir": out, "files": files});
    let spec_path = work.join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    run_python_checker(&spec_path);
}

#[test]
fn llama_export_merges_the_adapter_and_writes_every_gguf_preset() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, out) = (
        tmp.path().join("base-llama"),
        tmp.path().join("adapter"),
        tmp.path().join("out"),
    );
    let spec = spec("llama", DType::BF16);
    write_base(&base, &spec);
    let lora = write_adapter(&adapter, &spec, 8, 0.05);
    let mut args = vec![
        "export",
        "--adapter",
        adapter.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--save_method",
        "merged_16bit",
        "--save_gguf",
        "--save_path",
        out.to_str().unwrap(),
        "--max_shard_size_mb",
        "1",
        "--quantization",
    ];
    args.extend(ALL_PRESETS);
    let result = ferrotune(&args);
    assert!(
        result.status.success(),
        "export failed: {}",
        stderr(&result)
    );

    // The merged model: base + (alpha / r) · B · A, rounded to bf16, in several shards.
    assert!(
        out.join("model.safetensors.index.json").is_file(),
        "1 MB shards must split the model"
    );
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "Modelfile",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("Modelfile")).unwrap(),
        "FROM ./base-llama.F32.gguf\n"
    );
    let (base_w, merged_w) = (read_model(&base), read_model(&out));
    assert_eq!(base_w.len(), merged_w.len());
    let (shape, w) = &base_w["model.layers.1.mlp.down_proj.weight"];
    let a = &lora["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    let b = &lora["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    let (rows, cols, r) = (shape[0], shape[1], 8);
    let merged = &merged_w["model.layers.1.mlp.down_proj.weight"].1;
    let mut max_rel = 0f64;
    for o in 0..rows {
        for i in 0..cols {
            let delta: f64 = (0..r)
                .map(|k| b[o * r + k] as f64 * a[k * cols + i] as f64)
                .sum::<f64>()
                * 2.0;
            let want = w[o * cols + i] as f64 + delta;
            max_rel =
                max_rel.max((merged[o * cols + i] as f64 - want).abs() / want.abs().max(1e-3));
        }
    }
    assert!(
        max_rel < 8e-3,
        "merged weight off by {max_rel} (bf16 rounding is 4e-3)"
    );
    assert_ne!(merged, w, "the adapter changed nothing");
    assert_eq!(
        merged_w["model.norm.weight"].1, base_w["model.norm.weight"].1,
        "untargeted tensors are copied exactly"
    );
    // The training loader reads the merged save like any base model.
    ferrotune::model::config::ModelConfig::from_dir(&out).unwrap();
    let loaded = ferrotune::model::weights::Weights::load(&out).unwrap();
    assert_eq!(loaded.names().count(), base_w.len());

    check_ggufs(&out, "base-llama", &ALL_PRESETS, false, tmp.path());
}

#[test]
fn qwen2_export_keeps_biases_and_unpermuted_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, out) = (
        tmp.path().join("qwen"),
        tmp.path().join("adapter"),
        tmp.path().join("out"),
    );
    let spec = spec("qwen2", DType::F32);
    write_base(&base, &spec);
    write_adapter(&adapter, &spec, 4, 0.05);
    let result = ferrotune(&[
        "export",
        "--checkpoint",
        adapter.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--save_method",
        "merged_16bit",
        "--save_gguf",
        "--quantization",
        "q8_0",
        "q4_k_m",
        "bf16",
        "--save_path",
        out.to_str().unwrap(),
    ]);
    assert!(
        result.status.success(),
        "export failed: {}",
        stderr(&result)
    );
    assert!(
        out.join("model.safetensors").is_file()
            && !out.join("model.safetensors.index.json").exists(),
        "one shard, no index"
    );
    let file = GgufFile::open(&out.join("qwen.Q8_0.gguf")).unwrap();
    assert!(
        file.tensor("blk.0.attn_q.bias").is_some() && file.tensor("output.weight").is_none(),
        "tied embeddings, qkv bias"
    );
    check_ggufs(&out, "qwen", &["q8_0", "q4_k_m", "bf16"], true, tmp.path());
}

#[test]
fn lora_save_copies_the_adapter_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, out) = (
        tmp.path().join("base"),
        tmp.path().join("adapter"),
        tmp.path().join("out"),
    );
    let spec = spec("llama", DType::F32);
    write_base(&base, &spec);
    write_adapter(&adapter, &spec, 4, 0.05);
    let result = ferrotune(&[
        "export",
        "--adapter",
        adapter.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--save_method",
        "lora",
        "--save_path",
        out.to_str().unwrap(),
    ]);
    assert!(
        result.status.success(),
        "export failed: {}",
        stderr(&result)
    );
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(
        !out.join("model.safetensors").exists(),
        "lora saves no merged weights"
    );
}

#[test]
fn bad_exports_fail_with_one_clear_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (tmp.path().join("base"), tmp.path().join("adapter"));
    let spec16 = spec("llama", DType::F16);
    write_base(&base, &spec16);
    let out = tmp.path().join("out");
    let run = |adapter: &Path, extra: &[&str]| {
        let mut args = vec![
            "export",
            "--adapter",
            adapter.to_str().unwrap(),
            "--base",
            base.to_str().unwrap(),
            "--save_path",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ferrotune(&args)
    };

    // An adapter whose merge overflows float16.
    write_adapter(&adapter, &spec16, 4, 300.0);
    let r = run(&adapter, &["--save_method", "merged_16bit"]);
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("after merging the adapter") && stderr(&r).contains("F16"),
        "{}",
        stderr(&r)
    );

    // An adapter trained on another shape of model.
    let other = TinySpec {
        hidden_size: 128,
        ..spec("llama", DType::F16)
    };
    let wrong = tmp.path().join("wrong");
    write_adapter(&wrong, &other, 4, 0.05);
    let r = run(&wrong, &["--save_method", "merged_16bit"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("another base model"), "{}", stderr(&r));

    let r = run(&adapter, &["--save_method", "merged_4bit"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(
        stderr(&r).contains("merged_4bit: not built yet"),
        "{}",
        stderr(&r)
    );

    let r = run(&adapter, &["--save_gguf", "--quantization", "iq2_xxs"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("iq2_xxs"), "{}", stderr(&r));

    let r = run(&adapter, &[]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("nothing to do"), "{}", stderr(&r));
    assert!(!out.join("model.safetensors").exists() && !out.join("base.Q8_0.gguf").exists());
}
