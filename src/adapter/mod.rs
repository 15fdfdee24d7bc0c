//! PEFT LoRA adapters: key names, `adapter_config.json`, and an atomic, streaming writer.

pub mod gguf;
pub mod read;
mod targets;
pub mod writer;

use std::collections::BTreeMap;

use serde::Serialize;

pub use writer::AdapterWriter;

pub use crate::names::{
    ADDED_TOKENS_FILE, CONFIG_FILE, INDEX_FILE, MODEL_FILE, REPORT_FILE, TOKENIZER_FILES,
};

/// PEFT's rule for which modules a config wraps (target_modules, exclude_modules,
/// modules_to_save, layers_to_transform, layers_pattern), for a reader that does not open the
/// factors (`check`). Configs PEFT refuses are refused with its reason.
pub struct ConfigTargets(targets::Targets);

impl ConfigTargets {
    pub fn from_config(text: &str, path: &std::path::Path) -> crate::error::Result<ConfigTargets> {
        #[derive(serde::Deserialize)]
        struct Raw {
            #[serde(flatten)]
            targets: targets::RawTargets,
            #[serde(default)]
            target_parameters: Option<Vec<String>>,
        }
        let raw: Raw = serde_json::from_str(text).map_err(|e| {
            crate::error::Error::checkpoint(path, format!("not a valid adapter config: {e}"))
        })?;
        let has_parameters = raw.target_parameters.is_some_and(|p| !p.is_empty());
        targets::Targets::new(raw.targets, has_parameters, path).map(ConfigTargets)
    }

    /// PEFT wraps `module` (a path without `base_model.model.`).
    pub fn wraps(&self, module: &str, embedding: bool) -> bool {
        self.0.wraps(module, embedding)
    }
}

/// Shard `index` (from 1) of `count`: `adapter_model-00001-of-00003.safetensors`.
pub fn shard_file(index: usize, count: usize) -> String {
    format!("adapter_model-{index:05}-of-{count:05}.safetensors")
}

/// The adapter's weights under any layout: the single file, the index, or a shard.
pub fn is_weights_file(name: &str) -> bool {
    if name == MODEL_FILE || name == INDEX_FILE {
        return true;
    }
    let Some(rest) = name
        .strip_prefix("adapter_model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    matches!(rest.split_once("-of-"), Some((i, n)) if digits(i) && digits(n))
}

/// PEFT prefixes every key with the wrapper's path.
pub const KEY_PREFIX: &str = "base_model.model.";

pub fn lora_a_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_A.weight")
}
pub fn lora_b_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_B.weight")
}
pub fn embedding_a_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_embedding_A")
}
pub fn embedding_b_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_embedding_B")
}
/// PEFT's `lora_bias`: the bias of lora_B, added to the layer's output.
pub fn lora_b_bias_key(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_B.bias")
}
/// A module saved whole keeps its plain parameter path.
pub fn whole_key(param: &str) -> String {
    format!("{KEY_PREFIX}{param}")
}

/// `target_modules` is a list of module-name suffixes, or a regex (Python `re.fullmatch`)
/// when a suffix would also match modules the adapter holds no factors for.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

/// The fields of PEFT's LoraConfig that phlora sets; all of them are known to PEFT, so
/// loading warns about nothing.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterConfig {
    pub peft_type: &'static str,
    pub task_type: Option<String>,
    pub base_model_name_or_path: String,
    pub revision: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    /// Fused 3-D expert parameters (PEFT ≥ 0.17 `target_parameters`), by full path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_parameters: Option<Vec<String>>,
    pub modules_to_save: Option<Vec<String>>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub bias: &'static str,
    pub fan_in_fan_out: bool,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// lora_B carries a bias (`--lora-bias`).
    pub lora_bias: bool,
    pub init_lora_weights: bool,
    pub inference_mode: bool,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<String>,
}

