//! The cpu backend: candle-core tensors on the host, f32 throughout, a hand-written backward for
//! every block (see `docs/engine.md`), and candle's autograd only as the test oracle.
//!
//! Memory: frozen weights are f32 tensors; only trainable tensors (LoRA A/B, trainable biases)
//! have gradient buffers. With gradient checkpointing a pass keeps each layer's input and
//! recomputes the layer's activations just before its backward; without, it keeps every layer's
//! activations.

mod attention;
pub(crate) mod dropout;
mod layer;
mod linear;
mod loss;
mod mlp;
mod norm;
mod params;
pub(crate) mod rope;
#[cfg(test)]
mod tests;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use self::layer::{BiasSlot, LayerCache, LayerWeights, PassCtx, Proj};
use self::params::Param;
use crate::cli::choices::{Bias, GradientCheckpointing};
use crate::engine::optimizer_state::{self, EngineCounters};
use crate::engine::{Backend, Batch, HostTensor, PassStats};
use crate::job::{JobConfig, PROJECTIONS};
use crate::model::{Model, ModelConfig};
use crate::optim::Optimizer;

/// LoRA and engine settings taken from the job's flags.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    /// `--r`
    pub r: usize,
    /// `--lora_alpha`
    pub lora_alpha: f64,
    /// `--use_rslora`: scale `alpha/√r` instead of `alpha/r`.
    pub use_rslora: bool,
    /// `--lora_dropout`
    pub lora_dropout: f64,
    /// `--bias`
    pub bias: Bias,
    /// `--target_modules`, normalised to `q_proj` … `down_proj`.
    pub target_modules: Vec<String>,
    /// `--random_state`: seeds the LoRA A initialisation.
    pub init_seed: u64,
    /// `--seed`: seeds the LoRA dropout masks.
    pub dropout_seed: u64,
    /// `--use_gradient_checkpointing true|unsloth` (on CPU both mean recompute).
    pub gradient_checkpointing: bool,
}

impl EngineOptions {
    pub fn from_job(job: &JobConfig) -> Self {
        let l = &job.lora;
        EngineOptions {
            r: l.r,
            lora_alpha: l.lora_alpha,
            use_rslora: l.use_rslora,
            lora_dropout: l.lora_dropout,
            bias: l.bias,
            target_modules: l.target_modules.clone(),
            init_seed: l.random_state,
            dropout_seed: job.training.seed,
            gradient_checkpointing: l.use_gradient_checkpointing != GradientCheckpointing::False,
        }
    }

    /// The factor on the adapter's output: `alpha/r`, or `alpha/√r` with rsLoRA.
    pub fn lora_scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// The cpu training backend.
pub struct CpuBackend {
    config: ModelConfig,
    options: EngineOptions,
    embed: Tensor,
    /// `[V, H]`; the embedding itself when tied.
    lm_head: Tensor,
    final_norm: Tensor,
    layers: Vec<LayerWeights>,
    rope: rope::Rope,
    params: Vec<Param>,
    frozen_numel: usize,
    optimizer: Box<dyn Optimizer>,
    /// `forward_backward` calls so far: the only state of the dropout RNG (exported with the
    /// optimizer state so a resumed run draws the same masks).
    passes: u64,
}

impl CpuBackend {
    /// Builds the backend for a job: LoRA settings from its flags, the optimizer `--optim` names.
    pub fn from_job(model: Model, job: &JobConfig) -> Result<Self> {
        let options = EngineOptions::from_job(job);
        if job.model.load_in_4bit {
            // `--device auto` fell back to the cpu: say so instead of training 16-bit quietly.
            bail!("--load_in_4bit: the cpu engine has no 4-bit path (QLoRA runs on the cuda engine); drop the flag or run on a GPU");
        }
        if let Some(dtype) = job.model.dtype.as_deref().filter(|d| *d != "float32") {
            // Said once so that the flag is not silently ignored: the reference engine's
            // numbers are f32 by design (the GPU engine is where --dtype picks the storage).
            tracing::info!("cpu engine: weights and compute are float32 (--dtype {dtype} applies to the cuda engine)");
        }
        let shapes = trainable_shapes(&model.config, &options)?;
        let optimizer = crate::optim::build(job, &shapes)?;
        Self::new(model, options, optimizer)
    }

