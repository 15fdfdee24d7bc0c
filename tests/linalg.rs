//! Numerical checks of the decompositions against an exact f64 reference. Each test body is
//! generic over the backend and runs on the CPU always, and on CUDA device 0 as well when
//! PHLORA_TEST_DEVICE=cuda. Invariants only (residuals, orthogonality, Eckart–Young), never raw
//! vector signs.

mod common;

use common::*;
use faer::Mat;
use phlora::backend::cuda::{Orth, SmallSvd};
use phlora::backend::{Backend, Cpu, CudaOptions};
use phlora::checkpoint::dtype::encode_into;
use phlora::checkpoint::DType;
use phlora::factor::{split, Factoring, Layout};
use phlora::linalg::orth::{orthonormalize, short_wide_svd};
use phlora::linalg::{decompose, Method, SvdSettings, Truncated};

fn settings(method: Method, seed: u64) -> SvdSettings {
    SvdSettings {
        method,
        seed,
        ..SvdSettings::default()
    }
}

/// Decomposes an f64 matrix (as f32) and returns the truncation and the relative residual
/// of the f32 factors, computed by the backend directly.
fn run<B: Backend>(
    be: &B,
    a: &Mat<f64>,
    rank: usize,
    method: Method,
    seed: u64,
) -> (Truncated, f64) {
    let a32 = to_f32(a);
    let d = be.upload(a32.as_ref()).unwrap();
    let r = rank.min(a.nrows()).min(a.ncols());
    let t = decompose(be, &d, r, &settings(method, seed), seed).unwrap();
    let f = split(&t, Layout::Linear, rank, DType::F32);
    let l = be.upload(f.left.as_ref()).unwrap();
    let rr = be.upload(f.right.as_ref()).unwrap();
    let res = be.residual_sumsq(&d, &l, &rr).unwrap();
    let norm2: f64 = a32.as_ref().squared_norm_l2() as f64;
    let rel = if norm2 == 0.0 {
        0.0
    } else {
        (res / norm2).sqrt()
    };
    (t, rel)
}

/// Direct f64 residual of the truncation (independent of the backend's residual code).
fn direct_residual(a: &Mat<f64>, t: &Truncated) -> f64 {
    let mut num = 0.0;
    let mut den = 0.0;
    for i in 0..a.nrows() {
        for j in 0..a.ncols() {
            let approx: f64 = (0..t.s.len())
                .map(|k| t.u[(i, k)] as f64 * t.s[k] as f64 * t.v[(j, k)] as f64)
                .sum();
            num += (a[(i, j)] - approx).powi(2);
            den += a[(i, j)].powi(2);
        }
    }
    if den == 0.0 {
        0.0
    } else {
        (num / den).sqrt()
    }
}

fn max_orthogonality_error(q: &Mat<f32>) -> f64 {
    let mut worst = 0f64;
    for a in 0..q.ncols() {
        for b in 0..q.ncols() {
            let dot: f64 = (0..q.nrows())
                .map(|i| q[(i, a)] as f64 * q[(i, b)] as f64)
                .sum();
            let want = if a == b { 1.0 } else { 0.0 };
            worst = worst.max((dot - want).abs());
        }
    }
    worst
}

const SHAPES: [(usize, usize); 6] = [
    (300, 80),
    (80, 300),
    (128, 128),
    (1, 257),
    (257, 1),
    (400, 160),
];

#[test]
fn planted_low_rank_is_recovered_to_f32_precision() {
    on_every_device!(planted_body);
}

fn planted_body<B: Backend>(be: &B) {
    let seed = fresh_seed("planted");
    for (si, &(m, n)) in SHAPES.iter().enumerate() {
        let true_rank = 5.min(m).min(n);
        let sigma: Vec<f64> = (0..true_rank).map(|i| 10.0 / (1.0 + i as f64)).collect();
        let a = spectrum_matrix(m, n, &sigma, 0.0, seed + si as u64);
        for rank in [true_rank, true_rank + 3, 16] {
            for method in [Method::Randomized, Method::Exact] {
                let (t, rel) = run(be, &a, rank, method, seed);
                // f32 has ~6e-8 relative precision; sums over ~n terms grow it by √n.
                let tol = 1e-6 * ((m.max(n)) as f64).sqrt();
                assert!(
                    rel < tol,
                    "{m}×{n} rank {rank} {method:?}: residual {rel} > {tol}"
                );
                assert!(direct_residual(&a, &t) < tol);
                for (k, s) in sigma.iter().enumerate() {
                    assert!(
                        ((t.s[k] as f64) - s).abs() < 1e-5 * s.max(1.0),
                        "σ{k}: {} vs {s}",
                        t.s[k]
                    );
                }
            }
        }
    }
}

