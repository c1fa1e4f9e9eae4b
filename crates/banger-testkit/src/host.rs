//! Host tools a test runs for its own set-up (git, dpkg-deb, tar…): run, and fail the test
//! with the tool's stderr when they fail, so a broken set-up is never mistaken for the
//! behaviour under test.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `command` to its end and returns its output; panics, naming the command and with
/// its stderr, when it cannot start or exits unsuccessfully.
pub fn run_ok(command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether git is installed; fails under BANGER_TEST_STRICT=1 where it is not, skips
/// loudly otherwise (see [`crate::require`]).
pub fn git_installed() -> bool {
    crate::require(
        Command::new("git").arg("--version").output().is_ok(),
        "git is not installed (scripts/setup.sh installs it)",
    )
}

/// Runs git in `dir` for the test's own set-up, reading no configuration of this host
/// (no system or global file, no hooks) so the host's git settings cannot change a test.
pub fn git(dir: &Path, args: &[&str]) {
    run_ok(
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
