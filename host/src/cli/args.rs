//! The command line: every `unsloth-cli.py` flag of the Kelpie recipe with the same name, type and
//! default, plus ferrotune's own flags. Parsing only; meaning is given in `job.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use super::choices::*;

/// GGUF quantization presets and the aliases unsloth accepts (one list, owned by the GGUF writer).
pub use crate::gguf::preset::PRESET_NAMES as QUANTIZATION_CHOICES;

/// Integrations transformers' `report_to` knows. ferrotune writes tensorboard itself; the others
/// are recognised so that a job naming them gets a clear "not available" error, not "unknown".
pub const REPORT_TO_CHOICES: &[&str] = &[
    "tensorboard",
    "none",
    "all",
    "azure_ml",
    "clearml",
    "codecarbon",
    "comet_ml",
    "dagshub",
    "dvclive",
    "flyte",
    "mlflow",
    "neptune",
    "swanlab",
    "trackio",
    "wandb",
];

#[derive(Debug, Parser)]
#[command(
    name = "ferrotune",
    version,
    about = "LoRA/QLoRA fine-tuning host: a drop-in replacement for Unsloth's unsloth-cli.py",
    long_about = "LoRA/QLoRA fine-tuning host. `ferrotune ARGS` takes the same arguments as \
                  `python unsloth-cli.py ARGS` and trains; subcommands add tools beside it.",
    args_conflicts_with_subcommands = true,
    args_override_self = true,
    infer_long_args = true,
    allow_negative_numbers = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the main job on embedded defaults: a tiny model and a bundled dataset, no network.
    Demo(DemoArgs),
    /// WASM plugin tools: scaffold a new plugin crate, inspect a .wasm component.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Save a trained adapter as a merged model, a PEFT adapter and/or GGUF files, without training.
    Export(Box<ExportArgs>),
    /// Print the first training samples as the model will see them (formatter, chat template,
    /// EOS, truncation), with the parts that carry no loss marked ⟦…⟧.
    Format(Box<FormatArgs>),
    /// Time training steps on random tokens (warm-up, then the median step): tokens/s, peak GPU memory.
    Bench(BenchArgs),
    /// Kelpie (SaladCloud job queue): print a job JSON for training flags, submit it, check or
    /// cancel a job.
    #[command(subcommand)]
    Kelpie(crate::kelpie::args::KelpieCommand),
    /// Compile the CUDA kernels ahead of time into the kernel cache ($FERROTUNE_CACHE_DIR, else
    /// ~/.cache/ferrotune): no GPU needed, only libnvrtc. Run it while building a container
    /// image, so that a fresh machine's first launch compiles nothing.
    Kernels(KernelsArgs),
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct KernelsArgs {
    /// GPU architectures to compile for: sm_80, sm_86, sm_89, sm_90 (or 8.0, 86, …), repeated
    /// or comma-separated. Default: sm_80, sm_86, sm_89 and sm_90 (A100, RTX 30, RTX 40, H100/H200).
    #[arg(long, value_delimiter = ',', value_parser = parse_arch)]
    pub arch: Vec<ferrotune_kernels::arch::GpuArch>,
}

fn parse_arch(text: &str) -> Result<ferrotune_kernels::arch::GpuArch, String> {
    let arch = ferrotune_kernels::arch::GpuArch::parse(text).ok_or_else(|| {
        format!("{text:?} is not a GPU architecture; write it as sm_90, sm_86, 9.0 or 86")
    })?;
    if !arch.is_supported() {
        return Err(format!(
            "{arch} is older than the kernels support (sm_80: they use its bf16 instructions)"
        ));
    }
    Ok(arch)
}

#[derive(Debug, Args, Clone)]
#[command(rename_all = "snake_case")]
pub struct BenchArgs {
    /// Model directory (config.json + safetensors), e.g. the anchor benchmark's
    /// /tmp/model-llama3-1b (`--shape DIR` is the same flag).
    #[arg(long, alias = "shape")]
    pub model_name: PathBuf,
    /// Rows per step (`--batch`).
    #[arg(long, alias = "batch", default_value_t = 2)]
    pub per_device_train_batch_size: usize,
    /// Tokens per row, every row full length (`--seq`).
    #[arg(long, alias = "seq", default_value_t = 2048)]
    pub max_seq_length: usize,
    /// Activation checkpointing mode.
    #[arg(long, value_enum, default_value_t = GradientCheckpointing::False)]
    pub use_gradient_checkpointing: GradientCheckpointing,
    /// LoRA rank (adapters on q,k,v,o,gate,up,down).
    #[arg(long, default_value_t = 16)]
    pub r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup_steps: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// NF4 base weights (QLoRA).
    #[arg(long)]
    pub load_in_4bit: bool,
    /// GPUs, data parallel (each gets --per_device_train_batch_size rows per step).
    #[arg(long, default_value_t = 1, value_parser = positive_usize)]
    pub num_gpus: usize,
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    /// The job's flags (model, dataset, formatter, chat template, masking) as for training.
    #[command(flatten)]
    pub job: TrainArgs,
    /// How many samples to print.
    #[arg(long, default_value_t = 5, value_parser = positive_usize)]
    pub limit: usize,
}

