//! Virtual machines: each has a directory `<state>/vms/<id>/` holding its own copy of the
//! image's root filesystem (reflinked or sparse), the console log and the sockets of its
//! VMM and guest agent. The VMM runs detached, so a restarted daemon re-adopts running VMs.
//!
//! Each VM row records the backend of its last boot (`qemu-kvm`, `qemu-tcg`,
//! `firecracker`), which says how its agent is reached after a daemon restart, and its
//! network (`user`, or `tap` with its address and TAP device; see [`super::network`]).

use std::collections::HashSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use banger_agent::proto::{ExecRequest, ExitStatus, WinSize};
use banger_api::{
    ExecResult, OutputStream, TtyParams, VmBackend, VmCreateParams, VmExecParams, VmInfo,
    VmLogsParams, VmLogsResult, VmRunParams, VmShellParams, VmState, OUTPUT_NOTIFICATION,
};
use banger_vmm::agent::{AgentClient, ExecControl, AGENT_GUEST_PATH};
use banger_vmm::backend::{self, agent_socket_in, select_backend, BackendKind, HostFacts};
use banger_vmm::firecracker::Firecracker;
use banger_vmm::qemu::{Accel, Qemu};
use banger_vmm::{NetSpec, VmSpec, Vmm};
use base64::Engine as _;
use rusqlite::OptionalExtension;

use crate::config::Config;
use crate::layout::Layout;
use crate::services::network::{self, NetworkMode, NetworkSetting, Subnet, TapCapability};
use crate::services::{CallContext, ImageService, InputEvent, InputReceiver, KernelService};
use crate::store::Store;
use crate::ServiceError;

/// How long a booting guest has to answer on its agent port. TCG on a busy 2-core host
/// boots in about 5 s; the margin is for CI neighbours.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a clean shutdown may take before the VMM is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The interactive shell of `vm.shell` (and of `vm.run` without a command): a login
/// shell, bash where the image has it (what people expect at a prompt), else the POSIX sh
/// every image has. Chosen in the guest, so no `$SHELL` of the host leaks in.
const LOGIN_SHELL: [&str; 3] = [
    "/bin/sh",
    "-c",
    "if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l",
];

/// `TERM` in the guest when the caller's terminal does not say.
const DEFAULT_TERM: &str = "xterm";

/// How a command's input is wired.
#[derive(Debug, Clone, Default)]
struct Stdio {
    /// The caller forwards its stdin.
    stdin: bool,
    /// On a pty of the caller's terminal.
    tty: Option<TtyParams>,
}

/// Creates, runs and deletes VMs.
#[derive(Debug)]
pub struct VmService {
    layout: Layout,
    config: Config,
    store: Arc<Store>,
    images: Arc<ImageService>,
    kernels: Arc<KernelService>,
    /// Whether a guest boots under KVM (`Ok(detail)`) or why not; probed once.
    kvm: OnceLock<Result<String, String>>,
    /// Guest addresses handed to creates that have not recorded their VM yet (a disk copy
    /// takes seconds): a concurrent create must not pick the same one.
    pending_ips: Mutex<HashSet<Ipv4Addr>>,
}

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
    /// The configuration VMs are created and booted with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The kernel service this one boots from.
    pub fn kernels(&self) -> &KernelService {
        &self.kernels
    }
}

/// Names of VMs and kernels appear in paths, hostnames and command lines.
pub fn validate_name(what: &str, name: &str) -> Result<(), ServiceError> {
    let mut bytes = name.bytes();
    let valid = name.len() <= 64
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(ServiceError::bad_request(format!(
            "invalid {what} name {name:?}: use [a-z0-9][a-z0-9-]{{0,63}}"
        )))
    }
}

struct OutputWriter<'a> {
    ctx: &'a CallContext,
    stream: OutputStream,
}

