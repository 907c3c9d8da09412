//! The hostile-input findings (issue 17): streaming generation in batches, memory limits,
//! Ctrl-C, NaN and Inf named by stage, f16 on the CPU, truncated and animated images (the rest
//! are in hostile_inputs.rs). Each test fails without its fix.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use model_io::tensor_file::{read_tensors, write_tensors, HostTensor};

mod common;

use common::*;

#[test]
fn images_stream_in_batches_whatever_the_batch_size() {
    let d = tempfile::tempdir().unwrap();
    let (one, three) = (d.path().join("one"), d.path().join("three"));
    let (ok, err) = run(&gen_args(one.to_str().unwrap(), &["--num-images", "3", "--batch-size", "1"]));
    assert!(ok, "{err}");
    let (ok, err) = run(&gen_args(three.to_str().unwrap(), &["--num-images", "3", "--batch-size", "3"]));
    assert!(ok, "{err}");
    for i in 0..3 {
        let name = format!("{i:04}.png");
        // Image i's noise is the i-th slice of the seed's stream: the batch does not change it.
        assert_eq!(pixels(&one.join(&name)), pixels(&three.join(&name)), "image {i}");
        assert_eq!(settings(&one.join(&name)).batch_size, Some(1));
        assert_eq!(settings(&three.join(&name)).batch_size, Some(3));
    }
    assert_ne!(pixels(&one.join("0000.png")), pixels(&one.join("0001.png")));
}

#[test]
fn params_from_remakes_one_image_of_an_ancestral_batch() {
    let d = tempfile::tempdir().unwrap();
    let (first, again) = (d.path().join("first"), d.path().join("again"));
    let extra = ["--num-images", "3", "--batch-size", "2", "--scheduler", "euler-a"];
    let (ok, err) = run(&gen_args(first.to_str().unwrap(), &extra));
    assert!(ok, "{err}");
    // Image 2 is alone in the second batch; image 1 shares the first with image 0.
    for i in [1, 2] {
        let src = first.join(format!("{i:04}.png"));
        let out = again.join(i.to_string());
        let (ok, err) = run(&["generate", "--params-from", src.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert_eq!(pixels(&out.join("0000.png")), pixels(&src), "image {i}");
        assert!(!out.join("0001.png").exists());
    }
}

#[test]
fn sizes_that_cannot_fit_are_refused_with_the_estimate() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let o = out.to_str().unwrap();
    let (ok, err) = run(&gen_args(o, &["--height", "100000", "--width", "100000"]));
    assert!(!ok);
    error_line(&err, &["100000x100000", "needs about", "GiB", "available"]);
    assert!(!out.exists(), "refused before anything was made");

    // Under a limit, the default batch is what fits, and a batch that does not fit is refused.
    let unet = sd_unet::UNetConfig::load(&base().join("unet")).unwrap();
    let vae = sd_vae::AutoencoderKlConfig::load(&base().join("vae")).unwrap();
    let per_image = |side: usize| personalize::memory::generation_bytes(&unet, &vae, 1, side / 8, side / 8, true, 4);
    let limit = format!("{}", (2.5 * per_image(32)) as u64);
    let small = cmd(&gen_args(o, &["--num-images", "4", "--batch-size", "4"]))
        .env(personalize::memory::LIMIT_VAR, &limit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&small.stderr);
    assert!(!small.status.success());
    error_line(&err, &["batch of 4 images of 32x32", "needs about", "lower --batch-size"]);
    let limit = format!("{}", (1.5 * per_image(64)) as u64);
    let one = cmd(&gen_args(o, &["--num-images", "2", "--height", "64", "--width", "64"]))
        .env(personalize::memory::LIMIT_VAR, &limit)
        .output()
        .unwrap();
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    assert_eq!(settings(&out.join("0001.png")).batch_size, Some(1), "{limit} bytes hold one 64² image, not two");

    // A UNet whose default size is absurd: its config's sample_size.
    let b = copy_pipeline(d.path());
    let cfg_path = b.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["sample_size"] = 100000.into();
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let (ok, err) = run(&["generate", "--base", b.to_str().unwrap(), "--prompt", "x", "--steps", "1", "--out", o]);
    assert!(!ok);
    error_line(&err, &["800000x800000", "needs about"]);
}

#[test]
fn a_million_images_stream_to_disk() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let mut child =
        cmd(&gen_args(out.to_str().unwrap(), &["--num-images", "1000000", "--steps", "1", "--guidance", "1"]))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let t0 = Instant::now();
    while !out.join("0009.png").exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(status.is_none(), "exited early: {status:?}");
    assert!(out.join("0009.png").is_file(), "images are written as their batches finish");
}