#[test]
fn exact_reaches_the_eckart_young_optimum_and_randomized_is_within_one_percent() {
    on_every_device!(eckart_young_body);
}

fn eckart_young_body<B: Backend>(be: &B) {
    let seed = fresh_seed("eckart-young");
    let mut ratios = Vec::new();
    for (si, &(m, n)) in SHAPES.iter().enumerate() {
        let full = m.min(n);
        // A decaying spectrum plus noise, like a fine-tuning delta.
        let sigma = power_law(full, 0.8);
        let noise = 0.02 / (m.max(n) as f64).sqrt();
        let a = spectrum_matrix(m, n, &sigma, noise, seed ^ (si as u64 * 7919));
        let reference = singular_values(&a);
        for rank in [1usize, 8, 32] {
            let rank = rank.min(full);
            let best = optimum(&reference, rank);
            let (te, exact) = run(be, &a, rank, Method::Exact, seed);
            let (tr, randomized) = run(be, &a, rank, Method::Randomized, seed);
            // The exact SVD in f32 lands on the optimum up to f32 rounding.
            assert!(
                (exact - best).abs() <= 1e-4 * best + 1e-6,
                "{m}×{n} r{rank}: exact {exact} vs optimum {best}"
            );
            // Nothing beats Eckart–Young (up to rounding), and randomized is within 1%.
            assert!(
                randomized >= best * (1.0 - 1e-4) - 1e-6,
                "{m}×{n} r{rank}: {randomized} below optimum {best}"
            );
            if best > 0.0 {
                let ratio = randomized / best;
                ratios.push((m, n, rank, ratio));
                assert!(
                    ratio <= 1.01,
                    "{m}×{n} r{rank}: randomized/optimum = {ratio}"
                );
            }
            // Top singular values agree with the reference.
            for k in 0..rank {
                let tol = 1e-3 * reference[0];
                assert!((te.s[k] as f64 - reference[k]).abs() < tol, "exact σ{k}");
                assert!(
                    (tr.s[k] as f64 - reference[k]).abs() < 2e-2 * reference[0],
                    "randomized σ{k}"
                );
            }
        }
    }
    for (m, n, r, ratio) in ratios {
        eprintln!("{}: ratio {m}x{n} r={r}: {ratio:.6}", be.name());
    }
}

#[test]
fn singular_vectors_are_orthonormal_and_values_descend() {
    on_every_device!(orthonormal_body);
}

fn orthonormal_body<B: Backend>(be: &B) {
    let seed = fresh_seed("orthonormal");
    for &(m, n) in &[(500, 120), (120, 500), (64, 64)] {
        let sigma: Vec<f64> = (0..m.min(n)).map(|i| (-(i as f64) / 10.0).exp()).collect();
        let a = spectrum_matrix(m, n, &sigma, 1e-3, seed);
        for method in [Method::Randomized, Method::Exact] {
            let (t, _) = run(be, &a, 24, method, seed);
            assert!(max_orthogonality_error(&t.u) < 1e-4, "{m}×{n} {method:?} U");
            assert!(max_orthogonality_error(&t.v) < 1e-4, "{m}×{n} {method:?} V");
            assert!(t.s.windows(2).all(|w| w[0] >= w[1]), "descending");
            assert!(t.s.iter().all(|s| s.is_finite() && *s >= 0.0));
        }
    }
}

#[test]
fn rank_deficient_and_zero_matrices_stay_finite() {
    on_every_device!(deficient_body);
}

fn deficient_body<B: Backend>(be: &B) {
    let seed = fresh_seed("deficient");
    let a = spectrum_matrix(200, 150, &[3.0, 2.0, 1.0], 0.0, seed);
    for method in [Method::Randomized, Method::Exact] {
        let (t, rel) = run(be, &a, 20, method, seed);
        assert!(rel < 1e-5, "{method:?}: {rel}");
        assert!(t.s[3..].iter().all(|&s| s.abs() < 1e-4), "{:?}", &t.s[3..]);
        assert!(t
            .u
            .as_ref()
            .col_iter()
            .all(|c| c.iter().all(|x| x.is_finite())));
    }
    let zero = Mat::<f64>::zeros(90, 60);
    for method in [Method::Randomized, Method::Exact] {
        let (t, rel) = run(be, &zero, 8, method, seed);
        assert_eq!(rel, 0.0);
        assert!(t.s.iter().all(|&s| s == 0.0), "{:?}", t.s);
        assert!(t
            .v
            .as_ref()
            .col_iter()
            .all(|c| c.iter().all(|x| x.is_finite())));
    }
}

