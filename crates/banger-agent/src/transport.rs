//! Where the agent's connections come from.
//!
//! The protocol only needs a byte stream per connection; a [`Transport`] hands those out
//! one after another. Today: a virtio-serial port (the VM's), or a Unix socket (tests, and
//! running the agent on the host). A vsock listener would be a third implementation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};

/// The virtio-serial port name the host gives the agent's port.
pub const PORT_NAME: &str = "banger.agent";

/// A source of connections.
pub trait Transport {
    /// Waits for the next connection and returns its two halves.
    fn accept(&mut self) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)>;
}

/// A virtio-serial port (`/dev/vportNpM`).
///
/// A port is not a socket: there is one device, open for the agent's whole life, and the
/// "connection" is whether a host program holds the other end (QEMU's chardev). While no
/// host is connected a read returns end-of-file at once and `poll` reports `POLLHUP`, and
/// a write blocks. So [`Transport::accept`] waits until data is readable with a host
/// connected, and a connection ends when a read sees end-of-file.
pub struct VirtioPort {
    file: File,
    path: PathBuf,
}

impl VirtioPort {
    /// Opens the port device.
    pub fn open(path: &Path) -> io::Result<VirtioPort> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
        Ok(VirtioPort {
            file,
            path: path.to_owned(),
        })
    }

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Transport for VirtioPort {
    fn accept(&mut self) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        loop {
            let mut fds = [PollFd::new(&self.file, PollFlags::IN)];
            match poll(&mut fds, -1) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = fds[0].revents();
            if ready.contains(PollFlags::IN) && !ready.contains(PollFlags::HUP) {
                break;
            }
            // No host: the port polls as hung up without blocking, so nap instead. The
            // kernel has no wakeup for "host connected" short of SIGIO.
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((
            Box::new(self.file.try_clone()?),
            Box::new(self.file.try_clone()?),
        ))
    }
}

/// Finds the device of the virtio-serial port called `name` through
/// `/sys/class/virtio-ports/*/name`, waiting up to `timeout` for it to appear (the
/// driver probes it asynchronously after `virtio_console` loads).
pub fn find_virtio_port(name: &str, timeout: Duration) -> io::Result<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(dev) = lookup_port(Path::new("/sys/class/virtio-ports"), name) {
            let dev = Path::new("/dev").join(dev);
            if dev.exists() {
                return Ok(dev);
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no virtio-serial port named {name:?} in /sys/class/virtio-ports after {timeout:?}"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The entry of `class_dir` (e.g. `vport0p1`) whose `name` file holds `name`.
pub fn lookup_port(class_dir: &Path, name: &str) -> Option<String> {
    let mut found: Vec<String> = fs::read_dir(class_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim_end() == name))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// A Unix socket the agent listens on; each accepted stream is a connection.
pub struct UnixSocket {
    listener: UnixListener,
}

impl UnixSocket {
    /// Binds `path` (removing a stale socket file first).
    pub fn bind(path: &Path) -> io::Result<UnixSocket> {
        let _ = fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", path.display())))?;
        Ok(UnixSocket { listener })
    }
}

impl Transport for UnixSocket {
    fn accept(&mut self) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        let (stream, _) = self.listener.accept()?;
        Ok((Box::new(stream.try_clone()?), Box::new(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_port_matches_the_name_file_not_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        for (dir, name) in [
            ("vport0p0", "org.qemu.guest_agent.0\n"),
            ("vport1p1", "banger.agent\n"),
        ] {
            fs::create_dir(tmp.path().join(dir)).unwrap();
            fs::write(tmp.path().join(dir).join("name"), name).unwrap();
        }
        fs::create_dir(tmp.path().join("vport0p2")).unwrap(); // no name file
        assert_eq!(
            lookup_port(tmp.path(), PORT_NAME).as_deref(),
            Some("vport1p1")
        );
        assert_eq!(lookup_port(tmp.path(), "other"), None);
        assert_eq!(lookup_port(&tmp.path().join("missing"), PORT_NAME), None);
    }
}
