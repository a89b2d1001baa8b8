//! The gradient oracle: the same model written the obvious way with candle's autograd (`Var` +
//! `backward()`), reading weights by their Hugging Face names. It shares no code with the engine
//! except the RoPE tables and the dropout masks (both forward-only inputs).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};

use super::super::dropout::{self, Site};
use super::super::rope::Rope;
use super::super::EngineOptions;
use crate::engine::{Batch, HostData, HostTensor, IGNORE};
use crate::job::PROJECTIONS;
use crate::model::{ModelConfig, Weights};

pub struct OracleOut {
    pub loss_sum: f64,
    pub grads: HashMap<String, Vec<f32>>,
}

type R<T> = candle_core::Result<T>;

pub fn rms(x: &Tensor, w: &Tensor, eps: f64) -> R<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

pub fn rotate_half(x: &Tensor) -> R<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    Tensor::cat(
        &[
            &x.narrow(D::Minus1, half, half)?.neg()?,
            &x.narrow(D::Minus1, 0, half)?,
        ],
        D::Minus1,
    )
}

pub fn softmax(s: &Tensor) -> R<Tensor> {
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Plain attention with `repeat_kv` and a `[B, 1, T, T]` additive mask.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> R<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let g = h / k.dim(1)?;
    let rep = |x: &Tensor| -> R<Tensor> {
        let (b, hk, t, d) = x.dims4()?;
        x.unsqueeze(2)?
            .broadcast_as((b, hk, g, t, d))?
            .contiguous()?
            .reshape((b, hk * g, t, d))
    };
    let (k, v) = (rep(k)?, rep(v)?);
    let s = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(mask)?;
    let _ = (b, t);
    softmax(&s)?.matmul(&v)
}

pub fn mask(batch: &Batch, window: Option<usize>) -> R<Tensor> {
    let t = batch.seq_len;
    let mut m = Vec::with_capacity(batch.batch_size * t * t);
    for b in 0..batch.batch_size {
        for i in 0..t {
            for j in 0..t {
                let same = batch.segment_ids[b * t + i] == batch.segment_ids[b * t + j];
                let in_window = window.is_none_or(|w| i - j.min(i) < w);
                m.push(if j <= i && same && in_window {
                    0.0f32
                } else {
                    -1e9
                });
            }
        }
    }
    Tensor::from_vec(m, (batch.batch_size, 1, t, t), &Device::Cpu)
}

/// Sum of cross-entropy over trainable targets from final hidden states `[N, H]`.
pub fn ce_sum(h: &Tensor, w_lm: &Tensor, targets: &[i32]) -> R<Tensor> {
    let rows: Vec<u32> = (0..targets.len() as u32)
        .filter(|&i| targets[i as usize] != IGNORE)
        .collect();
    let t: Vec<u32> = rows.iter().map(|&i| targets[i as usize] as u32).collect();
    let n = rows.len();
    let hs = h.index_select(&Tensor::from_vec(rows, n, &Device::Cpu)?, 0)?;
    let z = hs.matmul(&w_lm.t()?)?;
    let m = z.max_keepdim(D::Minus1)?.detach();
    let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?;
    let logp = z.broadcast_sub(&lse)?;
    logp.gather(&Tensor::from_vec(t, (n, 1), &Device::Cpu)?, 1)?
        .sum_all()?
        .neg()
}

