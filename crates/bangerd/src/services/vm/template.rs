//! Warm templates: the first boot of a VM with a given [`TemplateKey`] is saved the moment
//! its agent answers (QMP `stop`, migration of the whole VM state to a file, a copy of its
//! disk overlay, `cont`); later first boots with the same key restore that state with
//! `-incoming` instead of booting, each on its own qcow2 overlay over the template's disk.
//!
//! A template is `<state>/templates/<key>/` holding `memory.state` (the migration stream),
//! `disk.qcow2` (an overlay on the image's rootfs with what the boot wrote) and
//! `meta.json`. It is written to `<state>/templates/.tmp-*` and renamed whole, so a
//! daemon killed mid-write leaves no half template (start-up deletes the leftovers).
//! Any part of the key changing (image rebuilt, other kernel or agent, vCPUs, memory,
//! disk size, network mode, VMM) names another directory: the old template is never
//! restored again. Anything that goes wrong on the warm path is logged and the VM boots
//! cold instead.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use sha2::Digest;

use banger_vmm::qmp::{self, Qmp};

/// The migration stream of a template.
pub(super) const MEMORY: &str = "memory.state";
/// The template's disk state.
pub(super) const DISK: &str = "disk.qcow2";
/// What the template was made from.
pub(super) const META: &str = "meta.json";
/// How long a restore may take to load its state (about 1 s under TCG here).
pub(super) const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long QEMU has to create its QMP socket after a restore is launched.
const QMP_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a restored VM must share with the boot that was saved.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct TemplateKey {
    pub image_id: String,
    pub kernel: String,
    /// Size and modification time of the kernel and initramfs files: a re-import of the
    /// same name changes them.
    pub kernel_files: String,
    /// sha256 of the guest agent binary.
    pub agent_sha256: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    pub network: String,
    pub backend: String,
    pub banger_version: &'static str,
}

impl TemplateKey {
    /// The directory name: the first 16 bytes of the key's sha256, in hex.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).expect("a key serialises");
        hex::encode(&sha2::Sha256::digest(&json)[..16])
    }
}

/// `size:mtime` of `path`, for keys.
pub(super) fn file_stamp(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "{}:{:?}",
            m.len(),
            m.modified().ok().and_then(|t| t
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_nanos()))
        ),
        Err(_) => "missing".into(),
    }
}

/// sha256 of a file, hex.
pub(super) fn file_sha256(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("read {}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Where templates live.
pub(super) fn templates_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("templates")
}

/// A complete template for `key`, if there is one.
pub(super) fn find(state_dir: &Path, key: &TemplateKey) -> Option<PathBuf> {
    let dir = templates_dir(state_dir).join(key.id());
    [MEMORY, DISK, META]
        .iter()
        .all(|f| dir.join(f).is_file())
        .then_some(dir)
}

/// Start-up: deletes templates (or snapshots) of `root` left half-written by a daemon
/// that died while writing them.
pub(super) fn remove_partial(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(dir = %entry.path().display(), "removed a half-written template")
                }
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove a half-written template")
                }
            }
        }
    }
}

/// Saves the running QEMU VM of `vm_dir` (just booted, agent ready) as the template for
/// `key`. The VM is stopped for the time it takes (about 0.5 s for 1 GiB under TCG) and
/// runs on afterwards whatever happens.
pub(super) fn capture(
    state_dir: &Path,
    key: &TemplateKey,
    vm_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let meta = serde_json::to_vec_pretty(key)?;
    let dir = save(&templates_dir(state_dir), &key.id(), &meta, vm_dir, true)?;
    Ok(dir)
}

/// Where a VM (or a snapshot) records the template or snapshot directory its disk layers
/// on, so neither is removed under it.
pub(super) const ORIGIN: &str = "origin";

