//! Virtual machines: each has a directory `<state>/vms/<id>/` holding its own copy of the
//! image's root filesystem (reflinked or sparse), the console log and the sockets of its
//! VMM and guest agent. The VMM runs detached, so a restarted daemon re-adopts running VMs.
//!
//! Each VM row records the backend of its last boot (`qemu-kvm`, `qemu-tcg`,
//! `firecracker`), which says how its agent is reached after a daemon restart, and its
//! network (`user`, `none`, or `tap` with its address and TAP device; see
//! [`super::network`]) and its egress policy.

mod copy;
mod diff;
mod health;
mod lifecycle;
mod ports;
mod ssh;

pub use health::{GUEST_CPU_SAMPLE, GUEST_STATS_TIMEOUT, HEALTH_TIMEOUT};
pub use lifecycle::{MAX_VCPUS, MIN_MEMORY_MIB};

use crate::services::process::ProcessIdentity;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use banger_agent::proto::{ExecRequest, ExitStatus, WinSize};
use banger_api::{
    ExecResult, OutputStream, TtyParams, VmBackend, VmCreateParams, VmExecParams, VmInfo,
    VmLogsParams, VmLogsResult, VmRunParams, VmShellParams, VmState, OUTPUT_NOTIFICATION,
};
use banger_vmm::agent::{AgentClient, ExecControl};
use banger_vmm::backend::{self, agent_socket_in, select_backend, BackendKind, HostFacts};
use banger_vmm::firecracker::Firecracker;
use banger_vmm::qemu::{Accel, Qemu};
use banger_vmm::{NetSpec, VmSpec, Vmm};
use base64::Engine as _;
use rusqlite::OptionalExtension;

use crate::config::Config;
use crate::layout::Layout;
use crate::services::disk;
use crate::services::network::{self, NetworkMode, NetworkSetting, Subnet};
use crate::services::privhelper::TapRoute;
use crate::services::{CallContext, ImageService, InputEvent, InputReceiver, KernelService};
use crate::store::Store;
use crate::ServiceError;

mod fork;
pub(crate) use fork::tree_bytes;
mod identity;
mod snapshot;
mod template;

/// How long a booting guest has to answer on its agent port. TCG on a busy 2-core host
/// boots in about 5 s; the margin is for CI neighbours.
/// The VM's root disk in its directory.
const ROOT_DISK: &str = "root.ext4";

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
    /// The agent connection of each running VM, shared by all of its calls.
    agents: AgentPool,
}

/// One agent connection per running VM, kept open and shared by every call on it: the
/// agent multiplexes sessions over one connection (a virtio-serial port has only one),
/// so an exec, an upload and a stop run at once instead of queueing behind each other.
#[derive(Default)]
struct AgentPool {
    /// By VM id; a slot's lock is held while connecting, so one VM's calls never dial
    /// twice at once and other VMs are not held up.
    slots: Mutex<HashMap<String, AgentSlot>>,
}

/// One VM's connection, if made; locked while it is being made.
type AgentSlot = Arc<Mutex<Option<Arc<AgentClient>>>>;

impl std::fmt::Debug for AgentPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.slots.lock().map_or(0, |s| s.len());
        write!(f, "AgentPool({n} VMs)")
    }
}

impl AgentPool {
    fn slot(&self, id: &str) -> AgentSlot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(id.to_owned()).or_default().clone()
    }

    /// The live connection of VM `id`, made with `connect` when there is none (or it
    /// closed: the VM restarted, the agent broke the framing).
    fn get_or_connect(
        &self,
        id: &str,
        connect: impl FnOnce() -> anyhow::Result<AgentClient>,
    ) -> anyhow::Result<Arc<AgentClient>> {
        let slot = self.slot(id);
        let mut held = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = held.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        *held = None;
        let client = Arc::new(connect()?);
        *held = Some(client.clone());
        Ok(client)
    }

    fn put(&self, id: &str, client: AgentClient) {
        *self.slot(id).lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(client));
    }

    /// Drops the pool's hold on VM `id`'s connection (it closes once running calls end)
    /// and returns it if it is still open.
    fn forget(&self, id: &str) -> Option<Arc<AgentClient>> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)?;
        let client = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        client.filter(|c| !c.is_closed())
    }
}

