//! Launchers of the adapters' `t = dy·B` and `dB = s·dyᵀ·low` computed in one pass over `dy`
//! (`cuda/swiglu.cu`), instead of two GEMMs that each read it:
//!
//! - [`Kernels::swiglu_lora_bwd`]: the SwiGLU backward fused with the gate and up adapters'
//!   products — the two gradients it writes are multiplied while still on chip (perf-notes
//!   §19); both adapters' `t` accumulate in an fp32 `[rows, 2r]` buffer, gate's columns first.
//! - [`Kernels::lora_tdb`]: the same products for one adapter whose `dy` is already in memory
//!   (o, down, q, k, v; perf-notes §28), `t` in an fp32 `[rows, r]` buffer.
//!
//! Both add `dB` to the gradients; [`Kernels::lora_t_store`] then rounds `t` to bf16 wherever
//! the caller keeps it and zeroes the accumulator for the next use.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaFunction, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};

use super::swiglu::{swiglu_bwd_check, swiglu_check};
use super::{
    aligned, aligned16, bf16, check_len, grid, launch, shape, strided_len, to_i32, Kernels, THREADS,
};
use crate::KernelError;

/// Adapter ranks the kernels are built for (one instantiation each: a column block is
/// `4096 / r` columns so that its `dB` accumulators fit in registers).
pub const LORA_GRAD_RANKS: [usize; 3] = [16, 32, 64];

/// Threads per CTA of both kernels (8 warps: 16 rows / 16 columns and half the rank each).
const LORA_THREADS: u32 = 256;
/// Rows of one tile of the fused kernel.
const ROW_TILE: usize = 64;

/// Dynamic shared memory of `swiglu_lora_bwd_r{r}` (`adapters` 2: gate and up, three tiles per
/// stage: dh, g, u) or `lora_tdb_r{r}` (1, one tile: dy): the column block's `B`s
/// (`[4096/r][r]` bf16 each), two items' low tiles (`[64][r]` per adapter), two stages of
/// `[64][64]` tiles.
fn smem_bytes(r: usize, adapters: usize) -> usize {
    let tiles = if adapters == 2 { 3 } else { 1 };
    adapters * 2 * 4096 + 2 * adapters * 2 * ROW_TILE * r + 2 * tiles * 2 * ROW_TILE * 64
}

/// The kernel's work items: (column block, 64-row tile) pairs.
fn items(rows: usize, cols: usize, r: usize) -> usize {
    cols.div_ceil(4096 / r) * rows.div_ceil(ROW_TILE)
}

pub(super) struct LoraGradFunctions {
    /// Indexed like [`LORA_GRAD_RANKS`], with how many CTAs of each fit on one SM.
    swiglu: [(CudaFunction, u32); 3],
    tdb: [(CudaFunction, u32); 3],
    t_store: CudaFunction,
}

impl LoraGradFunctions {
    pub(super) fn load(
        get: impl Fn(&str) -> Result<CudaFunction, KernelError>,
    ) -> Result<Self, KernelError> {
        let load =
            |kernel: &str, adapters: usize| -> Result<[(CudaFunction, u32); 3], KernelError> {
                let one = |r: usize| -> Result<(CudaFunction, u32), KernelError> {
                    let f = get(&format!("{kernel}_r{r}"))?;
                    let smem = smem_bytes(r, adapters);
                    // More than the 48 KiB of static shared memory: every sm_80+ GPU grants it.
                    f.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )?;
                    let per_sm =
                        f.occupancy_max_active_blocks_per_multiprocessor(LORA_THREADS, smem, None)?;
                    Ok((f, per_sm.max(1)))
                };
                Ok([one(16)?, one(32)?, one(64)?])
            };
        Ok(Self {
            swiglu: load("swiglu_lora_bwd", 2)?,
            tdb: load("lora_tdb", 1)?,
            t_store: get("lora_t_store")?,
        })
    }
}

/// One adapter's part of the products: `B` `[cols, r]` bf16, the forward's `low` `[rows, r]`
/// bf16 with its row stride, and `dB` `[cols, r]` fp32, added to.
pub struct LoraAdapter<'a> {
    pub b: CudaView<'a, bf16>,
    pub low: (CudaView<'a, bf16>, usize),
    pub grad_b: CudaViewMut<'a, f32>,
}

