//! Reading a PEFT LoRA adapter — phlora's or another tool's: its config (r, lora_alpha,
//! use_rslora, rank_pattern and alpha_pattern with PEFT's matching rule, fan_in_fan_out) and
//! its tensors, paired per module and checked for shape and rank.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{CONFIG_FILE, KEY_PREFIX, MODEL_FILE};
use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::error::{Error, Result};

/// How a module's product B·A lies over its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// W [out, in] += scaling · B [out, r] · A [r, in].
    Linear,
    /// W [in, out] += scaling · (B·A)ᵀ: embeddings (A [r, vocab], B [dim, r]) and Conv1D-style
    /// weights under fan_in_fan_out.
    Transposed,
}

/// One module's factors.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub layout: Layout,
    pub a: TensorEntry,
    pub b: TensorEntry,
    /// The rank of the factors (A's rows).
    pub rank: usize,
    /// lora_alpha / r (or / √r with use_rslora), with the module's patterns applied.
    pub scaling: f64,
    /// True for `lora_embedding_A/B` keys.
    pub embedding: bool,
    /// `lora_B.bias` (lora_bias): added, scaled, to the layer's bias.
    pub bias: Option<TensorEntry>,
}

/// An adapter folder, opened.
pub struct Adapter {
    pub dir: PathBuf,
    pub file: Checkpoint,
    pub modules: Vec<LoraModule>,
    /// Tensors saved whole (modules_to_save), by parameter path (`model.norm.weight`).
    pub whole: BTreeMap<String, TensorEntry>,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
}

#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    rank_pattern: Option<Ordered<usize>>,
    #[serde(default)]
    alpha_pattern: Option<Ordered<f64>>,
    #[serde(default)]
    bias: Option<String>,
}

/// A JSON object in file order: PEFT tries rank_pattern keys in insertion order.
struct Ordered<T>(Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: MapAccess<'de>>(
                self,
                mut m: M,
            ) -> std::result::Result<Self::Value, M::Error> {
                let mut v = Vec::new();
                while let Some((k, x)) = m.next_entry::<String, T>()? {
                    v.push((k, x));
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// PEFT's rule (`get_pattern_key`): the first key, in file order, for which the module path
/// matches `(.*\.)?(key)$` from its start.
pub struct Patterns<T> {
    rules: Vec<(regex::Regex, T)>,
}

impl<T: Copy> Patterns<T> {
    fn new(raw: Option<Ordered<T>>, config: &Path, field: &str) -> Result<Patterns<T>> {
        let mut rules = Vec::new();
        for (key, value) in raw.map(|o| o.0).unwrap_or_default() {
            let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
                Error::checkpoint(
                    config,
                    format!("{field} key `{key}` is not a valid regex: {e}"),
                )
            })?;
            rules.push((re, value));
        }
        Ok(Patterns { rules })
    }

    pub fn get(&self, module: &str) -> Option<T> {
        self.rules
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map(|(_, v)| *v)
    }
}

