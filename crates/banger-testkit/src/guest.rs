//! What VM tests need from the host: the static guest agent and a Debian cloud kernel.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The agent's target: a static binary runs in any image.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// Builds `banger-agent` for musl into `target_dir` (its own, so the build does not wait on
/// the lock of the `cargo test` running us) and returns the binary.
pub fn build_guest_agent(workspace: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "-p", "banger-agent", "--release", "--target", MUSL])
        .env("CARGO_TARGET_DIR", target_dir)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .output()
        .map_err(|e| format!("run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build -p banger-agent --target {MUSL}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target_dir.join(MUSL).join("release/banger-agent"))
}

/// Downloads (once, into `cache`) the Debian cloud kernel package with the project's own
/// script and returns the `.deb`.
pub fn fetch_test_kernel(workspace: &Path, cache: &Path) -> Result<PathBuf, String> {
    let script = workspace.join("scripts/fetch-test-kernel.sh");
    let out = Command::new(&script)
        .arg(cache)
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "cannot download a test kernel with apt: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The header of an image layer's entry of `kind`: owned by root, mtime 0 (so layers are
/// reproducible), with `mode` and `size` (0 for directories and links).
pub use banger_io::tar_entry::root_owned_header as layer_entry_header;

/// A layer holding a static busybox as /bin/busybox with `sh`, `cat`, `echo`… linked to it:
/// a minimal image any kernel can run commands in.
pub fn busybox_layer() -> Vec<u8> {
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static is installed (/bin/busybox)");
    let header = layer_entry_header;
    let mut builder = tar::Builder::new(Vec::new());
    for dir in ["bin/", "root/", "tmp/", "etc/"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        builder
            .append_data(&mut h, dir, &[][..])
            .expect("append dir");
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len());
    builder
        .append_data(&mut h, "bin/busybox", &busybox[..])
        .expect("append busybox");
    for applet in [
        "sh", "cat", "echo", "ls", "sleep", "true", "false", "mkdir", "rm", "pwd", "wc", "tty",
        "stty", "nproc",
    ] {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        builder
            .append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("append applet link");
    }
    // As in Debian and Ubuntu images with systemd-resolved: a link into /run, dangling
    // until something creates it. The agent must replace it, not write through it.
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    builder
        .append_link(
            &mut h,
            "etc/resolv.conf",
            "../run/systemd/resolve/stub-resolv.conf",
        )
        .expect("append resolv.conf link");
    builder.into_inner().expect("finish tar")
}