/// Refuses an egress policy the network mode cannot enforce: user mode (slirp) can let
/// everything or nothing out, but has no per-destination filter of its own, and the
/// host's output guard matches one user shared by every user-mode VM, so a per-VM CIDR
/// list needs TAP mode.
fn check_egress(mode: NetworkMode, egress: &banger_api::Egress) -> Result<(), ServiceError> {
    if mode == NetworkMode::User && matches!(egress, banger_api::Egress::Only(_)) {
        return Err(ServiceError::bad_request(format!(
            "egress {egress}: a CIDR allow list needs network \"tap\"; network \"user\" enforces only \"allow\" or \"deny\""
        )));
    }
    Ok(())
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

    /// Where this daemon keeps its state.
    pub fn layout(&self) -> &Layout {
        &self.layout
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

/// Sends what is written as `output` notifications through the call's bounded output
/// queue: a write waits while the caller is not reading and fails once it hung up, which
/// is how a guest command is paced to its caller and ended when the caller goes away.
struct OutputWriter<'a> {
    ctx: &'a CallContext,
    stream: OutputStream,
}

impl Write for OutputWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One notification carries at most an agent chunk, so the queue's bound in lines
        // is a bound in bytes (a console log is copied in larger pieces).
        let buf = &buf[..buf.len().min(banger_agent::proto::CHUNK_SIZE)];
        let data = base64::engine::general_purpose::STANDARD.encode(buf);
        self.ctx.output(
            OUTPUT_NOTIFICATION,
            serde_json::json!({ "stream": self.stream, "data": data }),
        )?;
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
            agents: AgentPool::default(),
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
        template::remove_partial(&template::templates_dir(&self.layout.state_dir));
        template::remove_partial(&fork::snapshots_dir(&self.layout.state_dir));
        let route = TapRoute::probe(&self.config);
        for vm in self.list()? {
            let running = vm.state.is_running() && self.vmm(&vm).is_some();
            if vm.state.is_running() && !running {
                self.set_state(&vm.id, VmState::Stopped, None)?;
                tracing::info!(vm = %vm.name, "VM found dead at start-up; marked stopped");
            }
            if !running {
                if let (Some(tap), Some(ip)) = (
                    vm.tap.as_deref(),
                    vm.guest_ip.as_deref().and_then(|ip| ip.parse().ok()),
                ) {
                    route.release_guest(tap, ip);
                }
                if let Some(tap) = vm.tap.as_deref().filter(|t| network::tap_exists(t)) {
                    match route.delete_tap(tap) {
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
        let bad = |column: usize, what: String| {
            rusqlite::Error::FromSqlConversionFailure(
                column,
                rusqlite::types::Type::Text,
                what.into(),
            )
        };
        let network: String = row.get(11)?;
        let network = NetworkMode::from_name(&network)
            .ok_or_else(|| bad(11, format!("unknown network {network:?} in the store")))?;
        let egress: String = row.get(14)?;
        let egress: banger_api::Egress = serde_json::from_str(&egress)
            .map_err(|e| bad(14, format!("egress {egress:?} in the store: {e}")))?;
        let ports: String = row.get(15)?;
        let ports: Vec<banger_api::PublishedPort> = serde_json::from_str(&ports)
            .map_err(|e| bad(15, format!("ports {ports:?} in the store: {e}")))?;
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
            network,
            egress,
            guest_ip: row.get(12)?,
            tap: row.get(13)?,
            ports,
        })
    }

    const COLUMNS: &'static str = "id, name, image, kernel, vcpus, memory_mib, disk_bytes, state, pid, backend, created_at, network, guest_ip, tap, egress, ports";

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

    /// The VM's own VMM, if it still runs: the recorded pid only counts while the process
    /// behind it has the recorded identity (a pid reused by anything else is not the VMM).
    /// Records from before identities were kept count when the process's command line
    /// names the VM's directory, which only its VMM's does.
    fn vmm(&self, vm: &VmInfo) -> Option<ProcessIdentity> {
        let pid = vm.pid?;
        let recorded: Option<String> = self
            .store
            .conn()
            .query_row(
                "SELECT pid_identity FROM vms WHERE id = ?1",
                [&vm.id],
                |r| r.get(0),
            )
            .optional()
            .ok()
            .flatten()
            .flatten();
        match recorded {
            Some(start) => Some(ProcessIdentity::recorded(pid, &start)).filter(|p| p.is_alive()),
            None => {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let names_dir = cmdline
                    .split(|b| *b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(vm.dir.as_str()));
                if names_dir {
                    ProcessIdentity::of(pid)
                } else {
                    None
                }
            }
        }
    }

    fn set_state(&self, id: &str, state: VmState, pid: Option<u32>) -> anyhow::Result<()> {
        self.store
            .conn()
            .execute(
                "UPDATE vms SET state = ?1, pid = ?2, pid_identity = NULL WHERE id = ?3",
                rusqlite::params![state.as_str(), pid, id],
            )
            .context("record VM state")?;
        Ok(())
    }

    /// Where the static guest agent is, or why there is none a VM could run (missing, or
    /// not a static x86-64 executable).
    pub fn agent_path(&self) -> Result<PathBuf, ServiceError> {
        let candidates = [
            self.config.agent_bin.clone(),
            std::env::var_os("BANGER_AGENT").map(PathBuf::from),
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("banger-agent"))),
        ];
        let path = candidates
            .into_iter()
            .flatten()
            .find(|p| p.is_file())
            .ok_or_else(|| {
                ServiceError::not_found(format!(
                    "the guest agent is missing: {} (or put banger-agent next to bangerd)",
                    banger_vmm::agent_binary::BUILD_HINT
                ))
            })?;
        banger_vmm::agent_binary::check_static_agent(&path).map_err(|why| {
            ServiceError::bad_request(format!(
                "the guest agent cannot run in a VM: {why}; {}",
                banger_vmm::agent_binary::BUILD_HINT
            ))
        })?;
        Ok(path)
    }

    /// Creates a VM (and starts it unless `no_start`).
    pub fn create(&self, params: VmCreateParams) -> Result<VmInfo, ServiceError> {
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
    fn backend(&self, kernel: &Path, mode: NetworkMode) -> Result<Box<dyn Vmm>, ServiceError> {
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
        Ok(match (kind, firecracker) {
            (BackendKind::Firecracker, Some(binary)) => {
                // A root daemon's Firecracker runs in its jailer (banger_vmm::firecracker::Jailer).
                let jailer = match run_as {
                    Some(user) => Some(banger_vmm::firecracker::Jailer {
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
                    }),
                    None => None,
                };
                Box::new(Firecracker {
                    binary,
                    console_logger,
                    jailer,
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
    fn console_logger(&self) -> Option<banger_vmm::console::ConsoleLogger> {
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
    pub fn start(&self, name: &str) -> Result<VmInfo, ServiceError> {
        self.start_with(name, true, None)
    }

    /// [`VmService::start`]; `warm_allowed: false` always boots cold (`--cold`); `from`
    /// restores that snapshot directory (a fork) instead of booting.
    fn start_with(
        &self,
        name: &str,
        warm_allowed: bool,
        from: Option<&Path>,
    ) -> Result<VmInfo, ServiceError> {
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
        self.store
            .conn()
            .execute(
                "UPDATE vms SET state = 'running', pid = ?1, backend = ?2, pid_identity = ?3 WHERE id = ?4",
                rusqlite::params![pid, backend.as_str(), identity.as_ref().map(|i| i.start.clone()), vm.id],
            )
            .context("record VM state")?;
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
    fn release_tap(&self, vm: &VmInfo) {
        if vm.tap.is_none() {
            return;
        }
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

    /// The shared connection to the agent of `vm` (see [`AgentPool`]).
    fn agent(&self, vm: &VmInfo) -> Result<Arc<AgentClient>, ServiceError> {
        if vm.state.is_paused() {
            return Err(ServiceError::bad_request(format!(
                "VM {:?} is paused (banger vm resume {})",
                vm.name, vm.name
            )));
        }
        if !vm.state.is_running() || self.vmm(vm).is_none() {
            return Err(ServiceError::bad_request(format!(
                "VM {:?} is not running (banger vm start {})",
                vm.name, vm.name
            )));
        }
        Ok(self.agents.get_or_connect(&vm.id, || {
            agent_channel(vm)?
                .connect(Duration::from_secs(10))
                .with_context(|| format!("connect to the agent of VM {:?}", vm.name))
        })?)
    }

    /// Shuts a VM down; its disk keeps what the guest wrote.
    pub fn stop(&self, name: &str) -> Result<VmInfo, ServiceError> {
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
    pub fn kill(&self, name: &str) -> Result<VmInfo, ServiceError> {
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
    pub fn remove(&self, name: &str) -> Result<VmInfo, ServiceError> {
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
        // Taken even when stdin is not forwarded: signals (and the hang-up) come that way.
        let input = ctx.take_input();
        let on_pty = request.tty.is_some();
        let hung_up = ctx.hung_up_flag();
        let start = |control: ExecControl| -> std::io::Result<()> {
            match input {
                Some(input) => {
                    crate::span::spawn_thread("vm-exec-input", move || {
                        forward_input(input, &control, on_pty, &hung_up)
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
        Self::check_exports(&params.exports)?;
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
            network: params.network,
            egress: params.egress.clone(),
            vcpus: params.vcpus,
            memory_mib: params.memory_mib,
            disk_bytes: params.disk_bytes,
            ports: params.ports.clone(),
            cold: params.cold,
            ..Default::default()
        };
        let vm = tokio::task::block_in_place(|| self.create(create))?;
        let result = tokio::task::block_in_place(|| -> Result<ExecResult, ServiceError> {
            let client = self.agent(&self.show(&vm.name)?)?;
            let mut cwd = "/root".to_owned();
            if let Some(name) = &params.workspace {
                cwd = format!("/root/{name}");
                // Kept as it passes, for `vm.diff` (and `patch`) to compare with.
                let mut keep = copy::BaselineKeeper::new(Path::new(&vm.dir), name)?;
                let bytes =
                    super::upload::receive_into_keeping(ctx, &client, Path::new(&cwd), &mut keep)
                        .with_context(|| format!("copy the workspace into VM {:?}", vm.name))?;
                keep.finish()?;
                tracing::info!(vm = %vm.name, bytes, dest = %cwd, "workspace received");
            }
            let ran = if params.argv.is_empty() {
                let stdio = Stdio {
                    stdin: true,
                    tty: params.tty.clone(),
                };
                let argv = LOGIN_SHELL.map(String::from);
                self.exec_on(ctx, &client, &vm.name, &argv, &cwd, stdio)
            } else {
                let stdio = Stdio {
                    stdin: params.stdin,
                    tty: params.tty.clone(),
                };
                self.exec_on(ctx, &client, &vm.name, &params.argv, &cwd, stdio)
            };
            // Results go out before the VM stops, whether the command failed or not.
            self.send_exports(ctx, &client, &params.exports);
            if params.patch {
                self.send_run_patch(ctx, &client, Path::new(&vm.dir));
            }
            ran
        });
        let cleanup = tokio::task::block_in_place(|| {
            if params.rm {
                // The disk goes with the VM: no clean shutdown to wait for.
                self.kill(&vm.name)?;
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
        use std::os::unix::fs::MetadataExt;
        let vm = self.show(&params.name)?;
        let path = Path::new(&vm.dir).join(banger_vmm::console::CONSOLE_LOG);
        let previous = Path::new(&vm.dir).join(banger_vmm::console::CONSOLE_LOG_PREVIOUS);
        let mut out = OutputWriter {
            ctx,
            stream: OutputStream::Stdout,
        };
        let mut sent = 0u64;
        // The console rotates (see banger_vmm::console): the previous file first. A
        // rotation between this read and the open below loses that one file's worth.
        if let Ok(mut file) = std::fs::File::open(&previous) {
            sent += std::io::copy(&mut file, &mut out)
                .with_context(|| format!("read {}", previous.display()))?;
        }
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
        let mut send_new = |log: &mut Option<std::fs::File>| -> anyhow::Result<()> {
            if log.is_none() {
                *log = std::fs::File::open(&path).ok();
            }
            if let Some(file) = log {
                sent += std::io::copy(file, &mut out)
                    .with_context(|| format!("read {}", path.display()))?;
                // Rotated: what was read is now the previous file, complete; go on with
                // the new one from its start.
                let rotated = match (std::fs::metadata(&path), file.metadata()) {
                    (Ok(now), Ok(open)) => now.ino() != open.ino(),
                    _ => false,
                };
                if rotated {
                    sent += std::io::copy(file, &mut out)
                        .with_context(|| format!("read {}", path.display()))?;
                    *log = std::fs::File::open(&path).ok();
                    if let Some(file) = log {
                        sent += std::io::copy(file, &mut out)
                            .with_context(|| format!("read {}", path.display()))?;
                    }
                }
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
/// it. When the caller hangs up (its connection closed) the command is hung up on, on a
/// pty or not: SIGHUP to its process group, SIGKILL after
/// [`banger_vmm::agent::HANGUP_GRACE`] (nobody is left to see its output or stop it). A
/// caller that only shut down its sending half still reads: a command on a pipe then sees
/// its stdin end, one on a pty gets SIGHUP (its terminal went away), as before.
fn forward_input(
    mut input: InputReceiver,
    control: &ExecControl,
    on_pty: bool,
    hung_up: &std::sync::atomic::AtomicBool,
) {
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
    if control.finished() {
        return;
    }
    if hung_up.load(std::sync::atomic::Ordering::SeqCst) {
        control.hang_up();
    } else if on_pty {
        let _ = control.signal(rustix::process::Signal::Hup as i32);
    } else {
        let _ = control.close_stdin();
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

// One way to run a host tool and one way to grow a raw disk, shared with the disk service.
pub(super) use crate::services::disk::{grow_disk, run_tool};
