//! Named snapshots and forks: `vm.snapshot` saves a running QEMU VM's state and disk
//! under `<state>/snapshots/<name>/` (the same files as a warm template, see
//! [`super::template`]); `vm.create` with `from` restores it into a new VM on an overlay
//! of its own, with its own identity. `snapshot.list|rm|prune` manage them and the
//! templates.

use std::path::{Path, PathBuf};

use anyhow::Context;
use banger_api::{
    SnapshotInfo, SnapshotListResult, SnapshotPruneResult, VmBackend, VmCreateParams, VmInfo,
    VmSnapshotParams, VmState,
};
use banger_vmm::VmSpec;
use serde::{Deserialize, Serialize};

use super::template::{self, ORIGIN};
use super::{validate_name, VmService};
use crate::{ServiceError, ServiceResult};

/// Where named snapshots live.
pub(super) fn snapshots_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("snapshots")
}

/// What a named snapshot was taken of (`meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotMeta {
    vm: String,
    image: String,
    kernel: String,
    vcpus: u32,
    memory_mib: u32,
    disk_bytes: u64,
    network: String,
    backend: String,
}

/// Bytes the files under `dir` take on the host (allocated blocks: they are sparse).
pub(crate) fn tree_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.metadata() {
            Ok(m) if m.is_dir() => total += tree_bytes(&entry.path()),
            Ok(m) => total += m.blocks() * 512,
            Err(_) => {}
        }
    }
    total
}

impl VmService {
    /// `vm.snapshot`.
    pub fn snapshot(&self, params: &VmSnapshotParams) -> ServiceResult<SnapshotInfo> {
        let vm = self.show(&params.name)?;
        if !vm.state.is_running() || !vm.pid.is_some_and(super::pid_alive) {
            return Err(ServiceError::bad_request(format!(
                "VM {:?} is not running: only a running (or paused) VM can be snapshotted",
                vm.name
            )));
        }
        if !matches!(vm.backend, Some(VmBackend::QemuTcg | VmBackend::QemuKvm)) {
            return Err(ServiceError::bad_request(format!(
                "VM {:?} runs under {}: snapshots are made of QEMU VMs only",
                vm.name,
                vm.backend.map_or("no VMM", VmBackend::as_str)
            )));
        }
        if vm.network != banger_api::VmNetwork::User {
            return Err(ServiceError::bad_request(format!(
                "VM {:?} has {} networking: snapshots need user networking (a fork would keep the VM's address and MAC)",
                vm.name, vm.network
            )));
        }
        let name = params
            .snapshot
            .clone()
            .unwrap_or_else(|| format!("{}-{}", vm.name, hex::encode(rand::random::<[u8; 3]>())));
        validate_name("snapshot", &name)?;
        let root = snapshots_dir(&self.layout.state_dir);
        if root.join(&name).exists() {
            return Err(ServiceError::already_exists(format!(
                "a snapshot named {name:?} already exists"
            )));
        }
        let meta = SnapshotMeta {
            vm: vm.name.clone(),
            image: vm.image.clone(),
            kernel: vm.kernel.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_bytes: vm.disk_bytes,
            network: vm.network.to_string(),
            backend: vm.backend.map_or("", VmBackend::as_str).into(),
        };
        let bytes = serde_json::to_vec_pretty(&meta).context("encode snapshot meta")?;
        let resume = vm.state == VmState::Running;
        let dir = template::save(&root, &name, &bytes, std::path::Path::new(&vm.dir), resume)
            .with_context(|| format!("snapshot VM {:?}", vm.name))?;
        Ok(snapshot_info(&name, &dir, &meta))
    }

    /// The snapshot directory of `name` and what it holds.
    fn find_snapshot(&self, name: &str) -> ServiceResult<(PathBuf, SnapshotMeta)> {
        let dir = snapshots_dir(&self.layout.state_dir).join(name);
        let meta = std::fs::read(dir.join(template::META))
            .ok()
            .and_then(|m| serde_json::from_slice(&m).ok())
            .ok_or_else(|| ServiceError::not_found(format!("no snapshot named {name:?}")))?;
        Ok((dir, meta))
    }

    /// For `vm.create` with `from`: the params the snapshot dictates, and its directory.
    pub(super) fn fork_params(
        &self,
        mut params: VmCreateParams,
    ) -> ServiceResult<(VmCreateParams, Option<PathBuf>)> {
        let Some(from) = params.from.take() else {
            return Ok((params, None));
        };
        if params.image.is_some()
            || params.kernel.is_some()
            || params.vcpus.is_some()
            || params.memory_mib.is_some()
            || params.disk_bytes.is_some()
            || params.network.is_some()
            || params.no_start
            || params.cold
        {
            return Err(ServiceError::bad_request(
                "--from takes the image, kernel, vCPUs, memory, disk and network of the snapshot: give none of them (nor --no-start or --cold)",
            ));
        }
        let (dir, meta) = self.find_snapshot(&from)?;
        params.image = Some(meta.image);
        params.kernel = Some(meta.kernel);
        params.vcpus = Some(meta.vcpus);
        params.memory_mib = Some(meta.memory_mib);
        params.disk_bytes = Some(meta.disk_bytes);
        params.network = serde_json::from_value(serde_json::Value::String(meta.network)).ok();
        Ok((params, Some(dir)))
    }

