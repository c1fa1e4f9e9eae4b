//! Running the host tools a test sets itself up with or checks its work with (git, tar,
//! dpkg-deb, mkfs.ext4, e2fsck, debugfs…), where anything but success fails the test with
//! the tool's output, so a broken set-up is never mistaken for the behaviour under test.

use std::fmt::Display;
use std::path::Path;
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

/// [`run_ok`] for a test's own set-up, where the command line says what was being done.
pub fn run_setup(cmd: &mut Command) -> Output {
    run_ok(cmd, "test set-up")
}

/// Whether git is installed; fails under BANGER_TEST_STRICT=1 where it is not, skips
/// loudly otherwise (see [`crate::require`]).
pub fn git_installed() -> bool {
    crate::require(
        installed("git", "--version"),
        "git is not installed (scripts/setup.sh installs it)",
    )
}

/// Runs git in `dir` for the test's own set-up, reading no configuration of this host
/// (no system or global file, no hooks) so the host's git settings cannot change a test.
pub fn git(dir: &Path, args: &[&str]) {
    run_setup(
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "core.hooksPath=/dev/null",
            ])
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null"),
    );
}
