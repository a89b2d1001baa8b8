//! Gradient checks against candle's autograd, per block (`blocks`) and per architecture (here),
//! plus the engine's invariants: packing, checkpointing, frozen weights, optimizer plumbing and
//! resumable dropout.

mod blocks;
mod oracle;

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::{CpuBackend, EngineOptions};
use crate::cli::choices::Bias;
use crate::engine::{Backend, Batch, HostData, HostTensor, IGNORE};
use crate::job::PROJECTIONS;
use crate::model::tiny::{write_random_model, TinySpec};
use crate::model::{Model, ModelConfig};
use crate::optim::Optimizer;

/// Deterministic uniform tensor with the given standard deviation.
pub fn rand_tensor(shape: &[usize], std: f64, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let w = std * 3f64.sqrt();
    let data: Vec<f32> = (0..n)
        .map(|_| (rng.random_range(-1.0..1.0) * w) as f32)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Max absolute difference relative to the reference's largest magnitude.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let rel = max_rel(&g, &w);
    assert!(rel <= tol, "{what}: relative error {rel:e} > {tol:e}");
}

pub fn llama3_spec() -> TinySpec {
    TinySpec {
        rope_scaling: Some(
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        ),
        ..TinySpec::default()
    }
}

pub fn spec_config(spec: &TinySpec) -> ModelConfig {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(
        dir.path(),
        &TinySpec {
            num_hidden_layers: 1,
            ..spec.clone()
        },
        0,
    )
    .unwrap();
    ModelConfig::from_dir(dir.path()).unwrap()
}

/// Plain SGD that records the order it sees tensors in.
#[derive(Default)]
struct RecordingSgd {
    seen: Vec<usize>,
    steps: u64,
}

impl Optimizer for RecordingSgd {
    fn step(
        &mut self,
        index: usize,
        param: &mut [f32],
        grad: &[f32],
        lr: f64,
    ) -> anyhow::Result<()> {
        self.seen.push(index);
        for (p, g) in param.iter_mut().zip(grad) {
            *p -= lr as f32 * g;
        }
        if index == 0 {
            self.steps += 1;
        }
        Ok(())
    }
    fn export_state(&self) -> (Vec<(String, HostTensor)>, serde_json::Value) {
        (Vec::new(), json!({ "steps": self.steps }))
    }
    fn import_state(
        &mut self,
        _: &[(String, HostTensor)],
        s: &serde_json::Value,
    ) -> anyhow::Result<()> {
        self.steps = s["steps"].as_u64().unwrap();
        Ok(())
    }
}

fn options() -> EngineOptions {
    EngineOptions {
        r: 4,
        lora_alpha: 8.0,
        use_rslora: false,
        lora_dropout: 0.0,
        bias: Bias::None,
        target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        init_seed: 3407,
        dropout_seed: 11,
        gradient_checkpointing: true,
    }
}

fn backend(dir: &Path, opts: EngineOptions) -> CpuBackend {
    CpuBackend::new(
        Model::load(dir).unwrap(),
        opts,
        Box::<RecordingSgd>::default(),
    )
    .unwrap()
}

/// Gives every B matrix random values (PEFT starts them at zero, which would make every A
/// gradient zero and the check vacuous).
fn randomise_b(be: &mut CpuBackend, seed: u64) {
    let mut params = be.export_trainable().unwrap();
    for (k, (name, t)) in params.iter_mut().enumerate() {
        if name.contains("lora_B") || name.ends_with("bias") {
            let r = rand_tensor(&t.shape, 0.2, seed + k as u64);
            t.data = HostData::F32(r.flatten_all().unwrap().to_vec1().unwrap());
        }
    }
    be.import_trainable(&params).unwrap();
}

