//! Opening checkpoints: a model folder (one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`) or a single `.safetensors` file. Each shard is memory-mapped
//! once; tensors are zero-copy byte views into the maps. A whole model is never loaded.

pub mod dtype;
pub mod fp8;
pub mod input;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use crate::error::{Error, Result};
pub use dtype::DType;
use input::Kind;

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// One tensor of a checkpoint: where its bytes are and what they hold.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Index into the checkpoint's shards.
    pub shard: usize,
    /// Absolute byte range in the shard file.
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }

    /// The element type phlora can compute with, if it is one.
    pub fn float_dtype(&self) -> Option<DType> {
        DType::from_safetensors(self.dtype)
    }
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

pub struct Checkpoint {
    root: PathBuf,
    shards: Vec<Shard>,
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    config: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens a model folder or a single `.safetensors` file and validates every header.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io(path, "cannot open checkpoint", e))?;
        match input::kind_of(&meta) {
            Kind::Missing => unreachable!("metadata was read"),
            Kind::Other => return Err(input::not_regular(path)),
            Kind::File => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let config = read_config(&dir.join("config.json"))?;
                return Self::from_files(path, vec![path.to_path_buf()], None, config);
            }
            Kind::Folder => {}
        }
        let config = read_config(&path.join("config.json"))?;
        let (index_path, single) = (path.join(INDEX_FILE), path.join(SINGLE_FILE));
        match (input::kind(&index_path), input::kind(&single)) {
            (Kind::Other | Kind::Folder, _) => return Err(input::not_regular(&index_path)),
            (_, Kind::Other | Kind::Folder) => return Err(input::not_regular(&single)),
            (Kind::File, Kind::File) => {
                // Loaders disagree here: transformers loads model.safetensors and never reads
                // the index, vLLM loads the shards the index names. Unless the index names
                // that one file, which is the model is a guess phlora does not make.
                let weight_map = parse_index(&index_path, &input::read_string(&index_path)?)?;
                if weight_map.values().any(|f| f != SINGLE_FILE) {
                    return Err(Error::checkpoint(
                        path,
                        format!("holds both {SINGLE_FILE} and {INDEX_FILE} naming other shards: transformers loads {SINGLE_FILE} (it ignores the index), vLLM the index's shards, so which weights are the model is ambiguous; remove the stale one"),
                    ));
                }
                return Self::open_indexed(path, &index_path, config);
            }
            (Kind::File, _) => return Self::open_indexed(path, &index_path, config),
            (_, Kind::File) => return Self::from_files(path, vec![single], None, config),
            _ => {}
        }
        let listing: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, "cannot list folder", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        // Another index name (a sharded adapter's `adapter_model.safetensors.index.json`).
        let indexes: Vec<&PathBuf> = listing
            .iter()
            .filter(|p| {
                p.is_file()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(".safetensors.index.json"))
            })
            .collect();
        if let [index] = indexes[..] {
            return Self::open_indexed(path, index, config);
        }
        let mut found: Vec<PathBuf> = listing
            .into_iter()
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        found.sort();
        match found.len() {
            1 => Self::from_files(path, found, None, config),
            0 => Err(Error::checkpoint(
                path,
                format!("no {SINGLE_FILE}, {INDEX_FILE} or other .safetensors file in this folder"),
            )),
            n => Err(Error::checkpoint(
                path,
                format!(
                    "{n} .safetensors files but no {INDEX_FILE} to say which tensors they hold"
                ),
            )),
        }
    }

    /// The shards an index file in `path` names (a model's, or a sharded adapter's).
    pub fn open_indexed(
        path: &Path,
        index_path: &Path,
        config: Option<serde_json::Value>,
    ) -> Result<Checkpoint> {
        let weight_map = parse_index(index_path, &input::read_string(index_path)?)?;
        let mut files: Vec<String> = weight_map.values().cloned().collect();
        files.sort();
        files.dedup();
        let mut shard_paths = Vec::new();
        for f in &files {
            let p = path.join(f);
            if !p.is_file() {
                let tensor = weight_map
                    .iter()
                    .find(|(_, v)| *v == f)
                    .map(|(k, _)| k.as_str());
                return Err(Error::checkpoint(
                    index_path,
                    format!(
                        "the index names shard `{f}` (for tensor `{}`), but {} {}",
                        tensor.unwrap_or("?"),
                        p.display(),
                        if p.exists() {
                            "is not a regular file"
                        } else {
                            "does not exist"
                        }
                    ),
                ));
            }
            shard_paths.push(p);
        }
        Self::from_files(
            path,
            shard_paths,
            Some((index_path.to_path_buf(), weight_map)),
            config,
        )
    }

    fn from_files(
        root: &Path,
        paths: Vec<PathBuf>,
        index: Option<(PathBuf, BTreeMap<String, String>)>,
        config: Option<serde_json::Value>,
    ) -> Result<Checkpoint> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut tensors = Vec::new();
        for (si, p) in paths.iter().enumerate() {
            let (shard, mut entries) = open_shard(p, si)?;
            if let Some((index_path, weight_map)) = &index {
                let file_name = p.file_name().and_then(|f| f.to_str()).unwrap_or_default();
                entries.retain(|e| {
                    let listed = weight_map.get(&e.name).is_some_and(|f| {
                        Path::new(f).file_name().and_then(|f| f.to_str()) == Some(file_name)
                    });
                    if !listed {
                        tracing::warn!(
                            "{}: tensor `{}` is not listed for this shard in {}; ignoring it",
                            p.display(),
                            e.name,
                            index_path.display()
                        );
                    }
                    listed
                });
            }
            shards.push(shard);
            tensors.extend(entries);
        }
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::tensor(
                    &shards[t.shard].path,
                    &t.name,
                    "appears in more than one shard",
                ));
            }
        }
        if let Some((index_path, weight_map)) = &index {
            for (name, file) in weight_map {
                if !by_name.contains_key(name) {
                    return Err(Error::tensor(
                        index_path,
                        name,
                        format!("the index says shard `{file}` holds this tensor, but it does not"),
                    ));
                }
            }
        }
        Ok(Checkpoint {
            root: root.to_path_buf(),
            shards,
            tensors,
            by_name,
            config,
        })
    }

    /// The path the user gave.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Tensors in file order (shard, then offset): reading them in this order is sequential.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The shard file that holds a tensor (for error messages).
    pub fn path_of(&self, t: &TensorEntry) -> &Path {
        &self.shards[t.shard].path
    }

    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// config.json beside the checkpoint, if there is one.
    pub fn config(&self) -> Option<&serde_json::Value> {
        self.config.as_ref()
    }

    /// Rows r0..r1 (along the first axis; a scalar is one row) of a float tensor, in f32.
    pub fn rows_f32(&self, t: &TensorEntry, r0: usize, r1: usize) -> Vec<f32> {
        let d = t
            .float_dtype()
            .expect("a float tensor, checked by the caller");
        let cols = t.numel() / t.shape.first().copied().unwrap_or(1).max(1);
        let mut v = vec![0f32; (r1 - r0) * cols];
        dtype::decode_into(
            d,
            &self.bytes(t)[r0 * cols * d.size()..r1 * cols * d.size()],
            &mut v,
        );
        v
    }

    /// The tensor's raw bytes (little-endian, row-major), a view into the memory map.
    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.shards[t.shard].map[t.start..t.end]
    }

    /// Tells the kernel this process is done with a tensor's pages, so resident memory stays
    /// near the working set instead of growing with the model. The pages stay in page cache.
    /// Shard `i`'s file.
    pub fn shard_path(&self, i: usize) -> &Path {
        &self.shards[i].path
    }

    /// Shard `i`'s whole file, header included (for copying a checkpoint's layout).
    pub fn shard_bytes(&self, i: usize) -> &[u8] {
        &self.shards[i].map
    }

    /// Asks the kernel to read a tensor's pages ahead (MADV_WILLNEED): the disk works while
    /// the current tensor computes. Nothing is mapped into the process, so resident memory
    /// does not grow until the pages are touched.
    pub fn prefetch(&self, t: &TensorEntry) {
        let map = &self.shards[t.shard].map;
        let page = page_size();
        let start = t.start / page * page;
        let end = t.start + t.nbytes();
        if end > start {
            let _ = map.advise_range(memmap2::Advice::WillNeed, start, end - start);
        }
    }

    pub fn release(&self, t: &TensorEntry) {
        self.release_range(t, 0, t.nbytes());
    }

    /// Like [`release`](Self::release) for bytes `lo..hi` of the tensor (only whole pages
    /// inside the range: neighbours may still be in use).
    pub fn release_range(&self, t: &TensorEntry, lo: usize, hi: usize) {
        let map = &self.shards[t.shard].map;
        let page = page_size();
        let start = (t.start + lo.min(t.nbytes())).div_ceil(page) * page;
        let end = ((t.start + hi.min(t.nbytes())) / page) * page;
        if end > start {
            // SAFETY: the mapping is a read-only shared file mapping; MADV_DONTNEED only drops
            // resident pages, which the kernel re-reads from the file if touched again. No
            // slice into this range is held across this call by the pipeline (views are
            // short-lived borrows), and even if one were, it would read the same file bytes.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

fn read_config(path: &Path) -> Result<Option<serde_json::Value>> {
    if input::kind(path) == Kind::Missing {
        return Ok(None);
    }
    let text = input::read_string(path)?;
    match serde_json::from_str(&text) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            tracing::warn!("{}: not valid JSON ({e}); ignoring it", path.display());
            Ok(None)
        }
    }
}

