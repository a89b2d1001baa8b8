//! The loop against a small pure-Rust backend (a trainable bigram table): accumulation
//! normalisation, exact continuation through a real checkpoint, stopping, clipping.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::plan::Plan;
use super::report::Reporter;
use super::state::RunState;
use super::trainer::{clip_scale, Outcome, Trainer};
use crate::data::encode::TokenizedSample;
use crate::data::{BatchOptions, Batcher};
use crate::engine::{Backend, Batch, HostData, HostTensor, PassStats, IGNORE};
use crate::job::JobConfig;
use crate::optim::Optimizer;
use crate::signals::{StopFlag, StopSignal};

const VOCAB: usize = 12;
const PARAM: &str = "base_model.model.bigram.lora_A.weight";

/// logits(next | x) = W[x]; one trainable `[V, V]` table.
struct Bigram {
    w: Vec<f32>,
    grad: Vec<f32>,
    optimizer: Box<dyn Optimizer>,
}

impl Bigram {
    fn new(job: &JobConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(job.lora.random_state);
        let shapes = vec![(PARAM.to_string(), vec![VOCAB, VOCAB])];
        Self {
            w: (0..VOCAB * VOCAB)
                .map(|_| rng.random_range(-0.1..0.1))
                .collect(),
            grad: vec![0.0; VOCAB * VOCAB],
            optimizer: crate::optim::build(job, &shapes).unwrap(),
        }
    }

    fn pass(&mut self, batch: &Batch, grad_scale: Option<f32>) -> PassStats {
        let mut stats = PassStats::default();
        for (&x, &t) in batch.input_ids.iter().zip(&batch.targets) {
            if t == IGNORE {
                continue;
            }
            let row = &self.w[x as usize * VOCAB..(x as usize + 1) * VOCAB];
            let max = row.iter().cloned().fold(f32::MIN, f32::max);
            let z: f32 = row.iter().map(|v| (v - max).exp()).sum();
            stats.loss_sum += (z.ln() + max - row[t as usize]) as f64;
            stats.tokens += 1;
            if let Some(scale) = grad_scale {
                let grad_row = &mut self.grad[x as usize * VOCAB..(x as usize + 1) * VOCAB];
                for (j, (g, &logit)) in grad_row.iter_mut().zip(row).enumerate() {
                    let p = (logit - max).exp() / z;
                    let y = if j == t as usize { 1.0 } else { 0.0 };
                    *g += scale * (p - y);
                }
            }
        }
        stats
    }
}

impl Backend for Bigram {
    fn name(&self) -> &'static str {
        "bigram"
    }
    fn forward_backward(&mut self, batch: &Batch, loss_scale: f32) -> Result<PassStats> {
        Ok(self.pass(batch, Some(loss_scale)))
    }
    fn eval_loss(&mut self, batch: &Batch) -> Result<PassStats> {
        Ok(self.pass(batch, None))
    }
    fn grad_norm(&mut self) -> Result<f64> {
        Ok(self
            .grad
            .iter()
            .map(|g| (*g as f64).powi(2))
            .sum::<f64>()
            .sqrt())
    }
    fn optimizer_step(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        let g: Vec<f32> = self.grad.iter().map(|g| g * grad_scale as f32).collect();
        self.optimizer.step(0, &mut self.w, &g, lr)?;
        self.grad.iter_mut().for_each(|g| *g = 0.0);
        Ok(())
    }
    fn export_trainable(&self) -> Result<Vec<(String, HostTensor)>> {
        Ok(vec![(
            PARAM.into(),
            HostTensor {
                shape: vec![VOCAB, VOCAB],
                data: HostData::F32(self.w.clone()),
            },
        )])
    }
    fn import_trainable(&mut self, params: &[(String, HostTensor)]) -> Result<()> {
        match &params[0].1.data {
            HostData::F32(v) => self.w = v.clone(),
            _ => anyhow::bail!("f32 expected"),
        }
        Ok(())
    }
    fn export_optimizer(&self) -> Result<(Vec<(String, HostTensor)>, serde_json::Value)> {
        Ok(self.optimizer.export_state())
    }
    fn import_optimizer(
        &mut self,
        t: &[(String, HostTensor)],
        s: &serde_json::Value,
    ) -> Result<()> {
        self.optimizer.import_state(t, s)
    }
}