/// Two rows of 12: row 0 packs samples of 5 and 7 tokens (positions restart, segments differ),
/// row 1 is one sample of 9 tokens plus 3 padding tokens; some targets are ignored.
fn packed_batch(vocab: u32, seed: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t = 12;
    let input_ids: Vec<u32> = (0..2 * t).map(|_| rng.random_range(0..vocab)).collect();
    let mut targets: Vec<i32> = (0..2 * t)
        .map(|_| rng.random_range(0..vocab) as i32)
        .collect();
    let position_ids: Vec<u32> = [
        (0..5).collect::<Vec<u32>>(),
        (0..7).collect(),
        (0..9).collect(),
        (0..3).collect(),
    ]
    .concat();
    let segment_ids: Vec<u32> = [vec![0; 5], vec![1; 7], vec![0; 9], vec![1; 3]].concat();
    for i in [0, 4, 11, 20, 21, 22, 23] {
        targets[i] = IGNORE;
    }
    Batch {
        batch_size: 2,
        seq_len: t,
        input_ids,
        targets,
        position_ids,
        segment_ids,
    }
}

/// Engine vs oracle: loss and every trainable gradient within `tol` relative.
fn check_against_oracle(spec: TinySpec, opts: EngineOptions, tol: f64) {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &spec, 42).unwrap();
    let mut be = backend(dir.path(), opts.clone());
    randomise_b(&mut be, 100);
    let batch = packed_batch(spec.vocab_size as u32, 5);
    let scale = 1.0 / batch.trainable_tokens() as f32;
    // One pass first so the checked pass uses a nonzero dropout counter.
    if opts.lora_dropout > 0.0 {
        be.forward_backward(&batch, 0.0).unwrap();
        for p in be.params.iter_mut() {
            p.grad.iter_mut().for_each(|g| *g = 0.0);
        }
    }
    let pass = be.passes;
    let stats = be.forward_backward(&batch, scale).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let trainable = be.export_trainable().unwrap();
    let want = oracle::run(
        &model.config,
        &model.weights,
        &trainable,
        &opts,
        &batch,
        Some(pass),
    );
    let rel = (stats.loss_sum - want.loss_sum).abs() / want.loss_sum;
    assert!(
        rel < 1e-5,
        "loss {} vs oracle {}",
        stats.loss_sum,
        want.loss_sum
    );
    assert_eq!(stats.tokens, batch.trainable_tokens());
    let grads = be.gradients();
    assert_eq!(grads.len(), want.grads.len());
    for (name, got) in grads {
        let reference: Vec<f32> = want.grads[&name].iter().map(|g| g * scale).collect();
        assert!(
            reference.iter().any(|&g| g != 0.0),
            "{name}: oracle gradient is zero"
        );
        let rel = max_rel(&got, &reference);
        assert!(rel <= tol, "{name}: relative error {rel:e}");
    }
}

#[test]
fn llama_gqa_gradients_match_autograd() {
    check_against_oracle(TinySpec::default(), options(), 1e-4);
}

#[test]
fn llama3_rope_scaling_gradients_match_autograd() {
    check_against_oracle(
        llama3_spec(),
        EngineOptions {
            gradient_checkpointing: false,
            ..options()
        },
        1e-4,
    );
}

#[test]
fn mistral_sliding_window_gradients_match_autograd() {
    let spec = TinySpec {
        model_type: "mistral".into(),
        ..TinySpec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &spec, 1).unwrap();
    // Give the generated config a window shorter than the batch so it changes the result.
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["sliding_window"] = json!(4);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut be = backend(dir.path(), options());
    randomise_b(&mut be, 7);
    let batch = packed_batch(spec.vocab_size as u32, 9);
    be.forward_backward(&batch, 1.0).unwrap();
    let model = Model::load(dir.path()).unwrap();
    assert_eq!(model.config.sliding_window, Some(4));
    let want = oracle::run(
        &model.config,
        &model.weights,
        &be.export_trainable().unwrap(),
        &options(),
        &batch,
        None,
    );
    for (name, got) in be.gradients() {
        let rel = max_rel(&got, &want.grads[&name]);
        assert!(rel <= 1e-4, "{name}: relative error {rel:e}");
    }
}

