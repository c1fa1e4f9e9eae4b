//! SSH into VMs without a host port: `vm.ssh_proxy` runs `sshd -i` in the guest over an
//! agent session (its stdin and stdout are the SSH connection's bytes, paced by the
//! agent's flow control), so OpenSSH reaches a VM with `ProxyCommand banger vm ssh-proxy
//! NAME` in any network mode. `vm.ssh_config` says what a `Host banger.NAME` entry needs.
//!
//! Keys: one ed25519 key per installation (`<state>/ssh/id_ed25519`, 0600, generated once
//! with `ssh-keygen`), whose public half every VM's root accepts; and one host key per VM
//! (`<vm dir>/ssh_host_ed25519_key`), pinned in `<state>/ssh/known_hosts` under the VM's
//! alias, so host key checking stays strict. Both are written into the VM's own disk
//! under `/.banger/ssh/` before each boot (the guest never chooses a host path), and the
//! guest's sshd is pointed at them on its command line, so neither the image's
//! `sshd_config` nor its `/root/.ssh` is used or changed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use banger_agent::proto::{ExecRequest, ExitStatus};
use banger_api::{ExecResult, SshHost, VmInfo, VmSshConfigParams, VmSshConfigResult};

use super::exec::Stdio;
use super::VmService;
use crate::services::tool;
use crate::services::CallContext;
use crate::{ServiceError, ServiceResult};

/// The guest directory holding what the guest's sshd is given.
const GUEST_SSH_DIR: &str = "/.banger/ssh";
/// The VM's host key in the guest.
const GUEST_HOST_KEY: &str = "/.banger/ssh/ssh_host_ed25519_key";
/// The install's public key in the guest, as the only authorized key.
const GUEST_AUTHORIZED_KEYS: &str = "/.banger/ssh/authorized_keys";
/// The VM's host key in its directory on the host.
const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
/// Where images keep sshd, in the order looked at.
const SSHD_PATHS: [&str; 3] = ["/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"];
/// The user `ssh banger.NAME` logs in as.
const SSH_USER: &str = "root";
/// The most a key file read back from disk may hold (an ed25519 public key is ~100
/// bytes).
const MAX_KEY_FILE: u64 = 16 * 1024;

impl VmService {
    /// The install's key pair directory, `<state>/ssh` (0700).
    fn ssh_dir(&self) -> PathBuf {
        self.layout.state_dir.join("ssh")
    }

    /// The install's private key, generated once (ed25519, no passphrase, 0600).
    fn install_key(&self) -> anyhow::Result<PathBuf> {
        let dir = self.ssh_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
        let key = dir.join("id_ed25519");
        if !key.exists() {
            keygen(&key, "banger")?;
        }
        Ok(key)
    }

    /// The VM's host key, generated at its first boot with ssh.
    fn host_key(&self, vm: &VmInfo) -> anyhow::Result<PathBuf> {
        let key = Path::new(&vm.dir).join(HOST_KEY_FILE);
        if !key.exists() {
            keygen(&key, &format!("banger.{}", vm.name))?;
        }
        Ok(key)
    }

    /// Before a boot: writes the install's public key and the VM's host key into its disk
    /// (a stopped VM's; nothing runs on it).
    pub(super) fn install_ssh_keys(&self, vm: &VmInfo, disk: &Path) -> anyhow::Result<()> {
        let public = with_extension_pub(&self.install_key()?);
        let host_key = self.host_key(vm)?;
        let script = format!(
            "mkdir /.banger\nmkdir {GUEST_SSH_DIR}\nsif {GUEST_SSH_DIR} mode 040700\nsif {GUEST_SSH_DIR} uid 0\nsif {GUEST_SSH_DIR} gid 0\n\
             rm {GUEST_AUTHORIZED_KEYS}\nwrite {} {GUEST_AUTHORIZED_KEYS}\nsif {GUEST_AUTHORIZED_KEYS} mode 0100600\nsif {GUEST_AUTHORIZED_KEYS} uid 0\nsif {GUEST_AUTHORIZED_KEYS} gid 0\n\
             rm {GUEST_HOST_KEY}\nwrite {} {GUEST_HOST_KEY}\nsif {GUEST_HOST_KEY} mode 0100600\nsif {GUEST_HOST_KEY} uid 0\nsif {GUEST_HOST_KEY} gid 0\n",
            public.display(),
            host_key.display()
        );
        let script_path = disk.with_extension("ssh.debugfs");
        std::fs::write(&script_path, script)
            .with_context(|| format!("write {}", script_path.display()))?;
        let result = tool::run(
            Command::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(&script_path)
                .arg(disk),
            "debugfs (install the ssh keys)",
        )
        .map(drop);
        let _ = std::fs::remove_file(&script_path);
        result
    }