fn job(output_dir: &std::path::Path, extra: &[&str]) -> JobConfig {
    let out = output_dir.to_string_lossy().into_owned();
    let mut argv = vec![
        "ferrotune",
        "--report_to",
        "none",
        "--output_dir",
        &out,
        "--warmup_steps",
        "1",
    ];
    argv.extend_from_slice(extra);
    parse_job(&argv)
}

pub(super) fn parse_job(argv: &[&str]) -> JobConfig {
    match crate::cli::parse(argv.iter().map(|s| s.to_string()).collect()) {
        Ok(crate::cli::Invocation::Train(job)) => *job,
        Err(crate::cli::CliStop::Usage(e)) => panic!("{argv:?}: {e}"),
        _ => panic!("not a training invocation: {argv:?}"),
    }
}

/// Samples following "next = (x·3 + 1) mod V" with some noise, of varied lengths.
fn samples(n: usize) -> Vec<TokenizedSample> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    (0..n)
        .map(|i| {
            let len = 3 + i % 5;
            let mut ids = vec![rng.random_range(0..VOCAB as u32)];
            for _ in 1..len {
                let prev = *ids.last().unwrap() as usize;
                let next = if rng.random_bool(0.9) {
                    (prev * 3 + 1) % VOCAB
                } else {
                    rng.random_range(0..VOCAB)
                };
                ids.push(next as u32);
            }
            let mut trainable = vec![true; len];
            trainable[0] = false;
            if i % 3 == 0 {
                trainable[1] = false; // a masked "prompt" token
            }
            TokenizedSample {
                input_ids: ids,
                trainable,
            }
        })
        .collect()
}

fn batcher<'a>(data: &'a [TokenizedSample], job: &JobConfig) -> Batcher<'a> {
    Batcher::new(
        data,
        BatchOptions {
            micro_batch_size: job.training.per_device_train_batch_size,
            max_seq_length: 64,
            packing: false,
            shuffle: true,
            seed: job.training.seed,
            pad_id: 0,
        },
    )
    .unwrap()
}

fn train(
    job: &JobConfig,
    data: &[TokenizedSample],
    backend: &mut dyn Backend,
    state: &mut RunState,
    stop: StopFlag,
) -> Outcome {
    train_until(job, data, backend, state, stop, None)
}

fn train_until(
    job: &JobConfig,
    data: &[TokenizedSample],
    backend: &mut dyn Backend,
    state: &mut RunState,
    stop: StopFlag,
    pause_after: Option<u64>,
) -> Outcome {
    let b = batcher(data, job);
    let trainer = Trainer {
        job,
        plan: Plan::new(job, b.batches_per_epoch(), backend.world_size()).unwrap(),
        train: &b,
        eval: None,
        stop,
        fingerprint: "test-data".into(),
        pause_after,
        sync: &crate::sync::NoSync,
    };
    let mut reporter = Reporter::new(job, state.global_step, trainer.plan.total_steps).unwrap();
    trainer.run(backend, state, &mut reporter).unwrap()
}

