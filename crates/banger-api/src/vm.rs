//! Kernels and VMs: methods, params and results.

use serde::{Deserialize, Serialize};

use crate::NoParams;

method! {
    /// `kernel.import`: take a guest kernel (and its modules) out of a Debian `linux-image-*`
    /// package, or from a kernel image and an optional modules tree, and build banger's
    /// initramfs for it (unless the caller brings its own).
    KernelImport = "kernel.import", KernelImportParams => KernelInfo
}

/// Params of `kernel.import`. Exactly one of `deb`, `deb_stream` and `kernel`; all paths
/// absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelImportParams {
    /// Name to import under.
    pub name: String,
    /// A Debian `linux-image-*.deb`: kernel, config and modules in one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deb: Option<String>,
    /// A Debian `linux-image-*.deb` the caller streams over its connection as this call's
    /// `upload` notifications, in place of `deb` (a daemon on another host cannot open
    /// the caller's path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deb_stream: Option<crate::StreamedFile>,
    /// A kernel image: an x86 bzImage (`vmlinuz`) or an x86-64 ELF `vmlinux`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// With `kernel`: its modules tree (`/lib/modules/<release>`, the directory holding
    /// `kernel/`). Without it the kernel must have virtio, ext4 and vsock built in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules: Option<String>,
    /// An initramfs to boot instead of banger's. It must mount the root disk and run
    /// `/.banger/agent` as PID 1, as banger's does, or no VM of this kernel starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
}

/// An imported kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// Unique name.
    pub name: String,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`; `unknown` when the image does not
    /// say.
    pub version: String,
    /// RFC 3339 UTC time of the import.
    pub created_at: String,
    /// Where its files are.
    pub dir: String,
    /// Which initramfs its VMs boot with.
    pub initrd: KernelInitrd,
}

wire_enum! {
    /// Which initramfs a kernel's VMs boot with.
    "kernel initramfs", KernelInitrd {
        /// Built by banger at import (its agent, the kernel's modules).
        Banger = "banger",
        /// The one given at import (`kernel.import` `initrd`), used as it is.
        Custom = "custom",
    }
}

method! {
    /// `kernel.list`: every kernel, newest first.
    KernelList = "kernel.list", NoParams => KernelListResult
}

/// Result of `kernel.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelListResult {
    /// Kernels, newest first.
    pub kernels: Vec<KernelInfo>,
}

/// Params naming one thing (kernel or VM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    /// Its name.
    pub name: String,
}

method! {
    /// `kernel.show`: one kernel.
    KernelShow = "kernel.show", NameParams => KernelInfo
}

method! {
    /// `kernel.rm`: delete a kernel no VM uses.
    KernelRm = "kernel.rm", NameParams => KernelInfo
}

method! {
    /// `vm.create`: a VM with its own copy-on-write root disk, started unless asked not to.
    VmCreate = "vm.create", VmCreateParams => VmInfo
}

params_struct! {
    /// Params of `vm.create`.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct VmCreateParams {
        /// `[a-z0-9][a-z0-9-]{0,63}`; generated when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        /// Image name; default: config `default_image`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub image: Option<String>,
        /// Kernel name; default: config `default_kernel`, else the newest import.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub kernel: Option<String>,
        ..vm_sizing,
        /// Create without starting.
        #[serde(default)]
        pub no_start: bool,
        ..vm_network,
        /// Boot cold even where a warm template exists.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub cold: bool,
        /// Fork this snapshot (`vm.snapshot`): its image, kernel, vCPUs, memory, disk and
        /// network, restored on a copy-on-write overlay of its own; `image`, `kernel`,
        /// `vcpus`, `memory_mib`, `disk_bytes` and `network` must then be absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub from: Option<String>,
    }
}

wire_enum! {
    /// Whether a VM's VMM runs, the way youki's `ContainerStatus` answers what a container
    /// may do next.
    "VM state", VmState {
        /// Its VMM runs (and its agent answered at boot).
        Running = "running",
        /// No VMM: created, stopped, killed or found dead.
        Stopped = "stopped",
        /// Its VMM runs but the guest's vCPUs (and so its clock) are stopped (`vm.pause`).
        Paused = "paused",
    }
}