    /// Writes the install's public key (as the only authorized key) and the VM's host key
    /// into the running guest's `/.banger/ssh` (root, 0700 / 0600), through the agent.
    fn upload_ssh_keys(
        &self,
        client: &banger_vmm::agent::AgentClient,
        vm: &VmInfo,
    ) -> anyhow::Result<()> {
        let public = read_small(&with_extension_pub(&self.install_key()?))?;
        let host_key = read_small(&self.host_key(vm)?)?;
        let mut tar = tar::Builder::new(Vec::new());
        let header = banger_io::tar_entry::root_owned_header;
        let dir = GUEST_SSH_DIR.rsplit('/').next().unwrap_or("ssh");
        let file = |path: &str| path.rsplit('/').next().unwrap_or(path).to_owned();
        let mut h = header(tar::EntryType::Directory, 0o700, 0);
        tar.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
        for (path, body) in [
            (GUEST_AUTHORIZED_KEYS, &public),
            (GUEST_HOST_KEY, &host_key),
        ] {
            let mut h = header(tar::EntryType::Regular, 0o600, body.len());
            tar.append_data(&mut h, format!("{dir}/{}", file(path)), body.as_bytes())?;
        }
        let bytes = tar.into_inner()?;
        client.upload_tar(&bytes[..], Path::new("/.banger"))?;
        Ok(())
    }

    /// `vm.ssh_config`: the entries of every VM (or the one named), with the host keys
    /// pinned in the install's known-hosts file, which this rewrites. A VM that never
    /// booted has no host key yet and is left out.
    pub fn ssh_config(&self, params: &VmSshConfigParams) -> ServiceResult<VmSshConfigResult> {
        let identity = self.install_key()?;
        let every = self.list()?;
        let mut hosts = Vec::new();
        for vm in &every {
            let key = Path::new(&vm.dir).join(HOST_KEY_FILE);
            let Ok(text) = read_small(&with_extension_pub(&key)) else {
                continue;
            };
            // "ssh-ed25519 AAAA… comment": the type and the key.
            let host_key = text
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            hosts.push(SshHost {
                alias: format!("banger.{}", vm.name),
                vm: vm.name.clone(),
                user: SSH_USER.into(),
                host_key,
            });
        }
        let known_hosts = self.ssh_dir().join("known_hosts");
        let text: String = hosts
            .iter()
            .map(|h| format!("{} {}\n", h.alias, h.host_key))
            .collect();
        let temp = known_hosts.with_extension("tmp");
        std::fs::write(&temp, text)
            .and_then(|()| std::fs::rename(&temp, &known_hosts))
            .with_context(|| format!("write {}", known_hosts.display()))?;
        if let Some(name) = &params.name {
            let vm = self.show(name)?;
            hosts.retain(|h| h.vm == vm.name);
            if hosts.is_empty() {
                return Err(ServiceError::bad_request(format!(
                    "VM {name:?} has no ssh host key yet: start it once (banger vm start {name})"
                )));
            }
        }
        Ok(VmSshConfigResult {
            identity_file: identity.display().to_string(),
            known_hosts_file: known_hosts.display().to_string(),
            hosts,
        })
    }