impl Adapter {
    pub fn open(dir: &Path) -> Result<Adapter> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| Error::io(&config_path, "cannot read the adapter config", e))?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|e| {
            Error::checkpoint(&config_path, format!("not a valid adapter config: {e}"))
        })?;
        let bad = |msg: String| Error::checkpoint(&config_path, msg);
        if let Some(t) = raw.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(bad(format!("peft_type is {t}; phlora reads LORA adapters")));
        }
        if raw.use_dora {
            return Err(bad(
                "use_dora is true: DoRA adapters are not supported".into()
            ));
        }
        if let Some(b) = raw.bias.as_deref().filter(|b| *b != "none") {
            return Err(bad(format!(
                "bias is `{b}`: adapters with bias terms are not supported"
            )));
        }
        let r = raw
            .r
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("r is missing or 0".into()))?;
        let lora_alpha = raw.lora_alpha.unwrap_or(8.0);
        let ranks = Patterns::new(raw.rank_pattern, &config_path, "rank_pattern")?;
        let alphas = Patterns::new(raw.alpha_pattern, &config_path, "alpha_pattern")?;
        let file = Checkpoint::open(&dir.join(MODEL_FILE))?;

        let mut pairs: BTreeMap<String, (Option<TensorEntry>, Option<TensorEntry>, bool)> =
            BTreeMap::new();
        let mut whole = BTreeMap::new();
        let mut biases: BTreeMap<String, TensorEntry> = BTreeMap::new();
        for t in file.tensors() {
            let name = t.name.strip_prefix(KEY_PREFIX).ok_or_else(|| {
                Error::tensor(
                    file.path_of(t),
                    &t.name,
                    format!("key does not start with `{KEY_PREFIX}`"),
                )
            })?;
            let part = [
                (".lora_A.weight", 0, false),
                (".lora_B.weight", 1, false),
                (".lora_embedding_A", 0, true),
                (".lora_embedding_B", 1, true),
            ]
            .into_iter()
            .find_map(|(suffix, which, emb)| name.strip_suffix(suffix).map(|m| (m, which, emb)));
            if let Some(module) = name.strip_suffix(".lora_B.bias") {
                biases.insert(module.to_string(), t.clone());
                continue;
            }
            match part {
                Some((module, which, emb)) => {
                    let slot = pairs.entry(module.to_string()).or_insert((None, None, emb));
                    if which == 0 {
                        slot.0 = Some(t.clone());
                    } else {
                        slot.1 = Some(t.clone());
                    }
                }
                None if name.contains("lora_") => {
                    return Err(Error::tensor(
                        file.path_of(t),
                        &t.name,
                        "a LoRA tensor phlora does not read (bias, DoRA magnitude, …)",
                    ));
                }
                None => {
                    whole.insert(name.to_string(), t.clone());
                }
            }
        }
        let mut modules = Vec::new();
        for (module, (a, b, embedding)) in pairs {
            let path = file.path_of(a.as_ref().or(b.as_ref()).expect("one of them is set"));
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::tensor(
                    path,
                    &module,
                    "has only one of its two LoRA factors",
                ));
            };
            let rank = a.shape.first().copied().unwrap_or(0);
            if a.shape.len() != 2 || b.shape.len() != 2 || b.shape[1] != rank || rank == 0 {
                return Err(Error::tensor(
                    path,
                    &module,
                    format!(
                        "factor shapes A {:?} and B {:?} do not pair (A [r, in], B [out, r])",
                        a.shape, b.shape
                    ),
                ));
            }
            if a.float_dtype().is_none() || b.float_dtype().is_none() {
                return Err(Error::tensor(
                    path,
                    &module,
                    format!("factors in {:?}: phlora reads F32, F16 and BF16", a.dtype),
                ));
            }
            let r_module = ranks.get(&module).unwrap_or(r);
            if r_module != rank {
                return Err(Error::tensor(
                    path,
                    &module,
                    format!("factors have rank {rank} but the config says r = {r_module} for this module"),
                ));
            }
            let alpha = alphas.get(&module).unwrap_or(lora_alpha);
            let scaling = if raw.use_rslora {
                alpha / (rank as f64).sqrt()
            } else {
                alpha / rank as f64
            };
            let layout = if embedding || raw.fan_in_fan_out {
                Layout::Transposed
            } else {
                Layout::Linear
            };
            let bias = biases.remove(&module);
            if let Some(bt) = &bias {
                if bt.shape != [b.shape[0]] || bt.float_dtype().is_none() {
                    return Err(Error::tensor(
                        file.path_of(bt),
                        &module,
                        format!(
                            "lora_B.bias is {:?} {:?}; B has {} rows",
                            bt.dtype, bt.shape, b.shape[0]
                        ),
                    ));
                }
            }
            modules.push(LoraModule {
                module,
                layout,
                a,
                b,
                rank,
                scaling,
                embedding,
                bias,
            });
        }
        if let Some((module, t)) = biases.into_iter().next() {
            return Err(Error::tensor(
                file.path_of(&t),
                &module,
                "has a lora_B.bias but no LoRA factors",
            ));
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            file,
            modules,
            whole,
            r,
            lora_alpha,
            use_rslora: raw.use_rslora,
        })
    }

    /// A module's A and B in f32.
    pub fn factors(&self, m: &LoraModule) -> (faer::Mat<f32>, faer::Mat<f32>) {
        let matrix = |t: &TensorEntry| {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let d = t.float_dtype().expect("checked when opened");
            let mut v = vec![0f32; rows * cols];
            crate::checkpoint::dtype::decode_into(d, self.file.bytes(t), &mut v);
            faer::Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
        };
        (matrix(&m.a), matrix(&m.b))
    }

    /// The shape [rows, cols] of the weight a module's product lands on.
    pub fn weight_shape(m: &LoraModule) -> [usize; 2] {
        let (out, inn) = (m.b.shape[0], m.a.shape[1]);
        match m.layout {
            Layout::Linear => [out, inn],
            Layout::Transposed => [inn, out],
        }
    }
}

