//! VM networking on the host, and the policy that bounds what a guest reaches.
//!
//! Three modes, chosen by `network` in config.toml or `--network`:
//!
//! - `none`: no network device at all; the guest has only `lo`.
//! - `user`: QEMU's user-mode stack (slirp). The guest is 10.0.2.15/24 behind 10.0.2.2;
//!   slirp turns its connections into ordinary sockets of the QEMU process, so it reaches
//!   what the host reaches. Plain slirp also maps 10.0.2.2 to the host's 127.0.0.1, and
//!   the host's own addresses are just addresses: so when bangerd is root, QEMU runs as
//!   the dedicated `vmm_user` (default [`banger_vmm::confine::DEFAULT_VMM_USER`], QEMU's `-runas`) and an nft
//!   output guard ([`user_guard_script`]) rejects that user's traffic to loopback, to
//!   every local address and to the TAP bridge: outbound only. Without root nothing can
//!   enforce that (see `banger doctor`).
//!   Considered and not taken: passt (`--no-map-gw`, QEMU 7.2 `-netdev stream`) closes
//!   the loopback mapping even without root, but Debian 12's passt (0.0~git20230309)
//!   segfaulted on the first guest TCP connection here (`passt.avx2 ... segfault in
//!   libc`), and it cannot keep the guest from the host's other addresses either; the
//!   uid guard is what enforces the boundary, and it works the same with slirp.
//! - `tap`: one bridge [`BRIDGE`] holding the host address of `bridge_address` (default
//!   [`DEFAULT_BRIDGE_ADDRESS`]), NAT (masquerade) for the subnet behind it with IPv4
//!   forwarding on, and per VM a TAP device `bgr-<first 8 hex of its id>` on the bridge.
//!   Each VM gets the next free address of the subnet, recorded in the store, and
//!   configures it from the kernel command line (`banger.ip=`, `banger.gw=`). Needs
//!   `/dev/net/tun` and root, or, for an unprivileged bangerd, `bangerd-root` answering on
//!   `root_helper_socket`: then every step here that needs CAP_NET_ADMIN runs in the
//!   helper (services/privhelper.rs), which calls these same functions after checking
//!   the names and addresses. Firecracker has no other mode. The traffic rules are in
//!   [`tap_guard_script`] and [`admit_script`].
//!
//! `auto` (the default) is `tap` when bangerd runs as root (or has bangerd-root) and
//! `/dev/net/tun` exists, `user` otherwise.
//!
//! Host changes go through `ip` (iproute2) and `nft`: stable command-line interfaces whose
//! errors read well in our own messages, rather than a netlink crate's async stack for
//! half a dozen calls made once per VM. The bridge, the NAT and the guard rules are set up
//! idempotently and left in place when VMs go (like docker0); TAP devices and the per-VM
//! rule entries live only while their VM runs.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::services::tool;

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

/// The nftables tables (an `inet` and a `bridge` one) holding the guard rules: what
/// guests may not reach. Separate from [`NFT_TABLE`], which is replaced whole at every
/// start, because these hold per-VM entries that must survive other VMs' starts.
pub const GUARD_TABLE: &str = "banger_guard";

/// The guest's address, prefix and next hop in `user` mode (QEMU's historic values).
pub const USER_GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// See [`USER_GUEST_IP`].
pub const USER_PREFIX: u8 = 24;
/// See [`USER_GUEST_IP`]. slirp maps it to the host's loopback, which the output guard
/// rejects.
pub const USER_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// The `network` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkSetting {
    /// `tap` when root with /dev/net/tun, else `user`.
    #[default]
    Auto,
    /// User-mode networking (slirp): outbound only.
    User,
    /// Bridge + TAP + NAT, filtered.
    Tap,
    /// No network device.
    None,
}

impl From<banger_api::NetworkChoice> for NetworkSetting {
    fn from(c: banger_api::NetworkChoice) -> NetworkSetting {
        match c {
            banger_api::NetworkChoice::Auto => NetworkSetting::Auto,
            banger_api::NetworkChoice::User => NetworkSetting::User,
            banger_api::NetworkChoice::Tap => NetworkSetting::Tap,
            banger_api::NetworkChoice::None => NetworkSetting::None,
        }
    }
}

