//! Hugging Face Hub models for the pipeline.
//!
//! * [`PRESETS`] names the published models the pipeline runs (`sd-v1-5`, `blip2`, ...);
//!   [`parse_target`] turns a preset or an `owner/name` repo id into a [`Target`].
//! * [`select`] decides which files of a repository the pipeline reads: the diffusers
//!   components' configs, tokenizer and weights (full or `.fp16`), or BLIP-2's config and only
//!   the weight shards holding the vision model, Q-Former and query tokens.
//! * [`HubCache`] reads the standard Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`,
//!   `~/.cache/huggingface/hub`), shared with Python tools; [`resolve_model`] turns a
//!   command-line model argument (a folder, a preset or a repo id) into a local folder
//!   without touching the network.
//! * With the `fetch` feature, [`fetch()`] downloads what is missing into that cache, resuming
//!   partial files and checking every file's size and sha256.
//!
//! ```no_run
//! // In a command-line tool: `--base sd-v1-5` or `--base ./my-model`.
//! let dir = hub::resolve_model("sd-v1-5")?;
//! println!("loading {}", dir.display());
//! # Ok::<(), hub::Error>(())
//! ```

mod cache;
#[cfg(feature = "fetch")]
mod fetch;
pub mod select;

use std::path::PathBuf;

pub use cache::{resolve_model, resolve_model_in, HubCache, Snapshot};
#[cfg(feature = "fetch")]
pub use fetch::{fetch, FetchOptions, Fetched, Source};
pub use select::{Layout, Variant};

/// The Hub the files come from unless `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A published model the pipeline knows by a short name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    /// The short name (`sd-v1-5`).
    pub name: &'static str,
    /// The Hub repository (`stable-diffusion-v1-5/stable-diffusion-v1-5`).
    pub repo_id: &'static str,
    /// Its layout, which decides the files fetched.
    pub layout: Layout,
    /// One line for listings.
    pub about: &'static str,
}

/// The presets, in the order they are listed.
///
/// ```
/// let p = hub::PRESETS.iter().find(|p| p.name == "blip2").unwrap();
/// assert_eq!(p.repo_id, "Salesforce/blip2-opt-2.7b");
/// ```
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "sd-v1-5",
        repo_id: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        layout: Layout::Diffusers,
        about: "Stable Diffusion 1.5, 512x512",
    },
    Preset {
        name: "sd-2-1-base",
        repo_id: "stabilityai/stable-diffusion-2-1-base",
        layout: Layout::Diffusers,
        about: "Stable Diffusion 2.1 base, 512x512",
    },
    Preset {
        name: "sd-2-1",
        repo_id: "stabilityai/stable-diffusion-2-1",
        layout: Layout::Diffusers,
        about: "Stable Diffusion 2.1, 768x768 v-prediction",
    },
    Preset {
        name: "sdxl-base-1.0",
        repo_id: "stabilityai/stable-diffusion-xl-base-1.0",
        layout: Layout::Diffusers,
        about: "Stable Diffusion XL base 1.0, 1024x1024 (two text encoders; the refiner is not supported)",
    },
    Preset {
        name: "blip2",
        repo_id: "Salesforce/blip2-opt-2.7b",
        layout: Layout::Blip2,
        about: "BLIP-2 ViT-g + Q-Former (only the shards holding them; not OPT-2.7b)",
    },
    Preset {
        name: "blip2-itm-vit-g",
        repo_id: "Salesforce/blip2-itm-vit-g",
        layout: Layout::Blip2,
        about: "BLIP-2 ViT-g + Q-Former for image-text matching",
    },
];

/// The preset called `name`, if any.
///
/// ```
/// assert_eq!(hub::preset("sd-2-1").unwrap().repo_id, "stabilityai/stable-diffusion-2-1");
/// assert!(hub::preset("sd-9").is_none());
/// ```
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// The preset names, comma-separated, for messages.
fn preset_names() -> String {
    PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

/// A repository to fetch or look up: from a preset or a repo id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// What the user wrote (`sd-v1-5` or `owner/name`), for messages and hints.
    pub name: String,
    /// The Hub repository id.
    pub repo_id: String,
    /// Known for presets; for repo ids it is detected from the files.
    pub layout: Option<Layout>,
}

/// Parses a preset name or an `owner/name` repo id.
///
/// ```
/// let t = hub::parse_target("sd-v1-5")?;
/// assert_eq!(t.repo_id, "stable-diffusion-v1-5/stable-diffusion-v1-5");
/// let t = hub::parse_target("Salesforce/blip2-flan-t5-xl")?;
/// assert_eq!(t.layout, None);
/// assert!(hub::parse_target("sd-9").unwrap_err().to_string().contains("sd-v1-5"));
/// # Ok::<(), hub::Error>(())
/// ```
pub fn parse_target(name: &str) -> Result<Target> {
    if let Some(p) = preset(name) {
        return Ok(Target { name: name.into(), repo_id: p.repo_id.into(), layout: Some(p.layout) });
    }
    if is_repo_id(name) {
        return Ok(Target { name: name.into(), repo_id: name.into(), layout: None });
    }
    Err(Error::UnknownModel { name: name.into(), presets: preset_names() })
}

