//! The Firecracker backend of the [`Vmm`] trait.
//!
//! One `firecracker --api-sock <run>/firecracker.sock --id <vm> --log-path <run>/firecracker.log`
//! process per VM, started
//! detached (its own session) and configured through its REST API, whose request bodies
//! follow the field names of Firecracker's `firecracker.yaml` (swagger 2.0):
//!
//! ```text
//! PUT /boot-source             BootSource           kernel_image_path (ELF vmlinux), initrd_path, boot_args
//! PUT /drives/rootfs           Drive                drive_id, path_on_host, is_root_device, is_read_only
//! PUT /machine-config          MachineConfiguration vcpu_count, mem_size_mib, smt
//! PUT /network-interfaces/eth0 NetworkInterface     iface_id, host_dev_name, guest_mac
//! PUT /vsock                   Vsock                guest_cid, uds_path
//! PUT /actions                 InstanceActionInfo   action_type = InstanceStart
//! ```
//!
//! Each answers `204 No Content` on success and an `Error` object (`fault_message`)
//! otherwise; a failure kills the half-configured process and the error carries the body.
//!
//! Files in the run directory: `firecracker.sock` (API), `vsock.sock` (the vsock device's
//! host side, see [`crate::agent::AgentChannel::FirecrackerVsock`]), `console.log` (the
//! guest's serial console, which Firecracker writes to its stdout), `firecracker.log`
//! (its logger) and `firecracker.stderr`.
//!
//! Firecracker has no user-mode networking: a VM's network is a TAP device the caller
//! made. Its virtio-mmio devices reach a kernel without `VIRTIO_MMIO_CMDLINE_DEVICES`
//! (Debian's cloud kernel) only through ACPI, which Firecracker provides on x86-64 from
//! v1.8 on.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::agent::AGENT_VSOCK_PORT;
use crate::backend::{add_param, BackendKind, NetSpec, VmSpec, Vmm};
use crate::error::{Error, IoContext, Result};

/// The guest's vsock context id. Each Firecracker VM has its own vsock device and the
/// host never addresses guests by CID (it goes through the per-VM Unix socket), so every
/// VM can use the lowest CID a guest may have.
pub const GUEST_CID: u32 = 3;

/// How long Firecracker has to create its API socket after being spawned.
const API_SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one API request may take.
const API_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The Firecracker backend.
#[derive(Debug, Clone)]
pub struct Firecracker {
    /// The `firecracker` binary (config `firecracker_bin`, else found on PATH).
    pub binary: PathBuf,
    /// Caps the console log ([`crate::console`]); `None` writes `console.log` directly.
    pub console_logger: Option<crate::console::ConsoleLogger>,
    /// Launch through Firecracker's jailer (set when the daemon is root); `None` runs
    /// Firecracker directly as the caller.
    pub jailer: Option<Jailer>,
}

/// Firecracker's jailer and the user it drops to.
///
/// The jailer makes `<run>/jail/<firecracker's file name>/<id>/root`, copies Firecracker
/// there, creates `/dev/kvm` and `/dev/net/tun` in it, joins a cgroup of its own (where
/// the host has one the jailer can use), pivots into the directory in a new mount
/// namespace, drops to `user` and execs Firecracker, which then installs its default
/// seccomp filters. banger puts in the jail what Firecracker opens: the kernel and initrd
/// (hard links, copies across filesystems), the VM's disk (a hard link: the guest's
/// writes must land in the VM's own disk, which is then owned by `user`), the log file,
/// and the shared libraries of a dynamically linked Firecracker (upstream's releases are
/// static; a glibc build needs its loader and libraries). The API, vsock and log paths in
/// the run directory are symlinks into the jail, so everything else reaches them where
/// it always did. A TAP device is handed to `user` (TUNSETOWNER/TUNSETGROUP).
#[derive(Debug, Clone)]
pub struct Jailer {
    /// The `jailer` binary (config `jailer_bin`, else found on PATH).
    pub binary: PathBuf,
    /// Who Firecracker runs as.
    pub user: crate::confine::VmmUser,
}