#[test]
fn randomized_results_are_repeatable_and_agree_across_thread_counts() {
    let seed = fresh_seed("threads");
    let sigma = power_law(100, 0.7);
    let a = spectrum_matrix(300, 200, &sigma, 1e-3, seed);
    let be = &Cpu::new();
    let (t1, r1) = run(be, &a, 16, Method::Randomized, seed);
    let (t1b, r1b) = run(be, &a, 16, Method::Randomized, seed);
    assert_eq!(t1.s, t1b.s, "same seed, same threads: bitwise identical");
    assert_eq!(r1, r1b);
    // faer's parallel GEMM may sum in another order with another thread count: equal up to
    // f32 rounding, not bitwise (bitwise determinism across thread counts is a later issue).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (t2, r2) = pool.install(|| run(be, &a, 16, Method::Randomized, seed));
    for (x, y) in t1.s.iter().zip(&t2.s) {
        assert!((x - y).abs() <= 1e-5 * t1.s[0], "{x} vs {y}");
    }
    assert!((r1 - r2).abs() < 1e-5);
}

/// ‖QᵀQ − I‖_max and ‖Y − Q·QᵀY‖ / ‖Y‖ for the backend's orthonormalisation.
fn check_orthonormalize<B: Backend>(be: &B, y: &Mat<f64>) -> (f64, f64) {
    let y32 = to_f32(y);
    let q = be
        .download(&orthonormalize(be, be.upload(y32.as_ref()).unwrap()).unwrap())
        .unwrap();
    let ortho = max_orthogonality_error(&q);
    let q64 = Mat::<f64>::from_fn(q.nrows(), q.ncols(), |i, j| q[(i, j)] as f64);
    let proj = &q64 * (q64.transpose() * y);
    let res = (y - &proj).norm_l2() / y.norm_l2();
    (ortho, res)
}

#[test]
fn orthonormalisation_holds_for_easy_steep_and_rank_deficient_sketches() {
    on_every_device!(orthonormalize_body);
}

fn orthonormalize_body<B: Backend>(be: &B) {
    let seed = fresh_seed("orthonormalize");
    // Well conditioned: the CholeskyQR2 path.
    let easy = Mat::<f64>::from_fn(2000, 64, |i, j| {
        normal(1, seed ^ (i * 64 + j) as u64)[0] as f64
    });
    // Condition number ~1e6: beyond CholeskyQR2 in f32, so the Householder fallback must run.
    let steep_sigma: Vec<f64> = (0..64)
        .map(|i| 10f64.powf(-6.0 * i as f64 / 63.0))
        .collect();
    let steep = spectrum_matrix(2000, 64, &steep_sigma, 0.0, seed);
    // Rank 3 in 64 columns: Cholesky breaks down.
    let deficient = spectrum_matrix(2000, 64, &[1.0, 0.5, 0.1], 0.0, seed);
    for (name, y) in [
        ("easy", easy),
        ("steep", steep),
        ("rank-deficient", deficient),
    ] {
        let (ortho, res) = check_orthonormalize(be, &y);
        assert!(ortho < 1e-5, "{name}: QᵀQ − I = {ortho}");
        assert!(res < 1e-5, "{name}: Y − QQᵀY = {res}");
    }
}

#[test]
fn short_wide_svd_agrees_with_the_bidiagonal_svd() {
    on_every_device!(short_wide_body);
}

