//! Published ports (`vm.create`/`vm.run` `ports`) and `vm.ports`: checking a VM's list,
//! turning it into slirp `hostfwd`s (user mode; TAP VMs' TCP ports are relayed by
//! [`super::tap_ports`]), refusing a host port that is taken
//! before the VMM starts, and joining what the guest's agent says listens with what is
//! published.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use banger_api::{ListeningPort, PortProtocol, PublishedPort, VmInfo, VmPortsResult};
use banger_vmm::backend::HostForward;

use super::VmService;
use crate::services::network::NetworkMode;
use crate::{ServiceError, ServiceResult};

/// How long the agent has to list the guest's sockets.
const LISTEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Refuses a list of ports the VM's network mode cannot publish.
pub(super) fn check_create(mode: NetworkMode, ports: &[PublishedPort]) -> ServiceResult<()> {
    banger_api::check_published(ports).map_err(ServiceError::bad_request)?;
    if ports.is_empty() {
        return Ok(());
    }
    match mode {
        NetworkMode::None => Err(ServiceError::bad_request(format!(
            "-p {}: network \"none\" has no network to publish ports from",
            ports[0]
        ))),
        NetworkMode::User => {
            // slirp's hostfwd binds IPv4 host addresses only.
            if let Some(p) = ports.iter().find(|p| p.host_ip.is_ipv6()) {
                return Err(ServiceError::bad_request(format!(
                    "-p {p}: network \"user\" publishes on IPv4 host addresses only"
                )));
            }
            Ok(())
        }
        // The daemon relays TCP itself (tap_ports); UDP has no relay.
        NetworkMode::Tap => match ports.iter().find(|p| p.protocol == PortProtocol::Udp) {
            Some(p) => Err(ServiceError::bad_request(format!(
                "-p {p}: network \"tap\" publishes TCP ports only; use --network user for UDP"
            ))),
            None => Ok(()),
        },
    }
}

/// The slirp forwards of `ports`.
pub(super) fn host_forwards(ports: &[PublishedPort]) -> Vec<HostForward> {
    ports
        .iter()
        .map(|p| HostForward {
            udp: p.protocol == PortProtocol::Udp,
            host: p.host_addr(),
            guest_port: p.guest_port,
        })
        .collect()
}

/// Fails, naming the port, when one of `vm`'s host ports is taken on the host: QEMU would
/// otherwise exit at start with its own less clear message (or, for a port taken by
/// another of banger's VMs, the same). A port freed between this check and QEMU's bind is
/// reported by QEMU's failure.
pub(super) fn check_host_free(vm: &VmInfo) -> ServiceResult<()> {
    for p in &vm.ports {
        let addr = p.host_addr();
        let taken = match p.protocol {
            PortProtocol::Tcp => bind_tcp(addr).err(),
            PortProtocol::Udp => std::net::UdpSocket::bind(addr).err(),
        };
        if let Some(e) = taken {
            return Err(ServiceError::bad_request(format!(
                "cannot publish port {p} of VM {:?}: host port {addr}/{} is not free ({e})",
                vm.name, p.protocol
            )));
        }
    }
    Ok(())
}

/// Binds as QEMU's hostfwd does: with `SO_REUSEADDR` (which std sets on Unix), so a
/// port in TIME_WAIT counts as free, as it does for QEMU.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<()> {
    std::net::TcpListener::bind(addr).map(drop)
}

impl VmService {
    /// `vm.ports`: the guest's listening sockets, each with the host addresses publishing
    /// it, and the VM's published ports.
    pub fn ports(&self, name: &str) -> ServiceResult<VmPortsResult> {
        let vm = self.show(name)?;
        let client = self.agent(&vm)?;
        let sockets = client
            .listening(LISTEN_TIMEOUT)
            .with_context(|| format!("list the listening sockets of VM {name:?}"))?;
        let mut listening: Vec<ListeningPort> = sockets
            .into_iter()
            .map(|s| {
                let protocol = match s.protocol {
                    banger_agent::proto::SocketProtocol::Tcp => PortProtocol::Tcp,
                    banger_agent::proto::SocketProtocol::Udp => PortProtocol::Udp,
                };
                let published = vm
                    .ports
                    .iter()
                    .filter(|p| {
                        p.protocol == protocol && p.guest_port == s.port && reaches(s.address)
                    })
                    .map(|p| p.host_addr().to_string())
                    .collect();
                ListeningPort {
                    protocol,
                    address: s.address,
                    port: s.port,
                    published,
                }
            })
            .collect();
        listening.sort_by(|a, b| {
            (a.protocol.as_str(), a.port, a.address).cmp(&(b.protocol.as_str(), b.port, b.address))
        });
        Ok(VmPortsResult {
            vm: vm.name,
            listening,
            published: vm.ports,
        })
    }
}

/// Whether forwarded traffic, which arrives at the guest's network address, reaches a
/// socket bound to `address`: a wildcard does, a loopback address does not. (A socket
/// bound to one specific address is counted: the guest has one.)
fn reaches(address: IpAddr) -> bool {
    !address.is_loopback()
}