/// Paths inside the jail (its root is `/` for Firecracker): the API socket.
pub const JAIL_API: &str = "/firecracker.sock";
/// The vsock device's host socket inside the jail.
pub const JAIL_VSOCK: &str = "/vsock.sock";
/// Firecracker's log inside the jail.
pub const JAIL_LOG: &str = "/firecracker.log";
/// The kernel inside the jail.
pub const JAIL_KERNEL: &str = "/vmlinux";
/// The initrd inside the jail.
pub const JAIL_INITRD: &str = "/initrd";
/// The VM's disk inside the jail.
pub const JAIL_DISK: &str = "/root.ext4";

impl Jailer {
    /// The jail's root directory for the VM in `run`, as the jailer builds it.
    pub fn root(&self, exec_file: &Path, run: &Path) -> PathBuf {
        jail_root(&run.join("jail"), exec_file, &instance_id(run))
    }

    /// Fills the jail of `spec` and returns the spec as Firecracker sees it from inside.
    fn prepare(&self, exec_file: &Path, spec: &VmSpec) -> Result<VmSpec> {
        let run = &spec.run_dir;
        let root = self.root(exec_file, run);
        // A jail of an earlier boot holds device nodes the jailer would fail to create.
        let jail = run.join("jail");
        remove_jail_cgroups(exec_file, run);
        if jail.exists() {
            fs::remove_dir_all(&jail).ctx("remove the old jail", &jail)?;
        }
        fs::create_dir_all(&root).ctx("create the jail", &root)?;
        let (uid, gid) = (self.user.uid, self.user.gid);
        let chown = |path: &Path| {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).ctx("chown to the VMM user", path)
        };
        copy_libraries_into(exec_file, &root)?;
        let link_or_copy = |from: &Path, to: &str| -> Result<()> {
            let dest = root.join(&to[1..]);
            if fs::hard_link(from, &dest).is_err() {
                fs::copy(from, &dest).ctx("copy into the jail", from)?;
            }
            Ok(())
        };
        let mut inside = spec.clone();
        link_or_copy(&spec.kernel, JAIL_KERNEL)?;
        inside.kernel = JAIL_KERNEL.into();
        if let Some(initrd) = &spec.initrd {
            link_or_copy(initrd, JAIL_INITRD)?;
            inside.initrd = Some(JAIL_INITRD.into());
        }
        if let Some(disk) = &spec.root_disk {
            let dest = root.join(&JAIL_DISK[1..]);
            fs::hard_link(disk, &dest).ctx("hard-link the VM's disk into the jail", disk)?;
            chown(&dest)?;
            inside.root_disk = Some(JAIL_DISK.into());
        }
        let log = root.join(&JAIL_LOG[1..]);
        fs::File::create(&log).ctx("create", &log)?;
        chown(&log)?;
        // The host-side names, unchanged for every caller.
        if spec.agent_socket.is_some() {
            inside.agent_socket = Some(JAIL_VSOCK.into());
        }
        link_run_dir_into_jail(spec, &root)?;
        if let Some(NetSpec::Tap { ifname, .. }) = &spec.net {
            crate::confine::give_tap(ifname, uid, gid)
                .map_err(|e| Error::Vm(format!("hand TAP {ifname} to the VMM user: {e}")))?;
        }
        Ok(inside)
    }

    /// The jailer's command line up to `--`, for Firecracker `exec_file` in `run`.
    pub fn args(&self, exec_file: &Path, run: &Path) -> Vec<std::ffi::OsString> {
        jailer_args(
            &instance_id(run),
            exec_file,
            (self.user.uid, self.user.gid),
            &run.join("jail"),
        )
    }
}

/// The jail's root directory for Firecracker `exec_file` with `--id` `id`, as the jailer
/// builds it under `chroot_base`: `<chroot_base>/<exec_file's name>/<id>/root`.
pub fn jail_root(chroot_base: &Path, exec_file: &Path, id: &str) -> PathBuf {
    chroot_base
        .join(exec_file_name(exec_file))
        .join(id)
        .join("root")
}

/// The name the jailer gives a jail's directory for `exec_file` (its file name).
pub fn exec_file_name(exec_file: &Path) -> String {
    exec_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "firecracker".into())
}

