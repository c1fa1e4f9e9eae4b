//! Firecracker in its jailer for a daemon that is not root: the jail is made by a
//! privileged helper (`bangerd-root`), the VM is configured here.
//!
//! The jailer needs root (chroot, mknod, cgroups, setuid), so an unprivileged daemon asks
//! the helper, through a [`JailLauncher`], to launch Firecracker for one instance id. What
//! the jail holds travels as open descriptors, never as paths: the kernel and initrd
//! (opened for reading), the VM's disk (opened read-write) and the console and stderr
//! sinks. The helper, running as root, therefore opens nothing a caller names: a caller
//! can only hand over files its own rights already opened. The helper links them into a
//! jail of its own directory, runs its own configured `jailer` and `firecracker`, drops
//! Firecracker to the caller's uid (so the caller can reach the API and vsock sockets and
//! keeps owning the disk), and returns the pid and the jail's root.
//!
//! From there on this is a root daemon's jailed Firecracker ([`crate::firecracker::Jailer`]):
//! the run directory's `firecracker.sock`, `vsock.sock` and `firecracker.log` are symlinks
//! into the jail, and the API calls of [`crate::firecracker::plan`] configure and start
//! the VM with the paths Firecracker sees inside it. The helper removes the jail and its
//! cgroup when Firecracker exits.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::{BackendKind, VmSpec, Vmm};
use crate::error::{Error, IoContext, Result};
use crate::firecracker::{
    api_socket, configure, console_sink, instance_id, link_run_dir_into_jail, plan, Firecracker,
    JAIL_DISK, JAIL_INITRD, JAIL_KERNEL, JAIL_VSOCK,
};

/// What the jail gets from the caller, as descriptors the caller opened.
#[derive(Debug)]
pub struct JailFiles {
    /// The ELF kernel, read-only.
    pub kernel: File,
    /// The initrd, read-only.
    pub initrd: Option<File>,
    /// The VM's root disk, read-write (the guest's writes land in it).
    pub disk: Option<File>,
    /// Firecracker's stdout: the guest's serial console.
    pub console: OwnedFd,
    /// Firecracker's (and the jailer's) stderr.
    pub stderr: OwnedFd,
}

/// A Firecracker the helper launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jailed {
    /// Its pid (the jailer execs Firecracker in place).
    pub pid: u32,
    /// The jail's root directory, `/` for Firecracker.
    pub root: PathBuf,
}

/// Who launches a jailed Firecracker for this process (bangerd's client of `bangerd-root`).
pub trait JailLauncher: Send + Sync + fmt::Debug {
    /// Launches Firecracker as instance `id` in a new jail holding `files`; the error says
    /// what the helper refused or what failed.
    fn launch(&self, id: &str, files: JailFiles) -> std::result::Result<Jailed, String>;
}

/// Firecracker, jailed by a [`JailLauncher`].
#[derive(Debug, Clone)]
pub struct HelperJailed {
    /// Console capping and the binary whose version is reported; `jailer` is unused (the
    /// helper runs its own).
    pub firecracker: Firecracker,
    /// The helper.
    pub launcher: Arc<dyn JailLauncher>,
}

/// Whether process `pid` has ended (gone, or a zombie its parent has not reaped yet).
fn ended(pid: u32) -> Option<String> {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => Some("exited".into()),
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim().chars().next());
            (state == Some('Z')).then(|| "exited".into())
        }
    }
}

impl Vmm for HelperJailed {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    fn binary(&self) -> &std::path::Path {
        &self.firecracker.binary
    }

    fn spawn_detached(&self, spec: &VmSpec) -> Result<u32> {
        // Validate before asking the helper for anything.
        plan(spec)?;
        let run = &spec.run_dir;
        fs::create_dir_all(run).ctx("create vm run dir", run)?;
        let mut inside = spec.clone();
        inside.kernel = JAIL_KERNEL.into();
        let kernel = File::open(&spec.kernel).ctx("open the kernel", &spec.kernel)?;
        let initrd = match &spec.initrd {
            Some(path) => {
                inside.initrd = Some(JAIL_INITRD.into());
                Some(File::open(path).ctx("open the initrd", path)?)
            }
            None => None,
        };
        let disk = match &spec.root_disk {
            Some(path) => {
                inside.root_disk = Some(JAIL_DISK.into());
                Some(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path)
                        .ctx("open the VM's disk", path)?,
                )
            }
            None => None,
        };
        if spec.agent_socket.is_some() {
            inside.agent_socket = Some(JAIL_VSOCK.into());
        }
        let calls = plan(&inside)?;
        let console = console_sink(self.firecracker.console_logger.as_ref(), run)?;
        let stderr_path = run.join("firecracker.stderr");
        let stderr: OwnedFd = File::create(&stderr_path)
            .ctx("create", &stderr_path)?
            .into();
        let id = instance_id(run);
        let jailed = self
            .launcher
            .launch(
                &id,
                JailFiles {
                    kernel,
                    initrd,
                    disk,
                    console,
                    stderr,
                },
            )
            .map_err(|e| Error::Vm(format!("bangerd-root could not jail firecracker {id}: {e}")))?;
        // The host-side names, unchanged for every caller (as a root daemon's jail has).
        let api = api_socket(run);
        let linked = link_run_dir_into_jail(spec, &jailed.root);
        let pid = jailed.pid;
        let configured =
            linked.and_then(|()| configure(&api, &calls, &stderr_path, || Ok(ended(pid))));
        if let Err(e) = configured {
            // Not our child: the helper reaps it and removes the jail.
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32)
                    .ok_or_else(|| Error::Vm(format!("bangerd-root returned pid {pid}")))?,
                rustix::process::Signal::Kill,
            );
            return Err(e);
        }
        Ok(pid)
    }
}
