//! Prune benchmark (issue: prune wall time vs `rm -rf`, dry run vs `du -sb`, time until the
//! cache is usable again). Builds a cache of 100,000 blobs of 1–4 KiB plus three 50 MiB blobs,
//! and an identical tree for the standard tool, with the same preparation (sync + dropped page
//! caches when root) before each timed step. Run: `cargo bench -p banger-oci --bench prune`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_oci::{BlobCache, PruneOptions};

const SMALL_BLOBS: usize = 100_000;
const LARGE_BLOBS: usize = 3;
const LARGE_SIZE: usize = 50 << 20;

fn build_tree(root: &Path) {
    let dir = root.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut buf = vec![0u8; 4096];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    for i in 0..SMALL_BLOBS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let size = 1024 + (seed % 3073) as usize;
        let mut f = fs::File::create(dir.join(format!("{i:064x}"))).unwrap();
        f.write_all(&buf[..size]).unwrap();
    }
    let big = vec![7u8; LARGE_SIZE];
    for i in 0..LARGE_BLOBS {
        fs::write(dir.join(format!("{:064x}", SMALL_BLOBS + i)), &big).unwrap();
    }
}

/// The same preparation before every timed step, so neither side gets a warmer cache.
fn settle() {
    let _ = Command::new("sync").status();
    if rustix::process::geteuid().is_root() {
        let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    }
}

/// Runs the standard tool's step and ours each after [`settle`]: in the order given in
/// round 0, the other way round in round 1, so neither always goes first.
fn settled_in_turn(round: u32, mut steps: [Box<dyn FnMut() + '_>; 2]) {
    if round == 1 {
        steps.reverse();
    }
    for step in &mut steps {
        settle();
        step();
    }
}

fn time(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn run_tool(program: &str, args: &[&Path]) {
    let status = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{program} failed");
}

/// Prunes `cache` while a watcher polls for the moment the cache directory is a new, empty,
/// writable directory; returns (prune wall time, time until usable).
fn timed_prune(cache: &Arc<BlobCache>) -> (Duration, Duration) {
    use std::os::unix::fs::MetadataExt;
    let root = cache.root().to_owned();
    let old_inode = fs::metadata(&root).unwrap().ino();
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let watcher = {
        let done = Arc::clone(&done);
        let root = root.clone();
        std::thread::spawn(move || loop {
            if let Ok(meta) = fs::metadata(&root) {
                if meta.ino() != old_inode {
                    let usable = started.elapsed();
                    // Prove it is writable, as a pull would need.
                    let probe = root.join(".bench-probe");
                    fs::write(&probe, b"x").unwrap();
                    fs::remove_file(&probe).unwrap();
                    return usable;
                }
            }
            if done.load(Ordering::Relaxed) {
                return started.elapsed();
            }
            std::hint::spin_loop();
        })
    };
    let tally = cache.prune(PruneOptions::default()).unwrap();
    let wall = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let usable = watcher.join().unwrap();
    assert_eq!(tally.blobs as usize, SMALL_BLOBS + LARGE_BLOBS);
    (wall, usable)
}

fn main() {
    // `cargo bench` passes --bench; any filter argument is ignored.
    let base: PathBuf = std::env::var_os("BANGER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(default_bench_dir);
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    let ours = base.join("cache/oci");
    let theirs = base.join("copy/oci");
    eprintln!(
        "building caches of {SMALL_BLOBS} small + {LARGE_BLOBS} x 50 MiB blobs in {}",
        base.display()
    );
    let cache = BlobCache::new(ours.clone());
    let (mut dry, mut du, mut prune, mut rm, mut usable) = (
        Duration::MAX,
        Duration::MAX,
        Duration::MAX,
        Duration::MAX,
        Duration::MAX,
    );
    // Two rounds, alternating which side goes first; the better time of each side is kept,
    // so neither pays alone for warming what the preparation could not reset.
    for round in 0..2 {
        build_tree(&ours);
        build_tree(&theirs);
        settled_in_turn(
            round,
            [
                Box::new(|| du = du.min(time(|| run_tool("du", &[Path::new("-sb"), &theirs])))),
                Box::new(|| {
                    let d = time(|| {
                        cache
                            .prune(PruneOptions {
                                dry_run: true,
                                ..Default::default()
                            })
                            .unwrap();
                    });
                    dry = dry.min(d);
                }),
            ],
        );
        settled_in_turn(
            round,
            [
                Box::new(|| rm = rm.min(time(|| run_tool("rm", &[Path::new("-rf"), &theirs])))),
                Box::new(|| {
                    let (p, u) = timed_prune(&cache);
                    prune = prune.min(p);
                    usable = usable.min(u);
                }),
            ],
        );
    }
    println!(
        "prune      {:>8.1} ms   rm -rf {:>8.1} ms   ratio {:.3} (target <= 1.05)",
        ms(prune),
        ms(rm),
        ratio(prune, rm)
    );
    println!(
        "dry run    {:>8.1} ms   du -sb {:>8.1} ms   ratio {:.3} (target <= 1.0)",
        ms(dry),
        ms(du),
        ratio(dry, du)
    );
    println!("usable after {:.2} ms (target <= 50 ms)", ms(usable));
    let _ = fs::remove_dir_all(&base);
}

/// tmpfs when there is one: on a disk mounted with online discard, deleting 100,000 files
/// after a sync takes minutes and varies run to run, which would blow the five-minute bench
/// budget. Set BANGER_BENCH_DIR to a directory on the cache's real filesystem to measure there.
fn default_bench_dir() -> PathBuf {
    if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm/banger-prune-bench")
    } else {
        std::env::temp_dir().join("banger-prune-bench")
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
