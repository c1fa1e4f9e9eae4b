//! Directories: linear (unindexed) directory blocks of `.`, `..` and the children in name
//! order, and the lost+found every ext4 root has. No htree (hashed index) is written: a
//! linear directory is valid ext4 at any size.

use banger_oci::flatten::{EntryKind, EntryMetadata};

use super::inode::{Inode, ROOT_INO};
use super::{WriteError, Writer, BLOCK};

/// mkfs gives lost+found 16 KiB so e2fsck can reconnect files without allocating.
const LOST_FOUND_BLOCKS: u64 = 4;

/// One entry of a directory being written.
pub(super) struct Child<'m> {
    pub(super) name: Vec<u8>,
    pub(super) ino: u32,
    /// The entry's record; `None` for lost+found, which the writer makes itself.
    pub(super) meta: Option<&'m EntryMetadata>,
    pub(super) kind: EntryKind,
    /// The first name of its inode (false for further hard links and lost+found).
    pub(super) fresh: bool,
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
pub(super) fn dir_blocks(children: &[Child], ino: u32, parent: u32) -> Vec<u8> {
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

impl Writer<'_, '_> {
    pub(super) fn lost_found(&mut self) -> Result<u32, WriteError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
