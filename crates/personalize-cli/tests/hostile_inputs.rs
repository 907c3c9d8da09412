//! Hostile inputs found by the trials of issue 17, after the first round: `concept.json`
//! checked against its files, stage inputs and outputs checked, nothing a user made replaced
//! unasked, absurd values refused in one line. Each test fails without its fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use model_io::tensor_file::{read_tensors, read_tensors_with_metadata, write_tensors, HostTensor};

mod common;

use common::*;

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
        error_line(&err, &[&[path.to_str().unwrap()][..], needles].concat());
    }
    std::fs::write(&path, serde_json::to_vec(&original).unwrap()).unwrap();
    let lora = c.join("unet_lora.safetensors");
    let lora_original = std::fs::read(&lora).unwrap();
    let key = poison(&lora, "lora_A", f32::NAN);
    let (ok, err) = gen(&c);
    assert!(!ok);
    error_line(&err, &["unet_lora.safetensors", &key, "holds NaN or Inf"]);
    std::fs::write(&lora, lora_original).unwrap();
    // An aligner file without its metadata makes the default 8 tokens: say so.
    let af = c.join("aligner.safetensors");
    let a_saved = std::fs::read(&af).unwrap();
    let (at, _) = read_tensors_with_metadata(&af).unwrap();
    write_tensors(&af, &at, &BTreeMap::new()).unwrap();
    let (ok, err) = gen(&c);
    assert!(!ok);
    error_line(&err, &["num_queries is 4", "makes 8", "no num_queries metadata"]);
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
    error_line(&err, &["visual_queries.safetensors: tensor `queries` reaches"]);
    std::fs::write(&qf, q_saved).unwrap();
    poison(&c.join("aligner.safetensors"), "weight", f32::NAN);
    let (ok, err) = gen(&c);
    assert!(!ok);
    error_line(&err, &["aligner", "holds NaN or Inf"]);
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
    error_line(&err, &["--resolution 1000000", "needs about", "available"]);
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
    error_line(&err, &["input_ids", "[0, 77]", "no values"]);

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
    error_line(&err, &["tensor `sample` holds NaN or Inf"]);

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
    error_line(&err, &["output `sample` holds NaN or Inf", "conv_in.weight"]);
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
    error_line(&err, &["--scheduler is for stage scheduler"]);

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
    error_line(&err, &["random weights", "GiB", "memory available"]);
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
    error_line(&err, &["0000.png exists", "--overwrite"]);
    assert_eq!(pixels(&out.join("0000.png")), first);
    let src = out.join("0000.png");
    let (ok, err) = run(&["generate", "--params-from", src.to_str().unwrap(), "--seed", "9", "--out", o]);
    assert!(!ok, "--params-from onto its own folder replaced the source");
    error_line(&err, &["exists", "--overwrite"]);
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
    error_line(&err, &["is the input image"]);
    assert!(image::open(&img).is_ok(), "the image is intact");

    // train into a folder of the user's own files, and --overwrite keeping the user's samples.
    let own = d.path().join("own");
    std::fs::create_dir_all(own.join("samples")).unwrap();
    std::fs::write(own.join("loss.csv"), "my data").unwrap();
    std::fs::write(own.join("samples/favourite.png"), "mine").unwrap();
    let args = train_args(own.to_str().unwrap(), "2");
    let (ok, err) = run(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(!ok, "a folder of the user's own files was written into");
    error_line(&err, &["holds other files", "not a concept folder", "--overwrite"]);
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
        error_line(&err, needles);
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
    error_line(&err, &["--lora-rank", "--unet lora"]);
    let (ok, err) = frozen(&["--unet-lr", "1e-3"]);
    assert!(!ok);
    error_line(&err, &["--unet-lr", "frozen"]);

    let (ok, err) = run(&gen_args(o, &["--scheduler", "bogus"]));
    assert!(!ok);
    error_line(&err, &["invalid value 'bogus' for '--scheduler", "euler-a", "dpm++2m-karras"]);
    let blip2 = fixtures().join("blip2/opt_sharded");
    let (ok, err) = run(&gen_args(o, &["--blip2", blip2.to_str().unwrap()]));
    assert!(!ok);
    error_line(&err, &["--blip2 is only used with --image"]);
    let lat = d.path().join("lat.safetensors");
    write_tensors(
        &lat,
        &BTreeMap::from([("latents".into(), HostTensor::f32(vec![3, 4, 4, 4], vec![0.1; 192]))]),
        &BTreeMap::new(),
    )
    .unwrap();
    let (ok, err) = run(&gen_args(o, &["--latents", lat.to_str().unwrap(), "--num-images", "2"]));
    assert!(!ok, "--num-images was silently ignored");
    error_line(&err, &["--num-images and --latents"]);

    let b = copy_pipeline(d.path());
    let vae = b.join("vae/config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&vae).unwrap()).unwrap();
    c["scaling_factor"] = serde_json::json!(-1e30);
    std::fs::write(&vae, serde_json::to_vec(&c).unwrap()).unwrap();
    let (ok, err) = run(&["generate", "--base", b.to_str().unwrap(), "--prompt", "x", "--steps", "1", "--out", o]);
    assert!(!ok, "a negative scaling factor made an image");
    error_line(&err, &["vae", "scaling_factor"]);
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
    error_line(&err, &["BLIP-2 queries", "patch_embedding.weight", "holds NaN or Inf"]);
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
    error_line(&err, &["lora_alpha is 1000000000000000000000000000000", "records lora_alpha 2"]);
    std::fs::write(&path, serde_json::to_vec(&original).unwrap()).unwrap();

    let lora = c.join("unet_lora.safetensors");
    let saved = std::fs::read(&lora).unwrap();
    write_tensors(&lora, &BTreeMap::new(), &BTreeMap::new()).unwrap();
    let (ok, err) = gen();
    assert!(!ok, "an empty LoRA file was taken for no LoRA");
    error_line(&err, &["unet_lora.safetensors", "holds no tensors"]);
    std::fs::write(&lora, saved).unwrap();

    std::fs::create_dir_all(c.join("unet")).unwrap();
    let (ok, err) = gen();
    assert!(!ok, "a stray unet/ beside a LoRA concept");
    error_line(&err, &["unet is `lora`", "would be ignored"]);
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
        error_line(&err, needles);
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
    error_line(&err, &["lat.safetensors: tensor `latents` reaches 1.0e30"]);

    let b = copy_pipeline(d.path());
    let idx = b.join("model_index.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&idx).unwrap()).unwrap();
    c["_class_name"] = "StableDiffusionXLPipeline".into();
    std::fs::write(&idx, serde_json::to_vec(&c).unwrap()).unwrap();
    let (ok, err) = run(&["generate", "--base", b.to_str().unwrap(), "--prompt", "x", "--out", o]);
    assert!(!ok, "an SDXL folder was run as SD");
    error_line(&err, &["model_index.json", "StableDiffusionXLPipeline"]);

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
        error_line(&err, needles);
    }
    let file = d.path().join("afile.txt");
    std::fs::write(&file, "x").unwrap();
    let a = train_args(file.to_str().unwrap(), "2");
    let (ok, err) = run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(!ok);
    error_line(&err, &["is a file; give a folder"]);

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
    error_line(&err, &["--overwrite would remove the training image"]);
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
    error_line(&err, &["tensor `timestep` holds -1000000000", "diffusion timestep"]);
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
    error_line(&err, &["tensor `sample` holds 1000000", "[-1, 1]"]);
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
    error_line(&err, &["preprocessor_config.json", "positive"]);
}
