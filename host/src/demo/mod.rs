//! `ferrotune demo`: the main job on embedded defaults, offline. It builds (once, cached under
//! `--workdir`) a tiny Llama-architecture model with random weights and a byte-level BPE
//! tokenizer trained on the bundled dataset with the Llama-3 chat template, then fine-tunes LoRA
//! adapters on the bundled alpaca rows (`host/assets/demo/`): the first part of the run stops
//! at a checkpoint as a preempted job would, a second run resumes it with `--resume` and
//! finishes, and the adapter is saved with `--save_model --save_method lora`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::checkpoint::atomic;
use crate::cli::args::DemoArgs;
use crate::model::tiny::{write_tiny_chat_model, TinySpec};
use crate::train::{run_job_with, JobReport, RunOptions};

/// The bundled dataset: synthetic alpaca rows (five instruction kinds with a fixed answer
/// pattern each), small enough to learn in a couple of hundred steps.
pub const DATASET: &str = include_str!("../../assets/demo/alpaca_demo.jsonl");

/// Bump when the generated model or tokenizer changes, so stale caches are rebuilt.
const CACHE_VERSION: &str = "tiny-llama-v1";
const VOCAB_SIZE: usize = 512;
const SEED: u64 = 3407;

pub fn run(args: &DemoArgs) -> Result<()> {
    let work = &args.workdir;
    std::fs::create_dir_all(work)
        .with_context(|| format!("--workdir {}: cannot create", work.display()))?;
    let model_dir = ensure_model(&work.join("cache").join(CACHE_VERSION))?;
    let dataset = work.join("data").join("alpaca_demo.jsonl");
    std::fs::create_dir_all(dataset.parent().expect("has a parent"))?;
    atomic::replace_file(&dataset, DATASET.as_bytes())?;
    let output_dir = work.join("checkpoints");
    let save_path = work.join("adapter");
    if output_dir.exists() {
        // Each demo is a new run; the model cache is what is kept.
        std::fs::remove_dir_all(&output_dir)
            .with_context(|| format!("{}: cannot clear", output_dir.display()))?;
    }

    let steps = args.max_steps;
    let pause = (steps / 2).max(1);
    let job = demo_job(&model_dir, &dataset, &output_dir, &save_path, steps)?;
    eprintln!("demo: part 1 trains steps 1-{pause} of {steps}, then stops at a checkpoint");
    let first = run_job_with(
        &job,
        RunOptions {
            pause_after: Some(pause),
        },
    )?;
    let mut resumed = job.clone();
    resumed.checkpoint.resume = true;
    eprintln!("demo: part 2 resumes with --resume and trains to step {steps}");
    let second = run_job_with(&resumed, RunOptions::default())?;
    print_summary(work, &model_dir, &output_dir, &save_path, &first, &second)
}

/// The job's flags, as a user would pass them.
fn demo_job(
    model_dir: &Path,
    dataset: &Path,
    output_dir: &Path,
    save_path: &Path,
    steps: u64,
) -> Result<crate::job::JobConfig> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let steps = steps.to_string();
    let argv: Vec<String> = [
        "ferrotune",
        "--model_name",
        &s(model_dir),
        "--dataset",
        &s(dataset),
        "--output_dir",
        &s(output_dir),
        "--save_path",
        &s(save_path),
        "--device",
        "cpu",
        // Every bundled row fits (188-202 tokens with the tiny tokenizer and the alpaca
        // template): a shorter limit would cut samples inside the template's preamble and train
        // on that alone.
        "--max_seq_length",
        "256",
        "--r",
        "16",
        "--lora_alpha",
        "32",
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "2",
        "--max_steps",
        &steps,
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "5",
        "--lr_scheduler_type",
        "linear",
        "--optim",
        "adamw_8bit",
        "--val_size",
        "0.05",
        "--logging_steps",
        "10",
        "--save_steps",
        "25",
        "--save_total_limit",
        "3",
        "--report_to",
        "tensorboard",
        "--save_model",
        "--save_method",
        "lora",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    match crate::cli::parse(argv) {
        Ok(crate::cli::Invocation::Train(job)) => Ok(*job),
        Err(crate::cli::CliStop::Usage(e)) => bail!("demo flags: {e}"),
        _ => bail!("demo flags did not make a training job"),
    }
}

/// The tiny model and tokenizer, built once into `dir` (atomically, so an interrupted first
/// demo never leaves a half-written cache).
fn ensure_model(dir: &Path) -> Result<PathBuf> {
    if crate::checkpoint::manifest::Manifest::read(dir)
        .is_ok_and(|m| m.verify(dir, &["config.json", "tokenizer.json"]).is_ok())
    {
        eprintln!("demo: using the cached tiny model in {}", dir.display());
        return Ok(dir.to_path_buf());
    }
    eprintln!(
        "demo: building a tiny Llama model and tokenizer in {}",
        dir.display()
    );
    let staged = atomic::StagingDir::create(dir)?;
    let texts: Vec<String> = DATASET
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|row| {
            ["instruction", "input", "output"]
                .iter()
                .filter_map(|k| row[*k].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let spec = TinySpec {
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        ..TinySpec::default()
    };
    write_tiny_chat_model(staged.path(), &texts, VOCAB_SIZE, 2048, spec, SEED)?;
    let manifest = crate::checkpoint::manifest::Manifest::describe(staged.path(), 0)?;
    staged.write(
        crate::checkpoint::manifest::MANIFEST,
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    staged.commit()
}

fn print_summary(
    work: &Path,
    model_dir: &Path,
    output_dir: &Path,
    save_path: &Path,
    first: &JobReport,
    second: &JobReport,
) -> Result<()> {
    let losses = second.state.logged_losses();
    let (Some(&(first_step, first_loss)), Some(&(last_step, last_loss))) =
        (losses.first(), losses.last())
    else {
        bail!("the demo run logged no training loss");
    };
    let checkpoints = crate::checkpoint::list(output_dir)?;
    println!("ferrotune demo finished in {}", work.display());
    println!("  tiny model + tokenizer (cached): {}", model_dir.display());
    println!(
        "  part 1 stopped at step {}; part 2 resumed from {}",
        first.state.global_step,
        second
            .resumed_from
            .as_ref()
            .map_or("nothing".into(), |d| d.display().to_string())
    );
    println!(
        "  checkpoints: {}",
        checkpoints
            .iter()
            .map(|(_, d)| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  tensorboard: tensorboard --logdir {}",
        output_dir.join("runs").display()
    );
    println!("  adapter: {}", save_path.display());
    println!("  training loss: {first_loss:.4} at step {first_step} -> {last_loss:.4} at step {last_step}");
    if let Some(eval) = second
        .state
        .log_history
        .iter()
        .rev()
        .find_map(|e| e.get("eval_loss")?.as_f64())
    {
        println!("  final eval loss: {eval:.4}");
    }
    if last_loss >= first_loss * 0.8 {
        bail!("the demo's training loss did not fall clearly ({first_loss:.4} -> {last_loss:.4})");
    }
    Ok(())
}
