//! Replays OCI image layers, oldest first, into a staging directory that the rootfs
//! builder turns into an ext4 image.
//!
//! Layers are untrusted input. Every filesystem operation is relative to a directory fd
//! reached without the kernel following symlinks (see `resolve`), so no entry name, symlink
//! or hard link in any layer can make us write outside the staging directory; such entries
//! are refused with an error naming the layer digest and the entry.
//!
//! Semantics follow the OCI image spec's changeset rules: `.wh.NAME` removes `NAME` from
//! lower layers, `.wh..wh..opq` hides a directory's lower-layer content, and whiteouts never
//! affect entries their own layer adds (whatever the order inside the tar).
//!
//! When not running as root (or when [`Privilege::Unprivileged`] is forced) we cannot chown,
//! create device nodes or set `security.*`/`trusted.*` xattrs, so the true ownership, modes,
//! device numbers and xattrs go into [`FlattenedTree::metadata`] for the rootfs builder to
//! apply inside the filesystem image instead.

mod decompress;
mod error;
mod resolve;

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;

use crate::digest::Digest;
use error::{errno_problem, io_problem};
pub use error::{EntryProblem, FlattenError, LayerProblem};

/// Decompresses a whole layer blob into `out` (compression chosen as the flattener would),
/// refusing to produce more than `limit` bytes. For decoding a later layer ahead, on another
/// core, into its uncompressed cache copy while an earlier one is being flattened.
pub fn decompress_layer(
    blob: impl std::io::Read,
    media_type: &str,
    out: &mut impl std::io::Write,
    limit: u64,
) -> std::io::Result<u64> {
    let (decoded, _) = decompress::open(blob, media_type)?;
    let mut capped = std::io::Read::take(decoded, limit.saturating_add(1));
    let copied = std::io::copy(&mut capped, out)?;
    if copied > limit {
        return Err(std::io::Error::other(format!(
            "uncompressed size limit of {limit} bytes exceeded"
        )));
    }
    Ok(copied)
}
use resolve::{join, lossy, normalize, ResolveError, Resolver};

/// Bounds on what one image may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlattenLimits {
    /// Maximum decompressed tar bytes over all layers of the image (headers included).
    /// The defence against decompression bombs: a few KiB of gzip can claim terabytes.
    pub max_uncompressed_bytes: u64,
    /// Maximum tar entries over all layers of the image.
    pub max_entries: u64,
}

impl Default for FlattenLimits {
    fn default() -> Self {
        // Far above any real dev image (a fat CUDA image is ~20 GiB unpacked), far below
        // what would hurt the host.
        FlattenLimits {
            max_uncompressed_bytes: 64 << 30,
            max_entries: 4_000_000,
        }
    }
}

/// Whether ownership, device nodes and privileged xattrs are applied natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Privilege {
    /// Native when the effective uid is 0, recorded otherwise.
    #[default]
    Detect,
    /// Always native; [`Flattener::new`] fails when not root.
    Privileged,
    /// Always recorded in [`FlattenedTree::metadata`], even as root (tests use this to
    /// exercise the unprivileged path).
    Unprivileged,
}

/// Options for [`Flattener::new`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FlattenOptions {
    /// See [`Privilege`].
    pub privilege: Privilege,
    /// See [`FlattenLimits`].
    pub limits: FlattenLimits,
}

/// The file type of a tree entry as the image defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A character device. In unprivileged mode the staging tree holds an empty regular
    /// file in its place.
    CharDevice {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// A block device; staged like [`EntryKind::CharDevice`].
    BlockDevice {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

impl EntryKind {
    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            EntryKind::File => 0o100000,
            EntryKind::Directory => 0o040000,
            EntryKind::Symlink => 0o120000,
            EntryKind::Fifo => 0o010000,
            EntryKind::CharDevice { .. } => 0o020000,
            EntryKind::BlockDevice { .. } => 0o060000,
        }
    }
}

/// The attributes an entry must end up with in the root filesystem, for those the staging
/// tree could not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMetadata {
    /// What the entry is.
    pub kind: EntryKind,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits including setuid, setgid and sticky (no file type bits).
    pub mode: u32,
    /// Extended attributes (name, value), e.g. `security.capability`.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// What one [`Flattener::apply_layer`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Tar entries processed (whiteouts included).
    pub entries: u64,
    /// Whiteout and opaque markers among them.
    pub whiteouts: u64,
    /// Decompressed tar bytes read.
    pub uncompressed_bytes: u64,
    /// Regular file content bytes written.
    pub file_bytes: u64,
}

/// The result of flattening: a staging directory ready for the rootfs builder.
#[derive(Debug)]
pub struct FlattenedTree {
    /// The staging directory; the image root.
    pub root: PathBuf,
    /// Whether ownership and device nodes were applied natively.
    pub privileged: bool,
    /// Estimated bytes of data blocks the tree needs: regular files rounded up to 4 KiB
    /// (hard links counted once) plus a block per directory and long symlink.
    pub content_bytes: u64,
    /// Names in the tree, the root excluded.
    pub entries: u64,
    /// Distinct inodes in the tree, the root excluded.
    pub inodes: u64,
    /// Attributes the rootfs builder must apply inside the filesystem image, keyed by path
    /// relative to the root (the empty path is the root itself). Unprivileged: every entry.
    /// Privileged: only what the staging filesystem refused (xattrs on symlinks, fifos and
    /// devices, or xattr namespaces it does not support).
    pub metadata: BTreeMap<PathBuf, EntryMetadata>,
    root_fd: OwnedFd,
}

