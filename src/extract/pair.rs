//! The pair stage: both checkpoints opened and planned, the checks that need the whole plan
//! (settings that PEFT or the targets refuse), and what the adapter's config says of the pair.

use std::collections::HashMap;

use super::settings::{ExtractSettings, Target};
use crate::checkpoint::{Checkpoint, DType};
use crate::error::{Error, Result};
use crate::plan::{Action, Form, Plan};

/// Both checkpoints, opened and paired.
pub(super) fn open_pair(s: &ExtractSettings) -> Result<(Checkpoint, Checkpoint, Plan)> {
    let base = Checkpoint::open(&s.base)?;
    let ft = Checkpoint::open(&s.ft)?;
    let plan = Plan::build(&base, &ft, &s.plan)?;
    if let Some(item) = plan
        .items
        .iter()
        .find(|i| i.action == Action::LoraEmbedding)
        .filter(|_| s.plan.lora_bias)
    {
        return Err(Error::Settings(format!(
            "--lora-bias: PEFT refuses lora_bias on an adapter with an embedding LoRA (`{}`); add --no-embeddings (the embedding's change is then reported as not carried), or drop --lora-bias",
            item.name
        )));
    }
    let model_type = ft
        .config()
        .and_then(|c| c.get("model_type"))
        .and_then(|m| m.as_str());
    if s.target == Target::Peft && !s.plan.fuse_experts {
        warn_per_expert_for_peft(&plan, model_type);
    }
    let fused_param = plan.items.iter().find_map(|i| match &i.form {
        Form::Expert(e) => Some(e.param.as_str()),
        _ => None,
    });
    if let Some(param) = fused_param {
        if s.target != Target::Peft {
            return Err(Error::Settings(format!(
                "--target {}: `{param}` is a fused 3-D expert parameter, which only PEFT's target_parameters can carry (vLLM and LoRAX load MoE LoRA per expert, `experts.N.<proj>`); use --target peft, or leave the experts out with --exclude '*.experts.*_proj'",
                s.target.as_str()
            )));
        }
        if s.plan.lora_bias {
            return Err(Error::Settings(format!(
                "--lora-bias: `{param}` is a fused 3-D expert parameter, and PEFT refuses lora_bias on any adapter with target_parameters; drop --lora-bias, or leave the experts out with --exclude '*.experts.*_proj'"
            )));
        }
    }
    Ok((base, ft, plan))
}

/// Per-expert `gate_proj`/`up_proj`/`down_proj` weights that PEFT under transformers v5 will not
/// apply as written: Qwen2-MoE's experts (PEFT does not convert that type), or, for the types it
/// converts, a dense MLP or shared expert of the same names (the conversion drops their LoRA).
pub(super) fn warn_per_expert_for_peft(plan: &Plan, model_type: Option<&str>) {
    let expert = plan.items.iter().find(|i| {
        crate::names::per_expert_weight(&i.name)
            .is_some_and(|(_, _, proj)| crate::names::fused_target(proj).is_some())
    });
    let Some(expert) = expert else {
        return;
    };
    let namesake = plan.items.iter().find(|i| {
        i.action == Action::LoraLinear
            && crate::names::per_expert_weight(&i.name).is_none()
            && crate::names::fused_target(crate::names::last_segment(&i.module)).is_some()
    });
    if model_type == Some("qwen2_moe") {
        tracing::warn!(
            "{}: the experts are written per expert (what vLLM loads); PEFT under transformers v5 does not apply a per-expert Qwen2-MoE adapter (it fuses the experts in memory): pass --fuse-experts for PEFT",
            expert.name
        );
    } else if let Some(other) = namesake {
        tracing::warn!(
            "{}: when PEFT under transformers v5 converts these per-expert weights to fused experts, it also turns `{}` (a dense MLP or shared expert of the same name) into the experts' parameter and drops its LoRA: pass --fuse-experts for PEFT (vLLM loads the per-expert form)",
            expert.name,
            other.module
        );
    }
}

/// The most common fine-tune dtype among LoRA targets (BF16 if there are none).
pub(super) fn dominant_lora_dtype(plan: &Plan) -> DType {
    let mut count: HashMap<DType, usize> = HashMap::new();
    for i in &plan.items {
        if i.action.is_lora() {
            // FP8 weights come dequantised; their factors are written in BF16.
            let d = if i.has_fp8() {
                DType::BF16
            } else {
                i.ft_dtype()
            };
            *count.entry(d).or_default() += 1;
        }
    }
    let mut v: Vec<(DType, usize)> = count.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.as_str().cmp(b.0.as_str())));
    v.first().map_or(DType::BF16, |x| x.0)
}

pub(super) fn base_model_name(s: &ExtractSettings, base: &Checkpoint) -> String {
    if let Some(n) = &s.base_name {
        return n.clone();
    }
    base.config()
        .and_then(|c| c.get("_name_or_path"))
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .map_or_else(|| s.base.display().to_string(), str::to_string)
}

pub(super) fn task_type(base: &Checkpoint, ft: &Checkpoint) -> Option<String> {
    let causal = [ft, base].iter().any(|c| {
        c.config()
            .and_then(|c| c.get("architectures"))
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter()
                    .any(|x| x.as_str().is_some_and(|s| s.ends_with("ForCausalLM")))
            })
    });
    causal.then(|| "CAUSAL_LM".to_string())
}
