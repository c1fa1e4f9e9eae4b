//! Small process and filesystem helpers both sides of the socket need.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;

/// Whether `pid` runs. An exited process stays a zombie until whoever adopted it reaps it,
/// which can take a while: a zombie counts as gone. The state is the field after the
/// `(comm)` in `/proc/<pid>/stat`.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let zombie = matches!(
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next()),
                Some("Z" | "X")
            );
            // A zombie leader whose other threads are still exiting (e.g. in disk I/O) has
            // not released its files yet, locks included: only a lone zombie is gone.
            !zombie || std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) > 1
        }
        Err(_) => false,
    }
}

/// Creates `dir` (and parents) and makes it 0700: it holds the socket and the database.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))
}
