//! Hugging Face tensor names → llama.cpp's GGUF tensor names for the llama family, the order
//! llama.cpp keeps tensors in, and the Q/K row permutation of llama.cpp's HF converter.

use anyhow::{bail, Result};

/// What becomes of one Hugging Face tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// Written under this GGUF name.
    Tensor(String),
    /// Not part of a GGUF model (derived buffers such as `rotary_emb.inv_freq`).
    Skip,
}

/// Tensors outside the blocks: (Hugging Face name, GGUF name).
const GLOBAL_TENSORS: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Modules of block N: (Hugging Face `model.layers.N.<module>`, GGUF `blk.N.<module>`).
const LAYER_MODULES: [(&str, &str); 11] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Maps a Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`) to its GGUF name
/// (`blk.3.attn_q.weight`). Unknown names are an error: silently dropping a weight would write a
/// model that loads but is wrong.
pub fn gguf_name(hf: &str) -> Result<Mapped> {
    if hf.ends_with("rotary_emb.inv_freq") {
        return Ok(Mapped::Skip);
    }
    if let Some((_, gguf)) = GLOBAL_TENSORS.iter().find(|(h, _)| *h == hf) {
        return Ok(Mapped::Tensor(gguf.to_string()));
    }
    let Some(rest) = hf.strip_prefix("model.layers.") else {
        bail!("tensor {hf}: not a llama-family weight; no GGUF name for it");
    };
    let Some((layer, local)) = rest.split_once('.') else {
        bail!("tensor {hf}: no layer index");
    };
    let Ok(layer) = layer.parse::<usize>() else {
        bail!("tensor {hf}: layer index {layer:?} is not a number");
    };
    let (module, suffix) = match local.rsplit_once('.') {
        Some((m, s @ ("weight" | "bias"))) => (m, s),
        _ => bail!("tensor {hf}: expected a .weight or .bias"),
    };
    let Some((_, gguf)) = LAYER_MODULES.iter().find(|(h, _)| *h == module) else {
        bail!("tensor {hf}: module {module} has no GGUF name in the llama family");
    };
    Ok(Mapped::Tensor(format!("blk.{layer}.{gguf}.{suffix}")))
}

/// The reverse of [`gguf_name`]: a GGUF base model's tensor under its Hugging Face name.
pub fn hf_name(gguf: &str) -> Result<String> {
    if let Some((hf, _)) = GLOBAL_TENSORS.iter().find(|(_, g)| *g == gguf) {
        return Ok(hf.to_string());
    }
    let parsed = gguf.strip_prefix("blk.").and_then(|rest| {
        let (layer, local) = rest.split_once('.')?;
        let (module, suffix) = local.rsplit_once('.')?;
        Some((layer.parse::<usize>().ok()?, module, suffix))
    });
    let Some((layer, module, suffix @ ("weight" | "bias"))) = parsed else {
        bail!("tensor {gguf}: not a llama-family tensor name");
    };
    let Some((hf, _)) = LAYER_MODULES.iter().find(|(_, g)| *g == module) else {
        bail!("tensor {gguf}: module {module} is not part of a llama-family block");
    };
    Ok(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The layer of a `blk.N.…` name.
pub fn layer_of(gguf: &str) -> Option<usize> {
    gguf.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama.cpp's tensor order (`weight_name_comparer` in llama-model-loader.h): tensors outside
/// blocks first, then by layer, each group by name. llama-quantize's per-layer rules count
/// tensors in this order, so writing it makes "layer i" mean the same thing here.
pub fn llama_cpp_order(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |n: &str| layer_of(n).map_or(-1i64, |l| l as i64);
    key(a).cmp(&key(b)).then_with(|| a.cmp(b))
}

/// Undoes Hugging Face's rotary layout for Llama q/k projections, as llama.cpp's converter does
/// (`LlamaModel.permute`): within each head, rows `[first half | second half]` become
/// interleaved pairs, because ggml's llama RoPE rotates adjacent pairs. `data` is row-major
/// with `rows` rows (weights) or one value per row (biases).
pub fn permute_qk(data: &[f32], rows: usize, n_head: usize) -> Result<Vec<f32>> {
    regroup_qk(data, rows, n_head, true)
}

/// The inverse of [`permute_qk`]: a GGUF base model's q/k rows back in Hugging Face's layout.
pub fn unpermute_qk(data: &[f32], rows: usize, n_head: usize) -> Result<Vec<f32>> {
    regroup_qk(data, rows, n_head, false)
}

fn regroup_qk(data: &[f32], rows: usize, n_head: usize, to_gguf: bool) -> Result<Vec<f32>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || !data.len().is_multiple_of(rows) {
        bail!("cannot permute {rows} rows into {n_head} rotary heads");
    }
    let cols = data.len() / rows;
    let half = rows / n_head / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * 2 * half + j * half + i;
                let gguf = h * 2 * half + i * 2 + j;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_llama_family_tensor() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.0.self_attn.q_proj.weight",
                "blk.0.attn_q.weight",
            ),
            (
                "model.layers.11.self_attn.k_proj.bias",
                "blk.11.attn_k.bias",
            ),
            (
                "model.layers.2.self_attn.v_proj.weight",
                "blk.2.attn_v.weight",
            ),
            (
                "model.layers.2.self_attn.o_proj.weight",
                "blk.2.attn_output.weight",
            ),
            (
                "model.layers.2.self_attn.q_norm.weight",
                "blk.2.attn_q_norm.weight",
            ),
            (
                "model.layers.2.self_attn.k_norm.weight",
                "blk.2.attn_k_norm.weight",
            ),
            (
                "model.layers.2.input_layernorm.weight",
                "blk.2.attn_norm.weight",
            ),
            (
                "model.layers.2.post_attention_layernorm.weight",
                "blk.2.ffn_norm.weight",
            ),
            (
                "model.layers.2.mlp.gate_proj.weight",
                "blk.2.ffn_gate.weight",
            ),
            ("model.layers.2.mlp.up_proj.weight", "blk.2.ffn_up.weight"),
            (
                "model.layers.2.mlp.down_proj.weight",
                "blk.2.ffn_down.weight",
            ),
        ];
        for (hf, gguf) in cases {
            assert_eq!(gguf_name(hf).unwrap(), Mapped::Tensor(gguf.into()), "{hf}");
        }
        assert_eq!(
            gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq").unwrap(),
            Mapped::Skip
        );
        assert!(gguf_name("model.layers.0.mlp.experts.0.w1.weight").is_err());
        assert!(gguf_name("vision_tower.patch.weight").is_err());
    }

    #[test]
    fn order_puts_globals_first_then_layers_numerically() {
        let mut names = vec![
            "blk.10.attn_q.weight",
            "blk.2.attn_v.weight",
            "token_embd.weight",
            "blk.2.attn_k.weight",
            "output.weight",
        ];
        names.sort_by(|a, b| llama_cpp_order(a, b));
        assert_eq!(
            names,
            [
                "output.weight",
                "token_embd.weight",
                "blk.2.attn_k.weight",
                "blk.2.attn_v.weight",
                "blk.10.attn_q.weight"
            ]
        );
    }

    #[test]
    fn permutation_matches_the_converters_reshape_swapaxes() {
        // 2 heads of 4 rows: per head rows [a0 a1 | b0 b1] → [a0 b0 a1 b1].
        let rows: Vec<f32> = (0..8).map(|r| r as f32).collect();
        assert_eq!(
            permute_qk(&rows, 8, 2).unwrap(),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );
        // Rows move whole.
        let m: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(
            permute_qk(&m, 4, 1).unwrap(),
            [0., 1., 2., 3., 8., 9., 10., 11., 4., 5., 6., 7., 12., 13., 14., 15.]
        );
        assert!(permute_qk(&rows, 8, 3).is_err());
    }
}
