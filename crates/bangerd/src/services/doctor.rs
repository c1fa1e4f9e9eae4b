//! `banger doctor`: each requirement of banger on this host, checked by trying it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use banger_api::DoctorCheck;

use crate::services::{KernelService, VmService};

fn version_of(program: &str, arg: &str) -> Option<String> {
    let out = Command::new(program).arg(arg).output().ok()?;
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
            status: "ok".into(),
            detail,
            fix: None,
        },
        None => DoctorCheck {
            name: name.into(),
            status: if required { "missing" } else { "optional" }.into(),
            detail: "not found".into(),
            fix: Some(fix.into()),
        },
    }
}

/// Runs every check. The KVM check boots the newest kernel briefly (bounded), because an
/// openable /dev/kvm does not prove a Linux guest can run.
pub fn diagnose(kernels: &KernelService, vms: &VmService) -> Vec<DoctorCheck> {
    let mut checks = vec![
        check(
            "qemu-system-x86_64",
            version_of("qemu-system-x86_64", "--version"),
            true,
            "apt-get install qemu-system-x86",
        ),
        check(
            "firecracker",
            version_of("firecracker", "--version"),
            false,
            "install firecracker on PATH to use it where KVM works (QEMU is used otherwise)",
        ),
        check("mkfs.ext4", version_of("mkfs.ext4", "-V"), true, "apt-get install e2fsprogs"),
        check("debugfs", version_of("debugfs", "-V"), true, "apt-get install e2fsprogs"),
        check(
            "busybox (initramfs)",
            Path::new(banger_vmm::initramfs::DEFAULT_BUSYBOX)
                .is_file()
                .then(|| banger_vmm::initramfs::DEFAULT_BUSYBOX.to_owned()),
            true,
            "apt-get install busybox-static",
        ),
        check(
            "git (workspace copies)",
            version_of("git", "--version"),
            false,
            "apt-get install git (without it vm run copies every file of PATH)",
        ),
        check(
            "guest agent",
            vms.agent_path().ok().map(|p| p.display().to_string()),
            true,
            "cargo build --release -p banger-agent --target x86_64-unknown-linux-musl, then set agent_bin in config.toml",
        ),
    ];
    let newest = kernels.list().ok().and_then(|k| k.into_iter().next());
    checks.push(check(
        "kernel",
        newest.as_ref().map(|k| format!("{} ({})", k.name, k.version)),
        true,
        "apt-get download $(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/{print $2}') && banger kernel import cloud --deb linux-image-*.deb",
    ));
    let kvm = if !Path::new("/dev/kvm").exists() {
        DoctorCheck {
            name: "kvm".into(),
            status: "optional".into(),
            detail: "/dev/kvm is absent: VMs run under TCG (software emulation, slower)".into(),
            fix: Some("enable virtualisation (or nested virtualisation) for this host".into()),
        }
    } else {
        match newest.and_then(|k| kernels.boot_files(&k.name).ok()) {
            None => DoctorCheck {
                name: "kvm".into(),
                status: "optional".into(),
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
                    status: "ok".into(),
                    detail: format!("a probe guest booted under KVM ({})", probe.detail),
                    fix: None,
                },
                Ok(probe) => DoctorCheck {
                    name: "kvm".into(),
                    status: "optional".into(),
                    detail: format!(
                        "/dev/kvm opens but a guest does not boot ({}); VMs run under TCG",
                        probe.detail
                    ),
                    fix: Some("use a host whose KVM runs unmodified Linux guests".into()),
                },
                Err(e) => DoctorCheck {
                    name: "kvm".into(),
                    status: "optional".into(),
                    detail: format!("probe failed: {e:#}; VMs run under TCG"),
                    fix: None,
                },
            },
        }
    };
    checks.push(kvm);
    let root = rustix::process::geteuid().is_root();
    let tun = Path::new("/dev/net/tun").exists();
    checks.push(DoctorCheck {
        name: "bridge/NAT networking".into(),
        status: if root && tun { "ok" } else { "optional" }.into(),
        detail: match (root, tun) {
            (true, true) => {
                "root and /dev/net/tun: TAP + bridge possible; VMs use QEMU user-mode networking"
                    .into()
            }
            (false, _) => "not root: VMs use QEMU user-mode networking (outbound only)".into(),
            (true, false) => "/dev/net/tun is missing: user-mode networking only".into(),
        },
        fix: (!(root && tun))
            .then(|| "run bangerd as root on a host with /dev/net/tun for TAP networking".into()),
    });
    checks
}
