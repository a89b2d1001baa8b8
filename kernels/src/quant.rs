//! Quantisation tables shared by the GPU kernels and their CPU references.

use std::sync::OnceLock;

/// Values per NF4 quantisation block (bitsandbytes' QLoRA blocksize).
pub const NF4_BLOCK: usize = 64;
/// Values per 8-bit quantisation block (optimizer states and double-quantised absmax).
pub const Q8_BLOCK: usize = 256;

/// The 16 NF4 levels (QLoRA paper; bitsandbytes' `get_4bit_type("nf4")`), ascending.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Midpoints between neighbouring NF4 levels, as f32 (the literals in `nf4.cu` are the same
/// values). A normalised weight gets the code of how many midpoints lie strictly below it.
pub const NF4_MIDPOINTS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_42,
    -0.234_607_4,
    -0.137_911_74,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_76,
    0.389_312_54,
    0.501_663_45,
    0.642_786_9,
    0.861_478_45,
];

/// NF4 code of a weight already divided by its block's absmax.
pub fn nf4_code(x: f32) -> u8 {
    NF4_MIDPOINTS.iter().filter(|&&m| x > m).count() as u8
}

/// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`): Adam's first moment
/// and double-quantised absmax.
pub fn signed_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| dynamic_map(true))
}

/// bitsandbytes' unsigned dynamic map (`create_dynamic_map(signed=False)`): Adam's second moment.
pub fn unsigned_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| dynamic_map(false))
}

/// `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: for each decade 10^(i-6),
/// i = 0..7, the midpoints of `linspace(0.1, 1, k+1)` with k = 2^i (signed, mirrored) or 2^(i+1)
/// (unsigned), plus 0 and 1, sorted. Computed in f32 like torch.
fn dynamic_map(signed: bool) -> [f32; 256] {
    const MAX_EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let items = if signed {
            1usize << i
        } else {
            1usize << (i + 1)
        };
        let scale = 10f32.powi(i - (MAX_EXPONENT_BITS - 1));
        let bounds = linspace_f32(0.1, 1.0, items + 1);
        for pair in bounds.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("a dynamic map has 256 values")
}

/// torch.linspace in f32: the first half counts up from `start`, the second down from `end`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// Index of the map value nearest to `x`, ties to the lower one (the kernels' `nearest_code`).
pub fn nearest_code(map: &[f32; 256], x: f32) -> u8 {
    let upper = map.partition_point(|&v| v < x);
    if upper == 0 {
        return 0;
    }
    if upper == 256 {
        return 255;
    }
    let lower = upper - 1;
    if map[upper] - x < x - map[lower] {
        upper as u8
    } else {
        lower as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_midpoints_equal_the_cuda_literals() {
        // The f32 values of the literals in nf4.cu (bitsandbytes' constants).
        let levels: [f64; 16] = [
            -1.0,
            -0.6961928009986877,
            -0.5250730514526367,
            -0.39491748809814453,
            -0.28444138169288635,
            -0.18477343022823334,
            -0.09105003625154495,
            0.0,
            0.07958029955625534,
            0.16093020141124725,
            0.24611230194568634,
            0.33791524171829224,
            0.44070982933044434,
            0.5626170039176941,
            0.7229568362236023,
            1.0,
        ];
        let mids: [f64; 15] = [
            -0.8480963706970215,
            -0.6106328964233398,
            -0.4599952697753906,
            -0.33967941999435425,
            -0.23460739850997925,
            -0.13791173696517944,
            -0.045525018125772476,
            0.03979014977812767,
            0.120255246758461,
            0.2035212516784668,
            0.2920137643814087,
            0.3893125355243683,
            0.5016634464263916,
            0.6427869200706482,
            0.8614784479141235,
        ];
        for (a, b) in NF4_LEVELS.iter().zip(levels) {
            assert_eq!(a.to_bits(), (b as f32).to_bits());
        }
        for (a, b) in NF4_MIDPOINTS.iter().zip(mids) {
            assert_eq!(a.to_bits(), (b as f32).to_bits());
        }
        let src = crate::sources::NF4.source;
        for m in mids {
            assert!(
                src.contains(&format!("{m:?}f")),
                "nf4.cu lacks midpoint {m:?}"
            );
        }
    }

    #[test]
    fn nf4_midpoints_are_the_level_midpoints_and_codes_round_to_nearest() {
        for (i, m) in NF4_MIDPOINTS.iter().enumerate() {
            let exact = (NF4_LEVELS[i] as f64 + NF4_LEVELS[i + 1] as f64) / 2.0;
            assert!((*m as f64 - exact).abs() < 1e-7, "{i}");
        }
        for (i, &l) in NF4_LEVELS.iter().enumerate() {
            assert_eq!(nf4_code(l) as usize, i);
        }
        assert_eq!(nf4_code(-2.0), 0);
        assert_eq!(nf4_code(2.0), 15);
        // Exactly on a midpoint goes to the lower level.
        assert_eq!(nf4_code(NF4_MIDPOINTS[7]), 7);
    }

    #[test]
    fn dynamic_maps_have_bitsandbytes_shape() {
        let s = signed_map();
        let u = unsigned_map();
        assert!(
            s.windows(2).all(|w| w[0] < w[1]),
            "signed map strictly ascending"
        );
        assert!(
            u.windows(2).all(|w| w[0] < w[1]),
            "unsigned map strictly ascending"
        );
        assert_eq!((s[255], u[255], u[0]), (1.0, 1.0, 0.0));
        assert_eq!(s.iter().filter(|v| **v == 0.0).count(), 1);
        assert!((s[0] + 0.992_8).abs() < 1e-3);
        assert!((u[1] - 0.325e-6).abs() < 1e-9);
        for (i, &v) in s.iter().enumerate() {
            assert_eq!(nearest_code(s, v) as usize, i);
        }
        assert_eq!(nearest_code(u, -1.0), 0);
        assert_eq!(nearest_code(u, 2.0), 255);
    }
}
