//! SGLang's rules: `LoRAConfig`, `LoRAManager.validate_new_adapter`, `LoRAAdapter`'s stacking
//! of q/k/v and gate/up, and `LoRAMemoryPool.load_lora_weight_to_buffer`.

use std::collections::{BTreeMap, BTreeSet};

use super::inventory::{Experts, Inventory};
use super::{kinds, some, Finding, Severity::*, PROJECTIONS};

pub const SOURCES: &str = "SGLang main, 2026 (sgl-project/sglang): python/sglang/srt/lora/lora_config.py @0ceb81fe, lora_manager.py @a40500b9, mem_pool.py @00639c4d, utils.py @01235a16, lora.py (2026 mainline); PRs #14105 (MoE), #14177 (embeddings)";

/// Module names SGLang's LoRA layers take beyond the projections (`--lora-target-modules`
/// choices and utils.py's known set; w1/w2/w3 are renamed to gate/up/down for experts).
const ALSO_SUPPORTED: &[&str] = &[
    "qkv_proj",
    "gate_up_proj",
    "embed_tokens",
    "lm_head",
    "out_proj",
    "in_proj",
    "q_b_proj",
    "kv_b_proj",
    "q_a_proj",
    "kv_a_proj_with_mqa",
    "w1",
    "w2",
    "w3",
];

pub fn check(a: &Inventory) -> Vec<Finding> {
    let c = &a.config;
    let mut out = Vec::new();
    let (mut refusals, mut notes) = (Vec::new(), Vec::new());
    let mut refuse = |rule, msg: String| refusals.push(Finding::new(Refused, rule, msg));
    let missing = c.missing_required();
    if !missing.is_empty() {
        refuse(
            "sglang.required",
            format!("LoRAConfig reads {missing:?} without a default (KeyError)"),
        );
    }
    if c.use_dora {
        refuse(
            "sglang.dora",
            "use_dora: \"LoRA serving currently doesn't support DoRA adapters\"".into(),
        );
    }
    if let Some(s) = c
        .target_string()
        .filter(|s| !s.eq_ignore_ascii_case("all") && !s.eq_ignore_ascii_case("all-linear"))
    {
        refuse("sglang.target_regex", format!("target_modules is a regex ({s:?}): \"Only 'all' or 'all-linear' can be used as the string for target module\" (phlora writes a regex when a module name has targets and non-targets; --include whole module kinds)"));
    }
    let mut overrides: Vec<&str> = c
        .rank_overrides()
        .into_iter()
        .map(|o| o.0)
        .chain(c.alpha_overrides().into_iter().map(|o| o.0))
        .collect();
    overrides.sort();
    overrides.dedup();
    if !overrides.is_empty() {
        refuse("sglang.patterns", format!("rank_pattern / alpha_pattern set {}: SGLang serves one rank and alpha per adapter and refuses the overrides (phlora: --target portable)", some(&overrides)));
    }
    let r = c.r.unwrap_or(0);
    let off: Vec<String> = a
        .factored()
        .filter(|m| m.experts != Experts::Fused)
        .filter_map(|m| {
            m.rank()
                .filter(|&k| k as i64 != r)
                .map(|k| format!("{} (rank {k})", m.path))
        })
        .collect();
    if !off.is_empty() && overrides.is_empty() {
        refuse("sglang.rank", format!("{} modules' factors are not of rank r = {r}: \"LoRA buffer shape … does not match weight shape\" on the first request", some(&off)));
    }
    let unknown: Vec<String> = kinds(a, false)
        .into_iter()
        .filter(|k| !PROJECTIONS.contains(&k.as_str()) && !ALSO_SUPPORTED.contains(&k.as_str()))
        .collect();
    if !unknown.is_empty() {
        let globs: Vec<String> = unknown.iter().map(|k| format!("*.{k}.*")).collect();
        out.push(Finding::new(Refused, "sglang.modules", format!("modules SGLang has no LoRA layer for: {} (\"get_hidden_dim not implemented\" or not in --lora-target-modules; phlora: --exclude {})", unknown.join(", "), globs.join(" --exclude "))).excluding(globs));
    }
    if let Some((layer, why)) = unstackable_qkv(a) {
        refuse("sglang.qkv", format!("layer {layer}: {why}"));
    }
    match a.new_tokens() {
        Some(0) => {}
        Some(n) => refuse("sglang.added_tokens", format!("{n} added tokens: \"LoRA serving currently doesn't support adapters that add tokens to the vocabulary\"")),
        None => notes.push(Finding::new(Note, "sglang.added_tokens", "added_tokens.json: SGLang refuses ids at or above the base vocabulary (check with --base)")),
    }
    if let Some(f) = super::fused_experts(
        a,
        "sglang.fused_experts",
        "SGLang's 3-D layout has a leading expert dimension, not PEFT's [r·E, in]",
    ) {
        out.push(f);
    }
    let in_layers: Vec<&String> = a.whole.iter().filter(|w| w.contains(".layers.")).collect();
    if !in_layers.is_empty() {
        refuse("sglang.modules_to_save", format!("{} tensors saved whole inside layers (norms): \"Cannot find target module name\" on the first request (phlora: --target portable, or --no-norms)", some(&in_layers)));
    }
    out.extend(differs(a));
    out.extend(refusals);
    out.extend(notes);
    out
}

