//! Planning: pairs base and fine-tuned tensors by name, classifies each pair, applies the
//! include/exclude filters, and rejects every problem that needs no arithmetic (a tensor in
//! one checkpoint only, a shape mismatch, an unsupported dtype) before any heavy work starts.

use std::collections::BTreeSet;

mod experts;
mod vocab;

pub use experts::*;
pub use vocab::*;

use crate::checkpoint::fp8::{self, BlockScale};
use crate::checkpoint::{Checkpoint, DType, TensorEntry};
use crate::error::{Error, Result};
use crate::names::{is_conv1d_module, is_norm_module, last_segment, module_of};
use crate::report::TensorAction;

/// What extract does with a tensor.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "action", content = "reason")]
pub enum Action {
    /// A LoRA on a linear layer (attention/MLP projections, lm_head).
    LoraLinear,
    /// A LoRA on an embedding (`lora_embedding_A/B`).
    LoraEmbedding,
    /// Saved whole through PEFT's `modules_to_save` (norms).
    SaveWhole,
    /// The bias of a LoRA-targeted linear layer, carried exactly as PEFT's `lora_B.bias`
    /// (`--lora-bias`).
    LoraBias,
    /// A LoRA cannot carry it; its share of ‖ΔW‖² is reported.
    NotCarried(String),
    /// Identical bytes in both checkpoints, found without arithmetic (non-float tensors).
    Unchanged,
}

impl Action {
    /// A layer weight the adapter carries as LoRA factors.
    pub fn is_lora(&self) -> bool {
        matches!(self, Action::LoraLinear | Action::LoraEmbedding)
    }

    /// What the report says of it before any arithmetic (a changed LoRA target or a
    /// whole-saved tensor may still turn out unchanged).
    pub fn outcome(&self) -> TensorAction {
        match self {
            Action::LoraLinear => TensorAction::Lora,
            Action::LoraEmbedding => TensorAction::LoraEmbedding,
            Action::SaveWhole => TensorAction::SaveWhole,
            Action::LoraBias => TensorAction::LoraBias,
            Action::NotCarried(_) => TensorAction::NotCarried,
            Action::Unchanged => TensorAction::Unchanged,
        }
    }
}

/// One tensor pair and what to do with it.
#[derive(Clone, Debug)]
pub struct PlanItem {
    pub name: String,
    /// The module path: the name without its last segment (`.weight`, `.bias`).
    pub module: String,
    pub shape: Vec<usize>,
    pub base: TensorEntry,
    pub ft: TensorEntry,
    pub action: Action,
    /// Said in the report next to this tensor (e.g. a tied lm_head's stand-in).
    pub note: Option<String>,
    /// How the tensor's bytes lie as the matrix that is decomposed.
    pub form: Form,
    /// FP8 sides: the block scales they are dequantised with.
    pub base_scale: Option<BlockScale>,
    pub ft_scale: Option<BlockScale>,
    /// The fine-tune's vocabulary grew (`--added-tokens`): `ft` views the rows both share.
    pub added: Option<AddedRows>,
    /// An output head whose ΔW is decomposed without its logit shift (the component along
    /// the vocabulary's all-ones direction, which softmax ignores): see [`vocab::logit_shift_removable`].
    pub remove_logit_shift: bool,
}

/// How a tensor is read as the matrix ΔW that is decomposed, and how its factors are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Form {
    /// [out, in] (an embedding: [vocab, dim]).
    Matrix,
    /// A GPT-2-style Conv1D weight, stored [in, out]: its LoRA is A [r, in], B [out, r] with
    /// `fan_in_fan_out`, ΔW = (B·A)ᵀ.
    Conv1D,
    /// A convolution weight [out, in, k…], decomposed as the matrix [out, in·k…]: A is written
    /// [r, in, k…] and B [out, r, 1…], the shapes of PEFT's conv LoRA.
    Conv,
    /// One expert of a fused 3-D expert parameter [E, d1, d2] (`mlp.experts.gate_up_proj`),
    /// written in PEFT's `target_parameters` layout: A [r·E, in] with the expert index slowest,
    /// B [out, r·E] with it fastest.
    Expert(ExpertSlice),
}

impl PlanItem {
    /// One side's entry and its FP8 block scales.
    fn side(&self, ft_side: bool) -> (&TensorEntry, &Option<BlockScale>) {
        if ft_side {
            (&self.ft, &self.ft_scale)
        } else {
            (&self.base, &self.base_scale)
        }
    }

