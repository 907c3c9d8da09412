#![no_main]
//! `cargo +nightly fuzz run safetensors`: see fuzz_targets::safetensors.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::safetensors(data));
