//! `priv.vmm.launch`: Firecracker in its jailer for the owner's bangerd.
//!
//! The jailer needs root; the owner's bangerd does not have it. It sends, with the
//! request, open descriptors for what the jail holds (see
//! `banger_vmm::helper_jail`): the kernel, an initrd, the VM's disk, the console and the
//! stderr sink. The helper never opens a path the caller names. It checks each
//! descriptor (a regular file opened for reading, the disk opened read-write, the sinks
//! writable pipes or files; never an `O_PATH` handle), hard-links the files into a fresh
//! jail under its own `--jail-dir` (a kernel or initrd on another filesystem is copied,
//! up to [`MAX_BOOT_FILE_BYTES`]; the disk must be linked, or the guest's writes would be
//! lost), and runs its own configured `jailer` with its own `firecracker`, dropping to the
//! owner's uid and gid. Nothing on the jailer's command line comes from the caller except
//! the instance id, which must be a VM id (16 lowercase hex digits). When Firecracker
//! exits, the helper reaps it and removes the jail and its cgroup.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, OFlags};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{err, PrivError, PrivErrorKind};

/// Largest kernel or initrd copied into a jail when it cannot be hard-linked (it lives on
/// another filesystem than the jail directory).
pub const MAX_BOOT_FILE_BYTES: u64 = 512 << 20;

/// Length of a VM id, the only instance id a jail may have: lowercase hex.
pub const VM_ID_LEN: usize = 16;

/// How long a jail's cgroup may take to empty after Firecracker was reaped.
const CGROUP_EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

/// One descriptor of a `priv.vmm.launch` request: the closed set, in `files` in the
/// order the descriptors were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JailFile {
    /// The ELF kernel (required).
    Kernel,
    /// An initrd.
    Initrd,
    /// The VM's root disk, opened read-write.
    Disk,
    /// Firecracker's stdout: the guest's serial console (required).
    Console,
    /// Firecracker's stderr (required).
    Stderr,
}

/// Most descriptors one request may carry: one of each [`JailFile`].
pub const MAX_FDS: usize = 5;

/// Params of `priv.vmm.launch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchParams {
    /// The VM id, Firecracker's `--id`.
    pub id: String,
    /// What each sent descriptor is, in order.
    pub files: Vec<JailFile>,
}

/// What the helper jails with, fixed when it starts.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// Where jails are made (root-owned); must share a filesystem with the owner's VM disks.
    pub dir: PathBuf,
    /// The `firecracker` binary the jailer copies into each jail.
    pub firecracker: PathBuf,
    /// The `jailer` binary.
    pub jailer: PathBuf,
}

/// The jails of one helper and the ids whose Firecracker still runs.
#[derive(Debug)]
pub struct Jails {
    /// The configuration.
    pub config: JailConfig,
    live: Arc<Mutex<HashSet<String>>>,
}

/// Checks an instance id: exactly [`VM_ID_LEN`] lowercase hex digits (banger's VM ids).
pub fn check_vm_id(id: &str) -> Result<(), PrivError> {
    let ok = id.len() == VM_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if ok {
        Ok(())
    } else {
        Err(err(
            PrivErrorKind::InvalidVmId,
            format!("VM id {id:?} is not {VM_ID_LEN} lowercase hex digits"),
        ))
    }
}

/// How a descriptor must have been opened.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    ReadWrite,
    Write,
}

/// Checks that `fd`, sent as `what`, is a regular file (or, for a sink, a pipe) opened
/// with `access`, and not an `O_PATH` handle (which proves no right to the file).
fn check_fd(fd: &OwnedFd, what: JailFile, access: Access) -> Result<(), PrivError> {
    let bad = |why: String| err(PrivErrorKind::BadDescriptor, format!("{what:?}: {why}"));
    let flags = rustix::fs::fcntl_getfl(fd).map_err(|e| bad(format!("fcntl: {e}")))?;
    if flags.contains(OFlags::PATH) {
        return Err(bad("an O_PATH handle, not an open file".into()));
    }
    let mode = flags & OFlags::RWMODE;
    let ok = match access {
        Access::Read => mode == OFlags::RDONLY || mode == OFlags::RDWR,
        Access::ReadWrite => mode == OFlags::RDWR,
        Access::Write => mode == OFlags::WRONLY || mode == OFlags::RDWR,
    };
    if !ok {
        return Err(bad(format!("opened {mode:?}, not as {what:?} needs")));
    }
    let stat = rustix::fs::fstat(fd).map_err(|e| bad(format!("fstat: {e}")))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    let kind_ok = match access {
        Access::Write => matches!(kind, FileType::RegularFile | FileType::Fifo),
        _ => kind == FileType::RegularFile,
    };
    if !kind_ok {
        return Err(bad(format!("a {kind:?}, not a regular file")));
    }
    Ok(())
}