    /// The dtype of one side's rows as [`side_rows`](Self::side_rows) hands them over (an FP8
    /// side comes dequantised, as F32).
    pub fn side_dtype(&self, ft_side: bool) -> DType {
        match self.side(ft_side) {
            (_, Some(_)) => DType::F32,
            (t, None) => t.float_dtype().expect("validated by the planner"),
        }
    }

    pub fn base_dtype(&self) -> DType {
        self.side_dtype(false)
    }
    pub fn ft_dtype(&self) -> DType {
        self.side_dtype(true)
    }

    /// Rows r0..r1 (of the stored matrix) of one side, as bytes of that side's dtype: a view
    /// into the map, or FP8 dequantised into F32 bytes.
    pub fn side_rows<'a>(
        &self,
        ck: &'a Checkpoint,
        ft_side: bool,
        r0: usize,
        r1: usize,
    ) -> std::borrow::Cow<'a, [u8]> {
        let cols = self.matrix().1;
        match self.side(ft_side) {
            (t, None) => {
                let size = self.side_dtype(ft_side).size();
                std::borrow::Cow::Borrowed(&ck.bytes(t)[r0 * cols * size..r1 * cols * size])
            }
            (t, Some(s)) => std::borrow::Cow::Owned(fp8::dequant_rows(ck, t, s, r0, r1)),
        }
    }

    /// Bytes per stored element of one side (1 for FP8).
    pub fn stored_size(&self, ft_side: bool) -> usize {
        match self.side(ft_side) {
            (_, Some(_)) => 1,
            (t, None) => t.float_dtype().map_or(1, |d| d.size()),
        }
    }

    /// True when either side is FP8 (its rows are dequantised on the host).
    pub fn has_fp8(&self) -> bool {
        self.base_scale.is_some() || self.ft_scale.is_some()
    }
    /// Bytes read from both checkpoints.
    pub fn input_bytes(&self) -> u64 {
        (self.base.nbytes() + self.ft.nbytes()) as u64
    }

    /// The stored tensor as a row-major matrix: [shape[0], the product of the rest]. This is
    /// the matrix decomposed (for a Conv1D or gpt-oss expert, ΔWᵀ).
    pub fn matrix(&self) -> (usize, usize) {
        let rows = self.shape.first().copied().unwrap_or(1);
        (rows, self.shape.iter().skip(1).product())
    }

    /// A tensor neither checkpoint stores under this name: a tied lm_head, which is the
    /// embedding matrix read again.
    pub fn is_tied_copy(&self) -> bool {
        self.base.name != self.name && self.ft.name != self.name && self.form == Form::Matrix
    }

    /// True when the stored matrix is [in, out] (the factors come out transposed).
    pub fn stored_in_out(&self) -> bool {
        match &self.form {
            Form::Conv1D => true,
            Form::Expert(e) => e.stored_in_out,
            Form::Matrix | Form::Conv => false,
        }
    }
}

/// Options that shape the plan.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PlanOptions {
    pub include: Vec<Glob>,
    pub exclude: Vec<Glob>,
    /// Decompose embeddings as LoRA (else report them as not carried).
    pub embeddings: bool,
    /// Save changed norms whole (else report them as not carried).
    pub norms: bool,
    /// Carry the biases of LoRA-targeted layers as `lora_B.bias` (else not carried).
    pub lora_bias: bool,
    /// A vocabulary that grew: LoRA on the shared rows, the new rows written whole (else an
    /// error).
    pub added_tokens: bool,
    /// Per-expert MoE weights written as transformers v5's fused parameters.
    pub fuse_experts: bool,
    /// Decompose lm_head's ΔW without the shift it adds to every logit alike (exact where
    /// softmax sees the raw logits; see [`vocab::logit_shift_removable`]).
    pub remove_logit_shift: bool,
}

impl PlanOptions {
    /// Every tensor, embeddings decomposed and norms saved whole: the defaults.
    pub fn all() -> PlanOptions {
        PlanOptions {
            embeddings: true,
            norms: true,
            ..PlanOptions::default()
        }
    }
}

pub struct Plan {
    /// In the fine-tune's file order.
    pub items: Vec<PlanItem>,
    /// Tensors left out by --include/--exclude.
    pub filtered_out: usize,
}