#[test]
fn qwen2_bias_all_gradients_match_autograd() {
    let spec = TinySpec {
        model_type: "qwen2".into(),
        ..TinySpec::default()
    };
    let opts = EngineOptions {
        bias: Bias::All,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        use_rslora: true,
        ..options()
    };
    // k_proj is not adapted, so its bias is trainable under its own name.
    let cfg = spec_config(&spec);
    let names: Vec<String> = super::trainable_shapes(&cfg, &opts)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names
        .contains(&"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias".to_string()));
    assert!(names.contains(&"base_model.model.model.layers.0.self_attn.k_proj.bias".to_string()));
    check_against_oracle(spec, opts, 1e-4);
}

#[test]
fn qwen3_qk_norm_gradients_match_autograd() {
    let spec = TinySpec {
        model_type: "qwen3".into(),
        head_dim: Some(24),
        ..TinySpec::default()
    };
    check_against_oracle(
        spec,
        EngineOptions {
            lora_dropout: 0.2,
            ..options()
        },
        1e-4,
    );
}

#[test]
fn tied_embedding_gradients_match_autograd() {
    let spec = TinySpec {
        tie_word_embeddings: true,
        num_key_value_heads: 4,
        ..TinySpec::default()
    };
    check_against_oracle(
        spec,
        EngineOptions {
            bias: Bias::LoraOnly,
            ..options()
        },
        1e-4,
    );
}

#[test]
fn packing_equals_running_the_samples_separately() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &TinySpec::default(), 3).unwrap();
    let mut packed = backend(dir.path(), options());
    randomise_b(&mut packed, 1);
    let mut single = backend(dir.path(), options());
    randomise_b(&mut single, 1);
    let b = packed_batch(96, 2);
    let packed_row = Batch {
        batch_size: 1,
        seq_len: 12,
        input_ids: b.input_ids[..12].to_vec(),
        targets: b.targets[..12].to_vec(),
        position_ids: b.position_ids[..12].to_vec(),
        segment_ids: b.segment_ids[..12].to_vec(),
    };
    let sample = |r: std::ops::Range<usize>| Batch {
        batch_size: 1,
        seq_len: r.len(),
        input_ids: b.input_ids[r.clone()].to_vec(),
        targets: b.targets[r.clone()].to_vec(),
        position_ids: (0..r.len() as u32).collect(),
        segment_ids: vec![0; r.len()],
    };
    let p = packed.forward_backward(&packed_row, 1.0).unwrap();
    let s1 = single.forward_backward(&sample(0..5), 1.0).unwrap();
    let s2 = single.forward_backward(&sample(5..12), 1.0).unwrap();
    assert_eq!(p.tokens, s1.tokens + s2.tokens);
    let want = s1.loss_sum + s2.loss_sum;
    assert!(
        (p.loss_sum - want).abs() / want < 1e-5,
        "{} vs {want}",
        p.loss_sum
    );
    for ((name, a), (_, b)) in packed.gradients().into_iter().zip(single.gradients()) {
        let rel = max_rel(&a, &b);
        assert!(rel < 1e-5, "{name}: {rel:e}");
    }
}

#[test]
fn checkpointed_and_stored_activations_give_identical_gradients() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &TinySpec::default(), 4).unwrap();
    let opts = EngineOptions {
        lora_dropout: 0.1,
        ..options()
    };
    let mut ckpt = backend(
        dir.path(),
        EngineOptions {
            gradient_checkpointing: true,
            ..opts.clone()
        },
    );
    let mut keep = backend(
        dir.path(),
        EngineOptions {
            gradient_checkpointing: false,
            ..opts
        },
    );
    randomise_b(&mut ckpt, 3);
    randomise_b(&mut keep, 3);
    let batch = packed_batch(96, 4);
    let a = ckpt.forward_backward(&batch, 0.5).unwrap();
    let b = keep.forward_backward(&batch, 0.5).unwrap();
    assert_eq!(a, b);
    assert_eq!(ckpt.gradients(), keep.gradients());
}

