//! VM networking on the host.
//!
//! Two modes, chosen by `network` in config.toml:
//!
//! - `user`: QEMU's user-mode stack. No privileges, nothing created on the host; the guest
//!   is 10.0.2.15/24 behind 10.0.2.2 and reaches the host's network through QEMU.
//! - `tap`: one bridge [`BRIDGE`] holding the host address of `bridge_address` (default
//!   [`DEFAULT_BRIDGE_ADDRESS`]), NAT (masquerade) for the subnet behind it with IPv4
//!   forwarding on, and per VM a TAP device `bgr-<first 8 hex of its id>` on the bridge.
//!   Each VM gets the next free address of the subnet, recorded in the store, and
//!   configures it from the kernel command line (`banger.ip=`, `banger.gw=`). Needs root
//!   and `/dev/net/tun`; Firecracker has no other mode.
//!
//! `auto` (the default) is `tap` when bangerd runs as root and `/dev/net/tun` exists,
//! `user` otherwise.
//!
//! Host changes go through `ip` (iproute2) and `nft` (or `iptables` where nft is
//! missing): stable command-line interfaces whose errors read well in our own messages,
//! rather than a netlink crate's async stack for half a dozen calls made once per VM.
//! The bridge and NAT rules are set up idempotently and left in place when VMs go (like
//! docker0); TAP devices live only while their VM runs.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The bridge every TAP device joins.
pub const BRIDGE: &str = "banger0";

/// The bridge's address and prefix unless `bridge_address` says otherwise. 172.30.0.0/24
/// sits in a private range rarely used by LANs, Docker (172.17+) or libvirt
/// (192.168.122.0/24).
pub const DEFAULT_BRIDGE_ADDRESS: &str = "172.30.0.1/24";

/// Every banger TAP device starts with this.
pub const TAP_PREFIX: &str = "bgr-";

/// The nftables table holding banger's NAT and forward rules.
const NFT_TABLE: &str = "banger";

/// The `network` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkSetting {
    /// `tap` when root with /dev/net/tun, else `user`.
    #[default]
    Auto,
    /// QEMU user-mode networking.
    User,
    /// Bridge + TAP + NAT.
    Tap,
}

/// How one VM is networked (recorded per VM in the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// QEMU user-mode networking.
    User,
    /// A TAP device on [`BRIDGE`].
    Tap,
}

impl NetworkMode {
    /// The name stored in the VM record.
    pub fn name(self) -> &'static str {
        match self {
            NetworkMode::User => "user",
            NetworkMode::Tap => "tap",
        }
    }

    /// The mode a VM record names.
    pub fn from_record(record: &str) -> Option<NetworkMode> {
        match record {
            "user" => Some(NetworkMode::User),
            "tap" => Some(NetworkMode::Tap),
            _ => None,
        }
    }
}

/// What decides `auto` and whether `tap` can work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapCapability {
    /// bangerd runs as root (creating links and NAT rules needs CAP_NET_ADMIN).
    pub root: bool,
    /// `/dev/net/tun` exists.
    pub tun: bool,
}

impl TapCapability {
    /// This process on this host.
    pub fn probe() -> TapCapability {
        TapCapability {
            root: rustix::process::geteuid().is_root(),
            tun: Path::new("/dev/net/tun").exists(),
        }
    }

    /// Whether TAP networking can be set up.
    pub fn possible(self) -> bool {
        self.root && self.tun
    }
}

impl NetworkSetting {
    /// The setting named `name` (`user`, `tap` or `auto`), as in config.toml.
    pub fn parse(name: &str) -> Option<NetworkSetting> {
        match name {
            "auto" => Some(NetworkSetting::Auto),
            "user" => Some(NetworkSetting::User),
            "tap" => Some(NetworkSetting::Tap),
            _ => None,
        }
    }
}

