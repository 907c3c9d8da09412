//! `personalize export-lora`: a concept's UNet LoRA in the layout other tools read.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use model_io::tensor_file::{read_tensors_with_metadata, write_tensors};
use sd_unet::lora::{peft_to_kohya, peft_to_kohya_for, PeftLoraConfig};

/// The layouts `export-lora` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya/A1111 (`lora_unet_*.lora_down/lora_up/alpha`): A1111, ComfyUI, Forge, InvokeAI,
    /// kohya's scripts.
    Kohya,
    /// diffusers/PEFT (`unet.*.lora_A/lora_B`, the adapter config in the metadata): diffusers'
    /// `load_lora_weights`.
    Peft,
}

/// Writes a concept's UNet LoRA as a single file for other tools. They get the UNet's
/// adapter only: the visual-prompt tokens (the aligner and the concept's BLIP-2 queries) need
/// this tool, so the concept is reproduced there only in part.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportLoraArgs {
    /// A concept folder trained with `--unet lora` (it holds `unet_lora.safetensors`).
    #[arg(long)]
    pub concept: PathBuf,
    /// The layout to write.
    #[arg(long, value_enum, default_value = "kohya")]
    pub format: LoraFormat,
    /// The file to write (`.safetensors`).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` if it exists instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(a: &ExportLoraArgs) -> Result<()> {
    let src = a.concept.join("unet_lora.safetensors");
    if !src.is_file() {
        bail!(
            "{}: no unet_lora.safetensors; export-lora needs a concept trained with --unet lora",
            a.concept.display()
        );
    }
    if a.out.exists() && !a.overwrite {
        bail!("{} exists; pass --overwrite to replace it", a.out.display());
    }
    let (tensors, meta) = read_tensors_with_metadata(&src)?;
    let cfg = PeftLoraConfig::from_metadata(&meta, "unet").with_context(|| src.display().to_string())?;
    let (out, out_meta) = match a.format {
        LoraFormat::Kohya => {
            // Without metadata diffusers assumes alpha = rank (scale 1); so does the export.
            let scale = |m: &str, r: usize| cfg.as_ref().map_or(1.0, |c| c.scale(m, r));
            let t = match sdxl_unet_config(&a.concept)? {
                Some(cfg) => peft_to_kohya_for(&cfg, &tensors, &scale),
                None => peft_to_kohya(&tensors, &scale),
            }
            .with_context(|| src.display().to_string())?;
            (t, BTreeMap::from([("format".to_string(), "pt".to_string())]))
        }
        LoraFormat::Peft => (tensors, meta),
    };
    write_tensors(&a.out, &out, &out_meta)?;
    eprintln!("wrote {} ({} tensors)", a.out.display(), out.len());
    Ok(())
}

/// The base UNet's config of an SDXL concept (kohya names SDXL modules in SGM's layout, which
/// the config decides), read from the base `concept.json` names; `None` for SD 1.x/2.x.
fn sdxl_unet_config(concept: &std::path::Path) -> Result<Option<sd_unet::UNetConfig>> {
    let path = concept.join("concept.json");
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let info: personalize::ConceptInfo =
        serde_json::from_slice(&text).with_context(|| format!("{}: not a concept.json", path.display()))?;
    if info.architecture.as_deref() != Some("sdxl") {
        return Ok(None);
    }
    let base = personalize::Base {
        config: info.base_config.as_ref().map(PathBuf::from),
        ..personalize::Base::new(&info.base_model)
    };
    let why = || format!("{}: the kohya names of an SDXL LoRA come from its base's UNet config", path.display());
    let cfg = if base.is_split() {
        personalize::SingleFile::open(&base).with_context(why)?.unet_config
    } else {
        sd_unet::UNetConfig::load(&base.path.join("unet")).with_context(why)?
    };
    Ok(Some(cfg))
}

/// What `merge-lora` and `export` write.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// A diffusers folder (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`
    /// `.from_pretrained`; `--base DIR` here).
    Diffusers,
    /// One `.safetensors` file in the LDM layout (A1111, ComfyUI, Forge, `from_single_file`;
    /// `--base FILE` here).
    SingleFile,
}

impl ModelFormat {
    /// The layout a path names: a `.safetensors` file is a single file, anything else a folder.
    fn for_path(out: &std::path::Path) -> Self {
        match out.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("safetensors") => Self::SingleFile,
            _ => Self::Diffusers,
        }
    }
}

/// The base model arguments `merge-lora` and `export` share.
#[derive(clap::Args, Debug, Clone)]
pub struct BaseArgs {
    /// Single-file and ONNX --base only: a diffusers folder with the file's configs (as for generate).
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// Single-file and ONNX --base only: `epsilon` or `v_prediction` (as for generate).
    #[arg(long, value_name = "TYPE", value_parser = ["epsilon", "v_prediction"])]
    pub prediction_type: Option<String>,
    /// The layout to write (default: single-file when --out ends in `.safetensors`, else
    /// diffusers).
    #[arg(long, value_enum)]
    pub format: Option<ModelFormat>,
    /// The folder (diffusers) or file (single-file) to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` if it exists instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
}

