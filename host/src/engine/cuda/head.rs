//! The model's head: final RMSNorm, the LM head in row chunks and the cross-entropy (so the
//! full `[N, V]` logits never exist), and the gradient back into the last layer's output.

use anyhow::Result;
use cudarc::driver::DevicePtr;

use super::buffers::Buffers;
use super::gemm;
use super::CudaBackend;

impl CudaBackend {
    /// Final norm, chunked LM head and cross-entropy; with `loss_scale`, also `∂L/∂xs[L]` into
    /// `dres`. Returns the loss sum.
    pub(super) fn head(&mut self, b: &mut Buffers, loss_scale: Option<f32>) -> Result<f64> {
        let s = self.stream.clone();
        let sz = b.sizes;
        let (n, hd, vocab) = (sz.tokens, sz.hidden, sz.vocab);
        let eps = self.cfg.rms_norm_eps as f32;
        let last = &b.xs[b.x_index(self.cfg.num_hidden_layers)];
        self.kernels.rmsnorm_fwd(
            &s,
            &last.slice(..),
            &self.final_norm.slice(..),
            (&mut b.hn.slice_mut(..), hd),
            &mut b.rstd_f.slice_mut(..),
            n,
            hd,
            eps,
        )?;
        let w = self
            .lm_head
            .as_ref()
            .unwrap_or(&self.embed)
            .device_ptr(&s)
            .0;
        let (hn, logits, dn) = (
            b.hn.device_ptr(&s).0,
            b.mlp.device_ptr(&s).0, // the logits chunk
            b.dn.device_ptr(&s).0,
        );
        let mut r0 = 0;
        while r0 < n {
            let rows = sz.ce_rows.min(n - r0);
            let off = (2 * r0 * hd) as u64;
            let p = gemm::Problem {
                m: rows,
                n: vocab,
                k: hd,
                batch: 1,
                a: gemm::Operand::new(hn + off, hd),
                b: gemm::Operand::new(w, hd).t(),
                d: gemm::Output::new(logits, vocab, gemm::OutType::Bf16),
                alpha: 1.0,
                beta: 0.0,
            };
            // SAFETY: hn is [N, H], the LM head [V, H], logits [ce_rows, V].
            unsafe { self.gemm.run(&p)? };
            let targets = b.targets.slice(r0..r0 + rows);
            self.kernels.ce_stats(
                &s,
                &b.mlp.slice(..sz.ce_rows * vocab),
                vocab,
                rows,
                0,
                vocab,
                &targets,
                &mut b.ce,
                true,
                true,
            )?;
            s.memcpy_dtod(
                &b.ce.loss.slice(..rows),
                &mut b.losses.slice_mut(r0..r0 + rows),
            )?;
            if let Some(scale) = loss_scale {
                self.kernels.ce_grad(
                    &s,
                    &mut b.mlp.slice_mut(..sz.ce_rows * vocab),
                    vocab,
                    rows,
                    0,
                    vocab,
                    &targets,
                    &b.ce.lse.slice(..),
                    scale,
                )?;
                let p = gemm::Problem {
                    m: rows,
                    n: hd,
                    k: vocab,
                    batch: 1,
                    a: gemm::Operand::new(logits, vocab),
                    b: gemm::Operand::new(w, hd),
                    d: gemm::Output::new(dn + off, hd, gemm::OutType::Bf16),
                    alpha: 1.0,
                    beta: 0.0,
                };
                // SAFETY: as above; dn is [N, H].
                unsafe { self.gemm.run(&p)? };
            }
            r0 += rows;
        }
        if loss_scale.is_some() {
            self.kernels.rmsnorm_bwd(
                &s,
                &last.slice(..),
                &self.final_norm.slice(..),
                &b.rstd_f.slice(..),
                &b.dn.slice(..),
                (&mut b.dres.slice_mut(..), self.dres_ld()),
                n,
                hd,
                false,
            )?;
        }
        self.kernels.sum(
            &s,
            &b.losses.slice(..),
            1.0,
            &mut b.partials.slice_mut(..),
            &mut b.loss_sum.slice_mut(..),
        )?;
        Ok(s.clone_dtoh(&b.loss_sum)?[0] as f64)
    }
}
