//! `vm.create`: a VM's name, image, kernel, network and egress are checked, its guest
//! address reserved (TAP), its root disk made and its row recorded; then it is started
//! unless `no_start` (see `start.rs`).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context};
use banger_api::{VmBackend, VmCreateParams, VmInfo, VmState};
use banger_vmm::backend::BackendKind;

use super::{check_egress, lifecycle, now, ports, validate_name, VmService, NO_BACKEND};
use crate::services::disk;
use crate::services::network::{self, NetworkMode, NetworkSetting};
use crate::services::privhelper::TapRoute;
use crate::{ServiceError, ServiceResult};

/// Releases an address reserved by [`VmService::allocate_guest_ip`] once the create is over
/// (recorded or failed).
struct PendingIp<'a> {
    pending: &'a Mutex<HashSet<Ipv4Addr>>,
    ip: Ipv4Addr,
}

impl Drop for PendingIp<'_> {
    fn drop(&mut self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.remove(&self.ip);
    }
}

impl VmService {
    /// Creates a VM (and starts it unless `no_start`).
    pub fn create(&self, params: VmCreateParams) -> ServiceResult<VmInfo> {
        let (params, from) = self.fork_params(params)?;
        let name = match params.name {
            Some(name) => name,
            None => format!("vm-{}", hex::encode(rand::random::<[u8; 3]>())),
        };
        validate_name("VM", &name)?;
        lifecycle::validate_resources(params.vcpus, params.memory_mib)?;
        if self.show(&name).is_ok() {
            return Err(ServiceError::already_exists(format!(
                "a VM named {name:?} already exists"
            )));
        }
        let image_name = params
            .image
            .or_else(|| self.config.default_image.clone())
            .ok_or_else(|| {
                ServiceError::bad_request("no image given and no default_image in config.toml")
            })?;
        let image = self.images.show(&image_name)?;
        let kernel = self.kernels.resolve(
            params.kernel.as_deref(),
            self.config.default_kernel.as_deref(),
        )?;
        self.agent_path()?;
        let setting = match params.network {
            Some(choice) => NetworkSetting::from(choice),
            None => self.config.network.unwrap_or_default(),
        };
        let mode = network::resolve_mode(setting, TapRoute::probe(&self.config).capability())
            .map_err(|e| ServiceError::bad_request(format!("{e:#}")))?;
        let egress = params
            .egress
            .or_else(|| self.config.egress.clone())
            .unwrap_or_default();
        check_egress(mode, &egress)?;
        ports::check_create(mode, &params.ports)?;
        // Refuse a VM that could not boot before making its disk: the backend choice
        // (vmm, firecracker_bin, KVM, network) is the same at start. It also says which
        // disk the VM gets (Firecracker takes raw disks only).
        let boot = self.kernels.boot_files(&kernel.name)?;
        let kind = match self.backend(&boot.kernel, mode) {
            Ok(vmm) => vmm.kind(),
            Err(e) if !params.no_start => return Err(e),
            Err(_) => BackendKind::Qemu,
        };
        let id = hex::encode(rand::random::<[u8; 8]>());
        let reserved = match mode {
            NetworkMode::User | NetworkMode::None => None,
            NetworkMode::Tap => Some(self.allocate_guest_ip()?),
        };
        let guest_ip = reserved.as_ref().map(|r| r.ip.to_string());
        let tap = reserved.as_ref().map(|_| network::tap_name(&id));
        let dir = self.dir(&id);
        let prepared = (|| -> anyhow::Result<u64> {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            let mut size = image.size_bytes;
            if let Some(wanted) = params.disk_bytes {
                if wanted < size {
                    bail!("--disk-size {wanted} is smaller than the image's {size} bytes; disks only grow");
                }
                size = wanted;
            }
            let raw = kind == BackendKind::Firecracker;
            let started = Instant::now();
            disk::prepare_root(raw, Path::new(&image.rootfs), image.size_bytes, &dir, size)?;
            tracing::info!(vm = %name, raw, elapsed_ms = started.elapsed().as_millis() as u64, "root disk ready");
            Ok(size)
        })();
        let disk_bytes = match prepared {
            Ok(size) => size,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        };
        let info = VmInfo {
            id: id.clone(),
            name: name.clone(),
            image: image.name,
            kernel: kernel.name,
            vcpus: params.vcpus.unwrap_or(2),
            memory_mib: params.memory_mib.unwrap_or(1024),
            disk_bytes,
            state: VmState::Stopped,
            pid: None,
            backend: None,
            created_at: now(),
            dir: dir.display().to_string(),
            network: mode,
            egress,
            guest_ip,
            tap,
            ports: params.ports,
        };
        self.store
            .conn()
            .execute(
                &format!(
                    "INSERT INTO vms ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                    Self::COLUMNS
                ),
                rusqlite::params![
                    info.id,
                    info.name,
                    info.image,
                    info.kernel,
                    info.vcpus,
                    info.memory_mib,
                    info.disk_bytes as i64,
                    info.state.as_str(),
                    info.pid,
                    info.backend.map_or(NO_BACKEND, VmBackend::as_str),
                    info.created_at,
                    info.network.name(),
                    info.guest_ip,
                    info.tap,
                    serde_json::to_string(&info.egress).context("encode egress")?,
                    serde_json::to_string(&info.ports).context("encode ports")?
                ],
            )
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                anyhow::Error::new(e).context("record VM")
            })?;
        if params.no_start {
            return Ok(info);
        }
        self.start_with(&name, !params.cold, from.as_deref())
    }

    /// The lowest free address of the subnet; the unique index on `guest_ip` backs this
    /// up against a concurrent create.
    /// The lowest address of the subnet that no VM has and no create in progress holds;
    /// held until the returned guard drops.
    fn allocate_guest_ip(&self) -> ServiceResult<PendingIp<'_>> {
        let subnet = self.subnet()?;
        let recorded = self.list()?;
        let mut pending = self.pending_ips.lock().unwrap_or_else(|p| p.into_inner());
        let used: Vec<Ipv4Addr> = recorded
            .into_iter()
            .filter_map(|vm| vm.guest_ip?.parse().ok())
            .chain(pending.iter().copied())
            .collect();
        let ip = subnet.allocate(&used).ok_or_else(|| {
            ServiceError::from(anyhow::anyhow!(
                "no free address left in {} (bridge_address in config.toml): remove VMs or widen the subnet",
                subnet.cidr()
            ))
        })?;
        pending.insert(ip);
        Ok(PendingIp {
            pending: &self.pending_ips,
            ip,
        })
    }
}
