//! Splitting a truncated SVD into LoRA factors and casting them to the output dtype.
//! B = U·√S and A = √S·Vᵀ, so B·A = U·S·Vᵀ with lora_alpha = r (scaling 1), and both factors
//! carry the same magnitude (kind to low-precision formats).

use faer::Mat;

use crate::backend::{Backend, BackendError, BackendResult, Cpu, Cuda};
use crate::checkpoint::dtype::{encode_into, round_trip};
use crate::checkpoint::DType;
use crate::linalg::{OnDevice, Truncated};

/// Whether the factors are stored as a linear layer's or an embedding's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `lora_A.weight` [r, in], `lora_B.weight` [out, r].
    Linear,
    /// `lora_embedding_A` [r, vocab], `lora_embedding_B` [dim, r]: ΔE = (B·A)ᵀ.
    Embedding,
}

/// One tensor's factors, encoded as they are written, plus the same (rounded) values as f32
/// in the orientation ΔW ≈ left · right, for the residual certificate.
pub struct Factors {
    pub a_shape: [usize; 2],
    pub a_bytes: Vec<u8>,
    pub b_shape: [usize; 2],
    pub b_bytes: Vec<u8>,
    /// rows×r, as rounded through the output dtype.
    pub left: Mat<f32>,
    /// r×cols, as rounded through the output dtype.
    pub right: Mat<f32>,
}

/// [`Factors`] with the rounded left/right kept on a backend (for the residual there).
pub struct DeviceFactors<M> {
    pub a_shape: [usize; 2],
    pub a_bytes: Vec<u8>,
    pub b_shape: [usize; 2],
    pub b_bytes: Vec<u8>,
    /// rows×r_out, as rounded through the output dtype.
    pub left: M,
    /// r_out×cols, as rounded through the output dtype.
    pub right: M,
    /// Seconds spent copying the encoded factors back from the device (0 on the CPU).
    pub d2h_seconds: f64,
}

/// Builds factors of rank `r_out` (≥ the SVD's rank; extra columns are zero, which leaves
/// the product unchanged) for a rows×cols ΔW.
pub fn split(t: &Truncated, layout: Layout, r_out: usize, dtype: DType) -> Factors {
    let (rows, cols, r) = (t.u.nrows(), t.v.nrows(), t.s.len());
    debug_assert!(r <= r_out);
    let root: Vec<f32> = t.s.iter().map(|s| s.max(0.0).sqrt()).collect();
    // ΔW ≈ left·right, left = U√S (rows×r_out), right = √S Vᵀ (r_out×cols), values rounded.
    let left = Mat::<f32>::from_fn(rows, r_out, |i, k| {
        if k < r {
            round_trip(dtype, t.u[(i, k)] * root[k])
        } else {
            0.0
        }
    });
    let right = Mat::<f32>::from_fn(r_out, cols, |k, j| {
        if k < r {
            round_trip(dtype, t.v[(j, k)] * root[k])
        } else {
            0.0
        }
    });
    let (a_shape, a_vals, b_shape, b_vals) = match layout {
        // A = right [r, cols], B = left [rows, r], both row-major.
        Layout::Linear => (
            [r_out, cols],
            row_major(&right),
            [rows, r_out],
            row_major(&left),
        ),
        // ΔE [vocab=rows, dim=cols] = (B·A)ᵀ: A = leftᵀ [r, vocab], B = rightᵀ [dim, r].
        Layout::Embedding => (
            [r_out, rows],
            row_major(&left.transpose().to_owned()),
            [cols, r_out],
            row_major(&right.transpose().to_owned()),
        ),
    };
    let mut a_bytes = Vec::new();
    encode_into(dtype, &a_vals, &mut a_bytes);
    let mut b_bytes = Vec::new();
    encode_into(dtype, &b_vals, &mut b_bytes);
    Factors {
        a_shape,
        a_bytes,
        b_shape,
        b_bytes,
        left,
        right,
    }
}

/// Factoring on a backend: the LoRA factors of a decomposition ([`split`]), encoded in
/// `dtype` as they are written, with the same rounded values kept on the backend as left
/// (rows×r_out) and right (r_out×cols) for the residual. The default goes through the host;
/// a device backend casts and lays out on the device and copies back only the bytes.
pub trait Factoring: Backend {
    fn factor(
        &self,
        t: &OnDevice<Self::Mat>,
        layout: Layout,
        r_out: usize,
        dtype: DType,
    ) -> BackendResult<DeviceFactors<Self::Mat>> {
        let f = split(&t.download(self)?, layout, r_out, dtype);
        Ok(DeviceFactors {
            a_shape: f.a_shape,
            a_bytes: f.a_bytes,
            b_shape: f.b_shape,
            b_bytes: f.b_bytes,
            left: self.upload(f.left.as_ref())?,
            right: self.upload(f.right.as_ref())?,
            d2h_seconds: 0.0,
        })
    }
}

