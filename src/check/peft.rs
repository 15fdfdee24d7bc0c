//! PEFT's own rules: the LoraConfig checks that raise, and the keys it ignores on load.

use super::inventory::{Experts, Inventory};
use super::{some, Finding, Severity::*};

pub const SOURCES: &str = "PEFT 0.21.2 (wheel from PyPI): tuners/lora/config.py LoraConfig.__post_init__, tuners/lora/layer.py, tuners/tuners_utils.py inject_adapter, utils/save_and_load.py set_peft_model_state_dict";

pub fn check(a: &Inventory) -> Vec<Finding> {
    let c = &a.config;
    let mut out = Vec::new();
    let mut refusals = Vec::new();
    let mut refuse = |rule, msg: String| refusals.push(Finding::new(Refused, rule, msg));
    if let Some(r) = c.r.filter(|&r| r <= 0) {
        refuse("peft.r", format!("r = {r}: LoraConfig raises \"`r` should be a positive integer value but the value passed is {r}\""));
    }
    if let Some((k, v)) = c.bad_rank_pattern() {
        refuse(
            "peft.rank_pattern",
            format!("rank_pattern[{k:?}] = {v}: ranks must be positive integers"),
        );
    }
    if a.sharded {
        refuse("peft.sharded", "sharded weights: PeftModel.from_pretrained reads adapter_model.safetensors (or .bin) only, and then takes the folder for a hub id (HFValidationError); load the shards as one state dict (docs/adapter-format.md), or extract without --max-shard-size".into());
    }
    if let Err(e) = &a.targets {
        refuse("peft.targets", e.clone());
    }
    if c.lora_bias && c.use_dora {
        refuse(
            "peft.lora_bias",
            "lora_bias with use_dora: LoraConfig raises \"DoRA does not support lora_bias=True\""
                .into(),
        );
    }
    if c.lora_bias && a.has_embedding_lora() {
        refuse("peft.lora_bias", "lora_bias with an embedding LoRA: PEFT raises \"lora_bias=True is not supported for Embedding\" (phlora: --lora-bias with --no-embeddings)".into());
    }
    let fused = c.target_parameters.as_ref().is_some_and(|p| !p.is_empty());
    if fused && (c.lora_bias || c.use_dora || c.fan_in_fan_out) {
        refuse("peft.target_parameters", "target_parameters with lora_bias, use_dora or fan_in_fan_out: PEFT's ParamWrapper refuses each".into());
    }
    let wrong_rank: Vec<String> = a
        .factored()
        .filter(|m| m.experts != Experts::Fused)
        .filter_map(|m| {
            let want = c.rank_for(&m.path);
            m.rank()
                .filter(|&r| r as i64 != want)
                .map(|r| format!("{} (file {r}, config {want})", m.path))
        })
        .collect();
    if !wrong_rank.is_empty() {
        refuse("peft.rank", format!("{} modules' factors have another rank than r / rank_pattern give them: loading raises a size mismatch", some(&wrong_rank)));
    }
    out.extend(ignored(a));
    out.extend(refusals);
    out
}

/// What PEFT loads without a word, and so drops.
fn ignored(a: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    if a.config.use_dora && !a.modules.iter().any(|m| m.magnitude) {
        out.push(Finding::new(Differs, "peft.dora_magnitudes", "use_dora with no lora_magnitude_vector in the file: PEFT warns \"Found missing adapter keys\" and keeps the magnitudes at ‖W‖, which changes the update (drop use_dora, or save the magnitudes)"));
    }
    let untargeted = a.untargeted();
    if !untargeted.is_empty() {
        out.push(Finding::new(Differs, "peft.untargeted", format!("{} modules have factors but the config does not target them: PEFT builds no LoRA layer for them and drops their keys silently", some(&untargeted))));
    }
    let saved = a
        .config
        .modules_to_save
        .as_ref()
        .is_some_and(|m| !m.is_empty());
    if !saved && !a.whole.is_empty() {
        out.push(Finding::new(
            Differs,
            "peft.modules_to_save",
            format!(
                "{} tensors are saved whole but modules_to_save is empty: PEFT ignores them",
                some(&a.whole)
            ),
        ));
    }
    if a.unprefixed > 0 {
        out.push(Finding::new(Differs, "peft.prefix", format!("{} keys lack the `base_model.model.` prefix: PEFT matches none of them (\"Found missing adapter keys\")", a.unprefixed)));
    }
    if !a.other.is_empty() {
        out.push(Finding::new(Note, "peft.other_keys", format!("{} keys of no LoRA kind (base_layer copies, trainable-token deltas): read only by PEFT features that made them", some(&a.other))));
    }
    if !a.unknown_fields.is_empty() {
        out.push(Finding::new(
            Note,
            "peft.unknown_fields",
            format!(
                "config fields PEFT 0.21 does not know, ignored with a warning: {}",
                a.unknown_fields.join(", ")
            ),
        ));
    }
    out
}
