//! The crate's error type: one line per failure, naming the file or field and what was expected.

use std::path::PathBuf;

/// Everything that can go wrong building or running a scheduler.
///
/// ```
/// let e = scheduler::SchedulerError::ZeroSteps;
/// assert!(e.to_string().contains("at least 1"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The config file could not be read.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, so not also a `source()`: it would print twice).
        cause: std::io::Error,
    },
    /// The config file is not valid JSON, or a field has the wrong JSON type.
    #[error("{path}: {message}")]
    Json {
        /// The file (or `<config>` for an in-memory config).
        path: PathBuf,
        /// What serde said.
        message: String,
    },
    /// `_class_name` (or a CLI override name) names no supported scheduler.
    #[error("{path}: unknown scheduler {name:?} in `{field}`; supported: {supported}")]
    UnknownClass {
        /// The file.
        path: PathBuf,
        /// `_class_name`, or `override` for a CLI name.
        field: &'static str,
        /// The name found.
        name: String,
        /// The supported names, comma separated.
        supported: String,
    },
    /// A scheduler name given to override the folder's (the CLI's `--scheduler`) is unknown.
    #[error("--scheduler {name:?} is unknown; supported: {supported}")]
    UnknownName {
        /// The name given.
        name: String,
        /// The supported names, comma separated.
        supported: String,
    },
    /// A config field has a value this crate does not implement.
    #[error("{path}: `{field}` = {value:?} is not supported; expected one of: {expected}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The config key.
        field: String,
        /// The value found.
        value: String,
        /// The accepted values.
        expected: String,
    },
    /// A config field has a value out of range (for example `num_train_timesteps` = 0).
    #[error("{path}: `{field}` {message}")]
    InvalidField {
        /// The file.
        path: PathBuf,
        /// The config key.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// `set_timesteps(0)`.
    #[error("num_inference_steps must be at least 1, got 0")]
    ZeroSteps,
    /// More inference steps than the model was trained with.
    #[error("num_inference_steps = {steps} is larger than num_train_timesteps = {train} of the scheduler config")]
    TooManySteps {
        /// The steps asked for.
        steps: usize,
        /// `num_train_timesteps`.
        train: usize,
    },
    /// `step` or `scale_model_input` before `set_timesteps`.
    #[error("set_timesteps must be called before {0}")]
    NotInitialized(&'static str),
    /// A timestep that is not in the current schedule (or not an integer training timestep).
    #[error("timestep {timestep} is not valid here: {message}")]
    BadTimestep {
        /// The timestep passed.
        timestep: f64,
        /// Why.
        message: String,
    },
    /// More `step` calls than timesteps.
    #[error("step called {calls} times, but the schedule has only {len} timesteps")]
    PastEnd {
        /// Calls including this one.
        calls: usize,
        /// Timesteps in the schedule.
        len: usize,
    },
    /// A stochastic scheduler got no usable noise.
    #[error("noise: {0}")]
    Noise(String),
    /// Tensors of different shapes, or a wrong number of them.
    #[error("shape mismatch: {0}")]
    Shape(String),
}

/// `Result` with [`SchedulerError`].
pub type Result<T, E = SchedulerError> = std::result::Result<T, E>;
