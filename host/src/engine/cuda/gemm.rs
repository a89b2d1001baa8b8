//! Every matrix product of the cuda engine, through cuBLASLt: bf16 operands, fp32 accumulation,
//! bf16 or fp32 output, transposes expressed in the layouts (no copies), strided batches for
//! attention heads.
//!
//! The engine thinks in row-major matrices; cuBLASLt in column-major ones. A row-major `[R, C]`
//! buffer with row stride `ld` *is* a column-major `[C, R]` matrix with leading dimension `ld`,
//! so `D = op(A)·op(B)` row-major is computed as `Dᵀ = op(B)ᵀ·op(A)ᵀ` column-major: the operands
//! swap places and nothing moves in memory.
//!
//! Descriptors, layouts and the heuristic's algorithm are built once per distinct problem and
//! cached: a training step repeats the same few dozen shapes every layer, so after the first
//! step a GEMM is one `cublasLtMatmul` call.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

/// Element type of a GEMM's output (and of its `C` input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutType {
    Bf16,
    F32,
}

impl OutType {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            OutType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            OutType::F32 => sys::cudaDataType::CUDA_R_32F,
        }
    }
}

/// A bf16 operand stored row-major at `ptr` with row stride `ld` elements. With `t` the stored
/// matrix is the operand's transpose (`[K, M]` for a left operand of `M×K`).
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub ld: usize,
    pub t: bool,
    /// Elements between consecutive matrices of a strided batch.
    pub stride: usize,
}

impl Operand {
    pub fn new(ptr: u64, ld: usize) -> Self {
        Operand {
            ptr,
            ld,
            t: false,
            stride: 0,
        }
    }

    pub fn t(self) -> Self {
        Operand { t: !self.t, ..self }
    }

    /// Strided batches of `stride` elements (no caller since attention is fused).
    #[allow(dead_code)]
    pub fn batched(self, stride: usize) -> Self {
        Operand { stride, ..self }
    }
}

/// The output `D` (row-major `[M, N]`, row stride `ld`) and, when `beta != 0`, the matrix `C`
/// that is added (`D = alpha·op(A)·op(B) + beta·C`); `c` defaults to `D` itself. With `bias`
/// (bf16 `[N]`, bf16 `D` only) cuBLASLt's bias epilogue adds it to every row of `D`.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub ptr: u64,
    pub ld: usize,
    pub ty: OutType,
    pub stride: usize,
    pub c: Option<u64>,
    pub bias: Option<u64>,
}

impl Output {
    pub fn new(ptr: u64, ld: usize, ty: OutType) -> Self {
        Output {
            ptr,
            ld,
            ty,
            stride: 0,
            c: None,
            bias: None,
        }
    }

    /// Strided batches of `stride` elements (no caller since attention is fused).
    #[allow(dead_code)]
    pub fn batched(self, stride: usize) -> Self {
        Output { stride, ..self }
    }

    /// Reads `C` from another buffer of the same layout (`D = A·B + C` without a copy).
    pub fn plus(self, c: u64) -> Self {
        Output { c: Some(c), ..self }
    }

    /// Adds the bf16 vector at `bias` (`[N]`, one value per output column) to every row, in
    /// the GEMM's epilogue (projection biases: no extra pass over `D`).
    pub fn bias(self, bias: u64) -> Self {
        Output {
            bias: Some(bias),
            ..self
        }
    }
}

/// A GEMM problem: `D[M, N] = alpha·op(A)[M, K]·op(B)[K, N] + beta·C`, `batch` times.
#[derive(Debug, Clone, Copy)]
pub struct Problem {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub a: Operand,
    pub b: Operand,
    pub d: Output,
    pub alpha: f32,
    pub beta: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    a: (usize, bool, usize),
    b: (usize, bool, usize),
    d: (usize, usize, OutType),
    /// Bias epilogue on (the pointer itself is set per call).
    bias: bool,
    /// Guaranteed byte alignment of A, B, C, D (every matrix of a batch).
    align: [u32; 4],
}

