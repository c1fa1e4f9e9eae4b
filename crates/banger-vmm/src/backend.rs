//! What every VMM backend shares: the [`VmSpec`] a VM boots from, the [`Vmm`] trait
//! ([`crate::qemu::Qemu`] and [`crate::firecracker::Firecracker`] implement it), how the
//! host reaches the guest agent ([`AgentChannel`]) and how a backend is chosen
//! ([`select_backend`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::agent::AgentChannel;
use crate::error::{IoContext, Result};

/// How the guest CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation. Only use it after [`crate::qemu::kvm_usable`] said yes:
    /// some hosts (paravirtual KVM) accept `KVM_CREATE_VM` but cannot run an unmodified
    /// Linux guest.
    Kvm,
    /// QEMU's software emulation: slow but works everywhere.
    Tcg,
}

/// User-mode (slirp) networking: no privileges needed; the guest is 10.0.2.15/24 behind
/// 10.0.2.2 and reaches the host's network through QEMU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserNet {
    /// slirp `hostfwd`s: a host address QEMU listens on, forwarded to a guest port.
    pub host_forwards: Vec<HostForward>,
    /// slirp's `restrict=on`: the guest reaches neither the host nor the outside (only
    /// the forwards). Plain slirp maps 10.0.2.2 to the host's loopback: the daemon pairs
    /// it with [`UserNet::runas`] and a host firewall rule on that user.
    pub restrict: bool,
    /// The user QEMU runs as (a root daemon drops to it before exec, see
    /// [`crate::confine`]): slirp's host sockets of guest connections belong to it, which
    /// the host's output guard matches (bangerd's `vmm_user`).
    pub runas: Option<String>,
}

/// One slirp `hostfwd`: QEMU listens on `host` and forwards what arrives to the guest's
/// `guest_port` (at the guest's user-mode address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostForward {
    /// UDP instead of TCP.
    pub udp: bool,
    /// The host address and port QEMU binds.
    pub host: std::net::SocketAddr,
    /// The guest port.
    pub guest_port: u16,
}

impl HostForward {
    /// A TCP forward from `127.0.0.1:host_port`.
    pub fn tcp_local(host_port: u16, guest_port: u16) -> HostForward {
        HostForward {
            udp: false,
            host: (std::net::Ipv4Addr::LOCALHOST, host_port).into(),
            guest_port,
        }
    }

    /// QEMU's `hostfwd=` value: `tcp:127.0.0.1:8080-:80` (slirp listens on IPv4 only).
    pub fn qemu_value(&self) -> String {
        let proto = if self.udp { "udp" } else { "tcp" };
        format!(
            "{proto}:{}:{}-:{}",
            self.host.ip(),
            self.host.port(),
            self.guest_port
        )
    }
}

/// The guest's network device and what backs it on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetSpec {
    /// QEMU's user-mode stack (QEMU only; Firecracker has none).
    User(UserNet),
    /// A TAP device that already exists on the host (created and attached to the bridge
    /// by the caller); the VMM only opens it.
    Tap {
        /// The host interface name, e.g. `bgr-1a2b3c4d`.
        ifname: String,
        /// The guest's MAC address (`02:…`, locally administered).
        mac: String,
    },
}

impl Default for NetSpec {
    fn default() -> Self {
        NetSpec::User(UserNet::default())
    }
}

/// Everything needed to boot one VM, whatever the backend.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The kernel: a bzImage (QEMU only), or an ELF `vmlinux` with a PVH note (see
    /// [`crate::kernel::KernelDir::ensure_vmlinux`]). The ELF boots faster under TCG
    /// because the bzImage decompresses itself inside the emulated CPU, and it is the
    /// only form Firecracker loads.
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line. Backends add what they need (`reboot=`, the agent
    /// channel, `tsc_early_khz=` under TCG) when the caller did not.
    pub cmdline: String,
    /// A raw disk image attached as the first virtio block device (`/dev/vda`).
    pub root_disk: Option<PathBuf>,
    /// Guest memory.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub vcpus: u32,
    /// Networking; `None` for a VM without a network device.
    pub net: Option<NetSpec>,
    /// Accelerator (QEMU; Firecracker always uses KVM).
    pub accel: Accel,
    /// A directory owned by this VM for its console log, VMM logs and control sockets.
    pub run_dir: PathBuf,
    /// Where the host reaches the guest agent: the Unix socket QEMU binds to the agent's
    /// virtio-serial port, or the vsock Unix socket Firecracker listens on. `None` for a
    /// VM without an agent channel.
    pub agent_socket: Option<PathBuf>,
}

