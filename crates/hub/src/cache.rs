//! The standard Hugging Face cache, read without the network.
//!
//! Layout (shared with Python's `huggingface_hub`): `<cache>/models--owner--name/` holds
//! `refs/<revision>` (a commit hash), `blobs/<etag>` (file contents) and
//! `snapshots/<commit>/<file>` (links to the blobs).

use std::path::{Path, PathBuf};

use crate::select::{self, Layout, Variant};
use crate::{parse_target, preset, Error, Result, Target};

/// The Hugging Face cache folder (the `hub` folder holding `models--*`).
///
/// ```
/// let cache = hub::HubCache::new("/data/hf/hub");
/// assert!(cache.repo_dir("Salesforce/blip2-opt-2.7b").ends_with("models--Salesforce--blip2-opt-2.7b"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubCache {
    dir: PathBuf,
}

/// A cached snapshot holding every file the pipeline reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The repository.
    pub repo_id: String,
    /// The commit hash the snapshot is of.
    pub commit: String,
    /// `<cache>/models--owner--name/snapshots/<commit>`: the folder to load.
    pub dir: PathBuf,
    /// The repository's layout.
    pub layout: Layout,
    /// The files the pipeline reads, relative to `dir`.
    pub files: Vec<String>,
}

/// A non-empty environment variable as a path.
fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface` (as Python does).
pub(crate) fn hf_home() -> Option<PathBuf> {
    env_path("HF_HOME")
        .or_else(|| env_path("XDG_CACHE_HOME").map(|p| p.join("huggingface")))
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache").join("huggingface")))
}

/// The token: `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the file at
/// `HF_TOKEN_PATH` or `$HF_HOME/token` (written by `huggingface-cli login`).
#[cfg(feature = "fetch")]
pub(crate) fn token_from_env() -> Option<String> {
    let from_var = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"].iter().find_map(|k| std::env::var(k).ok());
    let from_file = || {
        let path = env_path("HF_TOKEN_PATH").or_else(|| hf_home().map(|h| h.join("token")))?;
        std::fs::read_to_string(path).ok()
    };
    from_var.or_else(from_file).map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// A 40-hex-digit commit hash.
pub(crate) fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

impl HubCache {
    /// A cache at `dir` (the folder holding `models--*`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache the environment names, as Python's `huggingface_hub` finds it: `HF_HUB_CACHE`,
    /// else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    ///
    /// ```no_run
    /// println!("{}", hub::HubCache::from_env()?.dir().display());
    /// # Ok::<(), hub::Error>(())
    /// ```
    pub fn from_env() -> Result<Self> {
        env_path("HF_HUB_CACHE")
            .or_else(|| env_path("HUGGINGFACE_HUB_CACHE"))
            .or_else(|| hf_home().map(|h| h.join("hub")))
            .map(Self::new)
            .ok_or(Error::NoHome)
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<cache>/models--owner--name`.
    pub fn repo_dir(&self, repo_id: &str) -> PathBuf {
        self.dir.join(hf_hub::Repo::model(repo_id.to_string()).folder_name())
    }

    /// `<cache>/models--owner--name/snapshots/<commit>`.
    pub fn snapshot_dir(&self, repo_id: &str, commit: &str) -> PathBuf {
        self.repo_dir(repo_id).join("snapshots").join(commit)
    }

    /// The commit `revision` points to in the cache: itself when it is a cached commit hash,
    /// else the content of `refs/<revision>`.
    pub fn commit(&self, repo_id: &str, revision: &str) -> Option<String> {
        if is_commit(revision) && self.snapshot_dir(repo_id, revision).is_dir() {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.repo_dir(repo_id).join("refs").join(revision)).ok()?;
        Some(text.trim().to_string()).filter(|c| !c.is_empty())
    }

    /// The cached snapshot of `target` at `revision`, if it holds every file the pipeline
    /// reads in `variant`; else [`Error::NotCached`] saying what is missing.
    ///
    /// ```no_run
    /// let cache = hub::HubCache::from_env()?;
    /// let snap = cache.snapshot(&hub::parse_target("sd-v1-5")?, "main", hub::Variant::Full)?;
    /// println!("{}", snap.dir.display());
    /// # Ok::<(), hub::Error>(())
    /// ```
    pub fn snapshot(&self, target: &Target, revision: &str, variant: Variant) -> Result<Snapshot> {
        let not_cached = |detail: String| Error::NotCached {
            name: target.name.clone(),
            repo_id: target.repo_id.clone(),
            cache: self.dir.clone(),
            detail,
        };
        let repo = self.repo_dir(&target.repo_id);
        let folder = repo.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let commit =
            self.commit(&target.repo_id, revision).ok_or_else(|| not_cached(format!("no {folder}/refs/{revision}")))?;
        let dir = self.snapshot_dir(&target.repo_id, &commit);
        if !dir.is_dir() {
            return Err(not_cached(format!("no {folder}/snapshots/{commit}")));
        }
        // `is_file` follows the links, so a link to a missing blob counts as missing.
        let has = |f: &str| dir.join(f).is_file();
        let layout = target
            .layout
            .or_else(|| select::detect(&has))
            .ok_or_else(|| not_cached(format!("snapshot {commit} has no model_index.json or config.json")))?;
        let mut read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| Error::io(dir.join(f), e));
        let plan = select::plan(layout, variant, &has, &mut read)?;
        if !plan.missing.is_empty() {
            return Err(not_cached(format!("snapshot {commit} lacks {}", plan.missing.join(", "))));
        }
        Ok(Snapshot { repo_id: target.repo_id.clone(), commit, dir, layout, files: plan.files })
    }
}

/// Resolves a model argument to a local folder, reading the cache from the environment
/// (see [`HubCache::from_env`]); never touches the network. See [`resolve_model_in`].
///
/// ```no_run
/// let unet = hub::resolve_model("sd-v1-5/unet")?;
/// # Ok::<(), hub::Error>(())
/// ```
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    if Path::new(arg).exists() {
        return Ok(PathBuf::from(arg));
    }
    resolve_model_in(&HubCache::from_env()?, arg)
}