/// Rows r0..r1 of a module's update scaling·B·A (or its transpose), row-major, in f32.
pub fn update_rows(
    m: &LoraModule,
    a: &faer::Mat<f32>,
    b: &faer::Mat<f32>,
    r0: usize,
    r1: usize,
) -> Vec<f32> {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, Par};
    let cols = Adapter::weight_shape(m)[1];
    let mut out = faer::Mat::<f32>::zeros(r1 - r0, cols);
    let s = m.scaling as f32;
    match m.layout {
        // W rows are B's rows: B[r0..r1]·A.
        Layout::Linear => matmul(
            out.as_mut(),
            Accum::Replace,
            b.as_ref().subrows(r0, r1 - r0),
            a.as_ref(),
            s,
            Par::Seq,
        ),
        // W rows are A's columns: (A[:, r0..r1])ᵀ·Bᵀ.
        Layout::Transposed => matmul(
            out.as_mut(),
            Accum::Replace,
            a.as_ref().subcols(r0, r1 - r0).transpose(),
            b.as_ref().transpose(),
            s,
            Par::Seq,
        ),
    }
    let mut v = Vec::with_capacity((r1 - r0) * cols);
    for i in 0..r1 - r0 {
        v.extend((0..cols).map(|j| out[(i, j)]));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(json: &str) -> Patterns<usize> {
        let raw: Ordered<usize> = serde_json::from_str(json).unwrap();
        Patterns::new(Some(raw), Path::new("cfg"), "rank_pattern").unwrap()
    }

    #[test]
    fn patterns_follow_peft_first_match_in_file_order() {
        let p = patterns(r#"{"q_proj": 4, "layers.1.self_attn.q_proj": 8, "mlp.*": 2}"#);
        // `q_proj` comes first and matches any q_proj, as in PEFT.
        assert_eq!(p.get("model.layers.1.self_attn.q_proj"), Some(4));
        assert_eq!(p.get("model.layers.0.mlp.up_proj"), Some(2));
        // A key must end the path at a dot boundary (or be all of it).
        assert_eq!(p.get("model.layers.0.self_attn.xq_proj"), None);
        assert_eq!(p.get("q_proj"), Some(4));
        let p = patterns(r#"{"layers.1.self_attn.q_proj": 8, "q_proj": 4}"#);
        assert_eq!(p.get("model.layers.1.self_attn.q_proj"), Some(8));
        assert_eq!(p.get("model.layers.11.self_attn.q_proj"), Some(4));
        let bad: Ordered<usize> = serde_json::from_str(r#"{"(": 1}"#).unwrap();
        assert!(Patterns::new(Some(bad), Path::new("cfg"), "rank_pattern").is_err());
    }
}