#[test]
fn only_trainable_tensors_have_gradients_and_counts_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        model_type: "qwen2".into(),
        ..TinySpec::default()
    };
    write_random_model(dir.path(), &spec, 5).unwrap();
    let opts = EngineOptions {
        target_modules: vec!["q_proj".into(), "o_proj".into()],
        bias: Bias::LoraOnly,
        ..options()
    };
    let be = backend(dir.path(), opts.clone());
    let shapes = be.trainable_shapes();
    assert_eq!(shapes, super::trainable_shapes(be.config(), &opts).unwrap());
    // Per layer: q bias (lora_only on an adapted module), q A/B, o A/B; o_proj has no bias in Qwen2.
    assert_eq!(shapes.len(), 2 * 5);
    assert!(shapes
        .iter()
        .all(|(n, _)| n.contains(".lora_") || n.ends_with("q_proj.base_layer.bias")));
    assert_eq!(
        shapes[1],
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
            vec![4, 64]
        )
    );
    assert_eq!(
        shapes[2],
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
            vec![64, 4]
        )
    );
    assert_eq!(be.grad_numel(), be.num_trainable());
    let base = Model::load(dir.path()).unwrap().weights.numel();
    let lora: usize = shapes
        .iter()
        .filter(|(n, _)| n.contains("lora_"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(be.num_params(), base + lora);
}

#[test]
fn lora_init_is_seeded_kaiming_uniform_with_zero_b() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &TinySpec::default(), 6).unwrap();
    let a = backend(dir.path(), options()).export_trainable().unwrap();
    let b = backend(dir.path(), options()).export_trainable().unwrap();
    let c = backend(
        dir.path(),
        EngineOptions {
            init_seed: 1,
            ..options()
        },
    )
    .export_trainable()
    .unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    for (name, t) in &a {
        let HostData::F32(v) = &t.data else { panic!() };
        if name.contains("lora_B") {
            assert!(v.iter().all(|&x| x == 0.0), "{name}");
        } else {
            let bound = 1.0 / (t.shape[1] as f32).sqrt();
            assert!(v.iter().all(|x| x.abs() <= bound), "{name}");
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(max > 0.9 * bound, "{name}: spread {max} vs bound {bound}");
        }
    }
}

#[test]
fn optimizer_step_scales_steps_in_order_and_zeroes_gradients() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &TinySpec::default(), 7).unwrap();
    let mut be = backend(dir.path(), options());
    randomise_b(&mut be, 9);
    be.forward_backward(&packed_batch(96, 1), 0.1).unwrap();
    let before = be.export_trainable().unwrap();
    let grads = be.gradients();
    let norm = be.grad_norm().unwrap();
    let want_norm: f64 = grads
        .iter()
        .flat_map(|(_, g)| g)
        .map(|&g| (g as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((norm - want_norm).abs() < 1e-9 * want_norm.max(1.0) && norm > 0.0);
    be.optimizer_step(0.5, 0.25).unwrap();
    let after = be.export_trainable().unwrap();
    for (((name, b), (_, a)), (_, g)) in before.iter().zip(&after).zip(&grads) {
        let (HostData::F32(b), HostData::F32(a)) = (&b.data, &a.data) else {
            panic!()
        };
        for k in 0..b.len() {
            let want = b[k] - 0.5 * 0.25 * g[k];
            assert!(
                (a[k] - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{name}[{k}]"
            );
        }
    }
    assert!(be
        .gradients()
        .iter()
        .all(|(_, g)| g.iter().all(|&x| x == 0.0)));
    assert_eq!(be.grad_norm().unwrap(), 0.0);
}

#[test]
fn dropout_state_resumes_exactly_through_the_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &TinySpec::default(), 8).unwrap();
    let opts = EngineOptions {
        lora_dropout: 0.3,
        ..options()
    };
    let batch = packed_batch(96, 6);
    let mut first = backend(dir.path(), opts.clone());
    randomise_b(&mut first, 2);
    for _ in 0..2 {
        first.forward_backward(&batch, 1.0).unwrap();
        first.optimizer_step(0.01, 1.0).unwrap();
    }
    let params = first.export_trainable().unwrap();
    let (tensors, scalars) = first.export_optimizer().unwrap();
    assert_eq!(scalars["engine"]["forward_passes"], 2);
    let mut resumed = backend(dir.path(), opts);
    resumed.import_trainable(&params).unwrap();
    resumed.import_optimizer(&tensors, &scalars).unwrap();
    let a = first.forward_backward(&batch, 1.0).unwrap();
    let b = resumed.forward_backward(&batch, 1.0).unwrap();
    assert_eq!(a, b);
    assert_eq!(first.gradients(), resumed.gradients());
    // A fresh backend (pass 0) draws other masks, so the comparison above is not vacuous.
    let mut fresh = backend(
        dir.path(),
        EngineOptions {
            lora_dropout: 0.3,
            ..options()
        },
    );
    fresh.import_trainable(&params).unwrap();
    assert_ne!(fresh.forward_backward(&batch, 1.0).unwrap(), a);
}