/// The alignment cuBLASLt may assume for a matrix at `ptr` (and `ptr + i·stride` elements of
/// `elem` bytes in a batch): the lowest set bit, capped at the 256 bytes its heuristics assume
/// by default. Views into the middle of a buffer (attention heads, LM-head chunks, the LoRA
/// arena) are less aligned, and an algorithm that needs more would read out of bounds.
fn alignment(ptr: u64, stride: usize, elem: usize) -> u32 {
    let bits = ptr | (stride * elem) as u64 | 256;
    1 << bits.trailing_zeros()
}

/// cuBLASLt objects for one problem shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this plan and is destroyed once; errors at
        // teardown cannot be acted on.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// The cuBLASLt handle, its workspace and the plan cache, bound to one stream.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    plans: HashMap<Key, Plan>,
}

/// cuBLASLt's recommended workspace on Hopper (32 MiB; 4 MiB suffices before it).
const WORKSPACE_BYTES: usize = 32 << 20;

impl Gemm {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: probing for the library only dlopens it.
        if !unsafe { sys::is_culib_present() } {
            anyhow::bail!(
                "libcublasLt was not found: install the CUDA 12/13 runtime libraries (or the \
                 nvidia-cublas pip wheel) and put them on LD_LIBRARY_PATH"
            );
        }
        let handle = lt::create_handle().map_err(|e| anyhow::anyhow!("cublasLtCreate: {e}"))?;
        // SAFETY: the workspace is scratch for cuBLASLt only; its contents are never read.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }?;
        Ok(Gemm {
            handle,
            stream,
            workspace,
            plans: HashMap::new(),
        })
    }

    /// The stream every GEMM is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Enqueues one GEMM on the stream.
    ///
    /// # Safety
    /// Every pointer must address device memory that holds the matrices the problem describes
    /// (with their strides and batch), alive until the stream has run the GEMM.
    pub unsafe fn run(&mut self, p: &Problem) -> Result<()> {
        if p.m == 0 || p.n == 0 {
            return Ok(());
        }
        let key = Key {
            m: p.m,
            n: p.n,
            k: p.k,
            batch: p.batch,
            a: (p.a.ld, p.a.t, p.a.stride),
            b: (p.b.ld, p.b.t, p.b.stride),
            d: (p.d.ld, p.d.stride, p.d.ty),
            bias: p.d.bias.is_some(),
            align: Self::alignments(p),
        };
        if !self.plans.contains_key(&key) {
            let plan = self
                .plan(p)
                .with_context(|| format!("cuBLASLt has no kernel for {p:?}"))?;
            self.plans.insert(key, plan);
        }
        let plan = &self.plans[&key];
        if let Some(bias) = p.d.bias {
            // The plan is shared by every bias of this shape: point it at this one.
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&bias) as *const u64 as *const c_void,
                size_of::<u64>(),
            )
            .map_err(|e| anyhow::anyhow!("bias pointer: {e}"))?;
        }
        let (ws, _sync) = self.workspace.device_ptr(&self.stream);
        let c = p.d.c.unwrap_or(p.d.ptr);
        // Column-major: A' = B, B' = A (see the module comment).
        lt::matmul(
            self.handle,
            plan.desc,
            (&p.alpha) as *const f32 as *const c_void,
            (&p.beta) as *const f32 as *const c_void,
            p.b.ptr as *const c_void,
            plan.b,
            p.a.ptr as *const c_void,
            plan.a,
            c as *const c_void,
            plan.d,
            p.d.ptr as *mut c_void,
            plan.d,
            &plan.algo,
            ws as *mut c_void,
            WORKSPACE_BYTES,
            self.stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(|e| anyhow::anyhow!("cublasLtMatmul: {e}"))
    }

    /// `[A', B', C, D]` alignments in cuBLASLt's (column-major, swapped) naming.
    fn alignments(p: &Problem) -> [u32; 4] {
        let out = match p.d.ty {
            OutType::Bf16 => 2,
            OutType::F32 => 4,
        };
        [
            alignment(p.b.ptr, p.b.stride, 2),
            alignment(p.a.ptr, p.a.stride, 2),
            alignment(p.d.c.unwrap_or(p.d.ptr), p.d.stride, out),
            alignment(p.d.ptr, p.d.stride, out),
        ]
    }

    fn plan(&self, p: &Problem) -> Result<Plan> {
        let err = |what: &str, e: lt::CublasError| anyhow::anyhow!("{what}: {e}");
        let bf16 = sys::cudaDataType::CUDA_R_16BF;
        // Column-major views: A (row-major M×K, or K×M stored when transposed) is the right
        // operand B' of the column-major product; B is the left operand A'.
        let (a_rows, a_cols) = if p.a.t { (p.m, p.k) } else { (p.k, p.m) };
        let (b_rows, b_cols) = if p.b.t { (p.k, p.n) } else { (p.n, p.k) };
        let layout = |ty, rows: usize, cols: usize, ld: usize, stride: usize| -> Result<_> {
            let l = lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
                .map_err(|e| err("cublasLtMatrixLayoutCreate", e))?;
            if p.batch > 1 {
                let count = p.batch as i32;
                let stride = stride as i64;
                // SAFETY: attribute buffers are live locals of the documented types.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count) as *const i32 as *const c_void,
                        size_of::<i32>(),
                    )
                    .map_err(|e| err("batch count", e))?;
                    lt::set_matrix_layout_attribute(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&stride) as *const i64 as *const c_void,
                        size_of::<i64>(),
                    )
                    .map_err(|e| err("batch stride", e))?;
                }
            }
            Ok(l)
        };
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| err("cublasLtMatmulDescCreate", e))?;
        let mut plan = Plan {
            desc,
            a: layout(bf16, a_rows, a_cols, p.a.ld, p.a.stride)?,
            b: layout(bf16, b_rows, b_cols, p.b.ld, p.b.stride)?,
            d: layout(p.d.ty.cuda(), p.n, p.m, p.d.ld, p.d.stride)?,
            // SAFETY: a plain C struct of integers; overwritten by the heuristic below.
            algo: unsafe { std::mem::zeroed() },
        };
        let op = |t: bool| -> i32 { t as i32 };
        // SAFETY: descriptor attributes from live locals of the documented types.
        unsafe {
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&op(p.b.t)) as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .map_err(|e| err("transa", e))?;
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                (&op(p.a.t)) as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .map_err(|e| err("transb", e))?;
            if let Some(bias) = p.d.bias {
                anyhow::ensure!(
                    p.d.ty == OutType::Bf16 && p.batch == 1,
                    "the bias epilogue is used with one bf16 output only"
                );
                let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    (&epilogue) as *const sys::cublasLtEpilogue_t as *const c_void,
                    size_of::<sys::cublasLtEpilogue_t>(),
                )
                .map_err(|e| err("epilogue", e))?;
                // The heuristic may look at the pointer's alignment.
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&bias) as *const u64 as *const c_void,
                    size_of::<u64>(),
                )
                .map_err(|e| err("bias pointer", e))?;
            }
            let pref = lt::create_matmul_pref().map_err(|e| err("preference", e))?;
            let ws = WORKSPACE_BYTES;
            let set = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const usize as *const c_void,
                size_of::<usize>(),
            );
            let attrs = [
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ];
            let set = attrs
                .iter()
                .zip(Self::alignments(p))
                .fold(set, |acc, (attr, align)| {
                    acc.and_then(|_| {
                        lt::set_matmul_pref_attribute(
                            pref,
                            *attr,
                            (&align) as *const u32 as *const c_void,
                            size_of::<u32>(),
                        )
                    })
                });
            let heuristic = set.and_then(|_| {
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    plan.desc,
                    plan.b,
                    plan.a,
                    plan.d,
                    plan.d,
                    pref,
                )
            });
            let _ = lt::destroy_matmul_pref(pref);
            plan.algo = heuristic
                .map_err(|e| err("cublasLtMatmulAlgoGetHeuristic", e))?
                .algo;
        }
        Ok(plan)
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once, after every plan that used it.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_weakest_over_the_batch_and_capped_at_256() {
        assert_eq!(alignment(0x7f00_0000_0000, 0, 2), 256);
        assert_eq!(alignment(0x7f00_0000_0080, 0, 2), 128);
        // Heads 64 bf16 apart: every other head starts only 128-byte aligned.
        assert_eq!(alignment(0x7f00_0000_0000, 64, 2), 128);
        assert_eq!(alignment(0x7f00_0000_0002, 0, 2), 2);
    }
}
