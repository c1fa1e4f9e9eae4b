//! The content-addressed blob cache: `<cache>/oci/blobs/sha256/<hex>`.
//!
//! The cache only saves re-downloads: every published image is independent of the blobs
//! that sourced it, so pruning can never break an image. Three rules keep it honest:
//!
//! * A blob becomes visible under its digest only after its sha256 and size matched: it is
//!   written to an unnamed `O_TMPFILE` inode inside the cache and linked into place once
//!   verified, so a crash mid-download leaves nothing behind, not even a temp file.
//! * Every hit records a use by setting the blob's mtime, which selective prunes sort on.
//! * A pull leases the blobs it is writing or about to read; prunes skip leased blobs. Leases
//!   live in the daemon's memory because the daemon is the only writer of the cache.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps, CWD, UTIME_OMIT};
use sha2::Digest as _;

use crate::digest::Digest;

/// Marks the sibling a full prune renames the cache to: `<cache>/oci.pruning-<16 hex>`.
pub const PRUNING_MARKER: &str = ".pruning-";

/// Errors of cache writes.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The bytes written do not hash to the digest they were written for.
    #[error("blob {expected} failed verification: content hashes to {actual}")]
    DigestMismatch {
        /// The digest the writer was opened for.
        expected: Digest,
        /// What the content actually hashed to.
        actual: Digest,
    },
    /// The number of bytes differs from the size the manifest promised.
    #[error("blob {digest} has {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Size from the manifest.
        expected: u64,
        /// Bytes actually written.
        actual: u64,
    },
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] banger_io::IoError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io(banger_io::IoError::new(what, path, source))
}

/// The blob cache rooted at `<cache>/oci`.
#[derive(Debug)]
pub struct BlobCache {
    root: PathBuf,
    /// Lease counts per blob. The same mutex serialises everything that must not interleave
    /// with a prune's rename-aside: linking a verified blob into place and opening one.
    leases: Mutex<HashMap<Digest, usize>>,
}

/// Blobs held against pruning until this value drops.
#[derive(Debug)]
pub struct Lease {
    cache: Arc<BlobCache>,
    digests: Vec<Digest>,
}

impl Lease {
    /// The leased digests.
    pub fn digests(&self) -> &[Digest] {
        &self.digests
    }

    /// Adds more blobs to this lease (e.g. layers learned after the manifest arrived).
    pub fn extend(&mut self, digests: impl IntoIterator<Item = Digest>) {
        let mut leases = self.cache.lock_leases();
        for digest in digests {
            *leases.entry(digest.clone()).or_default() += 1;
            self.digests.push(digest);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut leases = self.cache.lock_leases();
        for digest in &self.digests {
            if let Some(count) = leases.get_mut(digest) {
                *count -= 1;
                if *count == 0 {
                    leases.remove(digest);
                }
            }
        }
    }
}

/// What a prune should remove. The default removes every unleased blob.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneOptions {
    /// Count only; remove nothing.
    pub dry_run: bool,
    /// Keep the most recently used blobs whose sizes add up to at most this.
    pub keep_storage_bytes: Option<u64>,
    /// Remove only blobs whose last use is at least this long ago.
    pub older_than: Option<Duration>,
}

impl PruneOptions {
    fn is_selective(&self) -> bool {
        self.keep_storage_bytes.is_some() || self.older_than.is_some()
    }
}

/// What a prune removed (or, for a dry run, would remove).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneTally {
    /// Sum of the sizes of the removed entries.
    pub bytes: u64,
    /// Number of removed non-directory entries.
    pub blobs: u64,
}

impl PruneTally {
    fn add(&mut self, other: PruneTally) {
        self.bytes += other.bytes;
        self.blobs += other.blobs;
    }
}

