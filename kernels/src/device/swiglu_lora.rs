//! Launchers of the SwiGLU backward fused with the gate/up adapters' `t = dy·B` and
//! `dB = s·dyᵀ·low` (`cuda/swiglu.cu`): the two gradients the elementwise kernel writes are
//! multiplied while still on chip, instead of being read back by four GEMMs.
//!
//! [`Kernels::swiglu_lora_bwd`] accumulates both adapters' `t` in an fp32 `[rows, 2r]` buffer
//! (gate's columns first) and adds `dB` to the gradients; [`Kernels::swiglu_lora_t_store`]
//! then rounds `t` to bf16 wherever the caller keeps it and zeroes the accumulator for the
//! next layer.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaStream, CudaView, CudaViewMut, PushKernelArg};

use super::{
    aligned, aligned16, bf16, check_len, grid, launch, shape, swiglu_bwd_check, to_i32, Kernels,
    THREADS,
};
use crate::KernelError;

/// Adapter ranks the fused kernel is built for (one instantiation each: a column block is
/// `4096 / r` columns so that its `dB` accumulators fit in registers).
pub const SWIGLU_LORA_RANKS: [usize; 3] = [16, 32, 64];

/// Threads per CTA of `swiglu_lora_bwd_r*` (8 warps: 16 rows / 16 columns and half the rank each).
const LORA_THREADS: u32 = 256;
/// Rows of one tile of the fused kernel.
const ROW_TILE: usize = 64;

/// Dynamic shared memory of `swiglu_lora_bwd_r{r}`: the column block's two `B`s (`[4096/r][r]`
/// bf16 each), two items' two low tiles (`[64][r]`), two stages of the dh/g/u tiles
/// (`[64][64]` each).
fn smem_bytes(r: usize) -> usize {
    2 * 2 * 4096 + 2 * 2 * 2 * ROW_TILE * r + 2 * 3 * 2 * ROW_TILE * 64
}

/// The kernel's work items: (column block, 64-row tile) pairs.
fn items(rows: usize, cols: usize, r: usize) -> usize {
    cols.div_ceil(4096 / r) * rows.div_ceil(ROW_TILE)
}

pub(super) struct SwigluLoraFunctions {
    /// Indexed like [`SWIGLU_LORA_RANKS`], with how many CTAs of each fit on one SM.
    bwd: [(CudaFunction, u32); 3],
    t_store: CudaFunction,
}

impl SwigluLoraFunctions {
    pub(super) fn load(
        get: impl Fn(&str) -> Result<CudaFunction, KernelError>,
    ) -> Result<Self, KernelError> {
        let bwd = |name: &str, r: usize| -> Result<(CudaFunction, u32), KernelError> {
            let f = get(name)?;
            // More than the 48 KiB of static shared memory: every sm_80+ GPU grants it.
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes(r) as i32,
            )?;
            let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(
                LORA_THREADS,
                smem_bytes(r),
                None,
            )?;
            Ok((f, per_sm.max(1)))
        };
        Ok(Self {
            bwd: [
                bwd("swiglu_lora_bwd_r16", 16)?,
                bwd("swiglu_lora_bwd_r32", 32)?,
                bwd("swiglu_lora_bwd_r64", 64)?,
            ],
            t_store: get("swiglu_lora_t_store")?,
        })
    }
}

/// One adapter of the fused backward (gate's or up's): `B` `[cols, r]` bf16, the forward's
/// `low` `[rows, r]` bf16 with its row stride, and `dB` `[cols, r]` fp32, added to.
pub struct SwigluLoraAdapter<'a> {
    pub b: CudaView<'a, bf16>,
    pub low: (CudaView<'a, bf16>, usize),
    pub grad_b: CudaViewMut<'a, f32>,
}

impl Kernels {
    /// Whether [`Kernels::swiglu_lora_bwd`] takes adapters of rank `r`.
    pub fn swiglu_lora_supports(r: usize) -> bool {
        SWIGLU_LORA_RANKS.contains(&r)
    }

