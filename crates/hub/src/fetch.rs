//! Downloads into the Hugging Face cache with hf-hub: only the files the pipeline reads,
//! resumed from partial files, each checked against the published size and sha256.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::cache::token_from_env;
use crate::select::{self, Variant};
use crate::{parse_target, Error, HubCache, Result, Snapshot, DEFAULT_ENDPOINT};

/// Where and how to fetch. [`FetchOptions::new`] reads no environment (for tests and
/// embedding); [`FetchOptions::from_env`] is what a command-line tool wants.
///
/// ```
/// let mut opts = hub::FetchOptions::new("/tmp/hf-cache/hub");
/// opts.fp16 = true;
/// opts.endpoint = "http://127.0.0.1:8080".into();
/// assert_eq!(opts.revision, "main");
/// ```
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// The cache folder (the one holding `models--*`).
    pub cache_dir: PathBuf,
    /// The Hub, `https://huggingface.co` unless `HF_ENDPOINT` says otherwise.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer` (gated and private repositories).
    pub token: Option<String>,
    /// Branch, tag or commit hash.
    pub revision: String,
    /// Take the `.fp16.safetensors` weights of a diffusers pipeline where they are published.
    pub fp16: bool,
    /// Never touch the network: succeed only if the cache holds everything.
    pub offline: bool,
    /// Show a progress bar per file on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
    /// Retries of a failed download (each resumes where the last stopped).
    pub retries: usize,
}

impl FetchOptions {
    /// Defaults, with the cache at `cache_dir` and nothing read from the environment.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            endpoint: DEFAULT_ENDPOINT.into(),
            token: None,
            revision: "main".into(),
            fp16: false,
            offline: false,
            progress: false,
            retries: 0,
        }
    }

    /// Options from the environment, as Python's `huggingface_hub` reads it: the cache from
    /// `HF_HUB_CACHE` / `HF_HOME`, `HF_ENDPOINT`, the token from `HF_TOKEN` or the token file
    /// (`HF_TOKEN_PATH`, `$HF_HOME/token`), `HF_HUB_OFFLINE=1`; with progress bars and 3
    /// retries.
    ///
    /// ```no_run
    /// let opts = hub::FetchOptions::from_env()?;
    /// let fetched = hub::fetch("sd-v1-5", &opts)?;
    /// # Ok::<(), hub::Error>(())
    /// ```
    pub fn from_env() -> Result<Self> {
        let mut o = Self::new(HubCache::from_env()?.dir());
        if let Some(e) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
            o.endpoint = e;
        }
        o.token = token_from_env();
        o.offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        o.progress = true;
        o.retries = 3;
        Ok(o)
    }
}

/// Where the files came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Listed on the Hub; missing files were downloaded.
    Network,
    /// From the cache, as asked (`--offline`, `HF_HUB_OFFLINE`).
    Offline,
    /// From the cache because the Hub could not be reached (the reason).
    Unreachable(String),
}

/// The result of [`fetch()`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The repository and commit, the folder to load and its files.
    pub snapshot: Snapshot,
    /// The files downloaded (the rest were cached).
    pub downloaded: Vec<String>,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Where the files came from.
    pub source: Source,
}

