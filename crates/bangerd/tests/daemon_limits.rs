//! The real `bangerd` against a registry (behind the test proxy) that answers a 2 GiB
//! manifest, or a config declared small and sent as 2 GiB: each pull is refused naming the
//! limit, the daemon's peak RSS (VmHWM) stays under 200 MiB, and it keeps serving.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::{push_image, tar_with_files, Fault, FaultProxy, LayerCompression, Registry};

/// Peak resident memory the daemon may reach in this test.
const MAX_PEAK_RSS_KIB: u64 = 200 << 10;

/// What the registry sends in place of a manifest or config.
const FLOOD_BYTES: u64 = 2 << 30;

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bangerd"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path().join("home"))
            .env("XDG_STATE_HOME", dir.path().join("state"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let daemon = Daemon { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(daemon.socket()).is_err() {
            assert!(Instant::now() < deadline, "bangerd did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("state/banger/bangerd.sock")
    }

    /// One call; its result or error object.
    fn call(
        &self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        let mut stream = UnixStream::connect(self.socket()).unwrap();
        let request =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        writeln!(stream, "{request}").unwrap();
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "daemon hung up");
            let message: serde_json::Value = serde_json::from_str(&line).unwrap();
            if message.get("id").is_none() {
                continue; // a progress notification
            }
            if let Some(error) = message.get("error") {
                return Err(error.clone());
            }
            return Ok(message["result"].clone());
        }
    }

    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn push_small_image(registry: &Registry, work: &Path) -> String {
    let layer = tar_with_files(&[("hello", b"hi\n")]);
    push_image(
        work,
        registry,
        "img",
        "v1",
        &[(layer, LayerCompression::Gzip)],
    )
    .config_digest
}

#[test]
fn a_flooding_registry_is_cut_off_and_the_daemon_stays_small_and_serving() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let config = push_small_image(&registry, work.path());
    let proxy = FaultProxy::start(registry.port());
    let daemon = Daemon::start();
    let pull = |name: &str| {
        daemon.call(
            "image.pull",
            serde_json::json!({"reference": proxy.reference("img", "v1"), "name": name}),
        )
    };
    for announce in [false, true] {
        proxy.set(Fault::Flood {
            path_contains: "/manifests/".into(),
            len: FLOOD_BYTES,
            content_type: "application/vnd.oci.image.manifest.v1+json".into(),
            announce,
        });
        let err = pull("flood").unwrap_err().to_string();
        assert!(
            err.contains("MAX_MANIFEST_BYTES"),
            "manifest, announce {announce}: {err}"
        );
        // The real manifest declares the config at a few hundred bytes.
        proxy.set(Fault::Flood {
            path_contains: format!("/blobs/{config}"),
            len: FLOOD_BYTES,
            content_type: "application/octet-stream".into(),
            announce,
        });
        let err = pull("flood").unwrap_err().to_string();
        assert!(
            err.contains(&config) && err.contains("wrong size"),
            "config, announce {announce}: {err}"
        );
    }
    let peak = daemon.peak_rss_kib();
    assert!(
        peak < MAX_PEAK_RSS_KIB,
        "bangerd peaked at {peak} KiB, limit {MAX_PEAK_RSS_KIB} KiB"
    );
    eprintln!("bangerd peak RSS (VmHWM): {peak} KiB");
    // Still serving: a ping, and the same pull once the registry behaves.
    daemon.call("daemon.ping", serde_json::json!({})).unwrap();
    proxy.heal();
    let info = pull("img").unwrap();
    assert_eq!(info["name"], "img");
    let listed = daemon.call("image.list", serde_json::json!({})).unwrap();
    assert_eq!(
        listed["images"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
}
