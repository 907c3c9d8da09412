//! The fuzz targets' bodies: each takes arbitrary bytes, feeds them to a parser of untrusted
//! input the way a user's file reaches it, and must return (an `Ok` or an error), never panic
//! or abort. `fuzz/` runs them under libFuzzer (`cargo +nightly fuzz run NAME`); the tests
//! here replay the committed corpora (`fuzz/corpus/NAME/`) on stable Rust, in CI.
//!
//! ```
//! fuzz_targets::safetensors(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ");
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A target: its name and body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target by name, as `fuzz/fuzz_targets/NAME.rs` calls it.
pub const TARGETS: &[Target] = &[
    ("safetensors", safetensors),
    ("shard_index", shard_index),
    ("onnx", onnx),
    ("image", image),
    ("tokenizer", tokenizer),
    ("concept_json", concept_json),
    ("png_text", png_text),
];

/// One scratch folder per thread (a fuzzer runs millions of inputs; tests run in parallel,
/// and truncating a file another thread has memory-mapped would fault that thread).
fn scratch() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let root = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder")).path();
    let d = root.join(format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_alphanumeric(), ""));
    let _ = std::fs::create_dir_all(&d);
    d
}

fn write(name: &str, data: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    let mut f = std::fs::File::create(&p).expect("scratch file");
    f.write_all(data).expect("scratch write");
    p
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A safetensors file: header, offsets, dtypes; then every tensor read as f32.
pub fn safetensors(data: &[u8]) {
    let p = write("model.safetensors", data);
    if let Ok(c) = model_io::Checkpoint::open_files("fuzz", std::slice::from_ref(&p)) {
        let names: Vec<String> = c.names().map(String::from).collect();
        for n in names {
            let _ = c.read_f32(&n);
        }
        let _ = c.fingerprint();
    }
    let _ = model_io::tensor_file::read_tensors_with_metadata(&p);
}

/// A shard index (`model.safetensors.index.json`) next to one small valid shard.
pub fn shard_index(data: &[u8]) {
    let dir = scratch().join("sharded");
    let _ = std::fs::create_dir_all(&dir);
    let shard = b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}        \x00\x00\x80\x3f";
    let _ = std::fs::write(dir.join("model-00001-of-00001.safetensors"), shard);
    let _ = std::fs::write(dir.join("model.safetensors.index.json"), data);
    if let Ok(c) = model_io::Checkpoint::open_dir(&dir, &["model"]) {
        let names: Vec<String> = c.names().map(String::from).collect();
        for n in names {
            let _ = c.read_f32(&n);
        }
    }
}

/// An ONNX model file (`model.onnx`) beside a small external data file (`weights.pb`): the
/// protobuf, the initializers' data and the names read from the nodes; then every tensor read.
pub fn onnx(data: &[u8]) {
    let dir = scratch().join("onnx");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("weights.pb"), [0x3fu8; 64]);
    let _ = std::fs::write(dir.join("model.onnx"), data);
    if let Ok(c) = model_io::Checkpoint::open_onnx(&dir.join("model.onnx")) {
        let names: Vec<String> = c.names().map(String::from).collect();
        for n in names {
            let _ = c.read_f32(&n);
            let _ = c.tensor_data_f32(&n);
        }
        let _ = c.fingerprint();
    }
}

/// An input image: decoded ([`model_io::image_file::open`]) and preprocessed for BLIP-2.
pub fn image(data: &[u8]) {
    static PRE: OnceLock<blip2_encoder::ImageProcessor> = OnceLock::new();
    let pre = PRE.get_or_init(|| blip2_encoder::ImageProcessor::new(32));
    let p = write("image", data);
    let _ = pre.load_image(&p);
}

