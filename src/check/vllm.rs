//! vLLM's rules: `PEFTHelper.validate_legal`, `parse_fine_tuned_lora_name` and the MoE /
//! embedding checks of `LoRAModel.from_local_checkpoint`.

use super::inventory::{Experts, Inventory};
use super::{some, Finding, Severity::*};
use crate::linalg::rank::PORTABLE_RANKS;

pub const SOURCES: &str = "vLLM 0.33.0 (sdist from PyPI; diffed with 0.26-0.32): vllm/lora/peft_helper.py, lora_model.py, utils.py parse_fine_tuned_lora_name, worker_manager.py, config/lora.py";

/// `init_lora_weights` strings vLLM takes (the others change the base weights on load).
const INITS: [&str; 5] = ["gaussian", "eva", "orthogonal", "mica", "lora_ga"];

pub fn check(a: &Inventory) -> Vec<Finding> {
    let mut out = config(a);
    out.extend(keys(a));
    out.extend(layout_notes(a));
    out
}

fn config(a: &Inventory) -> Vec<Finding> {
    let c = &a.config;
    let (mut out, mut notes) = (Vec::new(), Vec::new());
    let mut refusals = Vec::new();
    let mut refuse = |rule, msg: String| refusals.push(Finding::new(Refused, rule, msg));
    let missing = c.missing_required();
    if !missing.is_empty() {
        refuse(
            "vllm.required",
            format!("\"Missing required configuration fields: {missing:?}\""),
        );
    }
    if let Some((k, v)) = c.bad_rank_pattern() {
        refuse(
            "vllm.rank",
            format!(
                "\"LoRA rank for `{k}` in `rank_pattern` must be a positive integer, got {v}.\""
            ),
        );
    }
    if let Some(r) = c.r.filter(|&r| r <= 0) {
        refuse(
            "vllm.rank",
            format!("\"LoRA rank `r` must be a positive integer, got {r}.\""),
        );
    }
    if c.use_dora {
        refuse(
            "vllm.dora",
            "use_dora: \"vLLM does not yet support DoRA.\"".into(),
        );
    }
    if c.bias.as_deref().is_some_and(|b| b != "none") {
        refuse(
            "vllm.bias",
            format!(
                "bias = {:?}: \"Adapter bias is not supported.\"",
                c.bias.as_deref().unwrap_or_default()
            ),
        );
    }
    if c.lora_bias {
        refuse("vllm.lora_bias", "lora_bias: \"vLLM does not support LoRA bias (lora_bias).\" (phlora: drop --lora-bias)".into());
    }
    let saved: Vec<&String> = c
        .modules_to_save
        .iter()
        .flatten()
        .filter(|m| *m != "classifier" && *m != "score")
        .collect();
    if !saved.is_empty() {
        refuse("vllm.modules_to_save", format!("modules_to_save {saved:?}: vLLM takes only classifier/score there (phlora: --target vllm, or --no-norms --no-embeddings)"));
    }
    if let Some(init) = c.init_lora_weights.as_ref().and_then(|v| v.as_str()) {
        if !INITS.iter().any(|i| i.eq_ignore_ascii_case(init)) {
            refuse("vllm.init", format!("init_lora_weights = {init:?}: vLLM refuses inits that modify the base weights (PiSSA, OLoRA, CorDA, LoftQ)"));
        }
    }
    let set = |v: &Option<serde_json::Value>| {
        v.as_ref().is_some_and(|v| {
            !v.is_null() && v != &serde_json::json!([]) && v != &serde_json::json!(false)
        })
    };
    for (on, what) in [
        (set(&c.alora_invocation_tokens), "Activated LoRA (aLoRA)"),
        (set(&c.layer_replication), "layer_replication"),
        (set(&c.use_bdlora), "block-diagonal LoRA (BD-LoRA)"),
        (c.use_qalora, "QALoRA"),
    ] {
        if on {
            refuse(
                "vllm.unsupported_variant",
                format!("\"vLLM does not support {what}.\""),
            );
        }
    }
    let max = a
        .ranks()
        .into_iter()
        .max()
        .unwrap_or(0)
        .max(c.r.unwrap_or(0).max(0) as usize);
    let largest = PORTABLE_RANKS[PORTABLE_RANKS.len() - 1];
    match PORTABLE_RANKS.iter().find(|&&m| m >= max) {
        None => refuse("vllm.rank", format!("rank {max}: above vLLM's largest max_lora_rank ({largest}): \"LoRA rank {max} is greater than max_lora_rank\" (phlora: --rank or --max-rank ≤ {largest})")),
        Some(&m) if m > 16 => notes.push(Finding::new(Note, "vllm.max_lora_rank", format!("rank {max}: start vLLM with --max-lora-rank {m} or more (its default is 16)"))),
        _ => {}
    }
    if !c.rank_overrides().is_empty() || !c.alpha_overrides().is_empty() {
        notes.push(Finding::new(Note, "vllm.patterns", "rank_pattern / alpha_pattern: read per module since vLLM 0.32; older versions use one scaling for all (a wrong scale; phlora: --target vllm writes one rank)"));
    }
    if a.sharded {
        refuse("vllm.sharded", "the weights are sharded (an index): vLLM reads only adapter_model.safetensors (\"doesn't contain tensors\"; phlora: no --max-shard-size)".into());
    }
    out.extend(notes);
    out.extend(refusals);
    out
}

