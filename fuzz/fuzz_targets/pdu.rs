#![no_main]

use libfuzzer_sys::fuzz_target;

// The body lives in the proto crate so `cargo test` can replay the corpus.
fuzz_target!(|data: &[u8]| proto::fuzzing::pdu(data));