/// `owner/name`, each part of letters, digits, `-`, `_` and `.`, not starting with `.` or `-`.
fn is_repo_id(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((owner, name)) if part(owner) && part(name))
}

/// Everything that can go wrong; each message is one line naming the file, URL or folder and
/// what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not an existing folder, a preset or a repo id.
    #[error("`{name}` is not a folder, a preset ({presets}) or a repo id (owner/name)")]
    UnknownModel {
        /// What was given.
        name: String,
        /// The presets, comma-separated.
        presets: String,
    },
    /// A path-like argument that does not exist.
    #[error("no such folder `{0}` (a model is a folder, a preset or a fetched repo id)")]
    NoSuchFolder(String),
    /// The repository, or part of it, is not in the cache.
    #[error("{repo_id} is not in the Hugging Face cache {} ({detail}); run `cargo xtask fetch {name}`", cache.display())]
    NotCached {
        /// What the user wrote.
        name: String,
        /// The repository.
        repo_id: String,
        /// The cache folder searched.
        cache: PathBuf,
        /// What is missing.
        detail: String,
    },
    /// No network and not everything cached.
    #[error("cannot reach {endpoint} ({reason}), and {repo_id} is not fully in the Hugging Face cache {}; connect, or fill that cache and pass --offline (HF_HUB_OFFLINE=1)", cache.display())]
    NoNetwork {
        /// The Hub endpoint.
        endpoint: String,
        /// The transport error.
        reason: String,
        /// The repository.
        repo_id: String,
        /// The cache folder.
        cache: PathBuf,
    },
    /// The repository (or revision) does not exist, or needs a token.
    #[error("{repo_id}: HTTP {status} from {url}: {hint}")]
    Repo {
        /// The repository.
        repo_id: String,
        /// The HTTP status.
        status: u16,
        /// The listing URL.
        url: String,
        /// What it likely means.
        hint: String,
    },
    /// One file is not on the server.
    #[error("{file}: not found (HTTP 404) at {url}")]
    FileNotFound {
        /// The file in the repository.
        file: String,
        /// The URL asked.
        url: String,
    },
    /// Any other failure to download one file (bad status, missing header, lock, network).
    #[error("{file}: {reason} ({url})")]
    Download {
        /// The file in the repository.
        file: String,
        /// What happened.
        reason: String,
        /// The URL asked.
        url: String,
    },
    /// A download stopped part-way (connection cut, disk full); the part file is kept.
    #[error("{file}: download stopped ({reason}); {kept} bytes kept in {}; {hint}", part.display())]
    Interrupted {
        /// The file in the repository.
        file: String,
        /// The I/O error.
        reason: String,
        /// Bytes in the part file.
        kept: u64,
        /// The part file the next fetch resumes from.
        part: PathBuf,
        /// What to do.
        hint: &'static str,
    },
    /// The repository lacks files the pipeline needs.
    #[error("{repo_id} at {revision} has no {files}")]
    MissingFiles {
        /// The repository.
        repo_id: String,
        /// The revision listed.
        revision: String,
        /// The missing files, comma-separated, each with a hint where one helps.
        files: String,
    },
    /// Neither a diffusers pipeline nor a BLIP-2 checkpoint.
    #[error("{repo_id}: no model_index.json (diffusers pipeline) or config.json (BLIP-2 checkpoint) in {place}")]
    UnknownLayout {
        /// The repository.
        repo_id: String,
        /// Where we looked.
        place: String,
    },
    /// A downloaded file's sha256 is not the published one; it was deleted.
    #[error("{file}: sha256 {actual} does not match the published {expected}; the bad download was deleted, rerun to fetch it again")]
    HashMismatch {
        /// The file in the repository.
        file: String,
        /// The published sha256.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// A downloaded file's size is not the published one.
    #[error("{file}: {actual} bytes where {expected} were published; {action}")]
    SizeMismatch {
        /// The file in the repository.
        file: String,
        /// The published size.
        expected: u64,
        /// The size on disk.
        actual: u64,
        /// What was done about it.
        action: &'static str,
    },
    /// A file could not be read or written.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error (in the message, so not also a `source()`: it would print twice).
        cause: std::io::Error,
    },
    /// A JSON file (shard index, listing) could not be understood.
    #[error("{what}: {msg}")]
    Invalid {
        /// The file or URL.
        what: String,
        /// What is wrong.
        msg: String,
    },
    /// No home folder to find the default cache in.
    #[error("cannot find the home folder for the Hugging Face cache; set HF_HOME or HF_HUB_CACHE")]
    NoHome,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause: source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_presets() {
        assert_eq!(parse_target("blip2").unwrap().layout, Some(Layout::Blip2));
        assert_eq!(parse_target("a/b").unwrap().repo_id, "a/b");
        for bad in ["sd-9", "a/b/c", "/abs", "./x", "../x", "a/", "/b", "a/.hidden", "a/b c", ""] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
        let msg = parse_target("sd-9").unwrap_err().to_string();
        for p in PRESETS {
            assert!(msg.contains(p.name), "{msg}");
        }
        assert!(!msg.contains('\n'));
    }
}
