use std::collections::HashMap;
use std::path::Path;

use candle_core::DType;
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

use super::*;
use crate::engine::cpu::{trainable_shapes, CpuBackend, EngineOptions};
use crate::engine::{Backend, Batch};
use crate::model::tiny::{write_random_model, TinySpec};
use crate::model::Model;

fn spec() -> TinySpec {
    TinySpec {
        // 96·64 = 6144 values: 96 blocks of 64, one nested block.
        dtype: DType::BF16,
        init_std: 0.08,
        ..TinySpec::default()
    }
}

/// A random bf16 model and its pre-quantised copy (`double_quant` or plain absmax).
fn models(root: &Path, double_quant: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let (src, dst) = (root.join("bf16"), root.join("bnb-4bit"));
    write_random_model(&src, &spec(), 3).unwrap();
    write_prequantized(&src, &dst, double_quant).unwrap();
    (src, dst)
}

type RawFile = HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn raw_file(path: &Path) -> RawFile {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// bitsandbytes' `dequantize_4bit`, written out from the stored tensors alone: absmax =
/// nested_quant_map[code] · nested_absmax[block / 256] + nested_offset (or the f32 absmax),
/// value = quant_map[nibble] · absmax in f32, then rounded to bfloat16.
fn bnb_dequantize(file: &RawFile, name: &str) -> Vec<f32> {
    let get = |s: &str| &file[&format!("{name}{s}")];
    let state: serde_json::Value =
        serde_json::from_slice(&get(".quant_state.bitsandbytes__nf4").2).unwrap();
    let packed = &get("").2;
    let quant_map = f32s(&get(".quant_map").2);
    let absmax: Vec<f32> = match state.get("nested_offset") {
        Some(offset) => {
            let offset = offset.as_f64().unwrap() as f32;
            let code = f32s(&get(".nested_quant_map").2);
            let nested = f32s(&get(".nested_absmax").2);
            get(".absmax")
                .2
                .iter()
                .enumerate()
                .map(|(i, &q)| code[q as usize] * nested[i / 256] + offset)
                .collect()
        }
        None => f32s(&get(".absmax").2),
    };
    let mut out = Vec::with_capacity(packed.len() * 2);
    for (j, &byte) in packed.iter().enumerate() {
        for nibble in [byte >> 4, byte & 15] {
            let v = quant_map[nibble as usize] * absmax[j * 2 / 64];
            out.push(half::bf16::from_f32(v).to_f32());
        }
    }
    out
}

#[test]
fn cpu_weights_are_the_bitsandbytes_dequantisation_of_the_stored_codes() {
    for double_quant in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = models(tmp.path(), double_quant);
        let file = raw_file(&dst.join("model.safetensors"));
        let dense = Model::load(&src).unwrap();
        let model = Model::load(&dst).unwrap();
        assert_eq!(model.config, dense.config);
        assert_eq!(model.weights.numel(), dense.weights.numel());
        let mut quantised = 0;
        for name in dense.weights.names() {
            let want = dense.weights.tensor(name).unwrap();
            let got = model.weights.get(name, want.dims()).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if file[name].0 == Dtype::U8 {
                quantised += 1;
                assert_eq!(got, bnb_dequantize(&file, name), "{name}");
                // And it is an NF4 approximation of the original weight, not something else.
                let (mut e, mut r) = (0f64, 0f64);
                for (g, w) in got.iter().zip(&want) {
                    e += ((g - w) as f64).powi(2);
                    r += (*w as f64).powi(2);
                }
                let rel = (e / r).sqrt();
                assert!(rel < 0.12, "{name}: NF4 relative error {rel}");
            } else {
                assert_eq!(got, want, "{name} stays 16-bit");
            }
        }
        assert_eq!(quantised, 7 * spec().num_hidden_layers);
    }
}