/// Flags spelled with underscores, like every training flag (`--save_path`).
#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct ExportArgs {
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Training checkpoint (OUTPUT_DIR/checkpoint-N) whose adapter to export.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Base model (HF id resolved through the local cache, or a directory); default: the adapter's
    /// base_model_name_or_path.
    #[arg(long)]
    pub base: Option<String>,
    /// What to save into --save_path.
    #[arg(long, value_enum)]
    pub save_method: Option<SaveMethod>,
    /// Also write GGUF files (one per --quantization).
    #[arg(long)]
    pub save_gguf: bool,
    /// GGUF quantization presets (one or more).
    #[arg(long, num_args = 1.., default_values = ["q8_0"], value_parser = QUANTIZATION_CHOICES.to_vec())]
    pub quantization: Vec<String>,
    /// Output directory.
    #[arg(long)]
    pub save_path: PathBuf,
    /// Largest merged-model shard in MB (default 5000, transformers' 5GB).
    #[arg(long, value_parser = positive_u64)]
    pub max_shard_size_mb: Option<u64>,
    /// The training's --max_seq_length, when it exceeded the base's max_position_embeddings:
    /// the merged config and GGUF files then carry the RoPE stretch training used (default:
    /// a --checkpoint's own, from its training_args.json).
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    #[command(flatten)]
    pub push: PushArgs,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Write a ready-to-build plugin crate DIR/NAME (Cargo.toml, src/lib.rs with an example, README).
    New(PluginNewArgs),
    /// Print a plugin's kind, WIT world version, description and config schema.
    Inspect(PluginInspectArgs),
}

#[derive(Debug, Args)]
pub struct PluginNewArgs {
    /// Crate name: lower-case letters, digits and '-'.
    pub name: String,
    /// Plugin kind (one WIT world each); storage has no scaffold and names the built-in
    /// example to start from.
    #[arg(long, value_enum)]
    pub kind: PluginKind,
    /// Folder the crate is created in.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// The plugin-sdk folder to depend on (default: the SDK this ferrotune was built from).
    #[arg(long)]
    pub sdk_path: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PluginInspectArgs {
    /// The .wasm component.
    pub file: PathBuf,
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct DemoArgs {
    /// Where the demo writes its model cache, checkpoints and adapter.
    #[arg(long, default_value = "ferrotune-demo")]
    pub workdir: PathBuf,
    /// Optimizer steps of the demo run (it stops halfway at a checkpoint and resumes).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(2..))]
    pub max_steps: u64,
}

/// Everything a training job takes. Field names are the flag names.
#[derive(Debug, Args, Clone, Serialize)]
pub struct TrainArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub training: TrainingArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub reporting: ReportingArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub checkpoint: CheckpointArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub saving: SavingArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub plugins: PluginArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args, Clone, Serialize)]
#[command(next_help_heading = "Model", rename_all = "snake_case")]
pub struct ModelArgs {
    /// Model: a Hugging Face id (resolved through the local HF cache), a model directory or a .gguf file.
    #[arg(long, default_value = "unsloth/llama-3-8b")]
    pub model_name: String,
    /// Longest training sequence in tokens; longer samples are truncated.
    #[arg(long, default_value_t = 2048, value_parser = positive_usize)]
    pub max_seq_length: usize,
    /// Compute/storage dtype: float16, bfloat16, float32 or None (auto: bf16 where supported, else f16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Load the frozen base weights quantised to 4-bit NF4 (QLoRA).
    #[arg(long)]
    pub load_in_4bit: bool,
    /// Dataset: an HF dataset id (local HF cache), a .jsonl/.json/.csv/.parquet/.txt file or a directory.
    #[arg(long, default_value = "yahma/alpaca-cleaned")]
    pub dataset: String,
    /// Where to run: auto picks cuda when a usable GPU exists, else cpu.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// GPUs to train on, data parallel through NCCL (default: every visible GPU). Effective
    /// batch = per_device_train_batch_size × gradient_accumulation_steps × num_gpus.
    #[arg(long, value_parser = positive_usize)]
    pub num_gpus: Option<usize>,
}

