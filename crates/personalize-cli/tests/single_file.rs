//! `generate --base FILE.safetensors`: single-file checkpoints from the command line.

mod common;

use common::{fixtures, one_line_error, parity_args, run};

use std::collections::BTreeMap;

use model_io::tensor_file::{read_tensors, write_tensors};

#[path = "../../personalize/tests/support/single_file.rs"]
mod support;

#[test]
fn generate_from_a_single_file_with_config_makes_diffusers_images() {
    let dir = fixtures().join("single_file");
    let io = read_tensors(&dir.join("io.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let lat = d.path().join("latents.safetensors");
    write_tensors(&lat, &BTreeMap::from([("latents".to_string(), io["latents"].clone())]), &BTreeMap::new()).unwrap();
    let out = d.path().join("out");
    let file = support::write_single_file(&fixtures(), "sd2", d.path());
    let config = fixtures().join("pipeline");
    let (file, config) = (file.to_str().unwrap(), config.to_str().unwrap());
    let (ok, err) = run(&parity_args(file, lat.to_str().unwrap(), out.to_str().unwrap(), &["--config", config]));
    assert!(ok, "{err}");
    let (img, _) = personalize::read_png(&out.join("0000.png")).unwrap();
    let r = io["sd2.images"].as_f32("images").unwrap();
    let max = img.data.iter().zip(r).map(|(a, b)| a.abs_diff((b * 255.0).round().clamp(0.0, 255.0) as u8)).max();
    assert!(max.is_some_and(|m| m <= 3), "{max:?} levels from diffusers' from_single_file");
}

#[test]
fn bad_single_files_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let ckpt = d.path().join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04").unwrap();
    let out = d.path().join("out");
    let gen = |base: &str| {
        run(&["generate", "--base", base, "--prompt", "a cat", "--steps", "1", "--out", out.to_str().unwrap()])
    };
    let (ok, err) = gen(ckpt.to_str().unwrap());
    assert!(!ok);
    one_line_error(&err, &["model.ckpt", "arbitrary code"]);
    // The tiny file's widths are not a standard model's: it needs --config.
    let sd1 = support::write_single_file(&fixtures(), "sd1", d.path());
    let (ok, err) = gen(sd1.to_str().unwrap());
    assert!(!ok);
    one_line_error(&err, &["sd1.safetensors", "--config"]);
    assert!(!out.exists(), "nothing written on failure");
}