/// The mode new VMs get, or why `network = "tap"` cannot work here.
pub fn resolve_mode(setting: NetworkSetting, cap: TapCapability) -> anyhow::Result<NetworkMode> {
    match setting {
        NetworkSetting::User => Ok(NetworkMode::User),
        NetworkSetting::Auto if cap.possible() => Ok(NetworkMode::Tap),
        NetworkSetting::Auto => Ok(NetworkMode::User),
        NetworkSetting::Tap if cap.possible() => Ok(NetworkMode::Tap),
        NetworkSetting::Tap => bail!(
            "network \"tap\" needs bangerd running as root with /dev/net/tun ({}); use network \"user\" or \"auto\"",
            match (cap.root, cap.tun) {
                (false, false) => "not root, no /dev/net/tun",
                (false, true) => "not root",
                _ => "no /dev/net/tun",
            }
        ),
    }
}

/// The bridge's address and prefix; guests get the other host addresses of the subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// The bridge's (host's) address: the guests' gateway.
    pub gateway: Ipv4Addr,
    /// The prefix length.
    pub prefix: u8,
}

impl FromStr for Subnet {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Subnet> {
        let (addr, prefix) = s
            .split_once('/')
            .with_context(|| format!("bridge_address {s:?}: expected ADDRESS/PREFIX"))?;
        let gateway: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("bridge_address {s:?}: address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .with_context(|| format!("bridge_address {s:?}: prefix must be 8..=30"))?;
        let subnet = Subnet { gateway, prefix };
        if gateway == subnet.network() || gateway == subnet.broadcast() {
            bail!("bridge_address {s:?}: the bridge needs a host address, not the network or broadcast one");
        }
        Ok(subnet)
    }
}

impl Subnet {
    fn mask(self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The network address.
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & self.mask())
    }

    /// The broadcast address.
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) | !self.mask())
    }

    /// `network/prefix`, as NAT rules want it.
    pub fn cidr(self) -> String {
        format!("{}/{}", self.network(), self.prefix)
    }

    /// The lowest host address that is neither the gateway nor in `used`.
    pub fn allocate(self, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
        let first = u32::from(self.network()) + 1;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| *ip != self.gateway && !used.contains(ip))
    }
}

/// The TAP device of the VM with id `vm_id` (IFNAMSIZ allows 15 characters).
pub fn tap_name(vm_id: &str) -> String {
    format!("{TAP_PREFIX}{}", &vm_id[..vm_id.len().min(8)])
}

