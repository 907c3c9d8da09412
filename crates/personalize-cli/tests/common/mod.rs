//! What the CLI's integration tests share: where the fixtures are, running the binary, and
//! the one-line error checks. Each test file has `mod common;`.
#![allow(dead_code)] // each test binary uses a part of it

use std::path::{Path, PathBuf};
use std::process::Command;

use model_io::tensor_file::{read_tensors_with_metadata, write_tensors, HostTensor};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The reference fixtures (tests/fixtures).
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// The bundled tiny Stable Diffusion (the README's main job).
pub fn tiny_sd() -> PathBuf {
    root().join("assets/tiny-sd")
}

/// `personalize` with `args`, without a memory cap from the environment.
pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_personalize"));
    c.args(args).env_remove(personalize::memory::LIMIT_VAR);
    c
}

/// Runs `personalize` with `args`; returns (success, stderr).
pub fn run(args: &[&str]) -> (bool, String) {
    let out = cmd(args).output().expect("binary runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The whole of stderr is one line, `error: ...`, holding each of `needles`.
pub fn one_line_error(err: &str, needles: &[&str]) {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in {err}");
    }
}

/// The error is one line, holding each of `needles`; progress lines (such as "encoding 1
/// image(s)") may come before it.
pub fn error_line(err: &str, needles: &[&str]) {
    let lines: Vec<&str> =
        err.lines().skip_while(|l| !l.starts_with("error:")).filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in {err}");
    }
}

// The fixture pipeline runs of the reliability tests.

pub fn base() -> PathBuf {
    fixtures().join("pipeline")
}

pub fn pixels(p: &Path) -> Vec<u8> {
    personalize::read_png(p).unwrap().0.data
}

pub fn settings(p: &Path) -> personalize::ImageSettings {
    personalize::ImageSettings::from_png(p).unwrap()
}

/// A generation of the fixture pipeline: 32², 3 steps, seed 5.
pub fn gen_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let b: &'static str = Box::leak(base().display().to_string().into_boxed_str());
    let mut v = vec!["generate", "--base", b, "--prompt", "a red fox", "--out", out];
    for (flag, value) in [("--steps", "3"), ("--seed", "5"), ("--height", "32"), ("--width", "32")] {
        if !extra.contains(&flag) {
            v.extend([flag, value]);
        }
    }
    v.extend_from_slice(extra);
    v
}

pub fn train_args(out: &str, steps: &str) -> Vec<String> {
    let blip2 = fixtures().join("blip2/opt_sharded");
    let image = fixtures().join("blip2/preprocess/photo.png");
    [
        "train",
        "--base",
        base().to_str().unwrap(),
        "--blip2",
        blip2.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "a photo of sks",
        "--out",
        out,
        "--steps",
        steps,
        "--resolution",
        "32",
        "--queries",
        "4",
        "--unet",
        "lora",
        "--lora-rank",
        "2",
        "--save-every",
        "1000000",
        "--seed",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A copy of the fixture BLIP-2 model under `dir`.
pub fn copy_blip2(dir: &Path) -> PathBuf {
    let m = dir.join("blip2");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(fixtures().join("blip2/opt_sharded")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    m
}

/// A copy of the fixture pipeline under `dir`.
pub fn copy_pipeline(dir: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    let to = dir.join("pipeline");
    copy(&base(), &to);
    to
}

/// Sets element 0 of tensor `name` (the first whose name contains it) in `file` to `value`.
pub fn poison(file: &Path, name: &str, value: f32) -> String {
    let (mut t, meta) = read_tensors_with_metadata(file).unwrap();
    let key = t.keys().find(|k| k.contains(name)).unwrap().clone();
    let ht = t.get_mut(&key).unwrap();
    let mut v = ht.as_f32(&key).unwrap().to_vec();
    v[0] = value;
    *ht = HostTensor::f32(ht.shape.clone(), v);
    write_tensors(file, &t, &meta).unwrap();
    key
}

/// `generate` as the parity fixtures run it (`a photo of a cat`, negative `blurry`, 4 DDIM
/// steps, 32×48, fixed latents), with `extra` flags.
#[allow(dead_code)]
/// `dir/latents.safetensors` holding `latents` (a fixture's), for `generate --latents`.
pub fn latents_file(dir: &Path, latents: &HostTensor) -> PathBuf {
    let path = dir.join("latents.safetensors");
    let t = std::collections::BTreeMap::from([("latents".to_string(), latents.clone())]);
    write_tensors(&path, &t, &std::collections::BTreeMap::new()).unwrap();
    path
}

pub fn parity_args<'a>(base: &'a str, latents: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "generate",
        "--base",
        base,
        "--prompt",
        "a photo of a cat",
        "--negative-prompt",
        "blurry",
        "--steps",
        "4",
        "--scheduler",
        "ddim",
        "--height",
        "32",
        "--width",
        "48",
        "--latents",
        latents,
        "--out",
        out,
    ];
    a.extend_from_slice(extra);
    a
}
