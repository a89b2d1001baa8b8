//! Gather and copy launchers (`embedding.cu`): the embedding lookup, strided row copies, and one
//! launch for a whole table of row copies ([`CopyTable`]).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{aligned16, bf16, cfg, check_len, grid, launch, shape, to_i32, Kernels, THREADS};
use crate::KernelError;

impl Kernels {
    /// out[t, :] = table[ids[t], :] (bf16 rows of `dim`, dim % 8 == 0).
    pub fn embedding_gather(
        &self,
        stream: &CudaStream,
        ids: &CudaView<u32>,
        table: &CudaView<bf16>,
        out: &mut CudaViewMut<bf16>,
        dim: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "embedding_gather";
        if dim == 0 || !dim.is_multiple_of(8) {
            return Err(shape(
                K,
                format!("dim {dim} must be a positive multiple of 8"),
            ));
        }
        let tokens = ids.len();
        check_len(K, "out", out.len(), tokens * dim)?;
        aligned16(K, "table", table, stream)?;
        aligned16(K, "out", &*out, stream)?;
        let vocab = to_i32(K, "vocab", table.len() / dim)?;
        let (t_i, d_i) = (to_i32(K, "tokens", tokens)?, dim as i32);
        let mut a = stream.launch_builder(&self.f.embedding_gather);
        a.arg(ids)
            .arg(table)
            .arg(out)
            .arg(&t_i)
            .arg(&d_i)
            .arg(&vocab);
        launch(
            a,
            cfg(
                grid(tokens * dim / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }

    /// Copies `rows` rows of `cols` values from `src` (rows `src.1` apart) into `dst` (rows
    /// `dst.1` apart); `cols` and both strides multiples of 8.
    pub fn copy_rows(
        &self,
        stream: &CudaStream,
        (src, src_ld): (&CudaView<bf16>, usize),
        (dst, dst_ld): (&mut CudaViewMut<bf16>, usize),
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "copy_rows";
        if rows == 0 {
            return Ok(());
        }
        copy_shape(K, cols, src_ld, dst_ld)?;
        check_len(K, "src", src.len(), (rows - 1) * src_ld + cols)?;
        check_len(K, "dst", dst.len(), (rows - 1) * dst_ld + cols)?;
        aligned16(K, "src", src, stream)?;
        aligned16(K, "dst", &*dst, stream)?;
        let (src8, dst8) = (
            to_i32(K, "src_ld", src_ld / 8)?,
            to_i32(K, "dst_ld", dst_ld / 8)?,
        );
        let (rows_i, cols8) = (to_i32(K, "rows", rows)?, to_i32(K, "cols", cols / 8)?);
        let mut a = stream.launch_builder(&self.f.copy_rows);
        a.arg(src)
            .arg(&src8)
            .arg(dst)
            .arg(&dst8)
            .arg(&rows_i)
            .arg(&cols8);
        launch(
            a,
            cfg(
                grid(rows * cols / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }
}

/// What the row-copy kernels need of a copy's shape: `cols` and both row strides multiples of 8
/// (16-byte vectors), strides at least `cols`.
fn copy_shape(
    kernel: &'static str,
    cols: usize,
    src_ld: usize,
    dst_ld: usize,
) -> Result<(), KernelError> {
    if cols == 0 || [cols, src_ld, dst_ld].iter().any(|v| !v.is_multiple_of(8)) {
        return Err(shape(
            kernel,
            format!("cols {cols} and row strides {src_ld}, {dst_ld} must be multiples of 8"),
        ));
    }
    if src_ld < cols || dst_ld < cols {
        return Err(shape(
            kernel,
            format!("row strides {src_ld}, {dst_ld} below cols {cols}"),
        ));
    }
    Ok(())
}

/// One strided row copy of a [`CopyTable`]: `rows` rows of `cols` bf16 values from `src` (rows
/// `src_ld` apart) to `dst` (rows `dst_ld` apart), in 16-byte vectors (the kernel's `CopyJob`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyJob {
    src: u64,
    dst: u64,
    src_ld8: i32,
    dst_ld8: i32,
    rows: i32,
    cols8: i32,
}

impl CopyJob {
    /// Checks what the kernel needs: `cols` and both strides multiples of 8 (strides at least
    /// `cols`), both addresses 16-byte aligned.
    pub fn new(
        (dst, dst_ld): (u64, usize),
        (src, src_ld): (u64, usize),
        cols: usize,
        rows: usize,
    ) -> Result<Self, KernelError> {
        const K: &str = "copy_rows_batch";
        copy_shape(K, cols, src_ld, dst_ld)?;
        if !src.is_multiple_of(16) || !dst.is_multiple_of(16) {
            return Err(shape(K, "addresses must be 16-byte aligned".to_string()));
        }
        Ok(CopyJob {
            src,
            dst,
            src_ld8: to_i32(K, "src_ld", src_ld / 8)?,
            dst_ld8: to_i32(K, "dst_ld", dst_ld / 8)?,
            rows: to_i32(K, "rows", rows)?,
            cols8: to_i32(K, "cols", cols / 8)?,
        })
    }

    fn vectors(&self) -> usize {
        self.rows as usize * self.cols8 as usize
    }

    /// The kernel's 32-byte `CopyJob` as four little-endian words.
    fn words(&self) -> [u64; 4] {
        let pair = |lo: i32, hi: i32| lo as u32 as u64 | (hi as u32 as u64) << 32;
        [
            self.src,
            self.dst,
            pair(self.src_ld8, self.dst_ld8),
            pair(self.rows, self.cols8),
        ]
    }
}

/// A table of [`CopyJob`]s on the device, run by one [`Kernels::copy_rows_batch`] launch.
pub struct CopyTable {
    jobs: CudaSlice<u64>,
    count: usize,
    widest: usize,
}

impl CopyTable {
    /// Uploads `jobs`.
    ///
    /// # Safety
    /// Every job's `src` and `dst` must address live device buffers of the job's extent
    /// (`(rows - 1) * ld + cols` values), not overlapping, whenever the table is launched.
    pub unsafe fn new(stream: &Arc<CudaStream>, jobs: &[CopyJob]) -> Result<Self, KernelError> {
        let words: Vec<u64> = jobs.iter().flat_map(|j| j.words()).collect();
        Ok(CopyTable {
            jobs: stream.clone_htod(&words)?,
            count: jobs.len(),
            widest: jobs.iter().map(CopyJob::vectors).max().unwrap_or(0),
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl Kernels {
    /// Runs every copy of `table` in one launch (a grid row per job).
    pub fn copy_rows_batch(
        &self,
        stream: &CudaStream,
        table: &CopyTable,
    ) -> Result<(), KernelError> {
        const K: &str = "copy_rows_batch";
        if table.is_empty() {
            return Ok(());
        }
        let jobs = to_i32(K, "jobs", table.count)?;
        if jobs > 65_535 {
            return Err(shape(K, format!("{jobs} jobs, at most 65,535 per launch")));
        }
        let mut a = stream.launch_builder(&self.f.copy_rows_batch);
        a.arg(&table.jobs);
        let x = grid(table.widest, THREADS as usize, self.stride_cap());
        launch(
            a,
            LaunchConfig {
                grid_dim: (x, jobs as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_jobs_check_their_shape_and_pack_the_kernels_struct() {
        let job = CopyJob::new((0x1000, 4128), (0x2000, 16), 16, 4096).unwrap();
        // src, dst, (src_ld8 | dst_ld8 << 32), (rows | cols8 << 32): the kernel's CopyJob.
        assert_eq!(job.words(), [0x2000, 0x1000, 2 | 516 << 32, 4096 | 2 << 32]);
        assert_eq!(job.vectors(), 4096 * 2);
        // Columns or strides off the 16-byte grid, a stride shorter than a row, a misaligned
        // address: each would make the kernel read or write outside the rows it was given.
        for (dst, src, cols) in [
            ((0x1000, 4128), (0x2000, 16), 12),
            ((0x1000, 4124), (0x2000, 16), 16),
            ((0x1000, 8), (0x2000, 16), 16),
            ((0x1008, 4128), (0x2000, 16), 16),
            ((0x1000, 4128), (0x2000, 16), 0),
        ] {
            assert!(
                CopyJob::new(dst, src, cols, 1).is_err(),
                "{dst:?} {src:?} {cols}"
            );
        }
    }
}
