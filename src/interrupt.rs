//! Ctrl-C (SIGINT, and SIGTERM as a batch scheduler sends it) stops a run cleanly: the first
//! one asks the workers to take no new tensor — the ones in flight finish and are journaled —
//! and the run ends with an error saying how to resume; a second one exits at once (the journal
//! keeps what was recorded).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use signal_hook::consts::{SIGINT, SIGTERM};

static REQUESTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Default::default);

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

/// Installs the handlers (the CLI calls this once, before the run): the first signal sets the
/// flag; a second, finding it set, exits at once with 130. signal-hook runs both in that order
/// and keeps them async-signal-safe.
pub fn install() {
    for signal in [SIGINT, SIGTERM] {
        let installed =
            signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&REQUESTED))
                .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&REQUESTED)));
        if let Err(e) = installed {
            tracing::warn!("cannot install the handler for signal {signal}: {e} (an interrupt then stops the run at once, without the clean stop)");
        }
    }
}
