//! Firecracker launched through its real jailer (../shared/tools, or on PATH), as a root
//! daemon does: the jail, the dropped uid, the API answering from inside. A guest cannot
//! boot on a paravirtual KVM host (HOST-NOTES), so this shows what the jailer and the
//! API can: every configuration call answered, the instance started.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_testkit::firecracker::{api_state, runs_as, status_field, under_seccomp, vm_spec};
use banger_vmm::firecracker::{api_socket, remove_jail_cgroups, Firecracker, Jailer};
use banger_vmm::Vmm;
use common::{cached_kernel, firecracker_tool};

#[test]
fn the_real_jailer_runs_firecracker_in_its_jail_as_the_vmm_user() {
    if !banger_testkit::require_root("the jailer needs root") {
        return;
    }
    let (Some(firecracker), Some(jailer)) =
        (firecracker_tool("firecracker"), firecracker_tool("jailer"))
    else {
        banger_testkit::require(false, "no firecracker and jailer (../shared/tools or PATH)");
        return;
    };
    let user = banger_vmm::confine::lookup_vmm_user(banger_vmm::confine::DEFAULT_VMM_USER).unwrap();
    let Some(user) = user else {
        banger_testkit::require(false, "no banger-vmm user (scripts/setup.sh creates it)");
        return;
    };
    if !banger_testkit::require(Path::new("/dev/kvm").exists(), "no /dev/kvm") {
        return;
    }
    let Some(k) = cached_kernel() else { return };
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let run = tmp.path().join("jailtest0");
    std::fs::create_dir_all(&run).unwrap();
    let disk = run.join("root.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let spec = vm_spec(k.ensure_vmlinux().unwrap(), &disk, &run);
    let backend = Firecracker {
        binary: firecracker.clone(),
        console_logger: None,
        jailer: Some(Jailer {
            binary: jailer,
            user: user.clone(),
        }),
    };
    // Every configuration call and InstanceStart answered, from inside the jail.
    let pid = backend.spawn_detached(&spec).unwrap();
    let check = || -> Result<(), String> {
        if !runs_as(pid, user.uid) {
            return Err(format!("firecracker does not run as uid {}", user.uid));
        }
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        if !root.join("firecracker").is_file() || !root.join("root.ext4").exists() {
            return Err("/proc/PID/root is not the jail".into());
        }
        if root.join("etc/passwd").exists() {
            return Err("the host's /etc is visible to firecracker".into());
        }
        let jail = backend.jailer.as_ref().unwrap().root(&firecracker, &run);
        if !jail.join("firecracker.sock").exists() {
            return Err(format!("no API socket in the jail {}", jail.display()));
        }
        let state = api_state(&api_socket(&run))?;
        if !state.contains("\"state\":\"Running\"") {
            return Err(format!("not Running: {state}"));
        }
        if !under_seccomp(pid)? {
            return Err("no thread of firecracker runs under seccomp".into());
        }
        Ok(())
    };
    let checked = check();
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}/status")).exists()
        && !status_field(pid, None, "State:").starts_with('Z')
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The cgroup empties once the killed process is reaped (a thread of ours does).
    let cgroup = Path::new("/sys/fs/cgroup/cpu/firecracker/jailtest0");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        remove_jail_cgroups(&firecracker, &run);
        if !cgroup.exists() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The jailer's parent cgroup, if no other VM is in it.
    let _ = std::fs::remove_dir(cgroup.parent().unwrap());
    checked.unwrap();
    assert!(!cgroup.exists(), "the jail's cgroup stayed");
    // The VM's own disk is what the jail holds (the guest's writes land there).
    use std::os::unix::fs::MetadataExt;
    let jail_disk = backend
        .jailer
        .as_ref()
        .unwrap()
        .root(&firecracker, &run)
        .join("root.ext4");
    assert_eq!(
        std::fs::metadata(&jail_disk).unwrap().ino(),
        std::fs::metadata(&disk).unwrap().ino()
    );
}
