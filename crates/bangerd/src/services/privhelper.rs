//! The client side of `bangerd-root` (crates/bangerd-root): how a bangerd running as an
//! ordinary user asks for the privileged network steps. [`TapRoute`] is what the VM
//! service and the doctor use: a root daemon runs `ip` and `nft` itself
//! ([`TapRoute::Direct`]); an unprivileged one whose helper answers `priv.ping` sends
//! each step (bridge, NAT and guard rules, TAP, per-guest rules) to it
//! ([`TapRoute::Helper`]); otherwise TAP networking is unavailable, and the route says
//! why. The same client launches Firecracker in its jailer for an unprivileged daemon
//! ([`PrivClient`] is a [`banger_vmm::helper_jail::JailLauncher`]): the jail's files go
//! to the helper as open descriptors, never as paths.

use banger_api::Egress;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::config::Config;
use crate::services::network::{self, Subnet, TapCapability};

/// Where `bangerd-root` listens in a system install.
pub const DEFAULT_SOCKET: &str = "/run/banger-root/bangerd-root.sock";

/// The device a VMM opens to attach to its TAP.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// How long one helper call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest reply line read from the helper (its replies are a few hundred bytes).
pub const MAX_REPLY: u64 = 64 * 1024;

/// A connection-per-call client of the helper at one socket.
#[derive(Debug, Clone)]
pub struct PrivClient {
    socket: PathBuf,
}

impl PrivClient {
    /// The helper at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        PrivClient {
            socket: socket.into(),
        }
    }

    /// The helper at config `root_helper_socket`, default [`DEFAULT_SOCKET`].
    pub fn configured(config: &Config) -> Self {
        PrivClient::new(
            config
                .root_helper_socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        )
    }

    /// The helper at `socket` if it answers `priv.ping` for this uid.
    pub fn reachable(socket: &Path) -> Option<PrivClient> {
        let client = PrivClient::new(socket);
        client.ping().ok().map(|_| client)
    }

    /// The socket this client calls.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the helper serves this uid: its answer (`version`, `subnet`).
    pub fn ping(&self) -> anyhow::Result<Value> {
        self.call("priv.ping", serde_json::json!({}))
    }

    fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.call_with_fds(method, params, &[])
    }

    /// One call whose request line carries `fds` (`SCM_RIGHTS`, sent with its first byte).
    fn call_with_fds(
        &self,
        method: &str,
        params: Value,
        fds: &[BorrowedFd<'_>],
    ) -> anyhow::Result<Value> {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let what = || format!("{method} on {}", self.socket.display());
        let mut stream = UnixStream::connect(&self.socket).with_context(what)?;
        stream
            .set_read_timeout(Some(CALL_TIMEOUT))
            .with_context(what)?;
        let line = serde_json::json!({ "id": 1, "method": method, "params": params });
        let line = format!("{line}\n");
        let mut space = vec![0u8; rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            bail!(
                "{}: {} descriptors do not fit one message",
                what(),
                fds.len()
            );
        }
        let sent = rustix::net::sendmsg(
            &stream,
            &[std::io::IoSlice::new(line.as_bytes())],
            &mut control,
            SendFlags::empty(),
        )
        .with_context(what)?;
        // The descriptors went with the first byte; the rest of a long line follows.
        stream
            .write_all(&line.as_bytes()[sent..])
            .with_context(what)?;
        let mut reply = String::new();
        BufReader::new(std::io::Read::take(stream, MAX_REPLY))
            .read_line(&mut reply)
            .with_context(what)?;
        if !reply.ends_with('\n') {
            bail!(
                "{}: no whole reply line within {MAX_REPLY} bytes (MAX_REPLY)",
                what()
            );
        }
        let reply: Value = serde_json::from_str(&reply).with_context(what)?;
        if let Some(error) = reply.get("error") {
            bail!(
                "{}: {} ({})",
                what(),
                error["message"].as_str().unwrap_or_default(),
                error["kind"].as_str().unwrap_or_default()
            );
        }
        Ok(reply["result"].clone())
    }

    /// A TAP `bgr-<8 hex>` owned by the daemon's uid, on the bridge, up.
    pub fn tap_create(&self, name: &str) -> anyhow::Result<()> {
        self.call("priv.tap.create", serde_json::json!({ "name": name }))
            .map(drop)
    }

    /// Deletes the TAP `name`.
    pub fn tap_delete(&self, name: &str) -> anyhow::Result<()> {
        self.call("priv.tap.delete", serde_json::json!({ "name": name }))
            .map(drop)
    }

    /// The bridge `banger0` with `address` (the configured `bridge_address`).
    pub fn bridge_ensure(&self, address: &str) -> anyhow::Result<()> {
        self.call(
            "priv.bridge.ensure",
            serde_json::json!({ "address": address }),
        )
        .map(drop)
    }

    /// The guard entries of the guest on `tap` with address `ip` and its egress policy
    /// (network::admit_guest, in the helper).
    pub fn guest_admit(&self, tap: &str, ip: Ipv4Addr, egress: &Egress) -> anyhow::Result<()> {
        self.call(
            "priv.guest.admit",
            serde_json::json!({ "tap": tap, "ip": ip.to_string(), "egress": egress }),
        )
        .map(drop)
    }

    /// Removes what [`PrivClient::guest_admit`] installed.
    pub fn guest_release(&self, tap: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
        self.call(
            "priv.guest.release",
            serde_json::json!({ "tap": tap, "ip": ip.to_string() }),
        )
        .map(drop)
    }
}

