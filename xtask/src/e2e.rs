//! `cargo xtask e2e`: the README's main job on the bundled tiny models, end to end, through the
//! `personalize` binary, then checks of everything it wrote.
//!
//! 1. `personalize train` on both example images (LoRA, 60 steps): the concept folder's files,
//!    their tensor shapes, `concept.json`, and a falling loss in `loss.csv`.
//! 2. `personalize generate` with the concept, twice with the same seed: 64×64 RGB PNGs with the
//!    settings in text chunks, not blank, identical across the two runs.
//! 3. `personalize generate` with a new reference image through BLIP-2 (`--image --blip2`).
//! 4. `personalize generate` with a prompt in Japanese and an emoji: its text chunks (UTF-8
//!    `iTXt`) read back; then `--params-from` that image makes the same pixels again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use crate::png_text;

/// The text chunk of the settings JSON and of A1111's `parameters` (the CLI's contract).
const SETTINGS_KEY: &str = "personalize";
const PARAMETERS_KEY: &str = "parameters";

/// Steps of the quick-start training run (the README's command uses the same).
pub const TRAIN_STEPS: usize = 60;

/// Runs the job with the `personalize` binary `exe`, in a fresh folder under `work`.
pub fn run(root: &Path, exe: &Path, work: &Path) -> Result<()> {
    let assets = root.join("assets");
    let (base, blip2) = (assets.join("tiny-sd"), assets.join("tiny-blip2"));
    let (img1, img2) = (assets.join("examples/toy-1.png"), assets.join("examples/toy-2.png"));
    let concept = work.join("concept");
    let steps = TRAIN_STEPS.to_string();

    let t = Instant::now();
    personalize(
        exe,
        &[
            &"train",
            &"--base",
            &base,
            &"--blip2",
            &blip2,
            &"--image",
            &img1,
            &"--image",
            &img2,
            &"--prompt",
            &"a photo of sks",
            &"--steps",
            &steps,
            &"--resolution",
            &"64",
            &"--lr",
            &"1e-3",
            &"--unet-lr",
            &"1e-3",
            &"--out",
            &concept,
        ],
    )?;
    eprintln!("e2e: trained in {:.1} s", t.elapsed().as_secs_f64());
    check_concept(&concept)?;

    let mut outs = Vec::new();
    for run in ["out-a", "out-b"] {
        let out = work.join(run);
        let t = Instant::now();
        personalize(
            exe,
            &[
                &"generate",
                &"--base",
                &base,
                &"--concept",
                &concept,
                &"--prompt",
                &"a watercolor of sks",
                &"--steps",
                &"20",
                &"--seed",
                &"0",
                &"--num-images",
                &"2",
                &"--out",
                &out,
            ],
        )?;
        eprintln!("e2e: generated 2 images in {:.1} s", t.elapsed().as_secs_f64());
        check_images(&out, 2, "a watercolor of sks")?;
        outs.push(out);
    }
    for name in ["0000.png", "0001.png"] {
        let (a, b) = (std::fs::read(outs[0].join(name))?, std::fs::read(outs[1].join(name))?);
        ensure!(a == b, "{name}: two runs with seed 0 wrote different images");
    }

    let out = work.join("out-ref");
    personalize(
        exe,
        &[
            &"generate",
            &"--base",
            &base,
            &"--concept",
            &concept,
            &"--image",
            &img2,
            &"--blip2",
            &blip2,
            &"--prompt",
            &"a sketch of sks",
            &"--steps",
            &"10",
            &"--seed",
            &"1",
            &"--out",
            &out,
        ],
    )?;
    check_images(&out, 1, "a sketch of sks")?;

    // Text that Latin-1 cannot hold goes into UTF-8 chunks, and the settings re-run.
    let utf8 = "sks の水彩画 🎨";
    let out = work.join("out-utf8");
    personalize(
        exe,
        &[
            &"generate",
            &"--base",
            &base,
            &"--concept",
            &concept,
            &"--prompt",
            &utf8,
            &"--steps",
            &"10",
            &"--seed",
            &"2",
            &"--out",
            &out,
        ],
    )?;
    check_images(&out, 1, utf8)?;
    let again = work.join("out-again");
    personalize(exe, &[&"generate", &"--params-from", &out.join("0000.png"), &"--out", &again])?;
    check_images(&again, 1, utf8)?;
    let a = png_text::read(&out.join("0000.png"))?;
    let b = png_text::read(&again.join("0000.png"))?;
    ensure!(a.rgb == b.rgb, "generate --params-from {}: different pixels", out.join("0000.png").display());
    eprintln!("e2e: all checks passed ({})", work.display());
    Ok(())
}

