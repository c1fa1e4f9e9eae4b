//! A single-pass ext4 writer for flattened image trees.
//!
//! `mkfs.ext4 -d` copies a tree through libext2fs block by block, and when we ran
//! unprivileged `debugfs` then had to fix ownership: together they were most of an image
//! pull. An image rootfs is a special case that can be written directly: every file is
//! known up front and nothing is ever deleted, so each file gets one contiguous run of
//! blocks and the image is written front to back in one pass, with ownership, modes,
//! device numbers and xattrs taken from the flattener's record of the tar headers.
//!
//! The result is plain ext4 as the kernel and e2fsprogs know it (the tests run
//! `e2fsck -fn` on it): 4 KiB blocks, 256-byte inodes, extents, `flex_bg` with every bitmap
//! and inode table packed at the front, a journal, and `sparse_super2` without backup
//! superblocks, which would otherwise sit in the middle of the data area (an image is
//! rebuilt from its layers, never repaired from a backup). No metadata checksums and no
//! resize inode: `resize2fs` grows a VM's copy offline. The file is sparse: unused inode
//! table space and the journal read as zeros without being written.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Seek};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use banger_oci::flatten::{
    EntryKind, EntryMetadata, EXT4_LINK_MAX, MAX_DEVICE_MAJOR, MAX_DEVICE_MINOR,
};

use crate::sequential::SequentialWriter;
use rustix::fs::{Mode, OFlags, ResolveFlags};

const BLOCK: u64 = 4096;
const INODE_SIZE: usize = 256;
const EXTRA_ISIZE: usize = 32;
const BLOCKS_PER_GROUP: u64 = 32768;
const ROOT_INO: u32 = 2;
const JOURNAL_INO: u32 = 8;
const FIRST_INO: u32 = 11;
/// Longest run one initialized extent can describe.
const MAX_EXTENT_BLOCKS: u64 = 32768;
/// Extents that fit in the inode itself, and in one leaf block.
const INODE_EXTENTS: usize = 4;
const LEAF_EXTENTS: usize = ((BLOCK as usize) - 12) / 12;
/// Free blocks left after the group descriptor table so `resize2fs` can grow it in place
/// (room for 64 × 128 = 8192 groups, 1 TiB).
const GDT_GROWTH_BLOCKS: u64 = 63;
/// mkfs gives lost+found 16 KiB so e2fsck can reconnect files without allocating.
const LOST_FOUND_BLOCKS: u64 = 4;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;

const EXTENTS_FL: u32 = 0x80000;
const XATTR_MAGIC: u32 = 0xEA02_0000;

/// Why writing the image failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Reading the tree or writing the image failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The tree entry (`/`-rooted, inside the image) or the image file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The image cannot hold the tree.
    #[error("image too small: the tree needs {needed} {what}, the image has {available}")]
    NoSpace {
        /// Blocks or inodes.
        what: &'static str,
        /// How many the tree needs (at least).
        needed: u64,
        /// How many the image has.
        available: u64,
    },
    /// Something in the tree that ext4 (or this writer) cannot represent.
    #[error("{}: {reason}", path.display())]
    Unsupported {
        /// The entry, `/`-rooted inside the image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The filesystem to make.
#[derive(Debug, Clone)]
pub struct Geometry {
    /// Total size in bytes (rounded down to 4 KiB).
    pub size_bytes: u64,
    /// Inodes to reserve, at least.
    pub inodes: u64,
    /// Volume label (at most 16 bytes).
    pub label: String,
}

/// What was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Inodes in the filesystem.
    pub inode_count: u64,
    /// Inodes in use, the reserved ones included.
    pub inodes_used: u64,
    /// Blocks in use.
    pub blocks_used: u64,
    /// Regular file bytes copied.
    pub file_bytes: u64,
}

/// The tree to write: names and contents from the staging directory, everything else
/// from the flattener's records.
pub struct TreeSource<'a> {
    /// The tree's root directory.
    pub root: BorrowedFd<'a>,
    /// Every entry's attributes, keyed by root-relative path (see
    /// [`banger_oci::flatten::FlattenedTree::metadata`]); an entry without one is an error.
    pub metadata: &'a BTreeMap<PathBuf, EntryMetadata>,
    /// Whether the flattener ran as root. Informational: the host's ownership, modes and
    /// xattrs are never read, so the image is the same either way.
    pub privileged: bool,
}

struct Layout {
    blocks: u64,
    groups: u64,
    inodes_per_group: u64,
    itable_blocks: u64,
    gdt_blocks: u64,
    block_bitmaps: u64,
    inode_bitmaps: u64,
    inode_tables: u64,
    journal_start: u64,
    journal_blocks: u64,
    data_start: u64,
}

impl Layout {
    fn new(geometry: &Geometry) -> Result<Layout, WriteError> {
        let blocks = geometry.size_bytes / BLOCK;
        let groups = blocks.div_ceil(BLOCKS_PER_GROUP).max(1);
        // A multiple of the 16 inodes in a table block, at most what one bitmap block
        // tracks.
        let inodes_per_group = geometry.inodes.max(64).div_ceil(groups).div_ceil(16) * 16;
        if inodes_per_group > BLOCK * 8 {
            return Err(WriteError::NoSpace {
                what: "inodes",
                needed: geometry.inodes,
                available: groups * BLOCK * 8,
            });
        }
        let itable_blocks = inodes_per_group * INODE_SIZE as u64 / BLOCK;
        let gdt_blocks = (groups * 32).div_ceil(BLOCK);
        let block_bitmaps = 1 + gdt_blocks + GDT_GROWTH_BLOCKS;
        let inode_bitmaps = block_bitmaps + groups;
        let inode_tables = inode_bitmaps + groups;
        let journal_start = inode_tables + groups * itable_blocks;
        let journal_blocks = default_journal_blocks(blocks);
        let data_start = journal_start + journal_blocks;
        if data_start + 64 > blocks {
            return Err(WriteError::NoSpace {
                what: "blocks",
                needed: data_start + 64,
                available: blocks,
            });
        }
        Ok(Layout {
            blocks,
            groups,
            inodes_per_group,
            itable_blocks,
            gdt_blocks,
            block_bitmaps,
            inode_bitmaps,
            inode_tables,
            journal_start,
            journal_blocks,
            data_start,
        })
    }

    fn inode_count(&self) -> u64 {
        self.groups * self.inodes_per_group
    }

    fn group_blocks(&self, group: u64) -> (u64, u64) {
        let start = group * BLOCKS_PER_GROUP;
        (start, ((group + 1) * BLOCKS_PER_GROUP).min(self.blocks))
    }
}