impl banger_vmm::helper_jail::JailLauncher for PrivClient {
    fn launch(
        &self,
        id: &str,
        files: banger_vmm::helper_jail::JailFiles,
    ) -> Result<banger_vmm::helper_jail::Jailed, String> {
        let mut names = vec!["kernel"];
        let mut fds = vec![files.kernel.as_fd()];
        if let Some(initrd) = &files.initrd {
            names.push("initrd");
            fds.push(initrd.as_fd());
        }
        if let Some(disk) = &files.disk {
            names.push("disk");
            fds.push(disk.as_fd());
        }
        names.extend(["console", "stderr"]);
        fds.extend([files.console.as_fd(), files.stderr.as_fd()]);
        let reply = self
            .call_with_fds(
                "priv.vmm.launch",
                serde_json::json!({ "id": id, "files": names }),
                &fds,
            )
            .map_err(|e| format!("{e:#}"))?;
        let pid = reply["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 1)
            .ok_or_else(|| format!("priv.vmm.launch answered no pid: {reply}"))?;
        let root = reply["root"]
            .as_str()
            .ok_or_else(|| format!("priv.vmm.launch answered no jail root: {reply}"))?;
        Ok(banger_vmm::helper_jail::Jailed {
            pid,
            root: root.into(),
        })
    }
}

/// Who does TAP networking's privileged steps for this daemon.
#[derive(Debug, Clone)]
pub enum TapRoute {
    /// bangerd is root: it runs `ip` and `nft` itself.
    Direct,
    /// bangerd is not root; bangerd-root answers at this socket and does them.
    Helper(PrivClient),
    /// Neither; why (for `doctor` and the error of a TAP start).
    Unavailable(String),
}

impl TapRoute {
    /// This process: root, or the helper at `root_helper_socket` (default
    /// [`DEFAULT_SOCKET`]) when it answers `priv.ping`.
    pub fn probe(config: &Config) -> TapRoute {
        let (client, _) = match HelperAnswer::probe(config) {
            HelperAnswer::Root => return TapRoute::Direct,
            HelperAnswer::Silent(why) => return TapRoute::Unavailable(why),
            HelperAnswer::Answered(client, ping) => (client, ping),
        };
        // The helper makes the TAP ours, but the VMM still opens /dev/net/tun itself to
        // attach to it: with a root-only node (some hosts chmod it 0600) every TAP VM
        // would fail at boot.
        let tun = rustix::fs::access(
            TUN_DEVICE,
            rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
        );
        if tun.is_err() {
            return TapRoute::Unavailable(format!(
                "bangerd-root answers at {}, but {TUN_DEVICE} is not read-write for uid {} (its VMM attaches to the TAP through it): chmod 0666 {TUN_DEVICE}, the kernel's default",
                client.socket().display(),
                rustix::process::geteuid().as_raw()
            ));
        }
        TapRoute::Helper(client)
    }

    /// What `network::resolve_mode` needs to know.
    pub fn capability(&self) -> TapCapability {
        TapCapability {
            root: matches!(self, TapRoute::Direct),
            helper: matches!(self, TapRoute::Helper(_)),
            ..TapCapability::probe()
        }
    }

