//! Running a VMM with as little of the host as it needs.
//!
//! Under a root daemon the VMM must not be root: a guest that escapes into the VMM would
//! be root on the host. The VMM runs as a dedicated system user (`vmm_user`, default
//! [`DEFAULT_VMM_USER`]) with no home and no shell, and it needs no path of the host:
//!
//! - QEMU: privileges are dropped in the child before exec (supplementary groups, gid,
//!   uid). Not QEMU's own `-runas`: it calls setuid after QEMU installed its seccomp
//!   filter, and `-sandbox ...,elevateprivileges=deny` (which banger always passes) kills
//!   it with SIGSYS for that (QEMU 7.2, measured). Everything QEMU opens is opened here
//!   and handed over as a file descriptor ([`PassedFds`]): the disk (`-add-fd`, a
//!   read-write and a read-only descriptor, since QEMU probes read-only first), kernel
//!   and initrd (`/proc/self/fd/N`), the QMP and agent sockets (bound here, `fd=`), the
//!   console (a pipe) and the TAP (`fd=`). The VM's directory stays root's alone.
//! - Firecracker: its jailer (chroot, uid/gid, cgroup, Firecracker's default seccomp);
//!   see [`crate::firecracker`].
//!
//! The uid is also what the network policy matches (`meta skuid`) to tell the VMM's
//! traffic apart: [`lookup_vmm_user`] is the one place it is found.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Command;

/// The system user VMMs run as under a root daemon, unless `vmm_user` says otherwise.
pub const DEFAULT_VMM_USER: &str = "banger-vmm";

/// A user to run a VMM as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Its supplementary groups (e.g. `kvm`, for /dev/kvm).
    pub groups: Vec<u32>,
}

/// Looks `name` up in /etc/passwd and /etc/group (the files `useradd` writes; a
/// directory service user is not looked up). `Ok(None)`: no such user.
pub fn lookup_vmm_user(name: &str) -> io::Result<Option<VmmUser>> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    Ok(lookup_in(&passwd, &group, name))
}

/// [`lookup_vmm_user`] over the given file contents.
pub fn lookup_in(passwd: &str, group: &str, name: &str) -> Option<VmmUser> {
    let (uid, gid) = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })?;
    let mut groups = vec![gid];
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
            if let Ok(g) = f[2].parse() {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
    }
    Some(VmmUser {
        name: name.to_owned(),
        uid,
        gid,
        groups,
    })
}

/// File descriptors a VMM inherits under their own numbers (the arguments name them).
#[derive(Debug, Default)]
pub struct PassedFds {
    fds: Vec<OwnedFd>,
}

impl PassedFds {
    /// Keeps `fd` for the child and returns the number the child sees it under.
    pub fn add(&mut self, fd: impl Into<OwnedFd>) -> RawFd {
        let fd = fd.into();
        let raw = fd.as_raw_fd();
        self.fds.push(fd);
        raw
    }

    /// Opens `path` (read-write or read-only) for the child.
    pub fn open(&mut self, path: &Path, write: bool) -> io::Result<RawFd> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)?;
        Ok(self.add(file))
    }

    /// Arranges for `command` to inherit these descriptors (they are close-on-exec
    /// here, like every descriptor Rust opens) and, with `user`, to run as that user.
    /// The descriptors must outlive the spawn.
    pub fn apply(&self, command: &mut Command, user: Option<&VmmUser>) {
        use std::os::unix::process::CommandExt;
        let raws: Vec<RawFd> = self.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let ids = user.map(|u| {
            let groups: Vec<rustix::process::Gid> = u
                .groups
                .iter()
                // SAFETY: a gid from the group file; any value is a valid gid to ask for.
                .map(|g| unsafe { rustix::process::Gid::from_raw(*g) })
                .collect();
            // SAFETY: as above, for the uid and gid of the passwd entry.
            let (uid, gid) = unsafe {
                (
                    rustix::process::Uid::from_raw(u.uid),
                    rustix::process::Gid::from_raw(u.gid),
                )
            };
            (uid, gid, groups)
        });
        // SAFETY: between fork and exec only async-signal-safe work happens: fcntl and
        // the set*id/setgroups syscalls (rustix's thread-level calls are the raw
        // syscalls; the child has one thread, so they apply to the whole process). The
        // vectors were allocated before the fork and are only read.
        unsafe {
            command.pre_exec(move || {
                for raw in &raws {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(*raw);
                    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                }
                if let Some((uid, gid, groups)) = &ids {
                    rustix::thread::set_thread_groups(groups)?;
                    rustix::thread::set_thread_gid(*gid)?;
                    rustix::thread::set_thread_uid(*uid)?;
                }
                Ok(())
            });
        }
    }
}

