//! `banger doctor`: each requirement of banger on this host, checked by trying it.

use std::path::Path;
use std::time::Duration;

use banger_api::{CheckStatus, DoctorCheck};

use crate::services::network::{self, NetworkSetting};
use crate::services::privhelper::{JailRoute, TapRoute};
use crate::services::{KernelService, VmService};

/// What `program arg` says of its version, or "present" when it says nothing; `None`
/// when it cannot be run at all. Some tools exit non-zero after printing their version.
fn version_of(program: &str, arg: &str) -> Option<String> {
    let (_, first) = banger_vmm::backend::first_output_line(Path::new(program), arg).ok()?;
    Some(if first.is_empty() {
        "present".into()
    } else {
        first
    })
}

fn check(name: &str, found: Option<String>, required: bool, fix: &str) -> DoctorCheck {
    match found {
        Some(detail) => DoctorCheck {
            name: name.into(),
            status: CheckStatus::Ok,
            detail,
            fix: None,
        },
        None => DoctorCheck {
            name: name.into(),
            status: if required {
                CheckStatus::Missing
            } else {
                CheckStatus::Optional
            },
            detail: "not found".into(),
            fix: Some(fix.into()),
        },
    }
}

/// Runs every check. The KVM check boots the newest kernel briefly (bounded), because an
/// openable /dev/kvm does not prove a Linux guest can run.
pub fn diagnose(kernels: &KernelService, vms: &VmService) -> Vec<DoctorCheck> {
    let config = vms.config();
    let firecracker_required = config.vmm == Some(crate::config::VmmSetting::Firecracker);
    let tap_required = config.network == Some(NetworkSetting::Tap);
    let mut checks = vec![
        check(
            "qemu-system-x86_64",
            version_of("qemu-system-x86_64", "--version"),
            true,
            "apt-get install qemu-system-x86",
        ),
        check(
            "firecracker",
            vms.firecracker_binary().and_then(|bin| {
                let version = version_of(bin.to_str()?, "--version")?;
                Some(format!("{version} ({})", bin.display()))
            }),
            firecracker_required,
            "install firecracker (v1.8 or later: ACPI device discovery) on PATH or set firecracker_bin in config.toml; it is used where KVM works, QEMU otherwise",
        ),
        jailer_check(vms, firecracker_required),
        check("mkfs.ext4", version_of("mkfs.ext4", "-V"), true, "apt-get install e2fsprogs"),
        check("debugfs", version_of("debugfs", "-V"), true, "apt-get install e2fsprogs"),
        check(
            "qemu-img (copy-on-write disks)",
            version_of("qemu-img", "--version"),
            true,
            "apt-get install qemu-utils",
        ),
        DoctorCheck {
            name: "snapshots and warm templates".into(),
            status: CheckStatus::Ok,
            detail: {
                let state = &vms.layout().state_dir;
                let snapshots = crate::services::vm::tree_bytes(&state.join("snapshots"));
                let templates = crate::services::vm::tree_bytes(&state.join("templates"));
                format!(
                    "{snapshots} bytes in snapshots, {templates} bytes in warm templates under {} (banger snapshot rm|prune)",
                    state.display()
                )
            },
            fix: None,
        },
        DoctorCheck {
            name: "vm create disk cost".into(),
            status: CheckStatus::Ok,
            detail: crate::services::disk::create_cost(&vms.layout().vms_dir()),
            fix: None,
        },
        check(
            "busybox (initramfs)",
            Path::new(banger_vmm::initramfs::DEFAULT_BUSYBOX)
                .is_file()
                .then(|| banger_vmm::initramfs::DEFAULT_BUSYBOX.to_owned()),
            true,
            "apt-get install busybox-static",
        ),
        match config.vmm_user() {
            Ok(user) => DoctorCheck {
                name: "vmm user".into(),
                status: CheckStatus::Ok,
                detail: match user {
                    Some(u) => format!(
                        "VMMs run as {} (uid {}, gid {}; vmm_user in config.toml)",
                        u.name, u.uid, u.gid
                    ),
                    None => "bangerd is not root: VMMs run as its user".into(),
                },
                fix: None,
            },
            Err(e) => DoctorCheck {
                name: "vmm user".into(),
                status: CheckStatus::Missing,
                detail: e,
                fix: Some(format!(
                    "useradd --system --no-create-home --shell /usr/sbin/nologin {}",
                    config.vmm_user_name()
                )),
            },
        },
        match vms.agent_path() {
            Ok(path) => check("guest agent", Some(path.display().to_string()), true, ""),
            Err(e) => DoctorCheck {
                name: "guest agent".into(),
                status: CheckStatus::Missing,
                detail: format!("{:#}", e.error),
                fix: Some(banger_vmm::agent_binary::BUILD_HINT.into()),
            },
        },
    ];
    let newest = kernels.list().ok().and_then(|k| k.into_iter().next());
    checks.push(check(
        "kernel",
        newest.as_ref().map(|k| format!("{} ({})", k.name, k.version)),
        true,
        "apt-get download $(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/{print $2}') && banger kernel import cloud --deb linux-image-*.deb",
    ));
    let kvm_check = if !Path::new("/dev/kvm").exists() {
        DoctorCheck {
            name: "kvm".into(),
            status: CheckStatus::Optional,
            detail: "/dev/kvm is absent: VMs run under TCG (software emulation, slower)".into(),
            fix: Some("enable virtualisation (or nested virtualisation) for this host".into()),
        }
    } else {
        match newest.and_then(|k| kernels.boot_files(&k.name).ok()) {
            None => DoctorCheck {
                name: "kvm".into(),
                status: CheckStatus::Optional,
                detail:
                    "/dev/kvm exists; whether a guest boots is unknown until a kernel is imported"
                        .into(),
                fix: Some("import a kernel, then run banger doctor again".into()),
            },
            Some(boot) => match banger_vmm::qemu::kvm_usable(
                &boot.kernel,
                Path::new(banger_vmm::initramfs::DEFAULT_BUSYBOX),
                Duration::from_secs(15),
            ) {
                Ok(probe) if probe.usable => DoctorCheck {
                    name: "kvm".into(),
                    status: CheckStatus::Ok,
                    detail: format!("a probe guest booted under KVM ({})", probe.detail),
                    fix: None,
                },
                Ok(probe) => DoctorCheck {
                    name: "kvm".into(),
                    status: CheckStatus::Optional,
                    detail: format!(
                        "/dev/kvm opens but a guest does not boot ({}); VMs run under TCG",
                        probe.detail
                    ),
                    fix: Some("use a host whose KVM runs unmodified Linux guests".into()),
                },
                Err(e) => DoctorCheck {
                    name: "kvm".into(),
                    status: CheckStatus::Optional,
                    detail: format!("probe failed: {e:#}; VMs run under TCG"),
                    fix: None,
                },
            },
        }
    };
    let kvm: Result<String, String> = if kvm_check.status == CheckStatus::Ok {
        Ok(kvm_check.detail.clone())
    } else {
        Err(kvm_check.detail.clone())
    };
    checks.push(kvm_check);
    let route = TapRoute::probe(vms.config());
    checks.push(tap_route_check(&route));
    checks.extend(network_checks(tap_required, &route));
    checks.extend(policy_checks(vms, &route));
    checks.push(backend_check(vms, kvm, &route));
    checks
}

