//! The blob cache's promises: the seed's prune contract, and what banger adds to it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use banger_oci::cache::{CacheError, PruneError, PruneFs, PRUNING_MARKER};
use banger_oci::{BlobCache, Digest, PruneOptions, PruneTally};

struct Fixture {
    _dir: tempfile::TempDir,
    cache_root: PathBuf,
    cache: Arc<BlobCache>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cache_root = dir.path().join("cache").join("oci");
    let cache = BlobCache::new(cache_root.clone());
    Fixture {
        _dir: dir,
        cache_root,
        cache,
    }
}

/// Stores `content` through the verified write path and returns its digest.
fn put(cache: &Arc<BlobCache>, content: &[u8]) -> Digest {
    let digest = Digest::of(content);
    let mut writer = cache.writer(&digest, Some(content.len() as u64)).unwrap();
    writer.write_all(content).unwrap();
    writer.commit().unwrap();
    digest
}

/// [`put`], then [`age`] by `ago`.
fn put_aged(cache: &Arc<BlobCache>, content: &[u8], ago: Duration) -> Digest {
    let digest = put(cache, content);
    age(cache, &digest, ago);
    digest
}

/// Sets a blob's last use to `ago` in the past.
fn age(cache: &BlobCache, digest: &Digest, ago: Duration) {
    let when = SystemTime::now() - ago;
    let since_epoch = when.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let ts = rustix::fs::Timespec {
        tv_sec: since_epoch.as_secs() as i64,
        tv_nsec: since_epoch.subsec_nanos() as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        cache.blob_path(digest),
        &times,
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
}

/// What a prune reports having removed.
const fn removed(bytes: u64, blobs: u64) -> PruneTally {
    PruneTally { bytes, blobs }
}

/// Asserts the blobs `gone` were removed and the blobs `kept` were not.
fn assert_blobs(cache: &BlobCache, gone: &[&Digest], kept: &[&Digest]) {
    for digest in gone {
        assert!(!cache.blob_path(digest).exists(), "{digest} still stored");
    }
    for digest in kept {
        assert!(cache.blob_path(digest).exists(), "{digest} removed");
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn siblings_with_marker(root: &Path) -> Vec<String> {
    entries(root.parent().unwrap())
        .into_iter()
        .filter(|n| n.contains(PRUNING_MARKER))
        .collect()
}

const FULL: PruneOptions = PruneOptions {
    dry_run: false,
    keep_storage_bytes: None,
    older_than: None,
};
const DRY: PruneOptions = PruneOptions {
    dry_run: true,
    keep_storage_bytes: None,
    older_than: None,
};

#[test]
fn real_prune_empties_the_cache_recreates_it_and_leaves_no_aside() {
    let f = fixture();
    put(&f.cache, &[1u8; 1000]);
    put(&f.cache, &[2u8; 2000]);
    put(&f.cache, b"");
    let tally = f.cache.prune(FULL).unwrap();
    assert_eq!(tally, removed(3000, 3));
    assert!(f.cache_root.is_dir(), "cache dir must exist again");
    assert_eq!(entries(&f.cache_root), Vec::<String>::new());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&f.cache_root).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    assert_eq!(siblings_with_marker(&f.cache_root), Vec::<String>::new());
}

#[test]
fn dry_run_reports_the_size_and_leaves_every_blob() {
    let f = fixture();
    let a = put(&f.cache, &[1u8; 1234]);
    let b = put(&f.cache, &[2u8; 10]);
    let tally = f.cache.prune(DRY).unwrap();
    assert_eq!(tally, removed(1244, 2));
    assert_eq!(fs::read(f.cache.blob_path(&a)).unwrap(), vec![1u8; 1234]);
    assert_eq!(fs::read(f.cache.blob_path(&b)).unwrap(), vec![2u8; 10]);
}

#[test]
fn prune_missing_cache_dir_is_zero_not_error() {
    let f = fixture();
    assert_eq!(f.cache.prune(DRY).unwrap(), PruneTally::default());
    assert!(
        !f.cache_root.exists(),
        "a dry run must not create the cache"
    );
    assert_eq!(f.cache.prune(FULL).unwrap(), PruneTally::default());
    assert!(
        !f.cache_root.exists(),
        "nothing to prune means nothing touched"
    );
}

#[test]
fn every_non_directory_entry_counts_as_a_blob() {
    let f = fixture();
    put(&f.cache, &[7u8; 100]);
    fs::create_dir_all(f.cache_root.join("other/deeper")).unwrap();
    fs::write(f.cache_root.join("other/deeper/stray"), [0u8; 50]).unwrap();
    std::os::unix::fs::symlink("nowhere", f.cache_root.join("link")).unwrap();
    let dry = f.cache.prune(DRY).unwrap();
    assert_eq!(dry.blobs, 3);
    assert_eq!(dry.bytes, 100 + 50 + "nowhere".len() as u64);
    assert_eq!(f.cache.prune(FULL).unwrap(), dry);
}

struct FailingCreate {
    /// Also put a file where the cache was, so the restoring rename fails too.
    block_restore: bool,
}

impl PruneFs for FailingCreate {
    fn create_cache_dir(&self, path: &Path) -> io::Result<()> {
        if self.block_restore {
            fs::write(path, b"in the way").unwrap();
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "injected mkdir failure",
        ))
    }
}

/// A full prune whose recreation of the cache fails (and, with `block_restore`, whose
/// restore fails too): its error.
fn failed_prune(cache: &BlobCache, block_restore: bool) -> PruneError {
    cache
        .prune_with(FULL, &FailingCreate { block_restore })
        .unwrap_err()
}

#[test]
fn failed_recreate_restores_the_old_cache() {
    let f = fixture();
    let digest = put(&f.cache, &[3u8; 300]);
    let err = failed_prune(&f.cache, false);
    assert!(matches!(err, PruneError::Recreate(_)));
    assert_eq!(
        err.to_string(),
        "recreate oci cache: injected mkdir failure"
    );
    assert_eq!(
        fs::read(f.cache.blob_path(&digest)).unwrap(),
        vec![3u8; 300]
    );
    assert_eq!(siblings_with_marker(&f.cache_root), Vec::<String>::new());
}

#[test]
fn failed_recreate_and_failed_restore_name_both_errors_and_the_aside() {
    let f = fixture();
    put(&f.cache, &[3u8; 300]);
    let err = failed_prune(&f.cache, true);
    let message = err.to_string();
    let asides = siblings_with_marker(&f.cache_root);
    assert_eq!(asides.len(), 1, "the old cache must still exist aside");
    let aside = f.cache_root.parent().unwrap().join(&asides[0]);
    assert_eq!(
        message,
        format!(
            "recreate oci cache: injected mkdir failure (also failed to restore from {}: Not a directory (os error 20))",
            aside.display()
        )
    );
    let name = &asides[0];
    let suffix = name.strip_prefix(&format!("oci{PRUNING_MARKER}")).unwrap();
    assert_eq!(suffix.len(), 16);
    assert!(suffix.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn leftovers_of_a_crashed_prune_are_removed_and_counted_by_the_next_prune() {
    let f = fixture();
    put(&f.cache, &[1u8; 100]);
    let crashed = f
        .cache_root
        .with_file_name(format!("oci{PRUNING_MARKER}0123456789abcdef"));
    fs::create_dir_all(crashed.join("blobs/sha256")).unwrap();
    fs::write(crashed.join("blobs/sha256/old1"), [0u8; 4000]).unwrap();
    fs::write(crashed.join("blobs/sha256/old2"), [0u8; 96]).unwrap();
    assert_eq!(f.cache.prune(DRY).unwrap(), removed(4196, 3));
    assert!(crashed.exists(), "a dry run removes nothing");
    assert_eq!(f.cache.prune(FULL).unwrap(), removed(4196, 3));
    assert!(!crashed.exists());
    assert_eq!(siblings_with_marker(&f.cache_root), Vec::<String>::new());
}

#[test]
fn leftovers_are_removed_even_when_the_cache_itself_is_empty() {
    let f = fixture();
    let crashed = f
        .cache_root
        .with_file_name(format!("oci{PRUNING_MARKER}ffffffffffffffff"));
    fs::create_dir_all(&crashed).unwrap();
    fs::write(crashed.join("x"), [0u8; 10]).unwrap();
    assert_eq!(f.cache.remove_leftovers().unwrap(), removed(10, 1));
    assert!(!crashed.exists());
}

#[test]
fn older_than_removes_only_blobs_unused_for_that_long() {
    let f = fixture();
    let old = put_aged(&f.cache, &[1u8; 10], Duration::from_secs(8 * 86400));
    let older = put_aged(&f.cache, &[2u8; 20], Duration::from_secs(30 * 86400));
    let fresh = put_aged(&f.cache, &[3u8; 30], Duration::from_secs(3600));
    let options = PruneOptions {
        older_than: Some(Duration::from_secs(7 * 86400)),
        ..FULL
    };
    assert_eq!(
        f.cache
            .prune(PruneOptions {
                dry_run: true,
                ..options
            })
            .unwrap(),
        removed(30, 2)
    );
    assert_eq!(f.cache.prune(options).unwrap(), removed(30, 2));
    assert_blobs(&f.cache, &[&old, &older], &[&fresh]);
}

/// A full prune that keeps the most recently used blobs up to `bytes`.
fn keep_storage(bytes: u64) -> PruneOptions {
    PruneOptions {
        keep_storage_bytes: Some(bytes),
        ..FULL
    }
}

#[test]
fn keep_storage_keeps_the_most_recently_used_blobs_that_fit() {
    let f = fixture();
    let a = put(&f.cache, &[1u8; 100]); // oldest
    let b = put(&f.cache, &[2u8; 200]);
    let c = put(&f.cache, &[3u8; 300]);
    let d = put(&f.cache, &[4u8; 400]); // newest
    for (digest, days) in [(&a, 4), (&b, 3), (&c, 2), (&d, 1)] {
        age(&f.cache, digest, Duration::from_secs(days * 86400));
    }
    // 700 fits d + c; b and a must go.
    assert_eq!(f.cache.prune(keep_storage(700)).unwrap(), removed(300, 2));
    assert_blobs(&f.cache, &[&a, &b], &[&c, &d]);
}

#[test]
fn a_cache_hit_counts_as_a_use_for_selective_prunes() {
    let f = fixture();
    let used = put_aged(&f.cache, &[1u8; 100], Duration::from_secs(10 * 86400));
    let unused = put_aged(&f.cache, &[2u8; 100], Duration::from_secs(5 * 86400));
    assert!(f.cache.contains(&used));
    assert_eq!(f.cache.prune(keep_storage(100)).unwrap(), removed(100, 1));
    assert_blobs(&f.cache, &[&unused], &[&used]);
}

#[test]
fn keep_storage_and_older_than_together_remove_only_old_blobs_until_it_fits() {
    let f = fixture();
    let _old = put_aged(&f.cache, &[1u8; 100], Duration::from_secs(10 * 86400));
    let young = put(&f.cache, &[2u8; 1000]);
    let options = PruneOptions {
        older_than: Some(Duration::from_secs(86400)),
        ..keep_storage(0)
    };
    assert_eq!(f.cache.prune(options).unwrap(), removed(100, 1));
    assert!(f.cache.blob_path(&young).exists());
}

#[test]
fn a_leased_blob_survives_a_full_prune_in_place() {
    let f = fixture();
    let leased = put(&f.cache, &[1u8; 111]);
    let free = put(&f.cache, &[2u8; 222]);
    let lease = f.cache.lease([leased.clone()]);
    assert_eq!(f.cache.prune(DRY).unwrap(), removed(222, 1));
    assert_eq!(f.cache.prune(FULL).unwrap(), removed(222, 1));
    assert_eq!(
        fs::read(f.cache.blob_path(&leased)).unwrap(),
        vec![1u8; 111]
    );
    assert!(!f.cache.blob_path(&free).exists());
    assert_eq!(siblings_with_marker(&f.cache_root), Vec::<String>::new());
    drop(lease);
    assert_eq!(f.cache.prune(FULL).unwrap(), removed(111, 1));
}

#[test]
fn a_leased_blob_survives_a_selective_prune() {
    let f = fixture();
    let leased = put_aged(&f.cache, &[1u8; 111], Duration::from_secs(100 * 86400));
    let _lease = f.cache.lease([leased.clone()]);
    let options = PruneOptions {
        older_than: Some(Duration::from_secs(1)),
        ..keep_storage(0)
    };
    assert_eq!(f.cache.prune(options).unwrap(), PruneTally::default());
    assert!(f.cache.blob_path(&leased).exists());
}

#[test]
fn a_lease_on_a_blob_not_yet_written_lets_its_commit_land_after_a_prune() {
    let f = fixture();
    put(&f.cache, &[9u8; 10]);
    let content = [5u8; 4096];
    let digest = Digest::of(&content);
    let _lease = f.cache.lease([digest.clone()]);
    let mut writer = f.cache.writer(&digest, Some(4096)).unwrap();
    writer.write_all(&content[..2048]).unwrap();
    assert_eq!(f.cache.prune(FULL).unwrap(), removed(10, 1));
    writer.write_all(&content[2048..]).unwrap();
    writer.commit().unwrap();
    assert_eq!(
        fs::read(f.cache.blob_path(&digest)).unwrap(),
        content.to_vec()
    );
}

#[test]
fn nothing_unverified_is_ever_visible_under_a_digest() {
    let f = fixture();
    let digest = Digest::of(b"the real bytes");
    let mut writer = f.cache.writer(&digest, None).unwrap();
    writer.write_all(b"other bytes!!!").unwrap();
    let err = writer.commit().unwrap_err();
    assert!(matches!(err, CacheError::DigestMismatch { .. }));
    assert!(err.to_string().contains(&digest.to_string()), "{err}");
    assert!(!f.cache.blob_path(&digest).exists());
    // And no temp file either: the unnamed inode vanished with the writer.
    assert_eq!(
        entries(&f.cache_root.join("blobs/sha256")),
        Vec::<String>::new()
    );

    let mut short = f.cache.writer(&digest, Some(100)).unwrap();
    short.write_all(b"the real bytes").unwrap();
    let err = short.commit().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("blob {digest} has 14 bytes, expected 100")
    );
    assert!(!f.cache.blob_path(&digest).exists());
}

#[test]
fn a_dropped_writer_leaves_nothing_behind() {
    let f = fixture();
    let digest = Digest::of(b"abc");
    let mut writer = f.cache.writer(&digest, Some(3)).unwrap();
    writer.write_all(b"ab").unwrap();
    drop(writer);
    assert_eq!(
        entries(&f.cache_root.join("blobs/sha256")),
        Vec::<String>::new()
    );
    assert_eq!(f.cache.prune(DRY).unwrap(), PruneTally::default());
}

#[test]
fn committing_a_blob_twice_is_harmless() {
    let f = fixture();
    let first = put(&f.cache, b"same");
    let second = put(&f.cache, b"same");
    assert_eq!(first, second);
    assert_eq!(fs::read(f.cache.blob_path(&first)).unwrap(), b"same");
}

#[test]
fn large_directories_are_counted_and_removed_exactly() {
    // Above the size where inodes are read by several threads first.
    let f = fixture();
    let dir = f.cache_root.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    let mut bytes = 0;
    for i in 0..5000u64 {
        let size = i % 97;
        fs::write(dir.join(format!("{i:064x}")), vec![1u8; size as usize]).unwrap();
        bytes += size;
    }
    fs::create_dir_all(dir.join("nested")).unwrap();
    fs::write(dir.join("nested/one"), b"12345").unwrap();
    let expected = PruneTally {
        bytes: bytes + 5,
        blobs: 5001,
    };
    assert_eq!(f.cache.prune(DRY).unwrap(), expected);
    assert_eq!(f.cache.prune(FULL).unwrap(), expected);
    assert_eq!(entries(&f.cache_root), Vec::<String>::new());
    assert_eq!(siblings_with_marker(&f.cache_root), Vec::<String>::new());
}
