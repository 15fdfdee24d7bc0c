//! `merge`: base + adapter → a full checkpoint in the base's own layout. Every shard keeps its
//! name, header and byte layout (dtypes and shapes do not change, so neither do the offsets);
//! a LoRA target becomes W_base + scaling·B·A rounded to its dtype, a module saved whole
//! replaces the base tensor, and every other byte is copied as it is. Shards stream through a
//! staging folder inside OUT and are moved in, the index or single file and config.json last,
//! so OUT never looks complete before it is.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::adapter::read::{update_rows, Adapter, LoraModule};
use crate::checkpoint::dtype::{decode_into, encode_into, first_non_finite};
use crate::checkpoint::input::{self, Kind};
use crate::checkpoint::{stacked_rows, Checkpoint, TensorEntry, INDEX_FILE};
use crate::error::{Error, Result};
use crate::staging::StagedOutput;

mod changes;
mod vocab;

use changes::{Change, Changes};
use vocab::{UntiedHead, LM_HEAD};

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

/// A checkpoint's weights: safetensors files and their index.
fn is_weights(name: &str) -> bool {
    name.ends_with(".safetensors") || name == INDEX_FILE
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

/// A side file to copy: a regular file (through symlinks). A FIFO or device is not copied
/// (it would block or never end), and said so; a subfolder is not part of the checkpoint.
fn copyable(path: &Path) -> bool {
    match input::kind(path) {
        Kind::File => true,
        Kind::Folder => false,
        Kind::Missing => {
            tracing::warn!("{}: a dangling symlink; not copied", path.display());
            false
        }
        Kind::Other => {
            tracing::warn!(
                "{}: not a regular file (a FIFO, socket or device); not copied",
                path.display()
            );
            false
        }
    }
}

pub fn merge(s: &MergeSettings) -> Result<MergeReport> {
    let started = Instant::now();
    crate::outdir::ensure_not_input(&s.out, &[(&s.base, "base"), (&s.adapter, "adapter")])?;
    let _lock = crate::outdir::OutLock::acquire(&s.out, "merge")?;
    let base = Checkpoint::open(&s.base)?;
    let mut adapter = Adapter::open(&s.adapter)?;
    adapter.set_experts_layout(crate::plan::experts_in_out(base.config()));
    let plan = changes::plan(&base, &adapter)?;
    let folder = std::fs::metadata(&s.base)
        .map(|m| m.is_dir())
        .unwrap_or(false);
    let staging = staged_output(s, &adapter, folder)?;
    let mut report = MergeReport {
        out: s.out.display().to_string(),
        shards: base.num_shards(),
        merged: plan.merged(),
        replaced: plan.replaced(),
        bytes: 0,
        copied_files: Vec::new(),
        seconds: 0.0,
    };
    let shards = write_shards(&base, &adapter, &plan, &staging)?;
    report.bytes = shards.bytes;
    // Files by name, in the order they move into OUT; the index and config last.
    let mut moves = shards.files.clone();
    let mut last = Vec::new();
    if folder {
        copy_side_files(
            s,
            &adapter,
            &plan,
            &shards,
            &staging,
            &mut report,
            &mut moves,
            &mut last,
        )?;
    }
    report.copied_files.sort();
    commit(s, staging, moves, last)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The staging folder inside OUT, and what its commit may replace there: weights, the index
/// and config, and the side files copied from the base folder (and the fine-tune's tokenizer,
/// with added tokens).
fn staged_output(s: &MergeSettings, adapter: &Adapter, folder: bool) -> Result<StagedOutput> {
    let side: std::collections::HashSet<String> = folder
        .then(|| std::fs::read_dir(&s.base).ok())
        .flatten()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .chain(
            if adapter.added.is_some() {
                crate::adapter::TOKENIZER_FILES
            } else {
                &[]
            }
            .iter()
            .map(|n| n.to_string()),
        )
        .collect();
    let replaces = |name: &str| {
        is_weights(name)
            || name == "config.json"
            || (side.contains(name) && !name.starts_with(".phlora-"))
    };
    let staging = StagedOutput::create(&s.out, "merge", &replaces, "it", s.overwrite)?;
    Ok(staging)
}

/// The shards as written into the staging folder.
struct WrittenShards {
    /// Their file names, in order.
    files: Vec<PathBuf>,
    bytes: u64,
    /// The shard an untied lm_head was appended to.
    head_shard: Option<String>,
    /// Data bytes the shards grew by (added rows, an untied lm_head).
    grown_bytes: u64,
    /// The vocabulary size to write into config.json, when it grew.
    vocab_size: Option<usize>,
}

/// Every shard of the base, its changed tensors merged, into the staging folder.
fn write_shards(
    base: &Checkpoint,
    adapter: &Adapter,
    plan: &Changes,
    staging: &StagedOutput,
) -> Result<WrittenShards> {
    let (changes, untied) = (&plan.by_tensor, &plan.untied);
    let mut by_shard: Vec<Vec<&TensorEntry>> = vec![Vec::new(); base.num_shards()];
    for t in base.tensors() {
        if changes.contains_key(t.name.as_str()) {
            by_shard[t.shard].push(t);
        }
    }
    // Tensors that grow (added tokens), by name: their new row counts.
    let grown_rows: BTreeMap<&str, usize> = changes
        .iter()
        .filter_map(|(&n, c)| match c {
            Change::Grown(_, a) => Some((n, base.get(n)?.shape[0] + a.shape[0])),
            _ => None,
        })
        .collect();
    let head_rows = untied
        .as_ref()
        .map(|u| u.emb.shape[0] + u.added.map_or(0, |a| a.shape[0]));
    let mut written = WrittenShards {
        files: Vec::new(),
        bytes: 0,
        head_shard: None,
        grown_bytes: 0,
        vocab_size: None,
    };
    for (i, changed) in by_shard.iter_mut().enumerate() {
        changed.sort_by_key(|t| t.start);
        let name = PathBuf::from(base.shard_path(i).file_name().expect("a shard is a file"));
        let dst = staging.dir().join(&name);
        // A shard whose layout changes gets a new header.
        let head = untied.as_ref().filter(|u| u.emb.shard == i);
        let header = if head.is_some()
            || changed
                .iter()
                .any(|t| grown_rows.contains_key(t.name.as_str()))
        {
            let mut in_order: Vec<&TensorEntry> =
                base.tensors().iter().filter(|t| t.shard == i).collect();
            in_order.sort_by_key(|t| t.start);
            let appended =
                head.map(|u| (LM_HEAD, u.emb, vec![head_rows.unwrap_or(0), u.emb.shape[1]]));
            Some(vocab::rewritten_header(
                base.shard_path(i),
                base.shard_bytes(i),
                &in_order,
                &grown_rows,
                appended,
            )?)
        } else {
            None
        };
        if head.is_some() {
            written.head_shard = Some(name.to_string_lossy().into_owned());
        }
        let (bytes, data_growth) =
            write_shard(base, adapter, i, changed, changes, header, head, &dst)?;
        written.bytes += bytes;
        written.grown_bytes += data_growth;
        written.files.push(name);
    }
    written.vocab_size = grown_rows
        .values()
        .copied()
        .max()
        .or(head_rows.filter(|_| untied.as_ref().is_some_and(|u| u.added.is_some())));
    Ok(written)
}

/// The other files of the model folder (config, tokenizer, generation config, ...), config.json
/// and the index updated when the vocabulary grew or an lm_head was untied; with added tokens,
/// the fine-tune's tokenizer in place of the base's. `last` gets the index and config.
#[allow(clippy::too_many_arguments)]
fn copy_side_files(
    s: &MergeSettings,
    adapter: &Adapter,
    plan: &Changes,
    shards: &WrittenShards,
    staging: &StagedOutput,
    report: &mut MergeReport,
    moves: &mut Vec<PathBuf>,
    last: &mut Vec<PathBuf>,
) -> Result<()> {
    let (untied, vocab_size) = (&plan.untied, shards.vocab_size);
    let (head_shard, grown_bytes) = (&shards.head_shard, shards.grown_bytes);
    let entries = std::fs::read_dir(&s.base).map_err(|e| Error::io(&s.base, "cannot list", e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(&s.base, "cannot list", e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        // Symlinks are followed (a Hugging Face cache snapshot is all symlinks).
        if is_other_weights(&name) || !copyable(&e.path()) {
            continue;
        }
        let dst = staging.dir().join(&name);
        if name == "config.json" && (vocab_size.is_some() || untied.is_some()) {
            let text = input::read_string(&e.path())?;
            let text = vocab::updated_config(&text, vocab_size, untied.is_some())
                .map_err(|err| Error::checkpoint(e.path(), format!("not valid JSON: {err}")))?;
            std::fs::write(&dst, text).map_err(|err| Error::io(&dst, "cannot write", err))?;
        } else {
            std::fs::copy(e.path(), &dst).map_err(|err| Error::io(e.path(), "cannot copy", err))?;
        }
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
        if head_shard.is_some() || grown_bytes > 0 {
            let text = input::read_string(&index)?;
            let text = vocab::updated_index(&text, head_shard.as_deref(), grown_bytes)
                .map_err(|e| Error::checkpoint(&index, format!("not valid JSON: {e}")))?;
            std::fs::write(&dst, text).map_err(|e| Error::io(&dst, "cannot write", e))?;
        } else {
            // Unchanged layout: the index as it is, byte for byte.
            std::fs::copy(&index, &dst).map_err(|e| Error::io(&index, "cannot copy", e))?;
        }
        last.push(PathBuf::from(INDEX_FILE));
    }
    // The fine-tune's tokenizer, which knows the added tokens, replaces the base's.
    if adapter.added.is_some() {
        for name in crate::adapter::TOKENIZER_FILES {
            let src = s.adapter.join(name);
            if copyable(&src) {
                let dst = staging.dir().join(name);
                std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, "cannot copy", e))?;
                if !report.copied_files.iter().any(|f| f == name) {
                    report.copied_files.push(name.to_string());
                    moves.push(PathBuf::from(name));
                }
            }
        }
    }
    Ok(())
}

/// Moves the staged files in: the index and config last, their older copies (and weights files
/// of another layout) unlinked first, so that none pairs with the new shards, even briefly.
fn commit(
    s: &MergeSettings,
    staging: StagedOutput,
    mut moves: Vec<PathBuf>,
    last: Vec<PathBuf>,
) -> Result<()> {
    moves.extend(last.iter().cloned());
    // Weights files of another layout (a single file where shards come, other shard names)
    // go too, the index first: beside the new ones, loaders would disagree on the model.
    let mut unlink_first = last.clone();
    let mut stale: Vec<PathBuf> = std::fs::read_dir(&s.out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| PathBuf::from(e.file_name()))
        .filter(|n| n.to_str().is_some_and(is_weights) && !moves.contains(n))
        .collect();
    stale.sort();
    unlink_first.extend(stale);
    staging.commit(&moves, &unlink_first)?;
    Ok(())
}

/// Fault injection for the signal tests: `PHLORA_TEST_MERGE_STALL_MS=N` sleeps N ms before
/// each merged tensor, so that a signal reliably lands midway.
fn test_stall() -> Option<std::time::Duration> {
    let ms = std::env::var("PHLORA_TEST_MERGE_STALL_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// Shard `i` with its changed tensors (sorted by offset) rewritten; every other byte, header
/// included, copied — or, when its layout changes, `header` (new bytes, where the old data
/// starts) and then an untied lm_head appended. Returns (bytes written, data bytes added).
#[allow(clippy::too_many_arguments)]
fn write_shard(
    base: &Checkpoint,
    adapter: &Adapter,
    i: usize,
    changed: &[&TensorEntry],
    changes: &HashMap<&str, Change>,
    header: Option<(Vec<u8>, usize)>,
    head: Option<&UntiedHead>,
    dst: &Path,
) -> Result<(u64, u64)> {
    let src = base.shard_bytes(i);
    let file = File::create(dst).map_err(|e| Error::io(dst, "cannot create", e))?;
    let mut out = BufWriter::with_capacity(4 << 20, file);
    let mut written = 0u64;
    let mut write = |bytes: &[u8]| {
        written += bytes.len() as u64;
        out.write_all(bytes)
            .map_err(|e| Error::io(dst, "cannot write", e))
    };
    let mut at = 0;
    let mut header_growth = 0i64;
    if let Some((h, data_start)) = &header {
        write(h)?;
        header_growth = h.len() as i64 - *data_start as i64;
        at = *data_start;
    }
    let stall = test_stall();
    for t in changed {
        crate::interrupt::check("the merged checkpoint")?;
        if let Some(pause) = stall {
            std::thread::sleep(pause);
        }
        write(&src[at..t.start])?;
        let change = &changes[t.name.as_str()];
        let mut put = checked(base, t, culprit(adapter, change), &mut write);
        merged_change(base, adapter, t, change, &mut put)?;
        base.release(t);
        at = t.end;
    }
    write(&src[at..])?;
    if let Some(u) = head {
        let mut put = checked(base, u.emb, tensor_of(adapter, &u.lora.b), &mut write);
        let rows = u.emb.shape[0] + u.added.map_or(0, |a| a.shape[0]);
        match (u.added, adapter.added.as_ref()) {
            (Some(added), Some(file)) => {
                let source =
                    |r0: usize, r1: usize| stacked_rows(base, u.emb, Some((file, added)), r0, r1);
                merged_rows(u.emb, rows, &source, Some((adapter, u.lora)), &mut put)?;
            }
            _ => {
                let source = |r0: usize, r1: usize| base.rows_f32(u.emb, r0, r1);
                merged_rows(u.emb, rows, &source, Some((adapter, u.lora)), &mut put)?;
            }
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| Error::io(dst, "cannot write", e.into_error()))?;
    file.sync_all()
        .map_err(|e| Error::io(dst, "cannot sync", e))?;
    let growth = written as i64 - src.len() as i64 - header_growth;
    Ok((written, growth.max(0) as u64))
}

/// The new bytes of one changed tensor `t`, written through `put`.
fn merged_change(
    base: &Checkpoint,
    adapter: &Adapter,
    t: &TensorEntry,
    change: &Change,
    put: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    match *change {
        Change::Lora(m) => merged_tensor(base, adapter, t, m, put)?,
        Change::Grown(m, added) => {
            let file = adapter.added.as_ref().expect("grown by the added rows");
            let rows = t.shape[0] + added.shape[0];
            let source = |r0: usize, r1: usize| stacked_rows(base, t, Some((file, added)), r0, r1);
            merged_rows(t, rows, &source, m.map(|m| (adapter, m)), put)?;
        }
        Change::ExpertPart(m, e, offset) => {
            let td = t.float_dtype().expect("checked");
            let update = adapter.expert_rows(m, e, offset, offset + t.shape[0]);
            let mut w = vec![0f32; t.numel()];
            decode_into(td, base.bytes(t), &mut w);
            for (x, u) in w.iter_mut().zip(&update) {
                *x += u;
            }
            let mut bytes = Vec::with_capacity(t.nbytes());
            encode_into(td, &w, &mut bytes);
            put(&bytes)?;
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
            put(&bytes)?;
        }
        Change::Whole(w) => {
            let (wd, td) = (
                w.float_dtype().expect("checked"),
                t.float_dtype().expect("checked"),
            );
            if wd == td {
                put(adapter.file.bytes(w))?;
            } else {
                let mut v = vec![0f32; w.numel()];
                decode_into(wd, adapter.file.bytes(w), &mut v);
                let mut bytes = Vec::with_capacity(t.nbytes());
                encode_into(td, &v, &mut bytes);
                put(&bytes)?;
            }
        }
    }
    Ok(())
}

/// The adapter tensor a change comes from (file, key): what a bad merged value is blamed on.
fn culprit(adapter: &Adapter, change: &Change) -> (PathBuf, String) {
    match change {
        Change::Lora(m) | Change::ExpertPart(m, ..) | Change::Grown(Some(m), _) => {
            tensor_of(adapter, &m.b)
        }
        Change::Bias(m) => tensor_of(adapter, m.bias.as_ref().expect("a bias change has one")),
        Change::Whole(w) => tensor_of(adapter, w),
        Change::Grown(None, rows) => (
            adapter
                .added
                .as_ref()
                .map_or_else(PathBuf::new, |f| f.path_of(rows).to_path_buf()),
            rows.name.clone(),
        ),
    }
}

fn tensor_of(adapter: &Adapter, t: &TensorEntry) -> (PathBuf, String) {
    (adapter.file.path_of(t).to_path_buf(), t.name.clone())
}

/// `write` for a changed tensor `t`, refusing bytes that hold a NaN or Inf in its dtype (a
/// merged checkpoint with one would look complete): blamed on the base when its own value
/// there is one already, else on the adapter tensor `culprit` whose update made it (too
/// large for the dtype: a huge lora_alpha, factors whose product overflows).
fn checked<'a>(
    base: &'a Checkpoint,
    t: &'a TensorEntry,
    (path, key): (PathBuf, String),
    write: &'a mut dyn FnMut(&[u8]) -> Result<()>,
) -> impl FnMut(&[u8]) -> Result<()> + 'a {
    let dtype = t.float_dtype().expect("merged tensors are float");
    let cols = t.numel() / t.shape.first().copied().unwrap_or(1).max(1);
    let own = base.bytes(t);
    let mut at = 0usize;
    move |bytes: &[u8]| {
        if let Some(i) = first_non_finite(dtype, bytes) {
            let e = at + i;
            let row = e / cols.max(1);
            let of_base = own
                .get(e * dtype.size()..(e + 1) * dtype.size())
                .is_some_and(|b| first_non_finite(dtype, b).is_some());
            return Err(if of_base {
                Error::tensor(
                    base.path_of(t),
                    &t.name,
                    format!("holds NaN or Inf at row {row} already; no merged checkpoint is written with it"),
                )
            } else {
                Error::tensor(
                    &path,
                    &key,
                    format!(
                        "its update makes `{}` NaN or Inf in {dtype} at row {row} (too large for the dtype: lora_alpha, or factors whose product overflows); no merged checkpoint is written",
                        t.name
                    ),
                )
            });
        }
        at += bytes.len() / dtype.size();
        write(bytes)
    }
}

/// W_base + scaling·B·A in the base's dtype, in blocks of rows computed in parallel (rows
/// along the first axis: a fused parameter's are its experts).
fn merged_tensor(
    base: &Checkpoint,
    adapter: &Adapter,
    t: &TensorEntry,
    m: &LoraModule,
    write: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let source = |r0: usize, r1: usize| base.rows_f32(t, r0, r1);
    merged_rows(t, t.shape[0], &source, Some((adapter, m)), write)
}

/// `rows` rows of a matrix shaped like `like` (its dtype, its row width): `source(r0, r1)`
/// gives them before the update, the LoRA's update is added where there is one, and the
/// result is written in `like`'s dtype — in blocks of rows computed in parallel, 64 at a time
/// (bounded memory, all cores busy).
fn merged_rows(
    like: &TensorEntry,
    rows: usize,
    source: &(dyn Fn(usize, usize) -> Vec<f32> + Sync),
    lora: Option<(&Adapter, &LoraModule)>,
    write: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let dtype = like.float_dtype().expect("checked");
    let cols = like.numel() / like.shape[0].max(1);
    let factors = lora.map(|(adapter, m)| (m, adapter.factors(m)));
    let step = ((1 << 18) / cols.max(1)).clamp(1, rows.max(1));
    let blocks: Vec<usize> = (0..rows.div_ceil(step)).collect();
    for group in blocks.chunks(64) {
        let encoded: Vec<Vec<u8>> = group
            .par_iter()
            .map(|&c| {
                let (r0, r1) = (c * step, ((c + 1) * step).min(rows));
                let mut w = source(r0, r1);
                if let Some((m, (a, b))) = &factors {
                    for (x, u) in w.iter_mut().zip(update_rows(m, a, b, r0, r1)) {
                        *x += u;
                    }
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
