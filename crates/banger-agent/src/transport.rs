//! Where the agent's connections come from.
//!
//! The protocol only needs a byte stream per connection; a [`Transport`] hands those out
//! one after another: a virtio-serial port (QEMU's VMs), an `AF_VSOCK` listener
//! (Firecracker's VMs, chosen by `banger.agent_vsock=<port>` on the kernel command line),
//! or a Unix socket (tests, and running the agent on the host).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};

/// The virtio-serial port name the host gives the agent's port.
pub const PORT_NAME: &str = "banger.agent";

/// The kernel command-line parameter that makes the agent listen on this vsock port
/// instead of looking for its virtio-serial port.
pub const VSOCK_PARAM: &str = "banger.agent_vsock";

/// The vsock port the host connects to unless told otherwise.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;

/// Which transport the kernel command line asks for: `Some(port)` for vsock, `None` for
/// the virtio-serial port. A malformed port is an error, not a silent fallback: the host
/// would wait on a channel nobody serves.
pub fn vsock_port_from_cmdline(cmdline: &crate::system::Cmdline) -> Result<Option<u32>, String> {
    cmdline
        .get(VSOCK_PARAM)
        .map(|v| {
            v.parse()
                .map_err(|e| format!("{VSOCK_PARAM}={v}: not a port number: {e}"))
        })
        .transpose()
}

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

/// An `AF_VSOCK` stream socket listening on a port for any CID (the host's connections
/// arrive through the VMM's vsock device). The std library has no vsock type; the socket
/// calls go through libc.
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

impl VsockListener {
    /// Binds and listens on `port`. Fails with `EAFNOSUPPORT`-like errors until the vsock
    /// transport module has loaded, hence [`VsockListener::bind_waiting`].
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(ctx(io::Error::last_os_error(), "open an AF_VSOCK socket"));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain C data for which all-zero bytes are valid.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(ctx(
                io::Error::last_os_error(),
                &format!("bind vsock port {port}"),
            ));
        }
        // SAFETY: listen(2) on the socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } < 0 {
            return Err(ctx(
                io::Error::last_os_error(),
                &format!("listen on vsock port {port}"),
            ));
        }
        Ok(VsockListener { fd, port })
    }

    /// [`VsockListener::bind`], retried for up to `timeout` while the kernel has no vsock
    /// transport yet (the virtio vsock driver probes asynchronously after insmod).
    pub fn bind_waiting(port: u32, timeout: Duration) -> io::Result<VsockListener> {
        let deadline = Instant::now() + timeout;
        loop {
            match VsockListener::bind(port) {
                Ok(l) => return Ok(l),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The port listened on.
    pub fn port(&self) -> u32 {
        self.port
    }
}

impl Transport for VsockListener {
    fn accept(&mut self) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        let fd = loop {
            // SAFETY: accept4(2) with no address buffer; the result is checked.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                break fd;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(ctx(e, &format!("accept on vsock port {}", self.port)));
            }
        };
        // SAFETY: `fd` is the fresh connection accept4 returned; File takes ownership and
        // read/write on a stream socket behave like on a file.
        let conn = unsafe { File::from_raw_fd(fd) };
        Ok((Box::new(conn.try_clone()?), Box::new(conn)))
    }
}

fn ctx(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_is_chosen_by_the_kernel_command_line() {
        use crate::system::Cmdline;
        assert_eq!(
            vsock_port_from_cmdline(&Cmdline::parse("quiet banger.agent=1")),
            Ok(None)
        );
        assert_eq!(
            vsock_port_from_cmdline(&Cmdline::parse("banger.agent_vsock=1024")),
            Ok(Some(1024))
        );
        let err = vsock_port_from_cmdline(&Cmdline::parse("banger.agent_vsock=x")).unwrap_err();
        assert!(err.starts_with("banger.agent_vsock=x: not a port"), "{err}");
    }

    #[test]
    fn vsock_listener_binds_where_the_host_kernel_has_vsock() {
        // Hosts without the vsock core module refuse the address family: nothing to test.
        match VsockListener::bind(0xbad0) {
            Ok(l) => assert_eq!(l.port(), 0xbad0),
            // The guest agent's own crate stays free of test-kit dependencies (it builds
            // for musl); vsock is optional on a host, so this stays a loud skip.
            Err(e) => eprintln!("SKIP: no AF_VSOCK here: {e}"),
        }
    }

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
