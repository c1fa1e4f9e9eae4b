//! The QEMU backend (`-M microvm`) of the [`Vmm`] trait.
//!
//! Supervision is synchronous (a `std::process::Child` per VM); the daemon drives it from
//! blocking tasks. Each VM gets a run directory holding its console log, QEMU's stderr
//! and the QMP socket used for graceful shutdown.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::backend::{BackendKind, Vmm};
use crate::error::{Error, IoContext, Result};
use crate::initramfs::{self, InitramfsSpec};

pub use crate::backend::{Accel, HostForward, NetSpec, UserNet, VmSpec};

/// A VM process started in the foreground by [`Qemu::start`].
pub trait RunningVm {
    /// The VMM process id.
    fn pid(&self) -> u32;
    /// Where the guest's serial console is written.
    fn console_log(&self) -> &Path;
    /// The exit status if the VMM process has ended, without blocking.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>>;
    /// Asks the guest to shut down, waits up to `grace`, then kills the VMM.
    fn stop(&mut self, grace: Duration) -> Result<ExitStatus>;
    /// Waits up to `timeout` for the VMM to exit; `None` if it is still running.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
    /// Caps the console log ([`crate::console`]); `None` writes `console.log` directly,
    /// uncapped (probes and tests of short boots).
    pub console_logger: Option<crate::console::ConsoleLogger>,
    /// Run QEMU as this user, handed every file it needs ([`crate::confine`]); set when
    /// the daemon is root. `None`: QEMU runs as the caller and opens its own files.
    pub run_as: Option<crate::confine::VmmUser>,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu {
            binary: "qemu-system-x86_64".into(),
            console_logger: None,
            run_as: None,
        }
    }
}

