//! bitsandbytes' dynamic quantisation maps (`create_dynamic_map`) and nearest-value coding.
//!
//! A map holds 256 sorted values in [-1, 1] (signed, for Adam's first moment) or [0, 1]
//! (unsigned, for the second moment). Each decade 10⁻⁶…10⁰ gets its own evenly spaced
//! fraction values, so small magnitudes inside a block keep relative precision.

use std::sync::OnceLock;

/// Values per map and the exponent bits bitsandbytes uses for its optimizer maps.
const MAP_LEN: usize = 256;
const MAX_EXPONENT_BITS: i32 = 7;

/// The signed map (first moment).
pub fn signed() -> &'static [f32; MAP_LEN] {
    static MAP: OnceLock<[f32; MAP_LEN]> = OnceLock::new();
    MAP.get_or_init(|| dynamic_map(true))
}

/// The unsigned map (second moment).
pub fn unsigned() -> &'static [f32; MAP_LEN] {
    static MAP: OnceLock<[f32; MAP_LEN]> = OnceLock::new();
    MAP.get_or_init(|| dynamic_map(false))
}

/// `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: for exponent i the
/// midpoints of `linspace(0.1, 1, k+1)` (k = 2^i signed, 2^(i+1) unsigned) scaled by 10^(i-6),
/// mirrored for the signed map, plus 0 and 1. With 8 bits there are no extra linear items.
fn dynamic_map(signed: bool) -> [f32; MAP_LEN] {
    let mut data: Vec<f32> = Vec::with_capacity(MAP_LEN);
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = if signed {
            1usize << i
        } else {
            1usize << (i + 1)
        } + 1;
        let scale = 10f32.powi(i - (MAX_EXPONENT_BITS - 1));
        let boundaries = linspace_f32(0.1, 1.0, fraction_items);
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    assert_eq!(data.len(), MAP_LEN, "dynamic map construction");
    data.sort_by(f32::total_cmp);
    data.try_into().expect("256 values")
}

/// torch.linspace in float32: the first half counts up from `start`, the second half down from
/// `end`, so both ends are exact.
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

/// Index of the map value nearest to `x` (ties go to the lower value); `x` is already
/// normalised by its block's absmax, so it lies in the map's range.
pub fn nearest(map: &[f32; MAP_LEN], x: f32) -> u8 {
    // First index whose value is >= x.
    let upper = map.partition_point(|&v| v < x);
    if upper == 0 {
        return 0;
    }
    if upper == MAP_LEN {
        return (MAP_LEN - 1) as u8;
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
    fn maps_are_sorted_span_their_range_and_contain_zero() {
        let s = signed();
        let u = unsigned();
        assert!(s.windows(2).all(|w| w[0] <= w[1]));
        assert!(u.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(s[255], 1.0);
        assert_eq!(u[255], 1.0);
        assert_eq!(u[0], 0.0);
        assert!(s.contains(&0.0));
        // The most negative signed value is the top decade's first midpoint mirrored.
        assert!((s[0] + 0.9928).abs() < 1e-3, "{}", s[0]);
        // Smallest non-zero magnitude: midpoint of [0.1, 1] times 1e-6 (signed) / of its
        // first half (unsigned).
        assert!(
            (s.iter()
                .filter(|v| **v > 0.0)
                .fold(1.0f32, |a, &b| a.min(b))
                - 0.55e-6)
                .abs()
                < 1e-9
        );
        assert!((u[1] - 0.325e-6).abs() < 1e-9, "{}", u[1]);
    }

    #[test]
    fn nearest_round_trips_map_values_and_rounds_between_them() {
        let s = signed();
        for (i, &v) in s.iter().enumerate() {
            let code = nearest(s, v) as usize;
            assert_eq!(s[code], v, "value {v} at {i}");
        }
        let u = unsigned();
        let mid = (u[100] + u[101]) / 2.0;
        assert_eq!(nearest(u, mid + 1e-7 * u[101]), 101);
        assert_eq!(nearest(u, mid - 1e-7 * u[101]), 100);
        assert_eq!(nearest(u, -0.5), 0);
        assert_eq!(nearest(u, 2.0), 255);
    }
}
