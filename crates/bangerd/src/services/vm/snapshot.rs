//! Pausing and resuming VMs through their VMM: QMP `stop`/`cont` for QEMU, `PATCH /vm`
//! for Firecracker. A paused VM keeps its VMM, memory and devices; its vCPUs, and so the
//! guest's clocks, stand still until it is resumed.

use std::path::Path;

use anyhow::Context;
use banger_api::{VmBackend, VmInfo, VmState};

use super::VmService;
use crate::{ServiceError, ServiceResult};

/// The QMP socket QEMU serves in a VM's directory.
pub(super) fn qmp_socket(dir: &Path) -> std::path::PathBuf {
    dir.join("qmp.sock")
}

/// Stops or runs the vCPUs of `vm` through its VMM.
pub(super) fn set_vcpus(vm: &VmInfo, run: bool) -> anyhow::Result<()> {
    let dir = Path::new(&vm.dir);
    match vm.backend {
        Some(VmBackend::Firecracker) => {
            if run {
                banger_vmm::fc_snapshot::resume(dir)?
            } else {
                banger_vmm::fc_snapshot::pause(dir)?
            }
        }
        Some(VmBackend::QemuTcg | VmBackend::QemuKvm) => {
            let mut qmp = banger_vmm::qmp::Qmp::connect(&qmp_socket(dir))?;
            if run {
                qmp.cont()?
            } else {
                qmp.stop()?
            }
        }
        None => anyhow::bail!("VM {:?} has never booted", vm.name),
    }
    Ok(())
}

impl VmService {
    /// Records paused or running for a VM whose VMM stays the same process: its pid and
    /// pid identity are kept (set_state would forget the identity, and with it the VM).
    fn set_run_state(&self, id: &str, state: VmState) -> anyhow::Result<()> {
        self.store
            .conn()
            .execute(
                "UPDATE vms SET state = ?1 WHERE id = ?2",
                rusqlite::params![state.as_str(), id],
            )
            .context("record VM state")?;
        Ok(())
    }

    fn live(&self, name: &str) -> ServiceResult<VmInfo> {
        let vm = self.show(name)?;
        if !vm.state.is_running() || !vm.pid.is_some_and(super::pid_alive) {
            return Err(ServiceError::bad_request(format!(
                "VM {name:?} is not running (banger vm start {name})"
            )));
        }
        Ok(vm)
    }

    /// Stops the vCPUs of a running VM (`vm.pause`); pausing a paused VM does nothing.
    pub fn pause(&self, name: &str) -> ServiceResult<VmInfo> {
        let vm = self.live(name)?;
        if vm.state.is_paused() {
            return Ok(vm);
        }
        set_vcpus(&vm, false).with_context(|| format!("pause VM {name:?}"))?;
        self.set_run_state(&vm.id, VmState::Paused)?;
        tracing::info!(vm = name, "VM paused");
        self.show(name)
    }

    /// Runs the vCPUs of a paused VM again (`vm.resume`); resuming a running VM does
    /// nothing.
    pub fn resume(&self, name: &str) -> ServiceResult<VmInfo> {
        let vm = self.live(name)?;
        if !vm.state.can_resume() {
            return Ok(vm);
        }
        set_vcpus(&vm, true).with_context(|| format!("resume VM {name:?}"))?;
        self.set_run_state(&vm.id, VmState::Running)?;
        tracing::info!(vm = name, "VM resumed");
        self.show(name)
    }
}
