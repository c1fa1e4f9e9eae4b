//! What the tests of the helper binary share: starting it (killed on drop) and waiting
//! until it listens.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running bangerd-root, killed on drop.
pub struct Helper(pub Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` (bangerd-root, perhaps behind `ip netns exec`) with `--owner-uid
/// owner_uid --socket socket` and `extra`, and waits until the socket answers.
pub fn start(
    mut command: Command,
    socket: &Path,
    owner_uid: u32,
    extra: &[&std::ffi::OsStr],
) -> Helper {
    let child = command
        .arg("--owner-uid")
        .arg(owner_uid.to_string())
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "bangerd-root did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Helper(child)
}

/// The helper binary, to start directly.
pub fn helper_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bangerd-root"))
}
