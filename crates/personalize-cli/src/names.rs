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

/// A scheduler (`--scheduler`): the short names, which force what they promise (`pndm` sets
/// `skip_prk_steps`, `dpm++2m` the 2M solver), and, not listed in `--help`, diffusers' class
/// names, which build that class from the model's config as it is (as `from_config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SchedulerName {
    Ddim,
    Ddpm,
    Pndm,
    Euler,
    #[value(name = "euler-a")]
    EulerA,
    #[value(name = "dpm++2m")]
    DpmPp2m,
    #[value(name = "dpm++2m-karras")]
    DpmPp2mKarras,
    #[value(name = "DDIMScheduler", hide = true)]
    DdimClass,
    #[value(name = "DDPMScheduler", hide = true)]
    DdpmClass,
    #[value(name = "PNDMScheduler", hide = true)]
    PndmClass,
    #[value(name = "EulerDiscreteScheduler", hide = true)]
    EulerClass,
    #[value(name = "EulerAncestralDiscreteScheduler", hide = true)]
    EulerAClass,
    #[value(name = "DPMSolverMultistepScheduler", hide = true)]
    DpmClass,
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
            SchedulerName::DdimClass => "DDIMScheduler",
            SchedulerName::DdpmClass => "DDPMScheduler",
            SchedulerName::PndmClass => "PNDMScheduler",
            SchedulerName::EulerClass => "EulerDiscreteScheduler",
            SchedulerName::EulerAClass => "EulerAncestralDiscreteScheduler",
            SchedulerName::DpmClass => "DPMSolverMultistepScheduler",
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

    /// The name clap takes for `v`.
    fn typed<T: ValueEnum>(v: &T) -> String {
        v.to_possible_value().unwrap().get_name().to_string()
    }

    /// The short names are those of the scheduler crate, so every one builds a scheduler.
    #[test]
    fn scheduler_names_are_the_scheduler_crates() {
        let cfg =
            scheduler::SchedulerConfig::from_json_str(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#)
                .unwrap();
        for v in SchedulerName::value_variants() {
            assert_eq!(typed(v), v.as_str());
            let s = scheduler::from_config::<scheduler::HostSample>(&cfg, Some(v.as_str()));
            assert!(s.is_ok(), "{}: {:?}", v.as_str(), s.err());
        }
        let shown = SchedulerName::value_variants().iter().filter(|v| !v.to_possible_value().unwrap().is_hide_set());
        let mut short: Vec<&str> = shown.map(|v| v.as_str()).collect();
        short.retain(|n| *n != "dpm++2m-karras");
        assert_eq!(short, scheduler::CLI_NAMES);
        // A class name builds that class from the config as it is: no forced settings.
        let dpm = scheduler::SchedulerConfig::from_json_str(
            r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true, "algorithm_type": "sde-dpmsolver++"}"#,
        )
        .unwrap();
        assert!(scheduler::from_config::<scheduler::HostSample>(&dpm, Some(SchedulerName::DpmClass.as_str())).is_err());
        assert!(scheduler::from_config::<scheduler::HostSample>(&dpm, Some(SchedulerName::DpmPp2m.as_str())).is_ok());
        for v in StageName::value_variants() {
            assert_eq!(typed(v), v.as_str());
        }
        for v in Dtype::value_variants() {
            assert_eq!(typed(v), v.as_str());
        }
    }
}
