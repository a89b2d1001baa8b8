//! Each block's hand-written backward against candle's autograd of its forward:
//! `L = Σ f(x) ⊙ G` for a random `G`, so `∂L/∂x` is the vector-Jacobian product with `G`.

use candle_core::{Device, Tensor, Var};

use super::super::{attention, linear, loss, mlp, norm, rope};
use super::oracle;
use super::{assert_close, rand_tensor};
use crate::engine::IGNORE;

fn grad_of(v: &Var, loss: &Tensor) -> Tensor {
    loss.backward().unwrap().get(v.as_tensor()).unwrap().clone()
}

fn vjp_loss(y: &Tensor, g: &Tensor) -> Tensor {
    (y * g).unwrap().sum_all().unwrap()
}

#[test]
fn rms_norm_backward_matches_autograd() {
    let x = Var::from_tensor(&rand_tensor(&[6, 32], 1.5, 1)).unwrap();
    let w = (rand_tensor(&[32], 0.3, 2) + 1.0).unwrap();
    let g = rand_tensor(&[6, 32], 1.0, 3);
    let (y, rstd) = norm::rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
    let y_ref = oracle::rms(x.as_tensor(), &w, 1e-5).unwrap();
    assert_close("rms forward", &y, &y_ref, 1e-5);
    let dx = norm::rms_norm_backward(&g, x.as_tensor(), &w, &rstd).unwrap();
    assert_close("rms dx", &dx, &grad_of(&x, &vjp_loss(&y_ref, &g)), 1e-4);
}

#[test]
fn rope_backward_is_the_transpose_of_rope() {
    let cfg = super::spec_config(&super::llama3_spec());
    let r = rope::Rope::new(&cfg);
    let d = cfg.head_dim;
    let (cos, sin) = r.tables(&[0, 1, 2, 7, 3, 0, 1, 40]).unwrap();
    let (cos, sin) = (
        cos.reshape((2, 1, 4, d)).unwrap(),
        sin.reshape((2, 1, 4, d)).unwrap(),
    );
    let x = Var::from_tensor(&rand_tensor(&[2, 3, 4, d], 1.0, 4)).unwrap();
    let g = rand_tensor(&[2, 3, 4, d], 1.0, 5);
    let y = (x.as_tensor().broadcast_mul(&cos).unwrap()
        + oracle::rotate_half(x.as_tensor())
            .unwrap()
            .broadcast_mul(&sin)
            .unwrap())
    .unwrap();
    assert_close(
        "rope forward",
        &rope::apply(x.as_tensor(), &cos, &sin).unwrap(),
        &y,
        1e-6,
    );
    let dx = rope::apply_backward(&g, &cos, &sin).unwrap();
    assert_close("rope dx", &dx, &grad_of(&x, &vjp_loss(&y, &g)), 1e-5);
}

#[test]
fn llama3_rope_scaling_follows_transformers() {
    // Reference values from transformers' `_compute_llama3_parameters` with factor 8,
    // low 1, high 4, original context 8192, theta 500000, head_dim 128 (Llama 3.1).
    let mut cfg = super::spec_config(&super::llama3_spec());
    cfg.head_dim = 128;
    cfg.rope_theta = 500000.0;
    cfg.rope_scaling = crate::model::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let f = rope::Rope::new(&cfg).inv_freq().to_vec();
    let base = |i: usize| 1.0 / 500000f64.powf(2.0 * i as f64 / 128.0);
    // High frequencies (wavelength < 2048) are untouched.
    let rel = |got: f32, want: f64| (got as f64 - want).abs() / want;
    assert!(rel(f[0], 1.0) < 1e-7 && rel(f[10], base(10)) < 1e-6);
    // Low frequencies (wavelength > 8192) are divided by the factor.
    assert!(rel(f[63], base(63) / 8.0) < 1e-6);
    // The band between is blended: smooth = (8192/λ − 1)/3.
    let i = (0..64).find(|&i| {
        let wl = 2.0 * std::f64::consts::PI / base(i);
        (2048.0..=8192.0).contains(&wl)
    });
    let i = i.expect("a medium frequency exists");
    let wl = 2.0 * std::f64::consts::PI / base(i);
    let smooth = (8192.0 / wl - 1.0) / 3.0;
    let want = (1.0 - smooth) * base(i) / 8.0 + smooth * base(i);
    assert!(rel(f[i], want) < 1e-6, "{} vs {want}", f[i]);
    // The blend is strictly between the two regimes.
    assert!((f[i] as f64) < base(i) && (f[i] as f64) > base(i) / 8.0);
}

#[test]
fn gqa_attention_with_segments_and_window_matches_autograd() {
    let (b, h, hkv, t, d) = (2, 4, 2, 7, 8);
    let segs: Vec<u32> = vec![0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 2];
    let q = Var::from_tensor(&rand_tensor(&[b, h, t, d], 1.0, 6)).unwrap();
    let k = Var::from_tensor(&rand_tensor(&[b, hkv, t, d], 1.0, 7)).unwrap();
    let v = Var::from_tensor(&rand_tensor(&[b, hkv, t, d], 1.0, 8)).unwrap();
    let g = rand_tensor(&[b, h, t, d], 1.0, 9);
    let m = attention::mask(b, t, &segs, Some(3)).unwrap();
    let (o, cache) = attention::forward(q.as_tensor(), k.as_tensor(), v.as_tensor(), &m).unwrap();
    let batch = crate::engine::Batch {
        batch_size: b,
        seq_len: t,
        input_ids: vec![0; b * t],
        targets: vec![0; b * t],
        position_ids: vec![0; b * t],
        segment_ids: segs.clone(),
    };
    let m_ref = oracle::mask(&batch, Some(3)).unwrap();
    let o_ref = oracle::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &m_ref).unwrap();
    assert_close("attention forward", &o, &o_ref, 1e-5);
    let (dq, dk, dv) =
        attention::backward(&g, q.as_tensor(), k.as_tensor(), v.as_tensor(), &cache).unwrap();
    let store = vjp_loss(&o_ref, &g).backward().unwrap();
    assert_close("attention dq", &dq, store.get(q.as_tensor()).unwrap(), 1e-4);
    assert_close("attention dk", &dk, store.get(k.as_tensor()).unwrap(), 1e-4);
    assert_close("attention dv", &dv, store.get(v.as_tensor()).unwrap(), 1e-4);
}

