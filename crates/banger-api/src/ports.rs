//! Published ports (`-p [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]`), what listens in a
//! guest (`vm.ports`) and ssh access (`vm.ssh_proxy`, `vm.ssh_config`): methods, params
//! and results.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::NameParams;

/// How many ports one VM may publish: each is a listening socket on the host (and, in
/// TAP mode, nft rules), so a create cannot ask for an unbounded number.
pub const MAX_PUBLISHED_PORTS: usize = 64;

wire_enum! {
    /// The transport of a published or listening port.
    "port protocol", PortProtocol {
        /// TCP.
        Tcp = "tcp",
        /// UDP.
        Udp = "udp",
    }
}

/// One published port: the host's `host_ip:host_port` reaches the guest's `guest_port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedPort {
    /// The host address the port is published on (default `127.0.0.1`: the host only).
    pub host_ip: IpAddr,
    /// The host port (1-65535).
    pub host_port: u16,
    /// The guest port (1-65535).
    pub guest_port: u16,
    /// `tcp` or `udp`.
    pub protocol: PortProtocol,
}

/// The host address a port is published on when the flag names none: the host only.
pub const DEFAULT_PUBLISH_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

impl PublishedPort {
    /// Parses `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]` (docker's `-p` without ranges);
    /// an IPv6 host address goes in brackets (`[::1]:8080:80`).
    pub fn parse_flag(s: &str) -> Result<PublishedPort, String> {
        let bad = |why: &str| {
            format!("-p {s:?}: {why} (expected [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp])")
        };
        let (spec, protocol) = match s.rsplit_once('/') {
            Some((spec, proto)) => (
                spec,
                proto
                    .parse::<PortProtocol>()
                    .map_err(|_| bad(&format!("unknown protocol {proto:?}")))?,
            ),
            None => (s, PortProtocol::Tcp),
        };
        let (host_ip, ports) = if let Some(rest) = spec.strip_prefix('[') {
            let (ip, rest) = rest
                .split_once("]:")
                .ok_or_else(|| bad("an IPv6 address in brackets must be followed by :"))?;
            let ip: std::net::Ipv6Addr = ip
                .parse()
                .map_err(|_| bad(&format!("{ip:?} is not an IPv6 address")))?;
            (IpAddr::V6(ip), rest)
        } else {
            match spec.split(':').count() {
                2 => (DEFAULT_PUBLISH_IP, spec),
                3 => {
                    let (ip, rest) = spec.split_once(':').expect("counted");
                    let ip: std::net::Ipv4Addr = ip
                        .parse()
                        .map_err(|_| bad(&format!("{ip:?} is not an IPv4 address")))?;
                    (IpAddr::V4(ip), rest)
                }
                _ => return Err(bad("wrong number of ':'")),
            }
        };
        let (host, guest) = ports
            .split_once(':')
            .ok_or_else(|| bad("missing GUEST_PORT"))?;
        let port = |p: &str, what: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad(&format!("{what} {p:?} is not a port (1-65535)"))),
            Ok(n) => Ok(n),
        };
        Ok(PublishedPort {
            host_ip,
            host_port: port(host, "HOST_PORT")?,
            guest_port: port(guest, "GUEST_PORT")?,
            protocol,
        })
    }

    /// The host side as `IP:PORT` (`[IP]:PORT` for IPv6).
    pub fn host_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.host_ip, self.host_port)
    }
}

impl std::fmt::Display for PublishedPort {
    /// The flag's own form with the address spelled out: `127.0.0.1:8080:80/tcp`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = match self.host_ip {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let text = format!(
            "{host}:{}:{}/{}",
            self.host_port, self.guest_port, self.protocol
        );
        f.pad(&text)
    }
}

/// Checks a VM's list of ports: at most [`MAX_PUBLISHED_PORTS`], and no host address and
/// port (per protocol) twice.
pub fn check_published(ports: &[PublishedPort]) -> Result<(), String> {
    if ports.len() > MAX_PUBLISHED_PORTS {
        return Err(format!(
            "{} published ports: at most {MAX_PUBLISHED_PORTS} per VM (MAX_PUBLISHED_PORTS)",
            ports.len()
        ));
    }
    for (i, p) in ports.iter().enumerate() {
        if let Some(q) = ports[..i]
            .iter()
            .find(|q| q.protocol == p.protocol && q.host_port == p.host_port)
            .filter(|q| {
                q.host_ip == p.host_ip || q.host_ip.is_unspecified() || p.host_ip.is_unspecified()
            })
        {
            return Err(format!(
                "host port {}/{} is published twice ({q} and {p})",
                p.host_addr(),
                p.protocol
            ));
        }
    }
    Ok(())
}

