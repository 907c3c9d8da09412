//! ONNX pipeline folders from the command line: `generate`, `train`, `stage` and `convert`
//! read them as the safetensors of the same weights.

mod common;

use common::{fixtures, latents_file, one_line_error, parity_args, pixels, run};

use std::collections::BTreeMap;

use model_io::tensor_file::{read_tensors, write_tensors};

#[path = "../../personalize/tests/support/onnx.rs"]
mod support;

fn latents(dir: &std::path::Path) -> String {
    let io = read_tensors(&fixtures().join("single_file/io.safetensors")).unwrap();
    let lat = latents_file(dir, &io["latents"]);
    lat.to_str().unwrap().to_string()
}

#[test]
fn generate_from_an_onnx_folder_makes_the_safetensors_folders_image_and_convert_writes_that_folder() {
    let d = tempfile::tempdir().unwrap();
    let onnx = support::write_onnx_fixture(&fixtures(), "pipeline", d.path());
    let lat = latents(d.path());
    let config = fixtures().join("pipeline");
    let (onnx_s, config_s) = (onnx.to_str().unwrap(), config.to_str().unwrap());
    let out = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let (ok, err) = run(&parity_args(config_s, &lat, &out("st"), &[]));
    assert!(ok, "{err}");
    let (ok, err) = run(&parity_args(onnx_s, &lat, &out("onnx"), &["--config", config_s]));
    assert!(ok, "{err}");
    let reference = pixels(&d.path().join("st/0000.png"));
    assert_eq!(pixels(&d.path().join("onnx/0000.png")), reference, "ONNX and safetensors images differ");

    // A LoRA merges into the ONNX base's (transposed) weights as into the folder's.
    let kohya = fixtures().join("lora/in/kohya.safetensors");
    let lora = format!("{}:0.6", kohya.display());
    let (ok, err) = run(&parity_args(config_s, &lat, &out("st_lora"), &["--lora", &lora]));
    assert!(ok, "{err}");
    let (ok, err) = run(&parity_args(onnx_s, &lat, &out("onnx_lora"), &["--config", config_s, "--lora", &lora]));
    assert!(ok, "{err}");
    let with_lora = pixels(&d.path().join("st_lora/0000.png"));
    assert_ne!(with_lora, reference, "the LoRA changes the image");
    assert_eq!(pixels(&d.path().join("onnx_lora/0000.png")), with_lora);

    // convert: a diffusers folder of the same weights, which generates the same image.
    let conv = out("converted");
    let (ok, err) = run(&["convert", "--from", onnx_s, "--to", &conv, "--config", config_s]);
    assert!(ok, "{err}");
    let index: serde_json::Value = model_io::read_config(conv.as_ref(), "model_index.json").unwrap();
    assert_eq!(index["_class_name"], "StableDiffusionPipeline");
    let (ok, err) = run(&parity_args(&conv, &lat, &out("conv_img"), &[]));
    assert!(ok, "{err}");
    assert_eq!(pixels(&d.path().join("conv_img/0000.png")), reference);
    // Never overwritten without being asked.
    let (ok, err) = run(&["convert", "--from", onnx_s, "--to", &conv, "--config", config_s]);
    assert!(!ok);
    one_line_error(&err, &["converted", "--overwrite"]);

    // config.json beside each model.onnx (as optimum writes them) replaces --config.
    for (sub, from) in [("unet", "unet"), ("text_encoder", "text_encoder"), ("vae_decoder", "vae")] {
        std::fs::copy(config.join(from).join("config.json"), onnx.join(sub).join("config.json")).unwrap();
    }
    let (ok, err) = run(&parity_args(onnx_s, &lat, &out("optimum"), &[]));
    assert!(ok, "{err}");
    assert_eq!(pixels(&d.path().join("optimum/0000.png")), reference);
}