/// Who jails Firecracker: this root daemon with its `jailer_bin`, bangerd-root with its
/// own jailer (priv.vmm.launch), or nobody (Firecracker then runs unjailed as this uid).
fn jailer_check(vms: &VmService, firecracker_required: bool) -> DoctorCheck {
    let name = "jailer (Firecracker's confinement)";
    match JailRoute::probe(vms.config()) {
        JailRoute::Direct => check(
            name,
            vms.jailer_binary().and_then(|bin| {
                let version = version_of(bin.to_str()?, "--version")?;
                Some(format!("direct: bangerd is root and runs {version} ({})", bin.display()))
            }),
            firecracker_required,
            "install Firecracker's jailer (same release as firecracker) on PATH or set jailer_bin in config.toml; a root bangerd runs Firecracker only through it",
        ),
        JailRoute::Helper { client, jailer } => DoctorCheck {
            name: name.into(),
            status: CheckStatus::Ok,
            detail: format!(
                "through bangerd-root at {}: its jailer {jailer} runs Firecracker chrooted, in its own cgroup and under seccomp, as this uid",
                client.socket().display()
            ),
            fix: None,
        },
        JailRoute::Unjailed(why) => DoctorCheck {
            name: name.into(),
            status: CheckStatus::Optional,
            detail: format!("unavailable, Firecracker would run unjailed as this uid: {why}"),
            fix: Some(
                "run bangerd as root, or start bangerd-root for this user (banger system install) with Firecracker's jailer and firecracker on its PATH"
                    .into(),
            ),
        },
    }
}

