//! Path handling that cannot be tricked into leaving the staging directory.
//!
//! Every lookup is one component at a time, relative to a directory fd we already trust,
//! with `O_NOFOLLOW`: the kernel never follows a symlink on our behalf. Symlinks met on
//! the way are read and resolved here with in-root semantics (an absolute target restarts
//! at the staging root, like containerd resolves `/var/run -> /run`), and a `..` that would
//! climb above the root is refused rather than clamped. `openat2(RESOLVE_BENEATH)` would give
//! the same guarantee for the common case, but it cannot follow absolute symlinks in-root
//! and does not tell us the symlink-free path of what it opened, which the ownership side
//! table and the whiteout bookkeeping need; the walk costs one `openat` per component,
//! which is also what the kernel would do, and a cache of the last parent chain makes it
//! one syscall for most entries (tar streams list siblings together).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use super::error::{errno_problem, EntryProblem};

/// Linux's own limit on symlinks followed during one lookup.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Splits a tar entry name into components, dropping empty and `.` components and
/// applying `..` lexically. A leading `/` is ignored: image paths are always relative to
/// the image root. Refuses a `..` that would climb above the root.
pub(crate) fn normalize(path: &[u8]) -> Result<Vec<&[u8]>, EntryProblem> {
    let mut comps: Vec<&[u8]> = Vec::with_capacity(8);
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if comps.pop().is_none() {
                    return Err(EntryProblem::EscapesRoot);
                }
            }
            _ => comps.push(comp),
        }
    }
    Ok(comps)
}

/// Appends `name` to a root-relative path (`""` is the root).
pub(crate) fn join(real: &mut Vec<u8>, name: &[u8]) {
    if !real.is_empty() {
        real.push(b'/');
    }
    real.extend_from_slice(name);
}

/// Removes the last component of a root-relative path.
pub(crate) fn pop(real: &mut Vec<u8>) {
    let cut = real.iter().rposition(|&b| b == b'/').unwrap_or(0);
    real.truncate(cut);
}

pub(crate) fn lossy(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Why a lookup did not produce a directory.
#[derive(Debug)]
pub(crate) enum ResolveError {
    /// A component does not exist and the lookup was not allowed to create it.
    Missing,
    /// Anything else, reported to the caller as is.
    Problem(EntryProblem),
}

impl From<EntryProblem> for ResolveError {
    fn from(p: EntryProblem) -> Self {
        ResolveError::Problem(p)
    }
}

enum At<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl At<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            At::Borrowed(fd) => *fd,
            At::Owned(fd) => fd.as_fd(),
        }
    }

    fn into_owned(self) -> Result<OwnedFd, EntryProblem> {
        match self {
            At::Owned(fd) => Ok(fd),
            At::Borrowed(fd) => rustix::fs::openat(fd, ".", path_flags(), Mode::empty())
                .map_err(|e| errno_problem("reopening a directory", e)),
        }
    }
}

fn path_flags() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Resolves one entry-name component `name` from directory `at` (whose root-relative,
/// symlink-free path is `real`), following symlinks in-root. On success `real` is the
/// symlink-free path of the directory reached. Directories created on the way (when
/// `create`) are appended to `created`.
fn walk_one<'a>(
    root: BorrowedFd<'a>,
    mut at: At<'a>,
    real: &mut Vec<u8>,
    name: &[u8],
    create: bool,
    created: &mut Vec<Vec<u8>>,
    hops: &mut u32,
) -> Result<(At<'a>, bool), ResolveError> {
    let mut via_symlink = false;
    let mut last_link = String::new();
    // Components still to walk, last first; only symlink targets ever land here.
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut first = Some(name);
    loop {
        let owned;
        let comp: &[u8] = match first.take() {
            Some(n) => n,
            None => match pending.pop() {
                Some(c) => {
                    owned = c;
                    &owned
                }
                None => break,
            },
        };
        match comp {
            b"" | b"." => continue,
            b".." => {
                if real.is_empty() {
                    return Err(EntryProblem::SymlinkEscapes { link: last_link }.into());
                }
                // `real` is non-empty, so `at` is strictly below the root and its parent
                // is still inside it.
                let up = rustix::fs::openat(at.fd(), "..", path_flags(), Mode::empty())
                    .map_err(|e| errno_problem("opening a parent directory", e))?;
                at = At::Owned(up);
                pop(real);
                continue;
            }
            _ => {}
        }
        match rustix::fs::openat(at.fd(), comp, path_flags(), Mode::empty()) {
            Ok(fd) => {
                at = At::Owned(fd);
                join(real, comp);
            }
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(at.fd(), comp, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(errno_problem("creating a parent directory", e).into()),
                }
                let fd = rustix::fs::openat(
                    at.fd(),
                    comp,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| errno_problem("opening a created parent directory", e))?;
                // mkdirat honours the process umask; implicit directories are 0755 whatever
                // the daemon's umask is.
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                    .map_err(|e| errno_problem("chmod of a created parent directory", e))?;
                at = At::Owned(fd);
                join(real, comp);
                created.push(real.clone());
            }
            Err(Errno::NOENT) => return Err(ResolveError::Missing),
            Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                let target = match rustix::fs::readlinkat(at.fd(), comp, Vec::new()) {
                    Ok(t) => t.into_bytes(),
                    Err(Errno::INVAL) => {
                        let mut component = real.clone();
                        join(&mut component, comp);
                        return Err(EntryProblem::NotADirectory {
                            component: lossy(&component),
                        }
                        .into());
                    }
                    Err(e) => return Err(errno_problem("reading a symlink", e).into()),
                };
                *hops += 1;
                if *hops > MAX_SYMLINK_HOPS {
                    return Err(EntryProblem::SymlinkLoop.into());
                }
                via_symlink = true;
                let mut link = real.clone();
                join(&mut link, comp);
                last_link = lossy(&link);
                if target.first() == Some(&b'/') {
                    at = At::Borrowed(root);
                    real.clear();
                }
                for part in target.split(|&b| b == b'/').rev() {
                    pending.push(part.to_vec());
                }
            }
            Err(e) => return Err(errno_problem("opening a parent directory", e).into()),
        }
    }
    Ok((at, via_symlink))
}

