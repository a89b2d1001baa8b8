//! The embedded CUDA sources: one module per file, each prefixed with `common.cuh`.

use crate::arch::GpuArch;

/// Helpers shared by every module (bf16 conversion, vector loads, block reductions).
pub const COMMON: &str = include_str!("../cuda/common.cuh");

/// One CUDA source file = one NVRTC program = one loaded module.
#[derive(Debug)]
pub struct KernelSource {
    /// File name under `kernels/cuda/` without `.cu`; also the module's name in the cache.
    pub name: &'static str,
    pub source: &'static str,
    /// The `extern "C" __global__` functions the host launches.
    pub entries: &'static [&'static str],
    /// NVRTC options beyond the common ones ([`compile_options`]).
    pub extra_options: &'static [&'static str],
    /// Stack-frame bytes a function may use on every architecture (by name, as ptxas reports
    /// it); every other function must report no stack frame beyond an accepted spill's.
    pub accepted_stack: &'static [(&'static str, u32)],
    /// Register spills a function may have on one architecture (name, NVRTC target, spill
    /// bytes stored + loaded, the stack frame they take), each justified by a measurement where
    /// it is listed; no other function may spill.
    pub accepted_spill: &'static [AcceptedSpill],
}

/// `(function, NVRTC target, spill bytes stored + loaded, stack-frame bytes)`.
pub type AcceptedSpill = (&'static str, &'static str, u32, u32);

impl KernelSource {
    /// The program text handed to NVRTC; `#line` keeps compiler messages pointing into the
    /// `.cu` file rather than into the concatenation.
    pub fn program(&self) -> String {
        let common = source_override("common.cuh").unwrap_or_else(|| COMMON.to_string());
        let body = source_override(&format!("{}.cu", self.name))
            .unwrap_or_else(|| self.source.to_string());
        format!(
            "#line 1 \"common.cuh\"\n{common}\n#line 1 \"{}.cu\"\n{body}",
            self.name
        )
    }

    /// Whether `$FERROTUNE_KERNEL_SOURCE_DIR` replaces this module's text (or the common header).
    pub fn is_overridden(&self) -> bool {
        source_override("common.cuh").is_some()
            || source_override(&format!("{}.cu", self.name)).is_some()
    }

    fn accepted_spill_entry(&self, function: &str, target: &str) -> Option<&AcceptedSpill> {
        self.accepted_spill
            .iter()
            .find(|(name, arch, ..)| *name == function && *arch == target)
    }

    /// Spill bytes (stores + loads) `function` may have when compiled for `target`.
    pub fn accepted_spill_bytes(&self, function: &str, target: &str) -> u32 {
        self.accepted_spill_entry(function, target)
            .map_or(0, |&(_, _, spill, _)| spill)
    }

    /// Stack-frame bytes `function` may use when compiled for `target`: its `accepted_stack`
    /// entry, or the frame of an accepted spill on that target.
    pub fn accepted_stack_bytes(&self, function: &str, target: &str) -> u32 {
        let plain = self
            .accepted_stack
            .iter()
            .find(|(name, _)| *name == function)
            .map_or(0, |(_, bytes)| *bytes);
        let spill = self
            .accepted_spill_entry(function, target)
            .map_or(0, |&(_, _, _, stack)| stack);
        plain.max(spill)
    }
}

/// Kernel development only: when `$FERROTUNE_KERNEL_SOURCE_DIR` names a directory, a file
/// there with a module's name (`attention.cu`, `common.cuh`) replaces the embedded text, so a
/// kernel variant can be timed on a GPU machine without rebuilding the host. The disk cache
/// key hashes the program text, so variants never collide with the embedded kernels.
pub const SOURCE_DIR_ENV: &str = "FERROTUNE_KERNEL_SOURCE_DIR";

fn source_override(file: &str) -> Option<String> {
    let dir = std::env::var_os(SOURCE_DIR_ENV)?;
    std::fs::read_to_string(std::path::Path::new(&dir).join(file)).ok()
}

pub const RMSNORM: KernelSource = KernelSource {
    name: "rmsnorm",
    source: include_str!("../cuda/rmsnorm.cu"),
    entries: &["rmsnorm_fwd", "rmsnorm_bwd"],
    extra_options: &[],
    accepted_stack: &[],
    accepted_spill: &[],
};

pub const ROPE: KernelSource = KernelSource {
    name: "rope",
    source: include_str!("../cuda/rope.cu"),
    entries: &["rope_cos_sin", "rope_apply", "rope_dq_convert"],
    extra_options: &[],
    // sincosf's Payne-Hanek reduction for |angle| > 105615 keeps a small array on the stack;
    // it runs once per batch over [tokens, head_dim/2], never in the per-layer path.
    accepted_stack: &[("rope_cos_sin", 32)],
    accepted_spill: &[],
};

pub const SWIGLU: KernelSource = KernelSource {
    name: "swiglu",
    source: include_str!("../cuda/swiglu.cu"),
    entries: &[
        "swiglu_fwd",
        "swiglu_bwd",
        "swiglu_lora_bwd_r16",
        "swiglu_lora_bwd_r32",
        "swiglu_lora_bwd_r64",
        "lora_tdb_r16",
        "lora_tdb_r32",
        "lora_tdb_r64",
        "lora_t_store",
    ],
    extra_options: &[],
    accepted_stack: &[],
    accepted_spill: &[],
};

