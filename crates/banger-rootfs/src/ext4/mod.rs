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
//!
//! The modules follow the on-disk structures: `superblock` (with the group descriptors
//! and the layout of groups), `inode` (inodes and the inode table), `dir`, `extent`,
//! `xattr`, `journal` and `alloc` (the block cursor and the bitmaps); `tree` walks
//! the staged tree and `entry` writes its non-directory entries.

mod alloc;
mod dir;
mod entry;
mod extent;
mod inode;
mod journal;
mod superblock;
mod tree;
mod xattr;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use banger_oci::flatten::EntryMetadata;

use crate::sequential::SequentialWriter;
use inode::{now, Inode, Time, FIRST_INO, JOURNAL_INO};
use superblock::{rand_bytes, Layout, Superblock};

pub use superblock::RESERVED_BLOCKS_PERCENT;

const BLOCK: u64 = 4096;

/// A zero run this long (in blocks, 32 KiB) or longer inside a file is left as a hole,
/// as mkfs does for zero blocks: shorter runs stay data, so files do not splinter into
/// many extents.
pub const ZERO_RUN_HOLE_BLOCKS: u64 = 8;

/// Why writing the image failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Reading the tree or writing the image failed; its path is the tree entry
    /// (`/`-rooted, inside the image) or the image file.
    #[error(transparent)]
    Io(#[from] banger_io::IoError),
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
    WriteError::Io(banger_io::IoError::new(op, "the image file", source))
}

fn tree_err(op: &'static str, path: &[u8], source: io::Error) -> WriteError {
    WriteError::Io(banger_io::IoError::new(op, shown(path), source))
}

/// How an entry is named in errors: `/`-rooted, as inside the image.
fn shown(path: &[u8]) -> PathBuf {
    let mut p = PathBuf::from("/");
    p.push(std::ffi::OsStr::from_bytes(path));
    p
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

impl Writer<'_, '_> {
    /// Writes whole metadata blocks in place, and the data area through the sequential
    /// stream (everything there is written in allocation order).
    fn write_at(&mut self, block: u64, data: &[u8]) -> Result<(), WriteError> {
        match self.stream.as_mut() {
            Some(stream) if block >= self.layout.data_start => stream.write_at(block * BLOCK, data),
            _ => self.out.write_all_at(data, block * BLOCK),
        }
        .map_err(|e| image_err("writing", e))
    }

    /// The journal, inode tables, bitmaps, group descriptors and superblock.
    fn finish(mut self, label: &str) -> Result<WriteStats, WriteError> {
        let layout = self.layout;
        if let Some(stream) = self.stream.take() {
            let direct = stream.finish().map_err(|e| image_err("writing", e))?;
            tracing::debug!(direct, "image data area written");
        }
        let uuid: [u8; 16] = rand_bytes();
        self.write_journal(&uuid)?;
        let used_inodes = self.inodes.len() as u64;
        self.write_inode_tables()?;
        let free = self.write_bitmaps_and_descriptors()?;

        let journal_block = self.inodes[JOURNAL_INO as usize - 1].block;
        let sb = Superblock {
            layout,
            free_blocks: free.blocks,
            free_inodes: free.inodes,
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
            blocks_used: layout.blocks - free.blocks,
            file_bytes: self.file_bytes,
        })
    }
}
