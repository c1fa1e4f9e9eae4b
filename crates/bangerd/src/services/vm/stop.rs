//! `vm.stop`, `vm.kill` and `vm.rm`: a clean shutdown through the agent (the VMM killed
//! when it does not come), killing at once, and deleting a VM with its files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use banger_api::{VmInfo, VmState};

use super::{agent_channel, snapshot, VmService};
use crate::ServiceResult;

/// How long a clean shutdown may take before the VMM is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

impl VmService {
    /// Shuts a VM down; its disk keeps what the guest wrote.
    pub fn stop(&self, name: &str) -> ServiceResult<VmInfo> {
        let vm = self.show(name)?;
        if vm.state.is_paused() {
            // A paused guest cannot shut itself down: resume it first (else killed below).
            if let Err(e) = snapshot::set_vcpus(&vm, true) {
                tracing::warn!(vm = name, error = %format!("{e:#}"), "cannot resume the paused VM to stop it");
            }
        }
        if let Some(vmm) = self.vmm(&vm) {
            // An unknown backend (a record from a newer banger) still gets killed below.
            // The shared connection if there is one: a second one would wait behind it.
            let client = match self.agents.forget(&vm.id) {
                Some(client) => Ok(client),
                None => agent_channel(&vm)
                    .and_then(|channel| Ok(Arc::new(channel.connect(Duration::from_secs(5))?))),
            };
            if let Ok(client) = client {
                if let Err(e) = client.shutdown(STOP_TIMEOUT) {
                    tracing::warn!(vm = name, error = %e, "clean shutdown failed");
                }
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while vmm.is_alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if vmm.is_alive() {
                tracing::warn!(
                    vm = name,
                    pid = vmm.pid,
                    "VM did not stop in time; killing it"
                );
                vmm.kill();
            }
        }
        self.release_tap(&vm);
        self.set_state(&vm.id, VmState::Stopped, None)?;
        self.show(name)
    }

    /// Kills the VMM at once: for a guest that does not answer. Files the guest had not
    /// synced may be lost.
    pub fn kill(&self, name: &str) -> ServiceResult<VmInfo> {
        let vm = self.show(name)?;
        self.agents.forget(&vm.id);
        if let Some(vmm) = self.vmm(&vm) {
            vmm.kill();
            let deadline = Instant::now() + Duration::from_secs(5);
            while vmm.is_alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.release_tap(&vm);
        self.set_state(&vm.id, VmState::Stopped, None)?;
        self.show(name)
    }

    /// Stops and deletes a VM with all its files.
    pub fn remove(&self, name: &str) -> ServiceResult<VmInfo> {
        let vm = self.stop(name)?;
        self.store
            .conn()
            .execute("DELETE FROM vms WHERE id = ?1", [&vm.id])
            .context("delete VM record")?;
        if vm.backend == Some(banger_api::VmBackend::Firecracker) {
            // The jailer's cgroup outlives the process.
            let binary = self
                .firecracker_binary()
                .unwrap_or_else(|| PathBuf::from("firecracker"));
            banger_vmm::firecracker::remove_jail_cgroups(&binary, Path::new(&vm.dir));
        }
        std::fs::remove_dir_all(&vm.dir).with_context(|| format!("remove {}", vm.dir))?;
        Ok(vm)
    }
}
