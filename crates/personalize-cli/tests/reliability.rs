//! The hostile-input findings (issue 17): streaming generation in batches, memory limits,
//! Ctrl-C, NaN and Inf named by stage, f16 on the CPU, truncated and animated images, and
//! `concept.json` checked against its files. Each test fails without its fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use model_io::tensor_file::{read_tensors, read_tensors_with_metadata, write_tensors, HostTensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn base() -> PathBuf {
    fixtures().join("pipeline")
}

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_personalize"));
    c.args(args).env_remove(personalize::memory::LIMIT_VAR);
    c
}

fn run(args: &[&str]) -> (bool, String) {
    let out = cmd(args).output().expect("binary runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The error is one line (progress lines such as "encoding 1 image(s)" may come before it).
fn one_line_error(err: &str, needles: &[&str]) {
    // clap follows its one-line errors with a pointer to --help.
    let lines: Vec<&str> = err
        .lines()
        .skip_while(|l| !l.starts_with("error:"))
        .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information, try"))
        .collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in {err}");
    }
}

fn pixels(p: &Path) -> Vec<u8> {
    personalize::read_png(p).unwrap().0.data
}

fn settings(p: &Path) -> personalize::ImageSettings {
    personalize::ImageSettings::from_png(p).unwrap()
}

/// A generation of the fixture pipeline: 32², 3 steps, seed 5.
fn gen_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
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
    one_line_error(&err, &["100000x100000", "needs about", "GiB", "available"]);
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
    one_line_error(&err, &["batch of 4 images of 32x32", "needs about", "lower --batch-size"]);
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
    one_line_error(&err, &["800000x800000", "needs about"]);
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

fn train_args(out: &str, steps: &str) -> Vec<String> {
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

/// A copy of the fixture BLIP-2 model under `dir`.
fn copy_blip2(dir: &Path) -> PathBuf {
    let m = dir.join("blip2");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(fixtures().join("blip2/opt_sharded")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    m
}

/// A copy of the fixture pipeline under `dir`.
fn copy_pipeline(dir: &Path) -> PathBuf {
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
fn poison(file: &Path, name: &str, value: f32) -> String {
    let (mut t, meta) = read_tensors_with_metadata(file).unwrap();
    let key = t.keys().find(|k| k.contains(name)).unwrap().clone();
    let ht = t.get_mut(&key).unwrap();
    let mut v = ht.as_f32(&key).unwrap().to_vec();
    v[0] = value;
    *ht = HostTensor::f32(ht.shape.clone(), v);
    write_tensors(file, &t, &meta).unwrap();
    key
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
    one_line_error(&err, &["UNet's prediction at step 1", "down_blocks", "holds NaN or Inf", "damaged"]);
    assert!(!out.exists(), "no black image, and no empty folder");
    std::fs::write(&unet, &original).unwrap();

    let te = b.join("text_encoder/model.fp16.safetensors");
    let te_original = std::fs::read(&te).unwrap();
    poison(&te, "final_layer_norm.weight", f32::INFINITY);
    let (ok, err) = go(args(&[]));
    assert!(!ok);
    one_line_error(&err, &["text encoder's output", "final_layer_norm", "holds NaN or Inf"]);
    std::fs::write(&te, &te_original).unwrap();

    let vae = b.join("vae/diffusion_pytorch_model.safetensors");
    poison(&vae, "decoder.conv_out.weight", f32::NAN);
    let (ok, err) = go(args(&[]));
    assert!(!ok);
    one_line_error(&err, &["VAE decode", "conv_out", "holds NaN or Inf"]);
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
    one_line_error(&err, &["latents hold NaN"]);

    let (ok, err) = go(args(&[]));
    assert!(ok, "the repaired copy generates: {err}");
}

#[test]
fn f16_is_refused_on_the_cpu_where_it_cannot_work_and_bf16_is_close_to_f32() {
    let d = tempfile::tempdir().unwrap();
    let (o32, o16) = (d.path().join("f32"), d.path().join("bf16"));
    let (ok, err) = run(&[&["--dtype", "f16"][..], &gen_args(o32.to_str().unwrap(), &[])].concat());
    assert!(!ok);
    one_line_error(&err, &["--dtype f16", "bf16"]);
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
    one_line_error(&err, &[cut.to_str().unwrap(), "truncated", "--allow-truncated-images"]);
    // A cut PNG cannot be decoded past the cut (the decoder stops): refused, flag or not.
    for flag in [&[][..], &["--allow-truncated-images"][..]] {
        let args = [flag, &["encode", "--blip2", b, "--image", cut_png.to_str().unwrap(), "--out", o][..]].concat();
        let (ok, err) = run(&args);
        assert!(!ok);
        one_line_error(&err, &[cut_png.to_str().unwrap(), "truncated", "re-export"]);
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

/// `personalize train` of the fixture (2 steps) into `out`, with `extra` flags.
fn train_with(out: &Path, extra: &[&str]) -> (bool, String) {
    let mut a = train_args(out.to_str().unwrap(), "2");
    a.extend(extra.iter().map(|s| s.to_string()));
    run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>())
}

/// A trained LoRA concept in `dir`, made once by `personalize train`.
fn lora_concept(dir: &Path) -> PathBuf {
    let out = dir.join("concept");
    let args = train_args(out.to_str().unwrap(), "2");
    let (ok, err) = run(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(ok, "{err}");
    out
}

/// One 32² step of the fixture pipeline with `concept`, into `out`.
fn generate_with(concept: &Path, out: &Path) -> (bool, String) {
    let c = concept.to_str().unwrap();
    run(&[&gen_args(out.to_str().unwrap(), &["--steps", "1"])[..], &["--concept", c]].concat())
}

#[test]
fn concept_json_is_checked_against_its_files() {
    let d = tempfile::tempdir().unwrap();
    let c = lora_concept(d.path());
    let out = d.path().join("o");
    let gen = |c: &Path| generate_with(c, &out);
    let (ok, err) = gen(&c);
    assert!(ok, "the concept as trained generates: {err}");
    let path = c.join("concept.json");
    let original: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let cases: [(&str, serde_json::Value, &[&str]); 7] = [
        ("unet", "bogus".into(), &["unknown variant `bogus`", "lora", "frozen"]),
        ("version", 99.into(), &["version 99", "newer release"]),
        ("version", 0.into(), &["version 0"]),
        ("query_selection", "best".into(), &["query_selection `best`"]),
        ("num_queries", 7.into(), &["num_queries is 7", "makes 4"]),
        ("lora_rank", 5.into(), &["lora_rank is 5", "rank 2"]),
        ("unet", "frozen".into(), &["`frozen`", "unet_lora.safetensors", "ignored"]),
    ];
    for (key, value, needles) in cases {
        let mut v = original.clone();
        v[key] = value;
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let (ok, err) = gen(&c);
        assert!(!ok, "{key}");
        one_line_error(&err, &[&[path.to_str().unwrap()][..], needles].concat());
    }
    std::fs::write(&path, serde_json::to_vec(&original).unwrap()).unwrap();
    let lora = c.join("unet_lora.safetensors");
    let lora_original = std::fs::read(&lora).unwrap();
    let key = poison(&lora, "lora_A", f32::NAN);
    let (ok, err) = gen(&c);
    assert!(!ok);
    one_line_error(&err, &["unet_lora.safetensors", &key, "holds NaN or Inf"]);
    std::fs::write(&lora, lora_original).unwrap();
    // An aligner file without its metadata makes the default 8 tokens: say so.
    let af = c.join("aligner.safetensors");
    let a_saved = std::fs::read(&af).unwrap();
    let (at, _) = read_tensors_with_metadata(&af).unwrap();
    write_tensors(&af, &at, &BTreeMap::new()).unwrap();
    let (ok, err) = gen(&c);
    assert!(!ok);
    one_line_error(&err, &["num_queries is 4", "makes 8", "no num_queries metadata"]);
    std::fs::write(&af, a_saved).unwrap();
    // Queries far beyond BLIP-2's range, named with their file.
    let qf = c.join("visual_queries.safetensors");
    let q_saved = std::fs::read(&qf).unwrap();
    let (mut q, meta) = read_tensors_with_metadata(&qf).unwrap();
    let qt = q.get_mut("queries").unwrap();
    *qt = HostTensor::f32(qt.shape.clone(), qt.as_f32("queries").unwrap().iter().map(|x| x * 1e30).collect());
    write_tensors(&qf, &q, &meta).unwrap();
    let (ok, err) = gen(&c);
    assert!(!ok, "queries of 1e30 made an image");
    one_line_error(&err, &["visual_queries.safetensors: tensor `queries` reaches"]);
    std::fs::write(&qf, q_saved).unwrap();
    poison(&c.join("aligner.safetensors"), "weight", f32::NAN);
    let (ok, err) = gen(&c);
    assert!(!ok);
    one_line_error(&err, &["aligner", "holds NaN or Inf"]);
}

#[test]
fn training_refuses_a_resolution_that_cannot_fit() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("concept");
    let mut args = train_args(out.to_str().unwrap(), "2");
    let i = args.iter().position(|a| a == "--resolution").unwrap();
    args[i + 1] = "1000000".into();
    let (ok, err) = run(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(!ok);
    one_line_error(&err, &["--resolution 1000000", "needs about", "available"]);
    assert!(!out.exists(), "nothing left behind");
}

/// The second hostile trial's findings: each was a panic, an abort, a silent wrong result or
/// lost work.
#[test]
fn stage_inputs_and_outputs_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let te = base().join("text_encoder");
    let empty = d.path().join("ids.safetensors");
    write_tensors(
        &empty,
        &BTreeMap::from([("input_ids".into(), HostTensor::i64(vec![0, 77], vec![]))]),
        &BTreeMap::new(),
    )
    .unwrap();
    let o = d.path().join("o.safetensors");
    let (ok, err) = run(&[
        "stage",
        "text-encoder",
        "--model",
        te.to_str().unwrap(),
        "--input",
        empty.to_str().unwrap(),
        "--output",
        o.to_str().unwrap(),
    ]);
    assert!(!ok, "an empty batch panicked");
    one_line_error(&err, &["input_ids", "[0, 77]", "no values"]);

    let io = read_tensors(&fixtures().join("unet/sd1/io.safetensors")).unwrap();
    let mut t: BTreeMap<String, HostTensor> = io.into_iter().filter(|(k, _)| k != "out").collect();
    let s = t.get_mut("sample").unwrap();
    let mut v = s.as_f32("sample").unwrap().to_vec();
    v[0] = f32::NAN;
    *s = HostTensor::f32(s.shape.clone(), v);
    let nan_in = d.path().join("nan.safetensors");
    write_tensors(&nan_in, &t, &BTreeMap::new()).unwrap();
    let model = fixtures().join("unet/sd1");
    let (ok, err) = run(&[
        "stage",
        "unet",
        "--model",
        model.to_str().unwrap(),
        "--input",
        nan_in.to_str().unwrap(),
        "--output",
        o.to_str().unwrap(),
    ]);
    assert!(!ok, "NaN in, NaN out with exit 0");
    one_line_error(&err, &["tensor `sample` holds NaN or Inf"]);

    let good = fixtures().join("unet/sd1/io.safetensors");
    let m = d.path().join("sd1");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(model.join(f), m.join(f)).unwrap();
    }
    poison(&m.join("diffusion_pytorch_model.safetensors"), "conv_in.weight", f32::NAN);
    let (ok, err) = run(&[
        "stage",
        "unet",
        "--model",
        m.to_str().unwrap(),
        "--input",
        good.to_str().unwrap(),
        "--output",
        o.to_str().unwrap(),
    ]);
    assert!(!ok, "NaN weights, NaN out with exit 0");
    one_line_error(&err, &["output `sample` holds NaN or Inf", "conv_in.weight"]);
    assert!(!o.exists());

    let (ok, err) = run(&[
        "stage",
        "unet",
        "--model",
        model.to_str().unwrap(),
        "--input",
        good.to_str().unwrap(),
        "--scheduler",
        "euler",
        "--output",
        o.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["--scheduler is for stage scheduler"]);

    // Random weights of an absurd config: an error, not an allocation abort.
    let cfg = d.path().join("huge");
    std::fs::create_dir_all(&cfg).unwrap();
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    c["block_out_channels"] = serde_json::json!([100000, 200000]);
    c["norm_num_groups"] = 1.into();
    std::fs::write(cfg.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    let (ok, err) = run(&[
        "stage",
        "unet",
        "--model",
        cfg.to_str().unwrap(),
        "--random-weights",
        "--input",
        good.to_str().unwrap(),
        "--output",
        o.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["random weights", "GiB", "memory available"]);
}

#[test]
fn nothing_a_user_made_is_replaced_unasked() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let o = out.to_str().unwrap();
    let (ok, err) = run(&gen_args(o, &[]));
    assert!(ok, "{err}");
    let first = pixels(&out.join("0000.png"));
    let (ok, err) = run(&gen_args(o, &["--seed", "6"]));
    assert!(!ok, "an earlier image was silently replaced");
    one_line_error(&err, &["0000.png exists", "--overwrite"]);
    assert_eq!(pixels(&out.join("0000.png")), first);
    let src = out.join("0000.png");
    let (ok, err) = run(&["generate", "--params-from", src.to_str().unwrap(), "--seed", "9", "--out", o]);
    assert!(!ok, "--params-from onto its own folder replaced the source");
    one_line_error(&err, &["exists", "--overwrite"]);
    let (ok, err) = run(&gen_args(o, &["--seed", "6", "--overwrite"]));
    assert!(ok, "{err}");
    assert_ne!(pixels(&out.join("0000.png")), first);

    // encode onto its input image.
    let img = d.path().join("mine.png");
    std::fs::copy(fixtures().join("blip2/preprocess/photo.png"), &img).unwrap();
    let blip2 = fixtures().join("blip2/opt_sharded");
    let (ok, err) = run(&[
        "encode",
        "--blip2",
        blip2.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--out",
        img.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["is the input image"]);
    assert!(image::open(&img).is_ok(), "the image is intact");

    // train into a folder of the user's own files, and --overwrite keeping the user's samples.
    let own = d.path().join("own");
    std::fs::create_dir_all(own.join("samples")).unwrap();
    std::fs::write(own.join("loss.csv"), "my data").unwrap();
    std::fs::write(own.join("samples/favourite.png"), "mine").unwrap();
    let args = train_args(own.to_str().unwrap(), "2");
    let (ok, err) = run(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(!ok, "a folder of the user's own files was written into");
    one_line_error(&err, &["holds other files", "not a concept folder", "--overwrite"]);
    assert_eq!(std::fs::read_to_string(own.join("loss.csv")).unwrap(), "my data");
    let mut args = args;
    args.push("--overwrite".into());
    let (ok, err) = run(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read_to_string(own.join("samples/favourite.png")).unwrap(),
        "mine",
        "--overwrite removes only a run's own samples"
    );
}

#[test]
fn absurd_values_found_by_the_second_trial_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let o = out.to_str().unwrap();
    let concept = d.path().join("concept");
    let with = |extra: &[&str]| train_with(&concept, extra);
    for (extra, needles) in [
        (&["--aligner-hidden", "1000000000"][..], &["--aligner-hidden", "at most"][..]),
        (&["--batch", "100000"], &["--batch 100000", "needs about"]),
        (&["--augment", "100000"], &["--augment", "at most"]),
        (&["--prior-weight", "5"], &["--prior-weight needs --class-prompt"]),
    ] {
        let (ok, err) = with(extra);
        assert!(!ok, "{extra:?}");
        one_line_error(&err, needles);
    }
    let frozen = |extra: &[&str]| {
        let mut a = train_args(concept.to_str().unwrap(), "2");
        let i = a.iter().position(|x| x == "--unet").unwrap();
        a[i + 1] = "frozen".into();
        let j = a.iter().position(|x| x == "--lora-rank").unwrap();
        a.drain(j..j + 2);
        a.extend(extra.iter().map(|s| s.to_string()));
        run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    };
    let (ok, err) = frozen(&["--lora-rank", "7"]);
    assert!(!ok);
    one_line_error(&err, &["--lora-rank", "--unet lora"]);
    let (ok, err) = frozen(&["--unet-lr", "1e-3"]);
    assert!(!ok);
    one_line_error(&err, &["--unet-lr", "frozen"]);

    let (ok, err) = run(&gen_args(o, &["--scheduler", "bogus"]));
    assert!(!ok);
    one_line_error(&err, &["invalid value 'bogus' for '--scheduler", "euler-a", "dpm++2m-karras"]);
    let blip2 = fixtures().join("blip2/opt_sharded");
    let (ok, err) = run(&gen_args(o, &["--blip2", blip2.to_str().unwrap()]));
    assert!(!ok);
    one_line_error(&err, &["--blip2 is only used with --image"]);
    let lat = d.path().join("lat.safetensors");
    write_tensors(
        &lat,
        &BTreeMap::from([("latents".into(), HostTensor::f32(vec![3, 4, 4, 4], vec![0.1; 192]))]),
        &BTreeMap::new(),
    )
    .unwrap();
    let (ok, err) = run(&gen_args(o, &["--latents", lat.to_str().unwrap(), "--num-images", "2"]));
    assert!(!ok, "--num-images was silently ignored");
    one_line_error(&err, &["--num-images and --latents"]);

    let b = copy_pipeline(d.path());
    let vae = b.join("vae/config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&vae).unwrap()).unwrap();
    c["scaling_factor"] = serde_json::json!(-1e30);
    std::fs::write(&vae, serde_json::to_vec(&c).unwrap()).unwrap();
    let (ok, err) = run(&["generate", "--base", b.to_str().unwrap(), "--prompt", "x", "--steps", "1", "--out", o]);
    assert!(!ok, "a negative scaling factor made an image");
    one_line_error(&err, &["vae", "scaling_factor"]);
}

#[test]
fn encode_names_nan_weights_instead_of_writing_nan_queries() {
    let d = tempfile::tempdir().unwrap();
    let m = copy_blip2(d.path());
    let shard = std::fs::read_dir(&m)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|x| x == "safetensors")
                && read_tensors(p).unwrap().keys().any(|k| k.contains("patch_embedding.weight"))
        })
        .unwrap();
    poison(&shard, "patch_embedding.weight", f32::NAN);
    let out = d.path().join("q.safetensors");
    let img = fixtures().join("blip2/preprocess/photo.png");
    let (ok, err) = run(&[
        "encode",
        "--blip2",
        m.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["BLIP-2 queries", "patch_embedding.weight", "holds NaN or Inf"]);
    assert!(!out.exists());
}

#[test]
fn params_from_records_absolute_paths() {
    let d = tempfile::tempdir().unwrap();
    let c = lora_concept(d.path());
    let work = d.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // Generated from inside `d` with a relative --concept, re-run from another folder.
    let out = Command::new(env!("CARGO_BIN_EXE_personalize"))
        .current_dir(d.path())
        .args([
            "generate",
            "--base",
            base().to_str().unwrap(),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--concept",
            "concept",
            "--out",
            "g",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = settings(&d.path().join("g/0000.png"));
    assert_eq!(s.concept.as_deref().map(Path::new), Some(c.as_path()), "recorded absolute");
    let again = Command::new(env!("CARGO_BIN_EXE_personalize"))
        .current_dir(&work)
        .args(["generate", "--params-from", "../g/0000.png", "--out", "again"])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(pixels(&work.join("again/0000.png")), pixels(&d.path().join("g/0000.png")));
}

#[test]
fn lora_files_are_checked_against_concept_json() {
    let d = tempfile::tempdir().unwrap();
    let c = lora_concept(d.path());
    let out = d.path().join("o");
    let gen = || generate_with(&c, &out);
    let path = c.join("concept.json");
    let original: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut v = original.clone();
    v["lora_alpha"] = serde_json::json!(1e30);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let (ok, err) = gen();
    assert!(!ok, "lora_alpha that disagrees with the file was ignored");
    one_line_error(&err, &["lora_alpha is 1000000000000000000000000000000", "records lora_alpha 2"]);
    std::fs::write(&path, serde_json::to_vec(&original).unwrap()).unwrap();

    let lora = c.join("unet_lora.safetensors");
    let saved = std::fs::read(&lora).unwrap();
    write_tensors(&lora, &BTreeMap::new(), &BTreeMap::new()).unwrap();
    let (ok, err) = gen();
    assert!(!ok, "an empty LoRA file was taken for no LoRA");
    one_line_error(&err, &["unet_lora.safetensors", "holds no tensors"]);
    std::fs::write(&lora, saved).unwrap();

    std::fs::create_dir_all(c.join("unet")).unwrap();
    let (ok, err) = gen();
    assert!(!ok, "a stray unet/ beside a LoRA concept");
    one_line_error(&err, &["unet is `lora`", "would be ignored"]);
}

#[test]
fn the_third_trials_findings_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let o = out.to_str().unwrap();
    for (extra, needles) in
        [(&["--guidance", "1e30"][..], &["--guidance", "absurd"][..]), (&["--steps", "-1"], &["--steps"])]
    {
        let (ok, err) = run(&gen_args(o, extra));
        assert!(!ok, "{extra:?}");
        one_line_error(&err, needles);
    }
    let (ok, err) = run(&gen_args(o, &["--guidance", "-5"]));
    assert!(ok, "{err}");
    assert!(err.contains("guidance is off"), "a warning: {err}");

    let lat = d.path().join("lat.safetensors");
    write_tensors(
        &lat,
        &BTreeMap::from([("latents".into(), HostTensor::f32(vec![1, 4, 4, 4], vec![1e30; 64]))]),
        &BTreeMap::new(),
    )
    .unwrap();
    let (ok, err) = run(&gen_args(d.path().join("o2").to_str().unwrap(), &["--latents", lat.to_str().unwrap()]));
    assert!(!ok, "latents of 1e30 made an image");
    one_line_error(&err, &["lat.safetensors: tensor `latents` reaches 1.0e30"]);

    let b = copy_pipeline(d.path());
    let idx = b.join("model_index.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&idx).unwrap()).unwrap();
    c["_class_name"] = "StableDiffusionXLPipeline".into();
    std::fs::write(&idx, serde_json::to_vec(&c).unwrap()).unwrap();
    let (ok, err) = run(&["generate", "--base", b.to_str().unwrap(), "--prompt", "x", "--out", o]);
    assert!(!ok, "an SDXL folder was run as SD");
    one_line_error(&err, &["model_index.json", "StableDiffusionXLPipeline"]);

    let concept = d.path().join("concept");
    let with = |extra: &[&str]| train_with(&concept, extra);
    for (extra, needles) in [
        (&["--warmup-steps", "1000000000"][..], &["--warmup-steps", "never reach"][..]),
        (&["--max-grad-norm", "1e-45"], &["--max-grad-norm"]),
        (&["--lora-alpha", "1e30"], &["--lora-alpha", "absurd"]),
        (&["--sample-steps", "100000"], &["--sample-steps", "at most"]),
    ] {
        let (ok, err) = with(extra);
        assert!(!ok, "{extra:?}");
        one_line_error(&err, needles);
    }
    let file = d.path().join("afile.txt");
    std::fs::write(&file, "x").unwrap();
    let a = train_args(file.to_str().unwrap(), "2");
    let (ok, err) = run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(!ok);
    one_line_error(&err, &["is a file; give a folder"]);

    // --overwrite must not remove an input image that sits where a run writes.
    let dir = d.path().join("imgdir");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("loss.png");
    std::fs::copy(fixtures().join("blip2/preprocess/photo.png"), &img).unwrap();
    let mut a = train_args(dir.to_str().unwrap(), "2");
    let i = a.iter().position(|x| x == "--image").unwrap();
    a[i + 1] = img.display().to_string();
    a.push("--overwrite".into());
    let (ok, err) = run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(!ok);
    one_line_error(&err, &["--overwrite would remove the training image"]);
    assert!(image::open(&img).is_ok(), "the image is intact");
}

#[test]
fn stage_inputs_outside_their_range_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let model = fixtures().join("unet/sd1");
    let io = read_tensors(&model.join("io.safetensors")).unwrap();
    let mut t: BTreeMap<String, HostTensor> = io.into_iter().filter(|(k, _)| k != "out").collect();
    let n = t["timestep"].shape.iter().product();
    t.insert("timestep".into(), HostTensor::f32(t["timestep"].shape.clone(), vec![-1e9; n]));
    let bad = d.path().join("ts.safetensors");
    write_tensors(&bad, &t, &BTreeMap::new()).unwrap();
    let o = d.path().join("o.safetensors");
    let (ok, err) = run(&[
        "stage",
        "unet",
        "--model",
        model.to_str().unwrap(),
        "--input",
        bad.to_str().unwrap(),
        "--output",
        o.to_str().unwrap(),
    ]);
    assert!(!ok, "a timestep of -1e9 gave an output");
    one_line_error(&err, &["tensor `timestep` holds -1000000000", "diffusion timestep"]);
    let img = d.path().join("img.safetensors");
    write_tensors(
        &img,
        &BTreeMap::from([("sample".into(), HostTensor::f32(vec![1, 3, 8, 8], vec![1e6; 192]))]),
        &BTreeMap::new(),
    )
    .unwrap();
    let vae = base().join("vae");
    let (ok, err) = run(&[
        "stage",
        "vae-encode",
        "--model",
        vae.to_str().unwrap(),
        "--input",
        img.to_str().unwrap(),
        "--output",
        o.to_str().unwrap(),
    ]);
    assert!(!ok, "pixels of 1e6 were encoded");
    one_line_error(&err, &["tensor `sample` holds 1000000", "[-1, 1]"]);
}

#[test]
fn a_zero_preprocessor_size_says_it_must_be_positive() {
    let d = tempfile::tempdir().unwrap();
    let m = copy_blip2(d.path());
    std::fs::write(m.join("preprocessor_config.json"), r#"{"size": {"height": 0, "width": 0}}"#).unwrap();
    let img = fixtures().join("blip2/preprocess/photo.png");
    let out = d.path().join("q.safetensors");
    let (ok, err) = run(&[
        "encode",
        "--blip2",
        m.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["preprocessor_config.json", "positive"]);
}
