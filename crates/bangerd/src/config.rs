//! `config.toml`: settings an operator may change. Unknown keys are refused so a typo is
//! reported instead of silently ignored.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::layout::LayoutKind;

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
