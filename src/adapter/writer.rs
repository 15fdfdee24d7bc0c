//! The adapter sink. Factor bytes stream into a staging folder inside OUT as each tensor
//! finishes (memory does not grow with the model); `commit` writes the safetensors header,
//! then renames the weights (one file, or shards and their index), the report and — last —
//! adapter_config.json into OUT, so a
//! reader that sees the config sees a complete adapter. Tensors may arrive in any order (from
//! several workers); the file lists them by the caller's order key, so its bytes do not depend
//! on which worker finished first. If the writer is dropped without
//! committing (an error, a panic), the staging folder is removed and OUT holds no adapter.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::gguf::GGUF_FILE;
use super::{
    is_weights_file, shard_file, ADDED_TOKENS_FILE, CONFIG_FILE, INDEX_FILE, MODEL_FILE,
    REPORT_FILE,
};
use crate::checkpoint::writer::{header_bytes, HeaderEntry};
use crate::error::{Error, Result};
use crate::staging::{write_synced, StagedOutput};

pub struct AdapterWriter {
    // Fields drop in this order: the data file closes before `staged` removes its folder.
    data: Option<BufWriter<File>>,
    /// Dropped uncommitted, it removes the staging folder.
    staged: StagedOutput,
    staging: PathBuf,
    data_path: PathBuf,
    /// In arrival order.
    entries: Vec<Staged>,
    staged_bytes: u64,
    /// Files staged beside the model file (added tokens, the tokenizer), by name.
    side_files: Vec<PathBuf>,
    /// Files that already hold some tensors' bytes (the resume journal's data file), read at
    /// commit instead of a copy in the staging file.
    sources: Vec<PathBuf>,
}

/// One staged tensor (or one expert's factor of a fused parameter).
struct Staged {
    /// Its place in the final file.
    order: u64,
    /// Where its bytes are: in the staging file, or in `sources[i]` for `Some(i)`.
    source: Option<usize>,
    offset: u64,
    entry: HeaderEntry,
    /// The axis a LoRA factor's rank runs along (it may be zero-padded there).
    rank_axis: Option<usize>,
    /// One expert's factor (or part of it) of a fused 3-D parameter, packed at commit.
    expert: Option<ExpertPlace>,
}

/// Where a factor goes in a fused 3-D parameter's packed LoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExpertPlace {
    pub index: usize,
    pub count: usize,
    /// Parts stack along the output axis (gate and up of `gate_up_proj`, from per-expert
    /// weights): part p of expert e takes output rows `out_offset..` of the `out_total`, and
    /// the ranks after those of its lower parts — a block-diagonal B, so B·A per part is the
    /// part's own.
    pub part: usize,
    pub out_offset: usize,
    pub out_total: usize,
}

impl ExpertPlace {
    /// Expert `index` of `count`, the whole of its matrix with `out` rows.
    pub fn whole(index: usize, count: usize, out: usize) -> ExpertPlace {
        ExpertPlace {
            index,
            count,
            part: 0,
            out_offset: 0,
            out_total: out,
        }
    }
}

/// A tensor of the final file: one staged tensor, or the experts' factors packed into one.
enum Output {
    Single(usize),
    Fused(Vec<usize>),
}

impl AdapterWriter {
    /// Prepares OUT. Unless `overwrite`, refuses an OUT holding any file the commit would
    /// replace or remove: an adapter's (config, weights of any layout, report, added rows), or
    /// one of `side_files` (staged beside them: a tokenizer).
    pub fn create(out: &Path, overwrite: bool, side_files: &[&str]) -> Result<AdapterWriter> {
        let replaces = |name: &str| {
            is_weights_file(name)
                || [CONFIG_FILE, REPORT_FILE, ADDED_TOKENS_FILE, GGUF_FILE].contains(&name)
                || side_files.contains(&name)
        };
        let staged = StagedOutput::create(out, "staging", &replaces, "the adapter", overwrite)?;
        let staging = staged.dir().to_path_buf();
        let data_path = staging.join("tensors.partial");
        let data =
            File::create(&data_path).map_err(|e| Error::io(&data_path, "cannot create", e))?;
        Ok(AdapterWriter {
            staged,
            staging,
            data_path,
            data: Some(BufWriter::with_capacity(1 << 20, data)),
            entries: Vec::new(),
            staged_bytes: 0,
            side_files: Vec::new(),
            sources: Vec::new(),
        })
    }

