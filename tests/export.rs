//! End-to-end tests of `ferrotune export`: a tiny random model, its tokenizer and a random PEFT
//! adapter are exported with the built binary; the merged model is compared with base + scale·B·A
//! computed here, and every GGUF preset is checked by llama.cpp's own reader (the `gguf` Python
//! package, tests/python/check_gguf.py). With CI=true a missing python3/gguf fails the test.
//! The `merged_4bit` save is read back as bitsandbytes' serialised NF4 and dequantised with the
//! kernels' reference (tests/python/check_bnb4.py loads it with transformers + bitsandbytes on
//! the GPU machine: scripts/gpu/export_checks.sh).

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

/// A fresh temporary directory with a base model of `spec` in `<base_name>/` and a PEFT adapter
/// on it (rank `r`, values of about `magnitude`) in `adapter/`.
struct Fixture {
    tmp: tempfile::TempDir,
    base: PathBuf,
    adapter: PathBuf,
    /// The adapter's tensors as written.
    lora: HashMap<String, Vec<f32>>,
}

impl Fixture {
    fn new(base_name: &str, spec: &TinySpec, r: usize, magnitude: f32) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let (base, adapter) = (tmp.path().join(base_name), tmp.path().join("adapter"));
        write_base(&base, spec);
        let lora = write_adapter(&adapter, spec, r, magnitude);
        Fixture {
            tmp,
            base,
            adapter,
            lora,
        }
    }

    /// `ferrotune export --adapter ADAPTER --base BASE --save_path OUT ARGS…`.
    fn export(&self, out: &Path, args: &[&str]) -> Output {
        let mut all = vec![
            "export",
            "--adapter",
            self.adapter.to_str().unwrap(),
            "--base",
            self.base.to_str().unwrap(),
            "--save_path",
            out.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        ferrotune(&all)
    }
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
    let spec = spec("llama", DType::BF16);
    let f = Fixture::new("base-llama", &spec, 8, 0.05);
    let (tmp, base, lora, out) = (&f.tmp, &f.base, &f.lora, f.tmp.path().join("out"));
    let mut args = vec![
        "--save_method",
        "merged_16bit",
        "--save_gguf",
        "--max_shard_size_mb",
        "1",
        "--quantization",
    ];
    args.extend(ALL_PRESETS);
    let result = f.export(&out, &args);
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
    let (base_w, merged_w) = (read_model(base), read_model(&out));
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
    let spec = spec("qwen2", DType::F32);
    let f = Fixture::new("qwen", &spec, 4, 0.05);
    let (tmp, base, adapter, out) = (&f.tmp, &f.base, &f.adapter, f.tmp.path().join("out"));
    // A checkpoint directory holds the adapter files: `--checkpoint` instead of `--adapter`.
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
    let f = Fixture::new("base", &spec("llama", DType::F32), 4, 0.05);
    let out = f.tmp.path().join("out");
    let result = f.export(&out, &["--save_method", "lora"]);
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

    let r = run(&adapter, &["--save_gguf", "--quantization", "iq2_xxs"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("iq2_xxs"), "{}", stderr(&r));

    let r = run(&adapter, &[]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("nothing to do"), "{}", stderr(&r));
    assert!(!out.join("model.safetensors").exists() && !out.join("base.Q8_0.gguf").exists());
}

/// Every tensor of a model directory as (safetensors dtype, shape, bytes), by name.
fn read_raw(dir: &Path) -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.insert(
                    name,
                    (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
                );
            }
        }
    }
    out
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn merged_4bit_is_bitsandbytes_nf4_of_the_merged_16bit_model() {
    use ferrotune_kernels::quant::{signed_map, NF4_LEVELS};
    use ferrotune_kernels::reference::nf4::{dequantize_absmax, nf4_dequantize};

    // Four layers make the 4-bit save (about 1.5 MB) span two 1 MB shards.
    let spec = TinySpec {
        num_hidden_layers: 4,
        ..spec("llama", DType::BF16)
    };
    let f = Fixture::new("base", &spec, 8, 0.05);
    let (out16, out4) = (f.tmp.path().join("out16"), f.tmp.path().join("out4"));
    for (method, out, shard_mb) in [
        ("merged_16bit", &out16, "5000"),
        ("merged_4bit", &out4, "1"),
    ] {
        let r = f.export(
            out,
            &["--save_method", method, "--max_shard_size_mb", shard_mb],
        );
        assert!(r.status.success(), "{method}: {}", stderr(&r));
    }
    assert!(out4.join("model.safetensors.index.json").is_file());
    for f in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out4.join(f).is_file(), "{f} missing");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out4.join("config.json")).unwrap()).unwrap();
    let q = &config["quantization_config"];
    for (key, want) in [
        ("quant_method", json!("bitsandbytes")),
        ("load_in_4bit", json!(true)),
        ("load_in_8bit", json!(false)),
        ("bnb_4bit_quant_type", json!("nf4")),
        ("bnb_4bit_use_double_quant", json!(true)),
        ("bnb_4bit_compute_dtype", json!("bfloat16")),
        ("bnb_4bit_quant_storage", json!("uint8")),
    ] {
        assert_eq!(q[key], want, "quantization_config.{key}");
    }
    assert_eq!(config["hidden_size"], 256, "the base config is kept");

    let (m16, m4) = (read_raw(&out16), read_raw(&out4));
    let mut linears = 0;
    for (name, (dtype, shape, bytes)) in &m16 {
        let is_linear = name.starts_with("model.layers.") && shape.len() == 2;
        if !is_linear {
            // Embeddings, norms and lm_head stay 16-bit, bit for bit the merged_16bit values.
            assert_eq!(m4[name], (*dtype, shape.clone(), bytes.clone()), "{name}");
            continue;
        }
        linears += 1;
        let get = |suffix: &str| {
            m4.get(&format!("{name}{suffix}"))
                .unwrap_or_else(|| panic!("{name}{suffix} missing"))
        };
        let n = shape[0] * shape[1];
        let (packed, absmax_q) = (get(""), get(".absmax"));
        assert_eq!((packed.0, &packed.1), (Dtype::U8, &vec![n / 2, 1]));
        assert_eq!((absmax_q.0, &absmax_q.1), (Dtype::U8, &vec![n / 64]));
        let quant_map = get(".quant_map");
        assert_eq!((quant_map.0, &quant_map.1), (Dtype::F32, &vec![16]));
        assert_eq!(f32s(&quant_map.2), NF4_LEVELS);
        let nested_map = get(".nested_quant_map");
        assert_eq!(nested_map.0, Dtype::F32);
        assert_eq!(f32s(&nested_map.2), signed_map().to_vec());
        let nested_absmax = get(".nested_absmax");
        assert_eq!(
            (nested_absmax.0, &nested_absmax.1),
            (Dtype::F32, &vec![(n / 64).div_ceil(256)])
        );
        let state_t = get(".quant_state.bitsandbytes__nf4");
        assert_eq!(state_t.0, Dtype::U8);
        let state: serde_json::Value = serde_json::from_slice(&state_t.2).unwrap();
        let keys: Vec<&str> = state
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "blocksize",
                "dtype",
                "nested_blocksize",
                "nested_dtype",
                "nested_offset",
                "quant_type",
                "shape"
            ]
        );
        assert_eq!(state["quant_type"], "nf4");
        assert_eq!(state["blocksize"], 64);
        assert_eq!(state["dtype"], "bfloat16");
        assert_eq!(state["shape"], json!(shape));
        assert_eq!(state["nested_blocksize"], 256);
        assert_eq!(state["nested_dtype"], "float32");
        let offset = state["nested_offset"].as_f64().unwrap() as f32;

        // Dequantise as bitsandbytes does and compare with the merged 16-bit weight.
        let absmax = dequantize_absmax(&absmax_q.2, &f32s(&nested_absmax.2), signed_map(), offset);
        let back = nf4_dequantize(&packed.2, &absmax);
        let want: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let mut err2 = 0f64;
        let mut ref2 = 0f64;
        for (b, (block_w, block_back)) in want.chunks(64).zip(back.chunks(64)).enumerate() {
            let true_max = block_w.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Double quantisation moves an absmax by at most half a step of the 8-bit map.
            assert!(
                (absmax[b] - true_max).abs() <= 0.01 * true_max + 1e-6,
                "{name} block {b}: absmax {} vs {true_max}",
                absmax[b]
            );
            for (x, y) in block_w.iter().zip(block_back) {
                assert!(
                    (x - y).abs() <= 0.152 * true_max + (absmax[b] - true_max).abs() + 1e-6,
                    "{name} block {b}: {x} dequantised to {y}"
                );
                err2 += ((x - y) as f64).powi(2);
                ref2 += (*x as f64).powi(2);
            }
        }
        let rel = (err2 / ref2).sqrt();
        assert!(
            rel < 0.12,
            "{name}: relative RMS error {rel} (NF4 on these weights: about 0.094)"
        );
    }
    assert_eq!(linears, 7 * spec.num_hidden_layers);
    assert_eq!(
        m4.len(),
        m16.len() + 5 * linears,
        "six entries per linear weight"
    );
}

