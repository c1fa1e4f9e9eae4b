//! Firecracker's pause and snapshot API, against the real binary where it is present
//! (../shared/tools/firecracker-v1.16.1 on the project machines). A guest cannot boot on
//! this host's paravirtual KVM, so what is checked is what the API decides before a guest
//! runs: the requests banger sends are understood and refused with Firecracker's reason
//! where the VM's state does not allow them.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_vmm::fc_snapshot;

struct Fc(Child);

impl Drop for Fc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(binary: &Path, run: &Path) -> Fc {
    let api = banger_vmm::firecracker::api_socket(run);
    let child = Command::new(binary)
        .arg("--api-sock")
        .arg(&api)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let fc = Fc(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    fc
}

#[test]
fn pause_snapshot_and_load_requests_reach_firecracker_and_its_refusals_name_the_request() {
    let Some(binary) = common::require_firecracker() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path();
    let _fc = start(&binary, run);

    // Before InstanceStart there is nothing to pause or snapshot.
    let err = fc_snapshot::pause(run).unwrap_err().to_string();
    assert!(err.contains("PATCH /vm: 400"), "{err}");
    let err = fc_snapshot::create(run, &run.join("state"), &run.join("memory"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("PUT /snapshot/create: 400"), "{err}");
    assert!(!run.join("memory").exists());

    // A load into a fresh Firecracker: refused naming the missing snapshot file.
    let missing = run.join("no-such-state");
    let err = fc_snapshot::load(run, &missing, &run.join("no-such-memory"), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("PUT /snapshot/load: 400"), "{err}");
}
