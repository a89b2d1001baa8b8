//! Bit-exactness against ggml and round-trip error bounds.
//!
//! Provenance of the digests: ggml's `ggml-quants.c` from llama.cpp as vendored in
//! llama-cpp-python 0.3.36 (PyPI sdist), compiled with `gcc -O2 -ffp-contract=off -DNDEBUG` on
//! x86-64 and run on the rows [`fixture_rows`] builds (the harness generates them with the same
//! xorshift32 and the same f32 operations); each digest is the SHA-256 of
//! `quantize_row_<type>_ref` over all 16 × 512 values. The recipe is in docs/export.md.

use sha2::{Digest, Sha256};

use super::*;

const ROWS: usize = 16;
const COLS: usize = 512;

/// Rows that reach every branch of the quantizers: all zero, constant, denormal-small, sparse
/// outliers, one-signed, half zero, and plain uniform rows of growing scale.
fn fixture_rows() -> Vec<f32> {
    let mut state = 0x1234_5678u32;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let mut x = Vec::with_capacity(ROWS * COLS);
    for r in 0..ROWS {
        for c in 0..COLS {
            let mut unif = || (next() >> 8) as f32 * (1.0 / 16_777_216.0);
            let u = unif() * 2.0 - 1.0;
            let v = match r {
                0 => 0.0,
                1 => 0.5,
                2 => u * 1e-20,
                3 => {
                    if c % 97 == 0 {
                        u * 40.0
                    } else {
                        u * 0.01
                    }
                }
                4 => unif() * 0.3,
                5 => -unif() * 0.3,
                6 => {
                    if c < 256 {
                        0.0
                    } else {
                        u
                    }
                }
                _ => u * 0.02 * r as f32,
            };
            x.push(v);
        }
    }
    x
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn fixture_input_matches_the_c_harness() {
    let x = fixture_rows();
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(
        sha256_hex(&bytes),
        "f06b89de409b7b646d9e585711ccbc39dfb604a91fdc30b4a55cfe8edf5665e3"
    );
}

#[test]
fn quantizers_are_bit_exact_with_ggml_reference() {
    let expected = [
        (
            GgmlType::Q4_0,
            "732515faa43d583dd87f40fa06b39363e884b6ded427c4caf9d614258170401f",
        ),
        (
            GgmlType::Q4_1,
            "ae153630bf897f4f6c70216afb34507064cb70b37231606184b3ba4f57e10fb3",
        ),
        (
            GgmlType::Q5_0,
            "60cb8fa87555dad5b083280965c5f84e6d614fdfb092d95a3421974aa888476f",
        ),
        (
            GgmlType::Q5_1,
            "a715a6b3d7e75cd8b7ec7852e56ac2e2561fc59c1d634b4e7135dd8ea4cf2698",
        ),
        (
            GgmlType::Q8_0,
            "32f5a1949568c31ae5faf32479aa1a452fb14a10a72057cccb5ef153c2a58964",
        ),
        (
            GgmlType::Q2_K,
            "af4743f9042e16d0d15744113c66015e1b23908599625ff0b311c213f54e6bc0",
        ),
        (
            GgmlType::Q3_K,
            "94e97351d1bedd0e92f8422c5e38b90b4c3c8d74a870ae23eae2d4b507e3b200",
        ),
        (
            GgmlType::Q4_K,
            "256f9660b7f8097750f62ea9219da7d851bba0c07be7981ed28c412b37a42a64",
        ),
        (
            GgmlType::Q5_K,
            "5d528a19ee1a4a236fca4a4264c39ae9260953e8e6350a3487bc9c2130a9740d",
        ),
        (
            GgmlType::Q6_K,
            "e5fca0d2a7439b06ad52bcb5dbf2f34962fa0146bc48b8e0d04e5ce5f3609fec",
        ),
    ];
    let x = fixture_rows();
    let mut failures = Vec::new();
    for (ty, digest) in expected {
        let bytes = quantize_rows(ty, &x, COLS).unwrap();
        if sha256_hex(&bytes) != digest {
            failures.push(ty.name());
        }
    }
    assert!(failures.is_empty(), "not bit-exact with ggml: {failures:?}");
}

/// Root-mean-square error relative to the row's RMS, over the uniform rows.
fn relative_rms_error(ty: GgmlType) -> f64 {
    let x = fixture_rows();
    let rows = &x[7 * COLS..];
    let bytes = quantize_rows(ty, rows, COLS).unwrap();
    let back = dequantize(ty, &bytes, rows.len()).unwrap();
    let (mut err, mut sig) = (0f64, 0f64);
    for (a, b) in rows.iter().zip(&back) {
        err += ((a - b) as f64).powi(2);
        sig += (*a as f64).powi(2);
    }
    (err / sig).sqrt()
}

#[test]
fn round_trip_error_is_within_each_types_budget() {
    // Budgets: ~1.2× the measured error on these uniform rows (which sits near the uniform-noise
    // bound step/√12 of each type's level count), so a broken quantizer fails while harmless
    // changes of rounding do not.
    let budgets = [
        (GgmlType::F32, 0.0),
        (GgmlType::F16, 3e-4),
        (GgmlType::BF16, 2e-3),
        (GgmlType::Q8_0, 4.5e-3),
        (GgmlType::Q6_K, 0.016),
        (GgmlType::Q5_1, 0.035),
        (GgmlType::Q5_0, 0.037),
        (GgmlType::Q5_K, 0.033),
        (GgmlType::Q4_1, 0.073),
        (GgmlType::Q4_0, 0.079),
        (GgmlType::Q4_K, 0.066),
        (GgmlType::Q3_K, 0.15),
        (GgmlType::Q2_K, 0.28),
    ];
    for (ty, budget) in budgets {
        let e = relative_rms_error(ty);
        assert!(e <= budget, "{ty}: relative RMS error {e} above {budget}");
    }
}

#[test]
fn degenerate_rows_decode_to_themselves() {
    for ty in GgmlType::ALL {
        let zeros = vec![0f32; 256];
        let bytes = quantize_rows(ty, &zeros, 256).unwrap();
        assert!(
            dequantize(ty, &bytes, 256)
                .unwrap()
                .iter()
                .all(|v| *v == 0.0),
            "{ty}"
        );
    }
}

#[test]
fn rows_that_do_not_fill_blocks_are_refused() {
    let err = quantize_rows(GgmlType::Q4_K, &[0.0; 64], 64).unwrap_err();
    assert!(err.to_string().contains("multiple of 256"), "{err}");
}
