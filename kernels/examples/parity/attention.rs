//! Parity checks and the benchmark of the fused attention kernels (`attention.cu`).

use cudarc::driver::CudaSlice;
use ferrotune_kernels::device::{bf16, FlashBwdWork, FlashShape, FLASH_BLOCK};
use ferrotune_kernels::reference::attention::{self as rattn, Dims};
use ferrotune_kernels::reference::rope;
use ferrotune_kernels::rope::inv_freq;
use rand::Rng;

use super::{time_ms, Checks, Gpu, Res, BF16_TOL};

/// lse is fp32 but comes from bf16 products summed by the tensor cores and ex2/log2
/// approximations: 1e-4 relative (the outputs that matter, O and the gradients, are bf16).
const LSE_TOL: f64 = 1e-4;

/// Segment ids of one row of `t` tokens: samples of the given lengths, then one padding segment.
fn row_segments(t: usize, lens: &[usize]) -> Vec<u32> {
    let mut s = Vec::with_capacity(t);
    for (id, &len) in lens.iter().enumerate() {
        s.extend(std::iter::repeat_n(id as u32, len));
    }
    assert!(s.len() <= t, "sample lengths exceed the row");
    let pad = lens.len() as u32;
    s.resize(t, pad);
    s
}

/// The block classification `flash_seg_blocks` must produce.
fn seg_blocks_ref(seg: &[u32], batch: usize, t: usize) -> Vec<u32> {
    let nb = t.div_ceil(FLASH_BLOCK);
    let mut out = Vec::with_capacity(batch * nb * 2);
    for b in 0..batch {
        for kb in 0..nb {
            let toks = &seg[b * t + kb * FLASH_BLOCK..b * t + ((kb + 1) * FLASH_BLOCK).min(t)];
            out.push(toks[0]);
            out.push(toks.iter().all(|&s| s == toks[0]) as u32);
        }
    }
    out
}

struct Case {
    shape: FlashShape,
    /// Sample lengths per batch row (the rest of the row is padding).
    rows: Vec<Vec<usize>>,
}

fn cases() -> Vec<Case> {
    let s = |batch, seq, heads, kv_heads, head_dim, window| FlashShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
        window,
    };
    vec![
        // Llama-3 head size, GQA group 4, T not a multiple of 64, packed samples in row 1.
        Case {
            shape: s(2, 200, 8, 2, 128, 0),
            rows: vec![vec![200], vec![70, 1, 79, 30]],
        },
        // Sliding window (Mistral), head_dim 64, boundaries inside and on block edges.
        Case {
            shape: s(2, 130, 8, 2, 64, 40),
            rows: vec![vec![64, 64, 2], vec![130]],
        },
        // Block-aligned samples: whole tiles skipped by segment, tiles fully visible.
        Case {
            shape: s(2, 256, 4, 1, 128, 0),
            rows: vec![vec![64, 128, 64], vec![256]],
        },
        // head_dim 16 (the small test models), padded to the 64-wide kernels.
        Case {
            shape: s(2, 77, 8, 2, 16, 0),
            rows: vec![vec![30, 30], vec![77]],
        },
        // head_dim 96 (padded to 128), no GQA, long window crossing samples.
        Case {
            shape: s(1, 300, 4, 4, 96, 100),
            rows: vec![vec![150, 140]],
        },
        // head_dim 128 over an odd number of 64-token blocks, with samples packed across
        // block boundaries (whole-block skips next to per-element masks).
        Case {
            shape: s(2, 300, 8, 2, 128, 0),
            rows: vec![vec![300], vec![128, 44, 100, 28]],
        },
        // head_dim 128 with a sliding window shorter than a 128-key block.
        Case {
            shape: s(1, 333, 4, 1, 128, 90),
            rows: vec![vec![333]],
        },
        // Tiny: a single token, and a row shorter than a block.
        Case {
            shape: s(2, 1, 4, 2, 64, 0),
            rows: vec![vec![1], vec![1]],
        },
        Case {
            shape: s(1, 9, 4, 2, 32, 3),
            rows: vec![vec![4, 5]],
        },
    ]
}

/// One attention call on the device: its inputs (q, k, v, dO, segment ids), the block table,
/// and NaN-poisoned outputs and backward workspace — shared by the checks and the benchmark.
struct Call {
    s: FlashShape,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    d_o: CudaSlice<bf16>,
    seg: CudaSlice<u32>,
    blk: CudaSlice<u32>,
    o: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    dq_acc: CudaSlice<f32>,
    dq: CudaSlice<bf16>,
    dk: CudaSlice<bf16>,
    dv: CudaSlice<bf16>,
    /// RoPE tables (cos, sin) `[batch·seq, head_dim/2]`: when set, the backward folds the
    /// inverse rotation of dq and dk into its dQ conversion.
    rope: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

impl Call {
    fn new(
        g: &Gpu,
        s: FlashShape,
        (q, k, v, d_o): (
            CudaSlice<bf16>,
            CudaSlice<bf16>,
            CudaSlice<bf16>,
            CudaSlice<bf16>,
        ),
        seg: &[u32],
    ) -> Res<Self> {
        Ok(Self {
            s,
            q,
            k,
            v,
            d_o,
            seg: g.up(seg)?,
            blk: g.up(&vec![u32::MAX; s.seg_blocks_len()])?,
            o: g.poison_bf16(s.q_len())?,
            lse: g.poison_f32(s.lse_len())?,
            delta: g.poison_f32(s.lse_len())?,
            dq_acc: g.poison_f32(s.q_len())?,
            dq: g.poison_bf16(s.q_len())?,
            dk: g.poison_bf16(s.kv_len())?,
            dv: g.poison_bf16(s.kv_len())?,
            rope: None,
        })
    }