/// Loads, but not as PEFT would.
fn differs(a: &Inventory) -> Vec<Finding> {
    let c = &a.config;
    let mut out = Vec::new();
    let outside: Vec<&String> = a.whole.iter().filter(|w| !w.contains(".layers.")).collect();
    if !outside.is_empty() {
        out.push(Finding::new(
            Differs,
            "sglang.dropped_whole",
            format!(
                "{} tensors saved whole (modules_to_save) are dropped silently",
                some(&outside)
            ),
        ));
    }
    if c.use_rslora {
        out.push(Finding::new(Differs, "sglang.rslora", "use_rslora: SGLang scales by lora_alpha/r, not /√r (sgl-project/sglang#40835): the update is √r times too small"));
    }
    if c.lora_bias || a.modules.iter().any(|m| m.bias) {
        out.push(Finding::new(
            Differs,
            "sglang.lora_bias",
            "lora_B.bias keys are not applied (phlora: drop --lora-bias)",
        ));
    }
    if c.bias.as_deref().is_some_and(|b| b != "none") {
        out.push(Finding::new(
            Differs,
            "sglang.bias",
            "bias ≠ \"none\": not applied (newer builds refuse the adapter)",
        ));
    }
    if a.has_embedding_lora() || a.has_lm_head_lora() {
        out.push(Finding::new(Note, "sglang.embeddings", "embed_tokens / lm_head LoRA: needs SGLang with PR #14177 (December 2025), at the base's vocabulary size; older builds refuse it (\"Not supported yet\"; phlora: --no-embeddings)"));
    }
    if a.factored().any(|m| m.experts == Experts::PerExpert) {
        out.push(Finding::new(Note, "sglang.experts", "per-expert LoRA: needs SGLang with PR #14105 (2026), and both gate/up and down targeted"));
    }
    out
}

/// A layer whose q/k/v factors SGLang cannot stack into qkv_proj: q_proj without v_proj
/// (a KeyError, sgl-project/sglang#25913), or k/v without q_proj (left unstacked, they match no
/// module on the first request; inferred from the code).
fn unstackable_qkv(a: &Inventory) -> Option<(usize, &'static str)> {
    let mut by_layer: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
    for m in a.factored() {
        if let Some(l) = m.layer() {
            by_layer.entry(l).or_default().insert(m.kind());
        }
    }
    by_layer.into_iter().find_map(|(l, k)| {
        let (q, kv) = (k.contains("q_proj"), k.contains("k_proj") || k.contains("v_proj"));
        if q && !k.contains("v_proj") {
            Some((l, "q_proj factors but no v_proj: stacking into qkv_proj raises a KeyError (sgl-project/sglang#25913)"))
        } else if kv && !q {
            Some((l, "k_proj / v_proj factors without q_proj: stacking is keyed on q_proj, so they stay unstacked and match no module (\"Cannot find target module name\", inferred)"))
        } else {
            None
        }
    })
}
