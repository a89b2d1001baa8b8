//! Parity checks of the embedding gather and the row-copy kernels.

use cudarc::driver::{CudaSlice, DevicePtr};
use ferrotune_kernels::device::{bf16, CopyJob, CopyTable};
use rand::Rng;

use super::{bits_eq, strided_want, Checks, Gpu, Res};

pub fn check_embedding(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    let (vocab, dim, tokens) = (1000usize, 264usize, 77usize);
    let table = g.randn_bf16(vocab * dim, 1.0);
    let mut ids: Vec<u32> = (0..tokens)
        .map(|_| g.rng.random_range(0..vocab as u32))
        .collect();
    ids[5] = vocab as u32 + 7; // out of range: zero row, no out-of-bounds read
    let (td, idd) = (g.up_bf16(&table)?, g.up(&ids)?);
    let mut out = g.poison_bf16(tokens * dim)?;
    g.k.embedding_gather(
        &g.stream,
        &idd.as_view(),
        &td.as_view(),
        &mut out.as_view_mut(),
        dim,
    )?;
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&i| {
            if (i as usize) < vocab {
                table[i as usize * dim..(i as usize + 1) * dim].to_vec()
            } else {
                vec![0.0; dim]
            }
        })
        .collect();
    let (a, b) = bits_eq(&g.down_bf16(&out)?, &want);
    c.exact(&format!("embedding_gather [{tokens}x{dim}]"), &a, &b);

    // Strided row copies both ways: 16 columns out of rows 264 apart (from column 8) into a
    // dense buffer, and back into rows 24 apart (at column 8); nothing else written.
    let (cols, src_ld, at) = (16usize, dim, 8usize);
    let mut dense = g.poison_bf16(tokens * cols)?;
    g.k.copy_rows(
        &g.stream,
        (&out.slice(at..), src_ld),
        (&mut dense.as_view_mut(), cols),
        tokens,
        cols,
    )?;
    let picked: Vec<f32> = want
        .chunks_exact(dim)
        .flat_map(|row| row[at..at + cols].to_vec())
        .collect();
    let (a, b) = bits_eq(&g.down_bf16(&dense)?, &picked);
    c.exact(
        &format!("copy_rows [{tokens}x{cols}] from rows {src_ld} apart"),
        &a,
        &b,
    );
    let dst_ld = 24;
    let mut sparse = g.poison_bf16(tokens * dst_ld)?;
    g.k.copy_rows(
        &g.stream,
        (&dense.as_view(), cols),
        (&mut sparse.slice_mut(at..), dst_ld),
        tokens,
        cols,
    )?;
    let want = strided_want(&picked, cols, dst_ld, at, tokens * dst_ld);
    let (a, b) = bits_eq(&g.down_bf16(&sparse)?, &want);
    c.exact(
        &format!("copy_rows [{tokens}x{cols}] into rows {dst_ld} apart"),
        &a,
        &b,
    );

    // The same two copies as one batched launch (jobs of different sizes: the second also
    // takes one row of 8 more), into fresh poisoned buffers.
    let (dense2, sparse2) = (
        g.poison_bf16(tokens * cols)?,
        g.poison_bf16(tokens * dst_ld)?,
    );
    let ptr = |x: &CudaSlice<bf16>| x.device_ptr(&g.stream).0;
    let jobs = [
        CopyJob::new(
            (ptr(&dense2), cols),
            (ptr(&out) + 2 * at as u64, src_ld),
            cols,
            tokens,
        )?,
        CopyJob::new(
            (ptr(&sparse2) + 2 * at as u64, dst_ld),
            (ptr(&dense), cols),
            cols,
            tokens,
        )?,
        CopyJob::new((ptr(&sparse2), dst_ld), (ptr(&dense), cols), 8, 1)?,
    ];
    // SAFETY: each job stays inside its buffers (the shapes of the single copies above; the
    // third writes the 8 values before column `at` of row 0), all alive until the reads below.
    let table = unsafe { CopyTable::new(&g.stream, &jobs)? };
    g.k.copy_rows_batch(&g.stream, &table)?;
    let (a, b) = bits_eq(&g.down_bf16(&dense2)?, &picked);
    c.exact(&format!("copy_rows_batch [{tokens}x{cols}] gather"), &a, &b);
    let mut want = want;
    want[..8].copy_from_slice(&picked[..8]);
    let (a, b) = bits_eq(&g.down_bf16(&sparse2)?, &want);
    c.exact(
        &format!("copy_rows_batch [{tokens}x{cols}] scatter"),
        &a,
        &b,
    );
    Ok(())
}