impl Qemu {
    /// The full argument list for `spec` (without the binary).
    pub fn args(&self, spec: &VmSpec) -> Vec<String> {
        let mut cmdline = spec.cmdline.clone();
        if spec.accel == Accel::Tcg && !cmdline.contains("tsc_early_khz=") {
            // Under TCG the guest sometimes hangs calibrating the TSC on a busy host;
            // telling it the (host's) rate skips the calibration.
            if let Some(khz) = host_tsc_khz() {
                cmdline.push_str(&format!(" tsc_early_khz={khz}"));
            }
        }
        if !cmdline.split(' ').any(|w| w.starts_with("reboot=")) {
            // A guest reboot is how a VM ends (-no-reboot turns it into QEMU's exit).
            // The kernel's default reboot sequence first tries ACPI and the keyboard
            // controller, which microvm lacks; under TCG that dance took 0-10+ seconds.
            // A triple fault resets the CPU at once.
            cmdline.push_str(" reboot=t");
        }
        let run = &spec.run_dir;
        let mut a: Vec<String> = vec![
            "-M".into(),
            "microvm".into(),
            "-accel".into(),
            match spec.accel {
                Accel::Kvm => "kvm",
                Accel::Tcg => "tcg",
            }
            .into(),
            "-cpu".into(),
            // Under KVM the guest sees the host CPU; "max" there asks KVM for MSRs a
            // restricted (e.g. paravirtual) KVM refuses, aborting QEMU before boot.
            match spec.accel {
                Accel::Kvm => "host",
                Accel::Tcg => "max",
            }
            .into(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            // Not -nographic: that would multiplex the monitor onto stdio.
            "-display".into(),
            "none".into(),
            // The guest's reboot ends the VM: that is how a finished command powers off.
            "-no-reboot".into(),
        ];
        a.extend(sandbox_args());
        a.extend([
            "-chardev".into(),
            match self.console_logger {
                // The logger reads QEMU's stdout (its stdin is /dev/null: nothing to read).
                Some(_) => "stdio,id=con0,signal=off".into(),
                None => format!("file,id=con0,path={}", run.join("console.log").display()),
            },
            "-serial".into(),
            "chardev:con0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", run.join("qmp.sock").display()),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-append".into(),
            cmdline,
        ]);
        if let Some(initrd) = &spec.initrd {
            a.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        if let Some(disk) = &spec.root_disk {
            a.extend([
                "-drive".into(),
                format!(
                    "file={},if=none,id=root,format={},cache=unsafe",
                    qemu_escape(&disk.display().to_string()),
                    crate::qmp::disk_format(disk)
                ),
                "-device".into(),
                "virtio-blk-device,drive=root".into(),
            ]);
        }
        if let Some(socket) = &spec.agent_socket {
            a.extend(crate::agent::qemu_agent_args(socket));
        }
        // A fresh VM generation ID on every start, restores included: the guest kernel
        // reseeds its RNG when it changes (what Firecracker's snapshot docs recommend).
        a.extend(["-device".into(), "vmgenid,guid=auto".into()]);
        match &spec.net {
            None => {}
            Some(NetSpec::User(user)) => {
                let mut netdev = "user,id=n0".to_string();
                if user.restrict {
                    netdev.push_str(",restrict=on");
                }
                for forward in &user.host_forwards {
                    netdev.push_str(&format!(",hostfwd={}", forward.qemu_value()));
                }
                a.extend([
                    "-netdev".into(),
                    netdev,
                    "-device".into(),
                    "virtio-net-device,netdev=n0".into(),
                ]);
            }
            Some(NetSpec::Tap { ifname, mac }) => a.extend([
                "-netdev".into(),
                // The tap exists already (the daemon made it and put it on the bridge):
                // no scripts, QEMU only opens it.
                format!(
                    "tap,id=n0,ifname={},script=no,downscript=no",
                    qemu_escape(ifname)
                ),
                "-device".into(),
                format!("virtio-net-device,netdev=n0,mac={mac}"),
            ]),
        }
        a
    }
}

/// QEMU's seccomp filter, on for every VM: a guest that takes over QEMU still cannot
/// call obsolete syscalls, change its uid or gid (`elevateprivileges=deny`: which is also
/// why a root daemon drops QEMU's privileges before exec rather than with `-runas`,
/// whose setuid the filter forbids), fork or exec (`spawn=deny`: banger's TAPs need no
/// helper scripts) or change scheduling and affinity (`resourcecontrol=deny`).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

fn sandbox_args() -> [String; 2] {
    ["-sandbox".into(), SANDBOX.into()]
}

/// Rewrites `args` (from [`Qemu::args`]) for a QEMU that opens no path of the host:
/// each file and socket is opened (or bound) here, put in `passed`, and named by its
/// descriptor (see [`crate::confine`]).
fn confined_args(
    args: Vec<String>,
    spec: &VmSpec,
    passed: &mut crate::confine::PassedFds,
) -> std::result::Result<Vec<String>, String> {
    let kernel = readable(&spec.kernel, passed)?;
    let initrd = match &spec.initrd {
        Some(initrd) => Some(readable(initrd, passed)?),
        None => None,
    };
    let mut out = Vec::with_capacity(args.len() + 8);
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let value = |it: &mut std::vec::IntoIter<String>| it.next().unwrap_or_default();
        match arg.as_str() {
            "-qmp" => {
                let _ = value(&mut it);
                let qmp = crate::confine::listen_unix(&spec.run_dir.join("qmp.sock"))
                    .map_err(|e| format!("bind qmp.sock in {}: {e}", spec.run_dir.display()))?;
                let fd = passed.add(qmp);
                out.extend([
                    "-chardev".into(),
                    format!("socket,id=qmp,fd={fd},server=on,wait=off"),
                    "-mon".into(),
                    "chardev=qmp,mode=control".into(),
                ]);
            }
            "-kernel" => {
                let _ = value(&mut it);
                out.extend([arg, format!("/proc/self/fd/{kernel}")]);
            }
            "-initrd" => {
                let _ = value(&mut it);
                if let Some(fd) = initrd {
                    out.extend([arg, format!("/proc/self/fd/{fd}")]);
                }
            }
            "-drive"
                if spec
                    .root_disk
                    .as_deref()
                    .is_some_and(|d| crate::qmp::disk_format(d) == "qcow2") =>
            {
                // An overlay names its backing file, which this QEMU may not open: the
                // whole chain goes as descriptors, one -blockdev node per layer.
                let _ = value(&mut it);
                let disk = spec.root_disk.as_deref().expect("checked above");
                let chain = crate::qcow2::blockdev_args(disk, "root", 1, passed)
                    .map_err(|e| format!("open the layers of {}: {e}", disk.display()))?;
                out.extend(chain);
            }
            "-drive" | "-chardev" | "-netdev" => {
                let v = value(&mut it);
                let v = if let (Some(rest), Some(disk)) =
                    (v.strip_prefix("file="), spec.root_disk.as_ref())
                {
                    // QEMU probes the image read-only first, then opens it read-write:
                    // the set holds one descriptor of each.
                    let rw = passed.open(disk, true);
                    let ro = passed.open(disk, false);
                    let (rw, ro) = rw
                        .and_then(|rw| Ok((rw, ro?)))
                        .map_err(|e| format!("open {}: {e}", disk.display()))?;
                    out.extend([
                        "-add-fd".into(),
                        format!("fd={rw},set=1"),
                        "-add-fd".into(),
                        format!("fd={ro},set=1"),
                    ]);
                    let options = rest.rsplit_once(",if=").map(|(_, o)| o).unwrap_or("");
                    format!("file=/dev/fdset/1,if={options}")
                } else if v.starts_with("socket,id=agent,") {
                    let socket = spec.agent_socket.as_ref().ok_or("no agent socket")?;
                    let listener = crate::confine::listen_unix(socket)
                        .map_err(|e| format!("bind {}: {e}", socket.display()))?;
                    format!(
                        "socket,id=agent,fd={},server=on,wait=off",
                        passed.add(listener)
                    )
                } else if v.starts_with("tap,") {
                    let Some(NetSpec::Tap { ifname, .. }) = &spec.net else {
                        return Err("a tap netdev without a TAP in the spec".into());
                    };
                    let tap = crate::confine::open_tap(ifname)
                        .map_err(|e| format!("open TAP {ifname}: {e}"))?;
                    let fd = passed.add(tap);
                    // fd= excludes ifname=, script= and downscript=; other options stay.
                    let kept: Vec<&str> = v
                        .split(',')
                        .filter(|o| {
                            !o.starts_with("ifname=")
                                && !o.starts_with("script=")
                                && !o.starts_with("downscript=")
                        })
                        .collect();
                    format!("{},fd={fd}", kept.join(","))
                } else {
                    v
                };
                out.extend([arg, v]);
            }
            _ => out.push(arg),
        }
    }
    Ok(out)
}