/// Replays layers into a staging directory. Create with [`Flattener::new`], feed layers
/// oldest first with [`apply_layer`](Self::apply_layer), then [`finish`](Self::finish).
/// After an error the staging tree is half-applied: [`discard`](Self::discard) it.
pub struct Flattener {
    staging: PathBuf,
    resolver: Resolver,
    privileged: bool,
    limits: FlattenLimits,
    uncompressed: u64,
    entries: u64,
    /// Side table, keyed by symlink-free root-relative path.
    metadata: BTreeMap<Vec<u8>, EntryMetadata>,
    /// Directory mtimes, applied in [`finish`](Self::finish) because writing into a
    /// directory bumps its mtime.
    dir_mtimes: BTreeMap<Vec<u8>, Timespec>,
    /// Paths the current layer added (and their ancestors): whiteouts spare them.
    layer_added: HashSet<Vec<u8>>,
    /// Directories the resolver created implicitly, to be recorded.
    created: Vec<Vec<u8>>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Flattener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flattener")
            .field("staging", &self.staging)
            .field("privileged", &self.privileged)
            .field("limits", &self.limits)
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

/// Copy buffer for file contents: big enough that syscalls are not the bottleneck.
const COPY_BUFFER: usize = 1 << 20;

impl Flattener {
    /// Prepares `staging` (created if missing, which must be empty otherwise: mixing with
    /// leftovers would corrupt the image).
    pub fn new(
        staging: impl Into<PathBuf>,
        options: FlattenOptions,
    ) -> Result<Flattener, FlattenError> {
        let staging = staging.into();
        let fail = |op, source| FlattenError::Staging {
            path: staging.clone(),
            op,
            source,
        };
        let is_root = rustix::process::geteuid().is_root();
        let privileged = match options.privilege {
            Privilege::Detect => is_root,
            Privilege::Unprivileged => false,
            Privilege::Privileged if is_root => true,
            Privilege::Privileged => {
                return Err(fail(
                    "privileged flattening requested",
                    io::Error::new(io::ErrorKind::PermissionDenied, "not running as root"),
                ))
            }
        };
        match std::fs::create_dir(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let mut it = std::fs::read_dir(&staging).map_err(|e| fail("listing", e))?;
                if it.next().is_some() {
                    return Err(fail(
                        "checking it is empty",
                        io::Error::new(io::ErrorKind::AlreadyExists, "directory is not empty"),
                    ));
                }
            }
            Err(e) => return Err(fail("creating", e)),
        }
        let root = rustix::fs::open(
            &staging,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail("opening", e.into()))?;
        Ok(Flattener {
            staging,
            resolver: Resolver::new(root),
            privileged,
            limits: options.limits,
            uncompressed: 0,
            entries: 0,
            metadata: BTreeMap::new(),
            dir_mtimes: BTreeMap::new(),
            layer_added: HashSet::new(),
            created: Vec::new(),
            buf: vec![0; COPY_BUFFER],
        })
    }

    /// The staging directory.
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// Whether ownership and device nodes are applied natively.
    pub fn privileged(&self) -> bool {
        self.privileged
    }

    /// Applies one layer blob on top of what is already staged. `media_type` selects the
    /// decompressor (`...tar+gzip`, `...tar+zstd`, Docker's `...tar.gzip`); for plain tar or
    /// unknown media types the magic bytes decide. The whole stream is read, so a corrupt
    /// compression trailer after the tar's end is still caught.
    pub fn apply_layer(
        &mut self,
        layer: impl Read,
        media_type: &str,
        digest: &Digest,
    ) -> Result<LayerStats, FlattenError> {
        let (decoded, compression) =
            decompress::open(layer, media_type).map_err(|source| FlattenError::Layer {
                layer: digest.clone(),
                problem: LayerProblem::Read {
                    compression: "layer",
                    source,
                },
            })?;
        self.apply_stream(decoded, compression.name(), digest)
    }

    /// [`apply_layer`](Self::apply_layer) with decompression on a thread of its own: the
    /// inflater and the tar writer then run on two cores instead of taking turns on one,
    /// which is most of a gzip layer's time. Same checks, same errors.
    pub fn apply_layer_pipelined(
        &mut self,
        layer: impl Read + Send + 'static,
        media_type: &str,
        digest: &Digest,
    ) -> Result<LayerStats, FlattenError> {
        let decoded = decompress::decode_in_background(layer, media_type, None);
        self.apply_stream(decoded, "layer", digest)
    }