#[test]
fn swiglu_backward_matches_autograd() {
    let gate = Var::from_tensor(&rand_tensor(&[5, 24], 2.0, 10)).unwrap();
    let up = Var::from_tensor(&rand_tensor(&[5, 24], 1.0, 11)).unwrap();
    let g = rand_tensor(&[5, 24], 1.0, 12);
    let y = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
    assert_close(
        "swiglu forward",
        &mlp::swiglu(gate.as_tensor(), up.as_tensor()).unwrap(),
        &y,
        1e-6,
    );
    let (dg, du) = mlp::swiglu_backward(&g, gate.as_tensor(), up.as_tensor()).unwrap();
    let store = vjp_loss(&y, &g).backward().unwrap();
    assert_close(
        "swiglu dgate",
        &dg,
        store.get(gate.as_tensor()).unwrap(),
        1e-4,
    );
    assert_close("swiglu dup", &du, store.get(up.as_tensor()).unwrap(), 1e-4);
}

#[test]
fn lora_linear_with_bias_and_dropout_matches_autograd() {
    let (n, inp, out, r) = (6, 20, 12, 4);
    let x = Var::from_tensor(&rand_tensor(&[n, inp], 1.0, 13)).unwrap();
    let w = rand_tensor(&[out, inp], 0.2, 14);
    let bias = Var::from_tensor(&rand_tensor(&[out], 0.5, 15)).unwrap();
    let a = Var::from_tensor(&rand_tensor(&[r, inp], 0.3, 16)).unwrap();
    let bm = Var::from_tensor(&rand_tensor(&[out, r], 0.3, 17)).unwrap();
    let mask = super::super::dropout::mask(
        5,
        super::super::dropout::Site {
            pass: 0,
            layer: 0,
            module: 0,
        },
        0.3,
        n,
        inp,
    )
    .unwrap();
    let g = rand_tensor(&[n, out], 1.0, 18);
    let scale = 2.0;
    let lin = linear::Linear {
        weight: &w,
        bias: Some(bias.as_tensor()),
        adapter: Some(linear::Adapter {
            a: a.as_tensor(),
            b: bm.as_tensor(),
            scale,
        }),
    };
    let (y, cache) = lin.forward(x.as_tensor(), Some(mask.clone())).unwrap();
    let y_ref = (x
        .as_tensor()
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(bias.as_tensor())
        .unwrap()
        + ((x.as_tensor() * &mask)
            .unwrap()
            .matmul(&a.as_tensor().t().unwrap())
            .unwrap()
            .matmul(&bm.as_tensor().t().unwrap())
            .unwrap()
            * scale)
            .unwrap())
    .unwrap();
    assert_close("linear forward", &y, &y_ref, 1e-5);
    let (dx, grads) = lin.backward(&g, x.as_tensor(), &cache, true, true).unwrap();
    let store = vjp_loss(&y_ref, &g).backward().unwrap();
    assert_close(
        "linear dx",
        &dx.unwrap(),
        store.get(x.as_tensor()).unwrap(),
        1e-4,
    );
    assert_close(
        "linear dA",
        &grads.a.unwrap(),
        store.get(a.as_tensor()).unwrap(),
        1e-4,
    );
    assert_close(
        "linear dB",
        &grads.b.unwrap(),
        store.get(bm.as_tensor()).unwrap(),
        1e-4,
    );
    assert_close(
        "linear dbias",
        &grads.bias.unwrap(),
        store.get(bias.as_tensor()).unwrap(),
        1e-4,
    );
    assert!(
        store.get(&w).is_none(),
        "the oracle must not see W as trainable either"
    );
}

#[test]
fn chunked_cross_entropy_matches_autograd_and_skips_ignored_rows() {
    let (n, hdim, vocab) = (9, 16, 40);
    let h = Var::from_tensor(&rand_tensor(&[n, hdim], 1.0, 19)).unwrap();
    let w = rand_tensor(&[vocab, hdim], 0.5, 20);
    let targets = vec![3, IGNORE, 0, 39, IGNORE, 7, 7, 12, IGNORE];
    let loss_ref = oracle::ce_sum(h.as_tensor(), &w, &targets).unwrap();
    let (sum, dh) = loss::chunked(h.as_tensor(), &w, &targets, Some(0.25), 2).unwrap();
    let want = loss_ref.to_scalar::<f32>().unwrap() as f64;
    assert!((sum - want).abs() / want < 1e-5, "{sum} vs {want}");
    let dh_ref = (grad_of(&h, &loss_ref) * 0.25).unwrap();
    let dh = dh.unwrap();
    assert_close("ce dh", &dh, &dh_ref, 1e-4);
    let ignored_row = dh
        .get(1)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(ignored_row, 0.0);
    let _ = Device::Cpu;
}