#[test]
fn stages_run_on_onnx_model_folders() {
    let d = tempfile::tempdir().unwrap();
    let onnx = support::write_onnx_fixture(&fixtures(), "pipeline", d.path());
    let config = fixtures().join("pipeline");
    for (sub, from) in [("unet", "unet"), ("vae_decoder", "vae")] {
        std::fs::copy(config.join(from).join("config.json"), onnx.join(sub).join("config.json")).unwrap();
    }
    let io = read_tensors(&fixtures().join("onnx/io.safetensors")).unwrap();
    let input = d.path().join("unet-in.safetensors");
    let t = BTreeMap::from([
        ("sample".to_string(), io["unet.sample"].clone()),
        ("timestep".to_string(), io["unet.timestep"].clone()),
        ("encoder_hidden_states".to_string(), io["unet.encoder_hidden_states"].clone()),
    ]);
    write_tensors(&input, &t, &BTreeMap::new()).unwrap();
    let output = d.path().join("unet-out.safetensors");
    let model = onnx.join("unet");
    let (ok, err) = run(&[
        "stage",
        "unet",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = read_tensors(&output).unwrap();
    let e = got.values().next().unwrap().max_abs_diff(&io["unet.ort"]);
    assert!(e <= 1e-4, "unet stage vs ONNX Runtime: {e}");

    let input = d.path().join("vae-in.safetensors");
    write_tensors(&input, &BTreeMap::from([("latent".to_string(), io["vae.latent"].clone())]), &BTreeMap::new())
        .unwrap();
    let model = onnx.join("vae_decoder");
    let (ok, err) = run(&[
        "stage",
        "vae-decode",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = read_tensors(&output).unwrap();
    let e = got["sample"].max_abs_diff(&io["vae.ort.decoded"]);
    assert!(e <= 1e-4, "vae-decode stage vs ONNX Runtime: {e}");
}

#[test]
fn bad_onnx_folders_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let onnx = support::write_onnx_fixture(&fixtures(), "pipeline", d.path());
    let config = fixtures().join("pipeline");
    let out = d.path().join("out");
    let gen = |extra: &[&str]| {
        let mut a =
            vec!["generate", "--base", onnx.to_str().unwrap(), "--prompt", "a cat", "--steps", "1", "--height", "32"];
        a.extend(["--width", "32", "--out", out.to_str().unwrap()]);
        a.extend_from_slice(extra);
        run(&a)
    };
    // The tiny model's widths are not a standard model's: it needs --config.
    let (ok, err) = gen(&[]);
    assert!(!ok);
    one_line_error(&err, &["unet/model.onnx", "--config"]);
    let cfg = ["--config", config.to_str().unwrap()];
    // A missing external data file is named.
    let weights = onnx.join("unet/weights.pb");
    let saved = std::fs::read(&weights).unwrap();
    std::fs::remove_file(&weights).unwrap();
    let (ok, err) = gen(&cfg);
    assert!(!ok);
    one_line_error(&err, &["weights.pb", "missing"]);
    // A truncated one.
    std::fs::write(&weights, &saved[..saved.len() / 2]).unwrap();
    let (ok, err) = gen(&cfg);
    assert!(!ok);
    one_line_error(&err, &["weights.pb", "truncated"]);
    std::fs::write(&weights, &saved).unwrap();
    // A truncated graph.
    let graph = onnx.join("text_encoder/model.onnx");
    let bytes = std::fs::read(&graph).unwrap();
    std::fs::write(&graph, &bytes[..bytes.len() - 100]).unwrap();
    let (ok, err) = gen(&cfg);
    assert!(!ok);
    one_line_error(&err, &["text_encoder/model.onnx", "ONNX"]);
    std::fs::write(&graph, &bytes).unwrap();
    // A graph of another model where the UNet goes: the first unexpected weight and its node.
    std::fs::copy(onnx.join("vae_decoder/model.onnx"), onnx.join("unet/model.onnx")).unwrap();
    let (ok, err) = gen(&cfg);
    assert!(!ok);
    eprintln!("{err}");
    one_line_error(&err, &["unet/model.onnx", "from node"]);
    // A missing half of the VAE.
    std::fs::remove_dir_all(onnx.join("vae_encoder")).unwrap();
    let (ok, err) = gen(&cfg);
    assert!(!ok);
    one_line_error(&err, &["vae_encoder/model.onnx", "missing"]);
    assert!(!out.exists(), "nothing written on failure");
}

#[test]
fn a_concept_trains_on_an_onnx_folder() {
    let d = tempfile::tempdir().unwrap();
    let onnx = support::write_onnx_fixture(&fixtures(), "pipeline", d.path());
    let config = fixtures().join("pipeline");
    let concept = d.path().join("concept");
    let mut args = common::train_args(concept.to_str().unwrap(), "2");
    let at = args.iter().position(|a| a == "--base").unwrap() + 1;
    args[at] = onnx.to_str().unwrap().to_string();
    args.extend(["--config".to_string(), config.to_str().unwrap().to_string()]);
    let (ok, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    // The concept applies on the safetensors folder of the same weights (same fingerprint).
    let out = d.path().join("out");
    let (ok, err) = run(&[
        "generate",
        "--base",
        config.to_str().unwrap(),
        "--concept",
        concept.to_str().unwrap(),
        "--prompt",
        "a photo of sks",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
}
