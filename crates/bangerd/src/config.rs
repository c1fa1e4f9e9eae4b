//! `config.toml`: settings an operator may change. Unknown keys are refused so a typo is
//! reported instead of silently ignored.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::layout::LayoutKind;
use crate::services::network::NetworkSetting;

/// The `vmm` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmSetting {
    /// Firecracker when its binary is present, KVM runs a guest and networking is TAP;
    /// QEMU otherwise.
    #[default]
    Auto,
    /// Always QEMU (KVM when usable, else TCG).
    Qemu,
    /// Always Firecracker; starting a VM fails, naming the reason, where it cannot run.
    Firecracker,
}

impl From<VmmSetting> for banger_vmm::BackendPreference {
    fn from(s: VmmSetting) -> Self {
        match s {
            VmmSetting::Auto => banger_vmm::BackendPreference::Auto,
            VmmSetting::Qemu => banger_vmm::BackendPreference::Qemu,
            VmmSetting::Firecracker => banger_vmm::BackendPreference::Firecracker,
        }
    }
}

/// The parsed configuration; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `"user"` or `"system"`: which directory tree to use.
    pub layout: Option<LayoutKind>,
    /// Registries reached over plain HTTP besides loopback ones (Docker's convention).
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Docker-style credentials file; default `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Image `vm create` and `vm run` use when none is given (a name or a reference).
    pub default_image: Option<String>,
    /// Kernel `vm create` uses when none is given; default the newest import.
    pub default_kernel: Option<String>,
    /// The static guest agent binary; default `banger-agent` next to `bangerd`.
    pub agent_bin: Option<PathBuf>,
    /// Which VMM boots VMs: `"auto"` (default), `"qemu"` or `"firecracker"`.
    pub vmm: Option<VmmSetting>,
    /// The Firecracker binary; default `firecracker` on PATH.
    pub firecracker_bin: Option<PathBuf>,
    /// How VMs are networked: `"auto"` (default: `tap` as root with /dev/net/tun, else
    /// `user`), `"user"` (QEMU user-mode) or `"tap"` (bridge + TAP + NAT).
    pub network: Option<NetworkSetting>,
    /// The bridge's address and prefix in TAP mode; guests get the rest of the subnet.
    /// Default `172.30.0.1/24`.
    pub bridge_address: Option<String>,
    /// Most bytes of a VM's console kept on the host (`console.log` + `console.log.1`);
    /// default 1 MiB, at least 16 KiB.
    pub console_log_max: Option<u64>,
    /// The system user VMMs run as when bangerd is root; default `banger-vmm`.
    pub vmm_user: Option<String>,
    /// Firecracker's jailer, used when bangerd is root; default `jailer` on PATH.
    pub jailer_bin: Option<PathBuf>,
    /// The socket of `bangerd-root`, which does TAP networking's privileged steps for a
    /// bangerd that is not root; default `/run/banger-root/bangerd-root.sock`.
    pub root_helper_socket: Option<PathBuf>,
    /// Seconds a registry may send nothing before a pull fails; default 120.
    pub registry_read_timeout_secs: Option<u64>,
    /// Decompressed bytes one image may unpack to; default half the free space.
    pub image_max_unpacked_bytes: Option<u64>,
    /// Tar entries one image may hold; default 4,000,000.
    pub image_max_entries: Option<u64>,
    /// RAM a build may stage its tree in (/dev/shm) before it moves to disk; default a
    /// quarter of the available memory.
    pub memory_staging_max_bytes: Option<u64>,
    /// The biggest uncompressed layer copy the layer cache keeps; default 8 GiB.
    pub uncompressed_copy_max_bytes: Option<u64>,
    /// The biggest kernel payload (`.deb`, vmlinux, initrd) `kernel import` reads; default
    /// 512 MiB.
    pub kernel_max_payload_bytes: Option<u64>,
    /// What guests may reach beyond the host: `"allow"` (default), `"deny"` or a list of
    /// IPv4 CIDRs (TAP mode only). `--egress` overrides it per VM.
    pub egress: Option<banger_api::Egress>,
    /// Whether a VM's first boot may restore a warm template (default true); `false`
    /// always boots cold, like `vm run --cold`.
    pub warm_start: Option<bool>,
}

impl Config {
    /// The image build limits these settings give.
    pub fn image_limits(&self) -> crate::services::image::ImageLimits {
        let defaults = crate::services::image::ImageLimits::default();
        crate::services::image::ImageLimits {
            max_unpacked_bytes: self.image_max_unpacked_bytes,
            max_entries: self.image_max_entries.unwrap_or(defaults.max_entries),
            memory_staging_max_bytes: self.memory_staging_max_bytes,
            uncompressed_copy_max_bytes: self
                .uncompressed_copy_max_bytes
                .unwrap_or(defaults.uncompressed_copy_max_bytes),
        }
    }
}

impl Config {
    /// Reads `path`; a missing file is the default configuration.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(e).context("read config file"),
        };
        let config: Config = toml::from_str(&text).context("parse config file")?;
        if let Some(max) = config.console_log_max {
            let min = banger_vmm::console::MIN_CONSOLE_LOG_MAX;
            if max < min {
                anyhow::bail!("console_log_max = {max} is below the minimum of {min} bytes");
            }
        }
        Ok(config)
    }

    /// The name of the user VMMs run as under a root daemon (`vmm_user`).
    pub fn vmm_user_name(&self) -> &str {
        self.vmm_user
            .as_deref()
            .unwrap_or(banger_vmm::confine::DEFAULT_VMM_USER)
    }

    /// The user VMMs run as: `Ok(None)` when bangerd is not root (they run as bangerd's
    /// user, which is no more than the caller's); the `vmm_user` when root; an error
    /// naming the key and the fix when root and that user does not exist.
    pub fn vmm_user(&self) -> Result<Option<banger_vmm::confine::VmmUser>, String> {
        if !rustix::process::geteuid().is_root() {
            return Ok(None);
        }
        let name = self.vmm_user_name();
        match banger_vmm::confine::lookup_vmm_user(name) {
            Ok(Some(user)) if user.uid != 0 => Ok(Some(user)),
            Ok(Some(_)) => Err(format!(
                "vmm_user = {name:?} in config.toml is root; VMMs must not run as root"
            )),
            Ok(None) => Err(format!(
                "bangerd runs as root, so VMMs run as vmm_user = {name:?} (config.toml), which does not exist: create it with `useradd --system --no-create-home --shell /usr/sbin/nologin {name}` (scripts/setup.sh does) or set vmm_user to another unprivileged user"
            )),
            Err(e) => Err(format!("look up vmm_user = {name:?} in /etc/passwd: {e}")),
        }
    }

    /// The console cap in bytes (`console_log_max`, else 1 MiB).
    pub fn console_log_max(&self) -> u64 {
        self.console_log_max
            .unwrap_or(banger_vmm::console::DEFAULT_CONSOLE_LOG_MAX)
    }
}

/// The uid and gid VMMs run as (see [`Config::vmm_user`]): `None` when they run as
/// bangerd's own user (bangerd is not root) or the user is missing (then no VM starts).
/// For rules that tell a VMM's traffic apart, e.g. nft `meta skuid`.
pub fn vmm_user_ids(config: &Config) -> Option<(u32, u32)> {
    config.vmm_user().ok().flatten().map(|u| (u.uid, u.gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `text` as a config.toml file, the way the daemon reads one.
    fn load(text: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    /// The whole error chain of loading `text`, which must fail.
    fn load_error(text: &str) -> String {
        format!("{:#}", load(text).unwrap_err())
    }

    #[test]
    fn missing_file_is_default() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Config::load(&dir.path().join("config.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_error("insecure_registry = [\"a\"]\n");
        assert!(err.contains("unknown field `insecure_registry`"), "{err}");
    }

    #[test]
    fn vmm_network_and_bridge_keys_parse_and_bad_values_are_named() {
        let config = load("vmm = \"firecracker\"\nfirecracker_bin = \"/opt/fc/firecracker\"\nnetwork = \"tap\"\nbridge_address = \"172.31.7.1/24\"\n").unwrap();
        assert_eq!(config.vmm, Some(VmmSetting::Firecracker));
        assert_eq!(
            config.firecracker_bin.as_deref(),
            Some(Path::new("/opt/fc/firecracker"))
        );
        assert_eq!(config.network, Some(NetworkSetting::Tap));
        assert_eq!(config.bridge_address.as_deref(), Some("172.31.7.1/24"));
        let err = load_error("vmm = \"xen\"\n");
        assert!(err.contains("unknown variant `xen`"), "{err}");
        assert!(err.contains("vmm"), "{err}");
        let err = load_error("network = \"bridge\"\n");
        assert!(err.contains("unknown variant `bridge`"), "{err}");
    }

    #[test]
    fn console_log_max_parses_and_a_tiny_cap_is_refused_naming_the_key() {
        assert_eq!(Config::default().console_log_max(), 1 << 20);
        assert_eq!(
            load("console_log_max = 65536\n").unwrap().console_log_max(),
            65536
        );
        let err = load_error("console_log_max = 100\n");
        assert!(err.contains("console_log_max = 100"), "{err}");
    }

    #[test]
    fn egress_vmm_user_and_network_none_parse_and_bad_egress_is_named() {
        let config =
            load("network = \"none\"\negress = [\"10.0.0.0/8\"]\nvmm_user = \"vmm\"\n").unwrap();
        assert_eq!(config.network, Some(NetworkSetting::None));
        assert_eq!(
            config.egress.map(|e| e.to_string()).as_deref(),
            Some("10.0.0.0/8")
        );
        assert_eq!(config.vmm_user.as_deref(), Some("vmm"));
        let err = load_error("egress = \"sometimes\"\n");
        assert!(err.contains("egress \"sometimes\""), "{err}");
    }

    #[test]
    fn system_layout_and_insecure_registries_parse() {
        let config = load("layout = \"system\"\ninsecure_registries = [\"reg:5000\"]\n").unwrap();
        assert_eq!(config.layout, Some(LayoutKind::System));
        assert_eq!(config.insecure_registries, vec!["reg:5000".to_string()]);
    }
}
