//! One export run: validate everything first (presets, methods, inputs), then write the saves
//! in order — adapter or merged model, then one GGUF per preset and an Ollama Modelfile.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::bnb_nf4::{self, Nf4Weight, StoredTensor};
use super::hf_save::{PlannedTensor, ShardedWriter, DEFAULT_MAX_SHARD_BYTES};
use super::merge::MergedModel;
use super::peft::LoraAdapter;
use super::progress;
use super::safetensors_dir::{SafetensorsDir, StoreDtype};
use super::spooled_shards::SpooledShards;
use crate::cli::choices::SaveMethod;
use crate::cli::UsageError;
use crate::gguf::convert::GgufPlan;
use crate::gguf::preset::Preset;
use crate::job::JobConfig;
use crate::model::config::{ModelConfig, RopeScaling};

/// Tokenizer and config files copied next to a saved model or adapter, when the base has them.
const TOKENIZER_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// What to export, resolved to directories.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// Base model directory (config.json, safetensors, tokenizer files).
    pub base_dir: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    pub adapter_dir: PathBuf,
    /// `None`: no model save (only GGUF, if asked).
    pub save_method: Option<SaveMethod>,
    /// GGUF presets; empty: no GGUF.
    pub gguf_presets: Vec<String>,
    pub save_path: PathBuf,
    /// Names the GGUF files (`<name>.<PRESET>.gguf`) and `general.name`.
    pub name: String,
    pub max_shard_bytes: u64,
    /// The training's `--max_seq_length`: past the base's window the merged config and the
    /// GGUF metadata carry Unsloth's RoPE stretch ([`ModelConfig::unsloth_rope_stretch`]).
    pub max_seq_length: Option<usize>,
}

/// Exports at the end of training: `--save_model` (with `--save_method`) and `--save_gguf`
/// (with `--quantization`) into `--save_path`, from the base in `model_dir` and the final
/// adapter in `adapter_dir`. Returns the files written.
pub fn run_final_exports(
    job: &JobConfig,
    model_dir: &Path,
    adapter_dir: &Path,
) -> Result<Vec<PathBuf>> {
    let s = &job.saving;
    let request = ExportRequest {
        base_dir: model_dir.to_path_buf(),
        adapter_dir: adapter_dir.to_path_buf(),
        save_method: s.save_model.then_some(s.save_method),
        gguf_presets: if s.save_gguf {
            s.quantization.clone()
        } else {
            Vec::new()
        },
        save_path: s.save_path.clone(),
        name: model_name_of(&job.model.model_name),
        max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        max_seq_length: Some(job.model.max_seq_length),
    };
    run_exports(&request)
}

/// Checks, before training starts, that the final exports the job asks for can run on the base
/// in `model_dir`, so that a long run does not end in an export error that was knowable up front.
pub fn check_final_exports(job: &JobConfig, model_dir: &Path) -> Result<()> {
    let s = &job.saving;
    if s.save_gguf {
        parse_presets(&s.quantization)?;
    }
    let merges = s.save_model
        && matches!(
            s.save_method,
            SaveMethod::Merged16bit | SaveMethod::Merged4bit
        );
    if merges || s.save_gguf {
        let base = SafetensorsDir::open_model_dir(model_dir).with_context(|| {
            format!(
                "--save_model/--save_gguf merge the adapter into the base weights of {}",
                model_dir.display()
            )
        })?;
        drop(base);
    }
    if s.save_gguf {
        let cfg = crate::model::config::ModelConfig::from_dir(model_dir)?;
        crate::gguf::arch::arch_for(&cfg.model_type)?;
        if !model_dir.join("tokenizer.json").is_file() {
            bail!(
                "--save_gguf needs {}/tokenizer.json for the GGUF tokenizer metadata",
                model_dir.display()
            );
        }
    }
    Ok(())
}

/// `org/Model-Name` or `/path/to/Model-Name` → `Model-Name`.
pub fn model_name_of(model: &str) -> String {
    let trimmed = model.trim_end_matches('/');
    let last = trimmed.rsplit(['/', '\\']).next().unwrap_or(trimmed);
    let name = last.strip_suffix(".gguf").unwrap_or(last);
    if name.is_empty() {
        "model".into()
    } else {
        name.to_string()
    }
}