    /// [`apply_layer_pipelined`](Self::apply_layer_pipelined) that also writes the
    /// decompressed tar to `uncompressed` (a cache writer opened for the layer's diff_id),
    /// committing it once the whole stream decoded. The next build of an image with this
    /// layer can then skip decompression, the bulk of a flatten.
    pub fn apply_layer_caching_uncompressed(
        &mut self,
        layer: impl Read + Send + 'static,
        media_type: &str,
        digest: &Digest,
        uncompressed: crate::cache::BlobWriter,
    ) -> Result<LayerStats, FlattenError> {
        let decoded = decompress::decode_in_background(layer, media_type, Some(uncompressed));
        self.apply_stream(decoded, "layer", digest)
    }

    fn apply_stream(
        &mut self,
        decoded: impl Read,
        compression: &'static str,
        digest: &Digest,
    ) -> Result<LayerStats, FlattenError> {
        let consumed = Cell::new(0u64);
        let exceeded = Cell::new(false);
        let remaining = self
            .limits
            .max_uncompressed_bytes
            .saturating_sub(self.uncompressed);
        let limit = self.limits.max_uncompressed_bytes;
        let layer_err = |problem| FlattenError::Layer {
            layer: digest.clone(),
            problem,
        };
        let read_err = |source: io::Error| {
            if exceeded.get() {
                layer_err(LayerProblem::SizeLimit { limit })
            } else {
                layer_err(LayerProblem::Read {
                    compression,
                    source,
                })
            }
        };
        let budgeted = decompress::Budgeted {
            inner: decoded,
            remaining,
            consumed: &consumed,
            exceeded: &exceeded,
        };
        let mut archive = tar::Archive::new(budgeted);
        let mut stats = LayerStats::default();
        self.layer_added.clear();
        let result = (|| {
            for entry in archive.entries().map_err(read_err)? {
                let mut entry = entry.map_err(read_err)?;
                self.entries += 1;
                stats.entries += 1;
                if self.entries > self.limits.max_entries {
                    return Err(layer_err(LayerProblem::EntryLimit {
                        limit: self.limits.max_entries,
                    }));
                }
                let raw_path = entry.path_bytes().into_owned();
                if let Err(problem) = self.apply_entry(&mut entry, &raw_path, &mut stats) {
                    if exceeded.get() {
                        return Err(layer_err(LayerProblem::SizeLimit { limit }));
                    }
                    return Err(FlattenError::Entry {
                        layer: digest.clone(),
                        path: lossy(&raw_path),
                        problem,
                    });
                }
            }
            // Drain the padding after the end-of-archive marker and the compression
            // trailer: a truncated or corrupt blob must not pass as a complete layer.
            io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(read_err)?;
            Ok(())
        })();
        self.layer_added.clear();
        self.uncompressed += consumed.get();
        stats.uncompressed_bytes = consumed.get();
        result?;
        tracing::debug!(
            layer = %digest,
            entries = stats.entries,
            uncompressed = stats.uncompressed_bytes,
            compression = compression,
            "applied layer"
        );
        Ok(stats)
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
        stats: &mut LayerStats,
    ) -> Result<(), EntryProblem> {
        let header = entry.header();
        let entry_type = header.entry_type();
        let bad = |e: io::Error| EntryProblem::BadHeader(e.to_string());
        let id = |v: u64| {
            u32::try_from(v).map_err(|_| EntryProblem::BadHeader(format!("id {v} out of range")))
        };
        let mode = header.mode().map_err(bad)? & 0o7777;
        let mut uid = id(header.uid().map_err(bad)?)?;
        let mut gid = id(header.gid().map_err(bad)?)?;
        let mut mtime = timespec(header.mtime().map_err(bad)? as i64, 0);
        let kind = match entry_type {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                EntryKind::File
            }
            tar::EntryType::Directory => EntryKind::Directory,
            tar::EntryType::Symlink | tar::EntryType::Link => EntryKind::Symlink,
            tar::EntryType::Fifo => EntryKind::Fifo,
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = header.device_major().map_err(bad)?.unwrap_or(0);
                let minor = header.device_minor().map_err(bad)?.unwrap_or(0);
                if entry_type == tar::EntryType::Char {
                    EntryKind::CharDevice { major, minor }
                } else {
                    EntryKind::BlockDevice { major, minor }
                }
            }
            // Global PAX headers and vendor extensions carry nothing we apply.
            other => {
                tracing::debug!(entry = %lossy(raw_path), kind = ?other, "skipping tar entry type");
                return Ok(());
            }
        };
        let hardlink = entry_type == tar::EntryType::Link;
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let mut xattrs = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(bad)? {
            for ext in exts {
                let ext = ext.map_err(bad)?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((lossy(name), ext.value_bytes().to_vec()));
                    continue;
                }
                let value = std::str::from_utf8(ext.value_bytes()).unwrap_or("");
                match key {
                    b"uid" => {
                        uid = value
                            .parse()
                            .map_err(|_| EntryProblem::BadHeader(format!("pax uid {value:?}")))?
                    }
                    b"gid" => {
                        gid = value
                            .parse()
                            .map_err(|_| EntryProblem::BadHeader(format!("pax gid {value:?}")))?
                    }
                    b"mtime" => {
                        mtime = parse_pax_time(value).ok_or_else(|| {
                            EntryProblem::BadHeader(format!("pax mtime {value:?}"))
                        })?
                    }
                    _ => {}
                }
            }
        }
        let meta = EntryMetadata {
            kind,
            uid,
            gid,
            mode,
            xattrs,
        };

        let comps = normalize(raw_path)?;
        let Some((name, parent)) = comps.split_last() else {
            if kind != EntryKind::Directory || hardlink {
                return Err(EntryProblem::NotADirectoryRoot);
            }
            return self.apply_root(meta, mtime);
        };
        let name: &[u8] = name;
        if let Some(target) = name.strip_prefix(b".wh.") {
            stats.whiteouts += 1;
            return self.whiteout(parent, target);
        }

        self.resolver
            .enter(parent, true, &mut self.created)
            .map_err(resolve_problem)?;
        self.record_created();
        let mut real = Vec::with_capacity(self.resolver.real().len() + 1 + name.len());
        real.extend_from_slice(self.resolver.real());
        join(&mut real, name);
        let dir = self.resolver.dir();
        let mut removed = false;

        if hardlink {
            let target = link.unwrap_or_default();
            let target_real = self.link(dir, name, &target, &mut removed)?;
            if removed {
                prune(&mut self.metadata, &real);
                prune(&mut self.dir_mtimes, &real);
            }
            if let Some(m) = self.metadata.get(&target_real).cloned() {
                self.metadata.insert(real.clone(), m);
            }
        } else {
            let mut fallback = Vec::new();
            match kind {
                EntryKind::File => {
                    let fd = create_excl(dir, name, &mut removed)?;
                    let mut file = File::from(fd);
                    loop {
                        let n = match entry.read(&mut self.buf) {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                return Err(io_problem("reading file data from the layer", e))
                            }
                        };
                        file.write_all(&self.buf[..n])
                            .map_err(|e| io_problem("writing file data", e))?;
                        stats.file_bytes += n as u64;
                    }
                    fd_attrs(file.as_fd(), &meta, self.privileged, &mut fallback)?;
                    rustix::fs::futimens(&file, &times(mtime))
                        .map_err(|e| errno_problem("setting mtime", e))?;
                }
                EntryKind::Directory => {
                    let fd = make_dir(dir, name, &mut removed)?;
                    fd_attrs(fd.as_fd(), &meta, self.privileged, &mut fallback)?;
                }
                EntryKind::Symlink => {
                    let target = link.unwrap_or_default();
                    retry_after_removal(dir, name, &mut removed, || {
                        rustix::fs::symlinkat(target.as_slice(), dir, name)
                    })
                    .map_err(|e| errno_problem("creating symlink", e))?;
                    self.at_attrs(dir, name, &meta, mtime, &mut fallback)?;
                }
                EntryKind::Fifo | EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => {
                    let (file_type, dev) = match kind {
                        EntryKind::CharDevice { major, minor } => {
                            (FileType::CharacterDevice, rustix::fs::makedev(major, minor))
                        }
                        EntryKind::BlockDevice { major, minor } => {
                            (FileType::BlockDevice, rustix::fs::makedev(major, minor))
                        }
                        _ => (FileType::Fifo, 0),
                    };
                    if file_type == FileType::Fifo || self.privileged {
                        retry_after_removal(dir, name, &mut removed, || {
                            rustix::fs::mknodat(
                                dir,
                                name,
                                file_type,
                                Mode::from_raw_mode(0o600),
                                dev,
                            )
                        })
                        .map_err(|e| errno_problem("creating special file", e))?;
                    } else {
                        // Unprivileged: an empty placeholder keeps whiteouts and
                        // replacements working on the staging tree; the builder swaps
                        // in the real device node.
                        drop(create_excl(dir, name, &mut removed)?);
                    }
                    self.at_attrs(dir, name, &meta, mtime, &mut fallback)?;
                }
            }
            if removed {
                prune(&mut self.metadata, &real);
                prune(&mut self.dir_mtimes, &real);
            }
            if kind == EntryKind::Directory {
                // After pruning, which would drop it when a non-directory was replaced.
                self.dir_mtimes.insert(real.clone(), mtime);
            }
            if !self.privileged {
                self.metadata.insert(real.clone(), meta);
            } else if !fallback.is_empty() {
                self.metadata.insert(
                    real.clone(),
                    EntryMetadata {
                        xattrs: fallback,
                        ..meta
                    },
                );
            } else {
                self.metadata.remove(&real);
            }
        }
        if removed {
            self.resolver.note_removal();
        }
        mark_added(&mut self.layer_added, real);
        Ok(())
    }

    /// Sets ownership, mode and (best effort) xattrs on something that cannot be opened
    /// for writing: symlinks, fifos, devices.
    fn at_attrs(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        meta: &EntryMetadata,
        mtime: Timespec,
        fallback: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), EntryProblem> {
        if self.privileged {
            let (uid, gid) = ids(meta.uid, meta.gid);
            rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| errno_problem("chown", e))?;
            // There is no fd-relative xattr call for things we cannot open; the builder
            // applies these inside the image.
            fallback.extend(meta.xattrs.iter().cloned());
        }
        if meta.kind != EntryKind::Symlink {
            // Not a symlink (we just created it), so following is harmless here.
            let mode = if self.privileged {
                meta.mode
            } else {
                meta.mode | 0o400
            };
            rustix::fs::chmodat(dir, name, Mode::from_raw_mode(mode), AtFlags::empty())
                .map_err(|e| errno_problem("chmod", e))?;
        }
        rustix::fs::utimensat(dir, name, &times(mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| errno_problem("setting mtime", e))
    }

    /// Creates a hard link `dir/name` to the in-root path `target`; returns the target's
    /// symlink-free path.
    fn link(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        target: &[u8],
        removed: &mut bool,
    ) -> Result<Vec<u8>, EntryProblem> {
        let refuse = |reason: &str| EntryProblem::HardlinkTarget {
            target: lossy(target),
            reason: reason.to_owned(),
        };
        let comps = normalize(target).map_err(|_| refuse("climbs above the image root"))?;
        let Some((tname, tparent)) = comps.split_last() else {
            return Err(refuse("is the image root"));
        };
        let mut created = Vec::new();
        let (tdir, mut treal) = self
            .resolver
            .resolve_detached(tparent, false, &mut created)
            .map_err(|e| match e {
                ResolveError::Missing => refuse("does not exist"),
                ResolveError::Problem(p) => refuse(&p.to_string()),
            })?;
        join(&mut treal, tname);
        // Linking an entry onto itself: nothing to do (and unlinking first would lose it).
        let same = match (
            rustix::fs::statat(&tdir, *tname, AtFlags::SYMLINK_NOFOLLOW),
            rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
        ) {
            (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
            (Err(Errno::NOENT), _) => return Err(refuse("does not exist")),
            _ => false,
        };
        if !same {
            // Without AT_SYMLINK_FOLLOW a symlink target is linked as the symlink itself,
            // never followed out of the tree.
            retry_after_removal(dir, name, removed, || {
                rustix::fs::linkat(&tdir, *tname, dir, name, AtFlags::empty())
            })
            .map_err(|e| match e {
                Errno::PERM => refuse("is a directory"),
                Errno::NOENT => refuse("does not exist"),
                e => errno_problem("creating hard link", e),
            })?;
        }
        Ok(treal)
    }

    fn apply_root(&mut self, meta: EntryMetadata, mtime: Timespec) -> Result<(), EntryProblem> {
        let fd = rustix::fs::openat(
            self.resolver.root(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_problem("opening the root", e))?;
        let mut fallback = Vec::new();
        fd_attrs(fd.as_fd(), &meta, self.privileged, &mut fallback)?;
        self.dir_mtimes.insert(Vec::new(), mtime);
        if !self.privileged {
            self.metadata.insert(Vec::new(), meta);
        } else if !fallback.is_empty() {
            self.metadata.insert(
                Vec::new(),
                EntryMetadata {
                    xattrs: fallback,
                    ..meta
                },
            );
        }
        Ok(())
    }

    /// Handles `.wh.TARGET` in directory `parent`.
    fn whiteout(&mut self, parent: &[&[u8]], target: &[u8]) -> Result<(), EntryProblem> {
        if target == b".wh..opq" {
            // The opaque directory itself belongs to this layer.
            self.resolver
                .enter(parent, true, &mut self.created)
                .map_err(resolve_problem)?;
            self.record_created();
            let mut real = self.resolver.real().to_vec();
            mark_added(&mut self.layer_added, real.clone());
            let dir = rustix::fs::openat(
                self.resolver.dir(),
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| errno_problem("opening opaque directory", e))?;
            let mut maps = (&mut self.metadata, &mut self.dir_mtimes);
            clear_lower(dir.as_fd(), &mut real, &self.layer_added, &mut maps)?;
            self.resolver.note_removal();
            return Ok(());
        }
        if target.starts_with(b".wh.") {
            // Other `.wh..wh.` names are aufs bookkeeping (e.g. `.wh..wh.plnk`), not content.
            return Ok(());
        }
        if matches!(target, b"" | b"." | b"..") {
            return Err(EntryProblem::EscapesRoot);
        }
        match self.resolver.enter(parent, false, &mut self.created) {
            Ok(()) => {}
            // Whiting out something under a missing directory is a no-op.
            Err(ResolveError::Missing) => return Ok(()),
            Err(ResolveError::Problem(p)) => return Err(p),
        }
        let mut real = self.resolver.real().to_vec();
        join(&mut real, target);
        // Whiteouts only hide lower layers, never what this layer adds.
        if self.layer_added.contains(&real) {
            return Ok(());
        }
        if remove_any(self.resolver.dir(), target, None)? {
            prune(&mut self.metadata, &real);
            prune(&mut self.dir_mtimes, &real);
            self.resolver.note_removal();
        }
        Ok(())
    }

    /// Records directories the resolver created implicitly (root-owned 0755, as Docker).
    fn record_created(&mut self) {
        for real in self.created.drain(..) {
            if !self.privileged {
                let meta = EntryMetadata {
                    kind: EntryKind::Directory,
                    uid: 0,
                    gid: 0,
                    mode: 0o755,
                    xattrs: Vec::new(),
                };
                self.metadata.insert(real.clone(), meta);
            }
            mark_added(&mut self.layer_added, real);
        }
    }

    /// Sets directory mtimes (now that nothing writes into them any more), measures the
    /// tree and hands it over.
    pub fn finish(self) -> Result<FlattenedTree, FlattenError> {
        let staging = self.staging;
        let fail = |op, source| FlattenError::Staging {
            path: staging.clone(),
            op,
            source,
        };
        let root = rustix::fs::openat(
            self.resolver.root(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail("opening", e.into()))?;
        let mut walk = Walk {
            mtimes: &self.dir_mtimes,
            seen: HashSet::new(),
            content: 0,
            entries: 0,
            inodes: 0,
        };
        let mut real = Vec::new();
        walk.dir(root.as_fd(), &mut real)
            .map_err(|e| fail("walking the flattened tree", e))?;
        if let Some(t) = self.dir_mtimes.get(&Vec::new()) {
            rustix::fs::futimens(&root, &times(*t))
                .map_err(|e| fail("setting root mtime", e.into()))?;
        }
        let (content, entries, inodes) = (walk.content, walk.entries, walk.inodes);
        let metadata = self
            .metadata
            .into_iter()
            .map(|(k, v)| (PathBuf::from(OsString::from_vec(k)), v))
            .collect();
        Ok(FlattenedTree {
            root: staging,
            privileged: self.privileged,
            content_bytes: content,
            entries,
            inodes,
            metadata,
            root_fd: root,
        })
    }

    /// Removes the staging directory, e.g. after a refused layer.
    pub fn discard(self) -> Result<(), FlattenError> {
        remove_staging(&self.staging)
    }
}

impl FlattenedTree {
    /// The tree's root directory, for readers that must not follow symlinks out of it.
    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root_fd.as_fd()
    }

    /// Writes a regular file at the absolute in-image path `path` (parents are created
    /// 0755 root-owned; symlinks on the way resolve inside the image), replacing whatever
    /// was there. For files banger itself puts into images, e.g. the VM agent's config.
    pub fn inject_file(
        &mut self,
        path: &Path,
        contents: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), FlattenError> {
        let shown = path.display().to_string();
        let fail = |problem| FlattenError::Inject {
            path: shown.clone(),
            problem,
        };
        let raw = path.as_os_str().as_encoded_bytes();
        let comps = normalize(raw).map_err(fail)?;
        let Some((name, parent)) = comps.split_last() else {
            return Err(fail(EntryProblem::NotADirectoryRoot));
        };
        let root = rustix::fs::openat(
            &self.root_fd,
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail(errno_problem("opening the root", e)))?;
        let resolver = Resolver::new(root);
        let mut created = Vec::new();
        let (dir, mut real) = resolver
            .resolve_detached(parent, true, &mut created)
            .map_err(|e| fail(resolve_problem(e)))?;
        join(&mut real, name);
        let mut removed = false;
        let fd = create_excl(dir.as_fd(), name, &mut removed).map_err(fail)?;
        let mut file = File::from(fd);
        file.write_all(contents)
            .map_err(|e| fail(io_problem("writing injected file", e)))?;
        let meta = EntryMetadata {
            kind: EntryKind::File,
            uid,
            gid,
            mode: mode & 0o7777,
            xattrs: Vec::new(),
        };
        let mut fallback = Vec::new();
        fd_attrs(file.as_fd(), &meta, self.privileged, &mut fallback).map_err(fail)?;
        let key = |p: Vec<u8>| PathBuf::from(OsString::from_vec(p));
        if removed {
            let prefix = key(real.clone());
            self.metadata.retain(|k, _| !k.starts_with(&prefix));
        }
        if !self.privileged {
            for dir in created {
                let meta = EntryMetadata {
                    kind: EntryKind::Directory,
                    uid: 0,
                    gid: 0,
                    mode: 0o755,
                    xattrs: Vec::new(),
                };
                self.metadata.insert(key(dir), meta);
            }
            self.metadata.insert(key(real), meta);
        }
        self.content_bytes += round_block(contents.len() as u64);
        self.entries += 1;
        self.inodes += 1;
        Ok(())
    }

    /// Removes the staging directory.
    pub fn remove(self) -> Result<(), FlattenError> {
        remove_staging(&self.root)
    }
}

/// Removes a staging directory and everything in it without following symlinks.
pub fn remove_staging(path: &Path) -> Result<(), FlattenError> {
    // std's remove_dir_all works fd-relative and never follows symlinks (CVE-2022-21658).
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FlattenError::Staging {
            path: path.to_owned(),
            op: "removing",
            source,
        }),
    }
}

