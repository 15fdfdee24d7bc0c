//! What an adapter folder holds, read tolerantly: its config as written (any tool's, with
//! fields phlora never writes) and every tensor key by kind, with shapes. Nothing is refused
//! here but an unreadable folder: what each engine makes of it is the rules' business.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::adapter::read::{open_weights, targeted_parameter};
use crate::adapter::{ConfigTargets, ADDED_TOKENS_FILE, CONFIG_FILE, KEY_PREFIX};
use crate::checkpoint::input;
use crate::error::{Error, Result};

/// The adapter_config.json fields the engines read, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Config {
    pub peft_type: Option<String>,
    pub r: Option<i64>,
    pub lora_alpha: Option<f64>,
    pub target_modules: Option<Value>,
    pub rank_pattern: Option<BTreeMap<String, Value>>,
    pub alpha_pattern: Option<BTreeMap<String, Value>>,
    #[serde(deserialize_with = "null_is_false")]
    pub use_rslora: bool,
    #[serde(deserialize_with = "null_is_false")]
    pub use_dora: bool,
    pub bias: Option<String>,
    #[serde(deserialize_with = "null_is_false")]
    pub lora_bias: bool,
    pub modules_to_save: Option<Vec<String>>,
    pub target_parameters: Option<Vec<String>>,
    #[serde(deserialize_with = "null_is_false")]
    pub fan_in_fan_out: bool,
    pub layers_to_transform: Option<Value>,
    pub base_model_name_or_path: Option<String>,
    pub trainable_token_indices: Option<Value>,
    pub init_lora_weights: Option<Value>,
    pub layer_replication: Option<Value>,
    pub alora_invocation_tokens: Option<Value>,
    #[serde(deserialize_with = "null_is_false")]
    pub use_qalora: bool,
    pub use_bdlora: Option<Value>,
    /// rank_pattern compiled, in the file's order (PEFT takes the first match).
    #[serde(skip)]
    pub rank_rules: Vec<(regex::Regex, i64)>,
}

/// `null` where a flag is expected reads as false, as PEFT's dataclass takes it.
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

impl Config {
    /// `target_modules` as one string (a regex, or `all-linear`), when it is one.
    pub fn target_string(&self) -> Option<&str> {
        self.target_modules.as_ref().and_then(Value::as_str)
    }

    /// The rank the config gives `module`: the first rank_pattern entry, in file order, that
    /// matches by PEFT's rule (`(.*\.)?(key)$`), else `r` (PEFT's default 8).
    pub fn rank_for(&self, module: &str) -> i64 {
        self.rank_rules
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map_or(self.r.unwrap_or(8), |(_, r)| *r)
    }

    /// A rank_pattern entry that is not a positive integer.
    pub fn bad_rank_pattern(&self) -> Option<(&str, &Value)> {
        pattern_entries(&self.rank_pattern).find(|(_, v)| v.as_i64().map_or(true, |v| v <= 0))
    }

    /// Fields a LoraConfig needs that the file lacks (PEFT fills defaults; engines may not).
    pub fn missing_required(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if self.r.is_none() {
            m.push("r");
        }
        if self.lora_alpha.is_none() {
            m.push("lora_alpha");
        }
        if self.target_modules.is_none() {
            m.push("target_modules");
        }
        m
    }

    /// rank_pattern entries whose rank differs from `r`.
    pub fn rank_overrides(&self) -> Vec<(&str, i64)> {
        let r = self.r.unwrap_or(8);
        pattern_entries(&self.rank_pattern)
            .filter_map(|(k, v)| v.as_i64().map(|v| (k, v)))
            .filter(|&(_, v)| v != r)
            .collect()
    }

    /// alpha_pattern entries whose alpha differs from `lora_alpha`.
    pub fn alpha_overrides(&self) -> Vec<(&str, f64)> {
        let alpha = self.lora_alpha.unwrap_or(8.0);
        pattern_entries(&self.alpha_pattern)
            .filter_map(|(k, v)| v.as_f64().map(|v| (k, v)))
            .filter(|&(_, v)| v != alpha)
            .collect()
    }
}