/// A VM monitor that boots [`VmSpec`]s as detached processes.
pub trait Vmm {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The VMM's program.
    fn binary(&self) -> &Path;

    /// The VMM's version line (`QEMU emulator version 7.2.x`, `Firecracker v1.x`), by
    /// running its binary: both answer `--version`.
    fn version(&self) -> Result<String> {
        version_line(self.binary(), "--version")
    }

    /// Starts the VM in a session of its own and returns the VMM's pid once the guest was
    /// told to boot (not once it is up). The process outlives the caller, so a daemon
    /// that owns VMs can restart and re-adopt them; its logs go to `spec.run_dir`.
    fn spawn_detached(&self, spec: &VmSpec) -> Result<u32>;
}

/// The VMM backends banger knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// `qemu-system-x86_64 -M microvm`, KVM or TCG.
    Qemu,
    /// Firecracker, configured through its API socket; needs a working KVM.
    Firecracker,
}

impl BackendKind {
    /// The name used in config files and VM records.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Firecracker => "firecracker",
        }
    }

    /// How the host reaches the agent of a VM of this backend whose run directory is
    /// `run_dir` (the same paths [`agent_socket_in`] gives the spec).
    pub fn agent_channel_in(self, run_dir: &Path) -> AgentChannel {
        let socket = agent_socket_in(self, run_dir);
        match self {
            BackendKind::Qemu => AgentChannel::VirtioSerial { socket },
            BackendKind::Firecracker => AgentChannel::FirecrackerVsock {
                socket,
                port: crate::agent::AGENT_VSOCK_PORT,
            },
        }
    }
}