    /// Stages one tensor; `order` is its place in the final file (ties keep arrival order).
    pub fn add(
        &mut self,
        order: u64,
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        self.stage(order, name, dtype, shape, bytes, None, None)
    }

    /// [`add`](Self::add) for a LoRA factor whose rank runs along `rank_axis` (0 for A
    /// [r, in], 1 for B [out, r]): [`commit`](Self::commit) can zero-pad it to a larger rank.
    /// `expert` marks expert e's factor (or part of it) of a fused 3-D parameter of E
    /// experts: at commit the factors of one name are padded to one rank r and packed the way
    /// PEFT's `target_parameters` reads them: A [r·E, in] with row e·r + k, B [out, r·E] with
    /// column k·E + e.
    #[allow(clippy::too_many_arguments)]
    pub fn add_factor(
        &mut self,
        order: u64,
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        bytes: &[u8],
        rank_axis: usize,
        expert: Option<ExpertPlace>,
    ) -> Result<()> {
        self.stage(order, name, dtype, shape, bytes, Some(rank_axis), expert)
    }

    /// [`add_factor`](Self::add_factor) for bytes that already lie at `offset` in `file` (and
    /// stay there until the commit): nothing is copied now.
    #[allow(clippy::too_many_arguments)]
    pub fn add_factor_in(
        &mut self,
        order: u64,
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        (file, offset, nbytes): (&Path, u64, usize),
        rank_axis: usize,
        expert: Option<ExpertPlace>,
    ) {
        let source = match self.sources.iter().position(|s| s == file) {
            Some(i) => i,
            None => {
                self.sources.push(file.to_path_buf());
                self.sources.len() - 1
            }
        };
        self.entries.push(Staged {
            order,
            source: Some(source),
            offset,
            entry: HeaderEntry {
                name,
                dtype,
                shape,
                nbytes,
            },
            rank_axis: Some(rank_axis),
            expert,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        order: u64,
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        bytes: &[u8],
        rank_axis: Option<usize>,
        expert: Option<ExpertPlace>,
    ) -> Result<()> {
        let data = self.data.as_mut().expect("not committed");
        data.write_all(bytes)
            .map_err(|e| Error::io(&self.data_path, "cannot write", e))?;
        self.entries.push(Staged {
            order,
            source: None,
            offset: self.staged_bytes,
            entry: HeaderEntry {
                name,
                dtype,
                shape,
                nbytes: bytes.len(),
            },
            rank_axis,
            expert,
        });
        self.staged_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Stages a file beside the model file: `write` creates it at the path it is given, and
    /// [`commit`](Self::commit) moves it into OUT with the adapter, before the config.
    pub fn add_file(&mut self, name: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let reserved = [CONFIG_FILE, REPORT_FILE];
        if reserved.contains(&name)
            || is_weights_file(name)
            || self.side_files.iter().any(|f| f.as_os_str() == name)
        {
            return Err(Error::Settings(format!(
                "internal error: {name} is staged twice"
            )));
        }
        write(&self.staging.join(name))?;
        self.side_files.push(PathBuf::from(name));
        Ok(())
    }

    /// Renames a staged tensor (every expert's part of a fused one).
    pub fn rename(&mut self, from: &str, to: &str) {
        for e in self.entries.iter_mut().filter(|e| e.entry.name == from) {
            e.entry.name = to.to_string();
        }
    }

    pub fn num_tensors(&self) -> usize {
        self.entries.len()
    }

    /// Leaves a staged tensor out of the file (its bytes stay in staging, never copied).
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.entry.name != name);
        self.entries.len() != before
    }

    /// Writes the final files and moves them into OUT; the config goes last. `pad_to(name)`
    /// gives the rank a factor is zero-padded to along its rank axis (B·A is unchanged).
    /// `max_shard_bytes` splits the weights into `adapter_model-0000i-of-0000n.safetensors`
    /// files of at most that many tensor bytes each (a larger tensor gets a file of its own)
    /// plus `adapter_model.safetensors.index.json`; when everything fits in one, the single
    /// `adapter_model.safetensors` is written, as without it.
    pub fn commit(
        mut self,
        config_json: &str,
        report_json: &str,
        pad_to: &dyn Fn(&str) -> Option<usize>,
        max_shard_bytes: Option<u64>,
    ) -> Result<()> {
        let data = self.data.take().expect("not committed");
        let data = data
            .into_inner()
            .map_err(|e| Error::io(&self.data_path, "cannot write", e.into_error()))?;
        drop(data);

        // A stable sort: equal keys keep the order they were added in.
        self.entries.sort_by_key(|e| e.order);
        let outputs = self.outputs()?;
        let entries: Vec<HeaderEntry> = outputs
            .iter()
            .map(|o| self.final_entry(o, pad_to))
            .collect();
        // Two tensors of one name would give the file overlapping entries: whatever path
        // staged them, that is a bug, and no such file is written.
        let mut names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Settings(format!(
                "internal error: tensor `{}` was staged twice; no adapter is written",
                w[0]
            )));
        }
        let shards = split_into_shards(&entries, max_shard_bytes);
        let mut src = Sources::open(&self.data_path, &self.sources)?;
        let mut weights: Vec<PathBuf> = Vec::with_capacity(shards.len() + 1);
        let mut weight_map: BTreeMap<&str, String> = BTreeMap::new();
        for (i, range) in shards.iter().enumerate() {
            let name = if shards.len() == 1 {
                MODEL_FILE.to_string()
            } else {
                shard_file(i + 1, shards.len())
            };
            let path = self.staging.join(&name);
            self.write_weights(
                &path,
                &outputs[range.clone()],
                &entries[range.clone()],
                &mut src,
            )?;
            for e in &entries[range.clone()] {
                weight_map.insert(&e.name, name.clone());
            }
            weights.push(PathBuf::from(name));
        }
        if shards.len() > 1 {
            let total: u64 = entries.iter().map(|e| e.nbytes as u64).sum();
            let index = serde_json::json!({
                "metadata": { "total_size": total },
                "weight_map": weight_map,
            });
            let text = serde_json::to_string_pretty(&index).expect("index serializes");
            write_synced(&self.staging.join(INDEX_FILE), text.as_bytes())?;
            // The index goes after its shards: a reader never follows it to a missing file.
            weights.push(PathBuf::from(INDEX_FILE));
        }
        let _ = std::fs::remove_file(&self.data_path);
        let config_tmp = self.staging.join(CONFIG_FILE);
        write_synced(&config_tmp, config_json.as_bytes())?;
        let report_tmp = self.staging.join(REPORT_FILE);
        write_synced(&report_tmp, report_json.as_bytes())?;

