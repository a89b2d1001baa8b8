//! Per-batch-shape buffers of the features beyond the plain Llama step: LoRA dropout's scratch,
//! the ones vector of bias gradients, and Qwen3's pre-norm q/k. Allocated only when the model
//! and options use them, next to (and reallocated with) the main [`super::buffers::Buffers`].

use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::{CudaSlice, CudaStream};
use ferrotune_kernels::device::bf16;

use super::buffers::Sizes;

/// Qwen3's q/k RMSNorm (per head, over head_dim): what its backward needs.
pub struct QkActs {
    /// Pre-norm q `[N, H·d]` and k `[N, Hkv·d]` (the projections' outputs).
    pub q_raw: CudaSlice<bf16>,
    pub k_raw: CudaSlice<bf16>,
    /// rstd per (token, head).
    pub rstd_q: CudaSlice<f32>,
    pub rstd_k: CudaSlice<f32>,
}

pub struct Extras {
    /// `[N, widest projection input]` (hidden, intermediate, or heads·head_dim for o_proj): a
    /// projection's dropped adapter input, or the masked input gradient of its adapter.
    pub dropout: Option<CudaSlice<bf16>>,
    /// `N` ones: a trainable bias's gradient is the GEMM `ones·dy`.
    pub ones: Option<CudaSlice<bf16>>,
    /// One per layer, or one shared with gradient checkpointing (as `Buffers::acts`).
    pub qk: Vec<QkActs>,
    /// Gradients of the pre-norm q/k (one set, reused by every layer's backward).
    pub dq_raw: Option<CudaSlice<bf16>>,
    pub dk_raw: Option<CudaSlice<bf16>>,
}

/// Which extras a model/options combination needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub dropout: bool,
    pub bias_grads: bool,
    pub qk_norm: bool,
}

impl Extras {
    pub fn new(
        stream: &Arc<CudaStream>,
        s: &Sizes,
        heads: (usize, usize),
        slots: usize,
        needs: Needs,
    ) -> Result<Self> {
        let n = s.tokens;
        let z16 = |len: usize| -> Result<CudaSlice<bf16>> { Ok(stream.alloc_zeros(len)?) };
        let qk = if needs.qk_norm {
            (0..slots)
                .map(|_| {
                    Ok(QkActs {
                        q_raw: z16(n * s.qd)?,
                        k_raw: z16(n * s.kvd)?,
                        rstd_q: stream.alloc_zeros(n * heads.0)?,
                        rstd_k: stream.alloc_zeros(n * heads.1)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let ones = if needs.bias_grads {
            Some(stream.clone_htod(&vec![bf16::ONE; n])?)
        } else {
            None
        };
        Ok(Extras {
            dropout: if needs.dropout {
                Some(z16(n * s.hidden.max(s.inter).max(s.qd))?)
            } else {
                None
            },
            ones,
            dq_raw: if needs.qk_norm {
                Some(z16(n * s.qd)?)
            } else {
                None
            },
            dk_raw: if needs.qk_norm {
                Some(z16(n * s.kvd)?)
            } else {
                None
            },
            qk,
        })
    }
}
