//! `personalize export-lora`: a concept's UNet LoRA in the layout other tools read.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use model_io::tensor_file::{read_tensors_with_metadata, write_tensors};
use sd_unet::lora::{peft_to_kohya, PeftLoraConfig};

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
            let t = peft_to_kohya(&tensors, &scale).with_context(|| src.display().to_string())?;
            (t, BTreeMap::from([("format".to_string(), "pt".to_string())]))
        }
        LoraFormat::Peft => (tensors, meta),
    };
    write_tensors(&a.out, &out, &out_meta)?;
    eprintln!("wrote {} ({} tensors)", a.out.display(), out.len());
    Ok(())
}
