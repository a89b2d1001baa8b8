//! `--use_gradient_checkpointing unsloth`: layer activations parked in pinned host memory.
//!
//! The forward copies each layer's activations out on a side stream as soon as they are
//! produced, and the backward copies them back one step ahead of their use, so the copies
//! overlap the compute; events order the two streams. What is parked ([`Parked`]):
//! - always the layer input (the recompute's starting point);
//! - with [`Parked::Attention`] also the attention half's results — q, k, v after RoPE, the
//!   attention output and its logsumexp, the q/k/v adapters' `x·Aᵀ` and Qwen3's pre-norm q/k,
//!   the residual after o_proj and the o/down adapters' `x·Aᵀ` — so the recompute is the second
//!   RMSNorm and the gate/up GEMMs only: it skips the q/k/v and o GEMMs, RoPE, the attention
//!   forward, the SwiGLU and down's `x·Aᵀ` (≈ 1 ms of a Llama-3-8B layer at 2 × 2048) for 4.5×
//!   the host memory and PCIe traffic. Chosen when the host has the room (see [`plan`]);
//! - with [`Parked::AttentionOutput`] the same but q, k and v: the recompute reruns the q/k/v
//!   projections and RoPE from the layer input it fetches anyway, for a third fewer bytes per
//!   layer over PCIe — for models whose layer copies outrun their compute (Llama-3.2-1B on
//!   PCIe 5, docs/perf-notes.md §22).
//!
//! Each layer owns one pinned buffer holding its [`Group`]s back to back; the device side of a
//! group is a list of [`Range`]s the engine names at each copy (the activation buffers are
//! shared by all layers, so only the host side is per layer).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};

use super::pinned::PinnedHost;
use crate::cli::choices::GradientCheckpointing;

/// Environment variable that fixes what is parked: the layer inputs only (`inputs`), the
/// attention results too (`attention`) or those without q/k/v (`attention-output`). Unset, the
/// engine picks one of the latter two by the batch shape's costs ([`preferred`]); when the
/// host lacks the memory, `attention` falls back to `attention-output` and either to the
/// inputs ([`plan`]).
pub const OFFLOAD_ENV: &str = "FERROTUNE_OFFLOAD";

/// What `--use_gradient_checkpointing unsloth` asks to park.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parking {
    /// With or without q/k/v, whichever the batch shape's costs favour ([`preferred`]).
    Auto,
    /// This mode (set through [`OFFLOAD_ENV`], or by tests).
    Only(Parked),
}

impl Parking {
    /// What `--use_gradient_checkpointing` parks: nothing but with `unsloth`, then the mode
    /// asked for through [`OFFLOAD_ENV`] (default: [`Parking::Auto`]).
    pub fn for_checkpointing(mode: GradientCheckpointing) -> Result<Option<Self>> {
        (mode == GradientCheckpointing::Unsloth)
            .then(|| Self::parse(std::env::var(OFFLOAD_ENV).ok().as_deref()))
            .transpose()
    }

    fn parse(value: Option<&str>) -> Result<Self> {
        match value {
            None => Ok(Parking::Auto),
            Some("attention") => Ok(Parking::Only(Parked::Attention)),
            Some("attention-output") => Ok(Parking::Only(Parked::AttentionOutput)),
            Some("inputs") => Ok(Parking::Only(Parked::Inputs)),
            Some(other) => bail!(
                "${OFFLOAD_ENV}={other:?} is not a parking mode: use `inputs`, `attention` or \
                 `attention-output` (or leave it unset)"
            ),
        }
    }
}

/// What the offloaded checkpointing parks per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    /// The layer input only: the backward recomputes the whole layer.
    Inputs,
    /// Also the attention half's results and the residual after it: the recompute starts at
    /// the second RMSNorm.
    Attention,
    /// As [`Parked::Attention`] without q, k and v: the recompute reruns their projections
    /// and RoPE before the attention backward.
    AttentionOutput,
}

impl Parked {
    /// The attention half's results are parked: the recompute starts at the second RMSNorm.
    pub fn attention(self) -> bool {
        self != Parked::Inputs
    }

    /// q, k and v are recomputed before the attention backward (not parked).
    pub fn recomputes_qkv(self) -> bool {
        self == Parked::AttentionOutput
    }

