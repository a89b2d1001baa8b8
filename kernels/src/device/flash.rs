//! Launchers of the fused causal GQA attention (`cuda/attention.cu`, FlashAttention-2 style).
//!
//! Forward: [`Kernels::flash_seg_blocks`] classifies the 64-token blocks of each row by packed
//! segment once per batch (the attention kernels skip the key blocks of other samples), then
//! [`Kernels::flash_attn_fwd`] writes O and the per-(row, head) logsumexp. Backward:
//! [`Kernels::flash_attn_bwd`] runs the three kernels (delta = rowsum(dO ⊙ O) and dQ-accumulator
//! reset; dK/dV per key block with dQ by fp32 atomics; dQ to bf16) from O and the logsumexp —
//! it never needs the forward's scores. On Hopper (sm_90a) the forward loads its tiles by TMA
//! (`flash_fwd_d{64,128}_sm90`) and the backward runs on warpgroup MMAs in CTAs of one
//! warpgroup, several per SM, loading by TMA too (`flash_bwd_d{64,128}_sm90`);
//! [`FlashBwdKernel`] names the backward's choices.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaFunction, CudaStream, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::tma::{tile_map, BwdMaps, FwdMaps};
use super::{aligned16, bf16, check_len, grid, launch, shape, to_i32, Kernels, THREADS};
use crate::arch::GpuArch;
use crate::KernelError;

/// Queries per query block = keys per key block of every attention kernel (FA_BLOCK).
pub const FLASH_BLOCK: usize = 64;
/// Largest head dimension the kernels take (tiles are 64 or 128 wide; d is zero-padded).
pub const FLASH_MAX_HEAD_DIM: usize = 128;

/// Threads per CTA: forward 4 warps (16 query rows each), backward 8 warps.
const FWD_THREADS: u32 = 128;
const BWD_THREADS: u32 = 256;

pub(super) struct FlashFunctions {
    seg_blocks: CudaFunction,
    /// Indexed by [`FlashShape::tile`]: 0 → d ≤ 64, 1 → d ≤ 128.
    fwd: [CudaFunction; 2],
    /// Hopper's forward kernels (`flash_fwd_d{64,128}_sm90`: the tiles loaded by TMA), which
    /// replace `fwd` where the GPU has warpgroup MMAs.
    fwd_sm90: Option<[CudaFunction; 2]>,
    bwd: [CudaFunction; 2],
    /// Input stages of each backward kernel: 2 (the next query block loads during the current
    /// one) where the GPU grants the shared memory, else 1.
    bwd_stages: [usize; 2],
    /// Hopper's backward kernels (`flash_bwd_d{64,128}_sm90`, two stages), which replace
    /// `bwd` where the GPU has warpgroup MMAs.
    bwd_sm90: Option<[CudaFunction; 2]>,
    /// The backward kernel [`Kernels::flash_attn_bwd`] runs.
    bwd_kernel: FlashBwdKernel,
    bwd_prep: CudaFunction,
    dq_convert: CudaFunction,
}

/// Dynamic shared memory of the backward kernel with tiles `width` wide: K, V tiles [64][width]
/// and Pᵀ, dSᵀ [64][64] in bf16, then per stage Q, dO tiles [64][width] bf16 and lse, delta of
/// a query block in fp32, padded to 1 KiB: every tile stays 1024-byte aligned, as Hopper's
/// swizzled wgmma operands need.
fn bwd_smem_bytes(width: usize, stages: usize) -> usize {
    let stage = 2 * FLASH_BLOCK * width * 2 + 1024;
    (2 * FLASH_BLOCK * width + 2 * FLASH_BLOCK * FLASH_BLOCK) * 2 + stages * stage
}

const WIDTHS: [usize; 2] = [64, 128];

/// Threads of Hopper's backward (`flash_bwd_d{64,128}_sm90`: one warpgroup per CTA, two CTAs
/// per SM).
const SM90_THREADS: u32 = 128;

