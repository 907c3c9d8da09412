//! `hub::fetch` against a local server speaking the Hub's protocol: no network, no Python.
//!
//! The server (a `TcpListener` on 127.0.0.1 in a thread) serves fake repositories the way
//! huggingface.co does for hf-hub: `/api/models/{repo}/revision/{rev}?blobs=true` lists the
//! files with sizes and LFS sha256s, and `/{repo}/resolve/{rev}/{file}` serves bytes with
//! `Range` support, `x-repo-commit`, `etag` / `x-linked-etag` and `content-range`. It can cut
//! a file short once, corrupt a file, or answer 404 for one, and logs every request.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hub::{fetch, resolve_model_in, Error, FetchOptions, HubCache, Source};
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic bytes.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(6364136223846793005) | 1;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect()
}

struct FakeFile {
    name: String,
    data: Vec<u8>,
}

impl FakeFile {
    fn lfs(&self) -> bool {
        self.name.ends_with(".safetensors")
    }

    /// What the Hub sends as the etag: the sha256 for LFS files, a git blob id otherwise.
    fn etag(&self) -> String {
        let h = sha256(&self.data);
        if self.lfs() {
            h
        } else {
            h[..40].to_string()
        }
    }
}

/// A diffusers pipeline with full and fp16 weights, and files the pipeline never reads.
fn sd_repo() -> Vec<FakeFile> {
    let text = |name: &str, body: &str| FakeFile { name: name.into(), data: body.as_bytes().to_vec() };
    let mut files = vec![
        text("model_index.json", r#"{"_class_name": "StableDiffusionPipeline"}"#),
        text("scheduler/scheduler_config.json", r#"{"_class_name": "PNDMScheduler"}"#),
        text("tokenizer/vocab.json", r#"{"a</w>": 0}"#),
        text("tokenizer/merges.txt", "#version: 0.2\n"),
        text("tokenizer/tokenizer_config.json", "{}"),
        text("tokenizer/special_tokens_map.json", r#"{"pad_token": "<|endoftext|>"}"#),
        text("text_encoder/config.json", r#"{"hidden_size": 32}"#),
        text("unet/config.json", r#"{"sample_size": 8}"#),
        text("vae/config.json", r#"{"latent_channels": 4}"#),
        text("README.md", "never fetched"),
        text("safety_checker/config.json", "{}"),
    ];
    for (i, (stem, n)) in
        [("text_encoder/model", 3000), ("unet/diffusion_pytorch_model", 20000), ("vae/diffusion_pytorch_model", 5000)]
            .into_iter()
            .enumerate()
    {
        files.push(FakeFile { name: format!("{stem}.safetensors"), data: bytes(i as u64, n) });
        files.push(FakeFile { name: format!("{stem}.fp16.safetensors"), data: bytes(10 + i as u64, n / 2) });
    }
    files.push(FakeFile { name: "unet/diffusion_pytorch_model.bin".into(), data: bytes(99, 100) });
    files
}

/// A sharded BLIP-2 checkpoint whose language model sits in a shard of its own.
fn blip2_repo() -> Vec<FakeFile> {
    let index = r#"{"metadata": {"total_size": 1}, "weight_map": {
        "language_model.model.decoder.embed_tokens.weight": "model-00001-of-00003.safetensors",
        "vision_model.embeddings.patch_embedding.weight": "model-00002-of-00003.safetensors",
        "qformer.layernorm.weight": "model-00003-of-00003.safetensors",
        "query_tokens": "model-00003-of-00003.safetensors",
        "language_projection.weight": "model-00001-of-00003.safetensors"}}"#;
    vec![
        FakeFile { name: "config.json".into(), data: br#"{"model_type": "blip-2"}"#.to_vec() },
        FakeFile { name: "preprocessor_config.json".into(), data: b"{}".to_vec() },
        FakeFile { name: "model.safetensors.index.json".into(), data: index.as_bytes().to_vec() },
        FakeFile { name: "model-00001-of-00003.safetensors".into(), data: bytes(1, 9000) },
        FakeFile { name: "model-00002-of-00003.safetensors".into(), data: bytes(2, 4000) },
        FakeFile { name: "model-00003-of-00003.safetensors".into(), data: bytes(3, 3000) },
    ]
}

/// What the server does wrong, per file.
#[derive(Default)]
struct Faults {
    /// Send this many bytes of the next download, then close the connection.
    cut_once: HashMap<String, usize>,
    /// Serve other bytes than the listed sha256 (same length).
    corrupt: HashSet<String>,
    /// Answer 404.
    missing: HashSet<String>,
}

#[derive(Clone, Debug)]
struct Req {
    path: String,
    range: Option<String>,
}

struct Server {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Req>>>,
    faults: Arc<Mutex<Faults>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(repos: Vec<(&str, Vec<FakeFile>)>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let repos: HashMap<String, Vec<FakeFile>> = repos.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let log = Arc::new(Mutex::new(Vec::new()));
        let faults = Arc::new(Mutex::new(Faults::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, f, s) = (log.clone(), faults.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = handle(conn, &repos, &l, &f);
                }
            }
        });
        Server { addr, log, faults, stop, thread: Some(thread) }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// File downloads (not hf-hub's one-byte metadata probes): (path, range).
    fn downloads(&self) -> Vec<(String, Option<String>)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.contains("/resolve/") && r.range.as_deref() != Some("bytes=0-0"))
            .map(|r| (r.path.clone(), r.range.clone()))
            .collect()
    }

    fn requested(&self, file: &str) -> bool {
        self.log.lock().unwrap().iter().any(|r| r.path.ends_with(&format!("/{file}")))
    }

    fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    /// Stops the server: its port refuses connections afterwards.
    fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn respond(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
    send: usize,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(&body[..send.min(body.len())])?;
    conn.flush()?;
    conn.shutdown(std::net::Shutdown::Both)
}

fn handle(
    mut conn: TcpStream,
    repos: &HashMap<String, Vec<FakeFile>>,
    log: &Mutex<Vec<Req>>,
    faults: &Mutex<Faults>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push(Req { path: path.clone(), range: range.clone() });
    let not_found = |conn: &mut TcpStream| respond(conn, "404 Not Found", &[], b"Entry not found", usize::MAX);

    // The file listing.
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let repo = rest.split("/revision/").next().unwrap_or("");
        let Some(files) = repos.get(repo) else { return not_found(&mut conn) };
        let siblings: Vec<String> = files
            .iter()
            .map(|f| {
                let lfs = if f.lfs() {
                    format!(
                        r#", "lfs": {{"sha256": "{}", "size": {}, "pointerSize": 134}}"#,
                        sha256(&f.data),
                        f.data.len()
                    )
                } else {
                    String::new()
                };
                format!(
                    r#"{{"rfilename": "{}", "size": {}, "blobId": "{}"{lfs}}}"#,
                    f.name,
                    f.data.len(),
                    &sha256(&f.data)[..40]
                )
            })
            .collect();
        let body = format!(r#"{{"id": "{repo}", "sha": "{COMMIT}", "siblings": [{}]}}"#, siblings.join(", "));
        return respond(
            &mut conn,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
            usize::MAX,
        );
    }

    // A file: /{owner}/{name}/resolve/{rev}/{file}.
    let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") else { return not_found(&mut conn) };
    let file = rest.split_once('/').map(|(_, f)| f).unwrap_or("");
    let Some(f) = repos.get(repo).and_then(|fs| fs.iter().find(|x| x.name == file)) else {
        return not_found(&mut conn);
    };
    let mut faults = faults.lock().unwrap();
    if faults.missing.contains(file) {
        return not_found(&mut conn);
    }
    let mut data = f.data.clone();
    if faults.corrupt.contains(file) {
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
    }
    let start: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end = match range.as_deref().and_then(|r| r.split('-').nth(1)).and_then(|e| e.parse::<usize>().ok()) {
        Some(e) => e.min(data.len() - 1),
        None => data.len() - 1,
    };
    if start >= data.len() {
        return respond(&mut conn, "416 Range Not Satisfiable", &[], b"", 0);
    }
    let mut headers =
        vec![("x-repo-commit", COMMIT.to_string()), ("Content-Range", format!("bytes {start}-{end}/{}", data.len()))];
    if f.lfs() {
        headers.push(("ETag", format!("\"{}\"", &sha256(&f.data)[..40])));
        headers.push(("x-linked-etag", format!("\"{}\"", f.etag())));
    } else {
        headers.push(("ETag", format!("\"{}\"", f.etag())));
    }
    let body = &data[start..=end];
    let probe = range.as_deref() == Some("bytes=0-0");
    let send = if probe { usize::MAX } else { faults.cut_once.remove(file).unwrap_or(usize::MAX) };
    drop(faults);
    respond(&mut conn, if range.is_some() { "206 Partial Content" } else { "200 OK" }, &headers, body, send)
}

fn options(cache: &Path, server: &Server) -> FetchOptions {
    let mut o = FetchOptions::new(cache);
    o.endpoint = server.endpoint();
    o
}

/// A fresh HF_HOME; the cache is its `hub` folder.
fn home() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    (t, cache)
}

/// Checks that `err` is of the expected kind (`kind`) and that its message is one line naming
/// every needle.
fn check_error(err: &Error, kind: bool, needles: &[&str]) {
    let msg = err.to_string();
    assert!(kind && !msg.contains('\n'), "{msg}");
    for n in needles {
        assert!(msg.contains(n), "`{n}` not in: {msg}");
    }
}

const SD_READ: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
];

#[test]
fn full_download_lands_in_the_hub_cache_and_is_reused() {
    let server = Server::start(vec![("test/tiny-sd", sd_repo())]);
    let (_home, cache) = home();
    let f = fetch("test/tiny-sd", &options(&cache, &server)).unwrap();
    let snap = cache.join("models--test--tiny-sd/snapshots").join(COMMIT);
    assert_eq!(f.snapshot.dir, snap);
    assert_eq!(f.source, Source::Network);
    assert_eq!(f.snapshot.layout, hub::Layout::Diffusers);
    let mut got = f.downloaded.clone();
    got.sort();
    let mut want: Vec<String> = SD_READ.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
    // Every file has the published bytes, as a link into blobs/ named by its etag.
    for file in sd_repo().iter().filter(|x| SD_READ.contains(&x.name.as_str())) {
        let p = snap.join(&file.name);
        assert_eq!(std::fs::read(&p).unwrap(), file.data, "{}", file.name);
        assert!(std::fs::symlink_metadata(&p).unwrap().file_type().is_symlink());
        assert!(cache.join("models--test--tiny-sd/blobs").join(file.etag()).is_file());
    }
    for never in [
        "README.md",
        "safety_checker/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ] {
        assert!(!server.requested(never), "{never} was requested");
    }
    assert_eq!(std::fs::read_to_string(cache.join("models--test--tiny-sd/refs/main")).unwrap().trim(), COMMIT);
    assert_eq!(resolve_model_in(&HubCache::new(&cache), "test/tiny-sd").unwrap(), snap);
    assert_eq!(resolve_model_in(&HubCache::new(&cache), "test/tiny-sd/unet").unwrap(), snap.join("unet"));

    // Again: the listing is asked, nothing is downloaded.
    server.clear_log();
    let again = fetch("test/tiny-sd", &options(&cache, &server)).unwrap();
    assert!(again.downloaded.is_empty(), "{:?}", again.downloaded);
    assert!(server.downloads().is_empty(), "{:?}", server.downloads());
    assert_eq!(again.snapshot.dir, snap);
}

#[test]
fn fp16_takes_the_fp16_weights_only() {
    let server = Server::start(vec![("test/tiny-sd", sd_repo())]);
    let (_home, cache) = home();
    let mut o = options(&cache, &server);
    o.fp16 = true;
    let f = fetch("test/tiny-sd", &o).unwrap();
    let weights: Vec<&String> = f.downloaded.iter().filter(|x| x.ends_with(".safetensors")).collect();
    assert_eq!(weights.len(), 3);
    assert!(weights.iter().all(|w| w.ends_with(".fp16.safetensors")), "{weights:?}");
    assert!(!server.requested("unet/diffusion_pytorch_model.safetensors"));
    // The loader takes either variant, so the folder resolves.
    assert_eq!(resolve_model_in(&HubCache::new(&cache), "test/tiny-sd").unwrap(), f.snapshot.dir);
}

#[test]
fn blip2_fetches_only_the_shards_of_the_vision_model_and_qformer() {
    let server = Server::start(vec![("test/tiny-blip2", blip2_repo())]);
    let (_home, cache) = home();
    let f = fetch("test/tiny-blip2", &options(&cache, &server)).unwrap();
    assert_eq!(f.snapshot.layout, hub::Layout::Blip2);
    assert_eq!(
        f.snapshot.files,
        [
            "config.json",
            "preprocessor_config.json",
            "model.safetensors.index.json",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors"
        ]
    );
    assert!(!server.requested("model-00001-of-00003.safetensors"), "the language-model shard was requested");
    assert_eq!(resolve_model_in(&HubCache::new(&cache), "test/tiny-blip2").unwrap(), f.snapshot.dir);
}

#[test]
fn a_cut_connection_resumes_from_the_part_file() {
    let server = Server::start(vec![("test/tiny-sd", sd_repo())]);
    let (_home, cache) = home();
    let unet = "unet/diffusion_pytorch_model.safetensors";
    server.faults.lock().unwrap().cut_once.insert(unet.into(), 7000);
    let err = fetch("test/tiny-sd", &options(&cache, &server)).unwrap_err();
    check_error(&err, matches!(err, Error::Interrupted { kept: 7000, .. }), &[unet, "rerun to resume"]);
    let data = sd_repo().into_iter().find(|x| x.name == unet).unwrap();
    let blobs = cache.join("models--test--tiny-sd/blobs");
    let part = blobs.join(format!("{}.part", data.etag()));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 7000);
    // Never taken for complete: no blob, no link, and the folder does not resolve.
    assert!(!blobs.join(data.etag()).exists());
    let snap = cache.join("models--test--tiny-sd/snapshots").join(COMMIT);
    assert!(std::fs::symlink_metadata(snap.join(unet)).is_err());
    assert!(resolve_model_in(&HubCache::new(&cache), "test/tiny-sd").is_err());

    server.clear_log();
    let f = fetch("test/tiny-sd", &options(&cache, &server)).unwrap();
    let unet_gets: Vec<Option<String>> =
        server.downloads().into_iter().filter(|(p, _)| p.ends_with(unet)).map(|(_, r)| r).collect();
    assert_eq!(unet_gets, [Some("bytes=7000-".to_string())], "the second run must continue the part file");
    assert_eq!(std::fs::read(snap.join(unet)).unwrap(), data.data);
    assert!(!part.exists());
    // Files finished before the cut were not downloaded again.
    assert!(!f.downloaded.contains(&"model_index.json".to_string()));
}

#[test]
fn a_corrupted_file_is_reported_and_not_left_in_the_cache() {
    let server = Server::start(vec![("test/tiny-sd", sd_repo())]);
    let (_home, cache) = home();
    let vae = "vae/diffusion_pytorch_model.safetensors";
    server.faults.lock().unwrap().corrupt.insert(vae.into());
    let err = fetch("test/tiny-sd", &options(&cache, &server)).unwrap_err();
    check_error(&err, matches!(err, Error::HashMismatch { .. }), &[vae, "deleted"]);
    let etag = sd_repo().into_iter().find(|x| x.name == vae).unwrap().etag();
    let blobs = cache.join("models--test--tiny-sd/blobs");
    assert!(!blobs.join(&etag).exists() && !blobs.join(format!("{etag}.part")).exists());
    let snap = cache.join("models--test--tiny-sd/snapshots").join(COMMIT);
    assert!(std::fs::symlink_metadata(snap.join(vae)).is_err());
    let unresolved = resolve_model_in(&HubCache::new(&cache), "test/tiny-sd").unwrap_err().to_string();
    assert!(unresolved.contains("lacks vae/diffusion_pytorch_model"), "{unresolved}");

    // Once the server is fixed, a rerun fetches the file afresh.
    server.faults.lock().unwrap().corrupt.clear();
    let f = fetch("test/tiny-sd", &options(&cache, &server)).unwrap();
    assert_eq!(f.downloaded, [vae]);
}

#[test]
fn offline_and_unreachable_reuse_the_cache() {
    let server = Server::start(vec![("test/tiny-sd", sd_repo())]);
    let (_home, cache) = home();
    let first = fetch("test/tiny-sd", &options(&cache, &server)).unwrap();
    let mut offline = options(&cache, &server);
    let endpoint = server.endpoint();
    server.stop();

    offline.offline = true;
    let f = fetch("test/tiny-sd", &offline).unwrap();
    assert_eq!((f.source, &f.snapshot.dir), (Source::Offline, &first.snapshot.dir));
    assert_eq!(f.snapshot.files, first.snapshot.files);

    // Not told to be offline, but the server is gone: the cache answers.
    let mut online = FetchOptions::new(&cache);
    online.endpoint = endpoint;
    let f = fetch("test/tiny-sd", &online).unwrap();
    assert!(matches!(f.source, Source::Unreachable(_)), "{:?}", f.source);
    assert_eq!(f.snapshot.dir, first.snapshot.dir);
    assert_eq!(resolve_model_in(&HubCache::new(&cache), "test/tiny-sd").unwrap(), first.snapshot.dir);

    // --fp16 offline takes the full weights that are there, as the loader would.
    offline.fp16 = true;
    assert_eq!(fetch("test/tiny-sd", &offline).unwrap().snapshot.files, first.snapshot.files);

    // What was never fetched is not there offline: the error names the cache and the command.
    offline.revision = "v2".into();
    let err = fetch("test/tiny-sd", &offline).unwrap_err();
    let cache_dir = cache.display().to_string();
    check_error(
        &err,
        matches!(err, Error::NotCached { .. }),
        &[&cache_dir, "refs/v2", "cargo xtask fetch test/tiny-sd"],
    );
}

#[test]
fn no_network_and_no_cache_names_the_cache_and_offline() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (_home, cache) = home();
    let mut o = FetchOptions::new(&cache);
    o.endpoint = format!("http://127.0.0.1:{port}");
    let err = fetch("sd-v1-5", &o).unwrap_err();
    let cache_dir = cache.display().to_string();
    check_error(&err, matches!(err, Error::NoNetwork { .. }), &[&cache_dir, "--offline", "127.0.0.1"]);
}

