#![no_main]

use libfuzzer_sys::fuzz_target;

// The body lives in the failover crate so `cargo test` runs it too.
fuzz_target!(|data: &[u8]| failover::wire::fuzz(data));
