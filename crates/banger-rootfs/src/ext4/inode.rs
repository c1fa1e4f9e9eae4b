//! Inodes and the inode table: the reserved inode numbers, the 256-byte on-disk inode
//! (times with nanoseconds and epoch bits), attributes taken from an entry's record, and
//! the tables written at the end, each only as far as it is used.

use banger_oci::flatten::{EntryKind, EntryMetadata};

use super::xattr::encode_xattrs;
use super::{shown, WriteError, Writer, BLOCK};

pub(super) const INODE_SIZE: usize = 256;
pub(super) const EXTRA_ISIZE: usize = 32;
pub(super) const ROOT_INO: u32 = 2;
pub(super) const JOURNAL_INO: u32 = 8;
pub(super) const FIRST_INO: u32 = 11;
pub(super) const EXTENTS_FL: u32 = 0x80000;

/// ext4's seconds range with the two epoch bits of the extra field: 1901-12-13 to
/// 2446-05-10. Times outside are clamped to it, as the kernel does when a file's time is
/// set out of a filesystem's range.
const EXT4_MIN_TIME: i64 = i32::MIN as i64;
const EXT4_MAX_TIME: i64 = i32::MAX as i64 + 3 * (1i64 << 32);

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Time {
    pub(super) sec: i64,
    pub(super) nsec: u32,
}

impl Time {
    /// ext4's 32-bit seconds plus the "extra" word: nanoseconds and two epoch bits.
    pub(super) fn encode(self) -> (u32, u32) {
        let low = self.sec as i32;
        let epoch = ((self.sec - i64::from(low)) >> 32) as u32 & 3;
        (low as u32, epoch | (self.nsec << 2))
    }
}

/// The build's time, for ctimes and the inodes the writer makes itself.
pub(super) fn now() -> Time {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Time {
        sec: d.as_secs() as i64,
        nsec: d.subsec_nanos(),
    }
}

#[derive(Debug, Clone)]
pub(super) struct Inode {
    /// Type and permission bits; 0 for an unused (reserved) inode.
    pub(super) mode: u16,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) size: u64,
    pub(super) atime: Time,
    pub(super) ctime: Time,
    pub(super) mtime: Time,
    pub(super) links: u32,
    pub(super) flags: u32,
    /// `i_block`: extent tree root, fast symlink target or device number.
    pub(super) block: [u8; 60],
    /// Blocks owned (data, extent leaf, xattr block).
    pub(super) owned_blocks: u64,
    pub(super) xattr_block: u32,
    /// Encoded in-inode xattrs (magic, entries, values), at most the inode's free tail.
    pub(super) inline_xattrs: Vec<u8>,
    /// An xattr block still to be allocated and written.
    pub(super) xattr_block_data: Option<Vec<u8>>,
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
    pub(super) fn encode(&self, out: &mut [u8]) {
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

impl Writer<'_, '_> {
    /// Mode, ownership, times and xattrs of one entry, all from its record.
    pub(super) fn fill_attrs(
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

    /// Inode tables: only the used prefix of each group's table is written.
    pub(super) fn write_inode_tables(&mut self) -> Result<(), WriteError> {
        let layout = self.layout;
        let used_inodes = self.inodes.len() as u64;
        let mut table = vec![0u8; INODE_SIZE];
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
        Ok(())
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
}