#[test]
fn an_unknown_preset_lists_the_presets() {
    let (_home, cache) = home();
    let err = fetch("sd-9", &FetchOptions::new(&cache)).unwrap_err();
    let presets: Vec<&str> = hub::PRESETS.iter().map(|p| p.name).collect();
    check_error(&err, matches!(err, Error::UnknownModel { .. }), &presets);
    assert!(!cache.exists());
}

#[test]
fn a_missing_file_names_the_file_and_url() {
    let server = Server::start(vec![("test/tiny-sd", sd_repo())]);
    let (_home, cache) = home();
    server.faults.lock().unwrap().missing.insert("tokenizer/merges.txt".into());
    let err = fetch("test/tiny-sd", &options(&cache, &server)).unwrap_err();
    let url = format!("{}/test/tiny-sd/resolve/main/tokenizer/merges.txt", server.endpoint());
    check_error(&err, matches!(err, Error::FileNotFound { .. }), &["tokenizer/merges.txt", &url, "404"]);

    // A repository the server does not have.
    let err = fetch("test/nothing", &options(&cache, &server)).unwrap_err();
    assert!(matches!(err, Error::Repo { status: 404, .. }), "{err}");
}

/// A disk that fills mid-download: the part file is a link to /dev/full, so every write fails
/// with ENOSPC. The error says so, the part is kept for the next run, and nothing is taken as
/// complete; once space is back (the link replaced by a real part file) the fetch finishes.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_keeps_the_part_and_never_completes() {
    let server = Server::start(vec![("test/tiny-sd", sd_repo())]);
    let (_home, cache) = home();
    let unet = "unet/diffusion_pytorch_model.safetensors";
    let data = sd_repo().into_iter().find(|x| x.name == unet).unwrap();
    let blobs = cache.join("models--test--tiny-sd/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let part = blobs.join(format!("{}.part", data.etag()));
    std::os::unix::fs::symlink("/dev/full", &part).unwrap();

    let err = fetch("test/tiny-sd", &options(&cache, &server)).unwrap_err();
    check_error(
        &err,
        matches!(err, Error::Interrupted { .. }),
        &[unet, "No space left", "free disk space and rerun to resume"],
    );
    assert!(std::fs::symlink_metadata(&part).is_ok(), "the part file must be kept");
    assert!(!blobs.join(data.etag()).exists());
    let snap = cache.join("models--test--tiny-sd/snapshots").join(COMMIT);
    assert!(std::fs::symlink_metadata(snap.join(unet)).is_err());
    assert!(resolve_model_in(&HubCache::new(&cache), "test/tiny-sd").is_err());

    // Space again: a real part file with the first bytes, which the rerun continues.
    std::fs::remove_file(&part).unwrap();
    std::fs::write(&part, &data.data[..1234]).unwrap();
    server.clear_log();
    fetch("test/tiny-sd", &options(&cache, &server)).unwrap();
    assert!(server.downloads().iter().any(|(p, r)| p.ends_with(unet) && r.as_deref() == Some("bytes=1234-")));
    assert_eq!(std::fs::read(snap.join(unet)).unwrap(), data.data);
}

/// Content already in blobs/ (another commit, or Python's `huggingface_hub`) is linked, not
/// downloaded; a part file that is already complete is checked and used.
#[test]
fn cached_blobs_and_complete_parts_are_not_downloaded_again() {
    let server = Server::start(vec![("test/tiny-sd", sd_repo())]);
    let (_home, cache) = home();
    let repo = sd_repo();
    let file = |name: &str| repo.iter().find(|x| x.name == name).unwrap();
    let (unet, vae) =
        (file("unet/diffusion_pytorch_model.safetensors"), file("vae/diffusion_pytorch_model.safetensors"));
    let blobs = cache.join("models--test--tiny-sd/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(unet.etag()), &unet.data).unwrap();
    std::fs::write(blobs.join(format!("{}.part", vae.etag())), &vae.data).unwrap();
    let f = fetch("test/tiny-sd", &options(&cache, &server)).unwrap();
    for x in [unet, vae] {
        assert!(!server.downloads().iter().any(|(p, _)| p.ends_with(&x.name)), "{} was downloaded", x.name);
        assert_eq!(std::fs::read(f.snapshot.dir.join(&x.name)).unwrap(), x.data);
    }
    assert!(!blobs.join(format!("{}.part", vae.etag())).exists());
}
