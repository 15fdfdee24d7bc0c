//! Runs split across processes: `--shard I/N` computes one deterministic, work-balanced share
//! of the plan into OUT as a part (its journal and `phlora-part.json`), and `combine` joins the
//! N parts into the adapter a single run writes, byte for byte (each tensor's sketch seed comes
//! from its name, and the file is ordered by the plan, so where a tensor ran does not matter).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::journal::{Fingerprint, Journal};
use super::settings::ExtractSettings;
pub use super::settings::Shard;
use super::{assemble, engine, job};
use crate::adapter::AdapterWriter;
use crate::error::{Error, Result};
use crate::linalg::rank::RankPolicy;
use crate::plan::{Action, Plan};
use crate::report::{RunReport, StageSeconds};

pub const PART_FILE: &str = "phlora-part.json";

/// What a part says about itself.
#[derive(Serialize, Deserialize)]
struct PartMarker {
    shard: Shard,
    /// The run's settings as given (paths as typed: the adapter's config names them).
    settings: ExtractSettings,
    /// The checkpoints, as absolute paths (combine may run elsewhere).
    base: PathBuf,
    ft: PathBuf,
    fingerprint: Fingerprint,
    tensors: usize,
}

/// A part written by a shard run.
#[derive(Clone, Debug, Serialize)]
pub struct PartReport {
    pub out: String,
    pub shard: Shard,
    /// Tensors this part computed.
    pub tensors: usize,
    pub seconds: f64,
}

/// Which shard (0-based) computes each plan item; None for items with no work (unchanged,
/// or a tied lm_head, which goes with its embedding). Largest inputs first, each onto the
/// least-loaded shard (the lower index on a tie): balanced by bytes read, not by count.
pub fn assignment(plan: &Plan, count: usize) -> Vec<Option<usize>> {
    let mut order: Vec<usize> = (0..plan.items.len())
        .filter(|&i| {
            let item = &plan.items[i];
            item.action != Action::Unchanged && !item.is_tied_copy()
        })
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(plan.items[i].input_bytes()), i));
    let mut load = vec![0u64; count];
    let mut of = vec![None; plan.items.len()];
    for i in order {
        let k = (0..count).min_by_key(|&k| (load[k], k)).expect("count ≥ 1");
        load[k] += plan.items[i].input_bytes().max(1);
        of[i] = Some(k);
    }
    for (source, copy) in plan.tied_copies() {
        of[copy] = of[source];
    }
    of
}