impl Plan {
    pub fn build(base: &Checkpoint, ft: &Checkpoint, opts: &PlanOptions) -> Result<Plan> {
        let mut b = Builder {
            base,
            ft,
            opts,
            gpt2: is_gpt2(base.config()) || is_gpt2(ft.config()),
            items: Vec::new(),
            notes: Vec::new(),
            filtered_out: 0,
        };
        for f in ft.tensors() {
            b.pair_ft_tensor(f)?;
        }
        for t in base.tensors() {
            b.pair_base_only(t)?;
        }
        // A tied output layer: neither checkpoint stores lm_head, the model reuses its
        // embedding matrix there. A LoRA on the embedding does not reach the output projection,
        // so the change of the tied matrix is carried twice: on the embedding and on lm_head.
        if let Some(item) = tied_output_item(base, ft, &b.items) {
            if b.selected(&item.name) {
                b.notes
                    .push((item.name.clone(), item.note.clone().unwrap_or_default()));
                b.items.push(item);
            }
        }
        let Builder {
            mut items,
            notes,
            filtered_out,
            ..
        } = b;
        if opts.fuse_experts {
            fuse_per_expert(&mut items, ft)?;
        }
        if opts.lora_bias {
            mark_lora_biases(&mut items);
        }
        if opts.remove_logit_shift {
            vocab::mark_logit_shift(&mut items, base, ft);
        }
        for (name, note) in notes {
            tracing::info!("{name}: {note}");
            if let Some(item) = items.iter_mut().find(|i| i.name == name) {
                item.note = Some(note);
            }
        }
        Ok(Plan {
            items,
            filtered_out,
        })
    }

    /// Each tied lm_head (a [`PlanItem::is_tied_copy`]) with the embedding item it copies:
    /// (embedding index, copy index). The copy is never read or decomposed; its factors are the
    /// embedding's, transposed.
    pub fn tied_copies(&self) -> Vec<(usize, usize)> {
        self.items
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_tied_copy())
            .filter_map(|(copy, c)| {
                let source = self.items.iter().position(|e| {
                    e.action == Action::LoraEmbedding
                        && e.base.name == c.base.name
                        && e.ft.name == c.ft.name
                })?;
                Some((source, copy))
            })
            .collect()
    }

    /// Bytes read from both checkpoints for the whole plan (a tied copy is not read again).
    pub fn input_bytes(&self) -> u64 {
        self.items
            .iter()
            .filter(|i| !i.is_tied_copy())
            .map(PlanItem::input_bytes)
            .sum()
    }

    /// Last segments of norm modules (for modules_to_save).
    pub fn norm_module_names(&self) -> BTreeSet<String> {
        self.items
            .iter()
            .filter(|i| i.action == Action::SaveWhole)
            .map(|i| last_segment(&i.module).to_string())
            .collect()
    }
}

/// A plan being built: the items so far, the notes to attach to them, and what the filters
/// left out.
struct Builder<'a> {
    base: &'a Checkpoint,
    ft: &'a Checkpoint,
    opts: &'a PlanOptions,
    /// A GPT-2-family pair (its linear layers are Conv1D).
    gpt2: bool,
    items: Vec<PlanItem>,
    notes: Vec<(String, String)>,
    filtered_out: usize,
}