fn resolve_problem(e: ResolveError) -> EntryProblem {
    match e {
        ResolveError::Missing => io_problem("resolving parent", io::ErrorKind::NotFound.into()),
        ResolveError::Problem(p) => p,
    }
}

fn timespec(sec: i64, nsec: u32) -> Timespec {
    Timespec {
        tv_sec: sec as _,
        tv_nsec: nsec as _,
    }
}

fn times(t: Timespec) -> Timestamps {
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// PAX times are decimal seconds with an optional fraction, e.g. `1700000000.123456789`.
fn parse_pax_time(value: &str) -> Option<Timespec> {
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nsec = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some(timespec(secs, nsec))
}

fn ids(uid: u32, gid: u32) -> (rustix::fs::Uid, rustix::fs::Gid) {
    // SAFETY: `from_raw` is `unsafe` only so callers vouch that the number is a real id;
    // there is no memory-safety requirement, and the kernel accepts any value for chown.
    unsafe {
        (
            rustix::fs::Uid::from_raw(uid),
            rustix::fs::Gid::from_raw(gid),
        )
    }
}

/// Applies ownership, mode and xattrs through an open fd. Ownership first: chown clears
/// setuid/setgid and `security.capability`, so mode and xattrs come after it. Xattrs the
/// staging filesystem refuses are appended to `fallback` for the builder.
fn fd_attrs(
    fd: BorrowedFd<'_>,
    meta: &EntryMetadata,
    privileged: bool,
    fallback: &mut Vec<(String, Vec<u8>)>,
) -> Result<(), EntryProblem> {
    if privileged {
        std::os::unix::fs::fchown(fd, Some(meta.uid), Some(meta.gid))
            .map_err(|e| io_problem("chown", e))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))
            .map_err(|e| errno_problem("chmod", e))?;
        for (name, value) in &meta.xattrs {
            match rustix::fs::fsetxattr(fd, name.as_str(), value, XattrFlags::empty()) {
                Ok(()) => {}
                Err(Errno::NOTSUP | Errno::PERM | Errno::ACCESS | Errno::INVAL) => {
                    fallback.push((name.clone(), value.clone()))
                }
                Err(e) => return Err(errno_problem("setting xattr", e)),
            }
        }
    } else {
        // Keep what we stage readable (and directories writable) for ourselves: mkfs must
        // read it and later layers may write into it. The true mode is in the side table.
        let floor = if meta.kind == EntryKind::Directory {
            0o700
        } else {
            0o400
        };
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode | floor))
            .map_err(|e| errno_problem("chmod", e))?;
    }
    Ok(())
}