/// Makes the run directory's `firecracker.sock`, `firecracker.log` and (with an agent)
/// `vsock.sock` of `spec` symlinks to their places in the jail `root`, so every other
/// caller reaches them where it always did.
pub(crate) fn link_run_dir_into_jail(spec: &VmSpec, root: &Path) -> Result<()> {
    let run = &spec.run_dir;
    let mut links = vec![
        (api_socket(run), JAIL_API),
        (run.join("firecracker.log"), JAIL_LOG),
    ];
    if let Some(socket) = &spec.agent_socket {
        links.push((socket.clone(), JAIL_VSOCK));
    }
    for (outside, name) in links {
        let _ = fs::remove_file(&outside);
        std::os::unix::fs::symlink(root.join(&name[1..]), &outside)
            .ctx("link into the jail", &outside)?;
    }
    Ok(())
}

/// The jailer's command line up to `--`: instance `id`, Firecracker `exec_file`, the
/// `(uid, gid)` it drops to and the jails' base directory; a cgroup of its own where the
/// host has one the jailer can use.
pub fn jailer_args(
    id: &str,
    exec_file: &Path,
    (uid, gid): (u32, u32),
    chroot_base: &Path,
) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![
        "--id".into(),
        id.into(),
        "--exec-file".into(),
        exec_file.into(),
        "--uid".into(),
        uid.to_string().into(),
        "--gid".into(),
        gid.to_string().into(),
        "--chroot-base-dir".into(),
        chroot_base.into(),
    ];
    // A cgroup of its own, at the default weight: the VM's CPU can then be accounted
    // and limited. cgroup v2 where the unified hierarchy is mounted, else v1's cpu
    // controller; neither, no cgroup.
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        a.extend(["--cgroup-version".into(), "2".into()]);
        a.extend(["--cgroup".into(), "cpu.weight=100".into()]);
    } else if Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists() {
        a.extend(["--cgroup".into(), "cpu.shares=1024".into()]);
    }
    a
}

/// Copies the loader and libraries of a dynamically linked `exec_file` into the jail
/// `root` at their own paths (none for a static build, as upstream ships).
pub fn copy_libraries_into(exec_file: &Path, root: &Path) -> Result<()> {
    for lib in shared_libraries(exec_file)? {
        let inside = root.join(lib.strip_prefix("/").unwrap_or(&lib));
        if let Some(parent) = inside.parent() {
            fs::create_dir_all(parent).ctx("create", parent)?;
        }
        fs::copy(&lib, &inside).ctx("copy a library of firecracker into the jail", &lib)?;
    }
    Ok(())
}

/// The loader and libraries a dynamically linked `binary` needs (`ldd`); none for a
/// static one.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output();
    let Ok(out) = out else {
        // No ldd: assume a static build, as upstream ships.
        return Ok(Vec::new());
    };
    if !out.status.success() {
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim().split(' ').next()?,
                None => line.trim().split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Removes the cgroups the jailer made for the VM in `run` (they outlive the process).
pub fn remove_jail_cgroups(exec_file: &Path, run: &Path) {
    remove_cgroups_of(exec_file, &instance_id(run));
}

/// Removes the cgroups the jailer made for instance `id` of `exec_file` (v2 and v1's
/// cpu controller); an absent or still populated one is left.
pub fn remove_cgroups_of(exec_file: &Path, id: &str) {
    let name = exec_file_name(exec_file);
    for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/cpu"] {
        let _ = fs::remove_dir(Path::new(base).join(&name).join(id));
    }
}

/// One API call: method, path and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// `PUT` for everything banger sends.
    pub method: &'static str,
    /// The resource, e.g. `/boot-source`.
    pub path: String,
    /// The JSON body.
    pub body: Value,
}

impl ApiRequest {
    fn put(path: impl Into<String>, body: Value) -> ApiRequest {
        ApiRequest {
            method: "PUT",
            path: path.into(),
            body,
        }
    }
}

/// An HTTP response as far as banger reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code, e.g. 204.
    pub status: u16,
    /// The reason phrase, e.g. `No Content`.
    pub reason: String,
    /// The body (Firecracker's `{"fault_message": ...}` on errors).
    pub body: String,
}

/// The API socket in a VM's run directory.
pub fn api_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("firecracker.sock")
}

