//! `personalize generate` and `train` on the tiny SDXL folder (tests/fixtures/sdxl_pipeline).

mod common;

use common::{fixtures, latents_file, one_line_error, run, train_args};

use model_io::tensor_file::read_tensors;

/// The CLI's SDXL image matches diffusers' (micro-conditioning flags included), records the
/// flags, and re-runs from its own PNG to the same bytes.
#[test]
fn generate_sdxl_matches_diffusers_and_reruns_from_its_png() {
    let io = read_tensors(&fixtures().join("sdxl_pipeline_io.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let lat = latents_file(d.path(), &io["dpm_micro.latents"]);
    let (out, again) = (d.path().join("out"), d.path().join("again"));
    let base = fixtures().join("sdxl_pipeline");
    #[rustfmt::skip]
    let (ok, err) = run(&[
        "generate", "--base", base.to_str().unwrap(), "--prompt", "an astronaut riding a horse",
        "--negative-prompt", "lowres", "--steps", "5", "--guidance", "7", "--scheduler", "dpm++2m",
        "--original-size", "64,96", "--crop-top-left", "8,4", "--target-size", "40,40",
        "--latents", lat.to_str().unwrap(), "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let png = out.join("0000.png");
    let (img, _) = personalize::read_png(&png).unwrap();
    assert_eq!((img.width, img.height), (32, 32), "the UNet's sample_size × 8 by default");
    let reference = io["dpm_micro.images"].as_f32("images").unwrap();
    let max = img.data.iter().zip(reference).map(|(&a, &b)| a.abs_diff((b * 255.0).round() as u8)).max().unwrap();
    assert!(max <= 3, "max {max} levels from StableDiffusionXLPipeline");
    let s = personalize::ImageSettings::from_png(&png).unwrap();
    assert_eq!((s.original_size, s.crop_top_left, s.target_size), (Some([64, 96]), Some([8, 4]), Some([40, 40])));
    let (ok, err) = run(&["generate", "--params-from", png.to_str().unwrap(), "--out", again.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(png).unwrap(), std::fs::read(again.join("0000.png")).unwrap());
}

#[test]
fn bad_size_conditioning_gets_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let base = fixtures().join("sdxl_pipeline");
    let out = d.path().join("out");
    let gen = |flag: &str, v: &str| {
        let args = ["generate", "--base", base.to_str().unwrap(), "--prompt", "a cat", "--steps", "1", flag, v];
        let (ok, err) = run(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
        assert!(!ok, "{flag} {v} was accepted");
        err
    };
    one_line_error(&gen("--original-size", "1024"), &["--original-size", "A,B"]);
    one_line_error(&gen("--target-size", "0,1024"), &["--target-size", "0,1024"]);
    one_line_error(&gen("--crop-top-left", "99999,0"), &["--crop-top-left", "absurd"]);
}

/// `train` on the SDXL folder writes an `sdxl` concept that `generate --concept` applies, and
/// `export-lora` names its modules in SGM's layout; the concept on an SD 1.x base is refused.
#[test]
fn train_on_sdxl_then_generate_with_the_concept() {
    let d = tempfile::tempdir().unwrap();
    let base = fixtures().join("sdxl_pipeline");
    let concept = d.path().join("concept");
    let mut args = train_args(concept.to_str().unwrap(), "3");
    args[2] = base.to_str().unwrap().to_string();
    args.extend(["--sample-steps", "0"].map(String::from));
    let (ok, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concept.join("concept.json")).unwrap()).unwrap();
    assert_eq!(info["architecture"], "sdxl");
    let c = concept.to_str().unwrap();
    let out = d.path().join("out");
    #[rustfmt::skip]
    let (ok, err) = run(&[
        "generate", "--base", base.to_str().unwrap(), "--concept", c, "--prompt", "a photo of sks",
        "--steps", "2", "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.join("0000.png").is_file());
    let kohya = d.path().join("kohya.safetensors");
    let (ok, err) = run(&["export-lora", "--concept", c, "--format", "kohya", "--out", kohya.to_str().unwrap()]);
    assert!(ok, "{err}");
    let t = model_io::tensor_file::read_tensors(&kohya).unwrap();
    assert!(t.keys().any(|k| k.starts_with("lora_unet_output_blocks_")), "{:?}", t.keys().next());
    let sd = d.path().join("sd");
    #[rustfmt::skip]
    let (ok, err) = run(&[
        "generate", "--base", fixtures().join("pipeline").to_str().unwrap(), "--concept", c,
        "--prompt", "a photo of sks", "--steps", "1", "--out", sd.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["SDXL"]);
}
