//! Input files are opened as regular files or not at all: a FIFO named `model.safetensors` or
//! `config.json` would block open(2) until a writer came (forever, deaf to the first SIGTERM),
//! and a device would read without end. Each is refused by name before any byte is read, and
//! the open itself cannot block (O_NONBLOCK, cleared once the file is known to be regular).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// What a path names (symlinks followed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Missing,
    File,
    Folder,
    /// A FIFO, socket or device.
    Other,
}

pub fn kind(path: &Path) -> Kind {
    std::fs::metadata(path).map_or(Kind::Missing, |m| kind_of(&m))
}

/// What metadata says a path is.
pub fn kind_of(m: &std::fs::Metadata) -> Kind {
    if m.is_file() {
        Kind::File
    } else if m.is_dir() {
        Kind::Folder
    } else {
        Kind::Other
    }
}

pub(crate) fn not_regular(path: &Path) -> Error {
    Error::checkpoint(
        path,
        "is not a regular file (a FIFO, socket or device): phlora reads only regular files",
    )
}

/// Opens an input file for reading; anything but a regular file is refused.
pub fn open(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(path, "cannot open", e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "cannot stat", e))?;
    if !meta.is_file() {
        return Err(not_regular(path));
    }
    // SAFETY: fcntl on a descriptor this function owns; only its status flags change.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// An input file's bytes.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open(path)?
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, "cannot read", e))?;
    Ok(bytes)
}

/// An input file's text.
pub fn read_string(path: &Path) -> Result<String> {
    String::from_utf8(read(path)?).map_err(|_| Error::checkpoint(path, "is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert_eq!(kind(&fifo), Kind::Other);
        let e = read_string(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let file = dir.path().join("x.json");
        std::fs::write(&file, "{}").unwrap();
        assert_eq!(read_string(&file).unwrap(), "{}");
        assert_eq!(kind(dir.path()), Kind::Folder);
        assert_eq!(kind(&dir.path().join("none")), Kind::Missing);
    }
}
