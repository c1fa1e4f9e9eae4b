//! `banger system install|status|restart|uninstall`: banger as a machine's service. `bangerd`
//! runs as an ordinary owner user with the system layout (/var/lib/banger,
//! /var/cache/banger/oci, /run/banger/bangerd.sock 0600) under a hardened systemd unit, and
//! `bangerd-root` (root, a bounded capability set) does only the privileged steps.
//! Where systemd is not PID 1 the units are still written and the way to start both by
//! hand is printed.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use serde::Serialize;

use crate::output::emit;

/// Where the binaries go by default.
pub const DEFAULT_PREFIX: &str = "/usr/local";
/// Where the units go for the default prefix (another prefix gets `PREFIX/lib/systemd/system`).
pub const SYSTEM_UNIT_DIR: &str = "/etc/systemd/system";
/// The directories of the system layout the daemon writes.
const STATE_DIRS: [&str; 3] = ["/var/lib/banger", "/var/cache/banger", "/run/banger"];
/// The helper's runtime directory (its socket).
const ROOT_RUNTIME_DIR: &str = "/run/banger-root";
/// The helper's state: the Firecracker jails it makes (its `--jail-dir` default).
const ROOT_STATE_DIR: &str = "/var/lib/banger-root";

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Install banger, bangerd, bangerd-root and the agent under PREFIX, write the systemd
    /// units and start them where systemd runs.
    Install {
        /// The user bangerd runs as (default: $SUDO_USER, else the caller).
        #[arg(long)]
        owner: Option<String>,
        /// Where bin/ and lib/banger/ go.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: PathBuf,
        /// Write everything, start nothing.
        #[arg(long)]
        no_start: bool,
    },
    /// Both services, their sockets and versions, and what doctor says.
    Status,
    /// Restart both services (systemd only).
    Restart,
    /// Stop and remove the services and binaries; state stays unless --purge.
    Uninstall {
        /// Where they were installed.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: PathBuf,
        /// Also delete /var/lib/banger, /var/cache/banger and /etc/banger.
        #[arg(long)]
        purge: bool,
    },
}

/// What `install` and `uninstall` did, for `--json` and for the prose.
#[derive(Debug, Default, Serialize)]
struct Report {
    done: Vec<String>,
    started: bool,
    how_to_start: Vec<String>,
}

fn unit_dir(prefix: &Path) -> PathBuf {
    if prefix == Path::new(DEFAULT_PREFIX) {
        PathBuf::from(SYSTEM_UNIT_DIR)
    } else {
        prefix.join("lib/systemd/system")
    }
}

/// Whether systemd is PID 1 (what `sd_booted()` checks).
fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The installed agent: `$BANGER_AGENT`, else `banger-agent` next to this binary, else the
/// musl build of this source tree.
fn find_agent(here: &Path) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BANGER_AGENT").map(PathBuf::from) {
        return path.is_file().then_some(path);
    }
    let sibling = here.join("banger-agent");
    if sibling.is_file() {
        return Some(sibling);
    }
    // target/debug/banger → target/x86_64-unknown-linux-musl/release/banger-agent.
    let musl = here
        .parent()?
        .join("x86_64-unknown-linux-musl/release/banger-agent");
    musl.is_file().then_some(musl)
}

/// A user name safe to put in a unit: `[a-z_][a-z0-9_-]*$?`, at most 32 bytes.
fn check_user(user: &str) -> anyhow::Result<()> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && user
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && user
            .trim_end_matches('$')
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok {
        bail!("--owner {user:?} is not a plain user name");
    }
    Ok(())
}

/// The `bangerd` unit: the owner user, the system layout, a read-only system.
pub fn bangerd_unit(prefix: &Path, owner: &str) -> String {
    let bin = prefix.join("bin");
    let agent = prefix.join("lib/banger/banger-agent");
    format!(
        "[Unit]\n\
         Description=banger daemon (bangerd, system layout)\n\
         Documentation=https://github.com/banger/banger\n\
         Wants=bangerd-root.service\n\
         After=network-online.target bangerd-root.service\n\
         \n\
         [Service]\n\
         Type=simple\n\
         User={owner}\n\
         ExecStart={bin}/bangerd --system\n\
         Environment=BANGER_AGENT={agent}\n\
         RuntimeDirectory=banger\n\
         RuntimeDirectoryMode=0700\n\
         StateDirectory=banger\n\
         StateDirectoryMode=0700\n\
         CacheDirectory=banger\n\
         CacheDirectoryMode=0700\n\
         ProtectSystem=strict\n\
         ReadWritePaths={rw}\n\
         ProtectHome=read-only\n\
         PrivateTmp=yes\n\
         NoNewPrivileges=yes\n\
         ProtectKernelTunables=yes\n\
         ProtectControlGroups=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         {tail}",
        bin = bin.display(),
        agent = agent.display(),
        rw = STATE_DIRS.join(" "),
        tail = UNIT_TAIL,
    )
}

