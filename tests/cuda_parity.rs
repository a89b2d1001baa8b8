//! Whole-step parity of the cuda engine (DESIGN §2 ladder, step 2): on a small random Llama
//! (GQA, llama3 rope scaling, packed rows, ignored targets) the GPU's loss and every LoRA
//! gradient match the cpu engine's, with and without gradient checkpointing (and the offload's
//! two parking modes), and so do the parameters after 3 AdamW steps. The same check runs per
//! feature: Qwen2 q/k/v biases (frozen
//! and trained, `--bias all|lora_only`), Qwen3's q/k norm, NF4 base weights (`--load_in_4bit`,
//! against the cpu engine on the NF4-dequantised weights), LoRA dropout (both engines draw the
//! same masks) and the GPU's 8-bit AdamW (its state loads into the host optimizer and back).
//! The weights' staged upload is checked byte for byte across many staging buffers.
//!
//! Needs a GPU: without one (CI) it prints SKIPPED and passes, unless FERROTUNE_REQUIRE_GPU=1.
//! With FERROTUNE_PARITY_OUT=DIR it also writes the bundle `tests/python/hf_parity.py` compares
//! against transformers + peft (ladder step 3): the model, the adapter, the batch, our loss and
//! gradients.

#![cfg(feature = "cuda")]

use std::path::Path;

use ferrotune::cli::choices::{Bias, Optim};
use ferrotune::engine::cpu::{trainable_shapes, CpuBackend, EngineOptions};
use ferrotune::engine::cuda::staging::Staging;
use ferrotune::engine::cuda::{probe, CudaBackend, Parked};
use ferrotune::engine::{Backend, Batch, HostData, HostTensor, IGNORE};
use ferrotune::job::PROJECTIONS;
use ferrotune::model::tiny::{write_random_model, TinySpec};
use ferrotune::model::{Model, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu_or_skip() -> bool {
    match probe() {
        Ok(name) => {
            eprintln!("GPU: {name}");
            true
        }
        Err(why) => {
            assert!(
                std::env::var("FERROTUNE_REQUIRE_GPU").as_deref() != Ok("1"),
                "no usable GPU: {why}"
            );
            eprintln!("SKIPPED cuda_parity: {why}");
            false
        }
    }
}

fn spec() -> TinySpec {
    TinySpec {
        vocab_size: 301,
        hidden_size: 128,
        intermediate_size: 224,
        num_hidden_layers: 3,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        rope_scaling: Some(
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        ),
        // bf16 on disk: both engines then start from the same base weights exactly.
        dtype: candle_core::DType::BF16,
        ..TinySpec::default()
    }
}

/// Rank 16: the MLP backward runs the fused SwiGLU/LoRA kernel (ranks 16, 32, 64); the bias
/// cases run rank 8, which keeps the unfused `t`/`dB` GEMMs covered.
fn options(checkpointing: bool) -> EngineOptions {
    EngineOptions {
        r: 16,
        lora_alpha: 32.0,
        use_rslora: false,
        lora_dropout: 0.0,
        bias: Bias::None,
        target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        init_seed: 3407,
        dropout_seed: 1,
        gradient_checkpointing: checkpointing,
    }
}

/// Row 0 packs samples of 20 and 28 tokens, row 1 is one sample of 40 plus 8 padding; some
/// targets are ignored.
fn packed_batch(vocab: u32, seed: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t = 48;
    let input_ids: Vec<u32> = (0..2 * t).map(|_| rng.random_range(0..vocab)).collect();
    let mut targets: Vec<i32> = (0..2 * t)
        .map(|_| rng.random_range(0..vocab) as i32)
        .collect();
    let ranges: [std::ops::Range<u32>; 4] = [0..20, 0..28, 0..40, 0..8];
    let position_ids: Vec<u32> = ranges.iter().flat_map(|r| r.clone()).collect();
    let segment_ids: Vec<u32> = [vec![0; 20], vec![1; 28], vec![0; 40], vec![1; 8]].concat();
    for i in [0, 19, 47, 88, 89, 90, 91, 92, 93, 94, 95] {
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

/// `batch` rows of `t` tokens, one sample per row, every target trained.
fn plain_batch(vocab: u32, seed: u64, batch: usize, t: usize) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = batch * t;
    Batch {
        batch_size: batch,
        seq_len: t,
        input_ids: (0..n).map(|_| rng.random_range(0..vocab)).collect(),
        targets: (0..n).map(|_| rng.random_range(0..vocab) as i32).collect(),
        position_ids: (0..n).map(|i| (i % t) as u32).collect(),
        segment_ids: vec![0; n],
    }
}

/// PEFT starts B at zero, which would make every A gradient zero: give B random values.
fn random_trainable(shapes: &[(String, Vec<usize>)], seed: u64) -> Vec<(String, HostTensor)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let std = if name.contains("lora_A") { 0.1 } else { 0.05 };
            let data = (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0) * std)
                .collect();
            (
                name.clone(),
                HostTensor {
                    shape: shape.clone(),
                    data: HostData::F32(data),
                },
            )
        })
        .collect()
}