#[test]
fn sharded_companions_are_found_in_other_shards() {
    // A checkpoint split so that a weight's codes and its quant state land in different files.
    let tmp = tempfile::tempdir().unwrap();
    let (_, dst) = models(tmp.path(), true);
    let file = raw_file(&dst.join("model.safetensors"));
    let split = tmp.path().join("sharded");
    std::fs::create_dir_all(&split).unwrap();
    std::fs::copy(dst.join("config.json"), split.join("config.json")).unwrap();
    let mut names: Vec<&String> = file.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let shard = format!("model-0000{}-of-00002.safetensors", k + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| {
                let (d, s, b) = &file[*n];
                map.insert(n.to_string(), json!(shard));
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &split.join(&shard)).unwrap();
    }
    std::fs::write(
        split.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let a = Model::load(&dst).unwrap();
    let b = Model::load(&split).unwrap();
    let name = "model.layers.1.self_attn.o_proj.weight";
    let (x, y) = (
        a.weights.tensor(name).unwrap(),
        b.weights.tensor(name).unwrap(),
    );
    assert_eq!(
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn a_few_training_steps_on_a_prequantised_base_lower_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dst) = models(tmp.path(), true);
    let model = Model::load(&dst).unwrap();
    let opts = EngineOptions {
        r: 8,
        lora_alpha: 16.0,
        use_rslora: false,
        lora_dropout: 0.0,
        bias: crate::cli::choices::Bias::None,
        target_modules: crate::job::PROJECTIONS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        init_seed: 3407,
        dropout_seed: 1,
        gradient_checkpointing: false,
    };
    let shapes = trainable_shapes(&model.config, &opts).unwrap();
    let optimizer = Box::new(crate::optim::AdamW::new(crate::optim::param_specs(
        &shapes, 0.0,
    )));
    let vocab = model.config.vocab_size as u32;
    let mut be = CpuBackend::new(model, opts, optimizer).unwrap();
    // One sequence the adapter can learn: a fixed pseudo-random walk over the vocabulary.
    let t = 24;
    let ids: Vec<u32> = (0..=t as u32).map(|i| (i * 37 + 11) % vocab).collect();
    let batch = Batch {
        batch_size: 1,
        seq_len: t,
        input_ids: ids[..t].to_vec(),
        targets: ids[1..].iter().map(|&i| i as i32).collect(),
        position_ids: (0..t as u32).collect(),
        segment_ids: vec![0; t],
    };
    let scale = 1.0 / batch.trainable_tokens() as f32;
    let mut losses = Vec::new();
    for _ in 0..6 {
        let stats = be.forward_backward(&batch, scale).unwrap();
        losses.push(stats.loss_sum / stats.tokens as f64);
        be.optimizer_step(1e-2, 1.0).unwrap();
    }
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(
        losses[5] < losses[0] - 0.1,
        "the loss does not fall: {losses:?}"
    );
}

/// Rewrites `dir`'s model.safetensors through `edit` (name → entry; `None` drops it).
fn edit_file(dir: &Path, edit: impl Fn(&str, &mut (Dtype, Vec<usize>, Vec<u8>)) -> bool) {
    let path = dir.join("model.safetensors");
    let mut file = raw_file(&path);
    file.retain(|n, t| edit(n, t));
    let views: Vec<(String, safetensors::tensor::TensorView)> = file
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn edit_config(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&path, c.to_string()).unwrap();
}

/// The error of loading `dir` into the cpu engine, as the CLI prints it (`{:#}`).
fn load_error(dir: &Path) -> String {
    let result = Model::load(dir).and_then(|m| {
        let cfg = m.config.clone();
        let opts = EngineOptions {
            r: 4,
            lora_alpha: 8.0,
            use_rslora: false,
            lora_dropout: 0.0,
            bias: crate::cli::choices::Bias::None,
            target_modules: vec!["q_proj".into()],
            init_seed: 1,
            dropout_seed: 1,
            gradient_checkpointing: false,
        };
        let shapes = trainable_shapes(&cfg, &opts)?;
        let opt = Box::new(crate::optim::AdamW::new(crate::optim::param_specs(
            &shapes, 0.0,
        )));
        CpuBackend::new(m, opts, opt)
    });
    format!("{:#}", result.err().expect("the load fails"))
}

#[test]
fn bad_prequantised_checkpoints_fail_with_one_line_naming_the_problem() {
    let q = "model.layers.0.self_attn.q_proj.weight";
    type Break = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Break, Vec<&str>)> = vec![
        (
            "fp4",
            Box::new(|d| {
                edit_config(d, |c| {
                    c["quantization_config"]["bnb_4bit_quant_type"] = "fp4".into()
                })
            }),
            vec!["config.json", "bnb_4bit_quant_type", "\"fp4\""],
        ),
        (
            "8-bit",
            Box::new(|d| {
                edit_config(d, |c| {
                    c["quantization_config"]["load_in_8bit"] = true.into();
                    c["quantization_config"]["load_in_4bit"] = false.into();
                })
            }),
            vec!["config.json", "load_in_8bit"],
        ),
        (
            "missing quant_state",
            Box::new(move |d| {
                edit_file(d, |n, _| n != format!("{q}.quant_state.bitsandbytes__nf4"))
            }),
            vec![&"model.layers.0.self_attn.q_proj.weight.absmax", "without"],
        ),
        (
            "wrong shape",
            Box::new(move |d| {
                edit_file(d, |n, t| {
                    if n == format!("{q}.quant_state.bitsandbytes__nf4") {
                        let mut s: serde_json::Value = serde_json::from_slice(&t.2).unwrap();
                        s["shape"] = json!([32, 128]);
                        t.2 = s.to_string().into_bytes();
                        t.1 = vec![t.2.len()];
                    }
                    true
                })
            }),
            vec![q, "[32, 128]", "config.json implies [64, 64]"],
        ),
        (
            "packed codes cut short",
            Box::new(move |d| {
                edit_file(d, |n, t| {
                    if n == q {
                        t.2.truncate(1024);
                        t.1 = vec![1024, 1];
                    }
                    true
                })
            }),
            vec![q, "[1024, 1]", "implies [2048, 1]"],
        ),
        (
            "config without quantization_config",
            Box::new(|d| {
                edit_config(d, |c| {
                    c.as_object_mut().unwrap().remove("quantization_config");
                })
            }),
            vec!["no quantization_config", "stored 4-bit"],
        ),
        (
            "double quant declared, plain stored",
            Box::new(|d| {
                edit_config(d, |c| {
                    c["quantization_config"]["bnb_4bit_use_double_quant"] = false.into()
                })
            }),
            vec!["double-quantised", "bnb_4bit_use_double_quant false"],
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let (_, good) = models(tmp.path(), true);
    for (label, break_it, wants) in cases {
        let dir = tmp.path().join(label.replace(' ', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(&good).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
        break_it(&dir);
        let err = load_error(&dir);
        for want in wants {
            assert!(err.contains(want), "{label}: {err:?} lacks {want:?}");
        }
        assert!(!err.contains('\n'), "{label}: not one line: {err:?}");
    }
}

#[test]
fn quantization_configs_that_do_not_load_are_named() {
    let path = Path::new("m/config.json");
    let parse = |qc: serde_json::Value| {
        Bnb4Config::from_config(&json!({ "quantization_config": qc }), path)
    };
    assert_eq!(
        Bnb4Config::from_config(&json!({"model_type": "llama"}), path).unwrap(),
        None
    );
    let ok = parse(bnb_nf4::quantization_config("bfloat16"))
        .unwrap()
        .unwrap();
    assert!(ok.double_quant);
    assert_eq!(ok.compute_dtype.as_deref(), Some("bfloat16"));
    for (qc, want) in [
        (
            json!({"quant_method": "gptq", "bits": 4}),
            "quant_method \"gptq\"",
        ),
        (
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true}),
            "\"fp4\"",
        ),
        (
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true,
                   "bnb_4bit_quant_type": "nf4", "bnb_4bit_quant_storage": "bfloat16"}),
            "bnb_4bit_quant_storage",
        ),
        (
            json!({"quant_method": "bitsandbytes", "load_in_8bit": true}),
            "load_in_8bit",
        ),
    ] {
        let err = parse(qc).unwrap_err().to_string();
        assert!(err.contains("m/config.json") && err.contains(want), "{err}");
    }
}

