//! The flattener over arbitrary tar streams: it may refuse a layer, never panic, never
//! write outside its staging directory.
#![no_main]

use banger_oci::flatten::{FlattenLimits, FlattenOptions, Flattener, Privilege};
use banger_oci::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let options = FlattenOptions {
        privilege: Privilege::Unprivileged,
        limits: FlattenLimits {
            max_uncompressed_bytes: 16 << 20,
            max_entries: 10_000,
        },
    };
    let mut flattener = Flattener::new(dir.path().join("tree"), options).unwrap();
    let digest = Digest::of(data);
    // Twice: a second layer over whatever the first left (whiteouts, links, replaced dirs).
    for _ in 0..2 {
        if flattener
            .apply_layer(data, "application/vnd.oci.image.layer.v1.tar", &digest)
            .is_err()
        {
            break;
        }
    }
    let _ = flattener.finish();
    // Nothing escaped: the temp dir holds only the tree.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.iter().all(|n| n == "tree"), "{names:?}");
});