        // The config goes last, and an older adapter's config first: it must not pair with the
        // new weights, even briefly. Nor may an older adapter's added rows, or weights files of
        // another layout (a single file beside a new index, shards of another count).
        // An older adapter.gguf is of the older factors: gone too (`--target llama.cpp` writes
        // the new one after this commit).
        let mut unlink_first = [CONFIG_FILE, ADDED_TOKENS_FILE, GGUF_FILE]
            .map(PathBuf::from)
            .to_vec();
        unlink_first.extend(self.stale_weights(&weights));
        let mut names = weights;
        names.extend(self.side_files.iter().cloned());
        names.extend([REPORT_FILE, CONFIG_FILE].map(PathBuf::from));
        self.staged.commit(&names, &unlink_first)?;
        Ok(())
    }

    /// One weights file: the header of `entries`, then each output's bytes.
    fn write_weights(
        &self,
        path: &Path,
        outputs: &[Output],
        entries: &[HeaderEntry],
        src: &mut Sources,
    ) -> Result<()> {
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let mut f = BufWriter::with_capacity(
            1 << 20,
            File::create(path).map_err(|e| Error::io(path, "cannot create", e))?,
        );
        f.write_all(&header_bytes(entries, &meta))
            .map_err(|e| Error::io(path, "cannot write", e))?;
        for (output, out) in outputs.iter().zip(entries) {
            crate::interrupt::check("the adapter")?;
            let bytes = match output {
                Output::Single(i) => {
                    let staged = &self.entries[*i];
                    let bytes = self.read_back(src, staged)?;
                    if out.nbytes == staged.entry.nbytes {
                        bytes
                    } else {
                        let axis = staged.rank_axis.expect("only factors grow");
                        pad_axis(&bytes, &staged.entry.shape, axis, out.shape[axis])
                    }
                }
                Output::Fused(members) => self.pack(src, members, out)?,
            };
            f.write_all(&bytes)
                .map_err(|e| Error::io(path, "cannot write", e))?;
        }
        let f = f
            .into_inner()
            .map_err(|e| Error::io(path, "cannot write", e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(path, "cannot sync", e))
    }

    /// Weights files in OUT that are not among the new ones.
    fn stale_weights(&self, new: &[PathBuf]) -> Vec<PathBuf> {
        let out = self.staging.parent().unwrap_or(Path::new("."));
        let Ok(listing) = std::fs::read_dir(out) else {
            return Vec::new();
        };
        let mut stale: Vec<PathBuf> = listing
            .flatten()
            .map(|e| PathBuf::from(e.file_name()))
            .filter(|n| n.to_str().is_some_and(is_weights_file) && !new.contains(n))
            .collect();
        // The index first: it must not name a shard that is already gone.
        stale.sort_by_key(|n| (n.as_os_str() != INDEX_FILE, n.clone()));
        stale
    }
}