impl VmState {
    /// Whether its VMM runs (the guest may be paused).
    pub fn is_running(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
    /// Whether its guest runs, so its agent answers.
    pub fn guest_runs(self) -> bool {
        self == VmState::Running
    }
    /// Whether its vCPUs are stopped by `vm.pause`.
    pub fn is_paused(self) -> bool {
        self == VmState::Paused
    }
    /// Whether `vm.pause` (and `vm.snapshot`) may stop its vCPUs.
    pub fn can_pause(self) -> bool {
        self == VmState::Running
    }
    /// Whether `vm.resume` has anything to resume.
    pub fn can_resume(self) -> bool {
        self == VmState::Paused
    }
    /// Whether `vm.start` may boot it.
    pub fn can_start(self) -> bool {
        self == VmState::Stopped
    }
    /// Whether `vm.stop`/`vm.kill` have anything to stop.
    pub fn can_stop(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

wire_enum! {
    /// The VMM a VM booted with last.
    "backend", VmBackend {
        /// QEMU microvm under software emulation.
        QemuTcg = "qemu-tcg",
        /// QEMU microvm on KVM.
        QemuKvm = "qemu-kvm",
        /// Firecracker (always KVM).
        Firecracker = "firecracker",
    }
}

wire_enum! {
    /// Which stream of a command an `output` notification carries.
    "output stream", OutputStream {
        /// Standard output (also a pty's output).
        Stdout = "stdout",
        /// Standard error.
        Stderr = "stderr",
    }
}

wire_enum! {
    /// The verdict of one doctor check.
    "check status", CheckStatus {
        /// Present and working.
        Ok = "ok",
        /// Needed and absent: something will fail.
        Missing = "missing",
        /// Absent but not needed by this configuration.
        Optional = "optional",
    }
}

/// A VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Stable id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Image it was created from.
    pub image: String,
    /// Kernel it boots.
    pub kernel: String,
    /// CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Root disk size in bytes.
    pub disk_bytes: u64,
    /// Whether its VMM runs.
    pub state: VmState,
    /// The VMM's pid while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The VMM of its last boot; `null` until it first boots.
    #[serde(default)]
    pub backend: Option<VmBackend>,
    /// `user` (QEMU user-mode, outbound only), `tap` (filtered bridge + TAP + NAT) or `none`.
    #[serde(default)]
    pub network: VmNetwork,
    /// What the guest may reach beyond the host (see [`Egress`]).
    #[serde(default)]
    pub egress: Egress,
    /// The guest's address on the bridge (TAP networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    /// The host's TAP device of this VM (TAP networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Ports it publishes on the host.
    #[serde(default)]
    pub ports: Vec<crate::PublishedPort>,
    /// RFC 3339 UTC creation time.
    pub created_at: String,
    /// Its directory (disk, console log, sockets).
    pub dir: String,
}

method! {
    /// `vm.list`: every VM by name, or those matching the filters.
    VmList = "vm.list", VmListParams => VmListResult
}

/// Params of `vm.list`: filters, all optional (none: every VM).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmListParams {
    /// Only VMs in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// Only VMs created from the image of this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// Result of `vm.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmListResult {
    /// VMs sorted by name.
    pub vms: Vec<VmInfo>,
}

method! {
    for NameParams => VmInfo {
        /// `vm.show`: one VM.
        VmShow = "vm.show",
        /// `vm.start`: boot a stopped VM and wait for its agent.
        VmStart = "vm.start",
        /// `vm.stop`: shut a VM down cleanly (its disk keeps what was written), killing it
        /// if it does not stop in time.
        VmStop = "vm.stop",
        /// `vm.kill`: kill a VM's VMM at once, without a clean shutdown.
        VmKill = "vm.kill",
        /// `vm.pause`: stop a running VM's vCPUs; its memory, devices and clock stay as
        /// they are until `vm.resume`.
        VmPause = "vm.pause",
        /// `vm.resume`: run a paused VM's vCPUs again.
        VmResume = "vm.resume",
    }
}

method! {
    /// `vm.snapshot`: save a running (or paused) VM's whole state and disk as a named
    /// snapshot that `vm.create` with `from` forks; the VM runs on (a paused one stays
    /// paused).
    VmSnapshot = "vm.snapshot", VmSnapshotParams => SnapshotInfo
}

/// Params of `vm.snapshot`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotParams {
    /// The VM.
    pub name: String,
    /// The snapshot's name; `<vm>-<6 hex>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// A saved VM state: a named snapshot, or a warm template (`template: true`, named
/// `template-<key>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// Whether it is a warm template (made by bangerd, removed by `snapshot.prune`).
    #[serde(default)]
    pub template: bool,
    /// The VM it was taken of (empty for templates).
    #[serde(default)]
    pub vm: String,
    /// Image name (snapshots) or id (templates).
    pub image: String,
    /// Kernel name.
    pub kernel: String,
    /// Guest CPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Root disk size.
    pub disk_bytes: u64,
    /// Bytes its files take on the host.
    pub bytes: u64,
    /// Its directory.
    pub dir: String,
}