/// Runs `create`; if the name is taken, removes what is there and runs it once more.
fn retry_after_removal(
    dir: BorrowedFd<'_>,
    name: &[u8],
    removed: &mut bool,
    mut create: impl FnMut() -> rustix::io::Result<()>,
) -> rustix::io::Result<()> {
    match create() {
        Err(Errno::EXIST) => {
            remove_any(dir, name, None).map_err(|_| Errno::EXIST)?;
            *removed = true;
            create()
        }
        other => other,
    }
}

/// Creates a new regular file, replacing whatever had the name. `O_EXCL|O_NOFOLLOW`: a
/// symlink left at the name by a lower layer is replaced, never written through.
fn create_excl(
    dir: BorrowedFd<'_>,
    name: &[u8],
    removed: &mut bool,
) -> Result<OwnedFd, EntryProblem> {
    let open = || {
        rustix::fs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
    };
    match open() {
        Ok(fd) => Ok(fd),
        Err(Errno::EXIST) => {
            remove_any(dir, name, None)?;
            *removed = true;
            open().map_err(|e| errno_problem("creating file", e))
        }
        Err(e) => Err(errno_problem("creating file", e)),
    }
}

/// Creates a directory or merges with an existing one (what overlay semantics ask for);
/// anything else at the name is replaced.
fn make_dir(dir: BorrowedFd<'_>, name: &[u8], removed: &mut bool) -> Result<OwnedFd, EntryProblem> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => {}
        Err(Errno::EXIST) => {
            let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| errno_problem("stat", e))?;
            if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                remove_any(dir, name, Some(false))?;
                *removed = true;
                rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| errno_problem("creating directory", e))?;
            }
        }
        Err(e) => return Err(errno_problem("creating directory", e)),
    }
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno_problem("opening directory", e))
}