/// The tools and privileges TAP networking needs, then whether it is possible as a whole.
/// Who does TAP networking's privileged steps: bangerd itself (root), bangerd-root, or
/// nobody, and why.
fn tap_route_check(route: &TapRoute) -> DoctorCheck {
    match route {
        TapRoute::Direct => DoctorCheck {
            name: "tap privileges".into(),
            status: CheckStatus::Ok,
            detail: "direct: bangerd is root and runs ip and nft itself".into(),
            fix: None,
        },
        TapRoute::Helper(helper) => DoctorCheck {
            name: "tap privileges".into(),
            status: CheckStatus::Ok,
            detail: format!(
                "through bangerd-root at {}: it creates the bridge, NAT, guard rules and TAP devices (owned by this uid) for this unprivileged bangerd",
                helper.socket().display()
            ),
            fix: None,
        },
        TapRoute::Unavailable(why) => DoctorCheck {
            name: "tap privileges".into(),
            status: CheckStatus::Optional,
            detail: format!("unavailable: {why}"),
            fix: Some(
                "run bangerd as root, or start bangerd-root for this user (banger system install) and set root_helper_socket if it is not the default"
                    .into(),
            ),
        },
    }
}

fn network_checks(tap_required: bool, route: &TapRoute) -> Vec<DoctorCheck> {
    let ip = version_of("ip", "-V");
    let nat = version_of("nft", "--version").or_else(|| {
        version_of("iptables", "--version").map(|v| format!("{v} (nft is not installed)"))
    });
    let cap = route.capability();
    let mut missing = Vec::new();
    if !cap.root && !cap.helper {
        missing.push("bangerd is not root and bangerd-root does not answer");
    }
    if !cap.tun {
        missing.push("/dev/net/tun is missing");
    }
    if ip.is_none() {
        missing.push("no ip (iproute2)");
    }
    if nat.is_none() {
        missing.push("neither nft nor iptables");
    }
    let bridge = if missing.is_empty() {
        DoctorCheck {
            name: "bridge/NAT networking".into(),
            status: CheckStatus::Ok,
            detail: format!(
                "{}, /dev/net/tun, ip and NAT tools: network = \"auto\" gives VMs a TAP on bridge {} with NAT",
                if cap.root { "root" } else { "bangerd-root" },
                network::BRIDGE
            ),
            fix: None,
        }
    } else {
        DoctorCheck {
            name: "bridge/NAT networking".into(),
            status: if tap_required {
                CheckStatus::Missing
            } else {
                CheckStatus::Optional
            },
            detail: format!(
                "{}: VMs use QEMU user-mode networking (outbound only; Firecracker needs TAP)",
                missing.join(", ")
            ),
            fix: Some(
                "run bangerd as root or with bangerd-root (banger system install) on a host with /dev/net/tun, and apt-get install iproute2 nftables"
                    .into(),
            ),
        }
    };
    vec![
        check(
            "ip (iproute2)",
            ip,
            tap_required,
            "apt-get install iproute2",
        ),
        check("nft (NAT)", nat, tap_required, "apt-get install nftables"),
        bridge,
    ]
}