fn pattern_entries(p: &Option<BTreeMap<String, Value>>) -> impl Iterator<Item = (&str, &Value)> {
    p.iter().flatten().map(|(k, v)| (k.as_str(), v))
}

/// How a module's experts are laid out, if it is an expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Experts {
    None,
    /// `…experts.<e>.<proj>`: a 2-D pair per expert.
    PerExpert,
    /// A fused 3-D expert parameter (PEFT's target_parameters), or 3-D factors.
    Fused,
}

/// One module's factors, as the file holds them.
#[derive(Clone, Debug)]
pub struct Module {
    /// The path without `base_model.model.`, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    pub a: Option<Vec<usize>>,
    pub b: Option<Vec<usize>>,
    /// `lora_embedding_A/B` keys.
    pub embedding: bool,
    pub bias: bool,
    /// DoRA's `lora_magnitude_vector`.
    pub magnitude: bool,
    pub experts: Experts,
    /// Targeted as a parameter (target_parameters), not as a module.
    pub parameter: bool,
}

impl Module {
    /// The rank the file's factors have (A's rows, or an embedding's A rows), when A and B agree.
    pub fn rank(&self) -> Option<usize> {
        let (a, b) = (self.a.as_ref()?, self.b.as_ref()?);
        let ra = *a.first()?;
        let rb = *b.get(1).or(b.first())?;
        (ra == rb).then_some(ra)
    }

    /// The last path segment: `q_proj`, `embed_tokens`, `lm_head`.
    pub fn kind(&self) -> &str {
        crate::names::last_segment(&self.path)
    }

    /// The layer index, if any.
    pub fn layer(&self) -> Option<usize> {
        crate::names::layer_of(&self.path)
    }
}

/// What the base model says, when `check --base` names it.
pub struct Base {
    pub path: PathBuf,
    /// config.json's `architectures` and `model_type`, lower-cased.
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: Option<usize>,
    pub tied: bool,
    /// Every tensor's shape, by name.
    pub shapes: BTreeMap<String, Vec<usize>>,
}

impl Base {
    pub fn open(path: &Path) -> Result<Base> {
        let ck = crate::checkpoint::Checkpoint::open(path)?;
        let config = ck.config();
        let field = |k: &str| config.and_then(|c| crate::checkpoint::config_field(c, k));
        let shapes: BTreeMap<String, Vec<usize>> = ck
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        Ok(Base {
            path: path.to_path_buf(),
            architectures: field("architectures")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .map(str::to_ascii_lowercase)
                        .collect()
                })
                .unwrap_or_default(),
            model_type: field("model_type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_ascii_lowercase(),
            vocab_size: field("vocab_size")
                .and_then(Value::as_u64)
                .map(|v| v as usize),
            tied: field("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                || !shapes.keys().any(|k| k.ends_with("lm_head.weight")),
            shapes,
        })
    }

    /// The architecture is one of `classes` (lower-case; a trailing `*` matches a prefix),
    /// or the model type one of `types`.
    pub fn is(&self, classes: &[&str], types: &[&str]) -> bool {
        let class = |a: &str| {
            classes.iter().any(|c| match c.strip_suffix('*') {
                Some(prefix) => a.starts_with(prefix),
                None => a == *c,
            })
        };
        self.architectures.iter().any(|a| class(a)) || types.contains(&self.model_type.as_str())
    }

    /// The architecture, for messages.
    pub fn name(&self) -> &str {
        self.architectures
            .first()
            .map_or(self.model_type.as_str(), |a| a.as_str())
    }

    /// The base stores MoE experts one 2-D weight per expert (not fused 3-D parameters).
    pub fn per_expert(&self) -> bool {
        self.shapes
            .keys()
            .any(|k| crate::names::per_expert_weight(k).is_some())
    }
}

