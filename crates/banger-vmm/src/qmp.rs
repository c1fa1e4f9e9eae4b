//! QEMU's machine protocol (QMP) on a VM's `qmp.sock`: pause, resume, and saving the
//! whole VM state (memory and devices) to a file with a migration, which a second QEMU
//! started with the same devices plus `-incoming` restores.
//!
//! Also the disk side of copy-on-write VMs: qcow2 overlays on a read-only base
//! ([`create_overlay`]) and the `format=` QEMU opens a root disk with ([`disk_format`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, IoContext, Result};

/// How long one QMP reply may take. `stop` drains the block layer first.
pub const QMP_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The name a VM state file's descriptor has in QEMU while a save runs.
const STATE_FD_NAME: &str = "banger-state";
/// How long saving a VM's state may take (a 1 GiB TCG guest took 0.5 s here).
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);

/// The `format=` of a root disk for QEMU: qcow2 overlays by their name, raw otherwise.
pub fn disk_format(disk: &Path) -> &'static str {
    if disk.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    }
}

/// One QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    socket: PathBuf,
}

impl Qmp {
    /// Connects to `socket` and negotiates capabilities.
    pub fn connect(socket: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(socket).ctx("connect to QMP", socket)?;
        stream
            .set_read_timeout(Some(QMP_REPLY_TIMEOUT))
            .ctx("set QMP timeout", socket)?;
        let reader = BufReader::new(stream.try_clone().ctx("clone QMP socket", socket)?);
        let mut qmp = Qmp {
            reader,
            writer: stream,
            socket: socket.to_owned(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Vm(format!(
                "{}: no QMP greeting: {greeting}",
                socket.display()
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .ctx("read QMP reply", &self.socket)?;
        if n == 0 {
            return Err(Error::Vm(format!(
                "{}: QEMU closed the QMP connection",
                self.socket.display()
            )));
        }
        serde_json::from_str(&line).map_err(|e| Error::Format {
            path: self.socket.clone(),
            reason: format!("QMP reply is not JSON ({e}): {line}"),
        })
    }

    /// Runs `command` and returns its `return` value; asynchronous events are skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .ctx("send QMP command", &self.socket)?;
        self.read_reply(command)
    }

    /// The reply to `command`, asynchronous events skipped.
    fn read_reply(&mut self, command: &str) -> Result<Value> {
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(error) = reply.get("error") {
                return Err(Error::Vm(format!(
                    "QMP {command} on {}: {}",
                    self.socket.display(),
                    error["desc"].as_str().unwrap_or(&error.to_string())
                )));
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub fn status(&mut self) -> Result<String> {
        let status = self.execute("query-status", None)?;
        Ok(status["status"].as_str().unwrap_or("unknown").to_owned())
    }

    /// Stops the vCPUs (the guest's clock stops with them). QEMU drains and flushes
    /// the block devices first, so disk files are consistent with memory afterwards.
    pub fn stop(&mut self) -> Result<()> {
        self.execute("stop", None).map(drop)
    }

    /// Runs the vCPUs again.
    pub fn cont(&mut self) -> Result<()> {
        self.execute("cont", None).map(drop)
    }

    /// Saves the state of a stopped VM to `file` (created here, 0600) and waits until it
    /// is complete. The file goes to QEMU as a descriptor (`getfd` with `SCM_RIGHTS`,
    /// then `migrate fd:NAME`): QEMU's sandbox denies the spawn an `exec:` migration
    /// needs, and a confined QEMU may not open the path.
    pub fn save_state(&mut self, file: &Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)
            .ctx("create the VM state file", file)?;
        self.send_fd(STATE_FD_NAME, &out)?;
        // QEMU holds its own copy now; ours closes when `out` drops.
        self.execute(
            "migrate",
            Some(json!({ "uri": format!("fd:{STATE_FD_NAME}") })),
        )?;
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        loop {
            let info = self.execute("query-migrate", None)?;
            match info["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    return Err(Error::Vm(format!(
                        "saving the VM state to {} failed: {}",
                        file.display(),
                        info["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                _ => {}
            }
            if Instant::now() > deadline {
                let _ = self.execute("migrate_cancel", None);
                return Err(Error::Vm(format!(
                    "saving the VM state to {} took over {MIGRATE_TIMEOUT:?}",
                    file.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Hands `fd` to QEMU under `name` (QMP `getfd`, the descriptor riding along as
    /// `SCM_RIGHTS` on the command's bytes).
    pub fn send_fd(&mut self, name: &str, fd: &impl std::os::fd::AsFd) -> Result<()> {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let line = format!(
            "{}\n",
            json!({ "execute": "getfd", "arguments": { "fdname": name } })
        );
        let fds = [fd.as_fd()];
        let mut space = [0u8; rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        let sent = rustix::net::sendmsg(
            &self.writer,
            &[std::io::IoSlice::new(line.as_bytes())],
            &mut control,
            SendFlags::empty(),
        )
        .map_err(std::io::Error::from)
        .ctx("send a descriptor over QMP", &self.socket)?;
        if sent != line.len() {
            // The rest of the line without the descriptor (it went with the first byte).
            self.writer
                .write_all(&line.as_bytes()[sent..])
                .ctx("send QMP command", &self.socket)?;
        }
        self.read_reply("getfd").map(drop)
    }

    /// Waits until an `-incoming` restore has finished loading; the VM then runs (or is
    /// resumed here if QEMU left it paused).
    pub fn wait_restored(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.status()?.as_str() {
                "running" => return Ok(()),
                "paused" | "postmigrate" | "prelaunch" => {
                    self.cont()?;
                    return Ok(());
                }
                "inmigrate" | "restore-vm" => {}
                other => {
                    return Err(Error::Vm(format!(
                        "restoring into {} ended in state {other:?}",
                        self.socket.display()
                    )))
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Vm(format!(
                    "restore into {} not finished within {timeout:?}",
                    self.socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Connects to QMP at `socket`, retrying until QEMU has created it or `timeout` passed.
pub fn connect_waiting(socket: &Path, timeout: Duration) -> Result<Qmp> {
    let deadline = Instant::now() + timeout;
    loop {
        match Qmp::connect(socket) {
            Ok(qmp) => return Ok(qmp),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The arguments that make a QEMU started with a VM's usual arguments load the state
/// saved by [`Qmp::save_state`] instead of booting: `fd` is that file, opened read-only
/// and passed to QEMU under this number.
pub fn incoming_args(fd: std::os::fd::RawFd) -> Vec<String> {
    vec!["-incoming".into(), format!("fd:{fd}")]
}

/// Creates the qcow2 `overlay` on `base` (raw or qcow2, by [`disk_format`]) with the
/// given virtual size, without touching `base`: QEMU opens backing files read-only.
/// Costs the same whatever the size of `base`.
pub fn create_overlay(base: &Path, overlay: &Path, size_bytes: Option<u64>) -> Result<()> {
    let mut command = Command::new("qemu-img");
    command
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(base)
        .args(["-F", disk_format(base)])
        .arg(overlay);
    if let Some(size) = size_bytes {
        command.arg(size.to_string());
    }
    let out = command.output().ctx("run qemu-img create", overlay)?;
    if !out.status.success() {
        return Err(Error::Vm(format!(
            "qemu-img create {} on {}: {}",
            overlay.display(),
            base.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_format_follows_the_extension() {
        assert_eq!(disk_format(Path::new("/v/root.qcow2")), "qcow2");
        assert_eq!(disk_format(Path::new("/v/root.ext4")), "raw");
    }
}
