//! LoRAX's rules: `load_module_map`, `LoraWeights.load` (rank padding), the punica kernels'
//! rank tables, and the modules each model declares. LoRAX reads the config through PEFT
//! 0.4.0, which drops every field it does not know (use_rslora, use_dora, rank_pattern, …).

use std::collections::{BTreeMap, BTreeSet};

use super::inventory::{Experts, Inventory};
use super::{kinds, some, Finding, Severity::*, PROJECTIONS};

pub const SOURCES: &str = "LoRAX (predibase/lorax, newest stored: server/lorax_server/adapters/lora.py, utils/adapter.py @1e223be1, utils/punica.py @095e892e, punica_kernels bgmv_config.h @a1230a58 / sgmv_config.h @538fcfd5, models/flash_llama.py @07725237; poetry.lock pins peft 0.4.0)";

/// The modules LoRAX applies LoRA to on Llama-family models (flash_llama.py ADAPTER_LAYERS).
fn declared(kind: &str) -> bool {
    PROJECTIONS.contains(&kind) || kind == "lm_head"
}

/// `pad_rank` on one GPU: at least 8, else up to a multiple of 16.
fn padded(r: usize) -> usize {
    if r <= 8 {
        8
    } else {
        r.div_ceil(16).saturating_mul(16)
    }
}

/// The rank to extract at for LoRAX: a multiple of 16 (no padding, so no rescaling) with a
/// kernel instance (not 48, 80 or 112).
pub(super) fn served_rank(r: usize) -> usize {
    match padded(r.max(16)) {
        48 => 64,
        80 | 112 => 128,
        p => p,
    }
}

pub fn check(a: &Inventory) -> Vec<Finding> {
    let mut out = ranks(a);
    out.extend(ignored(a));
    out
}

fn ranks(a: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut by_kind: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    for m in a.factored().filter(|m| declared(m.kind())) {
        if let Some(r) = m.rank() {
            by_kind.entry(m.kind()).or_default().insert(padded(r));
        }
    }
    if let Some((k, p)) = by_kind.iter().find(|(_, p)| p.len() > 1) {
        out.push(Finding::new(Refused, "lorax.ranks", format!("{k} modules pad to different ranks {p:?}: stacking them fails at load (phlora: one rank, --target portable)")));
    }
    let all: BTreeSet<usize> = a.ranks();
    let no_kernel: Vec<String> = all
        .iter()
        .filter(|&&r| matches!(padded(r), 48 | 80 | 112))
        .map(|r| format!("{r} → {}", padded(*r)))
        .collect();
    if !no_kernel.is_empty() {
        out.push(Finding::new(Refused, "lorax.kernel", format!("ranks padded to sizes the SGMV kernels have no instance for ({}): \"No suitable kernel.\" on the first request (phlora: --rank 32, 64 or 128)", no_kernel.join(", "))));
    }
    let rescaled: Vec<String> = all
        .iter()
        .filter(|&&r| padded(r) != r && !matches!(padded(r), 48 | 80 | 112))
        .map(|r| format!("{r} → {}", padded(*r)))
        .collect();
    if !rescaled.is_empty() {
        out.push(Finding::new(Differs, "lorax.padding", format!("ranks padded ({}): LoRAX then scales later module types by alpha/padded instead of alpha/r (LoraWeights.load overwrites the shared config's r; phlora: a multiple of 16, e.g. --rank 64)", rescaled.join(", "))));
    }
    if let Some(r) = all.iter().find(|&&r| padded(r) == 96) {
        out.push(Finding::new(Note, "lorax.decode_96", format!("rank {r} runs at 96, for which the stored BGMV (decode) kernels have no instance; PR #630 may have added it (unconfirmed)")));
    }
    if let Some(r) = all.iter().find(|&&r| r > 128) {
        out.push(Finding::new(
            Note,
            "lorax.slow",
            format!(
                "rank {r} > 128: served by the plain PyTorch loop, not the punica kernels (slower)"
            ),
        ));
    }
    let c = &a.config;
    if !c.rank_overrides().is_empty() || !c.alpha_overrides().is_empty() {
        out.push(Finding::new(Differs, "lorax.patterns", "rank_pattern / alpha_pattern are dropped (PEFT 0.4.0): every module is scaled by the global lora_alpha/r (phlora: --target portable)"));
    }
    let r = c.r.unwrap_or(8);
    let off: Vec<String> = a
        .factored()
        .filter_map(|m| {
            m.rank()
                .filter(|&k| k as i64 != r && c.rank_overrides().is_empty())
                .map(|k| format!("{} (rank {k})", m.path))
        })
        .collect();
    if !off.is_empty() {
        out.push(Finding::new(Differs, "lorax.config_rank", format!("{} modules' factors are not of rank r = {r}, which LoRAX scales every module by (lora_alpha/r; PEFT 0.4.0's default r is 8)", some(&off))));
    }
    if c.use_rslora {
        out.push(Finding::new(
            Differs,
            "lorax.rslora",
            "use_rslora is dropped (PEFT 0.4.0): scaled by alpha/r, not alpha/√r",
        ));
    }
    out
}

