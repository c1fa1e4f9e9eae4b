//! Static IPv4 configuration from the kernel command line, with the classic ioctls (the
//! guest image need not contain `ip` or a DHCP client):
//!
//! ```text
//! banger.ip=10.0.2.15/24 banger.gw=10.0.2.2 [banger.dns=10.0.2.3] [banger.iface=eth0]
//! ```
//!
//! With QEMU's user-mode networking these values give the guest outbound access.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::system::Cmdline;

/// A static IPv4 configuration for one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface, `eth0` unless `banger.iface=` says otherwise.
    pub iface: String,
    /// The guest's address.
    pub addr: Ipv4Addr,
    /// The prefix length of its network.
    pub prefix: u8,
    /// The default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// A nameserver for `/etc/resolv.conf`, if any.
    pub dns: Option<Ipv4Addr>,
}

impl NetConfig {
    /// The configuration the command line asks for; `Ok(None)` without `banger.ip=`.
    pub fn from_cmdline(c: &Cmdline) -> Result<Option<NetConfig>, String> {
        let Some(ip) = c.get("banger.ip") else {
            return Ok(None);
        };
        // A bare address is on a /24, the host bridge's and QEMU user networking's size.
        let with_prefix = if ip.contains('/') {
            ip.to_owned()
        } else {
            format!("{ip}/24")
        };
        let net: ipnet::Ipv4Net = with_prefix.parse().map_err(|_| {
            format!("banger.ip={ip}: not an IPv4 address with a prefix 0..=32 (a.b.c.d/n)")
        })?;
        let (addr, prefix) = (net.addr(), net.prefix_len());
        let parse = |key: &str| -> Result<Option<Ipv4Addr>, String> {
            c.get(key)
                .map(|v| v.parse().map_err(|e| format!("{key}={v}: {e}")))
                .transpose()
        };
        Ok(Some(NetConfig {
            iface: c.get("banger.iface").unwrap_or("eth0").to_owned(),
            addr,
            prefix,
            gateway: parse("banger.gw")?,
            dns: parse("banger.dns")?,
        }))
    }
}

/// The netmask of a prefix length (`24` → `255.255.255.0`).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    Ipv4Addr::from(bits)
}

/// Brings `lo` up (and nothing else): for a VM without a network device.
pub fn loopback_up() -> io::Result<()> {
    Socket::new()?.up("lo").map_err(|e| ctx(e, "bring up lo"))
}

/// Brings `lo` up, waits up to `wait` for the interface to appear (virtio-net probes
/// asynchronously), then sets its address and netmask, brings it up, adds the default
/// route and writes `/etc/resolv.conf` when a nameserver was given.
pub fn configure(cfg: &NetConfig, wait: Duration) -> io::Result<()> {
    let sock = Socket::new()?;
    sock.up("lo").map_err(|e| ctx(e, "bring up lo"))?;
    let deadline = Instant::now() + wait;
    let sys = Path::new("/sys/class/net").join(&cfg.iface);
    while !sys.exists() {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface {} after {wait:?}", cfg.iface),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let iface = cfg.iface.as_str();
    sock.set_addr(iface, libc::SIOCSIFADDR, cfg.addr)
        .map_err(|e| ctx(e, &format!("set address {} on {iface}", cfg.addr)))?;
    sock.set_addr(iface, libc::SIOCSIFNETMASK, netmask(cfg.prefix))
        .map_err(|e| ctx(e, &format!("set netmask /{} on {iface}", cfg.prefix)))?;
    sock.up(iface)
        .map_err(|e| ctx(e, &format!("bring up {iface}")))?;
    if let Some(gw) = cfg.gateway {
        sock.default_route(iface, gw)
            .map_err(|e| ctx(e, &format!("add default route via {gw}")))?;
    }
    if let Some(dns) = cfg.dns {
        // Images often ship /etc/resolv.conf as a symlink into /run (systemd-resolved's
        // stub), which does not exist here: replace the link rather than write through it.
        let path = std::path::Path::new("/etc/resolv.conf");
        if path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            std::fs::remove_file(path)
                .map_err(|e| ctx(e, "replace the /etc/resolv.conf symlink"))?;
        }
        std::fs::write(path, format!("nameserver {dns}\n"))
            .map_err(|e| ctx(e, "write /etc/resolv.conf"))?;
    }
    Ok(())
}

fn ctx(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// `struct rtentry` of `<net/route.h>` (the libc crate only defines it for musl; the
/// kernel's layout is the same on every x86-64 libc).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// A datagram socket, the handle the interface ioctls go through.
struct Socket(OwnedFd);

impl Socket {
    fn new() -> io::Result<Socket> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(ctx(io::Error::last_os_error(), "open an AF_INET socket"));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Socket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        // SAFETY: every request we pass takes a pointer to exactly the struct type `T`
        // the caller built for it (ifreq or rtentry), valid for the call's duration.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, arg as *mut T) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn up(&self, iface: &str) -> io::Result<()> {
        let mut req = ifreq(iface)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    fn set_addr(&self, iface: &str, request: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
        let mut req = ifreq(iface)?;
        req.ifr_ifru.ifru_addr = sockaddr(addr);
        self.ioctl(request, &mut req)
    }

    fn default_route(&self, iface: &str, gateway: Ipv4Addr) -> io::Result<()> {
        let mut dev = iface.as_bytes().to_vec();
        dev.push(0);
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr(gateway),
            rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            // The kernel copies the name during the call; `dev` outlives it.
            rt_dev: dev.as_mut_ptr().cast(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        match self.ioctl(libc::SIOCADDRT, &mut rt) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }
}

fn ifreq(iface: &str) -> io::Result<libc::ifreq> {
    if iface.is_empty() || iface.len() >= libc::IFNAMSIZ || iface.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {iface:?}"),
        ));
    }
    // SAFETY: ifreq is plain C data (a name array and a union of integers, sockaddrs
    // and pointers) for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; the kernel reads the generic
    // sockaddr as the sockaddr_in its family says it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmask_of_common_prefixes() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(20), Ipv4Addr::new(255, 255, 240, 0));
    }

    #[test]
    fn config_from_cmdline() {
        let c = Cmdline::parse("quiet banger.ip=10.0.2.15/24 banger.gw=10.0.2.2");
        assert_eq!(
            NetConfig::from_cmdline(&c).unwrap(),
            Some(NetConfig {
                iface: "eth0".into(),
                addr: Ipv4Addr::new(10, 0, 2, 15),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
                dns: None,
            })
        );
        assert_eq!(
            NetConfig::from_cmdline(&Cmdline::parse("quiet")).unwrap(),
            None
        );
        let bad = NetConfig::from_cmdline(&Cmdline::parse("banger.ip=10.0.2.15/33"));
        assert!(bad.unwrap_err().contains("prefix"));
        let bad = NetConfig::from_cmdline(&Cmdline::parse("banger.ip=1.2.3.4 banger.gw=x"));
        assert!(bad.unwrap_err().starts_with("banger.gw=x"));
    }

    #[test]
    fn rtentry_has_the_kernel_layout() {
        // x86-64: 8 + 3*16 + 2 + 2(+4 pad) + 8 + 8 + 2(+6) + 8 + 8 + 8 + 2(+6) = 120
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }

    #[test]
    fn sockaddr_carries_the_address_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(&sa.sa_data[2..6], &[10, 0, 2, 15]);
    }
}