/// A listening Unix socket at `path` (a stale one is replaced) for a VMM to accept on.
pub fn listen_unix(path: &Path) -> io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    Ok(std::os::unix::net::UnixListener::bind(path)?.into())
}

/// Opens the existing TAP device `ifname` (made by the daemon and put on the bridge) for
/// a VMM that may not open it itself: `/dev/net/tun` + `TUNSETIFF`, as QEMU would.
pub fn open_tap(ifname: &str) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        _pad: [u8; 22],
    }
    const TUNSETIFF: rustix::ioctl::RawOpcode = 0x4004_54ca;
    const IFF_TAP: i16 = 0x0002;
    const IFF_NO_PI: i16 = 0x1000;
    const IFF_VNET_HDR: i16 = 0x4000;
    if ifname.len() >= 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("TAP name {ifname:?} is longer than 15 bytes"),
        ));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: TUNSETIFF reads a `struct ifreq` (name, then the flags union member); IfReq
    // has its layout and size (40 bytes), and lives across the call.
    unsafe {
        rustix::ioctl::ioctl(
            &tun,
            rustix::ioctl::Setter::<rustix::ioctl::BadOpcode<TUNSETIFF>, IfReq>::new(req),
        )?;
    }
    Ok(tun.into())
}

/// Makes `uid`/`gid` the owner of the existing persistent TAP `ifname`, so that a VMM
/// running as them can attach to it by name (what `ip tuntap add ... user U group G`
/// sets at creation): attach here as root, then TUNSETOWNER and TUNSETGROUP.
pub fn give_tap(ifname: &str, uid: u32, gid: u32) -> io::Result<()> {
    const TUNSETOWNER: rustix::ioctl::RawOpcode = 0x4004_54cc;
    const TUNSETGROUP: rustix::ioctl::RawOpcode = 0x4004_54ce;
    let tun = open_tap(ifname)?;
    // SAFETY: both take the id as the ioctl's integer argument.
    unsafe {
        rustix::ioctl::ioctl(
            &tun,
            rustix::ioctl::IntegerSetter::<rustix::ioctl::BadOpcode<TUNSETOWNER>>::new(
                uid as usize,
            ),
        )?;
        rustix::ioctl::ioctl(
            &tun,
            rustix::ioctl::IntegerSetter::<rustix::ioctl::BadOpcode<TUNSETGROUP>>::new(
                gid as usize,
            ),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_and_its_groups_come_from_passwd_and_group() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nbanger-vmm:x:998:997::/nonexistent:/usr/sbin/nologin\n";
        let group = "kvm:x:104:banger-vmm,other\nbanger-vmm:x:997:\nvideo:x:44:other\n";
        assert_eq!(
            lookup_in(passwd, group, "banger-vmm"),
            Some(VmmUser {
                name: "banger-vmm".into(),
                uid: 998,
                gid: 997,
                groups: vec![997, 104]
            })
        );
        assert_eq!(lookup_in(passwd, group, "banger"), None);
        assert_eq!(lookup_in("broken:x:zz:1::/:/bin/sh\n", "", "broken"), None);
    }

    #[test]
    fn passed_descriptors_reach_the_child_under_their_numbers() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "passed\n").unwrap();
        let mut fds = PassedFds::default();
        let n = fds.open(&file, false).unwrap();
        let mut command = Command::new("/bin/sh");
        command.args(["-c", &format!("cat <&{n}")]);
        fds.apply(&mut command, None);
        let out = command.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "passed\n");
    }
}
