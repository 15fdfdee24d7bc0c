//! A small, fixed, portable random generator, so that results depend on the seed and the
//! tensor's name only: never on thread count, processing order, sharding or crate versions.

/// SplitMix64 step: used to derive seeds and to seed the main generator.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A per-tensor seed: the run's seed mixed with a hash of the tensor name (FNV-1a).
pub fn seed_for(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    let mut s = seed ^ h;
    splitmix64(&mut s)
}

/// Mixes extra words into a seed (for sub-streams: chunk index, tensor part, ...).
pub fn derive(seed: u64, word: u64) -> u64 {
    let mut s = seed ^ word.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    splitmix64(&mut s)
}

/// xoshiro256++ (Blackman & Vigna).
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        Rng {
            s: [
                splitmix64(&mut sm),
                splitmix64(&mut sm),
                splitmix64(&mut sm),
                splitmix64(&mut sm),
            ],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[0]
            .wrapping_add(self.s[3])
            .rotate_left(23)
            .wrapping_add(self.s[0]);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fills `out` with standard normal samples (Box–Muller, both outputs used).
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        let mut chunks = out.chunks_exact_mut(2);
        for pair in &mut chunks {
            let (a, b) = self.normal_pair();
            pair[0] = a as f32;
            pair[1] = b as f32;
        }
        if let [last] = chunks.into_remainder() {
            *last = self.normal_pair().0 as f32;
        }
    }

    pub fn normal(&mut self) -> f64 {
        self.normal_pair().0
    }

    fn normal_pair(&mut self) -> (f64, f64) {
        // 1 - uniform() lies in (0, 1], so the log is finite.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        (r * t.cos(), r * t.sin())
    }
}

/// Standard normal sample number `index` of the stream `seed`: counter-based (Box–Muller over
/// SplitMix64 of the pair index), so any element can be computed on its own, by any thread, on
/// the CPU or in the GPU's `gaussian_fill` kernel, with the same result.
pub fn normal_at(seed: u64, index: u64) -> f32 {
    let mut s = seed ^ (index >> 1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let x1 = splitmix64(&mut s);
    let x2 = splitmix64(&mut s);
    let scale = 1.0 / (1u64 << 53) as f64;
    // 1 − u lies in (0, 1], so the log is finite.
    let u1 = 1.0 - (x1 >> 11) as f64 * scale;
    let u2 = (x2 >> 11) as f64 * scale;
    let r = (-2.0 * u1.ln()).sqrt();
    let t = std::f64::consts::TAU * u2;
    (if index & 1 == 1 {
        r * t.sin()
    } else {
        r * t.cos()
    }) as f32
}

/// A rows×cols matrix of standard normal samples, element (i, j) = `normal_at(seed, j·rows + i)`
/// (column-major numbering): the same for any thread count and on every backend.
pub fn normal_matrix(rows: usize, cols: usize, seed: u64) -> faer::Mat<f32> {
    use rayon::prelude::*;
    let mut m = faer::Mat::<f32>::zeros(rows, cols);
    m.par_col_iter_mut().enumerate().for_each(|(j, col)| {
        let first = (j * rows) as u64;
        for (i, x) in col.iter_mut().enumerate() {
            *x = normal_at(seed, first + i as u64);
        }
    });
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments_are_standard() {
        let mut rng = Rng::new(seed_for(7, "moments"));
        let mut v = vec![0f32; 200_000];
        rng.fill_normal(&mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }

    #[test]
    fn seeds_depend_on_name() {
        assert_ne!(seed_for(0, "a.weight"), seed_for(0, "b.weight"));
        assert_eq!(seed_for(3, "a.weight"), seed_for(3, "a.weight"));
        assert_ne!(seed_for(3, "a.weight"), seed_for(4, "a.weight"));
    }

    #[test]
    fn counter_based_normals_are_standard_and_indexed_column_major() {
        let v: Vec<f64> = (0..200_000u64)
            .map(|i| f64::from(normal_at(99, i)))
            .collect();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        let m = normal_matrix(7, 5, 3);
        for j in 0..5 {
            for i in 0..7 {
                assert_eq!(m[(i, j)], normal_at(3, (j * 7 + i) as u64));
            }
        }
        assert_ne!(normal_at(3, 0), normal_at(4, 0));
    }

    #[test]
    fn normal_matrix_is_independent_of_thread_count() {
        let a = normal_matrix(300, 700, 11);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = pool.install(|| normal_matrix(300, 700, 11));
        assert_eq!(a, b);
    }
}