/// Removes `dir/name` and, for a directory, everything below it. Returns whether
/// anything was there. `is_dir` skips the stat when the caller already knows.
fn remove_any(
    dir: BorrowedFd<'_>,
    name: &[u8],
    is_dir: Option<bool>,
) -> Result<bool, EntryProblem> {
    let is_dir = match is_dir {
        Some(d) => d,
        None => match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => FileType::from_raw_mode(st.st_mode) == FileType::Directory,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(errno_problem("stat before removal", e)),
        },
    };
    if is_dir {
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_problem("opening directory for removal", e))?;
        for (child, child_is_dir) in
            list(sub.as_fd()).map_err(|e| errno_problem("listing directory for removal", e))?
        {
            remove_any(sub.as_fd(), child.to_bytes(), child_is_dir)?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
            .map_err(|e| errno_problem("removing directory", e))?;
    } else {
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) => {}
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(errno_problem("removing", e)),
        }
    }
    Ok(true)
}

/// Lists a directory's names (without `.`/`..`) and whether each is a directory, when
/// `d_type` says so.
fn list(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<(std::ffi::CString, Option<bool>)>> {
    let mut out = Vec::new();
    let mut it = rustix::fs::Dir::read_from(dir)?;
    while let Some(entry) = it.read() {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        let is_dir = match entry.file_type() {
            FileType::Unknown => None,
            t => Some(t == FileType::Directory),
        };
        out.push((name.to_owned(), is_dir));
    }
    Ok(out)
}

type Maps<'a> = (
    &'a mut BTreeMap<Vec<u8>, EntryMetadata>,
    &'a mut BTreeMap<Vec<u8>, Timespec>,
);

