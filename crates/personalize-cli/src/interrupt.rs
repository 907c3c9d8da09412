//! Ctrl-C: the first one asks the running generation or training to stop after its current
//! step (images already written are kept; training writes a checkpoint), a second one quits at
//! once. Both exit with status 130, as a shell reports SIGINT.

use std::sync::Once;

/// Installs the handler (once; later calls do nothing).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let r = ctrlc::set_handler(|| {
            if personalize::interrupt::requested() {
                std::process::exit(130);
            }
            personalize::interrupt::request();
            eprintln!("\nstopping after this step (Ctrl-C again to quit now)");
        });
        if let Err(e) = r {
            tracing::warn!("Ctrl-C will stop at once, without saving: no signal handler ({e})");
        }
    });
}

/// True when `e` is (or wraps) a stop on request.
pub fn was_interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| matches!(c.downcast_ref::<personalize::Error>(), Some(personalize::Error::Interrupted(_))))
}