#[derive(Debug, Args, Clone, Serialize)]
#[command(next_help_heading = "Data", rename_all = "snake_case")]
pub struct DataArgs {
    /// Train on a raw text file cut into windows of --chunk_size tokens (instead of --dataset rows).
    #[arg(long)]
    pub raw_text_file: Option<PathBuf>,
    /// Window length in tokens for --raw_text_file.
    #[arg(long, default_value_t = 2048, value_parser = positive_usize)]
    pub chunk_size: usize,
    /// Overlap in tokens between consecutive --raw_text_file windows.
    #[arg(long, default_value_t = 512, value_parser = non_negative_usize)]
    pub stride: usize,
    /// Pack several samples into each max_seq_length row (no attention across samples).
    #[arg(long)]
    pub packing: bool,
    /// Compute the loss on completions/assistant turns only (prompts are masked).
    #[arg(long)]
    pub train_on_completions: bool,
    /// Chat template: a template name, a Jinja file, or unset for the tokenizer's own.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Evaluation dataset (same forms as --dataset).
    #[arg(long)]
    pub eval_dataset: Option<String>,
    /// Hold out this share (0 < x < 1) or number (x >= 1) of training rows for evaluation.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    pub val_size: f64,
    /// Evaluation batch size per device.
    #[arg(long, default_value_t = 4, value_parser = positive_usize)]
    pub per_device_eval_batch_size: usize,
}

#[derive(Debug, Args, Clone, Serialize)]
#[command(next_help_heading = "LoRA", rename_all = "snake_case")]
pub struct LoraArgs {
    /// LoRA rank.
    #[arg(long, default_value_t = 16, value_parser = positive_usize)]
    pub r: usize,
    /// LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with --use_rslora).
    #[arg(long, default_value_t = 16.0, value_parser = positive_f64)]
    pub lora_alpha: f64,
    /// Dropout on the LoRA input.
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    pub lora_dropout: f64,
    /// Which biases train.
    #[arg(long, value_enum, default_value_t = Bias::None)]
    pub bias: Bias,
    /// Activation checkpointing: unsloth (recompute, offload to host memory on GPU), true (recompute), false.
    #[arg(long, value_enum, default_value_t = GradientCheckpointing::Unsloth)]
    pub use_gradient_checkpointing: GradientCheckpointing,
    /// Seed for LoRA initialisation.
    #[arg(long, default_value_t = 3407)]
    pub random_state: u64,
    /// Rank-stabilised LoRA: scale = alpha / sqrt(r).
    #[arg(long)]
    pub use_rslora: bool,
    /// LoftQ initialisation config (JSON).
    #[arg(long)]
    pub loftq_config: Option<String>,
    /// Modules that get adapters: q,k,v,o,gate,up,down (with or without `_proj`), comma or space separated.
    #[arg(long, num_args = 1.., value_delimiter = ',',
          default_values = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])]
    pub target_modules: Vec<String>,
    /// Weight-decomposed LoRA (DoRA).
    #[arg(long)]
    pub use_dora: bool,
}

#[derive(Debug, Args, Clone, Serialize)]
#[command(next_help_heading = "Training", rename_all = "snake_case")]
pub struct TrainingArgs {
    /// Micro-batch size per device.
    #[arg(long, default_value_t = 2, value_parser = positive_usize)]
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 4, value_parser = positive_usize)]
    pub gradient_accumulation_steps: usize,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 5, value_parser = non_negative_usize)]
    pub warmup_steps: usize,
    /// Warm-up as a share of all steps (used when --warmup_steps is 0).
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    pub warmup_ratio: f64,
    /// Optimizer steps to run; 0 or -1 trains for --num_train_epochs instead.
    #[arg(long, default_value_t = 400)]
    pub max_steps: i64,
    /// Epochs to train; takes effect when --max_steps is not given (or is <= 0).
    #[arg(long, value_parser = positive_f64)]
    pub num_train_epochs: Option<f64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4, value_parser = positive_f64)]
    pub learning_rate: f64,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = Optim::Adamw8bit)]
    pub optim: Optim,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.01, value_parser = non_negative_f64)]
    pub weight_decay: f64,
    /// Learning-rate schedule after warm-up.
    #[arg(long, value_enum, default_value_t = SchedulerKind::Linear)]
    pub lr_scheduler_type: SchedulerKind,
    /// Seed for data order and dropout.
    #[arg(long, default_value_t = 3407)]
    pub seed: u64,
    /// Clip the global gradient norm to this value (0 disables).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_f64)]
    pub max_grad_norm: f64,
}

