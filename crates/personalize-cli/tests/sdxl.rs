//! `personalize generate` and `train` on the tiny SDXL folder (tests/fixtures/sdxl_pipeline).

mod common;

use common::{fixtures, latents_file, one_line_error, run};

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
fn bad_size_conditioning_and_sdxl_training_get_one_line_errors() {
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
    let img = fixtures().join("blip2/preprocess/photo.png");
    #[rustfmt::skip]
    let (ok, err) = run(&[
        "train", "--base", base.to_str().unwrap(), "--image", img.to_str().unwrap(),
        "--blip2", fixtures().join("blip2/opt_sharded").to_str().unwrap(), "--prompt", "a photo of sks",
        "--steps", "1", "--out", d.path().join("concept").to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["SDXL", "training"]);
}
