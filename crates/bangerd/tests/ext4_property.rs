//! A seeded property test of the image path on stable (the cargo-fuzz targets in `fuzz/`
//! need nightly): random trees → tar layer → flattener → banger's ext4 writer →
//! `e2fsck -fn` clean → every file read back (debugfs) equals what went in.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;

use banger_oci::flatten::{FlattenOptions, Flattener, Privilege};
use banger_oci::Digest;
use banger_testkit::command::{installed, run_ok};
use banger_testkit::tar_with_files_at;
use rand::{Rng, SeedableRng};

/// Trees per run; each seed is printed on failure, so a failing tree can be rebuilt.
const CASES: u64 = 12;

fn random_name(rng: &mut impl Rng) -> String {
    let len = rng.gen_range(1..=40);
    (0..len)
        .map(|_| {
            let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789._-";
            alphabet[rng.gen_range(0..alphabet.len())] as char
        })
        .collect::<String>()
        .replace("..", "_.")
}

/// A random tree: directories up to depth 4, files of 0 bytes to 256 KiB (some sparse-ish).
fn random_tree(seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut files = BTreeMap::new();
    let mut dirs = vec![String::new()];
    for _ in 0..rng.gen_range(1..120) {
        let parent = dirs[rng.gen_range(0..dirs.len())].clone();
        let name = random_name(&mut rng);
        let path = if parent.is_empty() {
            name
        } else {
            format!("{parent}/{name}")
        };
        if files.contains_key(&path) || dirs.contains(&path) {
            continue;
        }
        if rng.gen_bool(0.25) && path.matches('/').count() < 4 {
            dirs.push(path);
            continue;
        }
        let len = match rng.gen_range(0..10) {
            0 => 0,
            1 => rng.gen_range(200_000..262_144),
            _ => rng.gen_range(1..9000),
        };
        let mut data = vec![0u8; len];
        if rng.gen_bool(0.7) {
            rng.fill(&mut data[..]);
        }
        files.insert(path, data);
    }
    files
}

fn tar_of(files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (&p[..], &d[..])).collect();
    tar_with_files_at(&files, 1_700_000_000)
}

#[test]
fn random_trees_make_clean_images_that_read_back_equal() {
    if !banger_testkit::require(installed("e2fsck", "-V"), "e2fsck (e2fsprogs) is needed") {
        return;
    }
    for seed in 0..CASES {
        let files = random_tree(seed);
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_of(&files);
        let options = FlattenOptions {
            privilege: Privilege::Unprivileged,
            ..FlattenOptions::default()
        };
        let mut flattener = Flattener::new(dir.path().join("tree"), options).unwrap();
        flattener
            .apply_layer(
                &layer[..],
                "application/vnd.oci.image.layer.v1.tar",
                &Digest::of(&layer),
            )
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let mut tree = flattener.finish().unwrap();
        let image = dir.path().join("rootfs.ext4");
        banger_rootfs::build_ext4(&mut tree, &image, &banger_rootfs::BuildOptions::default())
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        run_ok(
            Command::new("e2fsck").arg("-fn").arg(&image),
            format!("seed {seed}"),
        );
        // Read every file back in one debugfs run (dump each to a scratch file).
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let mut script = tempfile::NamedTempFile::new().unwrap();
        for (n, path) in files.keys().enumerate() {
            writeln!(script, "dump /{path} {}", out.join(n.to_string()).display()).unwrap();
        }
        script.flush().unwrap();
        run_ok(
            Command::new("debugfs")
                .arg("-f")
                .arg(script.path())
                .arg(&image),
            format!("seed {seed}: debugfs"),
        );
        for (n, (path, data)) in files.iter().enumerate() {
            let back = std::fs::read(out.join(n.to_string()))
                .unwrap_or_else(|e| panic!("seed {seed}: /{path} not read back: {e}"));
            assert!(
                back == *data,
                "seed {seed}: /{path} differs ({} vs {} bytes)",
                back.len(),
                data.len()
            );
        }
    }
}