/// Dynamic shared memory `flash_bwd_d{width}_sm90` uses: K, V [64][width] and dSᵀ [64][64] in
/// bf16, then two stages as in [`bwd_smem_bytes`].
fn bwd_sm90_smem_bytes(width: usize) -> usize {
    let stage = 2 * FLASH_BLOCK * width * 2 + 1024;
    (2 * FLASH_BLOCK * width + FLASH_BLOCK * FLASH_BLOCK) * 2 + 2 * stage
}

/// Shared memory of one sm_90 SM.
const SM90_SMEM_PER_SM: usize = 228 * 1024;

/// Dynamic shared memory the launch of `flash_bwd_d{width}_sm90` asks for: what it uses, and
/// at least a third of the SM's, so that no third CTA fits beside two (the driver reserves
/// 1 KiB more per CTA). With its tiles loaded by TMA the d 64 kernel needed 166 registers and
/// 58 KiB, which let three CTAs share an SM; three measured 7–12% slower than two on whole
/// causal rows (docs/perf-notes.md §32, §33). Since §34 it needs 200 registers, which alone
/// keep it at two; the bound stays so that a leaner build cannot slip back to three. At d 128
/// (106 KiB) two is all that fits.
fn bwd_sm90_launch_smem(width: usize) -> usize {
    bwd_sm90_smem_bytes(width).max(SM90_SMEM_PER_SM / 3)
}

/// Which kernel computes the attention backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashBwdKernel {
    /// `flash_bwd_d{64,128}`: mma.sync tensor cores, every sm_80+ GPU.
    Portable,
    /// `flash_bwd_d{64,128}_sm90`: warpgroup MMAs, one warpgroup per 64 keys, two CTAs per SM
    /// (sm_90a). A warp-specialised variant (a producer warpgroup loading and reducing dQ for
    /// two consumer warpgroups per 128 keys) measured 5–9% slower at the training shapes
    /// (docs/perf-notes.md §26); so did 128-key CTAs whose two warpgroups each reduce dQ
    /// over both key blocks, halving the dQ reductions (15–55% slower in lockstep, 60–120%
    /// with the warpgroups one phase apart, §35).
    Warpgroup,
}

impl FlashBwdKernel {
    /// Every kernel, in the order of preference where the GPU runs it.
    pub const ALL: [FlashBwdKernel; 2] = [Self::Warpgroup, Self::Portable];

    /// The name `FERROTUNE_FLASH_BWD` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Warpgroup => "warpgroup",
        }
    }
}

/// Kernel development only: names the backward kernel to run instead of the fastest one the
/// GPU has (an end-to-end A/B of two kernels with one binary).
pub const FLASH_BWD_ENV: &str = "FERROTUNE_FLASH_BWD";

impl FlashFunctions {
    /// `smem_optin`: the device's largest dynamic shared memory per block (bytes) after opt-in.
    pub(super) fn load(
        get: impl Fn(&str) -> Result<CudaFunction, KernelError>,
        smem_optin: usize,
        arch: GpuArch,
    ) -> Result<Self, KernelError> {
        let bwd = [get("flash_bwd_d64")?, get("flash_bwd_d128")?];
        let mut bwd_stages = [1; 2];
        // More than the 48 KiB of static shared memory: every sm_80+ GPU allows ≥ 99 KiB per
        // block once the kernel opts in (sm_80 163 KiB, sm_90 227 KiB: two stages at d 128).
        for (i, (f, width)) in bwd.iter().zip(WIDTHS).enumerate() {
            if bwd_smem_bytes(width, 2) <= smem_optin {
                bwd_stages[i] = 2;
            }
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bwd_smem_bytes(width, bwd_stages[i]) as i32,
            )?;
        }
        let mut bwd_sm90 = None;
        if arch.has_wgmma() && bwd_sm90_smem_bytes(128) <= smem_optin {
            let fs = [get("flash_bwd_d64_sm90")?, get("flash_bwd_d128_sm90")?];
            for (f, width) in fs.iter().zip(WIDTHS) {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bwd_sm90_launch_smem(width) as i32,
                )?;
            }
            bwd_sm90 = Some(fs);
        }
        let has_sm90 = bwd_sm90.is_some();
        let bwd_kernel = match std::env::var(FLASH_BWD_ENV) {
            Ok(name) => runnable(has_sm90)
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    shape(
                        "flash_attn_bwd",
                        format!(
                            "{FLASH_BWD_ENV}={name}: not a backward kernel this GPU runs \
                             (portable, and on sm_90a warpgroup)"
                        ),
                    )
                })?,
            Err(_) => runnable(has_sm90)
                .next()
                .expect("the portable kernel runs everywhere"),
        };
        let fwd_sm90 = if arch.has_wgmma() {
            Some([get("flash_fwd_d64_sm90")?, get("flash_fwd_d128_sm90")?])
        } else {
            None
        };
        Ok(Self {
            seg_blocks: get("flash_seg_blocks")?,
            fwd: [get("flash_fwd_d64")?, get("flash_fwd_d128")?],
            fwd_sm90,
            bwd,
            bwd_stages,
            bwd_sm90,
            bwd_kernel,
            bwd_prep: get("flash_bwd_prep")?,
            dq_convert: get("flash_dq_convert")?,
        })
    }

    /// The backward kernels this GPU runs, in the order of preference.
    fn runnable(&self) -> impl Iterator<Item = FlashBwdKernel> {
        runnable(self.bwd_sm90.is_some())
    }
}

