//! `personalize generate` end to end: PNGs, text chunks, parity with diffusers, bad input.

mod common;

use common::{fixtures, latents_file, one_line_error, run, tiny_sd};

use std::collections::BTreeMap;
use std::path::PathBuf;

use model_io::tensor_file::{read_tensors, write_tensors};

/// The text of chunk `key`.
fn chunk(text: &[(String, String)], key: &str) -> Option<String> {
    text.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

#[test]
fn generate_with_latents_writes_the_diffusers_images_with_text_chunks() {
    let io = read_tensors(&fixtures().join("pipeline_io.safetensors")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let lat = latents_file(d.path(), &io["dpm_cfg.latents"]);
    let out = d.path().join("out");
    let base = fixtures().join("pipeline");
    let (ok, err) = run(&[
        "generate",
        "--base",
        base.to_str().unwrap(),
        "--prompt",
        "an astronaut riding a horse",
        "--negative-prompt",
        "lowres",
        "--steps",
        "5",
        "--guidance",
        "5",
        "--scheduler",
        "dpm++2m",
        "--height",
        "40",
        "--width",
        "32",
        "--seed",
        "3",
        "--latents",
        lat.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let reference = io["dpm_cfg.images"].as_f32("images").unwrap();
    let per = 40 * 32 * 3;
    for i in 0..2 {
        let (img, text) = personalize::read_png(&out.join(format!("{i:04}.png"))).unwrap();
        assert_eq!((img.width, img.height), (32, 40));
        let max = img
            .data
            .iter()
            .zip(&reference[i * per..(i + 1) * per])
            .map(|(a, b)| a.abs_diff((b * 255.0).round() as u8))
            .max()
            .unwrap();
        assert!(max <= 3, "image {i}: {max} levels");
        assert_eq!(
            chunk(&text, "parameters").as_deref(),
            Some("an astronaut riding a horse\nNegative prompt: lowres\nSteps: 5, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 5, Seed: 3, Size: 32x40, Model: pipeline")
        );
        assert!(chunk(&text, "prompt").is_none(), "ComfyUI reads a `prompt` chunk as its workflow");
        let s = personalize::ImageSettings::from_json(&chunk(&text, "personalize").unwrap()).unwrap();
        assert_eq!((s.prompt.as_str(), s.negative_prompt.as_deref()), ("an astronaut riding a horse", Some("lowres")));
        assert_eq!((s.seed, s.steps, s.guidance, s.scheduler.as_deref()), (3, 5, 5.0, Some("dpm++2m")));
        assert_eq!((s.height, s.width, s.num_images, s.image_index), (Some(40), Some(32), 2, i));
        assert_eq!(s.base.as_deref(), base.to_str());
        assert_eq!(s.latents.as_deref(), lat.to_str());
    }
    assert!(!out.join("0002.png").exists(), "the latents' batch sets the image count");
}

#[test]
fn generate_rejects_bad_input_in_one_line() {
    let d = tempfile::tempdir().unwrap();
    let base = fixtures().join("pipeline");
    let b = base.to_str().unwrap();
    let out = d.path().join("o");
    let o = out.to_str().unwrap();
    let (ok, err) =
        run(&["generate", "--base", b, "--prompt", "x", "--height", "36", "--width", "32", "--steps", "1", "--out", o]);
    assert!(!ok);
    one_line_error(&err, &["--height 36", "multiple of 8"]);

    let (ok, err) = run(&["generate", "--base", b, "--prompt", "x", "--image", "ref.png", "--out", o]);
    assert!(!ok);
    one_line_error(&err, &["--image", "--blip2"]);

    let lat = d.path().join("l.safetensors");
    write_tensors(
        &lat,
        &BTreeMap::from([(
            "latents".to_string(),
            model_io::tensor_file::HostTensor::f32(vec![1, 4, 3, 3], vec![0.0; 36]),
        )]),
        &BTreeMap::new(),
    )
    .unwrap();
    let (ok, err) = run(&[
        "generate",
        "--base",
        b,
        "--prompt",
        "x",
        "--latents",
        lat.to_str().unwrap(),
        "--height",
        "32",
        "--width",
        "32",
        "--out",
        o,
    ]);
    assert!(!ok);
    one_line_error(&err, &["tensor `latents` has shape [1, 4, 3, 3]", "expected [N >= 1, 4, 4, 4]"]);

    let (ok, err) = run(&["generate", "--base", d.path().to_str().unwrap(), "--prompt", "x", "--out", o]);
    assert!(!ok);
    one_line_error(&err, &["model_index.json"]);

    let (ok, err) = run(&[
        "generate",
        "--base",
        b,
        "--prompt",
        "x",
        "--scheduler",
        "heun",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
        "--out",
        o,
    ]);
    assert!(!ok);
    one_line_error(&err, &["heun"]);
}

/// concept.json of an aligner-only concept.
fn frozen_concept_info(base: &str, fingerprint: &str, k: usize) -> personalize::ConceptInfo {
    personalize::ConceptInfo {
        version: 1,
        base_model: base.into(),
        base_config: None,
        prediction_type: None,
        base_unet_fingerprint: fingerprint.into(),
        architecture: None,
        num_queries: k,
        query_selection: "first".into(),
        prompt: Some("a photo of sks".into()),
        unet: personalize::UnetChange::Frozen,
        lora_rank: None,
        lora_alpha: None,
        training: serde_json::Value::Null,
        steps_done: 0,
        final_loss: None,
    }
}

#[test]
fn concept_for_another_base_model_is_refused_unless_overridden() {
    let d = tempfile::tempdir().unwrap();
    let concept = d.path().join("concept");
    std::fs::create_dir_all(&concept).unwrap();
    let s = q_aligner::AlignerSettings { num_queries: 2, ..Default::default() };
    let a = q_aligner::Aligner::<burn_flex::Flex>::new(
        8,
        16,
        32,
        &s,
        &mut seeded::SplitMix64::new(0),
        &burn_flex::FlexDevice,
    );
    a.save(&concept.join("aligner.safetensors")).unwrap();
    let q = model_io::tensor_file::HostTensor::f32(vec![1, 4, 8], (0..32).map(|i| i as f32 / 32.0).collect());
    write_tensors(
        &concept.join("visual_queries.safetensors"),
        &BTreeMap::from([("queries".to_string(), q)]),
        &BTreeMap::new(),
    )
    .unwrap();
    let info = frozen_concept_info("some/other-model", "fnv64:0000000000000000", 2);
    personalize::Concept::<burn_flex::Flex>::write_info(&concept, &info).unwrap();
    let base = fixtures().join("pipeline");
    let out = d.path().join("o");
    let args = [
        "generate",
        "--base",
        base.to_str().unwrap(),
        "--prompt",
        "a photo of sks",
        "--concept",
        concept.to_str().unwrap(),
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, err) = run(&args);
    assert!(!ok);
    one_line_error(&err, &["UNet weights differ", "some/other-model", "--allow-base-mismatch"]);
    let mut with_flag = args.to_vec();
    with_flag.push("--allow-base-mismatch");
    let (ok, err) = run(&with_flag);
    assert!(ok, "{err}");
    let s = personalize::ImageSettings::from_png(&out.join("0000.png")).unwrap();
    assert_eq!(s.concept.as_deref(), concept.to_str());
}

/// BLIP-2 fixture (tiny, 6 queries of width 32) and a reference image.
fn blip2() -> (PathBuf, PathBuf) {
    (fixtures().join("blip2/opt_sharded"), fixtures().join("blip2/preprocess/photo.png"))
}

#[test]
fn encode_writes_queries_and_generate_uses_reference_images() {
    let (model, image) = blip2();
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("q.safetensors");
    let (ok, err) = run(&[
        "encode",
        "--blip2",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--out",
        q.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let queries = &read_tensors(&q).unwrap()["queries"];
    assert_eq!(queries.shape, vec![2, 6, 32]);
    let v = queries.as_f32("q").unwrap();
    assert_eq!(v[..6 * 32], v[6 * 32..], "the same image gives the same queries");

    // A concept whose aligner takes these queries; --image replaces its cached queries.
    let concept = d.path().join("concept");
    std::fs::create_dir_all(&concept).unwrap();
    let s = q_aligner::AlignerSettings { num_queries: 4, ..Default::default() };
    q_aligner::Aligner::<burn_flex::Flex>::new(32, 16, 32, &s, &mut seeded::SplitMix64::new(0), &burn_flex::FlexDevice)
        .save(&concept.join("aligner.safetensors"))
        .unwrap();
    let base = fixtures().join("pipeline");
    let pipe = personalize::Pipeline::<burn_flex::Flex>::load(&base, &burn_flex::FlexDevice).unwrap();
    let info = frozen_concept_info(&base.display().to_string(), &pipe.unet_fingerprint, 4);
    personalize::Concept::<burn_flex::Flex>::write_info(&concept, &info).unwrap();
    let out = d.path().join("o");
    let common = [
        "generate",
        "--base",
        base.to_str().unwrap(),
        "--prompt",
        "a photo of sks",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "4",
    ];
    let mut with_image = common.to_vec();
    with_image.extend([
        "--concept",
        concept.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--blip2",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let (ok, err) = run(&with_image);
    assert!(ok, "{err}");
    let plain_out = d.path().join("plain");
    let mut plain = common.to_vec();
    plain.extend(["--out", plain_out.to_str().unwrap()]);
    let (ok, err) = run(&plain);
    assert!(ok, "{err}");
    let (a, _) = personalize::read_png(&out.join("0000.png")).unwrap();
    let (b, _) = personalize::read_png(&plain_out.join("0000.png")).unwrap();
    assert_ne!(a.data, b.data, "the visual prompt changes the image");

    // A concept without cached queries and no --image: a clear error.
    let (ok, err) =
        run(&[&common[..], &["--concept", concept.to_str().unwrap(), "--out", out.to_str().unwrap()]].concat());
    assert!(!ok);
    one_line_error(&err, &["visual_queries.safetensors", "--image"]);
}

#[test]
fn encode_rejects_a_file_that_is_not_an_image() {
    let (model, _) = blip2();
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("notes.png");
    std::fs::write(&bad, b"this is text").unwrap();
    let (ok, err) = run(&[
        "encode",
        "--blip2",
        model.to_str().unwrap(),
        "--image",
        bad.to_str().unwrap(),
        "--out",
        d.path().join("q.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok);
    one_line_error(&err, &["notes.png"]);
}

/// The `KEY=VALUE` fields of the summary line that starts with `name:`.
fn summary(err: &str, name: &str) -> BTreeMap<String, String> {
    let line = err
        .lines()
        .rev()
        .find(|l| l.starts_with(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no `{name}:` line in {err}"));
    line.split_whitespace().filter_map(|t| t.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The stage runner's `--repeat` summary (what `cargo xtask bench load` reads): the load time
/// and the memory after loading.
#[test]
fn stage_repeat_reports_load_time_and_memory() {
    let d = tempfile::tempdir().unwrap();
    let out = fixtures().join("unet/sd1");
    let io = read_tensors(&fixtures().join("unet/sd1/io.safetensors")).unwrap();
    let input = d.path().join("in.safetensors");
    let t: BTreeMap<String, _> =
        ["sample", "timestep", "encoder_hidden_states"].iter().map(|k| (k.to_string(), io[*k].clone())).collect();
    write_tensors(&input, &t, &BTreeMap::new()).unwrap();
    let (ok, err) = run(&[
        "stage",
        "unet",
        "--model",
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        d.path().join("o.safetensors").to_str().unwrap(),
        "--repeat",
        "3",
    ]);
    assert!(ok, "{err}");
    let s = summary(&err, "unet");
    assert_eq!((s["warmup"].as_str(), s["runs"].as_str()), ("1", "2"));
    assert!(s["load_s"].parse::<f64>().unwrap() > 0.0, "{err}");
    assert!(s["load_peak_mib"].parse::<f64>().unwrap() > 0.0, "{err}");
    assert!(s["peak_mib"].parse::<f64>().unwrap() >= s["load_peak_mib"].parse::<f64>().unwrap(), "{err}");
}

/// The chunk types of a PNG file, in order.
fn chunk_types(bytes: &[u8]) -> Vec<String> {
    let (mut types, mut at) = (Vec::new(), 8);
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        types.push(String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned());
        at += 12 + len;
    }
    types
}

#[test]
fn a_utf8_prompt_is_written_in_both_chunks_and_params_from_makes_the_same_image() {
    let d = tempfile::tempdir().unwrap();
    let base = tiny_sd();
    let out = d.path().join("出力");
    let prompt = "日本語のテキスト 🐱";
    let (ok, err) = run(&[
        "generate",
        "--base",
        base.to_str().unwrap(),
        "--prompt",
        prompt,
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "5",
        "--num-images",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for i in 0..2 {
        let path = out.join(format!("{i:04}.png"));
        let (img, text) = personalize::read_png(&path).unwrap();
        assert_eq!((img.width, img.height), (32, 32));
        assert_eq!(
            chunk(&text, "parameters").as_deref(),
            Some(&*format!("{prompt}\nSteps: 2, Sampler: PLMS, Schedule type: Automatic, CFG scale: 7.5, Seed: 5, Size: 32x32, Model: tiny-sd"))
        );
        let s = personalize::ImageSettings::from_json(&chunk(&text, "personalize").unwrap()).unwrap();
        assert_eq!((s.prompt.as_str(), s.seed, s.steps, s.image_index, s.num_images), (prompt, 5, 2, i, 2));
        assert_eq!((s.scheduler.as_deref(), s.scheduler_class.as_deref()), (None, Some("PNDMScheduler")));
        let types = chunk_types(&std::fs::read(&path).unwrap());
        assert_eq!(types.iter().filter(|t| *t == "iTXt").count(), 2, "both chunks in UTF-8: {types:?}");
    }
    assert!(!out.join("0002.png").exists());

    // The settings of each image make it again, pixel for pixel: image 1 is the second of a
    // batch of two (one noise stream), so both are sampled and the second written.
    for i in 0..2 {
        let again = d.path().join(format!("again-{i}"));
        let from = out.join(format!("{i:04}.png"));
        let (ok, err) = run(&["generate", "--params-from", from.to_str().unwrap(), "--out", again.to_str().unwrap()]);
        assert!(ok, "{err}");
        let (a, ta) = personalize::read_png(&from).unwrap();
        let (b, tb) = personalize::read_png(&again.join("0000.png")).unwrap();
        assert_eq!(a, b, "image {i}: the same pixels");
        assert_eq!(chunk(&ta, "parameters"), chunk(&tb, "parameters"));
        assert!(!again.join("0001.png").exists(), "only the image asked for");
    }

    // Flags given override the image's settings.
    let other = d.path().join("other");
    let from = out.join("0000.png");
    let (ok, err) = run(&[
        "generate",
        "--params-from",
        from.to_str().unwrap(),
        "--seed",
        "6",
        "--negative-prompt",
        "ぼやけた",
        "--out",
        other.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let s = personalize::ImageSettings::from_png(&other.join("0000.png")).unwrap();
    assert_eq!(
        (s.prompt.as_str(), s.seed, s.negative_prompt.as_deref(), s.num_images),
        // The image's own generation (of 2) with the seed given: image 0 of it.
        (prompt, 6, Some("ぼやけた"), 2)
    );
    assert_ne!(personalize::read_png(&other.join("0000.png")).unwrap().0, personalize::read_png(&from).unwrap().0);
}

#[test]
fn params_from_an_image_without_settings_is_refused_or_reads_a1111_parameters() {
    let d = tempfile::tempdir().unwrap();
    let img = personalize::RgbImage { width: 1, height: 1, data: vec![0, 0, 0] };
    let plain = d.path().join("plain.png");
    personalize::write_png(&plain, &img, &[("Title", "a photo".into())]).unwrap();
    let out = d.path().join("o");
    let (ok, err) = run(&["generate", "--params-from", plain.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err, &["plain.png", "has no `personalize` settings"]);

    // A1111's parameters: prompt, steps, CFG scale, seed and size; the base must be given.
    let a1111 = d.path().join("a1111.png");
    let params = "a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: DDIM, Schedule type: Automatic, CFG scale: 3.5, Seed: 11, Size: 32x24, Model: v1-5";
    personalize::write_png(&a1111, &img, &[("parameters", params.into())]).unwrap();
    let (ok, err) = run(&["generate", "--params-from", a1111.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err, &["a1111.png", "--base"]);
    let base = tiny_sd();
    let (ok, err) = run(&[
        "generate",
        "--params-from",
        a1111.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let s = personalize::ImageSettings::from_png(&out.join("0000.png")).unwrap();
    assert_eq!((s.prompt.as_str(), s.negative_prompt.as_deref()), ("a red fox", Some("blurry")));
    assert_eq!(
        (s.steps, s.guidance, s.seed, s.width, s.height, s.scheduler.as_deref()),
        (2, 3.5, 11, Some(32), Some(24), Some("ddim"))
    );
}

#[test]
fn a_failed_write_names_the_images_written_and_not_written() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    // 0001.png is a folder that is not empty: renaming the finished file onto it fails.
    std::fs::create_dir_all(out.join("0001.png/x")).unwrap();
    let base = tiny_sd();
    let (ok, err) = run(&[
        "generate",
        "--base",
        base.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "1",
        "--num-images",
        "3",
        "--overwrite",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    let (p0, p1, p2) = (out.join("0000.png"), out.join("0001.png"), out.join("0002.png"));
    one_line_error(&err, &[&format!("after writing 1 of 3 images ({}): {}: ", p0.display(), p1.display())]);
    assert!(p0.is_file() && !p2.exists());
    assert!(
        std::fs::read_dir(&out).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")),
        "no temp files left"
    );
}

/// Values that were accepted and then panicked or gave garbage: each a one-line error, before
/// any sampling.
#[test]
fn absurd_generate_values_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let base = fixtures().join("pipeline");
    let out = d.path().join("out");
    let run_with = |extra: &[&str]| {
        let mut args = vec!["generate", "--base", base.to_str().unwrap(), "--prompt", "a cat", "--steps", "2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        run(&args)
    };
    let (ok, err) = run_with(&["--num-images", "0"]);
    assert!(!ok);
    one_line_error(&err, &["--num-images"]);
    let (ok, err) = run_with(&["--guidance", "NaN"]);
    assert!(!ok);
    one_line_error(&err, &["--guidance", "NaN"]);
    let lat = d.path().join("empty.safetensors");
    let t = BTreeMap::from([("latents".to_string(), model_io::tensor_file::HostTensor::f32(vec![0, 4, 4, 4], vec![]))]);
    write_tensors(&lat, &t, &BTreeMap::new()).unwrap();
    let (ok, err) = run_with(&["--latents", lat.to_str().unwrap()]);
    assert!(!ok);
    one_line_error(&err, &["empty.safetensors", "[0, 4, 4, 4]", "N >= 1"]);
    assert!(!out.join("0000.png").exists());
}
