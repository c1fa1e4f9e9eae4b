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

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_testkit::firecracker;
use banger_vmm::firecracker::{api_socket, Firecracker};
use banger_vmm::helper_jail::HelperJailed;
use banger_vmm::Vmm;
use bangerd::services::privhelper::PrivClient;
use common::Helper;
use serde_json::Value;

mod common;

const VM_ID: &str = "0123456789abcdef";

fn start_helper(socket: &Path, owner_uid: u32, extra: &[&std::ffi::OsStr]) -> Helper {
    common::start(common::helper_command(), socket, owner_uid, extra)
}

/// A helper serving `owner_uid` in `dir` (made traversable for the owner) that jails with
/// `jailer` and `firecracker` under `dir/jails`; its socket and jail directory.
fn jailing_helper(
    dir: &Path,
    owner_uid: u32,
    jailer: &Path,
    firecracker: &Path,
) -> (Helper, PathBuf, PathBuf) {
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (socket, jails) = (dir.join("bangerd-root.sock"), dir.join("jails"));
    let helper = start_helper(
        &socket,
        owner_uid,
        &[
            "--jail-dir".as_ref(),
            jails.as_os_str(),
            "--jailer".as_ref(),
            jailer.as_os_str(),
            "--firecracker".as_ref(),
            firecracker.as_os_str(),
        ],
    );
    (helper, socket, jails)
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
    if !banger_testkit::require_root("the jailer needs root") {
        return None;
    }
    let (Some(jailer), Some(firecracker)) = (
        firecracker::tool("jailer"),
        firecracker::tool("firecracker"),
    ) else {
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
    let (_helper, socket, jails) = jailing_helper(tmp.path(), owner.uid, &jailer, &firecracker);
    // The owner's state: a run directory and a disk only it may open.
    let owner_dir = tmp.path().join("owner");
    let run = owner_dir.join(VM_ID);
    std::fs::create_dir_all(&run).unwrap();
    for dir in [&owner_dir, &run] {
        std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid)).unwrap();
    }
    let disk = run.join("root.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    std::os::unix::fs::chown(&disk, Some(owner.uid), Some(owner.gid)).unwrap();
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    let spec = firecracker::vm_spec(kernel, &disk, &run);
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
        if !firecracker::runs_as(pid, owner.uid) {
            return Err(format!("firecracker does not run as uid {}", owner.uid));
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
        let api = api_socket(&run);
        let state = as_owner(owner.uid, owner.gid, move || firecracker::api_state(&api))?;
        if !state.contains("\"state\":\"Running\"") {
            return Err(format!("not Running: {state}"));
        }
        if !firecracker::under_seccomp(pid)? {
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
    let (_helper, socket, jails) = jailing_helper(tmp.path(), owner.uid, &jailer, &firecracker);
    let file = tmp.path().join("file");
    std::fs::write(&file, b"not a kernel").unwrap();
    std::os::unix::fs::chown(&file, Some(owner.uid), Some(owner.gid)).unwrap();

    // Each refusal: what it is, the method, the id, what `files` says, the descriptors
    // sent (r: the file opened for reading, w: for writing, p: an O_PATH handle, d: a
    // directory), and the kind of error.
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
        &'static str,
        &'static str,
    );
    const THREE: &[&str] = &["kernel", "console", "stderr"];
    const CASES: &[Case] = &[
        (
            "a VM id with a path in it",
            "priv.vmm.launch",
            "../../etc",
            THREE,
            "rww",
            "invalid_vm_id",
        ),
        (
            "upper-case hex",
            "priv.vmm.launch",
            "0123456789ABCDEF",
            THREE,
            "rww",
            "invalid_vm_id",
        ),
        (
            "no descriptors",
            "priv.vmm.launch",
            VM_ID,
            THREE,
            "",
            "bad_descriptor",
        ),
        (
            "one descriptor short",
            "priv.vmm.launch",
            VM_ID,
            THREE,
            "rw",
            "bad_descriptor",
        ),
        (
            "no kernel",
            "priv.vmm.launch",
            VM_ID,
            &["console", "stderr"],
            "ww",
            "bad_descriptor",
        ),
        (
            "an O_PATH kernel",
            "priv.vmm.launch",
            VM_ID,
            THREE,
            "pww",
            "bad_descriptor",
        ),
        (
            "a directory as kernel",
            "priv.vmm.launch",
            VM_ID,
            THREE,
            "dww",
            "bad_descriptor",
        ),
        (
            "a read-only disk",
            "priv.vmm.launch",
            VM_ID,
            &["kernel", "disk", "console", "stderr"],
            "rrww",
            "bad_descriptor",
        ),
        (
            "a read-only console",
            "priv.vmm.launch",
            VM_ID,
            THREE,
            "rrw",
            "bad_descriptor",
        ),
        (
            "the kernel twice",
            "priv.vmm.launch",
            VM_ID,
            &["kernel", "kernel", "console", "stderr"],
            "rrww",
            "bad_descriptor",
        ),
        (
            "an unknown file kind",
            "priv.vmm.launch",
            VM_ID,
            &["kernel", "script"],
            "rw",
            "bad_request",
        ),
        (
            "descriptors to priv.ping",
            "priv.ping",
            "",
            &[],
            "r",
            "bad_descriptor",
        ),
    ];
    let replies = as_owner(owner.uid, owner.gid, {
        let (socket, file) = (socket.clone(), file.clone());
        move || {
            let read = std::fs::File::open(&file).unwrap();
            let sink = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            let handle =
                rustix::fs::open(&file, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty())
                    .unwrap();
            let dir = std::fs::File::open(file.parent().unwrap()).unwrap();
            CASES
                .iter()
                .map(|(what, method, id, files, fds, _)| {
                    let fds: Vec<BorrowedFd<'_>> = fds
                        .chars()
                        .map(|c| match c {
                            'r' => read.as_fd(),
                            'w' => sink.as_fd(),
                            'p' => handle.as_fd(),
                            _ => dir.as_fd(),
                        })
                        .collect();
                    let params = match *method {
                        "priv.ping" => serde_json::json!({}),
                        _ => serde_json::json!({ "id": id, "files": files }),
                    };
                    (*what, call(&socket, method, params, &fds))
                })
                .collect::<Vec<_>>()
        }
    });
    let kinds: Vec<(&str, &str)> = replies
        .iter()
        .map(|(what, reply)| (*what, kind(reply)))
        .collect();
    let expected: Vec<(&str, &str)> = CASES.iter().map(|c| (c.0, c.5)).collect();
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
