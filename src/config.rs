//! Arguments → validated settings, before any work starts.

use std::path::{Path, PathBuf};

use crate::cli::{ExtractArgs, GemmArg, GgufTypeArg, OutDtype, SvdArg, SynthArgs, TargetArg};
use phlora::adapter::gguf::GgufSettings;
use phlora::backend::{CudaOptions, Device};
use phlora::checkpoint::DType;
use phlora::error::{Error, Result};
use phlora::extract::shard::Shard;
use phlora::extract::{ExtractSettings, Target};
use phlora::hub::{Expect, HubCache, ModelSource};
use phlora::linalg::{rank::RankPolicy, Method, SvdSettings};
use phlora::plan::{Glob, PlanOptions};
use phlora::synth::SynthSettings;

// clap value parsers: each flag's text into its type before any work, the message saying what
// was expected (clap names the flag and the value).

pub fn device(s: &str) -> std::result::Result<Device, String> {
    Device::parse(s).ok_or_else(|| "expected auto, cpu, cuda or cuda:N".into())
}

/// A byte size: 768M, 40G, 1.5G (binary units).
pub fn bytes(s: &str) -> std::result::Result<u64, String> {
    phlora::size::parse_size(s)
}

/// A parameter count: 1500, 20K, 20M, 1.5G or 1.5B (decimal units; B is billions).
pub fn count(s: &str) -> std::result::Result<u64, String> {
    phlora::size::parse_count(s)
}

/// An engine name for `check --for`, or `all`.
pub fn engines(s: &str) -> std::result::Result<Vec<phlora::check::Engine>, String> {
    use phlora::check::Engine;
    if s.eq_ignore_ascii_case("all") {
        return Ok(Engine::ALL.to_vec());
    }
    Engine::parse(s)
        .map(|e| vec![e])
        .ok_or_else(|| "expected peft, vllm, sglang, lorax, llama.cpp or all".into())
}

pub fn shard(s: &str) -> std::result::Result<Shard, String> {
    Shard::parse(s)
}

pub fn dtype(s: &str) -> std::result::Result<DType, String> {
    DType::parse(s).ok_or_else(|| "expected bf16, f16 or f32".into())
}

pub fn out_dtype(s: &str) -> std::result::Result<OutDtype, String> {
    if s == "auto" {
        return Ok(OutDtype::Auto);
    }
    DType::parse(s)
        .map(OutDtype::Fixed)
        .ok_or_else(|| "expected auto, bf16, f16 or f32".into())
}

/// A model argument: the path when it exists, else a Hugging Face id from the local hub cache.
pub fn model(arg: &Path) -> Result<ModelSource> {
    HubCache::from_env().resolve(arg, Expect::Model)
}

/// The folder a model argument reads.
pub fn model_path(arg: &Path) -> Result<PathBuf> {
    Ok(model(arg)?.path().to_path_buf())
}

/// An adapter argument: a folder, or an adapter's hub id in the local cache.
pub fn adapter_path(arg: &Path) -> Result<PathBuf> {
    Ok(HubCache::from_env()
        .resolve(arg, Expect::Adapter)?
        .path()
        .to_path_buf())
}

impl ExtractArgs {
    pub fn settings(&self, progress: bool) -> Result<ExtractSettings> {
        let rank = self.rank_policy()?;
        let target = self.target_for(&rank)?;
        if self.power_iters > 20 {
            return Err(Error::Settings(
                "--power-iters above 20 only costs time".into(),
            ));
        }
        if self.oversample.is_some() && self.svd == SvdArg::Exact {
            return Err(Error::Settings(
                "--oversample applies to --svd randomized only".into(),
            ));
        }
        let out_dtype = match self.out_dtype {
            OutDtype::Auto => None,
            OutDtype::Fixed(d) => Some(d),
        };
        if self.in_flight == Some(0) {
            return Err(Error::Settings("--in-flight must be at least 1".into()));
        }
        let base = model(&self.base)?;
        // A hub id names the base in the adapter's config, with its commit, so PEFT and vLLM
        // resolve it by name.
        // (A --base-name of another model keeps no revision: the commit is the hub id's.)
        let (base_name, base_revision) = match (&self.base_name, base.hub()) {
            (None, Some((id, commit))) => (Some(id.to_string()), Some(commit.to_string())),
            (Some(n), Some((id, commit))) if n == id => (Some(n.clone()), Some(commit.to_string())),
            (name, _) => (name.clone(), None),
        };
        Ok(ExtractSettings {
            base: base.path().to_path_buf(),
            ft: model_path(&self.ft)?,
            out: self.out.clone(),
            rank,
            svd: SvdSettings {
                method: match self.svd {
                    SvdArg::Randomized => Method::Randomized,
                    SvdArg::Exact => Method::Exact,
                },
                oversample: self.oversample,
                power_iters: self.power_iters,
                seed: self.seed,
            },
            out_dtype,
            device: self.device,
            cuda: CudaOptions {
                tf32: self.gemm == GemmArg::Tf32,
                ..CudaOptions::default()
            },
            max_ram: self.max_ram,
            max_vram: self.max_vram,
            devices: self.devices.clone(),
            in_flight: self.in_flight,
            plan: PlanOptions {
                include: self.include.iter().map(|g| Glob::new(g)).collect(),
                exclude: self.exclude.iter().map(|g| Glob::new(g)).collect(),
                embeddings: !self.no_embeddings,
                norms: !self.no_norms && target == Target::Peft,
                lora_bias: self.lora_bias,
                added_tokens: self.added_tokens,
                fuse_experts: self.fuse_experts,
                remove_logit_shift: self.remove_logit_shift,
            },
            base_name,
            base_revision,
            target,
            overwrite: self.force,
            resume: self.resume,
            shard: self.shard,
            progress,
            max_shard_size: self.max_shard_size,
            gguf: self.gguf(&base)?,
        })
    }