/// The backward kernels a GPU runs (`has_sm90`: Hopper's kernels loaded), in the order of
/// preference.
fn runnable(has_sm90: bool) -> impl Iterator<Item = FlashBwdKernel> {
    FlashBwdKernel::ALL.into_iter().filter(move |k| match k {
        FlashBwdKernel::Portable => true,
        FlashBwdKernel::Warpgroup => has_sm90,
    })
}

/// Shapes of one attention call. q/o are `[batch·seq, heads·head_dim]`, k/v
/// `[batch·seq, kv_heads·head_dim]` (token-major bf16); query head h reads kv head
/// `h / (heads / kv_heads)`; key j is visible from query i iff `j <= i`, same segment id and
/// (`window == 0` or `i - j < window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Mistral's sliding window (0: none).
    pub window: usize,
}

impl FlashShape {
    /// Why these kernels cannot run a model with this head dimension, if they cannot.
    pub fn head_dim_unsupported(head_dim: usize) -> Option<String> {
        (head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > FLASH_MAX_HEAD_DIM).then(|| {
            format!(
                "head_dim {head_dim}: the fused attention kernels take a multiple of 8 up to \
                 {FLASH_MAX_HEAD_DIM}"
            )
        })
    }

    /// 64-token blocks per row.
    pub fn blocks(&self) -> usize {
        self.seq.div_ceil(FLASH_BLOCK)
    }
    /// Elements of the block classification buffer ([`Kernels::flash_seg_blocks`]).
    pub fn seg_blocks_len(&self) -> usize {
        self.batch * self.blocks() * 2
    }
    /// Elements of the logsumexp (and delta) buffers, `[batch, heads, seq]` fp32.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads * self.seq
    }
    /// Elements of q, o, dq and the fp32 dQ accumulator.
    pub fn q_len(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_dim
    }
    /// Elements of k, v, dk, dv.
    pub fn kv_len(&self) -> usize {
        self.batch * self.seq * self.kv_heads * self.head_dim
    }
    /// 1/√d, the softmax scale.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// The TMA descriptor of a `[batch·seq, heads·head_dim]` operand for Hopper's kernels
    /// (`heads`: the query heads for q and dO, the kv heads for k and v).
    fn tile_map(
        &self,
        kernel: &'static str,
        what: &str,
        buf: &CudaView<bf16>,
        heads: usize,
        stream: &CudaStream,
    ) -> Result<cudarc::driver::sys::CUtensorMap, KernelError> {
        let (ptr, _sync) = buf.device_ptr(stream);
        tile_map(
            kernel,
            what,
            ptr,
            (self.batch, self.seq, heads, self.head_dim),
        )
    }

    /// Which kernel width serves this head_dim (0: 64, 1: 128).
    fn tile(&self) -> usize {
        usize::from(self.head_dim > 64)
    }

    fn check(&self, kernel: &'static str) -> Result<(), KernelError> {
        if let Some(why) = Self::head_dim_unsupported(self.head_dim) {
            return Err(shape(kernel, why));
        }
        if self.kv_heads == 0 || self.heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(shape(
                kernel,
                format!(
                    "heads {} must be a positive multiple of kv_heads {}",
                    self.heads, self.kv_heads
                ),
            ));
        }
        if self.heads > 65535 || self.batch > 65535 {
            return Err(shape(kernel, "heads and batch must be at most 65535"));
        }
        to_i32(kernel, "seq", self.seq)?;
        to_i32(kernel, "window", self.window)?;
        to_i32(kernel, "heads·head_dim", self.heads * self.head_dim)?;
        Ok(())
    }

    fn args(&self) -> (i32, i32, i32, i32, i32) {
        (
            self.seq as i32,
            self.heads as i32,
            self.kv_heads as i32,
            self.head_dim as i32,
            self.window as i32,
        )
    }
}

