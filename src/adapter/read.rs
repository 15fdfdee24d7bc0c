//! Reading a PEFT LoRA adapter — phlora's or another tool's: its config (r, lora_alpha,
//! use_rslora, rank_pattern and alpha_pattern with PEFT's matching rule, fan_in_fan_out) and
//! its tensors, paired per module and checked for shape and rank.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{ADDED_TOKENS_FILE, CONFIG_FILE, INDEX_FILE, KEY_PREFIX, MODEL_FILE};
use crate::checkpoint::input::{self, Kind};
use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::error::{Error, Result};

/// How a module's product B·A lies over its weight (for a fused expert parameter: over each
/// expert's slice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// W [out, in] += scaling · B [out, r] · A [r, in] (a conv: W [out, in, k…], A [r, in, k…]).
    Linear,
    /// W [in, out] += scaling · (B·A)ᵀ: embeddings (A [r, vocab], B [dim, r]), Conv1D-style
    /// weights under fan_in_fan_out, gpt-oss experts.
    Transposed,
}

/// One module's factors.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj` (for a targeted parameter, the
    /// key's path: `model.layers.0.mlp.experts.base_layer`).
    pub module: String,
    /// The parameter the update lands on: `<module>.weight`, or a targeted parameter
    /// (`model.layers.0.mlp.experts.gate_up_proj`).
    pub param: String,
    /// Experts of a fused 3-D parameter (target_parameters): A [r·E, in] with row e·r + k,
    /// B [out, r·E] with column k·E + e. 0 for an ordinary module.
    pub experts: usize,
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
    /// `added_tokens.safetensors`: the fine-tune's new vocabulary rows, by checkpoint name
    /// (the adapter's factors are shaped for the resized model).
    pub added: Option<Checkpoint>,
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
    #[serde(default)]
    target_parameters: Option<Vec<String>>,
    #[serde(flatten)]
    targets: super::targets::RawTargets,
}

/// A JSON object in file order: PEFT tries rank_pattern keys in insertion order.
pub(crate) struct Ordered<T>(pub(crate) Vec<(String, T)>);

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
            let re =
                super::targets::compile(&format!(r"^(?:.*\.)?(?:{key})$"), &key, config, field)?;
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

/// The adapter's weights: the single file, or the shards its index names. Both at once is
/// refused: loaders disagree on which one wins.
pub fn open_weights(dir: &Path) -> Result<Checkpoint> {
    let (single, index) = (dir.join(MODEL_FILE), dir.join(INDEX_FILE));
    match (input::kind(&single), input::kind(&index)) {
        (_, Kind::Other | Kind::Folder) => Err(input::not_regular(&index)),
        (Kind::Missing, Kind::File) => Checkpoint::open_indexed(dir, &index, None),
        (_, Kind::File) => Err(Error::checkpoint(
            dir,
            format!("holds both {MODEL_FILE} and {INDEX_FILE}; which one is the adapter? Remove the other"),
        )),
        _ => Checkpoint::open(&single),
    }
}

/// What the config says about every module's factors.
struct Rules<'a> {
    config_path: &'a Path,
    r: usize,
    lora_alpha: f64,
    use_rslora: bool,
    fan_in_fan_out: bool,
    ranks: Patterns<usize>,
    alphas: Patterns<f64>,
}

/// The adapter's tensors by what they are: factor pairs by module (A, B, whether an
/// embedding's), tensors saved whole, and lora_B biases by module.
#[derive(Default)]
struct Sorted {
    pairs: BTreeMap<String, (Option<TensorEntry>, Option<TensorEntry>, bool)>,
    whole: BTreeMap<String, TensorEntry>,
    biases: BTreeMap<String, TensorEntry>,
}