fn failed(what: impl std::fmt::Display, e: impl std::fmt::Display) -> PrivError {
    err(PrivErrorKind::Failed, format!("{what}: {e}"))
}

/// Puts `fd` into the jail directory `root` as `name`: a hard link of the caller's file
/// (`linkat` of the descriptor itself), else, where `copy_limit` allows, a copy.
fn place(
    fd: &OwnedFd,
    root: &File,
    root_path: &Path,
    name: &str,
    copy_limit: Option<u64>,
) -> Result<(), PrivError> {
    let linked = rustix::fs::linkat(fd, "", root, name, AtFlags::EMPTY_PATH);
    match (linked, copy_limit) {
        (Ok(()), _) => Ok(()),
        (Err(rustix::io::Errno::XDEV), Some(limit)) => {
            let size = rustix::fs::fstat(fd)
                .map_err(|e| failed(format!("fstat {name}"), e))?
                .st_size as u64;
            if size > limit {
                return Err(err(
                    PrivErrorKind::BadDescriptor,
                    format!("{name}: {size} bytes to copy into the jail, over {limit} (MAX_BOOT_FILE_BYTES)"),
                ));
            }
            let dest = root_path.join(name);
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(OFlags::NOFOLLOW.bits() as i32)
                .open(&dest)
                .map_err(|e| failed(format!("create {}", dest.display()), e))?;
            let mut input = File::from(
                fd.try_clone()
                    .map_err(|e| failed(format!("dup {name}"), e))?,
            );
            // The caller's offset may be anywhere; read from the start, at most `limit`.
            std::io::Seek::rewind(&mut input).map_err(|e| failed(format!("seek {name}"), e))?;
            let copied = std::io::copy(&mut (&mut input).take(limit), &mut out)
                .map_err(|e| failed(format!("copy {name} into the jail"), e))?;
            out.flush()
                .map_err(|e| failed(format!("write {}", dest.display()), e))?;
            if copied != size {
                return Err(failed(
                    format!("copy {name} into the jail"),
                    format!("{copied} of {size} bytes"),
                ));
            }
            Ok(())
        }
        (Err(rustix::io::Errno::XDEV), None) => Err(failed(
            format!("hard-link the VM's disk into the jail {}", root_path.display()),
            "it is on another filesystem than the helper's --jail-dir (the guest's writes must land in the VM's own disk)",
        )),
        (Err(e), _) => Err(failed(format!("link {name} into the jail"), e)),
    }
}

impl Jails {
    /// Jails with `config`.
    pub fn new(config: JailConfig) -> Jails {
        Jails {
            config,
            live: Arc::default(),
        }
    }

    /// The directory of instance `id`'s jail (the jailer's `<base>/<exec name>/<id>`).
    fn instance_dir(&self, id: &str) -> PathBuf {
        banger_vmm::firecracker::jail_root(&self.config.dir, &self.config.firecracker, id)
            .parent()
            .expect("a jail root has a parent")
            .to_path_buf()
    }

    /// `priv.vmm.launch` for `owner` (uid, gid), with the descriptors that came with it.
    pub fn launch(
        &self,
        owner: (u32, u32),
        value: Value,
        fds: Vec<OwnedFd>,
    ) -> Result<Value, PrivError> {
        let p: LaunchParams = crate::params("priv.vmm.launch", value)?;
        check_vm_id(&p.id)?;
        if p.files.len() != fds.len() {
            return Err(err(
                PrivErrorKind::BadDescriptor,
                format!(
                    "files names {} descriptors but {} came with the request",
                    p.files.len(),
                    fds.len()
                ),
            ));
        }
        let mut by_kind: std::collections::HashMap<JailFile, OwnedFd> = Default::default();
        for (what, fd) in p.files.iter().copied().zip(fds) {
            let access = match what {
                JailFile::Kernel | JailFile::Initrd => Access::Read,
                JailFile::Disk => Access::ReadWrite,
                JailFile::Console | JailFile::Stderr => Access::Write,
            };
            check_fd(&fd, what, access)?;
            if by_kind.insert(what, fd).is_some() {
                return Err(err(
                    PrivErrorKind::BadDescriptor,
                    format!("{what:?} sent twice"),
                ));
            }
        }
        for required in [JailFile::Kernel, JailFile::Console, JailFile::Stderr] {
            if !by_kind.contains_key(&required) {
                return Err(err(
                    PrivErrorKind::BadDescriptor,
                    format!("no {required:?} descriptor"),
                ));
            }
        }
        if !self.live.lock().unwrap().insert(p.id.clone()) {
            return Err(err(
                PrivErrorKind::BadRequest,
                format!("firecracker {} is already running in its jail", p.id),
            ));
        }
        let launched = self.spawn(&p.id, owner, by_kind);
        if launched.is_err() {
            self.live.lock().unwrap().remove(&p.id);
            let _ = fs::remove_dir_all(self.instance_dir(&p.id));
        }
        launched
    }

