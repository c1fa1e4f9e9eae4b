//! What listens in the guest: TCP sockets in the LISTEN state and bound, unconnected UDP
//! sockets, read from `/proc/net/{tcp,tcp6,udp,udp6}` (the kernel's own tables, so no
//! tool in the image is needed). Each file is read only up to [`MAX_PROC_NET_BYTES`] and
//! at most [`MAX_LISTEN_SOCKETS`] sockets are reported: a guest with a million sockets
//! costs the agent and the host a bounded amount.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::proto::{ListenSocket, SocketProtocol, MAX_LISTEN_SOCKETS};

/// How much of one `/proc/net` table is read (about 150 bytes a socket: some 7000
/// sockets).
pub const MAX_PROC_NET_BYTES: u64 = 1 << 20;

/// `st` of a listening TCP socket (`TCP_LISTEN`).
const TCP_LISTEN: &str = "0A";
/// `st` of an unconnected UDP socket (`TCP_CLOSE`, which UDP reuses).
const UDP_UNCONNECTED: &str = "07";

/// The guest's listening sockets, sorted, without duplicates. A table that cannot be read
/// (no IPv6 in the kernel) adds nothing.
pub fn listening() -> Vec<ListenSocket> {
    let mut found = BTreeSet::new();
    for (file, protocol) in [
        ("/proc/net/tcp", SocketProtocol::Tcp),
        ("/proc/net/tcp6", SocketProtocol::Tcp),
        ("/proc/net/udp", SocketProtocol::Udp),
        ("/proc/net/udp6", SocketProtocol::Udp),
    ] {
        let mut text = String::new();
        let read = std::fs::File::open(file)
            .and_then(|f| f.take(MAX_PROC_NET_BYTES).read_to_string(&mut text));
        if read.is_ok() {
            found.extend(parse_table(&text, protocol));
        }
    }
    found.into_iter().take(MAX_LISTEN_SOCKETS).collect()
}

/// The listening sockets of one `/proc/net/{tcp,tcp6,udp,udp6}` table.
pub fn parse_table(text: &str, protocol: SocketProtocol) -> Vec<ListenSocket> {
    let wanted = match protocol {
        SocketProtocol::Tcp => TCP_LISTEN,
        SocketProtocol::Udp => UDP_UNCONNECTED,
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _slot = fields.next()?;
            let local = fields.next()?;
            let remote = fields.next()?;
            let state = fields.next()?;
            if state != wanted {
                return None;
            }
            // A UDP socket with a peer is a client's, not one that listens.
            if protocol == SocketProtocol::Udp
                && !remote.split(':').next()?.bytes().all(|b| b == b'0')
            {
                return None;
            }
            let (address, port) = local.split_once(':')?;
            Some(ListenSocket {
                protocol,
                address: parse_address(address)?,
                port: u16::from_str_radix(port, 16).ok()?,
            })
        })
        .collect()
}

/// The kernel prints an address as its 32-bit words in host byte order, in hex.
fn parse_address(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let ip = Ipv6Addr::from(octets);
            // A v4-mapped wildcard or address is the IPv4 one to a user.
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(ip),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `address:port` of each socket found, in order.
    fn addresses(found: &[ListenSocket]) -> Vec<String> {
        found
            .iter()
            .map(|s| format!("{}:{}", s.address, s.port))
            .collect()
    }

    #[test]
    fn tcp_tables_give_listening_sockets_only() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n\
   2: 0F02000A:0016 0202000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0\n";
        let shown = addresses(&parse_table(tcp, SocketProtocol::Tcp));
        assert_eq!(shown, ["0.0.0.0:80", "127.0.0.1:8080"]);
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 0 0 0 0\n\
   1: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A 0 0 0 0\n";
        let shown = addresses(&parse_table(tcp6, SocketProtocol::Tcp));
        assert_eq!(shown, [":::22", "::1:631"]);
    }

    #[test]
    fn udp_tables_give_unconnected_bound_sockets_only() {
        let udp = "  sl  local_address rem_address   st\n\
  10: 00000000:14E9 00000000:0000 07 0 0\n\
  11: 0F02000A:A000 0302000A:0035 01 0 0\n";
        let found = parse_table(udp, SocketProtocol::Udp);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].address.to_string(), found[0].port),
            ("0.0.0.0".into(), 5353)
        );
        assert!(parse_table("header only\n garbage line\n", SocketProtocol::Udp).is_empty());
    }
}
