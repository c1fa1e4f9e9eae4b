//! `priv.vmm.launch` with the real helper binary, the real jailer and Firecracker
//! (../shared/tools/firecracker-v1.16.1, or PATH), for an owner that is not root: the
//! owner's side is bangerd's own code (`PrivClient` as the `JailLauncher` of
//! `banger_vmm::helper_jail::HelperJailed`) running on a thread whose credentials are the
//! owner's. Firecracker ends up chrooted in the helper's jail as the owner, under seccomp,
//! holding the owner's disk by hard link, its API started from the owner's run directory;
//! once it is killed the helper removes the jail and its cgroup. Then each refusal, typed:
//! an id that is not a VM id, descriptors that do not match `files`, an `O_PATH` handle, a
//! read-only disk, descriptors sent to another method, another uid, and a helper with no
//! jailer. A guest cannot boot on a paravirtual KVM host (HOST-NOTES), so the guest's own
//! boot is not part of it.

use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_vmm::firecracker::{api_socket, Firecracker};
use banger_vmm::helper_jail::HelperJailed;
use banger_vmm::qemu::Accel;
use banger_vmm::{VmSpec, Vmm};
use bangerd::services::privhelper::PrivClient;
use serde_json::Value;

const VM_ID: &str = "0123456789abcdef";

struct Helper(Child);
impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(name: &str) -> Option<PathBuf> {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/tools/firecracker-v1.16.1")
        .join(name);
    shared
        .is_file()
        .then_some(shared)
        .or_else(|| banger_vmm::backend::find_on_path(name))
}