/// Bakes LoRAs into a base model: its UNet and text encoder with every `--lora` merged at its
/// weight (as `generate --lora` applies them), written as a diffusers folder or a single file
/// (f32 weights).
#[derive(clap::Args, Debug, Clone)]
#[command(allow_negative_numbers = true)]
pub struct MergeLoraArgs {
    /// The base model: a diffusers folder, a preset or fetched repo id, or a single file.
    #[arg(long)]
    pub base: PathBuf,
    /// A LoRA and its weight (default 1.0); repeatable, they add up. PEFT and kohya layouts.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", required = true)]
    pub loras: Vec<personalize::LoraSpec>,
    #[command(flatten)]
    pub common: BaseArgs,
}

/// Writes a concept's base model with the concept's UNet change merged (its LoRA, or its
/// fine-tuned UNet), and any `--lora`, for tools that load plain Stable Diffusion models. They
/// get the UNet change only: the visual-prompt tokens (aligner and BLIP-2 queries) need
/// `personalize generate --concept`, so the concept is reproduced there only in part.
#[derive(clap::Args, Debug, Clone)]
#[command(allow_negative_numbers = true)]
pub struct ExportArgs {
    /// A concept folder from `personalize train`.
    #[arg(long)]
    pub concept: PathBuf,
    /// The base model (default: the one the concept records it was trained on).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// More LoRAs to merge, with their weights.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<personalize::LoraSpec>,
    /// Export even if the concept was trained on another base model.
    #[arg(long)]
    pub allow_base_mismatch: bool,
    #[command(flatten)]
    pub common: BaseArgs,
}

fn write(base: personalize::Base, concept: Option<&std::path::Path>, allow: bool, c: &BaseArgs) -> Result<()> {
    let base = personalize::Base { config: c.config.clone(), prediction_type: c.prediction_type.clone(), ..base };
    if c.out.exists() && !c.overwrite {
        bail!("{} exists; pass --overwrite to replace it", c.out.display());
    }
    let spinner = indicatif::ProgressBar::new_spinner().with_message("merging");
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let dev = crate::backend::device();
    let m = personalize::MergedModel::open::<crate::backend::B>(&base, concept, allow, &dev)
        .with_context(|| format!("loading base model {}", base.path.display()))?;
    spinner.set_message(format!("writing {}", c.out.display()));
    match c.format.unwrap_or_else(|| ModelFormat::for_path(&c.out)) {
        ModelFormat::Diffusers => m.write_diffusers(&c.out, c.overwrite)?,
        ModelFormat::SingleFile => m.write_single_file(&c.out, c.overwrite)?,
    }
    spinner.finish_and_clear();
    eprintln!("wrote {}", c.out.display());
    Ok(())
}

/// Converts a base model to another layout: an ONNX pipeline folder or a single file to a
/// diffusers safetensors folder (f32), or a diffusers folder to a single file.
#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    /// The model to read: an ONNX pipeline folder (`unet/model.onnx`, ...), a single file or a
    /// diffusers folder.
    #[arg(long)]
    pub from: PathBuf,
    /// The folder (diffusers) or file (single-file) to write.
    #[arg(long)]
    pub to: PathBuf,
    /// The layout to write (default: single-file when --to ends in `.safetensors`, else
    /// diffusers).
    #[arg(long, value_enum)]
    pub format: Option<ModelFormat>,
    /// ONNX folders and single files: a diffusers folder with the models' configs, where the
    /// model has none beside it and they cannot be inferred (as for generate).
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// ONNX folders and single files: `epsilon` or `v_prediction` (as for generate).
    #[arg(long, value_name = "TYPE", value_parser = ["epsilon", "v_prediction"])]
    pub prediction_type: Option<String>,
    /// Replace `--to` if it exists instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
}

/// `personalize convert`.
pub fn convert(a: &ConvertArgs) -> Result<()> {
    let common = BaseArgs {
        config: a.config.clone(),
        prediction_type: a.prediction_type.clone(),
        format: a.format,
        out: a.to.clone(),
        overwrite: a.overwrite,
    };
    write(personalize::Base::new(&a.from), None, false, &common)
}

/// `personalize merge-lora`.
pub fn merge_lora(a: &MergeLoraArgs) -> Result<()> {
    write(personalize::Base::new(&a.base).with_loras(a.loras.clone()), None, false, &a.common)
}

/// `personalize export`.
pub fn export(a: &ExportArgs) -> Result<()> {
    // The base the concept records, with its --config and --prediction-type, unless --base.
    let mut common = a.common.clone();
    let base = match &a.base {
        Some(b) => b.clone(),
        None => {
            let info: personalize::ConceptInfo = model_io::read_config(&a.concept, "concept.json")?;
            common.config = common.config.or_else(|| info.base_config.as_ref().map(PathBuf::from));
            common.prediction_type = common.prediction_type.or(info.prediction_type);
            hub::resolve_model(&info.base_model)
                .with_context(|| format!("the base model {} records; pass --base", a.concept.display()))?
        }
    };
    write(personalize::Base::new(base).with_loras(a.loras.clone()), Some(&a.concept), a.allow_base_mismatch, &common)
}
