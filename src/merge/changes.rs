//! What a merge changes: for each base tensor the adapter touches, where its new value comes
//! from, checked against the base's names, shapes and dtypes before any byte is written.

use std::collections::{HashMap, HashSet};

use super::vocab::{self, UntiedHead, LM_HEAD};
use crate::adapter::read::{Adapter, LoraModule};
use crate::checkpoint::{Checkpoint, TensorEntry};
use crate::error::{Error, Result};

/// What happens to one tensor.
pub(super) enum Change<'a> {
    Lora(&'a LoraModule),
    Whole(&'a TensorEntry),
    /// The layer's bias plus scaling·lora_B.bias.
    Bias(&'a LoraModule),
    /// A per-expert weight inside a fused module (`--fuse-experts`): its rows, from `offset`,
    /// of expert `expert`'s update.
    ExpertPart(&'a LoraModule, usize, usize),
    /// A vocabulary matrix grown by the adapter's added rows (added tokens), with its update.
    Grown(Option<&'a LoraModule>, &'a TensorEntry),
}

/// Every change of a merge.
pub(super) struct Changes<'a> {
    /// By base tensor name.
    pub by_tensor: HashMap<&'a str, Change<'a>>,
    /// A tied lm_head the adapter updates on its own: the merged checkpoint stores it.
    pub untied: Option<UntiedHead<'a>>,
}

impl Changes<'_> {
    /// Tensors that take an update.
    pub fn merged(&self) -> usize {
        self.by_tensor
            .values()
            .filter(|c| {
                matches!(
                    c,
                    Change::Lora(_) | Change::Bias(_) | Change::ExpertPart(..)
                )
            })
            .count()
    }

    /// Tensors replaced by the adapter's whole copy.
    pub fn replaced(&self) -> usize {
        self.by_tensor
            .values()
            .filter(|c| matches!(c, Change::Whole(_)))
            .count()
    }
}

/// The changes `adapter` makes to `base`; an adapter tensor with no place in the base, or of
/// another shape or a non-float dtype, is an error naming it.
pub(super) fn plan<'a>(base: &'a Checkpoint, adapter: &'a Adapter) -> Result<Changes<'a>> {
    let mut plan = Changes {
        by_tensor: expert_parts(base, adapter),
        untied: None,
    };
    let by_parts: HashSet<&str> = plan
        .by_tensor
        .values()
        .filter_map(|c| match c {
            Change::ExpertPart(m, _, _) => Some(m.param.as_str()),
            _ => None,
        })
        .collect();
    for m in &adapter.modules {
        if !by_parts.contains(m.param.as_str()) {
            module_change(base, adapter, m, &mut plan)?;
        }
    }
    whole_changes(base, adapter, &mut plan.by_tensor)?;
    added_row_changes(base, adapter, &mut plan)?;
    Ok(plan)
}

/// Fused modules whose experts the base stores one by one.
fn expert_parts<'a>(base: &'a Checkpoint, adapter: &'a Adapter) -> HashMap<&'a str, Change<'a>> {
    let mut changes = HashMap::new();
    for t in base.tensors().iter().filter(|t| t.shape.len() == 2) {
        if let Some((m, e, offset)) = adapter.expert_part(&t.name, t.shape[0], t.shape[1]) {
            if base.get(&m.param).is_none() && t.float_dtype().is_some() {
                changes.insert(t.name.as_str(), Change::ExpertPart(m, e, offset));
            }
        }
    }
    changes
}

/// One LoRA module's change: its weight (or a tied lm_head), and its lora_B.bias.
fn module_change<'a>(
    base: &'a Checkpoint,
    adapter: &'a Adapter,
    m: &'a LoraModule,
    plan: &mut Changes<'a>,
) -> Result<()> {
    let name = m.param.as_str();
    let shape = Adapter::weight_shape(m);
    if base.get(name).is_none() {
        if let Some(emb) = crate::plan::tied_counterpart(base, name, &shape) {
            if let Some(head) = untied_head(adapter, m, emb, &shape)? {
                plan.untied = Some(head);
            }
            return Ok(());
        }
    }
    let t = base.get(name).ok_or_else(|| {
        Error::tensor(
            adapter.file.path_of(&m.a),
            &m.module,
            format!("the base has no `{name}` to merge into"),
        )
    })?;
    let grown = vocab::added_rows(adapter, name, t, shape[0]);
    if (t.shape != shape && grown.is_none()) || t.float_dtype().is_none() {
        return Err(Error::tensor(
            adapter.file.path_of(&m.a),
            &m.module,
            format!(
                "B·A is {shape:?}; the base's `{name}` is {:?} {:?}{}",
                t.dtype,
                t.shape,
                if t.shape.first() < shape.first() {
                    " (the adapter's vocabulary is larger: its added_tokens.safetensors is missing or does not fit)"
                } else {
                    ""
                }
            ),
        ));
    }
    if let Some(added) = grown {
        plan.by_tensor
            .insert(t.name.as_str(), Change::Grown(Some(m), added));
        return Ok(());
    }
    plan.by_tensor.insert(t.name.as_str(), Change::Lora(m));
    if let Some(lb) = &m.bias {
        let name = format!("{}.bias", m.module);
        let t = base
            .get(&name)
            .filter(|t| t.shape == lb.shape && t.float_dtype().is_some());
        let t = t.ok_or_else(|| {
            Error::tensor(
                adapter.file.path_of(lb),
                &m.module,
                format!(
                    "has a lora_B.bias but the base has no `{name}` of shape {:?}",
                    lb.shape
                ),
            )
        })?;
        plan.by_tensor.insert(t.name.as_str(), Change::Bias(m));
    }
    Ok(())
}

