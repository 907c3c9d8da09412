//! `personalize`: personalise Stable Diffusion with BLIP-2 visual prompts.

mod backend;
mod encode;
mod export;
mod generate;
mod info;
mod interrupt;
mod names;
mod stage;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "personalize",
    version,
    about = "Personalise Stable Diffusion with visual prompts from a frozen BLIP-2 encoder."
)]
struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Float type for computation. Weights are converted as they load; outputs are written as
    /// f32. On CPUs with AMX or AVX512-BF16 (`personalize info` says), bf16 runs the
    /// convolutions and linear layers as bf16 GEMMs with f32 sums and everything else in f32
    /// (training excepted); elsewhere half precision is meant for the GPU build (`--features
    /// cuda`): on the CPU it is slower than f32, and f16 is refused for generate, train and the
    /// VAE stages.
    #[arg(long, global = true, default_value = "f32")]
    dtype: names::Dtype,
    /// Use truncated JPEG input images (decoded as far as their data goes, with a warning)
    /// instead of refusing them.
    #[arg(long, global = true)]
    allow_truncated_images: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(allow_negative_numbers = true)]
    Train(train::TrainCli),
    Encode(encode::EncodeArgs),
    #[command(allow_negative_numbers = true)]
    Generate(generate::GenerateCli),
    Stage(stage::StageArgs),
    ExportLora(export::ExportLoraArgs),
    MergeLora(export::MergeLoraArgs),
    Export(export::ExportArgs),
    Convert(export::ConvertArgs),
    Info(info::InfoArgs),
}

/// `--base`, `--blip2` and `stage --model` take a folder, or a preset or repo id (with an
/// optional subfolder) looked up in the Hugging Face cache, without network.
fn resolve_models(command: &mut Command) -> Result<(), hub::Error> {
    let resolve = |p: &mut PathBuf| -> Result<(), hub::Error> {
        if let Some(arg) = p.to_str() {
            *p = hub::resolve_model(arg)?;
        }
        Ok(())
    };
    match command {
        Command::Train(a) => {
            resolve(&mut a.base)?;
            a.config.as_mut().map_or(Ok(()), resolve)?;
            resolve(&mut a.blip2)
        }
        Command::Encode(a) => resolve(&mut a.blip2),
        Command::Generate(a) => {
            a.base.as_mut().map_or(Ok(()), resolve)?;
            a.config.as_mut().map_or(Ok(()), resolve)?;
            a.blip2.as_mut().map_or(Ok(()), resolve)
        }
        Command::Stage(a) => resolve(&mut a.model),
        Command::ExportLora(_) | Command::Info(_) => Ok(()),
        Command::MergeLora(a) => {
            resolve(&mut a.base)?;
            a.common.config.as_mut().map_or(Ok(()), resolve)
        }
        Command::Export(a) => {
            a.base.as_mut().map_or(Ok(()), resolve)?;
            a.common.config.as_mut().map_or(Ok(()), resolve)
        }
        Command::Convert(a) => {
            resolve(&mut a.from)?;
            a.config.as_mut().map_or(Ok(()), resolve)
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info,personalize=debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour codes only for a terminal: logs piped to a file or CI stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

/// f16 on the CPU computes in f16 end to end (burn-flex has no f32 accumulation or upcast
/// for it): a UNet pass stays within 1 % of f32, but the VAE decode collapses (pixel std 0.012
/// against 0.50), images come out flat and training hits a NaN loss at step 2. Refused there;
/// bf16 has f32's range.
fn check_dtype(dtype: names::Dtype, command: &Command) -> Result<(), String> {
    if dtype != names::Dtype::F16 || backend::IS_GPU {
        return Ok(());
    }
    let what = match command {
        Command::Train(_) => "train",
        Command::Generate(_) => "generate",
        Command::Stage(a) if matches!(a.stage, names::StageName::VaeEncode | names::StageName::VaeDecode) => {
            "the VAE stages"
        }
        _ => return Ok(()),
    };
    Err(format!(
        "--dtype f16 does not work for {what} on the CPU (f16 overflows and underflows in the VAE and the loss: flat images, NaN losses); use --dtype bf16 (half the memory, f32's range) or f32"
    ))
}

/// clap's error as one line: the message and its value list, without the usage and the
/// pointer to --help (the brief's one-line errors; `--help` itself prints in full).
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> ExitCode {
    let mut cli = match Cli::try_parse() {
        Ok(c) => c,
        // A missing subcommand prints the help (on stderr): keep it as clap lays it out.
        Err(e) if e.use_stderr() && e.kind() != clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("{}", one_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    init_logging(cli.verbose);
    model_io::image_file::accept_truncated(cli.allow_truncated_images);
    tracing::debug!("backend: {}, dtype {}", backend::NAME, cli.dtype.as_str());
    if let Err(e) = check_dtype(cli.dtype, &cli.command) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let float = match cli.dtype {
        names::Dtype::F32 => None,
        names::Dtype::F16 => Some(burn::tensor::FloatDType::F16),
        // f32 tensors with bf16 GEMMs (AMX or AVX512-BF16): 3-8x Burn's bf16 ops here. Not
        // for training, whose autodiff tensors run Burn's ops (in bf16, as before).
        names::Dtype::Bf16
            if !backend::IS_GPU && !matches!(cli.command, Command::Train(_)) && cpu_kernels::use_bf16_gemm(true) =>
        {
            tracing::debug!("--dtype bf16: f32 tensors, bf16 GEMMs ({})", cpu_kernels::bf16_path().unwrap_or("-"));
            None
        }
        names::Dtype::Bf16 => Some(burn::tensor::FloatDType::BF16),
    };
    if let Err(e) = backend::set_float_dtype(float) {
        eprintln!("error: --dtype {}: {e:#}", cli.dtype.as_str());
        return ExitCode::FAILURE;
    }
    if let Err(e) = resolve_models(&mut cli.command) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Train(a) => train::run(a),
        Command::Encode(a) => encode::run(&a),
        Command::Generate(a) => generate::run(a),
        Command::Stage(a) => stage::run(&a),
        Command::ExportLora(a) => export::run(&a),
        Command::MergeLora(a) => export::merge_lora(&a),
        Command::Export(a) => export::export(&a),
        Command::Convert(a) => export::convert(&a),
        Command::Info(a) => info::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole context chain, outermost first.
            eprintln!("error: {e:#}");
            if interrupt::was_interrupted(&e) {
                // As a shell reports a process stopped by SIGINT.
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