/// Fetches the files the pipeline reads from a preset or repo id into the cache and returns
/// the snapshot folder to load (`--base`, `--blip2`).
///
/// Files already in the cache (from an earlier fetch or from Python tools) are not
/// downloaded again; a partial download resumes with a range request. Every downloaded file
/// is checked against the size and, for LFS files, the sha256 the Hub lists; a bad file is
/// deleted and reported. With `offline`, or when the Hub cannot be reached, the cache alone
/// answers.
///
/// ```no_run
/// let mut opts = hub::FetchOptions::from_env()?;
/// opts.fp16 = true;
/// let f = hub::fetch("sd-2-1-base", &opts)?;
/// println!("--base {}", f.snapshot.dir.display());
/// # Ok::<(), hub::Error>(())
/// ```
pub fn fetch(name: &str, opts: &FetchOptions) -> Result<Fetched> {
    let target = parse_target(name)?;
    let cache = HubCache::new(&opts.cache_dir);
    let variant = if opts.fp16 { Variant::Fp16 } else { Variant::Full };
    let from_cache = |source: Source| {
        cache.snapshot(&target, &opts.revision, variant).map(|snapshot| Fetched {
            snapshot,
            downloaded: vec![],
            bytes: 0,
            source,
        })
    };
    if opts.offline {
        return from_cache(Source::Offline);
    }
    let endpoint = opts.endpoint.trim_end_matches('/').to_string();
    let unreachable = |reason: String| match from_cache(Source::Unreachable(reason.clone())) {
        Err(Error::NotCached { .. }) => Err(Error::NoNetwork {
            endpoint: endpoint.clone(),
            reason,
            repo_id: target.repo_id.clone(),
            cache: opts.cache_dir.clone(),
        }),
        other => other,
    };

    let api = ApiBuilder::from_cache(hf_hub::Cache::new(opts.cache_dir.clone()))
        .with_endpoint(endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(false)
        .with_retries(opts.retries)
        .build()
        .map_err(|e| Error::Invalid { what: "hf-hub client".into(), msg: e.to_string() })?;
    let repo = api.repo(Repo::with_revision(target.repo_id.clone(), RepoType::Model, opts.revision.clone()));

    // hf-hub's `info()` lists file names only; `blobs=true` adds each file's size, blob id and
    // LFS sha256, which the checks below need.
    let request = repo.info_request().query("blobs", "true");
    let url = request.url().to_string();
    let listing: Listing = match request.call() {
        Ok(resp) => {
            serde_json::from_reader(resp.into_reader()).map_err(|e| Error::Invalid { what: url, msg: e.to_string() })?
        }
        Err(ureq::Error::Transport(t)) => return unreachable(t.to_string()),
        Err(ureq::Error::Status(status, _)) if status >= 500 => {
            return unreachable(format!("HTTP {status} from {url}"))
        }
        Err(ureq::Error::Status(status, _)) => {
            let hint = match status {
                404 => format!("no such repository, or no revision `{}`", opts.revision),
                401 | 403 => "no such repository, or a private or gated one: set HF_TOKEN (or `huggingface-cli login`) and accept the model's licence on its page".into(),
                _ => "unexpected answer".into(),
            };
            return Err(Error::Repo { repo_id: target.repo_id.clone(), status, url, hint });
        }
    };
    let files: HashMap<String, Sibling> = listing.siblings.into_iter().map(|s| (s.rfilename.clone(), s)).collect();
    let has = |f: &str| files.contains_key(f);
    let layout = target.layout.or_else(|| select::detect(&has)).ok_or_else(|| Error::UnknownLayout {
        repo_id: target.repo_id.clone(),
        place: format!("revision {} at {endpoint}", opts.revision),
    })?;

    let mut dl = Downloader {
        repo: &repo,
        files: &files,
        snapshot: cache.snapshot_dir(&target.repo_id, &listing.sha),
        blobs: cache.repo_dir(&target.repo_id).join("blobs"),
        progress: opts.progress,
        done: Vec::new(),
        downloaded: Vec::new(),
        bytes: 0,
    };
    let plan = select::plan(layout, variant, &has, &mut |index| {
        let path = dl.get(index)?;
        std::fs::read_to_string(&path).map_err(|e| Error::io(path, e))
    })?;
    if !plan.missing.is_empty() {
        return Err(Error::MissingFiles {
            repo_id: target.repo_id.clone(),
            revision: opts.revision.clone(),
            files: plan.missing.join(", "),
        });
    }
    for f in &plan.files {
        dl.get(f)?;
    }
    if opts.revision != listing.sha {
        // hf-hub writes the ref after each download; when everything was cached, do it here.
        hf_hub::Cache::new(opts.cache_dir.clone())
            .repo(Repo::with_revision(target.repo_id.clone(), RepoType::Model, opts.revision.clone()))
            .create_ref(&listing.sha)
            .map_err(|e| Error::io(cache.repo_dir(&target.repo_id).join("refs"), e))?;
    }
    let (downloaded, bytes, dir) = (dl.downloaded, dl.bytes, dl.snapshot);
    Ok(Fetched {
        snapshot: Snapshot { repo_id: target.repo_id.clone(), commit: listing.sha, dir, layout, files: plan.files },
        downloaded,
        bytes,
        source: Source::Network,
    })
}

/// The Hub's answer to `/api/models/{repo}/revision/{rev}?blobs=true`.
#[derive(serde::Deserialize)]
struct Listing {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(serde::Deserialize)]
struct Lfs {
    sha256: String,
    size: Option<u64>,
}

impl Sibling {
    fn size(&self) -> Option<u64> {
        self.lfs.as_ref().and_then(|l| l.size).or(self.size)
    }

    /// The sha256 to check: the LFS one (which is also the file's etag and blob name).
    fn sha256(&self) -> Option<&str> {
        self.lfs.as_ref().map(|l| l.sha256.as_str())
    }

    /// The etag the Hub serves, which names the blob in the cache: the LFS sha256, else the
    /// git blob id.
    fn etag(&self) -> Option<&str> {
        self.sha256().or(self.blob_id.as_deref())
    }
}

struct Downloader<'a> {
    repo: &'a ApiRepo,
    files: &'a HashMap<String, Sibling>,
    snapshot: PathBuf,
    blobs: PathBuf,
    progress: bool,
    done: Vec<String>,
    downloaded: Vec<String>,
    bytes: u64,
}

