//! The library's error type. Every variant names what a user needs to find the problem:
//! the file, the tensor, or the setting.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read, written, created or renamed.
    /// (The cause is shown in the message and not chained as a source, so that `{:#}`
    /// does not print it twice.)
    #[error("{path}: {action}: {cause}")]
    Io {
        path: PathBuf,
        action: &'static str,
        cause: std::io::Error,
    },

    /// A checkpoint (or its index) is malformed: truncated, corrupted, offsets out of range...
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A tensor cannot be used as it is: one checkpoint only, shape mismatch, bad dtype, NaN...
    #[error("tensor `{tensor}` ({path}): {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// A Hugging Face model id that the local hub cache cannot serve (not cached, a revision
    /// or shard missing); the reason says where it looked and how to fetch it.
    #[error("{id}: {reason}")]
    Hub { id: String, reason: String },

    /// The settings asked for something impossible or contradictory.
    #[error("invalid settings: {0}")]
    Settings(String),

    /// A decomposition failed (no convergence, ...).
    #[error("tensor `{tensor}`: decomposition failed: {reason}")]
    Linalg { tensor: String, reason: String },

    /// The chosen compute device is not usable.
    #[error("device: {0}")]
    Device(String),

    /// Ctrl-C or SIGTERM stopped the run (what was finished is kept for --resume).
    #[error("interrupted: {0}")]
    Interrupted(String),

    /// Another run holds the output folder (its lock, `.phlora-lock`).
    #[error("{out}: in use by another phlora run ({holder}): two runs on one folder would mix their files; wait for it to finish, or write elsewhere{hint}")]
    Busy {
        out: PathBuf,
        holder: String,
        hint: String,
    },

    /// stdout was closed by its reader (`| head`): the command ends quietly.
    #[error("stdout closed")]
    ClosedPipe,

    /// A bug: a thread panicked. Not resumable (the same run would meet it again), and not
    /// the disk's or the device's fault.
    #[error("internal error, a bug in phlora (please report it with the command line): {0}")]
    Internal(String),

    /// A disk or device error stopped the run; what was finished is journaled, and `hint`
    /// says how to go on. (Not a chained source, so that `{:#}` prints the cause once.)
    #[error("{error}\n{hint}")]
    Resumable { error: Box<Error>, hint: String },
}

/// The text a panic carried (its `&str` or `String` payload).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, action: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action,
            cause: source,
        }
    }

    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }
}
