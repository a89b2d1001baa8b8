//! Loading a model onto the GPU: the frozen weights (bf16, or NF4-quantised for QLoRA) laid out
//! with their folds, the trainable adapters initialised as the cpu engine does, the kernels
//! compiled on their own thread meanwhile.

use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::driver::CudaContext;
use ferrotune_kernels::cache::KernelCache;
use ferrotune_kernels::device::bf16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::gemm::Gemm;
use super::kernel_load::KernelLoad;
use super::nf4::{self, Nf4Quantizer};
use super::oom;
use super::projections::{fold_rank, WeightLayout};
use super::stacks::{Stack, StackLayout, Stacks};
use super::staging::Staging;
use super::trainable::Trainable;
use super::weights::WeightFiles;
use super::{
    check_supported, device_description, pool, probe, BiasWeight, CudaBackend, LayerWeights,
    ProjWeight,
};
use crate::engine::cpu::{kaiming_uniform, rope::Rope, trainable_shapes, EngineOptions};
use crate::job::PROJECTIONS;
use crate::model::ModelConfig;

impl CudaBackend {
    /// [`CudaBackend::new`] on GPU `ordinal`, with the projection weights NF4-quantised on the
    /// GPU when `load_in_4bit` (QLoRA).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        ordinal: usize,
        dir: &std::path::Path,
        cfg: ModelConfig,
        options: EngineOptions,
        optim: crate::cli::choices::Optim,
        weight_decay: f64,
        load_in_4bit: bool,
    ) -> Result<Self> {
        check_supported(&cfg, &options)?;
        probe().map_err(|why| anyhow::anyhow!("--device cuda: {why}"))?;
        let ctx = CudaContext::new(ordinal).with_context(|| format!("opening GPU {ordinal}"))?;
        let (free_at_start, _) = ctx.mem_get_info()?;
        let uploaded = Self::upload(
            ordinal,
            ctx,
            free_at_start,
            dir,
            cfg,
            options,
            optim,
            weight_decay,
            load_in_4bit,
        );
        uploaded.map_err(|e| oom::loading(e, ordinal, free_at_start, load_in_4bit))
    }

    /// Everything [`Self::load`] puts on GPU `ordinal` once its context is open.
    #[allow(clippy::too_many_arguments)]
    fn upload(
        ordinal: usize,
        ctx: Arc<CudaContext>,
        free_at_start: usize,
        dir: &std::path::Path,
        cfg: ModelConfig,
        options: EngineOptions,
        optim: crate::cli::choices::Optim,
        weight_decay: f64,
        load_in_4bit: bool,
    ) -> Result<Self> {
        let device_name = device_description(&ctx);
        // One stream orders everything; per-buffer event tracking would only add overhead.
        // SAFETY: no other stream touches these buffers.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        // The kernels load on their own thread while the weights upload (kernel_load.rs).
        let cache = ferrotune_kernels::cache::default_dir().map(KernelCache::new);
        let mut kernels = KernelLoad::start(&ctx, cache, &device_name);
        let gemm = Gemm::new(stream.clone())?;

        let upload_started = std::time::Instant::now();
        let files = WeightFiles::open(dir)?;
        let mut staging = Staging::new(&stream)?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = files.upload(&mut staging, "model.embed_tokens.weight", &[v, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(files.upload(&mut staging, "lm_head.weight", &[v, h])?)
        };
        let final_norm = files.upload(&mut staging, "model.norm.weight", &[h])?;

        let shapes = trainable_shapes(&cfg, &options)?;
        let mut rng = ChaCha8Rng::seed_from_u64(options.init_seed);
        let mut init = Vec::with_capacity(shapes.len());
        for (name, shape) in &shapes {
            // The cpu engine's initialisation, drawn in the same order: A kaiming-uniform, B zero,
            // a trainable bias starts from the checkpoint's.
            if name.ends_with("lora_A.weight") {
                init.push(kaiming_uniform(&mut rng, shape[0], shape[1]));
            } else if let Some(module) = name.strip_suffix(".bias") {
                let hf = module
                    .trim_start_matches("base_model.model.")
                    .trim_end_matches(".base_layer");
                init.push(files.read_f32(&format!("{hf}.bias"), shape)?);
            } else {
                init.push(vec![0.0; shape.iter().product()]);
            }
        }
        let train = Trainable::new(&stream, &shapes, &init, optim, weight_decay)?;
        let slot = |name: &str| train.slots.iter().position(|s| s.name == name);

        // A pre-quantised base implies 4-bit, as in Unsloth (its NF4 weights are used as stored).
        if let Some(p) = files.prequantized().filter(|_| ordinal == 0) {
            tracing::info!(
                "{}",
                p.describe(dir, "QLoRA on its NF4 weights (4-bit implied)")
            );
        }
        let mut quantizer = if load_in_4bit || files.prequantized().is_some() {
            Some(Nf4Quantizer::new(&stream)?)
        } else {
            None
        };
        let d = cfg.head_dim;
        let fold_r = fold_rank(&options);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut proj = Vec::with_capacity(7);
            let mut bias = Vec::with_capacity(7);
            let mut lora = Vec::with_capacity(7);
            for name in PROJECTIONS {
                let group = if matches!(name, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
                    "self_attn"
                } else {
                    "mlp"
                };
                let (inp, out) = cfg.projection_shape(name).expect("known projection");
                let hf = format!("{p}.{group}.{name}");
                let peft = format!("base_model.model.{hf}");
                let adapter = slot(&format!("{peft}.lora_A.weight"))
                    .zip(slot(&format!("{peft}.lora_B.weight")));
                let weight = nf4::load_projection(
                    &mut staging,
                    &mut kernels,
                    &files,
                    quantizer.as_mut(),
                    &format!("{hf}.weight"),
                    &[out, inp],
                )?;
                let layout = WeightLayout::of(fold_r, proj.len(), adapter.is_some(), (out, inp));
                proj.push(match weight {
                    ProjWeight::Bf16(w) if layout.padded(out * inp) => {
                        ProjWeight::Bf16(layout.place(&stream, w, (out, inp))?)
                    }
                    w => w,
                });
                bias.push(if cfg.projection_has_bias(name) {
                    match slot(&format!("{peft}.base_layer.bias"))
                        .or_else(|| slot(&format!("{peft}.bias")))
                    {
                        Some(i) => Some(BiasWeight::Trainable(i)),
                        None => Some(BiasWeight::Frozen(files.upload(
                            &mut staging,
                            &format!("{hf}.bias"),
                            &[out],
                        )?)),
                    }
                } else {
                    None
                });
                lora.push(adapter);
            }
            let qk_norm = if cfg.qk_norm {
                Some((
                    files.upload(&mut staging, &format!("{p}.self_attn.q_norm.weight"), &[d])?,
                    files.upload(&mut staging, &format!("{p}.self_attn.k_norm.weight"), &[d])?,
                ))
            } else {
                None
            };
            layers.push(LayerWeights {
                norm1: files.upload(&mut staging, &format!("{p}.input_layernorm.weight"), &[h])?,
                norm2: files.upload(
                    &mut staging,
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                proj,
                bias,
                qk_norm,
                lora,
            });
        }
        // A group is stacked when every layer adapts all of it (folding on: no dropout).
        let present = Stack::ALL.map(|st| {
            fold_r.is_some()
                && layers
                    .iter()
                    .all(|w| st.members().all(|j| w.lora[j].is_some()))
        });
        let stacks = match fold_r {
            Some(r) => {
                let layout = StackLayout::new(r, h, present);
                Stacks::new(&stream, cfg.num_hidden_layers, layout)?
            }
            None => None,
        };
        let nf4 = match quantizer {
            Some(q) => {
                // Folded weights are dequantised with their adapter's columns beside them.
                let largest = PROJECTIONS
                    .iter()
                    .enumerate()
                    .map(|(j, n)| {
                        let (i, o) = cfg.projection_shape(n).expect("known projection");
                        WeightLayout::of(fold_r, j, true, (o, i)).len
                    })
                    .max()
                    .unwrap_or(0);
                Some((q, stream.alloc_zeros::<bf16>(largest)?))
            }
            None => None,
        };
        let trained_biases: usize = train
            .slots
            .iter()
            .filter(|s| s.name.ends_with(".bias"))
            .map(|s| s.numel())
            .sum();
        let inv_freq = stream.clone_htod(Rope::new(&cfg).inv_freq())?;
        let kernels = kernels.into_ready()?;
        stream.synchronize()?;
        tracing::info!(
            "weights on the GPU: {:.1} GiB copied in {:.2} s",
            staging.bytes_copied() as f64 / (1u64 << 30) as f64,
            upload_started.elapsed().as_secs_f64()
        );
        drop(staging);
        let mut backend = CudaBackend {
            frozen_numel: files.numel()? - trained_biases,
            ctx,
            stream,
            kernels,
            gemm,
            cfg,
            options,
            embed,
            lm_head,
            final_norm,
            layers,
            inv_freq,
            train,
            bufs: None,
            offload: None,
            free_at_start,
            peak_used: 0,
            device_name,
            reducer: None,
            reduce_in_pass: false,
            nf4,
            fold_r,
            stacks,
            refresh: None,
            extras: None,
            passes: 0,
            dropout_pass: None,
        };
        backend.sample_memory()?;
        // Peak allocated bytes count from here, as the Python stacks' numbers count from after
        // their model load (load-time staging, e.g. bf16 weights before NF4, is not training).
        pool::reset_high(&backend.ctx)?;
        Ok(backend)
    }
}
