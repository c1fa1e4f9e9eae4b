//! Allocation and the bitmaps. Nothing is ever freed, so blocks come from one cursor
//! that moves front to back through the data area and inodes are numbered in order; the
//! bitmaps, written last, mark the used prefix of each group (and the metadata at the
//! front) as in use.

use super::extent::split_extents;
use super::inode::Inode;
use super::superblock::encode_group_descriptor;
use super::{WriteError, Writer, BLOCK};

/// Free blocks and free inodes left, summed over the groups.
pub(super) struct FreeCounts {
    pub(super) blocks: u64,
    pub(super) inodes: u64,
}

impl Writer<'_, '_> {
    /// Inode `ino` (numbered from 1, as on disk).
    pub(super) fn inode(&mut self, ino: u32) -> &mut Inode {
        &mut self.inodes[ino as usize - 1]
    }

    /// Numbers the next inode, refusing past the inode count.
    pub(super) fn new_inode(&mut self) -> Result<u32, WriteError> {
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
    pub(super) fn alloc(&mut self, count: u64) -> Result<u64, WriteError> {
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

    /// Allocates and writes `data` (whole blocks) as the content of `ino`.
    pub(super) fn place_data(
        &mut self,
        ino: u32,
        data: &[u8],
        path: &[u8],
    ) -> Result<(), WriteError> {
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

    /// Block and inode bitmaps and the group descriptors that point at them.
    pub(super) fn write_bitmaps_and_descriptors(&mut self) -> Result<FreeCounts, WriteError> {
        let layout = self.layout;
        let used_inodes = self.inodes.len() as u64;
        let used_blocks_end = self.cursor;
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
            encode_group_descriptor(d, layout, group, free_blocks, free_inodes, dirs);
            free_blocks_total += free_blocks;
            free_inodes_total += free_inodes;
        }
        self.write_at(layout.block_bitmaps, &bitmaps)?;
        self.write_at(1, &gdt)?;
        Ok(FreeCounts {
            blocks: free_blocks_total,
            inodes: free_inodes_total,
        })
    }
}

fn set_bits(bitmap: &mut [u8], from: usize, to: usize) {
    for bit in from..to.min(bitmap.len() * 8) {
        bitmap[bit / 8] |= 1 << (bit % 8);
    }
}