/// Opens `path` for a confined QEMU that names it `/proc/self/fd/N` (how `-kernel` and
/// `-initrd` take a descriptor): that reopens the file, which checks the file's own
/// mode, not its directories'; a file others may not read goes as an in-memory copy.
fn readable(
    path: &Path,
    passed: &mut crate::confine::PassedFds,
) -> std::result::Result<std::os::fd::RawFd, String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o004 == 0 {
        // Not readable by the VMM's user (a 0600 kernel copied from Ubuntu's /boot, say):
        // a copy in memory, whose mode lets the descriptor's holder reopen it.
        let copy = (|| -> std::io::Result<std::os::fd::OwnedFd> {
            let memfd =
                rustix::fs::memfd_create("banger-boot-file", rustix::fs::MemfdFlags::CLOEXEC)?;
            let mut out = fs::File::from(memfd);
            std::io::copy(&mut fs::File::open(path)?, &mut out)?;
            Ok(out.into())
        })()
        .map_err(|e| format!("copy {} for the VMM's user: {e}", path.display()))?;
        return Ok(passed.add(copy));
    }
    passed
        .open(path, false)
        .map_err(|e| format!("open {}: {e}", path.display()))
}

/// QEMU option values escape a literal comma by doubling it.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl Qemu {
    /// Boots the VM as a child of this process and returns once it runs (not once the
    /// guest is up). For tests and probes; the daemon uses [`Vmm::spawn_detached`].
    pub fn start(&self, spec: &VmSpec) -> Result<QemuVm> {
        fs::create_dir_all(&spec.run_dir).ctx("create vm run dir", &spec.run_dir)?;
        let console = spec.run_dir.join("console.log");
        let qmp = spec.run_dir.join("qmp.sock");
        // A stale socket from an earlier run would make QEMU fail to bind.
        let _ = fs::remove_file(&qmp);
        let stderr_path = spec.run_dir.join("qemu.stderr");
        let stderr = fs::File::create(&stderr_path).ctx("create", &stderr_path)?;
        let args = self.args(spec);
        tracing::debug!(binary = %self.binary.display(), ?args, "starting qemu");
        let child = Command::new(&self.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .ctx("spawn", &self.binary)?;
        Ok(QemuVm {
            child,
            console,
            qmp,
            stderr: stderr_path,
        })
    }
}