/// Opaque directory: removes everything below `dir` (at `real`) that this layer did not
/// add, descending into directories this layer added to so their lower content goes too.
fn clear_lower(
    dir: BorrowedFd<'_>,
    real: &mut Vec<u8>,
    added: &HashSet<Vec<u8>>,
    maps: &mut Maps<'_>,
) -> Result<(), EntryProblem> {
    for (name, is_dir) in list(dir).map_err(|e| errno_problem("listing opaque directory", e))? {
        let name = name.to_bytes();
        let len = real.len();
        join(real, name);
        if added.contains(real.as_slice()) {
            let is_dir = match is_dir {
                Some(d) => d,
                None => rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
                    .map_err(|e| errno_problem("stat", e))?,
            };
            if is_dir {
                let sub = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| errno_problem("opening directory", e))?;
                clear_lower(sub.as_fd(), real, added, maps)?;
            }
        } else {
            remove_any(dir, name, is_dir)?;
            prune(maps.0, real);
            prune(maps.1, real);
        }
        real.truncate(len);
    }
    Ok(())
}

/// Drops `real` and everything below it from a path-keyed table.
fn prune<V>(map: &mut BTreeMap<Vec<u8>, V>, real: &[u8]) {
    let doomed: Vec<Vec<u8>> = map
        .range(real.to_vec()..)
        .take_while(|(k, _)| k.starts_with(real))
        .filter(|(k, _)| k.len() == real.len() || k[real.len()] == b'/')
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        map.remove(&k);
    }
}