method! {
    /// `vm.ports`: what listens in a running guest (read by its agent from
    /// `/proc/net/{tcp,tcp6,udp,udp6}`) and what the VM publishes on the host.
    VmPorts = "vm.ports", NameParams => VmPortsResult
}

/// A socket listening in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListeningPort {
    /// `tcp` or `udp`.
    pub protocol: PortProtocol,
    /// The guest address it is bound to (`0.0.0.0`, `::` or one address).
    pub address: IpAddr,
    /// The guest port.
    pub port: u16,
    /// The host addresses (`IP:PORT`) that publish this port, if any.
    #[serde(default)]
    pub published: Vec<String>,
}

/// Result of `vm.ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPortsResult {
    /// The VM.
    pub vm: String,
    /// Sockets listening in the guest, by protocol, port and address.
    pub listening: Vec<ListeningPort>,
    /// What the VM publishes on the host.
    pub published: Vec<PublishedPort>,
}

method! {
    /// `vm.ssh_proxy`: the byte stream of an SSH connection to the VM, for OpenSSH's
    /// `ProxyCommand`: the guest runs `sshd -i` over an agent session; the caller sends the
    /// client's bytes as `input` notifications and gets the server's as `output` on
    /// `stdout` (sshd's log lines on `stderr`), as `vm.exec` with `stdin`. No host port
    /// is opened. An image without sshd is an error naming the image.
    VmSshProxy = "vm.ssh_proxy", NameParams => crate::ExecResult
}

method! {
    /// `vm.ssh_config`: what an OpenSSH `Host banger.NAME` entry needs for each VM (or the
    /// one named): the install's key, the pinned host keys and the proxy's VM name.
    VmSshConfig = "vm.ssh_config", VmSshConfigParams => VmSshConfigResult
}

/// Params of `vm.ssh_config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSshConfigParams {
    /// Only this VM; every VM when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Result of `vm.ssh_config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSshConfigResult {
    /// The install's private key (ed25519, mode 0600), whose public half every VM's root
    /// accepts.
    pub identity_file: String,
    /// A known-hosts file pinning each VM's host key under its alias `banger.NAME`.
    pub known_hosts_file: String,
    /// One entry per VM, by name.
    pub hosts: Vec<SshHost>,
}

/// One VM's SSH entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshHost {
    /// `banger.NAME`: what `ssh` is given.
    pub alias: String,
    /// The VM.
    pub vm: String,
    /// The user to log in as.
    pub user: String,
    /// The VM's host public key (`ssh-ed25519 AAAA…`), pinned in `known_hosts_file`.
    pub host_key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_flags_parse_with_defaults_and_name_what_is_wrong() {
        let p = PublishedPort::parse_flag("8080:80").unwrap();
        assert_eq!(p.to_string(), "127.0.0.1:8080:80/tcp");
        let p = PublishedPort::parse_flag("0.0.0.0:5353:53/udp").unwrap();
        assert_eq!(p.to_string(), "0.0.0.0:5353:53/udp");
        let p = PublishedPort::parse_flag("[::1]:2222:22").unwrap();
        assert_eq!(p.to_string(), "[::1]:2222:22/tcp");
        for (flag, why) in [
            ("80", "wrong number of ':'"),
            ("0:80", "HOST_PORT \"0\" is not a port"),
            ("8080:70000", "GUEST_PORT \"70000\" is not a port"),
            ("8080:80/sctp", "unknown protocol \"sctp\""),
            ("host:8080:80", "\"host\" is not an IPv4 address"),
            ("1:2:3:4", "wrong number of ':'"),
        ] {
            let err = PublishedPort::parse_flag(flag).unwrap_err();
            assert!(err.contains(why), "{flag}: {err}");
            assert!(err.contains(&format!("-p {flag:?}")), "{err}");
        }
    }

    #[test]
    fn a_host_port_published_twice_is_refused_and_the_count_is_bounded() {
        let a = PublishedPort::parse_flag("8080:80").unwrap();
        let b = PublishedPort::parse_flag("0.0.0.0:8080:81").unwrap();
        let udp = PublishedPort::parse_flag("8080:80/udp").unwrap();
        assert!(check_published(&[a.clone(), udp]).is_ok());
        let err = check_published(&[a.clone(), b]).unwrap_err();
        assert!(
            err.contains("host port 0.0.0.0:8080/tcp is published twice"),
            "{err}"
        );
        let many: Vec<_> = (1..=65)
            .map(|n| PublishedPort::parse_flag(&format!("{}:80", 1000 + n)).unwrap())
            .collect();
        let err = check_published(&many).unwrap_err();
        assert!(err.contains("at most 64 per VM"), "{err}");
    }
}
