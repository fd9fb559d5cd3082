//! The snapshot diff stream reader: a stream from a file or a remote sender must never
//! panic it, and a whole stream has one encoding.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replica::snapshot::stream::fuzz(data);
});