    /// `vm.ssh_proxy`: finds sshd in the guest, then runs `sshd -i` with the caller's
    /// input as the connection's client half (see the module docs).
    pub fn ssh_proxy(&self, ctx: &CallContext, name: &str) -> ServiceResult<ExecResult> {
        let vm = self.show(name)?;
        let client = self.agent(&vm)?;
        // The keys travel through the agent on every connection: a qcow2 overlay (or a
        // warm-restored VM) has no disk debugfs could have written them into before boot.
        self.upload_ssh_keys(&client, &vm)
            .with_context(|| format!("install the ssh keys in VM {name:?}"))?;
        let sshd = find_sshd(&client).with_context(|| format!("look for sshd in VM {name:?}"))?;
        let Some(sshd) = sshd else {
            return Err(ServiceError::bad_request(format!(
                "image {:?} of VM {name:?} has no sshd (looked for {}): install openssh-server in the image",
                vm.image,
                SSHD_PATHS.join(", ")
            )));
        };
        let argv: Vec<String> = [
            sshd.as_str(),
            // inetd mode: one connection on stdin/stdout; logs on stderr (-e).
            "-i",
            "-e",
            // Not the image's config: only what is given here.
            "-f",
            "/dev/null",
            "-h",
            GUEST_HOST_KEY,
            "-o",
            &format!("AuthorizedKeysFile={GUEST_AUTHORIZED_KEYS}"),
            "-o",
            "PermitRootLogin=prohibit-password",
            "-o",
            "PasswordAuthentication=no",
            "-o",
            "KbdInteractiveAuthentication=no",
            // The key files are banger's, written with the right modes; the image's
            // /root may not be.
            "-o",
            "StrictModes=no",
            "-o",
            "PidFile=none",
            "-o",
            "LogLevel=ERROR",
            // scp, sftp and VS Code's file transfers without an sftp-server binary.
            "-o",
            "Subsystem=sftp internal-sftp",
        ]
        .map(String::from)
        .to_vec();
        let stdio = Stdio {
            stdin: true,
            tty: None,
        };
        self.exec_on(ctx, &client, &vm.name, &argv, "/", stdio)
    }
}

/// The first of [`SSHD_PATHS`] that is an executable in the guest (after making the
/// privilege separation directory sshd insists on), or `None`.
fn find_sshd(client: &banger_vmm::agent::AgentClient) -> anyhow::Result<Option<String>> {
    let script = format!(
        "for p in {}; do if [ -x \"$p\" ]; then mkdir -p /run/sshd; echo \"$p\"; exit 0; fi; done; exit 1",
        SSHD_PATHS.join(" ")
    );
    let request = ExecRequest::new(["/bin/sh", "-c", script.as_str()]);
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = client.exec_with(
        &request,
        |_| Ok(()),
        &mut Bounded(&mut stdout),
        &mut Bounded(&mut stderr),
    )?;
    Ok(match status {
        ExitStatus::Code(0) => Some(String::from_utf8_lossy(&stdout).trim().to_owned())
            .filter(|p| SSHD_PATHS.contains(&p.as_str())),
        _ => None,
    })
}

/// Keeps the first KiB written and drops the rest: what the guest says here is only
/// looked at, never trusted to be small.
struct Bounded<'a>(&'a mut Vec<u8>);

impl std::io::Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = 1024usize.saturating_sub(self.0.len());
        self.0.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `ssh-keygen -t ed25519` into `path` (and `path.pub`), no passphrase; the private key
/// is 0600 (ssh-keygen's own mode, checked).
fn keygen(path: &Path, comment: &str) -> anyhow::Result<()> {
    if banger_vmm::backend::find_on_path("ssh-keygen").is_none() {
        bail!("ssh-keygen is not installed: ssh access to VMs needs it (apt-get install openssh-client)");
    }
    tool::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
        &format!("ssh-keygen (generate {})", path.display()),
    )?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))
}

fn with_extension_pub(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

fn read_small(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_KEY_FILE).read_to_string(&mut text))
        .with_context(|| format!("read {}", path.display()))?;
    Ok(text)
}