method! {
    /// `snapshot.list`: named snapshots and warm templates.
    SnapshotList = "snapshot.list", NoParams => SnapshotListResult
}

/// Result of `snapshot.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotListResult {
    /// By name.
    pub snapshots: Vec<SnapshotInfo>,
}

method! {
    /// `snapshot.rm`: delete a named snapshot no VM is forked from.
    SnapshotRm = "snapshot.rm", NameParams => SnapshotInfo
}

method! {
    /// `snapshot.prune`: delete every warm template no VM or snapshot layers on (they are
    /// caches: the next first boot saves a new one). Named snapshots stay.
    SnapshotPrune = "snapshot.prune", NoParams => SnapshotPruneResult
}

/// Result of `snapshot.prune`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPruneResult {
    /// Names of the removed templates.
    pub removed: Vec<String>,
    /// Bytes freed.
    pub bytes_freed: u64,
}

method! {
    /// `vm.rm`: stop (if needed) and delete a VM and all its files.
    VmRm = "vm.rm", NameParams => VmInfo
}

method! {
    /// `vm.exec`: run a command in a running VM. Its output arrives as `output` notifications
    /// (`{"stream":"stdout"|"stderr","data":"<base64>"}`) before the result; with `stdin` or
    /// `tty` the caller sends its input as `input` (and `resize`) notifications while the call
    /// runs (see [`crate::InputParams`]).
    VmExec = "vm.exec", VmExecParams => ExecResult
}

params_struct! {
    /// Params of `vm.exec`.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct VmExecParams {
        /// The VM.
        pub name: String,
        /// Program and arguments.
        pub argv: Vec<String>,
        /// Working directory in the guest (default `/root`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub cwd: Option<String>,
        ..exec_input,
    }
}

/// The caller's terminal, for a command run on a pty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtyParams {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
    /// `TERM` in the guest; default `xterm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
}

method! {
    /// `vm.logs`: the VM's console log, sent as `output` notifications on `stdout`; with
    /// `follow`, then what the console writes until the VM stops (or the caller hangs up).
    VmLogs = "vm.logs", VmLogsParams => VmLogsResult
}

/// Params of `vm.logs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmLogsParams {
    /// The VM.
    pub name: String,
    /// Keep sending what the console writes until the VM stops.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
}

/// Result of `vm.logs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmLogsResult {
    /// The VM.
    pub vm: String,
    /// Bytes of log sent.
    pub bytes: u64,
}

method! {
    /// `vm.shell`: an interactive login shell (`/bin/bash`, else `/bin/sh`) in `/root` of a
    /// running VM, on a pty when `tty` is given. Its input and output travel as in `vm.exec`
    /// with `stdin`.
    VmShell = "vm.shell", VmShellParams => ExecResult
}

/// Params of `vm.shell`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmShellParams {
    /// The VM.
    pub name: String,
    /// Run the shell on a pty of this terminal; without it the shell reads its commands
    /// from the forwarded stdin (a script).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtyParams>,
}

/// How a command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The VM it ran in.
    pub vm: String,
    /// Exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal number, when it was killed by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

method! {
    /// `vm.run`: create and start a VM, copy a workspace in, run a command (or, without one, the
    /// login shell of `vm.shell`), stop the VM (and remove it with `rm`). Input and output
    /// travel as in `vm.exec`.
    VmRun = "vm.run", VmRunParams => ExecResult
}