impl Vmm for Qemu {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn binary(&self) -> &Path {
        &self.binary
    }

    /// Starts QEMU for `spec` in a session of its own and returns its pid, without tying
    /// its life to the caller: a daemon that owns VMs must be able to restart and re-adopt
    /// them. The child is reaped by a thread while the caller lives.
    fn spawn_detached(&self, spec: &VmSpec) -> Result<u32> {
        self.spawn_detached_with(spec, None)
    }
}

impl Qemu {
    /// [`Vmm::spawn_detached`], restoring the VM state saved in `incoming` (by
    /// [`crate::qmp::Qmp::save_state`]) instead of booting when given. The state file is
    /// opened here and handed over as `-incoming fd:N`: QEMU's sandbox denies the spawn
    /// an `exec:` migration needs, and a confined QEMU could not open the file anyway.
    pub fn spawn_detached_with(&self, spec: &VmSpec, incoming: Option<&Path>) -> Result<u32> {
        use std::os::unix::process::CommandExt;
        fs::create_dir_all(&spec.run_dir).ctx("create vm run dir", &spec.run_dir)?;
        for stale in ["qmp.sock", "agent.sock"] {
            let _ = fs::remove_file(spec.run_dir.join(stale));
        }
        if let Some(socket) = &spec.agent_socket {
            let _ = fs::remove_file(socket);
        }
        let stderr_path = spec.run_dir.join("qemu.stderr");
        let stderr = fs::File::create(&stderr_path).ctx("create", &stderr_path)?;
        let console: Stdio = match &self.console_logger {
            Some(logger) => logger
                .spawn(&spec.run_dir)
                .ctx("start the console logger", &logger.program)?
                .into(),
            None => Stdio::null(),
        };
        let mut passed = crate::confine::PassedFds::default();
        let args = match &self.run_as {
            Some(user) => confined_args(self.args(spec), spec, &mut passed)
                .map_err(|e| Error::Vm(format!("prepare QEMU to run as {}: {e}", user.name)))?,
            None => self.args(spec),
        };
        let mut extra = Vec::new();
        if let Some(state) = incoming {
            let fd = passed.open(state, false).ctx("open the VM state", state)?;
            extra = crate::qmp::incoming_args(fd);
        }
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(stderr);
        passed.apply(&mut command, self.run_as.as_ref());
        // SAFETY: setsid is async-signal-safe and touches no parent memory; it keeps the
        // VM out of the daemon's process group, so signals aimed at the daemon spare it.
        unsafe {
            command.pre_exec(|| rustix::process::setsid().map(drop).map_err(Into::into));
        }
        let mut child = command.spawn().ctx("spawn", &self.binary)?;
        let pid = child.id();
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(pid)
    }
}

/// A running QEMU process. Dropping it kills the process if it still runs, so a
/// panicking caller never leaks a VM.
#[derive(Debug)]
pub struct QemuVm {
    child: Child,
    console: PathBuf,
    qmp: PathBuf,
    stderr: PathBuf,
}

impl QemuVm {
    /// What QEMU printed on stderr so far (its errors, e.g. a missing file or KVM).
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends one QMP command. Used for `system_powerdown`, the ACPI power button.
    fn qmp(&self, command: &str) -> std::io::Result<String> {
        let stream = UnixStream::connect(&self.qmp)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut w = stream;
        let mut line = String::new();
        reader.read_line(&mut line)?; // greeting
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        line.clear();
        reader.read_line(&mut line)?;
        w.write_all(
            serde_json::json!({ "execute": command })
                .to_string()
                .as_bytes(),
        )?;
        w.write_all(b"\n")?;
        line.clear();
        reader.read_line(&mut line)?;
        Ok(line)
    }
}

impl RunningVm for QemuVm {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn console_log(&self) -> &Path {
        &self.console
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .ctx("wait for qemu", &self.console)
            .map_err(Into::into)
    }

    fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // Graceful first: the ACPI power button. A guest without an ACPI button handler
        // ignores it, hence the bounded wait before the kill.
        if let Err(e) = self.qmp("system_powerdown") {
            tracing::debug!(error = %e, "qmp system_powerdown failed; killing");
        } else if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        let _ = self.child.kill();
        self.child
            .wait()
            .ctx("wait for killed qemu", &self.console)
            .map_err(Into::into)
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The host's TSC rate in kHz, from the first `cpu MHz` line of /proc/cpuinfo.
pub fn host_tsc_khz() -> Option<u64> {
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// What [`kvm_usable`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmProbe {
    /// Whether a guest reached userspace under KVM in time.
    pub usable: bool,
    /// Why not, or how long it took.
    pub detail: String,
}

/// Boots `kernel` under KVM with a tiny initramfs whose init only prints a marker, and
/// reports whether the marker appeared within `timeout`.
///
/// The existence of `/dev/kvm`, or even a successful `KVM_CREATE_VM`, proves nothing: on
/// paravirtual KVM hosts the guest dies on the first instruction PVM cannot emulate.
/// Only a boot that reaches userspace does.
pub fn kvm_usable(kernel: &Path, busybox: &Path, timeout: Duration) -> Result<KvmProbe> {
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Ok(KvmProbe {
            usable: false,
            detail: format!("cannot open /dev/kvm: {e}"),
        });
    }
    let dir = tempfile::Builder::new()
        .prefix("banger-kvm-probe-")
        .tempdir()
        .ctx("create probe dir", std::env::temp_dir())?;
    let initrd = dir.path().join("initrd");
    initramfs::write_initramfs(
        &InitramfsSpec {
            busybox: busybox.to_owned(),
            kernel: None,
        },
        &initrd,
    )?;
    let spec = VmSpec {
        kernel: kernel.to_owned(),
        initrd: Some(initrd),
        cmdline: "console=ttyS0 panic=-1 quiet banger.probe=1".into(),
        root_disk: None,
        memory_mib: 256,
        vcpus: 1,
        net: None,
        accel: Accel::Kvm,
        run_dir: dir.path().join("run"),
        agent_socket: None,
    };
    let started = Instant::now();
    let mut vm = Qemu::default().start(&spec)?;
    let exited = vm.wait_timeout(timeout)?;
    if exited.is_none() {
        vm.stop(Duration::ZERO)?;
    }
    let log = fs::read_to_string(vm.console_log()).unwrap_or_default();
    let probe = if log.contains("BANGER_PROBE_OK") {
        KvmProbe {
            usable: true,
            detail: format!("guest reached userspace in {:?}", started.elapsed()),
        }
    } else {
        let stderr = vm.stderr();
        KvmProbe {
            usable: false,
            detail: match exited {
                None => format!("no guest userspace within {timeout:?}"),
                Some(status) => format!(
                    "qemu exited ({status}) before guest userspace: {}",
                    stderr.trim()
                ),
            },
        }
    };
    Ok(probe)
}

