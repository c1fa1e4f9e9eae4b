//! Non-directory entries: regular files (copied into runs of blocks, zero runs and sparse
//! holes left unallocated), symlinks (fast or in a block) and device nodes and FIFOs.

use std::fs::File;
use std::io::{self, Seek};
use std::os::fd::BorrowedFd;

use banger_oci::flatten::{EntryKind, EntryMetadata, MAX_DEVICE_MAJOR, MAX_DEVICE_MINOR};
use rustix::fs::{Mode, OFlags};

use super::dir::Child;
use super::extent::split_extents;
use super::inode::Inode;
use super::{image_err, shown, tree_err, WriteError, Writer, BLOCK, ZERO_RUN_HOLE_BLOCKS};

/// Most data runs a file is split into by holes; past it zeros are stored like data.
/// Keeps every file within the extents one index level holds.
const MAX_FILE_RUNS: usize = 1024;

impl Writer<'_, '_> {
    /// Writes one non-directory entry: attributes, then content.
    pub(super) fn write_entry(
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
}
