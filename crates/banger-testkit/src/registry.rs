//! A real `docker-registry` process per test, and pushing OCI layouts into it with skopeo.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `docker-registry serve` process on `127.0.0.1:<free port>`, storing into a temporary
/// directory. Killed (and its storage removed) on drop.
pub struct Registry {
    child: Child,
    port: u16,
    credentials: Option<(String, String)>,
    // Declared last so the process is gone before its directory is removed.
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts an open registry (no authentication).
    pub fn start() -> Registry {
        Registry::start_inner(None)
    }

    /// Starts a registry that demands HTTP basic auth for `user`/`password` (an htpasswd file
    /// made with `htpasswd -Bbn`, bcrypt being the only hash distribution accepts).
    pub fn start_with_htpasswd(user: &str, password: &str) -> Registry {
        Registry::start_inner(Some((user.to_owned(), password.to_owned())))
    }

    fn start_inner(credentials: Option<(String, String)>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("banger-registry-")
            .tempdir()
            .expect("tempdir");
        let auth_section = match &credentials {
            Some((user, password)) => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("run htpasswd (Debian package apache2-utils)");
                assert!(out.status.success(), "htpasswd failed: {out:?}");
                let path = dir.path().join("htpasswd");
                fs::write(&path, &out.stdout).expect("write htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
                    path.display()
                )
            }
            None => String::new(),
        };
        // Picking a free port by binding :0 and closing it races with other tests doing the
        // same, so a registry that fails to come up is retried on a fresh port.
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            // No `http.debug` section: the debug listener would need its own port and two
            // registries would fight over a fixed one. No blob descriptor cache either, so
            // tests that corrupt stored blobs see the registry serve exactly what is on disk.
            let config = format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n\
                 {auth_section}",
                dir.path().join("storage").display()
            );
            let config_path = dir.path().join("config.yml");
            fs::write(&config_path, config).expect("write registry config");
            let log_path = dir.path().join("registry.log");
            let log = fs::File::create(&log_path).expect("create registry log");
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log fd"))
                .stderr(log)
                .spawn()
                .expect("spawn docker-registry (Debian package docker-registry)");
            if wait_until_ready(&mut child, port, Duration::from_secs(10)) {
                return Registry {
                    child,
                    port,
                    credentials,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = fs::read_to_string(&log_path).unwrap_or_default();
        }
        panic!("docker-registry did not come up after 5 attempts; last log:\n{last_log}");
    }

    /// `127.0.0.1:<port>`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port the registry listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host/name:tag`, a reference to an image in this registry.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/{name}:{tag}", self.host())
    }

    /// The user and password this registry demands, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The root of the registry's filesystem storage driver.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the bytes of blob `sha256:<hex>` (tests corrupt it to check
    /// that clients verify what they download).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Everything the registry logged so far, including the access log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many `GET` requests for blob `digest` the access log shows (any repository).
    pub fn blob_get_count(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} ");
        self.log()
            .lines()
            .filter(|line| line.contains("\"GET /v2/") && line.contains(&needle))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `GET /v2/` until the registry answers (200, or 401 when auth is on).
fn wait_until_ready(child: &mut Child, port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false; // exited, most likely because the port was taken
        }
        if let Some(200 | 401) = http_get_status(port, "/v2/") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// A minimal HTTP/1.0 GET, enough to probe readiness without pulling in an HTTP client.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// How [`push_oci_layout_with`] pushes.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Push with credentials (`--dest-creds`); defaults to the registry's own if it has any.
    pub credentials: Option<(String, String)>,
    /// Let skopeo recompress layers as zstd (`--dest-compress-format zstd`). skopeo 1.9 only
    /// does this for layers that are not compressed already.
    pub zstd: bool,
    /// Convert to Docker schema 2 manifests (`--format v2s2`) instead of keeping OCI ones.
    pub docker_v2s2: bool,
    /// Copy every platform of a multi-platform index (`--multi-arch all`); without it skopeo
    /// copies only the image for the host's platform.
    pub all_platforms: bool,
}

/// Pushes tag `tag` of the OCI layout at `dir` to `registry` as `name:tag`, byte for byte
/// (all platforms, digests preserved).
pub fn push_oci_layout(dir: &Path, tag: &str, registry: &Registry, name: &str) {
    push_oci_layout_with(
        dir,
        tag,
        registry,
        name,
        &PushOptions {
            all_platforms: true,
            ..Default::default()
        },
    )
}

/// Like [`push_oci_layout`] with explicit options.
pub fn push_oci_layout_with(
    dir: &Path,
    tag: &str,
    registry: &Registry,
    name: &str,
    options: &PushOptions,
) {
    let mut cmd = Command::new("skopeo");
    // `--insecure-policy` so the test does not depend on /etc/containers/policy.json;
    // `--dest-tls-verify=false` because the registry speaks plain HTTP.
    cmd.args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
    ]);
    // Keep skopeo away from the invoking user's auth files and blob-info cache, which could
    // make it skip uploads it believes the registry already has.
    let scratch = tempfile::tempdir().expect("tempdir");
    cmd.env("HOME", scratch.path())
        .env("XDG_RUNTIME_DIR", scratch.path());
    cmd.env("DOCKER_CONFIG", scratch.path());
    let credentials = options.credentials.clone().or_else(|| {
        registry
            .credentials()
            .map(|(u, p)| (u.to_owned(), p.to_owned()))
    });
    if let Some((user, password)) = credentials {
        cmd.arg(format!("--dest-creds={user}:{password}"));
    }
    if options.zstd {
        cmd.args(["--dest-compress", "--dest-compress-format", "zstd"]);
    }
    if options.docker_v2s2 {
        cmd.args(["--format", "v2s2"]);
    }
    if !options.zstd && !options.docker_v2s2 {
        // Otherwise skopeo gzips uncompressed layers on the way to a registry, and the
        // digests the test built would not be the ones it pulls.
        cmd.arg("--preserve-digests");
    }
    if options.all_platforms {
        cmd.args(["--multi-arch", "all"]);
    }
    cmd.arg(format!("oci:{}:{tag}", dir.display()));
    cmd.arg(format!("docker://{}/{name}:{tag}", registry.host()));
    let out = cmd.output().expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