/// Loss and gradients of every trainable tensor, by PEFT name. `dropout_pass` is the engine's
/// pass counter when LoRA dropout is on.
pub fn run(
    cfg: &ModelConfig,
    weights: &Weights,
    trainable: &[(String, HostTensor)],
    opts: &EngineOptions,
    batch: &Batch,
    dropout_pass: Option<u64>,
) -> OracleOut {
    let dev = Device::Cpu;
    let vars: HashMap<String, Var> = trainable
        .iter()
        .map(|(name, t)| {
            let HostData::F32(d) = &t.data else {
                panic!("f32")
            };
            (
                name.clone(),
                Var::from_vec(d.clone(), t.shape.as_slice(), &dev).unwrap(),
            )
        })
        .collect();
    let w = |name: &str| {
        weights
            .tensor(name)
            .unwrap_or_else(|| panic!("{name}"))
            .clone()
    };
    let (b, t, d) = (batch.batch_size, batch.seq_len, cfg.head_dim);
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let n = b * t;
    let eps = cfg.rms_norm_eps;
    let scale = opts.lora_scale();
    let (cos, sin) = Rope::new(cfg).tables(&batch.position_ids).unwrap();
    let (cos, sin) = (
        cos.reshape((b, 1, t, d)).unwrap(),
        sin.reshape((b, 1, t, d)).unwrap(),
    );
    let m = mask(batch, cfg.sliding_window).unwrap();

    let ids = Tensor::from_slice(&batch.input_ids, n, &dev).unwrap();
    let mut x = w("model.embed_tokens.weight")
        .index_select(&ids, 0)
        .unwrap();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let proj = |j: usize, x: &Tensor| -> Tensor {
            let name = PROJECTIONS[j];
            let group = if j < 4 { "self_attn" } else { "mlp" };
            let hf = format!("{p}.{group}.{name}");
            let peft = format!("base_model.model.{hf}");
            let mut y = x.matmul(&w(&format!("{hf}.weight")).t().unwrap()).unwrap();
            let bias = vars
                .get(&format!("{peft}.base_layer.bias"))
                .or_else(|| vars.get(&format!("{peft}.bias")))
                .map(|v| v.as_tensor().clone())
                .or_else(|| weights.tensor(&format!("{hf}.bias")).cloned());
            if let Some(bias) = bias {
                y = y.broadcast_add(&bias).unwrap();
            }
            if let Some(a) = vars.get(&format!("{peft}.lora_A.weight")) {
                let bm = &vars[&format!("{peft}.lora_B.weight")];
                let xd = match dropout_pass {
                    Some(pass) if opts.lora_dropout > 0.0 => {
                        let (rows, cols) = x.dims2().unwrap();
                        let site = Site {
                            pass,
                            layer: l,
                            module: j,
                        };
                        (x * dropout::mask(opts.dropout_seed, site, opts.lora_dropout, rows, cols)
                            .unwrap())
                        .unwrap()
                    }
                    _ => x.clone(),
                };
                let lora = xd
                    .matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&bm.t().unwrap())
                    .unwrap();
                y = (y + (lora * scale).unwrap()).unwrap();
            }
            y
        };
        let n1 = rms(&x, &w(&format!("{p}.input_layernorm.weight")), eps).unwrap();
        let heads = |y: Tensor, h: usize, norm: Option<&str>| -> Tensor {
            let mut y = y.reshape((b, t, h, d)).unwrap();
            if let Some(nw) = norm {
                y = rms(&y, &w(&format!("{p}.self_attn.{nw}.weight")), eps).unwrap();
            }
            y.transpose(1, 2).unwrap()
        };
        let (qn, kn) = if cfg.qk_norm {
            (Some("q_norm"), Some("k_norm"))
        } else {
            (None, None)
        };
        let q = heads(proj(0, &n1), nh, qn);
        let k = heads(proj(1, &n1), nkv, kn);
        let v = heads(proj(2, &n1), nkv, None);
        let rope = |x: &Tensor| {
            (x.broadcast_mul(&cos).unwrap() + rotate_half(x).unwrap().broadcast_mul(&sin).unwrap())
                .unwrap()
        };
        let o = attention(&rope(&q), &rope(&k), &v, &m).unwrap();
        let o = o.transpose(1, 2).unwrap().reshape((n, nh * d)).unwrap();
        let h = (&x + proj(3, &o)).unwrap();
        let n2 = rms(&h, &w(&format!("{p}.post_attention_layernorm.weight")), eps).unwrap();
        let act = (proj(4, &n2).silu().unwrap() * proj(5, &n2)).unwrap();
        x = (h + proj(6, &act)).unwrap();
    }
    let hn = rms(&x, &w("model.norm.weight"), eps).unwrap();
    let lm = if cfg.tie_word_embeddings {
        w("model.embed_tokens.weight")
    } else {
        w("lm_head.weight")
    };
    let loss = ce_sum(&hn, &lm, &batch.targets).unwrap();
    let store = loss.backward().unwrap();
    let grads = vars
        .iter()
        .map(|(name, v)| {
            let g = store
                .get(v.as_tensor())
                .map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .unwrap_or_else(|| vec![0.0; v.as_tensor().elem_count()]);
            (name.clone(), g)
        })
        .collect();
    OracleOut {
        loss_sum: loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        grads,
    }
}
