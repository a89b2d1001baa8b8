//! A Hugging Face llama-family model → one GGUF file per preset, streamed tensor by tensor:
//! each tensor is read as f32, permuted if the architecture needs it, quantized on all cores
//! and written before the next is read, so memory holds one tensor (plus its encoding).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::arch::{self, GgufArch};
use super::names::{self, Mapped};
use super::preset::{self, Preset, TensorSlot};
use super::quant;
use super::tokenizer::tokenizer_metadata;
use super::value::Value;
use super::writer::{GgufWriter, TensorInfo};
use crate::model::config::ModelConfig;

/// Where the model's tensors come from, by Hugging Face name.
pub trait TensorSource: Sync {
    /// Every tensor with its row-major shape.
    fn tensors(&self) -> Vec<(String, Vec<usize>)>;
    /// One tensor's values as f32.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>>;
}

#[derive(Debug, Clone)]
struct Entry {
    gguf: String,
    /// Source tensor; `None` for tensors computed here (`rope_freqs`).
    hf: Option<String>,
    shape: Vec<usize>,
    /// Rotary heads to permute q/k rows over (llama only).
    permute_heads: Option<usize>,
}

/// Everything that does not depend on the preset, computed once for several presets.
pub struct GgufPlan {
    cfg: ModelConfig,
    arch: GgufArch,
    entries: Vec<Entry>,
    tokenizer: Vec<(String, Value)>,
    name: String,
    params: u64,
    rope_freqs: Option<Vec<f32>>,
}

/// What writing one file took.
#[derive(Debug, Clone)]
pub struct WriteStats {
    pub path: PathBuf,
    pub bytes: u64,
    pub values: u64,
    pub seconds: f64,
}

impl GgufPlan {
    /// `model_dir` holds config.json and the tokenizer files; `source` the (merged) weights.
    pub fn new(model_dir: &Path, source: &dyn TensorSource, name: &str) -> Result<Self> {
        Self::with_config(model_dir, ModelConfig::from_dir(model_dir)?, source, name)
    }

