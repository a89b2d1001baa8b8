//! Data parallelism (issue 8): one [`Replica`] per device, each on its own thread, behind the
//! ordinary [`Backend`] trait, so the trainer does not know how many devices there are.
//!
//! - An accumulation window of `GA × world` micro-batches is dealt round-robin: micro-batch `i`
//!   goes to rank `i % world` ([`shard`]); every rank runs its share with the window's single
//!   loss scale and then the ranks sum their gradients (NCCL on GPUs, overlapped with the
//!   backward), so every rank holds the exact gradient of the whole window.
//! - The optimizer step runs on every rank with identical inputs, so the replicas stay equal
//!   without ever broadcasting parameters; the gradient norm, evaluation and exports are read
//!   from rank 0.
//! - Checkpoints are written once, by the caller, from rank 0's state; a checkpoint restores
//!   into every rank.
//!
//! Replicas are built inside their threads (device handles need not be `Send`), in two phases:
//! all ranks build their model first and only then connect to each other, so a rank that fails
//! to load (out of memory, say) cannot leave the others blocked in a collective's setup.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, ensure, Context, Result};

use super::{Backend, Batch, HostTensor, MemoryStats, PassStats};

/// One rank of a data-parallel backend.
pub trait Replica {
    /// Joins the other ranks (all have been built when this is called).
    fn connect(&mut self) -> Result<()> {
        Ok(())
    }

    /// Forward and backward over this rank's micro-batches (possibly none) of a window of
    /// `window_len` (this rank's are those at `rank, rank + world, …`, see [`shard`]), then sums
    /// the gradients over all ranks; every rank calls it once per window.
    fn shard_pass(
        &mut self,
        batches: &[Batch],
        window_len: usize,
        loss_scale: f32,
    ) -> Result<PassStats>;

    /// The rank's single-device backend (evaluation, optimizer step, state in and out).
    fn backend(&mut self) -> &mut dyn Backend;
}

/// Builds rank `r`'s replica, on that rank's thread.
pub type ReplicaFactory = Arc<dyn Fn(usize) -> Result<Box<dyn Replica>> + Send + Sync>;

/// Which micro-batches of a window of `len` each of `world` ranks trains on.
pub fn shard(len: usize, world: usize) -> Vec<Vec<usize>> {
    let mut ranks = vec![Vec::new(); world];
    for i in 0..len {
        ranks[i % world].push(i);
    }
    ranks
}

type NamedTensors = Vec<(String, HostTensor)>;

enum Cmd {
    Connect,
    Shard(Vec<Batch>, usize, f32),
    Eval(Batch),
    GradNorm,
    Step(f64, f64),
    ExportTrainable,
    ImportTrainable(Arc<NamedTensors>),
    ExportOptimizer,
    ImportOptimizer(Arc<NamedTensors>, Arc<serde_json::Value>),
    Memory,
}

enum Reply {
    Done,
    Pass(PassStats),
    Norm(f64),
    Tensors(NamedTensors),
    Optimizer(NamedTensors, serde_json::Value),
    Memory(Option<MemoryStats>),
}

struct Rank {
    tx: Sender<Cmd>,
    rx: Receiver<Result<Reply>>,
    thread: Option<JoinHandle<()>>,
}

impl Rank {
    fn send(&self, r: usize, cmd: Cmd) -> Result<()> {
        self.tx
            .send(cmd)
            .map_err(|_| anyhow!("data-parallel rank {r} has stopped"))
    }

    fn recv(&self, r: usize) -> Result<Reply> {
        self.rx
            .recv()
            .map_err(|_| anyhow!("data-parallel rank {r} stopped (its thread panicked)"))?
            .with_context(|| format!("rank {r}"))
    }
}

/// A [`Backend`] over `world` replicas.
pub struct DataParallel {
    name: &'static str,
    ranks: Vec<Rank>,
    /// Set after a rank failed: the others may be stuck in a collective, so they are left
    /// to the process's exit instead of being joined.
    poisoned: bool,
}

