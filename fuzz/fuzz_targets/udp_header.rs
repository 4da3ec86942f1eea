//! See `checks/udp_header.rs` for what this target asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| anyproxy_fuzz::udp_header::check(input));
