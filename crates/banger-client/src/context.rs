//! Named daemons (`banger context create|use|ls|rm`), like docker's contexts, and the
//! choice of endpoint for one command.
//!
//! They live in the client's own file, `$XDG_CONFIG_HOME/banger/contexts.toml` (else
//! `~/.config/banger/contexts.toml`), not in `config.toml`: that file is the daemon's,
//! which refuses keys it does not know, and contexts belong to the user running the CLI
//! even when the daemon is a system one.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::layout::Layout;
use crate::transport::{
    parse_host, Endpoint, HostSpec, CONTEXT_ENV, DEFAULT_REMOTE_BANGER, HOST_ENV,
};

/// The name that always means this machine's own daemon.
pub const LOCAL_CONTEXT: &str = "default";

/// Most contexts one file holds (it is read on every command).
pub const MAX_CONTEXTS: usize = 1024;

/// Largest `contexts.toml` read.
pub const MAX_CONTEXTS_FILE_BYTES: u64 = 1 << 20;

/// One named daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextEntry {
    /// `ssh://[user@]host[:port]` or `unix:///path`.
    pub host: String,
    /// The banger program on the far side (ssh only); default: `banger` on its PATH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_banger: Option<String>,
    /// Use the far side's system daemon.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub system: bool,
    /// Free text for `context ls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The whole `contexts.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contexts {
    /// The context `context use` chose; none (or `default`): the local daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// By name.
    #[serde(default)]
    pub contexts: BTreeMap<String, ContextEntry>,
}

/// Where the contexts of this user live.
pub fn contexts_file() -> anyhow::Result<PathBuf> {
    Ok(Layout::user(|v| std::env::var_os(v))?
        .config_dir
        .join("contexts.toml"))
}

/// Checks a context name: `[a-z0-9][a-z0-9._-]{0,63}`, not `default`.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if !ok {
        bail!("context name {name:?} must match [a-z0-9][a-z0-9._-]{{0,63}}");
    }
    if name == LOCAL_CONTEXT {
        bail!("context name {LOCAL_CONTEXT:?} is reserved for the local daemon");
    }
    Ok(())
}

impl Contexts {
    /// Reads `path`; a missing file is no contexts.
    pub fn load(path: &Path) -> anyhow::Result<Contexts> {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Contexts::default()),
            Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
        };
        if meta.len() > MAX_CONTEXTS_FILE_BYTES {
            bail!(
                "{} is {} bytes, over the limit of {MAX_CONTEXTS_FILE_BYTES} (MAX_CONTEXTS_FILE_BYTES)",
                path.display(),
                meta.len()
            );
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let contexts: Contexts =
            toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        for (name, entry) in &contexts.contexts {
            validate_name(name).with_context(|| format!("in {}", path.display()))?;
            parse_host(&entry.host)
                .with_context(|| format!("context {name:?} in {}", path.display()))?;
        }
        Ok(contexts)
    }

    /// Writes `path` whole (a temporary file renamed over it), mode 0600.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if self.contexts.len() > MAX_CONTEXTS {
            bail!("more than {MAX_CONTEXTS} contexts (MAX_CONTEXTS)");
        }
        let dir = path.parent().expect("contexts.toml has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let text = toml::to_string_pretty(self).context("encode contexts")?;
        let tmp = path.with_extension("toml.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("create {}", tmp.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
    }
}

/// What the command line says about where the daemon is.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `--host`.
    pub host: Option<String>,
    /// `--context`.
    pub context: Option<String>,
    /// `--system`.
    pub system: bool,
    /// `--remote-banger`.
    pub remote_banger: Option<String>,
}

/// The endpoint for one command: `--host`, else `--context`, else `BANGER_HOST`, else
/// `BANGER_CONTEXT`, else the current context, else the local daemon of the layout.
pub fn resolve(selection: &Selection) -> anyhow::Result<Endpoint> {
    let env = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    let from_host = |host: &str, remote: Option<&str>, system: bool| -> anyhow::Result<Endpoint> {
        Ok(match parse_host(host)? {
            HostSpec::Socket(path) => Endpoint::Socket(path),
            HostSpec::Ssh(ssh) => Endpoint::Ssh {
                host: ssh,
                remote_banger: selection
                    .remote_banger
                    .clone()
                    .or(remote.map(String::from))
                    .unwrap_or_else(|| DEFAULT_REMOTE_BANGER.into()),
                system,
            },
        })
    };
    if let Some(host) = &selection.host {
        return from_host(host, None, selection.system);
    }
    let named = match &selection.context {
        Some(name) => Some(name.clone()),
        None => match env(HOST_ENV) {
            Some(host) => {
                return from_host(&host, None, selection.system)
                    .with_context(|| format!("{HOST_ENV}={host}"))
            }
            None => match env(CONTEXT_ENV) {
                Some(name) => Some(name),
                None => Contexts::load(&contexts_file()?)?.current,
            },
        },
    };
    match named.as_deref() {
        None | Some(LOCAL_CONTEXT) => Ok(Endpoint::Local(Layout::resolve(selection.system)?)),
        Some(name) => {
            let file = contexts_file()?;
            let contexts = Contexts::load(&file)?;
            let Some(entry) = contexts.contexts.get(name) else {
                bail!(
                    "no context {name:?} in {} (banger context ls)",
                    file.display()
                );
            };
            from_host(
                &entry.host,
                entry.remote_banger.as_deref(),
                entry.system || selection.system,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_round_trip_and_bad_files_name_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("banger/contexts.toml");
        assert_eq!(Contexts::load(&file).unwrap(), Contexts::default());
        let mut contexts = Contexts::default();
        contexts.contexts.insert(
            "big".into(),
            ContextEntry {
                host: "ssh://me@big:2222".into(),
                remote_banger: Some("/usr/local/bin/banger".into()),
                system: false,
                description: None,
            },
        );
        contexts.current = Some("big".into());
        contexts.save(&file).unwrap();
        assert_eq!(Contexts::load(&file).unwrap(), contexts);
        std::fs::write(&file, "[contexts.x]\nhost = \"ftp://x\"\n").unwrap();
        let err = format!("{:#}", Contexts::load(&file).unwrap_err());
        assert!(
            err.contains("contexts.toml") && err.contains("ftp://x"),
            "{err}"
        );
        std::fs::write(&file, "colour = 1\n").unwrap();
        assert!(Contexts::load(&file).is_err(), "unknown keys are refused");
    }

    #[test]
    fn names_are_checked_and_default_is_reserved() {
        validate_name("big-box.1").unwrap();
        for bad in ["", "Big", "-x", "a/b", "default", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
