//! Firecracker in tests: where the binaries are (the release these machines keep in
//! ../shared/tools, else PATH), the VM the jail tests hand it (feature `vmm`), its API's
//! state, and what /proc says about the process a jail runs (its uid, whether a thread is
//! under seccomp).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Firecracker's `name` (`firecracker`, `jailer`): the release in
/// ../shared/tools/firecracker-v1.16.1, else the first on PATH.
pub fn tool(name: &str) -> Option<PathBuf> {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/tools/firecracker-v1.16.1")
        .join(name);
    if shared.is_file() {
        return Some(shared);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// The VM the jail tests launch (banger-vmm's jailer, bangerd-root's `priv.vmm.launch`):
/// `kernel` with a serial console, `disk` as its root disk, 256 MiB and one vCPU under KVM,
/// no network, its agent's vsock socket in `run_dir`.
#[cfg(feature = "vmm")]
pub fn vm_spec(kernel: PathBuf, disk: &Path, run_dir: &Path) -> banger_vmm::VmSpec {
    banger_vmm::VmSpec {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0".into(),
        root_disk: Some(disk.to_owned()),
        memory_mib: 256,
        vcpus: 1,
        net: None,
        accel: banger_vmm::backend::Accel::Kvm,
        run_dir: run_dir.to_owned(),
        agent_socket: Some(run_dir.join("vsock.sock")),
    }
}

/// The body of `GET /` on the API socket `api` (the instance's `state` is in it), or why
/// not.
pub fn api_state(api: &Path) -> Result<String, String> {
    let mut s = UnixStream::connect(api).map_err(|e| format!("connect {}: {e}", api.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The value of `field` (e.g. `Uid:`) in /proc/`pid`/status, or of thread `task`'s;
/// empty when the process or the field is gone.
pub fn status_field(pid: u32, task: Option<&str>, field: &str) -> String {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// Whether any thread of `pid` runs under a seccomp filter (`Seccomp: 2`): Firecracker
/// installs its filters per thread.
pub fn under_seccomp(pid: u32) -> Result<bool, String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
    Ok(tasks
        .flatten()
        .any(|t| status_field(pid, Some(&t.file_name().to_string_lossy()), "Seccomp:") == "2"))
}

/// Whether every uid of `pid` (real, effective, saved, filesystem) is `uid`.
pub fn runs_as(pid: u32, uid: u32) -> bool {
    let uids = status_field(pid, None, "Uid:");
    !uids.is_empty() && uids.split_whitespace().all(|u| u == uid.to_string())
}
