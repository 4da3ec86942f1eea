//! See `checks/http_head.rs` for what this target asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| anyproxy_fuzz::http_head::check(input));