impl Adapter {
    pub fn open(dir: &Path) -> Result<Adapter> {
        let config_path = dir.join(CONFIG_FILE);
        let text = input::read_string(&config_path)?;
        let mut raw: RawConfig = serde_json::from_str(&text).map_err(|e| {
            Error::checkpoint(&config_path, format!("not a valid adapter config: {e}"))
        })?;
        let rules = Rules::of(&mut raw, &config_path)?;
        let file = open_weights(dir)?;
        let Sorted {
            pairs,
            whole,
            mut biases,
        } = sort_tensors(&file)?;
        let targeted = raw.target_parameters.unwrap_or_default();
        let targets =
            super::targets::Targets::new(raw.targets, !targeted.is_empty(), &config_path)?;
        let mut modules = Vec::new();
        let mut untargeted = Vec::new();
        for (module, (a, b, embedding)) in pairs {
            // A targeted parameter follows its own rule; a module, the config's.
            let as_parameter = targeted_parameter(&module, &targeted);
            if as_parameter.is_none() && !targets.wraps(&module, embedding) {
                biases.remove(&module);
                untargeted.push(module);
                continue;
            }
            let factors = (a, b, embedding);
            modules.push(lora_module(
                &file,
                &rules,
                module,
                factors,
                as_parameter,
                &mut biases,
            )?);
        }
        if let Some((module, t)) = biases.into_iter().next() {
            return Err(Error::tensor(
                file.path_of(&t),
                &module,
                "has a lora_B.bias but no LoRA factors",
            ));
        }
        check_targeted(&config_path, &modules, &whole, &untargeted)?;
        let added = open_added(dir)?;
        for ck in std::iter::once(&file).chain(added.as_ref()) {
            refuse_non_finite(ck)?;
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            file,
            modules,
            whole,
            r: rules.r,
            lora_alpha: rules.lora_alpha,
            use_rslora: raw.use_rslora,
            added,
        })
    }

    /// A module's A and B in f32, as matrices (a conv's A [r, in·k…], B [out, r]).
    pub fn factors(&self, m: &LoraModule) -> (faer::Mat<f32>, faer::Mat<f32>) {
        let matrix = |t: &TensorEntry| {
            let rows = t.shape[0];
            let cols = t.numel() / rows.max(1);
            let d = t.float_dtype().expect("checked when opened");
            let mut v = vec![0f32; rows * cols];
            crate::checkpoint::dtype::decode_into(d, self.file.bytes(t), &mut v);
            faer::Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
        };
        (matrix(&m.a), matrix(&m.b))
    }

    /// Rows r0..r1 of expert `e`'s update (scaled) in a fused module, decoding only that
    /// expert's factors: its r rows of A and its r columns of B (column k·E + e), not all E.
    pub fn expert_rows(&self, m: &LoraModule, e: usize, r0: usize, r1: usize) -> Vec<f32> {
        use crate::checkpoint::dtype::decode_into;
        let (r, experts) = (m.rank, m.experts.max(1));
        let (inn, out, width) = (m.a.shape[1], m.b.shape[0], m.b.shape[1]);
        let (da, db) = (
            m.a.float_dtype().expect("checked when opened"),
            m.b.float_dtype().expect("checked when opened"),
        );
        let mut a = vec![0f32; r * inn];
        let from = e * r * inn * da.size();
        decode_into(
            da,
            &self.file.bytes(&m.a)[from..from + a.len() * da.size()],
            &mut a,
        );
        let b_bytes = self.file.bytes(&m.b);
        let mut b = vec![0f32; out * r];
        for o in 0..out {
            for k in 0..r {
                let at = (o * width + k * experts + e) * db.size();
                decode_into(
                    db,
                    &b_bytes[at..at + db.size()],
                    &mut b[o * r + k..=o * r + k],
                );
            }
        }
        let a = faer::Mat::from_fn(r, inn, |i, j| a[i * inn + j]);
        let b = faer::Mat::from_fn(out, r, |i, j| b[i * r + j]);
        matrix_rows(m.layout, m.scaling as f32, a.as_ref(), b.as_ref(), r0, r1)
    }

    /// Fused expert parameters store each expert [in, out] in gpt-oss and [out, in] in
    /// transformers v5; PEFT knows from the model class, an adapter does not say. Callers
    /// that hold the base checkpoint set it from its config.
    pub fn set_experts_layout(&mut self, in_out: bool) {
        for m in self.modules.iter_mut().filter(|m| m.experts > 0) {
            m.layout = if in_out {
                Layout::Transposed
            } else {
                Layout::Linear
            };
        }
    }

    /// For a per-expert weight (`….experts.N.up_proj.weight`, `rows` × `cols`) that the adapter
    /// carries inside a fused parameter (`….experts.gate_up_proj`, written by
    /// `--fuse-experts`): the module, the expert, and the weight's first row in that expert's
    /// fused matrix.
    pub fn expert_part(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Option<(&LoraModule, usize, usize)> {
        let (experts, index, proj) = crate::names::per_expert_weight(name)?;
        let (target, part) = crate::names::fused_target(proj)?;
        let parts = if target == "gate_up_proj" { 2 } else { 1 };
        let param = format!("{experts}.{target}");
        self.modules
            .iter()
            .find(|m| {
                m.param == param
                    && m.experts > index
                    && Adapter::weight_shape(m)[1..] == [parts * rows, cols]
            })
            .map(|m| (m, index, part * rows))
    }

    /// The shape of the weight a module's product lands on.
    pub fn weight_shape(m: &LoraModule) -> Vec<usize> {
        let (out, inn) = (m.b.shape[0], m.a.numel() / m.a.shape[0].max(1));
        let slice = match m.layout {
            Layout::Linear if m.experts == 0 => {
                return [&[out][..], &m.a.shape[1..]].concat();
            }
            Layout::Linear => [out, inn],
            Layout::Transposed => [inn, out],
        };
        if m.experts > 0 {
            vec![m.experts, slice[0], slice[1]]
        } else {
            slice.to_vec()
        }
    }
}

