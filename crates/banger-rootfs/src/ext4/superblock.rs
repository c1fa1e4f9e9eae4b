//! The superblock and the block group descriptors: where every group's bitmaps and inode
//! table sit ([`Layout`], all packed at the front with `flex_bg`), the feature set, and the
//! encodings of the 1 KiB superblock and of one 32-byte group descriptor.

use super::inode::{Time, EXTRA_ISIZE, FIRST_INO, INODE_SIZE, JOURNAL_INO};
use super::journal::default_journal_blocks;
use super::{Geometry, WriteError, BLOCK};

const BLOCKS_PER_GROUP: u64 = 32768;
/// Free blocks left after the group descriptor table so `resize2fs` can grow it in place
/// (room for 64 × 128 = 8192 groups, 1 TiB).
const GDT_GROWTH_BLOCKS: u64 = 63;

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

/// Share of blocks reserved for root (`s_r_blocks_count`), as a percentage. mkfs reserves
/// 5 %; a sandbox image's processes are its users' own and mostly run as root, for whom a
/// reserve is not a reserve: it would only take 5 % of every image from unprivileged
/// users. So none (docs/oci-import.md).
pub const RESERVED_BLOCKS_PERCENT: u64 = 0;

/// Where everything is, in blocks.
pub(super) struct Layout {
    pub(super) blocks: u64,
    pub(super) groups: u64,
    pub(super) inodes_per_group: u64,
    pub(super) itable_blocks: u64,
    pub(super) gdt_blocks: u64,
    pub(super) block_bitmaps: u64,
    pub(super) inode_bitmaps: u64,
    pub(super) inode_tables: u64,
    pub(super) journal_start: u64,
    pub(super) journal_blocks: u64,
    pub(super) data_start: u64,
}

impl Layout {
    pub(super) fn new(geometry: &Geometry) -> Result<Layout, WriteError> {
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

    pub(super) fn inode_count(&self) -> u64 {
        self.groups * self.inodes_per_group
    }

    pub(super) fn group_blocks(&self, group: u64) -> (u64, u64) {
        let start = group * BLOCKS_PER_GROUP;
        (start, ((group + 1) * BLOCKS_PER_GROUP).min(self.blocks))
    }
}

/// Group `group`'s descriptor, into `d` (32 bytes).
pub(super) fn encode_group_descriptor(
    d: &mut [u8],
    layout: &Layout,
    group: u64,
    free_blocks: u64,
    free_inodes: u64,
    dirs: usize,
) {
    d[0..4].copy_from_slice(&((layout.block_bitmaps + group) as u32).to_le_bytes());
    d[4..8].copy_from_slice(&((layout.inode_bitmaps + group) as u32).to_le_bytes());
    d[8..12].copy_from_slice(
        &((layout.inode_tables + group * layout.itable_blocks) as u32).to_le_bytes(),
    );
    d[12..14].copy_from_slice(&(free_blocks as u16).to_le_bytes());
    d[14..16].copy_from_slice(&(free_inodes as u16).to_le_bytes());
    d[16..18].copy_from_slice(&(dirs as u16).to_le_bytes());
}

pub(super) fn rand_bytes() -> [u8; 16] {
    let mut bytes: [u8; 16] = rand::random();
    // RFC 4122 version 4, variant 1, as mkfs makes them.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes
}

/// The superblock's variable parts; everything else is fixed by the feature set.
pub(super) struct Superblock<'a> {
    pub(super) layout: &'a Layout,
    pub(super) free_blocks: u64,
    pub(super) free_inodes: u64,
    pub(super) uuid: [u8; 16],
    pub(super) label: &'a str,
    pub(super) now: Time,
    pub(super) journal_block: [u8; 60],
    pub(super) journal_size: u64,
}

impl Superblock<'_> {
    pub(super) fn encode(&self) -> Vec<u8> {
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
