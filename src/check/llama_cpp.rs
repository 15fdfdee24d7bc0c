//! llama.cpp's rules: `convert_lora_to_gguf.py` (which tensors it converts and which config
//! fields it reads) and `llama_adapter_lora_init` (how the GGUF adapter is applied: one
//! global alpha, scale alpha / rank per tensor).

use std::collections::{BTreeMap, BTreeSet};

use super::inventory::{Experts, Inventory};
use super::{some, Finding, Severity::*};

pub const SOURCES: &str = "llama.cpp (ggml-org/llama.cpp): convert_lora_to_gguf.py @0b03adaa, src/llama-adapter.cpp @0650ea8c, src/llama-adapter.h @215841fc";

pub fn check(a: &Inventory) -> Vec<Finding> {
    let mut out = converter(a);
    out.extend(scale(a));
    // (On a base whose architecture phlora's converter does not know, it has nothing to offer.)
    let convertible = a.base.as_ref().map_or(true, |b| {
        crate::gguf::llama_cpp::SUPPORTED
            .iter()
            .any(|c| b.architectures.contains(&c.to_ascii_lowercase()))
    });
    out.extend(convertible.then(|| Finding::new(
        Note,
        "llama.cpp.phlora_convert",
        "these rules are llama.cpp's convert_lora_to_gguf.py's: `phlora convert ADAPTER --to gguf --base BASE` (or extract --target llama.cpp) writes the GGUF itself, every module at its exact scale (rank_pattern, alpha_pattern, rsLoRA), and leaves out what llama.cpp cannot apply (norms, tensors saved whole, biases, an embedding or head tied to token_embd) with its share of ‖ΔW‖²",
    )));
    out
}

/// What convert_lora_to_gguf.py stops on.
fn converter(a: &Inventory) -> Vec<Finding> {
    let c = &a.config;
    let mut out = Vec::new();
    let mut refusals = Vec::new();
    let mut refuse = |rule, msg: String| refusals.push(Finding::new(Refused, rule, msg));
    if c.lora_alpha.is_none() {
        refuse(
            "llama.cpp.alpha",
            "no lora_alpha: the converter raises KeyError('lora_alpha')".into(),
        );
    }
    if a.sharded {
        refuse("llama.cpp.sharded", "sharded weights: the converter reads only adapter_model.safetensors (phlora: no --max-shard-size)".into());
    }
    let mut unexpected: Vec<String> = a.whole.iter().filter(|w| !is_norm(w)).cloned().collect();
    unexpected.extend(a.bias_and_magnitude_keys());
    unexpected.extend(
        a.other
            .iter()
            .filter(|k| !k.ends_with(".base_layer.weight"))
            .cloned(),
    );
    if !unexpected.is_empty() {
        refuse("llama.cpp.keys", format!("{} tensors are not lora_A/lora_B: \"Unexpected name …: Not a lora_A or lora_B tensor\" (embeddings or heads saved whole, biases, DoRA; phlora: drop --lora-bias, and --added-tokens needs a resized base)", some(&unexpected)));
    }
    if let Some(f) = super::fused_experts(
        a,
        "llama.cpp.fused_experts",
        "\"Can not map tensor\"; the converter stacks per-expert factors itself",
    ) {
        out.push(f);
    }
    if let Some(layer) = incomplete_experts(a) {
        refuse("llama.cpp.experts", format!("{layer}: not every expert and projection has factors: \"Unprocessed experts\" (the converter stacks all of a layer's experts)"));
    }
    if a.config
        .base_model_name_or_path
        .as_deref()
        .map_or(true, str::is_empty)
    {
        out.push(Finding::new(
            Note,
            "llama.cpp.base",
            "no base_model_name_or_path: pass the base to the converter (--base)",
        ));
    }
    out.extend(refusals);
    out
}

