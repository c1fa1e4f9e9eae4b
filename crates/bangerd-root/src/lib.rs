//! `bangerd-root`: the only part of a system install that runs as root. An unprivileged
//! `bangerd` asks it, over its own socket, for the few network steps that need
//! `CAP_NET_ADMIN`. It offers a closed set of `priv.*` methods ([`METHODS`]) whose
//! arguments are checked against banger's own patterns: TAP names only `bgr-<8 hex>`, the
//! bridge only `banger0`, addresses only inside the configured subnet, egress policies
//! only as banger-api's typed `Egress`. Nothing takes a free-form command, path, rule or
//! interface name. Only the owner uid (checked with `SO_PEERCRED`) is served, and every
//! call is logged.
//!
//! The steps themselves are bangerd's own (`bangerd::services::network`: the same `ip`
//! and `nft` scripts a root bangerd runs), so a system install and a root daemon make
//! byte-identical rules. Linking bangerd's library costs binary size, not behaviour:
//! only those functions run here.
//!
//! One method is not a network step: `priv.vmm.launch` ([`jail`]) runs the Firecracker
//! jailer, with the helper's own configured binaries, for files the caller hands over as
//! open descriptors.
//!
//! Wire: one JSON object per line each way, `{"id", "method", "params"}` →
//! `{"id", "result"}` or `{"id", "error": {"kind", "message"}}`. A request may carry file
//! descriptors (`SCM_RIGHTS`, at most [`jail::MAX_FDS`]) sent with its line; only
//! `priv.vmm.launch` takes any.
#![forbid(unsafe_code)]

pub mod jail;

use std::io::{BufRead, BufReader, IoSliceMut, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use bangerd::services::network;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The TAP names banger makes: `bgr-` and 8 lowercase hex digits (see bangerd's network).
pub const TAP_PREFIX: &str = "bgr-";
/// The one bridge banger keeps.
pub const BRIDGE: &str = "banger0";
/// Longest request line read; a longer one is refused.
pub const MAX_LINE: usize = 64 * 1024;
/// Connections served at once; one more is answered `too_many_connections` and closed, so a
/// caller cannot pin an unbounded number of the helper's threads.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may stay silent between requests before it is closed (the
/// default of `--idle-timeout-secs`).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Every method, the closed set.
pub const METHODS: &[&str] = &[
    "priv.ping",
    "priv.tap.create",
    "priv.tap.delete",
    "priv.bridge.ensure",
    "priv.guest.admit",
    "priv.guest.release",
    "priv.vmm.launch",
];

/// Why a call was refused or failed: a closed set, on the wire as snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivErrorKind {
    /// The caller is not the owner uid.
    Unauthorized,
    /// Not one of the `priv.*` methods.
    UnknownMethod,
    /// Params missing, of the wrong shape, or with unknown keys.
    BadRequest,
    /// A TAP name outside `bgr-<8 hex>`.
    InvalidTapName,
    /// An address outside the configured subnet.
    AddressOutsideSubnet,
    /// An instance id that is not a VM id (16 lowercase hex digits).
    InvalidVmId,
    /// A descriptor missing, unexpected, of the wrong kind or opened without the right
    /// access.
    BadDescriptor,
    /// The helper was started without what the method needs (no jailer or firecracker).
    NotConfigured,
    /// [`MAX_CONNECTIONS`] connections are open already.
    TooManyConnections,
    /// The step itself failed (`ip` said why).
    Failed,
}

/// A refused or failed call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct PrivError {
    /// Which kind.
    pub kind: PrivErrorKind,
    /// What failed, naming the input.
    pub message: String,
}

pub(crate) fn err(kind: PrivErrorKind, message: impl Into<String>) -> PrivError {
    PrivError {
        kind,
        message: message.into(),
    }
}

/// An IPv4 subnet, `A.B.C.D/N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// Its network address (host bits zero).
    pub network: Ipv4Addr,
    /// Prefix length, 8..=30.
    pub prefix: u8,
}