/// One resolved directory in the cached parent chain.
struct Level {
    /// The entry-name component this level resolves.
    name: Vec<u8>,
    /// The directory it resolved to.
    fd: OwnedFd,
    /// Its symlink-free path relative to the root.
    real: Vec<u8>,
    /// Whether this level or one above it went through a symlink: then its directory is
    /// not necessarily below the previous level, and a removal anywhere may orphan it.
    via_symlink: bool,
}

/// Resolves parent directories, caching the chain of the last one.
pub(crate) struct Resolver {
    root: OwnedFd,
    levels: Vec<Level>,
    dirty: bool,
}

impl Resolver {
    pub(crate) fn new(root: OwnedFd) -> Resolver {
        Resolver {
            root,
            levels: Vec::new(),
            dirty: false,
        }
    }

    pub(crate) fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Must be called after anything was removed from the tree. Without symlinks every
    /// cached level is an ancestor of the current parent and removals only happen below
    /// it, so the cache survives; with symlinks a cached directory may sit anywhere.
    pub(crate) fn note_removal(&mut self) {
        self.dirty = true;
    }

    /// Makes the cached chain resolve `comps` (the parent directory of an entry). With
    /// `create`, missing directories are made (0755) and reported in `created`.
    pub(crate) fn enter(
        &mut self,
        comps: &[&[u8]],
        create: bool,
        created: &mut Vec<Vec<u8>>,
    ) -> Result<(), ResolveError> {
        if self.dirty {
            if self.levels.iter().any(|l| l.via_symlink) {
                self.levels.clear();
            }
            self.dirty = false;
        }
        let keep = self
            .levels
            .iter()
            .zip(comps)
            .take_while(|(level, comp)| level.name == **comp)
            .count();
        self.levels.truncate(keep);
        let root = self.root.as_fd();
        let mut hops = 0;
        for comp in &comps[keep..] {
            let (base, mut real, via) = match self.levels.last() {
                Some(l) => (l.fd.as_fd(), l.real.clone(), l.via_symlink),
                None => (root, Vec::new(), false),
            };
            let (at, v) = walk_one(
                root,
                At::Borrowed(base),
                &mut real,
                comp,
                create,
                created,
                &mut hops,
            )?;
            let fd = at.into_owned()?;
            self.levels.push(Level {
                name: comp.to_vec(),
                fd,
                real,
                via_symlink: via || v,
            });
        }
        Ok(())
    }

    /// The directory the last [`enter`](Self::enter) resolved to.
    pub(crate) fn dir(&self) -> BorrowedFd<'_> {
        self.levels
            .last()
            .map_or(self.root.as_fd(), |l| l.fd.as_fd())
    }

    /// The symlink-free root-relative path of [`dir`](Self::dir).
    pub(crate) fn real(&self) -> &[u8] {
        self.levels.last().map_or(&[][..], |l| &l.real)
    }

    /// Resolves `comps` without touching the cache (for hard link targets and injected
    /// files). Returns the directory and its symlink-free path.
    pub(crate) fn resolve_detached(
        &self,
        comps: &[&[u8]],
        create: bool,
        created: &mut Vec<Vec<u8>>,
    ) -> Result<(OwnedFd, Vec<u8>), ResolveError> {
        let root = self.root.as_fd();
        let mut at = At::Borrowed(root);
        let mut real = Vec::new();
        let mut hops = 0;
        for comp in comps {
            at = walk_one(root, at, &mut real, comp, create, created, &mut hops)?.0;
        }
        Ok((at.into_owned()?, real))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_drops_dots_and_refuses_climbing_out() {
        assert_eq!(
            normalize(b"./usr//bin/./ls").unwrap(),
            vec![&b"usr"[..], b"bin", b"ls"]
        );
        assert_eq!(
            normalize(b"/etc/passwd").unwrap(),
            vec![&b"etc"[..], b"passwd"]
        );
        assert_eq!(normalize(b"a/../b").unwrap(), vec![&b"b"[..]]);
        assert!(normalize(b"./").unwrap().is_empty());
        assert!(matches!(
            normalize(b"../escape"),
            Err(EntryProblem::EscapesRoot)
        ));
        assert!(matches!(
            normalize(b"/../../etc/x"),
            Err(EntryProblem::EscapesRoot)
        ));
        assert!(matches!(
            normalize(b"a/../../x"),
            Err(EntryProblem::EscapesRoot)
        ));
    }

    #[test]
    fn join_and_pop_are_inverse() {
        let mut p = Vec::new();
        join(&mut p, b"a");
        join(&mut p, b"b c");
        assert_eq!(p, b"a/b c");
        pop(&mut p);
        assert_eq!(p, b"a");
        pop(&mut p);
        assert_eq!(p, b"");
    }
}
