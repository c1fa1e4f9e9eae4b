//! The Firecracker backend of the [`Vmm`] trait.
//!
//! One `firecracker --api-sock <run>/firecracker.sock --id <vm>` process per VM, started
//! detached (its own session) and configured through its REST API, whose request bodies
//! follow the field names of Firecracker's `firecracker.yaml` (swagger 2.0):
//!
//! ```text
//! PUT /logger                  Logger               log_path, level, show_level, show_log_origin
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
    let run = &spec.run_dir;
    let mut calls = vec![
        ApiRequest::put(
            "/logger",
            json!({
                "log_path": run.join("firecracker.log"),
                "level": "Info",
                "show_level": true,
                "show_log_origin": false,
            }),
        ),
        ApiRequest::put("/boot-source", {
            let mut body = json!({
                "kernel_image_path": spec.kernel,
                "boot_args": boot_args(spec),
            });
            if let Some(initrd) = &spec.initrd {
                body["initrd_path"] = json!(initrd);
            }
            body
        }),
    ];
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
    let io_err = |source| Error::Io {
        op: "talk to the firecracker API at",
        path: socket.to_owned(),
        source,
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
fn instance_id(run_dir: &Path) -> String {
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

    fn version(&self) -> Result<String> {
        crate::backend::version_line(&self.binary, "--version")
    }

    fn spawn_detached(&self, spec: &VmSpec) -> Result<u32> {
        use std::os::unix::process::CommandExt;
        // Validate before starting anything.
        let calls = plan(spec)?;
        let run = &spec.run_dir;
        fs::create_dir_all(run).ctx("create vm run dir", run)?;
        let api = api_socket(run);
        // Firecracker refuses to start on an existing API socket, and the vsock device
        // fails to bind over a stale one.
        let _ = fs::remove_file(&api);
        if let Some(socket) = &spec.agent_socket {
            let _ = fs::remove_file(socket);
        }
        // The logger opens an existing file (or FIFO) only.
        let log = run.join("firecracker.log");
        fs::File::create(&log).ctx("create", &log)?;
        let console_path = run.join("console.log");
        let console = fs::File::create(&console_path).ctx("create", &console_path)?;
        let stderr_path = run.join("firecracker.stderr");
        let stderr = fs::File::create(&stderr_path).ctx("create", &stderr_path)?;
        let mut command = Command::new(&self.binary);
        command
            .arg("--api-sock")
            .arg(&api)
            .arg("--id")
            .arg(instance_id(run))
            .stdin(Stdio::null())
            // The guest's serial console goes to Firecracker's stdout.
            .stdout(console)
            .stderr(stderr);
        // SAFETY: setsid is async-signal-safe and touches no parent memory; it keeps the
        // VM out of the daemon's process group, so signals aimed at the daemon spare it.
        unsafe {
            command.pre_exec(|| rustix::process::setsid().map(drop).map_err(Into::into));
        }
        let mut child = command.spawn().ctx("spawn", &self.binary)?;
        let pid = child.id();
        let configured = (|| -> Result<()> {
            let deadline = Instant::now() + API_SOCKET_TIMEOUT;
            while UnixStream::connect(&api).is_err() {
                if let Some(status) = child.try_wait().ctx("wait for firecracker", &api)? {
                    return Err(Error::Vm(format!(
                        "firecracker exited ({status}) before serving its API: {}",
                        tail(&stderr_path)
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
            for req in &calls {
                tracing::debug!(path = %req.path, body = %req.body, "firecracker API");
                call_ok(&api, req)?;
            }
            Ok(())
        })();
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
                "/logger",
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
            body("/logger"),
            json!({"log_path": "/vms/abc/firecracker.log", "level": "Info",
                   "show_level": true, "show_log_origin": false})
        );
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
        assert_eq!(
            paths,
            ["/logger", "/boot-source", "/machine-config", "/actions"]
        );
        assert_eq!(calls[1].body.get("initrd_path"), None);
        assert!(!calls[1].body["boot_args"]
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