impl Subnet {
    /// Parses `A.B.C.D/N` (host bits may be set: `172.30.0.1/24` is the 172.30.0.0/24 net).
    pub fn parse(text: &str) -> Result<Subnet, PrivError> {
        let bad = || {
            err(
                PrivErrorKind::BadRequest,
                format!("{text:?} is not A.B.C.D/N"),
            )
        };
        let (addr, prefix) = text.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(err(
                PrivErrorKind::BadRequest,
                format!("{text:?}: prefix must be 8..=30"),
            ));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Subnet {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    /// Whether `addr` is a host address of this subnet (not its network or broadcast).
    pub fn contains_host(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        let a = u32::from(addr);
        a & mask == u32::from(self.network) && a & !mask != 0 && a & !mask != !mask
    }
}

/// Whether `text` is exactly `len` lowercase hex digits (banger's ids and TAP suffixes).
pub(crate) fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// Checks a TAP name: `bgr-` and exactly 8 lowercase hex digits.
pub fn check_tap_name(name: &str) -> Result<(), PrivError> {
    let ok = name
        .strip_prefix(TAP_PREFIX)
        .is_some_and(|hex| is_lower_hex(hex, 8));
    if ok {
        Ok(())
    } else {
        Err(err(
            PrivErrorKind::InvalidTapName,
            format!("TAP name {name:?} is not {TAP_PREFIX}<8 lowercase hex>"),
        ))
    }
}

/// The helper's fixed configuration.
#[derive(Debug)]
pub struct Helper {
    /// The only uid served.
    pub owner_uid: u32,
    /// The owner's primary gid: the group a jailed Firecracker runs with.
    pub owner_gid: u32,
    /// Addresses the bridge may get.
    pub subnet: Subnet,
    /// Firecracker's jails; `None` where the helper found no jailer or firecracker.
    pub jails: Option<jail::Jails>,
    /// How long a connection may be silent between requests ([`IDLE_TIMEOUT`] by default).
    pub idle_timeout: std::time::Duration,
}

#[derive(Deserialize)]
struct Request {
    id: Value,
    method: String,
    #[serde(default)]
    params: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TapParams {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestParams {
    tap: String,
    ip: String,
    /// Only for `priv.guest.admit`; default `allow`.
    #[serde(default)]
    egress: Option<banger_api::Egress>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BridgeParams {
    /// The bridge's address with the subnet's prefix, e.g. `172.30.0.1/24`.
    address: String,
}

/// A step that failed, as a typed error carrying the whole context chain.
fn failed(e: anyhow::Error) -> PrivError {
    err(PrivErrorKind::Failed, format!("{e:#}"))
}

pub(crate) fn params<T: serde::de::DeserializeOwned>(
    method: &str,
    value: Value,
) -> Result<T, PrivError> {
    serde_json::from_value(value)
        .map_err(|e| err(PrivErrorKind::BadRequest, format!("{method}: {e}")))
}

impl Helper {
    /// Runs one call from `peer_uid` that came without descriptors.
    pub fn call(&self, peer_uid: u32, method: &str, value: Value) -> Result<Value, PrivError> {
        self.call_with_fds(peer_uid, method, value, Vec::new())
    }

    /// Runs one call from `peer_uid` with the descriptors `fds` that came with it.
    pub fn call_with_fds(
        &self,
        peer_uid: u32,
        method: &str,
        value: Value,
        fds: Vec<OwnedFd>,
    ) -> Result<Value, PrivError> {
        if peer_uid != self.owner_uid {
            return Err(err(
                PrivErrorKind::Unauthorized,
                format!("uid {peer_uid} is not the owner (uid {})", self.owner_uid),
            ));
        }
        if method == "priv.vmm.launch" {
            let jails = self.jails.as_ref().ok_or_else(|| {
                err(
                    PrivErrorKind::NotConfigured,
                    "bangerd-root has no jailer and firecracker (--jailer, --firecracker, or both on its PATH)",
                )
            })?;
            return jails.launch((self.owner_uid, self.owner_gid), value, fds);
        }
        if !fds.is_empty() {
            return Err(err(
                PrivErrorKind::BadDescriptor,
                format!("{method} takes no descriptors; {} came with it", fds.len()),
            ));
        }
        match method {
            // Whether this helper serves the caller, and its subnet: what bangerd's
            // TapRoute probes before choosing the helper.
            "priv.ping" => {
                let _: NoParams = params(method, value)?;
                Ok(serde_json::json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "subnet": format!("{}/{}", self.subnet.network, self.subnet.prefix),
                    // Where priv.vmm.launch jails, or null: what doctor reports.
                    "jailer": self.jails.as_ref().map(|j| &j.config.jailer),
                }))
            }
            // A TAP the owner may open without privileges, on the isolated bridge port,
            // up (bangerd's own network::create_tap, with the owner).
            "priv.tap.create" => {
                let p: TapParams = params(method, value)?;
                check_tap_name(&p.name)?;
                network::create_tap_owned(&p.name, Some(self.owner_uid)).map_err(failed)?;
                Ok(serde_json::json!({ "name": p.name }))
            }
            "priv.tap.delete" => {
                let p: TapParams = params(method, value)?;
                check_tap_name(&p.name)?;
                network::delete_tap(&p.name).map_err(failed)?;
                Ok(serde_json::json!({ "name": p.name }))
            }
            // The bridge `banger0` with one address of the configured subnet, then the
            // guard rules, IPv4 forwarding and the NAT (network::ensure_bridge).
            "priv.bridge.ensure" => {
                let p: BridgeParams = params(method, value)?;
                let (addr, prefix) = p.address.split_once('/').ok_or_else(|| {
                    err(
                        PrivErrorKind::BadRequest,
                        format!("{:?} is not A.B.C.D/N", p.address),
                    )
                })?;
                let host: Ipv4Addr = addr.parse().map_err(|_| {
                    err(
                        PrivErrorKind::BadRequest,
                        format!("{addr:?} is not an IPv4 address"),
                    )
                })?;
                if prefix != self.subnet.prefix.to_string() || !self.subnet.contains_host(host) {
                    return Err(err(
                        PrivErrorKind::AddressOutsideSubnet,
                        format!(
                            "address {} is not a host of the configured subnet {}/{}",
                            p.address, self.subnet.network, self.subnet.prefix
                        ),
                    ));
                }
                let subnet = network::Subnet {
                    gateway: host,
                    prefix: self.subnet.prefix,
                };
                network::ensure_bridge(subnet).map_err(failed)?;
                Ok(serde_json::json!({ "bridge": BRIDGE, "address": p.address }))
            }
            // One guest's guard entries: its (TAP, MAC, address) triple and its egress
            // chain. The egress policy is typed (allow, deny or a bounded CIDR list), so
            // nothing free-form reaches nft.
            "priv.guest.admit" => {
                let p: GuestParams = params(method, value)?;
                check_tap_name(&p.tap)?;
                let ip = self.guest_ip(&p.ip)?;
                let egress = p.egress.unwrap_or_default();
                network::admit_guest(&p.tap, ip, &egress).map_err(failed)?;
                Ok(serde_json::json!({ "tap": p.tap, "ip": p.ip }))
            }
            "priv.guest.release" => {
                let p: GuestParams = params(method, value)?;
                check_tap_name(&p.tap)?;
                let ip = self.guest_ip(&p.ip)?;
                network::release_guest(&p.tap, ip);
                Ok(serde_json::json!({ "tap": p.tap, "ip": p.ip }))
            }
            other => Err(err(
                PrivErrorKind::UnknownMethod,
                format!("{other:?} is not a priv method ({})", METHODS.join(", ")),
            )),
        }
    }

    /// A guest address: a host of the configured subnet.
    fn guest_ip(&self, text: &str) -> Result<Ipv4Addr, PrivError> {
        let ip: Ipv4Addr = text.parse().map_err(|_| {
            err(
                PrivErrorKind::BadRequest,
                format!("{text:?} is not an IPv4 address"),
            )
        })?;
        if !self.subnet.contains_host(ip) {
            return Err(err(
                PrivErrorKind::AddressOutsideSubnet,
                format!(
                    "guest address {ip} is not a host of the configured subnet {}/{}",
                    self.subnet.network, self.subnet.prefix
                ),
            ));
        }
        Ok(ip)
    }

    /// Serves one connection: answers each line, logging every call.
    pub fn serve(&self, stream: UnixStream) {
        let peer = rustix::net::sockopt::get_socket_peercred(&stream)
            .map(|c| c.uid.as_raw())
            .unwrap_or(u32::MAX);
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        // A silent connection is closed rather than holding its thread forever.
        if stream.set_read_timeout(Some(self.idle_timeout)).is_err() {
            return;
        }
        let mut reader = BufReader::new(FdReader {
            stream,
            fds: Vec::new(),
            truncated: false,
        })
        .take(u64::MAX);
        loop {
            let mut line = Vec::new();
            reader.set_limit(MAX_LINE as u64 + 1);
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let reply = if line.len() > MAX_LINE {
                let e = err(
                    PrivErrorKind::BadRequest,
                    format!("request line over {MAX_LINE} bytes (MAX_LINE)"),
                );
                eprintln!("bangerd-root: uid {peer}: refused: {}", e.message);
                serde_json::json!({ "id": null, "error": e })
            } else {
                match serde_json::from_slice::<Request>(&line) {
                    Err(e) => serde_json::json!({
                        "id": null,
                        "error": err(PrivErrorKind::BadRequest, format!("invalid request: {e}")),
                    }),
                    Ok(req) => {
                        // The descriptors that came with this line (the caller waits for
                        // each reply, so none belong to a later one).
                        let inner = reader.get_mut().get_mut();
                        let fds = std::mem::take(&mut inner.fds);
                        let outcome = if std::mem::take(&mut inner.truncated) {
                            Err(err(
                                PrivErrorKind::BadDescriptor,
                                format!("more than {} descriptors (MAX_FDS)", jail::MAX_FDS),
                            ))
                        } else {
                            self.call_with_fds(peer, &req.method, req.params.clone(), fds)
                        };
                        // Every call, allowed or not, leaves a line in the journal.
                        match &outcome {
                            Ok(_) => eprintln!(
                                "bangerd-root: uid {peer}: {} {} ok",
                                req.method, req.params
                            ),
                            Err(e) => eprintln!(
                                "bangerd-root: uid {peer}: {} {} refused: {e}",
                                req.method, req.params
                            ),
                        }
                        match outcome {
                            Ok(result) => serde_json::json!({ "id": req.id, "result": result }),
                            Err(e) => serde_json::json!({ "id": req.id, "error": e }),
                        }
                    }
                }
            };
            let mut text = reply.to_string();
            text.push('\n');
            if writer.write_all(text.as_bytes()).is_err() {
                return;
            }
            if line.len() > MAX_LINE {
                return;
            }
        }
    }
}

/// The connection's byte stream, keeping the descriptors that arrive with it.
struct FdReader {
    stream: UnixStream,
    fds: Vec<OwnedFd>,
    /// The kernel dropped descriptors that did not fit [`jail::MAX_FDS`].
    truncated: bool,
}

/// `MSG_CTRUNC`: ancillary data was cut to the buffer (not in rustix 0.38's flag set).
const MSG_CTRUNC: u32 = 0x8;

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        let mut space = [0u8; rustix::cmsg_space!(ScmRights(jail::MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &self.stream,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                self.fds.extend(fds);
            }
        }
        if got.flags.bits() & MSG_CTRUNC != 0 {
            self.truncated = true;
        }
        if self.fds.len() > jail::MAX_FDS {
            self.truncated = true;
            self.fds.clear();
        }
        Ok(got.bytes)
    }
}

/// Accepts connections on `listener` for ever, serving each on its own thread, at most
/// [`MAX_CONNECTIONS`] at once: one more is told `too_many_connections` and closed.
pub fn run(helper: std::sync::Arc<Helper>, listener: UnixListener) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let open = std::sync::Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("bangerd-root: accept: {e}");
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            let e = err(
                PrivErrorKind::TooManyConnections,
                format!("{MAX_CONNECTIONS} connections are open already (MAX_CONNECTIONS)"),
            );
            eprintln!("bangerd-root: refused a connection: {}", e.message);
            let _ = writeln!(stream, "{}", serde_json::json!({ "id": null, "error": e }));
            continue;
        }
        let (helper, open) = (std::sync::Arc::clone(&helper), std::sync::Arc::clone(&open));
        std::thread::spawn(move || {
            helper.serve(stream);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Binds `socket` (replacing a stale one) mode 0600 and owned by `owner_uid`: on Linux a
/// connect needs write permission on the socket file, so a root-owned 0600 socket would
/// shut the owner out; the SO_PEERCRED check then refuses every other uid, root included.
pub fn bind(socket: &Path, owner_uid: u32) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(socket);
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(socket);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("listen on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", socket.display()))?;
    std::os::unix::fs::chown(socket, Some(owner_uid), None)
        .with_context(|| format!("chown {} to uid {owner_uid}", socket.display()))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_and_subnets_are_checked() {
        check_tap_name("bgr-0123abcd").unwrap();
        for bad in [
            "bgr-0123ABCD",
            "bgr-0123abc",
            "eth0",
            "bgr-0123abcde",
            "banger0",
            "bgr-;rm -rf",
        ] {
            assert_eq!(
                check_tap_name(bad).unwrap_err().kind,
                PrivErrorKind::InvalidTapName
            );
        }
        let s = Subnet::parse("172.30.0.1/24").unwrap();
        assert!(s.contains_host("172.30.0.1".parse().unwrap()));
        assert!(!s.contains_host("172.30.0.0".parse().unwrap()));
        assert!(!s.contains_host("172.30.0.255".parse().unwrap()));
        assert!(!s.contains_host("10.0.0.1".parse().unwrap()));
    }
}