impl Factoring for Cpu {}

impl Factoring for Cuda {
    fn factor(
        &self,
        t: &OnDevice<Self::Mat>,
        layout: Layout,
        r_out: usize,
        dtype: DType,
    ) -> BackendResult<DeviceFactors<Self::Mat>> {
        let r = t.s.len();
        if r > r_out || self.shape(&t.u).1 != r || self.shape(&t.v).1 != r {
            return Err(BackendError::new(format!(
                "factor: rank {r} does not fit the adapter rank {r_out}"
            )));
        }
        // Plain U (rows×r) and V (cols×r); B = U·√S and A = √S·Vᵀ share the scale.
        let u = self.first_cols(&t.u, r)?;
        let v = self.first_cols(&t.v, r)?;
        let root: Vec<f32> = t.s.iter().map(|s| s.max(0.0).sqrt()).collect();
        // A = (X·√S)ᵀ [r_out, len X] and B = Y·√S [len Y, r_out]: X = V, Y = U for a linear
        // layer (ΔW ≈ B·A), X = U, Y = V for an embedding (ΔE = (B·A)ᵀ).
        let (x, y) = match layout {
            Layout::Linear => (&v, &u),
            Layout::Embedding => (&u, &v),
        };
        let a = self.encode_scaled(x, &root, r_out, false, dtype)?;
        let b = self.encode_scaled(y, &root, r_out, true, dtype)?;
        let (a_len, b_len) = (self.shape(x).0, self.shape(y).0);
        // ΔW ≈ left·right with left = U√S and right = (V√S)ᵀ.
        let (left, right) = match layout {
            Layout::Linear => (b.rounded, a.rounded.transpose()),
            Layout::Embedding => (a.rounded, b.rounded.transpose()),
        };
        Ok(DeviceFactors {
            a_shape: [r_out, a_len],
            a_bytes: a.bytes,
            b_shape: [b_len, r_out],
            b_bytes: b.bytes,
            left,
            right,
            d2h_seconds: a.d2h_seconds + b.d2h_seconds,
        })
    }
}

fn row_major(m: &Mat<f32>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::dtype::decode_into;
    use crate::linalg::Method;

    fn truncated(rows: usize, cols: usize, r: usize, seed: u64) -> Truncated {
        Truncated {
            u: crate::rng::normal_matrix(rows, r, seed),
            s: (0..r).map(|i| 3.0 / (1.0 + i as f32)).collect(),
            v: crate::rng::normal_matrix(cols, r, seed + 1),
            method: Method::Exact,
            sketch: 0,
        }
    }

    fn usv(t: &Truncated) -> Mat<f32> {
        let (rows, cols) = (t.u.nrows(), t.v.nrows());
        Mat::from_fn(rows, cols, |i, j| {
            (0..t.s.len())
                .map(|k| t.u[(i, k)] * t.s[k] * t.v[(j, k)])
                .sum()
        })
    }

    #[test]
    fn linear_and_embedding_layouts_reproduce_the_product() {
        let t = truncated(7, 5, 3, 41);
        let want = usv(&t);
        for layout in [Layout::Linear, Layout::Embedding] {
            let f = split(&t, layout, 4, DType::F32);
            let mut a = vec![0f32; f.a_shape[0] * f.a_shape[1]];
            decode_into(DType::F32, &f.a_bytes, &mut a);
            let mut b = vec![0f32; f.b_shape[0] * f.b_shape[1]];
            decode_into(DType::F32, &f.b_bytes, &mut b);
            for i in 0..7 {
                for j in 0..5 {
                    let got: f32 = match layout {
                        // ΔW = B·A: B [7, 4], A [4, 5]
                        Layout::Linear => (0..4).map(|k| b[i * 4 + k] * a[k * 5 + j]).sum(),
                        // ΔE = (B·A)ᵀ: B [5, 4], A [4, 7] so ΔE[i, j] = Σ_k B[j, k]·A[k, i]
                        Layout::Embedding => (0..4).map(|k| b[j * 4 + k] * a[k * 7 + i]).sum(),
                    };
                    assert!((got - want[(i, j)]).abs() < 1e-4, "{layout:?} ({i},{j})");
                }
            }
            // The padded rank is zero in both factors.
            assert!((0..7).all(|i| f.left[(i, 3)] == 0.0));
        }
        let f = split(&t, Layout::Embedding, 3, DType::F32);
        assert_eq!(f.a_shape, [3, 7]);
        assert_eq!(f.b_shape, [5, 3]);
        let f = split(&t, Layout::Linear, 3, DType::BF16);
        assert_eq!(f.a_shape, [3, 5]);
        assert_eq!(f.b_shape, [7, 3]);
        assert_eq!(f.a_bytes.len(), 3 * 5 * 2);
    }
}