    /// Restores the new VM `vm` from the snapshot `from`; a failure is the create's.
    pub(super) fn fork_start(
        &self,
        vm: &VmInfo,
        spec: &VmSpec,
        backend: VmBackend,
        from: &Path,
    ) -> ServiceResult<()> {
        if backend == VmBackend::Firecracker {
            return Err(ServiceError::bad_request(
                "forks restore under QEMU only: set vmm = \"qemu\"",
            ));
        }
        if let Err(e) = self.restore(vm, spec, backend, from) {
            let _ = self.set_state(&vm.id, VmState::Stopped, None);
            return Err(e
                .context(format!("restore VM {:?} from {}", vm.name, from.display()))
                .into());
        }
        tracing::info!(vm = %vm.name, from = %from.display(), "VM forked from a snapshot");
        Ok(())
    }

    /// The template and snapshot directories VMs and snapshots layer on.
    pub(super) fn origins(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for root in [self.layout.vms_dir(), snapshots_dir(&self.layout.state_dir)] {
            for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
                if let Ok(origin) = std::fs::read_to_string(entry.path().join(ORIGIN)) {
                    dirs.push(PathBuf::from(origin.trim()));
                }
            }
        }
        dirs
    }

    /// `snapshot.list`.
    pub fn snapshot_list(&self) -> ServiceResult<SnapshotListResult> {
        let mut snapshots = Vec::new();
        let root = snapshots_dir(&self.layout.state_dir);
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                continue;
            }
            if let Ok((dir, meta)) = self.find_snapshot(&name) {
                snapshots.push(snapshot_info(&name, &dir, &meta));
            }
        }
        let templates = template::templates_dir(&self.layout.state_dir);
        for entry in std::fs::read_dir(&templates)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                continue;
            }
            let meta: serde_json::Value = std::fs::read(entry.path().join(template::META))
                .ok()
                .and_then(|m| serde_json::from_slice(&m).ok())
                .unwrap_or_default();
            snapshots.push(SnapshotInfo {
                name: format!("template-{name}"),
                template: true,
                vm: String::new(),
                image: meta["image_id"].as_str().unwrap_or_default().into(),
                kernel: meta["kernel"].as_str().unwrap_or_default().into(),
                vcpus: meta["vcpus"].as_u64().unwrap_or(0) as u32,
                memory_mib: meta["memory_mib"].as_u64().unwrap_or(0) as u32,
                disk_bytes: meta["disk_bytes"].as_u64().unwrap_or(0),
                bytes: tree_bytes(&entry.path()),
                dir: entry.path().display().to_string(),
            });
        }
        snapshots.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(SnapshotListResult { snapshots })
    }

    /// `snapshot.rm`: refused while a VM or another snapshot layers on it.
    pub fn snapshot_rm(&self, name: &str) -> ServiceResult<SnapshotInfo> {
        let (dir, meta) = self.find_snapshot(name)?;
        if self.origins().iter().any(|o| o == &dir) {
            return Err(ServiceError::bad_request(format!(
                "snapshot {name:?} is in use: VMs forked from it layer their disks on it; remove them first"
            )));
        }
        let info = snapshot_info(name, &dir, &meta);
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        Ok(info)
    }

    /// `snapshot.prune`: removes the warm templates nothing layers on.
    pub fn snapshot_prune(&self) -> ServiceResult<SnapshotPruneResult> {
        let origins = self.origins();
        let mut removed = Vec::new();
        let mut bytes_freed = 0;
        let templates = template::templates_dir(&self.layout.state_dir);
        for entry in std::fs::read_dir(&templates)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if origins.contains(&path) {
                continue;
            }
            let bytes = tree_bytes(&path);
            std::fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
            bytes_freed += bytes;
            removed.push(format!("template-{}", entry.file_name().to_string_lossy()));
        }
        Ok(SnapshotPruneResult {
            removed,
            bytes_freed,
        })
    }
}

fn snapshot_info(name: &str, dir: &Path, meta: &SnapshotMeta) -> SnapshotInfo {
    SnapshotInfo {
        name: name.into(),
        template: false,
        vm: meta.vm.clone(),
        image: meta.image.clone(),
        kernel: meta.kernel.clone(),
        vcpus: meta.vcpus,
        memory_mib: meta.memory_mib,
        disk_bytes: meta.disk_bytes,
        bytes: tree_bytes(dir),
        dir: dir.display().to_string(),
    }
}