/// e2fsprogs' `ext2fs_default_journal_size`: guests get the journal mkfs would give them.
fn default_journal_blocks(blocks: u64) -> u64 {
    match blocks {
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Time {
    sec: i64,
    nsec: u32,
}

impl Time {
    /// ext4's 32-bit seconds plus the "extra" word: nanoseconds and two epoch bits.
    fn encode(self) -> (u32, u32) {
        let low = self.sec as i32;
        let epoch = ((self.sec - i64::from(low)) >> 32) as u32 & 3;
        (low as u32, epoch | (self.nsec << 2))
    }
}

#[derive(Debug, Clone)]
struct Inode {
    /// Type and permission bits; 0 for an unused (reserved) inode.
    mode: u16,
    uid: u32,
    gid: u32,
    size: u64,
    atime: Time,
    ctime: Time,
    mtime: Time,
    links: u32,
    flags: u32,
    /// `i_block`: extent tree root, fast symlink target or device number.
    block: [u8; 60],
    /// Blocks owned (data, extent leaf, xattr block).
    owned_blocks: u64,
    xattr_block: u32,
    /// Encoded in-inode xattrs (magic, entries, values), at most the inode's free tail.
    inline_xattrs: Vec<u8>,
    /// An xattr block still to be allocated and written.
    xattr_block_data: Option<Vec<u8>>,
}

impl Default for Inode {
    fn default() -> Self {
        Inode {
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            atime: Time::default(),
            ctime: Time::default(),
            mtime: Time::default(),
            links: 0,
            flags: 0,
            block: [0; 60],
            owned_blocks: 0,
            xattr_block: 0,
            inline_xattrs: Vec::new(),
            xattr_block_data: None,
        }
    }
}

impl Inode {
    fn encode(&self, out: &mut [u8]) {
        let put16 =
            |out: &mut [u8], at: usize, v: u16| out[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 =
            |out: &mut [u8], at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_le_bytes());
        out[..INODE_SIZE].fill(0);
        put16(out, 0, self.mode);
        put16(out, 2, self.uid as u16);
        put32(out, 4, self.size as u32);
        let (atime, atime_x) = self.atime.encode();
        let (ctime, ctime_x) = self.ctime.encode();
        let (mtime, mtime_x) = self.mtime.encode();
        put32(out, 8, atime);
        put32(out, 12, ctime);
        put32(out, 16, mtime);
        put16(out, 24, self.gid as u16);
        put16(out, 26, self.links as u16);
        let sectors = self.owned_blocks * (BLOCK / 512);
        put32(out, 28, sectors as u32);
        put32(out, 32, self.flags);
        out[40..100].copy_from_slice(&self.block);
        put32(out, 104, self.xattr_block);
        put32(out, 108, (self.size >> 32) as u32);
        put16(out, 116, (sectors >> 32) as u16);
        put16(out, 120, (self.uid >> 16) as u16);
        put16(out, 122, (self.gid >> 16) as u16);
        put16(out, 128, EXTRA_ISIZE as u16);
        put32(out, 132, ctime_x);
        put32(out, 136, mtime_x);
        put32(out, 140, atime_x);
        put32(out, 144, ctime);
        put32(out, 148, ctime_x);
        let tail = 128 + EXTRA_ISIZE;
        out[tail..tail + self.inline_xattrs.len()].copy_from_slice(&self.inline_xattrs);
    }
}

/// Writes `tree` as an ext4 filesystem into `out`, sizing the file to
/// [`Geometry::size_bytes`]. `out` should be a new, empty file: blocks nobody writes must
/// read as zeros.
pub fn write_image(
    tree: &TreeSource<'_>,
    out: &File,
    geometry: &Geometry,
) -> Result<WriteStats, WriteError> {
    if geometry.label.len() > 16 {
        return Err(WriteError::Unsupported {
            path: PathBuf::from("/"),
            reason: format!("label {:?} is longer than 16 bytes", geometry.label),
        });
    }
    let layout = Layout::new(geometry)?;
    out.set_len(layout.blocks * BLOCK)
        .map_err(|e| image_err("sizing", e))?;
    let mut writer = Writer {
        tree,
        out,
        layout: &layout,
        cursor: layout.data_start,
        // Inode n is `inodes[n - 1]`; 1..=10 are reserved and stay empty but for the
        // root and the journal.
        inodes: vec![Inode::default(); FIRST_INO as usize - 1],
        seen: HashMap::new(),
        stream: Some(
            SequentialWriter::new(out, layout.data_start * BLOCK)
                .map_err(|e| image_err("starting the writer for", e))?,
        ),
        now: now(),
        file_bytes: 0,
    };
    writer.write_tree()?;
    writer.finish(&geometry.label)
}

fn image_err(op: &'static str, source: io::Error) -> WriteError {
    WriteError::Io {
        op,
        path: PathBuf::from("the image file"),
        source,
    }
}

fn tree_err(op: &'static str, path: &[u8], source: io::Error) -> WriteError {
    WriteError::Io {
        op,
        path: shown(path),
        source,
    }
}

/// How an entry is named in errors: `/`-rooted, as inside the image.
fn shown(path: &[u8]) -> PathBuf {
    let mut p = PathBuf::from("/");
    p.push(std::ffi::OsStr::from_bytes(path));
    p
}

fn now() -> Time {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Time {
        sec: d.as_secs() as i64,
        nsec: d.subsec_nanos(),
    }
}

struct Writer<'a, 'b> {
    tree: &'a TreeSource<'b>,
    out: &'a File,
    layout: &'a Layout,
    /// Next free block: everything from `data_start` up to here is in use.
    cursor: u64,
    inodes: Vec<Inode>,
    /// Hard-linked inodes: the record's inode id → our inode number.
    seen: HashMap<u64, u32>,
    /// The data area's writer; taken when the data is complete.
    stream: Option<SequentialWriter>,
    now: Time,
    file_bytes: u64,
}

struct Child<'m> {
    name: Vec<u8>,
    ino: u32,
    /// The entry's record; `None` for lost+found, which the writer makes itself.
    meta: Option<&'m EntryMetadata>,
    kind: EntryKind,
    /// The first name of its inode (false for further hard links and lost+found).
    fresh: bool,
}

/// A directory waiting to be written: its path, inode and parent's inode. No descriptor
/// is held for it (a directory of 20,000 subdirectories would need 20,000): it is opened
/// by path when its turn comes.
type PendingDir = (Vec<u8>, u32, u32);

/// ext4's seconds range with the two epoch bits of the extra field: 1901-12-13 to
/// 2446-05-10. Times outside are clamped to it, as the kernel does when a file's time is
/// set out of a filesystem's range.
const EXT4_MIN_TIME: i64 = i32::MIN as i64;
const EXT4_MAX_TIME: i64 = i32::MAX as i64 + 3 * (1i64 << 32);

/// A zero run this long (in blocks, 32 KiB) or longer inside a file is left as a hole,
/// as mkfs does for zero blocks: shorter runs stay data, so files do not splinter into
/// many extents.
pub const ZERO_RUN_HOLE_BLOCKS: u64 = 8;

/// Most data runs a file is split into by holes; past it zeros are stored like data.
/// Keeps every file within the extents one index level holds.
const MAX_FILE_RUNS: usize = 1024;

/// Share of blocks reserved for root (`s_r_blocks_count`), as a percentage. mkfs reserves
/// 5 %; a sandbox image's processes are its users' own and mostly run as root, for whom a
/// reserve is not a reserve: it would only take 5 % of every image from unprivileged
/// users. So none (docs/oci-import.md).
pub const RESERVED_BLOCKS_PERCENT: u64 = 0;

impl<'b> Writer<'_, 'b> {
    fn inode(&mut self, ino: u32) -> &mut Inode {
        &mut self.inodes[ino as usize - 1]
    }

    fn new_inode(&mut self) -> Result<u32, WriteError> {
        let ino = self.inodes.len() as u64 + 1;
        if ino > self.layout.inode_count() {
            return Err(WriteError::NoSpace {
                what: "inodes",
                needed: ino,
                available: self.layout.inode_count(),
            });
        }
        self.inodes.push(Inode::default());
        Ok(ino as u32)
    }

    /// Takes `count` blocks from the contiguous free area.
    fn alloc(&mut self, count: u64) -> Result<u64, WriteError> {
        let start = self.cursor;
        if start + count > self.layout.blocks {
            return Err(WriteError::NoSpace {
                what: "blocks",
                needed: start + count,
                available: self.layout.blocks,
            });
        }
        self.cursor += count;
        Ok(start)
    }

    /// Writes whole metadata blocks in place, and the data area through the sequential
    /// stream (everything there is written in allocation order).
    fn write_at(&mut self, block: u64, data: &[u8]) -> Result<(), WriteError> {
        match self.stream.as_mut() {
            Some(stream) if block >= self.layout.data_start => stream.write_at(block * BLOCK, data),
            _ => self.out.write_all_at(data, block * BLOCK),
        }
        .map_err(|e| image_err("writing", e))
    }

    fn record(&self, path: &[u8]) -> Result<&'b EntryMetadata, WriteError> {
        let metadata: &'b BTreeMap<PathBuf, EntryMetadata> = self.tree.metadata;
        metadata
            .get(Path::new(std::ffi::OsStr::from_bytes(path)))
            .ok_or_else(|| WriteError::Unsupported {
                path: shown(path),
                reason: "the flattener has no record of this entry".into(),
            })
    }

    /// Opens a staged directory by its path, refusing symlinks on the way (there are none
    /// in a record's symlink-free path, so one would mean the tree changed under us).
    fn open_dir(&self, path: &[u8]) -> Result<OwnedFd, WriteError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let shown_err = |e: rustix::io::Errno| tree_err("opening", path, e.into());
        if path.is_empty() {
            return rustix::fs::openat(self.tree.root, ".", flags, Mode::empty())
                .map_err(shown_err);
        }
        match rustix::fs::openat2(
            self.tree.root,
            std::ffi::OsStr::from_bytes(path),
            flags,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(rustix::io::Errno::NOSYS) => {
                // Kernels before 5.6: one component at a time, never following a symlink.
                let mut fd = rustix::fs::openat(self.tree.root, ".", flags, Mode::empty())
                    .map_err(shown_err)?;
                for comp in path.split(|&b| b == b'/') {
                    fd = rustix::fs::openat(&fd, comp, flags, Mode::empty()).map_err(shown_err)?;
                }
                Ok(fd)
            }
            other => other.map_err(shown_err),
        }
    }

    fn write_tree(&mut self) -> Result<(), WriteError> {
        let root_meta = self.record(b"")?;
        let mut root = Inode::default();
        self.fill_attrs(&mut root, root_meta, b"")?;
        *self.inode(ROOT_INO) = root;
        let mut pending: Vec<PendingDir> = vec![(Vec::new(), ROOT_INO, ROOT_INO)];
        // Depth first, children in name order: directories are numbered as their parent is
        // listed, files are written as they are met, so the image is filled front to back.
        while let Some((path, ino, parent)) = pending.pop() {
            let dir_fd = self.open_dir(&path)?;
            let mut children = self.list(dir_fd.as_fd(), &path)?;
            if ino == ROOT_INO && !children.iter().any(|c| c.name == b"lost+found") {
                let lpf = self.lost_found()?;
                children.push(Child {
                    name: b"lost+found".to_vec(),
                    ino: lpf,
                    meta: None,
                    kind: EntryKind::Directory,
                    fresh: false,
                });
            }
            children.sort_by(|a, b| a.name.cmp(&b.name));
            let subdirs = children
                .iter()
                .filter(|c| c.kind == EntryKind::Directory)
                .count() as u32;
            let data = dir_blocks(&children, ino, parent);
            let links = 2 + subdirs;
            self.place_data(ino, &data, &path)?;
            let dir = self.inode(ino);
            // DIR_NLINK: past ext4's link limit a directory counts as 1 ("many").
            dir.links = if links >= 65000 { 1 } else { links };

            let mut subdirs = Vec::new();
            for child in &children {
                let (true, Some(meta)) = (child.fresh, child.meta) else {
                    continue;
                };
                let child_path = join(&path, &child.name);
                if child.kind == EntryKind::Directory {
                    let mut inode = Inode::default();
                    self.fill_attrs(&mut inode, meta, &child_path)?;
                    *self.inode(child.ino) = inode;
                    subdirs.push((child_path, child.ino, ino));
                } else {
                    self.write_entry(dir_fd.as_fd(), child, meta, &child_path)?;
                }
            }
            pending.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    /// Lists a directory: names, inode numbers (hard links resolved) and records.
    fn list(&mut self, dir: BorrowedFd<'_>, path: &[u8]) -> Result<Vec<Child<'b>>, WriteError> {
        let mut children = Vec::new();
        let mut reader =
            rustix::fs::Dir::read_from(dir).map_err(|e| tree_err("listing", path, e.into()))?;
        while let Some(entry) = reader.read() {
            let entry = entry.map_err(|e| tree_err("listing", path, e.into()))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = name.to_vec();
            let child_path = join(path, &name);
            let meta = self.record(&child_path)?;
            let kind = meta.kind;
            if meta.linked && kind != EntryKind::Directory {
                if let Some(&ino) = self.seen.get(&meta.inode) {
                    let links = &mut self.inode(ino).links;
                    *links += 1;
                    if u64::from(*links) > EXT4_LINK_MAX {
                        return Err(WriteError::Unsupported {
                            path: shown(&child_path),
                            reason: format!(
                                "more than ext4's {EXT4_LINK_MAX} hard links to one inode"
                            ),
                        });
                    }
                    children.push(Child {
                        name,
                        ino,
                        meta: Some(meta),
                        kind,
                        fresh: false,
                    });
                    continue;
                }
            }
            let ino = self.new_inode()?;
            if meta.linked && kind != EntryKind::Directory {
                self.seen.insert(meta.inode, ino);
            }
            self.inode(ino).links = 1;
            children.push(Child {
                name,
                ino,
                meta: Some(meta),
                kind,
                fresh: true,
            });
        }
        Ok(children)
    }

    /// Mode, ownership, times and xattrs of one entry, all from its record.
    fn fill_attrs(
        &self,
        inode: &mut Inode,
        meta: &EntryMetadata,
        path: &[u8],
    ) -> Result<(), WriteError> {
        let perm = if meta.kind == EntryKind::Symlink {
            0o777
        } else {
            meta.mode & 0o7777
        };
        inode.mode = (meta.kind.type_bits() | perm) as u16;
        inode.uid = meta.uid;
        inode.gid = meta.gid;
        let mut sec = meta.mtime.sec;
        let mut nsec = meta.mtime.nsec;
        if !(EXT4_MIN_TIME..=EXT4_MAX_TIME).contains(&sec) {
            tracing::warn!(
                entry = %shown(path).display(),
                mtime = sec,
                "mtime outside ext4's range (1901-12-13 to 2446-05-10): clamped"
            );
            sec = sec.clamp(EXT4_MIN_TIME, EXT4_MAX_TIME);
            nsec = 0;
        }
        inode.mtime = Time { sec, nsec };
        inode.atime = inode.mtime;
        inode.ctime = self.now;
        if !meta.xattrs.is_empty() {
            let encoded =
                encode_xattrs(&meta.xattrs).map_err(|reason| WriteError::Unsupported {
                    path: shown(path),
                    reason,
                })?;
            inode.inline_xattrs = encoded.inline;
            // Allocated later, in data order, by whoever places the inode's blocks.
            inode.xattr_block_data = encoded.block;
        }
        Ok(())
    }

    /// Writes the xattr block an inode asked for in [`fill_attrs`](Self::fill_attrs).
    fn place_xattr_block(&mut self, ino: u32) -> Result<(), WriteError> {
        let Some(data) = self.inode(ino).xattr_block_data.take() else {
            return Ok(());
        };
        let block = self.alloc(1)?;
        self.write_at(block, &data)?;
        let inode = self.inode(ino);
        inode.xattr_block = block as u32;
        inode.owned_blocks += 1;
        Ok(())
    }

    /// Allocates and writes `data` (whole blocks) as the content of `ino`.
    fn place_data(&mut self, ino: u32, data: &[u8], path: &[u8]) -> Result<(), WriteError> {
        let nblocks = (data.len() as u64).div_ceil(BLOCK);
        let start = self.alloc(nblocks)?;
        self.write_at(start, data)?;
        let extents = split_extents(0, nblocks, start);
        self.set_extents(ino, &extents, nblocks, path)?;
        self.inode(ino).size = if self.inode(ino).mode & 0o170000 == 0o040000 {
            nblocks * BLOCK
        } else {
            data.len() as u64
        };
        self.place_xattr_block(ino)
    }

    /// Points `ino` at `extents` (logical block, length, physical block) holding `data`
    /// blocks, with leaf blocks when more than four extents are needed.
    fn set_extents(
        &mut self,
        ino: u32,
        extents: &[(u32, u16, u64)],
        data: u64,
        path: &[u8],
    ) -> Result<(), WriteError> {
        let mut root = [0u8; 60];
        let mut owned = data;
        if extents.len() <= INODE_EXTENTS {
            extent_node(&mut root, INODE_EXTENTS, 0, extents);
        } else if extents.len() <= INODE_EXTENTS * LEAF_EXTENTS {
            // Depth 1: up to four index entries, each pointing at a full leaf.
            let leaves: Vec<&[(u32, u16, u64)]> = extents.chunks(LEAF_EXTENTS).collect();
            let first = self.alloc(leaves.len() as u64)?;
            let mut blocks = vec![0u8; leaves.len() * BLOCK as usize];
            for (i, leaf) in leaves.iter().enumerate() {
                let at = i * BLOCK as usize;
                extent_node(&mut blocks[at..at + BLOCK as usize], LEAF_EXTENTS, 0, leaf);
            }
            self.write_at(first, &blocks)?;
            root[0..2].copy_from_slice(&0xF30Au16.to_le_bytes());
            root[2..4].copy_from_slice(&(leaves.len() as u16).to_le_bytes());
            root[4..6].copy_from_slice(&(INODE_EXTENTS as u16).to_le_bytes());
            root[6..8].copy_from_slice(&1u16.to_le_bytes());
            for (i, leaf) in leaves.iter().enumerate() {
                let at = 12 + 12 * i;
                let block = first + i as u64;
                root[at..at + 4].copy_from_slice(&leaf[0].0.to_le_bytes());
                root[at + 4..at + 8].copy_from_slice(&(block as u32).to_le_bytes());
                root[at + 8..at + 10].copy_from_slice(&((block >> 32) as u16).to_le_bytes());
            }
            owned += leaves.len() as u64;
        } else {
            return Err(WriteError::Unsupported {
                path: shown(path),
                reason: format!(
                    "file needs {} extents, more than this writer supports ({})",
                    extents.len(),
                    INODE_EXTENTS * LEAF_EXTENTS
                ),
            });
        }
        let inode = self.inode(ino);
        inode.block = root;
        inode.flags |= EXTENTS_FL;
        inode.owned_blocks += owned;
        Ok(())
    }

    fn lost_found(&mut self) -> Result<u32, WriteError> {
        let ino = self.new_inode()?;
        let mut data = dir_blocks(&[], ino, ROOT_INO);
        data.resize((LOST_FOUND_BLOCKS * BLOCK) as usize, 0);
        for extra in 1..LOST_FOUND_BLOCKS as usize {
            // An empty directory block: one unused entry spanning all of it.
            let at = extra * BLOCK as usize;
            data[at + 4..at + 6].copy_from_slice(&(BLOCK as u16).to_le_bytes());
        }
        let now = self.now;
        *self.inode(ino) = Inode {
            mode: 0o040700,
            links: 2,
            atime: now,
            ctime: now,
            mtime: now,
            ..Inode::default()
        };
        self.place_data(ino, &data, b"lost+found")?;
        Ok(ino)
    }

    /// Writes one non-directory entry: attributes, then content.
    fn write_entry(
        &mut self,
        dir: BorrowedFd<'_>,
        child: &Child<'_>,
        meta: &EntryMetadata,
        path: &[u8],
    ) -> Result<(), WriteError> {
        let links = self.inode(child.ino).links;
        let mut inode = Inode {
            links,
            ..Inode::default()
        };
        self.fill_attrs(&mut inode, meta, path)?;
        match child.kind {
            EntryKind::File => {
                let fd = rustix::fs::openat(
                    dir,
                    child.name.as_slice(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| tree_err("opening", path, e.into()))?;
                *self.inode(child.ino) = inode;
                self.copy_file(child.ino, File::from(fd), meta, path)?;
            }
            EntryKind::Symlink => {
                let target = &meta.target;
                if target.len() < 60 {
                    // A fast symlink: the target lives in i_block.
                    inode.block[..target.len()].copy_from_slice(target);
                    inode.size = target.len() as u64;
                    *self.inode(child.ino) = inode;
                    self.place_xattr_block(child.ino)?;
                } else {
                    *self.inode(child.ino) = inode;
                    self.place_data(child.ino, target, path)?;
                }
            }
            EntryKind::Fifo | EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => {
                if let EntryKind::CharDevice { major, minor }
                | EntryKind::BlockDevice { major, minor } = child.kind
                {
                    if major > MAX_DEVICE_MAJOR || minor > MAX_DEVICE_MINOR {
                        return Err(WriteError::Unsupported {
                            path: shown(path),
                            reason: format!(
                                "device {major}:{minor} does not fit ext4's 12-bit major and 20-bit minor"
                            ),
                        });
                    }
                    if major < 256 && minor < 256 {
                        let old = (major << 8) | minor;
                        inode.block[0..4].copy_from_slice(&old.to_le_bytes());
                    } else {
                        let new = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                        inode.block[4..8].copy_from_slice(&new.to_le_bytes());
                    }
                }
                *self.inode(child.ino) = inode;
                self.place_xattr_block(child.ino)?;
            }
            EntryKind::Directory => unreachable!("directories are written by write_tree"),
        }
        Ok(())
    }

    /// Copies a regular file's bytes into runs of blocks, leaving zero runs of at least
    /// [`ZERO_RUN_HOLE_BLOCKS`] and the holes of a sparse file unallocated.
    fn copy_file(
        &mut self,
        ino: u32,
        mut file: File,
        meta: &EntryMetadata,
        path: &[u8],
    ) -> Result<(), WriteError> {
        let size = meta.size;
        if size.div_ceil(BLOCK) > u64::from(u32::MAX) {
            return Err(WriteError::Unsupported {
                path: shown(path),
                reason: format!("file of {size} bytes is larger than ext4's 16 TiB"),
            });
        }
        // Block-aligned byte ranges that may hold data: all of it, or a sparse file's
        // segments widened to whole blocks.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        match &meta.sparse {
            None => ranges.push((0, size)),
            Some(map) => {
                for &(offset, len) in map.iter().filter(|s| s.1 > 0) {
                    let start = offset / BLOCK * BLOCK;
                    let end = (offset + len)
                        .div_ceil(BLOCK)
                        .saturating_mul(BLOCK)
                        .min(size);
                    match ranges.last_mut() {
                        Some(last) if start <= last.1 => last.1 = last.1.max(end),
                        _ => ranges.push((start, end)),
                    }
                }
            }
        }
        let most = ranges
            .iter()
            .map(|r| (r.1 - r.0).div_ceil(BLOCK))
            .sum::<u64>();
        if self.cursor + most > self.layout.blocks {
            return Err(WriteError::NoSpace {
                what: "blocks",
                needed: self.cursor + most,
                available: self.layout.blocks,
            });
        }
        let mut extents = Vec::new();
        let mut physical = self.cursor;
        let mut runs_left = MAX_FILE_RUNS;
        let stream = self.stream.as_mut().expect("the stream lives until finish");
        for (start, end) in ranges {
            let copy_err = |e: io::Error| match e.kind() {
                io::ErrorKind::UnexpectedEof => tree_err("reading", path, e),
                _ => image_err("writing", e),
            };
            if start > 0 {
                // Only sparse files skip ahead; a dense one is read from where open left it.
                file.seek(io::SeekFrom::Start(start))
                    .map_err(|e| tree_err("reading", path, e))?;
            }
            let runs = stream
                .copy_skipping_zeros(
                    physical * BLOCK,
                    &mut file,
                    end - start,
                    ZERO_RUN_HOLE_BLOCKS,
                    runs_left,
                )
                .map_err(copy_err)?;
            runs_left = runs_left.saturating_sub(runs.len()).max(1);
            for (first, count) in runs {
                extents.extend(split_extents(start / BLOCK + first, count, physical));
                physical += count;
            }
        }
        let data = physical - self.cursor;
        self.cursor = physical;
        self.file_bytes += size;
        self.set_extents(ino, &extents, data, path)?;
        self.inode(ino).size = size;
        self.place_xattr_block(ino)
    }

    /// The journal, inode tables, bitmaps, group descriptors and superblock.
    fn finish(mut self, label: &str) -> Result<WriteStats, WriteError> {
        let layout = self.layout;
        if let Some(stream) = self.stream.take() {
            let direct = stream.finish().map_err(|e| image_err("writing", e))?;
            tracing::debug!(direct, "image data area written");
        }
        // The journal: one run of zeros (a hole) but for its superblock.
        let uuid: [u8; 16] = rand_bytes();
        let journal = JOURNAL_INO;
        *self.inode(journal) = Inode {
            mode: 0o100600,
            links: 1,
            atime: self.now,
            ctime: self.now,
            mtime: self.now,
            ..Inode::default()
        };
        let extents = split_extents(0, layout.journal_blocks, layout.journal_start);
        self.set_extents(journal, &extents, layout.journal_blocks, b"<journal>")?;
        self.inode(journal).size = layout.journal_blocks * BLOCK;
        self.write_at(
            layout.journal_start,
            &journal_superblock(layout.journal_blocks, &uuid),
        )?;

        let used_inodes = self.inodes.len() as u64;
        let used_blocks_end = self.cursor;
        let mut table = vec![0u8; INODE_SIZE];
        // Inode tables: only the used prefix of each group's table is written.
        for group in 0..layout.groups {
            let first = group * layout.inodes_per_group;
            if first >= used_inodes {
                break;
            }
            let last = (first + layout.inodes_per_group).min(used_inodes);
            let mut buf = vec![0u8; ((last - first) as usize) * INODE_SIZE];
            for (i, index) in (first..last).enumerate() {
                self.inodes[index as usize].encode(&mut table);
                buf[i * INODE_SIZE..(i + 1) * INODE_SIZE].copy_from_slice(&table);
            }
            self.write_at(layout.inode_tables + group * layout.itable_blocks, &buf)?;
        }

        // Bitmaps and descriptors. In use: block 0 through the descriptor table, then
        // everything from the bitmaps up to the cursor (the growth gap stays free).
        let used_ranges = [
            (0, 1 + layout.gdt_blocks),
            (layout.block_bitmaps, used_blocks_end),
        ];
        let mut gdt = vec![0u8; (layout.gdt_blocks * BLOCK) as usize];
        let mut free_blocks_total = 0;
        let mut free_inodes_total = 0;
        let mut bitmaps = vec![0u8; (2 * layout.groups * BLOCK) as usize];
        for group in 0..layout.groups {
            let (start, end) = layout.group_blocks(group);
            let bitmap = &mut bitmaps[(group * BLOCK) as usize..((group + 1) * BLOCK) as usize];
            let mut used = 0;
            for &(from, to) in &used_ranges {
                let (from, to) = (from.max(start), to.min(end));
                if from < to {
                    set_bits(bitmap, (from - start) as usize, (to - start) as usize);
                    used += to - from;
                }
            }
            // Past the end of the filesystem counts as in use.
            set_bits(bitmap, (end - start) as usize, (BLOCK * 8) as usize);
            let free_blocks = (end - start) - used;

            let first = group * layout.inodes_per_group;
            let used_here = used_inodes
                .saturating_sub(first)
                .min(layout.inodes_per_group);
            let offset = ((layout.groups + group) * BLOCK) as usize;
            let ibitmap = &mut bitmaps[offset..offset + BLOCK as usize];
            set_bits(ibitmap, 0, used_here as usize);
            set_bits(
                ibitmap,
                layout.inodes_per_group as usize,
                (BLOCK * 8) as usize,
            );
            let free_inodes = layout.inodes_per_group - used_here;
            let dirs = (first..first + used_here)
                .filter(|&i| self.inodes[i as usize].mode & 0o170000 == 0o040000)
                .count();

            let d = &mut gdt[(group * 32) as usize..(group * 32 + 32) as usize];
            d[0..4].copy_from_slice(&((layout.block_bitmaps + group) as u32).to_le_bytes());
            d[4..8].copy_from_slice(&((layout.inode_bitmaps + group) as u32).to_le_bytes());
            d[8..12].copy_from_slice(
                &((layout.inode_tables + group * layout.itable_blocks) as u32).to_le_bytes(),
            );
            d[12..14].copy_from_slice(&(free_blocks as u16).to_le_bytes());
            d[14..16].copy_from_slice(&(free_inodes as u16).to_le_bytes());
            d[16..18].copy_from_slice(&(dirs as u16).to_le_bytes());
            free_blocks_total += free_blocks;
            free_inodes_total += free_inodes;
        }
        self.write_at(layout.block_bitmaps, &bitmaps)?;
        self.write_at(1, &gdt)?;

        let journal_block = self.inodes[JOURNAL_INO as usize - 1].block;
        let sb = Superblock {
            layout,
            free_blocks: free_blocks_total,
            free_inodes: free_inodes_total,
            uuid,
            label,
            now: self.now,
            journal_block,
            journal_size: layout.journal_blocks * BLOCK,
        }
        .encode();
        self.out
            .write_all_at(&sb, 1024)
            .map_err(|e| image_err("writing the superblock to", e))?;
        Ok(WriteStats {
            inode_count: layout.inode_count(),
            inodes_used: used_inodes,
            blocks_used: layout.blocks - free_blocks_total,
            file_bytes: self.file_bytes,
        })
    }
}

fn join(path: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = path.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Extents (logical, length, physical) for `count` blocks from logical `logical`, stored
/// from `physical` on, cut to what one extent describes.
fn split_extents(logical: u64, count: u64, physical: u64) -> Vec<(u32, u16, u64)> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < count {
        let len = (count - done).min(MAX_EXTENT_BLOCKS);
        out.push(((logical + done) as u32, len as u16, physical + done));
        done += len;
    }
    out
}

fn set_bits(bitmap: &mut [u8], from: usize, to: usize) {
    for bit in from..to.min(bitmap.len() * 8) {
        bitmap[bit / 8] |= 1 << (bit % 8);
    }
}

fn rand_bytes() -> [u8; 16] {
    let mut bytes: [u8; 16] = rand::random();
    // RFC 4122 version 4, variant 1, as mkfs makes them.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes
}

/// An extent node (header + entries) for `extents` of (logical block, length, start).
fn extent_node(out: &mut [u8], max: usize, depth: u16, extents: &[(u32, u16, u64)]) {
    out[0..2].copy_from_slice(&0xF30Au16.to_le_bytes());
    out[2..4].copy_from_slice(&(extents.len() as u16).to_le_bytes());
    out[4..6].copy_from_slice(&(max as u16).to_le_bytes());
    out[6..8].copy_from_slice(&depth.to_le_bytes());
    for (i, &(logical, len, start)) in extents.iter().enumerate() {
        let e = &mut out[12 + i * 12..24 + i * 12];
        e[0..4].copy_from_slice(&logical.to_le_bytes());
        e[4..6].copy_from_slice(&len.to_le_bytes());
        e[6..8].copy_from_slice(&((start >> 32) as u16).to_le_bytes());
        e[8..12].copy_from_slice(&(start as u32).to_le_bytes());
    }
}

fn file_type_code(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::File => 1,
        EntryKind::Directory => 2,
        EntryKind::CharDevice { .. } => 3,
        EntryKind::BlockDevice { .. } => 4,
        EntryKind::Fifo => 5,
        EntryKind::Symlink => 7,
    }
}

/// A linear directory: `.`, `..`, then `children`, packed into whole blocks.
fn dir_blocks(children: &[Child], ino: u32, parent: u32) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK as usize];
    let mut block_start = 0usize;
    let mut at = 0usize;
    let mut last: Option<usize> = None;
    let entries = [(b".".as_slice(), ino, 2u8), (b"..".as_slice(), parent, 2u8)]
        .into_iter()
        .chain(
            children
                .iter()
                .map(|c| (c.name.as_slice(), c.ino, file_type_code(c.kind))),
        );
    for (name, ino, kind) in entries {
        let len = (8 + name.len()).div_ceil(4) * 4;
        if at + len > block_start + BLOCK as usize {
            // Close this block: the last entry spans to its end.
            if let Some(prev) = last {
                let rec = (block_start + BLOCK as usize - prev) as u16;
                out[prev + 4..prev + 6].copy_from_slice(&rec.to_le_bytes());
            }
            block_start += BLOCK as usize;
            out.resize(block_start + BLOCK as usize, 0);
            at = block_start;
        }
        out[at..at + 4].copy_from_slice(&ino.to_le_bytes());
        out[at + 4..at + 6].copy_from_slice(&(len as u16).to_le_bytes());
        out[at + 6] = name.len() as u8;
        out[at + 7] = kind;
        out[at + 8..at + 8 + name.len()].copy_from_slice(name);
        last = Some(at);
        at += len;
    }
    if let Some(prev) = last {
        let rec = (block_start + BLOCK as usize - prev) as u16;
        out[prev + 4..prev + 6].copy_from_slice(&rec.to_le_bytes());
    }
    out
}