impl DataParallel {
    /// Starts `world` ranks with `factory` and connects them.
    pub fn spawn(name: &'static str, world: usize, factory: ReplicaFactory) -> Result<Self> {
        ensure!(world >= 1, "data parallelism needs at least one rank");
        let mut ranks = Vec::with_capacity(world);
        for r in 0..world {
            let (tx, cmd_rx) = channel::<Cmd>();
            let (reply_tx, rx) = channel::<Result<Reply>>();
            let factory = factory.clone();
            let thread = std::thread::Builder::new()
                .name(format!("rank-{r}"))
                .spawn(move || serve(r, factory, cmd_rx, reply_tx))
                .context("starting a data-parallel rank thread")?;
            ranks.push(Rank {
                tx,
                rx,
                thread: Some(thread),
            });
        }
        let mut dp = DataParallel {
            name,
            ranks,
            poisoned: false,
        };
        // Phase 1: every rank reports whether its replica loaded.
        for (r, rank) in dp.ranks.iter().enumerate() {
            if let Err(e) = rank.recv(r) {
                dp.poisoned = true;
                return Err(e.context("loading the model on every GPU"));
            }
        }
        // Phase 2: all loaded, so every rank reaches the connection rendezvous.
        dp.all(|| Cmd::Connect)?;
        Ok(dp)
    }

    /// Sends a command to every rank, then waits for every reply.
    fn all(&mut self, mut cmd: impl FnMut() -> Cmd) -> Result<Vec<Reply>> {
        let sent: Result<()> = self
            .ranks
            .iter()
            .enumerate()
            .try_for_each(|(r, rank)| rank.send(r, cmd()));
        let replies: Vec<Result<Reply>> = self
            .ranks
            .iter()
            .enumerate()
            .map(|(r, rank)| rank.recv(r))
            .collect();
        self.settle(sent.and_then(|_| replies.into_iter().collect()))
    }

    fn first(&mut self, cmd: Cmd) -> Result<Reply> {
        let reply = self.ranks[0]
            .send(0, cmd)
            .and_then(|_| self.ranks[0].recv(0));
        self.settle(reply)
    }

    fn settle<T>(&mut self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }
}

fn serve(r: usize, factory: ReplicaFactory, cmds: Receiver<Cmd>, replies: Sender<Result<Reply>>) {
    let mut replica = match factory(r) {
        Ok(replica) => {
            let _ = replies.send(Ok(Reply::Done));
            replica
        }
        Err(e) => {
            let _ = replies.send(Err(e));
            return;
        }
    };
    for cmd in cmds {
        let reply = match cmd {
            Cmd::Connect => replica.connect().map(|_| Reply::Done),
            Cmd::Shard(batches, window, scale) => {
                replica.shard_pass(&batches, window, scale).map(Reply::Pass)
            }
            Cmd::Eval(batch) => replica.backend().eval_loss(&batch).map(Reply::Pass),
            Cmd::GradNorm => replica.backend().grad_norm().map(Reply::Norm),
            Cmd::Step(lr, scale) => replica
                .backend()
                .optimizer_step(lr, scale)
                .map(|_| Reply::Done),
            Cmd::ExportTrainable => replica.backend().export_trainable().map(Reply::Tensors),
            Cmd::ImportTrainable(params) => replica
                .backend()
                .import_trainable(&params)
                .map(|_| Reply::Done),
            Cmd::ExportOptimizer => replica
                .backend()
                .export_optimizer()
                .map(|(t, s)| Reply::Optimizer(t, s)),
            Cmd::ImportOptimizer(tensors, scalars) => replica
                .backend()
                .import_optimizer(&tensors, &scalars)
                .map(|_| Reply::Done),
            Cmd::Memory => Ok(Reply::Memory(replica.backend().memory_stats())),
        };
        let failed = reply.is_err();
        if replies.send(reply).is_err() || failed {
            return;
        }
    }
}

fn unexpected() -> anyhow::Error {
    anyhow!("internal error: a data-parallel rank answered with the wrong kind of reply")
}