fn values(t: &HostTensor) -> &[f32] {
    match &t.data {
        HostData::F32(v) => v,
        HostData::U8(_) => panic!("expected f32"),
    }
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut d, mut w) = (0f64, 0f64);
    for (&g, &r) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite value");
        d += (g as f64 - r as f64).powi(2);
        w += (r as f64).powi(2);
    }
    (d / w.max(1e-30)).sqrt()
}

fn compare(
    what: &str,
    got: &[(String, HostTensor)],
    want: &[(String, HostTensor)],
    tol: f64,
) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut worst = 0f64;
    for ((gn, g), (wn, w)) in got.iter().zip(want) {
        assert_eq!(gn, wn);
        let e = rel_l2(values(g), values(w));
        assert!(e <= tol, "{what} {gn}: relative L2 error {e:.3e} > {tol:e}");
        worst = worst.max(e);
    }
    eprintln!(
        "{what}: {} tensors, worst relative L2 error {worst:.3e}",
        got.len()
    );
    worst
}

/// The learning rate and number of steps of the after-steps comparisons.
const LR: f32 = 1e-3;
const STEPS: u64 = 3;

/// Parameters after [`STEPS`] Adam steps. Adam's first updates are ±lr whatever a gradient's
/// size, so an element whose gradient sits within the engines' gradient difference of zero can
/// step the other way on one engine and end up to 2·lr per step away: with the gradients held
/// to 4e-2 relative L2, about 0.8 × 4e-2 ≈ 3% of a Gaussian gradient's elements are that close
/// to zero. So a LoRA matrix may have that share of elements (at least one) more than lr
/// apart, and the rest must agree to 5e-3 relative L2 (measured on the H200: at most 2.0% of
/// elements apart — 5 of layer 2's k_proj lora_B's 256 — and the rest within 1.9e-3; docs/gpu.md
/// session 9 call 4). A trained bias is tiny (k_proj's has 32 values) and its gradient sums
/// over every token, so many of its elements sit near zero: 1e-1 relative L2 over all of them
/// (3.5e-2 seen). The gradients themselves are held to the gradient tolerance before any step.
fn compare_after_steps(what: &str, got: &[(String, HostTensor)], want: &[(String, HostTensor)]) {
    assert_eq!(got.len(), want.len());
    let (mut worst_rest, mut worst_share) = (0f64, (0usize, 1usize));
    for ((gn, g), (wn, w)) in got.iter().zip(want) {
        assert_eq!(gn, wn);
        let (g, w) = (values(g), values(w));
        if gn.ends_with(".bias") {
            let e = rel_l2(g, w);
            assert!(e <= 1e-1, "{what} {gn}: relative L2 error {e:.3e} > 1e-1");
            continue;
        }
        let apart = g
            .iter()
            .zip(w)
            .filter(|(a, b)| (*a - *b).abs() > LR)
            .count();
        let allowed = ((0.032 * w.len() as f64).ceil() as usize).max(1);
        let (mut d, mut n) = (0f64, 0f64);
        for (&a, &b) in g.iter().zip(w) {
            n += (b as f64).powi(2);
            if (a - b).abs() <= LR {
                d += (a as f64 - b as f64).powi(2);
            }
        }
        let rest = (d / n.max(1e-30)).sqrt();
        assert!(
            apart <= allowed,
            "{what} {gn}: {apart} of {} elements more than lr apart (allowed {allowed})",
            w.len()
        );
        assert!(
            rest <= 5e-3,
            "{what} {gn}: the elements within lr differ by {rest:.3e} relative L2 > 5e-3"
        );
        worst_rest = worst_rest.max(rest);
        if apart * worst_share.1 > worst_share.0 * w.len() {
            worst_share = (apart, w.len());
        }
    }
    eprintln!(
        "{what}: {} tensors; LoRA elements within lr: worst relative L2 error {worst_rest:.3e}; \
         most elements more than lr apart: {} of {}",
        got.len(),
        worst_share.0,
        worst_share.1
    );
}

fn cpu_grads(cpu: &CpuBackend) -> Vec<(String, HostTensor)> {
    let shapes = cpu.trainable_shapes();
    cpu.gradients()
        .into_iter()
        .zip(shapes)
        .map(|((n, g), (_, shape))| {
            (
                n,
                HostTensor {
                    shape,
                    data: HostData::F32(g),
                },
            )
        })
        .collect()
}

fn cpu_backend(dir: &Path, opts: EngineOptions) -> CpuBackend {
    cpu_backend_with(dir, opts, Optim::AdamwTorch)
}

