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
//! The staging directory holds names, file contents, symlinks and hard links, nothing more:
//! the host filesystem is never the source of truth for metadata. Every entry's kind, mode,
//! owner, xattrs, device numbers and mtime are recorded from its tar header in
//! [`FlattenedTree::metadata`], root or not, and the rootfs builder takes them from there.
//! So there is one code path whatever the daemon's privilege, and nothing of the host
//! (a default ACL, a setgid parent, a filesystem without `trusted.*` xattrs, a umask)
//! leaks into an image. Device nodes and fifos are staged as empty placeholder files.

mod decompress;
mod error;
mod resolve;
mod tarstream;

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::digest::Digest;
use error::{errno_problem, io_problem};
pub use error::{EntryProblem, FlattenError, LayerProblem};
pub use tarstream::MAX_EXTENSION_HEADER_BYTES;
use tarstream::{Member, TarError, TarReader};

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

/// ext4's limit on names of one inode (`EXT4_LINK_MAX`). Directories may pass it
/// (`dir_nlink`), other inodes may not: a hard link past it is refused.
pub const EXT4_LINK_MAX: u64 = 65_000;

/// Longest xattr name Linux and ext4 hold (`XATTR_NAME_MAX`), namespace prefix included.
pub const XATTR_NAME_MAX: usize = 255;

/// Largest device major ext4's (and Linux's) device encoding holds: 12 bits.
pub const MAX_DEVICE_MAJOR: u32 = 0xfff;
/// Largest device minor: 20 bits.
pub const MAX_DEVICE_MINOR: u32 = 0xf_ffff;

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

/// The privilege the flattener runs with. It no longer changes what is built (every
/// attribute is recorded, never applied to the host), only whether root is asserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Privilege {
    /// Whatever the process has.
    #[default]
    Detect,
    /// Root; [`Flattener::new`] fails when not root.
    Privileged,
    /// As if not root, even as root.
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
    /// A named pipe (staged as an empty placeholder file).
    Fifo,
    /// A character device (staged as an empty placeholder file).
    CharDevice {
        /// Device major number (at most [`MAX_DEVICE_MAJOR`]).
        major: u32,
        /// Device minor number (at most [`MAX_DEVICE_MINOR`]).
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

/// A time as the tar says: seconds since the epoch (negative before 1970) and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Timestamp {
    /// Whole seconds, rounded towards minus infinity.
    pub sec: i64,
    /// Nanoseconds after `sec`, below 1e9.
    pub nsec: u32,
}

/// Everything an entry is in the image but its name and its bytes: taken from its tar
/// header (implicit directories are root-owned 0755 with mtime 0, as is the root when no
/// layer has a `./` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMetadata {
    /// What the entry is.
    pub kind: EntryKind,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits including setuid, setgid and sticky (no file type bits); 0777 for
    /// symlinks, whatever their header says (ext4 symlinks have no mode of their own).
    pub mode: u32,
    /// Extended attributes (name, value) as bytes, e.g. `security.capability`; one per name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Modification time.
    pub mtime: Timestamp,
    /// Regular files: the size in bytes.
    pub size: u64,
    /// Symlinks: the target.
    pub target: Vec<u8>,
    /// Regular files stored sparse in the layer: their data segments (offset, length), in
    /// order; everything else reads as zeros.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Which inode the entry is: the names of one hard-linked file share it, every other
    /// entry has its own.
    pub inode: u64,
    /// Whether the inode has (or had) more than one name.
    pub linked: bool,
}

impl EntryMetadata {
    fn implicit_dir(inode: u64) -> EntryMetadata {
        EntryMetadata {
            kind: EntryKind::Directory,
            uid: 0,
            gid: 0,
            mode: 0o755,
            xattrs: Vec::new(),
            mtime: Timestamp::default(),
            size: 0,
            target: Vec::new(),
            sparse: None,
            inode,
            linked: false,
        }
    }