/// A prompt (any bytes, as lossy UTF-8) through the CLIP tokenizer.
pub fn tokenizer(data: &[u8]) {
    static TOK: OnceLock<clip_text::ClipTokenizer> = OnceLock::new();
    let tok = TOK.get_or_init(|| {
        clip_text::ClipTokenizer::from_dir(&workspace().join("crates/clip-text/vocab")).expect("bundled tokenizer")
    });
    let _ = tok.encode(&String::from_utf8_lossy(data));
}

/// A `concept.json` beside a small valid aligner, loaded as `generate --concept` loads it.
pub fn concept_json(data: &[u8]) {
    let dir = scratch().join("concept");
    if !dir.join("aligner.safetensors").is_file() {
        let _ = std::fs::create_dir_all(&dir);
        let s = q_aligner::AlignerSettings { num_queries: 2, ..Default::default() };
        let a = q_aligner::Aligner::<burn_flex::Flex>::new(
            8,
            8,
            8,
            &s,
            &mut seeded::SplitMix64::new(0),
            &burn_flex::FlexDevice,
        );
        a.save(&dir.join("aligner.safetensors")).expect("aligner written");
    }
    let _ = std::fs::write(dir.join("concept.json"), data);
    let _ = personalize::Concept::<burn_flex::Flex>::load(&dir, &burn_flex::FlexDevice);
}

/// A PNG's text chunks, and the settings `--params-from` reads from them.
pub fn png_text(data: &[u8]) {
    let p = write("image.png", data);
    let _ = personalize::read_png_text(&p);
    let _ = personalize::ImageSettings::from_png(&p);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = personalize::ImageSettings::from_json(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed corpus file through its target: none panics.
    #[test]
    fn the_corpora_replay_without_a_panic() {
        let root = workspace().join("fuzz/corpus");
        let mut total = 0;
        for (name, f) in TARGETS {
            let dir = root.join(name);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            files.sort();
            assert!(!files.is_empty(), "{}: empty corpus", dir.display());
            for p in files {
                f(&std::fs::read(&p).unwrap());
                total += 1;
            }
        }
        assert!(total >= TARGETS.len());
    }

    /// The ONNX seeds are valid graphs, so mutations reach the name mapping and the reads.
    #[test]
    fn the_onnx_seeds_open() {
        let dir = tempfile::tempdir().unwrap();
        for seed in ["inline", "external"] {
            std::fs::copy(workspace().join(format!("fuzz/corpus/onnx/{seed}.onnx")), dir.path().join("model.onnx"))
                .unwrap();
            std::fs::write(dir.path().join("weights.pb"), [0u8; 64]).unwrap();
            let c = model_io::Checkpoint::open_onnx(&dir.path().join("model.onnx")).unwrap();
            let mut names: Vec<&str> = c.names().collect();
            names.sort_unstable();
            assert_eq!(names, ["blk.conv.weight", "blk.norm.weight", "blk.to_q.weight"], "{seed}");
        }
    }

    /// Random mutations of the corpora, deterministic: a short stand-in for the fuzzer where
    /// there is no nightly toolchain.
    #[test]
    fn mutated_corpora_do_not_panic() {
        let root = workspace().join("fuzz/corpus");
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (name, f) in TARGETS {
            for e in std::fs::read_dir(root.join(name)).unwrap().filter_map(|e| e.ok()) {
                let seed = std::fs::read(e.path()).unwrap();
                for _ in 0..40 {
                    let mut d = seed.clone();
                    match next() % 4 {
                        0 if !d.is_empty() => {
                            let n = next() as usize % d.len();
                            d.truncate(n)
                        }
                        1 if !d.is_empty() => {
                            for _ in 0..1 + next() % 8 {
                                let i = next() as usize % d.len();
                                d[i] = next() as u8;
                            }
                        }
                        2 => {
                            let i = if d.is_empty() { 0 } else { next() as usize % d.len() };
                            let b = next() as u8;
                            d.splice(i..i, std::iter::repeat_n(b, 1 + next() as usize % 64));
                        }
                        _ => d.reverse(),
                    }
                    f(&d);
                }
            }
        }
    }
}
