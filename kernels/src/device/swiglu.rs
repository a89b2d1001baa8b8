//! SwiGLU launchers (`swiglu.cu`): the forward and the in-place backward over gate/up.

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, PushKernelArg};

use super::{
    aligned16, bf16, cfg, check_len, grid, launch, shape, strided_len, to_i32, Kernels, NULL_PTR,
    THREADS,
};
use crate::KernelError;

impl Kernels {
    /// h = silu(g) * u over [rows, cols] with row strides (elements).
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_fwd(
        &self,
        stream: &CudaStream,
        g: (&CudaView<bf16>, usize),
        u: (&CudaView<bf16>, usize),
        h: (&mut CudaViewMut<bf16>, usize),
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "swiglu_fwd";
        swiglu_check(
            K,
            cols,
            rows,
            &[
                ("g", g.0.len(), g.1),
                ("u", u.0.len(), u.1),
                ("h", h.0.len(), h.1),
            ],
        )?;
        aligned16(K, "g", g.0, stream)?;
        aligned16(K, "u", u.0, stream)?;
        aligned16(K, "h", &*h.0, stream)?;
        let (gs, us, hs) = (g.1 as i32, u.1 as i32, h.1 as i32);
        let (r_i, c_i) = (to_i32(K, "rows", rows)?, to_i32(K, "cols", cols)?);
        let mut a = stream.launch_builder(&self.f.swiglu_fwd);
        a.arg(g.0)
            .arg(&gs)
            .arg(u.0)
            .arg(&us)
            .arg(h.0)
            .arg(&hs)
            .arg(&r_i)
            .arg(&c_i);
        launch(
            a,
            cfg(
                grid(rows * cols / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }

    /// SwiGLU backward in place: g becomes dg, u becomes du; `h`, when given, receives the
    /// recomputed forward output.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_bwd(
        &self,
        stream: &CudaStream,
        dh: (&CudaView<bf16>, usize),
        g: (&mut CudaViewMut<bf16>, usize),
        u: (&mut CudaViewMut<bf16>, usize),
        h: Option<(&mut CudaViewMut<bf16>, usize)>,
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "swiglu_bwd";
        let hv = h.as_ref().map(|(h, hs)| (&**h, *hs));
        swiglu_bwd_check(K, stream, dh, (&*g.0, g.1), (&*u.0, u.1), hv, rows, cols)?;
        let (ds, gs, us) = (dh.1 as i32, g.1 as i32, u.1 as i32);
        let (r_i, c_i) = (to_i32(K, "rows", rows)?, to_i32(K, "cols", cols)?);
        let mut a = stream.launch_builder(&self.f.swiglu_bwd);
        a.arg(dh.0).arg(&ds).arg(g.0).arg(&gs).arg(u.0).arg(&us);
        let hs;
        match h {
            Some((h, stride)) => {
                hs = stride as i32;
                a.arg(h);
            }
            None => {
                hs = 0;
                a.arg(&NULL_PTR);
            }
        }
        a.arg(&hs).arg(&r_i).arg(&c_i);
        launch(
            a,
            cfg(
                grid(rows * cols / 8, THREADS as usize, self.stride_cap()),
                (THREADS, 1),
            ),
        )
    }
}

/// The SwiGLU backward's layout contract (`swiglu_bwd`, `swiglu_lora_bwd`): `dh`, `g`, `u` and
/// the optional `h` `[rows, cols]` at their row strides, each 16-byte aligned.
#[allow(clippy::too_many_arguments)]
pub(super) fn swiglu_bwd_check(
    kernel: &'static str,
    stream: &CudaStream,
    dh: (&CudaView<bf16>, usize),
    g: (&CudaViewMut<bf16>, usize),
    u: (&CudaViewMut<bf16>, usize),
    h: Option<(&CudaViewMut<bf16>, usize)>,
    rows: usize,
    cols: usize,
) -> Result<(), KernelError> {
    let mut bufs = vec![
        ("dh", dh.0.len(), dh.1),
        ("g", g.0.len(), g.1),
        ("u", u.0.len(), u.1),
    ];
    if let Some((h, hs)) = &h {
        bufs.push(("h", h.len(), *hs));
    }
    swiglu_check(kernel, cols, rows, &bufs)?;
    aligned16(kernel, "dh", dh.0, stream)?;
    aligned16(kernel, "g", g.0, stream)?;
    aligned16(kernel, "u", u.0, stream)?;
    if let Some((h, _)) = h {
        aligned16(kernel, "h", h, stream)?;
    }
    Ok(())
}

pub(super) fn swiglu_check(
    kernel: &'static str,
    cols: usize,
    rows: usize,
    bufs: &[(&str, usize, usize)],
) -> Result<(), KernelError> {
    if !cols.is_multiple_of(8) {
        return Err(shape(
            kernel,
            format!("cols {cols} must be a multiple of 8"),
        ));
    }
    for &(what, len, stride) in bufs {
        if !stride.is_multiple_of(8) || stride < cols {
            return Err(shape(
                kernel,
                format!("{what} row stride {stride} must be a multiple of 8 and >= cols {cols}"),
            ));
        }
        to_i32(kernel, "stride", stride)?;
        check_len(kernel, what, len, strided_len(rows, stride, cols))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_contract_rejects_what_the_kernels_cannot_read() {
        assert!(swiglu_check("t", 16, 2, &[("g", 32, 16)]).is_ok());
        // Strided rows need (rows-1)*stride + cols elements, not rows*stride.
        assert!(swiglu_check("t", 16, 2, &[("g", 40, 24)]).is_ok());
        assert!(swiglu_check("t", 16, 2, &[("g", 39, 24)]).is_err());
        assert!(swiglu_check("t", 12, 2, &[("g", 24, 12)]).is_err());
        assert!(swiglu_check("t", 16, 2, &[("g", 64, 20)]).is_err());
    }
}