    /// Data bytes the entry's content takes, rounded to 4 KiB blocks.
    fn data_blocks_bytes(&self) -> u64 {
        match (&self.kind, &self.sparse) {
            (EntryKind::File, Some(map)) => map.iter().map(|s| round_block(s.1) + 4096).sum(),
            (EntryKind::File, None) => round_block(self.size),
            (EntryKind::Directory, _) => 4096,
            // Symlink targets up to 59 bytes live in the inode itself.
            (EntryKind::Symlink, _) if self.target.len() > 59 => 4096,
            _ => 0,
        }
    }
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
    /// Whether the flattener ran as root (informational: the tree is the same either way).
    pub privileged: bool,
    /// Estimated bytes of data blocks the tree needs: regular files rounded up to 4 KiB
    /// (hard links counted once), directory entries, a block per directory, long symlink
    /// and large xattr set.
    pub content_bytes: u64,
    /// Names in the tree, the root excluded.
    pub entries: u64,
    /// Distinct inodes in the tree, the root excluded.
    pub inodes: u64,
    /// Every entry's attributes, keyed by symlink-free path relative to the root (the empty
    /// path is the root itself). The rootfs builder takes all metadata from here.
    pub metadata: BTreeMap<PathBuf, EntryMetadata>,
    root_fd: OwnedFd,
    next_inode: u64,
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
    /// Every entry's record, keyed by symlink-free root-relative path.
    metadata: BTreeMap<Vec<u8>, EntryMetadata>,
    /// Paths the current layer added (and their ancestors): whiteouts spare them.
    layer_added: HashSet<Vec<u8>>,
    /// Directories the resolver created implicitly, to be recorded.
    created: Vec<Vec<u8>>,
    next_inode: u64,
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
        let mut metadata = BTreeMap::new();
        metadata.insert(Vec::new(), EntryMetadata::implicit_dir(1));
        Ok(Flattener {
            staging,
            resolver: Resolver::new(root),
            privileged,
            limits: options.limits,
            uncompressed: 0,
            entries: 0,
            metadata,
            layer_added: HashSet::new(),
            created: Vec::new(),
            next_inode: 2,
            buf: vec![0; COPY_BUFFER],
        })
    }

    /// The staging directory.
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// Whether the flattener runs as root (informational: the result is the same).
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
        let consumed = std::cell::Cell::new(0u64);
        let exceeded = std::cell::Cell::new(false);
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
        let tar_err = |e: TarError| match e {
            TarError::Stream(source) => read_err(source),
            TarError::Entry { path, problem } => FlattenError::Entry {
                layer: digest.clone(),
                path: lossy(&path),
                problem,
            },
        };
        let budgeted = decompress::Budgeted {
            inner: decoded,
            remaining,
            consumed: &consumed,
            exceeded: &exceeded,
        };
        let mut archive = TarReader::new(budgeted);
        let mut stats = LayerStats::default();
        self.layer_added.clear();
        let result = (|| {
            while let Some(member) = archive.next().map_err(tar_err)? {
                self.entries += 1;
                stats.entries += 1;
                if self.entries > self.limits.max_entries {
                    return Err(layer_err(LayerProblem::EntryLimit {
                        limit: self.limits.max_entries,
                    }));
                }
                if let Err(problem) = self.apply_entry(&mut archive, &member, &mut stats) {
                    if exceeded.get() {
                        return Err(layer_err(LayerProblem::SizeLimit { limit }));
                    }
                    if let EntryProblem::Io { source, .. } = &problem {
                        if source.kind() == io::ErrorKind::UnexpectedEof {
                            let source = io::Error::new(source.kind(), source.to_string());
                            return Err(read_err(source));
                        }
                    }
                    return Err(FlattenError::Entry {
                        layer: digest.clone(),
                        path: lossy(&member.path),
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

    /// What the member's header says the entry is; `None` for members that carry nothing
    /// we apply.
    fn header_metadata(&mut self, member: &Member) -> Result<Option<EntryMetadata>, EntryProblem> {
        let header = &member.header;
        let entry_type = header.entry_type();
        let bad = |e: io::Error| EntryProblem::BadHeader(e.to_string());
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
                if major > MAX_DEVICE_MAJOR || minor > MAX_DEVICE_MINOR {
                    return Err(EntryProblem::DeviceNumber { major, minor });
                }
                if entry_type == tar::EntryType::Char {
                    EntryKind::CharDevice { major, minor }
                } else {
                    EntryKind::BlockDevice { major, minor }
                }
            }
            // Vendor extensions carry nothing we apply.
            other => {
                tracing::debug!(entry = %lossy(&member.path), kind = ?other, "skipping tar entry type");
                return Ok(None);
            }
        };
        let mut mode = header.mode().map_err(bad)? & 0o7777;
        let mut uid = header.uid().map_err(bad)?;
        let mut gid = header.gid().map_err(bad)?;
        let raw_mtime = header.as_old().mtime;
        let sec = if raw_mtime[0] == 0xff {
            // Negative base-256 (GNU): two's complement, big-endian, sign-extended over the
            // field, so its last eight bytes are the i64.
            i64::from_be_bytes(raw_mtime[4..].try_into().expect("8 bytes"))
        } else {
            i64::try_from(header.mtime().map_err(bad)?).unwrap_or(i64::MAX)
        };
        let mut mtime = Timestamp { sec, nsec: 0 };
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (key, value) in &member.pax {
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if name.len() > XATTR_NAME_MAX {
                    let shown: Vec<u8> = name.iter().copied().take(64).collect();
                    return Err(EntryProblem::XattrNameTooLong {
                        name: lossy(&shown),
                        len: name.len(),
                        limit: XATTR_NAME_MAX,
                    });
                }
                if name.is_empty() || name.contains(&0) {
                    return Err(EntryProblem::XattrName { name: lossy(name) });
                }
                // A repeated name: the last record wins.
                xattrs.retain(|(n, _)| n != name);
                xattrs.push((name.to_vec(), value.clone()));
                continue;
            }
            let text = || String::from_utf8_lossy(value).into_owned();
            match key.as_slice() {
                b"uid" => {
                    uid = text()
                        .parse()
                        .map_err(|_| EntryProblem::BadHeader(format!("pax uid {:?}", text())))?
                }
                b"gid" => {
                    gid = text()
                        .parse()
                        .map_err(|_| EntryProblem::BadHeader(format!("pax gid {:?}", text())))?
                }
                b"mtime" => {
                    mtime = parse_pax_time(&text())
                        .ok_or_else(|| EntryProblem::BadHeader(format!("pax mtime {:?}", text())))?
                }
                _ => {}
            }
        }
        let id = |which: &'static str, v: u64| match u32::try_from(v) {
            Ok(u32::MAX) => Err(EntryProblem::InvalidId { which, id: v }),
            Ok(id) => Ok(id),
            Err(_) => Err(EntryProblem::BadHeader(format!("{which} {v} out of range"))),
        };
        let uid = id("uid", uid)?;
        let gid = id("gid", gid)?;
        if kind == EntryKind::Symlink {
            mode = 0o777;
        }
        let (size, sparse) = match &member.sparse {
            Some(s) => (s.real_size, Some(s.map.clone())),
            None => (member.size, None),
        };
        let inode = self.next_inode;
        self.next_inode += 1;
        Ok(Some(EntryMetadata {
            kind,
            uid,
            gid,
            mode,
            xattrs,
            mtime,
            size: if kind == EntryKind::File { size } else { 0 },
            target: if entry_type == tar::EntryType::Symlink {
                member.link.clone()
            } else {
                Vec::new()
            },
            sparse,
            inode,
            linked: false,
        }))
    }

    fn apply_entry<R: Read>(
        &mut self,
        archive: &mut TarReader<R>,
        member: &Member,
        stats: &mut LayerStats,
    ) -> Result<(), EntryProblem> {
        let Some(mut meta) = self.header_metadata(member)? else {
            return Ok(());
        };
        let hardlink = member.header.entry_type() == tar::EntryType::Link;
        let kind = meta.kind;
        let comps = normalize(&member.path)?;
        let Some((name, parent)) = comps.split_last() else {
            if kind != EntryKind::Directory || hardlink {
                return Err(EntryProblem::NotADirectoryRoot);
            }
            meta.inode = 1;
            self.metadata.insert(Vec::new(), meta);
            return Ok(());
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
            let target = &member.link;
            let target_real = self.link(dir, name, target, &mut removed)?;
            if removed {
                prune(&mut self.metadata, &real);
            }
            let record = self.metadata.get_mut(&target_real).ok_or_else(|| {
                EntryProblem::HardlinkTarget {
                    target: lossy(target),
                    reason: "has no record".into(),
                }
            })?;
            record.linked = true;
            let record = record.clone();
            self.metadata.insert(real.clone(), record);
        } else {
            match kind {
                EntryKind::File => {
                    let fd = create_excl(dir, name, &mut removed)?;
                    let file = File::from(fd);
                    stats.file_bytes += self.write_contents(archive, &file, member)?;
                }
                EntryKind::Directory => make_dir(dir, name, &mut removed)?,
                EntryKind::Symlink => {
                    retry_after_removal(dir, name, &mut removed, || {
                        rustix::fs::symlinkat(meta.target.as_slice(), dir, name)
                    })
                    .map_err(|e| errno_problem("creating symlink", e))?;
                }
                EntryKind::Fifo | EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => {
                    // A placeholder keeps whiteouts and replacements working on the staging
                    // tree; the builder writes the real node from the record.
                    drop(create_excl(dir, name, &mut removed)?);
                }
            }
            if removed {
                prune(&mut self.metadata, &real);
            }
            // Whatever was recorded at this path before (a directory emitted twice, say)
            // is replaced whole: the last header wins.
            self.metadata.insert(real.clone(), meta);
        }
        if removed {
            self.resolver.note_removal();
        }
        mark_added(&mut self.layer_added, real);
        Ok(())
    }

    /// Copies a regular file's data from the archive; sparse members are written at their
    /// offsets, leaving holes. Returns the bytes written.
    fn write_contents<R: Read>(
        &mut self,
        archive: &mut TarReader<R>,
        file: &File,
        member: &Member,
    ) -> Result<u64, EntryProblem> {
        let read_problem = |e: io::Error| io_problem("reading file data from the layer", e);
        let mut written = 0u64;
        match &member.sparse {
            None => loop {
                let n = archive.read_data(&mut self.buf).map_err(read_problem)?;
                if n == 0 {
                    break;
                }
                (&*file)
                    .write_all(&self.buf[..n])
                    .map_err(|e| io_problem("writing file data", e))?;
                written += n as u64;
            },
            Some(sparse) => {
                for &(offset, len) in &sparse.map {
                    let mut done = 0u64;
                    while done < len {
                        let want = ((len - done) as usize).min(self.buf.len());
                        archive
                            .read_data_exact(&mut self.buf[..want])
                            .map_err(read_problem)?;
                        file.write_all_at(&self.buf[..want], offset + done)
                            .map_err(|e| io_problem("writing file data", e))?;
                        done += want as u64;
                    }
                    written += len;
                }
                file.set_len(sparse.real_size)
                    .map_err(|e| io_problem("sizing a sparse file", e))?;
            }
        }
        Ok(written)
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
        let (same, links) = match (
            rustix::fs::statat(&tdir, *tname, AtFlags::SYMLINK_NOFOLLOW),
            rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
        ) {
            (Ok(a), Ok(b)) => (a.st_dev == b.st_dev && a.st_ino == b.st_ino, a.st_nlink),
            (Ok(a), Err(_)) => (false, a.st_nlink),
            (Err(Errno::NOENT), _) => return Err(refuse("does not exist")),
            (Err(e), _) => return Err(errno_problem("stat of hard link target", e)),
        };
        if !same {
            // st_nlink is u64 here but u32 on some targets.
            #[allow(clippy::unnecessary_cast)]
            let links = links as u64;
            if links >= EXT4_LINK_MAX {
                return Err(EntryProblem::TooManyLinks {
                    target: lossy(target),
                    limit: EXT4_LINK_MAX,
                });
            }
            // Without AT_SYMLINK_FOLLOW a symlink target is linked as the symlink itself,
            // never followed out of the tree.
            retry_after_removal(dir, name, removed, || {
                rustix::fs::linkat(&tdir, *tname, dir, name, AtFlags::empty())
            })
            .map_err(|e| match e {
                Errno::PERM => refuse("is a directory"),
                Errno::NOENT => refuse("does not exist"),
                Errno::MLINK => EntryProblem::TooManyLinks {
                    target: lossy(target),
                    limit: EXT4_LINK_MAX,
                },
                e => errno_problem("creating hard link", e),
            })?;
        }
        Ok(treal)
    }

    /// Handles `.wh.TARGET` in directory `parent`.
    fn whiteout(&mut self, parent: &[&[u8]], target: &[u8]) -> Result<(), EntryProblem> {
        if target == b".wh..opq" {
            // The opaque directory itself belongs to this layer.
            self.resolver
                .enter(parent, true, &mut self.created)
                .map_err(resolve_problem)?;
            self.record_created();
            let real = self.resolver.real().to_vec();
            mark_added(&mut self.layer_added, real.clone());
            let dir = rustix::fs::openat(
                self.resolver.dir(),
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| errno_problem("opening opaque directory", e))?;
            return self.clear_lower_of(dir, real);
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
        if self.layer_added.contains(&real) {
            // Whiteouts only hide lower layers, never what this layer adds, in whatever
            // order the tar lists them. A directory this layer (re-)added keeps what the
            // layer put in it, and loses whatever lower layers had there.
            let is_dir = self
                .metadata
                .get(&real)
                .is_some_and(|m| m.kind == EntryKind::Directory);
            if is_dir {
                let sub = open_subdir(self.resolver.dir(), target)
                    .map_err(|e| errno_problem("opening whited-out directory", e))?;
                self.clear_lower_of(sub, real)?;
            }
            return Ok(());
        }
        if remove_any(self.resolver.dir(), target, None)? {
            prune(&mut self.metadata, &real);
            self.resolver.note_removal();
        }
        Ok(())
    }

    /// Records directories the resolver created implicitly (root-owned 0755, as Docker).
    /// Removes what lower layers left below `dir`, this layer's directory `real` (see
    /// [`clear_lower`]), and tells the resolver that entries went.
    fn clear_lower_of(
        &mut self,
        dir: rustix::fd::OwnedFd,
        mut real: Vec<u8>,
    ) -> Result<(), EntryProblem> {
        clear_lower(
            dir.as_fd(),
            &mut real,
            &self.layer_added,
            &mut self.metadata,
        )?;
        self.resolver.note_removal();
        Ok(())
    }

    fn record_created(&mut self) {
        for real in std::mem::take(&mut self.created) {
            let meta = EntryMetadata::implicit_dir(self.next_inode);
            self.next_inode += 1;
            self.metadata.insert(real.clone(), meta);
            mark_added(&mut self.layer_added, real);
        }
    }

    /// Measures the tree (from the records: no walk of the staging directory) and hands
    /// it over.
    pub fn finish(self) -> Result<FlattenedTree, FlattenError> {
        let staging = self.staging;
        let root = rustix::fs::openat(
            self.resolver.root(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FlattenError::Staging {
            path: staging.clone(),
            op: "opening",
            source: e.into(),
        })?;
        let (content, entries, inodes) = measure(&self.metadata);
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
            next_inode: self.next_inode,
        })
    }

    /// Removes the staging directory, e.g. after a refused layer.
    pub fn discard(self) -> Result<(), FlattenError> {
        remove_staging(&self.staging)
    }
}

/// (content bytes, names, inodes) of a tree from its records, the root excluded.
fn measure(records: &BTreeMap<Vec<u8>, EntryMetadata>) -> (u64, u64, u64) {
    let (mut content, mut entries, mut inodes) = (0u64, 0u64, 0u64);
    let mut linked = HashSet::new();
    for (path, m) in records {
        if path.is_empty() {
            content += m.data_blocks_bytes();
            continue;
        }
        entries += 1;
        let name_len = path.len() - path.iter().rposition(|&b| b == b'/').map_or(0, |p| p + 1);
        // Its entry in the parent directory.
        content += (8 + name_len as u64).div_ceil(4) * 4;
        if m.linked && !linked.insert(m.inode) {
            continue;
        }
        inodes += 1;
        content += m.data_blocks_bytes();
        let xattr_bytes: usize = m.xattrs.iter().map(|(n, v)| n.len() + v.len() + 16).sum();
        if xattr_bytes > 80 {
            content += 4096;
        }
    }
    (content, entries, inodes)
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
        let key = |p: Vec<u8>| PathBuf::from(OsString::from_vec(p));
        if removed {
            let prefix = key(real.clone());
            self.metadata.retain(|k, _| !k.starts_with(&prefix));
        }
        for dir in created {
            let meta = EntryMetadata::implicit_dir(self.next_inode);
            self.next_inode += 1;
            self.metadata.insert(key(dir), meta);
            self.content_bytes += 4096;
            self.entries += 1;
            self.inodes += 1;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let meta = EntryMetadata {
            kind: EntryKind::File,
            uid,
            gid,
            mode: mode & 0o7777,
            xattrs: Vec::new(),
            mtime: Timestamp {
                sec: now.as_secs() as i64,
                nsec: now.subsec_nanos(),
            },
            size: contents.len() as u64,
            target: Vec::new(),
            sparse: None,
            inode: self.next_inode,
            linked: false,
        };
        self.next_inode += 1;
        self.metadata.insert(key(real), meta);
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
    let open = || banger_io::beneath::create_new_file_at(dir, name);
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
/// anything else at the name is replaced. Staged 0700 whatever the header says: the
/// record holds the real mode, and we must be able to write into it.
fn make_dir(dir: BorrowedFd<'_>, name: &[u8], removed: &mut bool) -> Result<(), EntryProblem> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => {
            let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| errno_problem("stat", e))?;
            if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                remove_any(dir, name, Some(false))?;
                *removed = true;
                rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| errno_problem("creating directory", e))?;
            }
            Ok(())
        }
        Err(e) => Err(errno_problem("creating directory", e)),
    }
}

