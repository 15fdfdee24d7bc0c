//! An output folder filled atomically: files are written into a staging folder inside OUT and
//! moved in at commit, the ones that make the output look complete last. Dropped without a
//! commit (an error, a panic), the staging folder is removed, and OUT too if this created it
//! (and it is still empty).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct StagedOutput {
    out: PathBuf,
    dir: PathBuf,
    /// OUT did not exist before.
    created_out: bool,
    committed: bool,
}

impl StagedOutput {
    /// Prepares OUT and `OUT/.phlora-<tag>-<pid>`. Unless `overwrite`, refuses when OUT already
    /// holds a file the commit would replace or remove (`replaces(name)`): "pass --force to
    /// replace `what`".
    pub fn create(
        out: &Path,
        tag: &str,
        replaces: &dyn Fn(&str) -> bool,
        what: &str,
        overwrite: bool,
    ) -> Result<StagedOutput> {
        if out.exists() && !out.is_dir() {
            return Err(Error::checkpoint(
                out,
                "the output path exists and is not a folder",
            ));
        }
        if !overwrite {
            let mut held: Vec<String> = std::fs::read_dir(out)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| replaces(n))
                .collect();
            // The shortest names first: a config or an index says more than its 37th shard.
            held.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
            if !held.is_empty() {
                let more = held.len().saturating_sub(3);
                return Err(Error::checkpoint(
                    out,
                    format!(
                        "already holds {}{}; pass --force to replace {what}",
                        held[..held.len().min(3)].join(", "),
                        if more > 0 {
                            format!(" and {more} more such file(s)")
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
        }
        let created_out = !out.exists();
        std::fs::create_dir_all(out)
            .map_err(|e| Error::io(out, "cannot create output folder", e))?;
        remove_orphans(out, tag);
        let dir = out.join(format!(".phlora-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| {
            Error::io(
                &dir,
                "cannot create staging folder (is the output folder writable?)",
                e,
            )
        })?;
        Ok(StagedOutput {
            out: out.to_path_buf(),
            dir,
            created_out,
            committed: false,
        })
    }

    /// The staging folder: stage files here under their final names.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves the staged files `names` into OUT in that order. The final copies of
    /// `unlink_first` go before anything moves: an older output's config or index must not pair
    /// with the new files, even briefly.
    pub fn commit(mut self, names: &[PathBuf], unlink_first: &[PathBuf]) -> Result<()> {
        for name in unlink_first {
            let dst = self.out.join(name);
            if dst.exists() {
                std::fs::remove_file(&dst).map_err(|e| Error::io(&dst, "cannot replace", e))?;
            }
        }
        for name in names {
            let dst = self.out.join(name);
            std::fs::rename(self.dir.join(name), &dst)
                .map_err(|e| Error::io(&dst, "cannot move into place", e))?;
        }
        if let Ok(dir) = File::open(&self.out) {
            let _ = dir.sync_all();
        }
        self.committed = true;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

/// Writes `bytes` to `path` and syncs them to disk (before a rename publishes the file).
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, "cannot create", e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, "cannot write", e))
}

/// Publishes one file whole: `bytes` go to a temporary name beside `path`, are synced, and the
/// rename puts them in place, so a reader sees the old file or the new one, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    publish(path, |f| {
        f.write_all(bytes)
            .map_err(|e| Error::io(path, "cannot write", e))
    })
    .map(drop)
}

/// [`write_atomically`] for a file written as a stream: `write` fills the temporary file; on
/// its error (or a panic) the temporary file is removed and `path` is left as it was. The
/// file's size comes back.
pub fn publish(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<File>) -> Result<()>,
) -> Result<u64> {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    let prefix = format!(".{name}.partial-");
    let tmp = path.with_file_name(format!("{prefix}{}", std::process::id()));
    remove_dead_partials(path, &prefix);
    struct Remove<'a>(&'a Path, bool);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_file(self.0);
            }
        }
    }
    let mut guard = Remove(&tmp, false);
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, "cannot create", e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    write(&mut out)?;
    let file = out
        .into_inner()
        .map_err(|e| Error::io(&tmp, "cannot write", e.into_error()))?;
    file.sync_all()
        .map_err(|e| Error::io(&tmp, "cannot write", e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io(&tmp, "cannot read", e))?
        .len();
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, "cannot move into place", e))?;
    guard.1 = true;
    if let Some(dir) = path.parent().and_then(|d| File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    Ok(size)
}

/// `publish`'s temporary files beside `path` whose writer is gone (killed mid-write).
fn remove_dead_partials(path: &Path, prefix: &str) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    for e in left_by_dead_runs(dir, prefix) {
        let _ = std::fs::remove_file(e.path());
    }
}

/// Staging folders of processes that are gone (killed before they could clean up).
fn remove_orphans(out: &Path, tag: &str) {
    for e in left_by_dead_runs(out, &format!(".phlora-{tag}-")) {
        tracing::info!(
            "{}: removing the staging folder of a run that was killed",
            e.path().display()
        );
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// The entries of `dir` named `<prefix><pid>` for a pid that is not this process and not alive.
fn left_by_dead_runs(dir: &Path, prefix: &str) -> Vec<std::fs::DirEntry> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(prefix)
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|pid| pid != std::process::id() && !process_alive(pid))
        })
        .collect()
}

#[cfg(target_os = "linux")]
fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Without /proc, a folder might belong to a live process: keep it.
#[cfg(not(target_os = "linux"))]
fn process_alive(_: u32) -> bool {
    true
}

impl Drop for StagedOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
            if self.created_out {
                let _ = std::fs::remove_dir(&self.out);
            }
        }
    }
}
