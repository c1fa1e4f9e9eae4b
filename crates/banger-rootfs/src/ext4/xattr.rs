//! Extended attributes: ext4's name indexes, the on-disk POSIX ACL encoding, entry hashes,
//! and the split between the inode's free tail and one external xattr block.

use super::inode::{EXTRA_ISIZE, INODE_SIZE};
use super::{WriteError, Writer, BLOCK};

const XATTR_MAGIC: u32 = 0xEA02_0000;

/// An inode's xattrs as ext4 stores them: what fits in the inode's free tail there, the
/// rest in one block.
pub(super) struct EncodedXattrs {
    /// The in-inode area, starting with its magic; empty when nothing is there.
    pub(super) inline: Vec<u8>,
    /// A whole xattr block.
    pub(super) block: Option<Vec<u8>>,
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
pub(super) fn encode_xattrs(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<EncodedXattrs, String> {
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

impl Writer<'_, '_> {
    /// Writes the xattr block an inode asked for in [`fill_attrs`](Self::fill_attrs).
    pub(super) fn place_xattr_block(&mut self, ino: u32) -> Result<(), WriteError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
