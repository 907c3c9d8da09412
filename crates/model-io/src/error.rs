use std::path::PathBuf;

/// Result alias used across the model crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading a model or a tensor file. Each message is one line
/// that names the file or tensor and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message and not also a `source()`: a chain printer (anyhow's
    // `{:#}`) would print it twice. (thiserror takes a field named `source` as the source.)
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("{path}: invalid JSON: {cause}")]
    Json { path: PathBuf, cause: serde_json::Error },
    #[error("{path}: not a valid safetensors file ({reason}); is it truncated or corrupt?")]
    BadSafetensors { path: PathBuf, reason: String },
    #[error("{path}: not a readable ONNX model: {reason}")]
    BadOnnx { path: PathBuf, reason: String },
    #[error("{dir}: no weights found; expected one of {expected}")]
    NoWeights { dir: PathBuf, expected: String },
    #[error("{index}: shard {shard} is missing")]
    MissingShard { index: PathBuf, shard: PathBuf },
    #[error("{checkpoint}: missing tensor `{name}`{hint}")]
    MissingTensor { checkpoint: String, name: String, hint: String },
    #[error("{checkpoint}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape { checkpoint: String, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{checkpoint}: tensor `{name}` has dtype {found}, expected {expected}")]
    DType { checkpoint: String, name: String, expected: String, found: String },
    #[error("{checkpoint}: {count} unexpected tensor(s), e.g. `{first}`{origin} (wrong model type or config?)")]
    Unused { checkpoint: String, count: usize, first: String, origin: String },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// An error about user input that is not tied to a file (a wrong shape, a bad argument).
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