    /// [`Self::new`] with the architecture given instead of read from `model_dir` (a training
    /// that stretched RoPE past the base's window writes the stretched one).
    pub fn with_config(
        model_dir: &Path,
        cfg: ModelConfig,
        source: &dyn TensorSource,
        name: &str,
    ) -> Result<Self> {
        let arch = arch::arch_for(&cfg.model_type)?;
        let mut entries = Vec::new();
        let mut params = 0u64;
        for (hf, shape) in source.tensors() {
            let Mapped::Tensor(gguf) = names::gguf_name(&hf)? else {
                continue;
            };
            params += shape.iter().product::<usize>() as u64;
            let permute_heads = match () {
                _ if !arch.permute_qk => None,
                _ if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") => {
                    Some(cfg.num_attention_heads)
                }
                _ if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") => {
                    Some(cfg.num_key_value_heads)
                }
                _ => None,
            };
            entries.push(Entry {
                gguf,
                hf: Some(hf),
                shape,
                permute_heads,
            });
        }
        if !entries.iter().any(|e| e.gguf == "token_embd.weight") {
            bail!(
                "{}: no model.embed_tokens.weight among the weights",
                model_dir.display()
            );
        }
        let rope_freqs = arch::rope_freqs(&cfg, arch);
        if let Some(f) = &rope_freqs {
            entries.push(Entry {
                gguf: "rope_freqs.weight".into(),
                hf: None,
                shape: vec![f.len()],
                permute_heads: None,
            });
        }
        entries.sort_by(|a, b| names::llama_cpp_order(&a.gguf, &b.gguf));
        let tokenizer = tokenizer_metadata(model_dir, cfg.vocab_size)?;
        Ok(GgufPlan {
            cfg,
            arch,
            entries,
            tokenizer,
            name: name.to_string(),
            params,
            rope_freqs,
        })
    }

    /// The stored type of every tensor under `preset`, in file order.
    pub fn tensor_types(&self, preset: Preset) -> Vec<TensorInfo> {
        let tied = !self.entries.iter().any(|e| e.gguf == "output.weight");
        let shape = arch::model_shape(&self.cfg, self.arch, tied);
        self.entries
            .iter()
            .map(|e| {
                let ty = preset::tensor_type(
                    preset,
                    &shape,
                    TensorSlot {
                        name: &e.gguf,
                        shape: &e.shape,
                    },
                );
                TensorInfo::new(e.gguf.clone(), e.shape.clone(), ty)
            })
            .collect()
    }

    /// Writes `dest` for `preset`.
    pub fn write(
        &self,
        source: &dyn TensorSource,
        preset: Preset,
        dest: &Path,
    ) -> Result<WriteStats> {
        let mut stats = self.write_presets(source, &[(preset, dest.to_path_buf())])?;
        Ok(stats.remove(0))
    }

    /// Writes one file per `(preset, dest)` in a single pass over the tensors: each tensor is
    /// read (for an export: merged) and permuted once, then quantized and written for every
    /// preset, so N presets cost one merge. Memory holds one tensor plus one encoding at a time.
    /// Each file's `seconds` is the time spent quantizing and writing it; the shared reading
    /// time is logged once.
    pub fn write_presets(
        &self,
        source: &dyn TensorSource,
        targets: &[(Preset, PathBuf)],
    ) -> Result<Vec<WriteStats>> {
        let mut writers = Vec::with_capacity(targets.len());
        for (preset, dest) in targets {
            let infos = self.tensor_types(*preset);
            let mut metadata =
                arch::model_metadata(&self.cfg, self.arch, *preset, &self.name, self.params);
            metadata.extend(self.tokenizer.iter().cloned());
            let writer = GgufWriter::create(dest, &metadata, infos.clone())?;
            writers.push((writer, infos, 0u64, 0f64));
        }
        let tags: Vec<&str> = targets.iter().map(|(p, _)| p.file_tag()).collect();
        let bar = crate::export::progress::bar(
            self.entries.len() as u64,
            &format!("GGUF {}", tags.join("+")),
        );
        let mut values = 0u64;
        let mut read_seconds = 0f64;
        for (i, entry) in self.entries.iter().enumerate() {
            bar.set_message(entry.gguf.clone());
            let started = Instant::now();
            let mut data = match &entry.hf {
                Some(hf) => source
                    .read_f32(hf)
                    .with_context(|| format!("reading {hf}"))?,
                None => self.rope_freqs.clone().unwrap_or_default(),
            };
            if let Some(heads) = entry.permute_heads {
                data = names::permute_qk(&data, entry.shape[0], heads)
                    .with_context(|| format!("permuting {}", entry.gguf))?;
            }
            read_seconds += started.elapsed().as_secs_f64();
            for (writer, infos, bytes, seconds) in &mut writers {
                let started = Instant::now();
                let info = &infos[i];
                let encoded = quant::quantize_rows(info.ty, &data, info.row_len())
                    .with_context(|| format!("quantizing {} as {}", entry.gguf, info.ty))?;
                writer.write_tensor(&entry.gguf, &encoded)?;
                *bytes += encoded.len() as u64;
                *seconds += started.elapsed().as_secs_f64();
            }
            values += data.len() as u64;
            bar.inc(1);
        }
        bar.finish_and_clear();
        tracing::info!(
            tensors = self.entries.len(),
            seconds = read_seconds,
            presets = tags.join(" "),
            "GGUF tensors read (merged) once for every preset"
        );
        let mut stats = Vec::with_capacity(writers.len());
        for ((writer, _, bytes, seconds), (preset, _)) in writers.into_iter().zip(targets) {
            let started = Instant::now();
            let path = writer.finish()?;
            let seconds = seconds + started.elapsed().as_secs_f64();
            tracing::info!(
                file = %path.display(),
                preset = preset.file_tag(),
                gib = bytes as f64 / (1u64 << 30) as f64,
                seconds,
                mvalues_per_s = values as f64 / 1e6 / seconds.max(1e-9),
                "GGUF written"
            );
            stats.push(WriteStats {
                path,
                bytes,
                values,
                seconds,
            });
        }
        Ok(stats)
    }
}