/// The kernel command line Firecracker boots with: the caller's, plus what this backend
/// needs unless the caller chose otherwise: `reboot=k` (a guest reboot goes through the
/// i8042 reset line, which Firecracker turns into its own exit: that is how a VM ends),
/// `pci=off` (the devices are virtio-mmio; probing PCI only costs boot time) and the
/// agent's vsock port.
pub fn boot_args(spec: &VmSpec) -> String {
    let mut cmdline = spec.cmdline.clone();
    add_param(&mut cmdline, "reboot=k");
    add_param(&mut cmdline, "pci=off");
    if spec.agent_socket.is_some() {
        add_param(
            &mut cmdline,
            &format!(
                "{}={AGENT_VSOCK_PORT}",
                banger_agent::transport::VSOCK_PARAM
            ),
        );
    }
    cmdline
}

/// The API calls that configure and start the VM of `spec`, in order.
///
/// Fails for what Firecracker cannot do: user-mode networking (it has none).
pub fn plan(spec: &VmSpec) -> Result<Vec<ApiRequest>> {
    let mut calls = vec![ApiRequest::put("/boot-source", {
        let mut body = json!({
            "kernel_image_path": spec.kernel,
            "boot_args": boot_args(spec),
        });
        if let Some(initrd) = &spec.initrd {
            body["initrd_path"] = json!(initrd);
        }
        body
    })];
    if let Some(disk) = &spec.root_disk {
        calls.push(ApiRequest::put(
            "/drives/rootfs",
            json!({
                "drive_id": "rootfs",
                "path_on_host": disk,
                // banger's initramfs mounts /dev/vda itself; as "root device" Firecracker
                // would add its own root= to the command line.
                "is_root_device": false,
                "is_read_only": false,
            }),
        ));
    }
    calls.push(ApiRequest::put(
        "/machine-config",
        json!({
            "vcpu_count": spec.vcpus,
            "mem_size_mib": spec.memory_mib,
            "smt": false,
        }),
    ));
    match &spec.net {
        None => {}
        Some(NetSpec::Tap { ifname, mac }) => calls.push(ApiRequest::put(
            "/network-interfaces/eth0",
            json!({
                "iface_id": "eth0",
                "host_dev_name": ifname,
                "guest_mac": mac,
            }),
        )),
        Some(NetSpec::User(_)) => return Err(Error::Vm(
            "Firecracker has no user-mode networking: give the VM a TAP device (network = \"tap\")"
                .into(),
        )),
    }
    if let Some(socket) = &spec.agent_socket {
        calls.push(ApiRequest::put(
            "/vsock",
            json!({
                "guest_cid": GUEST_CID,
                "uds_path": socket,
            }),
        ));
    }
    calls.push(ApiRequest::put(
        "/actions",
        json!({ "action_type": "InstanceStart" }),
    ));
    Ok(calls)
}

/// The bytes of one HTTP/1.1 request for `req`.
pub fn encode_request(req: &ApiRequest) -> Vec<u8> {
    let body = req.body.to_string();
    format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        req.method,
        req.path,
        body.len()
    )
    .into_bytes()
}

