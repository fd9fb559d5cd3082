//! The replica link's frame decoder: bytes from the peer (or anyone who reaches the port
//! before authentication) must never panic it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replica::wire::fuzz(data);
});