    /// Builds the backend from explicit options and an optimizer over [`trainable_shapes`].
    pub fn new(
        model: Model,
        options: EngineOptions,
        optimizer: Box<dyn Optimizer>,
    ) -> Result<Self> {
        let Model {
            config: cfg,
            weights,
            ..
        } = model;
        ensure!(options.r > 0, "--r must be positive");
        ensure!(
            (0.0..1.0).contains(&options.lora_dropout),
            "--lora_dropout must be in [0, 1)"
        );
        for m in &options.target_modules {
            ensure!(
                PROJECTIONS.contains(&m.as_str()),
                "--target_modules: {m:?} is not one of {}",
                PROJECTIONS.join(", ")
            );
        }
        let (h, v, d) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
        let embed = weights.get("model.embed_tokens.weight", &[v, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            weights.get("lm_head.weight", &[v, h])?
        };
        let final_norm = weights.get("model.norm.weight", &[h])?;

        let mut params = Vec::new();
        let mut init_rng = ChaCha8Rng::seed_from_u64(options.init_seed);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut proj = Vec::with_capacity(PROJECTIONS.len());
            for name in PROJECTIONS {
                let hf = format!("model.layers.{l}.{}.{name}", module_group(name));
                let (inp, out) = cfg.projection_shape(name).expect("known projection");
                let weight = weights.get(&format!("{hf}.weight"), &[out, inp])?;
                let targeted = options.target_modules.iter().any(|m| m == name);
                let peft = format!("base_model.model.{hf}");
                let bias = if cfg.projection_has_bias(name) {
                    let b = weights.get(&format!("{hf}.bias"), &[out])?;
                    if bias_trainable(options.bias, targeted) {
                        // PEFT wraps a targeted nn.Linear, so its bias becomes `base_layer.bias`.
                        let pname = if targeted {
                            format!("{peft}.base_layer.bias")
                        } else {
                            format!("{peft}.bias")
                        };
                        params.push(Param::new(pname, vec![out], b.to_vec1::<f32>()?)?);
                        Some(BiasSlot::Trainable(params.len() - 1))
                    } else {
                        Some(BiasSlot::Frozen(b))
                    }
                } else {
                    None
                };
                let lora = if targeted {
                    let r = options.r;
                    let a = kaiming_uniform(&mut init_rng, r, inp);
                    params.push(Param::new(
                        format!("{peft}.lora_A.weight"),
                        vec![r, inp],
                        a,
                    )?);
                    params.push(Param::new(
                        format!("{peft}.lora_B.weight"),
                        vec![out, r],
                        vec![0.0; out * r],
                    )?);
                    Some((params.len() - 2, params.len() - 1))
                } else {
                    None
                };
                proj.push(Proj { weight, bias, lora });
            }
            let p = format!("model.layers.{l}");
            let qk_norm = if cfg.qk_norm {
                Some((
                    weights.get(&format!("{p}.self_attn.q_norm.weight"), &[d])?,
                    weights.get(&format!("{p}.self_attn.k_norm.weight"), &[d])?,
                ))
            } else {
                None
            };
            layers.push(LayerWeights {
                input_norm: weights.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: weights.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                qk_norm,
                proj,
            });
        }
        let trainable_biases: usize = params
            .iter()
            .filter(|p| p.name.ends_with(".bias"))
            .map(|p| p.value.len())
            .sum();
        Ok(CpuBackend {
            rope: rope::Rope::new(&cfg),
            frozen_numel: weights.numel() - trainable_biases,
            config: cfg,
            options,
            embed,
            lm_head,
            final_norm,
            layers,
            params,
            optimizer,
            passes: 0,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Scalars in the model: frozen base weights plus trainable tensors.
    pub fn num_params(&self) -> usize {
        self.frozen_numel + self.num_trainable()
    }

    /// Scalars that train (LoRA A/B and trainable biases).
    pub fn num_trainable(&self) -> usize {
        self.params.iter().map(|p| p.value.len()).sum()
    }

    /// `(name, shape)` of each trainable tensor, in `export_trainable` order.
    pub fn trainable_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect()
    }

    /// Gradient buffers that exist (trainable tensors only), for tests and memory reports.
    pub fn grad_numel(&self) -> usize {
        self.params.iter().map(|p| p.grad.len()).sum()
    }

    /// The accumulated gradients by PEFT name (tests, debugging).
    pub fn gradients(&self) -> Vec<(String, Vec<f32>)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.grad.clone()))
            .collect()
    }