fn cpu_backend_with(dir: &Path, opts: EngineOptions, optim: Optim) -> CpuBackend {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let shapes = trainable_shapes(&cfg, &opts).unwrap();
    let specs = ferrotune::optim::param_specs(&shapes, 0.01);
    let opt: Box<dyn ferrotune::optim::Optimizer> = match optim {
        Optim::Adamw8bit => Box::new(ferrotune::optim::AdamW8bit::new(specs)),
        _ => Box::new(ferrotune::optim::AdamW::new(specs)),
    };
    CpuBackend::new(Model::load(dir).unwrap(), opts, opt).unwrap()
}

fn cuda_backend(dir: &Path, opts: EngineOptions) -> CudaBackend {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    CudaBackend::new(dir, cfg, opts, Optim::AdamwTorch, 0.01).unwrap()
}

#[test]
fn cuda_step_matches_the_cpu_engine() {
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_random_model(&dir, &spec(), 5).unwrap();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    // (checkpointing, what offload parks in host memory)
    for (checkpointing, offload) in [
        (false, None),
        (true, None),
        (true, Some(Parked::Inputs)),
        (true, Some(Parked::Attention)),
        (true, Some(Parked::AttentionOutput)),
    ] {
        let opts = options(checkpointing);
        let mut cpu = cpu_backend(&dir, opts.clone());
        let mut gpu = cuda_backend(&dir, opts.clone());
        gpu.set_offload(offload).unwrap();
        let checkpointing = match offload {
            Some(p) => format!("unsloth/{p:?}"),
            None => checkpointing.to_string(),
        };
        // Same initialisation on both (same seed, same draw order).
        compare(
            "initial A/B",
            &gpu.export_trainable().unwrap(),
            &cpu.export_trainable().unwrap(),
            1e-7,
        );
        let init = random_trainable(&trainable_shapes(&cfg, &opts).unwrap(), 9);
        cpu.import_trainable(&init).unwrap();
        gpu.import_trainable(&init).unwrap();
        for step in 0..STEPS {
            let batch = packed_batch(cfg.vocab_size as u32, 100 + step);
            let scale = 1.0 / batch.trainable_tokens() as f32;
            let c = cpu.forward_backward(&batch, scale).unwrap();
            let g = gpu.forward_backward(&batch, scale).unwrap();
            assert_eq!(c.tokens, g.tokens);
            // Parked as asked (the host has the memory for this small model).
            assert_eq!(gpu.parked(), offload);
            let rel = (g.loss_sum - c.loss_sum).abs() / c.loss_sum;
            eprintln!(
                "ckpt={checkpointing} step {step}: loss cpu {:.6} cuda {:.6} (rel {rel:.2e})",
                c.loss_sum, g.loss_sum
            );
            assert!(
                rel < 5e-3,
                "loss differs: cpu {} cuda {}",
                c.loss_sum,
                g.loss_sum
            );
            if step == 0 {
                compare(
                    &format!("ckpt={checkpointing} gradients"),
                    &gpu.gradients().unwrap(),
                    &cpu_grads(&cpu),
                    // bf16 activations and adapter shadows against the f32 engine: 2.8e-2
                    // measured on the H200 (docs/gpu.md); headroom for other cuBLASLt kernels.
                    4e-2,
                );
            }
            let (nc, ng) = (cpu.grad_norm().unwrap(), gpu.grad_norm().unwrap());
            assert!((nc - ng).abs() / nc < 3e-2, "grad norm cpu {nc} cuda {ng}");
            cpu.optimizer_step(LR as f64, 1.0).unwrap();
            gpu.optimizer_step(LR as f64, 1.0).unwrap();
        }
        compare_after_steps(
            &format!("ckpt={checkpointing} params after 3 AdamW steps"),
            &gpu.export_trainable().unwrap(),
            &cpu.export_trainable().unwrap(),
        );
        // Optimizer state moves between backends (same format as the host AdamW).
        let (t, s) = gpu.export_optimizer().unwrap();
        cpu.import_optimizer(
            &t,
            &serde_json::json!({"optimizer": s["optimizer"], "cpu_engine": {"passes": 3}}),
        )
        .unwrap();
        // Eval loss leaves the gradients alone and agrees too.
        let batch = packed_batch(cfg.vocab_size as u32, 7);
        let (c, g) = (
            cpu.eval_loss(&batch).unwrap(),
            gpu.eval_loss(&batch).unwrap(),
        );
        assert!((g.loss_sum - c.loss_sum).abs() / c.loss_sum < 5e-3);
        assert_eq!(gpu.grad_norm().unwrap(), 0.0);
    }
    if let Ok(out) = std::env::var("FERROTUNE_PARITY_OUT") {
        write_hf_bundle(Path::new(&out), &dir, &cfg);
    }
}

