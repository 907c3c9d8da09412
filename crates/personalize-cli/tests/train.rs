//! The main job end to end on the tiny models: `personalize train`, then `generate --concept`.

mod common;

use common::{fixtures, run};

use std::path::PathBuf;

#[test]
fn train_then_generate_with_the_concept() {
    let d = tempfile::tempdir().unwrap();
    let concept = d.path().join("concept");
    let base = fixtures().join("pipeline");
    let blip2 = fixtures().join("blip2/opt_sharded");
    let image = fixtures().join("blip2/preprocess/photo.png");
    let (ok, err) = run(&[
        "train",
        "--base",
        base.to_str().unwrap(),
        "--blip2",
        blip2.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "a photo of sks",
        "--out",
        concept.to_str().unwrap(),
        "--steps",
        "6",
        "--resolution",
        "32",
        "--queries",
        "4",
        "--unet",
        "lora",
        "--lora-rank",
        "2",
        "--save-every",
        "3",
        "--seed",
        "1",
    ]);
    assert!(ok, "{err}");
    for f in [
        "concept.json",
        "aligner.safetensors",
        "unet_lora.safetensors",
        "visual_queries.safetensors",
        "loss.csv",
        "loss.png",
    ] {
        assert!(concept.join(f).is_file(), "{f} missing; stderr: {err}");
    }
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concept.join("concept.json")).unwrap()).unwrap();
    assert_eq!(info["steps_done"], 6);
    assert_eq!(info["num_queries"], 4);
    assert_eq!(
        std::fs::read_to_string(concept.join("loss.csv")).unwrap().lines().count(),
        7,
        "header + one line per step"
    );

    let out = d.path().join("out");
    let (ok, err) = run(&[
        "generate",
        "--base",
        base.to_str().unwrap(),
        "--prompt",
        "a watercolor of sks",
        "--concept",
        concept.to_str().unwrap(),
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.join("0000.png").is_file());

    // Training on nothing, or on a file that is not an image, stops before training.
    let (ok, err) = run(&[
        "train",
        "--base",
        base.to_str().unwrap(),
        "--blip2",
        blip2.to_str().unwrap(),
        "--out",
        d.path().join("c2").to_str().unwrap(),
    ]);
    assert!(!ok, "{err}");
    let bad = d.path().join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let (ok, err) = run(&[
        "train",
        "--base",
        base.to_str().unwrap(),
        "--blip2",
        blip2.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--image",
        bad.to_str().unwrap(),
        "--out",
        d.path().join("c3").to_str().unwrap(),
        "--resolution",
        "32",
    ]);
    assert!(!ok);
    assert!(err.contains("bad.png") && err.lines().filter(|l| !l.trim().is_empty()).count() == 1, "{err}");
}

/// A prompt and an output folder outside Latin-1 once stopped training at its first sample
/// image (PNG tEXt takes Latin-1 only): the samples are written, with the prompt in UTF-8.
#[test]
fn training_with_a_non_latin1_prompt_writes_its_samples() {
    let d = tempfile::tempdir().unwrap();
    let concept = d.path().join("概念");
    let base = fixtures().join("pipeline");
    let blip2 = fixtures().join("blip2/opt_sharded");
    let image = fixtures().join("blip2/preprocess/photo.png");
    let prompt = "一只 sks 猫 🐱";
    let (ok, err) = run(&[
        "train",
        "--base",
        base.to_str().unwrap(),
        "--blip2",
        blip2.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        prompt,
        "--out",
        concept.to_str().unwrap(),
        "--steps",
        "2",
        "--resolution",
        "32",
        "--queries",
        "4",
        "--unet",
        "lora",
        "--lora-rank",
        "2",
        "--sample-steps",
        "2",
        "--seed",
        "1",
    ]);
    assert!(ok, "{err}");
    let samples: Vec<PathBuf> =
        std::fs::read_dir(concept.join("samples")).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!samples.is_empty(), "no sample image; stderr: {err}");
    let (_, text) = personalize::read_png(&samples[0]).unwrap();
    assert!(text.iter().any(|(k, v)| k == "parameters" && v.starts_with(prompt)), "{text:?}");
}