/// Parses and de-duplicates presets, failing on the first unknown one before any work starts.
pub fn parse_presets(names: &[String]) -> Result<Vec<Preset>, UsageError> {
    let mut out = Vec::new();
    for name in names {
        let preset = Preset::parse(name).map_err(|e| UsageError::new(e.to_string()))?;
        if !out.contains(&preset) {
            out.push(preset);
        }
    }
    Ok(out)
}

pub fn run_exports(req: &ExportRequest) -> Result<Vec<PathBuf>> {
    let presets = parse_presets(&req.gguf_presets)?;
    if req.save_method.is_none() && presets.is_empty() {
        return Ok(Vec::new());
    }
    let adapter = LoraAdapter::open(&req.adapter_dir)?;
    std::fs::create_dir_all(&req.save_path)
        .with_context(|| format!("cannot create --save_path {}", req.save_path.display()))?;
    let mut written = Vec::new();
    if req.save_method == Some(SaveMethod::Lora) {
        written.extend(save_adapter(req)?);
    }
    let needs_merge = matches!(
        req.save_method,
        Some(SaveMethod::Merged16bit | SaveMethod::Merged4bit)
    ) || !presets.is_empty();
    if !needs_merge {
        return Ok(written);
    }
    let base = SafetensorsDir::open_model_dir(&req.base_dir)?;
    let merged = MergedModel::new(&base, &adapter)?;
    let trained = Trained::of(req)?;
    match req.save_method {
        Some(SaveMethod::Merged16bit) => {
            written.extend(save_merged_16bit(req, &trained, &base, &merged)?)
        }
        Some(SaveMethod::Merged4bit) => {
            written.extend(save_merged_4bit(req, &trained, &base, &merged)?)
        }
        _ => {}
    }
    if !presets.is_empty() {
        let plan = GgufPlan::with_config(&req.base_dir, trained.cfg, &merged, &req.name)?;
        let targets: Vec<(Preset, PathBuf)> = presets
            .iter()
            .map(|p| {
                let file = format!("{}.{}.gguf", req.name, p.file_tag());
                (*p, req.save_path.join(file))
            })
            .collect();
        let started = std::time::Instant::now();
        let all = plan.write_presets(&merged, &targets)?;
        let mut first = None;
        for stats in all {
            eprintln!(
                "wrote {} ({:.1} MiB, quantized in {:.1} s, {:.1} M values/s)",
                stats.path.display(),
                stats.bytes as f64 / (1 << 20) as f64,
                stats.seconds,
                stats.values as f64 / 1e6 / stats.seconds.max(1e-9)
            );
            first.get_or_insert_with(|| stats.path.clone());
            written.push(stats.path);
        }
        eprintln!(
            "GGUF: {} preset(s) from one merge in {:.1} s",
            targets.len(),
            started.elapsed().as_secs_f64()
        );
        if let Some(first) = first {
            written.push(write_modelfile(&req.save_path, &first)?);
        }
    }
    Ok(written)
}

fn copy_if_present(from_dir: &Path, to_dir: &Path, names: &[&str]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for name in names {
        let src = from_dir.join(name);
        if src.is_file() {
            let dst = to_dir.join(name);
            if src != dst {
                std::fs::copy(&src, &dst).with_context(|| {
                    format!("cannot copy {} to {}", src.display(), dst.display())
                })?;
            }
            out.push(dst);
        }
    }
    Ok(out)
}

/// `lora`: the PEFT adapter files plus the base's tokenizer files.
fn save_adapter(req: &ExportRequest) -> Result<Vec<PathBuf>> {
    let mut out = copy_if_present(
        &req.adapter_dir,
        &req.save_path,
        &[
            "adapter_model.safetensors",
            "adapter_config.json",
            "README.md",
        ],
    )?;
    out.extend(copy_if_present(
        &req.base_dir,
        &req.save_path,
        &TOKENIZER_FILES,
    )?);
    Ok(out)
}