/// Loads, but with another update than PEFT's.
fn scale(a: &Inventory) -> Vec<Finding> {
    let c = &a.config;
    let mut out = Vec::new();
    let mut differing = Vec::new();
    let mut differs = |rule, msg: String| differing.push(Finding::new(Differs, rule, msg));
    let norms: Vec<&String> = a.whole.iter().filter(|w| is_norm(w)).collect();
    if !norms.is_empty() {
        differs(
            "llama.cpp.norms",
            format!(
                "{} norms saved whole pass the converter but are not applied (phlora: --no-norms)",
                some(&norms)
            ),
        );
    }
    let alphas = c.alpha_overrides();
    if !alphas.is_empty() {
        differs("llama.cpp.alpha_pattern", format!("alpha_pattern for {} modules: a GGUF adapter has one alpha, so they are scaled by lora_alpha/rank instead (phlora: one fixed --rank writes no patterns)", alphas.len()));
    }
    if c.use_rslora {
        differs("llama.cpp.rslora", "use_rslora: llama.cpp scales by alpha/r, not alpha/√r: the update is √r times too small".into());
    }
    if c.lora_alpha == Some(0.0) {
        differs(
            "llama.cpp.alpha_zero",
            "lora_alpha = 0: llama.cpp then applies B·A unscaled, where PEFT's update is zero"
                .into(),
        );
    }
    match &a.base {
        _ if !a.has_lm_head_lora() => {}
        Some(b) if b.is(&["gemma*"], &[]) => out.push(Finding::new(Refused, "llama.cpp.lm_head", format!("lm_head LoRA on {} (the Gemma family): its converter drops the output weight: \"lm_head is present in adapter, but is ignored in base model\" (phlora: --exclude 'lm_head*')", b.name())).excluding(["lm_head*".to_string()])),
        Some(b) if b.tied => out.push(Finding::new(Refused, "llama.cpp.lm_head", format!("lm_head LoRA on {}, whose embeddings are tied: llama.cpp's output layer is token_embd, so the adapter's output tensor is refused (measured with llama-cpp-python 0.3.36, issue 20; phlora: --exclude 'lm_head*')", b.name())).excluding(["lm_head*".to_string()])),
        Some(_) => {}
        None => out.push(Finding::new(Note, "llama.cpp.lm_head", "lm_head LoRA: refused on bases whose GGUF has no separate output weight (Gemma family, tied embeddings: \"lm_head is present in adapter, but is ignored in base model\"); check with --base")),
    }
    if let Some(b) = a.base.as_ref().filter(|b| b.tied && a.has_embedding_lora()) {
        out.push(Finding::new(Refused, "llama.cpp.tied_embeddings", format!("embedding LoRA on {}, whose embeddings are tied: it loads, and the first decode aborts on a GGML assertion (its factors meet the output matmul; measured with llama-cpp-python 0.3.36, issue 20; phlora: --no-embeddings)", b.name())));
    }
    out.extend(differing);
    out
}

fn is_norm(param: &str) -> bool {
    param.contains("_layernorm")
        || param.contains(".norm")
        || crate::names::is_norm_module(crate::names::module_of(param))
}

/// A layer whose per-expert factors leave some expert × projection out.
fn incomplete_experts(a: &Inventory) -> Option<String> {
    let mut groups: BTreeMap<&str, (BTreeSet<usize>, BTreeSet<&str>, usize)> = BTreeMap::new();
    for m in a.factored().filter(|m| m.experts == Experts::PerExpert) {
        let Some((experts, index, proj)) = crate::names::per_expert_module(&m.path) else {
            continue;
        };
        let g = groups.entry(experts).or_default();
        g.0.insert(index);
        g.1.insert(proj);
        g.2 += 1;
    }
    groups
        .into_iter()
        .find(|(_, (ids, projs, n))| {
            // Indices come from key names: no arithmetic on them can overflow.
            let count = ids.iter().max().map_or(0, |m| m.saturating_add(1));
            Some(*n) != count.checked_mul(projs.len()) || projs.len() < 3
        })
        .map(|(g, _)| g.to_string())
}