    /// The gradient accumulators in parameter order (data-parallel tests sum them over ranks).
    #[cfg(test)]
    pub fn gradients_mut(&mut self) -> impl Iterator<Item = &mut Vec<f32>> {
        self.params.iter_mut().map(|p| &mut p.grad)
    }

    fn pass_ctx(&self, batch: &Batch, train: bool) -> Result<PassCtx<'_>> {
        let (b, t) = (batch.batch_size, batch.seq_len);
        let (cos, sin) = self.rope.tables(&batch.position_ids)?;
        let d = self.config.head_dim;
        let dropout = (train && self.options.lora_dropout > 0.0).then_some((
            self.options.dropout_seed,
            self.options.lora_dropout,
            self.passes,
        ));
        Ok(PassCtx {
            cfg: &self.config,
            params: &self.params,
            lora_scale: self.options.lora_scale(),
            batch: b,
            seq: t,
            cos: cos.reshape((b, 1, t, d))?,
            sin: sin.reshape((b, 1, t, d))?,
            mask: attention::mask(b, t, &batch.segment_ids, self.config.sliding_window)?,
            dropout,
        })
    }

    fn embed(&self, batch: &Batch) -> Result<Tensor> {
        let ids = Tensor::from_slice(&batch.input_ids, batch.input_ids.len(), &Device::Cpu)?;
        Ok(self.embed.index_select(&ids, 0)?)
    }

    /// Forward (and with `loss_scale`, backward); returns the stats and the gradients.
    fn run(
        &self,
        batch: &Batch,
        loss_scale: Option<f32>,
    ) -> Result<(PassStats, Vec<(usize, Tensor)>)> {
        batch.check(self.config.vocab_size)?;
        let train = loss_scale.is_some();
        let ctx = self.pass_ctx(batch, train)?;
        let keep_all = train && !self.options.gradient_checkpointing;
        let mut x = self.embed(batch)?;
        let mut inputs: Vec<Tensor> = Vec::new();
        let mut caches: Vec<LayerCache> = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            if train && !keep_all {
                inputs.push(x.clone());
            }
            let (out, cache) = layer.forward(l, &x, &ctx)?;
            if keep_all {
                caches.push(cache);
            }
            x = out;
        }
        let eps = self.config.rms_norm_eps;
        let (hn, rstd) = norm::rms_norm(&x, &self.final_norm, eps)?;
        let (loss_sum, d_hn) = loss::lm_head_cross_entropy(
            &hn,
            &self.lm_head,
            &batch.targets,
            loss_scale.map(f64::from),
        )?;
        let stats = PassStats {
            loss_sum,
            tokens: batch.trainable_tokens(),
        };
        let mut grads = Vec::new();
        let Some(d_hn) = d_hn else {
            return Ok((stats, grads));
        };
        let mut dx = norm::rms_norm_backward(&d_hn, &x, &self.final_norm, &rstd)?;
        drop((hn, x));
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let cache = match caches.pop() {
                Some(c) => c,
                // Checkpointing: recompute this layer from its saved input (same dropout masks,
                // since they are a function of the pass counter).
                None => layer.recompute(l, &inputs[l], &ctx)?,
            };
            match layer.backward(&dx, &cache, &ctx, l > 0, &mut grads)? {
                Some(d) => dx = d,
                None => break,
            }
        }
        Ok((stats, grads))
    }
}

