//! The device side of `--use_gradient_checkpointing unsloth`: which buffers each parked group
//! is, the pinned host buffers sized for them, and the park/fetch calls the step makes.

use anyhow::Result;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr};
use ferrotune_kernels::device::bf16;

use super::buffers::{Buffers, Sizes};
use super::offload::{self, Group, Layout, Offload, Parked, Parking, Range};
use super::projections::{DOWN_PROJ, O_PROJ};
use super::CudaBackend;

impl CudaBackend {
    /// The device side of a parked group: the activation buffers of slot 0 (offload runs with
    /// checkpointing) and, for [`Group::Input`], layer `l`'s `xs` buffer.
    fn parcels(&self, b: &Buffers, l: usize, g: Group) -> Vec<Range> {
        let s = &self.stream;
        fn whole<T>(s: &CudaStream, x: &CudaSlice<T>) -> Range {
            Range {
                ptr: x.device_ptr(s).0,
                bytes: x.num_bytes(),
            }
        }
        let a = &b.acts[0];
        match g {
            Group::Input => vec![whole(s, &b.xs[b.x_index(l)])],
            Group::Output => vec![whole(s, &a.attn)],
            Group::Residual => {
                let (n, r) = (b.sizes.tokens, b.sizes.rank.max(1));
                let lows = |j: std::ops::Range<usize>| Range {
                    ptr: a.low(s, j.start, n, r),
                    bytes: j.len() * n * r * std::mem::size_of::<bf16>(),
                };
                // o, gate, up, down are consecutive in PROJECTIONS: their lows are one block.
                vec![whole(s, &a.h), lows(O_PROJ..DOWN_PROJ + 1)]
            }
            Group::Operands => vec![
                whole(s, &a.q),
                whole(s, &a.k),
                whole(s, &a.v),
                whole(s, &a.lse),
            ],
            Group::Logsumexp => vec![whole(s, &a.lse)],
            Group::Lows | Group::QkvLows => {
                let (n, r) = (b.sizes.tokens, b.sizes.rank.max(1));
                // q, k, v come first in PROJECTIONS: their lows are one block.
                let mut v = vec![Range {
                    ptr: a.low(s, 0, n, r),
                    bytes: 3 * n * r * std::mem::size_of::<bf16>(),
                }];
                let qk = self.extras.as_ref().and_then(|e| e.qk.first());
                if let (Group::Lows, Some(x)) = (g, qk) {
                    v.extend([
                        whole(s, &x.q_raw),
                        whole(s, &x.k_raw),
                        whole(s, &x.rstd_q),
                        whole(s, &x.rstd_k),
                    ]);
                }
                v
            }
        }
    }

    /// Pinned host buffers for what `wanted` parks, or only the layer inputs when the
    /// attention's results would not fit in the host's memory (logged): `previous`'s when they
    /// are large enough (the batch shape changes with every padded length), else new ones.
    pub(super) fn offload_buffers(
        &self,
        b: &Buffers,
        parking: Parking,
        previous: Option<Offload>,
    ) -> Result<Offload> {
        let layout = |parked: Parked| {
            let parcels: Vec<(Group, Vec<Range>)> = self.group_parcels(b, 0, parked.groups());
            let named: Vec<(Group, &[Range])> = parcels.iter().map(|(g, r)| (*g, &r[..])).collect();
            Layout::new(&named)
        };
        let layers = self.cfg.num_hidden_layers;
        let need = offload::Need {
            inputs: layout(Parked::Inputs).total(),
            attention: layout(Parked::Attention).total(),
            attention_output: layout(Parked::AttentionOutput).total(),
        };
        let wanted = match parking {
            Parking::Only(parked) => parked,
            Parking::Auto => offload::preferred(need, self.layer_flops(&b.sizes)),
        };
        // Data-parallel ranks share the host's memory: count all of them.
        let ranks = self.reducer.as_ref().map_or(1, |r| r.rank_of().1);
        let plan = offload::plan(
            wanted,
            need,
            ranks * layers,
            previous.as_ref().map(Offload::capacity),
            previous.as_ref().map_or(0, Offload::host_bytes),
            offload::host_available_bytes(),
        );
        let layout = layout(plan.parked);
        let previous = match previous {
            Some(held) if plan.reuse => return Ok(held.relaid(plan.parked, layout)),
            other => other,
        };
        const GIB: f64 = (1u64 << 30) as f64;
        if plan.parked != wanted {
            let instead = match plan.parked {
                Parked::AttentionOutput => {
                    "the attention output without q/k/v (the backward recomputes q/k/v)"
                }
                _ => "the layer inputs only (the backward recomputes the attention)",
            };
            tracing::warn!(
                "offload: parking the attention results too would pin {:.1} GiB (all ranks), \
                 more than half of the host's available memory; parking {instead}",
                (ranks * layers * need.of(wanted)) as f64 / GIB
            );
        }
        // The old buffers go first: their pinned memory is free before the new allocation.
        drop(previous);
        let pinning_started = std::time::Instant::now();
        let offload = Offload::new(&self.ctx, plan.parked, layout, layers)?;
        tracing::info!(
            "offload: {:?} parked in {:.2} GiB of pinned host memory (pinned in {:.2} s)",
            plan.parked,
            offload.host_bytes() as f64 / GIB,
            pinning_started.elapsed().as_secs_f64()
        );
        Ok(offload)
    }

    /// A decoder layer's forward FLOPs at `sz` (the frozen GEMMs and the causal attention;
    /// the adapters and elementwise work are small), and those of its q/k/v projections.
    fn layer_flops(&self, sz: &Sizes) -> offload::LayerFlops {
        let (n, hidden) = (sz.tokens as f64, sz.hidden as f64);
        let qkv = 2.0 * n * hidden * (sz.qd + 2 * sz.kvd) as f64;
        let o_mlp = 2.0 * n * hidden * (sz.qd + 3 * sz.inter) as f64;
        // QKᵀ and PV, 2·T²·d each per head and sequence, half of them masked.
        let attention = 2.0 * (sz.batch * sz.seq * sz.seq * sz.qd) as f64;
        offload::LayerFlops {
            forward: qkv + o_mlp + attention,
            qkv,
        }
    }

    pub(super) fn park(&self, b: &Buffers, l: usize, groups: &[Group]) -> Result<CudaEvent> {
        let off = b.offload.as_ref().expect("offload buffers");
        off.park(&self.stream, l, &self.group_parcels(b, l, groups))
    }

    pub(super) fn fetch(&self, b: &Buffers, l: usize, groups: &[Group]) -> Result<CudaEvent> {
        let off = b.offload.as_ref().expect("offload buffers");
        off.fetch(&self.stream, l, &self.group_parcels(b, l, groups))
    }

    fn group_parcels(&self, b: &Buffers, l: usize, groups: &[Group]) -> Vec<(Group, Vec<Range>)> {
        groups.iter().map(|&g| (g, self.parcels(b, l, g))).collect()
    }
}