fn start_helper(socket: &Path, owner_uid: u32, extra: &[&std::ffi::OsStr]) -> Helper {
    let child = Command::new(env!("CARGO_BIN_EXE_bangerd-root"))
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

/// One request with `fds` attached, as this thread's credentials; the reply.
fn call(socket: &Path, method: &str, params: Value, fds: &[BorrowedFd<'_>]) -> Value {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let stream = UnixStream::connect(socket).unwrap();
    let line = format!(
        "{}\n",
        serde_json::json!({ "id": 1, "method": method, "params": params })
    );
    let mut space = vec![0u8; rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let sent = rustix::net::sendmsg(
        &stream,
        &[IoSlice::new(line.as_bytes())],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
    (&stream).write_all(&line.as_bytes()[sent..]).unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

fn kind(reply: &Value) -> &str {
    reply["error"]["kind"].as_str().unwrap_or("none")
}

/// Runs `f` on a thread whose uid and gid (real, effective, saved, and so the filesystem
/// ones and what SO_PEERCRED reports) are `uid` and `gid`: the owner's bangerd.
fn as_owner<T: Send + 'static>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        use rustix::thread::{set_thread_res_gid, set_thread_res_uid};
        // SAFETY: these ids name an existing user and group; only this thread changes.
        let (u, g) = unsafe {
            (
                rustix::process::Uid::from_raw(uid),
                rustix::process::Gid::from_raw(gid),
            )
        };
        set_thread_res_gid(g, g, g).unwrap();
        set_thread_res_uid(u, u, u).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn status_field(pid: u32, task: Option<&str>, field: &str) -> String {
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

/// The test kernel's ELF vmlinux (the Debian cloud kernel, imported once).
fn vmlinux() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let deb =
        match banger_testkit::guest::fetch_test_kernel(&workspace, &tmp.join("banger-test-kernel"))
        {
            Ok(deb) => deb,
            Err(why) => {
                banger_testkit::require(false, why);
                return None;
            }
        };
    let dir = tmp.join(format!(
        "banger-kernel-{}",
        deb.file_stem().unwrap().to_string_lossy()
    ));
    let kernel = if dir.exists() {
        banger_vmm::kernel::KernelDir::open(&dir).unwrap()
    } else {
        banger_vmm::kernel::import_deb(&deb, &dir, banger_vmm::kernel::GUEST_MODULES).unwrap()
    };
    Some(kernel.ensure_vmlinux().unwrap())
}

/// The owner (the `banger-vmm` user scripts/setup.sh makes), the jailer and Firecracker.
fn preconditions() -> Option<(banger_vmm::confine::VmmUser, PathBuf, PathBuf)> {
    if !banger_testkit::require(
        rustix::process::geteuid().is_root(),
        "the jailer needs root",
    ) {
        return None;
    }
    let (Some(jailer), Some(firecracker)) = (tool("jailer"), tool("firecracker")) else {
        banger_testkit::require(false, "no firecracker and jailer (../shared/tools or PATH)");
        return None;
    };
    let owner =
        banger_vmm::confine::lookup_vmm_user(banger_vmm::confine::DEFAULT_VMM_USER).unwrap();
    let Some(owner) = owner else {
        banger_testkit::require(false, "no banger-vmm user (scripts/setup.sh creates it)");
        return None;
    };
    if !banger_testkit::require(Path::new("/dev/kvm").exists(), "no /dev/kvm") {
        return None;
    }
    Some((owner, jailer, firecracker))
}

#[test]
fn the_helper_jails_firecracker_as_the_owner_from_its_descriptors_and_cleans_up() {
    let Some((owner, jailer, firecracker)) = preconditions() else {
        return;
    };
    let Some(kernel) = vmlinux() else { return };
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let socket = tmp.path().join("bangerd-root.sock");
    let jails = tmp.path().join("jails");
    let _helper = start_helper(
        &socket,
        owner.uid,
        &[
            "--jail-dir".as_ref(),
            jails.as_os_str(),
            "--jailer".as_ref(),
            jailer.as_os_str(),
            "--firecracker".as_ref(),
            firecracker.as_os_str(),
        ],
    );
    // The owner's state: a run directory and a disk only it may open.
    let owner_dir = tmp.path().join("owner");
    let run = owner_dir.join(VM_ID);
    std::fs::create_dir_all(&run).unwrap();
    for dir in [&owner_dir, &run] {
        std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid)).unwrap();
    }
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let disk = run.join("root.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    std::os::unix::fs::chown(&disk, Some(owner.uid), Some(owner.gid)).unwrap();
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    let spec = VmSpec {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0".into(),
        root_disk: Some(disk.clone()),
        memory_mib: 256,
        vcpus: 1,
        net: None,
        accel: Accel::Kvm,
        run_dir: run.clone(),
        agent_socket: Some(run.join("vsock.sock")),
    };
    let backend = HelperJailed {
        firecracker: Firecracker {
            binary: firecracker.clone(),
            console_logger: None,
            jailer: None,
        },
        launcher: Arc::new(PrivClient::new(&socket)),
    };
    let pid = {
        let spec = spec.clone();
        as_owner(owner.uid, owner.gid, move || backend.spawn_detached(&spec))
    }
    .unwrap();

    let jail = jails.join("firecracker").join(VM_ID).join("root");
    let check = || -> Result<(), String> {
        let uid = status_field(pid, None, "Uid:");
        if uid.split_whitespace().any(|u| u != owner.uid.to_string()) {
            return Err(format!("firecracker runs as {uid:?}, not {}", owner.uid));
        }
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        if !root.join("firecracker").is_file() || root.join("etc/passwd").exists() {
            return Err("/proc/PID/root is not the jail".into());
        }
        // The owner's own disk, by hard link: the guest's writes land in it.
        let (inside, outside) = (
            std::fs::metadata(jail.join("root.ext4")).map_err(|e| e.to_string())?,
            std::fs::metadata(&disk).unwrap(),
        );
        if inside.ino() != outside.ino() || inside.uid() != owner.uid {
            return Err("the jail's disk is not the owner's disk".into());
        }
        let log = std::fs::metadata(jail.join("firecracker.log")).map_err(|e| e.to_string())?;
        if log.uid() != owner.uid {
            return Err(format!("firecracker.log belongs to uid {}", log.uid()));
        }
        // The API answers through the owner's run directory, and the VM was started.
        let state = as_owner(owner.uid, owner.gid, {
            let api = api_socket(&run);
            move || -> Result<String, String> {
                let mut s = UnixStream::connect(&api).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(
                    b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n",
                )
                .map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).map_err(|e| e.to_string())?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            }
        })?;
        if !state.contains("\"state\":\"Running\"") {
            return Err(format!("not Running: {state}"));
        }
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map_err(|e| e.to_string())?
            .map(|t| t.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        if !tasks
            .iter()
            .any(|t| status_field(pid, Some(t), "Seccomp:") == "2")
        {
            return Err("no thread of firecracker runs under seccomp".into());
        }
        // A second launch of a running id is refused.
        let again = as_owner(owner.uid, owner.gid, {
            let (socket, kernel, run) = (socket.clone(), spec.kernel.clone(), run.clone());
            move || {
                let k = std::fs::File::open(kernel).unwrap();
                let sink = std::fs::File::create(run.join("second.log")).unwrap();
                call(
                    &socket,
                    "priv.vmm.launch",
                    serde_json::json!({ "id": VM_ID, "files": ["kernel", "console", "stderr"] }),
                    &[k.as_fd(), sink.as_fd(), sink.as_fd()],
                )
            }
        });
        if kind(&again) != "bad_request" {
            return Err(format!("a second launch of {VM_ID}: {again}"));
        }
        Ok(())
    };
    let checked = check();
    // The owner kills its VMM; the helper reaps it and removes the jail and its cgroup.
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let instance = jails.join("firecracker").join(VM_ID);
    let deadline = Instant::now() + Duration::from_secs(20);
    while instance.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    checked.unwrap();
    assert!(
        !instance.exists(),
        "the helper left the jail {}",
        instance.display()
    );
    for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/cpu"] {
        let cgroup = Path::new(base).join("firecracker").join(VM_ID);
        assert!(
            !cgroup.exists(),
            "the jail's cgroup {} stayed",
            cgroup.display()
        );
        let _ = std::fs::remove_dir(cgroup.parent().unwrap());
    }
    // The owner's disk outlives its jail.
    assert_eq!(std::fs::metadata(&disk).unwrap().nlink(), 1);
}

#[test]
fn launch_refusals_are_typed() {
    let Some((owner, jailer, firecracker)) = preconditions() else {
        return;
    };
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let socket = tmp.path().join("bangerd-root.sock");
    let jails = tmp.path().join("jails");
    let _helper = start_helper(
        &socket,
        owner.uid,
        &[
            "--jail-dir".as_ref(),
            jails.as_os_str(),
            "--jailer".as_ref(),
            jailer.as_os_str(),
            "--firecracker".as_ref(),
            firecracker.as_os_str(),
        ],
    );
    let file = tmp.path().join("file");
    std::fs::write(&file, b"not a kernel").unwrap();
    std::os::unix::fs::chown(&file, Some(owner.uid), Some(owner.gid)).unwrap();

    let replies = as_owner(owner.uid, owner.gid, {
        let (socket, file) = (socket.clone(), file.clone());
        move || {
            let read = std::fs::File::open(&file).unwrap();
            let sink = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            let handle =
                rustix::fs::open(&file, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty())
                    .unwrap();
            let dir = std::fs::File::open(file.parent().unwrap()).unwrap();
            let launch = |id: &str, files: &[&str], fds: &[BorrowedFd<'_>]| {
                call(
                    &socket,
                    "priv.vmm.launch",
                    serde_json::json!({ "id": id, "files": files }),
                    fds,
                )
            };
            let three = ["kernel", "console", "stderr"];
            vec![
                (
                    "a VM id with a path in it",
                    launch(
                        "../../etc",
                        &three,
                        &[read.as_fd(), sink.as_fd(), sink.as_fd()],
                    ),
                ),
                (
                    "upper-case hex",
                    launch(
                        "0123456789ABCDEF",
                        &three,
                        &[read.as_fd(), sink.as_fd(), sink.as_fd()],
                    ),
                ),
                ("no descriptors", launch(VM_ID, &three, &[])),
                (
                    "one descriptor short",
                    launch(VM_ID, &three, &[read.as_fd(), sink.as_fd()]),
                ),
                (
                    "no kernel",
                    launch(VM_ID, &["console", "stderr"], &[sink.as_fd(), sink.as_fd()]),
                ),
                (
                    "an O_PATH kernel",
                    launch(VM_ID, &three, &[handle.as_fd(), sink.as_fd(), sink.as_fd()]),
                ),
                (
                    "a directory as kernel",
                    launch(VM_ID, &three, &[dir.as_fd(), sink.as_fd(), sink.as_fd()]),
                ),
                (
                    "a read-only disk",
                    launch(
                        VM_ID,
                        &["kernel", "disk", "console", "stderr"],
                        &[read.as_fd(), read.as_fd(), sink.as_fd(), sink.as_fd()],
                    ),
                ),
                (
                    "a read-only console",
                    launch(VM_ID, &three, &[read.as_fd(), read.as_fd(), sink.as_fd()]),
                ),
                (
                    "the kernel twice",
                    launch(
                        VM_ID,
                        &["kernel", "kernel", "console", "stderr"],
                        &[read.as_fd(), read.as_fd(), sink.as_fd(), sink.as_fd()],
                    ),
                ),
                (
                    "an unknown file kind",
                    launch(VM_ID, &["kernel", "script"], &[read.as_fd(), sink.as_fd()]),
                ),
                (
                    "descriptors to priv.ping",
                    call(&socket, "priv.ping", serde_json::json!({}), &[read.as_fd()]),
                ),
            ]
        }
    });
    let kinds: Vec<(&str, String)> = replies
        .iter()
        .map(|(what, reply)| (*what, kind(reply).to_owned()))
        .collect();
    let expected = [
        ("a VM id with a path in it", "invalid_vm_id"),
        ("upper-case hex", "invalid_vm_id"),
        ("no descriptors", "bad_descriptor"),
        ("one descriptor short", "bad_descriptor"),
        ("no kernel", "bad_descriptor"),
        ("an O_PATH kernel", "bad_descriptor"),
        ("a directory as kernel", "bad_descriptor"),
        ("a read-only disk", "bad_descriptor"),
        ("a read-only console", "bad_descriptor"),
        ("the kernel twice", "bad_descriptor"),
        ("an unknown file kind", "bad_request"),
        ("descriptors to priv.ping", "bad_descriptor"),
    ];
    let expected: Vec<(&str, String)> = expected.iter().map(|(w, k)| (*w, k.to_string())).collect();
    assert_eq!(kinds, expected, "{replies:#?}");
    // Nothing was jailed, and the refused requests left no jail behind.
    let instance = jails.join("firecracker").join(VM_ID);
    assert!(!instance.exists());
    // Another uid (root here) is refused before anything is looked at.
    let read = std::fs::File::open(&file).unwrap();
    let reply = call(
        &socket,
        "priv.vmm.launch",
        serde_json::json!({ "id": VM_ID, "files": ["kernel"] }),
        &[read.as_fd()],
    );
    assert_eq!(kind(&reply), "unauthorized", "{reply}");
    // A helper without a jailer says so; its ping reports no jailer.
    let bare_socket = tmp.path().join("bare.sock");
    let missing = tmp.path().join("no-jailer");
    let _bare = start_helper(
        &bare_socket,
        owner.uid,
        &["--jailer".as_ref(), missing.as_os_str()],
    );
    let (ping, launch) = as_owner(owner.uid, owner.gid, move || {
        let read = std::fs::File::open(&file).unwrap();
        (
            call(&bare_socket, "priv.ping", serde_json::json!({}), &[]),
            call(
                &bare_socket,
                "priv.vmm.launch",
                serde_json::json!({ "id": VM_ID, "files": ["kernel"] }),
                &[read.as_fd()],
            ),
        )
    });
    assert_eq!(ping["result"]["jailer"], Value::Null, "{ping}");
    assert_eq!(kind(&launch), "not_configured", "{launch}");
}