/// `(name, shape)` of the trainable tensors a backend with these options would have, in order —
/// what the optimizer is built over, before any weights are loaded.
pub fn trainable_shapes(
    cfg: &ModelConfig,
    options: &EngineOptions,
) -> Result<Vec<(String, Vec<usize>)>> {
    let mut out = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for name in PROJECTIONS {
            let peft = format!(
                "base_model.model.model.layers.{l}.{}.{name}",
                module_group(name)
            );
            let (inp, o) = cfg.projection_shape(name).context("known projection")?;
            let targeted = options.target_modules.iter().any(|m| m == name);
            if cfg.projection_has_bias(name) && bias_trainable(options.bias, targeted) {
                let suffix = if targeted { "base_layer.bias" } else { "bias" };
                out.push((format!("{peft}.{suffix}"), vec![o]));
            }
            if targeted {
                out.push((format!("{peft}.lora_A.weight"), vec![options.r, inp]));
                out.push((format!("{peft}.lora_B.weight"), vec![o, options.r]));
            }
        }
    }
    Ok(out)
}

fn module_group(proj: &str) -> &'static str {
    if matches!(proj, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
        "self_attn"
    } else {
        "mlp"
    }
}

/// PEFT's `bias`: `all` trains every bias, `lora_only` those of adapted modules.
fn bias_trainable(bias: Bias, targeted: bool) -> bool {
    match bias {
        Bias::None => false,
        Bias::All => true,
        Bias::LoraOnly => targeted,
    }
}

/// PEFT's `kaiming_uniform_(A, a=√5)`: U(−1/√in, 1/√in), drawn from a ChaCha8 stream so the
/// same `--random_state` always gives the same adapters.
pub(crate) fn kaiming_uniform(rng: &mut ChaCha8Rng, rows: usize, fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..rows * fan_in)
        .map(|_| {
            // 53 random bits → u ∈ [0, 1).
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect()
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn forward_backward(&mut self, batch: &Batch, loss_scale: f32) -> Result<PassStats> {
        let (stats, grads) = self.run(batch, Some(loss_scale))?;
        for (i, g) in grads {
            self.params[i].accumulate(&g)?;
        }
        self.passes += 1;
        Ok(stats)
    }

    fn eval_loss(&mut self, batch: &Batch) -> Result<PassStats> {
        Ok(self.run(batch, None)?.0)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        let sq: f64 = self
            .params
            .iter()
            .flat_map(|p| p.grad.iter())
            .map(|&g| (g as f64) * (g as f64))
            .sum();
        Ok(sq.sqrt())
    }

    fn optimizer_step(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        for (i, p) in self.params.iter_mut().enumerate() {
            if grad_scale != 1.0 {
                let s = grad_scale as f32;
                p.grad.iter_mut().for_each(|g| *g *= s);
            }
            self.optimizer.step(i, &mut p.value, &p.grad, lr)?;
            p.grad.iter_mut().for_each(|g| *g = 0.0);
            p.refresh()?;
        }
        Ok(())
    }

    fn export_trainable(&self) -> Result<Vec<(String, HostTensor)>> {
        Ok(self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.to_host()))
            .collect())
    }

    fn import_trainable(&mut self, params: &[(String, HostTensor)]) -> Result<()> {
        ensure!(
            params.len() == self.params.len(),
            "checkpoint has {} trainable tensors, this model/LoRA setup has {} (other --r, \
             --target_modules or --bias?)",
            params.len(),
            self.params.len()
        );
        for (p, (name, t)) in self.params.iter_mut().zip(params) {
            p.load(name, t)?;
        }
        Ok(())
    }

    fn export_optimizer(&self) -> Result<(Vec<(String, HostTensor)>, serde_json::Value)> {
        let (tensors, scalars) = self.optimizer.export_state();
        let counters = EngineCounters {
            forward_passes: Some(self.passes),
        };
        Ok((tensors, optimizer_state::pack(scalars, counters)))
    }

    fn import_optimizer(
        &mut self,
        tensors: &[(String, HostTensor)],
        scalars: &serde_json::Value,
    ) -> Result<()> {
        let (opt, counters) = optimizer_state::unpack(scalars)?;
        self.optimizer.import_state(tensors, opt)?;
        self.passes = optimizer_state::resumed_passes(counters, self.options.lora_dropout);
        Ok(())
    }
}