params_struct! {
    /// Params of `vm.run`.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct VmRunParams {
        /// Image name or reference (pulled when no image has that name); default: config
        /// `default_image`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub image: Option<String>,
        /// VM name; generated when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        /// Refused with `bad_request` when set: it named a workspace directory on the
        /// daemon's host, which the daemon no longer opens for a client (use `workspace`).
        /// Kept so that an old client gets that error rather than "unknown field".
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub path: Option<String>,
        /// A workspace the client streams: once the request is sent, its tar archive follows
        /// as `upload` notifications (then one with `eof`), unpacked into `/root/<workspace>`
        /// (a single plain name, no `/`). The daemon reads no client path for it, so this
        /// works against a system or a remote daemon alike.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub workspace: Option<String>,
        /// Program and arguments; empty or absent: an interactive login shell, which always
        /// gets the forwarded stdin.
        #[serde(default)]
        pub argv: Vec<String>,
        /// Delete the VM afterwards.
        #[serde(default)]
        pub rm: bool,
        ..vm_network,
        ..vm_sizing,
        ..exec_input,
        /// Absolute guest paths sent back as `download` notifications (stream `export`,
        /// `index` into this list) after the command ends, failed or not, before the VM stops.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub exports: Vec<String>,
        /// Send the workspace's changes as a patch (stream `patch`) after the command ends.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub patch: bool,
        /// Boot cold even where a warm template exists.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub cold: bool,
    }
}

/// The payload of an `output` notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// Which stream.
    pub stream: OutputStream,
    /// The bytes, base64 (standard alphabet, padded).
    pub data: String,
}

method! {
    /// `daemon.doctor`: what this host has and lacks for banger, and how to get it.
    DaemonDoctor = "daemon.doctor", NoParams => DoctorResult
}

/// Result of `daemon.doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorResult {
    /// One entry per requirement.
    pub checks: Vec<DoctorCheck>,
}

/// One requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorCheck {
    /// What is checked, e.g. `qemu-system-x86_64`.
    pub name: String,
    /// The verdict.
    pub status: CheckStatus,
    /// What was found (a version, a path, why not).
    pub detail: String,
    /// How to fix it, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

method! {
    /// `vm.restart`: stop the VM (cleanly, as `vm.stop`) and boot it again.
    VmRestart = "vm.restart", NameParams => VmInfo
}

method! {
    /// `vm.prune`: remove stopped VMs (with `all`, every VM, stopping running ones first).
    VmPrune = "vm.prune", VmPruneParams => VmPruneResult
}

/// Params of `vm.prune`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPruneParams {
    /// Running VMs too (stopped first).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Report what would be removed, remove nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// Result of `vm.prune`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPruneResult {
    /// Nothing was removed.
    pub dry_run: bool,
    /// The VMs removed (or that would be), by name.
    pub removed: Vec<String>,
    /// Disk space their directories held (allocated bytes).
    pub bytes_freed: u64,
    /// Where VM directories live.
    pub vms_dir: String,
}

method! {
    /// `vm.set`: change a stopped VM's CPUs, memory or disk size (the disk only grows);
    /// the next boot uses them.
    VmSet = "vm.set", VmSetParams => VmInfo
}

params_struct! {
    /// Params of `vm.set`: what to change; absent fields stay as they are.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct VmSetParams {
        /// The VM.
        pub name: String,
        ..vm_sizing,
    }
}

method! {
    /// `vm.stats`: what a running VM uses, seen from the host (the VMM process, the disk)
    /// and from the guest (CPU, memory and `/`, through its agent).
    VmStats = "vm.stats", NameParams => VmStatsResult
}

/// Result of `vm.stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatsResult {
    /// The VM.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// The VMM's resident memory (VmRSS), bytes; absent when stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_rss_bytes: Option<u64>,
    /// CPU time the VMM has used (user + system), seconds; absent when stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_cpu_seconds: Option<f64>,
    /// Memory given to the guest, bytes.
    pub memory_bytes: u64,
    /// CPUs given to the guest.
    pub vcpus: u32,
    /// The root disk's size as the guest sees it, bytes.
    pub disk_bytes: u64,
    /// Host bytes the root disk occupies (allocated blocks).
    pub disk_allocated_bytes: u64,
    /// The guest's own view, from its agent; absent when stopped or when the agent could
    /// not be asked (then `guest_error` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestUsage>,
    /// Why `guest` is absent although the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_error: Option<String>,
}

/// What a running guest reports it uses (its kernel's counters, read by its agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestUsage {
    /// Busy share of all guest CPUs together over the sampling window (0 to 100), from
    /// the difference of two `/proc/stat` samples.
    pub cpu_percent: f64,
    /// How long the CPU sample spanned, milliseconds (guest ticks).
    pub cpu_sample_ms: u64,
    /// CPUs online in the guest.
    pub cpus: u64,
    /// `MemTotal`, bytes.
    pub memory_total_bytes: u64,
    /// `MemAvailable`, bytes.
    pub memory_available_bytes: u64,
    /// `MemTotal - MemAvailable`, bytes.
    pub memory_used_bytes: u64,
    /// Size of the guest's `/` filesystem, bytes.
    pub disk_total_bytes: u64,
    /// Bytes in use on `/` (size minus free).
    pub disk_used_bytes: u64,
    /// Bytes still writable on `/` by an unprivileged user.
    pub disk_available_bytes: u64,
}