fn keys(a: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut bad = a.bias_and_magnitude_keys();
    bad.extend(
        a.other
            .iter()
            .filter(|k| {
                !k.ends_with("embed_tokens.base_layer.weight")
                    && !k.ends_with("lm_head.base_layer.weight")
            })
            .cloned(),
    );
    bad.extend(
        a.whole
            .iter()
            .filter(|w| !w.starts_with("score.") && !w.starts_with("classifier."))
            .cloned(),
    );
    if !bad.is_empty() {
        out.push(Finding::new(Refused, "vllm.keys", format!("{} keys vLLM cannot parse: \"… is unsupported LoRA weight\" (norms or embeddings saved whole, biases, DoRA magnitudes; phlora: --target vllm)", some(&bad))));
    }
    out
}

/// The `*ForCausalLM` architectures of vLLM 0.33.0's registry whose model class declares
/// embedding modules (embed_tokens / lm_head LoRA), its own or inherited, and those that
/// declare none: read from model_executor/models/*.py and registry.py (45 and 116 distinct names, lower-cased).
const EMBEDDING_MODULES: &[&str] = &[
    "apertusforcausallm",
    "cohere2forcausallm",
    "cohereforcausallm",
    "decilmforcausallm",
    "eagle3qwen3forcausallm",
    "eaglecohereforcausallm",
    "eagleminicpmforcausallm",
    "ernie4_5forcausallm",
    "exaone4forcausallm",
    "exaoneforcausallm",
    "exaonemoeforcausallm",
    "falconh1forcausallm",
    "graniteforcausallm",
    "granitemoeforcausallm",
    "granitemoehybridforcausallm",
    "granitemoeswaforcausallm",
    "granitemoesharedforcausallm",
    "graniteswaforcausallm",
    "hyperclovaxforcausallm",
    "iquestcoderforcausallm",
    "internlm3forcausallm",
    "jambaforcausallm",
    "k2horizonforcausallm",
    "llamaforcausallm",
    "lfm2forcausallm",
    "lfm2moeforcausallm",
    "llama4forcausallm",
    "minicpm3forcausallm",
    "minicpmforcausallm",
    "mixtralforcausallm",
    "nemotronforcausallm",
    "nemotronhforcausallm",
    "nemotronhpuzzleforcausallm",
    "param2moeforcausallm",
    "peagleqwen3forcausallm",
    "phi3forcausallm",
    "phimoeforcausallm",
    "qwen3forcausallm",
    "qwen3moeforcausallm",
    "qwen3_5forcausallm",
    "qwen3_5moeforcausallm",
    "solarforcausallm",
    "telechat2forcausallm",
    "telechat3forcausallm",
    "teleflmforcausallm",
];
const NO_EMBEDDING_MODULES: &[&str] = &[
    "axk1forcausallm",
    "afmoeforcausallm",
    "aliceaiforcausallm",
    "arceeforcausallm",
    "bailingmoeforcausallm",
    "bailingmoev2forcausallm",
    "bailingmoev2_5forcausallm",
    "bailingmoev3forcausallm",
    "bloomforcausallm",
    "cohere2moeforcausallm",
    "cwmforcausallm",
    "dflashlagunaforcausallm",
    "dbrxforcausallm",
    "deepseekforcausallm",
    "deepseekocr2forcausallm",
    "deepseekocrforcausallm",
    "deepseekv2forcausallm",
    "deepseekv3forcausallm",
    "deepseekvlv2forcausallm",
    "domynedgeforcausallm",
    "doryforcausallm",
    "dotsocrforcausallm",
    "eagle3deepseekv2forcausallm",
    "eagle3deepseekv3forcausallm",
    "eagle3llamaforcausallm",
    "eagle3minimaxm2forcausallm",
    "eagle3qwen2_5vlforcausallm",
    "eagle3qwen3vlforcausallm",
    "eaglellama4forcausallm",
    "eaglellamaforcausallm",
    "eaglemistralforcausallm",
    "eaglemistrallarge3forcausallm",
    "ernie4_5_moeforcausallm",
    "falconforcausallm",
    "falconmambaforcausallm",
    "flexolmoforcausallm",
    "glm4vforcausallm",
    "gptbigcodeforcausallm",
    "gptjforcausallm",
    "gptneoxforcausallm",
    "gemma2forcausallm",
    "gemma3forcausallm",
    "gemma3nforcausallm",
    "gemma4forcausallm",
    "gemmaforcausallm",
    "glm4forcausallm",
    "glm4moeforcausallm",
    "glm4moeliteforcausallm",
    "glmforcausallm",
    "gptossforcausallm",
    "hcxvisionv2forcausallm",
    "hyv3forcausallm",
    "hrmtextforcausallm",
    "hunyuandensev1forcausallm",
    "hunyuanmoev1forcausallm",
    "iquestloopcoderforcausallm",
    "internlm2forcausallm",
    "jais2forcausallm",
    "kolibri1forcausallm",
    "lagunaforcausallm",
    "longcatflashforcausallm",
    "longcatflashngramforcausallm",
    "mamba2forcausallm",
    "mambaforcausallm",
    "mellumforcausallm",
    "mimoforcausallm",
    "mimov2flashforcausallm",
    "mimov2forcausallm",
    "mimov2omniforcausallm",
    "minimaxm2forcausallm",
    "ministral3forcausallm",
    "mistralforcausallm",
    "mistrallarge3forcausallm",
    "molmoforcausallm",
    "moondream3forcausallm",
    "moonshotkimiaforcausallm",
    "museglimmerforcausallm",
    "nanbeigeforcausallm",
    "optforcausallm",
    "olmo2forcausallm",
    "olmo3forcausallm",
    "olmoforcausallm",
    "olmohybridforcausallm",
    "olmoeforcausallm",
    "orionforcausallm",
    "ovis2_6forcausallm",
    "ovis2_6_moeforcausallm",
    "panguembeddedforcausallm",
    "pangupromoev2forcausallm",
    "panguultramoeforcausallm",
    "peaglellamaforcausallm",
    "phi3vforcausallm",
    "phi4mmforcausallm",
    "phiforcausallm",
    "plamo3forcausallm",
    "qwen2forcausallm",
    "qwen2moeforcausallm",
    "qwen3nextforcausallm",
    "radiombartprefixforcausallm",
    "rnj1forcausallm",
    "sarvammlaforcausallm",
    "sarvammoeforcausallm",
    "seedossforcausallm",
    "smollm3forcausallm",
    "stablelmforcausallm",
    "starcoder2forcausallm",
    "step1forcausallm",
    "step3textforcausallm",
    "step3p5forcausallm",
    "transformersforcausallm",
    "transformersmoeforcausallm",
    "transformersmultimodalforcausallm",
    "transformersmultimodalmoeforcausallm",
    "unlimitedocrforcausallm",
    "vaultgemmaforcausallm",
    "zamba2forcausallm",
];
/// MoE model types vLLM wraps as fused 3-D experts (is_3d_moe_weight).
const FUSED_3D_MOE_ARCHS: &[&str] = &[
    "gptossforcausallm",
    "qwen3_5moeforcausallm",
    "qwen3vlmoe*",
    "qwen3omnimoe*",
    "interns1pro*",
];
const FUSED_3D_MOE: &[&str] = &[
    "gpt_oss",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_vl_moe",
    "qwen3_omni_moe",
    "interns1_pro",
];

