//! The agent's frame decoder over arbitrary bytes: it may refuse, never panic, and what it
//! decodes encodes back to a frame that decodes to the same.
#![no_main]

use banger_agent::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = proto::decode(data) {
        assert!(used <= data.len());
        let again = proto::encode(&frame);
        let (back, n) = proto::decode(&again)
            .expect("an encoded frame decodes")
            .expect("an encoded frame is complete");
        assert_eq!(n, again.len());
        assert_eq!(proto::encode(&back), again);
    }
    let mut reader = data;
    while let Ok(Some(_)) = proto::read_frame(&mut reader) {}
});