    /// Every group this mode parks, in the order of a layer's host buffer.
    pub fn groups(self) -> &'static [Group] {
        use Group::*;
        match self {
            Parked::Inputs => &[Input],
            Parked::Attention => &[Input, Output, Operands, Lows, Residual],
            Parked::AttentionOutput => &[Input, Output, Logsumexp, QkvLows, Residual],
        }
    }

    /// The groups parked right after a layer's attention, in the order they are copied and
    /// read back — by o_proj's `dA`, the attention backward, the q/k/v backward (the input goes
    /// out before them, the residual after the MLP).
    pub fn attention_groups(self) -> Option<[Group; 3]> {
        match self.groups() {
            &[Group::Input, output, operands, lows, Group::Residual] => {
                Some([output, operands, lows])
            }
            _ => None,
        }
    }
}

/// What to park for a new batch shape, and whether the pinned buffers already held can take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub parked: Parked,
    /// The current buffers are large enough: no new pinned allocation (the batch shape changes
    /// with every padded length; pinning host memory costs far more than a training step).
    pub reuse: bool,
}

/// Pinned device-to-host copy rate and the rate of a layer forward's GEMMs on the H200
/// (docs/perf-notes.md §13, §22): [`preferred`] weighs a layer's copies against its compute
/// with them.
const COPY_BYTES_PER_S: f64 = 55e9;
const FORWARD_FLOPS_PER_S: f64 = 600e12;

/// A layer's forward FLOPs in all and those of its q/k/v projections, for one batch shape.
#[derive(Debug, Clone, Copy)]
pub struct LayerFlops {
    pub forward: f64,
    pub qkv: f64,
}

/// [`Parked::AttentionOutput`] when the attention's copies would outlast the layer's forward
/// (the next layer waits for them) by more than the q/k/v recompute costs with fewer bytes;
/// otherwise [`Parked::Attention`]. Small models (Llama-3.2-1B) are copy-bound: ≈ 77 MB per
/// layer against ≈ 0.53 TFLOP at 2 × 2048; Llama-3-8B's 152 MB hide under 1.9 TFLOP.
pub fn preferred(need: Need, flops: LayerFlops) -> Parked {
    let compute = flops.forward / FORWARD_FLOPS_PER_S;
    let wait = |bytes: usize| (bytes as f64 / COPY_BYTES_PER_S - compute).max(0.0);
    let recompute = flops.qkv / FORWARD_FLOPS_PER_S;
    if wait(need.attention_output) + recompute < wait(need.attention) {
        Parked::AttentionOutput
    } else {
        Parked::Attention
    }
}

/// Per-layer host bytes of each mode for one batch shape.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    pub inputs: usize,
    pub attention: usize,
    pub attention_output: usize,
}

impl Need {
    pub fn of(&self, parked: Parked) -> usize {
        match parked {
            Parked::Inputs => self.inputs,
            Parked::Attention => self.attention,
            Parked::AttentionOutput => self.attention_output,
        }
    }
}

/// Parks the attention too (with q/k/v or without, as `wanted`) when every copy of it
/// (`copies` = layers × data-parallel ranks) stays within half of the host's available memory
/// (`available`, counting the `held` bytes this process has pinned already as available); when
/// the attention with q/k/v does not fit, its output without them (the backward recomputes
/// the q/k/v projections, far cheaper than the attention at the long sequences that get here);
/// else the inputs only. Reuses the current per-layer `capacity` when it holds the chosen mode.
pub fn plan(
    wanted: Parked,
    need: Need,
    copies: usize,
    capacity: Option<usize>,
    held: usize,
    available: Option<usize>,
) -> Plan {
    let room = available.map(|a| (a + held) / 2);
    let fits = |p: Parked| room.is_some_and(|r| copies * need.of(p) <= r);
    let candidates: &[Parked] = match wanted {
        Parked::Attention => &[Parked::Attention, Parked::AttentionOutput],
        Parked::AttentionOutput => &[Parked::AttentionOutput],
        Parked::Inputs => &[],
    };
    let parked = candidates
        .iter()
        .copied()
        .find(|&p| fits(p))
        .unwrap_or(Parked::Inputs);
    let bytes = need.of(parked);
    Plan {
        parked,
        reuse: capacity.is_some_and(|c| c >= bytes),
    }
}

/// Memory this process may still pin: `MemAvailable`, capped by the room left in each memory
/// cgroup it belongs to (a container — Salad runs jobs in them — sees the host's memory in
/// `/proc/meminfo`, while its limit is what the kernel enforces).
pub fn host_available_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    let groups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let rooms = memory_cgroups(&groups, Path::new("/sys/fs/cgroup"))
        .into_iter()
        .filter_map(|(dir, v)| cgroup_room(&dir, v));
    Some(rooms.fold(kib * 1024, usize::min))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CgroupVersion {
    V1,
    V2,
}

