//! The initramfs banger boots with: a newc cpio archive holding a static busybox, our
//! init script and the kernel modules the guest needs.
//!
//! We write the cpio ourselves (the format is a 110-byte ASCII header per entry) rather
//! than running `cpio`: it is not installed by default, and writing it directly lets us
//! add `/dev/console` as a device node without being root.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::kernel::KernelDir;

/// The init script run as PID 1 (see the script for the kernel parameters it reads).
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Where Debian's busybox-static package installs its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// What goes into an initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// A statically linked busybox; it becomes `/bin/busybox` and runs the init script.
    pub busybox: PathBuf,
    /// Modules to load at boot, in order, from this kernel. `None` for a kernel that has
    /// virtio built in (or for a probe boot that needs no devices).
    pub kernel: Option<KernelDir>,
}

/// Writes the initramfs for `spec` to `out` (uncompressed newc cpio; the kernel reads it
/// directly, and compressing ~1.5 MB would cost more boot time than it saves).
pub fn write_initramfs(spec: &InitramfsSpec, out: &Path) -> Result<()> {
    write_initramfs_with_init(spec, INIT_SCRIPT, out)
}

/// [`write_initramfs`] with `init` as the script run as PID 1 instead of
/// [`INIT_SCRIPT`]: the same layout (busybox, `/dev/console`, the modules and their load
/// list) for an init of the caller's own, such as a test's.
pub fn write_initramfs_with_init(spec: &InitramfsSpec, init: &str, out: &Path) -> Result<()> {
    let busybox = fs::read(&spec.busybox).ctx("read busybox", &spec.busybox)?;
    let file = fs::File::create(out).ctx("create initramfs", out)?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    let w = &mut cpio;
    (|| -> io::Result<()> {
        for dir in [
            "bin",
            "dev",
            "proc",
            "sys",
            "newroot",
            "etc",
            "etc/banger",
            "lib",
            "lib/modules",
        ] {
            w.dir(dir, 0o755)?;
        }
        // The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.file("bin/busybox", 0o755, &busybox)?;
        w.symlink("bin/sh", "busybox")?;
        w.file("init", 0o755, init.as_bytes())?;
        let mut load = String::new();
        if let Some(k) = &spec.kernel {
            for m in k.modules() {
                let path = k.module_path(m);
                let bytes = fs::read(&path)?;
                w.file(&format!("lib/modules/{m}.ko"), 0o644, &bytes)?;
                load.push_str(m);
                load.push('\n');
            }
        }
        w.file("etc/banger/modules.load", 0o644, load.as_bytes())?;
        Ok(())
    })()
    .ctx("write initramfs", out)?;
    let mut inner = cpio.finish().ctx("write initramfs", out)?;
    inner
        .flush()
        .ctx("write initramfs", out)
        .map_err(Into::into)
}

/// Where [`write_agent_initrd`] puts the agent in the initramfs; the init copies it into
/// the root disk (the VM's own copy-on-write overlay) before handing PID 1 to it.
pub const AGENT_INITRD_PATH: &str = "banger/agent";

/// Writes to `out` the initramfs `base` followed by a second archive holding `agent` at
/// [`AGENT_INITRD_PATH`]. The kernel unpacks concatenated archives in order, so `base`
/// may be any initramfs (banger's, or a kernel's own, compressed or not), and the root
/// filesystem image is never written to on the host.
pub fn write_agent_initrd(base: &Path, agent: &Path, out: &Path) -> Result<()> {
    let mut bytes = fs::read(base).ctx("read initramfs", base)?;
    let agent_bytes = fs::read(agent).ctx("read guest agent", agent)?;
    // The next archive must start on a 4-byte boundary; the kernel skips zero padding.
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    let mut cpio = CpioWriter::new(bytes);
    (|| -> io::Result<()> {
        cpio.dir("banger", 0o755)?;
        cpio.file(AGENT_INITRD_PATH, 0o755, &agent_bytes)
    })()
    .ctx("write agent initramfs", out)?;
    let bytes = cpio.finish().ctx("write agent initramfs", out)?;
    let tmp = out.with_extension("tmp");
    fs::write(&tmp, &bytes).ctx("write agent initramfs", &tmp)?;
    fs::rename(&tmp, out)
        .ctx("publish agent initramfs", out)
        .map_err(Into::into)
}

