//! The PEFT LoRA adapter as `peft` saves it (`save_pretrained`): `adapter_model.safetensors`
//! (tensor names `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, header
//! metadata `{"format":"pt"}`), `adapter_config.json` (a `LoraConfig`) and a README model card.
//! Checkpoints hold the same files, so `PeftModel.from_pretrained(base, "checkpoint-N")` works.

use anyhow::Result;
use serde_json::{json, Value};

use crate::checkpoint::tensors;
use crate::cli::choices::Bias;
use crate::engine::HostTensor;
use crate::job::JobConfig;

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const MODEL_CARD: &str = "README.md";

/// `adapter_model.safetensors` bytes.
pub fn weights_bytes(params: &[(String, HostTensor)]) -> Result<Vec<u8>> {
    tensors::to_bytes(params, &[("format", "pt")])
}

/// `adapter_config.json`: the fields of PEFT's `LoraConfig` that every PEFT release since 0.10
/// accepts (newer releases default the rest).
pub fn config(job: &JobConfig) -> Value {
    let l = &job.lora;
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": job.model.model_name,
        "bias": match l.bias {
            Bias::None => "none",
            Bias::All => "all",
            Bias::LoraOnly => "lora_only",
        },
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": l.lora_alpha,
        "lora_dropout": l.lora_dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": l.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": l.target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": l.use_dora,
        "use_rslora": l.use_rslora,
    })
}

pub fn config_bytes(job: &JobConfig) -> Vec<u8> {
    let mut text = serde_json::to_string_pretty(&config(job)).expect("JSON value serialises");
    text.push('\n');
    text.into_bytes()
}

/// What the model card reports about the run.
#[derive(Debug, Clone, Default)]
pub struct TrainingSummary {
    pub global_step: u64,
    pub epoch: f64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub trainable_params: usize,
}

/// A README in the shape of PEFT's model card: YAML front matter Hugging Face reads, how the
/// adapter was trained, and how to load it.
pub fn model_card(job: &JobConfig, summary: &TrainingSummary) -> String {
    let l = &job.lora;
    let t = &job.training;
    let base = &job.model.model_name;
    let loss = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.4}"));
    format!(
        "---\nbase_model: {base}\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n\
         - lora\n- ferrotune\n---\n\n\
         # LoRA adapter for {base}\n\n\
         Trained with ferrotune, a Rust LoRA fine-tuning host.\n\n\
         | setting | value |\n|---|---|\n\
         | dataset | `{dataset}` |\n\
         | r / lora_alpha / lora_dropout | {r} / {alpha} / {dropout} |\n\
         | target modules | {targets} |\n\
         | trainable parameters | {params} |\n\
         | optimizer / lr / schedule | {optim} / {lr} / {sched} |\n\
         | batch × accumulation | {bs} × {ga} |\n\
         | steps / epochs | {steps} / {epoch:.2} |\n\
         | first / last training loss | {first} / {last} |\n\n\
         ## Use\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
         base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n\
         model = PeftModel.from_pretrained(base, \"PATH_TO_THIS_DIRECTORY\")\n\
         tokenizer = AutoTokenizer.from_pretrained(\"PATH_TO_THIS_DIRECTORY\")\n```\n",
        dataset = job.model.dataset,
        r = l.r,
        alpha = l.lora_alpha,
        dropout = l.lora_dropout,
        targets = l.target_modules.join(", "),
        params = summary.trainable_params,
        optim = t.optim,
        lr = t.learning_rate,
        sched = t.lr_scheduler_type,
        bs = t.per_device_train_batch_size,
        ga = t.gradient_accumulation_steps,
        steps = summary.global_step,
        epoch = summary.epoch,
        first = loss(summary.first_loss),
        last = loss(summary.last_loss),
    )
}

/// Writes the three adapter files into `dir` (each replaced atomically).
pub fn write_dir(
    dir: &std::path::Path,
    job: &JobConfig,
    params: &[(String, HostTensor)],
    summary: &TrainingSummary,
) -> Result<()> {
    use crate::checkpoint::atomic::replace_file;
    std::fs::create_dir_all(dir)?;
    replace_file(&dir.join(ADAPTER_WEIGHTS), &weights_bytes(params)?)?;
    replace_file(&dir.join(ADAPTER_CONFIG), &config_bytes(job))?;
    replace_file(&dir.join(MODEL_CARD), model_card(job, summary).as_bytes())?;
    Ok(())
}
