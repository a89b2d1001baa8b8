//! `ferrotune bench`: training-step throughput on random tokens, the workload of the anchor
//! benchmark (`../shared/bench`): full-length rows of uniformly random token ids, LoRA on every
//! projection, AdamW, gradient-norm clipping at 1.0; `--warmup_steps` untimed steps, then the
//! median of `--steps` timed ones. Prints one `RESULT {json}` line like the anchor does.
//!
//! A step is `forward_backward` + `grad_norm` + `optimizer_step`; the grad norm reads a scalar
//! back from the device, so every timed step ends with the device idle except the optimizer
//! update, which the next step's timing absorbs (steady state: one update per step).

use std::time::Instant;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cli::args::BenchArgs;
use crate::cli::choices::{Bias, GradientCheckpointing};
use crate::engine::cpu::{trainable_shapes, CpuBackend, EngineOptions};
use crate::engine::select::{self, Resolved};
use crate::engine::{Backend, Batch, IGNORE};
use crate::job::PROJECTIONS;
use crate::model::{Model, ModelConfig};

/// A batch of random tokens; each row one sample, targets the next token.
pub fn random_batch(rng: &mut ChaCha8Rng, vocab: usize, batch: usize, seq: usize) -> Batch {
    let n = batch * seq;
    let input_ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    let targets = (0..n)
        .map(|i| {
            if (i + 1) % seq == 0 {
                IGNORE
            } else {
                input_ids[i + 1] as i32
            }
        })
        .collect();
    Batch {
        batch_size: batch,
        seq_len: seq,
        input_ids,
        targets,
        position_ids: (0..n).map(|i| (i % seq) as u32).collect(),
        segment_ids: vec![0; n],
    }
}