/// A tied lm_head: the model reuses its embedding matrix there. When the lm_head LoRA is the
/// embedding's transposed (both checkpoints tie it), the embedding's own LoRA carries the
/// change into the one stored matrix (None); otherwise the fine-tune untied it, and the
/// merged checkpoint stores an lm_head of its own.
fn untied_head<'a>(
    adapter: &'a Adapter,
    m: &'a LoraModule,
    emb: &'a TensorEntry,
    shape: &[usize],
) -> Result<Option<UntiedHead<'a>>> {
    if vocab::is_embedding_transposed(adapter, m, &emb.name) {
        tracing::info!(
            "{}: the base ties it to its embeddings; merged through the embedding's LoRA",
            m.module
        );
        return Ok(None);
    }
    let added = adapter
        .added
        .as_ref()
        .and_then(|a| a.get(LM_HEAD).or_else(|| a.get(&emb.name)));
    let rows = emb.shape[0] + added.map_or(0, |a| a.shape[0]);
    if shape != [rows, emb.shape[1]] || emb.float_dtype().is_none() {
        return Err(Error::tensor(
            adapter.file.path_of(&m.a),
            &m.module,
            format!(
                "B·A is {shape:?}; the base's tied `{}` (with the added rows) is [{rows}, {}]",
                emb.name, emb.shape[1]
            ),
        ));
    }
    tracing::info!(
        "{}: the base ties it to `{}` but the adapter updates it on its own: the merged checkpoint stores it (tie_word_embeddings false)",
        m.module,
        emb.name
    );
    Ok(Some(UntiedHead {
        lora: m,
        emb,
        added,
    }))
}

/// Modules saved whole (modules_to_save): each replaces the base tensor of its name.
fn whole_changes<'a>(
    base: &'a Checkpoint,
    adapter: &'a Adapter,
    changes: &mut HashMap<&'a str, Change<'a>>,
) -> Result<()> {
    for (name, w) in &adapter.whole {
        let t = base.get(name).ok_or_else(|| {
            Error::tensor(
                adapter.file.path_of(w),
                name,
                "saved whole, but the base has no such tensor",
            )
        })?;
        if t.shape != w.shape || t.float_dtype().is_none() || w.float_dtype().is_none() {
            return Err(Error::tensor(
                adapter.file.path_of(w),
                name,
                format!(
                    "saved whole as {:?} {:?}; the base's is {:?} {:?}",
                    w.dtype, w.shape, t.dtype, t.shape
                ),
            ));
        }
        if changes.insert(t.name.as_str(), Change::Whole(w)).is_some() {
            return Err(Error::tensor(
                adapter.file.path_of(w),
                name,
                "has LoRA factors and a whole copy",
            ));
        }
    }
    Ok(())
}

/// Added rows of vocabulary matrices without a LoRA (their shared rows did not change).
fn added_row_changes<'a>(
    base: &'a Checkpoint,
    adapter: &'a Adapter,
    plan: &mut Changes<'a>,
) -> Result<()> {
    let Some(file) = &adapter.added else {
        return Ok(());
    };
    for a in file.tensors() {
        let head_rows = plan
            .untied
            .as_ref()
            .is_some_and(|u| u.added.is_some_and(|x| x.name == a.name));
        if plan.by_tensor.contains_key(a.name.as_str()) || head_rows {
            continue;
        }
        let t = base.get(&a.name).filter(|t| {
            t.float_dtype().is_some() && t.shape.len() == 2 && t.shape[1] == a.shape[1]
        });
        let t = t.ok_or_else(|| {
            Error::tensor(
                file.path_of(a),
                &a.name,
                format!(
                    "added rows {:?}, but the base has no such float matrix of that width",
                    a.shape
                ),
            )
        })?;
        plan.by_tensor
            .insert(t.name.as_str(), Change::Grown(None, a));
    }
    Ok(())
}
