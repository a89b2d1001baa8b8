//! Base models: where `--model_name` lives (`resolve`), what architecture it is (`config`), its
//! frozen weights (`weights`), and random model directories for tests and the demo (`tiny`).

pub mod bnb4;
pub mod config;
pub mod gguf_base;
pub mod resolve;
pub mod tiny;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

pub use config::{ModelConfig, RopeScaling, SUPPORTED_MODEL_TYPES};
pub use weights::Weights;

/// A base model loaded into host memory: architecture plus frozen f32 weights.
#[derive(Debug)]
pub struct Model {
    /// The directory it was read from (tokenizer files live next to the weights).
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weights: Weights,
}

impl Model {
    /// Resolves `--model_name` (directory, HF cache id, ModelScope id) and loads it.
    pub fn from_model_name(model_name: &str) -> Result<Self> {
        let path = resolve::resolve_model(model_name)?;
        Self::load(&path)
    }

    /// Loads `config.json` and the safetensors weights of a model directory.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_file() {
            bail!(
                "{}: a file; a GGUF base model is read through --model_name (which dequantises it \
                 into a model directory once), other files are not models",
                path.display()
            );
        }
        let config = ModelConfig::from_dir(path)?;
        let weights = Weights::load(path)?;
        Ok(Model {
            dir: path.to_path_buf(),
            config,
            weights,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::tiny::{write_random_model, TinySpec};
    use super::*;
    use candle_core::DType;

    #[test]
    fn sharded_bf16_model_loads_like_the_single_file_f32_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (one, sharded) = (tmp.path().join("one"), tmp.path().join("sharded"));
        let spec = TinySpec::default();
        write_random_model(&one, &spec, 7).unwrap();
        let shard_spec = TinySpec {
            shards: 3,
            dtype: DType::BF16,
            ..spec
        };
        write_random_model(&sharded, &shard_spec, 7).unwrap();
        assert!(sharded.join("model.safetensors.index.json").is_file());
        assert!(sharded.join("model-00003-of-00003.safetensors").is_file());

        let a = Model::load(&one).unwrap();
        let b = Model::load(&sharded).unwrap();
        assert_eq!(a.config, b.config);
        assert_eq!(a.weights.numel(), b.weights.numel());
        let name = "model.layers.1.mlp.down_proj.weight";
        let shape = [64, 96];
        let x = a.weights.get(name, &shape).unwrap();
        let y = b.weights.get(name, &shape).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        // bf16 keeps 8 bits of mantissa: the values agree to bf16 rounding.
        let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 2e-3);
        let err = a.weights.get(name, &[96, 64]).unwrap_err().to_string();
        assert!(err.contains("shape"), "{err}");
    }

    #[test]
    fn corrupt_or_missing_weights_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        write_random_model(tmp.path(), &TinySpec::default(), 1).unwrap();
        let file = tmp.path().join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        let err = format!("{:#}", Model::load(tmp.path()).unwrap_err());
        assert!(
            err.contains("model.safetensors") && err.contains("not a valid safetensors"),
            "{err}"
        );
        std::fs::remove_file(&file).unwrap();
        let err = format!("{:#}", Model::load(tmp.path()).unwrap_err());
        assert!(err.contains("no model.safetensors"), "{err}");
        std::fs::write(tmp.path().join("config.json"), r#"{"model_type":"bert"}"#).unwrap();
        let err = format!("{:#}", Model::load(tmp.path()).unwrap_err());
        assert!(err.contains("\"bert\" is not supported"), "{err}");
    }
}