/// An inode's xattrs as ext4 stores them: what fits in the inode's free tail there, the
/// rest in one block.
struct EncodedXattrs {
    /// The in-inode area, starting with its magic; empty when nothing is there.
    inline: Vec<u8>,
    /// A whole xattr block.
    block: Option<Vec<u8>>,
}

/// ext4's limit on the name stored in an xattr entry (the part after the namespace
/// prefix): its length is one byte.
const XATTR_SUFFIX_MAX: usize = 255;

/// Maps a full xattr name to ext4's (name index, suffix); ACL values are converted to
/// ext4's own encoding.
fn xattr_key(name: &[u8], value: &[u8]) -> Result<(u8, Vec<u8>, Vec<u8>), String> {
    let shown = String::from_utf8_lossy(name);
    let acl = |index: u8| -> Result<(u8, Vec<u8>, Vec<u8>), String> {
        Ok((
            index,
            Vec::new(),
            acl_to_disk(value).ok_or_else(|| format!("xattr {shown}: malformed POSIX ACL"))?,
        ))
    };
    match name {
        b"system.posix_acl_access" => return acl(2),
        b"system.posix_acl_default" => return acl(3),
        _ => {}
    }
    for (prefix, index) in [
        (b"user.".as_slice(), 1u8),
        (b"trusted.", 4),
        (b"security.", 6),
        (b"system.", 7),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            if rest.is_empty() || rest.contains(&0) {
                return Err(format!("xattr {shown:?}: not a valid name"));
            }
            if rest.len() > XATTR_SUFFIX_MAX {
                return Err(format!(
                    "xattr {shown:?}: name longer than ext4's {XATTR_SUFFIX_MAX} bytes"
                ));
            }
            return Ok((index, rest.to_vec(), value.to_vec()));
        }
    }
    Err(format!("xattr {shown}: namespace not supported by ext4"))
}

