//! A VM's root disk and boot files.
//!
//! QEMU VMs get a qcow2 overlay (`root.qcow2`) on the image's `rootfs.ext4`, which QEMU
//! opens read-only as the backing file: a create costs the same for a 100 MB and a 10 GB
//! image. A disk larger than the image is an overlay on a grown copy of the image made
//! once per size ([`grown_base`]). Firecracker takes raw disks only: `root.ext4` is a reflink where
//! the filesystem has them, else a sparse copy ([`create_cost`] says which).
//!
//! The agent is never written into a disk on the host: it rides in a second initramfs
//! archive appended to the kernel's ([`agent_initrd`]) and the init copies it into the
//! VM's root at each boot.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::services::tool;

/// The copy-on-write root disk of a QEMU VM.
pub const OVERLAY_DISK: &str = "root.qcow2";
/// The raw root disk of a Firecracker VM (and of VMs created before overlays).
pub const RAW_DISK: &str = "root.ext4";
/// The per-VM initramfs: the kernel's plus the agent.
pub const BOOT_INITRD: &str = "boot.initrd";

/// The root disk of the VM whose directory is `dir`.
pub fn root_disk(dir: &Path) -> PathBuf {
    let overlay = dir.join(OVERLAY_DISK);
    if overlay.exists() {
        overlay
    } else {
        dir.join(RAW_DISK)
    }
}

/// Makes the root disk of a new VM in `dir` from the image file `base` (`base_bytes`
/// long), `size` bytes large: an overlay unless `raw`.
pub fn prepare_root(
    raw: bool,
    base: &Path,
    base_bytes: u64,
    dir: &Path,
    size: u64,
) -> anyhow::Result<PathBuf> {
    if raw {
        let disk = dir.join(RAW_DISK);
        copy_disk(base, &disk)?;
        if size > base_bytes {
            grow_disk(&disk, size)?;
        }
        return Ok(disk);
    }
    let base = if size > base_bytes {
        grown_base(base, size)?
    } else {
        base.to_owned()
    };
    let base = base.as_path();
    protect_base(base)?;
    let disk = dir.join(OVERLAY_DISK);
    banger_vmm::qmp::create_overlay(base, &disk, Some(size)).with_context(|| {
        format!(
            "create the overlay {} on {}",
            disk.display(),
            base.display()
        )
    })?;
    Ok(disk)
}

/// The image `base` grown to `size` bytes, next to it (`grown/<size>.ext4`), made once
/// per size: banger's ext4 writer uses `sparse_super2`, which the kernel cannot resize
/// online, so the guest cannot grow an overlay's filesystem itself. The first create of
/// a size pays a sparse copy; later ones are overlays again. Removing the image removes
/// its grown bases.
fn grown_base(base: &Path, size: u64) -> anyhow::Result<PathBuf> {
    let dir = base
        .parent()
        .with_context(|| format!("{} has no parent directory", base.display()))?
        .join("grown");
    let grown = dir.join(format!("{size}.ext4"));
    if grown.is_file() {
        return Ok(grown);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{size}.{}.tmp",
        hex::encode(rand::random::<[u8; 4]>())
    ));
    let built = copy_disk(base, &tmp).and_then(|()| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("make {} writable", tmp.display()))?;
        grow_disk(&tmp, size)
    });
    if let Err(e) = built {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("grow {} to {size} bytes", base.display())));
    }
    std::fs::rename(&tmp, &grown).with_context(|| format!("publish {}", grown.display()))?;
    Ok(grown)
}

/// Base images are read-only files: QEMU opens backing files read-only anyway, this
/// keeps anything else of ours from writing through by mistake.
fn protect_base(base: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(base).with_context(|| format!("stat {}", base.display()))?;
    if meta.permissions().mode() & 0o222 != 0 {
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o444))
            .with_context(|| format!("make {} read-only", base.display()))?;
    }
    Ok(())
}

/// Writes `<dir>/boot.initrd`: the kernel's initramfs `base` plus `agent`.
pub fn agent_initrd(base: &Path, agent: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let out = dir.join(BOOT_INITRD);
    banger_vmm::initramfs::write_agent_initrd(base, agent, &out)
        .with_context(|| format!("build the boot initramfs {}", out.display()))?;
    Ok(out)
}

/// A copy-on-write copy where the filesystem can (reflink), a sparse one otherwise.
pub fn copy_disk(from: &Path, to: &Path) -> anyhow::Result<()> {
    tool::run(
        Command::new("cp")
            .arg("--reflink=auto")
            .arg("--sparse=always")
            .arg(from)
            .arg(to),
        "cp (copy the image's root filesystem)",
    )
    .map(drop)
}

/// Grows a raw ext4 disk file to `bytes`, and its filesystem with it (offline).
pub(crate) fn grow_disk(disk: &Path, bytes: u64) -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .and_then(|f| f.set_len(bytes))
        .with_context(|| format!("grow {}", disk.display()))?;
    tool::run(
        Command::new("e2fsck").args(["-f", "-p"]).arg(disk),
        "e2fsck",
    )?;
    tool::run(Command::new("resize2fs").arg(disk), "resize2fs").map(drop)
}