/// Runs `personalize` with `args` (strings and paths alike).
fn personalize(exe: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Result<()> {
    let status = Command::new(exe)
        .args(args.iter().map(|a| a.as_ref()))
        .status()
        .with_context(|| format!("running {}", exe.display()))?;
    ensure!(status.success(), "personalize {} failed ({status})", args[0].as_ref().to_string_lossy());
    Ok(())
}

/// The tensor shapes of a safetensors file, by name.
fn tensors(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{}", path.display()))?;
    Ok(st.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect())
}

fn shape_of(t: &BTreeMap<String, Vec<usize>>, file: &Path, name: &str) -> Result<Vec<usize>> {
    t.get(name).cloned().with_context(|| format!("{}: no tensor `{name}`", file.display()))
}

/// The concept folder of the tiny models: widths 32 (Q-Former and text), 32 queries, k = 8.
pub fn check_concept(dir: &Path) -> Result<()> {
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("concept.json")).context("concept.json")?)?;
    ensure!(
        info["steps_done"] == TRAIN_STEPS,
        "concept.json: steps_done is {}, expected {TRAIN_STEPS}",
        info["steps_done"]
    );
    ensure!(info["num_queries"] == 8 && info["unet"] == "lora", "concept.json: expected k = 8 and a LoRA UNet: {info}");

    let f = dir.join("aligner.safetensors");
    let a = tensors(&f)?;
    let fc1 = shape_of(&a, &f, "fc1.weight")?;
    ensure!(fc1.len() == 2 && fc1[1] == 32, "{}: fc1.weight is {fc1:?}, expected [H, 32]", f.display());
    ensure!(shape_of(&a, &f, "fc2.weight")? == vec![32, fc1[0]], "{}: fc2.weight is not [32, {}]", f.display(), fc1[0]);

    let f = dir.join("visual_queries.safetensors");
    let q = tensors(&f)?;
    let shapes: Vec<Vec<usize>> = q.values().cloned().collect();
    ensure!(
        shapes == vec![vec![2, 32, 32]],
        "{}: expected one [2, 32, 32] tensor (2 images), found {shapes:?}",
        f.display()
    );

    let f = dir.join("unet_lora.safetensors");
    let l = tensors(&f)?;
    let a_keys = l.keys().filter(|k| k.starts_with("unet.") && k.ends_with("lora_A.weight")).count();
    let b_keys = l.keys().filter(|k| k.starts_with("unet.") && k.ends_with("lora_B.weight")).count();
    ensure!(
        a_keys > 0 && a_keys == b_keys,
        "{}: expected matching unet.*.lora_A/lora_B keys, found {a_keys}/{b_keys}",
        f.display()
    );

    let csv = std::fs::read_to_string(dir.join("loss.csv")).context("loss.csv")?;
    loss_falls(&csv)
}

/// The mean loss of the last quarter of the steps is at least 10 % below the first quarter's.
pub fn loss_falls(csv: &str) -> Result<()> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().context("loss.csv is empty")?.split(',').collect();
    let col = header.iter().position(|h| *h == "loss").context("loss.csv has no `loss` column")?;
    let losses = lines
        .map(|l| l.split(',').nth(col).context("short row")?.parse::<f64>().context("not a number"))
        .collect::<Result<Vec<f64>>>()
        .context("loss.csv")?;
    let q = losses.len() / 4;
    ensure!(q >= 2, "loss.csv has {} steps; need at least 8", losses.len());
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..q]), mean(&losses[losses.len() - q..]));
    ensure!(last < 0.9 * first, "the loss did not fall: first quarter {first:.4}, last quarter {last:.4}");
    eprintln!("e2e: loss fell from {first:.4} to {last:.4} (quarter means)");
    Ok(())
}