fn short_wide_body<B: Backend>(be: &B) {
    let seed = fresh_seed("short-wide");
    for &(k, n) in &[(128usize, 2048usize), (16, 5000), (64, 64)] {
        let sigma = power_law(k, 1.5);
        let b = spectrum_matrix(k, n, &sigma, 0.0, seed);
        let b32 = to_f32(&b);
        let dev = be.upload(b32.as_ref()).unwrap();
        let fast = short_wide_svd(be, &dev).unwrap();
        let reference = singular_values(&b);
        for (i, (got, want)) in fast.s.iter().zip(&reference).enumerate() {
            assert!(
                (*got as f64 - want).abs() <= 1e-5 * reference[0],
                "{k}×{n} σ{i}: {got} vs {want}"
            );
        }
        // U S Vᵀ rebuilds B to f32 precision.
        let (u, v) = (be.download(&fast.u).unwrap(), be.download(&fast.v).unwrap());
        let mut err = 0f64;
        for i in 0..k {
            for j in 0..n {
                let x: f64 = (0..k)
                    .map(|t| u[(i, t)] as f64 * fast.s[t] as f64 * v[(j, t)] as f64)
                    .sum();
                err = err.max((x - b[(i, j)]).abs());
            }
        }
        assert!(err < 1e-5, "{k}×{n}: reconstruction {err}");
    }
}

#[test]
#[ignore = "needs a GPU: PHLORA_TEST_DEVICE=cuda cargo test -- --include-ignored"]
fn the_gpu_repeats_itself_and_agrees_with_the_cpu() {
    let gpu = require_cuda(false);
    let seed = fresh_seed("gpu-vs-cpu");
    let sigma = power_law(150, 0.7);
    let a = spectrum_matrix(400, 150, &sigma, 1e-3, seed);
    let (g1, gr1) = run(&gpu, &a, 16, Method::Randomized, seed);
    let (g2, gr2) = run(&gpu, &a, 16, Method::Randomized, seed);
    assert_eq!(g1.s, g2.s, "same seed on the GPU: bitwise identical");
    assert_eq!(gr1, gr2);
    // The same sketch (counter-based Gaussian) on both devices: results agree to rounding.
    let (c, cr) = run(&Cpu::new(), &a, 16, Method::Randomized, seed);
    for (k, (x, y)) in g1.s.iter().zip(&c.s).enumerate() {
        assert!((x - y).abs() <= 1e-4 * c.s[0], "σ{k}: gpu {x} cpu {y}");
    }
    assert!((gr1 - cr).abs() <= 1e-4 * cr, "residual gpu {gr1} cpu {cr}");
}