/// Whether `p` is a file (following links) of `size` bytes, when known.
fn has_size(p: &Path, size: Option<u64>) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && size.is_none_or(|s| m.len() == s))
}

impl Downloader<'_> {
    /// Makes `file` present and checked in the snapshot; returns its path there.
    fn get(&mut self, file: &str) -> Result<PathBuf> {
        let pointer = self.snapshot.join(file);
        if self.done.iter().any(|f| f == file) {
            return Ok(pointer);
        }
        let sib = &self.files[file];
        let size = sib.size();
        if !has_size(&pointer, size) {
            self.place(file, sib, &pointer)?;
        }
        self.done.push(file.to_string());
        Ok(pointer)
    }

    fn place(&mut self, file: &str, sib: &Sibling, pointer: &Path) -> Result<()> {
        let size = sib.size();
        // A stale or dangling link would block hf-hub's own.
        if std::fs::symlink_metadata(pointer).is_ok() {
            std::fs::remove_file(pointer).map_err(|e| Error::io(pointer, e))?;
        }
        let part = sib.etag().map(|etag| (self.blobs.join(etag), self.blobs.join(format!("{etag}.part"))));
        if let Some((blob, part)) = &part {
            if has_size(blob, size) {
                // The same content is cached for another commit (or by Python): link it.
                return link(blob, pointer, file);
            }
            let part_len = std::fs::metadata(part).map(|m| m.len()).ok();
            match (part_len, size) {
                (Some(n), Some(size)) if n > size => std::fs::remove_file(part).map_err(|e| Error::io(part, e))?,
                (Some(n), Some(size)) if n == size => {
                    // Complete but never renamed (stopped in between): check it like a download.
                    std::fs::rename(part, blob).map_err(|e| Error::io(part, e))?;
                    link(blob, pointer, file)?;
                    return self.verify(file, sib, pointer);
                }
                _ => {}
            }
        }
        let url = self.repo.url(file);
        let got = if self.progress {
            let bar = ProgressBar::new(0).with_style(bar_style());
            let res = self.repo.download_with_progress(file, Bar(bar.clone()));
            if res.is_err() {
                bar.abandon();
            }
            res
        } else {
            self.repo.download_with_progress(file, ())
        };
        let path = got.map_err(|e| self.api_error(file, &url, part.as_ref().map(|p| p.1.as_path()), e))?;
        if path != pointer {
            return Err(Error::Download {
                file: file.into(),
                reason: format!(
                    "the repository changed during the fetch (the file landed in {}); rerun",
                    path.display()
                ),
                url,
            });
        }
        self.verify(file, sib, pointer)?;
        self.downloaded.push(file.to_string());
        self.bytes += size.unwrap_or(0);
        Ok(())
    }

    /// hf-hub checks nothing after a download: compare size and sha256 with the listing, and
    /// never leave a bad file in the snapshot. A short file goes back to being a part file.
    fn verify(&self, file: &str, sib: &Sibling, pointer: &Path) -> Result<()> {
        let blob = std::fs::canonicalize(pointer).map_err(|e| Error::io(pointer, e))?;
        let actual = std::fs::metadata(&blob).map_err(|e| Error::io(&blob, e))?.len();
        let drop_pointer = || std::fs::remove_file(pointer).map_err(|e| Error::io(pointer, e));
        if let Some(expected) = sib.size().filter(|&s| s != actual) {
            drop_pointer()?;
            let action = if actual < expected {
                let mut part = blob.clone().into_os_string();
                part.push(".part");
                std::fs::rename(&blob, &part).map_err(|e| Error::io(&blob, e))?;
                "kept as a part file, rerun to resume"
            } else {
                std::fs::remove_file(&blob).map_err(|e| Error::io(&blob, e))?;
                "the bad download was deleted, rerun to fetch it again"
            };
            return Err(Error::SizeMismatch { file: file.into(), expected, actual, action });
        }
        if let Some(expected) = sib.sha256() {
            let actual = sha256_file(&blob)?;
            if !actual.eq_ignore_ascii_case(expected) {
                drop_pointer()?;
                std::fs::remove_file(&blob).map_err(|e| Error::io(&blob, e))?;
                return Err(Error::HashMismatch { file: file.into(), expected: expected.into(), actual });
            }
        }
        Ok(())
    }

    fn api_error(&self, file: &str, url: &str, part: Option<&Path>, e: ApiError) -> Error {
        let (file, url) = (file.to_string(), url.to_string());
        match e {
            ApiError::TooManyRetries(inner) => self.api_error(&file, &url, part, *inner),
            ApiError::RequestError(e) => match *e {
                ureq::Error::Status(404, _) => Error::FileNotFound { file, url },
                ureq::Error::Status(status, _) => Error::Download { file, reason: format!("HTTP {status}"), url },
                ureq::Error::Transport(t) => {
                    Error::Download { file, reason: format!("cannot reach the server: {t}"), url }
                }
            },
            ApiError::IoError(io) => {
                let part = part.map_or_else(|| self.blobs.clone(), Path::to_path_buf);
                let kept = std::fs::metadata(&part).map_or(0, |m| m.len());
                let hint = if io.kind() == std::io::ErrorKind::StorageFull {
                    "free disk space and rerun to resume"
                } else {
                    "rerun to resume"
                };
                Error::Interrupted { file, reason: io.to_string(), kept, part, hint }
            }
            other => Error::Download { file, reason: other.to_string(), url },
        }
    }
}

/// Links `pointer` to `blob` the way the Hub cache does (a relative symlink), or hard-links
/// or copies it where symlinks are unavailable.
fn link(blob: &Path, pointer: &Path, file: &str) -> Result<()> {
    let dir = pointer.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    #[cfg(unix)]
    {
        // snapshots/<commit>/<file> -> ../../(one more per folder in file)blobs/<etag>
        let mut target = PathBuf::from("../".repeat(2 + file.matches('/').count()));
        target.push("blobs");
        target.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(target, pointer).map_err(|e| Error::io(pointer, e))
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        std::fs::hard_link(blob, pointer)
            .or_else(|_| std::fs::copy(blob, pointer).map(|_| ()))
            .map_err(|e| Error::io(pointer, e))
    }
}

/// The lowercase hex sha256 of a file.
fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

const BAR: &str = "{msg:32!} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})";

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(BAR).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// hf-hub's progress hook on an indicatif 0.18 bar (hf-hub implements it for 0.17's).
struct Bar(ProgressBar);

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        // Called again on each (resumed) attempt, followed by `update(bytes already there)`.
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_string());
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_progress_template_parses() {
        assert!(indicatif::ProgressStyle::with_template(super::BAR).is_ok());
    }
}
