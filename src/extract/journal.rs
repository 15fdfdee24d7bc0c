//! The resume journal, `OUT/.phlora-journal/`: each finished tensor's report row and factors
//! are appended as it completes (bytes first, then one JSON line naming them and their
//! checksum, both synced), so after a crash, kill -9 or Ctrl-C `--resume` redoes only what is
//! not there. A torn or corrupt record ends the journal there: it and what follows are redone. The inputs are fingerprinted (size, mtime and a hash of each shard's
//! header, and the settings that shape the result); a resume against anything else is refused.
//! The journal is removed once the adapter is committed.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::job::{ExtraTensor, Finished};
use super::place::FactorTensors;
use super::settings::ExtractSettings;
use crate::adapter::writer::ExpertPlace;
use crate::checkpoint::{input, Checkpoint, DType};
use crate::error::{Error, Result};
use crate::report::TensorReport;
use crate::staging::write_synced;

pub const JOURNAL_DIR: &str = ".phlora-journal";
const FINGERPRINT: &str = "inputs.json";
const RECORDS: &str = "tensors.jsonl";
const DATA: &str = "tensors.bin";

/// The journal format this version writes and reads. A journal of another format is refused
/// by name (before, the settings were a `Debug` string: renaming a field silently invalidated
/// every journal).
pub const JOURNAL_FORMAT: u32 = 2;

/// What a journal was written for: the input files as they were, and the settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// [`JOURNAL_FORMAT`] when written (absent, 0, in journals before it).
    #[serde(default)]
    pub format: u32,
    pub files: Vec<FileStamp>,
    /// [`FingerprintSettings`] as JSON (compared as data, and named field by field when they
    /// differ).
    pub settings: serde_json::Value,
    /// A shard run's share (combine joins parts that differ only in this).
    #[serde(default)]
    pub shard: Option<super::settings::Shard>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileStamp {
    pub path: String,
    pub size: u64,
    pub mtime_ns: u128,
    /// FNV-1a of a shard's length prefix and JSON header, or of a JSON file whole.
    pub header_hash: String,
}

impl Fingerprint {
    pub fn of(s: &ExtractSettings, base: &Checkpoint, ft: &Checkpoint) -> Result<Fingerprint> {
        let mut files = Vec::new();
        for ck in [base, ft] {
            for i in 0..ck.num_shards() {
                let bytes = ck.shard_bytes(i);
                files.push(stamp(ck.shard_path(i), header_of(bytes))?);
            }
            for extra in ["config.json", crate::checkpoint::INDEX_FILE] {
                let p = ck
                    .shard_path(0)
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(extra);
                if input::kind(&p) != input::Kind::Missing {
                    let bytes = input::read(&p)?;
                    files.push(stamp(&p, &bytes)?);
                }
            }
        }
        Ok(Fingerprint {
            format: JOURNAL_FORMAT,
            files,
            settings: FingerprintSettings::of(s).to_json(),
            shard: s.shard,
        })
    }

    /// The same files, wherever their folders are: in order, the same names, sizes, mtimes and
    /// headers (parts computed on machines that mount the models at different paths).
    pub fn same_files_anywhere(&self, other: &Fingerprint) -> bool {
        let name = |f: &FileStamp| Path::new(&f.path).file_name().map(|n| n.to_os_string());
        self.files.len() == other.files.len()
            && self.files.iter().zip(&other.files).all(|(a, b)| {
                name(a) == name(b)
                    && (a.size, a.mtime_ns, &a.header_hash) == (b.size, b.mtime_ns, &b.header_hash)
            })
    }

    /// What differs from `other`, for the refusal.
    fn difference(&self, other: &Fingerprint) -> String {
        if self.settings != other.settings {
            let (a, b) = (self.settings.as_object(), other.settings.as_object());
            let differ: Vec<&str> = a
                .into_iter()
                .flatten()
                .filter(|(k, v)| b.and_then(|b| b.get(*k)) != Some(*v))
                .map(|(k, _)| k.as_str())
                .collect();
            return if differ.is_empty() {
                "the settings differ".into()
            } else {
                format!("the settings differ ({})", differ.join(", "))
            };
        }
        if self.shard != other.shard {
            return "the shard differs".into();
        }
        for (a, b) in self.files.iter().zip(&other.files) {
            if a != b {
                return format!("{} changed", a.path);
            }
        }
        "the input files differ".into()
    }
}