/// Records that this layer added `real`, and so all its ancestors.
fn mark_added(added: &mut HashSet<Vec<u8>>, mut real: Vec<u8>) {
    loop {
        let cut = real.iter().rposition(|&b| b == b'/');
        if !added.insert(real.clone()) {
            return;
        }
        match cut {
            Some(c) => real.truncate(c),
            None => return,
        }
    }
}

fn round_block(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

/// The final pass over the tree: directory mtimes (children first) and sizes.
struct Walk<'a> {
    mtimes: &'a BTreeMap<Vec<u8>, Timespec>,
    seen: HashSet<(u64, u64)>,
    content: u64,
    entries: u64,
    inodes: u64,
}

impl Walk<'_> {
    fn dir(&mut self, dir: BorrowedFd<'_>, real: &mut Vec<u8>) -> io::Result<()> {
        for (name, is_dir) in list(dir)? {
            let name = name.to_bytes();
            self.entries += 1;
            let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
            let file_type = FileType::from_raw_mode(st.st_mode);
            if st.st_nlink > 1
                && file_type != FileType::Directory
                && !self.seen.insert((st.st_dev, st.st_ino))
            {
                continue;
            }
            self.inodes += 1;
            match file_type {
                FileType::RegularFile => self.content += round_block(st.st_size as u64),
                // Symlink targets up to 59 bytes live in the inode itself.
                FileType::Symlink if st.st_size > 59 => self.content += 4096,
                FileType::Directory => {
                    debug_assert_ne!(is_dir, Some(false));
                    self.content += round_block(st.st_size.max(4096) as u64);
                    let sub = rustix::fs::openat(
                        dir,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    let len = real.len();
                    join(real, name);
                    self.dir(sub.as_fd(), real)?;
                    if let Some(t) = self.mtimes.get(real.as_slice()) {
                        rustix::fs::futimens(&sub, &times(*t))?;
                    }
                    real.truncate(len);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse_with_and_without_fraction() {
        let t = parse_pax_time("1700000000.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1_700_000_000, 500_000_000));
        let t = parse_pax_time("42").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (42, 0));
        assert!(parse_pax_time("x").is_none());
    }

    #[test]
    fn prune_removes_a_subtree_but_not_lookalike_siblings() {
        let mut m: BTreeMap<Vec<u8>, ()> = BTreeMap::new();
        for k in ["a", "a/b", "a/b/c", "a-b", "a.b", "ab", "b"] {
            m.insert(k.as_bytes().to_vec(), ());
        }
        prune(&mut m, b"a");
        let left: Vec<_> = m
            .keys()
            .map(|k| String::from_utf8(k.clone()).unwrap())
            .collect();
        assert_eq!(left, ["a-b", "a.b", "ab", "b"]);
    }

    #[test]
    fn mark_added_records_ancestors() {
        let mut s = HashSet::new();
        mark_added(&mut s, b"a/b/c".to_vec());
        assert!(
            s.contains(b"a".as_slice())
                && s.contains(b"a/b".as_slice())
                && s.contains(b"a/b/c".as_slice())
        );
    }
}
