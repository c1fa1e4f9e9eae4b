//! What the agent does as the guest's PID 1: the kernel command line, the standard
//! mounts, the hostname and powering off.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use rustix::mount::{mount, mount_remount, MountFlags};

/// `key=value` parameters of the kernel command line (`/proc/cmdline`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    params: Vec<(String, String)>,
}

impl Cmdline {
    /// Parses a command line; words without `=` are kept with an empty value.
    pub fn parse(line: &str) -> Cmdline {
        Cmdline {
            params: line
                .split_whitespace()
                .map(|w| match w.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (w.to_owned(), String::new()),
                })
                .collect(),
        }
    }

    /// Reads `/proc/cmdline`.
    pub fn read() -> io::Result<Cmdline> {
        Ok(Cmdline::parse(&fs::read_to_string("/proc/cmdline")?))
    }

    /// The value of the last `key=` (the kernel's own rule: later wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The hostname parameter.
pub const HOSTNAME_PARAM: &str = "banger.hostname";

/// The `PATH` commands get when the agent is PID 1 (the kernel gives init almost no
/// environment).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The filesystems every guest needs: (target, fstype, mode of the mount point, data).
const MOUNTS: &[(&str, &str, u32, &str)] = &[
    ("/proc", "proc", 0o555, ""),
    ("/sys", "sysfs", 0o555, ""),
    ("/dev", "devtmpfs", 0o755, "mode=0755"),
    ("/dev/pts", "devpts", 0o755, "gid=5,mode=620,ptmxmode=666"),
    ("/dev/shm", "tmpfs", 0o1777, "mode=1777"),
    ("/run", "tmpfs", 0o755, "mode=0755"),
    ("/tmp", "tmpfs", 0o1777, "mode=1777"),
];

/// Mounts what is missing of `/proc /sys /dev /dev/pts /dev/shm /run /tmp` (an init
/// that ran before us may have mounted some). Returns one message per failure: a guest
/// missing `/dev/shm` can still run most commands, so none of them is fatal.
pub fn mount_basics() -> Vec<String> {
    let mut problems = Vec::new();
    for &(target, fstype, mode, data) in MOUNTS {
        let path = Path::new(target);
        if let Err(e) = fs::create_dir_all(path) {
            problems.push(format!("create {target}: {e}"));
            continue;
        }
        match is_mount_point(path) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                problems.push(format!("stat {target}: {e}"));
                continue;
            }
        }
        let _ = fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode));
        let flags = match fstype {
            "proc" | "sysfs" => MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            "devtmpfs" | "devpts" => MountFlags::NOSUID,
            _ => MountFlags::NOSUID | MountFlags::NODEV,
        };
        if let Err(e) = mount(fstype, path, fstype, flags, data) {
            problems.push(format!("mount {fstype} on {target}: {e}"));
        }
    }
    // /dev/ptmx: devtmpfs has a node, but with devpts' newinstance semantics the right
    // one is the pts multiplexer.
    if Path::new("/dev/pts/ptmx").exists() && !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    problems
}

/// Whether `path` is the root of a mount: its device differs from its parent's, or it is
/// `/` itself.
fn is_mount_point(path: &Path) -> io::Result<bool> {
    let me = fs::metadata(path)?;
    let parent = fs::metadata(path.join(".."))?;
    Ok(me.dev() != parent.dev() || me.ino() == parent.ino())
}

/// Sets the kernel's hostname.
pub fn set_hostname(name: &str) -> io::Result<()> {
    rustix::system::sethostname(name.as_bytes())
        .map_err(|e| io::Error::new(e.kind(), format!("set hostname {name:?}: {e}")))
}

/// Ends the VM: kills every other process, flushes and remounts the root read-only, and
/// reboots.
///
/// A reboot, not a power-off: banger runs QEMU with `-no-reboot`, so a reboot ends the
/// VM, and with `reboot=t` (banger's default) it is an immediate triple fault. A
/// power-off needs ACPI, which a microvm guest may boot without (and then it hangs).
pub fn power_off() -> ! {
    // SAFETY: kill(-1, SIGKILL) signals every process we may signal except ourselves;
    // it touches no memory of ours.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    rustix::fs::sync();
    if let Err(e) = mount_remount("/", MountFlags::RDONLY, "") {
        eprintln!("banger-agent: remount / read-only: {e}");
    }
    rustix::fs::sync();
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::Restart) {
        eprintln!("banger-agent: reboot: {e}");
    }
    // Only reached if reboot(2) failed: as PID 1 we must not exit (that panics the kernel,
    // which with panic=-1 also reboots, but noisily).
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_later_parameters_win_and_bare_words_have_empty_values() {
        let c = Cmdline::parse(
            "console=ttyS0 quiet banger.hostname=a banger.ip=10.0.2.15/24 banger.hostname=b\n",
        );
        assert_eq!(c.get("banger.hostname"), Some("b"));
        assert_eq!(c.get("banger.ip"), Some("10.0.2.15/24"));
        assert_eq!(c.get("quiet"), Some(""));
        assert_eq!(c.get("banger.gw"), None);
    }

    #[test]
    fn root_and_proc_are_mount_points_a_plain_directory_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(is_mount_point(Path::new("/proc")).unwrap());
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        assert!(!is_mount_point(&tmp.path().join("d")).unwrap());
    }
}
