//! Extents: how a file's blocks are described. Up to four extents live in the inode's
//! `i_block`; beyond that one index level points at full leaf blocks.

use super::inode::EXTENTS_FL;
use super::{shown, WriteError, Writer, BLOCK};

/// Longest run one initialized extent can describe.
const MAX_EXTENT_BLOCKS: u64 = 32768;
/// Extents that fit in the inode itself, and in one leaf block.
const INODE_EXTENTS: usize = 4;
const LEAF_EXTENTS: usize = ((BLOCK as usize) - 12) / 12;

/// Extents (logical, length, physical) for `count` blocks from logical `logical`, stored
/// from `physical` on, cut to what one extent describes.
pub(super) fn split_extents(logical: u64, count: u64, physical: u64) -> Vec<(u32, u16, u64)> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < count {
        let len = (count - done).min(MAX_EXTENT_BLOCKS);
        out.push(((logical + done) as u32, len as u16, physical + done));
        done += len;
    }
    out
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

impl Writer<'_, '_> {
    /// Points `ino` at `extents` (logical block, length, physical block) holding `data`
    /// blocks, with leaf blocks when more than four extents are needed.
    pub(super) fn set_extents(
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
}
