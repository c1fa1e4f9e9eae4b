//! End-to-end: a real Debian cloud kernel, imported by us, boots a busybox rootfs under
//! QEMU and hands back the command's output and exit status.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use banger_vmm::initramfs::{self, InitramfsSpec, DEFAULT_BUSYBOX};
use banger_vmm::kernel::{self, KernelDir};
use banger_vmm::qemu::{self, Accel, Qemu, RunningVm, VmSpec};
use common::{cached_kernel, kernel_deb};

/// Imports `deb` into `into/kernel`, printing how long it took.
fn import(deb: &Path, into: &Path) -> KernelDir {
    let started = Instant::now();
    let k = kernel::import_deb(deb, &into.join("kernel"), kernel::GUEST_MODULES).unwrap();
    eprintln!("kernel import: {:?}", started.elapsed());
    k
}

#[test]
fn import_debian_kernel_resolves_virtio_modules_and_extracts_vmlinux() {
    let Some(deb) = kernel_deb() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let k = import(&deb, tmp.path());
    assert!(k.version().ends_with("-cloud-amd64"), "{}", k.version());
    let config = std::fs::read_to_string(k.config()).unwrap();
    assert!(config.contains("CONFIG_EXT4_FS=y"));
    let pos = |m: &str| {
        k.modules()
            .iter()
            .position(|x| x == m)
            .unwrap_or_else(|| panic!("{m} not in {:?}", k.modules()))
    };
    // The order HOST-NOTES measured as loadable, and each dependency before its user.
    assert!(pos("virtio_ring") < pos("virtio_mmio"));
    assert!(pos("virtio") < pos("virtio_mmio"));
    assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
    assert!(pos("failover") < pos("net_failover"));
    assert!(pos("net_failover") < pos("virtio_net"));
    assert!(pos("vsock") < pos("vmw_vsock_virtio_transport"));
    for m in k.modules() {
        let bytes = std::fs::read(k.module_path(m)).unwrap();
        assert!(
            bytes.starts_with(b"\x7fELF"),
            "{m} is not an uncompressed ELF"
        );
    }

    let started = Instant::now();
    let vmlinux = k.ensure_vmlinux().unwrap();
    eprintln!("vmlinux extraction: {:?}", started.elapsed());
    let elf = std::fs::read(vmlinux).unwrap();
    assert_eq!(&elf[..5], b"\x7fELF\x02", "64-bit ELF");
    assert_eq!(
        u16::from_le_bytes([elf[18], elf[19]]),
        62,
        "e_machine is x86-64"
    );
}

/// The package split as a user might have it: `dpkg-deb -x` into `into`, then the bzImage
/// and the modules tree imported without the package.
#[test]
fn import_files_from_an_unpacked_deb_matches_the_deb_import() {
    let Some(deb) = kernel_deb() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let from_deb = import(&deb, &tmp.path().join("a"));
    let unpacked = tmp.path().join("unpacked");
    banger_testkit::command::run_ok(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        "unpack the kernel package",
    );
    let version = from_deb.version();
    let files = kernel::KernelFiles {
        kernel: unpacked.join(format!("boot/vmlinuz-{version}")),
        config: None,
        modules: Some(unpacked.join(format!("lib/modules/{version}"))),
        version: None,
    };
    let started = Instant::now();
    let split = kernel::import_files(&files, &tmp.path().join("b"), kernel::GUEST_MODULES).unwrap();
    eprintln!("kernel import from files: {:?}", started.elapsed());
    // The version comes from the bzImage header here, from the file name in the .deb.
    assert_eq!(split.version(), version);
    assert_eq!(split.modules(), from_deb.modules());
    for m in split.modules() {
        assert_eq!(
            std::fs::read(split.module_path(m)).unwrap(),
            std::fs::read(from_deb.module_path(m)).unwrap(),
            "{m}"
        );
    }
    assert_eq!(
        std::fs::read(split.ensure_vmlinux().unwrap()).unwrap(),
        std::fs::read(from_deb.ensure_vmlinux().unwrap()).unwrap()
    );
    assert!(!split.config().exists());

    // The ELF alone: no modules, the version from its banner.
    let elf_only = kernel::KernelFiles {
        kernel: split.ensure_vmlinux().unwrap(),
        ..Default::default()
    };
    let bare =
        kernel::import_files(&elf_only, &tmp.path().join("c"), kernel::GUEST_MODULES).unwrap();
    assert_eq!(bare.version(), version);
    assert!(bare.modules().is_empty());
    assert_eq!(
        std::fs::read_to_string(bare.root().join("modules.load")).unwrap(),
        ""
    );
    assert!(!bare.vmlinuz().exists());
}