#[test]
#[ignore = "needs a GPU: PHLORA_TEST_DEVICE=cuda cargo test -- --include-ignored"]
fn every_gpu_variant_reaches_the_optimum() {
    let _ = require_cuda(false);
    for tf32 in [false, true] {
        for orth in [Orth::CholeskyQr2, Orth::Householder] {
            for small in [SmallSvd::DeviceEigh, SmallSvd::HostEigh, SmallSvd::Gesvd] {
                let options = CudaOptions { tf32, orth, small };
                let gpu = phlora::backend::Cuda::new(0, options).expect("the GPU");
                let seed = fresh_seed("variants");
                let (m, n) = (600, 300);
                let sigma = power_law(n, 0.8);
                let a = spectrum_matrix(m, n, &sigma, 0.02 / (m as f64).sqrt(), seed);
                let reference = singular_values(&a);
                for rank in [1usize, 16, 64] {
                    let best = optimum(&reference, rank);
                    let (t, rel) = run(&gpu, &a, rank, Method::Randomized, seed);
                    let ratio = rel / best;
                    eprintln!("{options}: {m}x{n} r={rank}: residual/optimum {ratio:.6}");
                    assert!(
                        (1.0 - 1e-3..=1.01).contains(&ratio),
                        "{options} r{rank}: residual/optimum = {ratio}"
                    );
                    for k in 0..rank {
                        assert!(
                            (t.s[k] as f64 - reference[k]).abs() < 2e-2 * reference[0],
                            "{options} σ{k}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a GPU: PHLORA_TEST_DEVICE=cuda cargo test -- --include-ignored"]
fn tf32_error_stays_below_bf16_rounding_on_a_planted_low_rank_delta() {
    let gpu = require_cuda(true);
    let seed = fresh_seed("tf32-planted");
    let sigma: Vec<f64> = (0..8).map(|i| 10.0 / (1.0 + i as f64)).collect();
    let a = spectrum_matrix(700, 300, &sigma, 0.0, seed);
    let (_, rel) = run(&gpu, &a, 16, Method::Randomized, seed);
    // TF32 keeps 10 mantissa bits (~5e-4); bf16 output rounding alone is ~2e-3.
    eprintln!("tf32 planted rank-8 residual {rel:.3e}");
    assert!(rel < 2e-3, "tf32 residual {rel}");
}

#[test]
fn delta_is_exact_for_every_dtype_pair_and_odd_size() {
    on_every_device!(delta_body);
}

#[test]
#[ignore = "needs a GPU: PHLORA_TEST_DEVICE=cuda cargo test -- --include-ignored"]
fn every_gpu_delta_mode_is_right() {
    let mut gpu = require_cuda(false);
    for mode in 0..4 {
        gpu.set_delta_mode(mode);
        // f32 partial sums are not exact: Σd² to f32 rounding of each 8-term group.
        delta_check(&gpu, if mode & 2 == 0 { 1e-10 } else { 1e-6 });
    }
}

fn delta_body<B: Backend>(be: &B) {
    delta_check(be, 1e-10);
}

fn delta_check<B: Backend>(be: &B, sumsq_tol: f64) {
    use phlora::backend::DeltaInput;
    use phlora::checkpoint::dtype::decode_into;
    let seed = fresh_seed("delta");
    // Odd sizes exercise the kernel's scalar tail; the large one its two-groups-per-step loop
    // (more than two grid strides of 8-element groups on any current GPU).
    for &(rows, cols) in &[(1usize, 7usize), (3, 5), (2053, 2111)] {
        let n = rows * cols;
        let b = normal(n, seed);
        let f = normal(n, seed + 1);
        for bd in [DType::F32, DType::F16, DType::BF16] {
            for fd in [DType::F32, DType::F16, DType::BF16] {
                let (mut bb, mut fb) = (Vec::new(), Vec::new());
                encode_into(bd, &b, &mut bb);
                encode_into(fd, &f, &mut fb);
                let (mut b32, mut f32v) = (vec![0f32; n], vec![0f32; n]);
                decode_into(bd, &bb, &mut b32);
                decode_into(fd, &fb, &mut f32v);
                let input = DeltaInput {
                    base: &bb,
                    base_dtype: bd,
                    ft: &fb,
                    ft_dtype: fd,
                    rows,
                    cols,
                    rows_read: None,
                };
                let (d, stats) = be.delta(&input).unwrap();
                let d = be.download(&d).unwrap();
                let mut want_sumsq = 0f64;
                for i in 0..rows {
                    for j in 0..cols {
                        let want = f32v[i * cols + j] - b32[i * cols + j];
                        assert_eq!(d[(i, j)], want, "{rows}×{cols} {bd:?}/{fd:?} at ({i}, {j})");
                        want_sumsq += f64::from(want) * f64::from(want);
                    }
                }
                assert_eq!(stats.nonfinite, 0);
                assert!(
                    (stats.sumsq - want_sumsq).abs() <= sumsq_tol * want_sumsq,
                    "{rows}×{cols} {bd:?}/{fd:?}: Σd² {} vs {want_sumsq}",
                    stats.sumsq
                );
            }
        }
    }
}

#[test]
fn factors_from_the_backend_equal_the_host_split_bit_for_bit() {
    on_every_device!(factor_body);
}

fn factor_body<B: Factoring>(be: &B) {
    use phlora::linalg::decompose_on_device;
    let seed = fresh_seed("factor");
    for &(m, n) in &[(70usize, 40usize), (40, 70), (1, 33)] {
        let sigma = power_law(m.min(n), 0.8);
        let a = spectrum_matrix(m, n, &sigma, 1e-3, seed);
        let a32 = to_f32(&a);
        let d = be.upload(a32.as_ref()).unwrap();
        let r = 6.min(m).min(n);
        let t = decompose_on_device(be, &d, r, &settings(Method::Randomized, seed), seed).unwrap();
        let host = t.download(be).unwrap();
        for layout in [Layout::Linear, Layout::Embedding] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let want = split(&host, layout, r + 2, dtype);
                let got = be.factor(&t, layout, r + 2, dtype).unwrap();
                let what = format!("{m}×{n} {layout:?} {dtype:?} on {}", be.name());
                assert_eq!(got.a_shape, want.a_shape, "{what}");
                assert_eq!(got.b_shape, want.b_shape, "{what}");
                assert!(got.a_bytes == want.a_bytes, "{what}: A bytes differ");
                assert!(got.b_bytes == want.b_bytes, "{what}: B bytes differ");
                assert!(be.download(&got.left).unwrap() == want.left, "{what}: left");
                assert!(
                    be.download(&got.right).unwrap() == want.right,
                    "{what}: right"
                );
            }
        }
    }
}

/// A ΔW held as f32 bytes, delivered in row blocks through the backend's delta primitive
/// (base = 0), the way the extract pipeline forms blocks from two checkpoints.
struct BytesInBlocks {
    bytes: Vec<u8>,
    zeros: Vec<u8>,
    rows: usize,
    cols: usize,
    step: usize,
}

/// The blocks of `BytesInBlocks` formed on a backend.
struct OnBackend<'a, B>(&'a B, &'a BytesInBlocks);

impl<B: Backend> phlora::linalg::blocked::RowBlocks<B> for OnBackend<'_, B> {
    fn shape(&self) -> (usize, usize) {
        (self.1.rows, self.1.cols)
    }
    fn block_rows(&self) -> usize {
        self.1.step
    }
    fn block(&self, r0: usize, r1: usize) -> phlora::backend::BackendResult<B::Mat> {
        let s = self.1;
        let range = r0 * s.cols * 4..r1 * s.cols * 4;
        let input = phlora::backend::DeltaInput {
            base: &s.zeros[range.clone()],
            base_dtype: DType::F32,
            ft: &s.bytes[range],
            ft_dtype: DType::F32,
            rows: r1 - r0,
            cols: s.cols,
            rows_read: None,
        };
        Ok(self.0.delta(&input)?.0)
    }
}

#[test]
fn blocked_rsvd_matches_the_unblocked_one() {
    on_every_device!(blocked_body);
}

fn blocked_body<B: Backend>(be: &B) {
    use phlora::linalg::blocked::{blocked_randomized_svd, blocked_residual_sumsq};
    use phlora::linalg::rsvd::randomized_svd;
    let seed = fresh_seed("blocked");
    for &(m, n) in &[(300usize, 80usize), (80, 300), (257, 64)] {
        let sigma = power_law(m.min(n), 0.8);
        let a = spectrum_matrix(m, n, &sigma, 1e-3, seed);
        let a32 = to_f32(&a);
        let mut bytes = Vec::new();
        encode_into(DType::F32, &to_row_major_f32(&a), &mut bytes);
        let whole = be.upload(a32.as_ref()).unwrap();
        let (rank, k) = (8, 24);
        let full = randomized_svd(be, &whole, rank, k, 2, seed).unwrap();
        let fh = full.download(be).unwrap();
        let f = split(&fh, Layout::Linear, rank, DType::F32);
        let (l, r) = (
            be.upload(f.left.as_ref()).unwrap(),
            be.upload(f.right.as_ref()).unwrap(),
        );
        let full_res = be.residual_sumsq(&whole, &l, &r).unwrap();
        for step in [1, 7, 64, m] {
            let src = BytesInBlocks {
                zeros: vec![0u8; bytes.len()],
                bytes: bytes.clone(),
                rows: m,
                cols: n,
                step,
            };
            let blocks = OnBackend(be, &src);
            let t = blocked_randomized_svd(be, &blocks, rank, k, 2, seed).unwrap();
            let th = t.download(be).unwrap();
            for (i, (x, y)) in th.s.iter().zip(&fh.s).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-4 * fh.s[0],
                    "{m}×{n} step {step} σ{i}: {x} vs {y}"
                );
            }
            let g = split(&th, Layout::Linear, rank, DType::F32);
            let (gl, gr) = (
                be.upload(g.left.as_ref()).unwrap(),
                be.upload(g.right.as_ref()).unwrap(),
            );
            let res = blocked_residual_sumsq(be, &blocks, &gl, &gr).unwrap();
            let whole_res = be.residual_sumsq(&whole, &gl, &gr).unwrap();
            assert!(
                (res - whole_res).abs() <= 1e-6 * whole_res,
                "{m}×{n} step {step}: blocked residual {res} vs whole {whole_res}"
            );
            assert!(
                (res - full_res).abs() <= 1e-3 * full_res,
                "{m}×{n} step {step}: residual {res} vs unblocked {full_res}"
            );
        }
    }
}

#[test]
fn the_logit_shift_is_removed_exactly_whole_and_in_row_blocks() {
    on_every_device!(centering_body);
}

/// P·ΔW (P = I − 11ᵀ/m) decomposed without forming it: its spectrum, factors and residual
/// certificate against the f64 reference of the explicitly centred matrix, for ΔW held whole
/// (exact and randomized) and in row blocks; shapes 1×n, tall, wide, rank-deficient and zero.
fn centering_body<B: Backend>(be: &B) {
    use phlora::linalg::blocked::RowBlocks;
    use phlora::linalg::center::{decompose_blocked, RowCentering};
    use phlora::linalg::decompose_whole_on_device;
    struct Rows<'a, B: Backend>(&'a B, &'a Mat<f32>, usize);
    impl<B: Backend> RowBlocks<B> for Rows<'_, B> {
        fn shape(&self) -> (usize, usize) {
            (self.1.nrows(), self.1.ncols())
        }
        fn block_rows(&self) -> usize {
            self.2
        }
        fn block(&self, r0: usize, r1: usize) -> phlora::backend::BackendResult<B::Mat> {
            self.0.upload(self.1.as_ref().subrows(r0, r1 - r0))
        }
    }
    let seed = fresh_seed("centering");
    for (m, n, planted, shift) in [
        (1usize, 40usize, 1usize, 1.0f64),
        (120, 30, 4, 3.0),
        (40, 90, 4, 3.0),
        (96, 64, 0, 2.0), // a pure shift: nothing left
        (64, 48, 3, 0.0), // no shift at all
        (30, 20, 0, 0.0), // zero
    ] {
        // ΔW = 1·cᵀ·shift + a planted rank-`planted` part.
        let c = normal(n, seed + 1);
        let low = if planted > 0 {
            spectrum_matrix(m, n, &power_law(planted, 1.0), 0.0, seed + 2)
        } else {
            Mat::<f64>::zeros(m, n)
        };
        let a = Mat::<f64>::from_fn(m, n, |i, j| shift * f64::from(c[j]) + low[(i, j)]);
        let mean = |j: usize| (0..m).map(|i| a[(i, j)]).sum::<f64>() / m as f64;
        let centred = Mat::<f64>::from_fn(m, n, |i, j| a[(i, j)] - mean(j));
        let exact = singular_values(&centred);
        let total: f64 = (0..m)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| a[(i, j)].powi(2))
            .sum();
        let kept: f64 = exact.iter().map(|s| s * s).sum();
        let a32 = to_f32(&a);
        // ‖ΔW‖² as extract has it: of the f32 values, summed in f64.
        let total32: f64 = (0..m)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| f64::from(a32[(i, j)]).powi(2))
            .sum();
        let d = be.upload(a32.as_ref()).unwrap();
        let rank = planted.max(1).min(m).min(n);
        let blocks = Rows(be, &a32, 7);
        for (how, method) in [
            ("whole exact", Method::Exact),
            ("whole randomized", Method::Randomized),
            ("blocked", Method::Randomized),
        ] {
            let what = format!("{m}×{n} planted {planted} shift {shift}, {how}");
            let p = if how == "blocked" {
                // extract's first pass sums the columns on the host, in f64.
                let sums: Vec<f64> = (0..n)
                    .map(|j| (0..m).map(|i| f64::from(a32[(i, j)])).sum())
                    .collect();
                RowCentering::of_column_sums(be, m, &sums).unwrap()
            } else {
                RowCentering::of_whole(be, &d, total32).unwrap()
            };
            assert!(
                (p.removed_sumsq - (total - kept)).abs() <= 1e-5 * total.max(1e-30),
                "{what}: removed {} vs {}",
                p.removed_sumsq,
                total - kept
            );
            let st = settings(method, seed);
            let t = if how == "blocked" {
                let k = st.sketch_width(rank, m, n);
                decompose_blocked(be, &blocks, &p, rank, k, st.power_iters, seed)
            } else {
                decompose_whole_on_device(be, &d, Some(&p), rank, &st, seed)
            }
            .unwrap();
            let t = t.download(be).unwrap();
            for (i, &s) in t.s.iter().enumerate() {
                let want = exact.get(i).copied().unwrap_or(0.0);
                // f32 rounding of the shift itself leaves ~1e-7·‖ΔW‖ behind.
                let tol = 1e-4 * exact.first().copied().unwrap_or(0.0) + 1e-6 * total.sqrt();
                assert!(
                    (f64::from(s) - want).abs() <= tol,
                    "{what}: σ{i} {s} vs {want}"
                );
            }
            // The residual certificate against the centred matrix, and the factors in P's range.
            let f = split(&t, Layout::Linear, rank, DType::F32);
            let (l, r) = (
                be.upload(f.left.as_ref()).unwrap(),
                be.upload(f.right.as_ref()).unwrap(),
            );
            let raw = be.residual_sumsq(&d, &l, &r).unwrap();
            let got = p.residual_sumsq(be, raw, &l, &r).unwrap();
            let mut want = 0.0;
            for i in 0..m {
                for j in 0..n {
                    let ba: f64 = (0..rank)
                        .map(|k| f64::from(f.left[(i, k)]) * f64::from(f.right[(k, j)]))
                        .sum();
                    want += (centred[(i, j)] - ba).powi(2);
                }
            }
            assert!(
                (got - want).abs() <= 1e-5 * total.max(1e-30),
                "{what}: residual {got} vs {want}"
            );
            for j in 0..n {
                let col: f64 = (0..m)
                    .map(|i| {
                        (0..rank)
                            .map(|k| f64::from(f.left[(i, k)]) * f64::from(f.right[(k, j)]))
                            .sum::<f64>()
                    })
                    .sum();
                assert!(
                    col.abs() <= 1e-4 * total.sqrt().max(1e-30),
                    "{what}: B·A moves every logit of column {j} by {col}"
                );
            }
        }
    }
}