/// What `tests/python/hf_parity.py` needs: the model, the adapter (PEFT names and config), an
/// unpacked batch (transformers has no segment mask), and our loss sum and gradients on it.
fn write_hf_bundle(out: &Path, model: &Path, cfg: &ModelConfig) {
    std::fs::create_dir_all(out).unwrap();
    let mdir = out.join("model");
    std::fs::create_dir_all(&mdir).unwrap();
    for f in std::fs::read_dir(model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, mdir.join(f.file_name().unwrap())).unwrap();
    }
    let opts = options(false);
    let shapes = trainable_shapes(cfg, &opts).unwrap();
    let init = random_trainable(&shapes, 21);
    let mut gpu = cuda_backend(model, opts.clone());
    gpu.import_trainable(&init).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let (b, t) = (2, 64);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let targets: Vec<i32> = (0..b * t)
        .map(|i| {
            if (i + 1) % t == 0 || i % 11 == 3 {
                IGNORE
            } else {
                ids[i + 1] as i32
            }
        })
        .collect();
    let batch = Batch {
        batch_size: b,
        seq_len: t,
        input_ids: ids.clone(),
        targets: targets.clone(),
        position_ids: (0..b * t).map(|i| (i % t) as u32).collect(),
        segment_ids: vec![0; b * t],
    };
    let scale = 1.0 / batch.trainable_tokens() as f32;
    let stats = gpu.forward_backward(&batch, scale).unwrap();
    let to_st = |list: &[(String, HostTensor)], path: &Path| {
        let views: Vec<(String, safetensors::tensor::TensorView)> = list
            .iter()
            .map(|(n, t)| {
                let bytes: &[u8] = bytemuck_f32(values(t));
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        t.shape.clone(),
                        bytes,
                    )
                    .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    };
    to_st(&init, &out.join("adapter_model.safetensors"));
    to_st(
        &gpu.gradients().unwrap(),
        &out.join("ours_grads.safetensors"),
    );
    let meta = serde_json::json!({
        "r": opts.r, "lora_alpha": opts.lora_alpha, "target_modules": PROJECTIONS,
        "batch": b, "seq": t, "input_ids": ids, "targets": targets,
        "loss_sum": stats.loss_sum, "tokens": stats.tokens, "scale": scale,
    });
    std::fs::write(
        out.join("batch.json"),
        serde_json::to_string(&meta).unwrap(),
    )
    .unwrap();
    eprintln!("HF parity bundle written to {}", out.display());
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// One feature's parity run: what each engine loads and how it trains.
struct Case {
    label: String,
    /// The model the GPU loads, and the one the cpu loads (the NF4-dequantised copy for 4-bit;
    /// else the same).
    gpu_dir: std::path::PathBuf,
    cpu_dir: std::path::PathBuf,
    opts: EngineOptions,
    optim: Optim,
    load_in_4bit: bool,
    /// `--use_gradient_checkpointing unsloth` (with checkpointing options): what is parked.
    parked: Option<Parked>,
}

/// 3 steps on both engines: loss every step, every gradient at the first, parameters after the
/// last; then the optimizer state through the other engine, and eval loss.
fn run_case(c: &Case) {
    let cfg = ModelConfig::from_dir(&c.gpu_dir).unwrap();
    let mut cpu = cpu_backend_with(&c.cpu_dir, c.opts.clone(), c.optim);
    let mut gpu = CudaBackend::load(
        0,
        &c.gpu_dir,
        cfg.clone(),
        c.opts.clone(),
        c.optim,
        0.01,
        c.load_in_4bit,
    )
    .unwrap();
    gpu.set_offload(c.parked).unwrap();
    let label = &c.label;
    // Same tensors, same initialisation (trainable biases start from the checkpoint's).
    compare(
        &format!("{label} initial"),
        &gpu.export_trainable().unwrap(),
        &cpu.export_trainable().unwrap(),
        1e-7,
    );
    let init = random_trainable(&trainable_shapes(&cfg, &c.opts).unwrap(), 9);
    cpu.import_trainable(&init).unwrap();
    gpu.import_trainable(&init).unwrap();
    for step in 0..STEPS {
        let batch = packed_batch(cfg.vocab_size as u32, 100 + step);
        let scale = 1.0 / batch.trainable_tokens() as f32;
        let cs = cpu.forward_backward(&batch, scale).unwrap();
        let gs = gpu.forward_backward(&batch, scale).unwrap();
        assert_eq!(gpu.parked(), c.parked, "{label}: parked");
        let rel = (gs.loss_sum - cs.loss_sum).abs() / cs.loss_sum;
        eprintln!(
            "{label} step {step}: loss cpu {:.6} cuda {:.6} (rel {rel:.2e})",
            cs.loss_sum, gs.loss_sum
        );
        assert!(
            rel < 5e-3,
            "{label}: loss differs: cpu {} cuda {}",
            cs.loss_sum,
            gs.loss_sum
        );
        if step == 0 {
            compare(
                &format!("{label} gradients"),
                &gpu.gradients().unwrap(),
                &cpu_grads(&cpu),
                4e-2,
            );
        }
        let (nc, ng) = (cpu.grad_norm().unwrap(), gpu.grad_norm().unwrap());
        assert!(
            (nc - ng).abs() / nc < 3e-2,
            "{label}: grad norm cpu {nc} cuda {ng}"
        );
        cpu.optimizer_step(LR as f64, 1.0).unwrap();
        gpu.optimizer_step(LR as f64, 1.0).unwrap();
    }
    compare_after_steps(
        &format!("{label} params after 3 {:?} steps", c.optim),
        &gpu.export_trainable().unwrap(),
        &cpu.export_trainable().unwrap(),
    );
    // The optimizer state (and the dropout pass counter) moves between the engines both ways,
    // in the host optimizer's format.
    let (gt, gs) = gpu.export_optimizer().unwrap();
    let (ct, cs) = cpu.export_optimizer().unwrap();
    // Checkpoints store these by name, so only the set matters, not the order.
    let names = |t: &[(String, HostTensor)]| -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = t
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&gt), names(&ct), "{label}: optimizer state tensors");
    assert_eq!(gs["engine"]["forward_passes"], 3);
    cpu.import_optimizer(&gt, &gs).unwrap();
    gpu.import_optimizer(&ct, &cs).unwrap();
    let batch = packed_batch(cfg.vocab_size as u32, 7);
    let (ce, ge) = (
        cpu.eval_loss(&batch).unwrap(),
        gpu.eval_loss(&batch).unwrap(),
    );
    assert!(
        (ge.loss_sum - ce.loss_sum).abs() / ce.loss_sum < 5e-3,
        "{label}: eval loss cpu {} cuda {}",
        ce.loss_sum,
        ge.loss_sum
    );
    assert_eq!(gpu.grad_norm().unwrap(), 0.0);
}

