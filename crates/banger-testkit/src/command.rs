//! Running the host tools a test checks its work with (mkfs.ext4, e2fsck, debugfs,
//! dpkg-deb…), where anything but success is the test failing.

use std::fmt::Display;
use std::process::{Command, Output};

/// Whether `program` is installed: it runs at all with `arg` (such as `--version`).
pub fn installed(program: &str, arg: &str) -> bool {
    Command::new(program).arg(arg).output().is_ok()
}

/// Runs `cmd`, which must exit 0, and returns what it printed. Otherwise a panic naming
/// `context` (what the test was doing), the command, its status and all of its output.
pub fn run_ok(cmd: &mut Command, context: impl Display) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{context}: run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{context}: {cmd:?}: {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