impl Kernels {
    /// Whether [`Kernels::swiglu_lora_bwd`] and [`Kernels::lora_tdb`] take adapters of rank `r`.
    pub fn lora_grads_support(r: usize) -> bool {
        LORA_GRAD_RANKS.contains(&r)
    }

    /// [`Kernels::swiglu_bwd`] in place (`g` → dg, `u` → du, `h` ← the recomputed output, which
    /// the down projection's `dA` reads whenever this runs), and
    /// for the gate (`dy` = dg) and up (`dy` = du) adapters of rank `r`:
    /// `t_acc[:, p·r..(p+1)·r] += dy·B` and `dB += scale·dyᵀ·low`. `t_acc` is fp32
    /// `[rows, 2r]` and must be zero on entry ([`Kernels::lora_t_store`] leaves it so).
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_lora_bwd(
        &self,
        stream: &CudaStream,
        dh: (&CudaView<bf16>, usize),
        g: (&mut CudaViewMut<bf16>, usize),
        u: (&mut CudaViewMut<bf16>, usize),
        h: (&mut CudaViewMut<bf16>, usize),
        adapters: [&mut LoraAdapter; 2],
        t_acc: &mut CudaViewMut<f32>,
        (r, scale): (usize, f32),
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "swiglu_lora_bwd";
        let which = rank_index(K, r)?;
        let hv = Some((&*h.0, h.1));
        swiglu_bwd_check(K, stream, dh, (&*g.0, g.1), (&*u.0, u.1), hv, rows, cols)?;
        for (name, a) in ["gate", "up"].iter().zip(adapters.iter()) {
            adapter_check(K, name, stream, a, r, rows, cols)?;
        }
        check_len(K, "t_acc", t_acc.len(), rows * 2 * r)?;
        aligned(K, "t_acc", &*t_acc, stream, 8)?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let (f, per_sm) = &self.f.lora_grads.swiglu[which];
        let config = self.lora_grad_config(*per_sm, (rows, cols), r, 2);
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
        launch(a, config)
    }

    /// For one adapter of rank `r` whose output gradient `dy` `[rows, cols]` (rows `dy.1`
    /// apart) is in memory: `t_acc += dy·B` and `dB += scale·dyᵀ·low`, one read of `dy`.
    /// `t_acc` is fp32 `[rows, r]` and must be zero on entry ([`Kernels::lora_t_store`]
    /// leaves it so).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_tdb(
        &self,
        stream: &CudaStream,
        dy: (&CudaView<bf16>, usize),
        adapter: &mut LoraAdapter,
        t_acc: &mut CudaViewMut<f32>,
        (r, scale): (usize, f32),
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "lora_tdb";
        let which = rank_index(K, r)?;
        swiglu_check(K, cols, rows, &[("dy", dy.0.len(), dy.1)])?;
        aligned16(K, "dy", dy.0, stream)?;
        adapter_check(K, "adapter", stream, adapter, r, rows, cols)?;
        check_len(K, "t_acc", t_acc.len(), rows * r)?;
        aligned(K, "t_acc", &*t_acc, stream, 8)?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let (f, per_sm) = &self.f.lora_grads.tdb[which];
        let config = self.lora_grad_config(*per_sm, (rows, cols), r, 1);
        let (rows_i, cols_i) = (to_i32(K, "rows", rows)?, to_i32(K, "cols", cols)?);
        let (dy_ld, low_ld) = (to_i32(K, "dy row stride", dy.1)?, adapter.low.1 as i32);
        let mut a = stream.launch_builder(f);
        a.arg(dy.0)
            .arg(&dy_ld)
            .arg(&adapter.b)
            .arg(&adapter.low.0)
            .arg(&low_ld)
            .arg(t_acc)
            .arg(&mut adapter.grad_b)
            .arg(&scale)
            .arg(&rows_i)
            .arg(&cols_i);
        launch(a, config)
    }

    /// Every CTA resident at once, each a contiguous run of the items.
    fn lora_grad_config(
        &self,
        per_sm: u32,
        (rows, cols): (usize, usize),
        r: usize,
        adapters: usize,
    ) -> LaunchConfig {
        let ctas = items(rows, cols, r).min((per_sm * self.sm_count.max(1)) as usize);
        LaunchConfig {
            grid_dim: (ctas as u32, 1, 1),
            block_dim: (LORA_THREADS, 1, 1),
            shared_mem_bytes: smem_bytes(r, adapters) as u32,
        }
    }

    /// `t[:, 0..width) = bf16(alpha·t_acc)` (`t` rows `t.1` apart, `t_acc` dense `[rows,
    /// width]`) and `t_acc = 0`: the fused kernels' `t` sums rounded as a GEMM's output is.
    pub fn lora_t_store(
        &self,
        stream: &CudaStream,
        t_acc: &mut CudaViewMut<f32>,
        t: (&mut CudaViewMut<bf16>, usize),
        (rows, width): (usize, usize),
        alpha: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "lora_t_store";
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
        check_len(K, "t", t.0.len(), strided_len(rows, t.1, width))?;
        aligned(K, "t_acc", &*t_acc, stream, 8)?;
        let (ld, rows_i, width_i) = (
            to_i32(K, "t row stride", t.1)?,
            to_i32(K, "rows", rows)?,
            to_i32(K, "width", width)?,
        );
        let mut a = stream.launch_builder(&self.f.lora_grads.t_store);
        a.arg(t_acc)
            .arg(t.0)
            .arg(&ld)
            .arg(&rows_i)
            .arg(&width_i)
            .arg(&alpha);
        let blocks = grid(rows * width / 2, THREADS as usize, self.stride_cap());
        launch(a, super::cfg(blocks, (THREADS, 1)))
    }
}

