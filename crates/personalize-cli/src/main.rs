//! `personalize`: personalise Stable Diffusion with BLIP-2 visual prompts.

mod backend;
mod stage;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "personalize", version, about = "Personalise Stable Diffusion with visual prompts from a frozen BLIP-2 encoder.")]
struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one pipeline stage on tensors from a safetensors file and write its outputs.
    ///
    /// Stages: tokenizer, text-encoder, unet, vae-encode, vae-decode, scheduler. See DESIGN.md for the
    /// tensor names each reads and writes.
    Stage {
        /// The stage to run: tokenizer, text-encoder, unet, vae-encode, vae-decode or scheduler.
        stage: String,
        /// The model folder the stage loads, as published (e.g. `sd/text_encoder`, `sd/vae`,
        /// or a tokenizer folder).
        #[arg(long)]
        model: PathBuf,
        /// Input tensors (safetensors). Not used by `tokenizer`, which takes --prompt.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Where to write the output tensors (safetensors; written atomically).
        #[arg(long)]
        output: PathBuf,
        /// Run the stage N times after loading (for timing); the last output is written.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        repeat: u64,
        /// A prompt for the tokenizer stage; repeat the flag for a batch.
        #[arg(long)]
        prompt: Vec<String>,
        /// Build the model from the folder's config.json alone, with random weights (for
        /// timing full-size models without downloading them).
        #[arg(long)]
        random_weights: bool,
        /// Scheduler stage only: use this scheduler instead of the config's `_class_name`
        /// (ddim, ddpm, pndm, euler, euler-a, dpm++2m, dpm++2m-karras).
        #[arg(long)]
        scheduler: Option<String>,
    },
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info,personalize=debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    tracing::debug!("backend: {}", backend::NAME);
    let result = match cli.command {
        Command::Stage { stage, model, input, output, repeat, prompt, random_weights, scheduler } => stage::run(&stage::StageArgs {
            stage,
            model,
            input,
            output,
            repeat: repeat as usize,
            prompts: prompt,
            random_weights,
            scheduler,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole context chain, outermost first.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