impl Builder<'_> {
    /// Kept by --include/--exclude.
    fn selected(&self, name: &str) -> bool {
        let opts = self.opts;
        (opts.include.is_empty() || opts.include.iter().any(|g| g.matches(name)))
            && !opts.exclude.iter().any(|g| g.matches(name))
    }

    /// A fine-tune tensor with its base counterpart (by name, or a tied lm_head's embedding):
    /// the item (or one per expert of a fused parameter) and what to do with it.
    fn pair_ft_tensor(&mut self, f: &TensorEntry) -> Result<()> {
        let (base, ft) = (self.base, self.ft);
        if is_scale_of_fp8(ft, f) {
            return Ok(()); // read with its weight
        }
        if !self.selected(&f.name) {
            self.filtered_out += 1;
            return Ok(());
        }
        let notes = &mut self.notes;
        let tied_base = || {
            tied_counterpart(base, &f.name, &f.shape).inspect(|e| {
                notes.push((
                    f.name.clone(),
                    format!("the base ties lm_head to `{}`: ΔW is against it", e.name),
                ));
            })
        };
        let b = base.get(&f.name).or_else(tied_base).ok_or_else(|| {
            Error::tensor(
                ft.path_of(f),
                &f.name,
                format!(
                    "present in the fine-tune but not in the base ({}); if this is intended, leave it out with --exclude",
                    base.root().display()
                ),
            )
        })?;
        let (f_view, added) = pair_shapes(base, b, ft, f, self.opts)?;
        let f = &f_view;
        let (base_scale, ft_scale) = (fp8_scale(base, b)?, fp8_scale(ft, f)?);
        if added.is_some() && (base_scale.is_some() || ft_scale.is_some()) {
            return Err(Error::tensor(
                ft.path_of(f),
                &f.name,
                "--added-tokens reads F32, F16 and BF16 embeddings, not FP8",
            ));
        }
        let action = action_of((base, b), (ft, f), (&base_scale, &ft_scale), self.opts)?;
        let form = if action != Action::LoraLinear {
            Form::Matrix
        } else if f.shape.len() == 3 && is_fused_experts(&f.name) {
            let stored_in_out = experts_stored_in_out(ft, f)?;
            self.items.extend(expert_items(f, b, stored_in_out));
            return Ok(());
        } else if f.shape.len() > 2 {
            Form::Conv
        } else if self.gpt2 && is_conv1d_module(module_of(&f.name)) {
            Form::Conv1D
        } else {
            Form::Matrix
        };
        if (base_scale.is_some() || ft_scale.is_some()) && form != Form::Matrix {
            return Err(Error::tensor(
                ft.path_of(f),
                &f.name,
                "FP8 block scales are read for 2-D weights only",
            ));
        }
        if let Some(a) = &added {
            self.notes.push((
                f.name.clone(),
                format!(
                    "the fine-tune adds {} rows (added tokens {}..{}): the LoRA covers the first {}, the new rows are written whole to {}",
                    a.ft_rows() - a.base_rows,
                    a.base_rows,
                    a.ft_rows(),
                    a.base_rows,
                    crate::names::ADDED_TOKENS_FILE
                ),
            ));
        }
        self.items.push(PlanItem {
            form,
            base_scale,
            ft_scale,
            added,
            remove_logit_shift: false,
            note: None,
            module: module_of(&f.name).to_string(),
            name: f.name.clone(),
            shape: f.shape.clone(),
            base: b.clone(),
            ft: f.clone(),
            action,
        });
        Ok(())
    }

    /// A base tensor the fine-tune does not store under its name: a tied lm_head there (ΔW is
    /// the fine-tune's embedding minus the base's lm_head), else an error.
    fn pair_base_only(&mut self, b: &TensorEntry) -> Result<()> {
        let (base, ft) = (self.base, self.ft);
        if !self.selected(&b.name) || ft.get(&b.name).is_some() || is_scale_of_fp8(base, b) {
            return Ok(());
        }
        // The fine-tune ties lm_head to its embeddings: its lm_head is that tensor.
        if let Some(f) = tied_counterpart(ft, &b.name, &b.shape)
            .filter(|f| f.float_dtype().is_some() && b.float_dtype().is_some())
        {
            let (f_view, added) = pair_shapes(base, b, ft, f, self.opts)?;
            let f = &f_view;
            self.notes.push((
                b.name.clone(),
                format!(
                    "the fine-tune ties lm_head to `{}`: ΔW is that minus the base's lm_head",
                    f.name
                ),
            ));
            self.items.push(PlanItem {
                form: Form::Matrix,
                base_scale: None,
                ft_scale: None,
                added,
                remove_logit_shift: false,
                module: module_of(&b.name).to_string(),
                name: b.name.clone(),
                shape: b.shape.clone(),
                base: b.clone(),
                ft: f.clone(),
                action: classify(&b.name, &b.shape, self.opts),
                note: None,
            });
            return Ok(());
        }
        Err(Error::tensor(
            base.path_of(b),
            &b.name,
            format!(
                "present in the base but not in the fine-tune ({}); if this is intended, leave it out with --exclude",
                ft.root().display()
            ),
        ))
    }
}

