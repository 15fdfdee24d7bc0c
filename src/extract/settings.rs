//! What `extract` is asked to do, validated: the settings every stage reads, and the shard a
//! run computes. A leaf of the extract module: the stages take these as arguments.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::backend::{CudaOptions, Device, WorkerRequest};
use crate::checkpoint::DType;
use crate::linalg::rank::RankPolicy;
use crate::linalg::SvdSettings;
use crate::plan::PlanOptions;

/// Which loaders an adapter must satisfy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Target {
    /// PEFT: per-module ranks through rank_pattern, norms through modules_to_save.
    Peft,
    /// vLLM: one rank from its allowed set (a fixed --rank must be one; chosen ranks are
    /// zero-padded up to one), no modules_to_save.
    Vllm,
    /// What vLLM, SGLang, LoRAX and TGI all load: like Vllm, any rank padded up to an allowed one.
    Portable,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Peft => "peft",
            Target::Vllm => "vllm",
            Target::Portable => "portable",
        }
    }
}

/// Everything `extract` needs, validated.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ExtractSettings {
    pub base: PathBuf,
    pub ft: PathBuf,
    pub out: PathBuf,
    pub rank: RankPolicy,
    pub svd: SvdSettings,
    /// `None`: the fine-tune's dtype.
    pub out_dtype: Option<DType>,
    pub device: Device,
    /// How the randomized SVD runs on a GPU (ignored on the CPU).
    pub cuda: CudaOptions,
    /// Bound on host memory for the computation (None: no bound). A matrix whose f32 ΔW and
    /// sketches would not fit is streamed through the SVD in row blocks instead.
    pub max_ram: Option<u64>,
    /// The same for device memory (None: the backend's default, most of the free memory).
    pub max_vram: Option<u64>,
    /// GPU ordinals to run on (None: all visible, or the one `device` names).
    pub devices: Option<Vec<usize>>,
    /// Tensors in flight per device (None: 2 per GPU, 1 on the CPU).
    pub in_flight: Option<usize>,
    pub plan: PlanOptions,
    /// `base_model_name_or_path`; `None`: from the base's config.json, else the base path.
    pub base_name: Option<String>,
    /// The adapter config's `revision`: the base's commit, when --base was a hub id.
    #[serde(default)]
    pub base_revision: Option<String>,
    /// Which loaders the adapter is for.
    pub target: Target,
    /// Replace an adapter already in OUT.
    pub overwrite: bool,
    /// Continue an interrupted run from its journal in OUT.
    pub resume: bool,
    /// Compute only this share of the plan, as a part for `combine`.
    pub shard: Option<Shard>,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Split the adapter's weights into files of at most this many tensor bytes, with an
    /// index (None: one adapter_model.safetensors). Only the layout: not part of a journal's
    /// fingerprint, so a resume or a combine may choose another.
    #[serde(default)]
    pub max_shard_size: Option<u64>,
    /// `--target llama.cpp`: also OUT/adapter.gguf, converted from the committed adapter.
    /// Not in the fingerprint: the PEFT adapter is the same either way.
    #[serde(default)]
    pub gguf: Option<crate::adapter::gguf::GgufSettings>,
}

impl ExtractSettings {
    /// The devices and workers these settings ask for.
    pub fn worker_request(&self) -> WorkerRequest {
        WorkerRequest {
            device: self.device,
            devices: self.devices.clone(),
            in_flight: self.in_flight,
            options: self.cuda,
        }
    }

    pub fn new(base: PathBuf, ft: PathBuf, out: PathBuf, rank: usize) -> Self {
        ExtractSettings {
            base,
            ft,
            out,
            rank: RankPolicy::Fixed(rank),
            svd: SvdSettings::default(),
            out_dtype: None,
            device: Device::Auto,
            cuda: CudaOptions::default(),
            max_ram: None,
            max_vram: None,
            devices: None,
            in_flight: None,
            plan: PlanOptions::all(),
            base_name: None,
            base_revision: None,
            target: Target::Peft,
            overwrite: false,
            resume: false,
            shard: None,
            progress: false,
            max_shard_size: None,
            gguf: None,
        }
    }
}

/// Files an adapter of these settings stages beside its weights (the fine-tune's tokenizer,
/// with added tokens).
pub(super) fn side_files(s: &ExtractSettings) -> &'static [&'static str] {
    if s.plan.added_tokens {
        crate::adapter::TOKENIZER_FILES
    } else {
        &[]
    }
}

/// Shard `index` (1-based) of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// "I/N" with 1 ≤ I ≤ N.
    pub fn parse(text: &str) -> std::result::Result<Shard, String> {
        let bad = || "expected I/N with 1 ≤ I ≤ N, e.g. 2/8".to_string();
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index == 0 || count == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}