/// Writes the part marker (atomically) once the shard's tensors are all journaled.
pub(super) fn finish_part(
    s: &ExtractSettings,
    shard: Shard,
    fingerprint: &Fingerprint,
    tensors: usize,
    started: Instant,
) -> Result<PartReport> {
    let absolute =
        |p: &Path| std::fs::canonicalize(p).map_err(|e| Error::io(p, "cannot resolve the path", e));
    let marker = PartMarker {
        shard,
        settings: s.clone(),
        base: absolute(&s.base)?,
        ft: absolute(&s.ft)?,
        fingerprint: fingerprint.clone(),
        tensors,
    };
    let path = s.out.join(PART_FILE);
    let text = serde_json::to_string_pretty(&marker)
        .map_err(|e| Error::checkpoint(&path, format!("cannot record the part: {e}")))?;
    crate::staging::write_atomically(&path, text.as_bytes())?;
    Ok(PartReport {
        out: s.out.display().to_string(),
        shard,
        tensors,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Refuses a shard run whose paths the part's JSON marker cannot record (before any work).
pub(super) fn check_part_paths(s: &ExtractSettings) -> Result<()> {
    for (path, flag) in [(&s.out, "--out"), (&s.base, "--base"), (&s.ft, "--ft")] {
        if path.to_str().is_none() {
            return Err(Error::Settings(format!(
                "--shard: {flag} {} is not UTF-8, and a part records its paths in JSON for combine; use a UTF-8 path (a symlink to this one will do)",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Refuses a shard run whose OUT already holds an adapter or a part, unless forced.
pub(super) fn check_part_out(s: &ExtractSettings) -> Result<()> {
    if s.out.exists() && !s.out.is_dir() {
        return Err(Error::checkpoint(
            &s.out,
            "the output path exists and is not a folder",
        ));
    }
    for f in [PART_FILE, crate::adapter::CONFIG_FILE] {
        if s.out.join(f).exists() && !s.overwrite && !s.resume {
            return Err(Error::checkpoint(
                &s.out,
                format!("already holds {f}; pass --force to replace it"),
            ));
        }
    }
    let _ = std::fs::remove_file(s.out.join(PART_FILE));
    std::fs::create_dir_all(&s.out).map_err(|e| Error::io(&s.out, "cannot create", e))
}

/// Where `combine` reads the checkpoints from and how it lays out the adapter.
#[derive(Clone, Debug, Default)]
pub struct CombineOptions {
    pub overwrite: bool,
    /// Overrides the parts' `--max-shard-size`.
    pub max_shard_size: Option<u64>,
    /// The checkpoints as seen from here, when not at the paths the parts recorded (another
    /// machine's mount point); their files must match the parts' by name, size, mtime, header.
    pub base: Option<PathBuf>,
    pub ft: Option<PathBuf>,
}

/// Joins the parts in `dirs` (shards 1..N of one run) into the adapter at `out`.
pub fn combine(dirs: &[PathBuf], out: &Path, options: &CombineOptions) -> Result<RunReport> {
    let started = Instant::now();
    let parts: Vec<(&Path, &str)> = dirs.iter().map(|d| (d.as_path(), "part")).collect();
    crate::outdir::ensure_not_input(out, &parts)?;
    for (i, d) in dirs.iter().enumerate() {
        if let Some(e) = dirs[..i].iter().find(|e| crate::outdir::same_folder(d, e)) {
            return Err(Error::Settings(format!(
                "combine: part {} is given twice ({} and {})",
                d.display(),
                e.display(),
                d.display()
            )));
        }
    }
    // Every part, then OUT: a shard run still writing a part (a requeued task) would change
    // the factors the adapter is written from.
    let _part_locks = dirs
        .iter()
        .map(|d| crate::outdir::OutLock::acquire_to_read(d, "combine"))
        .collect::<Result<Vec<_>>>()?;
    let markers = dirs
        .iter()
        .map(|d| Ok((d, read_marker(d)?)))
        .collect::<Result<Vec<_>>>()?;
    check_one_run(dirs, &markers)?;
    let first = &markers[0].1;
    let count = first.shard.count;
    let mut s = settings_here(first, out, options)?;
    let (named_base, named_ft) = (first.settings.base.clone(), first.settings.ft.clone());
    crate::outdir::ensure_not_input(out, &[(&s.base, "base"), (&s.ft, "fine-tune")])?;
    let _lock = crate::outdir::OutLock::acquire(out, "combine")?;
    let (base, ft, plan) = super::pair::open_pair(&s)?;
    let mut now = Fingerprint::of(&s, &base, &ft)?;
    now.shard = first.fingerprint.shard;
    if !now.same_files_anywhere(&first.fingerprint) {
        return Err(Error::Settings(format!(
            "combine: {} and {} are not the files the parts read (names, sizes, modification times and headers must match; copy with `cp -p` or `rsync -a` to keep mtimes){}",
            s.base.display(),
            s.ft.display(),
            if options.base.is_none() && options.ft.is_none() {
                "; if the models are elsewhere on this machine, pass --base and --ft"
            } else {
                ""
            }
        )));
    }
    let mut writer =
        AdapterWriter::create(out, options.overwrite, super::settings::side_files(&s))?;
    let finished = stage_parts(&plan, &markers, &mut writer)?;
    s.base = named_base;
    s.ft = named_ft;
    let stages = finished
        .iter()
        .flatten()
        .fold(StageSeconds::default(), |mut acc, d| {
            acc.add(&d.row.stages);
            acc
        });
    let outcome = engine::Outcome {
        writer: Some(writer),
        finished,
        workers: Vec::new(),
        stages,
    };
    let context = assemble::Context {
        started,
        input_bytes: plan.input_bytes(),
        r_adapter: s.rank.adapter_rank(),
        out_dtype: s
            .out_dtype
            .unwrap_or_else(|| super::pair::dominant_lora_dtype(&plan)),
        device: format!("{count} parts"),
        // Shards refuse --budget (check_policy).
        allocation: None,
        // Each part's run measured its own.
        device_memory_peak: None,
    };
    assemble::assemble(&s, &base, &ft, &plan, outcome, &context)
}

/// A finished part's marker, of this phlora's journal format.
fn read_marker(d: &Path) -> Result<PartMarker> {
    let path = d.join(PART_FILE);
    if crate::checkpoint::input::kind(&path) == crate::checkpoint::input::Kind::Missing {
        return Err(Error::checkpoint(
            &path,
            "not a finished part (run `extract --shard I/N` into it)",
        ));
    }
    let text = crate::checkpoint::input::read_string(&path)?;
    let m: PartMarker = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&path, format!("not a valid part: {e}")))?;
    let format = m.fingerprint.format;
    if format != super::journal::JOURNAL_FORMAT {
        return Err(Error::checkpoint(
            &path,
            format!(
                "a part of journal format {format}, written by another phlora (this one reads format {}): run that shard again",
                super::journal::JOURNAL_FORMAT
            ),
        ));
    }
    Ok(m)
}

/// The parts are shards 1..N of one run (same inputs, settings and shard count), each given
/// once, none missing.
fn check_one_run(dirs: &[PathBuf], markers: &[(&PathBuf, PartMarker)]) -> Result<()> {
    let first = &markers
        .first()
        .ok_or_else(|| Error::Settings("combine: no parts given".into()))?
        .1;
    let count = first.shard.count;
    let mut seen = vec![None; count];
    for (d, m) in markers {
        let same = m.shard.count == count
            && m.fingerprint.same_files_anywhere(&first.fingerprint)
            && m.fingerprint.settings == first.fingerprint.settings;
        if !same {
            return Err(Error::checkpoint(
                d.join(PART_FILE),
                format!(
                    "is not a part of the same run as {} (other inputs, settings or shard count)",
                    dirs[0].display()
                ),
            ));
        }
        if let Some(other) = seen[m.shard.index - 1].replace(*d) {
            return Err(Error::Settings(format!(
                "combine: shard {}/{count} is given twice ({} and {})",
                m.shard.index,
                other.display(),
                d.display()
            )));
        }
    }
    if let Some(missing) = seen.iter().position(Option::is_none) {
        return Err(Error::Settings(format!(
            "combine: shard {}/{count} is missing; give all {count} parts",
            missing + 1
        )));
    }
    Ok(())
}

/// The run's settings, with the paths that open the inputs from here and this OUT.
fn settings_here(
    first: &PartMarker,
    out: &Path,
    options: &CombineOptions,
) -> Result<ExtractSettings> {
    let mut s = first.settings.clone();
    s.base = options.base.clone().unwrap_or_else(|| first.base.clone());
    s.ft = options.ft.clone().unwrap_or_else(|| first.ft.clone());
    s.out = out.to_path_buf();
    s.overwrite = options.overwrite;
    if options.max_shard_size.is_some() {
        s.max_shard_size = options.max_shard_size;
    }
    for (path, given, flag) in [
        (&s.base, &options.base, "--base"),
        (&s.ft, &options.ft, "--ft"),
    ] {
        if given.is_none() && !path.exists() {
            return Err(Error::checkpoint(
                path,
                format!("the parts read this checkpoint here, and it is not on this machine: pass {flag} to say where it is"),
            ));
        }
    }
    Ok(s)
}

/// Every part's tensors, by plan index, staged as each journal is read: the factors stay in
/// the parts' journals (the adapter is written from there), not in memory. Each tensor must
/// come once, from the part that computes it.
fn stage_parts(
    plan: &Plan,
    markers: &[(&PathBuf, PartMarker)],
    writer: &mut AdapterWriter,
) -> Result<Vec<Option<job::Finished>>> {
    let count = markers[0].1.shard.count;
    let mut finished: Vec<Option<job::Finished>> = (0..plan.items.len()).map(|_| None).collect();
    let owner = assignment(plan, count);
    for (d, m) in markers {
        let data = Journal::data_path_in(d);
        let journal = d.join(super::journal::JOURNAL_DIR);
        Journal::read(d, |(mut done, at)| {
            let i = done.index;
            let refuse = |why: String| Err(Error::checkpoint(&journal, why));
            if i >= plan.items.len() || plan.items[i].name != done.row.name {
                return refuse(format!("tensor #{i} `{}` is not the plan's", done.row.name));
            }
            // Each tensor comes from the one part that computes it, once.
            if owner[i] != Some(m.shard.index - 1) || finished[i].is_some() {
                return refuse(format!(
                    "holds `{}`, which is shard {}/{count}'s and not this part's (shard {}/{count}): a part copied over another?",
                    done.row.name,
                    owner[i].map_or(0, |k| k + 1),
                    m.shard.index
                ));
            }
            engine::stage_journaled(Some(&mut *writer), &mut done, &data, at)?;
            finished[i] = Some(done);
            Ok(())
        })?;
    }
    if let Some(i) = (0..plan.items.len()).find(|&i| owner[i].is_some() && finished[i].is_none()) {
        return Err(Error::Settings(format!(
            "combine: `{}` is missing from shard {}/{count}'s part",
            plan.items[i].name,
            owner[i].unwrap_or(0) + 1
        )));
    }
    Ok(finished)
}

/// `--shard` cannot split what needs every tensor at once.
pub(super) fn check_policy(rank: &RankPolicy) -> Result<()> {
    if matches!(rank, RankPolicy::Budget { .. }) {
        return Err(Error::Settings(
            "--shard with --budget: a budget allocates ranks over every tensor's spectrum at once; use --rank or --energy with --shard".into(),
        ));
    }
    Ok(())
}
