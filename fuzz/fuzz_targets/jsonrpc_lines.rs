//! bangerd's JSON-RPC line framing and parsing over arbitrary client bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small limit so the too-long path is reached too.
    bangerd::server::decode_lines_for_fuzzing(data, 4096);
});
