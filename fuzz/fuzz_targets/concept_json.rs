#![no_main]
//! `cargo +nightly fuzz run concept_json`: see fuzz_targets::concept_json.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::concept_json(data));