/// The fp32 workspaces of the backward.
pub struct FlashBwdWork<'a, 'b> {
    /// `[batch, heads, seq]`: rowsum(dO ⊙ O).
    pub delta: &'a mut CudaViewMut<'b, f32>,
    /// `[batch·seq, heads·head_dim]`: dQ accumulated over key blocks (reset by the backward).
    pub dq_acc: &'a mut CudaViewMut<'b, f32>,
}

impl Kernels {
    /// Classifies the 64-token blocks of every row by segment: `blk[(b·blocks + i)·2]` = segment
    /// id of the block's first token, `+1` = 1 when all of its tokens (up to seq) share it.
    /// Run once per batch, before the attention kernels of that batch.
    pub fn flash_seg_blocks(
        &self,
        stream: &CudaStream,
        shape_: &FlashShape,
        segment_ids: &CudaView<u32>,
        blk: &mut CudaViewMut<u32>,
    ) -> Result<(), KernelError> {
        const K: &str = "flash_seg_blocks";
        shape_.check(K)?;
        check_len(
            K,
            "segment_ids",
            segment_ids.len(),
            shape_.batch * shape_.seq,
        )?;
        check_len(K, "blk", blk.len(), shape_.seg_blocks_len())?;
        let warps = shape_.batch * shape_.blocks();
        if warps == 0 {
            return Ok(());
        }
        let (b_i, t_i) = (shape_.batch as i32, shape_.seq as i32);
        let mut a = stream.launch_builder(&self.f.flash.seg_blocks);
        a.arg(segment_ids).arg(blk).arg(&b_i).arg(&t_i);
        launch(
            a,
            super::cfg(grid(warps, (THREADS / 32) as usize, u32::MAX), (THREADS, 1)),
        )
    }

    /// Input stages the backward uses for this shape on this GPU (2: the next query block's
    /// inputs load during the current one).
    pub fn flash_bwd_stages(&self, s: &FlashShape) -> usize {
        match self.f.flash.bwd_kernel {
            FlashBwdKernel::Portable => self.f.flash.bwd_stages[s.tile()],
            FlashBwdKernel::Warpgroup => 2,
        }
    }

    /// The backward kernel [`Kernels::flash_attn_bwd`] runs.
    pub fn flash_bwd_kernel(&self) -> FlashBwdKernel {
        self.f.flash.bwd_kernel
    }

    /// The backward kernels this GPU runs, in the order of preference.
    pub fn flash_bwd_kernels(&self) -> Vec<FlashBwdKernel> {
        self.f.flash.runnable().collect()
    }

    /// Runs `kernel` from now on (the parity checks and benchmark compare them).
    pub fn set_flash_bwd_kernel(&mut self, kernel: FlashBwdKernel) -> Result<(), KernelError> {
        if !self.f.flash.runnable().any(|k| k == kernel) {
            return Err(shape(
                "flash_attn_bwd",
                format!("the {} backward does not run on this GPU", kernel.name()),
            ));
        }
        self.f.flash.bwd_kernel = kernel;
        Ok(())
    }