/// What LoRAX skips without a word (its loader matches keys to the model's declared modules).
fn ignored(a: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    let (mut differing, mut leaving_out) = (Vec::new(), Vec::new());
    let mut differs = |rule, msg: String| differing.push(Finding::new(Differs, rule, msg));
    if a.has_embedding_lora() {
        differs(
            "lorax.embeddings",
            "lora_embedding_A/B (embed_tokens LoRA) is ignored (phlora: --no-embeddings)".into(),
        );
    }
    if !a.whole.is_empty() {
        differs(
            "lorax.modules_to_save",
            format!(
                "{} tensors saved whole (modules_to_save) are ignored (phlora: --target portable)",
                some(&a.whole)
            ),
        );
    }
    if a.config.use_dora || a.modules.iter().any(|m| m.magnitude) {
        differs(
            "lorax.dora",
            "DoRA's magnitudes are ignored: served as a plain LoRA".into(),
        );
    }
    if a.config.lora_bias || a.modules.iter().any(|m| m.bias) {
        differs(
            "lorax.lora_bias",
            "lora_B.bias keys are ignored (phlora: drop --lora-bias)".into(),
        );
    }
    if a.factored().any(|m| m.experts != Experts::None) {
        leaving_out.push(Finding::new(Differs, "lorax.experts", "MoE expert LoRA is ignored (not implemented for block-sparse MoE; phlora: --exclude '*.experts.*' writes an adapter without them)").excluding(["*.experts.*".to_string()]));
    }
    let other: Vec<String> = kinds(a, false)
        .into_iter()
        .filter(|k| !declared(k) && k != "embed_tokens")
        .collect();
    if !other.is_empty() {
        let globs: Vec<String> = other.iter().map(|k| format!("*.{k}.*")).collect();
        leaving_out.push(Finding::new(Differs, "lorax.modules", format!("modules outside LoRAX's Llama-family set (q/k/v/o/gate/up/down_proj, lm_head) are ignored: {} (phlora: --exclude {})", other.join(", "), globs.join(" --exclude "))).excluding(globs));
    }
    if a.unprefixed > 0 {
        differs(
            "lorax.prefix",
            format!(
                "{} keys without `base_model.model.` are ignored",
                a.unprefixed
            ),
        );
    }
    if let Some(k) = partial_kind(a) {
        differs(
            "lorax.partial",
            format!(
                "{k} has factors in only some layers: LoRAX drops that module type in every layer"
            ),
        );
    }
    if let Some(n) = a.new_tokens().filter(|&n| n > 0) {
        differs(
            "lorax.added_tokens",
            format!("{n} added tokens: no vocabulary resize, their ids embed to zero"),
        );
    }
    out.extend(differing);
    out.extend(leaving_out);
    out
}

/// A module kind present in fewer layers than the adapter has.
fn partial_kind(a: &Inventory) -> Option<String> {
    let mut layers: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    let mut all = BTreeSet::new();
    for m in a.factored().filter(|m| m.experts == Experts::None) {
        if let Some(l) = m.layer() {
            layers.entry(m.kind()).or_default().insert(l);
            all.insert(l);
        }
    }
    layers
        .into_iter()
        .find(|(_, l)| l.len() < all.len())
        .map(|(k, _)| k.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_follows_pad_rank_and_served_ranks_need_none() {
        assert_eq!(
            [1, 7, 8, 9, 16, 17, 40, 100].map(padded),
            [8, 8, 8, 16, 16, 32, 48, 112]
        );
        for r in 1..=600 {
            let s = served_rank(r);
            assert!(s >= r && s % 16 == 0 && padded(s) == s, "{r} → {s}");
            assert!(!matches!(s, 48 | 80 | 112), "{r} → {s}");
        }
    }
}
