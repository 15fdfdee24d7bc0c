//! The folder a run writes: an exclusive lock on it, taken before any work and released at the
//! end, and the guard that it is none of the run's inputs — compared by identity (device and
//! inode, or the resolved path of what does not exist yet), never by spelling.
//!
//! The lock is `OUT/.phlora-lock`, held with flock(2) and naming its holder (host, pid,
//! command). The kernel drops a flock when its process dies, however it dies, so a lock file
//! left by kill -9 is taken over by the next run, with a message naming the dead holder. Where
//! the filesystem has no locks (Lustre without `-o flock`), the file's content is the lock: a
//! live holder on this host, or any holder on another, keeps it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const LOCK_FILE: &str = ".phlora-lock";

/// Who holds a lock, as its file says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Holder {
    host: String,
    pid: u32,
    command: String,
    started_unix: u64,
}

impl Holder {
    fn me(command: &str) -> Holder {
        Holder {
            host: hostname(),
            pid: std::process::id(),
            command: command.to_string(),
            started_unix: now_unix(),
        }
    }

    fn describe(&self) -> String {
        let now = now_unix();
        format!(
            "`phlora {}`, pid {} on host {}, started {} s ago",
            self.command,
            self.pid,
            self.host,
            now.saturating_sub(self.started_unix)
        )
    }

    /// Without kernel locks: a holder on this host is alive if its pid is; one on another
    /// host cannot be asked, so it is taken to be.
    fn may_be_alive(&self) -> bool {
        self.host != hostname() || Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// An exclusive hold on an output folder; dropping it releases the folder (and removes it
/// again if this lock created it and it is still empty).
#[derive(Debug)]
pub struct OutLock {
    path: PathBuf,
    file: File,
    created: Option<PathBuf>,
}

impl OutLock {
    /// Takes `out` (created if missing) for `command`, or says which run holds it.
    pub fn acquire(out: &Path, command: &str) -> Result<OutLock> {
        if out.exists() && !out.is_dir() {
            return Err(Error::checkpoint(
                out,
                "the output path exists and is not a folder",
            ));
        }
        let created = (!out.exists()).then(|| out.to_path_buf());
        std::fs::create_dir_all(out)
            .map_err(|e| Error::io(out, "cannot create output folder", e))?;
        let path = out.join(LOCK_FILE);
        let result = Self::take(&path, command);
        if result.is_err() {
            if let Some(dir) = &created {
                let _ = std::fs::remove_dir(dir);
            }
        }
        let file = result?;
        Ok(OutLock {
            path,
            file,
            created,
        })
    }

    /// Takes a folder this run reads and another run might write (a shard's part), so that
    /// none does while it is read. A folder on a read-only filesystem needs no lock: nothing
    /// can write it.
    pub fn acquire_to_read(dir: &Path, command: &str) -> Result<Option<OutLock>> {
        if !dir.is_dir() {
            return Ok(None); // reading it says what is wrong
        }
        match Self::acquire(dir, command) {
            Err(Error::Io { cause, .. }) if cause.raw_os_error() == Some(libc::EROFS) => Ok(None),
            // Another user's folder that we may only read: its owner's runs cannot be kept out.
            Err(Error::Io { path, cause, .. })
                if cause.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                tracing::warn!(
                    "{}: cannot lock it (permission denied), so a run that writes it while it is read is not excluded",
                    path.display()
                );
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    fn take(path: &Path, command: &str) -> Result<File> {
        let busy = |holder: Option<Holder>, hint: &str| Error::Busy {
            out: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            holder: holder.map_or_else(
                || "a run that has not yet said who it is".into(),
                |h| h.describe(),
            ),
            hint: hint.to_string(),
        };
        let mut file = loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| Error::io(path, "cannot open the output folder's lock", e))?;
            // SAFETY: flock on a file descriptor this function owns; no memory is involved.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if locked != 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EWOULDBLOCK) => return Err(busy(read_holder(&mut file), "")),
                    Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => {
                        if let Some(h) = read_holder(&mut file).filter(Holder::may_be_alive) {
                            return Err(busy(Some(h), &format!(
                                "; this filesystem has no file locks, so the lock is its file's content: if that run is gone, remove {}",
                                path.display()
                            )));
                        }
                        tracing::warn!(
                            "{}: this filesystem has no file locks; the lock is kept by its content only, which does not exclude two runs started at the same instant",
                            path.display()
                        );
                        break file;
                    }
                    _ => return Err(Error::io(path, "cannot lock the output folder", e)),
                }
            }
            // The holder we waited on may have released (unlinked) this file between our
            // open and our lock: then it is no longer the lock, and we start again.
            if same_file(&file, path) {
                break file;
            }
        };
        if let Some(old) = read_holder(&mut file) {
            tracing::warn!(
                "{}: taking over the lock left by {}, which is gone (killed, or its machine restarted)",
                path.display(),
                old.describe()
            );
        }
        let text = serde_json::to_string(&Holder::me(command)).expect("a holder serializes");
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
            .and_then(|()| file.write_all(text.as_bytes()))
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io(path, "cannot write the output folder's lock", e))?;
        Ok(file)
    }
}