/// The memory cgroup directories under `root` that hold this process (`/proc/self/cgroup`'s
/// text), innermost first, up to the hierarchy's root: a limit may sit on any ancestor.
fn memory_cgroups(self_cgroup: &str, root: &Path) -> Vec<(PathBuf, CgroupVersion)> {
    let mut dirs = Vec::new();
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (mounts, version) = if id == "0" && controllers.is_empty() {
            (
                vec![root.to_path_buf(), root.join("unified")],
                CgroupVersion::V2,
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            (vec![root.join("memory")], CgroupVersion::V1)
        } else {
            continue;
        };
        for mount in mounts {
            let mut dir = mount.join(path.trim_start_matches('/'));
            loop {
                dirs.push((dir.clone(), version));
                if dir == mount || !dir.pop() {
                    break;
                }
            }
        }
    }
    dirs
}

/// The room left under one cgroup's memory limit, or `None` without a limit (or files).
fn cgroup_room(dir: &Path, version: CgroupVersion) -> Option<usize> {
    let (limit, usage, inactive) = match version {
        CgroupVersion::V1 => (
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        ),
        CgroupVersion::V2 => ("memory.max", "memory.current", "inactive_file"),
    };
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    room_under_limit(
        &read(limit)?,
        &read(usage)?,
        &read("memory.stat").unwrap_or_default(),
        inactive,
    )
}

/// `limit − (usage − inactive file cache)`: page cache the kernel can drop (the safetensors
/// mmap fills it) is not in the way. `None` for no limit (`max`, or v1's near-2⁶³ default).
fn room_under_limit(limit: &str, usage: &str, stat: &str, inactive_key: &str) -> Option<usize> {
    let limit: u64 = limit.trim().parse().ok()?;
    if limit >= 1 << 62 {
        return None;
    }
    let usage: u64 = usage.trim().parse().ok()?;
    let inactive: u64 = stat
        .lines()
        .find_map(|l| {
            l.strip_prefix(inactive_key)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(inactive)) as usize)
}

/// The sets of activations that move together (each copied and awaited as one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// The layer input `x`.
    Input,
    /// The attention output (o_proj's input): the recompute's first read.
    Output,
    /// q, k, v after RoPE and the logsumexp: read first by the attention backward.
    Operands,
    /// The q/k/v adapters' `x·Aᵀ` and Qwen3's pre-norm q/k with their rstd: read by the q/k/v
    /// backward, after the attention backward.
    Lows,
    /// [`Parked::AttentionOutput`]'s operands: the logsumexp alone (q, k, v are recomputed).
    Logsumexp,
    /// [`Parked::AttentionOutput`]'s lows: the q/k/v adapters' `x·Aᵀ` alone, read by the q/k/v
    /// recompute (Qwen3's pre-norm q/k are recomputed with q and k).
    QkvLows,
    /// The residual after attention `h = x + o_proj(attn)` and the o/gate/up/down adapters'
    /// `x·Aᵀ` (parked after the MLP): the recompute starts from them at the second RMSNorm and
    /// runs only the gate/up frozen GEMMs.
    Residual,
}

/// `bytes` of device memory at `ptr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub ptr: u64,
    pub bytes: usize,
}

/// Where each group sits in a layer's host buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// (group, offset, bytes), in the order given.
    groups: Vec<(Group, usize, usize)>,
    total: usize,
}

impl Layout {
    /// Groups back to back, each 256-byte aligned.
    pub fn new(groups: &[(Group, &[Range])]) -> Self {
        let mut total = 0;
        let groups = groups
            .iter()
            .map(|(g, ranges)| {
                let bytes: usize = ranges.iter().map(|r| r.bytes).sum();
                let at = total;
                total = (total + bytes).next_multiple_of(256);
                (*g, at, bytes)
            })
            .collect();
        Layout { groups, total }
    }

    /// Host bytes per layer.
    pub fn total(&self) -> usize {
        self.total
    }

    fn find(&self, g: Group) -> Result<(usize, usize)> {
        match self.groups.iter().find(|(x, _, _)| *x == g) {
            Some(&(_, at, bytes)) => Ok((at, bytes)),
            None => bail!("{g:?} is not parked in this mode"),
        }
    }

