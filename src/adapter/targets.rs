//! Which modules of an adapter PEFT wraps with a LoRA layer, from its config: the rules of
//! PEFT 0.21's `check_target_module_exists` (peft/tuners/tuners_utils.py). PEFT builds the
//! LoRA layers from the config, not from the file, and drops the file's keys for any other
//! module without a word; merge_and_unload never applies them. verify and merge do the same.
//!
//! In order: `exclude_modules` (a regex, fullmatch; or names, exact or a `.`-suffix) and the
//! modules named in `modules_to_save` are not wrapped; `target_modules` as a string is a regex
//! (fullmatch), `"all-linear"` every linear layer but the output one, a list names modules
//! exactly or by `.`-suffix; only a suffix match is then filtered by `layers_to_transform`,
//! the layer index read with `layers_pattern` (PEFT 0.21's regexes). Target parameters are
//! matched by their own rule (adapter::read) and none of these apply to them.

use std::path::Path;

use regex::Regex;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The config's fields that say which modules are wrapped, as written.
#[derive(Deserialize, Default)]
pub(crate) struct RawTargets {
    #[serde(default)]
    target_modules: Option<OneOrMany<String>>,
    #[serde(default)]
    exclude_modules: Option<OneOrMany<String>>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    layers_to_transform: Option<OneOrMany<usize>>,
    #[serde(default)]
    layers_pattern: Option<OneOrMany<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

/// A module-name rule: a regex (Python's re.fullmatch), or names matched exactly or as a
/// `.`-suffix.
enum Rule {
    Regex(Regex),
    Names(Vec<String>),
    /// `target_modules: "all-linear"`.
    AllLinear,
}

impl Rule {
    fn parse(raw: OneOrMany<String>, config: &Path, field: &str) -> Result<Rule> {
        match raw {
            OneOrMany::One(s)
                if field == "target_modules" && s.eq_ignore_ascii_case("all-linear") =>
            {
                Ok(Rule::AllLinear)
            }
            OneOrMany::One(s) => Ok(Rule::Regex(compile(
                &format!("^(?:{s})$"),
                &s,
                config,
                field,
            )?)),
            OneOrMany::Many(names) => Ok(Rule::Names(names)),
        }
    }

    /// Matched by a name exactly (Some(true)), by suffix (Some(false)), or not at all.
    fn names_match(names: &[String], key: &str) -> Option<bool> {
        if names.iter().any(|n| n == key) {
            Some(true)
        } else if names.iter().any(|n| key.ends_with(&format!(".{n}"))) {
            Some(false)
        } else {
            None
        }
    }
}

/// A regex of the config (`shown` as written), or an error naming the file and the field.
pub(super) fn compile(pattern: &str, shown: &str, config: &Path, field: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| {
        // The last line of regex's message says what is wrong (the others draw the pattern).
        let why = e.to_string();
        let why = why
            .lines()
            .last()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_string();
        Error::checkpoint(
            config,
            format!("{field} `{shown}` is not a regex phlora can read: {why}"),
        )
    })
}

/// Which modules PEFT wraps.
pub(crate) struct Targets {
    target: Option<Rule>,
    exclude: Option<Rule>,
    saved: Vec<Regex>,
    layers: Option<Vec<usize>>,
    /// Regexes whose first group is the layer index, tried in order.
    layer_index: Vec<Regex>,
    /// No target_modules but target_parameters: no module is wrapped as a module.
    parameters_only: bool,
}

impl Targets {
    pub(crate) fn new(raw: RawTargets, has_parameters: bool, config: &Path) -> Result<Targets> {
        let bad = |m: &str| Err(Error::checkpoint(config, m.to_string()));
        let regex_target = matches!(&raw.target_modules, Some(OneOrMany::One(s)) if !s.eq_ignore_ascii_case("all-linear"));
        // PEFT's LoraConfig refuses these combinations.
        if regex_target && raw.layers_to_transform.is_some() {
            return bad("`layers_to_transform` cannot be used when `target_modules` is a str (PEFT refuses this config)");
        }
        if raw.layers_pattern.is_some() && raw.layers_to_transform.is_none() {
            return bad(
                "`layers_pattern` is set without `layers_to_transform` (PEFT refuses this config)",
            );
        }
        let layers = raw.layers_to_transform.map(|l| match l {
            OneOrMany::One(i) => vec![i],
            OneOrMany::Many(v) => v,
        });
        let patterns = match raw.layers_pattern {
            None => Vec::new(),
            Some(OneOrMany::One(p)) => vec![p],
            Some(OneOrMany::Many(v)) => v,
        };
        let layer_index = if patterns.iter().all(String::is_empty) {
            vec![compile(
                r"^.*?\.[^.]*\.(\d+)\.",
                "",
                config,
                "layers_to_transform",
            )?]
        } else {
            patterns
                .iter()
                .map(|p| {
                    compile(
                        &format!(r"^(?:^|.*?\.)(?:{p})\.(\d+)\."),
                        p,
                        config,
                        "layers_pattern",
                    )
                })
                .collect::<Result<_>>()?
        };
        let saved = raw
            .modules_to_save
            .unwrap_or_default()
            .iter()
            .map(|m| {
                compile(
                    &format!(r"^(?:.*\.)?(?:{m})(?:$|\.)"),
                    m,
                    config,
                    "modules_to_save",
                )
            })
            .collect::<Result<_>>()?;
        Ok(Targets {
            parameters_only: raw.target_modules.is_none() && has_parameters,
            target: raw
                .target_modules
                .map(|t| Rule::parse(t, config, "target_modules"))
                .transpose()?,
            exclude: raw
                .exclude_modules
                .map(|t| Rule::parse(t, config, "exclude_modules"))
                .transpose()?,
            saved,
            layers: layers.filter(|l| !l.is_empty()),
            layer_index,
        })
    }