/// An adapter folder, read.
pub struct Inventory {
    pub dir: PathBuf,
    pub config: Config,
    /// PEFT's module matching over the config, or why PEFT refuses the config.
    pub targets: std::result::Result<ConfigTargets, String>,
    /// Config keys a LoraConfig does not know (a newer PEFT, or another tool).
    pub unknown_fields: Vec<String>,
    pub modules: Vec<Module>,
    /// Tensors saved whole (modules_to_save, resized embeddings): parameter paths.
    pub whole: Vec<String>,
    /// Keys of no kind an engine loads: `base_layer` copies, trainable-token deltas, keys
    /// under an adapter name, others.
    pub other: Vec<String>,
    /// Keys without the `base_model.model.` prefix.
    pub unprefixed: usize,
    /// Rows of new vocabulary phlora wrote (added_tokens.safetensors).
    pub added_rows: usize,
    /// The ids in added_tokens.json (a tokenizer's; most are inside the base vocabulary).
    pub added_ids: Vec<u64>,
    /// The weights are split into shards with an index.
    pub sharded: bool,
    /// Written by phlora (its report.json beside it).
    pub from_phlora: bool,
    /// The base model, when given.
    pub base: Option<Base>,
}

/// LoraConfig's fields (PEFT 0.21) and PeftConfig's: anything else is unknown to PEFT.
const KNOWN_FIELDS: &[&str] = &[
    "alora_invocation_tokens",
    "alpha_pattern",
    "arrow_config",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "qalora_group_size",
    "r",
    "rank_pattern",
    "revision",
    "runtime_config",
    "target_modules",
    "target_parameters",
    "task_type",
    "trainable_token_indices",
    "use_dora",
    "use_qalora",
    "use_rslora",
];