impl AdapterConfig {
    pub fn new(
        base_model_name_or_path: String,
        task_type: Option<String>,
        r: usize,
        target_modules: TargetModules,
        modules_to_save: Option<Vec<String>>,
    ) -> Self {
        AdapterConfig {
            peft_type: "LORA",
            task_type,
            base_model_name_or_path,
            revision: None,
            r,
            // scaling = lora_alpha / r = 1: the factors carry ΔW as it is.
            lora_alpha: r as f64,
            lora_dropout: 0.0,
            target_modules,
            target_parameters: None,
            modules_to_save,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            bias: "none",
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            lora_bias: false,
            init_lora_weights: true,
            inference_mode: true,
            layers_to_transform: None,
            layers_pattern: None,
        }
    }
}

/// Chooses `target_modules`: the sorted last segments of the written modules when every
/// module with such a name has factors; otherwise an anchored alternation of exact paths.
pub fn target_modules(
    written: &[String],
    all_with_same_last: impl Fn(&str) -> Vec<String>,
) -> TargetModules {
    let mut names: Vec<String> = written
        .iter()
        .map(|m| crate::names::last_segment(m).to_string())
        .collect();
    names.sort();
    names.dedup();
    let complete = names.iter().all(|n| {
        all_with_same_last(n)
            .iter()
            .all(|path| written.iter().any(|w| w == path))
    });
    if complete {
        TargetModules::Names(names)
    } else {
        let mut paths = written.to_vec();
        paths.sort();
        let alternation: Vec<String> = paths.iter().map(|p| regex_escape(p)).collect();
        TargetModules::Regex(format!("^(?:{})$", alternation.join("|")))
    }
}

/// Escapes a module path for Python's `re`.
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !(c.is_ascii_alphanumeric() || c == '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The config's `modules_to_save`, longest names first: PEFT rewrites loaded keys by the
/// first listed name found in them, and `norm` is a substring of `input_layernorm`.
pub fn modules_to_save(mut names: Vec<String>) -> Vec<String> {
    names.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_peft() {
        assert_eq!(
            lora_a_key("model.layers.0.self_attn.q_proj"),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            embedding_b_key("model.embed_tokens"),
            "base_model.model.model.embed_tokens.lora_embedding_B"
        );
        assert_eq!(
            whole_key("model.norm.weight"),
            "base_model.model.model.norm.weight"
        );
    }

    #[test]
    fn weights_files_are_told_by_name() {
        assert_eq!(
            shard_file(2, 13),
            "adapter_model-00002-of-00013.safetensors"
        );
        for yes in [MODEL_FILE, INDEX_FILE, &shard_file(1, 1)] {
            assert!(is_weights_file(yes), "{yes}");
        }
        for no in [
            "adapter_config.json",
            "adapter_model-1-of-2.safetensors",
            "adapter_model-00001-of-00002.safetensors.tmp",
            "adapter_model-0000a-of-00002.safetensors",
            "model.safetensors",
        ] {
            assert!(!is_weights_file(no), "{no}");
        }
    }

    #[test]
    fn target_modules_fall_back_to_a_regex_when_a_module_is_missing() {
        let all = |n: &str| vec![format!("l.0.{n}"), format!("l.1.{n}")];
        let written = vec!["l.0.q".to_string(), "l.1.q".to_string()];
        assert_eq!(
            target_modules(&written, all),
            TargetModules::Names(vec!["q".into()])
        );
        let partial = vec!["l.0.q".to_string()];
        assert_eq!(
            target_modules(&partial, all),
            TargetModules::Regex("^(?:l\\.0\\.q)$".into())
        );
    }

    #[test]
    fn modules_to_save_puts_longer_names_first() {
        let m = modules_to_save(vec![
            "norm".into(),
            "input_layernorm".into(),
            "post_attention_layernorm".into(),
        ]);
        assert_eq!(
            m,
            vec!["post_attention_layernorm", "input_layernorm", "norm"]
        );
    }
}