/// How both units end: restarted when they fail, started at boot.
const UNIT_TAIL: &str = "Restart=on-failure\n\n[Install]\nWantedBy=multi-user.target\n";

/// The `bangerd-root` unit: root, but only the capabilities TAP/bridge/NAT setup and the
/// Firecracker jailer need.
pub fn bangerd_root_unit(prefix: &Path, owner: &str) -> String {
    format!(
        "[Unit]\n\
         Description=banger privileged helper (bangerd-root: TAP, bridge, NAT, jailer)\n\
         Before=bangerd.service\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={bin}/bangerd-root --owner {owner}\n\
         RuntimeDirectory=banger-root\n\
         RuntimeDirectoryMode=0755\n\
         StateDirectory=banger-root\n\
         StateDirectoryMode=0711\n\
         CapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_ADMIN CAP_SYS_CHROOT CAP_MKNOD CAP_CHOWN CAP_SETUID CAP_SETGID CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER\n\
         ProtectSystem=strict\n\
         ReadWritePaths={root_rt} /var/lib/banger {root_state}\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         {tail}",
        bin = prefix.join("bin").display(),
        root_rt = ROOT_RUNTIME_DIR,
        root_state = ROOT_STATE_DIR,
        tail = UNIT_TAIL,
    )
}

