//! `banger image cache prune` end to end: exact output lines, --json, and the RPC itself.

mod support;

use serde_json::{json, Value};
use support::{assert_exit, stdout, Install};

fn prune(install: &Install, args: &[&str]) -> String {
    let mut all = vec!["image", "cache", "prune"];
    all.extend_from_slice(args);
    let out = install.banger(&all);
    assert_exit(&out, 0);
    stdout(&out)
}

#[test]
fn prints_one_line_in_binary_units_for_zero_bytes_kib_and_gib() {
    let install = Install::new();
    let dir = install.cache_dir();
    assert_eq!(
        prune(&install, &[]),
        format!("freed 0 B across 0 blob(s) in {}\n", dir.display())
    );

    install.blob("a", 512);
    assert_eq!(
        prune(&install, &["--dry-run"]),
        format!("would free 512 B across 1 blob(s) in {}\n", dir.display())
    );
    assert_eq!(
        prune(&install, &[]),
        format!("freed 512 B across 1 blob(s) in {}\n", dir.display())
    );

    install.blob("b", 1024);
    install.blob("c", 512);
    assert_eq!(
        prune(&install, &[]),
        format!("freed 1.5 KiB across 2 blob(s) in {}\n", dir.display())
    );

    // 1.2 GiB in sparse files: the tally is about sizes, not disk blocks.
    for i in 0..47u64 {
        install.blob(
            &format!("{i:064x}"),
            if i == 0 { 1288490189 - 46 * 1000 } else { 1000 },
        );
    }
    assert_eq!(
        prune(&install, &["--dry-run"]),
        format!(
            "would free 1.2 GiB across 47 blob(s) in {}\n",
            dir.display()
        )
    );
    assert_eq!(
        prune(&install, &[]),
        format!("freed 1.2 GiB across 47 blob(s) in {}\n", dir.display())
    );
    assert!(dir.is_dir());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn json_prints_the_result_object() {
    let install = Install::new();
    install.blob("a", 2048);
    let out = install.banger(&["--json", "image", "cache", "prune", "--dry-run"]);
    assert!(out.status.success());
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        result,
        json!({
            "bytes_freed": 2048,
            "blobs_freed": 1,
            "dry_run": true,
            "cache_dir": install.cache_dir().display().to_string(),
        })
    );
}

#[test]
fn selective_flags_reach_the_daemon() {
    let install = Install::new();
    install.blob("old", 100);
    install.blob("new", 100);
    let old = install.cache_dir().join("blobs/sha256/old");
    let week_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(8 * 86400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(week_ago)
        .unwrap();
    let line = prune(&install, &["--older-than", "7d"]);
    assert_eq!(
        line,
        format!(
            "freed 100 B across 1 blob(s) in {}\n",
            install.cache_dir().display()
        )
    );
    assert!(!old.exists());
    let line = prune(&install, &["--keep-storage", "1KiB"]);
    assert!(line.starts_with("freed 0 B across 0 blob(s)"), "{line}");
    let line = prune(&install, &["--keep-storage", "0"]);
    assert!(line.starts_with("freed 100 B across 1 blob(s)"), "{line}");
}

#[test]
fn the_rpc_answers_directly_over_the_socket() {
    let install = Install::new();
    install.blob("a", 300);
    install.blob("b", 700);
    let out = install.banger(&["daemon", "status"]);
    assert_eq!(out.status.code(), Some(1));
    prune(&install, &["--dry-run"]); // starts the daemon
    let mut conn = install.connect();
    let dry = conn.call(
        json!({"jsonrpc":"2.0","id":1,"method":"image.cache.prune","params":{"dry_run":true}}),
    );
    let cache_dir = install.cache_dir().display().to_string();
    assert_eq!(
        dry,
        json!({"jsonrpc":"2.0","id":1,"result":{"bytes_freed":1000,"blobs_freed":2,"dry_run":true,"cache_dir":cache_dir}})
    );
    let real = conn.call(json!({"jsonrpc":"2.0","id":2,"method":"image.cache.prune"}));
    assert_eq!(
        real,
        json!({"jsonrpc":"2.0","id":2,"result":{"bytes_freed":1000,"blobs_freed":2,"dry_run":false,"cache_dir":cache_dir}})
    );
}

#[test]
fn daemon_start_up_removes_leftovers_of_an_interrupted_prune() {
    let install = Install::new();
    let aside = install
        .cache_dir()
        .with_file_name("oci.pruning-00112233445566aa");
    std::fs::create_dir_all(aside.join("blobs/sha256")).unwrap();
    std::fs::write(aside.join("blobs/sha256/x"), [0u8; 10]).unwrap();
    let out = install.banger(&["version"]);
    assert_eq!(
        stdout(&out),
        format!(
            "banger {v}\nbangerd not running\n",
            v = env!("CARGO_PKG_VERSION")
        )
    );
    assert!(aside.exists(), "version must not start a daemon");
    let mut child = install.bangerd_command().spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while aside.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "leftover not removed at start-up"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::Term).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
