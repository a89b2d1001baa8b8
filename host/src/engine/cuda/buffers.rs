//! Activation and workspace buffers, allocated once per `(batch, seq)` shape and reused by every
//! step: nothing is allocated inside a training step.
//!
//! Without gradient checkpointing every layer keeps its [`LayerActs`]; with it, one set is
//! shared and each layer's is recomputed from its input (the `xs`, kept for every layer in both
//! modes) just before the layer's backward.

use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use ferrotune_kernels::device::{bf16, CrossEntropyRows, FlashShape, REDUCE_PARTS};

use super::attention::Scratch;
use super::offload::Offload;
use crate::model::ModelConfig;

/// What one layer's backward needs from its forward.
///
/// The normalised inputs of the attention and MLP halves are not kept: the backward recomputes
/// them from `x`/`h` (one memory-bound RMSNorm each) into [`Buffers::norm`], which saves
/// `2·N·hidden` bf16 per layer (2 GiB on Llama-3-8B at 2×2048).
pub struct LayerActs {
    pub rstd1: CudaSlice<f32>,
    /// Post-RoPE q `[N, H·d]`, k `[N, Hkv·d]`, and v.
    pub q: CudaSlice<bf16>,
    pub k: CudaSlice<bf16>,
    pub v: CudaSlice<bf16>,
    /// Attention output (o_proj input) `[N, H·d]`.
    pub attn: CudaSlice<bf16>,
    /// Logsumexp of each query's attention scores `[B, H, T]` fp32 (the attention backward
    /// recomputes the probabilities from it).
    pub lse: CudaSlice<f32>,
    /// Residual after attention `[N, hidden]`.
    pub h: CudaSlice<bf16>,
    pub rstd2: CudaSlice<f32>,
    /// `[N, intermediate]`; the backward overwrites them with their gradients.
    pub gate: CudaSlice<bf16>,
    pub up: CudaSlice<bf16>,
    /// `x·Aᵀ` of each projection, `[7, N, r]`.
    pub low: CudaSlice<bf16>,
}

impl LayerActs {
    fn new(stream: &Arc<CudaStream>, s: &Sizes) -> Result<Self> {
        let n = s.tokens;
        Ok(LayerActs {
            rstd1: stream.alloc_zeros(n)?,
            q: stream.alloc_zeros(n * s.qd)?,
            k: stream.alloc_zeros(n * s.kvd)?,
            v: stream.alloc_zeros(n * s.kvd)?,
            attn: stream.alloc_zeros(n * s.qd)?,
            lse: stream.alloc_zeros(n * (s.qd / s.head_dim))?,
            h: stream.alloc_zeros(n * s.hidden)?,
            rstd2: stream.alloc_zeros(n)?,
            gate: stream.alloc_zeros(n * s.inter)?,
            up: stream.alloc_zeros(n * s.inter)?,
            low: stream.alloc_zeros(7 * n * s.rank.max(1))?,
        })
    }

    /// Address of projection `j`'s `x·Aᵀ`.
    pub fn low(&self, stream: &CudaStream, j: usize, tokens: usize, rank: usize) -> u64 {
        self.low.device_ptr(stream).0 + (2 * j * tokens * rank) as u64
    }
}

/// Sizes derived from the model and the batch shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizes {
    pub batch: usize,
    pub seq: usize,
    pub tokens: usize,
    pub hidden: usize,
    pub qd: usize,
    pub kvd: usize,
    pub inter: usize,
    pub vocab: usize,
    pub rank: usize,
    pub head_dim: usize,
    /// Rows of logits per LM-head chunk.
    pub ce_rows: usize,
}

/// Upper bound on bf16 logits alive at once (128 MiB): the LM head runs in row chunks so the
/// full `[N, V]` logits never exist.
const CHUNK_LOGITS: usize = 64 << 20;

/// Rows per LM-head chunk: as many as [`CHUNK_LOGITS`] allows, rounded down to a multiple of
/// 128 (the GEMMs' row tile) when there are that many, so no chunk ends in a mostly empty tile
/// (Llama-3's 128,256-word vocabulary: 512 rows instead of 523).
fn lm_head_rows(vocab: usize) -> usize {
    let rows = CHUNK_LOGITS / vocab;
    if rows >= 128 {
        rows / 128 * 128
    } else {
        rows
    }
}

impl Sizes {
    pub fn new(cfg: &ModelConfig, batch: usize, seq: usize, rank: usize) -> Self {
        let tokens = batch * seq;
        Sizes {
            batch,
            seq,
            tokens,
            hidden: cfg.hidden_size,
            qd: cfg.num_attention_heads * cfg.head_dim,
            kvd: cfg.num_key_value_heads * cfg.head_dim,
            inter: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            rank,
            head_dim: cfg.head_dim,
            ce_rows: lm_head_rows(cfg.vocab_size).clamp(1, tokens),
        }
    }
}

