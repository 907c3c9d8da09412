#![no_main]
//! `cargo +nightly fuzz run shard_index`: see fuzz_targets::shard_index.
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::shard_index(data));
