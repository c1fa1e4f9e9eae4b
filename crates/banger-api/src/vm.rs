//! Kernels and VMs: methods, params and results.

use serde::{Deserialize, Serialize};

use crate::NoParams;

method! {
    /// `kernel.import`: take a guest kernel (and its modules) out of a Debian `linux-image-*`
    /// package, or from a kernel image and an optional modules tree, and build banger's
    /// initramfs for it (unless the caller brings its own).
    KernelImport = "kernel.import", KernelImportParams => KernelInfo
}

/// Params of `kernel.import`. Exactly one of `deb` and `kernel`; all paths absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelImportParams {
    /// Name to import under.
    pub name: String,
    /// A Debian `linux-image-*.deb`: kernel, config and modules in one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deb: Option<String>,
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
    /// Which initramfs VMs boot with: `banger` (built by banger at import) or `custom`
    /// (the one given at import).
    pub initrd: String,
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
    /// CPUs (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Memory in MiB (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Root disk size in bytes; default the image's size. Only grows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Create without starting.
    #[serde(default)]
    pub no_start: bool,
    /// `user`, `tap` or `auto`; default: config `network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

wire_enum! {
    /// Whether a VM's VMM runs, the way youki's `ContainerStatus` answers what a container
    /// may do next.
    "VM state", VmState {
        /// Its VMM runs (and its agent answered at boot).
        Running = "running",
        /// No VMM: created, stopped, killed or found dead.
        Stopped = "stopped",
    }
}

impl VmState {
    /// Whether its VMM runs.
    pub fn is_running(self) -> bool {
        self == VmState::Running
    }
    /// Whether `vm.start` may boot it.
    pub fn can_start(self) -> bool {
        self == VmState::Stopped
    }
    /// Whether `vm.stop`/`vm.kill` have anything to stop.
    pub fn can_stop(self) -> bool {
        self == VmState::Running
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
    /// `user` (QEMU user-mode) or `tap` (bridge + TAP + NAT).
    #[serde(default = "default_network")]
    pub network: String,
    /// The guest's address on the bridge (TAP networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    /// The host's TAP device of this VM (TAP networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// RFC 3339 UTC creation time.
    pub created_at: String,
    /// Its directory (disk, console log, sockets).
    pub dir: String,
}

fn default_network() -> String {
    "user".into()
}

method! {
    /// `vm.list`: every VM by name.
    VmList = "vm.list", NoParams => VmListResult
}

/// Result of `vm.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmListResult {
    /// VMs sorted by name.
    pub vms: Vec<VmInfo>,
}

method! {
    /// `vm.show`: one VM.
    VmShow = "vm.show", NameParams => VmInfo
}

method! {
    /// `vm.start`: boot a stopped VM and wait for its agent.
    VmStart = "vm.start", NameParams => VmInfo
}

method! {
    /// `vm.stop`: shut a VM down cleanly (its disk keeps what was written), killing it if it
    /// does not stop in time.
    VmStop = "vm.stop", NameParams => VmInfo
}

method! {
    /// `vm.kill`: kill a VM's VMM at once, without a clean shutdown.
    VmKill = "vm.kill", NameParams => VmInfo
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
    /// The caller forwards stdin as `input` notifications; without it (and without `tty`)
    /// the command reads `/dev/null`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// Run the command on a pty of this terminal (implies `stdin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtyParams>,
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
    /// Absolute path of a workspace to copy to `/root/<basename>` (tracked and untracked,
    /// not ignored, files of a git repository; every file otherwise).
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
    /// As in `vm.create`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// As in `vm.exec`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// As in `vm.exec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtyParams>,
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