/// Saves the QEMU VM of `vm_dir` as `<root>/<name>/` (memory, disk, `meta`), written to a
/// temporary directory renamed whole. The VM's vCPUs are stopped meanwhile and run again
/// afterwards when `resume`.
pub(super) fn save(
    root: &Path,
    name: &str,
    meta: &[u8],
    vm_dir: &Path,
    resume: bool,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
    let final_dir = root.join(name);
    let tmp = root.join(format!(
        ".tmp-{name}-{}",
        hex::encode(rand::random::<[u8; 4]>())
    ));
    std::fs::create_dir(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let started = Instant::now();
    let mut qmp = Qmp::connect(&super::snapshot::qmp_socket(vm_dir))?;
    qmp.stop()?;
    let saved = (|| -> anyhow::Result<()> {
        qmp.save_state(&tmp.join(MEMORY))?;
        // Stopped and flushed: the overlay is consistent with the memory just saved.
        super::disk::copy_disk(&vm_dir.join(super::disk::OVERLAY_DISK), &tmp.join(DISK))?;
        if let Ok(origin) = std::fs::read(vm_dir.join(ORIGIN)) {
            std::fs::write(tmp.join(ORIGIN), origin).context("record the snapshot's origin")?;
        }
        Ok(())
    })();
    // The VM goes on either way (after a migration QEMU leaves it in `postmigrate`).
    let resumed = if resume { qmp.cont() } else { Ok(()) };
    let paused_ms = started.elapsed().as_millis() as u64;
    let published = saved.and_then(|()| {
        std::fs::write(tmp.join(META), meta)
            .with_context(|| format!("write {}", tmp.join(META).display()))?;
        sync_tree(&tmp)?;
        match std::fs::rename(&tmp, &final_dir) {
            Ok(()) => Ok(()),
            // A concurrent first boot of the same key won: keep its template.
            Err(_) if final_dir.join(META).is_file() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => {
                Err(anyhow::Error::new(e).context(format!("publish {}", final_dir.display())))
            }
        }
    });
    if published.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    resumed.context("resume the VM after saving its state")?;
    published?;
    tracing::info!(dir = %final_dir.display(), paused_ms, "VM state saved");
    Ok(final_dir)
}

fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for name in [MEMORY, DISK, META] {
        let path = dir.join(name);
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("sync {}", path.display()))?;
    }
    Ok(())
}

/// Gives the never-booted VM of `vm_dir` an overlay on the template's disk instead of on
/// the image (its own overlay is still empty).
pub(super) fn layer_on(template: &Path, vm_dir: &Path, disk_bytes: u64) -> anyhow::Result<()> {
    let disk = vm_dir.join(super::disk::OVERLAY_DISK);
    let _ = std::fs::remove_file(&disk);
    std::fs::write(vm_dir.join(ORIGIN), template.display().to_string())
        .context("record the VM's origin")?;
    qmp::create_overlay(&template.join(DISK), &disk, Some(disk_bytes)).with_context(|| {
        format!(
            "layer {} on template {}",
            disk.display(),
            template.display()
        )
    })
}

/// The state file QEMU restores `template` (or a snapshot) from.
pub(super) fn incoming(template: &Path) -> PathBuf {
    template.join(MEMORY)
}

/// Waits until the restore launched in `vm_dir` has loaded and the guest runs.
pub(super) fn wait_restored(vm_dir: &Path) -> anyhow::Result<()> {
    let mut qmp = qmp::connect_waiting(&super::snapshot::qmp_socket(vm_dir), QMP_SOCKET_TIMEOUT)?;
    qmp.wait_restored(RESTORE_TIMEOUT)?;
    Ok(())
}

/// What [`VmService::warm_start`] did.
pub(super) enum Warm {
    /// The VM was restored from a template and its agent answers.
    Restored,
    /// Boot cold; save a template for this key once the agent answers.
    ColdThenSave(TemplateKey),
    /// Boot cold, nothing to save.
    Cold,
}

use super::{pid_alive, VmService};
use banger_api::{VmBackend, VmInfo};
use banger_vmm::VmSpec;

impl VmService {
    /// Whether VMs may start warm: the `warm_start` config key (default true).
    fn warm_enabled(&self) -> bool {
        self.config.warm_start.unwrap_or(true)
    }

    /// The template key of the first boot of `vm`, or why it has none.
    fn template_key(
        &self,
        vm: &VmInfo,
        spec: &VmSpec,
        backend: VmBackend,
        warm_allowed: bool,
    ) -> Result<TemplateKey, String> {
        if !warm_allowed {
            return Err("a cold boot was asked for (--cold)".into());
        }
        if !self.warm_enabled() {
            return Err("warm_start = false in config.toml".into());
        }
        if vm.backend.is_some() {
            return Err("the VM booted before: its disk has its own history".into());
        }
        if backend == VmBackend::Firecracker {
            return Err("warm templates are made for QEMU only".into());
        }
        if vm.network != banger_api::VmNetwork::User {
            return Err(format!(
                "warm templates need user networking (the VM has {:?}: a restored guest would keep the template's address)",
                vm.network
            ));
        }
        if spec
            .root_disk
            .as_deref()
            .is_none_or(|d| qmp::disk_format(d) != "qcow2")
        {
            return Err("the VM's disk is not an overlay".into());
        }
        let image = self.images.show(&vm.image).map_err(|e| format!("{e}"))?;
        let agent = self.agent_path().map_err(|e| format!("{e}"))?;
        let boot = self
            .kernels
            .boot_files(&vm.kernel)
            .map_err(|e| format!("{e}"))?;
        Ok(TemplateKey {
            image_id: image.id,
            kernel: vm.kernel.clone(),
            kernel_files: format!("{} {}", file_stamp(&boot.kernel), file_stamp(&boot.initrd)),
            agent_sha256: file_sha256(&agent).map_err(|e| format!("{e:#}"))?,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_bytes: vm.disk_bytes,
            network: vm.network.to_string(),
            backend: backend.as_str().into(),
            banger_version: env!("CARGO_PKG_VERSION"),
        })
    }