/// Errors of a prune, worded after the step that failed (the seed's messages).
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// Walking the cache failed.
    #[error("inspect oci cache: {0}")]
    Inspect(#[source] io::Error),
    /// Renaming the cache aside failed.
    #[error("rename oci cache aside: {0}")]
    RenameAside(#[source] io::Error),
    /// Recreating the empty cache failed; the old one was put back.
    #[error("recreate oci cache: {0}")]
    Recreate(#[source] io::Error),
    /// Recreating failed and so did putting the old cache back.
    #[error("recreate oci cache: {error} (also failed to restore from {}: {restore_error})", aside.display())]
    RecreateAndRestore {
        /// Why recreating failed.
        error: io::Error,
        /// Where the old cache now is.
        aside: PathBuf,
        /// Why renaming it back failed.
        restore_error: io::Error,
    },
    /// Removing the renamed-aside cache failed part way.
    #[error("remove old oci cache ({}): {source}", aside.display())]
    RemoveAside {
        /// The aside directory.
        aside: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Removing a single blob during a selective prune failed.
    #[error("remove blob {}: {source}", path.display())]
    RemoveBlob {
        /// The blob.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The filesystem steps a full prune performs that tests need to make fail. Production code
/// uses [`RealFs`]; nothing else implements this outside tests.
pub trait PruneFs {
    /// Creates the empty cache directory (mode 0755) after the old one was renamed aside.
    fn create_cache_dir(&self, path: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl PruneFs for RealFs {
    fn create_cache_dir(&self, path: &Path) -> io::Result<()> {
        fs::DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(path)
    }
}

use std::os::unix::fs::DirBuilderExt;

impl BlobCache {
    /// A cache rooted at `root` (normally `<cache>/oci`). Nothing is created until needed.
    pub fn new(root: PathBuf) -> Arc<BlobCache> {
        Arc::new(BlobCache {
            root,
            leases: Mutex::new(HashMap::new()),
        })
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    /// Where the blob with `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    fn lock_leases(&self) -> MutexGuard<'_, HashMap<Digest, usize>> {
        // A panic while holding this lock cannot leave the map half-updated in a way that
        // matters more than losing the daemon, so poisoning is ignored.
        self.leases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Holds `digests` against every prune until the returned lease drops.
    pub fn lease(self: &Arc<Self>, digests: impl IntoIterator<Item = Digest>) -> Lease {
        let mut lease = Lease {
            cache: Arc::clone(self),
            digests: Vec::new(),
        };
        lease.extend(digests);
        lease
    }

    /// Whether `digest` is leased right now.
    pub fn is_leased(&self, digest: &Digest) -> bool {
        self.lock_leases().contains_key(digest)
    }

    /// Whether the blob is cached; a hit counts as a use.
    pub fn contains(&self, digest: &Digest) -> bool {
        let _guard = self.lock_leases();
        let path = self.blob_path(digest);
        touch(&path).is_ok()
    }

    /// Opens a cached blob for reading; counts as a use.
    pub fn open(&self, digest: &Digest) -> io::Result<File> {
        let _guard = self.lock_leases();
        let path = self.blob_path(digest);
        let file = File::open(&path)?;
        // A failed touch only makes selective prunes think the blob is older than it is.
        let _ = touch_fd(&file);
        Ok(file)
    }

    /// Starts writing the blob `digest`; see [`BlobWriter::commit`].
    pub fn writer(
        self: &Arc<Self>,
        digest: &Digest,
        expected_size: Option<u64>,
    ) -> io::Result<BlobWriter> {
        let file = self.tmpfile()?;
        Ok(BlobWriter {
            cache: Arc::clone(self),
            file: Some(io::BufWriter::with_capacity(1 << 20, file)),
            hasher: sha2::Sha256::new(),
            written: 0,
            target: Target::Named {
                digest: digest.clone(),
                expected_size,
            },
        })
    }

    /// Removes blobs as `options` say and returns exactly what was removed. Leased blobs
    /// always stay. Leftover `<cache>.pruning-*` siblings from a crashed prune are removed
    /// (and counted) by every prune that is not a dry run, and counted by dry runs.
    pub fn prune(&self, options: PruneOptions) -> Result<PruneTally, PruneError> {
        self.prune_with(options, &RealFs)
    }

    /// [`BlobCache::prune`] with the filesystem steps of `fs`.
    pub fn prune_with(
        &self,
        options: PruneOptions,
        fs_ops: &dyn PruneFs,
    ) -> Result<PruneTally, PruneError> {
        let leftovers = self.leftover_asides().map_err(PruneError::Inspect)?;
        let mut tally = PruneTally::default();
        if options.dry_run {
            for aside in &leftovers {
                tally.add(tally_tree(aside).map_err(PruneError::Inspect)?);
            }
            tally.add(if options.is_selective() {
                self.selective_dry_run(options)
                    .map_err(PruneError::Inspect)?
            } else {
                self.full_dry_run().map_err(PruneError::Inspect)?
            });
            return Ok(tally);
        }
        for aside in leftovers {
            tally.add(
                remove_tree_counting(&aside).map_err(|source| PruneError::RemoveAside {
                    aside: aside.clone(),
                    source,
                })?,
            );
        }
        tally.add(if options.is_selective() {
            self.selective_prune(options)?
        } else {
            self.full_prune(fs_ops)?
        });
        Ok(tally)
    }

    /// Removes `<cache>.pruning-*` siblings left by a prune that crashed mid-way. Called at
    /// daemon start-up; returns what they held.
    pub fn remove_leftovers(&self) -> Result<PruneTally, PruneError> {
        let mut tally = PruneTally::default();
        for aside in self.leftover_asides().map_err(PruneError::Inspect)? {
            tally.add(
                remove_tree_counting(&aside).map_err(|source| PruneError::RemoveAside {
                    aside: aside.clone(),
                    source,
                })?,
            );
        }
        Ok(tally)
    }

    fn leftover_asides(&self) -> io::Result<Vec<PathBuf>> {
        let (Some(parent), Some(name)) = (self.root.parent(), self.root.file_name()) else {
            return Ok(Vec::new());
        };
        let mut prefix = name.as_bytes().to_vec();
        prefix.extend_from_slice(PRUNING_MARKER.as_bytes());
        let Some(entries) = read_dir_if_present(parent)? else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry?;
            if entry.file_name().as_bytes().starts_with(&prefix) {
                found.push(entry.path());
            }
        }
        Ok(found)
    }

    fn full_dry_run(&self) -> io::Result<PruneTally> {
        let leased = self.leased_paths();
        tally_tree_skipping(&self.root, &leased)
    }

    /// The seed's algorithm, reordered so the cache is usable at once and the tally is exact:
    /// rename the cache aside and recreate it empty first (constant time, under the lease
    /// lock so no commit or open interleaves), move leased blobs back, then count what is
    /// deleted while deleting it. A blob that lands mid-prune lands in the new cache and is
    /// neither removed nor counted.
    fn full_prune(&self, fs_ops: &dyn PruneFs) -> Result<PruneTally, PruneError> {
        let aside = {
            let leases = self.lock_leases();
            match has_any_entry(&self.root) {
                Ok(false) => return Ok(PruneTally::default()),
                Ok(true) => {}
                Err(e) => return Err(PruneError::Inspect(e)),
            }
            let aside = aside_path(&self.root);
            if let Err(e) = fs::rename(&self.root, &aside) {
                if e.kind() == io::ErrorKind::NotFound {
                    return Ok(PruneTally::default());
                }
                return Err(PruneError::RenameAside(e));
            }
            if let Err(error) = fs_ops.create_cache_dir(&self.root) {
                return Err(match fs::rename(&aside, &self.root) {
                    Ok(()) => PruneError::Recreate(error),
                    Err(restore_error) => PruneError::RecreateAndRestore {
                        error,
                        aside,
                        restore_error,
                    },
                });
            }
            // Leased blobs go back before anyone can notice they were gone: commits and
            // opens wait on the lock we hold.
            let aside_blobs = aside.join("blobs").join("sha256");
            let mut made_blobs_dir = false;
            for digest in leases.keys() {
                let from = aside_blobs.join(digest.hex());
                if fs::symlink_metadata(&from).is_err() {
                    continue;
                }
                if !made_blobs_dir {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .recursive(true)
                        .create(self.blobs_dir())
                        .map_err(PruneError::Recreate)?;
                    made_blobs_dir = true;
                }
                fs::rename(&from, self.blob_path(digest)).map_err(PruneError::Recreate)?;
            }
            aside
        };
        remove_tree_counting(&aside).map_err(|source| PruneError::RemoveAside { aside, source })
    }

    fn leased_paths(&self) -> Vec<PathBuf> {
        self.lock_leases()
            .keys()
            .map(|d| self.blob_path(d))
            .collect()
    }

    fn selective_candidates(&self, options: PruneOptions) -> io::Result<Vec<BlobUse>> {
        let mut blobs = list_blob_uses(&self.root)?;
        // Oldest first: those go first.
        blobs.sort_by(|a, b| {
            a.last_used
                .cmp(&b.last_used)
                .then_with(|| a.path.cmp(&b.path))
        });
        let now = SystemTime::now();
        let mut remaining: u64 = blobs.iter().map(|b| b.size).sum();
        let leased = self.leased_paths();
        let mut chosen = Vec::new();
        for blob in blobs {
            if leased.contains(&blob.path) {
                continue;
            }
            let old_enough = match options.older_than {
                Some(age) => now.duration_since(blob.last_used).unwrap_or_default() >= age,
                None => true,
            };
            if !old_enough {
                continue;
            }
            if let Some(keep) = options.keep_storage_bytes {
                if remaining <= keep {
                    break;
                }
            }
            remaining -= blob.size;
            chosen.push(blob);
        }
        Ok(chosen)
    }

    fn selective_dry_run(&self, options: PruneOptions) -> io::Result<PruneTally> {
        let chosen = self.selective_candidates(options)?;
        Ok(PruneTally {
            bytes: chosen.iter().map(|b| b.size).sum(),
            blobs: chosen.len() as u64,
        })
    }

    fn selective_prune(&self, options: PruneOptions) -> Result<PruneTally, PruneError> {
        let chosen = self
            .selective_candidates(options)
            .map_err(PruneError::Inspect)?;
        let mut tally = PruneTally::default();
        for blob in chosen {
            // Re-check under the lock: a pull may have leased the blob since we listed it.
            let leases = self.lock_leases();
            let leased = blob
                .path
                .file_name()
                .and_then(OsStr::to_str)
                .and_then(|hex| Digest::from_sha256_hex(hex).ok())
                .is_some_and(|digest| leases.contains_key(&digest));
            if leased {
                continue;
            }
            match fs::remove_file(&blob.path) {
                Ok(()) => tally.add(PruneTally {
                    bytes: blob.size,
                    blobs: 1,
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PruneError::RemoveBlob {
                        path: blob.path,
                        source,
                    })
                }
            }
        }
        Ok(tally)
    }
}

/// A blob being written. Bytes are hashed as they pass; [`BlobWriter::commit`] makes the
/// blob visible only if they match.
#[derive(Debug)]
pub struct BlobWriter {
    cache: Arc<BlobCache>,
    /// `None` once an uncompressed copy stopped being written (see [`Target::Uncompressed`]).
    file: Option<io::BufWriter<File>>,
    hasher: sha2::Sha256,
    written: u64,
    target: Target,
}

/// What a [`BlobWriter`] is writing.
#[derive(Debug)]
enum Target {
    /// A blob named by a digest someone else claimed (a registry, a manifest): verified
    /// against it, and against the promised size, before it becomes visible.
    Named {
        digest: Digest,
        expected_size: Option<u64>,
    },
    /// The decompressed copy of the verified blob `of`, named by what it hashes to. Its
    /// writes never fail: the copy is an optimisation, while the hash is what verifies the
    /// layer against the image's diff_id, so a full disk or an oversized copy only stops
    /// the copy (`file` becomes `None`) and hashing goes on.
    Uncompressed {
        /// `None` for a writer that only hashes (a layer that is not in the cache).
        of: Option<Digest>,
        /// The digest the image's config claims for it; a copy hashing to anything else is
        /// not kept.
        expected: Option<Digest>,
        /// Copies bigger than this are not kept.
        max_bytes: u64,
        /// Where the hash of everything written goes once the stream ended.
        seen: Arc<std::sync::OnceLock<Digest>>,
    },
}

/// The extended attribute on a compressed layer blob naming the digest of its
/// decompressed copy. The uncompressed cache is keyed by this, which banger itself wrote
/// after decoding the blob and hashing the result, and never by an image config's
/// `diff_id`: a config naming another image's diff_id must not get that image's files.
const UNCOMPRESSED_XATTR: &str = "user.banger.uncompressed";

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.target {
            Target::Named { .. } => {
                let file = self.file.as_mut().expect("named blobs always have a file");
                let n = file.write(buf)?;
                self.hasher.update(&buf[..n]);
                self.written += n as u64;
                Ok(n)
            }
            Target::Uncompressed { max_bytes, .. } => {
                self.hasher.update(buf);
                self.written += buf.len() as u64;
                if self.written > *max_bytes {
                    self.file = None;
                }
                if let Some(file) = self.file.as_mut() {
                    if let Err(e) = file.write_all(buf) {
                        tracing::debug!(error = %e, "not caching the uncompressed layer");
                        self.file = None;
                    }
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match (&self.target, self.file.as_mut()) {
            (Target::Named { .. }, Some(file)) => file.flush(),
            (_, Some(file)) => {
                if file.flush().is_err() {
                    self.file = None;
                }
                Ok(())
            }
            (_, None) => Ok(()),
        }
    }
}

impl BlobCache {
    /// Starts writing the decompressed copy of the cached blob `of`, which the image
    /// config says hashes to `expected`. See [`BlobWriter::commit`]; the hash of every byte
    /// written lands in `seen` when the copy is committed, whether or not it was kept.
    pub fn uncompressed_writer(
        self: &Arc<Self>,
        of: &Digest,
        expected: Option<&Digest>,
        max_bytes: u64,
        seen: Arc<std::sync::OnceLock<Digest>>,
    ) -> BlobWriter {
        let file = self
            .tmpfile()
            .map_err(|e| tracing::debug!(error = %e, "not caching the uncompressed layer"))
            .ok();
        BlobWriter {
            cache: Arc::clone(self),
            file: file.map(|f| io::BufWriter::with_capacity(1 << 20, f)),
            hasher: sha2::Sha256::new(),
            written: 0,
            target: Target::Uncompressed {
                of: Some(of.clone()),
                expected: expected.cloned(),
                max_bytes,
                seen,
            },
        }
    }

    /// A writer that keeps nothing and only hashes, for verifying the decompressed stream
    /// of a layer that is not in the cache (an import) against its `expected` diff_id. Its
    /// commit reports the hash to `seen` and fails when it is not `expected`.
    pub fn hashing_writer(
        self: &Arc<Self>,
        expected: &Digest,
        seen: Arc<std::sync::OnceLock<Digest>>,
    ) -> BlobWriter {
        BlobWriter {
            cache: Arc::clone(self),
            file: None,
            hasher: sha2::Sha256::new(),
            written: 0,
            target: Target::Uncompressed {
                of: None,
                expected: Some(expected.clone()),
                max_bytes: 0,
                seen,
            },
        }
    }

    /// The digest of the decompressed copy banger made of the cached blob `of`, when it
    /// made one (the copy itself may have been pruned since).
    pub fn uncompressed_of(&self, of: &Digest) -> Option<Digest> {
        let _guard = self.lock_leases();
        let mut value = [0u8; 80];
        let n = rustix::fs::getxattr(self.blob_path(of), UNCOMPRESSED_XATTR, &mut value).ok()?;
        std::str::from_utf8(&value[..n]).ok()?.parse().ok()
    }

    fn tmpfile(&self) -> io::Result<File> {
        let dir = self.blobs_dir();
        // Under the lock: a prune renaming the cache aside between creating the directory
        // and opening the temp file in it would make the open fail.
        let _guard = self.lock_leases();
        fs::DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(&dir)?;
        let fd = rustix::fs::open(
            &dir,
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        Ok(File::from(fd))
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// A read-only descriptor of the unfinished blob, for a reader that follows the writer
    /// (with positioned reads, up to what [`flush`](Write::flush) has pushed out). It reads
    /// unverified bytes: only for data whose source was verified, such as the decompressed
    /// copy of a verified blob.
    pub fn read_handle(&self) -> io::Result<File> {
        let file = self.file.as_ref().ok_or_else(|| {
            io::Error::other("the uncompressed copy could not be written to the cache")
        })?;
        let proc_path = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(file.get_ref())
        );
        File::open(proc_path)
    }

    /// Whether every byte so far went to the file (an uncompressed copy stops being written
    /// when the disk fills or it outgrows its cap; a follower of it must then stop).
    pub fn is_complete(&self) -> bool {
        self.file.is_some()
    }

    /// The sha256 of everything written so far, without finishing.
    pub fn digest_so_far(&self) -> Digest {
        digest_of_hasher(self.hasher.clone())
    }

    /// Verifies size and sha256 and links the blob into place. On a mismatch the unnamed
    /// file is dropped and nothing appears under the digest. A blob that another writer
    /// committed first is fine: same digest, same bytes.
    ///
    /// An uncompressed copy is linked under what it hashes to (reported to its `seen`
    /// first), and only if that is the digest its image expects; the compressed blob it
    /// came from is then marked with it (see [`BlobCache::uncompressed_of`]).
    pub fn commit(self) -> Result<PathBuf, CacheError> {
        let BlobWriter {
            cache,
            file,
            hasher,
            written,
            target,
        } = self;
        let actual = digest_of_hasher(hasher);
        let digest = match target {
            Target::Named {
                digest,
                expected_size,
            } => {
                if let Some(expected) = expected_size {
                    if expected != written {
                        return Err(CacheError::SizeMismatch {
                            digest,
                            expected,
                            actual: written,
                        });
                    }
                }
                if actual != digest {
                    return Err(CacheError::DigestMismatch {
                        expected: digest,
                        actual,
                    });
                }
                digest
            }
            Target::Uncompressed {
                of, expected, seen, ..
            } => {
                let _ = seen.set(actual.clone());
                if let Some(expected) = expected.filter(|e| *e != actual) {
                    return Err(CacheError::DigestMismatch { expected, actual });
                }
                let Some(of) = of else {
                    return Ok(cache.blob_path(&actual));
                };
                let Some(file) = file else {
                    return Err(CacheError::Io(banger_io::IoError::new(
                        "keep uncompressed copy",
                        cache.blob_path(&actual),
                        io::Error::other("the copy was not written in full"),
                    )));
                };
                let target = link_verified(&cache, file, &actual)?;
                let _guard = cache.lock_leases();
                rustix::fs::setxattr(
                    cache.blob_path(&of),
                    UNCOMPRESSED_XATTR,
                    actual.to_string().as_bytes(),
                    rustix::fs::XattrFlags::empty(),
                )
                .map_err(|errno| {
                    CacheError::Io(banger_io::IoError::new(
                        "record the uncompressed copy of",
                        cache.blob_path(&of),
                        errno.into(),
                    ))
                })?;
                return Ok(target);
            }
        };
        let file = file.expect("named blobs always have a file");
        link_verified(&cache, file, &digest)
    }
}

fn digest_of_hasher(hasher: sha2::Sha256) -> Digest {
    Digest::from_sha256_hex(&hex::encode(hasher.finalize()))
        .expect("sha256 output is 64 hex characters")
}

/// Links the verified unnamed `file` into the cache as `digest`.
fn link_verified(
    cache: &Arc<BlobCache>,
    file: io::BufWriter<File>,
    digest: &Digest,
) -> Result<PathBuf, CacheError> {
    let target = cache.blob_path(digest);
    let file = file
        .into_inner()
        .map_err(|e| e.into_error())
        .map_err(io_err("write blob", &target))?;
    // Linking an O_TMPFILE by name needs either CAP_DAC_READ_SEARCH (AT_EMPTY_PATH) or
    // the /proc magic link; the latter works unprivileged.
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    let _guard = cache.lock_leases();
    let link = |target: &Path| {
        rustix::fs::linkat(
            CWD,
            proc_path.as_str(),
            CWD,
            target,
            AtFlags::SYMLINK_FOLLOW,
        )
    };
    let result = match link(&target) {
        Err(rustix::io::Errno::NOENT) => {
            // A prune recreated the cache without the blobs directory.
            fs::DirBuilder::new()
                .mode(0o755)
                .recursive(true)
                .create(cache.blobs_dir())
                .map_err(io_err("create blob directory", &target))?;
            link(&target)
        }
        other => other,
    };
    match result {
        Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(target),
        Err(errno) => Err(CacheError::Io(banger_io::IoError::new(
            "link verified blob",
            target,
            errno.into(),
        ))),
    }
}

struct BlobUse {
    path: PathBuf,
    size: u64,
    last_used: SystemTime,
}

/// The entries of `dir`; `None` when there is no `dir` (a cache not made yet, or
/// removed meanwhile, holds nothing).
fn read_dir_if_present(dir: &Path) -> io::Result<Option<fs::ReadDir>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(Some(entries)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn list_blob_uses(root: &Path) -> io::Result<Vec<BlobUse>> {
    let dir = root.join("blobs").join("sha256");
    let Some(entries) = read_dir_if_present(&dir)? else {
        return Ok(Vec::new());
    };
    let mut uses = Vec::new();
    for entry in entries {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            continue;
        }
        uses.push(BlobUse {
            path: entry.path(),
            size: meta.len(),
            last_used: meta.modified()?,
        });
    }
    Ok(uses)
}

/// mtime = now, atime untouched: the cache's record of a use.
fn use_timestamps() -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
    }
}

/// Records a use of the blob at `path`.
fn touch(path: &Path) -> io::Result<()> {
    rustix::fs::utimensat(CWD, path, &use_timestamps(), AtFlags::empty())?;
    Ok(())
}

/// Records a use of an open blob.
fn touch_fd(file: &File) -> io::Result<()> {
    rustix::fs::futimens(file.as_fd(), &use_timestamps())?;
    Ok(())
}

fn aside_path(root: &Path) -> PathBuf {
    let suffix: [u8; 8] = rand::random();
    let mut name = root.as_os_str().to_owned();
    name.push(PRUNING_MARKER);
    name.push(hex::encode(suffix));
    PathBuf::from(name)
}

fn has_any_entry(dir: &Path) -> io::Result<bool> {
    match read_dir_if_present(dir)? {
        Some(mut entries) => Ok(entries.next().transpose()?.is_some()),
        None => Ok(false),
    }
}

/// Counts non-directory entries and their sizes; a missing root counts as empty.
pub fn tally_tree(root: &Path) -> io::Result<PruneTally> {
    tally_tree_skipping(root, &[])
}

fn tally_tree_skipping(root: &Path, skip: &[PathBuf]) -> io::Result<PruneTally> {
    let mut tally = PruneTally::default();
    let skip_names: Vec<(&Path, &OsStr)> = skip
        .iter()
        .filter_map(|p| Some((p.parent()?, p.file_name()?)))
        .collect();
    walk_tree(root, Visit::Count, &mut |dir, name, size| {
        let skipped = skip_names.iter().any(|(d, n)| *n == name && *d == dir);
        if !skipped {
            tally.add(PruneTally {
                bytes: size,
                blobs: 1,
            });
        }
    })?;
    Ok(tally)
}

/// Removes `root` recursively, counting every non-directory entry removed.
fn remove_tree_counting(root: &Path) -> io::Result<PruneTally> {
    let mut tally = PruneTally::default();
    walk_tree(root, Visit::Remove, &mut |_, _, size| {
        tally.add(PruneTally {
            bytes: size,
            blobs: 1,
        })
    })?;
    Ok(tally)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Visit {
    Count,
    Remove,
}

/// The directory `name` in `dir`, not following a link; `None` when it is gone (another
/// prune, or the daemon, removed it mid-walk).
#[inline(always)]
fn open_dir_if_present<P: rustix::path::Arg>(
    dir: impl AsFd,
    name: P,
) -> io::Result<Option<rustix::fd::OwnedFd>> {
    match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Walks `root` with directory file descriptors, reporting every non-directory entry's
/// size, and in [`Visit::Remove`] mode unlinking each one (and then the directories).
///
/// Entries are visited in inode order, as GNU `rm` and `du` do for large directories: on a
/// cold cache it turns 100,000 scattered inode-table reads into a sequential sweep. A missing
/// root is empty; entries that vanish mid-walk are skipped.
fn walk_tree(
    root: &Path,
    visit: Visit,
    on_file: &mut dyn FnMut(&Path, &OsStr, u64),
) -> io::Result<()> {
    let Some(dir) = open_dir_if_present(CWD, root)? else {
        return Ok(());
    };
    walk_dir(dir, root, visit, on_file)?;
    if visit == Visit::Remove {
        match fs::remove_dir(root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

fn walk_dir(
    dir: rustix::fd::OwnedFd,
    path: &Path,
    visit: Visit,
    on_file: &mut dyn FnMut(&Path, &OsStr, u64),
) -> io::Result<()> {
    use rustix::fs::FileType;

    let mut entries: Vec<(u64, FileType, std::ffi::CString)> = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        entries.push((entry.ino(), entry.file_type(), name.to_owned()));
    }
    entries.sort_unstable_by_key(|(ino, _, _)| *ino);
    if entries.len() >= PARALLEL_STAT_THRESHOLD {
        return visit_large_dir(&dir, path, entries, visit, on_file);
    }
    for (_, file_type, name) in entries {
        if let Some((size, is_dir)) = stat_entry(&dir, &name, file_type)? {
            visit_entry(&dir, path, &name, size, is_dir, visit, on_file)?;
        }
    }
    Ok(())
}

/// The size of `name` in `dir` and whether it is a directory (`file_type` from readdir,
/// or the inode's own type where readdir says Unknown); `None` when it is gone already.
// Inlined: called once per cache entry (100,000s in a prune); as a call it cost the
// prune bench 5-10 % against rm -rf.
#[inline(always)]
fn stat_entry(
    dir: &rustix::fd::OwnedFd,
    name: &std::ffi::CStr,
    file_type: rustix::fs::FileType,
) -> io::Result<Option<(u64, bool)>> {
    use rustix::fs::{FileType, StatxFlags};

    let stat = match rustix::fs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::TYPE | StatxFlags::SIZE,
    ) {
        Ok(stat) => stat,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let is_dir = if file_type == FileType::Unknown {
        FileType::from_raw_mode(stat.stx_mode.into()) == FileType::Directory
    } else {
        file_type == FileType::Directory
    };
    Ok(Some((stat.stx_size, is_dir)))
}

/// One entry of `dir` (at `path`), stat'ed: a directory is walked (and removed after,
/// for [`Visit::Remove`]); a file is removed (for [`Visit::Remove`]) and reported to
/// `on_file` with `size`. An entry gone meanwhile is not ours to count: skipped.
// Inlined for the same reason as stat_entry.
#[inline(always)]
fn visit_entry(
    dir: &rustix::fd::OwnedFd,
    path: &Path,
    name: &std::ffi::CStr,
    size: u64,
    is_dir: bool,
    visit: Visit,
    on_file: &mut dyn FnMut(&Path, &OsStr, u64),
) -> io::Result<()> {
    let os_name = OsStr::from_bytes(name.to_bytes());
    if is_dir {
        let Some(child) = open_dir_if_present(dir, name)? else {
            return Ok(());
        };
        walk_dir(child, &path.join(os_name), visit, on_file)?;
        if visit == Visit::Remove {
            match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(());
    }
    if visit == Visit::Remove {
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    on_file(path, os_name, size);
    Ok(())
}

/// Directories with at least this many entries have their inodes read (statx) by several
/// threads before anything else happens: on a cold page cache the inode reads dominate, and
/// keeping more than one in flight is what lets a dry run beat `du` and a prune keep up with
/// `rm -rf` (whose unlinks then find every inode already in memory).
const PARALLEL_STAT_THRESHOLD: usize = 4096;

type DirEntryRecord = (u64, rustix::fs::FileType, std::ffi::CString);

/// (chunk, offset in chunk, size, is a directory) for one counted entry.
type CountedEntry = (usize, usize, u64, bool);

fn visit_large_dir(
    dir: &rustix::fd::OwnedFd,
    path: &Path,
    entries: Vec<DirEntryRecord>,
    visit: Visit,
    on_file: &mut dyn FnMut(&Path, &OsStr, u64),
) -> io::Result<()> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8);
    // Interleaved chunks keep every thread near the same region of the inode table, so the
    // reads stay close to sequential.
    let chunk = 256;
    let chunks: Vec<&[DirEntryRecord]> = entries.chunks(chunk).collect();
    let results: Vec<io::Result<Vec<CountedEntry>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                let chunks = &chunks;
                scope.spawn(move || {
                    let mut found = Vec::new();
                    for (chunk_index, chunk) in
                        chunks.iter().enumerate().skip(worker).step_by(workers)
                    {
                        for (offset, (_, file_type, name)) in chunk.iter().enumerate() {
                            if let Some((size, is_dir)) = stat_entry(dir, name, *file_type)? {
                                found.push((chunk_index, offset, size, is_dir));
                            }
                        }
                    }
                    Ok(found)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("count worker panicked"))
            .collect()
    });
    let mut found = Vec::with_capacity(entries.len());
    for result in results {
        found.extend(result?);
    }
    // Back to inode order for the unlinks, which write the inode table and bitmaps.
    found.sort_unstable_by_key(|(chunk_index, offset, _, _)| (*chunk_index, *offset));
    for (chunk_index, offset, size, is_dir) in found {
        let name = &chunks[chunk_index][offset].2;
        visit_entry(dir, path, name, size, is_dir, visit, on_file)?;
    }
    Ok(())
}