/// Resolves a model argument against `cache`: an existing path wins; otherwise a preset
/// (`sd-v1-5`) or repo id (`owner/name`), optionally followed by a subfolder (`sd-v1-5/unet`),
/// is looked up in the cache at `refs/main`. The snapshot must hold every file the pipeline
/// reads (either weight variant), else the error names the cache and the fetch command.
///
/// ```
/// let cache = hub::HubCache::new(std::env::temp_dir().join("no-such-hf-cache"));
/// let err = hub::resolve_model_in(&cache, "sd-v1-5").unwrap_err().to_string();
/// assert!(err.contains("cargo xtask fetch sd-v1-5"), "{err}");
/// assert!(hub::resolve_model_in(&cache, "sd-9").unwrap_err().to_string().contains("blip2"));
/// ```
pub fn resolve_model_in(cache: &HubCache, arg: &str) -> Result<PathBuf> {
    if Path::new(arg).exists() {
        return Ok(PathBuf::from(arg));
    }
    let path_like = arg.starts_with(['/', '.', '~']) || arg.contains('\\') || Path::new(arg).is_absolute();
    if path_like {
        return Err(Error::NoSuchFolder(arg.to_string()));
    }
    let parts: Vec<&str> = arg.split('/').collect();
    let repo_parts = if preset(parts[0]).is_some() { 1 } else { 2.min(parts.len()) };
    let target = parse_target(&parts[..repo_parts].join("/"))
        .map_err(|_| Error::UnknownModel { name: arg.to_string(), presets: crate::preset_names() })?;
    let snap = cache.snapshot(&target, "main", Variant::Full).map_err(|e| match e {
        // `owner/name` may just as well have been a mistyped relative folder.
        Error::NotCached { name, repo_id, cache, detail } if target.layout.is_none() => {
            Error::NotCached { name, repo_id, cache, detail: format!("{detail}; nor is there a folder `{arg}`") }
        }
        e => e,
    })?;
    let sub = &parts[repo_parts..];
    if sub.is_empty() {
        return Ok(snap.dir);
    }
    let dir = sub.iter().fold(snap.dir, |d, s| d.join(s));
    if sub.iter().any(|s| s.is_empty() || *s == "..") || !dir.is_dir() {
        return Err(Error::NoSuchFolder(dir.display().to_string()));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a snapshot the way the Hub cache does (blob + relative link), without a network.
    fn put(cache: &HubCache, repo: &str, commit: &str, files: &[&str]) {
        let snap = cache.snapshot_dir(repo, commit);
        for f in files {
            let p = snap.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(
                &p,
                if f.ends_with(".index.json") { r#"{"weight_map": {"qformer.x": "m-2.safetensors"}}"# } else { "x" },
            )
            .unwrap();
        }
        std::fs::create_dir_all(cache.repo_dir(repo).join("refs")).unwrap();
        std::fs::write(cache.repo_dir(repo).join("refs/main"), commit).unwrap();
    }

    const SD: &[&str] = &[
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ];

    #[test]
    fn resolves_presets_repo_ids_and_subfolders() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = HubCache::new(tmp.path());
        let c = "a".repeat(40);
        put(&cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", &c, SD);
        let snap = cache.snapshot_dir("stable-diffusion-v1-5/stable-diffusion-v1-5", &c);
        assert_eq!(resolve_model_in(&cache, "sd-v1-5").unwrap(), snap);
        assert_eq!(resolve_model_in(&cache, "stable-diffusion-v1-5/stable-diffusion-v1-5").unwrap(), snap);
        assert_eq!(resolve_model_in(&cache, "sd-v1-5/unet").unwrap(), snap.join("unet"));
        assert_eq!(
            resolve_model_in(&cache, "stable-diffusion-v1-5/stable-diffusion-v1-5/vae").unwrap(),
            snap.join("vae")
        );
        assert!(matches!(resolve_model_in(&cache, "sd-v1-5/unte"), Err(Error::NoSuchFolder(_))));
        assert!(matches!(resolve_model_in(&cache, "sd-v1-5/../x"), Err(Error::NoSuchFolder(_))));
        // An existing path wins, even when it looks like a preset.
        let here = tmp.path().join("sd-v1-5");
        std::fs::create_dir(&here).unwrap();
        let arg = here.to_str().unwrap();
        assert_eq!(resolve_model_in(&cache, arg).unwrap(), here);
        // A pinned commit resolves without refs.
        let target = parse_target("sd-v1-5").unwrap();
        std::fs::remove_file(cache.repo_dir(&target.repo_id).join("refs/main")).unwrap();
        assert_eq!(cache.snapshot(&target, &c, Variant::Full).unwrap().dir, snap);
        assert!(resolve_model_in(&cache, "sd-v1-5").is_err());
    }

    #[test]
    fn incomplete_or_missing_names_cache_and_command() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = HubCache::new(tmp.path());
        let c = "b".repeat(40);
        put(&cache, "Salesforce/blip2-opt-2.7b", &c, &["config.json", "model.safetensors.index.json"]);
        let err = resolve_model_in(&cache, "blip2").unwrap_err().to_string();
        assert!(err.contains("lacks m-2.safetensors") && err.contains("cargo xtask fetch blip2"), "{err}");
        assert!(err.contains(&tmp.path().display().to_string()), "{err}");
        let err = resolve_model_in(&cache, "someone/model").unwrap_err().to_string();
        assert!(
            err.contains("no models--someone--model/refs/main") && err.contains("cargo xtask fetch someone/model"),
            "{err}"
        );
        assert!(err.contains("nor is there a folder `someone/model`"), "{err}");
        assert!(matches!(resolve_model_in(&cache, "/no/such/dir"), Err(Error::NoSuchFolder(_))));
        assert!(matches!(resolve_model_in(&cache, "./rel"), Err(Error::NoSuchFolder(_))));
        assert!(matches!(resolve_model_in(&cache, "word"), Err(Error::UnknownModel { .. })));
        for e in [err, resolve_model_in(&cache, "word").unwrap_err().to_string()] {
            assert!(!e.contains('\n'));
        }
    }
}