impl Drop for OutLock {
    fn drop(&mut self) {
        // Unlinked while still held, so that no run can lock this file after us and
        // believe it holds the folder; the flock goes with the descriptor.
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(dir) = &self.created {
            let _ = std::fs::remove_dir(dir); // only if empty
        }
    }
}

/// The holder a lock file names, if it names one.
fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(4096).read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// `file` is what `path` names now (not a file unlinked since it was opened).
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, which is passed.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Where `path` lies once created: its existing part with symlinks and `..` resolved, the rest
/// taken lexically (as `mkdir -p` will create it).
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    let mut real = true;
    for c in absolute.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => out.push(c),
            Component::CurDir => {}
            // A canonical path has no symlinks, so its parent is its `..`.
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if real {
                    match std::fs::canonicalize(&out) {
                        Ok(p) => out = p,
                        Err(_) => real = false,
                    }
                }
            }
        }
    }
    out
}

/// The same folder: by device and inode when both exist (a bind mount, a symlink), else by
/// resolved path.
pub fn same_folder(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => resolve(a) == resolve(b),
    }
}

/// The folder an input lives in: itself, or a single file's parent.
pub fn folder_of(input: &Path) -> PathBuf {
    if input.is_file() {
        match input.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    } else {
        input.to_path_buf()
    }
}

/// Refuses an output folder that is the folder of one of `inputs` (path, what it is).
pub fn ensure_not_input(out: &Path, inputs: &[(&Path, &str)]) -> Result<()> {
    for (input, what) in inputs {
        let folder = folder_of(input);
        if same_folder(out, &folder) {
            return Err(Error::Settings(format!(
                "--out {} is the {what} folder ({}): phlora never writes into a folder that holds its inputs",
                out.display(),
                folder.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_follows_what_exists_and_reads_the_rest_lexically() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("base")).unwrap();
        std::os::unix::fs::symlink(root.join("base"), root.join("link")).unwrap();
        let base = root.join("base");
        assert_eq!(resolve(&root.join("link")), base);
        assert_eq!(resolve(&root.join("base/missing/..")), base);
        assert_eq!(resolve(&root.join("link/./missing/../")), base);
        assert_eq!(resolve(&root.join("base/x/y")), root.join("base/x/y"));
        assert!(same_folder(&root.join("link"), &root.join("base/x/..")));
        assert!(!same_folder(&root.join("link"), &root.join("base/x")));
    }

    #[test]
    fn a_second_lock_on_one_folder_is_refused_and_released_with_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let first = OutLock::acquire(&out, "extract").unwrap();
        let second = OutLock::acquire(&out, "extract").unwrap_err();
        let msg = second.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        assert!(
            !out.exists(),
            "the lock created OUT and removes it, empty, on release"
        );
        let again = OutLock::acquire(&out, "extract").unwrap();
        assert!(out.join(LOCK_FILE).is_file());
        drop(again);
    }

    #[test]
    fn a_lock_file_with_no_live_holder_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let gone = Holder {
            pid: u32::MAX - 1,
            ..Holder::me("extract")
        };
        std::fs::write(
            dir.path().join(LOCK_FILE),
            serde_json::to_string(&gone).unwrap(),
        )
        .unwrap();
        let lock = OutLock::acquire(dir.path(), "merge").unwrap();
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        let now: Holder = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (now.pid, now.command.as_str()),
            (std::process::id(), "merge")
        );
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists());
        assert!(
            dir.path().exists(),
            "a folder the lock did not create stays"
        );
    }
}