/// How a VM is networked, as `vm.create` and `vm.run` ask for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkChoice {
    /// `tap` when bangerd is root with /dev/net/tun, `user` otherwise.
    Auto,
    /// QEMU user-mode networking: outbound only (when bangerd is root).
    User,
    /// A TAP device on banger's bridge, filtered and NATed.
    Tap,
    /// No network device at all: the guest has only `lo`.
    None,
}

/// How a VM is networked (resolved: never `auto`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmNetwork {
    /// QEMU user-mode networking: outbound only (when bangerd is root).
    #[default]
    User,
    /// A TAP device on banger's bridge.
    Tap,
    /// No network device.
    None,
}

impl VmNetwork {
    /// The name on the wire and in the store.
    pub fn name(self) -> &'static str {
        match self {
            VmNetwork::User => "user",
            VmNetwork::Tap => "tap",
            VmNetwork::None => "none",
        }
    }

    /// The mode a stored name means.
    pub fn from_name(name: &str) -> Option<VmNetwork> {
        match name {
            "user" => Some(VmNetwork::User),
            "tap" => Some(VmNetwork::Tap),
            "none" => Some(VmNetwork::None),
            _ => None,
        }
    }
}

impl std::fmt::Display for VmNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The most CIDRs one `egress` allow list may hold.
pub const MAX_EGRESS_CIDRS: usize = 256;

/// What a guest may reach beyond the host: `"allow"` (everything the mode lets out),
/// `"deny"` (nothing) or a list of IPv4 CIDRs (only those). On the wire and in
/// config.toml: the word, or the list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "EgressRepr", into = "EgressRepr")]
pub enum Egress {
    /// Every destination the network mode lets out.
    #[default]
    Allow,
    /// No destination.
    Deny,
    /// Only these IPv4 networks (`a.b.c.d/n`, host bits zero).
    Only(Vec<Cidr>),
}