    fn spawn(
        &self,
        id: &str,
        (uid, gid): (u32, u32),
        mut files: std::collections::HashMap<JailFile, OwnedFd>,
    ) -> Result<Value, PrivError> {
        use banger_vmm::firecracker::{self as fc, JAIL_API, JAIL_LOG};
        let c = &self.config;
        // The base is root's and only traversable by others: the owner reaches its
        // sockets through it, but cannot list or change it.
        for dir in [
            c.dir.clone(),
            c.dir.join(fc::exec_file_name(&c.firecracker)),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&dir)
                .map_err(|e| failed(format!("create {}", dir.display()), e))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o711))
                .map_err(|e| failed(format!("chmod {}", dir.display()), e))?;
        }
        // A jail of a Firecracker this helper no longer tracks (it restarted) holds
        // device nodes the jailer would fail to create again.
        let instance = self.instance_dir(id);
        if instance.exists() {
            fs::remove_dir_all(&instance)
                .map_err(|e| failed(format!("remove the old jail {}", instance.display()), e))?;
        }
        fc::remove_cgroups_of(&c.firecracker, id);
        let root = fc::jail_root(&c.dir, &c.firecracker, id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&root)
            .map_err(|e| failed(format!("create {}", root.display()), e))?;
        fc::copy_libraries_into(&c.firecracker, &root)
            .map_err(|e| failed("jail firecracker", e))?;
        let root_dir =
            File::open(&root).map_err(|e| failed(format!("open {}", root.display()), e))?;
        let take =
            |files: &mut std::collections::HashMap<JailFile, OwnedFd>, what| files.remove(&what);
        let kernel = take(&mut files, JailFile::Kernel).expect("checked");
        place(
            &kernel,
            &root_dir,
            &root,
            &fc::JAIL_KERNEL[1..],
            Some(MAX_BOOT_FILE_BYTES),
        )?;
        if let Some(initrd) = take(&mut files, JailFile::Initrd) {
            place(
                &initrd,
                &root_dir,
                &root,
                &fc::JAIL_INITRD[1..],
                Some(MAX_BOOT_FILE_BYTES),
            )?;
        }
        if let Some(disk) = take(&mut files, JailFile::Disk) {
            place(&disk, &root_dir, &root, &fc::JAIL_DISK[1..], None)?;
        }
        // Firecracker's logger opens an existing file only; the owner reads it.
        let log = root.join(&JAIL_LOG[1..]);
        let log_file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&log)
            .map_err(|e| failed(format!("create {}", log.display()), e))?;
        std::os::unix::fs::fchown(&log_file, Some(uid), Some(gid))
            .map_err(|e| failed(format!("chown {}", log.display()), e))?;
        let console = take(&mut files, JailFile::Console).expect("checked");
        let stderr = take(&mut files, JailFile::Stderr).expect("checked");
        let mut command = Command::new(&c.jailer);
        command
            .env_clear()
            .args(fc::jailer_args(id, &c.firecracker, (uid, gid), &c.dir))
            .arg("--")
            .arg("--api-sock")
            .arg(JAIL_API)
            .args(fc::logger_args(Path::new(JAIL_LOG)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(console))
            .stderr(Stdio::from(stderr))
            // Its own process group: signals aimed at the helper's spare the VMs.
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| failed(format!("spawn {}", c.jailer.display()), e))?;
        let pid = child.id();
        let live = Arc::clone(&self.live);
        let (id, firecracker) = (id.to_owned(), c.firecracker.clone());
        let dir = instance.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            // The jail's cgroup empties once the process is reaped.
            let deadline = Instant::now() + CGROUP_EMPTY_TIMEOUT;
            let cgroup_gone = || {
                ["/sys/fs/cgroup", "/sys/fs/cgroup/cpu"].iter().all(|base| {
                    !Path::new(base)
                        .join(fc::exec_file_name(&firecracker))
                        .join(&id)
                        .exists()
                })
            };
            loop {
                fc::remove_cgroups_of(&firecracker, &id);
                if cgroup_gone() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let removed = fs::remove_dir_all(&dir);
            live.lock().unwrap().remove(&id);
            eprintln!(
                "bangerd-root: firecracker {id} (pid {pid}) ended ({}); jail {} {}",
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                dir.display(),
                match removed {
                    Ok(()) => "removed".to_owned(),
                    Err(e) => format!("not removed: {e}"),
                }
            );
        });
        Ok(serde_json::json!({ "pid": pid, "root": root }))
    }
}
