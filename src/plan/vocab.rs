//! The vocabulary matrices: tied lm_heads (a checkpoint that stores none) and vocabularies that
//! grew (added tokens).

use super::{Action, Form, PlanItem, PlanOptions};
use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::error::{Error, Result};
use crate::names::{last_segment, module_of};

/// An embedding or output matrix whose fine-tune has more rows than the base (added tokens).
/// The LoRA covers the rows both share (its factors are zero-padded to the fine-tune's rows,
/// the shape of the resized model's matrix); the new rows are written whole beside it.
#[derive(Clone, Debug)]
pub struct AddedRows {
    /// The fine-tune's whole tensor.
    pub ft: TensorEntry,
    /// Rows both checkpoints have: the base's.
    pub base_rows: usize,
}

impl AddedRows {
    /// The fine-tune's (the resized model's) row count.
    pub fn ft_rows(&self) -> usize {
        self.ft.shape[0]
    }
}

/// A token embedding or output matrix: its rows are the vocabulary.
pub(super) fn is_vocabulary_matrix(name: &str) -> bool {
    let m = last_segment(module_of(name));
    name.ends_with(".weight")
        && !m.contains("position")
        && (m.contains("embed") || m == "wte" || m == "lm_head")
}

/// The fine-tune's side of a pair, as the item reads it: the tensor itself when the shapes
/// agree; with `--added-tokens`, a view of the rows both share of a vocabulary matrix that
/// grew. Any other mismatch is an error that names the tensor.
pub(super) fn pair_shapes(
    base: &Checkpoint,
    b: &TensorEntry,
    ft: &Checkpoint,
    f: &TensorEntry,
    opts: &PlanOptions,
) -> Result<(TensorEntry, Option<AddedRows>)> {
    if b.shape == f.shape {
        return Ok((f.clone(), None));
    }
    let grew = is_vocabulary_matrix(&f.name)
        && f.shape.len() == 2
        && b.shape.len() == 2
        && f.shape[1] == b.shape[1]
        && f.shape[0] > b.shape[0];
    let why = if !grew {
        String::new()
    } else if opts.added_tokens {
        let size = f.float_dtype().map(|d| d.size()).ok_or_else(|| {
            Error::tensor(
                ft.path_of(f),
                &f.name,
                format!(
                    "--added-tokens reads F32, F16 and BF16 embeddings, not {:?}",
                    f.dtype
                ),
            )
        })?;
        let base_rows = b.shape[0];
        let view = TensorEntry {
            shape: b.shape.clone(),
            end: f.start + base_rows * f.shape[1] * size,
            ..f.clone()
        };
        return Ok((
            view,
            Some(AddedRows {
                ft: f.clone(),
                base_rows,
            }),
        ));
    } else {
        format!(
            ": the vocabulary grew by {} rows (added tokens?), and a LoRA cannot carry new rows; pass --added-tokens to carry the shared rows as LoRA and write the new rows to {} (docs/models.md: added tokens)",
            f.shape[0] - b.shape[0],
            crate::names::ADDED_TOKENS_FILE
        )
    };
    Err(Error::tensor(
        ft.path_of(f),
        &f.name,
        format!(
            "shape {:?} in the fine-tune but {:?} in the base ({}){why}",
            f.shape,
            b.shape,
            base.path_of(b).display(),
        ),
    ))
}

/// For `lm_head.weight` missing from a checkpoint that ties it to its embeddings: that
/// checkpoint's embedding matrix of the same width (the callers compare the rows: a vocabulary
/// may have grown).
pub fn tied_counterpart<'a>(
    ck: &'a Checkpoint,
    name: &str,
    shape: &[usize],
) -> Option<&'a TensorEntry> {
    if last_segment(module_of(name)) != "lm_head" || !name.ends_with(".weight") {
        return None;
    }
    ck.tensors().iter().find(|t| {
        (t.name.ends_with("embed_tokens.weight") || t.name.ends_with("wte.weight"))
            && t.shape.len() == shape.len()
            && t.shape.get(1..) == shape.get(1..)
    })
}

/// For a causal LM whose config ties the output layer to the embeddings and whose checkpoints
/// store no `lm_head.weight`: an lm_head target whose ΔW is the embedding's.
pub(super) fn tied_output_item(
    base: &Checkpoint,
    ft: &Checkpoint,
    items: &[PlanItem],
) -> Option<PlanItem> {
    const LM_HEAD: &str = "lm_head.weight";
    if base.get(LM_HEAD).is_some() || ft.get(LM_HEAD).is_some() {
        return None;
    }
    let config = ft.config().or(base.config())?;
    let tied = config
        .get("tie_word_embeddings")
        .and_then(|t| t.as_bool())
        .unwrap_or(true);
    let lm = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .any(|s| s.ends_with("ForCausalLM") || s.ends_with("LMHeadModel"))
        });
    let emb = items.iter().find(|i| {
        i.action == Action::LoraEmbedding
            && (i.name.ends_with("embed_tokens.weight") || i.name.ends_with("wte.weight"))
    })?;
    (tied && lm).then(|| PlanItem {
        base_scale: emb.base_scale.clone(),
        ft_scale: emb.ft_scale.clone(),
        added: emb.added.clone(),
        name: LM_HEAD.to_string(),
        module: module_of(LM_HEAD).to_string(),
        shape: emb.shape.clone(),
        base: emb.base.clone(),
        ft: emb.ft.clone(),
        action: Action::LoraLinear,
        note: Some(format!(
            "tied to `{}`: the output layer changes with it, and a LoRA on the embedding alone does not reach it",
            emb.name
        )),
        form: Form::Matrix,
        remove_logit_shift: false,
    })
}

/// Config keys of transformations between lm_head and the softmax that a shift of every
/// logit by the same amount does not commute with (Gemma 2's tanh soft-capping).
const LOGIT_SOFTCAPS: [&str; 2] = ["final_logit_softcapping", "logit_softcapping"];

/// Whether lm_head's logit shift can be removed without changing any probability: a causal
/// LM's own output head (not one tied to the embedding, whose factors are the embedding's),
/// on the vocabulary both models share, with softmax applied to the raw logits (a constant
/// scale such as Cohere's `logit_scale` keeps a shift a shift; soft-capping does not).
pub(super) fn logit_shift_removable(item: &PlanItem, config: Option<&serde_json::Value>) -> bool {
    let capped = config.is_some_and(|c| {
        LOGIT_SOFTCAPS
            .iter()
            .any(|k| c.get(k).is_some_and(|v| !v.is_null()))
            || c.get("text_config").is_some_and(|t| {
                LOGIT_SOFTCAPS
                    .iter()
                    .any(|k| t.get(k).is_some_and(|v| !v.is_null()))
            })
    });
    item.action == Action::LoraLinear
        && last_segment(&item.module) == "lm_head"
        && item.form == Form::Matrix
        && item.added.is_none()
        && !item.is_tied_copy()
        && !capped
}

/// Marks the output heads whose logit shift is removed (`PlanOptions::remove_logit_shift`),
/// saying why where one is kept.
pub(super) fn mark_logit_shift(items: &mut [PlanItem], base: &Checkpoint, ft: &Checkpoint) {
    let config = ft.config().or(base.config());
    for item in items.iter_mut() {
        if logit_shift_removable(item, config) {
            item.remove_logit_shift = true;
        } else if item.action == Action::LoraLinear && last_segment(&item.module) == "lm_head" {
            tracing::debug!(
                "{}: logit shift kept (tied, added rows or soft-capped logits)",
                item.name
            );
        }
    }
}
