//! The spectrum-only pass (`analyze`, and `--budget`'s first pass): every LoRA target's leading
//! singular values with the same plan, workers and memory bounds as an extraction.

use std::collections::HashMap;
use std::path::PathBuf;

use super::schedule::{budgets, device_names, first_worker, placements, progress_bar};
use super::settings::ExtractSettings;
use super::{engine, job, pair};
use crate::backend::{self, CudaOptions, Device, DeviceWorkers, Workers};
use crate::checkpoint::{Checkpoint, DType};
use crate::error::Result;
use crate::factor::Factoring;
use crate::linalg::SvdSettings;
use crate::plan::{Plan, PlanOptions};

/// One LoRA target's leading singular values (`phlora analyze`).
#[derive(Clone, Debug)]
pub struct TensorSpectrum {
    pub name: String,
    pub module: String,
    pub shape: Vec<usize>,
    /// Parameters per rank of its LoRA: in + out.
    pub cost: u64,
    /// A tied lm_head: the embedding whose factors it carries (and so whose rank it has).
    pub tied_to: Option<String>,
    pub delta_norm: f64,
    /// ‖W_base‖².
    pub base_sumsq: f64,
    /// Descending, at most the policy's rank for this tensor (empty: ΔW = 0).
    pub s: Vec<f32>,
}

/// What the spectrum-only pass reads and computes with (nothing is written): the pair, which
/// tensors, how many singular values, and the device and memory bounds.
#[derive(Clone, Debug)]
pub struct SpectraSettings {
    pub base: PathBuf,
    pub ft: PathBuf,
    /// Singular values computed per tensor (the randomized SVD's rank).
    pub max_rank: usize,
    pub svd: SvdSettings,
    pub plan: PlanOptions,
    pub device: Device,
    pub cuda: CudaOptions,
    pub max_ram: Option<u64>,
    pub max_vram: Option<u64>,
    pub devices: Option<Vec<usize>>,
    pub in_flight: Option<usize>,
    pub progress: bool,
}

impl SpectraSettings {
    /// Every tensor of the pair, extract's defaults otherwise.
    pub fn new(base: PathBuf, ft: PathBuf, max_rank: usize) -> Self {
        let e = ExtractSettings::new(base, ft, PathBuf::new(), max_rank);
        SpectraSettings {
            base: e.base,
            ft: e.ft,
            max_rank,
            svd: e.svd,
            plan: e.plan,
            device: e.device,
            cuda: e.cuda,
            max_ram: e.max_ram,
            max_vram: e.max_vram,
            devices: e.devices,
            in_flight: e.in_flight,
            progress: e.progress,
        }
    }

    /// The pass runs through extract's stages: these settings as theirs, with no output.
    fn as_extract(&self) -> ExtractSettings {
        let mut e = ExtractSettings::new(
            self.base.clone(),
            self.ft.clone(),
            PathBuf::new(),
            self.max_rank,
        );
        e.svd = self.svd;
        e.plan = self.plan.clone();
        e.device = self.device;
        e.cuda = self.cuda;
        e.max_ram = self.max_ram;
        e.max_vram = self.max_vram;
        e.devices = self.devices.clone();
        e.in_flight = self.in_flight;
        e.progress = self.progress;
        e
    }
}

/// The spectra of every LoRA target at `s.max_rank`, without writing an adapter: the same
/// plan, workers and memory bounds as extract. Returns them in plan order with the device's
/// name.
pub fn spectra(s: &SpectraSettings) -> Result<(Vec<TensorSpectrum>, String)> {
    let s = &s.as_extract();
    let (base, ft, plan) = pair::open_pair(s)?;
    match backend::resolve_workers(&s.worker_request())? {
        Workers::Cpu(groups) => spectra_on(&groups, s, &base, &ft, &plan),
        Workers::Cuda(groups) => spectra_on(&groups, s, &base, &ft, &plan),
    }
}

pub(super) fn spectra_on<B: Factoring>(
    groups: &[DeviceWorkers<B>],
    s: &ExtractSettings,
    base: &Checkpoint,
    ft: &Checkpoint,
    plan: &Plan,
) -> Result<(Vec<TensorSpectrum>, String)> {
    let first = first_worker(groups)?;
    let r_adapter = s.rank.adapter_rank();
    let budgets = budgets(groups, s)?;
    let placements = placements(first, s, &budgets, plan, &s.rank, r_adapter)?;
    let total_bytes = plan.input_bytes();
    let bar = progress_bar(s.progress, total_bytes, plan.items.len());
    let shared = engine::Shared {
        s,
        base,
        ft,
        plan,
        placements: &placements,
        r_adapter,
        out_dtype: DType::F32,
        bar: &bar,
        policy: &s.rank,
        spectrum_only: true,
        skip: &vec![false; plan.items.len()],
    };
    let outcome = engine::run_all(groups, &budgets.per_device, &shared, None, None)?;
    bar.finish_and_clear();
    let rows = spectrum_rows(plan, &outcome.finished);
    Ok((rows, device_names(groups)))
}

/// Each LoRA target's spectrum from a spectrum-only pass, in plan order.
pub(super) fn spectrum_rows(
    plan: &Plan,
    finished: &[Option<job::Finished>],
) -> Vec<TensorSpectrum> {
    let tied: HashMap<usize, usize> = plan
        .tied_copies()
        .into_iter()
        .map(|(e, c)| (c, e))
        .collect();
    plan.items
        .iter()
        .enumerate()
        .zip(finished)
        .filter(|((_, item), _)| item.action.is_lora())
        .map(|((i, item), done)| {
            let (rows, cols) = item.matrix();
            TensorSpectrum {
                name: item.name.clone(),
                module: item.module.clone(),
                shape: item.shape.clone(),
                cost: (rows + cols) as u64,
                tied_to: tied.get(&i).map(|&e| plan.items[e].name.clone()),
                delta_norm: done.as_ref().map_or(0.0, |d| d.row.carried_sumsq().sqrt()),
                base_sumsq: done.as_ref().and_then(|d| d.base_sumsq).unwrap_or(0.0),
                s: done
                    .as_ref()
                    .and_then(|d| d.spectrum.clone())
                    .unwrap_or_default(),
            }
        })
        .collect()
}