/// Settings that were accepted and then panicked or were silently changed: each a one-line
/// error before any work.
#[test]
fn absurd_train_values_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let base = fixtures().join("pipeline");
    let blip2 = fixtures().join("blip2/opt_sharded");
    let image = fixtures().join("blip2/preprocess/photo.png");
    let out = d.path().join("c");
    for (extra, needle) in [
        (&["--aligner-hidden", "0"][..], "--aligner-hidden"),
        (&["--queries", "0"][..], "--queries"),
        (&["--max-grad-norm", "NaN"][..], "--max-grad-norm"),
        (&["--max-grad-norm=-1"][..], "--max-grad-norm"),
        (&["--class-images", "x"][..], "--class-prompt"),
        (&["--class-prompt", "a cat", "--class-image-steps", "0"][..], "--class-image-steps"),
        (&["--class-prompt", "a cat", "--num-class-images", "0"][..], "--num-class-images"),
    ] {
        let mut args = vec![
            "train",
            "--base",
            base.to_str().unwrap(),
            "--blip2",
            blip2.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--resolution",
            "32",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, err) = run(&args);
        assert!(!ok, "{extra:?} was accepted");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() == 1 && lines[0].contains(needle), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?}: wrote {}", out.display());
    }
}

/// Training into a folder that holds a run is refused; `--overwrite` replaces it (old
/// samples go), `--resume --overwrite` is a contradiction.
#[test]
fn overwrite_replaces_a_run_and_only_when_asked() {
    let d = tempfile::tempdir().unwrap();
    let concept = d.path().join("c");
    let base = fixtures().join("pipeline");
    let blip2 = fixtures().join("blip2/opt_sharded");
    let image = fixtures().join("blip2/preprocess/photo.png");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--base",
            base.to_str().unwrap(),
            "--blip2",
            blip2.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--out",
            concept.to_str().unwrap(),
            "--steps",
            "2",
            "--resolution",
            "32",
            "--queries",
            "4",
            "--unet",
            "frozen",
            "--sample-steps",
            "0",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (ok, err) = train(&[]);
    assert!(ok, "{err}");
    // A sample of an earlier run, and a file of the user's that --overwrite must keep.
    let stale = concept.join("samples/step-000099.png");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"x").unwrap();
    let mine = concept.join("samples/my-notes.txt");
    std::fs::write(&mine, b"mine").unwrap();
    let (ok, err) = train(&[]);
    assert!(!ok && err.contains("--overwrite"), "{err}");
    assert!(stale.exists());
    let (ok, err) = train(&["--overwrite"]);
    assert!(ok, "{err}");
    assert!(!stale.exists() && concept.join("concept.json").is_file());
    assert!(mine.exists(), "--overwrite removes a run's samples only");
    let (ok, _) = train(&["--overwrite", "--resume"]);
    assert!(!ok);
    assert!(!concept.join(".lock").exists());
}

/// `--gradient-checkpointing` recomputes activations in the backward pass: the same gradients,
/// so the same concept, byte for byte (full fine-tuning, where every convolution's weight gets
/// a gradient, as well as LoRA).
#[test]
fn gradient_checkpointing_trains_the_same_concept() {
    let d = tempfile::tempdir().unwrap();
    for unet in ["lora", "full"] {
        let mut outs = Vec::new();
        for ckpt in [false, true] {
            let out = d.path().join(format!("{unet}-{ckpt}"));
            let mut args = common::train_args(out.to_str().unwrap(), "3");
            let i = args.iter().position(|a| a == "--unet").unwrap();
            args[i + 1] = unet.to_string();
            if unet == "full" {
                let r = args.iter().position(|a| a == "--lora-rank").unwrap();
                args.drain(r..r + 2);
            }
            if ckpt {
                args.push("--gradient-checkpointing".to_string());
            }
            let (ok, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(ok, "{err}");
            assert_eq!(err.contains("gradient checkpointing: memory-bound activations are recomputed"), ckpt, "{err}");
            outs.push(out);
        }
        let weights = if unet == "lora" { "unet_lora.safetensors" } else { "unet/diffusion_pytorch_model.safetensors" };
        for f in ["aligner.safetensors", weights, "loss.csv"] {
            let (a, b) = (std::fs::read(outs[0].join(f)).unwrap(), std::fs::read(outs[1].join(f)).unwrap());
            assert!(a == b, "{unet}: {f} differs with --gradient-checkpointing");
        }
    }
}
