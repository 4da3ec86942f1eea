//! See `checks/socks5.rs` for what this target asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| anyproxy_fuzz::socks5::check(input));
