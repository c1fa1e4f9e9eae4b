//! The jbd2 journal: its size (what mkfs would pick), its inode and the superblock of an
//! empty journal. The rest of the journal is a hole that reads as zeros.

use super::extent::split_extents;
use super::inode::{Inode, JOURNAL_INO};
use super::{WriteError, Writer, BLOCK};

/// e2fsprogs' `ext2fs_default_journal_size`: guests get the journal mkfs would give them.
pub(super) fn default_journal_blocks(blocks: u64) -> u64 {
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

impl Writer<'_, '_> {
    /// The journal inode, one run of zeros (a hole) but for its superblock, which names
    /// the filesystem's `uuid`.
    pub(super) fn write_journal(&mut self, uuid: &[u8; 16]) -> Result<(), WriteError> {
        let layout = self.layout;
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
            &journal_superblock(layout.journal_blocks, uuid),
        )
    }
}