/// Removes `dir/name` and, for a directory, everything below it. Returns whether
/// anything was there. `is_dir` skips the stat when the caller already knows.
fn remove_any(
    dir: BorrowedFd<'_>,
    name: &[u8],
    is_dir: Option<bool>,
) -> Result<bool, EntryProblem> {
    let is_dir = match is_directory(dir, name, is_dir) {
        Ok(d) => d,
        Err(Errno::NOENT) => return Ok(false),
        Err(e) => return Err(errno_problem("stat before removal", e)),
    };
    if is_dir {
        let sub = open_subdir(dir, name)
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

/// Whether `dir/name` is a directory: `known` when [`list`] could tell from `d_type`,
/// else from a stat of the entry itself (not what a symlink points at).
fn is_directory(dir: BorrowedFd<'_>, name: &[u8], known: Option<bool>) -> rustix::io::Result<bool> {
    match known {
        Some(d) => Ok(d),
        None => rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory),
    }
}

/// Opens the directory `dir/name` for listing, refusing a symlink in its place.
fn open_subdir(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<rustix::fd::OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
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

/// Removes everything below `dir` (at `real`) that this layer did not add, descending
/// into directories this layer added to so their lower content goes too: an opaque
/// directory, or a whiteout of a directory this layer re-added.
fn clear_lower(
    dir: BorrowedFd<'_>,
    real: &mut Vec<u8>,
    added: &HashSet<Vec<u8>>,
    metadata: &mut BTreeMap<Vec<u8>, EntryMetadata>,
) -> Result<(), EntryProblem> {
    for (name, is_dir) in list(dir).map_err(|e| errno_problem("listing opaque directory", e))? {
        let name = name.to_bytes();
        let len = real.len();
        join(real, name);
        if added.contains(real.as_slice()) {
            let is_dir = is_directory(dir, name, is_dir).map_err(|e| errno_problem("stat", e))?;
            if is_dir {
                let sub =
                    open_subdir(dir, name).map_err(|e| errno_problem("opening directory", e))?;
                clear_lower(sub.as_fd(), real, added, metadata)?;
            }
        } else {
            remove_any(dir, name, is_dir)?;
            prune(metadata, real);
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

/// PAX times are decimal seconds with an optional fraction, e.g. `1700000000.123456789` or
/// `-1.5`: seconds round towards minus infinity, so `-1.5` is -2 s + 0.5e9 ns.
fn parse_pax_time(value: &str) -> Option<Timestamp> {
    let (negative, digits) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (secs, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let nine: String = frac.chars().take(9).collect();
    let mut nsec: u32 = if nine.is_empty() {
        0
    } else {
        format!("{nine:0<9}").parse().ok()?
    };
    let mut sec = if negative { -secs } else { secs };
    if negative && nsec > 0 {
        sec -= 1;
        nsec = 1_000_000_000 - nsec;
    }
    Some(Timestamp { sec, nsec })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse_with_and_without_fraction() {
        let t = parse_pax_time("1700000000.5").unwrap();
        assert_eq!((t.sec, t.nsec), (1_700_000_000, 500_000_000));
        let t = parse_pax_time("42").unwrap();
        assert_eq!((t.sec, t.nsec), (42, 0));
        assert!(parse_pax_time("x").is_none());
        assert!(parse_pax_time("1.x").is_none());
    }

    #[test]
    fn negative_pax_times_round_towards_minus_infinity() {
        let t = parse_pax_time("-1.5").unwrap();
        assert_eq!((t.sec, t.nsec), (-2, 500_000_000));
        let t = parse_pax_time("-0.25").unwrap();
        assert_eq!((t.sec, t.nsec), (-1, 750_000_000));
        let t = parse_pax_time("-3").unwrap();
        assert_eq!((t.sec, t.nsec), (-3, 0));
        let t = parse_pax_time("-3.000").unwrap();
        assert_eq!((t.sec, t.nsec), (-3, 0));
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