/// Which VMM the `vmm` setting picks on this host, or why it cannot.
fn backend_check(vms: &VmService, kvm: Result<String, String>, route: &TapRoute) -> DoctorCheck {
    let config = vms.config();
    let setting = config.vmm.unwrap_or_default();
    let tap = network::resolve_mode(config.network.unwrap_or_default(), route.capability())
        .is_ok_and(|m| m == network::NetworkMode::Tap);
    let host = banger_vmm::backend::HostFacts {
        firecracker: vms.firecracker_binary(),
        kvm,
        tap_network: tap,
    };
    match banger_vmm::backend::select_backend(setting.into(), &host) {
        Ok(kind) => DoctorCheck {
            name: "vmm".into(),
            status: CheckStatus::Ok,
            detail: format!(
                "vmm = {:?} boots VMs with {kind}",
                format!("{setting:?}").to_lowercase()
            ),
            fix: None,
        },
        Err(e) => DoctorCheck {
            name: "vmm".into(),
            status: CheckStatus::Missing,
            detail: e.to_string(),
            fix: Some(
                "set vmm = \"auto\" or \"qemu\" in config.toml, or provide what Firecracker needs"
                    .into(),
            ),
        },
    }
}

/// What the network policy can enforce here, per mode: whether user-mode guests are kept
/// from the host, whether TAP guests are filtered, and which `egress` values each mode
/// honours. A root daemon that cannot guard user mode fails VM starts (so "missing");
/// an unprivileged one runs user-mode guests unguarded (so "optional", with the warning).
fn policy_checks(vms: &VmService, route: &TapRoute) -> Vec<DoctorCheck> {
    let config = vms.config();
    let cap = route.capability();
    let nft = banger_vmm::backend::find_on_path("nft").is_some();
    let user = config.vmm_user_name().to_owned();
    let user_check = if !cap.root {
        DoctorCheck {
            name: "user-mode isolation".into(),
            status: CheckStatus::Optional,
            detail: "bangerd is not root: user-mode guests reach the host's loopback (10.0.2.2) and every host address; egress \"deny\" still works, CIDR lists need tap".into(),
            fix: Some(format!("run bangerd as root with nftables and the user {user} (scripts/setup.sh)")),
        }
    } else {
        match (nft, config.vmm_user()) {
            (true, Ok(Some(vmm))) => DoctorCheck {
                name: "user-mode isolation".into(),
                status: CheckStatus::Ok,
                detail: format!("QEMU runs as {user} (uid {}); nft table inet {} rejects its traffic to loopback, host addresses and {}; egress: allow or deny", vmm.uid, network::GUARD_TABLE, network::BRIDGE),
                fix: None,
            },
            (nft, uid) => DoctorCheck {
                name: "user-mode isolation".into(),
                status: CheckStatus::Missing,
                detail: match (nft, uid) {
                    (false, _) => "nft is not installed: user-mode VMs do not start".into(),
                    (_, Err(e)) => format!("{e}: user-mode VMs do not start"),
                    _ => format!("vmm_user {user:?} cannot be looked up: user-mode VMs do not start"),
                },
                fix: Some(format!("apt-get install nftables; useradd --system --no-create-home --shell /usr/sbin/nologin {user}")),
            },
        }
    };
    let tap_check = DoctorCheck {
        name: "tap-mode filtering".into(),
        status: if cap.possible() && nft {
            CheckStatus::Ok
        } else {
            CheckStatus::Optional
        },
        detail: if cap.possible() && nft {
            format!("nft tables inet/bridge {}: no guest traffic to the host, VM-to-VM blocked (isolated bridge ports), spoofed MAC/IP dropped; egress: allow, deny or CIDR list", network::GUARD_TABLE)
        } else {
            "TAP networking is not available here (root or bangerd-root, /dev/net/tun and nft needed)".into()
        },
        fix: None,
    };
    vec![user_check, tap_check]
}