    fn unavailable(&self) -> anyhow::Result<()> {
        match self {
            TapRoute::Unavailable(why) => bail!("TAP networking is unavailable: {why}"),
            _ => Ok(()),
        }
    }

    /// network::ensure_bridge, here or in the helper.
    pub fn ensure_bridge(&self, subnet: Subnet) -> anyhow::Result<()> {
        self.unavailable()?;
        match self {
            TapRoute::Helper(helper) => {
                helper.bridge_ensure(&format!("{}/{}", subnet.gateway, subnet.prefix))
            }
            _ => network::ensure_bridge(subnet),
        }
    }

    /// network::create_tap, here or in the helper (which makes it owned by this uid, so
    /// the unprivileged VMM can attach to it).
    pub fn create_tap(&self, name: &str) -> anyhow::Result<()> {
        self.unavailable()?;
        match self {
            TapRoute::Helper(helper) => helper.tap_create(name),
            _ => network::create_tap(name),
        }
    }

    /// network::admit_guest, here or in the helper.
    pub fn admit_guest(&self, tap: &str, ip: Ipv4Addr, egress: &Egress) -> anyhow::Result<()> {
        self.unavailable()?;
        match self {
            TapRoute::Helper(helper) => helper.guest_admit(tap, ip, egress),
            _ => network::admit_guest(tap, ip, egress),
        }
    }

    /// network::release_guest, here or in the helper; failures are logged only, as there.
    pub fn release_guest(&self, tap: &str, ip: Ipv4Addr) {
        match self {
            TapRoute::Helper(helper) => {
                if let Err(e) = helper.guest_release(tap, ip) {
                    tracing::warn!(%tap, %ip, error = %format!("{e:#}"), "bangerd-root could not remove a guest's rules");
                }
            }
            _ => network::release_guest(tap, ip),
        }
    }

    /// network::delete_tap, here or in the helper; a missing TAP is fine.
    pub fn delete_tap(&self, name: &str) -> anyhow::Result<()> {
        match self {
            TapRoute::Helper(helper) if network::tap_exists(name) => helper.tap_delete(name),
            TapRoute::Helper(_) => Ok(()),
            _ => network::delete_tap(name),
        }
    }
}

/// Who runs Firecracker's jailer for this daemon.
#[derive(Debug, Clone)]
pub enum JailRoute {
    /// bangerd is root: it runs the jailer itself (`jailer_bin`).
    Direct,
    /// bangerd is not root; bangerd-root answers and runs its own `jailer` (its path, on
    /// the helper's side) through `priv.vmm.launch`.
    Helper {
        /// The helper.
        client: PrivClient,
        /// The jailer it runs.
        jailer: String,
    },
    /// Nobody can: Firecracker runs unjailed, as this uid; why.
    Unjailed(String),
}

impl JailRoute {
    /// This process: root, or the helper when it answers `priv.ping` with a jailer.
    pub fn probe(config: &Config) -> JailRoute {
        match HelperAnswer::probe(config) {
            HelperAnswer::Root => JailRoute::Direct,
            HelperAnswer::Silent(why) => JailRoute::Unjailed(why),
            HelperAnswer::Answered(client, ping) => match ping["jailer"].as_str() {
                Some(jailer) => JailRoute::Helper {
                    jailer: jailer.to_owned(),
                    client,
                },
                None => JailRoute::Unjailed(format!(
                    "bangerd-root at {} has no jailer and firecracker (its --jailer, --firecracker or PATH)",
                    client.socket().display()
                )),
            },
        }
    }
}

/// What asking for the helper found: this process is root (it needs none), the helper
/// answered `priv.ping` (with that answer), or it did not, and why.
enum HelperAnswer {
    Root,
    Answered(PrivClient, Value),
    Silent(String),
}

impl HelperAnswer {
    /// Pings the helper at `root_helper_socket` unless this process is root.
    fn probe(config: &Config) -> HelperAnswer {
        let uid = rustix::process::geteuid();
        if uid.is_root() {
            return HelperAnswer::Root;
        }
        let client = PrivClient::configured(config);
        match client.ping() {
            Ok(ping) => HelperAnswer::Answered(client, ping),
            Err(e) => HelperAnswer::Silent(format!(
                "bangerd is not root (uid {}) and bangerd-root does not answer: {e:#}",
                uid.as_raw()
            )),
        }
    }
}
