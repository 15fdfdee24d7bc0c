//! SVD throughput on the CPU backend against faer's large-GEMM rate, measured in the same run.
//!
//!     cargo bench --bench svd_throughput [-- --quick]
//!
//! For each ΔW shape (a decaying spectrum plus noise, like a fine-tuning delta): randomized
//! SVD at r = 64, p = 64, q = 2 (time, nominal GFLOP/s = 2·m·n·k·(2q+2)/t, share of the
//! large-GEMM rate and of the rate of the sketch's own skinny GEMM shape), the exact mode
//! (f64 thin SVD) and a plain f32 faer thin SVD (time, speed-up), and the residual ratio
//! randomized/exact.

use std::time::Instant;

use faer::{Accum, Mat, Par};
use phlora::backend::{Backend, Cpu};
use phlora::linalg::{decompose, rsvd::nominal_flops, Method, SvdSettings};

/// Best-of-`reps` rate of an (m×k)·(k×n) f32 GEMM.
fn gemm_rate(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let a = phlora::rng::normal_matrix(m, k, 1);
    let b = phlora::rng::normal_matrix(k, n, 2);
    let mut c = Mat::<f32>::zeros(m, n);
    // One warm-up, then the best of `reps`, like the SVD timings.
    let mut best = f64::INFINITY;
    for rep in 0..=reps {
        let t = Instant::now();
        faer::linalg::matmul::matmul(
            c.as_mut(),
            Accum::Replace,
            a.as_ref(),
            b.as_ref(),
            1.0,
            Par::rayon(0),
        );
        if rep > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    2.0 * m as f64 * k as f64 * n as f64 / best / 1e9
}

/// ΔW with σᵢ ∝ (i+1)^-0.6 over 256 directions plus dense noise.
fn delta(m: usize, n: usize) -> Mat<f32> {
    let r = 256.min(m).min(n);
    let mut u = phlora::rng::normal_matrix(m, r, 3);
    let v = phlora::rng::normal_matrix(n, r, 4);
    for k in 0..r {
        let c = ((k as f32 + 1.0).powf(-0.6)) / ((m * n) as f32).sqrt();
        u.col_mut(k).iter_mut().for_each(|x| *x *= c);
    }
    let mut d = phlora::rng::normal_matrix(m, n, 5);
    for col in d.col_iter_mut() {
        col.iter_mut()
            .for_each(|x| *x *= 0.2 / 16.0 / ((m * n) as f32).sqrt().sqrt());
    }
    faer::linalg::matmul::matmul(
        d.as_mut(),
        Accum::Add,
        u.as_ref(),
        v.transpose(),
        1.0,
        Par::rayon(0),
    );
    d
}

fn residual(be: &Cpu, d: &<Cpu as Backend>::Mat, t: &phlora::linalg::Truncated) -> f64 {
    let f = phlora::factor::split(
        t,
        phlora::factor::Layout::Linear,
        t.s.len(),
        phlora::checkpoint::DType::F32,
    );
    let l = be.upload(f.left.as_ref()).unwrap();
    let r = be.upload(f.right.as_ref()).unwrap();
    let norm2 = be.download(d).unwrap().as_ref().squared_norm_l2() as f64;
    (be.residual_sumsq(d, &l, &r).unwrap() / norm2).sqrt()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let be = Cpu::new();
    let threads = rayon::current_num_threads();
    let g = if quick { 1024 } else { 3072 };
    let gemm = gemm_rate(g, g, g, 5);
    println!(
        "machine: {threads} threads; faer SGEMM {g}³ (the large-GEMM rate): {gemm:.1} GFLOP/s"
    );
    let shapes: &[(usize, usize)] = if quick {
        &[(1024, 512)]
    } else {
        &[(8192, 2048), (2048, 8192), (2048, 2048)]
    };
    let (r, q) = (64, 2);
    println!(
        "{:>11}  {:>7}  {:>7}  {:>7}  {:>11}  {:>9}  {:>7}  {:>8}  {:>7}  {:>8}  {:>10}",
        "shape",
        "rsvd s",
        "GFLOP/s",
        "of GEMM",
        "skinny GEMM",
        "of skinny",
        "exact s",
        "speed-up",
        "f32 s",
        "speed-up",
        "rsvd/exact"
    );
    for &(m, n) in shapes {
        let host = delta(m, n);
        // The sketch GEMM's own ceiling: ΔW (m×n) times an n×128 block.
        let skinny = gemm_rate(m, n, 128, 5);
        let d = be.upload(host.as_ref()).unwrap();
        let s = SvdSettings {
            method: Method::Randomized,
            oversample: Some(64),
            power_iters: q,
            seed: 7,
        };
        // Best of 5 after a warm-up: the machine is shared and noisy.
        let mut tr = decompose(&be, &d, r, &s, 7).unwrap();
        let mut t_r = f64::INFINITY;
        for _ in 0..5 {
            let t0 = Instant::now();
            tr = decompose(&be, &d, r, &s, 7).unwrap();
            t_r = t_r.min(t0.elapsed().as_secs_f64());
        }
        let gflops = nominal_flops(m, n, tr.sketch, q) / t_r / 1e9;
        let t0 = Instant::now();
        let te = decompose(
            &be,
            &d,
            r,
            &SvdSettings {
                method: Method::Exact,
                ..s
            },
            7,
        )
        .unwrap();
        let t_e = t0.elapsed().as_secs_f64();
        let (res_r, res_e) = (residual(&be, &d, &tr), residual(&be, &d, &te));
        // A plain f32 thin SVD in faer, for a like-for-like precision comparison (the exact
        // mode runs in f64 for accuracy).
        let t0 = Instant::now();
        let _ = host.as_ref().thin_svd().unwrap();
        let t_f32 = t0.elapsed().as_secs_f64();
        println!(
            "{:>11}  {:>7.3}  {:>7.1}  {:>6.0}%  {:>11.1}  {:>8.0}%  {:>7.2}  {:>7.1}×  {:>7.2}  {:>7.1}×  {:>10.5}",
            format!("{m}x{n}"),
            t_r,
            gflops,
            100.0 * gflops / gemm,
            skinny,
            100.0 * gflops / skinny,
            t_e,
            t_e / t_r,
            t_f32,
            t_f32 / t_r,
            res_r / res_e
        );
    }
}