#[derive(Debug, Args, Clone, Serialize)]
#[command(next_help_heading = "Reporting", rename_all = "snake_case")]
pub struct ReportingArgs {
    /// Where metrics go: tensorboard (event files under OUTPUT_DIR/runs), none, or all.
    #[arg(long, default_value = "tensorboard", value_parser = REPORT_TO_CHOICES.to_vec())]
    pub report_to: String,
    /// Log every N optimizer steps.
    #[arg(long, default_value_t = 1, value_parser = positive_usize)]
    pub logging_steps: usize,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Args, Clone, Serialize)]
#[command(next_help_heading = "Checkpoint & resume", rename_all = "snake_case")]
pub struct CheckpointArgs {
    /// When to write OUTPUT_DIR/checkpoint-N.
    #[arg(long, value_enum, default_value_t = SaveStrategy::Steps)]
    pub save_strategy: SaveStrategy,
    /// Checkpoint every N optimizer steps (with --save_strategy steps).
    #[arg(long, default_value_t = 500, value_parser = positive_usize)]
    pub save_steps: usize,
    /// Keep at most N checkpoints; the oldest go once a new one is complete.
    #[arg(long, value_parser = positive_usize)]
    pub save_total_limit: Option<usize>,
    /// Resume from the newest valid checkpoint in --output_dir (start fresh if none).
    #[arg(long)]
    pub resume: bool,
    /// Resume from exactly this checkpoint directory.
    #[arg(long)]
    pub resume_from_checkpoint: Option<PathBuf>,
}

#[derive(Debug, Args, Clone, Serialize)]
#[command(next_help_heading = "Saving & publishing", rename_all = "snake_case")]
pub struct SavingArgs {
    /// Checkpoints and logs go here.
    #[arg(long, default_value = "/opt/checkpoints")]
    pub output_dir: PathBuf,
    /// Save the final model to --save_path.
    #[arg(long)]
    pub save_model: bool,
    /// What --save_model writes.
    #[arg(long, value_enum, default_value_t = SaveMethod::Merged16bit)]
    pub save_method: SaveMethod,
    /// Also write GGUF files (one per --quantization).
    #[arg(long)]
    pub save_gguf: bool,
    /// Final artefacts go here.
    #[arg(long, default_value = "/opt/outputs")]
    pub save_path: PathBuf,
    /// GGUF quantization presets (one or more).
    #[arg(long, num_args = 1.., default_values = ["q8_0"], value_parser = QUANTIZATION_CHOICES.to_vec())]
    pub quantization: Vec<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub push: PushArgs,
}

/// The Hub push flags of a training job and of `ferrotune export` (what they do:
/// `export::push`).
#[derive(Debug, Args, Clone, Serialize)]
#[command(rename_all = "snake_case")]
pub struct PushArgs {
    /// Push the saved model (--save_model / --save_method) to the Hugging Face Hub at --hub_path.
    #[arg(long)]
    pub push_model: bool,
    /// Push the GGUF files (--save_gguf) to the Hugging Face Hub at --hub_path.
    #[arg(long)]
    pub push_gguf: bool,
    /// Hub repository (owner/name) for pushes; HF_ENDPOINT overrides the Hub's URL.
    #[arg(long, default_value = "hf/model")]
    pub hub_path: String,
    /// Hub token for pushes (default: HF_TOKEN; never logged).
    #[arg(long)]
    #[serde(serialize_with = "redact_secret")]
    pub hub_token: Option<String>,
    /// A publish plugin PATH.wasm run after the saves (and any Hub push): it receives the saved
    /// model and GGUF files and sends them on through wasi:http (configured by --publish_config).
    #[arg(long)]
    pub publish: Option<PathBuf>,
    /// Publish plugin configuration: inline JSON or @file.json. Keys allow_hosts (the
    /// "host:port"s it may reach) and secrets (never printed) are the host's; the rest the plugin's.
    #[arg(long)]
    #[serde(serialize_with = "redact_publish_config")]
    pub publish_config: Option<String>,
}