/// The kernel command-line parameter that makes the init run `command` (with
/// `/bin/sh -c`) inside the root disk. Base64 because the kernel's command line has no
/// quoting that survives arbitrary shell text.
pub fn command_param(command: &str) -> String {
    use base64::Engine as _;
    format!(
        "banger.cmd={}",
        base64::engine::general_purpose::STANDARD.encode(command)
    )
}

/// The marker line the init prints on the console before powering off.
pub const EXIT_MARKER: &str = "BANGER_EXIT=";

/// The exit status the init reported in a console log, if it got that far.
pub fn exit_status_from_console(log: &str) -> Option<i32> {
    log.lines()
        .rev()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(EXIT_MARKER))
        .and_then(|s| s.trim().parse().ok())
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// A minimal writer of the "new ASCII" (newc, magic 070701) cpio format the kernel
/// unpacks into its initial rootfs. Every entry is owned by root with mtime 0, so the same
/// inputs give the same bytes.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Adds a directory. Parents must be added first.
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | perm, 1, (0, 0), data)
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let filesize = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{filesize:08x}\
             {maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            maj = 0,
            min = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name.len() + 1,
            check = 0,
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?; // header + name are padded to a multiple of 4
        self.put(data)?;
        self.pad() // and so is the data
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_param_is_one_space_free_word() {
        let p = command_param("echo 'a b'; exit 7");
        assert!(!p.contains(' '), "{p}");
        assert_eq!(p, "banger.cmd=ZWNobyAnYSBiJzsgZXhpdCA3");
    }

    #[test]
    fn exit_status_is_read_from_the_last_marker() {
        let log = "boot\r\nBANGER_EXIT=3\r\nnoise\nBANGER_EXIT=7\r\n[  1.0] reboot: Restarting\n";
        assert_eq!(exit_status_from_console(log), Some(7));
        assert_eq!(exit_status_from_console("kernel panic"), None);
    }

    #[test]
    fn newc_entries_are_four_byte_aligned_with_exact_header() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("init", 0o755, b"hi").unwrap();
        let out = w.finish().unwrap();
        let expected_header = "070701\
            00000001000081ed0000000000000000000000010000000000000002\
            00000000000000000000000000000000000000050000000";
        assert_eq!(&out[..110], format!("{expected_header}0").as_bytes());
        // 110 + "init\0" = 115 -> padded to 116, then "hi" + 2 pad.
        assert_eq!(&out[110..116], b"init\0\0");
        assert_eq!(&out[116..120], b"hi\0\0");
        assert_eq!(&out[120..126], b"070701");
        assert_eq!(out.len() % 4, 0);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn busybox_cpio_lists_what_we_wrote() {
        // Cross-check against an independent reader when one is installed.
        if !banger_testkit::require(
            Path::new(DEFAULT_BUSYBOX).exists(),
            format!("no {DEFAULT_BUSYBOX}"),
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("initrd");
        write_initramfs(
            &InitramfsSpec {
                busybox: DEFAULT_BUSYBOX.into(),
                kernel: None,
            },
            &out,
        )
        .unwrap();
        let listing = std::process::Command::new(DEFAULT_BUSYBOX)
            .args(["cpio", "-t", "-v", "-F"])
            .arg(&out)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(listing.status.success(), "{text}");
        for needle in ["init", "bin/busybox", "bin/sh -> busybox", "dev/console"] {
            assert!(text.contains(needle), "{needle:?} not in:\n{text}");
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("crw-------") && l.contains("dev/console")),
            "{text}"
        );
    }
}