pub const CROSS_ENTROPY: KernelSource = KernelSource {
    name: "cross_entropy",
    source: include_str!("../cuda/cross_entropy.cu"),
    entries: &["ce_stats", "ce_grad"],
    extra_options: &[],
    accepted_stack: &[],
    accepted_spill: &[],
};

pub const ADAMW: KernelSource = KernelSource {
    name: "adamw",
    source: include_str!("../cuda/adamw.cu"),
    entries: &["adamw_fp32", "adamw_8bit"],
    // Bitwise agreement with the plain-Rust optimizers (see the top of adamw.cu).
    extra_options: &["--fmad=false"],
    accepted_stack: &[],
    accepted_spill: &[],
};

pub const REDUCE: KernelSource = KernelSource {
    name: "reduce",
    source: include_str!("../cuda/reduce.cu"),
    entries: &[
        "reduce_partial",
        "reduce_final",
        "grad_norm_final",
        "add_blocks_f32",
    ],
    extra_options: &[],
    accepted_stack: &[],
    accepted_spill: &[],
};

pub const NF4: KernelSource = KernelSource {
    name: "nf4",
    source: include_str!("../cuda/nf4.cu"),
    entries: &[
        "nf4_quantize",
        "nf4_dequantize",
        "nf4_dequantize_dq",
        "quantize_blockwise_8bit",
    ],
    extra_options: &[],
    accepted_stack: &[],
    accepted_spill: &[],
};

pub const DROPOUT: KernelSource = KernelSource {
    name: "dropout",
    source: include_str!("../cuda/dropout.cu"),
    entries: &["dropout_apply"],
    extra_options: &[],
    accepted_stack: &[],
    accepted_spill: &[],
};

pub const EMBEDDING: KernelSource = KernelSource {
    name: "embedding",
    source: include_str!("../cuda/embedding.cu"),
    entries: &["embedding_gather", "copy_rows", "copy_rows_batch"],
    extra_options: &[],
    accepted_stack: &[],
    accepted_spill: &[],
};

pub const ATTENTION: KernelSource = KernelSource {
    name: "attention",
    source: include_str!("../cuda/attention.cu"),
    entries: &[
        "flash_seg_blocks",
        "flash_fwd_d64",
        "flash_fwd_d128",
        "flash_fwd_d64_sm90",
        "flash_fwd_d128_sm90",
        "flash_bwd_prep",
        "flash_bwd_d64",
        "flash_bwd_d128",
        "flash_bwd_d64_sm90",
        "flash_bwd_d128_sm90",
        "flash_dq_convert",
    ],
    extra_options: &[],
    accepted_stack: &[],
    // Hopper's d 128 forward at 4 CTAs per SM (128 registers): 6% faster than 3 CTAs without
    // spills (docs/perf-notes.md §33). Its stack frame is the spill slot.
    accepted_spill: &[("flash_fwd_d128_sm90", "sm_90a", 16, 8)],
};

/// Every module, in load order.
pub const ALL: &[&KernelSource] = &[
    &RMSNORM,
    &ROPE,
    &SWIGLU,
    &CROSS_ENTROPY,
    &ADAMW,
    &REDUCE,
    &NF4,
    &DROPOUT,
    &EMBEDDING,
    &ATTENTION,
];

/// The NVRTC options for `source` on `arch`. `-Xptxas -v` makes the program log carry ptxas's
/// resource report (registers, stack frame, spills), which the CI test checks.
pub fn compile_options(source: &KernelSource, arch: GpuArch) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture={}", arch.nvrtc_target()),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    options.extend(source.extra_options.iter().map(|o| o.to_string()));
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_is_an_extern_c_kernel_of_its_file_and_every_kernel_is_listed() {
        for src in ALL {
            let declared: Vec<&str> = src
                .source
                .split("extern \"C\" __global__ void")
                .skip(1)
                .map(|rest| {
                    let rest = rest.trim_start();
                    let rest = rest
                        .strip_prefix("__launch_bounds__")
                        .map_or(rest, |r| r.split_once(')').expect("launch bounds close").1);
                    rest.trim_start().split('(').next().unwrap().trim()
                })
                .collect();
            let mut listed = src.entries.to_vec();
            listed.sort();
            let mut found = declared.clone();
            found.sort();
            assert_eq!(found, listed, "kernels of {}.cu", src.name);
        }
    }

    #[test]
    fn names_are_unique_and_programs_start_with_the_common_header() {
        let mut names: Vec<&str> = ALL.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        assert!(RMSNORM.program().contains("bf16_to_f32"));
        assert!(RMSNORM.program().contains("#line 1 \"rmsnorm.cu\""));
    }

    #[test]
    fn a_file_in_the_source_dir_replaces_only_its_own_module() {
        // A module name no other test compiles, so the process-wide variable cannot leak.
        const PROBE: KernelSource = KernelSource {
            name: "override_probe",
            source: "embedded body",
            entries: &[],
            extra_options: &[],
            accepted_stack: &[],
            accepted_spill: &[],
        };
        let dir = std::env::temp_dir().join(format!("ft-kernel-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("override_probe.cu"), "variant body").unwrap();
        std::env::set_var(SOURCE_DIR_ENV, &dir);
        let program = PROBE.program();
        std::env::remove_var(SOURCE_DIR_ENV);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(program.contains("variant body") && !program.contains("embedded body"));
        assert!(!PROBE.is_overridden(), "the variable is unset again");
        assert!(program.contains("bf16_to_f32"), "common.cuh stays embedded");
    }
}
