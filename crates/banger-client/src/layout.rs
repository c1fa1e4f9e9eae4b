//! Every path banger uses, in one place: the CLI resolves it to find the socket, the daemon
//! to find everything else.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Which tree of directories banger lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// Per-user XDG directories.
    User,
    /// `/etc/banger`, `/var/lib/banger`, `/var/cache/banger`, `/run/banger`.
    System,
}

/// The directories of one installation, and every file path derived from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// User or system install.
    pub kind: LayoutKind,
    /// Holds `config.toml`.
    pub config_dir: PathBuf,
    /// Holds the database, images, kernels, VMs and the log.
    pub state_dir: PathBuf,
    /// Holds the OCI layer cache.
    pub cache_dir: PathBuf,
    /// Holds the socket and the lock file.
    pub runtime_dir: PathBuf,
}

/// Declares path accessors of [`Layout`]: `name => dir / "file"` is
/// `pub fn name(&self) -> PathBuf { self.dir.join("file") }`, with the docs given.
macro_rules! paths {
    ($($(#[$doc:meta])* $name:ident => $dir:ident / $file:literal,)*) => {
        $(
            $(#[$doc])*
            pub fn $name(&self) -> PathBuf {
                self.$dir.join($file)
            }
        )*
    };
}

impl Layout {
    /// The per-user layout from the environment: `$XDG_CONFIG_HOME/banger` (else
    /// `~/.config/banger`), `$XDG_STATE_HOME/banger` (else `~/.local/state/banger`) and
    /// `$XDG_CACHE_HOME/banger` (else `~/.cache/banger`).
    pub fn user(env: impl Fn(&str) -> Option<OsString>) -> anyhow::Result<Layout> {
        let home = || -> anyhow::Result<PathBuf> {
            match env("HOME") {
                Some(home) if !home.is_empty() => Ok(PathBuf::from(home)),
                _ => bail!("neither HOME nor the XDG base directories are set"),
            }
        };
        let xdg = |var: &str, fallback: &[&str]| -> anyhow::Result<PathBuf> {
            match env(var) {
                // The XDG spec says relative values are invalid and must be ignored.
                Some(value) if Path::new(&value).is_absolute() => Ok(PathBuf::from(value)),
                _ => Ok(fallback.iter().fold(home()?, |path, part| path.join(part))),
            }
        };
        let state_dir = xdg("XDG_STATE_HOME", &[".local", "state"])?.join("banger");
        Ok(Layout {
            kind: LayoutKind::User,
            config_dir: xdg("XDG_CONFIG_HOME", &[".config"])?.join("banger"),
            runtime_dir: state_dir.clone(),
            state_dir,
            cache_dir: xdg("XDG_CACHE_HOME", &[".cache"])?.join("banger"),
        })
    }

    /// The system-wide layout.
    pub fn system() -> Layout {
        Layout {
            kind: LayoutKind::System,
            config_dir: PathBuf::from("/etc/banger"),
            state_dir: PathBuf::from("/var/lib/banger"),
            cache_dir: PathBuf::from("/var/cache/banger"),
            runtime_dir: PathBuf::from("/run/banger"),
        }
    }

    /// The layout to use: system when asked for by flag, or by `layout = "system"` in the
    /// user's config file; the user layout otherwise.
    pub fn resolve(system: bool) -> anyhow::Result<Layout> {
        if system {
            return Ok(Layout::system());
        }
        let user = Layout::user(|var| std::env::var_os(var))?;
        Ok(match configured_kind(&user.config_file())? {
            Some(LayoutKind::System) => Layout::system(),
            _ => user,
        })
    }

    paths! {
        /// `config.toml`.
        config_file => config_dir / "config.toml",
        /// The daemon's socket.
        socket => runtime_dir / "bangerd.sock",
        /// Held (flock) by the live daemon; holds its pid.
        lock_file => runtime_dir / "bangerd.lock",
        /// The daemon's log.
        log_file => state_dir / "bangerd.log",
        /// The SQLite database.
        database => state_dir / "banger.db",
        /// Published images, one directory each.
        images_dir => state_dir / "images",
        /// Imported kernels, one directory each.
        kernels_dir => state_dir / "kernels",
        /// VMs, one directory each.
        vms_dir => state_dir / "vms",
        /// Work in progress (flattening, building); emptied at start-up.
        staging_dir => state_dir / "staging",
        /// The OCI layer cache, `<cache>/oci`; blobs live at `blobs/sha256/<hex>` below it.
        oci_cache_dir => cache_dir / "oci",
    }

    /// The daemon's log, opened for appending, its private state directory made first:
    /// bangerd writes it through tracing, and the client that starts bangerd points the
    /// new process's stderr at it to keep what it prints before tracing is up.
    pub fn open_log(&self) -> anyhow::Result<std::fs::File> {
        crate::process::create_private_dir(&self.state_dir)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .with_context(|| format!("open the daemon's log {}", self.log_file().display()))
    }
}

/// The `layout` key of `config.toml`, if the file exists. Only that key is read here: the
/// daemon parses (and refuses unknown keys of) the whole file, so a client does not need to
/// know every key of every daemon version.
fn configured_kind(config_file: &Path) -> anyhow::Result<Option<LayoutKind>> {
    #[derive(serde::Deserialize)]
    struct LayoutKey {
        layout: Option<LayoutKind>,
    }
    let text = match std::fs::read_to_string(config_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", config_file.display())),
    };
    let key: LayoutKey =
        toml::from_str(&text).with_context(|| format!("parse {}", config_file.display()))?;
    Ok(key.layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |key| map.get(key).cloned()
    }

    #[test]
    fn user_layout_defaults_to_home_dot_dirs() {
        let layout = Layout::user(env(&[("HOME", "/home/me")])).unwrap();
        assert_eq!(
            layout.config_file(),
            Path::new("/home/me/.config/banger/config.toml")
        );
        assert_eq!(
            layout.socket(),
            Path::new("/home/me/.local/state/banger/bangerd.sock")
        );
        assert_eq!(
            layout.database(),
            Path::new("/home/me/.local/state/banger/banger.db")
        );
        assert_eq!(
            layout.oci_cache_dir(),
            Path::new("/home/me/.cache/banger/oci")
        );
    }

    #[test]
    fn xdg_variables_move_each_tree_and_relative_ones_are_ignored() {
        let layout = Layout::user(env(&[
            ("HOME", "/home/me"),
            ("XDG_CONFIG_HOME", "/x/config"),
            ("XDG_STATE_HOME", "/x/state"),
            ("XDG_CACHE_HOME", "relative/cache"),
        ]))
        .unwrap();
        assert_eq!(layout.config_dir, Path::new("/x/config/banger"));
        assert_eq!(layout.log_file(), Path::new("/x/state/banger/bangerd.log"));
        assert_eq!(
            layout.oci_cache_dir(),
            Path::new("/home/me/.cache/banger/oci")
        );
    }

    #[test]
    fn system_layout_uses_fhs_paths() {
        let layout = Layout::system();
        assert_eq!(layout.config_file(), Path::new("/etc/banger/config.toml"));
        assert_eq!(layout.database(), Path::new("/var/lib/banger/banger.db"));
        assert_eq!(layout.oci_cache_dir(), Path::new("/var/cache/banger/oci"));
        assert_eq!(layout.socket(), Path::new("/run/banger/bangerd.sock"));
    }

    #[test]
    fn only_the_layout_key_of_config_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        assert_eq!(configured_kind(&file).unwrap(), None);
        std::fs::write(&file, "layout = \"system\"\nsome_future_key = 3\n").unwrap();
        assert_eq!(configured_kind(&file).unwrap(), Some(LayoutKind::System));
        std::fs::write(&file, "layout = \"sideways\"\n").unwrap();
        let err = format!("{:#}", configured_kind(&file).unwrap_err());
        assert!(
            err.starts_with(&format!("parse {}", file.display())),
            "{err}"
        );
    }
}