fn case(label: &str, dir: &Path, opts: EngineOptions) -> Case {
    Case {
        label: label.into(),
        gpu_dir: dir.to_path_buf(),
        cpu_dir: dir.to_path_buf(),
        opts,
        optim: Optim::AdamwTorch,
        load_in_4bit: false,
        parked: None,
    }
}

fn model(root: &Path, name: &str, spec: TinySpec) -> std::path::PathBuf {
    let dir = root.join(name);
    write_random_model(&dir, &spec, 5).unwrap();
    dir
}

#[test]
fn projection_biases_frozen_and_trained_match_the_cpu_engine() {
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let qwen2 = model(
        tmp.path(),
        "qwen2",
        TinySpec {
            model_type: "qwen2".into(),
            rope_scaling: None,
            ..spec()
        },
    );
    // Llama with attention_bias: q/k/v/o biases; o_proj is not targeted, so under lora_only
    // its bias stays frozen while q/k/v's train as `base_layer.bias`.
    let llama = model(
        tmp.path(),
        "llama-bias",
        TinySpec {
            attention_bias: true,
            ..spec()
        },
    );
    let no_o = || {
        PROJECTIONS
            .iter()
            .filter(|p| **p != "o_proj")
            .map(|s| s.to_string())
            .collect()
    };
    // Rank 8: the MLP backward's unfused path (see `options`).
    let r8 = |o: EngineOptions| EngineOptions {
        r: 8,
        lora_alpha: 16.0,
        ..o
    };
    for c in [
        case("qwen2 frozen bias r8", &qwen2, r8(options(false))),
        case(
            "qwen2 --bias all (ckpt) r8",
            &qwen2,
            r8(EngineOptions {
                bias: Bias::All,
                ..options(true)
            }),
        ),
        case(
            "llama attention_bias --bias lora_only r8",
            &llama,
            r8(EngineOptions {
                bias: Bias::LoraOnly,
                target_modules: no_o(),
                ..options(false)
            }),
        ),
    ] {
        run_case(&c);
    }
}

