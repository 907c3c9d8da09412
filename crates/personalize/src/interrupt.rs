//! A stop request (Ctrl-C) that long work checks between steps: generation stops keeping the
//! images already written, training writes a checkpoint and stops. The binary sets it from its
//! signal handler; the library only reads it.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks the running generation or training to stop at the next step.
///
/// ```
/// personalize::interrupt::request();
/// assert!(personalize::interrupt::requested());
/// personalize::interrupt::reset();
/// ```
pub fn request() {
    STOP.store(true, Ordering::SeqCst);
}

/// True once [`request`] was called (and not [`reset`]).
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Clears a request (for a library user who runs more work after an interruption).
pub fn reset() {
    STOP.store(false, Ordering::SeqCst);
}