/// 1×8, 4×2 and 8×1 (micro-batch × accumulation) over the same 8 rows give one identical update:
/// the loss is normalised by the window's trainable tokens, not averaged per micro-batch.
#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let data = samples(8);
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (mb, ga) in [("8", "1"), ("2", "4"), ("1", "8")] {
        let j = job(
            dir.path(),
            &[
                "--per_device_train_batch_size",
                mb,
                "--gradient_accumulation_steps",
                ga,
                "--max_steps",
                "1",
                "--optim",
                "sgd",
                "--warmup_steps",
                "0",
                "--lr_scheduler_type",
                "constant",
                "--learning_rate",
                "0.5",
                "--save_strategy",
                "no",
                "--max_grad_norm",
                "0",
            ],
        );
        let mut backend = Bigram::new(&j);
        let before = backend.w.clone();
        let mut state = RunState::fresh();
        train(&j, &data, &mut backend, &mut state, StopFlag::never());
        let delta: Vec<f32> = backend.w.iter().zip(&before).map(|(a, b)| a - b).collect();
        results.push((delta, state.logged_losses()[0].1));
    }
    let norm: f32 = results[0].0.iter().map(|d| d * d).sum::<f32>().sqrt();
    assert!(norm > 1e-3, "the step moved the weights");
    for (delta, loss) in &results[1..] {
        let diff: f32 = delta
            .iter()
            .zip(&results[0].0)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt();
        assert!(
            diff / norm < 1e-5,
            "relative update difference {}",
            diff / norm
        );
        assert!(
            (loss - results[0].1).abs() < 1e-9,
            "{loss} vs {}",
            results[0].1
        );
    }
}

/// 9 steps straight vs 4 steps, a checkpoint, a fresh backend restored from it, 5 more steps:
/// identical data order and bitwise-identical losses and weights (8-bit AdamW state included).
#[test]
fn resuming_from_a_checkpoint_continues_bitwise() {
    let data = samples(30);
    let args = [
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "3",
        "--max_steps",
        "9",
        "--save_steps",
        "4",
        "--optim",
        "adamw_8bit",
        "--learning_rate",
        "0.05",
        "--logging_steps",
        "1",
    ];
    let straight_dir = tempfile::tempdir().unwrap();
    let j = job(straight_dir.path(), &args);
    let mut straight = Bigram::new(&j);
    let mut s1 = RunState::fresh();
    assert_eq!(
        train(&j, &data, &mut straight, &mut s1, StopFlag::never()),
        Outcome::Completed
    );
    let losses = s1.logged_losses();
    assert_eq!(losses.len(), 9);
    assert!(losses[8].1 < losses[0].1, "{losses:?}");

    // The same run, preempted after step 5 (the checkpoint at 4 is the newest before the pause
    // writes one at 5; resume from 4 to also replay a step the killed run had done).
    let dir = tempfile::tempdir().unwrap();
    let j = job(dir.path(), &args);
    let mut backend = Bigram::new(&j);
    let mut s = RunState::fresh();
    let paused = train_until(&j, &data, &mut backend, &mut s, StopFlag::never(), Some(5));
    assert_eq!(paused, Outcome::Paused);
    drop(backend);
    std::fs::remove_dir_all(crate::checkpoint::dir_for(dir.path(), 5)).unwrap();

    let j = job(dir.path(), &args);
    let ckpt = crate::checkpoint::newest_valid(dir.path())
        .unwrap()
        .unwrap();
    assert!(ckpt.ends_with("checkpoint-4"));
    let mut resumed = Bigram::new(&j);
    let mut s2 = super::job::restore(&mut resumed, &ckpt, &j, "test-data").unwrap();
    assert_eq!(s2.global_step, 4);
    train(&j, &data, &mut resumed, &mut s2, StopFlag::never());
    let resumed_losses = s2.logged_losses();
    assert_eq!(resumed_losses.len(), 9);
    for (a, b) in losses.iter().zip(&resumed_losses) {
        assert_eq!(a.0, b.0);
        assert_eq!(
            a.1.to_bits(),
            b.1.to_bits(),
            "step {}: {} vs {}",
            a.0,
            a.1,
            b.1
        );
    }
    assert_eq!(straight.w, resumed.w);
    assert_eq!(s1.position, s2.position);

    // Another seed would visit the data in another order: refused, naming the flag.
    let mut other = args.to_vec();
    other.extend(["--seed", "1"]);
    let err = super::job::restore(
        &mut Bigram::new(&j),
        &ckpt,
        &job(dir.path(), &other),
        "test-data",
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("--seed 1"), "{err:#}");
    let err = super::job::restore(&mut Bigram::new(&j), &ckpt, &j, "other-data").unwrap_err();
    assert!(format!("{err:#}").contains("training data"), "{err:#}");
}