/// `--use_gradient_checkpointing unsloth` across batch shapes (a padded length changes with
/// every training step): the pinned host buffers are kept while a shape fits in them, grown
/// when it does not, and the gradients match the recomputing engine's at every shape.
#[test]
fn offload_keeps_its_host_buffers_across_batch_shapes() {
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path(), "llama", spec());
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let opts = options(true);
    let init = random_trainable(&trainable_shapes(&cfg, &opts).unwrap(), 9);
    for mode in [Parked::Attention, Parked::AttentionOutput] {
        let mut parked = cuda_backend(&dir, opts.clone());
        parked.set_offload(Some(mode)).unwrap();
        let mut plain = cuda_backend(&dir, opts.clone());
        parked.import_trainable(&init).unwrap();
        plain.import_trainable(&init).unwrap();
        let mut held = Vec::new();
        for (step, t) in [40, 24, 64].into_iter().enumerate() {
            let batch = plain_batch(cfg.vocab_size as u32, 50 + step as u64, 2, t);
            let scale = 1.0 / batch.trainable_tokens() as f32;
            let (a, b) = (
                parked.forward_backward(&batch, scale).unwrap(),
                plain.forward_backward(&batch, scale).unwrap(),
            );
            assert!((a.loss_sum - b.loss_sum).abs() / b.loss_sum < 1e-4);
            assert_eq!(parked.parked(), Some(mode));
            // Only the attention backward's dQ atomics and the fused SwiGLU/LoRA backward's
            // `t` and `dB` reductions may add in another order.
            compare(
                &format!("unsloth/{mode:?} vs ckpt=true, T {t}, gradients"),
                &parked.gradients().unwrap(),
                &plain.gradients().unwrap(),
                2e-3,
            );
            held.push(parked.pinned_bytes().unwrap());
            parked.optimizer_step(1e-3, 1.0).unwrap();
            plain.optimizer_step(1e-3, 1.0).unwrap();
        }
        assert_eq!(
            held[1], held[0],
            "{mode:?}: a shorter batch reuses the pinned buffers"
        );
        assert!(
            held[2] > held[0],
            "{mode:?}: a longer one grows them: {held:?}"
        );
    }
}

/// The weights' staged upload: tensors spanning many staging buffers (the last one part filled)
/// arrive exactly, with small buffers (every copy waits for the one two back) and with the
/// engine's (several threads fill each buffer).
#[test]
fn staged_uploads_arrive_exactly_across_staging_buffers() {
    if !gpu_or_skip() {
        return;
    }
    let stream = cudarc::driver::CudaContext::new(0)
        .unwrap()
        .default_stream();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut small = Staging::with_slot_bytes(&stream, 1 << 16).unwrap();
    let mut engine = Staging::new(&stream).unwrap();
    let mut sent = 0;
    for len in [5 * (1 << 15) + 3, 7, 1 << 18] {
        let host: Vec<u16> = (0..len).map(|_| rng.random()).collect();
        let dev = small.upload(&host).unwrap();
        assert_eq!(stream.clone_dtoh(&dev).unwrap(), host, "{len} values");
        sent += 2 * len;
    }
    assert_eq!(small.bytes_copied(), sent);
    // 150 MiB + 6 bytes: two full 64 MiB buffers and a part-filled third.
    let host: Vec<u16> = (0..75 * (1 << 20) + 3).map(|_| rng.random()).collect();
    let dev = engine.upload(&host).unwrap();
    assert!(
        stream.clone_dtoh(&dev).unwrap() == host,
        "150 MiB through the engine's staging buffers"
    );
}

#[test]
fn qwen3_qk_norm_matches_the_cpu_engine() {
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // head_dim 32 ≠ hidden/heads (16), as Qwen3 configs state it explicitly.
    let qwen3 = model(
        tmp.path(),
        "qwen3",
        TinySpec {
            model_type: "qwen3".into(),
            head_dim: Some(32),
            rope_scaling: None,
            ..spec()
        },
    );
    run_case(&case("qwen3 qk-norm", &qwen3, options(false)));
    run_case(&case("qwen3 qk-norm (ckpt)", &qwen3, options(true)));
    // Offloaded with the attention: the pre-norm q/k and their rstd travel with the lows.
    run_case(&Case {
        parked: Some(Parked::Attention),
        ..case("qwen3 qk-norm (unsloth/Attention)", &qwen3, options(true))
    });
    // Without q/k/v: the recompute reruns the q/k norm.
    run_case(&Case {
        parked: Some(Parked::AttentionOutput),
        ..case(
            "qwen3 qk-norm (unsloth/AttentionOutput)",
            &qwen3,
            options(true),
        )
    });
}