/// A field of a model's config.json, or of its `text_config` (multimodal classes keep the
/// language model's fields there).
pub fn config_field<'a>(config: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    config
        .get(key)
        .or_else(|| config.get("text_config").and_then(|c| c.get(key)))
}

/// Rows r0..r1 of `t`, continued past its last row by the rows of `more` (a vocabulary with
/// its added rows, as the resized model has them).
pub fn stacked_rows(
    ck: &Checkpoint,
    t: &TensorEntry,
    more: Option<(&Checkpoint, &TensorEntry)>,
    r0: usize,
    r1: usize,
) -> Vec<f32> {
    let own = t.shape.first().copied().unwrap_or(1);
    let mut v = ck.rows_f32(t, r0.min(own), r1.min(own));
    if let Some((more_ck, more)) = more.filter(|_| r1 > own) {
        v.extend(more_ck.rows_f32(more, r0.max(own) - own, r1 - own));
    }
    v
}

/// An index file's weight_map (tensor → shard file name), validated: JSON of the right form,
/// not empty, every shard a plain name inside the model folder. Public for the fuzz target.
pub fn parse_index(index_path: &Path, text: &str) -> Result<BTreeMap<String, String>> {
    let index: IndexFile = serde_json::from_str(text)
        .map_err(|e| Error::checkpoint(index_path, format!("not a valid index file: {e}")))?;
    if index.weight_map.is_empty() {
        return Err(Error::checkpoint(
            index_path,
            "the index's weight_map is empty",
        ));
    }
    if let Some(f) = index
        .weight_map
        .values()
        .find(|f| f.contains("..") || Path::new(f).is_absolute())
    {
        return Err(Error::checkpoint(
            index_path,
            format!("shard name `{f}` points outside the model folder"),
        ));
    }
    Ok(index.weight_map)
}

