#![no_main]
//! `cargo +nightly fuzz run tokenizer`: see fuzz_targets::tokenizer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::tokenizer(data));