/// `merged_16bit`: every base tensor merged and stored in its own dtype, config, generation
/// config and tokenizer files.
fn save_merged_16bit(
    req: &ExportRequest,
    trained: &Trained,
    base: &SafetensorsDir,
    merged: &MergedModel,
) -> Result<Vec<PathBuf>> {
    let plan: Vec<PlannedTensor> = base
        .metas()
        .iter()
        .map(|m| PlannedTensor {
            name: m.name.clone(),
            shape: m.shape.clone(),
            dtype: m.dtype,
        })
        .collect();
    // Shards are staged in a hidden directory and moved into place only once all are written,
    // so a failed merge (e.g. a non-finite value) leaves no partial model behind.
    let staging = tempfile::Builder::new()
        .prefix(".ferrotune-merging-")
        .tempdir_in(&req.save_path)
        .with_context(|| {
            format!(
                "cannot create a staging directory in {}",
                req.save_path.display()
            )
        })?;
    let mut writer = ShardedWriter::new(staging.path(), &plan, req.max_shard_bytes)?;
    let bar = progress::bar(plan.len() as u64, "merge");
    for t in &plan {
        bar.set_message(t.name.clone());
        let values = merged.merged_in(&t.name, t.dtype)?;
        writer.write(&t.name, &t.dtype.encode(&values))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut files = move_into_place(writer.finish()?, &req.save_path)?;
    if base.prequantized().is_some() || trained.stretched {
        // Rewritten: no quantization_config for dequantised weights, the stretch if any.
        let mut config = read_config(&req.base_dir)?;
        if let Some(c) = config.as_object_mut() {
            c.remove("quantization_config");
        }
        stretch_rope(&mut config, trained);
        files.push(write_config(&req.save_path, &config)?);
    } else {
        files.extend(copy_if_present(
            &req.base_dir,
            &req.save_path,
            &["config.json"],
        )?);
    }
    if !req.save_path.join("config.json").is_file() {
        bail!(
            "{}: the base model has no config.json to save with the merged weights",
            req.base_dir.display()
        );
    }
    files.extend(save_model_side_files(req)?);
    Ok(files)
}

/// Moves staged shards (and index) into `dir`, returning their new paths.
fn move_into_place(staged: Vec<PathBuf>, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for staged in staged {
        let dst = dir.join(staged.file_name().unwrap_or_default());
        std::fs::rename(&staged, &dst)
            .with_context(|| format!("cannot move {} into place", dst.display()))?;
        files.push(dst);
    }
    Ok(files)
}

/// generation_config.json and the tokenizer files next to a merged model.
fn save_model_side_files(req: &ExportRequest) -> Result<Vec<PathBuf>> {
    let mut files = vec![write_generation_config(&req.base_dir, &req.save_path)?];
    files.extend(copy_if_present(
        &req.base_dir,
        &req.save_path,
        &TOKENIZER_FILES,
    )?);
    Ok(files)
}

/// `merged_4bit`: the merged model with every decoder linear weight quantised to NF4 in
/// bitsandbytes' serialised layout (double-quantised absmax), everything else in its own
/// dtype, and `quantization_config` in config.json, so that transformers + bitsandbytes load
/// it as a 4-bit model. Each weight is merged, rounded to its dtype (as a 16-bit merge would
/// store it) and quantised in turn; memory holds one tensor. From a pre-quantised base, each
/// NF4 weight is dequantised (bitsandbytes' semantics), merged and quantised again — the
/// merged weight is new, so its codes are too; the modules the base kept 16-bit stay 16-bit
/// (its `llm_int8_skip_modules` is kept).
fn save_merged_4bit(
    req: &ExportRequest,
    trained: &Trained,
    base: &SafetensorsDir,
    merged: &MergedModel,
) -> Result<Vec<PathBuf>> {
    let mut config = read_config(&req.base_dir)?;
    stretch_rope(&mut config, trained);
    let prequantized = base.prequantized();
    if prequantized.is_none() && config.get("quantization_config").is_some() {
        bail!(
            "{}: the base model is already quantized (config.json has quantization_config); merged_4bit needs a 16-bit base",
            req.base_dir.display()
        );
    }
    let staging = tempfile::Builder::new()
        .prefix(".ferrotune-merging-")
        .tempdir_in(&req.save_path)
        .with_context(|| {
            format!(
                "cannot create a staging directory in {}",
                req.save_path.display()
            )
        })?;
    let mut writer = SpooledShards::new(staging.path(), req.max_shard_bytes)?;
    let bar = progress::bar(base.metas().len() as u64, "merge+nf4");
    let mut linear_dtype = None;
    let mut quantized = 0usize;
    for meta in base.metas() {
        bar.set_message(meta.name.clone());
        let values = merged.merged_in(&meta.name, meta.dtype)?;
        let quantize = match prequantized {
            Some(p) => p.is_nf4(&meta.name),
            None => bnb_nf4::is_decoder_linear(&meta.name, &meta.shape),
        };
        if quantize {
            let q = Nf4Weight::quantize(&values, &meta.shape, meta.dtype)
                .with_context(|| format!("{}: NF4 quantisation", meta.name))?;
            writer.write_group(&q.tensors(&meta.name))?;
            linear_dtype.get_or_insert(meta.dtype);
            quantized += 1;
        } else {
            writer.write_group(&[StoredTensor {
                name: meta.name.clone(),
                dtype: meta.dtype.name(),
                shape: meta.shape.clone(),
                bytes: meta.dtype.encode(&values),
            }])?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if quantized == 0 {
        bail!(
            "{}: no model.layers.*.weight linear weights to quantize; merged_4bit supports the llama-family layout",
            req.base_dir.display()
        );
    }
    // bitsandbytes computes in the model's dtype (what a 16-bit load of this save would use).
    let compute_dtype = prequantized
        .and_then(|p| p.config.compute_dtype.clone())
        .or_else(|| {
            ["torch_dtype", "dtype"]
                .iter()
                .find_map(|k| config[*k].as_str().map(str::to_string))
        })
        .unwrap_or_else(|| {
            bnb_nf4::torch_dtype_name(linear_dtype.unwrap_or(StoreDtype::F32)).to_string()
        });
    let mut quantization = bnb_nf4::quantization_config(&compute_dtype);
    if let Some(p) = prequantized {
        quantization["llm_int8_skip_modules"] = p.config.skip_modules.clone();
    }
    config["quantization_config"] = quantization;
    let mut files = move_into_place(writer.finish()?, &req.save_path)?;
    files.push(write_config(&req.save_path, &config)?);
    files.extend(save_model_side_files(req)?);
    eprintln!("merged_4bit: {quantized} linear weights in NF4 (bitsandbytes layout, double-quantised absmax)");
    Ok(files)
}

/// The architecture the adapter was trained with: the base's, at the training's
/// `--max_seq_length` ([`ModelConfig::for_max_seq_length`]).
struct Trained {
    cfg: ModelConfig,
    /// Whether that differs from the base's config.json (RoPE stretched, window widened).
    stretched: bool,
}

impl Trained {
    fn of(req: &ExportRequest) -> Result<Self> {
        let base = ModelConfig::from_dir(&req.base_dir)?;
        let cfg = match req.max_seq_length {
            Some(n) => base.clone().for_max_seq_length(n),
            None => base.clone(),
        };
        let stretched = cfg != base;
        Ok(Trained { cfg, stretched })
    }
}

/// Writes the RoPE stretch and the wider window of `trained` into a copy of the base's
/// config.json. `rope_scaling` `{"type": "linear"}` is the key transformers 4 and 5 both read
/// (5 folds it into `rope_parameters` with the base's `rope_theta`); a `rope_parameters` already
/// there is rewritten to match.
fn stretch_rope(config: &mut serde_json::Value, trained: &Trained) {
    let Some(c) = config.as_object_mut().filter(|_| trained.stretched) else {
        return;
    };
    let cfg = &trained.cfg;
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        c.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "linear", "factor": factor}),
        );
        if c.contains_key("rope_parameters") {
            c.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_type": "linear", "factor": factor,
                    "rope_theta": cfg.rope_theta}),
            );
        }
    }
    c.insert(
        "max_position_embeddings".into(),
        cfg.max_position_embeddings.into(),
    );
}

fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", path.display()))
}

fn write_config(dir: &Path, config: &serde_json::Value) -> Result<PathBuf> {
    let dst = dir.join("config.json");
    std::fs::write(&dst, serde_json::to_string_pretty(config)? + "\n")
        .with_context(|| format!("cannot write {}", dst.display()))?;
    Ok(dst)
}

/// The base's generation_config.json, or the one transformers derives from config.json.
fn write_generation_config(base: &Path, out: &Path) -> Result<PathBuf> {
    let dst = out.join("generation_config.json");
    let src = base.join("generation_config.json");
    if src.is_file() {
        if src != dst {
            std::fs::copy(&src, &dst)?;
        }
        return Ok(dst);
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("config.json"))?)?;
    let mut gen = serde_json::Map::new();
    gen.insert("_from_model_config".into(), true.into());
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if !config[key].is_null() {
            gen.insert(key.into(), config[key].clone());
        }
    }
    std::fs::write(&dst, serde_json::to_string_pretty(&gen)?)?;
    Ok(dst)
}

/// An Ollama Modelfile pointing at the first GGUF (`ollama create NAME -f Modelfile`).
fn write_modelfile(dir: &Path, gguf: &Path) -> Result<PathBuf> {
    let file = gguf.file_name().unwrap_or_default().to_string_lossy();
    let path = dir.join("Modelfile");
    std::fs::write(&path, format!("FROM ./{file}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base directory holding only `config` as its config.json, and a request on it.
    fn request_on(dir: &Path, config: serde_json::Value, max_seq_length: usize) -> ExportRequest {
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        ExportRequest {
            base_dir: dir.to_path_buf(),
            adapter_dir: dir.to_path_buf(),
            save_method: None,
            gguf_presets: Vec::new(),
            save_path: dir.to_path_buf(),
            name: "m".into(),
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            max_seq_length: Some(max_seq_length),
        }
    }

    #[test]
    fn the_merged_config_carries_the_rope_stretch_in_both_transformers_keys() {
        let dir = tempfile::tempdir().unwrap();
        let base = serde_json::json!({
            "model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 10000.0, "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}
        });
        // Within the window: nothing changes.
        let mut config = base.clone();
        let trained = |config: &serde_json::Value, n| {
            Trained::of(&request_on(dir.path(), config.clone(), n)).unwrap()
        };
        stretch_rope(&mut config, &trained(&base, 1024));
        assert_eq!(config, base);
        // Past it: linear by 4 under both keys, the window widened.
        stretch_rope(&mut config, &trained(&base, 4096));
        assert_eq!(
            config["rope_scaling"],
            serde_json::json!({"type": "linear", "factor": 4.0})
        );
        assert_eq!(
            config["rope_parameters"],
            serde_json::json!({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
        );
        assert_eq!(config["max_position_embeddings"], 4096);
        // Llama 3.1-style scaling is kept; only the window widens.
        let mut llama3 = base.clone();
        llama3["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024});
        llama3.as_object_mut().unwrap().remove("rope_parameters");
        let mut config = llama3.clone();
        stretch_rope(&mut config, &trained(&llama3, 4096));
        assert_eq!(config["rope_scaling"], llama3["rope_scaling"]);
        assert_eq!(config["max_position_embeddings"], 4096);
    }

    #[test]
    fn model_names_come_from_the_last_path_component() {
        assert_eq!(model_name_of("unsloth/llama-3-8b"), "llama-3-8b");
        assert_eq!(model_name_of("/models/Qwen2.5-0.5B/"), "Qwen2.5-0.5B");
        assert_eq!(model_name_of("x.gguf"), "x");
    }

    #[test]
    fn presets_are_checked_before_any_work() {
        let err = parse_presets(&["q8_0".into(), "iq1_s".into()]).unwrap_err();
        assert!(err.to_string().contains("iq1_s"));
        let ok = parse_presets(&["quantized".into(), "q4_k_m".into(), "f16".into()]).unwrap();
        assert_eq!(ok, [Preset::Q4KM, Preset::F16]);
    }
}