impl Inventory {
    pub fn open(dir: &Path) -> Result<Inventory> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.exists() {
            return Err(Error::checkpoint(
                dir,
                format!("no {CONFIG_FILE}: not a PEFT adapter folder (every engine reads the config first)"),
            ));
        }
        let text = input::read_string(&config_path)?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(&config_path, format!("not valid JSON: {e}")))?;
        let Some(fields) = json.as_object() else {
            return Err(Error::checkpoint(&config_path, "not a JSON object"));
        };
        let unknown_fields = fields
            .keys()
            .filter(|k| !KNOWN_FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        let mut config: Config = serde_json::from_value(json.clone()).map_err(|e| {
            Error::checkpoint(&config_path, format!("a field of the wrong type: {e}"))
        })?;
        config.rank_rules = rank_rules(&text);
        let targets = ConfigTargets::from_config(&text, &config_path).map_err(|e| e.to_string());
        let safetensors = [crate::adapter::MODEL_FILE, crate::adapter::INDEX_FILE];
        if safetensors.iter().all(|f| !dir.join(f).exists())
            && dir.join("adapter_model.bin").exists()
        {
            return Err(Error::checkpoint(
                dir,
                "holds adapter_model.bin (a pickle) and no adapter_model.safetensors: phlora reads safetensors only (convert with safetensors.torch.save_file(torch.load(path, weights_only=True), ...))",
            ));
        }
        let weights = open_weights(dir)?;
        let mut inv = Inventory {
            dir: dir.to_path_buf(),
            config,
            targets,
            unknown_fields,
            modules: Vec::new(),
            whole: Vec::new(),
            other: Vec::new(),
            unprefixed: 0,
            added_rows: added_rows(dir)?,
            added_ids: added_ids(dir)?,
            sharded: weights.num_shards() > 1 || !dir.join(crate::adapter::MODEL_FILE).exists(),
            from_phlora: dir.join(crate::adapter::REPORT_FILE).is_file(),
            base: None,
        };
        inv.sort_keys(
            weights
                .tensors()
                .iter()
                .map(|t| (t.name.as_str(), &t.shape)),
        );
        Ok(inv)
    }

    fn sort_keys<'a>(&mut self, keys: impl Iterator<Item = (&'a str, &'a Vec<usize>)>) {
        let targeted = self.config.target_parameters.clone().unwrap_or_default();
        let mut modules: BTreeMap<String, Module> = BTreeMap::new();
        for (key, shape) in keys {
            let name = match key.strip_prefix(KEY_PREFIX) {
                Some(n) => n,
                None => {
                    self.unprefixed += 1;
                    key
                }
            };
            let Some((path, part)) = split_key(name) else {
                if name.contains(".base_layer.")
                    || name.contains("trainable_tokens")
                    || name.contains(".lora_")
                {
                    self.other.push(key.to_string());
                } else {
                    self.whole.push(name.to_string());
                }
                continue;
            };
            let m = modules.entry(path.to_string()).or_insert_with(|| {
                let parameter = targeted_parameter(path, &targeted).is_some();
                Module {
                    path: path.to_string(),
                    a: None,
                    b: None,
                    embedding: false,
                    bias: false,
                    magnitude: false,
                    experts: experts_of(path, parameter),
                    parameter,
                }
            });
            match part {
                Part::A { embedding } => {
                    m.a = Some(shape.clone());
                    m.embedding |= embedding;
                }
                Part::B { embedding } => {
                    m.b = Some(shape.clone());
                    m.embedding |= embedding;
                }
                Part::Bias => m.bias = true,
                Part::Magnitude => m.magnitude = true,
            }
            if shape.len() == 3 {
                m.experts = Experts::Fused;
            }
        }
        self.modules = modules.into_values().collect();
    }

    /// The modules with factors (not only a bias or a magnitude).
    pub fn factored(&self) -> impl Iterator<Item = &Module> {
        self.modules
            .iter()
            .filter(|m| m.a.is_some() || m.b.is_some())
    }

    /// The distinct ranks of the file's factors (a fused expert parameter's r·E rows are
    /// not a rank).
    pub fn ranks(&self) -> BTreeSet<usize> {
        self.factored()
            .filter(|m| m.experts != Experts::Fused)
            .filter_map(Module::rank)
            .collect()
    }

    /// Modules PEFT's config would not wrap (their keys are ignored on load).
    pub fn untargeted(&self) -> Vec<&str> {
        let Ok(t) = &self.targets else {
            return Vec::new();
        };
        self.factored()
            .filter(|m| !m.parameter && !t.wraps(&m.path, m.embedding))
            .map(|m| m.path.as_str())
            .collect()
    }

    pub fn has_embedding_lora(&self) -> bool {
        self.factored().any(|m| m.embedding)
    }

    pub fn has_lm_head_lora(&self) -> bool {
        self.factored().any(|m| m.kind() == "lm_head")
    }

    /// The vocabulary size: the base's, else an embedding LoRA's.
    pub fn vocab(&self) -> Option<usize> {
        self.base.as_ref().and_then(|b| b.vocab_size).or_else(|| {
            self.factored()
                .find(|m| m.embedding)
                .and_then(|m| m.a.as_ref()?.get(1).copied())
        })
    }

    /// Tokens the adapter adds to the vocabulary: phlora's added rows, or added_tokens.json ids
    /// at or above the vocabulary (None: the file has ids, but the vocabulary is unknown).
    pub fn new_tokens(&self) -> Option<usize> {
        if self.added_rows > 0 || self.added_ids.is_empty() {
            return Some(self.added_rows);
        }
        let vocab = self.vocab()? as u64;
        Some(self.added_ids.iter().filter(|&&id| id >= vocab).count())
    }

    /// Keys of the LoRA kinds only PEFT applies: `lora_B.bias` and DoRA's magnitudes.
    pub fn bias_and_magnitude_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for m in &self.modules {
            if m.bias {
                keys.push(format!("{}.lora_B.bias", m.path));
            }
            if m.magnitude {
                keys.push(format!("{}.lora_magnitude_vector", m.path));
            }
        }
        keys
    }
}

/// rank_pattern in file order, each key compiled once (a key that is no regex matches nothing).
fn rank_rules(config: &str) -> Vec<(regex::Regex, i64)> {
    #[derive(Deserialize)]
    struct Patterns {
        #[serde(default)]
        rank_pattern: Option<crate::adapter::read::Ordered<Value>>,
    }
    let Ok(Patterns {
        rank_pattern: Some(p),
    }) = serde_json::from_str(config)
    else {
        return Vec::new();
    };
    p.0.into_iter()
        .filter_map(|(k, v)| {
            let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).ok()?;
            Some((re, v.as_i64()?))
        })
        .collect()
}

enum Part {
    A { embedding: bool },
    B { embedding: bool },
    Bias,
    Magnitude,
}

