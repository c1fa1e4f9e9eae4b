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
    /// Whether a VM's first boot may restore a warm template (default true); `false`
    /// always boots cold, like `vm run --cold`.
    pub warm_start: Option<bool>,
}

impl Config {
    /// Reads `path`; a missing file is the default configuration.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(e).context("read config file"),
        };
        toml::from_str(&text).context("parse config file")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "insecure_registry = [\"a\"]\n").unwrap();
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("unknown field `insecure_registry`"), "{err}");
    }

    #[test]
    fn vmm_network_and_bridge_keys_parse_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "vmm = \"firecracker\"\nfirecracker_bin = \"/opt/fc/firecracker\"\nnetwork = \"tap\"\nbridge_address = \"172.31.7.1/24\"\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.vmm, Some(VmmSetting::Firecracker));
        assert_eq!(
            config.firecracker_bin.as_deref(),
            Some(Path::new("/opt/fc/firecracker"))
        );
        assert_eq!(config.network, Some(NetworkSetting::Tap));
        assert_eq!(config.bridge_address.as_deref(), Some("172.31.7.1/24"));
        std::fs::write(&path, "vmm = \"xen\"\n").unwrap();
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("unknown variant `xen`"), "{err}");
        assert!(err.contains("vmm"), "{err}");
        std::fs::write(&path, "network = \"bridge\"\n").unwrap();
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("unknown variant `bridge`"), "{err}");
    }

    #[test]
    fn system_layout_and_insecure_registries_parse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "layout = \"system\"\ninsecure_registries = [\"reg:5000\"]\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.layout, Some(LayoutKind::System));
        assert_eq!(config.insecure_registries, vec!["reg:5000".to_string()]);
    }
}
