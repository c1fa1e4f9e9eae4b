//! The walk over the staged tree: directories depth first, children in name order, so
//! that every block is allocated (and written) in order. Each entry's attributes come from
//! the flattener's record; the staging directory only supplies names and contents.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use banger_oci::flatten::{EntryKind, EntryMetadata, EXT4_LINK_MAX};
use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::dir::{dir_blocks, Child};
use super::inode::{Inode, ROOT_INO};
use super::{shown, tree_err, WriteError, Writer};

/// A directory waiting to be written: its path, inode and parent's inode. No descriptor
/// is held for it (a directory of 20,000 subdirectories would need 20,000): it is opened
/// by path when its turn comes.
type PendingDir = (Vec<u8>, u32, u32);

impl<'b> Writer<'_, 'b> {
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

    pub(super) fn write_tree(&mut self) -> Result<(), WriteError> {
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
}

fn join(path: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = path.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}