    fn seg_blocks(&mut self, g: &Gpu) -> Res<()> {
        g.k.flash_seg_blocks(
            &g.stream,
            &self.s,
            &self.seg.as_view(),
            &mut self.blk.as_view_mut(),
        )?;
        Ok(())
    }

    fn forward(&mut self, g: &Gpu) -> Res<()> {
        g.k.flash_attn_fwd(
            &g.stream,
            &self.s,
            (&self.q.as_view(), &self.k.as_view(), &self.v.as_view()),
            &self.seg.as_view(),
            &self.blk.as_view(),
            &mut self.o.as_view_mut(),
            &mut self.lse.as_view_mut(),
        )?;
        Ok(())
    }

    fn backward(&mut self, g: &Gpu) -> Res<()> {
        g.k.flash_attn_bwd(
            &g.stream,
            &self.s,
            (&self.q.as_view(), &self.k.as_view(), &self.v.as_view()),
            (&self.o.as_view(), &self.d_o.as_view(), &self.lse.as_view()),
            &self.seg.as_view(),
            &self.blk.as_view(),
            FlashBwdWork {
                delta: &mut self.delta.as_view_mut(),
                dq_acc: &mut self.dq_acc.as_view_mut(),
            },
            (
                &mut self.dq.as_view_mut(),
                &mut self.dk.as_view_mut(),
                &mut self.dv.as_view_mut(),
            ),
            self.rope
                .as_ref()
                .map(|(cos, sin)| (cos.as_view(), sin.as_view())),
        )?;
        Ok(())
    }
}

/// cos/sin tables of random positions (packed samples restart theirs, so any position can sit
/// next to any other) at Llama-3's base.
fn rope_tables(g: &mut Gpu, s: FlashShape) -> (Vec<f32>, Vec<f32>) {
    let pos: Vec<u32> = (0..s.batch * s.seq)
        .map(|_| g.rng.random_range(0..8192))
        .collect();
    rope::cos_sin(&pos, &inv_freq(s.head_dim, 500_000.0, None))
}

pub fn check(g: &mut Gpu, c: &mut Checks) -> Res<()> {
    for case in cases() {
        let s = case.shape;
        let dims = Dims {
            batch: s.batch,
            seq: s.seq,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            window: s.window,
        };
        let tag = format!(
            "B{} T{} H{}/{} d{} w{} rows {:?}",
            s.batch, s.seq, s.heads, s.kv_heads, s.head_dim, s.window, case.rows
        );
        let seg: Vec<u32> = case
            .rows
            .iter()
            .flat_map(|lens| row_segments(s.seq, lens))
            .collect();
        let q = g.randn_bf16(s.q_len(), 1.0);
        let k = g.randn_bf16(s.kv_len(), 1.0);
        let v = g.randn_bf16(s.kv_len(), 1.0);
        let d_o = g.randn_bf16(s.q_len(), 1.0);
        let inputs = (
            g.up_bf16(&q)?,
            g.up_bf16(&k)?,
            g.up_bf16(&v)?,
            g.up_bf16(&d_o)?,
        );
        let mut call = Call::new(g, s, inputs, &seg)?;
        call.seg_blocks(g)?;
        c.exact(
            &format!("flash_seg_blocks {tag}"),
            &g.down(&call.blk)?,
            &seg_blocks_ref(&seg, s.batch, s.seq),
        );

        call.forward(g)?;
        let (o_ref, lse_ref) = rattn::forward(&q, &k, &v, &seg, &dims);
        c.close(
            &format!("flash_fwd o {tag}"),
            &g.down_bf16(&call.o)?,
            &o_ref,
            BF16_TOL,
        );
        c.close(
            &format!("flash_fwd lse {tag}"),
            &g.down(&call.lse)?,
            &lse_ref,
            LSE_TOL,
        );

        // Every backward kernel this GPU runs, each from NaN-poisoned outputs, without and
        // with the inverse RoPE folded in (then dq and dk are the reference's rotated back).
        let (dq_ref, dk_ref, dv_ref) = rattn::backward(&q, &k, &v, &d_o, &seg, &dims);
        let (cos, sin) = rope_tables(g, s);
        let tokens = s.batch * s.seq;
        let (mut dq_rot, mut dk_rot) = (dq_ref.clone(), dk_ref.clone());
        let (hq, hk, d) = (s.heads, s.kv_heads, s.head_dim);
        rope::apply(&mut dq_rot, hq * d, hq, d, &cos, &sin, tokens, -1.0);
        rope::apply(&mut dk_rot, hk * d, hk, d, &cos, &sin, tokens, -1.0);
        let chosen = g.k.flash_bwd_kernel();
        for kernel in g.k.flash_bwd_kernels() {
            g.k.set_flash_bwd_kernel(kernel)?;
            for rotated in [false, true] {
                call.rope = if rotated {
                    Some((g.up(&cos)?, g.up(&sin)?))
                } else {
                    None
                };
                call.dq = g.poison_bf16(s.q_len())?;
                call.dk = g.poison_bf16(s.kv_len())?;
                call.dv = g.poison_bf16(s.kv_len())?;
                call.backward(g)?;
                let (dq_want, dk_want) = if rotated {
                    (&dq_rot, &dk_rot)
                } else {
                    (&dq_ref, &dk_ref)
                };
                let rope_tag = if rotated { "+rope" } else { "" };
                for (name, got, want) in [
                    ("dq", &call.dq, dq_want),
                    ("dk", &call.dk, dk_want),
                    ("dv", &call.dv, &dv_ref),
                ] {
                    c.close(
                        &format!("flash_bwd[{}]{rope_tag} {name} {tag}", kernel.name()),
                        &g.down_bf16(got)?,
                        want,
                        BF16_TOL,
                    );
                }
            }
        }
        call.rope = None;
        g.k.set_flash_bwd_kernel(chosen)?;
    }
    Ok(())
}

/// Times forward and backward (every backward kernel the GPU runs) at Llama-3-8B (d 128) and
/// Llama-3.2-1B (d 64) attention shapes, batch 2 x 2048: one sample per row (the causal
/// triangle), and rows packed with 8 samples (segment skipping); and 8B at batch 1 x 32768.
/// TFLOP/s count the causal work of one unpacked row: forward 2·2·B·H·T²·d/2, backward 2.5×
/// that.
pub fn bench(g: &mut Gpu) -> Res<()> {
    println!("\nbench-attn (CUDA events, median of 20 after 3 warm-ups)");
    // (model, heads, kv heads, head_dim, batch, seq, samples per row): the benchmark's
    // training shapes, and 8B at batch 1 × 32k (the long-sequence QLoRA run).
    let shapes = [
        ("llama3-8b", 32, 8, 128, 2, 2048, 1usize),
        ("llama3-8b", 32, 8, 128, 2, 2048, 8),
        ("llama3.2-1b", 32, 8, 64, 2, 2048, 1),
        ("llama3.2-1b", 32, 8, 64, 2, 2048, 8),
        ("llama3-8b", 32, 8, 128, 1, 32768, 1),
    ];
    for (name, heads, kv_heads, head_dim, batch, seq, samples) in shapes {
        let s = FlashShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            window: 0,
        };
        let lens = vec![s.seq / samples; samples];
        let seg: Vec<u32> = (0..s.batch)
            .flat_map(|_| row_segments(s.seq, &lens))
            .collect();
        let inputs = (
            g.rand_bf16_dev(s.q_len(), 1.0)?,
            g.rand_bf16_dev(s.kv_len(), 1.0)?,
            g.rand_bf16_dev(s.kv_len(), 1.0)?,
            g.rand_bf16_dev(s.q_len(), 1.0)?,
        );
        let mut call = Call::new(g, s, inputs, &seg)?;
        let fwd_ms = time_ms(g, || {
            call.seg_blocks(g)?;
            call.forward(g)
        })?;
        let chosen = g.k.flash_bwd_kernel();
        let mut others = String::new();
        for kernel in g.k.flash_bwd_kernels() {
            if kernel != chosen {
                g.k.set_flash_bwd_kernel(kernel)?;
                let ms = time_ms(g, || call.backward(g))?;
                others += &format!("   bwd[{}] {ms:>7.3} ms", kernel.name());
            }
        }
        g.k.set_flash_bwd_kernel(chosen)?;
        let bwd_ms = time_ms(g, || call.backward(g))?;
        let (b, h, t, d) = (
            s.batch as f64,
            s.heads as f64,
            s.seq as f64,
            s.head_dim as f64,
        );
        let fwd_flop = 2.0 * 2.0 * b * h * t * t * d / 2.0;
        let bwd_flop = 2.5 * fwd_flop;
        let tf = |flop: f64, ms: f32| flop / (ms as f64 * 1e-3) / 1e12;
        println!(
            "bench-attn {name:<12} B{batch} T{seq} H{heads}/{kv_heads} d{head_dim} samples/row {samples}: \
             fwd {fwd_ms:>7.3} ms {:>6.1} TFLOP/s   bwd[{}] {bwd_ms:>7.3} ms {:>6.1} TFLOP/s \
             ({} stages)   fwd+bwd {:>7.3} ms{others}",
            tf(fwd_flop, fwd_ms),
            chosen.name(),
            tf(bwd_flop, bwd_ms),
            g.k.flash_bwd_stages(&s),
            fwd_ms + bwd_ms
        );
    }
    Ok(())
}