/// An adapter tensor with a NaN or Inf would put it into every weight it updates: refused
/// when the adapter is opened, by its key (one pass over the adapter's bytes, not decoded).
fn refuse_non_finite(ck: &Checkpoint) -> Result<()> {
    for t in ck.tensors() {
        let Some(dtype) = t.float_dtype() else {
            continue;
        };
        if let Some(i) = crate::checkpoint::dtype::first_non_finite(dtype, ck.bytes(t)) {
            return Err(Error::tensor(
                ck.path_of(t),
                &t.name,
                format!(
                    "holds NaN or Inf (element {i}): this adapter would write it into the model"
                ),
            ));
        }
    }
    Ok(())
}

/// `added_tokens.safetensors` beside the adapter, if there is one.
fn open_added(dir: &Path) -> Result<Option<Checkpoint>> {
    let path = dir.join(ADDED_TOKENS_FILE);
    if input::kind(&path) == Kind::Missing {
        return Ok(None);
    }
    let ck = Checkpoint::open(&path)?;
    if let Some(t) = ck
        .tensors()
        .iter()
        .find(|t| t.shape.len() != 2 || t.float_dtype().is_none())
    {
        return Err(Error::tensor(
            &path,
            &t.name,
            format!(
                "{:?} {:?}: added vocabulary rows are F32, F16 or BF16 [rows, dim]",
                t.dtype, t.shape
            ),
        ));
    }
    Ok(Some(ck))
}