    /// PEFT wraps module `key` (a path without `base_model.model.`; `embedding`: it has
    /// lora_embedding factors). Without target_modules (PEFT would take the model type's
    /// defaults, which an adapter file does not say), every module is taken as wrapped.
    pub(crate) fn wraps(&self, key: &str, embedding: bool) -> bool {
        let excluded = match &self.exclude {
            Some(Rule::Regex(re)) => re.is_match(key),
            Some(Rule::Names(names)) => Rule::names_match(names, key).is_some(),
            Some(Rule::AllLinear) | None => false,
        };
        if excluded || self.saved.iter().any(|re| re.is_match(key)) {
            return false;
        }
        match &self.target {
            None => !self.parameters_only,
            Some(Rule::Regex(re)) => re.is_match(key),
            // Every nn.Linear/Conv1D but the output layer.
            Some(Rule::AllLinear) => !embedding && crate::names::last_segment(key) != "lm_head",
            Some(Rule::Names(names)) => match Rule::names_match(names, key) {
                None => false,
                Some(true) => true,
                Some(false) => self.in_layers(key),
            },
        }
    }

    fn in_layers(&self, key: &str) -> bool {
        let Some(layers) = &self.layers else {
            return true;
        };
        let index = self
            .layer_index
            .iter()
            .find_map(|re| re.captures(key))
            .and_then(|c| c[1].parse::<usize>().ok());
        index.is_some_and(|i| layers.contains(&i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(json: &str) -> Result<Targets> {
        let raw: RawTargets = serde_json::from_str(json).unwrap();
        Targets::new(raw, false, Path::new("cfg"))
    }

    #[test]
    fn names_match_exactly_or_by_suffix_and_layers_filter_suffix_matches() {
        let t = targets(r#"{"target_modules": ["q_proj", "model.layers.3.mlp.up_proj"], "layers_to_transform": [0, 2]}"#).unwrap();
        assert!(t.wraps("model.layers.0.self_attn.q_proj", false));
        assert!(!t.wraps("model.layers.1.self_attn.q_proj", false));
        assert!(t.wraps("model.layers.2.self_attn.q_proj", false));
        assert!(!t.wraps("model.layers.0.self_attn.xq_proj", false));
        // An exact name is not filtered by layer (PEFT's branch order).
        assert!(t.wraps("model.layers.3.mlp.up_proj", false));
        assert!(!t.wraps("model.layers.0.mlp.up_proj", false));
        // PEFT 0.21 reads the first `X.N.` (not an expert's index).
        let t = targets(r#"{"target_modules": ["down_proj"], "layers_to_transform": 1}"#).unwrap();
        assert!(t.wraps("model.layers.1.mlp.experts.0.down_proj", false));
        // No index to read: not wrapped.
        assert!(!t.wraps("lm_head.down_proj", false));
    }

    #[test]
    fn layers_pattern_names_the_layer_list() {
        let t = targets(r#"{"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}"#).unwrap();
        assert!(t.wraps("layers.0.self_attn.q_proj", false));
        assert!(t.wraps("model.layers.0.attn.q_proj", false));
        assert!(!t.wraps("model.blocks.0.attn.q_proj", false));
        let t = targets(r#"{"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ["h", "blocks"]}"#).unwrap();
        assert!(t.wraps("transformer.blocks.1.q_proj", false));
        assert!(!t.wraps("transformer.blocks.0.q_proj", false));
    }

    #[test]
    fn regexes_excludes_and_saved_modules() {
        let t = targets(r#"{"target_modules": ".*\\.(q|v)_proj", "exclude_modules": ["model.layers.1.self_attn.q_proj"], "modules_to_save": ["lm_head"]}"#).unwrap();
        assert!(t.wraps("model.layers.0.self_attn.q_proj", false));
        assert!(!t.wraps("model.layers.1.self_attn.q_proj", false));
        assert!(t.wraps("model.layers.1.self_attn.v_proj", false));
        assert!(!t.wraps("model.layers.1.self_attn.k_proj", false));
        // fullmatch: a prefix is not enough.
        assert!(!t.wraps("model.layers.1.self_attn.v_proj.base", false));
        let t = targets(r#"{"target_modules": "all-linear", "modules_to_save": ["embed_tokens"]}"#)
            .unwrap();
        assert!(t.wraps("model.layers.0.mlp.up_proj", false));
        assert!(!t.wraps("lm_head", false));
        assert!(!t.wraps("model.embed_tokens", true));
        let t = targets(r#"{"exclude_modules": ".*mlp.*"}"#).unwrap();
        assert!(!t.wraps("model.layers.0.mlp.up_proj", false));
        assert!(t.wraps("model.layers.0.self_attn.q_proj", false));
    }

    #[test]
    fn configs_peft_refuses_are_refused_by_name() {
        for bad in [
            r#"{"target_modules": "(", "r": 1}"#,
            r#"{"target_modules": ".*q_proj", "layers_to_transform": [0]}"#,
            r#"{"target_modules": ["q_proj"], "layers_pattern": "layers"}"#,
            r#"{"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "("}"#,
        ] {
            let e = targets(bad).err().expect(bad).to_string();
            assert!(e.starts_with("cfg: "), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
    }
}