#[derive(Debug, Args, Clone, Serialize)]
#[command(next_help_heading = "Plugins", rename_all = "snake_case")]
pub struct PluginArgs {
    /// Dataset formatter: alpaca, chat, text, prompt-completion, or a PATH.wasm plugin.
    #[arg(long, default_value = "alpaca")]
    pub formatter: String,
    /// Formatter configuration: inline JSON or @file.json.
    #[arg(long)]
    pub formatter_config: Option<String>,
    /// What to do with a row the formatter rejects: fail the job or skip the row (counted, logged).
    #[arg(long, value_enum, default_value_t = OnBadRow::Fail)]
    pub on_bad_row: OnBadRow,
    /// Sync policy deciding what goes to storage when: mirror (built in) or a sync policy
    /// PATH.wasm; its own keys go in --sync_config.
    #[arg(long)]
    pub sync: Option<String>,
    /// Storage for --sync: s3://BUCKET/PREFIX, file:///DIR or a storage plugin PATH.wasm
    /// (configured by --sync_config key storage_config); alone it means --sync mirror.
    #[arg(long)]
    pub sync_to: Option<String>,
    /// Sync configuration: inline JSON or @file.json (storage_config secrets are never printed).
    #[arg(long)]
    #[serde(serialize_with = "redact_sync_config")]
    pub sync_config: Option<String>,
    /// Memory limit per plugin instance, MiB.
    #[arg(long, default_value_t = 512, value_parser = positive_usize)]
    pub plugin_memory_mb: usize,
    /// Deadline per plugin call, seconds.
    #[arg(long, default_value_t = 30.0, value_parser = positive_f64)]
    pub plugin_timeout_s: f64,
}

#[derive(Debug, Args, Clone, Serialize)]
#[command(next_help_heading = "Run", rename_all = "snake_case")]
pub struct RunArgs {
    /// Read flags from a YAML or JSON file (keys are flag names); command-line flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the resolved configuration as JSON (secrets redacted) and exit.
    #[arg(long)]
    pub dry_run: bool,
}

/// `--sync_config` in `--dry_run` output: storage plugin secrets replaced by a marker.
fn redact_sync_config<S: serde::Serializer>(
    value: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(text) => s.serialize_str(&crate::plugin::storage_config::redact_sync_config(text)),
        None => s.serialize_none(),
    }
}

/// `--publish_config` in `--dry_run` output: its secrets replaced by a marker.
fn redact_publish_config<S: serde::Serializer>(
    value: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(text) => s.serialize_str(&crate::plugin::storage_config::redact_publish_config(text)),
        None => s.serialize_none(),
    }
}

/// Secrets appear in `--dry_run` output and logs only as a marker that they are set.
fn redact_secret<S: serde::Serializer>(value: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

fn parse_number<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("expected {what}, got {text:?}"))
}

fn positive_usize(text: &str) -> Result<usize, String> {
    let n: i64 = parse_number(text, "a positive integer")?;
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("must be a positive integer, got {n}"))
}

fn positive_u64(text: &str) -> Result<u64, String> {
    positive_usize(text).map(|n| n as u64)
}

fn non_negative_usize(text: &str) -> Result<usize, String> {
    let n: i64 = parse_number(text, "an integer >= 0")?;
    usize::try_from(n).map_err(|_| format!("must be an integer >= 0, got {n}"))
}

fn finite_f64(text: &str) -> Result<f64, String> {
    let x: f64 = parse_number(text, "a number")?;
    if x.is_finite() {
        Ok(x)
    } else {
        Err(format!("must be a finite number, got {text:?}"))
    }
}

fn positive_f64(text: &str) -> Result<f64, String> {
    let x = finite_f64(text)?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err(format!("must be greater than 0, got {x}"))
    }
}

fn non_negative_f64(text: &str) -> Result<f64, String> {
    let x = finite_f64(text)?;
    if x >= 0.0 {
        Ok(x)
    } else {
        Err(format!("must be >= 0, got {x}"))
    }
}

fn probability(text: &str) -> Result<f64, String> {
    let x = finite_f64(text)?;
    if (0.0..1.0).contains(&x) {
        Ok(x)
    } else {
        Err(format!("must be in [0, 1), got {x}"))
    }
}