    /// [`Kernels::swiglu_bwd`] in place (`g` → dg, `u` → du, `h` ← the recomputed output, which
    /// the down projection's `dA` reads whenever this runs), and
    /// for the gate (`dy` = dg) and up (`dy` = du) adapters of rank `r`:
    /// `t_acc[:, p·r..(p+1)·r] += dy·B` and `dB += scale·dyᵀ·low`. `t_acc` is fp32
    /// `[rows, 2r]` and must be zero on entry ([`Kernels::swiglu_lora_t_store`] leaves it so).
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_lora_bwd(
        &self,
        stream: &CudaStream,
        dh: (&CudaView<bf16>, usize),
        g: (&mut CudaViewMut<bf16>, usize),
        u: (&mut CudaViewMut<bf16>, usize),
        h: (&mut CudaViewMut<bf16>, usize),
        adapters: [&mut SwigluLoraAdapter; 2],
        t_acc: &mut CudaViewMut<f32>,
        (r, scale): (usize, f32),
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "swiglu_lora_bwd";
        let Some(which) = SWIGLU_LORA_RANKS.iter().position(|&x| x == r) else {
            return Err(shape(
                K,
                format!("rank {r} is not one of {SWIGLU_LORA_RANKS:?}"),
            ));
        };
        let hv = Some((&*h.0, h.1));
        swiglu_bwd_check(K, stream, dh, (&*g.0, g.1), (&*u.0, u.1), hv, rows, cols)?;
        for (name, a) in ["gate", "up"].iter().zip(adapters.iter()) {
            check_len(K, &format!("{name} B"), a.b.len(), cols * r)?;
            check_len(K, &format!("{name} dB"), a.grad_b.len(), cols * r)?;
            let ld = a.low.1;
            if !ld.is_multiple_of(8) || ld < r {
                return Err(shape(
                    K,
                    format!("{name} low row stride {ld} must be a multiple of 8 and >= r {r}"),
                ));
            }
            to_i32(K, "low row stride", ld)?;
            let need = if rows == 0 { 0 } else { (rows - 1) * ld + r };
            check_len(K, &format!("{name} low"), a.low.0.len(), need)?;
            aligned16(K, &format!("{name} B"), &a.b, stream)?;
            aligned16(K, &format!("{name} low"), &a.low.0, stream)?;
            aligned(K, &format!("{name} dB"), &a.grad_b, stream, 8)?;
        }
        check_len(K, "t_acc", t_acc.len(), rows * 2 * r)?;
        aligned(K, "t_acc", &*t_acc, stream, 8)?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        // Every CTA resident at once, each a contiguous run of the items.
        let (f, per_sm) = &self.f.swiglu_lora.bwd[which];
        let ctas = items(rows, cols, r).min((per_sm * self.sm_count.max(1)) as usize);
        let (rows_i, cols_i) = (to_i32(K, "rows", rows)?, to_i32(K, "cols", cols)?);
        let (ds, gs, us) = (dh.1 as i32, g.1 as i32, u.1 as i32);
        let [gate, up] = adapters;
        let (lg, lu) = (gate.low.1 as i32, up.low.1 as i32);
        let mut a = stream.launch_builder(f);
        a.arg(dh.0).arg(&ds).arg(g.0).arg(&gs).arg(u.0).arg(&us);
        let hs = h.1 as i32;
        a.arg(h.0);
        a.arg(&hs)
            .arg(&gate.b)
            .arg(&up.b)
            .arg(&gate.low.0)
            .arg(&lg)
            .arg(&up.low.0)
            .arg(&lu)
            .arg(t_acc)
            .arg(&mut gate.grad_b)
            .arg(&mut up.grad_b)
            .arg(&scale)
            .arg(&rows_i)
            .arg(&cols_i);
        launch(
            a,
            cudarc::driver::LaunchConfig {
                grid_dim: (ctas as u32, 1, 1),
                block_dim: (LORA_THREADS, 1, 1),
                shared_mem_bytes: smem_bytes(r) as u32,
            },
        )
    }

    /// `t[:, 0..width) = bf16(t_acc)` (`t` rows `t.1` apart, `t_acc` dense `[rows, width]`) and
    /// `t_acc = 0`: the fused backward's `t` sums rounded as a GEMM's output is.
    pub fn swiglu_lora_t_store(
        &self,
        stream: &CudaStream,
        t_acc: &mut CudaViewMut<f32>,
        t: (&mut CudaViewMut<bf16>, usize),
        rows: usize,
        width: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "swiglu_lora_t_store";
        if !width.is_multiple_of(2) || t.1 < width || !t.1.is_multiple_of(2) {
            return Err(shape(
                K,
                format!(
                    "width {width} and t's row stride {} must be even, stride >= width",
                    t.1
                ),
            ));
        }
        check_len(K, "t_acc", t_acc.len(), rows * width)?;
        let need = if rows == 0 {
            0
        } else {
            (rows - 1) * t.1 + width
        };
        check_len(K, "t", t.0.len(), need)?;
        aligned(K, "t_acc", &*t_acc, stream, 8)?;
        let (ld, rows_i, width_i) = (
            to_i32(K, "t row stride", t.1)?,
            to_i32(K, "rows", rows)?,
            to_i32(K, "width", width)?,
        );
        let mut a = stream.launch_builder(&self.f.swiglu_lora.t_store);
        a.arg(t_acc).arg(t.0).arg(&ld).arg(&rows_i).arg(&width_i);
        let blocks = grid(rows * width / 2, THREADS as usize, self.stride_cap());
        launch(a, super::cfg(blocks, (THREADS, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_and_items_follow_the_rank() {
        // Two CTAs of the r 16 kernel fit an A100's 163 KiB; r 64 needs an H100's 227 KiB.
        assert_eq!(smem_bytes(16), 73_728);
        assert_eq!(smem_bytes(64), 98_304);
        // 8B's MLP at r 16: 56 column blocks of 256 x 64 row tiles; tails round up.
        assert_eq!(items(4096, 14336, 16), 56 * 64);
        assert_eq!(items(4097, 14336 + 8, 16), 57 * 65);
        assert_eq!(items(64, 64, 64), 1);
    }
}