/// A checkpoint written by the cpu engine, re-shaped as the cuda engine writes its state (the
/// same optimizer blob, no forward-pass count), restores into a fresh cpu backend through the
/// checkpoint files and continues exactly.
#[test]
fn optimizer_state_moves_between_engines_through_a_checkpoint() {
    use crate::engine::optimizer_state::{pack, unpack, EngineCounters};
    use crate::optim::{param_specs, AdamW};
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &TinySpec::default(), 12).unwrap();
    let adamw = || {
        let model = Model::load(dir.path()).unwrap();
        let shapes = super::trainable_shapes(&model.config, &options()).unwrap();
        let opt = Box::new(AdamW::new(param_specs(&shapes, 0.01)));
        CpuBackend::new(model, options(), opt).unwrap()
    };
    let batch = packed_batch(96, 3);
    let mut first = adamw();
    randomise_b(&mut first, 5);
    for _ in 0..2 {
        first.forward_backward(&batch, 1.0).unwrap();
        first.optimizer_step(1e-2, 1.0).unwrap();
    }
    let (tensors, scalars) = first.export_optimizer().unwrap();
    let (blob, _) = unpack(&scalars).unwrap();
    let cuda_shaped = pack(blob.clone(), EngineCounters::default());
    assert!(cuda_shaped["engine"].get("forward_passes").is_none());

    let out = tempfile::tempdir().unwrap();
    let saved = crate::checkpoint::save(
        out.path(),
        &crate::checkpoint::Snapshot {
            global_step: 2,
            adapter: first.export_trainable().unwrap(),
            adapter_config: b"{}".to_vec(),
            model_card: String::new(),
            optimizer_tensors: tensors,
            optimizer_scalars: cuda_shaped,
            trainer_state: json!({}),
            training_state: json!({}),
            training_args: json!({}),
        },
    )
    .unwrap();
    let loaded = crate::checkpoint::load(&saved).unwrap();
    let mut resumed = adamw();
    let wanted = resumed.trainable_shapes();
    let adapter = crate::checkpoint::tensors::align(loaded.adapter, &wanted, "test").unwrap();
    resumed.import_trainable(&adapter).unwrap();
    resumed
        .import_optimizer(&loaded.optimizer_tensors, &loaded.optimizer_scalars)
        .unwrap();
    for be in [&mut first, &mut resumed] {
        be.forward_backward(&batch, 1.0).unwrap();
        be.optimizer_step(1e-2, 1.0).unwrap();
    }
    assert_eq!(
        first.export_trainable().unwrap(),
        resumed.export_trainable().unwrap()
    );
    // The same optimizer state (the pass counts differ: the cuda-shaped state had none).
    let optimizer = |be: &CpuBackend| {
        let (tensors, scalars) = be.export_optimizer().unwrap();
        (tensors, unpack(&scalars).unwrap().0.clone())
    };
    assert_eq!(optimizer(&first), optimizer(&resumed));
}

#[test]
fn eval_loss_matches_the_training_forward_and_leaves_gradients_alone() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &TinySpec::default(), 9).unwrap();
    let mut be = backend(dir.path(), options());
    randomise_b(&mut be, 4);
    let batch = packed_batch(96, 8);
    let eval = be.eval_loss(&batch).unwrap();
    assert_eq!(be.grad_norm().unwrap(), 0.0);
    let train = be.forward_backward(&batch, 1.0).unwrap();
    assert_eq!(eval, train);
}