#[test]
fn a_stop_request_ends_the_run_without_writing() {
    let data = samples(10);
    let dir = tempfile::tempdir().unwrap();
    let j = job(dir.path(), &["--max_steps", "5", "--save_steps", "1"]);
    let stop = StopFlag::never();
    stop.request(StopSignal::Interrupt);
    let mut state = RunState::fresh();
    let outcome = train(&j, &data, &mut Bigram::new(&j), &mut state, stop);
    assert_eq!(outcome, Outcome::Stopped(StopSignal::Interrupt));
    assert_eq!(state.global_step, 0);
    assert!(crate::checkpoint::list(dir.path()).unwrap().is_empty());
}

#[test]
fn save_total_limit_keeps_the_newest_checkpoints() {
    let data = samples(10);
    let dir = tempfile::tempdir().unwrap();
    let j = job(
        dir.path(),
        &[
            "--max_steps",
            "5",
            "--save_steps",
            "1",
            "--save_total_limit",
            "2",
        ],
    );
    train(
        &j,
        &data,
        &mut Bigram::new(&j),
        &mut RunState::fresh(),
        StopFlag::never(),
    );
    let steps: Vec<u64> = crate::checkpoint::list(dir.path())
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, [4, 5]);
}

#[test]
fn clipping_follows_torch() {
    assert_eq!(clip_scale(0.5, 1.0), 1.0);
    assert!((clip_scale(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
    assert_eq!(clip_scale(100.0, 0.0), 1.0);
}

/// A data-parallel group of `world` bigram replicas summing gradients in host memory, driven by
/// the same [`DataParallel`](crate::engine::parallel::DataParallel) as the GPUs.
fn bigram_group(job: &JobConfig, world: usize) -> crate::engine::parallel::DataParallel {
    use crate::engine::parallel::host_sum::HostSum;
    use crate::engine::parallel::{DataParallel, Replica, ReplicaFactory};

    struct BigramReplica {
        rank: usize,
        model: Bigram,
        sum: std::sync::Arc<HostSum>,
    }
    impl Replica for BigramReplica {
        fn shard_pass(
            &mut self,
            batches: &[Batch],
            _window_len: usize,
            loss_scale: f32,
        ) -> Result<PassStats> {
            let mut total = PassStats::default();
            for b in batches {
                let p = self.model.pass(b, Some(loss_scale));
                total.loss_sum += p.loss_sum;
                total.tokens += p.tokens;
            }
            self.sum.all_reduce(self.rank, &mut [&mut self.model.grad]);
            Ok(total)
        }
        fn backend(&mut self) -> &mut dyn Backend {
            &mut self.model
        }
    }

    let sum = HostSum::new(world);
    let job = job.clone();
    let factory: ReplicaFactory = std::sync::Arc::new(move |rank| {
        Ok(Box::new(BigramReplica {
            rank,
            model: Bigram::new(&job),
            sum: sum.clone(),
        }) as Box<dyn Replica>)
    });
    DataParallel::spawn("bigram", world, factory).unwrap()
}

fn close_losses(a: &[(u64, f64)], b: &[(u64, f64)]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0);
        // Only the summation order of the gradients differs (fp32).
        assert!(
            (x.1 - y.1).abs() <= 1e-5 * x.1.abs(),
            "step {}: {} vs {}",
            x.0,
            x.1,
            y.1
        );
    }
}

/// 2 ranks × GA 2 trains like 1 device × GA 4 (the same windows, the same summed gradients),
/// and 4 ranks × GA 1 too; a window shorter than the rank count (end of an epoch) still works.
#[test]
fn data_parallel_matches_one_device_with_the_same_effective_batch() {
    let data = samples(30);
    let args = |ga: &'static str| {
        vec![
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            ga,
            "--max_steps",
            "8",
            "--save_strategy",
            "no",
            "--learning_rate",
            "0.05",
            "--logging_steps",
            "1",
        ]
    };
    let dir = tempfile::tempdir().unwrap();
    let j1 = job(dir.path(), &args("4"));
    let mut single = Bigram::new(&j1);
    let mut s1 = RunState::fresh();
    train(&j1, &data, &mut single, &mut s1, StopFlag::never());
    for (world, ga) in [(2, "2"), (4, "1")] {
        let j = job(dir.path(), &args(ga));
        let mut group = bigram_group(&j, world);
        let mut s = RunState::fresh();
        train(&j, &data, &mut group, &mut s, StopFlag::never());
        close_losses(&s1.logged_losses(), &s.logged_losses());
        assert_eq!(s1.position, s.position, "{world} ranks");
        let w = match &group.export_trainable().unwrap()[0].1.data {
            HostData::F32(w) => w.clone(),
            _ => unreachable!(),
        };
        let diff = w
            .iter()
            .zip(&single.w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{world} ranks: weights differ by {diff}");
    }
}

/// A 2-rank run paused with a checkpoint continues on 1 device with GA doubled (and back),
/// following the uninterrupted curve; a resume that changes GA × ranks is refused.
#[test]
fn data_parallel_checkpoints_resume_on_another_rank_count() {
    let data = samples(30);
    let args = |ga: &'static str| {
        vec![
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            ga,
            "--max_steps",
            "9",
            "--save_steps",
            "3",
            "--learning_rate",
            "0.05",
            "--logging_steps",
            "1",
        ]
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let j = job(straight_dir.path(), &args("4"));
    let mut straight = Bigram::new(&j);
    let mut s1 = RunState::fresh();
    train(&j, &data, &mut straight, &mut s1, StopFlag::never());

    let dir = tempfile::tempdir().unwrap();
    let j2 = job(dir.path(), &args("2"));
    let mut group = bigram_group(&j2, 2);
    let mut s = RunState::fresh();
    let paused = train_until(&j2, &data, &mut group, &mut s, StopFlag::never(), Some(4));
    assert_eq!(paused, Outcome::Paused);
    drop(group);

    // 2 ranks × GA 2 → 1 device × GA 4 for steps 5..=6.
    let ckpt = crate::checkpoint::newest_valid(dir.path())
        .unwrap()
        .unwrap();
    assert!(ckpt.ends_with("checkpoint-4"), "{}", ckpt.display());
    let j1 = job(dir.path(), &args("4"));
    let mut one = Bigram::new(&j1);
    let mut s = super::job::restore(&mut one, &ckpt, &j1, "test-data").unwrap();
    assert_eq!(
        train_until(&j1, &data, &mut one, &mut s, StopFlag::never(), Some(6)),
        Outcome::Paused
    );
    drop(one);

    // … and back to 2 ranks for the rest.
    let ckpt = crate::checkpoint::newest_valid(dir.path())
        .unwrap()
        .unwrap();
    assert!(ckpt.ends_with("checkpoint-6"), "{}", ckpt.display());
    let mut group = bigram_group(&j2, 2);
    let mut s = super::job::restore(&mut group, &ckpt, &j2, "test-data").unwrap();
    assert_eq!(
        train(&j2, &data, &mut group, &mut s, StopFlag::never()),
        Outcome::Completed
    );
    close_losses(&s1.logged_losses(), &s.logged_losses());

    // 2 ranks × GA 4 is another effective batch: refused, naming what to keep.
    let mut wrong = bigram_group(&j1, 2);
    let err = super::job::restore(&mut wrong, &ckpt, &j1, "test-data").unwrap_err();
    assert!(
        format!("{err:#}").contains("keep the product the same"),
        "{err:#}"
    );
}