/// Reads one HTTP/1.1 response: status line, headers, then a body of `Content-Length`
/// bytes (none without the header: Firecracker always sends it when there is a body,
/// and keeps the connection open, so reading to end-of-file would hang).
pub fn read_response(reader: &mut impl BufRead) -> io::Result<HttpResponse> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status_line = line.trim_end().to_owned();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("not an HTTP response: {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("no status code in {status_line:?}")))?;
    let reason = parts.next().unwrap_or_default().to_owned();
    let mut content_length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside the response headers",
            ));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = value
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("bad Content-Length in {header:?}")))?;
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    Ok(HttpResponse {
        status,
        reason,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends `req` over a new connection to the API socket and returns the response.
///
/// A hand-written HTTP/1.1 client over `std::os::unix::net::UnixStream`: banger needs one
/// request shape (a JSON PUT) and one response shape (status + Content-Length body) on a
/// local socket, which is less code than wiring an async HTTP stack (hyper + a Unix
/// connector) into a crate that is otherwise synchronous.
pub fn call(socket: &Path, req: &ApiRequest) -> Result<HttpResponse> {
    let io_err = |source| {
        Error::from(banger_io::IoError::new(
            "talk to the firecracker API at",
            socket,
            source,
        ))
    };
    let mut stream = UnixStream::connect(socket).map_err(io_err)?;
    stream
        .set_read_timeout(Some(API_REQUEST_TIMEOUT))
        .map_err(io_err)?;
    stream.write_all(&encode_request(req)).map_err(io_err)?;
    read_response(&mut BufReader::new(stream)).map_err(io_err)
}

/// [`call`], failing unless the answer is a 2xx; the error names the request and carries
/// Firecracker's `fault_message` (or the raw body).
pub fn call_ok(socket: &Path, req: &ApiRequest) -> Result<()> {
    let resp = call(socket, req)?;
    if (200..300).contains(&resp.status) {
        return Ok(());
    }
    let fault = serde_json::from_str::<Value>(&resp.body)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| resp.body.trim().to_owned());
    Err(Error::Api {
        request: format!("{} {}", req.method, req.path),
        status: resp.status,
        reason: resp.reason,
        fault,
    })
}

/// Firecracker's `--id`: alphanumerics and `-`, at most 64 characters; from the run
/// directory's name (the VM id) so its log lines say which VM they are about.
pub fn instance_id(run_dir: &Path) -> String {
    let mut id: String = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    if id.is_empty() {
        id = "banger-vm".into();
    }
    id
}

impl Vmm for Firecracker {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    fn binary(&self) -> &Path {
        &self.binary
    }

    fn spawn_detached(&self, spec: &VmSpec) -> Result<u32> {
        use std::os::unix::process::CommandExt;
        // Validate before starting anything.
        plan(spec)?;
        let run = &spec.run_dir;
        fs::create_dir_all(run).ctx("create vm run dir", run)?;
        let api = api_socket(run);
        // Firecracker refuses to start on an existing API socket, and the vsock device
        // fails to bind over a stale one.
        let _ = fs::remove_file(&api);
        if let Some(socket) = &spec.agent_socket {
            let _ = fs::remove_file(socket);
        }
        let log = run.join("firecracker.log");
        let _ = fs::remove_file(&log);
        let (calls, log_arg, api_arg) = match &self.jailer {
            Some(jailer) => {
                let inside = jailer.prepare(&self.binary, spec)?;
                (
                    plan(&inside)?,
                    PathBuf::from(JAIL_LOG),
                    PathBuf::from(JAIL_API),
                )
            }
            None => {
                // The logger opens an existing file (or FIFO) only.
                fs::File::create(&log).ctx("create", &log)?;
                (plan(spec)?, log.clone(), api.clone())
            }
        };
        let console: Stdio = console_sink(self.console_logger.as_ref(), run)?.into();
        let stderr_path = run.join("firecracker.stderr");
        let stderr = fs::File::create(&stderr_path).ctx("create", &stderr_path)?;
        let mut command = match &self.jailer {
            Some(jailer) => {
                let mut c = Command::new(&jailer.binary);
                // The jailer passes Firecracker its --id.
                c.args(jailer.args(&self.binary, run)).arg("--");
                c
            }
            None => {
                let mut c = Command::new(&self.binary);
                c.arg("--id").arg(instance_id(run));
                c
            }
        };
        command
            .arg("--api-sock")
            .arg(&api_arg)
            // The logger from the first line on: configured through the API (after
            // launch), Firecracker's first lines went to stdout, the guest's console.
            .args(logger_args(&log_arg))
            .stdin(Stdio::null())
            // The guest's serial console goes to Firecracker's stdout.
            .stdout(console)
            .stderr(stderr);
        // SAFETY: setsid is async-signal-safe and touches no parent memory; it keeps the
        // VM out of the daemon's process group, so signals aimed at the daemon spare it.
        unsafe {
            command.pre_exec(|| rustix::process::setsid().map(drop).map_err(Into::into));
        }
        let spawned = self.jailer.as_ref().map_or(&self.binary, |j| &j.binary);
        let mut child = command.spawn().ctx("spawn", spawned)?;
        let pid = child.id();
        let configured = configure(&api, &calls, &stderr_path, || {
            Ok(child
                .try_wait()
                .ctx("wait for firecracker", &api)?
                .map(|status| status.to_string()))
        });
        if let Err(e) = configured {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(pid)
    }
}

/// Where the guest's serial console (Firecracker's stdout) goes for the VM in `run`: the
/// capping logger's pipe, else `console.log` itself.
pub(crate) fn console_sink(
    logger: Option<&crate::console::ConsoleLogger>,
    run: &Path,
) -> Result<std::os::fd::OwnedFd> {
    Ok(match logger {
        Some(logger) => logger
            .spawn(run)
            .ctx("start the console logger", &logger.program)?
            .into(),
        None => {
            let path = run.join("console.log");
            fs::File::create(&path).ctx("create", &path)?.into()
        }
    })
}

/// Waits for Firecracker's API socket `api`, then sends `calls` in order. `exited` says
/// whether (and how) the process ended, so a Firecracker that dies before serving its API
/// is reported with the tail of `stderr_path` rather than as a timeout.
pub(crate) fn configure(
    api: &Path,
    calls: &[ApiRequest],
    stderr_path: &Path,
    mut exited: impl FnMut() -> Result<Option<String>>,
) -> Result<()> {
    let deadline = Instant::now() + API_SOCKET_TIMEOUT;
    while UnixStream::connect(api).is_err() {
        if let Some(status) = exited()? {
            return Err(Error::Vm(format!(
                "firecracker exited ({status}) before serving its API: {}",
                tail(stderr_path)
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::Vm(format!(
                "firecracker did not create its API socket {} within {API_SOCKET_TIMEOUT:?}",
                api.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for req in calls {
        tracing::debug!(path = %req.path, body = %req.body, "firecracker API");
        call_ok(api, req)?;
    }
    Ok(())
}

/// Firecracker's command-line logger options: its own log in `log`, level Info, levels
/// shown.
pub fn logger_args(log: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--log-path".into(),
        log.into(),
        "--level".into(),
        "Info".into(),
        "--show-level".into(),
    ]
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Accel, UserNet};
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    fn spec() -> VmSpec {
        VmSpec {
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initramfs.cpio".into()),
            cmdline: "console=ttyS0 panic=-1 banger.agent=1".into(),
            root_disk: Some("/vms/abc/root.ext4".into()),
            memory_mib: 1024,
            vcpus: 2,
            net: Some(NetSpec::Tap {
                ifname: "bgr-abc".into(),
                mac: "02:b4:00:00:00:02".into(),
            }),
            accel: Accel::Kvm,
            run_dir: "/vms/abc".into(),
            agent_socket: Some("/vms/abc/vsock.sock".into()),
        }
    }

    #[test]
    fn plan_puts_each_resource_with_the_swagger_field_names_then_starts() {
        let calls = plan(&spec()).unwrap();
        let paths: Vec<&str> = calls.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/boot-source",
                "/drives/rootfs",
                "/machine-config",
                "/network-interfaces/eth0",
                "/vsock",
                "/actions"
            ]
        );
        assert!(calls.iter().all(|c| c.method == "PUT"));
        let body = |path: &str| calls.iter().find(|c| c.path == path).unwrap().body.clone();
        assert_eq!(
            body("/boot-source"),
            json!({"kernel_image_path": "/k/vmlinux", "initrd_path": "/k/initramfs.cpio",
                   "boot_args": "console=ttyS0 panic=-1 banger.agent=1 reboot=k pci=off banger.agent_vsock=1024"})
        );
        assert_eq!(
            body("/drives/rootfs"),
            json!({"drive_id": "rootfs", "path_on_host": "/vms/abc/root.ext4",
                   "is_root_device": false, "is_read_only": false})
        );
        assert_eq!(
            body("/machine-config"),
            json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false})
        );
        assert_eq!(
            body("/network-interfaces/eth0"),
            json!({"iface_id": "eth0", "host_dev_name": "bgr-abc", "guest_mac": "02:b4:00:00:00:02"})
        );
        assert_eq!(
            body("/vsock"),
            json!({"guest_cid": 3, "uds_path": "/vms/abc/vsock.sock"})
        );
        assert_eq!(body("/actions"), json!({"action_type": "InstanceStart"}));
    }

    #[test]
    fn plan_leaves_out_absent_devices_and_refuses_user_networking() {
        let mut s = spec();
        s.net = None;
        s.agent_socket = None;
        s.root_disk = None;
        s.initrd = None;
        let calls = plan(&s).unwrap();
        let paths: Vec<&str> = calls.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["/boot-source", "/machine-config", "/actions"]);
        assert_eq!(calls[0].body.get("initrd_path"), None);
        assert!(!calls[0].body["boot_args"]
            .as_str()
            .unwrap()
            .contains("agent_vsock"));
        s.net = Some(NetSpec::User(UserNet::default()));
        let err = plan(&s).unwrap_err().to_string();
        assert!(err.contains("no user-mode networking"), "{err}");
    }

    #[test]
    fn boot_args_keep_the_callers_reboot_choice() {
        let mut s = spec();
        s.cmdline = "console=ttyS0 reboot=t".into();
        assert_eq!(
            boot_args(&s),
            "console=ttyS0 reboot=t pci=off banger.agent_vsock=1024"
        );
    }

    #[test]
    fn request_is_http_1_1_with_exact_length() {
        let req = ApiRequest::put("/actions", json!({"action_type": "InstanceStart"}));
        let bytes = String::from_utf8(encode_request(&req)).unwrap();
        assert_eq!(
            bytes,
            "PUT /actions HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: 31\r\n\r\n\
             {\"action_type\":\"InstanceStart\"}"
        );
    }

    #[test]
    fn response_parsing_reads_status_and_exactly_the_body() {
        let raw = b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\nHTTP/1.1 400 Bad Request\r\n\
                    Content-Type: application/json\r\ncontent-length: 29\r\n\r\n{\"fault_message\":\"no kernel\"}trailing";
        let mut reader = &raw[..];
        let first = read_response(&mut reader).unwrap();
        assert_eq!(
            first,
            HttpResponse {
                status: 204,
                reason: "No Content".into(),
                body: String::new()
            }
        );
        let second = read_response(&mut reader).unwrap();
        assert_eq!(second.status, 400);
        assert_eq!(second.reason, "Bad Request");
        assert_eq!(second.body, "{\"fault_message\":\"no kernel\"}");
        assert_eq!(reader, b"trailing");
    }

    #[test]
    fn response_parsing_rejects_garbage_and_truncation() {
        let err = read_response(&mut &b"SSH-2.0-OpenSSH\r\n"[..]).unwrap_err();
        assert!(err.to_string().contains("not an HTTP response"), "{err}");
        let err = read_response(&mut &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"[..])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = read_response(&mut &b""[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A local peer speaking the API's HTTP: answers each request with the next canned
    /// response and hands back what it received.
    fn fake_api(socket: &Path, responses: Vec<String>) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for response in responses {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.strip_prefix("Content-Length: ") {
                        length = v.trim().parse().unwrap();
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                seen.push(format!(
                    "{}{}",
                    head.lines().next().unwrap(),
                    String::from_utf8(body).unwrap()
                ));
                (&stream).write_all(response.as_bytes()).unwrap();
            }
            seen
        })
    }

    #[test]
    fn call_ok_accepts_204_and_reports_the_fault_message_of_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("api.sock");
        let fault = r#"{"fault_message":"The kernel file cannot be opened: missing"}"#;
        let peer = fake_api(
            &socket,
            vec![
                "HTTP/1.1 204 No Content\r\n\r\n".into(),
                format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{fault}",
                    fault.len()
                ),
            ],
        );
        let machine = ApiRequest::put(
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128}),
        );
        call_ok(&socket, &machine).unwrap();
        let boot = ApiRequest::put("/boot-source", json!({"kernel_image_path": "/nope"}));
        let err = call_ok(&socket, &boot).unwrap_err().to_string();
        assert_eq!(
            err,
            "firecracker API PUT /boot-source: 400 Bad Request: The kernel file cannot be opened: missing"
        );
        assert_eq!(
            peer.join().unwrap(),
            [
                "PUT /machine-config HTTP/1.1{\"mem_size_mib\":128,\"vcpu_count\":1}",
                "PUT /boot-source HTTP/1.1{\"kernel_image_path\":\"/nope\"}"
            ]
        );
    }

    #[test]
    fn instance_id_is_the_run_dirs_name_within_firecrackers_alphabet() {
        assert_eq!(instance_id(Path::new("/s/vms/0123abcd")), "0123abcd");
        assert_eq!(instance_id(Path::new("/s/vms/a_b.c")), "abc");
        assert_eq!(instance_id(Path::new("/")), "banger-vm");
    }
}