/// Waits for `path`, then sends SIGINT to `child` and returns its exit code and stderr.
fn interrupt_when(child: std::process::Child, path: &Path) -> (Option<i32>, String) {
    let t0 = Instant::now();
    while !path.exists() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(path.exists(), "{} never appeared", path.display());
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn ctrl_c_during_generate_keeps_the_images_written() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let child = cmd(&gen_args(out.to_str().unwrap(), &["--num-images", "100000", "--batch-size", "1"]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, err) = interrupt_when(child, &out.join("0001.png"));
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted") && err.contains("generate stopped after writing"), "{err}");
    assert!(
        personalize::read_png(&out.join("0000.png")).is_ok() && personalize::read_png(&out.join("0001.png")).is_ok()
    );
    let tmp: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".png"))
        .collect();
    assert!(tmp.is_empty(), "no temporary files left: {tmp:?}");
}

#[test]
fn ctrl_c_during_train_writes_a_checkpoint_to_resume_from() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("concept");
    let o = out.to_str().unwrap();
    let args = train_args(o, "1000000");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let child = cmd(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // The lock appears when training starts; give it a few steps.
    let lock = out.join(".lock");
    let t0 = Instant::now();
    while !lock.exists() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(3000));
    let (code, err) = interrupt_when(child, &lock);
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("checkpoint") && err.contains("--resume"), "{err}");
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("concept.json")).unwrap()).unwrap();
    let done = info["steps_done"].as_u64().unwrap();
    assert!(done >= 1, "{info}");
    assert!(!lock.exists(), "the lock is released");
    let steps = (done + 2).to_string();
    let mut resume = train_args(o, &steps);
    resume.push("--resume".into());
    let resume: Vec<&str> = resume.iter().map(|s| s.as_str()).collect();
    let (ok, err) = run(&resume);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("concept.json")).unwrap()).unwrap();
    assert_eq!(info["steps_done"].as_u64(), Some(done + 2));
}

#[test]
fn nan_and_inf_are_named_by_the_stage_that_made_them() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let o = out.to_str().unwrap();
    let b = copy_pipeline(d.path());
    let bs = b.to_str().unwrap();
    let args = |extra: &[&'static str]| {
        let mut v: Vec<String> =
            ["generate", "--base", bs, "--prompt", "x", "--steps", "2", "--height", "32", "--width", "32", "--out", o]
                .iter()
                .map(|s| s.to_string())
                .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let go = |a: Vec<String>| run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());

    let unet = b.join("unet/diffusion_pytorch_model.safetensors");
    let original = std::fs::read(&unet).unwrap();
    poison(&unet, "down_blocks.0.resnets.0.conv1.weight", f32::NAN);
    let (ok, err) = go(args(&[]));
    assert!(!ok);
    error_line(&err, &["UNet's prediction at step 1", "down_blocks", "holds NaN or Inf", "damaged"]);
    assert!(!out.exists(), "no black image, and no empty folder");
    std::fs::write(&unet, &original).unwrap();

    let te = b.join("text_encoder/model.fp16.safetensors");
    let te_original = std::fs::read(&te).unwrap();
    poison(&te, "final_layer_norm.weight", f32::INFINITY);
    let (ok, err) = go(args(&[]));
    assert!(!ok);
    error_line(&err, &["text encoder's output", "final_layer_norm", "holds NaN or Inf"]);
    std::fs::write(&te, &te_original).unwrap();

    let vae = b.join("vae/diffusion_pytorch_model.safetensors");
    poison(&vae, "decoder.conv_out.weight", f32::NAN);
    let (ok, err) = go(args(&[]));
    assert!(!ok);
    error_line(&err, &["VAE decode", "conv_out", "holds NaN or Inf"]);
    std::fs::copy(base().join("vae/diffusion_pytorch_model.safetensors"), &vae).unwrap();

    let lat = d.path().join("lat.safetensors");
    let mut v = vec![0.5f32; 4 * 4 * 4];
    v[3] = f32::NAN;
    write_tensors(&lat, &BTreeMap::from([("latents".into(), HostTensor::f32(vec![1, 4, 4, 4], v))]), &BTreeMap::new())
        .unwrap();
    let mut a = args(&[]);
    a.extend(["--latents".to_string(), lat.display().to_string()]);
    let (ok, err) = go(a);
    assert!(!ok);
    error_line(&err, &["latents hold NaN"]);

    let (ok, err) = go(args(&[]));
    assert!(ok, "the repaired copy generates: {err}");
}