#[test]
fn lora_dropout_draws_the_cpu_engines_masks() {
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path(), "llama", spec());
    for ckpt in [false, true] {
        let opts = EngineOptions {
            lora_dropout: 0.25,
            ..options(ckpt)
        };
        run_case(&case(&format!("dropout 0.25 ckpt={ckpt}"), &dir, opts));
    }
    // Offloaded layer inputs recompute with the same masks too.
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let opts = EngineOptions {
        lora_dropout: 0.25,
        ..options(true)
    };
    let mut cpu = cpu_backend(&dir, opts.clone());
    let init = random_trainable(&trainable_shapes(&cfg, &opts).unwrap(), 9);
    cpu.import_trainable(&init).unwrap();
    let batch = packed_batch(cfg.vocab_size as u32, 3);
    let scale = 1.0 / batch.trainable_tokens() as f32;
    cpu.forward_backward(&batch, scale).unwrap();
    // Both parking modes recompute from the parked `low`s, which hold the forward's masks
    // (each on a fresh engine: the masks are drawn per pass).
    let parked_pass = |mode| {
        let mut gpu = cuda_backend(&dir, opts.clone());
        gpu.set_offload(Some(mode)).unwrap();
        gpu.import_trainable(&init).unwrap();
        gpu.forward_backward(&batch, scale).unwrap();
        compare(
            &format!("dropout 0.25 unsloth/{mode:?} gradients"),
            &gpu.gradients().unwrap(),
            &cpu_grads(&cpu),
            4e-2,
        );
        gpu
    };
    parked_pass(Parked::AttentionOutput);
    let gpu = parked_pass(Parked::Attention);
    // Without dropout the adapters' gradients are clearly different: the masks did something.
    let mut plain = cuda_backend(&dir, options(true));
    plain.import_trainable(&init).unwrap();
    plain.forward_backward(&batch, scale).unwrap();
    let (with, without) = (gpu.gradients().unwrap(), plain.gradients().unwrap());
    let a = with
        .iter()
        .position(|(n, _)| n.ends_with("q_proj.lora_A.weight"))
        .unwrap();
    let e = rel_l2(values(&with[a].1), values(&without[a].1));
    assert!(
        e > 0.05,
        "dropout changed lora_A's gradient by only {e:.3e}"
    );
}

#[test]
fn adamw_8bit_on_the_gpu_matches_the_host_optimizer() {
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path(), "llama", spec());
    // r 32: most adapters reach bitsandbytes' 4096-value minimum for 8-bit states, the k/v B
    // matrices (1024 values) keep fp32 states: both kinds, interleaved in the arena.
    let opts = EngineOptions {
        r: 32,
        lora_alpha: 32.0,
        ..options(false)
    };
    let mut c = case("adamw_8bit", &dir, opts);
    c.optim = Optim::Adamw8bit;
    run_case(&c);
}

#[test]
fn qlora_nf4_base_weights_match_the_cpu_engine_on_dequantised_weights() {
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path(), "llama", spec());
    // The cpu engine has no 4-bit path: its reference is the model with every projection
    // replaced by NF4 round trip of bitsandbytes semantics (blocks of 64, double-quantised
    // absmax), computed by the kernels' bit-exact reference.
    let deq = tmp.path().join("llama-nf4-dequantised");
    write_nf4_dequantised(&dir, &deq);
    // With the attention and residual parked, up's backward reuses the weight the recompute
    // dequantised last.
    for (name, ckpt, parked) in [
        ("nf4 ckpt=false", false, None),
        ("nf4 ckpt=true", true, None),
        ("nf4 unsloth/Attention", true, Some(Parked::Attention)),
        (
            "nf4 unsloth/AttentionOutput",
            true,
            Some(Parked::AttentionOutput),
        ),
    ] {
        let mut c = case(name, &dir, options(ckpt));
        c.cpu_dir = deq.clone();
        c.load_in_4bit = true;
        c.parked = parked;
        run_case(&c);
    }
}

