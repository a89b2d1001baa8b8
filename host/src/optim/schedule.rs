//! Learning-rate schedules with transformers' formulas (`transformers.optimization`). The lr of
//! optimizer step `s` (0-based: the first step is `s = 0`) is `base_lr · factor(s)`, exactly as
//! transformers' `LambdaLR` gives it, so a warm-up's first step runs at lr 0.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use crate::cli::choices::SchedulerKind;

/// transformers' `polynomial` defaults: `lr_end = 1e-7`, `power = 1.0`.
pub const POLYNOMIAL_LR_END: f64 = 1e-7;
pub const POLYNOMIAL_POWER: f64 = 1.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: SchedulerKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

/// transformers' `get_warmup_steps`: `--warmup_steps` when > 0, else ⌈total · warmup_ratio⌉.
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total_steps: u64) -> u64 {
    if warmup_steps > 0 {
        warmup_steps as u64
    } else {
        (total_steps as f64 * warmup_ratio).ceil() as u64
    }
}

impl Schedule {
    pub fn new(kind: SchedulerKind, base_lr: f64, warmup_steps: u64, total_steps: u64) -> Self {
        Self {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        let warming = step < self.warmup_steps;
        let warm = s / w.max(1.0);
        // Share of the post-warm-up steps done; transformers guards the division with max(1, ·).
        let progress = (s - w) / (t - w).max(1.0);
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::ConstantWithWarmup => {
                if warming {
                    warm
                } else {
                    1.0
                }
            }
            SchedulerKind::Linear => {
                if warming {
                    warm
                } else {
                    ((t - s) / (t - w).max(1.0)).max(0.0)
                }
            }
            SchedulerKind::Cosine => {
                if warming {
                    warm
                } else {
                    // num_cycles = 0.5: half a cosine from 1 down to 0.
                    (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
                }
            }
            SchedulerKind::CosineWithRestarts => {
                if warming {
                    warm
                } else if progress >= 1.0 {
                    0.0
                } else {
                    // num_cycles = 1 hard restart: one cosine over the whole post-warm-up run.
                    (0.5 * (1.0 + (PI * ((1.0 * progress) % 1.0)).cos())).max(0.0)
                }
            }
            SchedulerKind::Polynomial => {
                let lr_init = self.base_lr;
                let lr_end = POLYNOMIAL_LR_END;
                if warming {
                    warm
                } else if s > t {
                    lr_end / lr_init
                } else {
                    let decay_steps = t - w;
                    let remaining = 1.0 - (s - w) / decay_steps;
                    ((lr_init - lr_end) * remaining.powf(POLYNOMIAL_POWER) + lr_end) / lr_init
                }
            }
        }
    }

    /// transformers refuses a polynomial decay whose end lr is not below the start.
    pub fn validate(&self) -> Result<(), String> {
        if self.kind == SchedulerKind::Polynomial && self.base_lr <= POLYNOMIAL_LR_END {
            return Err(format!(
                "--lr_scheduler_type polynomial decays to {POLYNOMIAL_LR_END}; \
                 --learning_rate {} must be larger",
                self.base_lr
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    /// Reference values written out by hand from transformers' lambdas for total 10, warm-up 2.
    #[test]
    fn each_schedule_matches_transformers_formulas() {
        let lr = 1.0;
        let cases: &[(SchedulerKind, &[f64])] = &[
            (
                SchedulerKind::Linear,
                &[
                    0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0,
                ],
            ),
            (SchedulerKind::Constant, &[1.0; 12]),
            (
                SchedulerKind::ConstantWithWarmup,
                &[0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            ),
        ];
        for (kind, expected) in cases {
            let s = Schedule::new(*kind, lr, 2, 10);
            for (step, want) in expected.iter().enumerate() {
                assert!(
                    close(s.lr(step as u64), *want),
                    "{kind} step {step}: {} vs {want}",
                    s.lr(step as u64)
                );
            }
        }
        let cos = Schedule::new(SchedulerKind::Cosine, 2.0, 2, 10);
        assert!(close(cos.lr(1), 1.0));
        assert!(close(cos.lr(2), 2.0));
        assert!(close(cos.lr(6), 1.0)); // halfway: cos(π/2) = 0 → ½
        assert!(close(cos.lr(4), 2.0 * 0.5 * (1.0 + (PI * 0.25).cos())));
        assert!(cos.lr(10).abs() < 1e-15);
        let restarts = Schedule::new(SchedulerKind::CosineWithRestarts, 1.0, 0, 8);
        assert!(close(restarts.lr(0), 1.0));
        assert!(close(restarts.lr(4), 0.5));
        assert_eq!(restarts.lr(8), 0.0);
        let poly = Schedule::new(SchedulerKind::Polynomial, 1e-3, 2, 10);
        assert!(close(poly.lr(1), 0.5e-3));
        assert!(close(poly.lr(2), 1e-3));
        assert!(close(poly.lr(6), (1e-3 - 1e-7) * 0.5 + 1e-7));
        assert!(close(poly.lr(10), 1e-7));
        assert!(close(poly.lr(11), 1e-7));
    }

    #[test]
    fn warmup_ratio_is_used_only_without_warmup_steps() {
        assert_eq!(warmup_steps(5, 0.5, 100), 5);
        assert_eq!(warmup_steps(0, 0.03, 100), 3);
        assert_eq!(warmup_steps(0, 0.031, 100), 4);
        assert_eq!(warmup_steps(0, 0.0, 100), 0);
    }

    #[test]
    fn polynomial_needs_lr_above_its_end() {
        assert!(Schedule::new(SchedulerKind::Polynomial, 1e-8, 0, 10)
            .validate()
            .is_err());
        assert!(Schedule::new(SchedulerKind::Linear, 1e-8, 0, 10)
            .validate()
            .is_ok());
    }
}
