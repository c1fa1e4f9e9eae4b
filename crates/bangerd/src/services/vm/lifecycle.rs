//! The verbs around a VM's life that are not create/start/exec: list filters, restart,
//! prune, set (resources of a stopped VM) and stats (what a VM uses, seen from the host;
//! the guest's own view comes from `health.rs`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Context;
use banger_api::{
    VmInfo, VmListParams, VmPruneParams, VmPruneResult, VmSetParams, VmState, VmStatsResult,
};

use super::{grow_disk, VmService, ROOT_DISK};
use crate::{ServiceError, ServiceResult};

/// Smallest memory a VM may be given (the agent and a shell need a little).
pub const MIN_MEMORY_MIB: u32 = 64;
/// Most CPUs a VM may be given.
pub const MAX_VCPUS: u32 = 64;

impl VmService {
    /// The VMs matching `filter`, by name.
    pub fn list_matching(&self, filter: &VmListParams) -> ServiceResult<Vec<VmInfo>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|vm| filter.state.is_none_or(|s| s == vm.state))
            .filter(|vm| filter.image.as_ref().is_none_or(|i| *i == vm.image))
            .collect())
    }

    /// Stops the VM cleanly, then boots it again.
    pub fn restart(&self, name: &str) -> ServiceResult<VmInfo> {
        self.stop(name)?;
        self.start(name)
    }

    /// Removes stopped VMs (every VM with `all`), or says which it would.
    pub fn prune(&self, params: &VmPruneParams) -> ServiceResult<VmPruneResult> {
        let mut removed = Vec::new();
        let mut bytes_freed = 0;
        for vm in self.list()? {
            let running = vm.state.is_running() && self.vmm(&vm).is_some();
            if running && !params.all {
                continue;
            }
            let bytes = allocated_bytes(Path::new(&vm.dir));
            if !params.dry_run {
                self.remove(&vm.name)?;
            }
            bytes_freed += bytes;
            removed.push(vm.name);
        }
        Ok(VmPruneResult {
            dry_run: params.dry_run,
            removed,
            bytes_freed,
            vms_dir: self.layout.vms_dir().display().to_string(),
        })
    }

    /// Changes the CPUs, memory or disk size of a stopped VM; the next boot uses them.
    pub fn set(&self, params: &VmSetParams) -> ServiceResult<VmInfo> {
        let vm = self.show(&params.name)?;
        if vm.state.is_running() && self.vmm(&vm).is_some() {
            return Err(ServiceError::bad_request(format!(
                "VM {:?} is running: stop it first (banger vm stop {})",
                vm.name, vm.name
            )));
        }
        validate_resources(params.vcpus, params.memory_mib)?;
        if let Some(disk) = params.disk_bytes {
            if disk < vm.disk_bytes {
                return Err(ServiceError::bad_request(format!(
                    "disk {disk} bytes is smaller than VM {:?}'s {} bytes: disks only grow",
                    vm.name, vm.disk_bytes
                )));
            }
            if disk > vm.disk_bytes {
                let raw = Path::new(&vm.dir).join(ROOT_DISK);
                let overlay = Path::new(&vm.dir).join(super::disk::OVERLAY_DISK);
                if overlay.exists() {
                    // A QEMU VM's disk is a qcow2 overlay on the image's read-only ext4.
                    super::disk::grow_overlay(&overlay, disk)
                        .with_context(|| format!("grow the disk of VM {:?}", vm.name))?;
                } else {
                    grow_disk(&raw, disk)
                        .with_context(|| format!("grow the disk of VM {:?}", vm.name))?;
                }
            }
        }
        self.store
            .conn()
            .execute(
                "UPDATE vms SET vcpus = ?1, memory_mib = ?2, disk_bytes = ?3 WHERE id = ?4",
                rusqlite::params![
                    params.vcpus.unwrap_or(vm.vcpus),
                    params.memory_mib.unwrap_or(vm.memory_mib),
                    params.disk_bytes.unwrap_or(vm.disk_bytes) as i64,
                    vm.id
                ],
            )
            .context("record VM resources")?;
        self.show(&vm.name)
    }

    /// What the VM uses, seen from the host and (while it runs) from the guest.
    pub fn stats(&self, name: &str) -> ServiceResult<VmStatsResult> {
        let vm = self.show(name)?;
        // Only the VM's own VMM is measured: a recorded pid reused by another process is not.
        let vmm = vm
            .state
            .is_running()
            .then(|| self.vmm(&vm))
            .flatten()
            .and_then(|vmm| process_usage(vmm.pid));
        let (guest, guest_error) = match vmm.map(|_| self.guest_usage(&vm)) {
            Some(Ok(usage)) => (Some(usage), None),
            Some(Err(why)) => (None, Some(why)),
            None => (None, None),
        };
        Ok(VmStatsResult {
            name: vm.name,
            state: if vmm.is_some() {
                VmState::Running
            } else {
                VmState::Stopped
            },
            vmm_rss_bytes: vmm.map(|u| u.rss_bytes),
            vmm_cpu_seconds: vmm.map(|u| u.cpu_seconds),
            memory_bytes: u64::from(vm.memory_mib) << 20,
            vcpus: vm.vcpus,
            disk_bytes: vm.disk_bytes,
            disk_allocated_bytes: ["root.qcow2", ROOT_DISK]
                .iter()
                .map(|disk| allocated_bytes(&Path::new(&vm.dir).join(disk)))
                .sum(),
            guest,
            guest_error,
        })
    }
}

/// Refuses CPU and memory counts no VM can boot with, naming the limit.
pub(super) fn validate_resources(vcpus: Option<u32>, memory_mib: Option<u32>) -> ServiceResult<()> {
    if let Some(vcpus) = vcpus {
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(ServiceError::bad_request(format!(
                "vcpus {vcpus}: expected 1 to MAX_VCPUS ({MAX_VCPUS})"
            )));
        }
    }
    if let Some(memory) = memory_mib {
        if memory < MIN_MEMORY_MIB {
            return Err(ServiceError::bad_request(format!(
                "memory {memory} MiB is below MIN_MEMORY_MIB ({MIN_MEMORY_MIB} MiB)"
            )));
        }
    }
    Ok(())
}

/// What one process uses.
#[derive(Debug, Clone, Copy)]
struct ProcessUsage {
    rss_bytes: u64,
    cpu_seconds: f64,
}

/// RSS from `/proc/PID/status`, user + system time from `/proc/PID/stat`.
fn process_usage(pid: u32) -> Option<ProcessUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`: state is 3, utime 14 and stime 15 (1-based, man proc).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Some(ProcessUsage {
        rss_bytes: rss_kib * 1024,
        cpu_seconds: ticks as f64 / hz,
    })
}

/// Bytes of allocated blocks under `path` (a file, or a directory tree): what removing it
/// frees, holes not counted. Unreadable entries count as 0.
fn allocated_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path).map_or(own, |entries| {
        own + entries
            .flatten()
            .map(|e| allocated_bytes(&e.path()))
            .sum::<u64>()
    })
}