/// How one VM is networked (recorded per VM in the store).
pub use banger_api::VmNetwork as NetworkMode;

/// What decides `auto` and whether `tap` can work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapCapability {
    /// bangerd runs as root (creating links and NAT rules needs CAP_NET_ADMIN).
    pub root: bool,
    /// `/dev/net/tun` exists.
    pub tun: bool,
    /// Not root, but bangerd-root answers on `root_helper_socket` and does the privileged
    /// steps (services/privhelper.rs).
    pub helper: bool,
}

impl TapCapability {
    /// This process on this host, without asking for a helper.
    pub fn probe() -> TapCapability {
        TapCapability {
            root: rustix::process::geteuid().is_root(),
            tun: Path::new("/dev/net/tun").exists(),
            helper: false,
        }
    }

    /// Whether TAP networking can be set up.
    pub fn possible(self) -> bool {
        (self.root || self.helper) && self.tun
    }
}

impl NetworkSetting {
    /// The setting named `name` (`user`, `tap`, `none` or `auto`), as in config.toml.
    pub fn parse(name: &str) -> Option<NetworkSetting> {
        match name {
            "auto" => Some(NetworkSetting::Auto),
            "user" => Some(NetworkSetting::User),
            "tap" => Some(NetworkSetting::Tap),
            "none" => Some(NetworkSetting::None),
            _ => None,
        }
    }
}

