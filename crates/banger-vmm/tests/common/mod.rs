//! What the VM tests of banger-vmm share: the Debian cloud kernel, downloaded and
//! imported once (kept across runs under the target dir: the import is deterministic for
//! a given package), ext4 root disks made from a staging directory, and where the
//! Firecracker binaries are.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use banger_testkit::command::run_ok;
use banger_vmm::kernel::{self, KernelDir};

/// Downloads (once; cached under the target dir) the test kernel package. `None` only
/// when apt cannot download it (a skip, or a failure under `BANGER_TEST_STRICT`).
pub fn kernel_deb() -> Option<PathBuf> {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("banger-test-kernel");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    match banger_testkit::guest::fetch_test_kernel(&workspace, &cache) {
        Ok(deb) => Some(deb),
        Err(why) => {
            banger_testkit::require(false, why);
            None
        }
    }
}

/// The imported test kernel, shared by the tests of the binary.
pub fn cached_kernel() -> Option<&'static KernelDir> {
    static KERNEL: OnceLock<Option<KernelDir>> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let deb = kernel_deb()?;
            let stem = deb.file_stem().unwrap().to_string_lossy().into_owned();
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("banger-kernel-{stem}"));
            if dir.exists() {
                return Some(KernelDir::open(&dir).unwrap());
            }
            Some(kernel::import_deb(&deb, &dir, kernel::GUEST_MODULES).unwrap())
        })
        .as_ref()
}

/// `dir/rootfs.ext4`, an ext4 of `size` (as mkfs.ext4 reads it: "32M") holding `staging`.
pub fn mkfs_ext4(dir: &Path, staging: &Path, size: &str) -> PathBuf {
    let image = dir.join("rootfs.ext4");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(staging)
            .arg(&image)
            .arg(size),
        "make the root disk",
    );
    image
}

/// Firecracker's `name` (`firecracker`, `jailer`): see [`banger_testkit::firecracker::tool`].
pub fn firecracker_tool(name: &str) -> Option<PathBuf> {
    banger_testkit::firecracker::tool(name)
}

/// The `firecracker` binary; `None` (a skip, or a failure under `BANGER_TEST_STRICT`) when
/// there is none.
pub fn require_firecracker() -> Option<PathBuf> {
    let bin = firecracker_tool("firecracker");
    banger_testkit::require(
        bin.is_some(),
        "no firecracker binary (../shared/tools or PATH)",
    );
    bin
}
