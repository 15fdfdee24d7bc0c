//! What commands print. stdout carries results (tables, `--json`): a reader that closed it
//! (`| head`) ends the command quietly — exit 0, as ripgrep does — and any other failure (a
//! full disk) is an error. stderr carries messages: a write that fails there is dropped, as
//! nothing could report it, and a closed terminal must not stop an hour of work.

use std::io::Write;

use crate::error::{Error, Result};

/// Writes `text` to stdout, whole.
pub fn out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => Error::ClosedPipe,
            _ => Error::io("stdout", "cannot write", e),
        })
}

/// Writes `text` to stderr; a failure is dropped.
pub fn err(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// `println!` to stdout through [`out`]: evaluates to its `Result`.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::console::out(&format!("{}\n", format_args!($($t)*))) };
}

/// `print!` to stdout through [`out`].
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::console::out(&format!($($t)*)) };
}

/// `eprintln!` through [`err`]: never fails, never panics.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { $crate::console::err(&format!("{}\n", format_args!($($t)*))) };
}

/// `eprint!` through [`err`].
#[macro_export]
macro_rules! say_raw {
    ($($t:tt)*) => { $crate::console::err(&format!($($t)*)) };
}
