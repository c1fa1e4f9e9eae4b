//! `vm.start`: choosing the VMM (QEMU under KVM or TCG, Firecracker, its jailer), wiring
//! the guest's network, booting (warm from a template, from a fork's snapshot, or cold)
//! and waiting for the guest agent; also the TAP device's release when a VM stops.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use banger_api::{VmBackend, VmInfo, VmState};
use banger_vmm::agent::AgentClient;
use banger_vmm::backend::{self, agent_socket_in, select_backend, BackendKind, HostFacts};
use banger_vmm::firecracker::Firecracker;
use banger_vmm::helper_jail::HelperJailed;
use banger_vmm::qemu::{Accel, Qemu};
use banger_vmm::{NetSpec, VmSpec, Vmm};

use super::{check_egress, pid_alive, ports, template, vm_logs_tail, VmService, ROOT_DISK};
use crate::services::disk;
use crate::services::network::{self, NetworkMode};
use crate::services::privhelper::{JailRoute, TapRoute};
use crate::services::process::ProcessIdentity;
use crate::{ServiceError, ServiceResult};

/// How long a booting guest has to answer on its agent port. TCG on a busy 2-core host
/// boots in about 5 s; the margin is for CI neighbours.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

impl VmService {
    /// Whether KVM runs a guest here, probed once by booting `kernel` briefly under
    /// QEMU-KVM: an openable /dev/kvm is no proof (paravirtual KVM hosts accept it and
    /// then cannot run an unmodified Linux guest). The same answer serves Firecracker,
    /// which boots the same kernel on the same KVM.
    fn kvm(&self, kernel: &Path) -> Result<String, String> {
        self.kvm
            .get_or_init(|| {
                if !Path::new("/dev/kvm").exists() {
                    return Err("/dev/kvm does not exist".into());
                }
                match banger_vmm::qemu::kvm_usable(
                    kernel,
                    Path::new(banger_vmm::initramfs::DEFAULT_BUSYBOX),
                    Duration::from_secs(15),
                ) {
                    Ok(probe) if probe.usable => Ok(probe.detail),
                    Ok(probe) => {
                        tracing::info!(detail = %probe.detail, "KVM not usable; VMs run under TCG");
                        Err(probe.detail)
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "KVM probe failed; VMs run under TCG");
                        Err(format!("probe failed: {e}"))
                    }
                }
            })
            .clone()
    }

    /// The Firecracker binary: `firecracker_bin` from config.toml when set and present,
    /// else `firecracker` on PATH.
    pub fn firecracker_binary(&self) -> Option<PathBuf> {
        match &self.config.firecracker_bin {
            Some(path) => path.is_file().then(|| path.clone()),
            None => backend::find_on_path("firecracker"),
        }
    }

    /// Firecracker's jailer: `jailer_bin` from config.toml when set and present, else
    /// `jailer` on PATH.
    pub fn jailer_binary(&self) -> Option<PathBuf> {
        match &self.config.jailer_bin {
            Some(path) => path.is_file().then(|| path.clone()),
            None => backend::find_on_path("jailer"),
        }
    }

    /// As root: installs the user-mode output guard for `vmm_user` and returns that user,
    /// whom QEMU then runs as (`-runas`). Not root: nothing can be enforced (see `banger
    /// doctor`): the guest reaches the host's loopback through 10.0.2.2 and the host's
    /// other addresses. That is warned about, not refused: an unprivileged daemon has no
    /// user-mode network that is better, and refusing would leave it none.
    fn user_guard(&self) -> anyhow::Result<Option<(String, u32)>> {
        if !rustix::process::geteuid().is_root() {
            tracing::warn!("bangerd is not root: user-mode guests can reach the host's loopback (10.0.2.2) and its own addresses (banger doctor)");
            return Ok(None);
        }
        // The same /etc/passwd lookup the VMM is dropped to (no `id` process per start).
        let user = self
            .config
            .vmm_user()
            .map_err(|e| anyhow::anyhow!(e))?
            .ok_or_else(|| anyhow::anyhow!("bangerd is root but has no vmm_user"))?;
        network::ensure_user_guard(user.uid)?;
        Ok(Some((user.name, user.uid)))
    }

    /// The VMM for a VM networked with `mode`, per the `vmm` setting and the host.
    pub(super) fn backend(&self, kernel: &Path, mode: NetworkMode) -> ServiceResult<Box<dyn Vmm>> {
        let preference: banger_vmm::BackendPreference = self.config.vmm.unwrap_or_default().into();
        let firecracker = self.firecracker_binary();
        let host = HostFacts {
            kvm: self.kvm(kernel),
            firecracker: firecracker.clone(),
            // Firecracker has no user-mode stack; a VM without a NIC needs none.
            tap_network: mode != NetworkMode::User,
        };
        let kind = select_backend(preference, &host).map_err(|e| {
            let mut message = e.to_string();
            if let (banger_vmm::backend::SelectError::FirecrackerMissing, Some(path)) =
                (&e, &self.config.firecracker_bin)
            {
                message.push_str(&format!(" (firecracker_bin = {:?} is not a file)", path));
            }
            ServiceError::bad_request(message)
        })?;
        let console_logger = self.console_logger();
        let run_as = self.config.vmm_user().map_err(ServiceError::bad_request)?;
        Ok(match (kind, firecracker, run_as.clone()) {
            // An unprivileged daemon's Firecracker runs in bangerd-root's jailer, when the
            // helper has one (banger_vmm::helper_jail); else unjailed, as this uid.
            (BackendKind::Firecracker, Some(binary), None) => {
                let firecracker = Firecracker {
                    binary,
                    console_logger,
                    jailer: None,
                };
                match JailRoute::probe(&self.config) {
                    JailRoute::Helper { client, .. } => Box::new(HelperJailed {
                        firecracker,
                        launcher: std::sync::Arc::new(client),
                    }),
                    JailRoute::Direct => Box::new(firecracker),
                    JailRoute::Unjailed(why) => {
                        tracing::warn!(%why, "Firecracker runs unjailed (banger doctor)");
                        Box::new(firecracker)
                    }
                }
            }
            // A root daemon's Firecracker runs in its own jailer (banger_vmm::firecracker::Jailer).
            (BackendKind::Firecracker, Some(binary), Some(user)) => {
                let jailer = banger_vmm::firecracker::Jailer {
                    binary: self.jailer_binary().ok_or_else(|| {
                        ServiceError::bad_request(match &self.config.jailer_bin {
                            Some(path) => format!(
                                "bangerd runs as root, so Firecracker runs in its jailer, but jailer_bin = {:?} (config.toml) is not a file",
                                path
                            ),
                            None => "bangerd runs as root, so Firecracker runs in its jailer, which is not on PATH: install it next to firecracker (same release) or set jailer_bin in config.toml".into(),
                        })
                    })?,
                    user,
                };
                Box::new(Firecracker {
                    binary,
                    console_logger,
                    jailer: Some(jailer),
                })
            }
            _ => Box::new(Qemu {
                console_logger,
                run_as,
                ..Qemu::default()
            }),
        })
    }

    /// The console logger of every VM: this `bangerd` binary (`--console-log`), capped at
    /// `console_log_max`. `None` where this process is not bangerd (a test harness
    /// driving the service), which leaves the console uncapped.
    pub(super) fn console_logger(&self) -> Option<banger_vmm::console::ConsoleLogger> {
        let exe = std::env::current_exe().ok()?;
        (exe.file_name()? == "bangerd").then(|| banger_vmm::console::ConsoleLogger {
            program: exe,
            args: vec!["--console-log".into()],
            max_bytes: self.config.console_log_max(),
        })
    }

    /// Boots a stopped VM and waits until its agent answers. A VM's first boot restores
    /// the warm template of its image, kernel, agent and machine when there is one (see
    /// [`template`]).
    pub fn start(&self, name: &str) -> ServiceResult<VmInfo> {
        self.start_with(name, true, None)
    }

    /// [`VmService::start`]; `warm_allowed: false` always boots cold (`--cold`); `from`
    /// restores that snapshot directory (a fork) instead of booting.
    pub(super) fn start_with(
        &self,
        name: &str,
        warm_allowed: bool,
        from: Option<&Path>,
    ) -> ServiceResult<VmInfo> {
        let vm = self.show(name)?;
        if vm.state.is_running() && self.vmm(&vm).is_some() {
            return Ok(vm);
        }
        let boot = self.kernels.boot_files(&vm.kernel)?;
        let mode = vm.network;
        check_egress(mode, &vm.egress)?;
        let vmm = self.backend(&boot.kernel, mode)?;
        let kind = vmm.kind();
        let accel = match (kind, self.kvm(&boot.kernel)) {
            (BackendKind::Firecracker, _) | (_, Ok(_)) => Accel::Kvm,
            (_, Err(_)) => Accel::Tcg,
        };
        let dir = PathBuf::from(&vm.dir);
        let root_disk = disk::root_disk(&dir);
        if kind == BackendKind::Firecracker && banger_vmm::qmp::disk_format(&root_disk) != "raw" {
            return Err(ServiceError::bad_request(format!(
                "VM {name:?} was created for QEMU (a qcow2 overlay disk) and cannot boot under Firecracker, which takes raw disks: set vmm = \"qemu\" or recreate the VM"
            )));
        }
        let initrd = disk::agent_initrd(&boot.initrd, &self.agent_path()?, &dir)?;
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 quiet banger.agent=1 banger.hostname={}",
            vm.name
        );
        let net = match (mode, &vm.guest_ip, &vm.tap) {
            (NetworkMode::None, _, _) => None,
            (NetworkMode::User, _, _) => {
                cmdline.push_str(&format!(
                    " banger.ip={}/{} banger.gw={}",
                    network::USER_GUEST_IP,
                    network::USER_PREFIX,
                    network::USER_GATEWAY
                ));
                let runas = self
                    .user_guard()
                    .with_context(|| format!("start VM {name:?}"))?;
                // slirp's own DNS forwarder (10.0.2.3) asks the host's first resolver,
                // which may be a loopback stub the guard blocks: the guest asks the
                // host's upstream one, like a TAP guest, and the forwarder only where the
                // host has no routable one.
                let dns =
                    network::host_nameserver().map_or("10.0.2.3".to_owned(), |ip| ip.to_string());
                cmdline.push_str(&format!(" banger.dns={dns}"));
                ports::check_host_free(&vm)?;
                Some(NetSpec::User(banger_vmm::qemu::UserNet {
                    host_forwards: ports::host_forwards(&vm.ports),
                    // egress = "deny": slirp reaches neither the host nor the outside.
                    restrict: vm.egress == banger_api::Egress::Deny,
                    runas: runas.map(|(user, _)| user),
                }))
            }
            (NetworkMode::Tap, Some(ip), Some(tap)) => {
                ports::check_host_free(&vm)?;
                let subnet = self.subnet()?;
                let ip: Ipv4Addr = ip
                    .parse()
                    .with_context(|| format!("guest_ip {ip:?} of VM {name:?} in the store"))?;
                let route = TapRoute::probe(&self.config);
                route
                    .ensure_bridge(subnet)
                    .with_context(|| format!("set up the bridge for VM {name:?}"))?;
                if let Err(e) = route
                    .create_tap(tap)
                    .and_then(|()| route.admit_guest(tap, ip, &vm.egress))
                    // Bound before the VMM starts, so a taken host port fails the start.
                    .and_then(|()| self.tap_ports.publish(&vm.id, ip, &vm.ports))
                {
                    // It may exist half-configured (created, not on the bridge).
                    self.release_tap(&vm);
                    return Err(e.context(format!("start VM {name:?}")).into());
                }
                cmdline.push_str(&format!(
                    " banger.ip={ip}/{} banger.gw={}",
                    subnet.prefix, subnet.gateway
                ));
                if let Some(dns) = network::host_nameserver() {
                    cmdline.push_str(&format!(" banger.dns={dns}"));
                }
                Some(NetSpec::Tap {
                    ifname: tap.clone(),
                    mac: network::guest_mac(ip),
                })
            }
            (NetworkMode::Tap, _, _) => {
                return Err(anyhow::anyhow!(
                    "VM {name:?} uses TAP networking but has no address or TAP device in the store"
                )
                .into())
            }
        };
        // SSH is an extra: a host without ssh-keygen still boots its VMs.
        if let Err(e) = self.install_ssh_keys(&vm, &dir.join(ROOT_DISK)) {
            tracing::warn!(vm = name, error = %format!("{e:#}"), "ssh keys not installed; banger vm ssh will not log in");
        }
        let spec = VmSpec {
            kernel: boot.kernel,
            initrd: Some(initrd),
            cmdline,
            root_disk: Some(root_disk),
            memory_mib: vm.memory_mib,
            vcpus: vm.vcpus,
            net,
            accel,
            run_dir: dir.clone(),
            agent_socket: Some(agent_socket_in(kind, &dir)),
        };
        let backend = match (kind, accel) {
            (BackendKind::Firecracker, _) => VmBackend::Firecracker,
            (BackendKind::Qemu, Accel::Kvm) => VmBackend::QemuKvm,
            (BackendKind::Qemu, Accel::Tcg) => VmBackend::QemuTcg,
        };
        if let Some(from) = from {
            self.fork_start(&vm, &spec, backend, from)?;
            return self.show(name);
        }
        let warm = self.warm_start(&vm, &spec, backend, warm_allowed);
        if let template::Warm::Restored = warm {
            return self.show(name);
        }
        let pid = match vmm.spawn_detached(&spec) {
            Ok(pid) => pid,
            Err(e) => {
                self.release_tap(&vm);
                return Err(anyhow::Error::new(e)
                    .context(format!("start VM {name:?} with {kind}"))
                    .into());
            }
        };
        // Taken at once, while the pid is surely the VMM's.
        let identity = ProcessIdentity::of(pid);
        self.record_running(&vm, pid, backend, identity.as_ref())?;
        match self.wait_for_agent(kind, &dir, pid) {
            Ok(client) => self.agents.put(&vm.id, client),
            Err(e) => {
                if let Some(vmm) = &identity {
                    vmm.kill();
                }
                self.release_tap(&vm);
                self.set_state(&vm.id, VmState::Stopped, None)?;
                return Err(e.context(format!("boot VM {name:?}")).into());
            }
        }
        if let template::Warm::ColdThenSave(key) = &warm {
            self.save_template(&vm, key);
        }
        tracing::info!(vm = name, pid, %backend, "VM started");
        self.show(name)
    }

    /// Deletes the VM's TAP device, if it has one; a failure is logged, not returned: the
    /// VM is stopped either way and start-up recovery retries.
    pub(super) fn release_tap(&self, vm: &VmInfo) {
        if vm.tap.is_none() {
            return;
        }
        self.tap_ports.unpublish(&vm.id);
        let route = TapRoute::probe(&self.config);
        if let (Some(tap), Some(ip)) = (
            vm.tap.as_deref(),
            vm.guest_ip.as_deref().and_then(|ip| ip.parse().ok()),
        ) {
            route.release_guest(tap, ip);
        }
        if let Some(tap) = &vm.tap {
            if let Err(e) = route.delete_tap(tap) {
                tracing::warn!(vm = %vm.name, %tap, error = %format!("{e:#}"), "cannot delete TAP device");
            }
        }
    }

    pub(super) fn wait_for_agent(
        &self,
        kind: BackendKind,
        dir: &Path,
        pid: u32,
    ) -> anyhow::Result<AgentClient> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let channel = kind.agent_channel_in(dir);
        loop {
            if !pid_alive(pid) {
                bail!("the VMM exited during boot: {}", vm_logs_tail(dir));
            }
            if let Ok(client) = channel.connect(Duration::from_secs(2)) {
                return Ok(client);
            }
            if Instant::now() > deadline {
                bail!(
                    "the guest agent did not answer within {BOOT_TIMEOUT:?}: {}",
                    vm_logs_tail(dir)
                );
            }
        }
    }
}
