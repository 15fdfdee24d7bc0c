//! `--added-tokens`: a fine-tune whose vocabulary grew. Its LoRA covers the rows both
//! checkpoints share (the planner views them, the job pads the factors to the resized shape);
//! this writes the new rows whole, under the tensors' checkpoint names, to
//! `added_tokens.safetensors`, and copies the fine-tune's tokenizer files beside the adapter.

use std::collections::BTreeMap;
use std::path::Path;

use crate::adapter::{AdapterWriter, ADDED_TOKENS_FILE, TOKENIZER_FILES};
use crate::checkpoint::writer::{HeaderEntry, StreamWriter};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::plan::Plan;

/// Stages the new rows of every grown vocabulary matrix (a tied lm_head's are its embedding's,
/// written once) and the fine-tune's tokenizer files. Returns the files staged.
pub(super) fn stage(
    writer: &mut AdapterWriter,
    plan: &Plan,
    ft: &Checkpoint,
) -> Result<Vec<String>> {
    let grown: Vec<_> = plan
        .items
        .iter()
        .filter(|i| !i.is_tied_copy())
        .filter_map(|i| Some((i, i.added.as_ref()?)))
        .collect();
    let Some(&(first_item, first)) = grown.first() else {
        return Ok(Vec::new());
    };
    // One vocabulary: every grown matrix must agree on where the new tokens start and end.
    if let Some((i, a)) = grown
        .iter()
        .find(|(_, a)| (a.base_rows, a.ft_rows()) != (first.base_rows, first.ft_rows()))
    {
        return Err(Error::tensor(
            ft.path_of(&a.ft),
            &i.name,
            format!(
                "grows the vocabulary from {} to {} rows, but `{}` from {} to {}: added tokens must be the same rows everywhere",
                a.base_rows,
                a.ft_rows(),
                first_item.name,
                first.base_rows,
                first.ft_rows()
            ),
        ));
    }
    let mut entries = Vec::new();
    let mut rows: Vec<&[u8]> = Vec::new();
    for (item, a) in &grown {
        let dtype = a.ft.float_dtype().expect("checked by the planner");
        let row_bytes = a.ft.shape[1] * dtype.size();
        let bytes = &ft.bytes(&a.ft)[a.base_rows * row_bytes..];
        entries.push(HeaderEntry {
            name: item.name.clone(),
            dtype: dtype.as_str(),
            shape: vec![a.ft_rows() - a.base_rows, a.ft.shape[1]],
            nbytes: bytes.len(),
        });
        rows.push(bytes);
    }
    let meta: BTreeMap<String, String> = [
        ("format", "pt".to_string()),
        ("base_vocab_size", first.base_rows.to_string()),
        ("vocab_size", first.ft_rows().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    writer.add_file(ADDED_TOKENS_FILE, |path| {
        let mut out = StreamWriter::create(path, entries.clone(), &meta)?;
        for (e, bytes) in entries.iter().zip(&rows) {
            out.write(&e.name, bytes)?;
        }
        out.finish()
    })?;
    let mut staged = vec![ADDED_TOKENS_FILE.to_string()];
    // The new rows are useless without the tokenizer that knows the new tokens.
    let folder = ft.shard_path(0).parent().unwrap_or(Path::new("."));
    for name in TOKENIZER_FILES {
        let src = folder.join(name);
        if crate::checkpoint::input::kind(&src) == crate::checkpoint::input::Kind::File {
            writer.add_file(name, |dst| {
                std::fs::copy(&src, dst)
                    .map(drop)
                    .map_err(|e| Error::io(&src, "cannot copy", e))
            })?;
            staged.push(name.to_string());
        }
    }
    if staged.len() == 1 {
        tracing::warn!(
            "no tokenizer files beside {}: the adapter's new rows need the fine-tune's tokenizer",
            ft.root().display()
        );
    }
    Ok(staged)
}