/// `<path>.lora_A.weight` and its kin, split into the module path and the part.
fn split_key(name: &str) -> Option<(&str, Part)> {
    const SUFFIXES: [(&str, Part); 7] = [
        (".lora_A.weight", Part::A { embedding: false }),
        (".lora_B.weight", Part::B { embedding: false }),
        (".lora_embedding_A", Part::A { embedding: true }),
        (".lora_embedding_B", Part::B { embedding: true }),
        (".lora_B.bias", Part::Bias),
        (".lora_magnitude_vector", Part::Magnitude),
        (".lora_magnitude_vector.weight", Part::Magnitude),
    ];
    SUFFIXES.into_iter().find_map(|(suffix, part)| {
        let path = name.strip_suffix(suffix)?;
        // PEFT saves without the adapter's name; `lora_A.default.weight` is an unsaved state dict.
        (!path.is_empty()).then_some((path, part))
    })
}

fn experts_of(path: &str, parameter: bool) -> Experts {
    if crate::names::per_expert_module(path).is_some() {
        Experts::PerExpert
    } else if parameter && path.contains(".experts") {
        Experts::Fused
    } else {
        Experts::None
    }
}

/// New vocabulary rows phlora wrote: added_tokens.safetensors.
fn added_rows(dir: &Path) -> Result<usize> {
    let st = dir.join(ADDED_TOKENS_FILE);
    if !st.is_file() {
        return Ok(0);
    }
    let ck = crate::checkpoint::Checkpoint::open(&st)?;
    Ok(ck
        .tensors()
        .iter()
        .map(|t| t.shape.first().copied().unwrap_or(0))
        .max()
        .unwrap_or(0))
}

/// The token ids in added_tokens.json, when the adapter ships one.
fn added_ids(dir: &Path) -> Result<Vec<u64>> {
    let json = dir.join("added_tokens.json");
    if !json.is_file() {
        return Ok(Vec::new());
    }
    let text = input::read_string(&json)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&json, format!("not valid JSON: {e}")))?;
    Ok(v.as_object()
        .map(|o| o.values().filter_map(Value::as_u64).collect())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_module_and_part() {
        let part =
            |k: &str| split_key(k).map(|(p, part)| (p.to_string(), std::mem::discriminant(&part)));
        let a = std::mem::discriminant(&Part::A { embedding: false });
        assert_eq!(
            part("model.layers.0.q_proj.lora_A.weight"),
            Some(("model.layers.0.q_proj".into(), a))
        );
        assert_eq!(
            part("model.embed_tokens.lora_embedding_A"),
            Some(("model.embed_tokens".into(), a))
        );
        assert_eq!(
            part("x.lora_magnitude_vector").map(|p| p.1),
            Some(std::mem::discriminant(&Part::Magnitude))
        );
        assert_eq!(part("lora_A.weight"), None);
        assert_eq!(part("model.norm.weight"), None);
        // An unsaved state dict's adapter name is not a LoRA key.
        assert_eq!(part("model.q_proj.lora_A.default.weight"), None);
    }

    #[test]
    fn rank_patterns_match_by_peft_rule() {
        // File order decides where two keys match: a sorted map would try `.*_proj` before
        // `q_proj`, and `model.layers.1.mlp.down_proj` before nothing.
        let text = r#"{"r": 8, "lora_alpha": 8, "rank_pattern": {"q_proj": 4, ".*_proj": 6, "model.layers.1.mlp.down_proj": 2}}"#;
        let mut c: Config = serde_json::from_str(text).unwrap();
        c.rank_rules = rank_rules(text);
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(c.rank_for("model.layers.1.mlp.down_proj"), 6);
        assert_eq!(c.rank_for("model.layers.0.mlp.down_proj"), 6);
        // `(.*\.)?key$`: a key matches after a dot, not inside a name.
        assert_eq!(c.rank_for("model.layers.0.self_attn.xq_proj"), 6);
        assert_eq!(c.rank_for("model.norm"), 8);
        assert_eq!(c.rank_overrides().len(), 3);
        assert!(c.alpha_overrides().is_empty());
        assert!(c.missing_required() == ["target_modules"]);
    }
}
