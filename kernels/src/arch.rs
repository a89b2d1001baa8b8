//! Which GPU architecture NVRTC compiles for.

use std::fmt;

/// A compute capability, e.g. 9.0 for H100/H200, 8.9 for RTX 40, 8.6 for RTX 30, 8.0 for A100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GpuArch {
    pub major: u32,
    pub minor: u32,
}

/// The architectures CI compiles every kernel for (the cards the product runs on).
pub const CI_TARGETS: [GpuArch; 4] = [
    GpuArch::new(8, 0),
    GpuArch::new(8, 6),
    GpuArch::new(8, 9),
    GpuArch::new(9, 0),
];

/// Oldest supported architecture: the kernels use bf16 conversion instructions of sm_80.
pub const MIN_ARCH: GpuArch = GpuArch::new(8, 0);

impl GpuArch {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// NVRTC's `--gpu-architecture` value. Hopper (9.0) gets the architecture-specific
    /// `sm_90a`, which enables wgmma/setmaxnreg; the cubin then runs only on 9.0 devices,
    /// which is what the exact-capability compile wants anyway.
    pub fn nvrtc_target(&self) -> String {
        if self.major == 9 && self.minor == 0 {
            "sm_90a".to_string()
        } else {
            format!("sm_{}{}", self.major, self.minor)
        }
    }

    /// Whether NVRTC's target for this GPU has Hopper's warpgroup MMAs (`sm_90a`), which the
    /// kernels' `FA_WGMMA` paths use.
    pub fn has_wgmma(&self) -> bool {
        self.nvrtc_target() == "sm_90a"
    }

    /// `sm_90`, `sm_90a`, `sm_86`, `9.0`, `8.6` or `90`, `86`: the spellings of nvcc, NVRTC and
    /// `nvidia-smi --query-gpu=compute_cap`.
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim();
        let t = t.strip_prefix("sm_").unwrap_or(t);
        let t = t.strip_suffix('a').unwrap_or(t);
        let (major, minor) = match t.split_once('.') {
            Some((major, minor)) => (major.parse().ok()?, minor.parse().ok()?),
            None if t.len() >= 2 && t.bytes().all(|b| b.is_ascii_digit()) => {
                let (major, minor) = t.split_at(t.len() - 1);
                (major.parse().ok()?, minor.parse().ok()?)
            }
            None => return None,
        };
        (minor < 10).then_some(GpuArch::new(major, minor))
    }

    pub fn is_supported(&self) -> bool {
        (self.major, self.minor) >= (MIN_ARCH.major, MIN_ARCH.minor)
    }
}

impl fmt::Display for GpuArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.nvrtc_target())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_usual_spelling_parses_and_others_do_not() {
        for (text, want) in [
            ("sm_90", (9, 0)),
            ("sm_90a", (9, 0)),
            ("9.0", (9, 0)),
            ("90", (9, 0)),
            ("sm_86", (8, 6)),
            ("8.9", (8, 9)),
            ("sm_120", (12, 0)),
            (" 80 ", (8, 0)),
        ] {
            assert_eq!(
                GpuArch::parse(text),
                Some(GpuArch::new(want.0, want.1)),
                "{text}"
            );
        }
        for bad in ["", "sm_", "9", "ampere", "9.x", "9.10", "sm_9o"] {
            assert_eq!(GpuArch::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn hopper_gets_the_arch_specific_target_others_plain_sm() {
        let names: Vec<String> = CI_TARGETS.iter().map(|a| a.nvrtc_target()).collect();
        assert_eq!(names, ["sm_80", "sm_86", "sm_89", "sm_90a"]);
        assert_eq!(GpuArch::new(12, 0).nvrtc_target(), "sm_120");
        assert!(!GpuArch::new(7, 5).is_supported());
        assert!(GpuArch::new(8, 0).is_supported());
        assert!(GpuArch::new(9, 0).has_wgmma() && !GpuArch::new(8, 9).has_wgmma());
    }
}