#[test]
fn bad_batches_and_mismatched_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &TinySpec::default(), 10).unwrap();
    let mut be = backend(dir.path(), options());
    let mut batch = packed_batch(96, 1);
    batch.input_ids[3] = 500;
    let err = be.forward_backward(&batch, 1.0).unwrap_err().to_string();
    assert!(
        err.contains("token id 500") && err.contains("vocabulary"),
        "{err}"
    );
    let mut other = backend(dir.path(), EngineOptions { r: 8, ..options() })
        .export_trainable()
        .unwrap();
    let err = be.import_trainable(&other).unwrap_err().to_string();
    assert!(err.contains("shape") && err.contains("--r"), "{err}");
    other.pop();
    let err = be.import_trainable(&other).unwrap_err().to_string();
    assert!(err.contains("trainable tensors"), "{err}");
}

/// CPU seconds this process has used (all threads), from /proc: the perf report divides by
/// these as well as by wall time, because CI machines are shared.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Wall and CPU seconds per call of `f`, averaged over `runs`.
fn timed(runs: usize, mut f: impl FnMut()) -> (f64, f64) {
    let (wall, cpu) = (std::time::Instant::now(), cpu_seconds());
    for _ in 0..runs {
        f();
    }
    (
        wall.elapsed().as_secs_f64() / runs as f64,
        (cpu_seconds() - cpu) / runs as f64,
    )
}

/// The performance figure in docs/engine.md: one forward_backward of a 4-layer, 512-hidden Llama
/// (vocab 32000) on one 512-token row, next to the GEMM throughput of the same machine. Run with
/// `cargo test -p ferrotune --lib perf_llama_4x512 -- --ignored --nocapture`.
#[test]
#[ignore = "performance report, not a check"]
fn perf_llama_4x512_seq512() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        vocab_size: 32000,
        hidden_size: 512,
        intermediate_size: 1376,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        init_std: 0.02,
        ..TinySpec::default()
    };
    write_random_model(dir.path(), &spec, 1).unwrap();
    let t = 512;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ids: Vec<u32> = (0..t).map(|_| rng.random_range(0..32000)).collect();
    let batch = Batch {
        batch_size: 1,
        seq_len: t,
        input_ids: ids.clone(),
        targets: ids[1..].iter().map(|&x| x as i32).chain([IGNORE]).collect(),
        position_ids: (0..t as u32).collect(),
        segment_ids: vec![0; t],
    };
    // Baseline: candle's f32 GEMM on the MLP's shape, x[512,512] · W[1376,512]ᵀ.
    let x = rand_tensor(&[t, 512], 1.0, 1);
    let w = rand_tensor(&[1376, 512], 1.0, 2);
    let (gw, gc) = timed(20, || {
        x.matmul(&w.t().unwrap()).unwrap();
    });
    let flops = 2.0 * t as f64 * 512.0 * 1376.0;
    println!(
        "gemm baseline: {:.1} GFLOP/s wall, {:.1} GFLOP/s per CPU-second; threads={}",
        flops / gw / 1e9,
        flops / gc.max(1e-9) / 1e9,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    for ckpt in [true, false] {
        let opts = EngineOptions {
            r: 16,
            lora_alpha: 16.0,
            gradient_checkpointing: ckpt,
            ..options()
        };
        let mut be = backend(dir.path(), opts);
        be.forward_backward(&batch, 1.0).unwrap(); // warm-up
        let (fw, fc) = timed(2, || {
            be.forward_backward(&batch, 1.0).unwrap();
        });
        let (ew, ec) = timed(2, || {
            be.eval_loss(&batch).unwrap();
        });
        println!(
            "checkpointing={ckpt}: forward_backward {fw:.3} s wall / {fc:.3} CPU-s = {:.0} tokens/s \
             ({:.0} per CPU-s); forward only {ew:.3} s / {ec:.3} CPU-s = {:.0} tokens/s",
            t as f64 / fw,
            t as f64 / fc.max(1e-9),
            t as f64 / ew,
        );
    }
}