/// The agent socket a VM of `kind` uses in its run directory. Named per backend so a
/// stale file of one is never mistaken for the other's.
pub fn agent_socket_in(kind: BackendKind, run_dir: &Path) -> PathBuf {
    run_dir.join(match kind {
        BackendKind::Qemu => "agent.sock",
        BackendKind::Firecracker => "vsock.sock",
    })
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `vmm` setting: a backend, or `auto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackendPreference {
    /// Firecracker when its binary is present, KVM really runs a guest and TAP
    /// networking is available (it has no user-mode network); QEMU otherwise.
    #[default]
    Auto,
    /// Always QEMU.
    Qemu,
    /// Always Firecracker; an error where it cannot run.
    Firecracker,
}

impl FromStr for BackendPreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendPreference::Auto),
            "qemu" => Ok(BackendPreference::Qemu),
            "firecracker" => Ok(BackendPreference::Firecracker),
            other => Err(format!(
                "unknown vmm {other:?}: use \"auto\", \"qemu\" or \"firecracker\""
            )),
        }
    }
}

/// What [`select_backend`] needs to know about the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The Firecracker binary, if one was found (config or PATH).
    pub firecracker: Option<PathBuf>,
    /// `Ok(detail)` when a probe guest booted under KVM, `Err(why not)` otherwise.
    pub kvm: std::result::Result<String, String>,
    /// Whether VMs get TAP networking (Firecracker has no other kind).
    pub tap_network: bool,
}

/// Why the configured backend cannot run here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// `vmm = "firecracker"` but no binary.
    #[error("vmm = \"firecracker\" in config.toml, but no firecracker binary was found (set firecracker_bin, put it on PATH, or use vmm = \"auto\")")]
    FirecrackerMissing,
    /// `vmm = "firecracker"` but KVM cannot run a guest.
    #[error("vmm = \"firecracker\" in config.toml, but KVM is not usable here ({0}); Firecracker has no software emulation: use vmm = \"qemu\" or \"auto\"")]
    KvmUnusable(String),
    /// `vmm = "firecracker"` without TAP networking.
    #[error("vmm = \"firecracker\" in config.toml needs network = \"tap\" (bangerd as root with /dev/net/tun): Firecracker has no user-mode networking")]
    NoTapNetwork,
}

/// The backend to boot VMs with, from the `vmm` setting and the host.
pub fn select_backend(
    preference: BackendPreference,
    host: &HostFacts,
) -> std::result::Result<BackendKind, SelectError> {
    match preference {
        BackendPreference::Qemu => Ok(BackendKind::Qemu),
        BackendPreference::Auto => Ok(
            if host.firecracker.is_some() && host.kvm.is_ok() && host.tap_network {
                BackendKind::Firecracker
            } else {
                BackendKind::Qemu
            },
        ),
        BackendPreference::Firecracker => {
            if host.firecracker.is_none() {
                Err(SelectError::FirecrackerMissing)
            } else if let Err(why) = &host.kvm {
                Err(SelectError::KvmUnusable(why.clone()))
            } else if !host.tap_network {
                Err(SelectError::NoTapNetwork)
            } else {
                Ok(BackendKind::Firecracker)
            }
        }
    }
}

/// `program` as found on `PATH`, like the shell would.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The first line `binary arg` prints (stdout, else stderr): how VMMs state their version.
pub fn version_line(binary: &Path, arg: &str) -> Result<String> {
    let (status, first) = first_output_line(binary, arg).ctx("run", binary)?;
    if !status.success() || first.is_empty() {
        return Err(crate::Error::Vm(format!(
            "{} {arg} exited {status} printing {first:?}",
            binary.display(),
        )));
    }
    Ok(first)
}

/// Runs `binary arg` and returns its exit status and the first line it printed (stdout,
/// else stderr), trimmed: what tools print for `--version`, `-V` and the like.
pub fn first_output_line(
    binary: &Path,
    arg: &str,
) -> std::io::Result<(std::process::ExitStatus, String)> {
    let out = std::process::Command::new(binary).arg(arg).output()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let first = String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok((out.status, first))
}

/// Appends `param` (`key=value`) to `cmdline` unless a parameter with that key is there.
pub(crate) fn add_param(cmdline: &mut String, param: &str) {
    let key = param.split('=').next().unwrap_or(param);
    let present = cmdline
        .split(' ')
        .any(|w| w == key || w.strip_prefix(key).is_some_and(|r| r.starts_with('=')));
    if !present {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(param);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(firecracker: bool, kvm: bool, tap: bool) -> HostFacts {
        HostFacts {
            firecracker: firecracker.then(|| PathBuf::from("/usr/bin/firecracker")),
            kvm: if kvm {
                Ok("booted".into())
            } else {
                Err("no guest userspace within 15s".into())
            },
            tap_network: tap,
        }
    }

    #[test]
    fn auto_picks_firecracker_only_with_binary_kvm_and_tap() {
        let auto = BackendPreference::Auto;
        assert_eq!(
            select_backend(auto, &host(true, true, true)),
            Ok(BackendKind::Firecracker)
        );
        for (fc, kvm, tap) in [
            (false, true, true),
            (true, false, true),
            (true, true, false),
            (false, false, false),
        ] {
            assert_eq!(
                select_backend(auto, &host(fc, kvm, tap)),
                Ok(BackendKind::Qemu),
                "firecracker={fc} kvm={kvm} tap={tap}"
            );
        }
    }

    #[test]
    fn qemu_is_chosen_whatever_the_host() {
        assert_eq!(
            select_backend(BackendPreference::Qemu, &host(true, true, true)),
            Ok(BackendKind::Qemu)
        );
    }

    #[test]
    fn firecracker_requested_but_impossible_names_the_config_key_and_the_reason() {
        let fc = BackendPreference::Firecracker;
        let missing = select_backend(fc, &host(false, true, true)).unwrap_err();
        assert_eq!(missing, SelectError::FirecrackerMissing);
        assert!(missing.to_string().contains("vmm = \"firecracker\""));
        assert!(missing.to_string().contains("firecracker_bin"));
        let kvm = select_backend(fc, &host(true, false, true)).unwrap_err();
        assert!(
            kvm.to_string()
                .contains("KVM is not usable here (no guest userspace within 15s)"),
            "{kvm}"
        );
        let tap = select_backend(fc, &host(true, true, false)).unwrap_err();
        assert!(tap.to_string().contains("network = \"tap\""), "{tap}");
        assert_eq!(
            select_backend(fc, &host(true, true, true)),
            Ok(BackendKind::Firecracker)
        );
    }

    #[test]
    fn preference_parses_the_three_values_and_names_the_bad_one() {
        assert_eq!("auto".parse(), Ok(BackendPreference::Auto));
        assert_eq!("qemu".parse(), Ok(BackendPreference::Qemu));
        assert_eq!("firecracker".parse(), Ok(BackendPreference::Firecracker));
        let err = "kvmtool".parse::<BackendPreference>().unwrap_err();
        assert!(err.contains("\"kvmtool\""), "{err}");
    }

    #[test]
    fn add_param_keeps_the_callers_value() {
        let mut c = "console=ttyS0 reboot=k".to_string();
        add_param(&mut c, "reboot=t");
        add_param(&mut c, "pci=off");
        add_param(&mut c, "console=hvc0");
        assert_eq!(c, "console=ttyS0 reboot=k pci=off");
        let mut empty = String::new();
        add_param(&mut empty, "quiet");
        assert_eq!(empty, "quiet");
    }
}