/// Grows the qcow2 overlay `overlay` of a stopped VM, and the ext4 in it, to `bytes`,
/// keeping it an overlay on the same backing file. banger's ext4 uses `sparse_super2`,
/// which only an offline resize2fs can grow, and resize2fs reads a raw file: the disk as
/// the guest sees it is flattened into a sparse raw file next to it, grown there, then
/// made an overlay again with `qemu-img rebase` (safe mode: only the clusters that differ
/// from the backing file, the VM's own data and the resize's metadata, are written).
/// The old overlay is replaced only once the new one is complete.
pub fn grow_overlay(overlay: &Path, bytes: u64) -> anyhow::Result<()> {
    let chain = banger_vmm::qcow2::chain(overlay)
        .with_context(|| format!("read the backing chain of {}", overlay.display()))?;
    let backing = chain
        .get(1)
        .with_context(|| format!("{} has no backing file", overlay.display()))?;
    let dir = overlay
        .parent()
        .with_context(|| format!("{} has no parent directory", overlay.display()))?;
    let tag = hex::encode(rand::random::<[u8; 4]>());
    let flat = dir.join(format!(".grow-{tag}.raw"));
    let next = dir.join(format!(".grow-{tag}.qcow2"));
    let grown = (|| -> anyhow::Result<()> {
        tool::run(
            Command::new("qemu-img")
                .args(["convert", "-q", "-f", "qcow2", "-O", "raw", "-S", "4k"])
                .arg(overlay)
                .arg(&flat),
            "qemu-img convert (flatten the disk to grow it)",
        )?;
        grow_disk(&flat, bytes)?;
        banger_vmm::qmp::create_overlay(&flat, &next, Some(bytes))
            .context("overlay the grown disk")?;
        tool::run(
            Command::new("qemu-img")
                .args(["rebase", "-q", "-f", "qcow2", "-b"])
                .arg(&backing.path)
                .args(["-F", backing.format])
                .arg(&next),
            "qemu-img rebase (back onto the image)",
        )?;
        std::fs::rename(&next, overlay)
            .with_context(|| format!("replace {} with the grown overlay", overlay.display()))
    })();
    let _ = std::fs::remove_file(&flat);
    if grown.is_err() {
        let _ = std::fs::remove_file(&next);
    }
    grown.with_context(|| format!("grow {} to {bytes} bytes", overlay.display()))
}

/// What a `vm create` costs in disk work on this host, per backend, for `doctor`.
pub fn create_cost(vms_dir: &Path) -> String {
    let reflink = reflink_works(vms_dir);
    format!(
        "qemu: a qcow2 overlay (constant, whatever the image size); firecracker: {}",
        match reflink {
            Ok(true) => "a reflink of the image (constant)".to_owned(),
            Ok(false) => format!(
                "a full sparse copy of the image ({} has no reflinks)",
                vms_dir.display()
            ),
            Err(e) => format!("unknown ({e:#})"),
        }
    )
}

/// Whether `cp --reflink=always` works in `dir`.
fn reflink_works(dir: &Path) -> anyhow::Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let probe = dir.join(format!(
        ".reflink-probe-{}",
        hex::encode(rand::random::<[u8; 4]>())
    ));
    std::fs::create_dir(&probe).with_context(|| format!("create {}", probe.display()))?;
    let a = probe.join("a");
    let status = std::fs::write(&a, b"banger reflink probe")
        .context("write the reflink probe")
        .and_then(|()| {
            Command::new("cp")
                .arg("--reflink=always")
                .arg(&a)
                .arg(probe.join("b"))
                .stderr(std::process::Stdio::null())
                .status()
                .context("run cp")
        });
    let _ = std::fs::remove_dir_all(&probe);
    let status = status?;
    Ok(status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(program: &str, args: &[&str]) -> std::process::Output {
        Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    #[test]
    fn a_grown_overlay_stays_an_overlay_whose_ext4_spans_the_new_size_and_keeps_its_files() {
        if !banger_testkit::require(
            Command::new("qemu-img").arg("--version").output().is_ok(),
            "qemu-img (qemu-utils) is not installed",
        ) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("kept"), "kept\n").unwrap();
        let base = tmp.path().join("rootfs.ext4");
        let base_s = base.to_str().unwrap();
        // What banger's writer makes: sparse_super2, which only an offline resize grows.
        let out = tool(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-b",
                "4096",
                "-O",
                "sparse_super2",
                "-d",
                tree.to_str().unwrap(),
                base_s,
                "16M",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let before = std::fs::read(&base).unwrap();
        let overlay = tmp.path().join(OVERLAY_DISK);
        banger_vmm::qmp::create_overlay(&base, &overlay, Some(16 << 20)).unwrap();

        grow_overlay(&overlay, 48 << 20).unwrap();

        let info = tool(
            "qemu-img",
            &["info", "--output=json", overlay.to_str().unwrap()],
        );
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some(48 << 20), "{info}");
        assert_eq!(info["backing-filename"].as_str(), Some(base_s), "{info}");
        // Only what differs from the image went into the overlay.
        assert!(std::fs::metadata(&overlay).unwrap().len() < 8 << 20);
        assert_eq!(
            std::fs::read(&base).unwrap(),
            before,
            "the image is untouched"
        );
        let flat = tmp.path().join("flat.raw");
        let out = tool(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                overlay.to_str().unwrap(),
                flat.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let flat_s = flat.to_str().unwrap();
        let out = tool("e2fsck", &["-fn", flat_s]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let header =
            String::from_utf8_lossy(&tool("dumpe2fs", &["-h", flat_s]).stdout).into_owned();
        assert!(
            header
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Block", "count:", "12288"]),
            "{header}"
        );
        let kept = tool("debugfs", &["-R", "cat /kept", flat_s]);
        assert_eq!(String::from_utf8_lossy(&kept.stdout), "kept\n");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".grow-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