/// `n` PNGs `0000.png`.. of 64×64 RGB, not a flat colour, with the settings in text chunks:
/// `personalize` (JSON: the prompt, the image's index, the size) and the A1111 `parameters`
/// (starting with the prompt line), and no `prompt` chunk (ComfyUI's workflow keyword).
pub fn check_images(dir: &Path, n: usize, prompt: &str) -> Result<()> {
    for i in 0..n {
        let path: PathBuf = dir.join(format!("{i:04}.png"));
        let img = png_text::read(&path).with_context(|| format!("{}", path.display()))?;
        ensure!(
            (img.width, img.height) == (64, 64),
            "{}: {}×{}, expected 64×64",
            path.display(),
            img.width,
            img.height
        );
        let Some(json) = img.chunk(SETTINGS_KEY) else {
            bail!("{}: no `personalize` text chunk (found {:?})", path.display(), img.text);
        };
        let s: serde_json::Value = serde_json::from_str(json).with_context(|| format!("{}", path.display()))?;
        ensure!(
            s["prompt"] == prompt,
            "{}: the settings' prompt is {}, expected {prompt:?}",
            path.display(),
            s["prompt"]
        );
        ensure!(
            s["image_index"] == i && s["width"] == 64 && s["height"] == 64,
            "{}: settings of another image: {json}",
            path.display()
        );
        let params = img.chunk(PARAMETERS_KEY).unwrap_or_default();
        ensure!(
            params.starts_with(&format!("{prompt}\n")) && params.contains(&format!("Seed: {}, Size: 64x64", s["seed"])),
            "{}: `parameters` chunk {params:?} is not the A1111 text of {prompt:?}",
            path.display()
        );
        ensure!(
            img.chunk("prompt").is_none(),
            "{}: a `prompt` chunk (ComfyUI would read it as a workflow)",
            path.display()
        );
        let (lo, hi) = img.rgb.iter().fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        ensure!(hi - lo > 10, "{}: a flat image (values {lo}..{hi})", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_check_passes_a_falling_curve_and_fails_a_flat_one() {
        let csv = |v: &[f64]| {
            let mut s = "step,loss,prior_loss,lr\n".to_string();
            v.iter().enumerate().for_each(|(i, l)| s += &format!("{},{l},,0.001\n", i + 1));
            s
        };
        let falling: Vec<f64> = (0..40).map(|i| 1.5 - i as f64 * 0.02).collect();
        assert!(loss_falls(&csv(&falling)).is_ok());
        let flat = vec![1.5; 40];
        assert!(loss_falls(&csv(&flat)).unwrap_err().to_string().contains("did not fall"));
        assert!(loss_falls(&csv(&[1.0, 0.5])).is_err(), "too few steps");
        assert!(loss_falls("step,lr\n1,2\n").is_err(), "no loss column");
    }

    #[test]
    fn image_check_rejects_missing_and_wrong_images() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_images(dir.path(), 1, "p").is_err(), "missing file");
        let mut rgb = vec![0; 64 * 64 * 3];
        let prompt = "p の 🎨";
        let settings = serde_json::json!({"prompt": prompt, "image_index": 0, "width": 64, "height": 64, "seed": 7});
        let text = vec![
            (SETTINGS_KEY, settings.to_string()),
            (PARAMETERS_KEY, format!("{prompt}\nSteps: 2, Seed: 7, Size: 64x64")),
        ];
        let path = dir.path().join("0000.png");
        png_text::write(&path, 64, 64, &rgb, &text);
        assert!(check_images(dir.path(), 1, prompt).unwrap_err().to_string().contains("flat"));
        rgb[5] = 200;
        png_text::write(&path, 64, 64, &rgb, &text);
        check_images(dir.path(), 1, prompt).unwrap();
        assert!(check_images(dir.path(), 1, "q").unwrap_err().to_string().contains("prompt"));
        png_text::write(&path, 64, 64, &rgb, &[("prompt", "p".into())]);
        assert!(check_images(dir.path(), 1, "p").unwrap_err().to_string().contains("no `personalize`"));
        let mut with_workflow = text.clone();
        with_workflow.push(("prompt", "{}".into()));
        png_text::write(&path, 64, 64, &rgb, &with_workflow);
        assert!(check_images(dir.path(), 1, prompt).unwrap_err().to_string().contains("ComfyUI"));
        png_text::write(&path, 32, 64, &rgb[..32 * 64 * 3], &text);
        assert!(check_images(dir.path(), 1, prompt).unwrap_err().to_string().contains("expected 64×64"));
    }
}