    /// Restores `vm` (never booted, its spec ready) from its template when there is one;
    /// says what to do otherwise. Never fails: a failed restore is logged, its traces
    /// removed, and the VM boots cold.
    pub(super) fn warm_start(
        &self,
        vm: &VmInfo,
        spec: &VmSpec,
        backend: VmBackend,
        warm_allowed: bool,
    ) -> Warm {
        let key = match self.template_key(vm, spec, backend, warm_allowed) {
            Ok(key) => key,
            Err(why) => {
                tracing::debug!(vm = %vm.name, %why, "cold boot");
                return Warm::Cold;
            }
        };
        let state_dir = &self.layout.state_dir;
        let Some(template) = find(state_dir, &key) else {
            tracing::info!(vm = %vm.name, template = %key.id(), "cold boot: no warm template for this image, kernel, agent and machine yet; saving one after boot");
            return Warm::ColdThenSave(key);
        };
        let started = Instant::now();
        match self.restore(vm, spec, backend, &template) {
            Ok(pid) => {
                tracing::info!(vm = %vm.name, pid, template = %key.id(), elapsed_ms = started.elapsed().as_millis() as u64, "VM restored from a warm template");
                Warm::Restored
            }
            Err(e) => {
                tracing::warn!(vm = %vm.name, template = %key.id(), error = %format!("{e:#}"), "warm restore failed; booting cold");
                if let Err(e) = self.fresh_overlay(vm) {
                    tracing::warn!(vm = %vm.name, error = %format!("{e:#}"), "cannot reset the VM's disk after a failed restore");
                }
                let _ = self.set_state(&vm.id, banger_api::VmState::Stopped, None);
                // A template that cannot restore is replaced by the next save, unless disks
                // layer on it (then it stays for them and this key boots cold).
                if !self.origins().contains(&template) {
                    match std::fs::remove_dir_all(&template) {
                        Ok(()) => return Warm::ColdThenSave(key),
                        Err(e) => {
                            tracing::warn!(template = %template.display(), error = %e, "cannot remove a template that failed to restore")
                        }
                    }
                }
                Warm::Cold
            }
        }
    }

    fn fresh_overlay(&self, vm: &VmInfo) -> anyhow::Result<()> {
        let image = self.images.show(&vm.image)?;
        let dir = Path::new(&vm.dir);
        let _ = std::fs::remove_file(dir.join(super::disk::OVERLAY_DISK));
        let _ = std::fs::remove_file(dir.join(ORIGIN));
        super::disk::prepare_root(
            false,
            Path::new(&image.rootfs),
            image.size_bytes,
            dir,
            vm.disk_bytes,
        )?;
        Ok(())
    }

    pub(super) fn restore(
        &self,
        vm: &VmInfo,
        spec: &VmSpec,
        backend: VmBackend,
        template: &Path,
    ) -> anyhow::Result<u32> {
        let dir = Path::new(&vm.dir);
        layer_on(template, dir, vm.disk_bytes)?;
        // The same QEMU a cold boot gets: confined (run as vmm_user, files as
        // descriptors) under a root daemon, its console capped.
        let qemu = banger_vmm::qemu::Qemu {
            console_logger: self.console_logger(),
            run_as: self.config.vmm_user().map_err(anyhow::Error::msg)?,
            ..banger_vmm::qemu::Qemu::default()
        };
        let pid = qemu
            .spawn_detached_with(spec, Some(&incoming(template)))
            .context("start QEMU to restore")?;
        // Taken at once, while the pid is surely the VMM's.
        let identity = crate::services::process::ProcessIdentity::of(pid);
        let ready = (|| -> anyhow::Result<()> {
            self.record_running(vm, pid, backend, identity.as_ref())?;
            wait_restored(dir).with_context(|| format!("restore: {}", super::vm_logs_tail(dir)))?;
            let client = self.wait_for_agent(banger_vmm::BackendKind::Qemu, dir, pid)?;
            super::identity::refresh(&client, vm)
                .context("give the restored VM its own identity")?;
            self.agents.put(&vm.id, client);
            Ok(())
        })();
        if let Err(e) = ready {
            if pid_alive(pid) {
                if let Some(vmm) = &identity {
                    vmm.kill();
                }
            }
            return Err(e);
        }
        Ok(pid)
    }

    /// After a cold first boot whose agent answered: save the template for `key`. A
    /// failure only costs later boots their warm start.
    pub(super) fn save_template(&self, vm: &VmInfo, key: &TemplateKey) {
        if find(&self.layout.state_dir, key).is_some() {
            return;
        }
        if let Err(e) = capture(&self.layout.state_dir, key, Path::new(&vm.dir)) {
            tracing::warn!(vm = %vm.name, template = %key.id(), error = %format!("{e:#}"), "cannot save a warm template");
        }
    }
}