    /// Host offset of each range of `g` (the ranges must add up to the group's size).
    fn offsets(&self, g: Group, ranges: &[Range]) -> Result<Vec<usize>> {
        let (mut at, bytes) = self.find(g)?;
        ensure!(
            ranges.iter().map(|r| r.bytes).sum::<usize>() == bytes,
            "{g:?}: the device ranges do not match the parked layout"
        );
        Ok(ranges
            .iter()
            .map(|r| {
                let here = at;
                at += r.bytes;
                here
            })
            .collect())
    }
}

/// Pinned host buffers (one per layer) and the side stream that copies into and out of them.
pub struct Offload {
    pub parked: Parked,
    pub side: Arc<CudaStream>,
    layout: Layout,
    /// Bytes of each layer's host buffer (≥ the layout's total).
    capacity: usize,
    /// Every layer's buffer, back to back.
    host: PinnedHost,
    /// Base address of each layer's buffer in `host`.
    base: Vec<*mut u8>,
}

impl Offload {
    pub fn new(
        ctx: &Arc<CudaContext>,
        parked: Parked,
        layout: Layout,
        layers: usize,
    ) -> Result<Self> {
        let capacity = layout.total().max(1);
        let host = PinnedHost::new(ctx, capacity * layers)?;
        // SAFETY: layer l's buffer, `capacity` bytes from `l·capacity`, lies inside `host`.
        let base = (0..layers)
            .map(|l| unsafe { host.as_mut_ptr().add(l * capacity) })
            .collect();
        Ok(Offload {
            parked,
            side: ctx.new_stream()?,
            layout,
            capacity,
            host,
            base,
        })
    }

    /// Bytes of each layer's host buffer.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The same host buffers for another batch shape (copies on the one side stream stay in
    /// order, so none of the previous shape's can overlap the new one's).
    pub fn relaid(self, parked: Parked, layout: Layout) -> Self {
        assert!(
            layout.total() <= self.capacity,
            "the host buffers are too small"
        );
        Offload {
            parked,
            layout,
            ..self
        }
    }

    /// Copies `groups` of layer `l` to host memory on the side stream, after `main`'s work so
    /// far; returns the copies' completion.
    pub fn park(
        &self,
        main: &CudaStream,
        l: usize,
        groups: &[(Group, Vec<Range>)],
    ) -> Result<CudaEvent> {
        self.copy(main, l, groups, Direction::Out)
    }

    /// Copies `groups` of layer `l` back into their device ranges on the side stream, after
    /// `main`'s work so far (the ranges' previous contents are dead); returns the completion.
    pub fn fetch(
        &self,
        main: &CudaStream,
        l: usize,
        groups: &[(Group, Vec<Range>)],
    ) -> Result<CudaEvent> {
        self.copy(main, l, groups, Direction::In)
    }

    fn copy(
        &self,
        main: &CudaStream,
        l: usize,
        groups: &[(Group, Vec<Range>)],
        dir: Direction,
    ) -> Result<CudaEvent> {
        self.side.wait(&main.record_event(None)?)?;
        let stream = self.side.cu_stream();
        for (g, ranges) in groups {
            for (r, at) in ranges.iter().zip(self.layout.offsets(*g, ranges)?) {
                // SAFETY: `at + r.bytes` lies inside layer l's host buffer (the layout was built
                // from ranges of these sizes and `offsets` checked them); the device range is a
                // live activation buffer that the side stream's wait above orders after its
                // last writer (out) or last reader (in).
                unsafe {
                    let host = self.base[l].add(at);
                    match dir {
                        Direction::Out => {
                            sys::cuMemcpyDtoHAsync_v2(host.cast(), r.ptr, r.bytes, stream)
                                .result()?
                        }
                        Direction::In => {
                            sys::cuMemcpyHtoDAsync_v2(r.ptr, host.cast(), r.bytes, stream)
                                .result()?
                        }
                    }
                }
            }
        }
        Ok(self.side.record_event(None)?)
    }