fn open_shard(path: &Path, shard: usize) -> Result<(Shard, Vec<TensorEntry>)> {
    let file = input::open(path)?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path, "cannot stat", e))?
        .len();
    if len < 8 {
        return Err(Error::checkpoint(
            path,
            format!("file is {len} bytes long, too short to be a safetensors file (truncated?)"),
        ));
    }
    // SAFETY: the map is read-only. Another process truncating the file while we run would
    // make reads fault (SIGBUS); that is the accepted contract of memory-mapped model loading
    // (the same as the safetensors and transformers loaders).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "cannot memory-map", e))?;
    let entries = parse_shard(path, &map, shard)?;
    Ok((
        Shard {
            path: path.to_path_buf(),
            map,
        },
        entries,
    ))
}

/// The tensors of one safetensors file's bytes (`path` names it in errors), validated: the
/// header, every tensor's offsets within the file. Sorted by offset. Public for the fuzz target.
pub fn parse_shard(path: &Path, map: &[u8], shard: usize) -> Result<Vec<TensorEntry>> {
    let len = map.len();
    if len < 8 {
        return Err(Error::checkpoint(
            path,
            format!("file is {len} bytes long, too short to be a safetensors file (truncated?)"),
        ));
    }
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(map)
        .map_err(|e| Error::checkpoint(path, describe_header_error(&e, len as u64)))?;
    let data_start = 8usize
        .checked_add(header_len)
        .ok_or_else(|| Error::checkpoint(path, "header length overflows"))?;
    let mut entries: Vec<TensorEntry> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| -> Result<TensorEntry> {
            let (s, e) = info.data_offsets;
            let start = data_start.checked_add(s);
            let end = data_start.checked_add(e);
            match (start, end) {
                (Some(start), Some(end)) if start <= end && end <= map.len() => Ok(TensorEntry {
                    name,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    shard,
                    start,
                    end,
                }),
                _ => Err(Error::tensor(
                    path,
                    name,
                    "data offsets lie outside the file",
                )),
            }
        })
        .collect::<Result<_>>()?;
    entries.sort_by_key(|e| e.start);
    Ok(entries)
}

fn describe_header_error(e: &safetensors::SafeTensorError, len: u64) -> String {
    use safetensors::SafeTensorError as E;
    let what = match e {
        E::MetadataIncompleteBuffer => format!(
            "the header's offsets do not cover the file's {len} bytes exactly (truncated or padded file)"
        ),
        E::InvalidHeaderLength => format!(
            "the header length is larger than the file ({len} bytes): truncated or not safetensors"
        ),
        E::HeaderTooLarge => "the header length is over 100 MB: corrupted or not safetensors".into(),
        E::InvalidOffset(t) => format!("tensor `{t}` has data offsets that overlap, leave holes, or are out of order"),
        E::TensorInvalidInfo => "a tensor's byte count does not match its dtype and shape".into(),
        other => other.to_string(),
    };
    format!("not a valid safetensors file: {what}")
}