/// A locally administered unicast MAC derived from the guest's address, so a VM keeps its
/// MAC across restarts and two VMs never share one.
pub fn guest_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:b4:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write;
    let what = format!("{program} {}", args.join(" "));
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("run {what} (is {program} installed?)"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("feed {what}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("wait for {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The nftables script that (re)creates banger's table: masquerade what leaves the subnet
/// for elsewhere, and accept forwarding to and from the bridge in case the host's own
/// forward policy drops. Declaring then deleting the table first makes the whole load
/// one atomic replace, so running it again changes nothing.
pub fn nft_script(subnet: Subnet) -> String {
    let cidr = subnet.cidr();
    format!(
        "table ip {NFT_TABLE} {{}}\n\
         delete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority 100; policy accept;\n\
         \t\tip saddr {cidr} ip daddr != {cidr} masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority 0; policy accept;\n\
         \t\tiifname \"{BRIDGE}\" accept\n\
         \t\toifname \"{BRIDGE}\" ct state established,related accept\n\
         \t}}\n\
         }}\n"
    )
}

/// Makes sure the bridge exists with the subnet's gateway address and is up, IPv4
/// forwarding is on and the subnet is masqueraded. Safe to call before every VM start.
pub fn ensure_bridge(subnet: Subnet) -> anyhow::Result<()> {
    if !link_exists(BRIDGE) {
        if let Err(e) = run("ip", &["link", "add", BRIDGE, "type", "bridge"], None) {
            // Another start may have created it in between.
            if !link_exists(BRIDGE) {
                return Err(e.context(format!("create bridge {BRIDGE}")));
            }
        }
    }
    let address = format!("{}/{}", subnet.gateway, subnet.prefix);
    run("ip", &["addr", "replace", &address, "dev", BRIDGE], None)
        .with_context(|| format!("give bridge {BRIDGE} the address {address}"))?;
    run("ip", &["link", "set", BRIDGE, "up"], None)
        .with_context(|| format!("bring bridge {BRIDGE} up"))?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .context("enable IPv4 forwarding (net.ipv4.ip_forward=1)")?;
    ensure_nat(subnet)
}

fn ensure_nat(subnet: Subnet) -> anyhow::Result<()> {
    if banger_vmm::backend::find_on_path("nft").is_some() {
        return run("nft", &["-f", "-"], Some(&nft_script(subnet)))
            .with_context(|| format!("install NAT rules for {} (nft)", subnet.cidr()));
    }
    // iptables: check (-C) before appending so repeated starts add no duplicates.
    let cidr = subnet.cidr();
    let rule = [
        "POSTROUTING",
        "-s",
        &cidr,
        "!",
        "-d",
        &cidr,
        "-j",
        "MASQUERADE",
    ];
    let check: Vec<&str> = ["-t", "nat", "-C"].iter().chain(&rule).copied().collect();
    if run("iptables", &check, None).is_err() {
        let add: Vec<&str> = ["-t", "nat", "-A"].iter().chain(&rule).copied().collect();
        run("iptables", &add, None).with_context(|| {
            format!("install NAT rules for {cidr} (iptables; nft is not installed)")
        })?;
    }
    Ok(())
}

/// Creates the TAP device `name` on the bridge and brings it up. A leftover device of
/// the same name (a crash) is reused.
pub fn create_tap(name: &str) -> anyhow::Result<()> {
    if !link_exists(name) {
        run("ip", &["tuntap", "add", "dev", name, "mode", "tap"], None)
            .with_context(|| format!("create tap {name}"))?;
    }
    run("ip", &["link", "set", name, "master", BRIDGE], None)
        .with_context(|| format!("attach tap {name} to {BRIDGE}"))?;
    run("ip", &["link", "set", name, "up"], None).with_context(|| format!("bring tap {name} up"))
}

/// Deletes the TAP device `name`; a missing one is fine.
pub fn delete_tap(name: &str) -> anyhow::Result<()> {
    if !link_exists(name) {
        return Ok(());
    }
    match run("ip", &["link", "del", name], None) {
        Err(_) if !link_exists(name) => Ok(()),
        r => r.with_context(|| format!("delete tap {name}")),
    }
}

/// Whether the network device `name` exists (in this network namespace).
pub fn tap_exists(name: &str) -> bool {
    link_exists(name)
}

/// A nameserver a TAP guest can reach through the NAT: the host's first non-loopback one.
/// A loopback stub (systemd-resolved's 127.0.0.53) is useless to a guest, so its upstream
/// list is tried next.
pub fn host_nameserver() -> Option<Ipv4Addr> {
    ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|text| first_routable_nameserver(&text))
}

/// The first IPv4 `nameserver` line of a resolv.conf that is not loopback.
fn first_routable_nameserver(resolv_conf: &str) -> Option<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_get_the_first_routable_ipv4_nameserver() {
        let stub = "# systemd-resolved\nnameserver 127.0.0.53\noptions edns0\n";
        assert_eq!(first_routable_nameserver(stub), None);
        let conf = "search lan\nnameserver ::1\nnameserver 127.0.0.1\n  nameserver 9.9.9.9 \nnameserver 1.1.1.1\n";
        assert_eq!(
            first_routable_nameserver(conf),
            Some(Ipv4Addr::new(9, 9, 9, 9))
        );
        assert_eq!(first_routable_nameserver(""), None);
    }

    #[test]
    fn settings_parse_by_their_config_names_only() {
        assert_eq!(NetworkSetting::parse("user"), Some(NetworkSetting::User));
        assert_eq!(NetworkSetting::parse("tap"), Some(NetworkSetting::Tap));
        assert_eq!(NetworkSetting::parse("auto"), Some(NetworkSetting::Auto));
        assert_eq!(NetworkSetting::parse("TAP"), None);
        assert_eq!(NetworkSetting::parse("bridge"), None);
    }

    const ROOT_TUN: TapCapability = TapCapability {
        root: true,
        tun: true,
    };

    #[test]
    fn auto_is_tap_only_as_root_with_tun() {
        assert_eq!(
            resolve_mode(NetworkSetting::Auto, ROOT_TUN).unwrap(),
            NetworkMode::Tap
        );
        for cap in [
            TapCapability {
                root: false,
                tun: true,
            },
            TapCapability {
                root: true,
                tun: false,
            },
        ] {
            assert_eq!(
                resolve_mode(NetworkSetting::Auto, cap).unwrap(),
                NetworkMode::User
            );
        }
        assert_eq!(
            resolve_mode(NetworkSetting::User, ROOT_TUN).unwrap(),
            NetworkMode::User
        );
    }

    #[test]
    fn tap_requested_without_root_names_the_config_key_and_the_reason() {
        let err = resolve_mode(
            NetworkSetting::Tap,
            TapCapability {
                root: false,
                tun: true,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("network \"tap\" needs bangerd running as root"),
            "{err}"
        );
        assert!(err.contains("(not root)"), "{err}");
    }

    #[test]
    fn subnet_parses_and_allocates_the_lowest_free_host_address() {
        let s: Subnet = DEFAULT_BRIDGE_ADDRESS.parse().unwrap();
        assert_eq!(s.gateway, Ipv4Addr::new(172, 30, 0, 1));
        assert_eq!(s.cidr(), "172.30.0.0/24");
        assert_eq!(s.allocate(&[]), Some(Ipv4Addr::new(172, 30, 0, 2)));
        assert_eq!(
            s.allocate(&[Ipv4Addr::new(172, 30, 0, 2), Ipv4Addr::new(172, 30, 0, 4)]),
            Some(Ipv4Addr::new(172, 30, 0, 3))
        );
        // A gateway in the middle is skipped; a full /30 has nothing left.
        let small: Subnet = "10.9.9.2/30".parse().unwrap();
        assert_eq!(small.allocate(&[]), Some(Ipv4Addr::new(10, 9, 9, 1)));
        assert_eq!(small.allocate(&[Ipv4Addr::new(10, 9, 9, 1)]), None);
    }

    #[test]
    fn subnet_refuses_what_cannot_be_a_bridge_address() {
        for bad in [
            "172.30.0.0/24",
            "172.30.0.255/24",
            "172.30.0.1",
            "x/24",
            "1.2.3.4/31",
        ] {
            let err = bad.parse::<Subnet>().unwrap_err().to_string();
            assert!(err.starts_with("bridge_address"), "{bad}: {err}");
        }
    }

    #[test]
    fn tap_names_fit_ifnamsiz_and_macs_are_local_unicast() {
        assert_eq!(tap_name("0123456789abcdef"), "bgr-01234567");
        assert!(tap_name("0123456789abcdef").len() <= 15);
        assert_eq!(guest_mac(Ipv4Addr::new(172, 30, 0, 2)), "02:b4:ac:1e:00:02");
    }

    #[test]
    fn nft_script_replaces_the_table_and_masquerades_only_outbound() {
        let script = nft_script("172.30.0.1/24".parse().unwrap());
        assert!(
            script.starts_with("table ip banger {}\ndelete table ip banger\ntable ip banger {\n")
        );
        assert!(
            script.contains("ip saddr 172.30.0.0/24 ip daddr != 172.30.0.0/24 masquerade"),
            "{script}"
        );
        assert!(script.contains("iifname \"banger0\" accept"), "{script}");
    }
}
