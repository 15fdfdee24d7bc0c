//! Ctrl-C (SIGINT, and SIGTERM as a batch scheduler sends it) stops a run cleanly: the first
//! one asks the workers to take no new tensor — the ones in flight finish and are journaled —
//! and the run ends with an error saying how to resume; a second one exits at once (the journal
//! keeps what was recorded).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// True once an interrupt arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// An error once an interrupt arrived: for loops that write an output, which stop between two
/// tensors and leave nothing half-written (`what` says what was not written).
pub fn check(what: &str) -> crate::error::Result<()> {
    if requested() {
        return Err(crate::error::Error::Interrupted(format!(
            "{what} was not written"
        )));
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    if REQUESTED.swap(true, Ordering::Relaxed) {
        // SAFETY: _exit is async-signal-safe; the second interrupt means "now".
        unsafe { libc::_exit(130) };
    }
}

/// Installs the handler (the CLI calls this once, before the run).
pub fn install() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}