impl Write for OutputWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let data = base64::engine::general_purpose::STANDARD.encode(buf);
        self.ctx.notify(
            OUTPUT_NOTIFICATION,
            serde_json::json!({ "stream": self.stream, "data": data }),
        );
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub use banger_client::process::pid_alive;

/// What the `backend` column holds for a VM that never booted (the column is NOT NULL).
const NO_BACKEND: &str = "none";

/// A text column holding one of a closed set's names.
fn parse_column<T: std::str::FromStr>(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    row.get::<_, String>(index)?.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

impl VmService {
    /// The service for `layout`.
    pub fn new(
        layout: Layout,
        config: Config,
        store: Arc<Store>,
        images: Arc<ImageService>,
        kernels: Arc<KernelService>,
    ) -> Self {
        VmService {
            layout,
            config,
            store,
            images,
            kernels,
            kvm: OnceLock::new(),
            pending_ips: Mutex::default(),
        }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.layout.vms_dir().join(id)
    }

    /// Start-up: VMs recorded as running whose VMM is gone are marked stopped; live ones
    /// are simply re-adopted (they are found again by pid and socket). The TAP devices of
    /// this installation's VMs that do not run (a crash, a killed daemon) are deleted;
    /// other `bgr-*` devices are left alone, since they may belong to another
    /// installation's running VMs (a user and a system daemon on one host).
    pub fn recover(&self) -> anyhow::Result<()> {
        for vm in self.list()? {
            let running = vm.state.is_running() && vm.pid.is_some_and(pid_alive);
            if vm.state.is_running() && !running {
                self.set_state(&vm.id, VmState::Stopped, None)?;
                tracing::info!(vm = %vm.name, "VM found dead at start-up; marked stopped");
            }
            if !running {
                if let Some(tap) = vm.tap.as_deref().filter(|t| network::tap_exists(t)) {
                    match network::delete_tap(tap) {
                        Ok(()) => {
                            tracing::info!(vm = %vm.name, %tap, "deleted the TAP device of a VM that is not running")
                        }
                        Err(e) => {
                            tracing::warn!(vm = %vm.name, %tap, error = %format!("{e:#}"), "cannot delete a stale TAP device")
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn row(&self, row: &rusqlite::Row<'_>) -> rusqlite::Result<VmInfo> {
        let id: String = row.get(0)?;
        Ok(VmInfo {
            dir: self.dir(&id).display().to_string(),
            id,
            name: row.get(1)?,
            image: row.get(2)?,
            kernel: row.get(3)?,
            vcpus: row.get(4)?,
            memory_mib: row.get(5)?,
            disk_bytes: row.get::<_, i64>(6)? as u64,
            state: parse_column(row, 7)?,
            pid: row.get(8)?,
            // Written as "qemu" before a first boot by older versions, "none" now.
            backend: row.get::<_, String>(9)?.parse().ok(),
            created_at: row.get(10)?,
            network: row.get(11)?,
            guest_ip: row.get(12)?,
            tap: row.get(13)?,
        })
    }

    const COLUMNS: &'static str = "id, name, image, kernel, vcpus, memory_mib, disk_bytes, state, pid, backend, created_at, network, guest_ip, tap";

    /// Every VM by name.
    pub fn list(&self) -> Result<Vec<VmInfo>, ServiceError> {
        let conn = self.store.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {} FROM vms ORDER BY name", Self::COLUMNS))
            .context("list VMs")?;
        let rows = stmt.query_map([], |r| self.row(r)).context("list VMs")?;
        Ok(rows.collect::<Result<_, _>>().context("list VMs")?)
    }

    /// The VM called `name`.
    pub fn show(&self, name: &str) -> Result<VmInfo, ServiceError> {
        let conn = self.store.conn();
        conn.query_row(
            &format!("SELECT {} FROM vms WHERE name = ?1", Self::COLUMNS),
            [name],
            |r| self.row(r),
        )
        .optional()
        .context("look up VM")?
        .ok_or_else(|| ServiceError::not_found(format!("no VM named {name:?}")))
    }

    fn set_state(&self, id: &str, state: VmState, pid: Option<u32>) -> anyhow::Result<()> {
        self.store
            .conn()
            .execute(
                "UPDATE vms SET state = ?1, pid = ?2 WHERE id = ?3",
                rusqlite::params![state.as_str(), pid, id],
            )
            .context("record VM state")?;
        Ok(())
    }

    /// Where the static guest agent is, or why it is not found.
    pub fn agent_path(&self) -> Result<PathBuf, ServiceError> {
        let candidates = [
            self.config.agent_bin.clone(),
            std::env::var_os("BANGER_AGENT").map(PathBuf::from),
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("banger-agent"))),
        ];
        candidates
            .into_iter()
            .flatten()
            .find(|p| p.is_file())
            .ok_or_else(|| {
                ServiceError::not_found(
                "the guest agent is missing: build it with `cargo build --release -p banger-agent \
                 --target x86_64-unknown-linux-musl` and set agent_bin in config.toml (or put \
                 banger-agent next to bangerd)",
            )
            })
    }

    /// Creates a VM (and starts it unless `no_start`).
    pub fn create(&self, params: VmCreateParams) -> Result<VmInfo, ServiceError> {
        let name = match params.name {
            Some(name) => name,
            None => format!("vm-{}", hex::encode(rand::random::<[u8; 3]>())),
        };
        validate_name("VM", &name)?;
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
        let agent = self.agent_path()?;
        let setting = match params.network.as_deref() {
            Some(name) => NetworkSetting::parse(name).ok_or_else(|| {
                ServiceError::bad_request(format!(
                    "network {name:?}: expected \"user\", \"tap\" or \"auto\""
                ))
            })?,
            None => self.config.network.unwrap_or_default(),
        };
        let mode = network::resolve_mode(setting, TapCapability::probe())
            .map_err(|e| ServiceError::bad_request(format!("{e:#}")))?;
        if !params.no_start {
            // Refuse a VM that could not boot before copying its disk: the backend
            // choice (vmm, firecracker_bin, KVM, network) is the same at start.
            let boot = self.kernels.boot_files(&kernel.name)?;
            self.backend(&boot.kernel, mode)?;
        }
        let id = hex::encode(rand::random::<[u8; 8]>());
        let reserved = match mode {
            NetworkMode::User => None,
            NetworkMode::Tap => Some(self.allocate_guest_ip()?),
        };
        let guest_ip = reserved.as_ref().map(|r| r.ip.to_string());
        let tap = reserved.as_ref().map(|_| network::tap_name(&id));
        let dir = self.dir(&id);
        let disk = dir.join("root.ext4");
        let prepared = (|| -> anyhow::Result<u64> {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            copy_disk(Path::new(&image.rootfs), &disk)?;
            let mut size = image.size_bytes;
            if let Some(wanted) = params.disk_bytes {
                if wanted < size {
                    bail!("--disk-size {wanted} is smaller than the image's {size} bytes; disks only grow");
                }
                if wanted > size {
                    grow_disk(&disk, wanted)?;
                    size = wanted;
                }
            }
            inject_agent(&disk, &agent)?;
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
            network: mode.name().into(),
            guest_ip,
            tap,
        };
        self.store
            .conn()
            .execute(
                &format!(
                    "INSERT INTO vms ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
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
                    info.network,
                    info.guest_ip,
                    info.tap
                ],
            )
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                anyhow::Error::new(e).context("record VM")
            })?;
        if params.no_start {
            return Ok(info);
        }
        self.start(&name)
    }

    /// The subnet of TAP networking (`bridge_address`).
    fn subnet(&self) -> Result<Subnet, ServiceError> {
        self.config
            .bridge_address
            .as_deref()
            .unwrap_or(network::DEFAULT_BRIDGE_ADDRESS)
            .parse()
            .map_err(|e: anyhow::Error| ServiceError::bad_request(format!("config.toml: {e:#}")))
    }

    /// The lowest free address of the subnet; the unique index on `guest_ip` backs this
    /// up against a concurrent create.
    /// The lowest address of the subnet that no VM has and no create in progress holds;
    /// held until the returned guard drops.
    fn allocate_guest_ip(&self) -> Result<PendingIp<'_>, ServiceError> {
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

    /// The VMM for a VM networked with `mode`, per the `vmm` setting and the host.
    fn backend(&self, kernel: &Path, mode: NetworkMode) -> Result<Box<dyn Vmm>, ServiceError> {
        let preference: banger_vmm::BackendPreference = self.config.vmm.unwrap_or_default().into();
        let firecracker = self.firecracker_binary();
        let host = HostFacts {
            kvm: self.kvm(kernel),
            firecracker: firecracker.clone(),
            tap_network: mode == NetworkMode::Tap,
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
        Ok(match (kind, firecracker) {
            (BackendKind::Firecracker, Some(binary)) => Box::new(Firecracker { binary }),
            _ => Box::new(Qemu::default()),
        })
    }

    /// Boots a stopped VM and waits until its agent answers.
    pub fn start(&self, name: &str) -> Result<VmInfo, ServiceError> {
        let vm = self.show(name)?;
        if vm.state.is_running() && vm.pid.is_some_and(pid_alive) {
            return Ok(vm);
        }
        let boot = self.kernels.boot_files(&vm.kernel)?;
        let mode = NetworkMode::from_record(&vm.network).ok_or_else(|| {
            anyhow::anyhow!(
                "VM {name:?} has an unknown network {:?} in the store",
                vm.network
            )
        })?;
        let vmm = self.backend(&boot.kernel, mode)?;
        let kind = vmm.kind();
        let accel = match (kind, self.kvm(&boot.kernel)) {
            (BackendKind::Firecracker, _) | (_, Ok(_)) => Accel::Kvm,
            (_, Err(_)) => Accel::Tcg,
        };
        let dir = PathBuf::from(&vm.dir);
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 quiet banger.agent=1 banger.hostname={}",
            vm.name
        );
        let net = match (mode, &vm.guest_ip, &vm.tap) {
            (NetworkMode::User, _, _) => {
                // 10.0.2.3 is QEMU's own DNS forwarder to the host's resolvers.
                cmdline.push_str(" banger.ip=10.0.2.15/24 banger.gw=10.0.2.2 banger.dns=10.0.2.3");
                NetSpec::User(Default::default())
            }
            (NetworkMode::Tap, Some(ip), Some(tap)) => {
                let subnet = self.subnet()?;
                let ip: Ipv4Addr = ip
                    .parse()
                    .with_context(|| format!("guest_ip {ip:?} of VM {name:?} in the store"))?;
                network::ensure_bridge(subnet)
                    .with_context(|| format!("set up the bridge for VM {name:?}"))?;
                if let Err(e) = network::create_tap(tap) {
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
                NetSpec::Tap {
                    ifname: tap.clone(),
                    mac: network::guest_mac(ip),
                }
            }
            (NetworkMode::Tap, _, _) => {
                return Err(anyhow::anyhow!(
                    "VM {name:?} uses TAP networking but has no address or TAP device in the store"
                )
                .into())
            }
        };
        let spec = VmSpec {
            kernel: boot.kernel,
            initrd: Some(boot.initrd),
            cmdline,
            root_disk: Some(dir.join("root.ext4")),
            memory_mib: vm.memory_mib,
            vcpus: vm.vcpus,
            net: Some(net),
            accel,
            run_dir: dir.clone(),
            agent_socket: Some(agent_socket_in(kind, &dir)),
        };
        let pid = match vmm.spawn_detached(&spec) {
            Ok(pid) => pid,
            Err(e) => {
                self.release_tap(&vm);
                return Err(anyhow::Error::new(e)
                    .context(format!("start VM {name:?} with {kind}"))
                    .into());
            }
        };
        let backend = match (kind, accel) {
            (BackendKind::Firecracker, _) => VmBackend::Firecracker,
            (BackendKind::Qemu, Accel::Kvm) => VmBackend::QemuKvm,
            (BackendKind::Qemu, Accel::Tcg) => VmBackend::QemuTcg,
        };
        self.store
            .conn()
            .execute(
                "UPDATE vms SET state = 'running', pid = ?1, backend = ?2 WHERE id = ?3",
                rusqlite::params![pid, backend.as_str(), vm.id],
            )
            .context("record VM state")?;
        if let Err(e) = self.wait_for_agent(kind, &dir, pid) {
            kill(pid);
            self.release_tap(&vm);
            self.set_state(&vm.id, VmState::Stopped, None)?;
            return Err(e.context(format!("boot VM {name:?}")).into());
        }
        tracing::info!(vm = name, pid, %backend, "VM started");
        self.show(name)
    }

    /// Deletes the VM's TAP device, if it has one; a failure is logged, not returned: the
    /// VM is stopped either way and start-up recovery retries.
    fn release_tap(&self, vm: &VmInfo) {
        if let Some(tap) = &vm.tap {
            if let Err(e) = network::delete_tap(tap) {
                tracing::warn!(vm = %vm.name, %tap, error = %format!("{e:#}"), "cannot delete TAP device");
            }
        }
    }

    fn wait_for_agent(
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

    fn agent(&self, vm: &VmInfo) -> Result<AgentClient, ServiceError> {
        if !vm.state.is_running() || !vm.pid.is_some_and(pid_alive) {
            return Err(ServiceError::bad_request(format!(
                "VM {:?} is not running (banger vm start {})",
                vm.name, vm.name
            )));
        }
        Ok(agent_channel(vm)?
            .connect(Duration::from_secs(10))
            .with_context(|| format!("connect to the agent of VM {:?}", vm.name))?)
    }

    /// Shuts a VM down; its disk keeps what the guest wrote.
    pub fn stop(&self, name: &str) -> Result<VmInfo, ServiceError> {
        let vm = self.show(name)?;
        if let Some(pid) = vm.pid.filter(|pid| pid_alive(*pid)) {
            // An unknown backend (a record from a newer banger) still gets killed below.
            let client =
                agent_channel(&vm).and_then(|channel| Ok(channel.connect(Duration::from_secs(5))?));
            if let Ok(client) = client {
                if let Err(e) = client.shutdown(STOP_TIMEOUT) {
                    tracing::warn!(vm = name, error = %e, "clean shutdown failed");
                }
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if pid_alive(pid) {
                tracing::warn!(vm = name, pid, "VM did not stop in time; killing it");
                kill(pid);
            }
        }
        self.release_tap(&vm);
        self.set_state(&vm.id, VmState::Stopped, None)?;
        self.show(name)
    }

    /// Kills the VMM at once: for a guest that does not answer. Files the guest had not
    /// synced may be lost.
    pub fn kill(&self, name: &str) -> Result<VmInfo, ServiceError> {
        let vm = self.show(name)?;
        if let Some(pid) = vm.pid.filter(|pid| pid_alive(*pid)) {
            kill(pid);
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.release_tap(&vm);
        self.set_state(&vm.id, VmState::Stopped, None)?;
        self.show(name)
    }

    /// Stops and deletes a VM with all its files.
    pub fn remove(&self, name: &str) -> Result<VmInfo, ServiceError> {
        let vm = self.stop(name)?;
        self.store
            .conn()
            .execute("DELETE FROM vms WHERE id = ?1", [&vm.id])
            .context("delete VM record")?;
        std::fs::remove_dir_all(&vm.dir).with_context(|| format!("remove {}", vm.dir))?;
        Ok(vm)
    }

    /// Runs a command in a running VM, streaming its output to the caller.
    pub fn exec(
        &self,
        ctx: &CallContext,
        params: &VmExecParams,
    ) -> Result<ExecResult, ServiceError> {
        if params.argv.is_empty() {
            return Err(ServiceError::bad_request("no command given"));
        }
        let vm = self.show(&params.name)?;
        let client = self.agent(&vm)?;
        let cwd = params.cwd.clone().unwrap_or_else(|| "/root".into());
        let stdio = Stdio {
            stdin: params.stdin,
            tty: params.tty.clone(),
        };
        self.exec_on(ctx, &client, &vm.name, &params.argv, &cwd, stdio)
    }

    /// Runs the interactive login shell in a running VM, fed by the caller's input.
    pub fn shell(
        &self,
        ctx: &CallContext,
        params: &VmShellParams,
    ) -> Result<ExecResult, ServiceError> {
        let vm = self.show(&params.name)?;
        let client = self.agent(&vm)?;
        let stdio = Stdio {
            stdin: true,
            tty: params.tty.clone(),
        };
        let argv = LOGIN_SHELL.map(String::from);
        self.exec_on(ctx, &client, &vm.name, &argv, "/root", stdio)
    }

    fn exec_on(
        &self,
        ctx: &CallContext,
        client: &AgentClient,
        vm: &str,
        argv: &[String],
        cwd: &str,
        stdio: Stdio,
    ) -> Result<ExecResult, ServiceError> {
        let mut request = ExecRequest::new(argv.iter().map(String::as_str));
        request.cwd = Some(PathBuf::from(cwd));
        request.stdin = stdio.stdin || stdio.tty.is_some();
        if let Some(tty) = &stdio.tty {
            request.tty = Some(WinSize {
                rows: tty.rows,
                cols: tty.cols,
            });
            let term = tty.term.clone().filter(|t| !t.is_empty());
            request = request.env("TERM", term.as_deref().unwrap_or(DEFAULT_TERM));
        }
        let mut stdout = OutputWriter {
            ctx,
            stream: OutputStream::Stdout,
        };
        let mut stderr = OutputWriter {
            ctx,
            stream: OutputStream::Stderr,
        };
        // Taken even when stdin is not forwarded: signals come the same way.
        let input = ctx.take_input();
        let on_pty = request.tty.is_some();
        let start = |control: ExecControl| -> std::io::Result<()> {
            match input {
                Some(input) => {
                    crate::span::spawn_thread("vm-exec-input", move || {
                        forward_input(input, &control, on_pty)
                    })?;
                }
                // Nobody can send input (a call without a connection): end it at once
                // rather than leave the command waiting.
                None if request.stdin => {
                    let _ = control.close_stdin();
                }
                None => {}
            }
            Ok(())
        };
        let status = client
            .exec_with(&request, start, &mut stdout, &mut stderr)
            .with_context(|| format!("run {argv:?} in VM {vm:?}"))?;
        Ok(match status {
            ExitStatus::Code(code) => ExecResult {
                vm: vm.into(),
                exit_code: Some(code),
                signal: None,
            },
            ExitStatus::Signal(signal) => ExecResult {
                vm: vm.into(),
                exit_code: None,
                signal: Some(signal),
            },
        })
    }

    /// Creates and starts a VM, copies the workspace in, runs the command, stops the VM
    /// (removing it with `rm`).
    pub async fn run(
        &self,
        ctx: &CallContext,
        params: VmRunParams,
    ) -> Result<ExecResult, ServiceError> {
        // The workspace comes over the connection; no client path is opened here.
        if let Some(path) = &params.path {
            return Err(ServiceError::bad_request(format!(
                "vm.run no longer reads a workspace from the daemon's filesystem (path {path:?}); \
                 stream it: set workspace and send the tar as upload notifications (docs/api.md)"
            )));
        }
        if let Some(name) = &params.workspace {
            super::upload::check_workspace_name(name)?;
        }
        let wanted = params
            .image
            .clone()
            .or_else(|| self.config.default_image.clone())
            .ok_or_else(|| {
                ServiceError::bad_request("no --image given and no default_image in config.toml")
            })?;
        let image = self.images.find_or_pull(ctx, &wanted).await?;
        let create = VmCreateParams {
            name: params.name.clone(),
            image: Some(image.name),
            network: params.network.clone(),
            ..Default::default()
        };
        let vm = tokio::task::block_in_place(|| self.create(create))?;
        let result = tokio::task::block_in_place(|| -> Result<ExecResult, ServiceError> {
            let client = self.agent(&self.show(&vm.name)?)?;
            let mut cwd = "/root".to_owned();
            if let Some(name) = &params.workspace {
                cwd = format!("/root/{name}");
                let bytes = super::upload::receive_into(ctx, &client, Path::new(&cwd))
                    .with_context(|| format!("copy the workspace into VM {:?}", vm.name))?;
                tracing::info!(vm = %vm.name, bytes, dest = %cwd, "workspace received");
            }
            if params.argv.is_empty() {
                let stdio = Stdio {
                    stdin: true,
                    tty: params.tty.clone(),
                };
                let argv = LOGIN_SHELL.map(String::from);
                return self.exec_on(ctx, &client, &vm.name, &argv, &cwd, stdio);
            }
            let stdio = Stdio {
                stdin: params.stdin,
                tty: params.tty.clone(),
            };
            self.exec_on(ctx, &client, &vm.name, &params.argv, &cwd, stdio)
        });
        let cleanup = tokio::task::block_in_place(|| {
            if params.rm {
                self.remove(&vm.name).map(drop)
            } else {
                self.stop(&vm.name).map(drop)
            }
        });
        let result = result?;
        cleanup?;
        Ok(result)
    }
}

impl VmService {
    /// Sends the console log of `params.name` to the caller as `output` on `stdout`; with
    /// `follow`, keeps sending what the console writes until the VM is no longer running
    /// or the caller hangs up.
    pub fn logs(
        &self,
        ctx: &CallContext,
        params: &VmLogsParams,
    ) -> Result<VmLogsResult, ServiceError> {
        let vm = self.show(&params.name)?;
        let path = Path::new(&vm.dir).join("console.log");
        let mut log = match std::fs::File::open(&path) {
            Ok(file) => Some(file),
            // Never booted: nothing logged yet, which following may change.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("open {}", path.display()))
                    .into())
            }
        };
        let mut out = OutputWriter {
            ctx,
            stream: OutputStream::Stdout,
        };
        let mut sent = 0u64;
        let mut send_new = |log: &mut Option<std::fs::File>| -> anyhow::Result<()> {
            if log.is_none() {
                *log = std::fs::File::open(&path).ok();
            }
            if let Some(file) = log {
                sent += std::io::copy(file, &mut out)
                    .with_context(|| format!("read {}", path.display()))?;
            }
            Ok(())
        };
        send_new(&mut log)?;
        if params.follow {
            let mut input = ctx.take_input();
            let mut checked = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(100));
                send_new(&mut log)?;
                let hung_up = input.as_mut().is_some_and(|i| {
                    matches!(
                        i.try_recv(),
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
                    )
                });
                if hung_up {
                    break;
                }
                if checked.elapsed() >= Duration::from_secs(1) {
                    checked = Instant::now();
                    if !self.show(&params.name)?.state.is_running() {
                        send_new(&mut log)?;
                        break;
                    }
                }
            }
        }
        Ok(VmLogsResult {
            vm: vm.name,
            bytes: sent,
        })
    }
}

/// Passes the caller's input (and signals) on to the command until the caller stops sending
/// it. When
/// the caller hangs up, a command on a pty gets SIGHUP, as when a terminal closes; one on
/// a pipe just sees its stdin end.
fn forward_input(mut input: InputReceiver, control: &ExecControl, on_pty: bool) {
    while let Some(event) = input.blocking_recv() {
        let sent = match event {
            InputEvent::Data(data) => control.stdin(&data),
            InputEvent::Eof => control.close_stdin(),
            InputEvent::Resize { rows, cols } => control.resize(WinSize { rows, cols }),
            InputEvent::Signal(signal) => control.signal(signal),
            // An upload belongs to the step before the command (see services::upload).
            InputEvent::Upload(_) | InputEvent::UploadEnd => Ok(()),
        };
        if sent.is_err() || control.finished() {
            return;
        }
    }
    if !control.finished() {
        let _ = if on_pty {
            control.signal(rustix::process::Signal::Hup as i32)
        } else {
            control.close_stdin()
        };
    }
}

fn kill(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
    }
}

/// How the host reaches the agent of `vm`, from the backend its row records.
fn agent_channel(vm: &VmInfo) -> anyhow::Result<banger_vmm::agent::AgentChannel> {
    let kind = match vm.backend {
        Some(VmBackend::Firecracker) => BackendKind::Firecracker,
        Some(VmBackend::QemuTcg | VmBackend::QemuKvm) => BackendKind::Qemu,
        None => anyhow::bail!("VM {:?} has never booted: no agent to reach", vm.name),
    };
    Ok(kind.agent_channel_in(Path::new(&vm.dir)))
}

/// The last lines of the console and of whichever VMM logs exist, for boot errors.
fn vm_logs_tail(dir: &Path) -> String {
    let tail = |name: &str| {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        Some(format!(
            "{name}: {}",
            lines[lines.len().saturating_sub(5)..].join(" | ")
        ))
    };
    [
        "console.log",
        "qemu.stderr",
        "firecracker.stderr",
        "firecracker.log",
    ]
    .into_iter()
    .filter_map(tail)
    .collect::<Vec<_>>()
    .join("; ")
}

fn run_tool(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = command.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A copy-on-write copy where the filesystem can (reflink), a sparse one otherwise.
fn copy_disk(from: &Path, to: &Path) -> anyhow::Result<()> {
    run_tool(
        Command::new("cp")
            .arg("--reflink=auto")
            .arg("--sparse=always")
            .arg(from)
            .arg(to),
        "cp (copy the image's root filesystem)",
    )
}

fn grow_disk(disk: &Path, bytes: u64) -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .and_then(|f| f.set_len(bytes))
        .with_context(|| format!("grow {}", disk.display()))?;
    run_tool(
        Command::new("e2fsck").args(["-f", "-p"]).arg(disk),
        "e2fsck",
    )?;
    run_tool(Command::new("resize2fs").arg(disk), "resize2fs")
}

/// Writes the static agent into the VM's own disk (never into the shared image).
fn inject_agent(disk: &Path, agent: &Path) -> anyhow::Result<()> {
    let script = format!(
        "mkdir /.banger\nrm {AGENT_GUEST_PATH}\nwrite {} {AGENT_GUEST_PATH}\nsif {AGENT_GUEST_PATH} mode 0100755\nsif {AGENT_GUEST_PATH} uid 0\nsif {AGENT_GUEST_PATH} gid 0\n",
        agent.display()
    );
    let script_path = disk.with_extension("debugfs");
    std::fs::write(&script_path, script).context("write debugfs script")?;
    run_tool(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script_path)
            .arg(disk),
        "debugfs (inject the agent)",
    )?;
    let _ = std::fs::remove_file(&script_path);
    let check = Command::new("debugfs")
        .args(["-R", &format!("stat {AGENT_GUEST_PATH}")])
        .arg(disk)
        .output()
        .context("run debugfs")?;
    let stat = String::from_utf8_lossy(&check.stdout);
    if !stat.contains("Mode:  0755") {
        bail!(
            "the agent did not land in {}: {}",
            disk.display(),
            String::from_utf8_lossy(&check.stderr).trim()
        );
    }
    Ok(())
}