/// Which instantiation serves rank `r`.
fn rank_index(kernel: &'static str, r: usize) -> Result<usize, KernelError> {
    LORA_GRAD_RANKS.iter().position(|&x| x == r).ok_or_else(|| {
        shape(
            kernel,
            format!("rank {r} is not one of {LORA_GRAD_RANKS:?}"),
        )
    })
}

/// An adapter's `B`, `dB` (`[cols, r]`) and `low` (`[rows, r]` at its row stride) fit their
/// shapes and the kernels' 16-byte loads.
fn adapter_check(
    kernel: &'static str,
    name: &str,
    stream: &CudaStream,
    a: &LoraAdapter,
    r: usize,
    rows: usize,
    cols: usize,
) -> Result<(), KernelError> {
    check_len(kernel, &format!("{name} B"), a.b.len(), cols * r)?;
    check_len(kernel, &format!("{name} dB"), a.grad_b.len(), cols * r)?;
    let ld = a.low.1;
    if !ld.is_multiple_of(8) || ld < r {
        return Err(shape(
            kernel,
            format!("{name} low row stride {ld} must be a multiple of 8 and >= r {r}"),
        ));
    }
    to_i32(kernel, "low row stride", ld)?;
    check_len(
        kernel,
        &format!("{name} low"),
        a.low.0.len(),
        strided_len(rows, ld, r),
    )?;
    aligned16(kernel, &format!("{name} B"), &a.b, stream)?;
    aligned16(kernel, &format!("{name} low"), &a.low.0, stream)?;
    aligned(kernel, &format!("{name} dB"), &a.grad_b, stream, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_and_items_follow_the_rank() {
        // Two CTAs of the r 16 SwiGLU kernel fit an A100's 163 KiB; r 64 needs an H100's 227
        // KiB. The one-adapter kernel needs under half of that: three CTAs of r 16 fit even
        // sm_86/89's 99 KiB.
        assert_eq!(smem_bytes(16, 2), 73_728);
        assert_eq!(smem_bytes(64, 2), 98_304);
        assert_eq!(smem_bytes(16, 1), 28_672);
        assert_eq!(smem_bytes(64, 1), 40_960);
        // 8B's MLP at r 16: 56 column blocks of 256 x 64 row tiles; tails round up.
        assert_eq!(items(4096, 14336, 16), 56 * 64);
        assert_eq!(items(4097, 14336 + 8, 16), 57 * 65);
        assert_eq!(items(64, 64, 64), 1);
    }
}
