//! A VM record whose VMM died with the daemon (`kill -9` of both) while its pid went to an
//! unrelated process: the restarted daemon must see the VM stopped and never signal that
//! process. Simulated without booting anything: the record names the pid of a process the
//! test spawned, with the identity (start time) of a VMM that no longer exists.

mod common;

use std::process::{Child, Command};
use std::sync::Arc;

use bangerd::config::Config;
use bangerd::services::process::ProcessIdentity;
use bangerd::services::{ImageService, KernelService, VmService};

use common::{installation, Installation};

/// What a freshly started daemon builds over the same store.
fn restarted_daemon(f: &Installation) -> VmService {
    let images = Arc::new(ImageService::new(
        f.layout.clone(),
        Arc::clone(&f.store),
        Default::default(),
    ));
    let kernels = Arc::new(KernelService::new(f.layout.clone(), Arc::clone(&f.store)));
    VmService::new(
        f.layout.clone(),
        Config::default(),
        Arc::clone(&f.store),
        images,
        kernels,
    )
}

fn record_running_vm(f: &Installation, name: &str, pid: u32, identity: Option<&str>) {
    let conn = f.store.conn();
    conn.execute(
        "INSERT OR IGNORE INTO kernels (name, version, created_at, initrd) VALUES ('k', '6.1', 'now', 'banger')",
        [],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO vms (id, name, image, kernel, vcpus, memory_mib, disk_bytes, state, pid, backend, created_at, network, pid_identity)
         VALUES (?1, ?2, 'img', 'k', 1, 256, 1048576, 'running', ?3, 'qemu-tcg', 'now', 'user', ?4)",
        rusqlite::params![format!("id-{name}"), name, pid, identity],
    )
    .unwrap();
}

struct Bystander(Child);

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bystander() -> Bystander {
    Bystander(Command::new("sleep").arg("600").spawn().unwrap())
}

fn alive(child: &mut Bystander) -> bool {
    child.0.try_wait().unwrap().is_none()
}

/// The identity a dead VMM had, for the pid `pid` now holds: same boot, another start.
fn stale_identity(pid: u32) -> String {
    let now = ProcessIdentity::of(pid).unwrap();
    let (boot, ticks) = now.start.rsplit_once(':').unwrap();
    format!(
        "{boot}:{}",
        ticks.parse::<u64>().unwrap().saturating_sub(100)
    )
}

/// An installation with VM `name` recorded running as a new bystander's pid, under the
/// identity a dead VMM had for that pid: the pid was reused.
fn reused_pid(name: &str) -> (Installation, Bystander) {
    let f = installation();
    let other = bystander();
    let pid = other.0.id();
    record_running_vm(&f, name, pid, Some(&stale_identity(pid)));
    (f, other)
}

/// Before: `vm list` showed the VM running and `vm kill` killed the bystander.
#[test]
fn a_reused_pid_is_never_signalled_and_the_vm_is_marked_stopped() {
    let (f, mut other) = reused_pid("reused");
    let vms = restarted_daemon(&f);
    vms.recover().unwrap();
    let vm = vms.show("reused").unwrap();
    assert_eq!(vm.state, banger_api::VmState::Stopped, "{vm:?}");
    assert_eq!(vm.pid, None);
    vms.kill("reused").unwrap();
    vms.stop("reused").unwrap();
    assert!(alive(&mut other), "the unrelated process was signalled");
}

/// `vm kill` and `vm stop` before any restart repair, on a record whose pid was reused.
#[test]
fn kill_and_stop_leave_a_process_that_is_not_the_vmm_alone() {
    let (f, mut other) = reused_pid("a");
    // A record from before identities were kept: the command line decides.
    record_running_vm(&f, "b", other.0.id(), None);
    let vms = restarted_daemon(&f);
    for name in ["a", "b"] {
        let vm = vms.kill(name).unwrap();
        assert_eq!(vm.state, banger_api::VmState::Stopped);
        assert!(
            alive(&mut other),
            "{name}: the unrelated process was signalled"
        );
    }
}

/// A kernel package past `kernel_max_payload_bytes` is refused before anything reads it.
#[test]
fn an_oversized_kernel_payload_is_refused_naming_the_limit() {
    let f = installation();
    let kernels = KernelService::new(f.layout.clone(), Arc::clone(&f.store)).with_max_payload(1024);
    let deb = f.layout.state_dir.join("huge.deb");
    std::fs::File::create(&deb).unwrap().set_len(4096).unwrap();
    let err = kernels
        .import(&banger_api::KernelImportParams {
            name: "huge".into(),
            deb: Some(deb.display().to_string()),
            deb_stream: None,
            kernel: None,
            modules: None,
            initrd: None,
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kernel_max_payload_bytes") && err.contains("huge.deb"),
        "{err}"
    );
    assert!(kernels.list().unwrap().is_empty());
}
