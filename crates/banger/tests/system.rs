//! `banger system install --prefix`: the binaries and the agent land under the prefix and
//! the units it writes pass `systemd-analyze verify`; uninstall removes them again.

use std::path::Path;
use std::process::Command;

use banger_testkit::host::run_ok;

#[test]
fn system_install_into_a_prefix_writes_units_that_systemd_analyze_verifies() {
    let banger = Path::new(env!("CARGO_BIN_EXE_banger"));
    let bin_dir = banger.parent().unwrap();
    if !banger_testkit::require(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok(),
        "systemd-analyze is missing (scripts/setup.sh installs systemd)",
    ) || !banger_testkit::require(
        bin_dir.join("bangerd").is_file() && bin_dir.join("bangerd-root").is_file(),
        "build bangerd and bangerd-root first (cargo build --workspace --bins)",
    ) {
        return;
    }
    let prefix = tempfile::tempdir().unwrap();
    // A fake agent: install copies whatever BANGER_AGENT names.
    let agent = prefix.path().join("agent-src");
    std::fs::write(&agent, "#!/bin/sh\n").unwrap();
    let out = run_ok(
        Command::new(banger)
            .args([
                "--json",
                "system",
                "install",
                "--owner",
                "daemon",
                "--no-start",
                "--prefix",
            ])
            .arg(prefix.path())
            .env("BANGER_AGENT", &agent),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["started"], false, "{report}");
    for file in [
        "bin/banger",
        "bin/bangerd",
        "bin/bangerd-root",
        "lib/banger/banger-agent",
    ] {
        assert!(
            prefix.path().join(file).is_file(),
            "{file} not installed: {report}"
        );
    }
    let units = prefix.path().join("lib/systemd/system");
    let bangerd = std::fs::read_to_string(units.join("bangerd.service")).unwrap();
    for line in [
        "User=daemon",
        "--system",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/banger /var/cache/banger /run/banger",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
    ] {
        assert!(bangerd.contains(line), "{line} missing:\n{bangerd}");
    }
    let root = std::fs::read_to_string(units.join("bangerd-root.service")).unwrap();
    assert!(
        root.contains("CapabilityBoundingSet=CAP_NET_ADMIN"),
        "{root}"
    );
    assert!(root.contains("--owner daemon"), "{root}");

    run_ok(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(units.join("bangerd.service"))
            .arg(units.join("bangerd-root.service")),
    );

    run_ok(
        Command::new(banger)
            .args(["system", "uninstall", "--prefix"])
            .arg(prefix.path()),
    );
    assert!(!units.join("bangerd.service").exists());
    assert!(!prefix.path().join("bin/bangerd").exists());
}
