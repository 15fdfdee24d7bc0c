use std::process::ExitCode;

use super::Ui;
use crate::cli::{BenchArgs, GemmArg};
use phlora::backend::cuda::{DeltaBench, Orth, SmallSvd};
use phlora::backend::{self, CudaOptions, Device, Resolved};
use phlora::bench::{self, BenchRow, BenchSettings};
use phlora::checkpoint::DType;
use phlora::error::{Error, Result};

fn parse_list(what: &str, s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| match x.trim().parse::<usize>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(Error::Settings(format!(
                "{what} `{s}`: expected positive integers separated by commas"
            ))),
        })
        .collect()
}

fn parse_shapes(s: &str) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|x| {
            let bad = || {
                Error::Settings(format!(
                    "--shapes `{s}`: expected ROWSxCOLS[,ROWSxCOLS…], e.g. 8192x8192"
                ))
            };
            let (r, c) = x.trim().split_once('x').ok_or_else(bad)?;
            let (r, c) = (
                r.parse::<usize>().map_err(|_| bad())?,
                c.parse::<usize>().map_err(|_| bad())?,
            );
            if r == 0 || c == 0 {
                return Err(bad());
            }
            Ok((r, c))
        })
        .collect()
}

fn settings(a: &BenchArgs) -> Result<(BenchSettings, Device, CudaOptions)> {
    let shapes = match &a.shapes {
        Some(s) => parse_shapes(s)?,
        None => BenchSettings::default_shapes(),
    };
    let ranks = parse_list("--ranks", &a.ranks)?;
    if a.power_iters > 20 {
        return Err(Error::Settings(
            "--power-iters above 20 only costs time".into(),
        ));
    }
    let device = a.device;
    let cuda = CudaOptions {
        tf32: a.gemm == GemmArg::Tf32,
        ..CudaOptions::default()
    };
    let s = BenchSettings {
        shapes,
        ranks,
        oversample: a.oversample,
        power_iters: a.power_iters,
        reps: a.reps.max(1),
        seed: a.seed,
    };
    Ok((s, device, cuda))
}

#[derive(serde::Serialize)]
struct BenchReport {
    rows: Vec<BenchRow>,
    variants: Vec<BenchRow>,
    delta_kernel: Option<DeltaBench>,
    cuda: Option<backend::cuda::CudaInfo>,
}

pub fn run(a: &BenchArgs, ui: Ui) -> Result<ExitCode> {
    if let Some(dir) = &a.sink {
        return sink(a, dir, ui);
    }
    let (s, device, options) = settings(a)?;
    let dev_err = |e: backend::BackendError| Error::Device(e.message);
    let mut report = BenchReport {
        rows: Vec::new(),
        variants: Vec::new(),
        delta_kernel: None,
        cuda: None,
    };
    match backend::resolve(device, options)? {
        Resolved::Cpu(cpu) => {
            if a.variants {
                return Err(Error::Settings("--variants needs a CUDA device".into()));
            }
            report.rows = bench::run(&cpu, &s).map_err(dev_err)?;
        }
        Resolved::Cuda(mut gpu) => {
            report.cuda = Some(gpu.info());
            // Each shape's ΔW is generated and uploaded once, for the defaults and the variants.
            for &(m, n) in &s.shapes {
                let p = bench::prepare(gpu.as_ref(), m, n, s.seed).map_err(dev_err)?;
                let ranks = bench::clamped_ranks(&s.ranks, m, n);
                gpu.set_options(options);
                for &r in &ranks {
                    report
                        .rows
                        .push(bench::measure(gpu.as_ref(), &p, r, &s).map_err(dev_err)?);
                }
                if !a.variants {
                    continue;
                }
                for tf32 in [true, false] {
                    for orth in [Orth::CholeskyQr2, Orth::Householder] {
                        for small in [SmallSvd::DeviceEigh, SmallSvd::HostEigh, SmallSvd::Gesvd] {
                            gpu.set_options(CudaOptions { tf32, orth, small });
                            for &r in &ranks {
                                report.variants.push(
                                    bench::measure(gpu.as_ref(), &p, r, &s).map_err(dev_err)?,
                                );
                            }
                        }
                    }
                }
            }
            gpu.set_options(options);
            if !a.no_delta {
                report.delta_kernel = Some(
                    gpu.bench_delta(28672, 8192, DType::BF16, s.reps)
                        .map_err(|e| Error::Device(e.to_string()))?,
                );
            }
        }
    }
    let mut text = bench::table(&report.rows);
    if !report.variants.is_empty() {
        text.push_str("\nvariants:\n");
        text.push_str(&bench::table(&report.variants));
    }
    if let Some(d) = &report.delta_kernel {
        text.push_str(&format!(
            "\nΔW kernel {}x{} {}: {:.3} ms, {:.2} TB/s (read + write) = {:.0}% of a device copy's {:.2} TB/s\n",
            d.rows,
            d.cols,
            d.dtype,
            d.kernel_seconds * 1e3,
            d.kernel_bytes_per_s / 1e12,
            100.0 * d.kernel_bytes_per_s / d.copy_bytes_per_s,
            d.copy_bytes_per_s / 1e12
        ));
        for (mode, secs, rate) in &d.modes {
            text.push_str(&format!(
                "  mode {mode} (paired {}, f32 partials {}): {:.3} ms, {:.2} TB/s = {:.0}%\n",
                mode & 1,
                (mode >> 1) & 1,
                secs * 1e3,
                rate / 1e12,
                100.0 * rate / d.copy_bytes_per_s
            ));
        }
    }
    super::emit(&text, a.json, &report, ui)?;
    Ok(ExitCode::SUCCESS)
}

/// `--sink DIR`: the writer thread's work at a large model's scale, one row per rank.
fn sink(a: &BenchArgs, dir: &std::path::Path, ui: Ui) -> Result<ExitCode> {
    let ranks = parse_list("--ranks", &a.ranks)?;
    let mut rows = Vec::new();
    let mut text = String::from(
        "rank  tensors  factors GiB  journal s  stage s  tensors/s  MB/s (journal+stage)  commit s\n",
    );
    for &rank in &ranks {
        let out = dir.join(format!("phlora-sink-bench-r{rank}-{}", std::process::id()));
        let result = phlora::extract::bench_sink(&out, rank, a.layers);
        let _ = std::fs::remove_dir_all(&out);
        let r = result?;
        let busy = r.journal_seconds + r.stage_seconds;
        text.push_str(&format!(
            "{:>4}  {:>7}  {:>11.2}  {:>9.2}  {:>7.2}  {:>9.1}  {:>20.0}  {:>8.2}\n",
            r.rank,
            r.tensors,
            r.bytes as f64 / (1u64 << 30) as f64,
            r.journal_seconds,
            r.stage_seconds,
            r.tensors_per_second(),
            r.bytes as f64 / busy.max(1e-9) / 1e6,
            r.commit_seconds
        ));
        rows.push(r);
    }
    super::emit(&text, a.json, &rows, ui)?;
    Ok(ExitCode::SUCCESS)
}