/// Waits until the console log contains `needle` or the VM exits or `timeout` passes;
/// returns the log. For callers that wait on a marker rather than on the process.
pub fn wait_for_console(
    vm: &mut impl RunningVm,
    needle: &str,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = fs::read_to_string(vm.console_log()).unwrap_or_default();
        if log.contains(needle) {
            return Ok(log);
        }
        if vm.try_wait()?.is_some() {
            // Re-read: the last bytes may have landed after our read.
            let log = fs::read_to_string(vm.console_log()).unwrap_or_default();
            return if log.contains(needle) {
                Ok(log)
            } else {
                Err(Error::Vm(format!("exited before printing {needle:?}")))
            };
        }
        if Instant::now() >= deadline {
            return Err(Error::Vm(format!(
                "no {needle:?} on the console within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(accel: Accel, cmdline: &str) -> VmSpec {
        VmSpec {
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd".into()),
            cmdline: cmdline.into(),
            root_disk: Some("/images/a,b.ext4".into()),
            memory_mib: 512,
            vcpus: 2,
            net: Some(NetSpec::User(UserNet {
                host_forwards: vec![crate::backend::HostForward::tcp_local(2222, 22)],
                restrict: false,
                runas: None,
            })),
            accel,
            agent_socket: None,
            run_dir: "/run/vm1".into(),
        }
    }

    fn arg_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn args_wire_disk_net_console_and_exit_on_reboot() {
        let a = Qemu::default().args(&spec(Accel::Tcg, "console=ttyS0"));
        let expected: &[(&str, &[&str])] = &[
            ("-M", &["microvm"]),
            ("-accel", &["tcg"]),
            ("-cpu", &["max"]),
            ("-m", &["512M"]),
            ("-smp", &["2"]),
            (
                "-sandbox",
                &["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"],
            ),
            (
                "-drive",
                &["file=/images/a,,b.ext4,if=none,id=root,format=raw,cache=unsafe"],
            ),
            (
                "-device",
                &[
                    "virtio-blk-device,drive=root",
                    "vmgenid,guid=auto",
                    "virtio-net-device,netdev=n0",
                ],
            ),
            ("-netdev", &["user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22"]),
            ("-chardev", &["file,id=con0,path=/run/vm1/console.log"]),
        ];
        for (flag, values) in expected {
            assert_eq!(arg_after(&a, flag), *values, "{flag}");
        }
        assert!(a.contains(&"-no-reboot".to_string()));
        assert!(a.contains(&"-nodefaults".to_string()));
        let append = arg_after(&a, "-append")[0];
        assert!(append.starts_with("console=ttyS0 "), "{append}");
        assert!(append.contains(" reboot=t"), "{append}");
        if host_tsc_khz().is_some() {
            assert!(append.contains(" tsc_early_khz="), "{append}");
        }
    }

    #[test]
    fn tap_network_opens_the_existing_tap_without_scripts_and_sets_the_mac() {
        let mut s = spec(Accel::Tcg, "console=ttyS0");
        s.net = Some(NetSpec::Tap {
            ifname: "bgr-0123abcd".into(),
            mac: "02:b4:00:00:00:07".into(),
        });
        let a = Qemu::default().args(&s);
        assert_eq!(
            arg_after(&a, "-netdev"),
            ["tap,id=n0,ifname=bgr-0123abcd,script=no,downscript=no"]
        );
        assert!(
            a.contains(&"virtio-net-device,netdev=n0,mac=02:b4:00:00:00:07".to_string()),
            "{a:?}"
        );
    }

    #[test]
    fn restricted_slirp_runs_as_the_vmm_user_and_no_net_means_no_netdev() {
        let mut s = spec(Accel::Tcg, "console=ttyS0");
        s.net = Some(NetSpec::User(UserNet {
            host_forwards: vec![],
            restrict: true,
            runas: Some("banger-vmm".into()),
        }));
        let a = Qemu::default().args(&s);
        assert_eq!(arg_after(&a, "-netdev"), ["user,id=n0,restrict=on"]);
        // Never QEMU's own -runas: it would setuid under the seccomp filter (SIGSYS); a
        // root daemon drops to the user before exec instead (crate::confine).
        assert!(arg_after(&a, "-runas").is_empty(), "{a:?}");
        s.net = None;
        let a = Qemu::default().args(&s);
        assert!(arg_after(&a, "-netdev").is_empty(), "{a:?}");
    }

    #[test]
    fn args_respect_callers_reboot_and_tsc_and_use_host_cpu_under_kvm() {
        let a = Qemu::default().args(&spec(Accel::Kvm, "reboot=k tsc_early_khz=1"));
        assert_eq!(arg_after(&a, "-append"), ["reboot=k tsc_early_khz=1"]);
        assert_eq!(arg_after(&a, "-cpu"), ["host"]);
        assert_eq!(arg_after(&a, "-accel"), ["kvm"]);
    }

    #[test]
    fn boot_files_reach_an_unprivileged_vmm_whatever_their_mode() {
        use std::os::unix::fs::PermissionsExt;
        if !banger_testkit::require_root("dropping to another user needs root") {
            return;
        }
        let nobody = crate::confine::VmmUser {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let tmp = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o600] {
            let file = tmp.path().join(format!("kernel-{mode:o}"));
            fs::write(&file, format!("kernel {mode:o}\n")).unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
            let mut passed = crate::confine::PassedFds::default();
            let fd = readable(&file, &mut passed).unwrap();
            let mut command = Command::new("/bin/cat");
            command.arg(format!("/proc/self/fd/{fd}"));
            passed.apply(&mut command, Some(&nobody));
            let out = command.output().unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("kernel {mode:o}\n"),
                "mode {mode:o}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