/// An IPv4 network: address with its host bits zero, and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub addr: std::net::Ipv4Addr,
    /// The prefix length, 0..=32.
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    /// `a.b.c.d/n`, or a bare address (a /32).
    fn from_str(s: &str) -> Result<Cidr, String> {
        let with_prefix = if s.contains('/') {
            s.to_owned()
        } else {
            format!("{s}/32")
        };
        let net: ipnet::Ipv4Net = with_prefix.parse().map_err(|_| {
            format!(
                "egress {s:?}: not an IPv4 address or CIDR (a.b.c.d/n; the prefix must be 0..=32)"
            )
        })?;
        let (addr, prefix) = (net.addr(), net.prefix_len());
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        if u32::from(addr) & !mask != 0 {
            return Err(format!(
                "egress {s:?}: host bits are set (the network is {}/{prefix})",
                std::net::Ipv4Addr::from(u32::from(addr) & mask)
            ));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl Egress {
    /// Parses the `--egress` flag: `allow`, `deny`, or CIDRs separated by commas.
    pub fn parse_flag(s: &str) -> Result<Egress, String> {
        let repr = match s {
            "allow" | "deny" => EgressRepr::Word(s.to_owned()),
            _ => EgressRepr::List(s.split(',').map(|c| c.trim().to_owned()).collect()),
        };
        Egress::try_from(repr)
    }
}

impl std::fmt::Display for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Egress::Allow => f.write_str("allow"),
            Egress::Deny => f.write_str("deny"),
            Egress::Only(cidrs) => {
                let list: Vec<String> = cidrs.iter().map(Cidr::to_string).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

/// How [`Egress`] is written: a word or a list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EgressRepr {
    /// `allow` or `deny`.
    Word(String),
    /// CIDRs.
    List(Vec<String>),
}

impl TryFrom<EgressRepr> for Egress {
    type Error = String;
    fn try_from(repr: EgressRepr) -> Result<Egress, String> {
        match repr {
            EgressRepr::Word(w) if w == "allow" => Ok(Egress::Allow),
            EgressRepr::Word(w) if w == "deny" => Ok(Egress::Deny),
            EgressRepr::Word(w) => Err(format!(
                "egress {w:?}: expected \"allow\", \"deny\" or a list of IPv4 CIDRs"
            )),
            EgressRepr::List(list) if list.len() > MAX_EGRESS_CIDRS => Err(format!(
                "egress: {} CIDRs is more than the limit of {MAX_EGRESS_CIDRS} (MAX_EGRESS_CIDRS)",
                list.len()
            )),
            // An empty allow list is "deny"; saying it so keeps one spelling per policy.
            EgressRepr::List(list) if list.is_empty() => Ok(Egress::Deny),
            EgressRepr::List(list) => Ok(Egress::Only(
                list.iter().map(|c| c.parse()).collect::<Result<_, _>>()?,
            )),
        }
    }
}

impl From<Egress> for EgressRepr {
    fn from(e: Egress) -> EgressRepr {
        match e {
            Egress::Allow => EgressRepr::Word("allow".into()),
            Egress::Deny => EgressRepr::Word("deny".into()),
            Egress::Only(cidrs) => EgressRepr::List(cidrs.iter().map(Cidr::to_string).collect()),
        }
    }
}

#[cfg(test)]
mod egress_tests {
    use super::*;

    #[test]
    fn egress_reads_words_and_cidr_lists_and_names_what_is_wrong() {
        let e: Egress = serde_json::from_str("\"deny\"").unwrap();
        assert_eq!(e, Egress::Deny);
        let e: Egress = serde_json::from_str("[\"10.0.0.0/8\", \"192.0.2.7\"]").unwrap();
        assert_eq!(e.to_string(), "10.0.0.0/8,192.0.2.7/32");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!(["10.0.0.0/8", "192.0.2.7/32"])
        );
        assert_eq!(Egress::parse_flag("allow").unwrap(), Egress::Allow);
        assert_eq!(
            Egress::parse_flag("10.0.0.0/8, 10.1.0.0/16")
                .unwrap()
                .to_string(),
            "10.0.0.0/8,10.1.0.0/16"
        );
        for (bad, says) in [
            ("\"open\"", "expected \"allow\", \"deny\""),
            (
                "[\"10.0.0.1/8\"]",
                "host bits are set (the network is 10.0.0.0/8)",
            ),
            ("[\"10.0.0.0/33\"]", "the prefix must be 0..=32"),
            ("[\"fd00::/8\"]", "not an IPv4 address"),
        ] {
            let err = serde_json::from_str::<Egress>(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let many: Vec<String> = (0..=MAX_EGRESS_CIDRS)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let err = serde_json::from_value::<Egress>(serde_json::json!(many))
            .unwrap_err()
            .to_string();
        assert!(err.contains("limit of 256 (MAX_EGRESS_CIDRS)"), "{err}");
    }

    #[test]
    fn network_choices_are_a_closed_set_on_the_wire() {
        let n: NetworkChoice = serde_json::from_str("\"none\"").unwrap();
        assert_eq!(n, NetworkChoice::None);
        assert!(serde_json::from_str::<NetworkChoice>("\"bridge\"").is_err());
        assert_eq!(serde_json::to_value(VmNetwork::Tap).unwrap(), "tap");
    }

    #[test]
    fn a_kernels_initramfs_is_a_closed_set_on_the_wire_and_in_the_store() {
        assert_eq!(
            serde_json::to_value(KernelInitrd::Custom).unwrap(),
            "custom"
        );
        let k: KernelInitrd = serde_json::from_str("\"banger\"").unwrap();
        assert_eq!(k, KernelInitrd::Banger);
        assert!(serde_json::from_str::<KernelInitrd>("\"mine\"").is_err());
        let err = "mine".parse::<KernelInitrd>().unwrap_err().to_string();
        assert!(
            err.contains("kernel initramfs") && err.contains("\"mine\""),
            "{err}"
        );
    }
}

#[cfg(test)]
mod params_wire_tests {
    use super::*;

    fn full_create() -> VmCreateParams {
        VmCreateParams {
            name: Some("n".into()),
            image: Some("i".into()),
            kernel: Some("k".into()),
            vcpus: Some(3),
            memory_mib: Some(512),
            disk_bytes: Some(1 << 30),
            no_start: true,
            network: Some(NetworkChoice::Tap),
            egress: Some(Egress::Deny),
            ports: vec![crate::PublishedPort::parse_flag("8080:80").unwrap()],
            cold: true,
            from: Some("s".into()),
        }
    }

    fn full_run() -> VmRunParams {
        VmRunParams {
            image: Some("i".into()),
            name: Some("n".into()),
            path: Some("/w".into()),
            workspace: Some("w".into()),
            argv: vec!["true".into()],
            rm: true,
            network: Some(NetworkChoice::None),
            egress: Some(Egress::Allow),
            ports: vec![crate::PublishedPort::parse_flag("8080:80").unwrap()],
            vcpus: Some(4),
            memory_mib: Some(2048),
            disk_bytes: Some(2 << 30),
            stdin: true,
            tty: Some(TtyParams {
                rows: 24,
                cols: 80,
                term: Some("vt100".into()),
            }),
            exports: vec!["/out".into()],
            patch: true,
            cold: true,
        }
    }

    fn full_set() -> VmSetParams {
        VmSetParams {
            name: "n".into(),
            vcpus: Some(1),
            memory_mib: Some(256),
            disk_bytes: Some(3 << 30),
        }
    }

    /// The exact wire JSON, full and empty, so the field groups `params_struct!` writes
    /// stay in the order and with the skip rules the structs had when written out.
    #[test]
    fn vm_params_keep_their_wire_json_byte_for_byte() {
        let port = r#"[{"host_ip":"127.0.0.1","host_port":8080,"guest_port":80,"protocol":"tcp"}]"#;
        let cases: [(String, String); 6] = [
            (
                serde_json::to_string(&full_create()).unwrap(),
                format!(
                    r#"{{"name":"n","image":"i","kernel":"k","vcpus":3,"memory_mib":512,"disk_bytes":1073741824,"no_start":true,"network":"tap","egress":"deny","ports":{port},"cold":true,"from":"s"}}"#
                ),
            ),
            (
                serde_json::to_string(&VmCreateParams::default()).unwrap(),
                r#"{"no_start":false}"#.into(),
            ),
            (
                serde_json::to_string(&full_run()).unwrap(),
                format!(
                    r#"{{"image":"i","name":"n","path":"/w","workspace":"w","argv":["true"],"rm":true,"network":"none","egress":"allow","ports":{port},"vcpus":4,"memory_mib":2048,"disk_bytes":2147483648,"stdin":true,"tty":{{"rows":24,"cols":80,"term":"vt100"}},"exports":["/out"],"patch":true,"cold":true}}"#
                ),
            ),
            (
                serde_json::to_string(&VmRunParams::default()).unwrap(),
                r#"{"argv":[],"rm":false}"#.into(),
            ),
            (
                serde_json::to_string(&full_set()).unwrap(),
                r#"{"name":"n","vcpus":1,"memory_mib":256,"disk_bytes":3221225472}"#.into(),
            ),
            (
                serde_json::to_string(&VmSetParams::default()).unwrap(),
                r#"{"name":""}"#.into(),
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn vm_params_read_back_what_they_write() {
        let create = full_create();
        let json = serde_json::to_string(&create).unwrap();
        assert_eq!(
            serde_json::from_str::<VmCreateParams>(&json).unwrap(),
            create
        );
        let run = full_run();
        let json = serde_json::to_string(&run).unwrap();
        assert_eq!(serde_json::from_str::<VmRunParams>(&json).unwrap(), run);
        let set = full_set();
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(serde_json::from_str::<VmSetParams>(&json).unwrap(), set);
        assert_eq!(
            serde_json::from_str::<VmCreateParams>("{}").unwrap(),
            VmCreateParams::default()
        );
        assert_eq!(
            serde_json::from_str::<VmRunParams>("{}").unwrap(),
            VmRunParams::default()
        );
    }

    #[test]
    fn vm_params_still_refuse_unknown_fields() {
        for (json, field) in [
            (r#"{"vcpu":2}"#, "vcpu"),
            (r#"{"kernel":"k","imgae":"i"}"#, "imgae"),
        ] {
            let err = serde_json::from_str::<VmCreateParams>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("unknown field `{field}`")), "{err}");
        }
        // vm.run takes no kernel: the shared groups must not bring one in.
        let err = serde_json::from_str::<VmRunParams>(r#"{"kernel":"k"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `kernel`"), "{err}");
        let err = serde_json::from_str::<VmSetParams>(r#"{"name":"n","network":"tap"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `network`"), "{err}");
    }
}