pub struct Buffers {
    pub sizes: Sizes,
    pub ids: CudaSlice<u32>,
    pub positions: CudaSlice<u32>,
    pub segments: CudaSlice<u32>,
    pub targets: CudaSlice<i32>,
    /// RoPE tables `[N, d/2]`, once per pass.
    pub cos: CudaSlice<f32>,
    pub sin: CudaSlice<f32>,
    /// Residual stream: layer `l`'s input is `xs[x_index(l)]`, the last layer's output
    /// `xs[x_index(L)]`; `L + 1` buffers, or 2 used in turn when the inputs are offloaded.
    pub xs: Vec<CudaSlice<bf16>>,
    xs_take_turns: bool,
    /// `--use_gradient_checkpointing unsloth`: layer activations parked in pinned host memory
    /// (set up by the engine once the activation buffers exist).
    pub offload: Option<Offload>,
    /// One per layer, or one shared with gradient checkpointing.
    pub acts: Vec<LayerActs>,
    /// RMSNorm output of the half being computed `[N, hidden]` (forward and recompute); room
    /// for `[N, r + hidden + r]`, the MLP's layout with its gate/up adapters folded.
    pub norm: CudaSlice<bf16>,
    /// Scratch that four users take in turn, never two at once (one allocation instead of
    /// four): during a layer's MLP, `act` = `[0, N·I)` (the SwiGLU output, down_proj's input,
    /// recomputed in backward) and `d_act` = `[N·I, 2·N·I)` (its gradient); during the loss,
    /// the LM head's logits chunk `[0, ce_rows·V)`; during a layer's attention backward (after
    /// its MLP backward), the fp32 dQ accumulator over the `act` half when it fits there
    /// ([`Scratch`]). 192 MiB less at Llama-3-8B, 2 × 2048.
    pub mlp: CudaSlice<bf16>,
    /// Attention workspace (segment block classes, backward delta, dQ accumulator when `mlp`
    /// cannot hold it).
    pub attn: Scratch,
    pub hn: CudaSlice<bf16>,
    pub rstd_f: CudaSlice<f32>,
    pub ce: CrossEntropyRows,
    pub losses: CudaSlice<f32>,
    pub loss_sum: CudaSlice<f32>,
    pub partials: CudaSlice<f32>,
    // Backward.
    /// Gradient of the residual stream, updated in place layer by layer; room for `[N, hidden
    /// + r]`, `r` spare columns for the folded o/down input gradients.
    pub dres: CudaSlice<bf16>,
    /// Gradient of a norm output `[N, hidden]`.
    pub dn: CudaSlice<bf16>,
    pub d_attn: CudaSlice<bf16>,
    pub dq: CudaSlice<bf16>,
    pub dk: CudaSlice<bf16>,
    pub dv: CudaSlice<bf16>,
    /// `dy·B` of the projection being differentiated `[N, r]`.
    pub t: CudaSlice<bf16>,
    /// fp32 `[N, 2r]`, zero between uses: the fused kernels' `t` sums — gate's and up's in the
    /// SwiGLU backward (`super::swiglu_lora`), one projection's in `Linear::backward`.
    pub t_acc: CudaSlice<f32>,
}

impl Buffers {
    /// `offload`: two `xs` buffers taking turns instead of one per layer.
    pub fn new(
        stream: &Arc<CudaStream>,
        s: Sizes,
        layers: usize,
        keep_all: bool,
        offload: bool,
        dims: &FlashShape,
    ) -> Result<Self> {
        let n = s.tokens;
        let z16 = |len: usize| -> Result<CudaSlice<bf16>> { Ok(stream.alloc_zeros(len)?) };
        let acts = (0..if keep_all { layers } else { 1 })
            .map(|_| LayerActs::new(stream, &s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Buffers {
            ids: stream.alloc_zeros(n)?,
            positions: stream.alloc_zeros(n)?,
            segments: stream.alloc_zeros(n)?,
            targets: stream.alloc_zeros(n)?,
            cos: stream.alloc_zeros(n * s.head_dim / 2)?,
            sin: stream.alloc_zeros(n * s.head_dim / 2)?,
            xs: (0..if offload { 2 } else { layers + 1 })
                .map(|_| z16(n * s.hidden))
                .collect::<Result<_>>()?,
            xs_take_turns: offload,
            offload: None,
            acts,
            norm: z16(n * (s.hidden + 2 * s.rank))?,
            mlp: z16((2 * n * s.inter).max(s.ce_rows * s.vocab))?,
            // fp32 [N, H·d] in the bf16 [N, I] act half: 4·qd ≤ 2·inter bytes per token.
            attn: Scratch::new(stream, dims, 2 * s.qd > s.inter)?,
            hn: z16(n * s.hidden)?,
            rstd_f: stream.alloc_zeros(n)?,
            ce: CrossEntropyRows::new(stream, s.ce_rows)?,
            losses: stream.alloc_zeros(n)?,
            loss_sum: stream.alloc_zeros(1)?,
            partials: stream.alloc_zeros(REDUCE_PARTS)?,
            dres: z16(n * (s.hidden + s.rank))?,
            dn: z16(n * s.hidden)?,
            d_attn: z16(n * s.qd)?,
            dq: z16(n * s.qd)?,
            dk: z16(n * s.kvd)?,
            dv: z16(n * s.kvd)?,
            // Up to three adapters' t's side by side (the stacked q/k/v).
            t: z16(3 * n * s.rank.max(1))?,
            t_acc: stream.alloc_zeros(2 * n * s.rank.max(1))?,
            sizes: s,
        })
    }
}

impl Buffers {
    /// Which `xs` buffer holds layer `l`'s input.
    pub fn x_index(&self, l: usize) -> usize {
        if self.xs_take_turns {
            l % 2
        } else {
            l
        }
    }
}
