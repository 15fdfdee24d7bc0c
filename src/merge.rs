//! `merge`: base + adapter → a full checkpoint in the base's own layout. Every shard keeps its
//! name, header and byte layout (dtypes and shapes do not change, so neither do the offsets);
//! a LoRA target becomes W_base + scaling·B·A rounded to its dtype, a module saved whole
//! replaces the base tensor, and every other byte is copied as it is. Shards stream through a
//! staging folder inside OUT and are moved in, the index or single file and config.json last,
//! so OUT never looks complete before it is.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::adapter::read::{update_rows, Adapter, LoraModule};
use crate::checkpoint::dtype::{decode_into, encode_into};
use crate::checkpoint::{Checkpoint, TensorEntry, INDEX_FILE};
use crate::error::{Error, Result};
use crate::staging::StagedOutput;

#[derive(Clone, Debug)]
pub struct MergeSettings {
    pub base: PathBuf,
    pub adapter: PathBuf,
    pub out: PathBuf,
    /// Replace a checkpoint already in OUT.
    pub overwrite: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct MergeReport {
    pub out: String,
    pub shards: usize,
    /// Tensors that took the adapter's update.
    pub merged: usize,
    /// Tensors replaced by the adapter's whole copy (modules_to_save).
    pub replaced: usize,
    /// Bytes written to the shards.
    pub bytes: u64,
    /// Other files of the base folder copied over (config, tokenizer, ...).
    pub copied_files: Vec<String>,
    pub seconds: f64,
}

/// What happens to one tensor.
enum Change<'a> {
    Lora(&'a LoraModule),
    Whole(&'a TensorEntry),
    /// The layer's bias plus scaling·lora_B.bias.
    Bias(&'a LoraModule),
    /// A per-expert weight inside a fused module (`--fuse-experts`): its rows, from `offset`,
    /// of expert `expert`'s update.
    ExpertPart(&'a LoraModule, usize, usize),
}

/// Weights in other formats would be stale next to the merged shards: not copied.
fn is_other_weights(name: &str) -> bool {
    [
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".gguf",
        ".safetensors",
    ]
    .iter()
    .any(|ext| name.ends_with(ext))
        || name == INDEX_FILE
        || name.starts_with(".phlora-")
}

pub fn merge(s: &MergeSettings) -> Result<MergeReport> {
    let started = Instant::now();
    let base = Checkpoint::open(&s.base)?;
    let mut adapter = Adapter::open(&s.adapter)?;
    adapter.set_experts_layout(crate::plan::experts_in_out(base.config()));
    if adapter.added.is_some() {
        return Err(Error::checkpoint(
            s.adapter.join(crate::adapter::ADDED_TOKENS_FILE),
            "the adapter grows the vocabulary (added tokens), and merge does not resize a checkpoint yet; load it with PEFT after resizing the base's embeddings (README: added tokens)",
        ));
    }
    let mut changes: HashMap<&str, Change> = HashMap::new();
    // Fused modules whose experts the base stores one by one.
    for t in base.tensors().iter().filter(|t| t.shape.len() == 2) {
        if let Some((m, e, offset)) = adapter.expert_part(&t.name, t.shape[0], t.shape[1]) {
            if base.get(&m.param).is_none() && t.float_dtype().is_some() {
                changes.insert(t.name.as_str(), Change::ExpertPart(m, e, offset));
            }
        }
    }
    let by_parts: std::collections::HashSet<&str> = changes
        .values()
        .filter_map(|c| match c {
            Change::ExpertPart(m, _, _) => Some(m.param.as_str()),
            _ => None,
        })
        .collect();
    for m in &adapter.modules {
        let name = m.param.clone();
        if by_parts.contains(name.as_str()) {
            continue;
        }
        // A tied lm_head's LoRA updates the embedding matrix the model reuses: the embedding's
        // own LoRA carries the same change into the one stored matrix.
        let tied = crate::plan::tied_counterpart(&base, &name, &Adapter::weight_shape(m));
        if base.get(&name).is_none()
            && tied.is_some_and(|t| adapter.modules.iter().any(|e| e.param == t.name))
        {
            tracing::info!(
                "{}: the base ties it to its embeddings; merged through the embedding's LoRA",
                m.module
            );
            continue;
        }
        let t = base.get(&name).ok_or_else(|| {
            Error::tensor(
                adapter.file.path_of(&m.a),
                &m.module,
                format!("the base has no `{name}` to merge into"),
            )
        })?;
        if t.shape.as_slice() != Adapter::weight_shape(m) || t.float_dtype().is_none() {
            return Err(Error::tensor(
                adapter.file.path_of(&m.a),
                &m.module,
                format!(
                    "B·A is {:?}; the base's `{name}` is {:?} {:?}",
                    Adapter::weight_shape(m),
                    t.dtype,
                    t.shape
                ),
            ));
        }
        changes.insert(t.name.as_str(), Change::Lora(m));
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
            changes.insert(t.name.as_str(), Change::Bias(m));
        }
    }
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

    let staging = StagedOutput::create(
        &s.out,
        "merge",
        &[INDEX_FILE, crate::checkpoint::SINGLE_FILE, "config.json"],
        "it",
        s.overwrite,
    )?;
    let folder = std::fs::metadata(&s.base)
        .map(|m| m.is_dir())
        .unwrap_or(false);
    let mut report = MergeReport {
        out: s.out.display().to_string(),
        shards: base.num_shards(),
        merged: changes
            .values()
            .filter(|c| {
                matches!(
                    c,
                    Change::Lora(_) | Change::Bias(_) | Change::ExpertPart(..)
                )
            })
            .count(),
        replaced: changes
            .values()
            .filter(|c| matches!(c, Change::Whole(_)))
            .count(),
        bytes: 0,
        copied_files: Vec::new(),
        seconds: 0.0,
    };
    let mut by_shard: Vec<Vec<&TensorEntry>> = vec![Vec::new(); base.num_shards()];
    for t in base.tensors() {
        if changes.contains_key(t.name.as_str()) {
            by_shard[t.shard].push(t);
        }
    }
    // Files by name, in the order they move into OUT.
    let mut moves: Vec<PathBuf> = Vec::new();
    for (i, changed) in by_shard.iter_mut().enumerate() {
        changed.sort_by_key(|t| t.start);
        let name = PathBuf::from(base.shard_path(i).file_name().expect("a shard is a file"));
        let dst = staging.dir().join(&name);
        report.bytes += write_shard(&base, &adapter, i, changed, &changes, &dst)?;
        moves.push(name);
    }
    // The other files of the model folder (config, tokenizer, generation config, ...).
    let mut last = Vec::new();
    if folder {
        let entries =
            std::fs::read_dir(&s.base).map_err(|e| Error::io(&s.base, "cannot list", e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(&s.base, "cannot list", e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
            if !is_file || is_other_weights(&name) {
                continue;
            }
            let dst = staging.dir().join(&name);
            std::fs::copy(e.path(), &dst).map_err(|err| Error::io(e.path(), "cannot copy", err))?;
            report.copied_files.push(name.clone());
            if name == "config.json" {
                last.push(PathBuf::from(name))
            } else {
                moves.push(PathBuf::from(name))
            }
        }
        let index = s.base.join(INDEX_FILE);
        if index.is_file() {
            let dst = staging.dir().join(INDEX_FILE);
            std::fs::copy(&index, &dst).map_err(|e| Error::io(&index, "cannot copy", e))?;
            last.push(PathBuf::from(INDEX_FILE));
        }
    }
    report.copied_files.sort();
    // The index and config come last, and their older copies go first: they must not pair
    // with the new shards, even briefly.
    moves.extend(last.iter().cloned());
    staging.commit(&moves, &last)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Shard `i` with its changed tensors (sorted by offset) rewritten; every other byte, header
/// included, copied. Returns the bytes written.
fn write_shard(
    base: &Checkpoint,
    adapter: &Adapter,
    i: usize,
    changed: &[&TensorEntry],
    changes: &HashMap<&str, Change>,
    dst: &Path,
) -> Result<u64> {
    let src = base.shard_bytes(i);
    let file = File::create(dst).map_err(|e| Error::io(dst, "cannot create", e))?;
    let mut out = BufWriter::with_capacity(4 << 20, file);
    let write = |out: &mut BufWriter<File>, bytes: &[u8]| {
        out.write_all(bytes)
            .map_err(|e| Error::io(dst, "cannot write", e))
    };
    let mut at = 0;
    for t in changed {
        write(&mut out, &src[at..t.start])?;
        match changes[t.name.as_str()] {
            Change::Lora(m) => merged_tensor(base, adapter, t, m, &mut |b| write(&mut out, b))?,
            Change::ExpertPart(m, e, offset) => {
                let td = t.float_dtype().expect("checked");
                let (a, b) = adapter.factors(m);
                let update = update_rows(m, &a, &b, e, e + 1);
                let mut w = vec![0f32; t.numel()];
                decode_into(td, base.bytes(t), &mut w);
                let cols = t.shape[1];
                for (x, u) in w.iter_mut().zip(&update[offset * cols..]) {
                    *x += u;
                }
                let mut bytes = Vec::with_capacity(t.nbytes());
                encode_into(td, &w, &mut bytes);
                write(&mut out, &bytes)?;
            }
            Change::Bias(m) => {
                let lb = m.bias.as_ref().expect("only modules with a bias");
                let (ld, td) = (
                    lb.float_dtype().expect("checked"),
                    t.float_dtype().expect("checked"),
                );
                let (mut w, mut d) = (vec![0f32; t.numel()], vec![0f32; t.numel()]);
                decode_into(td, base.bytes(t), &mut w);
                decode_into(ld, adapter.file.bytes(lb), &mut d);
                for (x, y) in w.iter_mut().zip(&d) {
                    *x += m.scaling as f32 * y;
                }
                let mut bytes = Vec::with_capacity(t.nbytes());
                encode_into(td, &w, &mut bytes);
                write(&mut out, &bytes)?;
            }
            Change::Whole(w) => {
                let (wd, td) = (
                    w.float_dtype().expect("checked"),
                    t.float_dtype().expect("checked"),
                );
                if wd == td {
                    write(&mut out, adapter.file.bytes(w))?;
                } else {
                    let mut v = vec![0f32; w.numel()];
                    decode_into(wd, adapter.file.bytes(w), &mut v);
                    let mut bytes = Vec::with_capacity(t.nbytes());
                    encode_into(td, &v, &mut bytes);
                    write(&mut out, &bytes)?;
                }
            }
        }
        base.release(t);
        at = t.end;
    }
    write(&mut out, &src[at..])?;
    let file = out
        .into_inner()
        .map_err(|e| Error::io(dst, "cannot write", e.into_error()))?;
    file.sync_all()
        .map_err(|e| Error::io(dst, "cannot sync", e))?;
    Ok(src.len() as u64)
}

/// W_base + scaling·B·A in the base's dtype, in blocks of rows computed in parallel.
fn merged_tensor(
    base: &Checkpoint,
    adapter: &Adapter,
    t: &TensorEntry,
    m: &LoraModule,
    write: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let dtype = t.float_dtype().expect("checked");
    // Rows along the first axis (a fused parameter's: its experts).
    let rows = t.shape[0];
    let cols = t.numel() / rows.max(1);
    let (a, b) = adapter.factors(m);
    let bytes = base.bytes(t);
    let step = ((1 << 18) / cols.max(1)).clamp(1, rows.max(1));
    // 64 blocks at a time: bounded memory, all cores busy.
    let blocks: Vec<usize> = (0..rows.div_ceil(step)).collect();
    for group in blocks.chunks(64) {
        let encoded: Vec<Vec<u8>> = group
            .par_iter()
            .map(|&c| {
                let (r0, r1) = (c * step, ((c + 1) * step).min(rows));
                let mut w = vec![0f32; (r1 - r0) * cols];
                decode_into(
                    dtype,
                    &bytes[r0 * cols * dtype.size()..r1 * cols * dtype.size()],
                    &mut w,
                );
                for (x, u) in w.iter_mut().zip(update_rows(m, &a, &b, r0, r1)) {
                    *x += u;
                }
                let mut out = Vec::with_capacity(w.len() * dtype.size());
                encode_into(dtype, &w, &mut out);
                out
            })
            .collect();
        for e in &encoded {
            write(e)?;
        }
    }
    Ok(())
}