#[test]
fn f16_is_refused_on_the_cpu_where_it_cannot_work_and_bf16_is_close_to_f32() {
    let d = tempfile::tempdir().unwrap();
    let (o32, o16) = (d.path().join("f32"), d.path().join("bf16"));
    let (ok, err) = run(&[&["--dtype", "f16"][..], &gen_args(o32.to_str().unwrap(), &[])].concat());
    assert!(!ok);
    error_line(&err, &["--dtype f16", "bf16"]);
    let (ok, err) = run(&gen_args(o32.to_str().unwrap(), &[]));
    assert!(ok, "{err}");
    let (ok, err) = run(&[&["--dtype", "bf16"][..], &gen_args(o16.to_str().unwrap(), &[])].concat());
    assert!(ok, "{err}");
    let (a, b) = (pixels(&o32.join("0000.png")), pixels(&o16.join("0000.png")));
    let mean = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.len() as f64;
    let std = |v: &[u8]| {
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    assert!(mean < 12.0, "bf16 is {mean} levels from f32 on average");
    assert!(std(&b) > 0.5 * std(&a), "bf16 image is flat: std {} against {}", std(&b), std(&a));
}

#[test]
fn truncated_images_are_refused_unless_allowed_and_animations_use_their_first_frame() {
    let d = tempfile::tempdir().unwrap();
    let photo = fixtures().join("blip2/preprocess/photo.png");
    let img = image::open(&photo).unwrap().to_rgb8();
    let jpg = d.path().join("photo.jpg");
    img.save(&jpg).unwrap();
    let bytes = std::fs::read(&jpg).unwrap();
    let cut = d.path().join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let png_bytes = std::fs::read(&photo).unwrap();
    let cut_png = d.path().join("cut.png");
    std::fs::write(&cut_png, &png_bytes[..png_bytes.len() - 20]).unwrap();
    let blip2 = fixtures().join("blip2/opt_sharded");
    let b = blip2.to_str().unwrap();
    let out = d.path().join("q.safetensors");
    let o = out.to_str().unwrap();
    let (ok, err) = run(&["encode", "--blip2", b, "--image", jpg.to_str().unwrap(), "--out", o]);
    assert!(ok, "a whole JPEG reads: {err}");
    let (ok, err) = run(&["encode", "--blip2", b, "--image", cut.to_str().unwrap(), "--out", o]);
    assert!(!ok);
    error_line(&err, &[cut.to_str().unwrap(), "truncated", "--allow-truncated-images"]);
    // A cut PNG cannot be decoded past the cut (the decoder stops): refused, flag or not.
    for flag in [&[][..], &["--allow-truncated-images"][..]] {
        let args = [flag, &["encode", "--blip2", b, "--image", cut_png.to_str().unwrap(), "--out", o][..]].concat();
        let (ok, err) = run(&args);
        assert!(!ok);
        error_line(&err, &[cut_png.to_str().unwrap(), "truncated", "re-export"]);
    }
    let (ok, err) =
        run(&["--allow-truncated-images", "encode", "--blip2", b, "--image", cut.to_str().unwrap(), "--out", o]);
    assert!(ok, "{err}");
    assert!(err.contains("truncated"), "a warning: {err}");

    // A two-frame GIF: the first frame, with a warning.
    let gif = d.path().join("anim.gif");
    {
        use image::codecs::gif::GifEncoder;
        let f = std::fs::File::create(&gif).unwrap();
        let mut enc = GifEncoder::new(f);
        let frame = |c: u8| image::Frame::new(image::RgbaImage::from_pixel(16, 16, image::Rgba([c, 0, 0, 255])));
        enc.encode_frames([frame(200), frame(10)]).unwrap();
    }
    let still = d.path().join("still.png");
    image::RgbImage::from_pixel(16, 16, image::Rgb([200, 0, 0])).save(&still).unwrap();
    let (q1, q2) = (d.path().join("a.safetensors"), d.path().join("b.safetensors"));
    let (ok, err) = run(&["encode", "--blip2", b, "--image", gif.to_str().unwrap(), "--out", q1.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("animated") && err.contains("first frame"), "{err}");
    let (ok, err) = run(&["encode", "--blip2", b, "--image", still.to_str().unwrap(), "--out", q2.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (a, b) = (read_tensors(&q1).unwrap(), read_tensors(&q2).unwrap());
    let k = a.keys().next().unwrap().clone();
    assert!(a[&k].max_abs_diff(&b[&k]) < 1e-3, "the first frame (red 200) was encoded");
}
