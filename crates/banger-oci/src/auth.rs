//! Registry credentials from Docker's `config.json`, so `docker login` is all the setup a
//! private registry needs.
//!
//! Only static credentials are read: `auths.<registry>.auth` (base64 `user:password`),
//! `auths.<registry>.username`/`password`, and `registrytoken` (a bearer token). Credential
//! helpers (`credsStore`, `credHelpers`) are not run; a registry that only has a helper is
//! pulled anonymously, with a warning. Token exchanges (Docker Hub's 401 +
//! `WWW-Authenticate: Bearer`) are oci-client's job, given these credentials.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
pub use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// The registry names Docker Hub goes by in `config.json` keys; `docker login` writes
/// `https://index.docker.io/v1/`.
const DOCKER_HUB_ALIASES: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// A `config.json` that exists but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read (other than not existing, which means anonymous).
    #[error("reading docker config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not the JSON we expect.
    #[error("parsing docker config {path}: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The entry for a registry is malformed.
    #[error("docker config {path}: bad credentials for {registry}: {reason}")]
    BadEntry {
        /// The config file.
        path: PathBuf,
        /// The `auths` key.
        registry: String,
        /// What is wrong with it.
        reason: String,
    },
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// Where Docker keeps its config: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`. `None` without either variable.
pub fn default_docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".docker/config.json"))
}

/// Credentials for `registry` (as written in a normalised reference: `docker.io`,
/// `ghcr.io`, `127.0.0.1:5000`) from the config at `config_path`, or from
/// [`default_docker_config_path`] when `None`. A missing file or entry means anonymous.
pub fn registry_auth(
    registry: &str,
    config_path: Option<&Path>,
) -> Result<RegistryAuth, AuthError> {
    let path = match config_path {
        Some(path) => path.to_owned(),
        None => match default_docker_config_path() {
            Some(path) => path,
            None => return Ok(RegistryAuth::Anonymous),
        },
    };
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(source) => return Err(AuthError::Read { path, source }),
    };
    let config: DockerConfigFile =
        serde_json::from_slice(&text).map_err(|source| AuthError::Parse {
            path: path.clone(),
            source,
        })?;
    let wanted = canonical_registry(registry);
    let entry = config
        .auths
        .iter()
        .find(|(key, _)| canonical_registry(key) == wanted);
    if let Some((key, entry)) = entry {
        let bad = |reason: String| AuthError::BadEntry {
            path: path.clone(),
            registry: key.clone(),
            reason,
        };
        if let Some(encoded) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| bad(format!("`auth` is not base64: {e}")))?;
            let decoded =
                String::from_utf8(decoded).map_err(|_| bad("`auth` is not UTF-8".to_owned()))?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or_else(|| bad("`auth` is not `user:password`".to_owned()))?;
            return Ok(RegistryAuth::Basic(user.to_owned(), password.to_owned()));
        }
        if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
            return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
        }
        if let Some(token) = entry.registrytoken.as_deref().filter(|t| !t.is_empty()) {
            return Ok(RegistryAuth::Bearer(token.to_owned()));
        }
    }
    let helper = config
        .cred_helpers
        .iter()
        .find(|(key, _)| canonical_registry(key) == wanted)
        .map(|(_, helper)| helper)
        .or(config.creds_store.as_ref());
    if let Some(helper) = helper {
        tracing::warn!(
            registry,
            helper,
            config = %path.display(),
            "docker credential helpers are not supported; pulling anonymously"
        );
    }
    Ok(RegistryAuth::Anonymous)
}

/// Reduces a `config.json` key or registry name to a comparable host: Docker writes keys as
/// bare hosts, as `https://host`, or (Docker Hub) `https://index.docker.io/v1/`.
fn canonical_registry(key: &str) -> String {
    let key = key.trim();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        "docker.io".to_owned()
    } else {
        host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(json: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        (dir, path)
    }

    fn basic(user: &str, password: &str) -> RegistryAuth {
        RegistryAuth::Basic(user.to_owned(), password.to_owned())
    }

    #[test]
    fn reads_auth_and_username_password_entries() {
        let (_dir, path) = write_config(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldDpjb2xvbg=="},
                "127.0.0.1:5000": {"username": "u", "password": "p"},
                "https://ghcr.io": {"auth": "Z2g6dG9r"},
                "tok.example": {"registrytoken": "t0k"}
            }}"#,
        );
        let auth = |r: &str| registry_auth(r, Some(&path)).unwrap();
        // The password keeps its own colons: only the first one separates.
        assert_eq!(auth("docker.io"), basic("hub", "secret:colon"));
        assert_eq!(auth("127.0.0.1:5000"), basic("u", "p"));
        assert_eq!(auth("ghcr.io"), basic("gh", "tok"));
        assert_eq!(auth("tok.example"), RegistryAuth::Bearer("t0k".to_owned()));
        assert_eq!(auth("127.0.0.1:5001"), RegistryAuth::Anonymous);
        assert_eq!(auth("quay.io"), RegistryAuth::Anonymous);
    }

    #[test]
    fn missing_file_is_anonymous_and_garbage_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        assert_eq!(
            registry_auth("ghcr.io", Some(&missing)).unwrap(),
            RegistryAuth::Anonymous
        );

        let (_dir, path) = write_config("{not json");
        let err = registry_auth("ghcr.io", Some(&path))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");

        let (_dir, path) = write_config(r#"{"auths": {"ghcr.io": {"auth": "!!!"}}}"#);
        let err = registry_auth("ghcr.io", Some(&path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ghcr.io") && err.contains("base64"), "{err}");
    }

    #[test]
    fn helpers_only_means_anonymous() {
        let (_dir, path) =
            write_config(r#"{"auths": {"ghcr.io": {}}, "credHelpers": {"ghcr.io": "gh"}}"#);
        assert_eq!(
            registry_auth("ghcr.io", Some(&path)).unwrap(),
            RegistryAuth::Anonymous
        );
    }

    #[test]
    fn docker_config_env_names_the_directory() {
        // The only test in this crate touching DOCKER_CONFIG, so mutating it is safe here.
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("DOCKER_CONFIG", dir.path());
        let path = default_docker_config_path();
        std::env::remove_var("DOCKER_CONFIG");
        assert_eq!(path, Some(dir.path().join("config.json")));
    }

    #[test]
    fn keys_are_compared_by_host() {
        assert_eq!(
            canonical_registry("https://index.docker.io/v1/"),
            "docker.io"
        );
        assert_eq!(canonical_registry("registry-1.docker.io"), "docker.io");
        assert_eq!(
            canonical_registry("http://127.0.0.1:5000/v2/"),
            "127.0.0.1:5000"
        );
        assert_eq!(canonical_registry("GHCR.io"), "ghcr.io");
    }
}