/// An ext4 image whose only content is a static busybox as /bin/sh.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let staging = dir.join("staging");
    std::fs::create_dir_all(staging.join("bin")).unwrap();
    std::fs::copy(DEFAULT_BUSYBOX, staging.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", staging.join("bin/sh")).unwrap();
    common::mkfs_ext4(dir, &staging, "32M")
}

#[test]
fn tcg_boot_runs_the_command_and_returns_its_output_and_exit_status() {
    let Some(k) = cached_kernel() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let initrd = tmp.path().join("initrd");
    initramfs::write_initramfs(
        &InitramfsSpec {
            busybox: DEFAULT_BUSYBOX.into(),
            kernel: Some(k.clone()),
        },
        &initrd,
    )
    .unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    let command = "echo \"hi from $(busybox uname -s) guest\"; busybox ls /dev/vda; exit 7";
    let spec = VmSpec {
        kernel: k.ensure_vmlinux().unwrap(),
        initrd: Some(initrd),
        cmdline: format!(
            "console=ttyS0 panic=-1 quiet {}",
            initramfs::command_param(command)
        ),
        root_disk: Some(rootfs),
        memory_mib: 512,
        vcpus: 1,
        net: Some(Default::default()),
        accel: Accel::Tcg,
        agent_socket: None,
        run_dir: tmp.path().join("run"),
    };

    let started = Instant::now();
    let mut vm = Qemu::default().start(&spec).unwrap();
    let marker = qemu::wait_for_console(&mut vm, initramfs::EXIT_MARKER, Duration::from_secs(60));
    let to_marker = started.elapsed();
    let status = vm.wait_timeout(Duration::from_secs(10)).unwrap();
    let to_exit = started.elapsed();
    let log = std::fs::read_to_string(vm.console_log()).unwrap();
    eprintln!(
        "--- console ---\n{log}\n--- qemu stderr ---\n{}",
        vm.stderr()
    );
    eprintln!("TCG boot: exit marker after {to_marker:?}, qemu exited after {to_exit:?}");
    marker.unwrap();

    assert!(status.expect("qemu powers off after the command").success());
    assert!(
        log.contains("hi from Linux guest"),
        "command output missing"
    );
    assert!(log.contains("/dev/vda"), "root disk missing");
    assert_eq!(initramfs::exit_status_from_console(&log), Some(7));
}

#[test]
fn kvm_probe_answers_within_its_bound() {
    let Some(k) = cached_kernel() else { return };
    let timeout = Duration::from_secs(8);
    let started = Instant::now();
    let probe = qemu::kvm_usable(&k.vmlinuz(), Path::new(DEFAULT_BUSYBOX), timeout).unwrap();
    let took = started.elapsed();
    eprintln!("kvm probe: {probe:?} in {took:?}");
    // Whether KVM works is the host's business; the promise is a bounded answer.
    assert!(
        took < timeout + Duration::from_secs(3),
        "probe took {took:?}"
    );
}

#[test]
fn stop_ends_a_running_vm_within_its_grace() {
    let Some(k) = cached_kernel() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let initrd = tmp.path().join("initrd");
    let spec = InitramfsSpec {
        busybox: DEFAULT_BUSYBOX.into(),
        kernel: None,
    };
    initramfs::write_initramfs(&spec, &initrd).unwrap();
    let mut vm = Qemu::default()
        .start(&VmSpec {
            kernel: k.vmlinuz(),
            initrd: Some(initrd),
            // No root disk and no probe flag: the init would wait for /dev/vda; we stop
            // it while the kernel is still booting.
            cmdline: "console=ttyS0 panic=-1".into(),
            root_disk: None,
            memory_mib: 256,
            vcpus: 1,
            net: None,
            accel: Accel::Tcg,
            agent_socket: None,
            run_dir: tmp.path().join("run"),
        })
        .unwrap();
    qemu::wait_for_console(&mut vm, "Linux version", Duration::from_secs(30)).unwrap();
    let pid = vm.pid();
    let started = Instant::now();
    vm.stop(Duration::from_millis(500)).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu {pid} still exists"
    );
}
