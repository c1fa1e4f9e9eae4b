//! Skips that can fail: a test that cannot run its subject must never pass silently.
//!
//! `require(cond, why)` returns `true` when the test may go on. When it may not, it fails the
//! test under `BANGER_TEST_STRICT=1` (what `.ci/run` sets: these machines can run QEMU TCG,
//! a registry, e2fsprogs, root and network namespaces), and otherwise prints a loud `SKIP:`
//! line and appends it to the skip log (`BANGER_SKIP_LOG`, which `scripts/test.sh` prints as
//! the run's summary). [`skip_known`] is for what no machine of this project can do (a KVM
//! that boots Linux): it always skips, and is logged all the same.

use std::fmt::Display;
use std::io::Write;

/// The environment variable that turns a missing prerequisite into a failure.
pub const STRICT_ENV: &str = "BANGER_TEST_STRICT";
/// The file every skip is appended to, one line each, when set.
pub const SKIP_LOG_ENV: &str = "BANGER_SKIP_LOG";

/// Whether this run is strict (`BANGER_TEST_STRICT=1`).
pub fn strict() -> bool {
    std::env::var(STRICT_ENV).is_ok_and(|v| v == "1")
}

/// `true` when `cond` holds. Otherwise: panics naming `why` under `BANGER_TEST_STRICT=1`,
/// else skips loudly (stderr and the skip log) and returns `false`; the caller returns.
#[track_caller]
pub fn require(cond: bool, why: impl Display) -> bool {
    if cond {
        return true;
    }
    let at = std::panic::Location::caller();
    if strict() {
        panic!("{STRICT_ENV}=1 and this test cannot run its subject: {why} (at {at})");
    }
    log_skip(&format!("{} ({at}): {why}", test_name()));
    false
}

/// [`require`] that this test runs as root (uid 0), `why` saying what needs it.
#[track_caller]
pub fn require_root(why: impl Display) -> bool {
    require(rustix::process::geteuid().is_root(), why)
}

/// Skips for a reason no machine of this project can remedy (say, KVM that cannot boot
/// Linux); logged like any skip but never a failure, strict or not.
#[track_caller]
pub fn skip_known(why: impl Display) {
    let at = std::panic::Location::caller();
    log_skip(&format!(
        "{} ({at}): {why} [known limit of this host]",
        test_name()
    ));
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(str::to_owned)
        .or_else(|| std::env::args().nth(1))
        .unwrap_or_else(|| "test".into())
}

fn log_skip(line: &str) {
    eprintln!("SKIP: {line}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write per line: concurrent test processes append whole lines.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}