/// Consecutive runs of `entries` of at most `max` tensor bytes each (a larger tensor alone);
/// one run without a bound.
fn split_into_shards(entries: &[HeaderEntry], max: Option<u64>) -> Vec<Range<usize>> {
    let Some(max) = max else {
        return std::iter::once(0..entries.len()).collect();
    };
    let mut shards = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, e) in entries.iter().enumerate() {
        let n = e.nbytes as u64;
        if i > start && size.saturating_add(n) > max {
            shards.push(start..i);
            (start, size) = (i, 0);
        }
        size = size.saturating_add(n);
    }
    shards.push(start..entries.len());
    shards
}

/// A row-major tensor zero-padded from `shape` to `to` elements along `axis`.
pub fn pad_axis(bytes: &[u8], shape: &[usize], axis: usize, to: usize) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let elem = bytes.len() / numel.max(1);
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product::<usize>() * elem;
    let (run_in, run_out) = (shape[axis] * inner, to * inner);
    let mut out = vec![0u8; outer * run_out];
    for (i, run) in bytes.chunks(run_in.max(1)).take(outer).enumerate() {
        out[i * run_out..i * run_out + run.len()].copy_from_slice(run);
    }
    out
}

impl AdapterWriter {
    /// The final file's tensors in order: the experts of one fused parameter become one.
    fn outputs(&self) -> Result<Vec<Output>> {
        let mut outputs = Vec::new();
        let mut fused: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, e) in self.entries.iter().enumerate() {
            if e.expert.is_none() {
                outputs.push(Output::Single(i));
            } else if let Some(&at) = fused.get(e.entry.name.as_str()) {
                if let Output::Fused(m) = &mut outputs[at] {
                    m.push(i);
                }
            } else {
                fused.insert(&e.entry.name, outputs.len());
                outputs.push(Output::Fused(vec![i]));
            }
        }
        for o in &mut outputs {
            if let Output::Fused(members) = o {
                let place = |i: usize| self.entries[i].expert.expect("fused members are experts");
                members.sort_by_key(|&i| (place(i).index, place(i).part));
                let first = place(members[0]);
                // An unchanged expert (or part) has no factors (its block stays zero); a
                // repeated or out-of-range one is a bug.
                let valid = members.windows(2).all(|w| {
                    (place(w[0]).index, place(w[0]).part) < (place(w[1]).index, place(w[1]).part)
                }) && members.iter().all(|&i| {
                    let p = place(i);
                    let rows = self.out_rows(i);
                    p.count == first.count
                        && p.index < p.count
                        && p.out_total == first.out_total
                        && p.out_offset + rows <= p.out_total
                });
                if !valid {
                    return Err(Error::Settings(format!(
                        "internal error: the experts' factors of {} do not fit together",
                        self.entries[members[0]].entry.name
                    )));
                }
            }
        }
        Ok(outputs)
    }

    /// The header entry an output is written with (padded, or packed).
    fn final_entry(&self, output: &Output, pad_to: &dyn Fn(&str) -> Option<usize>) -> HeaderEntry {
        match output {
            Output::Single(i) => {
                let s = &self.entries[*i];
                let mut e = s.entry.clone();
                if let (Some(axis), Some(r)) = (s.rank_axis, pad_to(&e.name)) {
                    let old = e.shape[axis];
                    if r > old {
                        e.nbytes = e.nbytes / old.max(1) * r;
                        e.shape[axis] = r;
                    }
                }
                e
            }
            Output::Fused(members) => {
                let first = &self.entries[members[0]];
                let axis = first.rank_axis.expect("experts' factors have a rank axis");
                let place = first.expert.expect("fused members are experts");
                let r = self
                    .expert_ranks(members)
                    .into_iter()
                    .chain(pad_to(&first.entry.name))
                    .max()
                    .unwrap_or(0);
                let mut e = first.entry.clone();
                let elem = e.nbytes / e.shape.iter().product::<usize>().max(1);
                e.shape[axis] = r * place.count;
                if axis == 1 {
                    e.shape[0] = place.out_total;
                }
                e.nbytes = e.shape.iter().product::<usize>() * elem;
                e
            }
        }
    }

    /// Output rows of a staged factor: B's rows (A's are the rank).
    fn out_rows(&self, i: usize) -> usize {
        let s = &self.entries[i];
        if s.rank_axis == Some(1) {
            s.entry.shape[0]
        } else {
            0
        }
    }

    /// Each expert's rank: the sum of its parts' ranks.
    fn expert_ranks(&self, members: &[usize]) -> Vec<usize> {
        let mut ranks: BTreeMap<usize, usize> = BTreeMap::new();
        for &i in members {
            let s = &self.entries[i];
            let axis = s.rank_axis.expect("experts' factors have a rank axis");
            let index = s.expert.expect("fused members are experts").index;
            *ranks.entry(index).or_default() += s.entry.shape[axis];
        }
        ranks.into_values().collect()
    }

    fn read_back(&self, src: &mut Sources, staged: &Staged) -> Result<Vec<u8>> {
        let (file, path) = match staged.source {
            None => (&mut src.staging, &self.data_path),
            Some(i) => (&mut src.others[i], &self.sources[i]),
        };
        file.seek(SeekFrom::Start(staged.offset))
            .map_err(|e| Error::io(path, "cannot read back", e))?;
        let mut bytes = vec![0u8; staged.entry.nbytes];
        file.read_exact(&mut bytes)
            .map_err(|e| Error::io(path, "staged data is truncated", e))?;
        Ok(bytes)
    }

    /// The experts' factors packed into `out` at rank r per expert: A (axis 0) expert-major —
    /// expert e's rows at e·r..(e+1)·r; B (axis 1) rank-major — expert e's column k at k·E + e.
    /// An expert's parts follow one another along the rank, each in its own output rows.
    fn pack(&self, src: &mut Sources, members: &[usize], out: &HeaderEntry) -> Result<Vec<u8>> {
        let first = &self.entries[members[0]];
        let axis = first.rank_axis.expect("experts' factors have a rank axis");
        let experts = first.expert.map_or(1, |x| x.count);
        let r = out.shape[axis] / experts;
        let elem = out.nbytes / out.shape.iter().product::<usize>().max(1);
        let mut packed = vec![0u8; out.nbytes];
        // The rank already taken by an expert's lower parts (members are sorted by expert, part).
        let mut taken: BTreeMap<usize, usize> = BTreeMap::new();
        for &i in members {
            let staged = &self.entries[i];
            let place = staged.expert.expect("fused members are experts");
            let e = place.index;
            let rank = staged.entry.shape[axis];
            let k0 = taken.get(&e).copied().unwrap_or(0);
            taken.insert(e, k0 + rank);
            let bytes = self.read_back(src, staged)?;
            if axis == 0 {
                let row = bytes.len() / rank.max(1);
                let at = (e * r + k0) * row;
                packed[at..at + bytes.len()].copy_from_slice(&bytes);
            } else {
                let columns = out.shape[1];
                for o in 0..staged.entry.shape[0] {
                    for k in 0..rank {
                        let from = (o * rank + k) * elem;
                        let to = ((place.out_offset + o) * columns + (k0 + k) * experts + e) * elem;
                        packed[to..to + elem].copy_from_slice(&bytes[from..from + elem]);
                    }
                }
            }
        }
        Ok(packed)
    }
}

/// The files a commit reads tensors back from: the staging file and the sources.
struct Sources {
    staging: File,
    others: Vec<File>,
}

impl Sources {
    fn open(staging: &Path, others: &[PathBuf]) -> Result<Sources> {
        let open = |p: &Path| File::open(p).map_err(|e| Error::io(p, "cannot open", e));
        Ok(Sources {
            staging: open(staging)?,
            others: others.iter().map(|p| open(p)).collect::<Result<_>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_staged_twice_writes_no_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut w = AdapterWriter::create(&out, false, &[]).unwrap();
        for order in [0, 1] {
            w.add(order, "t".into(), "F32", vec![1], &[0, 0, 128, 63])
                .unwrap();
        }
        let e = w.commit("{}", "{}", &|_| None, None).unwrap_err();
        assert!(e.to_string().contains("staged twice"), "{e}");
        assert!(!out.join(MODEL_FILE).exists() && !out.join(CONFIG_FILE).exists());
    }
}