/// Everything in a run's settings that changes the adapter's bytes (not: progress, in-flight,
/// overwrite), as data.
#[derive(Serialize)]
struct FingerprintSettings<'a> {
    rank: &'a crate::linalg::rank::RankPolicy,
    svd: &'a crate::linalg::SvdSettings,
    out_dtype: Option<crate::checkpoint::DType>,
    device: crate::backend::Device,
    cuda: crate::backend::CudaOptions,
    max_ram: Option<u64>,
    max_vram: Option<u64>,
    plan: &'a crate::plan::PlanOptions,
    base_name: Option<&'a str>,
    /// Left out when none, so that journals written before it existed still match.
    #[serde(skip_serializing_if = "Option::is_none")]
    base_revision: Option<&'a str>,
    target: super::settings::Target,
}

impl<'a> FingerprintSettings<'a> {
    fn of(s: &'a ExtractSettings) -> Self {
        FingerprintSettings {
            rank: &s.rank,
            svd: &s.svd,
            out_dtype: s.out_dtype,
            device: s.device,
            cuda: s.cuda,
            max_ram: s.max_ram,
            max_vram: s.max_vram,
            plan: &s.plan,
            base_name: s.base_name.as_deref(),
            base_revision: s.base_revision.as_deref(),
            target: s.target,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        // Maps come out with sorted keys (serde_json's default map), so a per-tensor rank map
        // compares the same whatever its hash order.
        serde_json::to_value(self).expect("plain data serialises")
    }
}

/// A safetensors file's length prefix and JSON header (what its fingerprint hashes: reading
/// the tensors' bytes to hash them would cost a pass over the model).
fn header_of(bytes: &[u8]) -> &[u8] {
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .unwrap_or(0);
    &bytes[..bytes.len().min(8usize.saturating_add(header_len))]
}

/// `path`'s size and mtime, and a hash of `hashed` (the header of a shard, a JSON file whole).
fn stamp(path: &Path, hashed: &[u8]) -> Result<FileStamp> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "cannot stat", e))?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    // The absolute path: a part run from one folder is combined from another.
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(FileStamp {
        path: path.display().to_string(),
        size: meta.len(),
        mtime_ns,
        header_hash: format!("{:016x}", checksum(&[hashed])),
    })
}

/// A tensor read back from a journal, and where its factors lie in the journal's data file.
pub type Journaled = (Finished, Option<FactorPlaces>);

/// Where a journaled tensor's factors lie in the data file: byte ranges of A and B.
#[derive(Clone, Copy, Debug)]
pub struct FactorPlaces {
    pub a: (u64, u64),
    pub b: (u64, u64),
}

/// One finished tensor, as a line of `tensors.jsonl`.
#[derive(Serialize, Deserialize)]
struct Record {
    index: usize,
    row: TensorReport,
    module: Option<String>,
    factors: Option<FactorRecord>,
    extra: Option<ExtraRecord>,
    flops: f64,
    /// [`checksum`] of the record's bytes in order (A, B, extra). Parsed when absent (journals
    /// written before it was added) so that such a record is computed again, not misread.
    #[serde(default)]
    sum: Option<String>,
}

/// XXH3-64 of the parts in order: it catches torn or rotted journal bytes (and tells file
/// headers apart); it is not meant to resist deliberate collisions.
fn checksum(parts: &[&[u8]]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in parts {
        h.update(part);
    }
    h.digest()
}

/// A record's checksum, over its bytes in the order they are journaled: A, B, the extra tensor.
fn record_sum(factors: Option<&FactorTensors>, extra: Option<&ExtraTensor>) -> String {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(3);
    if let Some(f) = factors {
        parts.extend([f.a_bytes.as_slice(), f.b_bytes.as_slice()]);
    }
    if let Some(x) = extra {
        parts.push(&x.bytes);
    }
    format!("{:016x}", checksum(&parts))
}

#[derive(Serialize, Deserialize)]
struct FactorRecord {
    a_key: String,
    a_shape: Vec<usize>,
    b_key: String,
    b_shape: Vec<usize>,
    dtype: String,
    expert: Option<ExpertPlace>,
    /// Byte ranges in `tensors.bin`.
    a: (u64, u64),
    b: (u64, u64),
}

#[derive(Serialize, Deserialize)]
struct ExtraRecord {
    key: String,
    dtype: String,
    shape: Vec<usize>,
    at: (u64, u64),
}

pub struct Journal {
    dir: PathBuf,
    data: File,
    records: File,
    data_len: u64,
    /// Records written by this process.
    written: usize,
    /// Test hooks, read once: abort, or raise SIGINT, after this many records.
    crash_after: Option<usize>,
    interrupt_after: Option<usize>,
    hold_after: Option<(usize, PathBuf)>,
}