impl<'a> Rules<'a> {
    /// The config's global settings, refused where phlora cannot read the adapter as PEFT
    /// would load it.
    fn of(raw: &mut RawConfig, config_path: &'a Path) -> Result<Rules<'a>> {
        let bad = |msg: String| Error::checkpoint(config_path, msg);
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
        let ranks = Patterns::new(raw.rank_pattern.take(), config_path, "rank_pattern")?;
        let alphas = Patterns::new(raw.alpha_pattern.take(), config_path, "alpha_pattern")?;
        Ok(Rules {
            config_path,
            r,
            lora_alpha,
            use_rslora: raw.use_rslora,
            fan_in_fan_out: raw.fan_in_fan_out,
            ranks,
            alphas,
        })
    }
}

/// Every tensor of the adapter's weights by what it is; a key outside PEFT's prefix, or a LoRA
/// tensor phlora does not read, is an error naming it.
fn sort_tensors(file: &Checkpoint) -> Result<Sorted> {
    let mut sorted = Sorted::default();
    let Sorted {
        pairs,
        whole,
        biases,
    } = &mut sorted;
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
    Ok(sorted)
}

/// One module's factors, checked against each other and the config: shapes that pair, float
/// dtypes, the rank the config gives it, a finite scaling, and its lora_B.bias (taken out of
/// `biases`).
fn lora_module(
    file: &Checkpoint,
    rules: &Rules<'_>,
    module: String,
    (a, b, embedding): (Option<TensorEntry>, Option<TensorEntry>, bool),
    as_parameter: Option<String>,
    biases: &mut BTreeMap<String, TensorEntry>,
) -> Result<LoraModule> {
    let path = file.path_of(a.as_ref().or(b.as_ref()).expect("one of them is set"));
    let (Some(a), Some(b)) = (a, b) else {
        return Err(Error::tensor(
            path,
            &module,
            "has only one of its two LoRA factors",
        ));
    };
    let param = as_parameter
        .clone()
        .unwrap_or_else(|| format!("{module}.weight"));
    let fused = param != format!("{module}.weight");
    let width = a.shape.first().copied().unwrap_or(0);
    // B [out, r] (a conv's B [out, r, 1…]); A [r, in] (a conv's A [r, in, k…]).
    let pairs_up = a.shape.len() >= 2
        && b.shape.len() == a.shape.len()
        && b.shape[1] == width
        && b.shape[2..].iter().all(|&d| d == 1)
        && width > 0
        && (!fused || a.shape.len() == 2);
    if !pairs_up {
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
    // PEFT matches a targeted parameter's patterns against the parameter's path.
    let pattern_key = if as_parameter.is_some() {
        param.as_str()
    } else {
        module.as_str()
    };
    let (rank, experts, scaling) =
        rules.rank_of(path, &module, &param, pattern_key, width, fused)?;
    // PEFT applies fan_in_fan_out to Conv1D layers only (it turns it off, with a
    // warning, for an nn.Linear such as GPT-2's lm_head).
    let conv1d = crate::names::is_conv1d_module(&module);
    let layout = if embedding || (rules.fan_in_fan_out && conv1d && !fused) {
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
    if fused && bias.is_some() {
        return Err(Error::tensor(
            path,
            &module,
            "a targeted parameter cannot have a lora_B.bias",
        ));
    }
    Ok(LoraModule {
        param,
        experts,
        module,
        layout,
        a,
        b,
        rank,
        scaling,
        embedding,
        bias,
    })
}

impl Rules<'_> {
    /// A module's rank, expert count (a targeted fused parameter's A is [r·experts, in]) and
    /// scaling, as the config gives them; factors of another rank are an error.
    fn rank_of(
        &self,
        path: &Path,
        module: &str,
        param: &str,
        pattern_key: &str,
        width: usize,
        fused: bool,
    ) -> Result<(usize, usize, f64)> {
        let r_module = self.ranks.get(pattern_key).unwrap_or(self.r);
        let (rank, experts) = if fused {
            if width % r_module != 0 {
                return Err(Error::tensor(
                    path,
                    module,
                    format!("A has {width} rows, not a multiple of r = {r_module} (target parameter `{param}`: A is [r·experts, in])"),
                ));
            }
            (r_module, width / r_module)
        } else {
            (width, 0)
        };
        if r_module != rank {
            return Err(Error::tensor(
                path,
                module,
                format!(
                    "factors have rank {rank} but the config says r = {r_module} for this module"
                ),
            ));
        }
        let alpha = self.alphas.get(pattern_key).unwrap_or(self.lora_alpha);
        let scaling = if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        if !(scaling as f32).is_finite() {
            return Err(Error::checkpoint(self.config_path, format!(
                "lora_alpha {alpha} gives `{module}` a scaling of {scaling:e}, beyond what f32 holds: its update would be Inf"
            )));
        }
        Ok((rank, experts, scaling))
    }
}

/// An adapter that targets none of its modules would load and change nothing: refused. Some
/// untargeted ones: a warning (PEFT ignores them, and so do verify and merge).
fn check_targeted(
    config_path: &Path,
    modules: &[LoraModule],
    whole: &BTreeMap<String, TensorEntry>,
    untargeted: &[String],
) -> Result<()> {
    if modules.is_empty() && whole.is_empty() && !untargeted.is_empty() {
        return Err(Error::checkpoint(config_path, format!(
            "targets none of the {} module(s) with factors in the adapter (e.g. `{}`): PEFT would load it and change nothing",
            untargeted.len(),
            untargeted[0]
        )));
    }
    if let Some(first) = untargeted.first() {
        tracing::warn!(
            "{}: {} module(s) with factors in the adapter are not targeted by its config (target_modules, exclude_modules, layers_to_transform), e.g. `{first}`: PEFT ignores them when it loads the adapter, and so do verify and merge",
            config_path.display(),
            untargeted.len()
        );
    }
    Ok(())
}

/// The parameter a key's module path stands for under `target_parameters`: PEFT nests one
/// wrapper per targeted parameter of a module, the first registered innermost, so a path with
/// k `.base_layer` suffixes is the parameter with k wrappers around it. Entries are full
/// parameter paths or suffixes of them.
pub fn targeted_parameter(path: &str, targeted: &[String]) -> Option<String> {
    if targeted.is_empty() {
        return None;
    }
    let mut module = path;
    let mut depth = 0;
    while let Some(m) = module.strip_suffix(".base_layer") {
        module = m;
        depth += 1;
    }
    let mut names: Vec<&str> = targeted
        .iter()
        .filter_map(|t| {
            let name = crate::names::last_segment(t);
            let full = format!("{module}.{name}");
            (full == *t || full.ends_with(&format!(".{t}"))).then_some(name)
        })
        .collect();
    names.sort_by_key(|n| crate::names::registration_rank(n));
    names.dedup();
    let at = names.len().checked_sub(depth + 1)?;
    Some(format!("{module}.{}", names[at]))
}

/// Rows r0..r1 (along the weight's first axis) of a module's update scaling·B·A (or its
/// transpose), row-major, in f32. For a fused parameter the rows are experts, each its whole
/// [d1, d2] slice.
pub fn update_rows(
    m: &LoraModule,
    a: &faer::Mat<f32>,
    b: &faer::Mat<f32>,
    r0: usize,
    r1: usize,
) -> Vec<f32> {
    if m.experts == 0 {
        return matrix_rows(m.layout, m.scaling as f32, a.as_ref(), b.as_ref(), r0, r1);
    }
    let (experts, r) = (m.experts, a.nrows() / m.experts.max(1));
    let mut out = Vec::new();
    for e in r0..r1 {
        let a_e = a.as_ref().subrows(e * r, r);
        let b_e = faer::Mat::from_fn(b.nrows(), r, |o, k| b[(o, k * experts + e)]);
        let rows = match m.layout {
            Layout::Linear => b.nrows(),
            Layout::Transposed => a.ncols(),
        };
        out.extend(matrix_rows(
            m.layout,
            m.scaling as f32,
            a_e,
            b_e.as_ref(),
            0,
            rows,
        ));
    }
    out
}

fn matrix_rows(
    layout: Layout,
    s: f32,
    a: faer::MatRef<'_, f32>,
    b: faer::MatRef<'_, f32>,
    r0: usize,
    r1: usize,
) -> Vec<f32> {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, Par};
    let cols = match layout {
        Layout::Linear => a.ncols(),
        Layout::Transposed => b.nrows(),
    };
    let mut out = faer::Mat::<f32>::zeros(r1 - r0, cols);
    match layout {
        // W rows are B's rows: B[r0..r1]·A.
        Layout::Linear => matmul(
            out.as_mut(),
            Accum::Replace,
            b.subrows(r0, r1 - r0),
            a,
            s,
            Par::Seq,
        ),
        // W rows are A's columns: (A[:, r0..r1])ᵀ·Bᵀ.
        Layout::Transposed => matmul(
            out.as_mut(),
            Accum::Replace,
            a.subcols(r0, r1 - r0).transpose(),
            b.transpose(),
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
    fn nested_keys_name_the_parameter_wrapped_first_deepest() {
        let t = vec![
            "mlp.experts.gate_up_proj".to_string(),
            "mlp.experts.down_proj".to_string(),
        ];
        let m = "model.layers.3.mlp.experts";
        assert_eq!(
            targeted_parameter(m, &t).as_deref(),
            Some("model.layers.3.mlp.experts.down_proj")
        );
        assert_eq!(
            targeted_parameter(&format!("{m}.base_layer"), &t).as_deref(),
            Some("model.layers.3.mlp.experts.gate_up_proj")
        );
        assert_eq!(
            targeted_parameter(&format!("{m}.base_layer.base_layer"), &t),
            None
        );
        let full = vec!["model.layers.3.mlp.experts.down_proj".to_string()];
        assert_eq!(
            targeted_parameter(m, &full).as_deref(),
            Some("model.layers.3.mlp.experts.down_proj")
        );
        assert_eq!(
            targeted_parameter("model.layers.4.mlp.experts", &full),
            None
        );
        assert_eq!(
            targeted_parameter("model.layers.0.self_attn.q_proj", &t),
            None
        );
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
