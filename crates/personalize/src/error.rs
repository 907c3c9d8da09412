//! The orchestration layer's error type: the model and scheduler errors it passes on, and the
//! failures of its own (bad settings, NaN, a resume or a concept that does not fit).

use std::path::PathBuf;

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong generating or training. Each message is one line naming the
/// file, setting or tensor and what was expected.
///
/// ```
/// let e = personalize::Error::from(scheduler::SchedulerError::ZeroSteps);
/// assert!(matches!(e, personalize::Error::Scheduler(_)));
/// assert!(e.to_string().contains("at least 1"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model folder, weight file or tensor file (the model crates' errors).
    #[error(transparent)]
    Model(#[from] model_io::Error),
    /// A scheduler config, or a scheduler step.
    #[error(transparent)]
    Scheduler(#[from] scheduler::SchedulerError),
    /// A file that could not be read or written. The OS error is in the message, not also a
    /// `source()` (a chain printer would print it twice).
    #[error("{path}: {cause}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// A JSON file of ours (concept.json, a checkpoint's state.json) that does not parse.
    #[error("{path}: invalid JSON: {cause}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What serde said.
        cause: serde_json::Error,
    },
    /// A folder or JSON file whose content is not what it should be.
    #[error("{path}: {message}")]
    Config {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A setting or input out of range, or at odds with another.
    #[error("{0}")]
    Invalid(String),
    /// A stage made, or an input holds, NaN or infinite values; the message names which and
    /// what was kept.
    #[error("{0}")]
    NonFinite(String),
    /// `--resume` found a checkpoint that another run wrote.
    #[error("cannot resume from {checkpoint}: {reason}")]
    ResumeMismatch {
        /// The checkpoint folder.
        checkpoint: PathBuf,
        /// What differs (a setting, the data, the base model).
        reason: String,
    },
    /// A concept trained on a base model whose UNet differs from this one's.
    #[error(
        "concept {concept} was trained on a base model whose UNet weights differ from those of {base} (fingerprint {trained_on} there, {here} here; it names its base {named}); pass --allow-base-mismatch to use it anyway"
    )]
    BaseMismatch {
        /// The concept folder.
        concept: PathBuf,
        /// The base model folder in use.
        base: PathBuf,
        /// The fingerprint of the UNet the concept was trained on.
        trained_on: String,
        /// The fingerprint of this UNet.
        here: String,
        /// The base model the concept names.
        named: String,
    },
    /// The work was stopped on request (Ctrl-C) between two steps; the message says where and
    /// what was kept.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl Error {
    /// An error about a setting or input that is not tied to a file.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