/// What to do with a pair by its dtypes: classified by name and shape when both are float
/// (or FP8 with scales); identical non-float tensors are unchanged; any other is an error.
fn action_of(
    (base, b): (&Checkpoint, &TensorEntry),
    (ft, f): (&Checkpoint, &TensorEntry),
    (base_scale, ft_scale): (&Option<BlockScale>, &Option<BlockScale>),
    opts: &PlanOptions,
) -> Result<Action> {
    let float = |t: &TensorEntry, s: &Option<BlockScale>| t.float_dtype().is_some() || s.is_some();
    let action = match (float(b, base_scale), float(f, ft_scale)) {
        (true, true) => classify(&f.name, &f.shape, opts),
        _ => {
            if base.bytes(b) == ft.bytes(f) && b.dtype == f.dtype {
                Action::Unchanged
            } else {
                let (path, dtype) = if f.float_dtype().is_none() {
                    (ft.path_of(f), f.dtype)
                } else {
                    (base.path_of(b), b.dtype)
                };
                return Err(Error::tensor(
                    path,
                    &f.name,
                    format!(
                        "dtype {dtype:?} is not supported (phlora reads F32, F16, BF16, and F8_E4M3 with a `_scale_inv`) and the tensor differs between the checkpoints; leave it out with --exclude"
                    ),
                ));
            }
        }
    };
    Ok(action)
}

/// Biases ride on their layer's LoRA when asked (PEFT's lora_bias).
fn mark_lora_biases(items: &mut [PlanItem]) {
    let targets: BTreeSet<String> = items
        .iter()
        .filter(|i| i.action == Action::LoraLinear)
        .map(|i| i.module.clone())
        .collect();
    for i in items.iter_mut() {
        if i.shape.len() == 1 && last_segment(&i.name) == "bias" && targets.contains(&i.module) {
            i.action = Action::LoraBias;
        }
    }
}

/// `<weight>_scale_inv` beside an F8_E4M3 `<weight>`: read with it, not on its own.
fn is_scale_of_fp8(ck: &Checkpoint, t: &TensorEntry) -> bool {
    t.name
        .strip_suffix("_scale_inv")
        .and_then(|w| ck.get(w))
        .is_some_and(|w| w.dtype == safetensors::Dtype::F8_E4M3)
}

/// The block scales of an F8_E4M3 weight (None for any other dtype); an FP8 weight without
/// a valid `_scale_inv` is an error.
fn fp8_scale(ck: &Checkpoint, t: &TensorEntry) -> Result<Option<BlockScale>> {
    if t.dtype != safetensors::Dtype::F8_E4M3 {
        return Ok(None);
    }
    let block = ck
        .config()
        .and_then(|c| c.pointer("/quantization_config/weight_block_size"))
        .and_then(|b| serde_json::from_value::<[usize; 2]>(b.clone()).ok())
        .filter(|b| b[0] > 0 && b[1] > 0)
        .unwrap_or(fp8::DEFAULT_BLOCK);
    let name = format!("{}_scale_inv", t.name);
    let scale = ck.get(&name).ok_or_else(|| {
        Error::tensor(
            ck.path_of(t),
            &t.name,
            format!("F8_E4M3 without `{name}`: phlora reads FP8 weights with block scales (DeepSeek-V3 style) only"),
        )
    })?;
    if scale.dtype != safetensors::Dtype::F32 || !fp8::scale_shape_ok(&t.shape, &scale.shape, block)
    {
        return Err(Error::tensor(
            ck.path_of(scale),
            &name,
            format!(
                "{:?} {:?} does not scale {:?} in {}×{} blocks (expected F32 [⌈rows/{}⌉, ⌈cols/{}⌉])",
                scale.dtype, scale.shape, t.shape, block[0], block[1], block[0], block[1]
            ),
        ));
    }
    Ok(Some(BlockScale {
        scale: scale.clone(),
        block,
    }))
}

/// A GPT-2-family checkpoint (its config says so), whose linear layers are Conv1D.
fn is_gpt2(config: Option<&serde_json::Value>) -> bool {
    config.is_some_and(|c| {
        c.get("model_type").and_then(|m| m.as_str()) == Some("gpt2")
            || c.get("architectures")
                .and_then(|a| a.as_array())
                .is_some_and(|a| {
                    a.iter()
                        .any(|x| x.as_str().is_some_and(|s| s.starts_with("GPT2")))
                })
    })
}