/// Copies model `src` to `dst` with each projection weight replaced by its NF4 round trip.
fn write_nf4_dequantised(src: &Path, dst: &Path) {
    use ferrotune_kernels::quant::signed_map;
    use ferrotune_kernels::reference::nf4;
    std::fs::create_dir_all(dst).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "safetensors") {
            continue;
        }
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::BF16);
        let data = view.data().to_vec();
        let is_proj = name.starts_with("model.layers.")
            && name.ends_with("_proj.weight")
            && PROJECTIONS.iter().any(|p| name.contains(p));
        let data = if is_proj {
            let w: Vec<f32> = data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect();
            let (packed, absmax) = nf4::nf4_quantize(&w);
            let offset =
                (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
            let (q, a2) = nf4::quantize_blockwise_8bit(&absmax, offset, signed_map());
            let absmax = nf4::dequantize_absmax(&q, &a2, signed_map(), offset);
            nf4::nf4_dequantize(&packed, &absmax)
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect()
        } else {
            data
        };
        out.push((name.to_string(), view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = out
        .iter()
        .map(|(n, shape, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), data)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
}

/// A pre-quantised bitsandbytes checkpoint (`*-bnb-4bit` layout, written by the `merged_4bit`
/// writer from the same bf16 weights) loads as the same NF4 base the GPU makes with
/// `--load_in_4bit`: codes and double-quantised absmax, then the loss and every LoRA gradient
/// of one step. The checkpoint implies 4-bit (no flag). Then the usual ladder against the cpu
/// engine, which dequantises the checkpoint exactly as bitsandbytes does, for double-quantised
/// and plain-absmax checkpoints.
#[test]
fn prequantised_bnb_4bit_base_matches_quantising_on_the_gpu() {
    use ferrotune::export::bnb_nf4::{Nf4Absmax, Nf4Weight};
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path(), "llama", spec());
    let bnb = tmp.path().join("llama-bnb-4bit");
    ferrotune::model::bnb4::write_prequantized(&dir, &bnb, true).unwrap();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let opts = options(false);
    let load = |d: &Path, load_in_4bit: bool| {
        CudaBackend::load(
            0,
            d,
            cfg.clone(),
            opts.clone(),
            Optim::AdamwTorch,
            0.01,
            load_in_4bit,
        )
        .unwrap()
    };
    let mut quantised_here = load(&dir, true);
    let mut prequantised = load(&bnb, false);
    let (a, b) = (
        quantised_here.nf4_weights().unwrap(),
        prequantised.nf4_weights().unwrap(),
    );
    assert_eq!(a.len(), 7 * cfg.num_hidden_layers);
    let parts = |w: &Nf4Weight| match &w.absmax {
        Nf4Absmax::Double(d) => (d.codes.clone(), d.nested_absmax.clone(), d.offset),
        Nf4Absmax::Plain(_) => panic!("double-quantised"),
    };
    let (mut bitwise, mut code_diffs, mut blocks) = (0, 0usize, 0usize);
    for ((na, wa), (nb, wb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(wa.shape, wb.shape, "{na}");
        let packed_diff = wa
            .packed
            .iter()
            .zip(&wb.packed)
            .filter(|(x, y)| x != y)
            .count();
        assert_eq!(packed_diff, 0, "{na}: {packed_diff} code bytes differ");
        let ((ca, sa, oa), (cb, sb, ob)) = (parts(wa), parts(wb));
        // The offset is a mean: the GPU sums in f32 (448 blocks here), the writer in f64. A
        // nested absmax is a max of |absmax - offset|: it moves at most as far as the offset.
        assert!(
            (oa - ob).abs() <= 1e-5 * ob.abs(),
            "{na}: offset {oa} vs {ob}"
        );
        for (x, y) in sa.iter().zip(&sb) {
            assert!(
                (x - y).abs() <= (oa - ob).abs() + 1e-6 * y.abs(),
                "{na}: nested absmax {x} vs {y} (offsets {oa}, {ob})"
            );
        }
        code_diffs += ca.iter().zip(&cb).filter(|(x, y)| x != y).count();
        blocks += ca.len();
        // Whatever the codes, the block scales the kernels use agree closely.
        for (x, y) in wa.absmax().iter().zip(wb.absmax()) {
            assert!((x - y).abs() <= 0.02 * y.abs(), "{na}: absmax {x} vs {y}");
        }
        bitwise += usize::from(wa == wb);
    }
    eprintln!(
        "pre-quantised vs --load_in_4bit: {bitwise}/{} weights bitwise equal, {code_diffs} of \
         {blocks} absmax codes differ; packed codes identical",
        a.len()
    );
    assert!(
        code_diffs * 1000 <= blocks,
        "{code_diffs} of {blocks} absmax codes differ"
    );

    let init = random_trainable(&trainable_shapes(&cfg, &opts).unwrap(), 9);
    quantised_here.import_trainable(&init).unwrap();
    prequantised.import_trainable(&init).unwrap();
    let batch = packed_batch(cfg.vocab_size as u32, 100);
    let scale = 1.0 / batch.trainable_tokens() as f32;
    let (x, y) = (
        quantised_here.forward_backward(&batch, scale).unwrap(),
        prequantised.forward_backward(&batch, scale).unwrap(),
    );
    let rel = (x.loss_sum - y.loss_sum).abs() / x.loss_sum;
    eprintln!(
        "loss --load_in_4bit {:.6} pre-quantised {:.6} (rel {rel:.2e})",
        x.loss_sum, y.loss_sum
    );
    assert!(rel < 1e-4, "loss {} vs {}", x.loss_sum, y.loss_sum);
    compare(
        "pre-quantised vs --load_in_4bit gradients",
        &prequantised.gradients().unwrap(),
        &quantised_here.gradients().unwrap(),
        1e-3,
    );
    drop((quantised_here, prequantised));

    // Both absmax kinds on the GPU (4-bit implied) against the cpu engine on the same files.
    let plain = tmp.path().join("llama-bnb-4bit-plain");
    ferrotune::model::bnb4::write_prequantized(&dir, &plain, false).unwrap();
    for (label, d) in [
        ("bnb-4bit double-quant", &bnb),
        ("bnb-4bit plain absmax", &plain),
    ] {
        run_case(&case(label, d, options(false)));
    }
}