    /// The chosen backward's function for this shape, its threads per CTA, dynamic shared
    /// memory (`stages` from [`Kernels::flash_bwd_stages`]) and whether it takes the tiles'
    /// TMA descriptors (Hopper's kernels).
    fn bwd_launch(&self, s: &FlashShape, stages: usize) -> (&CudaFunction, u32, usize, bool) {
        let (fl, tile, width) = (&self.f.flash, s.tile(), WIDTHS[s.tile()]);
        match (fl.bwd_kernel, &fl.bwd_sm90) {
            (FlashBwdKernel::Warpgroup, Some(fs)) => {
                (&fs[tile], SM90_THREADS, bwd_sm90_launch_smem(width), true)
            }
            _ => (
                &fl.bwd[tile],
                BWD_THREADS,
                bwd_smem_bytes(width, stages),
                false,
            ),
        }
    }

    /// `o = softmax(q·kᵀ/√d + mask)·v` and `lse[b, h, i]` = logsumexp of the masked, scaled
    /// scores of query i (natural log), which the backward needs. `blk` from
    /// [`Kernels::flash_seg_blocks`] for the same `segment_ids`.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attn_fwd(
        &self,
        stream: &CudaStream,
        s: &FlashShape,
        (q, k, v): (&CudaView<bf16>, &CudaView<bf16>, &CudaView<bf16>),
        segment_ids: &CudaView<u32>,
        blk: &CudaView<u32>,
        o: &mut CudaViewMut<bf16>,
        lse: &mut CudaViewMut<f32>,
    ) -> Result<(), KernelError> {
        const K: &str = "flash_attn_fwd";
        s.check(K)?;
        check_len(K, "q", q.len(), s.q_len())?;
        check_len(K, "o", o.len(), s.q_len())?;
        check_len(K, "k", k.len(), s.kv_len())?;
        check_len(K, "v", v.len(), s.kv_len())?;
        check_len(K, "lse", lse.len(), s.lse_len())?;
        check_len(K, "segment_ids", segment_ids.len(), s.batch * s.seq)?;
        check_len(K, "blk", blk.len(), s.seg_blocks_len())?;
        aligned16(K, "q", q, stream)?;
        aligned16(K, "k", k, stream)?;
        aligned16(K, "v", v, stream)?;
        aligned16(K, "o", &*o, stream)?;
        if s.batch == 0 || s.seq == 0 {
            return Ok(());
        }
        let (t_i, h_i, hkv_i, d_i, w_i) = s.args();
        let scale_log2 = s.scale() * std::f32::consts::LOG2_E;
        // Hopper's forward takes its tiles' TMA descriptors as one more parameter.
        let (function, maps) = match &self.f.flash.fwd_sm90 {
            Some(fs) => {
                let maps = FwdMaps {
                    q: s.tile_map(K, "q", q, s.heads, stream)?,
                    k: s.tile_map(K, "k", k, s.kv_heads, stream)?,
                    v: s.tile_map(K, "v", v, s.kv_heads, stream)?,
                };
                (&fs[s.tile()], Some(maps))
            }
            None => (&self.f.flash.fwd[s.tile()], None),
        };
        let mut a = stream.launch_builder(function);
        a.arg(q)
            .arg(k)
            .arg(v)
            .arg(o)
            .arg(lse)
            .arg(segment_ids)
            .arg(blk);
        a.arg(&t_i)
            .arg(&h_i)
            .arg(&hkv_i)
            .arg(&d_i)
            .arg(&w_i)
            .arg(&scale_log2);
        if let Some(maps) = &maps {
            a.arg(maps);
        }
        let config = LaunchConfig {
            grid_dim: (s.blocks() as u32, s.heads as u32, s.batch as u32),
            block_dim: (FWD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(a, config)
    }

    /// Gradients of [`Kernels::flash_attn_fwd`]: `dq`, `dk`, `dv` overwritten (dk/dv summed over
    /// each kv head's group) from the forward's `o` and `lse` and the output gradient `d_o`.
    /// `inverse_rope`: the forward's RoPE tables `(cos, sin)`, `[batch·seq, head_dim/2]`, when
    /// q and k were rotated before the attention; `dq` and `dk` then come out rotated back (the
    /// gradients of the unrotated q and k), in the same pass that converts dQ to bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attn_bwd(
        &self,
        stream: &CudaStream,
        s: &FlashShape,
        (q, k, v): (&CudaView<bf16>, &CudaView<bf16>, &CudaView<bf16>),
        (o, d_o, lse): (&CudaView<bf16>, &CudaView<bf16>, &CudaView<f32>),
        segment_ids: &CudaView<u32>,
        blk: &CudaView<u32>,
        work: FlashBwdWork<'_, '_>,
        (dq, dk, dv): (
            &mut CudaViewMut<bf16>,
            &mut CudaViewMut<bf16>,
            &mut CudaViewMut<bf16>,
        ),
        inverse_rope: Option<(CudaView<f32>, CudaView<f32>)>,
    ) -> Result<(), KernelError> {
        const K: &str = "flash_attn_bwd";
        s.check(K)?;
        for (what, len) in [("q", q.len()), ("o", o.len()), ("d_o", d_o.len())] {
            check_len(K, what, len, s.q_len())?;
        }
        check_len(K, "dq", dq.len(), s.q_len())?;
        check_len(K, "dq_acc", work.dq_acc.len(), s.q_len())?;
        for (what, len) in [("k", k.len()), ("v", v.len())] {
            check_len(K, what, len, s.kv_len())?;
        }
        check_len(K, "dk", dk.len(), s.kv_len())?;
        check_len(K, "dv", dv.len(), s.kv_len())?;
        check_len(K, "lse", lse.len(), s.lse_len())?;
        check_len(K, "delta", work.delta.len(), s.lse_len())?;
        check_len(K, "segment_ids", segment_ids.len(), s.batch * s.seq)?;
        check_len(K, "blk", blk.len(), s.seg_blocks_len())?;
        aligned16(K, "q", q, stream)?;
        aligned16(K, "k", k, stream)?;
        aligned16(K, "v", v, stream)?;
        aligned16(K, "o", o, stream)?;
        aligned16(K, "d_o", d_o, stream)?;
        aligned16(K, "dq_acc", &*work.dq_acc, stream)?;
        aligned16(K, "dq", &*dq, stream)?;
        aligned16(K, "dk", &*dk, stream)?;
        aligned16(K, "dv", &*dv, stream)?;
        if s.batch == 0 || s.seq == 0 {
            return Ok(());
        }
        let (t_i, h_i, hkv_i, d_i, w_i) = s.args();
        let tokens = s.batch * s.seq;
        let n_i = to_i32(K, "batch·seq", tokens)?;

        // 1. delta and the dQ accumulator reset: one warp per (token, head).
        let mut a = stream.launch_builder(&self.f.flash.bwd_prep);
        a.arg(o)
            .arg(d_o)
            .arg(&mut *work.delta)
            .arg(&mut *work.dq_acc);
        a.arg(&n_i).arg(&t_i).arg(&h_i).arg(&d_i);
        let warps_per_block = (THREADS / 32) as usize;
        launch(
            a,
            super::cfg(
                grid(tokens * s.heads, warps_per_block, self.stride_cap() * 4),
                (THREADS, 1),
            ),
        )?;

        // 2. dK, dV per key block; dQ into the accumulator.
        let scale = s.scale();
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let stages = self.flash_bwd_stages(s);
        let stages_i = stages as i32;
        let (function, threads, smem, takes_maps) = self.bwd_launch(s, stages);
        let maps = if takes_maps {
            Some(BwdMaps {
                q: s.tile_map(K, "q", q, s.heads, stream)?,
                k: s.tile_map(K, "k", k, s.kv_heads, stream)?,
                v: s.tile_map(K, "v", v, s.kv_heads, stream)?,
                dout: s.tile_map(K, "d_o", d_o, s.heads, stream)?,
            })
        } else {
            None
        };
        let mut a = stream.launch_builder(function);
        a.arg(q)
            .arg(k)
            .arg(v)
            .arg(d_o)
            .arg(lse)
            .arg(&mut *work.delta);
        a.arg(&mut *work.dq_acc).arg(&mut *dk).arg(&mut *dv);
        a.arg(segment_ids).arg(blk);
        a.arg(&t_i)
            .arg(&h_i)
            .arg(&hkv_i)
            .arg(&d_i)
            .arg(&w_i)
            .arg(&scale_log2)
            .arg(&scale)
            .arg(&stages_i);
        if let Some(maps) = &maps {
            a.arg(maps);
        }
        let config = LaunchConfig {
            grid_dim: (s.blocks() as u32, s.kv_heads as u32, s.batch as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        launch(a, config)?;

        // 3. dq = bf16(scale · dq_acc), with the inverse rotation where RoPE is folded in.
        if let Some((cos, sin)) = inverse_rope {
            let acc = work.dq_acc.as_view();
            return self.rope_dq_convert(stream, s, &acc, dq, dk, (&cos, &sin), scale);
        }
        let n = s.q_len();
        let n_l = n as i64;
        let mut a = stream.launch_builder(&self.f.flash.dq_convert);
        a.arg(&mut *work.dq_acc).arg(&mut *dq).arg(&n_l).arg(&scale);
        launch(
            a,
            super::cfg(
                grid(n / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dims_and_buffer_sizes() {
        for d in [16, 32, 64, 80, 96, 128] {
            assert!(FlashShape::head_dim_unsupported(d).is_none(), "{d}");
        }
        for d in [0, 12, 136, 256] {
            assert!(FlashShape::head_dim_unsupported(d).is_some(), "{d}");
        }
        let s = FlashShape {
            batch: 2,
            seq: 130,
            heads: 8,
            kv_heads: 2,
            head_dim: 96,
            window: 0,
        };
        assert_eq!(s.blocks(), 3);
        assert_eq!(s.seg_blocks_len(), 12);
        assert_eq!(s.lse_len(), 2 * 8 * 130);
        assert_eq!(s.tile(), 1);
        assert!(s.check("t").is_ok());
        assert!(FlashShape { kv_heads: 3, ..s }.check("t").is_err());
        // One stage fits the 99 KiB opt-in limit of sm_86/sm_89 at d 128; two fit sm_80's
        // 163 KiB (and sm_90's 227 KiB).
        assert_eq!(bwd_smem_bytes(128, 1), 82944);
        // The tiles start at multiples of 1 KiB (wgmma's swizzle atoms): every fixed tile and
        // every stage is a whole number of KiB.
        for width in WIDTHS {
            assert_eq!(bwd_smem_bytes(width, 0) % 1024, 0);
            assert_eq!(
                (bwd_smem_bytes(width, 2) - bwd_smem_bytes(width, 1)) % 1024,
                0
            );
        }
        assert!(bwd_smem_bytes(128, 1) <= 99 * 1024);
        assert!(bwd_smem_bytes(64, 2) <= 99 * 1024);
        assert!(bwd_smem_bytes(128, 2) <= 163 * 1024);
        // Hopper's backward: 1 KiB-aligned tiles; two CTAs (plus 1 KiB reserved each) inside
        // sm_90's 228 KiB of shared memory per SM.
        assert_eq!(bwd_sm90_smem_bytes(128), 106 * 1024);
        assert!(2 * (bwd_sm90_smem_bytes(128) + 1024) <= 228 * 1024);
        assert_eq!(bwd_sm90_smem_bytes(64), 58 * 1024);
        // Two CTAs per SM at either width, never three.
        for width in WIDTHS {
            let per_cta = bwd_sm90_launch_smem(width) + 1024;
            assert!(2 * per_cta <= SM90_SMEM_PER_SM && 3 * per_cta > SM90_SMEM_PER_SM);
        }
    }
}
