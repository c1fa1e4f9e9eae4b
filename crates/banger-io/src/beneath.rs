//! Files created inside a directory held open by descriptor, where hostile input (an
//! archive member, an image layer) chose the name: the one way banger's extractors make a
//! regular file, so that none of them can be led through a link planted at that name.

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{Mode, OFlags};

/// Creates the regular file `name` in `dir`, write-only and mode 0600 until its writer
/// sets the real mode (so a half-written file is never readable by others). It fails with
/// `EEXIST` when anything, a symlink included, already stands at `name`: the caller decides
/// whether to remove it, and the new file is never an old one written through.
pub fn create_new_file_at<P: rustix::path::Arg>(
    dir: impl AsFd,
    name: P,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_a_private_file_and_never_writes_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::fs::File::open(tmp.path()).unwrap();
        create_new_file_at(&dir, "new").unwrap();
        let meta = std::fs::symlink_metadata(tmp.path().join("new")).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);

        std::os::unix::fs::symlink("new", tmp.path().join("link")).unwrap();
        assert_eq!(
            create_new_file_at(&dir, "link").unwrap_err(),
            rustix::io::Errno::EXIST
        );
        assert_eq!(
            create_new_file_at(&dir, "new").unwrap_err(),
            rustix::io::Errno::EXIST
        );
    }
}
