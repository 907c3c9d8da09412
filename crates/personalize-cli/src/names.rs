//! The names the command line takes (`--dtype`, the stage, `--scheduler`), as clap value enums:
//! `--help` lists them and a wrong one is refused with the list, before any work.

use clap::ValueEnum;

/// The float type of the computation (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

/// A stage of the stage runner (`personalize stage NAME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StageName {
    Tokenizer,
    TextEncoder,
    Unet,
    VaeEncode,
    VaeDecode,
    Scheduler,
    Aligner,
    Blip2,
}

/// A scheduler (`--scheduler`): the short names, and diffusers' class names as aliases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SchedulerName {
    #[value(alias = "DDIMScheduler")]
    Ddim,
    #[value(alias = "DDPMScheduler")]
    Ddpm,
    #[value(alias = "PNDMScheduler")]
    Pndm,
    #[value(alias = "EulerDiscreteScheduler")]
    Euler,
    #[value(name = "euler-a", alias = "EulerAncestralDiscreteScheduler")]
    EulerA,
    #[value(name = "dpm++2m", alias = "DPMSolverMultistepScheduler")]
    DpmPp2m,
    #[value(name = "dpm++2m-karras")]
    DpmPp2mKarras,
}

impl StageName {
    /// The name as typed.
    pub fn as_str(self) -> &'static str {
        match self {
            StageName::Tokenizer => "tokenizer",
            StageName::TextEncoder => "text-encoder",
            StageName::Unet => "unet",
            StageName::VaeEncode => "vae-encode",
            StageName::VaeDecode => "vae-decode",
            StageName::Scheduler => "scheduler",
            StageName::Aligner => "aligner",
            StageName::Blip2 => "blip2",
        }
    }
}

impl std::fmt::Display for StageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SchedulerName {
    /// The short name, as `scheduler::from_config` takes it (and the PNGs record it).
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerName::Ddim => "ddim",
            SchedulerName::Ddpm => "ddpm",
            SchedulerName::Pndm => "pndm",
            SchedulerName::Euler => "euler",
            SchedulerName::EulerA => "euler-a",
            SchedulerName::DpmPp2m => "dpm++2m",
            SchedulerName::DpmPp2mKarras => "dpm++2m-karras",
        }
    }
}

impl Dtype {
    /// The name as typed.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The short names are those of the scheduler crate, so every one builds a scheduler.
    #[test]
    fn scheduler_names_are_the_scheduler_crates() {
        let cfg = scheduler::SchedulerConfig::from_json_str(r#"{"_class_name": "PNDMScheduler"}"#).unwrap();
        let typed = |v: &dyn Fn() -> Option<clap::builder::PossibleValue>| v().unwrap().get_name().to_string();
        for v in SchedulerName::value_variants() {
            assert_eq!(typed(&|| v.to_possible_value()), v.as_str());
            let s = scheduler::from_config::<scheduler::HostSample>(&cfg, Some(v.as_str()));
            assert!(s.is_ok(), "{}: {:?}", v.as_str(), s.err());
        }
        let mut short: Vec<&str> = SchedulerName::value_variants().iter().map(|v| v.as_str()).collect();
        short.retain(|n| *n != "dpm++2m-karras");
        assert_eq!(short, scheduler::CLI_NAMES);
        for v in StageName::value_variants() {
            assert_eq!(typed(&|| v.to_possible_value()), v.as_str());
        }
        for v in Dtype::value_variants() {
            assert_eq!(typed(&|| v.to_possible_value()), v.as_str());
        }
    }
}