/// The mode new VMs get, or why `network = "tap"` cannot work here.
pub fn resolve_mode(setting: NetworkSetting, cap: TapCapability) -> anyhow::Result<NetworkMode> {
    match setting {
        NetworkSetting::User => Ok(NetworkMode::User),
        NetworkSetting::None => Ok(NetworkMode::None),
        NetworkSetting::Auto if cap.possible() => Ok(NetworkMode::Tap),
        NetworkSetting::Auto => Ok(NetworkMode::User),
        NetworkSetting::Tap if cap.possible() => Ok(NetworkMode::Tap),
        NetworkSetting::Tap => bail!(
            "network \"tap\" needs bangerd running as root, or bangerd-root reachable (root_helper_socket), with /dev/net/tun ({}); use network \"user\", \"none\" or \"auto\"",
            match (cap.root || cap.helper, cap.tun) {
                (false, false) => "not root, no bangerd-root, no /dev/net/tun",
                (false, true) => "not root, no bangerd-root",
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

/// Runs `program args`, fed `input` (see [`tool::run_with_input`]).
fn run(program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<()> {
    let what = format!("{program} {}", args.join(" "));
    tool::run_with_input(
        Command::new(program).args(args),
        &what,
        input.map(str::as_bytes),
    )
    .map(drop)
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
    // The guard goes in before forwarding is switched on, so there is no moment where
    // the bridge routes unfiltered.
    require_nft("TAP networking")?;
    run("nft", &["-f", "-"], Some(&tap_guard_script()))
        .context("install the TAP guard rules (nft)")?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .context("enable IPv4 forwarding (net.ipv4.ip_forward=1)")?;
    ensure_nat(subnet)
}

fn ensure_nat(subnet: Subnet) -> anyhow::Result<()> {
    // nft only: the guard rules need it anyway ([`require_nft`] ran before).
    run("nft", &["-f", "-"], Some(&nft_script(subnet)))
        .with_context(|| format!("install NAT rules for {} (nft)", subnet.cidr()))
}

/// Creates the TAP device `name` on the bridge and brings it up. A leftover device of
/// the same name (a crash) is reused.
pub fn create_tap(name: &str) -> anyhow::Result<()> {
    create_tap_owned(name, None)
}

/// [`create_tap`] for a TAP that the uid `owner` may attach to without privileges (what
/// bangerd-root makes for an unprivileged bangerd, whose QEMU runs as that uid). A
/// leftover device is recreated then, since its owner may be another uid.
pub fn create_tap_owned(name: &str, owner: Option<u32>) -> anyhow::Result<()> {
    if owner.is_some() && link_exists(name) {
        delete_tap(name)?;
    }
    if !link_exists(name) {
        let owner = owner.map(|uid| uid.to_string());
        let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap"];
        if let Some(uid) = &owner {
            args.extend(["user", uid.as_str()]);
        }
        run("ip", &args, None).with_context(|| format!("create tap {name}"))?;
    }
    run("ip", &["link", "set", name, "master", BRIDGE], None)
        .with_context(|| format!("attach tap {name} to {BRIDGE}"))?;
    // An isolated bridge port forwards only to non-isolated ones (the bridge itself):
    // VMs cannot reach each other on L2. The bridge-family guard drops TAP-to-TAP frames
    // too, so the isolation holds even on a kernel that ignored the flag.
    run(
        "ip",
        &[
            "link",
            "set",
            "dev",
            name,
            "type",
            "bridge_slave",
            "isolated",
            "on",
        ],
        None,
    )
    .with_context(|| format!("isolate bridge port {name}"))?;
    run("ip", &["link", "set", name, "up"], None).with_context(|| format!("bring tap {name} up"))
}

/// The guard rules of TAP mode, loaded at every TAP VM start. Sets and maps are declared
/// (a no-op when they exist) and only the chains are flushed and refilled, in one atomic
/// `nft -f` transaction, so the per-VM entries of running VMs survive.
///
/// - `inet input`: nothing from the bridge reaches the host, except replies to
///   connections the host opened. banger serves guests nothing over the network: the
///   agent channel is virtio-serial or vsock, addresses come from the kernel command line
///   (no DHCP) and the nameserver is the host's upstream one, reached through the NAT (no
///   DNS on the host). So the gateway address, every other host address and every host
///   service are unreachable from a TAP guest; the gateway still routes.
/// - `inet forward`: no routing from the bridge back onto it (VM to VM through the
///   gateway), nothing new into the bridge from elsewhere, and what leaves is decided by
///   the source VM's egress chain ([`admit_script`]); an address without one is dropped.
/// - `bridge prerouting`: a frame from a banger TAP passes only as IPv4 or ARP carrying
///   that TAP's own MAC and address (both assigned by banger); anything else (spoofed
///   source, IPv6, other ethertypes) is dropped.
/// - `bridge forward`: no frame from one banger TAP to another (with port isolation).
pub fn tap_guard_script() -> String {
    let t = GUARD_TABLE;
    let inet_base = emptied_base_chains(
        "inet",
        "map egress { type ipv4_addr : verdict; }",
        &["input", "forward"],
    );
    let bridge_base = emptied_base_chains(
        "bridge",
        "set guests { type ifname . ether_addr . ipv4_addr; }",
        &["prerouting", "forward"],
    );
    format!(
        "{inet_base}\
         table inet {t} {{\n\
         \tchain input {{\n\
         \t\tiifname \"{BRIDGE}\" ct state established,related accept\n\
         \t\tiifname \"{BRIDGE}\" drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\tiifname \"{BRIDGE}\" oifname \"{BRIDGE}\" drop\n\
         \t\toifname \"{BRIDGE}\" ct state established,related accept\n\
         \t\toifname \"{BRIDGE}\" drop\n\
         \t\tiifname \"{BRIDGE}\" ip saddr vmap @egress\n\
         \t\tiifname \"{BRIDGE}\" drop\n\
         \t}}\n\
         }}\n\
         {bridge_base}\
         table bridge {t} {{\n\
         \tchain prerouting {{\n\
         \t\tiifname != \"{TAP_PREFIX}*\" accept\n\
         \t\tiifname . ether saddr . arp saddr ip @guests iifname . arp saddr ether . arp saddr ip @guests accept\n\
         \t\tiifname . ether saddr . ip saddr @guests accept\n\
         \t\tdrop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\tiifname \"{TAP_PREFIX}*\" oifname \"{TAP_PREFIX}*\" drop\n\
         \t}}\n\
         }}\n"
    )
}

/// The guard's `family` table with `declaration` (its map or set) and the filter `hooks`,
/// each a base chain of the hook's name, declared (which creates them the first time and
/// changes nothing after) and then flushed, so that the rules the script adds next replace
/// those of an earlier run instead of stacking on them.
fn emptied_base_chains(family: &str, declaration: &str, hooks: &[&str]) -> String {
    let t = GUARD_TABLE;
    let mut script = format!("table {family} {t} {{\n\t{declaration}\n");
    for hook in hooks {
        script += &format!(
            "\tchain {hook} {{ type filter hook {hook} priority filter; policy accept; }}\n"
        );
    }
    script += "}\n";
    for hook in hooks {
        script += &format!("flush chain {family} {t} {hook}\n");
    }
    script
}

/// The egress chain of the VM on TAP `tap`.
fn egress_chain(tap: &str) -> String {
    format!("egress_{}", tap.replace('-', "_"))
}

/// One TAP VM's entries in the guard: its (TAP, MAC, address) triple, the only source
/// its TAP may send from, and its egress chain (`allow`: accept; `deny`: nothing, so the
/// forward chain drops; a CIDR list: accept those destinations only), jumped to by its
/// address.
pub fn admit_script(tap: &str, ip: Ipv4Addr, egress: &banger_api::Egress) -> String {
    let t = GUARD_TABLE;
    let chain = egress_chain(tap);
    let mac = guest_mac(ip);
    let verdict = match egress {
        banger_api::Egress::Allow => "\t\taccept\n".to_owned(),
        banger_api::Egress::Deny => String::new(),
        banger_api::Egress::Only(cidrs) => {
            let list: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
            format!("\t\tip daddr {{ {} }} accept\n", list.join(", "))
        }
    };
    format!(
        "table inet {t} {{ chain {chain} {{ }}; }}\n\
         flush chain inet {t} {chain}\n\
         table inet {t} {{\n\
         \tchain {chain} {{\n{verdict}\t}}\n\
         }}\n\
         add element inet {t} egress {{ {ip} : jump {chain} }}\n\
         add element bridge {t} guests {{ \"{tap}\" . {mac} . {ip} }}\n"
    )
}

/// Installs the guard entries of the VM on `tap` with address `ip` ([`admit_script`]),
/// replacing what an earlier VM with that address may have left.
pub fn admit_guest(tap: &str, ip: Ipv4Addr, egress: &banger_api::Egress) -> anyhow::Result<()> {
    // A stale map entry (a VM that died while no daemon ran) would make `add element`
    // fail; deleting it first is separate, because a missing one fails its transaction.
    let _ = run(
        "nft",
        &[
            "delete",
            "element",
            "inet",
            GUARD_TABLE,
            "egress",
            &format!("{{ {ip} }}"),
        ],
        None,
    );
    run("nft", &["-f", "-"], Some(&admit_script(tap, ip, egress)))
        .with_context(|| format!("install the guard rules of {tap} ({ip}, egress {egress})"))
}

/// Removes what [`admit_guest`] installed; missing entries are fine (each is removed on
/// its own so one missing does not keep the others).
pub fn release_guest(tap: &str, ip: Ipv4Addr) {
    let t = GUARD_TABLE;
    let chain = egress_chain(tap);
    let mac = guest_mac(ip);
    for script in [
        format!("delete element inet {t} egress {{ {ip} }}\n"),
        format!("delete chain inet {t} {chain}\n"),
        format!("delete element bridge {t} guests {{ \"{tap}\" . {mac} . {ip} }}\n"),
    ] {
        let _ = run("nft", &["-f", "-"], Some(&script));
    }
}

/// The output guard of `user` mode: sockets of `uid` (the user QEMU runs as, used by
/// nothing else) may not reach any address of the host itself — loopback, every local
/// address of any interface (`fib daddr type local`), broadcast, multicast — nor the TAP
/// bridge (other VMs). What remains is the outside world. `reject`, not `drop`, so a
/// guest's connection fails at once instead of hanging. Packets in the reply direction
/// of a connection someone else opened pass: those are QEMU's answers on a published
/// port (slirp `hostfwd`), never a connection the guest starts.
pub fn user_guard_script(uid: u32) -> String {
    let t = GUARD_TABLE;
    format!(
        "table inet {t} {{ chain output {{ type filter hook output priority filter; policy accept; }}; }}\n\
         flush chain inet {t} output\n\
         table inet {t} {{\n\
         \tchain output {{\n\
         \t\tmeta skuid {uid} ct direction reply accept\n\
         \t\tmeta skuid {uid} oifname {{ \"lo\", \"{BRIDGE}\" }} reject with icmpx admin-prohibited\n\
         \t\tmeta skuid {uid} fib daddr type {{ local, broadcast, multicast, anycast }} reject with icmpx admin-prohibited\n\
         \t}}\n\
         }}\n"
    )
}

/// Loads [`user_guard_script`] for `uid`.
pub fn ensure_user_guard(uid: u32) -> anyhow::Result<()> {
    require_nft("the user-mode guard")?;
    run("nft", &["-f", "-"], Some(&user_guard_script(uid)))
        .with_context(|| format!("install the user-mode output guard for uid {uid} (nft)"))
}

fn require_nft(what: &str) -> anyhow::Result<()> {
    if banger_vmm::backend::find_on_path("nft").is_none() {
        bail!("nft is not installed: {what} needs it to filter guest traffic (apt-get install nftables)");
    }
    Ok(())
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
        helper: false,
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
                helper: false,
            },
            TapCapability {
                root: true,
                tun: false,
                helper: false,
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
                helper: false,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("network \"tap\" needs bangerd running as root, or bangerd-root reachable (root_helper_socket)"),
            "{err}"
        );
        assert!(err.contains("(not root, no bangerd-root)"), "{err}");
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
    fn every_guard_script_is_one_valid_nft_transaction() {
        if !banger_testkit::require(
            rustix::process::geteuid().is_root(),
            "nft --check needs CAP_NET_ADMIN",
        ) || !banger_testkit::require(
            banger_vmm::backend::find_on_path("nft").is_some(),
            "nft is not installed",
        ) {
            return;
        }
        let ip = Ipv4Addr::new(172, 30, 0, 2);
        let only = banger_api::Egress::Only(vec!["10.0.0.0/8".parse().unwrap()]);
        // --check parses and validates against the kernel without committing anything.
        for script in [
            nft_script(DEFAULT_BRIDGE_ADDRESS.parse().unwrap()),
            user_guard_script(65534),
            tap_guard_script() + &admit_script("bgr-01234567", ip, &banger_api::Egress::Allow),
            tap_guard_script() + &admit_script("bgr-01234567", ip, &banger_api::Egress::Deny),
            tap_guard_script() + &admit_script("bgr-01234567", ip, &only),
        ] {
            if let Err(e) = run("nft", &["--check", "-f", "-"], Some(&script)) {
                panic!("{e:#}\n{script}");
            }
        }
    }

    #[test]
    fn guard_scripts_say_what_they_enforce() {
        let user = user_guard_script(999);
        assert!(
            user.contains("meta skuid 999 oifname { \"lo\", \"banger0\" } reject"),
            "{user}"
        );
        assert!(
            user.contains("meta skuid 999 fib daddr type { local,"),
            "{user}"
        );
        let tap = tap_guard_script();
        assert!(tap.contains("iifname \"banger0\" drop"), "{tap}");
        assert!(
            tap.contains("iifname \"banger0\" oifname \"banger0\" drop"),
            "{tap}"
        );
        assert!(
            tap.contains("iifname \"bgr-*\" oifname \"bgr-*\" drop"),
            "{tap}"
        );
        let ip = Ipv4Addr::new(172, 30, 0, 9);
        let admit = admit_script(
            "bgr-0000abcd",
            ip,
            &banger_api::Egress::Only(vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.0.2.7".parse().unwrap(),
            ]),
        );
        assert!(
            admit.contains("ip daddr { 10.0.0.0/8, 192.0.2.7/32 } accept"),
            "{admit}"
        );
        assert!(
            admit.contains("guests { \"bgr-0000abcd\" . 02:b4:ac:1e:00:09 . 172.30.0.9 }"),
            "{admit}"
        );
        let deny = admit_script("bgr-0000abcd", ip, &banger_api::Egress::Deny);
        assert!(!deny.contains("accept"), "{deny}");
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