/// A PEFT adapter over every projection of `cfg` with small random A and B.
fn write_adapter(dir: &Path, cfg: &crate::model::ModelConfig) {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let r = 4;
    let mut stored: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for proj in crate::job::PROJECTIONS {
            let group = if matches!(proj, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
                "self_attn"
            } else {
                "mlp"
            };
            let (inp, out) = cfg.projection_shape(proj).unwrap();
            let p = format!("base_model.model.model.layers.{l}.{group}.{proj}");
            for (suffix, shape) in [("lora_A", vec![r, inp]), ("lora_B", vec![out, r])] {
                let n: usize = shape.iter().product();
                let bytes = (0..n)
                    .flat_map(|_| rng.random_range(-0.05f32..0.05).to_le_bytes())
                    .collect();
                stored.push((format!("{p}.{suffix}.weight"), shape, bytes));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = stored
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    let config = json!({
        "peft_type": "LORA", "r": r, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": false,
        "use_dora": false, "bias": "none", "task_type": "CAUSAL_LM",
        "target_modules": crate::job::PROJECTIONS, "base_model_name_or_path": "unused/base",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

fn export(base: &Path, adapter: &Path, out: &Path, method: crate::cli::choices::SaveMethod) {
    crate::export::run_exports(&crate::export::ExportRequest {
        base_dir: base.to_path_buf(),
        adapter_dir: adapter.to_path_buf(),
        save_method: Some(method),
        gguf_presets: Vec::new(),
        save_path: out.to_path_buf(),
        name: "m".into(),
        max_shard_bytes: crate::export::hf_save::DEFAULT_MAX_SHARD_BYTES,
        max_seq_length: None,
    })
    .unwrap();
}

#[test]
fn exports_from_a_prequantised_base_merge_into_its_bitsandbytes_dequantisation() {
    use crate::cli::choices::SaveMethod;
    let tmp = tempfile::tempdir().unwrap();
    let (_, bnb) = models(tmp.path(), true);
    // The same model as a 16-bit checkpoint holding exactly the weights the cpu engine trains
    // on: merging into either base must give the same bytes.
    let dense = tmp.path().join("dequantised");
    std::fs::create_dir_all(&dense).unwrap();
    let model = Model::load(&bnb).unwrap();
    let mut stored: Vec<(String, Vec<usize>, Vec<u8>)> = model
        .weights
        .names()
        .map(|n| {
            let t = model.weights.tensor(n).unwrap();
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bytes = v
                .iter()
                .flat_map(|&x| {
                    let b = half::bf16::from_f32(x);
                    assert_eq!(b.to_f32(), x, "{n}: dequantised values are bf16 values");
                    b.to_le_bytes()
                })
                .collect();
            (n.to_string(), t.dims().to_vec(), bytes)
        })
        .collect();
    stored.sort();
    let views: Vec<(String, safetensors::tensor::TensorView)> = stored
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::BF16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dense.join("model.safetensors")).unwrap();
    std::fs::copy(bnb.join("config.json"), dense.join("config.json")).unwrap();
    edit_config(&dense, |c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });

    let adapter = tmp.path().join("adapter");
    write_adapter(&adapter, &model.config);
    let (from_bnb, from_dense) = (tmp.path().join("out-bnb"), tmp.path().join("out-dense"));
    export(&bnb, &adapter, &from_bnb, SaveMethod::Merged16bit);
    export(&dense, &adapter, &from_dense, SaveMethod::Merged16bit);
    let (a, b) = (
        raw_file(&from_bnb.join("model.safetensors")),
        raw_file(&from_dense.join("model.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for (name, t) in &b {
        assert_eq!(&a[name], t, "{name}");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from_bnb.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none(), "16-bit save");

    // merged_4bit from the 4-bit base: requantised, the same modules 4-bit, and it loads back.
    let out4 = tmp.path().join("out-4bit");
    export(&bnb, &adapter, &out4, SaveMethod::Merged4bit);
    let q = raw_file(&out4.join("model.safetensors"));
    let base_file = raw_file(&bnb.join("model.safetensors"));
    let mut keys: Vec<_> = q.keys().collect();
    let mut base_keys: Vec<_> = base_file.keys().collect();
    keys.sort();
    base_keys.sort();
    assert_eq!(keys, base_keys);
    let merged4 = Model::load(&out4).unwrap();
    let name = "model.layers.1.mlp.gate_proj.weight";
    let (want, got) = (
        raw_file(&from_dense.join("model.safetensors")),
        merged4.weights.tensor(name).unwrap(),
    );
    let want: Vec<f32> = want[name]
        .2
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (mut e, mut r) = (0f64, 0f64);
    for (g, w) in got.iter().zip(&want) {
        e += ((g - w) as f64).powi(2);
        r += (*w as f64).powi(2);
    }
    assert!((e / r).sqrt() < 0.12, "the 4-bit save is NF4 of the merge");
}

/// The whole job on the cpu engine, as `ferrotune --model_name DIR-bnb-4bit …` runs it: data,
/// training, checkpoints, and a merged 16-bit save from the 4-bit base.
#[test]
fn a_training_job_on_a_prequantised_base_runs_and_saves_a_dequantised_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let texts: Vec<&str> = crate::demo::DATASET.lines().collect();
    let spec = TinySpec {
        dtype: DType::BF16,
        ..TinySpec::default()
    };
    crate::model::tiny::write_tiny_chat_model(&model, &texts, 320, 512, spec, 1).unwrap();
    let bnb = tmp.path().join("model-bnb-4bit");
    write_prequantized(&model, &bnb, true).unwrap();
    let data = tmp.path().join("train.jsonl");
    std::fs::write(&data, texts[..40].join("\n") + "\n").unwrap();
    let (out, save) = (tmp.path().join("out"), tmp.path().join("save"));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let args: Vec<String> = [
        "ferrotune",
        "--model_name",
        &s(&bnb),
        "--dataset",
        &s(&data),
        "--output_dir",
        &s(&out),
        "--save_path",
        &s(&save),
        "--save_model",
        "--save_method",
        "merged_16bit",
        "--device",
        "cpu",
        "--max_seq_length",
        "128",
        "--r",
        "4",
        "--lora_alpha",
        "8",
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--learning_rate",
        "5e-3",
        "--report_to",
        "none",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let crate::cli::Invocation::Train(job) = crate::cli::parse(args).unwrap_or_else(|_| panic!())
    else {
        panic!("a training job");
    };
    let report = crate::train::run_job(&job).unwrap();
    let losses = report.state.logged_losses();
    assert_eq!(losses.len(), 4);
    assert!(
        losses.iter().all(|(_, l)| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    let merged = Model::load(&save).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(save.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());
    let base = Model::load(&bnb).unwrap();
    assert_eq!(merged.weights.numel(), base.weights.numel());
}
