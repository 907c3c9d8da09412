//! `generate --base FILE.safetensors`: single-file checkpoints from the command line.

mod common;

use common::{fixtures, latents_file, one_line_error, parity_args, run, train_args};

use model_io::tensor_file::read_tensors;

#[path = "../../personalize/tests/support/single_file.rs"]
mod support;

#[test]
fn generate_from_a_single_file_with_config_makes_diffusers_images() {
    let dir = fixtures().join("single_file");
    let io = read_tensors(&dir.join("io.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let lat = latents_file(d.path(), &io["latents"]);
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

#[test]
fn a_concept_trains_on_a_single_file_and_generates_on_it() {
    let d = tempfile::tempdir().unwrap();
    let file = support::write_single_file(&fixtures(), "sd1", d.path());
    let config = fixtures().join("pipeline");
    let concept = d.path().join("concept");
    let mut args = common::train_args(concept.to_str().unwrap(), "2");
    let at = args.iter().position(|a| a == "--base").unwrap() + 1;
    args[at] = file.to_str().unwrap().to_string();
    args.extend(["--config".to_string(), config.to_str().unwrap().to_string()]);
    let (ok, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let info: personalize::ConceptInfo = model_io::read_config(&concept, "concept.json").unwrap();
    assert!(info.base_model.ends_with("sd1.safetensors"), "{}", info.base_model);
    let out = d.path().join("out");
    let gen = |base: &str, out: &str| {
        run(&[
            "generate",
            "--base",
            base,
            "--config",
            config.to_str().unwrap(),
            "--concept",
            concept.to_str().unwrap(),
            "--prompt",
            "a photo of sks",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--seed",
            "1",
            "--out",
            out,
        ])
    };
    let (ok, err) = gen(file.to_str().unwrap(), out.to_str().unwrap());
    assert!(ok, "{err}");
    assert!(out.join("0000.png").is_file());
    // The folder is another base (f32 values where the file has f16): the concept says so.
    let (ok, err) = run(&[
        "generate",
        "--base",
        config.to_str().unwrap(),
        "--concept",
        concept.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out",
        d.path().join("o2").to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["sd1.safetensors"]);
}

/// `generate --base sdxl.safetensors --config SDXL_FOLDER` draws diffusers' `from_single_file`
/// image; a concept trains on it; merging LoRAs into it is refused as SDXL, in one line.
#[test]
fn an_sdxl_single_file_generates_trains_and_merges() {
    let io = read_tensors(&fixtures().join("single_file/io.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let lat = latents_file(d.path(), &io["sdxl.latents"]);
    let file = support::write_single_file(&fixtures(), "sdxl", d.path());
    let config = fixtures().join("sdxl_pipeline");
    let (file, config) = (file.to_str().unwrap(), config.to_str().unwrap());
    let out = d.path().join("out");
    #[rustfmt::skip]
    let (ok, err) = run(&[
        "generate", "--base", file, "--config", config, "--prompt", "a photo of a cat", "--negative-prompt",
        "blurry", "--steps", "4", "--guidance", "5", "--height", "32", "--width", "48",
        "--latents", lat.to_str().unwrap(), "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (img, _) = personalize::read_png(&out.join("0000.png")).unwrap();
    let r = io["sdxl.neg.images"].as_f32("images").unwrap();
    let max = img.data.iter().zip(r).map(|(a, b)| a.abs_diff((b * 255.0).round().clamp(0.0, 255.0) as u8)).max();
    assert!(max.is_some_and(|m| m <= 3), "{max:?} levels from diffusers' from_single_file");

    // A concept trains on the file, and its kohya LoRA takes SGM's names from the file's UNet.
    let concept = d.path().join("concept");
    let mut args = train_args(concept.to_str().unwrap(), "2");
    args[2] = file.to_string();
    args.extend(["--config".to_string(), config.to_string()]);
    let (ok, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let kohya = d.path().join("kohya.safetensors");
    let (ok, err) = run(&["export-lora", "--concept", concept.to_str().unwrap(), "--out", kohya.to_str().unwrap()]);
    assert!(ok, "{err}");
    let keys: Vec<String> = read_tensors(&kohya).unwrap().into_keys().collect();
    assert!(
        keys.iter().all(|k| k.starts_with("lora_unet_input_blocks_")
            || k.starts_with("lora_unet_middle_block_")
            || k.starts_with("lora_unet_output_blocks_")),
        "{:?}",
        keys.first()
    );
    assert_eq!(std::fs::read(&kohya).unwrap(), std::fs::read(concept.join("unet_lora.kohya.safetensors")).unwrap());
    // merge-lora bakes an SDXL LoRA into a new SDXL single file, which generates as the file
    // with the LoRA; an SD 1.x LoRA is refused in one line.
    let merged = d.path().join("merged.safetensors");
    let lora = format!("{}:0.7", fixtures().join("lora/sdxl/kohya.safetensors").display());
    #[rustfmt::skip]
    let (ok, err) = run(&[
        "merge-lora", "--base", file, "--config", config, "--lora", &lora, "--out", merged.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let gen = |base: &str, extra: &[&str], out: &std::path::Path| {
        #[rustfmt::skip]
        let mut args = vec![
            "generate", "--base", base, "--config", config, "--prompt", "a photo of a cat", "--steps", "2",
            "--height", "32", "--width", "48", "--latents", lat.to_str().unwrap(), "--out", out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, err) = run(&args);
        assert!(ok, "{err}");
        personalize::read_png(&out.join("0000.png")).unwrap().0.data
    };
    let with_lora = gen(file, &["--lora", &lora], &d.path().join("with-lora"));
    assert_eq!(gen(merged.to_str().unwrap(), &[], &d.path().join("merged-out")), with_lora);
    assert_ne!(gen(file, &[], &d.path().join("plain")), with_lora);
    let sd_lora = fixtures().join("lora/in/kohya.safetensors");
    let refused = d.path().join("refused.safetensors");
    #[rustfmt::skip]
    let (ok, err) = run(&[
        "merge-lora", "--base", file, "--config", config, "--lora", sd_lora.to_str().unwrap(),
        "--out", refused.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["kohya.safetensors"]);
    assert!(!refused.exists());
}