/// Classifies a float tensor by its name and shape.
pub fn classify(name: &str, shape: &[usize], opts: &PlanOptions) -> Action {
    let module = module_of(name);
    let param = last_segment(name);
    match shape.len() {
        2 if param == "weight" => {
            let m = last_segment(module);
            if m.contains("embed") || m == "wte" || m == "wpe" {
                if opts.embeddings {
                    Action::LoraEmbedding
                } else {
                    Action::NotCarried("embedding left out by --no-embeddings".into())
                }
            } else {
                Action::LoraLinear
            }
        }
        3 if is_fused_experts(name) => Action::LoraLinear,
        3..=5 if param == "weight" && shape[1] == 1 && shape[0] > 1 => Action::NotCarried(
            "looks like a depthwise convolution (one input channel per filter): PEFT's conv LoRA needs groups = 1".into(),
        ),
        3..=5 if param == "weight" => Action::LoraLinear,
        1 if is_norm_module(module) => {
            if opts.norms {
                Action::SaveWhole
            } else {
                Action::NotCarried(
                    "norm left out (--no-norms, or a --target without modules_to_save)".into(),
                )
            }
        }
        1 => Action::NotCarried("1-D parameter (a bias); a LoRA cannot carry it".into()),
        0 => Action::NotCarried("scalar parameter".into()),
        2 => Action::NotCarried(format!("2-D tensor `{param}` that is not a layer weight")),
        n => Action::NotCarried(format!("{n}-D tensor; not supported yet")),
    }
}

/// A shell-style pattern over full tensor names: `*` matches any run of characters (dots
/// included), `?` one character; everything else matches itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.to_string())
    }

    pub fn matches(&self, name: &str) -> bool {
        let (p, s): (Vec<char>, Vec<char>) = (self.0.chars().collect(), name.chars().collect());
        // Iterative wildcard matching with one backtrack point: linear in practice.
        let (mut pi, mut si) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
                pi += 1;
                si += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, si));
                pi += 1;
            } else if let Some((sp, ss)) = star {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        let g = Glob::new("*.self_attn.*");
        assert!(g.matches("model.layers.0.self_attn.q_proj.weight"));
        assert!(!g.matches("model.layers.0.mlp.up_proj.weight"));
        assert!(Glob::new("model.layers.1?.*").matches("model.layers.12.mlp.up_proj.weight"));
        assert!(!Glob::new("model.layers.1?.*").matches("model.layers.1.mlp.up_proj.weight"));
        assert!(Glob::new("lm_head.weight").matches("lm_head.weight"));
        assert!(!Glob::new("lm_head").matches("lm_head.weight"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("a*b*c").matches("aXXbYYc"));
        assert!(!Glob::new("a*b*c").matches("aXXbYY"));
    }

    #[test]
    fn classification_follows_llama_naming() {
        let o = PlanOptions {
            embeddings: true,
            norms: true,
            lora_bias: false,
            ..Default::default()
        };
        assert_eq!(
            classify("model.layers.0.self_attn.q_proj.weight", &[8, 8], &o),
            Action::LoraLinear
        );
        assert_eq!(
            classify("lm_head.weight", &[100, 8], &o),
            Action::LoraLinear
        );
        assert_eq!(
            classify("model.embed_tokens.weight", &[100, 8], &o),
            Action::LoraEmbedding
        );
        assert_eq!(
            classify("model.layers.0.input_layernorm.weight", &[8], &o),
            Action::SaveWhole
        );
        assert_eq!(classify("model.norm.weight", &[8], &o), Action::SaveWhole);
        assert_eq!(
            classify("transformer.ln_f.bias", &[8], &o),
            Action::SaveWhole
        );
        assert!(matches!(
            classify("model.layers.0.self_attn.q_proj.bias", &[8], &o),
            Action::NotCarried(_)
        ));
        assert_eq!(
            classify("x.experts.gate_up_proj", &[2, 8, 8], &o),
            Action::LoraLinear
        );
        assert_eq!(
            classify("conv.weight", &[8, 3, 3, 3], &o),
            Action::LoraLinear
        );
        assert!(matches!(
            classify("conv.weight", &[8, 1, 4], &o),
            Action::NotCarried(_)
        ));
        assert!(matches!(
            classify("x.experts.gate_up_proj_bias", &[2, 8], &o),
            Action::NotCarried(_)
        ));
        let o2 = PlanOptions::default();
        assert!(matches!(
            classify("model.embed_tokens.weight", &[100, 8], &o2),
            Action::NotCarried(_)
        ));
        assert!(matches!(
            classify("model.norm.weight", &[8], &o2),
            Action::NotCarried(_)
        ));
    }
}
