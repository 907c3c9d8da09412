//! `personalize info`: what this build and this machine will run, for bug reports and for
//! reading benchmarks (which GEMM kernel, which bf16 path, how many threads).

use crate::backend;

/// Print the build, the backend, the CPU's features and the kernels chosen for it (the f32
/// GEMM microkernel, the bf16 GEMM and what `--dtype bf16` therefore runs), one `key: value`
/// line each.
#[derive(clap::Args, Debug)]
pub struct InfoArgs {}

pub fn run(_: &InfoArgs) -> anyhow::Result<()> {
    for (key, value) in lines() {
        println!("{key}: {value}");
    }
    Ok(())
}

/// The report, as `(key, value)` pairs.
pub fn lines() -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("backend", backend::NAME.to_string()),
        ("threads", rayon::current_num_threads().to_string()),
        ("cpu", cpu_model().unwrap_or_else(|| "unknown".into())),
        ("cpu features", cpu_features()),
    ];
    if backend::IS_GPU {
        out.push(("dtype bf16", "the GPU's bf16 (Burn's ops on burn-cuda)".into()));
        return out;
    }
    out.push(("f32 gemm", cpu_kernels::gemm_path().to_string()));
    let bf16 = cpu_kernels::bf16_path();
    out.push(("bf16 gemm", bf16.unwrap_or("none").to_string()));
    out.push((
        "dtype bf16",
        match bf16 {
            Some(k) => format!("f32 tensors; convolutions, linear layers and attention as bf16 GEMMs ({k}) with f32 sums; training on Burn's bf16 ops"),
            None => "Burn's bf16 ops (no AMX-BF16 or AVX512-BF16 kernel, or PERSONALIZE_GEMM_BF16=off: slower than f32)".into(),
        },
    ));
    out
}

/// `model name` from /proc/cpuinfo (Linux).
fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The instruction sets the kernels look for, those this CPU has.
fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut have: Vec<&str> = Vec::new();
        macro_rules! check {
            ($($f:tt),*) => { $( if std::is_x86_feature_detected!($f) { have.push($f); } )* };
        }
        check!("avx2", "fma", "avx512f", "avx512bw", "avx512bf16");
        // AMX's detection macro is unstable in Rust 1.95: CPUID leaf 7, EDX bits 24 and 22.
        // Leaf 7 is read only where it exists.
        let (max, _) = std::arch::x86_64::__get_cpuid_max(0);
        let edx = if max >= 7 { std::arch::x86_64::__cpuid_count(7, 0).edx } else { 0 };
        if edx & (1 << 24) != 0 && edx & (1 << 22) != 0 {
            have.push("amx-bf16");
        }
        if have.is_empty() {
            "none of avx2, fma, avx512f, avx512bw, avx512bf16, amx-bf16".into()
        } else {
            have.join(" ")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}