/// What depends on the base model's architecture: decided with --base, noted without.
fn layout_notes(a: &Inventory) -> Vec<Finding> {
    let mut out = Vec::new();
    let embeddings = a.has_embedding_lora() || a.has_lm_head_lora();
    match &a.base {
        _ if !embeddings => {}
        None => out.push(Finding::new(Note, "vllm.embeddings", "embed_tokens / lm_head LoRA: loaded only for the architectures whose vLLM model declares embedding modules (45 of 161 causal-LM architectures in 0.33.0: Llama, Mixtral, Qwen3, Qwen3-MoE, Phi-3, Granite, …; not Qwen2, Qwen2-MoE, Gemma, Mistral, DeepSeek, gpt-oss), at the base's vocabulary size (check with --base; phlora: --no-embeddings --exclude 'lm_head*' for the others)")),
        Some(b) if b.is(NO_EMBEDDING_MODULES, &[]) => out.push(Finding::new(Refused, "vllm.embeddings", format!("embed_tokens / lm_head LoRA on {}, whose vLLM model declares no embedding modules: \"expected target modules in … but received …\" (phlora: --no-embeddings --exclude 'lm_head*')", b.name())).excluding(a.has_lm_head_lora().then(|| "lm_head*".to_string()))),
        Some(b) if b.is(EMBEDDING_MODULES, &[]) => {}
        Some(b) => out.push(Finding::new(Note, "vllm.embeddings", format!("embed_tokens / lm_head LoRA on {}: loaded only if its vLLM model declares embedding modules (phlora: --no-embeddings --exclude 'lm_head*' if it does not)", b.name()))),
    }
    if let Some(v) = a
        .base
        .as_ref()
        .and_then(|b| b.vocab_size)
        .filter(|&v| v > 258_048)
    {
        out.push(Finding::new(
            Refused,
            "vllm.vocab",
            format!("vocabulary of {v}: \"When using LoRA, vocab size must be <= 258048\""),
        ));
    }
    let per_expert = a.factored().any(|m| m.experts == Experts::PerExpert);
    let fused = a.factored().any(|m| m.experts == Experts::Fused);
    let fused_model = a.base.as_ref().map(|b| {
        b.is(FUSED_3D_MOE_ARCHS, FUSED_3D_MOE) || (!b.per_expert() && (per_expert || fused))
    });
    match (per_expert, fused, fused_model) {
        (true, true, _) => out.push(Finding::new(Refused, "vllm.experts", "per-expert and fused 3-D expert factors in one adapter: vLLM takes one layout per model")),
        (true, false, Some(true)) => out.push(Finding::new(Refused, "vllm.experts", "per-expert LoRA on a model vLLM wraps as fused 3-D experts: \"expected target modules … but received […experts.0…]\" (phlora: --fuse-experts)")),
        (false, true, Some(false)) => out.push(Finding::new(Refused, "vllm.experts", "fused 3-D expert LoRA (target_parameters) on a per-expert MoE model: refused unless --enable-mixed-moe-lora-format and is_3d_lora_weight on the request (phlora: leave out --fuse-experts)")),
        (true, false, None) => out.push(Finding::new(Note, "vllm.experts", "per-expert LoRA: loads on models whose MoE is per expert (Mixtral, Qwen3-MoE, DeepSeek); refused on fused 3-D models (gpt-oss, Qwen3.5); check with --base")),
        (false, true, None) => out.push(Finding::new(Note, "vllm.experts", "fused expert LoRA (target_parameters): loads on fused 3-D models (gpt-oss, Qwen3.5); refused on per-expert ones (Mixtral, Qwen3-MoE, DeepSeek) unless --enable-mixed-moe-lora-format; check with --base")),
        _ => {}
    }
    out
}