/// VFS POSIX ACL (version 2, 8-byte entries) → ext4 on-disk ACL (version 1, 4-byte entries
/// for the owner/group/mask/other tags, 8-byte ones for named users and groups).
fn acl_to_disk(value: &[u8]) -> Option<Vec<u8>> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) || value[0..4] != 2u32.to_le_bytes()
    {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for entry in value[4..].chunks(8) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        out.extend_from_slice(&entry[0..4]);
        match tag {
            0x01 | 0x04 | 0x10 | 0x20 => {}
            0x02 | 0x08 => out.extend_from_slice(&entry[4..8]),
            _ => return None,
        }
    }
    Some(out)
}

/// ext4's xattr entry hash (`ext4_xattr_hash_entry`, signed-char variant as on x86).
fn xattr_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut hash: u32 = 0;
    for &c in name {
        hash = (hash << 5) ^ (hash >> 27) ^ (c as i8 as i32 as u32);
    }
    let mut padded = value.to_vec();
    padded.resize(value.len().div_ceil(4) * 4, 0);
    for word in padded.chunks(4) {
        let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        hash = (hash << 16) ^ (hash >> 16) ^ w;
    }
    hash
}

/// Encodes xattrs as mkfs places them: in name order, each that still fits in the inode's
/// 92 spare bytes goes there, the others into one block (sorted, as the kernel's lookup
/// in a block expects).
fn encode_xattrs(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<EncodedXattrs, String> {
    let mut keyed = Vec::with_capacity(xattrs.len());
    for (name, value) in xattrs {
        keyed.push(xattr_key(name, value)?);
    }
    keyed.sort_by(|a, b| (a.0, a.1.len(), &a.1).cmp(&(b.0, b.1.len(), &b.1)));
    let cost =
        |k: &(u8, Vec<u8>, Vec<u8>)| ((16 + k.1.len()).div_ceil(4) * 4, k.2.len().div_ceil(4) * 4);
    // Entries and values share the area; 4 bytes end the entry list.
    let inline_room = INODE_SIZE - 128 - EXTRA_ISIZE - 4;
    let mut inline = Vec::new();
    let mut in_block = Vec::new();
    let mut used = 4;
    for k in keyed {
        let (e, v) = cost(&k);
        if used + e + v <= inline_room {
            used += e + v;
            inline.push(k);
        } else {
            in_block.push(k);
        }
    }
    let mut out = EncodedXattrs {
        inline: Vec::new(),
        block: None,
    };
    if !inline.is_empty() {
        let mut area = vec![0u8; inline_room + 4];
        area[0..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
        // Value offsets count from the first entry, just after the magic.
        fill_xattr_entries(&mut area[4..], &inline, false);
        out.inline = area;
    }
    if !in_block.is_empty() {
        let need: usize = in_block
            .iter()
            .map(|k| cost(k).0 + cost(k).1)
            .sum::<usize>()
            + 4;
        let block_room = BLOCK as usize - 32;
        if need > block_room {
            return Err(format!(
                "xattrs take {need} bytes beyond what the inode holds, more than one {BLOCK}-byte block"
            ));
        }
        let mut block = vec![0u8; BLOCK as usize];
        block[0..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
        block[4..8].copy_from_slice(&1u32.to_le_bytes()); // refcount
        block[8..12].copy_from_slice(&1u32.to_le_bytes()); // blocks
                                                           // Offsets in a block count from the block start; entries begin after the header.
        let hashes = fill_xattr_entries(&mut block, &in_block, true);
        let mut block_hash: u32 = 0;
        for h in hashes {
            block_hash = (block_hash << 16) ^ (block_hash >> 16) ^ h;
        }
        block[12..16].copy_from_slice(&block_hash.to_le_bytes());
        out.block = Some(block);
    }
    Ok(out)
}

/// Writes entries from the front and values from the back of `area`; returns the entry
/// hashes. In a block the entries start after the 32-byte header and offsets are from the
/// block start; inline, both start at 0 of `area`.
fn fill_xattr_entries(area: &mut [u8], keyed: &[(u8, Vec<u8>, Vec<u8>)], block: bool) -> Vec<u32> {
    let mut at = if block { 32 } else { 0 };
    let mut value_end = area.len();
    let mut hashes = Vec::new();
    for (index, name, value) in keyed {
        let padded = value.len().div_ceil(4) * 4;
        value_end -= padded;
        area[value_end..value_end + value.len()].copy_from_slice(value);
        // Inline entries may leave the hash 0; blocks need it (e2fsck checks).
        let hash = if block { xattr_hash(name, value) } else { 0 };
        hashes.push(hash);
        let e = &mut area[at..];
        e[0] = name.len() as u8;
        e[1] = *index;
        e[2..4].copy_from_slice(&(value_end as u16).to_le_bytes());
        e[4..8].copy_from_slice(&0u32.to_le_bytes());
        e[8..12].copy_from_slice(&(value.len() as u32).to_le_bytes());
        e[12..16].copy_from_slice(&hash.to_le_bytes());
        e[16..16 + name.len()].copy_from_slice(name);
        at += (16 + name.len()).div_ceil(4) * 4;
    }
    hashes
}

/// A jbd2 v2 superblock for an empty journal (big-endian, as jbd2 writes it).
fn journal_superblock(blocks: u64, uuid: &[u8; 16]) -> Vec<u8> {
    let mut sb = vec![0u8; BLOCK as usize];
    let put = |sb: &mut [u8], at: usize, v: u32| sb[at..at + 4].copy_from_slice(&v.to_be_bytes());
    put(&mut sb, 0, 0xC03B_3998); // magic
    put(&mut sb, 4, 4); // superblock v2
    put(&mut sb, 12, BLOCK as u32);
    put(&mut sb, 16, blocks as u32);
    put(&mut sb, 20, 1); // first log block
    put(&mut sb, 24, 1); // first expected sequence
    sb[48..64].copy_from_slice(uuid);
    put(&mut sb, 64, 1); // users
    sb
}

struct Superblock<'a> {
    layout: &'a Layout,
    free_blocks: u64,
    free_inodes: u64,
    uuid: [u8; 16],
    label: &'a str,
    now: Time,
    journal_block: [u8; 60],
    journal_size: u64,
}

impl Superblock<'_> {
    fn encode(&self) -> Vec<u8> {
        let l = self.layout;
        let mut sb = vec![0u8; 1024];
        let put16 =
            |sb: &mut [u8], at: usize, v: u16| sb[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 =
            |sb: &mut [u8], at: usize, v: u32| sb[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let now = self.now.sec as u32;
        put32(&mut sb, 0x00, l.inode_count() as u32);
        put32(&mut sb, 0x04, l.blocks as u32);
        put32(
            &mut sb,
            0x08,
            (l.blocks * RESERVED_BLOCKS_PERCENT / 100) as u32,
        );
        put32(&mut sb, 0x0C, self.free_blocks as u32);
        put32(&mut sb, 0x10, self.free_inodes as u32);
        put32(&mut sb, 0x14, 0); // first data block (4 KiB blocks)
        put32(&mut sb, 0x18, 2); // log2(block) - 10
        put32(&mut sb, 0x1C, 2); // cluster = block
        put32(&mut sb, 0x20, BLOCKS_PER_GROUP as u32);
        put32(&mut sb, 0x24, BLOCKS_PER_GROUP as u32);
        put32(&mut sb, 0x28, l.inodes_per_group as u32);
        put32(&mut sb, 0x30, now); // write time
        put16(&mut sb, 0x36, 0xFFFF); // max mount count: never forced
        put16(&mut sb, 0x38, 0xEF53);
        put16(&mut sb, 0x3A, 1); // clean
        put16(&mut sb, 0x3C, 1); // errors: continue
        put32(&mut sb, 0x40, now); // last check
        put32(&mut sb, 0x4C, 1); // dynamic revision
        put32(&mut sb, 0x54, FIRST_INO);
        put16(&mut sb, 0x58, INODE_SIZE as u16);
        put32(
            &mut sb,
            0x5C,
            COMPAT_HAS_JOURNAL | COMPAT_EXT_ATTR | COMPAT_DIR_INDEX | COMPAT_SPARSE_SUPER2,
        );
        put32(
            &mut sb,
            0x60,
            INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG,
        );
        put32(
            &mut sb,
            0x64,
            RO_COMPAT_SPARSE_SUPER
                | RO_COMPAT_LARGE_FILE
                | RO_COMPAT_HUGE_FILE
                | RO_COMPAT_DIR_NLINK
                | RO_COMPAT_EXTRA_ISIZE,
        );
        sb[0x68..0x78].copy_from_slice(&self.uuid);
        sb[0x78..0x78 + self.label.len()].copy_from_slice(self.label.as_bytes());
        put32(&mut sb, 0xE0, JOURNAL_INO);
        let seed = rand_bytes();
        sb[0xEC..0xFC].copy_from_slice(&seed);
        sb[0xFC] = 1; // default hash: half_md4
        sb[0xFD] = 1; // s_jnl_blocks holds a copy of the journal inode's i_block
        put32(&mut sb, 0x100, 0x000C); // default mount options: user_xattr, acl
        put32(&mut sb, 0x108, now); // mkfs time
        sb[0x10C..0x10C + 60].copy_from_slice(&self.journal_block);
        put32(&mut sb, 0x10C + 60, (self.journal_size >> 32) as u32);
        put32(&mut sb, 0x10C + 64, self.journal_size as u32);
        put16(&mut sb, 0x15C, EXTRA_ISIZE as u16); // min extra isize
        put16(&mut sb, 0x15E, EXTRA_ISIZE as u16); // wanted extra isize
        put32(&mut sb, 0x160, 1); // signed directory hash (x86 char)
        sb[0x174] = 4; // 16 groups per flex group
                       // s_backup_bgs (0x24C) stay 0: sparse_super2 without backups.
        sb
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_encode_nanoseconds_and_epoch() {
        assert_eq!(
            Time {
                sec: 1_600_000_000,
                nsec: 5
            }
            .encode(),
            (1_600_000_000, 20)
        );
        // 2040 needs the first epoch bit.
        let (low, extra) = Time {
            sec: 2_208_988_800,
            nsec: 0,
        }
        .encode();
        assert_eq!((low, extra), (2_208_988_800u64 as u32, 1));
        assert_eq!(Time { sec: -1, nsec: 0 }.encode(), (u32::MAX, 0));
    }

    #[test]
    fn directory_entries_fill_blocks_and_the_last_spans_the_rest() {
        let children: Vec<Child> = (0..400)
            .map(|i| Child {
                name: format!("file-number-{i:04}").into_bytes(),
                ino: 100 + i,
                meta: None,
                kind: EntryKind::File,
                fresh: true,
            })
            .collect();
        let data = dir_blocks(&children, 12, 2);
        // 16-byte names → 24-byte entries; 170 per block after . and ..
        assert_eq!(data.len(), 3 * BLOCK as usize);
        for block in data.chunks(BLOCK as usize) {
            let mut at = 0;
            while at < BLOCK as usize {
                let rec = u16::from_le_bytes([block[at + 4], block[at + 5]]) as usize;
                assert!(rec >= 12 && rec.is_multiple_of(4));
                at += rec;
            }
            assert_eq!(at, BLOCK as usize);
        }
        assert_eq!(&data[8..9], b".");
        assert_eq!(u32::from_le_bytes(data[12..16].try_into().unwrap()), 2);
    }

    #[test]
    fn acls_convert_to_the_ext4_encoding() {
        let mut vfs = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 6, u32::MAX),
            (0x20, 4, u32::MAX),
        ] {
            vfs.extend_from_slice(&tag.to_le_bytes());
            vfs.extend_from_slice(&perm.to_le_bytes());
            vfs.extend_from_slice(&id.to_le_bytes());
        }
        let disk = acl_to_disk(&vfs).unwrap();
        assert_eq!(disk.len(), 4 + 4 + 8 + 4 + 4 + 4);
        assert_eq!(&disk[0..4], &1u32.to_le_bytes());
        assert_eq!(&disk[8..16], &[2, 0, 4, 0, 0xe8, 0x03, 0, 0]);
        assert!(acl_to_disk(b"junk").is_none());
    }

    #[test]
    fn small_xattrs_stay_in_the_inode_and_large_ones_take_a_block() {
        let x = |n: &str, v: Vec<u8>| (n.as_bytes().to_vec(), v);
        let small = [x("security.capability", vec![1u8; 20])];
        let e = encode_xattrs(&small).unwrap();
        assert!(!e.inline.is_empty() && e.block.is_none());
        let large = [x("user.big", vec![7u8; 500])];
        let e = encode_xattrs(&large).unwrap();
        let block = e.block.expect("expected a block");
        assert!(e.inline.is_empty());
        assert_eq!(&block[0..4], &XATTR_MAGIC.to_le_bytes());
        assert_eq!(block[32], 3, "name length of 'big'");
        assert_eq!(block[33], 1, "user namespace");
        // What fits stays in the inode, the rest goes to the block.
        let both = [x("user.a", vec![1u8; 40]), x("user.big", vec![7u8; 4000])];
        let e = encode_xattrs(&both).unwrap();
        assert!(!e.inline.is_empty() && e.block.is_some());
        assert_eq!(e.inline[4], 1, "user.a inline");
        assert_eq!(e.block.unwrap()[32], 3, "user.big in the block");
        let huge = [x("user.huge", vec![0u8; 8000])];
        assert!(encode_xattrs(&huge).is_err());
        assert!(encode_xattrs(&[x("os2.x", vec![])]).is_err());
        let long = [([b"user.".as_slice(), &[b'n'; 256]].concat(), vec![])];
        assert!(encode_xattrs(&long).is_err());
    }
}