fn python_has(modules: &str) -> bool {
    let have = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but `python3 -c 'import {modules}'` fails: .ci/run must install it");
    }
    if !have {
        eprintln!("SKIPPED a gguf-py check: python3 cannot import {modules}");
    }
    have
}

/// The SentencePiece vocabularies (`tokenizer.ggml.model = llama`) carry real scores: from
/// tokenizer.model, from a Unigram tokenizer.json, or from the merge ranks of a byte-fallback
/// BPE; gguf-py reads back exactly the expected tokens, scores and types.
#[test]
fn sentencepiece_vocabularies_carry_their_scores_into_the_gguf() {
    use ferrotune::gguf::sentencepiece::{encode_model, Piece, PieceType};

    let spec = TinySpec {
        vocab_size: 320,
        ..spec("llama", DType::F32)
    };
    let f = Fixture::new("base", &spec, 4, 0.05);
    let (tmp, base) = (&f.tmp, &f.base);
    let tok_path = base.join("tokenizer.json");
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&tok_path).unwrap()).unwrap();
    let vocab: HashMap<u32, String> = original["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (id.as_u64().unwrap() as u32, t.clone()))
        .collect();
    let added: HashMap<u32, String> = original["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_u64().unwrap() as u32,
                a["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let n_tok = (0..)
        .take_while(|id| vocab.contains_key(id) || added.contains_key(id))
        .count();
    let text_of = |id: u32| added.get(&id).or(vocab.get(&id)).unwrap().clone();
    // Specials are CONTROL with score -1000 however the vocabulary is given; padding rows UNUSED.
    let expected = |score_of: &dyn Fn(u32) -> f32, pad_score: f32| {
        let (mut tokens, mut scores, mut types) = (vec![], vec![], vec![]);
        for id in 0..spec.vocab_size as u32 {
            if (id as usize) >= n_tok {
                tokens.push(format!("[PAD{id}]"));
                scores.push(pad_score);
                types.push(5);
            } else if added.contains_key(&id) {
                tokens.push(text_of(id));
                scores.push(-1000.0);
                types.push(3);
            } else {
                tokens.push(text_of(id));
                scores.push(score_of(id));
                types.push(1);
            }
        }
        json!({"model": "llama", "tokens": tokens, "scores": scores, "types": types})
    };
    let export = |case: &str, want: serde_json::Value| {
        let out = tmp.path().join(case);
        let r = f.export(&out, &["--save_gguf", "--quantization", "f16"]);
        assert!(r.status.success(), "{case}: {}", stderr(&r));
        let want_path = tmp.path().join(format!("{case}.json"));
        std::fs::write(&want_path, want.to_string()).unwrap();
        if python_has("gguf, numpy") {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/check_gguf_vocab.py");
            let check = Command::new("python3")
                .arg(script)
                .arg(out.join("base.F16.gguf"))
                .arg(&want_path)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "{case}: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        // Our own reader agrees on the scores.
        let file = GgufFile::open(&out.join("base.F16.gguf")).unwrap();
        let want_scores: Vec<f32> = want["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(
            file.get("tokenizer.ggml.scores"),
            Some(&ferrotune::gguf::Value::ArrayF32(want_scores)),
            "{case}"
        );
    };

    // 1. Byte-fallback BPE with a tokenizer.model: the model's scores.
    let mut tok = original.clone();
    tok["model"]["byte_fallback"] = json!(true);
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let spm_score = |id: u32| -0.5 * id as f32 - 0.25;
    let pieces: Vec<Piece> = (0..n_tok as u32)
        .map(|id| Piece {
            text: text_of(id),
            score: if added.contains_key(&id) {
                0.0
            } else {
                spm_score(id)
            },
            kind: if added.contains_key(&id) {
                PieceType::Control
            } else {
                PieceType::Normal
            },
        })
        .collect();
    std::fs::write(base.join("tokenizer.model"), encode_model(&pieces)).unwrap();
    export("spm", expected(&spm_score, -10000.0));

    // 2. The same without tokenizer.model: merge ranks (the token of merge r scores -r).
    std::fs::remove_file(base.join("tokenizer.model")).unwrap();
    let merges = original["model"]["merges"].as_array().unwrap();
    let mut rank_of: HashMap<String, f32> = HashMap::new();
    for (r, m) in merges.iter().enumerate() {
        let merged = match m {
            serde_json::Value::String(s) => s.replacen(' ', "", 1),
            serde_json::Value::Array(p) => {
                format!("{}{}", p[0].as_str().unwrap(), p[1].as_str().unwrap())
            }
            other => panic!("{other}"),
        };
        rank_of.entry(merged).or_insert(-(r as f32));
    }
    let floor = -(rank_of.len() as f32) - 1.0;
    assert!(rank_of.len() > 10, "the tiny tokenizer has merges");
    let rank_score = |id: u32| rank_of.get(&text_of(id)).copied().unwrap_or(floor);
    export("ranks", expected(&rank_score, -1000.0));

    // 3. A Unigram tokenizer.json: its log-probabilities.
    let uni_score = |id: u32| -1.0 - (id as f32) / 7.0;
    let mut tok = original.clone();
    let list: Vec<serde_json::Value> = (0..n_tok as u32)
        .map(|id| json!([text_of(id), uni_score(id)]))
        .collect();
    tok["model"] = json!({"type": "Unigram", "unk_id": null, "vocab": list, "byte_fallback": true});
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    export("unigram", expected(&uni_score, -1000.0));
}

/// candle-transformers runs our GGUF files: its quantized llama (llama.cpp's layout: permuted
/// q/k rows, interleaved RoPE, GGUF metadata) on the f32/f16/q8_0 files gives the same last-token
/// logits, within each type's rounding, as its safetensors llama (Hugging Face layout) on the
/// merged_16bit save the GGUF came from.
#[test]
fn candle_transformers_runs_our_gguf_like_the_merged_safetensors() {
    use candle_core::{Device, Tensor};
    use candle_transformers::models::{llama, quantized_llama};

    let f = Fixture::new("base", &spec("llama", DType::F32), 8, 0.05);
    let out = f.tmp.path().join("out");
    let r = f.export(
        &out,
        &[
            "--save_method",
            "merged_16bit",
            "--save_gguf",
            "--quantization",
            "f32",
            "f16",
            "q8_0",
        ],
    );
    assert!(r.status.success(), "{}", stderr(&r));

    let device = Device::Cpu;
    let config: llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let config = config.into_config(false);
    let files: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&files, candle_core::DType::F32, &device)
            .unwrap()
    };
    let hf = llama::Llama::load(vb, &config).unwrap();
    let prompts: [&[u32]; 2] = [
        &[1, 17, 42, 99, 250, 7, 3, 64, 128, 5, 311, 2],
        &[1, 200, 13],
    ];
    let reference: Vec<Vec<f32>> = prompts
        .iter()
        .map(|ids| {
            let mut cache =
                llama::Cache::new(false, candle_core::DType::F32, &config, &device).unwrap();
            let input = Tensor::new(*ids, &device).unwrap().unsqueeze(0).unwrap();
            hf.forward(&input, 0, &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();

    // Measured: F32 1e-6, F16 1.5e-3, Q8_0 3.2e-2 (candle's CPU matmul also quantizes the
    // activations to Q8_0, as ggml does). A wrong permutation or layout is off by ~100 %.
    for (preset, budget) in [("F32", 1e-4), ("F16", 5e-3), ("Q8_0", 6e-2)] {
        let path = out.join(format!("base.{preset}.gguf"));
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let mut model = quantized_llama::ModelWeights::from_gguf(content, &mut file, &device)
            .unwrap_or_else(|e| panic!("candle cannot load {}: {e}", path.display()));
        for (ids, want) in prompts.iter().zip(&reference) {
            model.clear_kv_cache();
            let input = Tensor::new(*ids, &device).unwrap().unsqueeze(0).unwrap();
            let got: Vec<f32> = model
                .forward(&input, 0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got.len(), want.len());
            let err: f64 = got
                .iter()
                .zip(want)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            assert!(
                err / norm < budget,
                "{preset}, {} tokens: relative L2 error of the logits {} (budget {budget})",
                ids.len(),
                err / norm
            );
        }
    }
}