impl Backend for DataParallel {
    fn name(&self) -> &'static str {
        self.name
    }

    fn forward_backward(&mut self, batch: &Batch, loss_scale: f32) -> Result<PassStats> {
        self.forward_backward_window(&[batch], loss_scale, &|| false)
            .map(|p| p.expect("never stopped"))
    }

    fn forward_backward_window(
        &mut self,
        window: &[&Batch],
        loss_scale: f32,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<PassStats>> {
        // Every rank must join the gradient sum, so a window is all or nothing.
        if stop() {
            return Ok(None);
        }
        let shares: Vec<Vec<Batch>> = shard(window.len(), self.ranks.len())
            .into_iter()
            .map(|idx| idx.into_iter().map(|i| window[i].clone()).collect())
            .collect();
        let mut shares = shares.into_iter();
        let window_len = window.len();
        let replies =
            self.all(|| Cmd::Shard(shares.next().unwrap_or_default(), window_len, loss_scale))?;
        let mut total = PassStats::default();
        for reply in replies {
            let Reply::Pass(p) = reply else {
                return Err(unexpected());
            };
            total.loss_sum += p.loss_sum;
            total.tokens += p.tokens;
        }
        Ok(Some(total))
    }

    fn world_size(&self) -> usize {
        self.ranks.len()
    }

    fn eval_loss(&mut self, batch: &Batch) -> Result<PassStats> {
        match self.first(Cmd::Eval(batch.clone()))? {
            Reply::Pass(p) => Ok(p),
            _ => Err(unexpected()),
        }
    }

    fn grad_norm(&mut self) -> Result<f64> {
        // After the sum every rank holds the same gradients.
        match self.first(Cmd::GradNorm)? {
            Reply::Norm(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    fn optimizer_step(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        self.all(|| Cmd::Step(lr, grad_scale)).map(|_| ())
    }

    fn export_trainable(&self) -> Result<Vec<(String, HostTensor)>> {
        let rank = &self.ranks[0];
        rank.send(0, Cmd::ExportTrainable)?;
        match rank.recv(0)? {
            Reply::Tensors(t) => Ok(t),
            _ => Err(unexpected()),
        }
    }

    fn import_trainable(&mut self, params: &[(String, HostTensor)]) -> Result<()> {
        let params = Arc::new(params.to_vec());
        self.all(|| Cmd::ImportTrainable(params.clone()))
            .map(|_| ())
    }

    fn export_optimizer(&self) -> Result<(Vec<(String, HostTensor)>, serde_json::Value)> {
        let rank = &self.ranks[0];
        rank.send(0, Cmd::ExportOptimizer)?;
        match rank.recv(0)? {
            Reply::Optimizer(t, s) => Ok((t, s)),
            _ => Err(unexpected()),
        }
    }

    fn import_optimizer(
        &mut self,
        tensors: &[(String, HostTensor)],
        scalars: &serde_json::Value,
    ) -> Result<()> {
        let (tensors, scalars) = (Arc::new(tensors.to_vec()), Arc::new(scalars.clone()));
        self.all(|| Cmd::ImportOptimizer(tensors.clone(), scalars.clone()))
            .map(|_| ())
    }

    fn memory_stats(&self) -> Option<MemoryStats> {
        // The busiest device, named with the rank count ("2 × NVIDIA H200 (sm_90)").
        let mut peak: Option<MemoryStats> = None;
        for (r, rank) in self.ranks.iter().enumerate() {
            rank.send(r, Cmd::Memory).ok()?;
            let Ok(Reply::Memory(Some(m))) = rank.recv(r) else {
                return None;
            };
            if peak.as_ref().is_none_or(|p| m.peak_bytes > p.peak_bytes) {
                peak = Some(m);
            }
        }
        peak.map(|m| MemoryStats {
            device: format!("{} × {}", self.ranks.len(), m.device),
            peak_bytes: m.peak_bytes,
            peak_allocated_bytes: m.peak_allocated_bytes,
            nf4_base: m.nf4_base,
        })
    }
}

impl Drop for DataParallel {
    fn drop(&mut self) {
        if self.poisoned {
            return;
        }
        for rank in &mut self.ranks {
            // Closing the channel ends the rank's loop.
            let (tx, _) = channel();
            drop(std::mem::replace(&mut rank.tx, tx));
            if let Some(t) = rank.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
pub mod host_sum;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_dealt_round_robin_and_every_micro_batch_once() {
        assert_eq!(shard(5, 2), vec![vec![0, 2, 4], vec![1, 3]]);
        assert_eq!(shard(1, 3), vec![vec![0], vec![], vec![]]);
        for (len, world) in [(8, 4), (7, 3), (2, 8)] {
            let mut all: Vec<usize> = shard(len, world).concat();
            all.sort();
            assert_eq!(all, (0..len).collect::<Vec<_>>());
        }
    }
}
