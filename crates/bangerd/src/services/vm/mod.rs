//! Virtual machines: each has a directory `<state>/vms/<id>/` holding its own copy of the
//! image's root filesystem (reflinked or sparse), the console log and the sockets of its
//! VMM and guest agent. The VMM runs detached, so a restarted daemon re-adopts running VMs.
//!
//! Each VM row records the backend of its last boot (`qemu-kvm`, `qemu-tcg`,
//! `firecracker`), which says how its agent is reached after a daemon restart, and its
//! network (`user`, `none`, or `tap` with its address and TAP device; see
//! [`super::network`]) and its egress policy.
//!
//! This file holds the service, its row type and the helpers its verbs share; each verb
//! lives in its own file (`create.rs`, `start.rs`, `stop.rs`, `exec.rs`, `run.rs`,
//! `logs.rs`, `lifecycle.rs`, `copy.rs`, `fork.rs`, …) as an `impl VmService` block.

mod copy;
mod create;
mod diff;
mod exec;
mod health;
mod lifecycle;
mod logs;
mod ports;
mod run;
mod ssh;
mod start;
mod stop;
mod tap_ports;

pub use health::{GUEST_CPU_SAMPLE, GUEST_STATS_TIMEOUT, HEALTH_TIMEOUT};
pub use lifecycle::{MAX_VCPUS, MIN_MEMORY_MIB};

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use banger_api::{OutputStream, VmBackend, VmInfo, VmState, OUTPUT_NOTIFICATION};
use banger_vmm::agent::AgentClient;
use banger_vmm::backend::BackendKind;
use base64::Engine as _;
use rusqlite::OptionalExtension;

use crate::config::Config;
use crate::layout::Layout;
use crate::services::disk;
use crate::services::network::{self, NetworkMode, Subnet};
use crate::services::privhelper::TapRoute;
use crate::services::process::ProcessIdentity;
use crate::services::{CallContext, ImageService, KernelService};
use crate::store::Store;
use crate::{ServiceError, ServiceResult};

mod fork;
pub(crate) use fork::tree_bytes;
mod identity;
mod snapshot;
mod template;

/// The VM's root disk in its directory.
const ROOT_DISK: &str = "root.ext4";

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
    /// The relays of TAP VMs' published ports.
    tap_ports: tap_ports::TapPorts,
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
fn check_egress(mode: NetworkMode, egress: &banger_api::Egress) -> ServiceResult<()> {
    if mode == NetworkMode::User && matches!(egress, banger_api::Egress::Only(_)) {
        return Err(ServiceError::bad_request(format!(
            "egress {egress}: a CIDR allow list needs network \"tap\"; network \"user\" enforces only \"allow\" or \"deny\""
        )));
    }
    Ok(())
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
pub fn validate_name(what: &str, name: &str) -> ServiceResult<()> {
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
pub(crate) fn parse_column<T: std::str::FromStr>(
    row: &rusqlite::Row<'_>,
    index: usize,
) -> rusqlite::Result<T>
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
            tap_ports: tap_ports::TapPorts::default(),
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
            if running && vm.tap.is_some() && !vm.ports.is_empty() {
                // The relays of a re-adopted TAP VM's published ports died with the old
                // daemon: listen again.
                if let Some(ip) = vm.guest_ip.as_deref().and_then(|ip| ip.parse().ok()) {
                    if let Err(e) = self.tap_ports.publish(&vm.id, ip, &vm.ports) {
                        tracing::warn!(vm = %vm.name, error = %format!("{e:#}"), "cannot publish the ports of a re-adopted VM");
                    }
                }
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
    pub fn list(&self) -> ServiceResult<Vec<VmInfo>> {
        let conn = self.store.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {} FROM vms ORDER BY name", Self::COLUMNS))
            .context("list VMs")?;
        let rows = stmt.query_map([], |r| self.row(r)).context("list VMs")?;
        Ok(rows.collect::<Result<_, _>>().context("list VMs")?)
    }

    /// The VM called `name`.
    pub fn show(&self, name: &str) -> ServiceResult<VmInfo> {
        self.store
            .optional_row(
                "look up VM",
                &format!("SELECT {} FROM vms WHERE name = ?1", Self::COLUMNS),
                [name],
                |r| self.row(r),
            )?
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

    /// Records that the VMM `pid` (identified by `identity`, taken right after the spawn)
    /// runs `vm` on `backend`.
    fn record_running(
        &self,
        vm: &VmInfo,
        pid: u32,
        backend: VmBackend,
        identity: Option<&crate::services::process::ProcessIdentity>,
    ) -> anyhow::Result<()> {
        self.store
            .conn()
            .execute(
                "UPDATE vms SET state = 'running', pid = ?1, backend = ?2, pid_identity = ?3 WHERE id = ?4",
                rusqlite::params![pid, backend.as_str(), identity.map(|i| i.start.clone()), vm.id],
            )
            .context("record VM state")?;
        Ok(())
    }

    /// Where the static guest agent is, or why there is none a VM could run (missing, or
    /// not a static x86-64 executable).
    pub fn agent_path(&self) -> ServiceResult<PathBuf> {
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

    /// The subnet of TAP networking (`bridge_address`).
    fn subnet(&self) -> ServiceResult<Subnet> {
        self.config
            .bridge_address
            .as_deref()
            .unwrap_or(network::DEFAULT_BRIDGE_ADDRESS)
            .parse()
            .map_err(|e: anyhow::Error| ServiceError::bad_request(format!("config.toml: {e:#}")))
    }

    /// The shared connection to the agent of `vm` (see [`AgentPool`]).
    fn agent(&self, vm: &VmInfo) -> ServiceResult<Arc<AgentClient>> {
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

// One way to grow a raw disk, shared with the disk service.
pub(super) use crate::services::disk::grow_disk;
