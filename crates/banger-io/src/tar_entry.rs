//! Tar entries banger writes itself (the keys it installs in a guest, the layers its tests
//! build): owned by root with mtime 0, so the same content always makes the same bytes.

/// The header of an entry of `kind` with `mode` and `size` (0 for directories and links),
/// owned by root (uid and gid 0) and dated 0.
pub fn root_owned_header(kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(size as u64);
    header.set_mtime(0);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_reads_back_as_root_owned_and_dated_zero() {
        let h = root_owned_header(tar::EntryType::Regular, 0o600, 5);
        assert_eq!(h.entry_type(), tar::EntryType::Regular);
        assert_eq!(
            (h.mode().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
            (0o600, 0, 0)
        );
        assert_eq!((h.size().unwrap(), h.mtime().unwrap()), (5, 0));
    }
}
