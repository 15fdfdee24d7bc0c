//! Merging an adapter that changes a checkpoint's layout: a vocabulary grown by added tokens
//! (`added_tokens.safetensors`), and an lm_head the base ties to its embeddings but the adapter
//! updates on its own (the fine-tune untied it), which becomes a stored tensor. Shards with such
//! a change get a new header; the config and index are updated to match.

use std::collections::BTreeMap;

use crate::adapter::read::{Adapter, LoraModule};
use crate::checkpoint::TensorEntry;
use crate::error::{Error, Result};

/// The tied lm_head the merged checkpoint stores: the base's embedding plus lm_head's own
/// update, and the fine-tune's new lm_head rows when the vocabulary grew.
pub(super) struct UntiedHead<'a> {
    pub lora: &'a LoraModule,
    /// The base's embedding it starts from.
    pub emb: &'a TensorEntry,
    /// New rows (the adapter's added lm_head rows, else the embedding's).
    pub added: Option<&'a TensorEntry>,
}

pub(super) const LM_HEAD: &str = "lm_head.weight";

/// True when `head`'s factors are exactly the embedding LoRA's transposed (what extract writes
/// for an lm_head tied in both checkpoints): the embedding's own update then carries it.
pub(super) fn is_embedding_transposed(adapter: &Adapter, head: &LoraModule, emb: &str) -> bool {
    let Some(e) = adapter
        .modules
        .iter()
        .find(|m| m.param == emb && m.embedding)
    else {
        return false;
    };
    let ((ha, hb), (ea, eb)) = (adapter.factors(head), adapter.factors(e));
    // lm_head A [r, dim] = embedding Bᵀ ([dim, r]); lm_head B [vocab, r] = embedding Aᵀ.
    head.scaling == e.scaling
        && (ha.nrows(), ha.ncols()) == (eb.ncols(), eb.nrows())
        && (hb.nrows(), hb.ncols()) == (ea.ncols(), ea.nrows())
        && (0..ha.nrows()).all(|k| (0..ha.ncols()).all(|j| ha[(k, j)] == eb[(j, k)]))
        && (0..hb.nrows()).all(|i| (0..hb.ncols()).all(|k| hb[(i, k)] == ea[(k, i)]))
}

/// The adapter's added rows for `name`, if they grow `t` to `rows` rows.
pub(super) fn added_rows<'a>(
    adapter: &'a Adapter,
    name: &str,
    t: &TensorEntry,
    rows: usize,
) -> Option<&'a TensorEntry> {
    let a = adapter.added.as_ref()?.get(name)?;
    (t.shape.len() == 2 && a.shape[1] == t.shape[1] && t.shape[0] + a.shape[0] == rows).then_some(a)
}

/// A shard's header with some tensors' row counts changed (`rows`, by name) and `appended`
/// (name, dtype of `like`, shape) after the last tensor; offsets follow the shard's data order.
/// Returns the header bytes (length prefix included, padded to 8) and where the old data
/// starts.
pub(super) fn rewritten_header(
    path: &std::path::Path,
    src: &[u8],
    in_order: &[&TensorEntry],
    rows: &BTreeMap<&str, usize>,
    appended: Option<(&str, &TensorEntry, Vec<usize>)>,
) -> Result<(Vec<u8>, usize)> {
    let bad = |m: &str| Error::checkpoint(path, format!("cannot rewrite the header: {m}"));
    let n = u64::from_le_bytes(src[..8].try_into().map_err(|_| bad("too short"))?) as usize;
    let mut json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&src[8..8 + n]).map_err(|e| bad(&e.to_string()))?;
    let dtype_of = |t: &TensorEntry| {
        json.get(&t.name)
            .and_then(|e| e.get("dtype"))
            .cloned()
            .ok_or_else(|| bad(&format!("`{}` is not in it", t.name)))
    };
    // (name, dtype, shape, bytes per element) in data order.
    let mut entries = Vec::new();
    for t in in_order {
        let mut shape = t.shape.clone();
        if let Some(&r) = rows.get(t.name.as_str()) {
            shape[0] = r;
        }
        let elem = (t.end - t.start) / t.numel().max(1);
        entries.push((t.name.clone(), dtype_of(t)?, shape, elem));
    }
    if let Some((name, like, shape)) = appended {
        let elem = (like.end - like.start) / like.numel().max(1);
        entries.push((name.to_string(), dtype_of(like)?, shape, elem));
    }
    let mut offset = 0usize;
    for (name, dtype, shape, elem) in entries {
        let nbytes = shape.iter().product::<usize>() * elem;
        let entry = serde_json::json!({
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        });
        offset += nbytes;
        json.insert(name, entry);
    }
    let mut text = serde_json::to_string(&json).expect("a JSON map serializes");
    while (text.len() + 8) % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    Ok((out, 8 + n))
}

/// config.json with the merged model's vocabulary and tying.
pub(super) fn updated_config(
    text: &str,
    vocab: Option<usize>,
    untied: bool,
) -> std::result::Result<String, serde_json::Error> {
    let mut c: serde_json::Value = serde_json::from_str(text)?;
    if let Some(obj) = c.as_object_mut() {
        if let Some(v) = vocab {
            obj.insert("vocab_size".into(), v.into());
        }
        if untied {
            obj.insert("tie_word_embeddings".into(), false.into());
        }
    }
    Ok(serde_json::to_string_pretty(&c).expect("JSON serializes"))
}

/// The index with lm_head's shard added and the total size grown by `extra` bytes.
pub(super) fn updated_index(
    text: &str,
    head_shard: Option<&str>,
    extra: u64,
) -> std::result::Result<String, serde_json::Error> {
    let mut c: serde_json::Value = serde_json::from_str(text)?;
    if let Some(total) = c.pointer_mut("/metadata/total_size") {
        if let Some(t) = total.as_u64() {
            *total = (t + extra).into();
        }
    }
    if let (Some(shard), Some(map)) = (
        head_shard,
        c.get_mut("weight_map").and_then(|m| m.as_object_mut()),
    ) {
        map.insert(LM_HEAD.into(), shard.into());
    }
    Ok(serde_json::to_string_pretty(&c).expect("JSON serializes"))
}
