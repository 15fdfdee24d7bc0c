//! FP8 weights with block scales (DeepSeek-V3 style): an `F8_E4M3` matrix [out, in] and beside
//! it `<name>_scale_inv`, F32 [⌈out/b0⌉, ⌈in/b1⌉]; the weight is fp8 × scale_inv of its block.
//! phlora dequantises them on the host into f32 rows as ΔW is formed.

use super::{Checkpoint, TensorEntry};

/// The block size DeepSeek-V3 uses when the config does not say
/// (`quantization_config.weight_block_size`).
pub const DEFAULT_BLOCK: [usize; 2] = [128, 128];

/// An FP8 weight's scales.
#[derive(Clone, Debug)]
pub struct BlockScale {
    pub scale: TensorEntry,
    pub block: [usize; 2],
}

/// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0x0F, b & 0x07);
    if e == 0x0F && m == 0x07 {
        return f32::NAN;
    }
    let v = if e == 0 {
        f32::from(m) / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + f32::from(m) / 8.0) * 2f32.powi(i32::from(e) - 7)
    };
    sign * v
}

/// The nearest float8_e4m3fn to `v` (saturating at ±448; ties to the even code). For tests
/// and fixtures: phlora never writes FP8.
pub fn f32_to_e4m3(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    let mut best = 0u8;
    for code in 0u8..0x7F {
        let (d, db) = ((e4m3_to_f32(code) - a).abs(), (e4m3_to_f32(best) - a).abs());
        if d < db || (d == db && code % 2 == 0 && best % 2 == 1) {
            best = code;
        }
    }
    sign | best
}

/// Checks the scale's shape against the weight's.
pub fn scale_shape_ok(weight: &[usize], scale: &[usize], block: [usize; 2]) -> bool {
    weight.len() == 2
        && scale.len() == 2
        && scale[0] == weight[0].div_ceil(block[0])
        && scale[1] == weight[1].div_ceil(block[1])
}

/// Rows r0..r1 of an FP8 weight [rows, cols], dequantised, as little-endian F32 bytes (what
/// the backends read).
pub fn dequant_rows(
    ck: &Checkpoint,
    t: &TensorEntry,
    s: &BlockScale,
    r0: usize,
    r1: usize,
) -> Vec<u8> {
    let cols = t.shape[1];
    let bytes = &ck.bytes(t)[r0 * cols..r1 * cols];
    let scales = ck.bytes(&s.scale);
    let scale_cols = s.scale.shape[1];
    let scale_at = |i: usize, j: usize| {
        let k = 4 * ((i / s.block[0]) * scale_cols + j / s.block[1]);
        f32::from_le_bytes([scales[k], scales[k + 1], scales[k + 2], scales[k + 3]])
    };
    let mut out = Vec::with_capacity(4 * bytes.len());
    for (di, row) in bytes.chunks_exact(cols.max(1)).enumerate() {
        let i = r0 + di;
        for (j, &b) in row.iter().enumerate() {
            out.extend_from_slice(&(e4m3_to_f32(b) * scale_at(i, j)).to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_decodes_the_format_and_encodes_to_the_nearest() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // e = 7, m = 0
        assert_eq!(e4m3_to_f32(0xC0), -2.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0); // the largest finite value
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert!(e4m3_to_f32(0x7F).is_nan());
        for code in (0u8..=0xFE).filter(|c| c & 0x7F != 0x7F) {
            assert_eq!(
                f32_to_e4m3(e4m3_to_f32(code)) & 0x7F,
                code & 0x7F,
                "{code:#x}"
            );
        }
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1000.0)), 448.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.06)), 1.0);
    }
}