#[test]
fn row_blocks_stack_and_sums_are_exact_on_plain_and_transposed_storage() {
    on_every_device!(rows_body);
}

/// split_rows, stack_rows and add, which the blocked randomized SVD calls for every block of
/// every pass: exact copies and f32 sums, whether a matrix is stored as it is (uploaded) or as
/// its transpose (ΔW from `delta`), including 1×n, n×1 and a step past the last row.
fn rows_body<B: Backend>(be: &B) {
    use phlora::backend::DeltaInput;
    let seed = fresh_seed("rows");
    for &(rows, cols) in &[(1usize, 7usize), (9, 1), (37, 11), (64, 5)] {
        let n = rows * cols;
        let (x, y) = (normal(n, seed), normal(n, seed + 1));
        let host = Mat::<f32>::from_fn(rows, cols, |i, j| x[i * cols + j]);
        let plain = be.upload(host.as_ref()).unwrap();
        // ΔW = y − 0 arrives in the backend's own (transposed) storage.
        let (mut yb, zeros) = (Vec::new(), vec![0f32; n]);
        encode_into(DType::F32, &y, &mut yb);
        let mut zb = Vec::new();
        encode_into(DType::F32, &zeros, &mut zb);
        let input = DeltaInput {
            base: &zb,
            base_dtype: DType::F32,
            ft: &yb,
            ft_dtype: DType::F32,
            rows,
            cols,
            rows_read: None,
        };
        let (stored, _) = be.delta(&input).unwrap();
        let host_y = Mat::<f32>::from_fn(rows, cols, |i, j| y[i * cols + j]);
        for (m, want) in [(&plain, &host), (&stored, &host_y)] {
            for step in [1, 2, 7, rows + 3] {
                let parts = be.split_rows(m, step).unwrap();
                assert_eq!(
                    parts.len(),
                    rows.div_ceil(step),
                    "{rows}×{cols} step {step}"
                );
                let mut r0 = 0;
                for p in &parts {
                    let got = be.download(p).unwrap();
                    assert_eq!(got.ncols(), cols);
                    for i in 0..got.nrows() {
                        for j in 0..cols {
                            assert_eq!(got[(i, j)], want[(r0 + i, j)], "{rows}×{cols} step {step}");
                        }
                    }
                    r0 += got.nrows();
                }
                assert_eq!(r0, rows);
                let back = be.download(&be.stack_rows(&parts).unwrap()).unwrap();
                assert!(
                    back == *want,
                    "{rows}×{cols} step {step}: stacked ≠ the matrix"
                );
            }
        }
        // Plain + transposed storage, and the other way round.
        let sum = |a: &Mat<f32>, b: &Mat<f32>| {
            Mat::<f32>::from_fn(rows, cols, |i, j| a[(i, j)] + b[(i, j)])
        };
        let want = sum(&host, &host_y);
        assert!(be.download(&be.add(&plain, &stored).unwrap()).unwrap() == want);
        assert!(be.download(&be.add(&stored, &plain).unwrap()).unwrap() == want);
        let twice = sum(&host_y, &host_y);
        assert!(be.download(&be.add(&stored, &stored).unwrap()).unwrap() == twice);
        let wrong = be.upload(Mat::<f32>::zeros(cols, rows).as_ref()).unwrap();
        if rows != cols {
            assert!(be.add(&plain, &wrong).is_err());
        }
    }
    let a = be.upload(Mat::<f32>::zeros(3, 2).as_ref()).unwrap();
    let b = be.upload(Mat::<f32>::zeros(3, 4).as_ref()).unwrap();
    assert!(be.stack_rows(&[a, b]).is_err(), "widths differ");
}
