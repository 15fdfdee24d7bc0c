//! How Hugging Face and PEFT name things: parameter paths and the module kinds read off them,
//! MoE expert naming, and the files of an adapter folder. A leaf: the planner, the adapter
//! reader and writer, and the exporters all read these names, and nothing here reads them.

/// The module path of a parameter name: everything before the last `.`.
pub fn module_of(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(m, _)| m)
}

pub fn last_segment(path: &str) -> &str {
    path.rsplit_once('.').map_or(path, |(_, l)| l)
}

/// The first path segment that is a number: the layer index.
pub fn layer_of(name: &str) -> Option<usize> {
    name.split('.').find_map(|p| p.parse().ok())
}

/// GPT-2's Conv1D layers (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) store [in, out].
pub fn is_conv1d_module(module: &str) -> bool {
    matches!(
        last_segment(module),
        "c_attn" | "c_proj" | "c_fc" | "q_attn"
    )
}

pub fn is_norm_module(module: &str) -> bool {
    let m = last_segment(module).to_ascii_lowercase();
    m.contains("norm") || m.starts_with("ln_") || m == "ln"
}

/// An MoE expert's module (`….experts.<N>.<rest>`): the regex every expert of the same module
/// matches (`….experts\.\d+\.<rest>`, escaped for PEFT's rank_pattern).
pub fn expert_group(module: &str) -> Option<String> {
    let parts: Vec<&str> = module.split('.').collect();
    let at = parts
        .windows(2)
        .position(|w| w[0] == "experts" && w[1].parse::<usize>().is_ok())?;
    let prefix = parts[..=at].join(".");
    let rest = parts[at + 2..].join(".");
    let mut re = format!(r"{}\.\d+", regex::escape(&prefix));
    if !rest.is_empty() {
        re.push_str(&format!(r"\.{}", regex::escape(&rest)));
    }
    Some(re)
}

/// The order transformers registers an experts module's parameters in (gate/up before down):
/// PEFT wraps targeted parameters of one module in that order, the first innermost.
pub fn registration_rank(param: &str) -> (u8, &str) {
    let rank = match param {
        "gate_up_proj" => 0,
        "gate_proj" | "w1" => 1,
        "up_proj" | "w3" => 2,
        "down_proj" | "w2" => 3,
        _ => 4,
    };
    (rank, param)
}

/// A per-expert weight `<experts>.<N>.<proj>.weight`: (experts module, N, proj).
pub fn per_expert_weight(name: &str) -> Option<(&str, usize, &str)> {
    per_expert_module(name.strip_suffix(".weight")?)
}

/// A per-expert module `<experts>.<N>.<proj>`: (experts module, N, proj).
pub fn per_expert_module(module: &str) -> Option<(&str, usize, &str)> {
    let (rest, proj) = module.rsplit_once('.')?;
    let (experts, index) = rest.rsplit_once('.')?;
    let index = index.parse().ok()?;
    (last_segment(experts) == "experts").then_some((experts, index, proj))
}

/// The fused parameter transformers v5 builds from per-expert `proj` weights, and the part
/// `proj` is of it (gate before up).
pub fn fused_target(proj: &str) -> Option<(&'static str, usize)> {
    match proj {
        "gate_proj" => Some(("gate_up_proj", 0)),
        "up_proj" => Some(("gate_up_proj", 1)),
        "down_proj" => Some(("down_proj", 0)),
        _ => None,
    }
}

pub const MODEL_FILE: &str = "adapter_model.safetensors";
/// A sharded adapter's index (`--max-shard-size`), in the Hugging Face layout: `weight_map`
/// names each key's shard, `metadata.total_size` the tensor bytes.
pub const INDEX_FILE: &str = "adapter_model.safetensors.index.json";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const REPORT_FILE: &str = "report.json";
/// The fine-tune's new vocabulary rows (`--added-tokens`), under the tensors' checkpoint names.
pub const ADDED_TOKENS_FILE: &str = "added_tokens.safetensors";
/// What a tokenizer is made of, across the tokenizer classes transformers saves (copied beside
/// an adapter with added tokens).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experts_of_one_module_share_a_pattern() {
        let g = expert_group("model.layers.0.block_sparse_moe.experts.3.w1").unwrap();
        assert_eq!(g, r"model\.layers\.0\.block_sparse_moe\.experts\.\d+\.w1");
        assert_eq!(
            expert_group("model.layers.2.mlp.experts.17.down_proj").unwrap(),
            r"model\.layers\.2\.mlp\.experts\.\d+\.down_proj"
        );
        assert_eq!(expert_group("model.layers.0.mlp.down_proj"), None);
        assert_eq!(
            expert_group("model.layers.0.mlp.experts.gate_up_proj"),
            None
        );
        // Read the way PEFT reads rank_pattern keys.
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{g})$")).unwrap();
        assert!(re.is_match("model.layers.0.block_sparse_moe.experts.12.w1"));
        assert!(!re.is_match("model.layers.0.block_sparse_moe.experts.1.w12"));
        assert!(!re.is_match("model.layers.10.block_sparse_moe.experts.1.w1"));
    }
}