/// Fault injection for the resume tests, once this process has journaled N tensors:
/// `PHLORA_TEST_CRASH_AFTER=N` aborts it (as kill -9 would: no unwinding, no cleanup);
/// `PHLORA_TEST_INTERRUPT_AFTER=N` sends it SIGINT (as Ctrl-C would);
/// `PHLORA_TEST_HOLD_AFTER=N:PATH` waits until PATH exists (at most a minute), so that a test
/// can act while this run is midway (a second run on the same OUT).
fn fault_after(var: &str) -> Option<usize> {
    std::env::var(var).ok().and_then(|v| v.parse().ok())
}

fn hold_after() -> Option<(usize, PathBuf)> {
    let v = std::env::var("PHLORA_TEST_HOLD_AFTER").ok()?;
    let (n, path) = v.split_once(':')?;
    Some((n.parse().ok()?, PathBuf::from(path)))
}

impl Journal {
    pub fn dir(out: &Path) -> PathBuf {
        out.join(JOURNAL_DIR)
    }

    /// A fresh journal (an older one is removed).
    pub fn start(out: &Path, fingerprint: &Fingerprint) -> Result<Journal> {
        let dir = Self::dir(out);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(&dir, "cannot create the resume journal", e))?;
        let text = serde_json::to_string_pretty(fingerprint).expect("a fingerprint serializes");
        write_synced(&dir.join(FINGERPRINT), text.as_bytes())?;
        Self::open(dir, 0)
    }

    /// The journal of an interrupted run with the same fingerprint; `each` is handed the
    /// tensors it holds one at a time, so that their factors need not all be in memory at once
    /// (a torn or corrupt record and those after it are dropped).
    pub fn resume(
        out: &Path,
        fingerprint: &Fingerprint,
        each: impl FnMut(Journaled) -> Result<()>,
    ) -> Result<Journal> {
        let dir = Self::dir(out);
        let path = dir.join(FINGERPRINT);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::io(
                &path,
                "--resume: no journal of an interrupted run to resume (run without --resume)",
                e,
            )
        })?;
        let old: Fingerprint = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(&path, format!("not a valid journal: {e}")))?;
        if old.format != JOURNAL_FORMAT {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "--resume refused: the journal is of format {} (this phlora reads format {JOURNAL_FORMAT}), written by another version; start over with --force",
                    old.format
                ),
            ));
        }
        if &old != fingerprint {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "--resume refused: {} since the interrupted run; start over with --force",
                    old.difference(fingerprint)
                ),
            ));
        }
        let (good_bytes, good_data) = read_records(&dir, OnBad::Recompute, each)?;
        // Drop whatever follows the last whole record, then append after it.
        let records = OpenOptions::new()
            .write(true)
            .open(dir.join(RECORDS))
            .map_err(|e| Error::io(dir.join(RECORDS), "cannot open the journal", e))?;
        records
            .set_len(good_bytes)
            .map_err(|e| Error::io(dir.join(RECORDS), "cannot truncate", e))?;
        Self::open(dir, good_data)
    }

    /// The finished tensors of the journal in `out` (a shard's finished part), read only and
    /// handed to `each` one at a time; a part with any record that does not hold is refused.
    pub fn read(out: &Path, each: impl FnMut(Journaled) -> Result<()>) -> Result<()> {
        read_records(&Self::dir(out), OnBad::Refuse, each).map(|_| ())
    }

    /// The data file of the journal in `out` (what [`FactorPlaces`] point into).
    pub fn data_path_in(out: &Path) -> PathBuf {
        Self::dir(out).join(DATA)
    }

    fn open(dir: PathBuf, data_len: u64) -> Result<Journal> {
        let open = |name: &str| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .map_err(|e| Error::io(dir.join(name), "cannot open the journal", e))
        };
        let data = open(DATA)?;
        data.set_len(data_len)
            .map_err(|e| Error::io(dir.join(DATA), "cannot truncate", e))?;
        Ok(Journal {
            data,
            records: open(RECORDS)?,
            data_len,
            dir,
            written: 0,
            crash_after: fault_after("PHLORA_TEST_CRASH_AFTER"),
            interrupt_after: fault_after("PHLORA_TEST_INTERRUPT_AFTER"),
            hold_after: hold_after(),
        })
    }

    /// The file the records' bytes are in.
    pub fn data_path(&self) -> PathBuf {
        self.dir.join(DATA)
    }

    /// Appends a finished tensor: its bytes, then the line that names them, each synced.
    /// Returns where its factors' bytes (A, B) now lie in [`data_path`](Self::data_path).
    pub fn record(&mut self, done: &Finished) -> Result<Option<FactorPlaces>> {
        let mut put = |bytes: &[u8]| -> Result<(u64, u64)> {
            self.data
                .write_all(bytes)
                .map_err(|e| Error::io(self.dir.join(DATA), "cannot write the journal", e))?;
            let at = (self.data_len, self.data_len + bytes.len() as u64);
            self.data_len = at.1;
            Ok(at)
        };
        let factors = match &done.factors {
            Some(f) => Some(FactorRecord {
                a: put(&f.a_bytes)?,
                b: put(&f.b_bytes)?,
                a_key: f.a_key.clone(),
                a_shape: f.a_shape.clone(),
                b_key: f.b_key.clone(),
                b_shape: f.b_shape.clone(),
                dtype: f.dtype.to_string(),
                expert: f.expert,
            }),
            None => None,
        };
        let extra = match &done.extra {
            Some(x) => Some(ExtraRecord {
                at: put(&x.bytes)?,
                key: x.key.clone(),
                dtype: x.dtype.to_string(),
                shape: x.shape.clone(),
            }),
            None => None,
        };
        self.data
            .sync_data()
            .map_err(|e| Error::io(self.dir.join(DATA), "cannot sync the journal", e))?;
        let places = factors.as_ref().map(|f| FactorPlaces { a: f.a, b: f.b });
        let rec = Record {
            index: done.index,
            row: done.row.clone(),
            module: done.module.clone(),
            factors,
            extra,
            flops: done.flops,
            sum: Some(record_sum(done.factors.as_ref(), done.extra.as_ref())),
        };
        let mut line = serde_json::to_vec(&rec).expect("a record serializes");
        line.push(b'\n');
        self.records
            .write_all(&line)
            .and_then(|()| self.records.sync_data())
            .map_err(|e| Error::io(self.dir.join(RECORDS), "cannot write the journal", e))?;
        self.written += 1;
        if self.crash_after.is_some_and(|n| self.written >= n) {
            std::process::abort();
        }
        if self.interrupt_after == Some(self.written) {
            // SAFETY: raise only delivers a signal to this process; its handler is installed.
            unsafe { libc::raise(libc::SIGINT) };
        }
        if let Some((_, go)) = self.hold_after.as_ref().filter(|h| h.0 == self.written) {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !go.exists() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        Ok(places)
    }

    /// The adapter is committed: the journal has served.
    pub fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Removes OUT's journal, if any (a run that failed for good).
    pub fn discard(out: &Path) {
        let _ = std::fs::remove_dir_all(Self::dir(out));
    }
}