fn copy_exec(from: &Path, to: &Path, report: &mut Report) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to.parent().expect("a file in a directory"))
        .with_context(|| format!("create {}", to.parent().unwrap().display()))?;
    // Copied beside and renamed: a running binary is replaced, not overwritten.
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copy {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 0755 {}", tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("rename to {}", to.display()))?;
    report.done.push(format!("installed {}", to.display()));
    Ok(())
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .context("run systemctl")?;
    if !out.status.success() {
        bail!(
            "systemctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn install(owner: Option<String>, prefix: &Path, no_start: bool) -> anyhow::Result<Report> {
    let owner = match owner.or_else(|| std::env::var("SUDO_USER").ok()) {
        Some(owner) => owner,
        None => std::env::var("USER").context("--owner not given and USER is not set")?,
    };
    check_user(&owner)?;
    if !prefix.is_absolute() {
        bail!("--prefix {} must be absolute", prefix.display());
    }
    let exe = std::env::current_exe().context("find this banger")?;
    let here = exe.parent().context("banger's directory")?;
    let mut report = Report::default();
    for name in ["banger", "bangerd", "bangerd-root"] {
        let from = here.join(name);
        if !from.is_file() {
            if name == "bangerd-root" {
                report.done.push(format!(
                    "skipped bangerd-root: not built next to {} (cargo build -p bangerd-root)",
                    exe.display()
                ));
                continue;
            }
            bail!("{} is missing: build it first", from.display());
        }
        copy_exec(&from, &prefix.join("bin").join(name), &mut report)?;
    }
    match find_agent(here) {
        Some(agent) => copy_exec(&agent, &prefix.join("lib/banger/banger-agent"), &mut report)?,
        None => report.done.push(
            "skipped the guest agent: none found (set BANGER_AGENT, or build it for \
             x86_64-unknown-linux-musl)"
                .into(),
        ),
    }
    let units = unit_dir(prefix);
    std::fs::create_dir_all(&units).with_context(|| format!("create {}", units.display()))?;
    for (name, text) in [
        ("bangerd.service", bangerd_unit(prefix, &owner)),
        ("bangerd-root.service", bangerd_root_unit(prefix, &owner)),
    ] {
        let path = units.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        report.done.push(format!("wrote {}", path.display()));
    }
    let bin = prefix.join("bin");
    report.how_to_start = vec![
        format!("{}/bangerd-root --owner {owner} &", bin.display()),
        format!(
            "runuser -u {owner} -- env BANGER_AGENT={} {}/bangerd --system &   (after creating {} owned by {owner}, mode 0700)",
            prefix.join("lib/banger/banger-agent").display(),
            bin.display(),
            STATE_DIRS.join(" ")
        ),
    ];
    if !no_start && units == Path::new(SYSTEM_UNIT_DIR) && systemd_runs() {
        systemctl(&["daemon-reload"])?;
        systemctl(&["enable", "--now", "bangerd-root.service", "bangerd.service"])?;
        report
            .done
            .push("enabled and started bangerd-root and bangerd".into());
        report.started = true;
    }
    Ok(report)
}

fn uninstall(prefix: &Path, purge: bool) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let units = unit_dir(prefix);
    if units == Path::new(SYSTEM_UNIT_DIR) && systemd_runs() {
        // Already stopped or never enabled is fine: the files go either way.
        let _ = systemctl(&[
            "disable",
            "--now",
            "bangerd.service",
            "bangerd-root.service",
        ]);
        report
            .done
            .push("stopped and disabled bangerd and bangerd-root".into());
    }
    let mut files: Vec<PathBuf> = ["bangerd.service", "bangerd-root.service"]
        .iter()
        .map(|u| units.join(u))
        .collect();
    files.extend(
        ["banger", "bangerd", "bangerd-root"]
            .iter()
            .map(|b| prefix.join("bin").join(b)),
    );
    files.push(prefix.join("lib/banger/banger-agent"));
    for file in files {
        match std::fs::remove_file(&file) {
            Ok(()) => report.done.push(format!("removed {}", file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", file.display())),
        }
    }
    let _ = std::fs::remove_dir(prefix.join("lib/banger"));
    if purge {
        for dir in [
            "/var/lib/banger",
            "/var/cache/banger",
            "/etc/banger",
            ROOT_STATE_DIR,
        ] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => report.done.push(format!("purged {dir}")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("remove {dir}")),
            }
        }
    } else {
        report.done.push(
            "kept /var/lib/banger, /var/cache/banger, /etc/banger and /var/lib/banger-root (--purge deletes them)".into(),
        );
    }
    Ok(report)
}

fn print_report(report: &Report) {
    for line in &report.done {
        println!("{line}");
    }
    if !report.started && !report.how_to_start.is_empty() {
        println!(
            "not started: {}; start them by hand (as root):",
            if systemd_runs() {
                "asked not to, or the units are outside /etc/systemd/system"
            } else {
                "systemd is not PID 1 here"
            }
        );
        for line in &report.how_to_start {
            println!("  {line}");
        }
    }
}

fn status() -> anyhow::Result<serde_json::Value> {
    let active = |unit: &str| -> Option<String> {
        if !systemd_runs() {
            return None;
        }
        let out = Command::new("systemctl")
            .args(["is-active", unit])
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let layout = banger_client::Layout::system();
    let socket = layout.socket();
    let mut daemon = None;
    let mut doctor = None;
    if let Ok(mut client) = banger_client::Client::connect(&socket) {
        daemon = client
            .call::<banger_api::DaemonPing>(&banger_api::NoParams {})
            .ok();
        doctor = client
            .call::<banger_api::DaemonDoctor>(&banger_api::NoParams {})
            .ok();
    }
    let root_socket = Path::new(ROOT_RUNTIME_DIR).join("bangerd-root.sock");
    Ok(serde_json::json!({
        "systemd": systemd_runs(),
        "bangerd": {
            "unit": active("bangerd.service"),
            "socket": socket,
            "socket_exists": socket.exists(),
            "daemon": daemon,
        },
        "bangerd_root": {
            "unit": active("bangerd-root.service"),
            "socket": root_socket,
            "socket_exists": root_socket.exists(),
        },
        "doctor": doctor,
    }))
}

/// Runs one `banger system` command.
pub fn run(command: SystemCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        SystemCommand::Install {
            owner,
            prefix,
            no_start,
        } => emit(json, &install(owner, &prefix, no_start)?, print_report)?,
        SystemCommand::Uninstall { prefix, purge } => {
            emit(json, &uninstall(&prefix, purge)?, print_report)?
        }
        SystemCommand::Restart => {
            if !systemd_runs() {
                bail!(
                    "systemd is not PID 1 here: stop bangerd and bangerd-root and start them again by hand (banger system install prints how)"
                );
            }
            systemctl(&["restart", "bangerd-root.service", "bangerd.service"])?;
            emit(json, &serde_json::json!({ "restarted": true }), |_| {
                println!("restarted bangerd-root and bangerd")
            })?;
        }
        SystemCommand::Status => {
            let status = status()?;
            let running = status["bangerd"]["daemon"].is_object();
            emit(json, &status, |s| {
                let unit = |v: &serde_json::Value| {
                    v.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| "no systemd".into())
                };
                match &s["bangerd"]["daemon"] {
                    serde_json::Value::Object(d) => println!(
                        "bangerd:      running ({}), version {} pid {} on {}",
                        unit(&s["bangerd"]["unit"]),
                        d["version"],
                        d["pid"],
                        s["bangerd"]["socket"].as_str().unwrap_or_default()
                    ),
                    _ => println!(
                        "bangerd:      not answering ({}) on {}",
                        unit(&s["bangerd"]["unit"]),
                        s["bangerd"]["socket"].as_str().unwrap_or_default()
                    ),
                }
                println!(
                    "bangerd-root: {} ({}) on {}",
                    if s["bangerd_root"]["socket_exists"] == true {
                        "socket present"
                    } else {
                        "no socket"
                    },
                    unit(&s["bangerd_root"]["unit"]),
                    s["bangerd_root"]["socket"].as_str().unwrap_or_default()
                );
                if let Some(checks) = s["doctor"]["checks"].as_array() {
                    for c in checks {
                        println!(
                            "doctor:       {} {} {}",
                            c["status"].as_str().unwrap_or_default(),
                            c["name"].as_str().unwrap_or_default(),
                            c["detail"].as_str().unwrap_or_default()
                        );
                    }
                }
            })?;
            return Ok(if running {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
