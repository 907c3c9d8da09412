//! `generate --lora`, `merge-lora` and `export` from the command line.

mod common;

use common::{fixtures, latents_file, one_line_error, parity_args as gen, pixels, run, settings, train_args};

use std::collections::BTreeMap;
use std::path::Path;

use model_io::tensor_file::{read_tensors, write_tensors};

fn latents(dir: &Path) -> String {
    let io = read_tensors(&fixtures().join("lora/in/io.safetensors")).unwrap();
    let lat = latents_file(dir, &io["latents"]);
    lat.to_str().unwrap().to_string()
}

fn max_diff(png: &Path, reference: &model_io::tensor_file::HostTensor) -> u8 {
    let r = reference.as_f32("images").unwrap();
    pixels(png).iter().zip(r).map(|(a, b)| a.abs_diff((b * 255.0).round().clamp(0.0, 255.0) as u8)).max().unwrap()
}

#[test]
fn generate_with_two_loras_makes_diffusers_images_and_records_them() {
    let d = tempfile::tempdir().unwrap();
    let lat = latents(d.path());
    let base = fixtures().join("pipeline");
    let (k, p) = (fixtures().join("lora/in/kohya.safetensors"), fixtures().join("lora/in/peft.safetensors"));
    let (k, p) = (format!("{}:0.6", k.display()), format!("{}:1.4", p.display()));
    let out = d.path().join("out");
    let (ok, err) = run(&gen(base.to_str().unwrap(), &lat, out.to_str().unwrap(), &["--lora", &k, "--lora", &p]));
    assert!(ok, "{err}");
    let io = read_tensors(&fixtures().join("lora/in/io.safetensors")).unwrap();
    let max = max_diff(&out.join("0000.png"), &io["both.images"]);
    assert!(max <= 3, "{max} levels from diffusers' set_adapters");
    // The image records its LoRAs, and --params-from replays them.
    let s = settings(&out.join("0000.png"));
    assert_eq!(s.loras.len(), 2, "{:?}", s.loras);
    assert!(s.loras[0].ends_with("kohya.safetensors:0.6"), "{:?}", s.loras);
    let again = d.path().join("again");
    let png = out.join("0000.png");
    let (ok, err) = run(&["generate", "--params-from", png.to_str().unwrap(), "--out", again.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(pixels(&again.join("0000.png")), pixels(&png));
}

/// In bf16 the LoRA merges on the device in bf16 and the image stays near f32's.
#[test]
fn loras_merge_in_bf16_too() {
    let d = tempfile::tempdir().unwrap();
    let lat = latents(d.path());
    let base = fixtures().join("pipeline");
    let k = format!("{}:0.6", fixtures().join("lora/in/kohya.safetensors").display());
    let out = d.path().join("bf16");
    let args = gen(base.to_str().unwrap(), &lat, out.to_str().unwrap(), &["--lora", &k]);
    let (ok, err) = run(&[&["--dtype", "bf16"][..], &args].concat());
    assert!(ok, "{err}");
    let io = read_tensors(&fixtures().join("lora/in/io.safetensors")).unwrap();
    let max = max_diff(&out.join("0000.png"), &io["kohya.images"]);
    assert!(max <= 40, "bf16 with a LoRA: {max} levels from diffusers' f32 image");
}

#[test]
fn bad_lora_arguments_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let lat = latents(d.path());
    let base = fixtures().join("pipeline");
    let out = d.path().join("out");
    let missing = d.path().join("nope.safetensors");
    let m = missing.to_str().unwrap();
    let (ok, err) = run(&gen(base.to_str().unwrap(), &lat, out.to_str().unwrap(), &["--lora", m]));
    assert!(!ok);
    one_line_error(&err, &["nope.safetensors"]);
    let (ok, err) = run(&gen(base.to_str().unwrap(), &lat, out.to_str().unwrap(), &["--lora", "x.safetensors:1e6"]));
    assert!(!ok);
    one_line_error(&err, &["--lora", "absurd"]);
    // A LoRA for another model: the first tensor that does not fit, and both shapes.
    let lora = d.path().join("wide.safetensors");
    let mut t = read_tensors(&fixtures().join("lora/in/kohya.safetensors")).unwrap();
    let q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k";
    t.insert(format!("{q}.lora_down.weight"), model_io::tensor_file::HostTensor::f32(vec![4, 768], vec![0.0; 4 * 768]));
    write_tensors(&lora, &t, &BTreeMap::new()).unwrap();
    let (ok, err) = run(&gen(base.to_str().unwrap(), &lat, out.to_str().unwrap(), &["--lora", lora.to_str().unwrap()]));
    assert!(!ok);
    one_line_error(&err, &["wide.safetensors", &format!("{q}.lora_down.weight"), "[4, 768]", "[32, 32]"]);
    assert!(!out.join("0000.png").exists());
}

#[test]
fn merge_lora_bakes_the_loras_into_a_folder_and_a_single_file() {
    let d = tempfile::tempdir().unwrap();
    let lat = latents(d.path());
    let base = fixtures().join("pipeline");
    let k = format!("{}:0.6", fixtures().join("lora/in/kohya.safetensors").display());
    let folder = d.path().join("merged");
    let file = d.path().join("merged.safetensors");
    let (ok, err) =
        run(&["merge-lora", "--base", base.to_str().unwrap(), "--lora", &k, "--out", folder.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, err) = run(&[
        "merge-lora",
        "--base",
        base.to_str().unwrap(),
        "--lora",
        &k,
        "--format",
        "single-file",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let io = read_tensors(&fixtures().join("lora/in/io.safetensors")).unwrap();
    for (name, extra) in [("folder", vec![]), ("file", vec!["--config", base.to_str().unwrap()])] {
        let b = if name == "folder" { &folder } else { &file };
        let out = d.path().join(format!("out-{name}"));
        let (ok, err) = run(&gen(b.to_str().unwrap(), &lat, out.to_str().unwrap(), &extra));
        assert!(ok, "{name}: {err}");
        let max = max_diff(&out.join("0000.png"), &io["kohya.images"]);
        assert!(max <= 3, "{name}: {max} levels from diffusers' set_adapters");
    }
    // Nothing is replaced unasked.
    let (ok, err) =
        run(&["merge-lora", "--base", base.to_str().unwrap(), "--lora", &k, "--out", folder.to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err, &["merged", "--overwrite"]);
}

#[test]
fn export_writes_the_concept_unet_into_the_base() {
    let d = tempfile::tempdir().unwrap();
    let concept = d.path().join("concept");
    let args = train_args(concept.to_str().unwrap(), "2");
    let (ok, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let c = concept.to_str().unwrap();
    let out = d.path().join("exported");
    let (ok, err) = run(&["export", "--concept", c, "--format", "diffusers", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    // The exported UNet is the base's with the concept's LoRA merged: as the kohya file train
    // wrote, merged by merge-lora.
    let kohya = concept.join(personalize::KOHYA_LORA_FILE);
    let merged = d.path().join("merged");
    let base = common::base();
    let (ok, err) = run(&[
        "merge-lora",
        "--base",
        base.to_str().unwrap(),
        "--lora",
        kohya.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let a = read_tensors(&out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let b = read_tensors(&merged.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let plain = read_tensors(&base.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let max = a.iter().map(|(k, v)| v.max_abs_diff(&b[k])).fold(0.0f32, f32::max);
    let change = a.iter().map(|(k, v)| v.max_abs_diff(&plain[k])).fold(0.0f32, f32::max);
    assert!(max <= 1e-6 && change > 1e-6, "export vs merge-lora {max}, vs the base {change}");
}

/// SDXL takes LoRAs from the command line (kohya's te1/te2 names, diffusers' text_encoder_2),
/// and an SDXL LoRA on an SD 1.x base is a one-line error naming its first SDXL-only tensor.
#[test]
fn generate_on_sdxl_takes_loras_and_sd_refuses_sdxl_ones() {
    let d = tempfile::tempdir().unwrap();
    let io = read_tensors(&fixtures().join("lora/sdxl/io.safetensors")).unwrap();
    let lat = latents_file(d.path(), &io["latents"]);
    let (k, p) = (fixtures().join("lora/sdxl/kohya.safetensors"), fixtures().join("lora/sdxl/peft.safetensors"));
    let (k, p) = (format!("{}:0.7", k.display()), format!("{}:1.3", p.display()));
    let (base, out) = (fixtures().join("sdxl_pipeline"), d.path().join("out"));
    #[rustfmt::skip]
    let (ok, err) = run(&[
        "generate", "--base", base.to_str().unwrap(), "--prompt", "a photo of a cat", "--negative-prompt", "blurry",
        "--steps", "4", "--guidance", "5", "--height", "32", "--width", "48", "--latents", lat.to_str().unwrap(),
        "--lora", &k, "--lora", &p, "--out", out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let max = max_diff(&out.join("0000.png"), &io["both.images"]);
    assert!(max <= 3, "{max} levels from StableDiffusionXLPipeline's set_adapters");
    let sd = d.path().join("sd");
    let (ok, err) = run(&gen(
        fixtures().join("pipeline").to_str().unwrap(),
        lat.to_str().unwrap(),
        sd.to_str().unwrap(),
        &["--lora", &k],
    ));
    assert!(!ok);
    one_line_error(&err, &["kohya.safetensors", "lora_te", "SDXL LoRA"]);
    assert!(!sd.join("0000.png").exists());
}
