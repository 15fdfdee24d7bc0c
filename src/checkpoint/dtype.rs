//! The floating-point element types phlora computes with, and their byte encodings.
//! Decoding reads little-endian bytes one element at a time, so it never needs alignment.

use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// The string used in safetensors headers.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Parses a user-facing name: f32, float32, f16, fp16, float16, bf16, bfloat16.
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Some(DType::F32),
            "f16" | "fp16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// The name transformers uses in config.json (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decodes `bytes` (exactly `out.len()` elements of `dtype`) into f32.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
}

/// Encodes f32 values as `dtype` (round to nearest even), appending little-endian bytes.
pub fn encode_into(dtype: DType, values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * dtype.size());
    match dtype {
        DType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes())),
    }
}

/// The first element of `bytes` (little-endian `dtype`) that is NaN or ±Inf: an all-ones
/// exponent, read from the bits without decoding.
pub fn first_non_finite(dtype: DType, bytes: &[u8]) -> Option<usize> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).position(|c| {
            u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000
        }),
        DType::BF16 => bytes
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
        DType::F16 => bytes
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
    }
}

/// Rounds a value through `dtype` and back, as a reader of the written file will see it.
pub fn round_trip(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F32 => v,
        DType::BF16 => bf16::from_f32(v).to_f32(),
        DType::F16 => f16::from_f32(v).to_f32(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trips_every_dtype() {
        let values = [0.0f32, -0.0, 1.0, -2.5, 3.140625, 65504.0, 1e-3, -7.75e-5];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut bytes = Vec::new();
            encode_into(dtype, &values, &mut bytes);
            assert_eq!(bytes.len(), values.len() * dtype.size());
            // Decode from an odd offset as well: inputs need not be aligned.
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            let mut out = vec![0f32; values.len()];
            decode_into(dtype, &shifted[1..], &mut out);
            for (v, o) in values.iter().zip(&out) {
                assert_eq!(round_trip(dtype, *v), *o, "{dtype}: {v}");
                let tol = match dtype {
                    DType::F32 => 0.0,
                    DType::F16 => 1e-3 * v.abs().max(6e-5),
                    DType::BF16 => 4e-3 * v.abs(),
                };
                assert!((v - o).abs() <= tol, "{dtype}: {v} -> {o}");
            }
        }
    }

    #[test]
    fn non_finite_values_are_found_in_every_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // The largest finite value of each dtype.
            let max = match dtype {
                DType::F32 => f32::MAX,
                DType::F16 => 65504.0,
                DType::BF16 => f32::from_bits(0x7f7f_0000),
            };
            for (bad, at) in [(f32::NAN, 2), (f32::INFINITY, 0), (f32::NEG_INFINITY, 3)] {
                let mut v = vec![1.0, -max, max, 0.0];
                v[at] = bad;
                let mut bytes = Vec::new();
                encode_into(dtype, &v, &mut bytes);
                assert_eq!(first_non_finite(dtype, &bytes), Some(at), "{dtype} {bad}");
            }
            let mut bytes = Vec::new();
            encode_into(dtype, &[1.0, -max, max, 0.0], &mut bytes);
            assert_eq!(first_non_finite(dtype, &bytes), None, "{dtype}");
        }
        // Beyond f16's range rounds to Inf: found after encoding.
        let mut bytes = Vec::new();
        encode_into(DType::F16, &[70000.0], &mut bytes);
        assert_eq!(first_non_finite(DType::F16, &bytes), Some(0));
    }

    #[test]
    fn parse_names() {
        assert_eq!(DType::parse("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse("FP16"), Some(DType::F16));
        assert_eq!(DType::parse("f32"), Some(DType::F32));
        assert_eq!(DType::parse("int8"), None);
    }
}