/// What a record that does not hold means: the interrupted run's torn or damaged tail, to be
/// computed again (resume); or a damaged part, refused (combine: a finished part has no tail).
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnBad {
    Recompute,
    Refuse,
}

/// Hands the records of a journal folder to `each`, in order, and says where the good ones end
/// (in the records file, in the data file). The records must hold as a set, not only one by
/// one: each tensor once, and their byte ranges tiling the data file from its start in the
/// order they were appended — so a duplicated or replayed line can never place two tensors'
/// bytes over each other in an adapter.
fn read_records(
    dir: &Path,
    on_bad: OnBad,
    mut each: impl FnMut(Journaled) -> Result<()>,
) -> Result<(u64, u64)> {
    let records = dir.join(RECORDS);
    let mut data = File::open(dir.join(DATA))
        .map_err(|e| Error::io(dir.join(DATA), "cannot open the journal", e))?;
    let data_len = data
        .metadata()
        .map_err(|e| Error::io(dir.join(DATA), "cannot stat", e))?
        .len();
    let lines =
        File::open(&records).map_err(|e| Error::io(&records, "cannot open the journal", e))?;
    let (mut good_bytes, mut good_data) = (0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    for (n, line) in BufReader::new(lines).split(b'\n').enumerate() {
        let Ok(line) = line else { break };
        let problem = match serde_json::from_slice::<Record>(&line) {
            Err(_) => "is torn or not a record".to_string(),
            Ok(rec) => match rec.check_set(good_data, data_len, &seen) {
                Some(p) => p,
                None => {
                    let (index, end) = (rec.index, rec.data_end(good_data));
                    match rec.load(&mut data, dir)? {
                        Some(done) => {
                            seen.insert(index);
                            each(done)?;
                            good_bytes += line.len() as u64 + 1;
                            good_data = end;
                            continue;
                        }
                        None => format!("(tensor #{index}) has byte ranges or sizes that do not hold, or a checksum that is missing or differs"),
                    }
                }
            },
        };
        match on_bad {
            OnBad::Recompute => {
                tracing::warn!(
                    "{}: record {} {problem}; it and the records after it are computed again",
                    records.display(),
                    n + 1
                );
                break;
            }
            OnBad::Refuse => {
                return Err(Error::checkpoint(
                    &records,
                    format!("record {} {problem}: this part is damaged; run its shard again (extract --shard … --force)", n + 1),
                ));
            }
        }
    }
    Ok((good_bytes, good_data))
}

impl Record {
    /// The record's byte ranges in the order they were appended: A, B, the extra tensor.
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut r: Vec<(u64, u64)> = self.factors.iter().flat_map(|f| [f.a, f.b]).collect();
        r.extend(self.extra.iter().map(|x| x.at));
        r
    }

    /// Where the data file's good bytes end after this record, which follows bytes up to `from`.
    fn data_end(&self, from: u64) -> u64 {
        self.ranges().last().map_or(from, |r| r.1)
    }

    /// What is wrong with this record as the next of the set: a tensor already recorded, or
    /// byte ranges that do not continue the data file where the last record ended (or run past
    /// its end: torn).
    fn check_set(
        &self,
        from: u64,
        data_len: u64,
        seen: &std::collections::HashSet<usize>,
    ) -> Option<String> {
        if seen.contains(&self.index) {
            return Some(format!(
                "records tensor #{} `{}` a second time",
                self.index, self.row.name
            ));
        }
        let mut at = from;
        for (start, end) in self.ranges() {
            if start != at || end < start {
                return Some(format!(
                    "(tensor #{} `{}`) has bytes {start}..{end} where the journal's next bytes start at {at}",
                    self.index, self.row.name
                ));
            }
            at = end;
        }
        (at > data_len).then(|| {
            format!(
                "(tensor #{}) runs past the end of the data file (torn)",
                self.index
            )
        })
    }

    /// The finished tensor, or None when the record does not hold together (a range that is
    /// reversed or does not match its shape and dtype, a checksum that is missing or differs).
    fn load(self, data: &mut File, dir: &Path) -> Result<Option<Journaled>> {
        let path = dir.join(DATA);
        let expect = |shape: &[usize], dtype: &str, (from, to): (u64, u64)| {
            let elem = DType::parse(dtype).map_or(0, |d| d.size() as u64);
            let numel = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            from <= to && numel.and_then(|n| n.checked_mul(elem)) == Some(to - from)
        };
        let whole = self.factors.as_ref().map_or(true, |f| {
            expect(&f.a_shape, &f.dtype, f.a) && expect(&f.b_shape, &f.dtype, f.b)
        }) && self
            .extra
            .as_ref()
            .map_or(true, |x| expect(&x.shape, &x.dtype, x.at));
        if !whole {
            return Ok(None);
        }
        let places = self
            .factors
            .as_ref()
            .map(|f| FactorPlaces { a: f.a, b: f.b });
        let mut read = |(from, to): (u64, u64)| -> Result<Vec<u8>> {
            let mut bytes = vec![0u8; (to - from) as usize];
            data.seek(SeekFrom::Start(from))
                .and_then(|_| data.read_exact(&mut bytes))
                .map_err(|e| Error::io(&path, "cannot read the journal", e))?;
            Ok(bytes)
        };
        let dtype = |s: &str| {
            DType::parse(s).map(DType::as_str).ok_or_else(|| {
                Error::checkpoint(&path, format!("unknown dtype {s} in the journal"))
            })
        };
        let factors = match self.factors {
            Some(f) => Some(FactorTensors {
                a_bytes: read(f.a)?,
                b_bytes: read(f.b)?,
                dtype: dtype(&f.dtype)?,
                a_key: f.a_key,
                a_shape: f.a_shape,
                b_key: f.b_key,
                b_shape: f.b_shape,
                expert: f.expert,
            }),
            None => None,
        };
        let extra = match self.extra {
            Some(x) => Some(ExtraTensor {
                dtype: dtype(&x.dtype)?,
                bytes: read(x.at)?,
                key: x.key,
                shape: x.shape,
            }),
            None => None,
        };
        // A record without its checksum is not trusted either: its bytes cannot be checked.
        if self.sum.as_deref() != Some(record_sum(factors.as_ref(), extra.as_ref()).as_str()) {
            return Ok(None);
        }
        let done = Finished {
            index: self.index,
            stages: self.row.stages,
            row: self.row,
            factors,
            module: self.module,
            spectrum: None,
            base_sumsq: None,
            extra,
            flops: self.flops,
        };
        Ok(Some((done, places)))
    }
}