fn options(args: &BenchArgs) -> EngineOptions {
    EngineOptions {
        r: args.r,
        lora_alpha: args.lora_alpha,
        use_rslora: false,
        lora_dropout: 0.0,
        bias: Bias::None,
        target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        init_seed: 3407,
        dropout_seed: 3407,
        gradient_checkpointing: args.use_gradient_checkpointing != GradientCheckpointing::False,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The cuda engine on GPU `ordinal` as the bench configures it.
#[cfg(feature = "cuda")]
fn cuda_backend(
    args: &BenchArgs,
    cfg: &ModelConfig,
    ordinal: usize,
) -> Result<crate::engine::cuda::CudaBackend> {
    let mut b = crate::engine::cuda::CudaBackend::load(
        ordinal,
        &args.model_name,
        cfg.clone(),
        options(args),
        crate::cli::choices::Optim::AdamwTorch,
        0.0,
        args.load_in_4bit,
    )?;
    b.set_parking(crate::engine::cuda::Parking::for_checkpointing(
        args.use_gradient_checkpointing,
    )?)?;
    Ok(b)
}

/// The anchor benchmark's shape names (`../shared/bench/make_model.py`).
const NAMED_SHAPES: [&str; 2] = ["llama3-8b", "llama3-1b"];

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let start = Instant::now();
    let named = args
        .model_name
        .to_str()
        .filter(|n| NAMED_SHAPES.contains(n));
    if let (Some(name), false) = (named, args.model_name.exists()) {
        bail!(
            "--shape {name}: the benchmark runs on the anchor's random weights, so it needs their \
             directory; write it with `python3 ../shared/bench/make_model.py {name} DIR` and pass \
             --shape DIR"
        );
    }
    let cfg = ModelConfig::from_dir(&args.model_name)?;
    let opts = options(args);
    let mut backend: Box<dyn Backend> = match select::resolve(args.device)? {
        Resolved::Cpu => {
            if args.num_gpus > 1 {
                bail!("--num_gpus {} needs the cuda engine", args.num_gpus);
            }
            if args.load_in_4bit {
                bail!("--load_in_4bit needs the cuda engine");
            }
            let shapes = trainable_shapes(&cfg, &opts)?;
            let specs = crate::optim::param_specs(&shapes, 0.0);
            let opt = Box::new(crate::optim::AdamW::new(specs));
            Box::new(CpuBackend::new(Model::load(&args.model_name)?, opts, opt)?)
        }
        #[cfg(feature = "cuda")]
        Resolved::Cuda(_) if args.num_gpus > 1 => {
            let (args, cfg) = (args.clone(), cfg.clone());
            Box::new(crate::engine::cuda::replica::data_parallel(
                args.num_gpus,
                move |rank| cuda_backend(&args, &cfg, rank),
            )?)
        }
        #[cfg(feature = "cuda")]
        Resolved::Cuda(_) => Box::new(cuda_backend(args, &cfg, 0)?),
        #[cfg(not(feature = "cuda"))]
        Resolved::Cuda(_) => unreachable!("select::resolve never picks cuda without the feature"),
    };
    let load_s = start.elapsed().as_secs_f64();
    let (bs, seq) = (args.per_device_train_batch_size, args.max_seq_length);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut times = Vec::with_capacity(args.steps);
    let mut losses = Vec::new();
    let mut first_step_s = None;
    for step in 0..args.warmup_steps + args.steps {
        // One micro-batch per GPU: the step's window.
        let window: Vec<Batch> = (0..args.num_gpus)
            .map(|_| random_batch(&mut rng, cfg.vocab_size, bs, seq))
            .collect();
        let tokens: usize = window.iter().map(Batch::trainable_tokens).sum();
        let window: Vec<&Batch> = window.iter().collect();
        let t0 = Instant::now();
        let stats = backend
            .forward_backward_window(&window, 1.0 / tokens as f32, &|| false)?
            .expect("never stopped");
        let norm = backend.grad_norm()?;
        let clip = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
        backend.optimizer_step(1e-4, clip)?;
        let dt = t0.elapsed().as_secs_f64();
        first_step_s.get_or_insert(start.elapsed().as_secs_f64());
        losses.push(stats.loss_sum / tokens as f64);
        if step >= args.warmup_steps {
            times.push(dt);
        }
    }
    // The last optimizer update is still in flight: read the parameters back to wait for it.
    backend.export_trainable()?;
    let med = median(&mut times);
    let mem = backend.memory_stats();
    const GIB: f64 = (1u64 << 30) as f64;
    let round = |x: f64, d: i32| (x * 10f64.powi(d)).round() / 10f64.powi(d);
    let out = serde_json::json!({
        "engine": backend.name(),
        "device": mem.as_ref().map(|m| m.device.clone()),
        "model": args.model_name.display().to_string(),
        "batch": bs,
        "seq": seq,
        "gradient_checkpointing": args.use_gradient_checkpointing.to_string(),
        "r": args.r,
        // As loaded: a pre-quantised (`*-bnb-4bit`) base trains 4-bit without the flag.
        "load_in_4bit": mem.as_ref().map_or(args.load_in_4bit, |m| m.nf4_base),
        "step_s_median": round(med, 4),
        "num_gpus": args.num_gpus,
        "tokens_per_s": round((args.num_gpus * bs * seq) as f64 / med, 1),
        // Like-for-like with the anchor's torch.cuda.max_memory_allocated (see MemoryStats).
        "peak_gib": mem.as_ref().and_then(|m| m.peak_allocated_bytes).map(|b| round(b as f64 / GIB, 2)),
        // Stricter: the device's used memory (cuMemGetInfo) since before loading.
        "device_peak_gib": mem.as_ref().map(|m| round(m.peak_bytes as f64 / GIB, 2)),
        "load_s": round(load_s, 2),
        "first_step_done_s": first_step_s.map(|s| round(s, 2)),
        "losses": losses.iter().take(3).chain(losses.iter().rev().take(2).rev()).map(|&l| round(l, 4)).collect::<Vec<_>>(),
    });
    println!("RESULT {out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_batches_predict_the_next_token_within_each_row() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let b = random_batch(&mut rng, 50, 2, 4);
        assert_eq!(b.input_ids.len(), 8);
        assert_eq!(b.targets[0], b.input_ids[1] as i32);
        assert_eq!(b.targets[3], IGNORE);
        assert_eq!(b.targets[4], b.input_ids[5] as i32);
        assert_eq!(b.trainable_tokens(), 6);
        assert_eq!(b.position_ids, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert!(b.input_ids.iter().all(|&t| t < 50));
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn the_issue_spelling_parses_and_a_bare_shape_name_says_how_to_get_weights() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "ferrotune",
            "bench",
            "--shape",
            "llama3-8b",
            "--batch",
            "1",
            "--seq",
            "512",
        ])
        .unwrap();
        let Some(crate::cli::Command::Bench(args)) = cli.command else {
            panic!("not the bench subcommand");
        };
        assert_eq!(
            (args.per_device_train_batch_size, args.max_seq_length),
            (1, 512)
        );
        let err = run(&args).unwrap_err().to_string();
        assert!(err.contains("make_model.py llama3-8b DIR"), "{err}");
    }
}