    /// Pinned bytes in all.
    pub fn host_bytes(&self) -> usize {
        self.host.len()
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Out,
    In,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(bytes: usize) -> Range {
        Range { ptr: 0, bytes }
    }

    #[test]
    fn groups_sit_back_to_back_aligned_and_ranges_must_match_their_group() {
        let (x, o, qkv) = ([r(1000)], [r(24)], [r(100), r(50), r(6)]);
        let l = Layout::new(&[
            (Group::Input, &x),
            (Group::Output, &o),
            (Group::Operands, &qkv),
        ]);
        assert_eq!(l.find(Group::Input).unwrap(), (0, 1000));
        assert_eq!(l.find(Group::Output).unwrap(), (1024, 24));
        assert_eq!(l.find(Group::Operands).unwrap(), (1280, 156));
        assert_eq!(l.total(), 1536);
        assert_eq!(
            l.offsets(Group::Operands, &qkv).unwrap(),
            vec![1280, 1380, 1430]
        );
        // Another split of the same bytes is fine; other sizes or an absent group are not.
        assert!(l.offsets(Group::Operands, &[r(156)]).is_ok());
        assert!(l.offsets(Group::Operands, &[r(100), r(50)]).is_err());
        assert!(l.offsets(Group::Lows, &[]).is_err());
    }

    #[test]
    fn q_k_v_are_recomputed_where_the_copies_outrun_the_layer_and_parked_where_they_hide() {
        // Llama-3 at 2 × 2048 (docs/perf-notes.md §22): per-layer bytes of each mode, forward
        // and q/k/v FLOPs.
        let (n, t, b) = (4096.0, 2048.0, 2.0);
        let shape = |hidden: f64, kv: f64, inter: f64| {
            let mib = |h: f64| (n * h * 2.0) as usize;
            // input, attention output, residual, q, k, v (the lse and lows are small).
            let out = 3 * mib(hidden) + (4 << 20);
            let need = Need {
                inputs: mib(hidden),
                attention: out + mib(hidden) + 2 * mib(kv),
                attention_output: out,
            };
            let qkv = 2.0 * n * hidden * (hidden + 2.0 * kv);
            let rest = 2.0 * n * hidden * (hidden + 3.0 * inter) + 2.0 * b * t * t * hidden;
            let flops = LayerFlops {
                forward: qkv + rest,
                qkv,
            };
            preferred(need, flops)
        };
        assert_eq!(shape(2048.0, 512.0, 8192.0), Parked::AttentionOutput, "1B");
        assert_eq!(shape(4096.0, 1024.0, 14336.0), Parked::Attention, "8B");
        // Nothing to wait for either way: no recompute.
        let flops = LayerFlops {
            forward: 1e15,
            qkv: 1e14,
        };
        let need = Need {
            inputs: 1,
            attention: 3,
            attention_output: 2,
        };
        assert_eq!(preferred(need, flops), Parked::Attention);
    }

    #[test]
    fn each_mode_parks_the_input_first_and_the_residual_last_with_the_attention() {
        use Group::*;
        assert_eq!(Parked::Inputs.groups(), [Input]);
        assert_eq!(Parked::Inputs.attention_groups(), None);
        assert_eq!(
            Parked::Attention.attention_groups(),
            Some([Output, Operands, Lows])
        );
        // Without q/k/v: the logsumexp and the adapters' lows stand in for them.
        assert_eq!(
            Parked::AttentionOutput.attention_groups(),
            Some([Output, Logsumexp, QkvLows])
        );
        for p in [Parked::Attention, Parked::AttentionOutput] {
            assert!(p.attention() && p.groups().first() == Some(&Input));
            assert_eq!(p.groups().last(), Some(&Residual));
        }
        assert!(Parked::AttentionOutput.recomputes_qkv() && !Parked::Attention.recomputes_qkv());
    }

    #[test]
    fn the_mode_defaults_to_auto_and_bad_values_name_the_variable() {
        let only = |v| Parking::parse(Some(v)).unwrap();
        assert_eq!(Parking::parse(None).unwrap(), Parking::Auto);
        assert_eq!(only("attention"), Parking::Only(Parked::Attention));
        assert_eq!(only("inputs"), Parking::Only(Parked::Inputs));
        assert_eq!(
            only("attention-output"),
            Parking::Only(Parked::AttentionOutput)
        );
        let e = Parking::parse(Some("everything")).unwrap_err().to_string();
        assert!(
            e.contains("FERROTUNE_OFFLOAD") && e.contains("inputs"),
            "{e}"
        );
    }

    #[test]
    fn host_memory_is_read_and_capped_by_no_more_than_meminfo() {
        let avail = host_available_bytes().expect("readable on Linux");
        let info = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: usize = info
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        // MemAvailable moves while tests run: allow for it.
        assert!(
            avail > 0 && avail <= kib * 1024 + (256 << 20),
            "{avail} vs {kib} KiB"
        );
    }

    #[test]
    fn cgroup_room_is_the_limit_less_the_usage_that_cannot_be_dropped() {
        let stat = "active_file 100\ninactive_file 4000\ntotal_inactive_file 6000\n";
        assert_eq!(
            room_under_limit("16000\n", "12000\n", stat, "inactive_file"),
            Some(8000)
        );
        assert_eq!(
            room_under_limit("16000", "12000", stat, "total_inactive_file"),
            Some(10000)
        );
        assert_eq!(
            room_under_limit("16000", "20000", "", "inactive_file"),
            Some(0)
        );
        // No limit: v2's "max", v1's default.
        assert_eq!(
            room_under_limit("max\n", "12000", stat, "inactive_file"),
            None
        );
        let v1_default = "9223372036854771712";
        assert_eq!(
            room_under_limit(v1_default, "1", stat, "inactive_file"),
            None
        );
    }

    #[test]
    fn the_process_memory_cgroups_are_found_with_their_ancestors() {
        let root = Path::new("/cg");
        let v1 = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n0::/\n";
        let dirs: Vec<String> = memory_cgroups(v1, root)
            .iter()
            .filter(|(_, v)| *v == CgroupVersion::V1)
            .map(|(d, _)| d.display().to_string())
            .collect();
        assert_eq!(
            dirs,
            [
                "/cg/memory/process_api/abc",
                "/cg/memory/process_api",
                "/cg/memory"
            ]
        );
        let v2: Vec<(PathBuf, CgroupVersion)> = memory_cgroups("0::/a/b\n", root);
        assert_eq!(v2[0], (PathBuf::from("/cg/a/b"), CgroupVersion::V2));
        assert_eq!(v2[2], (PathBuf::from("/cg"), CgroupVersion::V2));
        assert_eq!(v2[3], (PathBuf::from("/cg/unified/a/b"), CgroupVersion::V2));
        assert!(memory_cgroups("3:cpuset:/x\n", root).is_empty());
    }

    #[test]
    fn the_attention_is_parked_within_half_the_host_memory_falling_back_to_its_output_and_buffers_are_reused_when_large_enough(
    ) {
        let need = Need {
            inputs: 10,
            attention: 35,
            attention_output: 30,
        };
        let (att, inp, out) = (Parked::Attention, Parked::Inputs, Parked::AttentionOutput);
        let p = |wanted, copies, capacity, held, avail| {
            plan(wanted, need, copies, capacity, held, avail)
        };
        // 32 copies × 35 = 1120 bytes: fits in half of 2240; in half of 2238 the attention
        // without q/k/v (32 × 30 = 960) does; in half of 1918 neither.
        assert_eq!(p(att, 32, None, 0, Some(2240)).parked, att);
        assert_eq!(p(att, 32, None, 0, Some(2238)).parked, out);
        assert_eq!(p(att, 32, None, 0, Some(1920)).parked, out);
        assert_eq!(p(att, 32, None, 0, Some(1918)).parked, inp);
        // What this process holds already counts as available; unknown memory: inputs only.
        assert_eq!(p(att, 32, None, 320, Some(1920)).parked, att);
        assert_eq!(p(att, 32, None, 0, None).parked, inp);
        // Without q/k/v: its own bytes (32 × 30 = 960) decide.
        assert_eq!(p(out, 32, None, 0, Some(1920)).parked, out);
        assert_eq!(p(out, 32, None, 0, Some(1918)).parked, inp);
        assert!(p(out, 32, Some(30), 0, Some(1 << 40)).reuse);
        // Asked for inputs: inputs, whatever the memory.
        assert_eq!(p(inp, 32, None, 0, Some(1 << 40)).parked, inp);
        // Reuse when the current buffers hold the chosen mode's bytes.
        assert!(p(att, 32, Some(35), 0, Some(1 << 40)).reuse);
        assert!(!p(att, 32, Some(34), 0, Some(1 << 40)).reuse);
        assert!(
            p(att, 32, Some(10), 0, Some(100)).reuse,
            "fell back to inputs: 10 bytes do"
        );
        assert!(
            p(att, 32, Some(30), 0, Some(2238)).reuse,
            "fell back to the output without q/k/v: 30 bytes do"
        );
        assert!(!p(att, 32, None, 0, Some(1 << 40)).reuse);
    }
}