    /// --rank, --energy or --budget (with their caps and floor), as a policy.
    fn rank_policy(&self) -> Result<RankPolicy> {
        let rank = match (self.rank, self.energy, &self.budget) {
            (Some(0), _, _) => return Err(Error::Settings("--rank must be at least 1".into())),
            (Some(r), _, _) => RankPolicy::Fixed(r),
            (None, Some(t), _) if !(t > 0.0 && t <= 1.0) => {
                return Err(Error::Settings(format!("--energy {t}: expected 0 < T ≤ 1")))
            }
            (None, Some(target), _) => RankPolicy::Energy {
                target,
                max_rank: self.max_rank,
            },
            (None, None, Some(params)) => RankPolicy::Budget {
                params: *params,
                max_rank: self.max_rank,
                rule: self.rank_rule.into(),
                min_rank: self.min_rank,
            },
            (None, None, None) => RankPolicy::Fixed(64),
        };
        if self.max_rank == 0 {
            return Err(Error::Settings("--max-rank must be at least 1".into()));
        }
        if let Some(floor) = self.min_rank.filter(|&f| f > self.max_rank) {
            return Err(Error::Settings(format!(
                "--min-rank {floor} is above --max-rank {}",
                self.max_rank
            )));
        }
        Ok(rank)
    }

    /// --target llama.cpp's conversion, checked against the base before any work.
    fn gguf(&self, base: &ModelSource) -> Result<Option<GgufSettings>> {
        if self.target != TargetArg::LlamaCpp {
            if self.gguf_type.is_some() {
                return Err(Error::Settings(
                    "--gguf-type is for --target llama.cpp".into(),
                ));
            }
            return Ok(None);
        }
        if self.shard.is_some() {
            return Err(Error::Settings(
                "--target llama.cpp with --shard: a shard writes a part, not an adapter; join the parts with `phlora combine`, then `phlora convert ADAPTER --to gguf --base BASE`".into(),
            ));
        }
        // An architecture llama.cpp's names are not known for is refused now, not after the
        // extraction.
        let model = phlora::adapter::gguf::BaseModel::read(base.path())?;
        model.check_weights(&phlora::checkpoint::Checkpoint::open(base.path())?)?;
        Ok(Some(GgufSettings {
            tensor_type: self.gguf_type.map(GgufTypeArg::tensor_type),
        }))
    }

    /// --target (or --portable), refused with settings its loaders reject.
    fn target_for(&self, rank: &RankPolicy) -> Result<Target> {
        let target = match (self.portable, self.target) {
            (true, _) | (_, TargetArg::Portable) => Target::Portable,
            (_, TargetArg::Vllm) => Target::Vllm,
            // llama.cpp: the PEFT adapter as for peft, converted after.
            (_, TargetArg::Peft | TargetArg::LlamaCpp) => Target::Peft,
        };
        let allowed = phlora::linalg::rank::PORTABLE_RANKS;
        let largest = allowed[allowed.len() - 1];
        let flag = if matches!(rank, RankPolicy::Fixed(_)) {
            "--rank"
        } else {
            "--max-rank"
        };
        if target != Target::Peft && rank.adapter_rank() > largest {
            return Err(Error::Settings(format!(
                "--target {}: {flag} {} is above the largest rank vLLM accepts ({largest})",
                target.as_str(),
                rank.adapter_rank()
            )));
        }
        if target != Target::Peft && self.lora_bias {
            return Err(Error::Settings(format!(
                "--target {}: vLLM rejects lora_B.bias keys; drop --lora-bias (the biases are then reported as not carried)",
                target.as_str()
            )));
        }
        if target != Target::Peft && self.fuse_experts {
            return Err(Error::Settings(format!(
                "--target {}: --fuse-experts writes PEFT's target_parameters, which vLLM and LoRAX cannot load (they take MoE LoRA per expert, as phlora writes it without --fuse-experts)",
                target.as_str()
            )));
        }
        if let (Target::Vllm, RankPolicy::Fixed(r)) = (target, rank) {
            if !allowed.contains(r) {
                let up = allowed
                    .iter()
                    .find(|&&a| a > *r)
                    .copied()
                    .unwrap_or(largest);
                let down = allowed
                    .iter()
                    .rev()
                    .find(|&&a| a < *r)
                    .copied()
                    .unwrap_or(1);
                return Err(Error::Settings(format!(
                    "--target vllm: vLLM loads only ranks {allowed:?} (max_lora_rank), so it would reject r = {r}; use --rank {down} or --rank {up}, or --target portable to zero-pad rank {r} up to {up}"
                )));
            }
        }
        Ok(target)
    }
}

impl SynthArgs {
    pub fn settings(&self) -> Result<SynthSettings> {
        let dtype = self.dtype;
        let finite_non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !finite_non_negative(self.decay) || !finite_non_negative(self.noise) {
            return Err(Error::Settings(
                "--decay and --noise must be finite and non-negative".into(),
            ));
        }
        if self.shard_mib == 0 {
            return Err(Error::Settings("--shard-mib must be at least 1".into()));
        }
        let s = SynthSettings {
            out: self.out.clone(),
            hidden: self.hidden,
            intermediate: self.intermediate,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            vocab: self.vocab,
            seed: self.seed,
            dtype,
            delta_rank: self.delta_rank,
            decay: self.decay,
            delta_scale: 0.1,
            noise: self.noise,
            shard_bytes: self.shard_mib << 20,
            tie_embeddings: self.tie_embeddings,
            overwrite: self.force,
        };
        s.validate()?;
        Ok(s)
    }
}
