//! Closed sets of flag values. Each name is spelled exactly as on the command line, in `--dry_run`
//! output and in `--config` files.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Declares a flag-value enum whose command-line, JSON and YAML spellings are the same string.
macro_rules! choice {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
        pub enum $name {
            $(#[value(name = $text)] #[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice!(
    /// Where training runs.
    Device { Auto = "auto", Cpu = "cpu", Cuda = "cuda" }
);
choice!(
    /// Which biases are trainable (PEFT's `bias`).
    Bias { None = "none", All = "all", LoraOnly = "lora_only" }
);
choice!(
    /// Activation checkpointing mode (Unsloth's `use_gradient_checkpointing`).
    GradientCheckpointing { Unsloth = "unsloth", True = "true", False = "false" }
);
choice!(
    /// Optimizer (transformers' `optim` names).
    Optim {
        Adamw8bit = "adamw_8bit",
        AdamwTorch = "adamw_torch",
        AdamwTorchFused = "adamw_torch_fused",
        Adamw = "adamw",
        PagedAdamw8bit = "paged_adamw_8bit",
        Sgd = "sgd",
    }
);
choice!(
    /// Learning-rate schedule (transformers' `lr_scheduler_type` names).
    SchedulerKind {
        Linear = "linear",
        Cosine = "cosine",
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
        Polynomial = "polynomial",
        CosineWithRestarts = "cosine_with_restarts",
    }
);
choice!(
    /// Log line format.
    LogFormat { Text = "text", Json = "json" }
);
choice!(
    /// When checkpoints are written.
    SaveStrategy { No = "no", Steps = "steps", Epoch = "epoch" }
);
choice!(
    /// What `--save_model` writes.
    SaveMethod { Merged16bit = "merged_16bit", Merged4bit = "merged_4bit", Lora = "lora" }
);
choice!(
    /// What happens to a row the formatter rejects.
    OnBadRow { Fail = "fail", Skip = "skip" }
);
choice!(
    /// Plugin kinds, one WIT world each (`ferrotune plugin new --kind`).
    PluginKind { Formatter = "formatter", Sync = "sync", Storage = "storage", Publish = "publish" }
);
choice!(
    /// Storage dtype of the frozen weights (`--dtype`; unset means auto).
    Dtype { F16 = "float16", Bf16 = "bfloat16", F32 = "float32" }
);

impl Dtype {
    /// Parses `--dtype`: the names unsloth-cli accepts plus common short forms; `None`/`auto` → auto.
    pub fn parse_flag(text: &str) -> Result<Option<Dtype>, String> {
        match text.to_ascii_lowercase().as_str() {
            "none" | "auto" | "" => Ok(None),
            "float16" | "f16" | "fp16" | "half" => Ok(Some(Dtype::F16)),
            "bfloat16" | "bf16" => Ok(Some(Dtype::Bf16)),
            "float32" | "f32" | "fp32" | "float" => Ok(Some(Dtype::F32)),
            _ => Err(format!(
                "--dtype {text:?} is not a dtype; use float16, bfloat16, float32 or None (auto)"
            )),
        }
    }
}
