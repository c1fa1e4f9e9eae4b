//! `bangerd-root --owner USER|--owner-uid UID [--socket PATH] [--subnet A.B.C.D/N]
//! [--jail-dir DIR] [--jailer PATH] [--firecracker PATH]`: serves the `priv.*` methods (see
//! the library docs) to the owner uid only, one thread per connection.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;

/// banger's privileged helper.
#[derive(Debug, Parser)]
#[command(name = "bangerd-root", version)]
struct Args {
    /// The user whose bangerd may call (its uid is looked up in /etc/passwd).
    #[arg(long, conflicts_with = "owner_uid")]
    owner: Option<String>,
    /// The owner by uid.
    #[arg(long)]
    owner_uid: Option<u32>,
    /// The socket.
    #[arg(long, default_value = "/run/banger-root/bangerd-root.sock")]
    socket: PathBuf,
    /// The subnet bridge addresses must lie in (bangerd's bridge_address).
    #[arg(long, default_value = "172.30.0.1/24")]
    subnet: String,
    /// Where Firecracker jails are made: root's, on the filesystem of the owner's VM disks
    /// (they are hard-linked in).
    #[arg(long, default_value = "/var/lib/banger-root/jail")]
    jail_dir: PathBuf,
    /// Firecracker's jailer; default `jailer` on this process's PATH.
    #[arg(long)]
    jailer: Option<PathBuf>,
    /// The Firecracker the jailer runs; default `firecracker` on this process's PATH.
    #[arg(long)]
    firecracker: Option<PathBuf>,
    /// Seconds a connection may stay silent between requests before it is closed.
    #[arg(long, default_value_t = bangerd_root::IDLE_TIMEOUT.as_secs())]
    idle_timeout_secs: u64,
}

/// The (uid, primary gid) of `user`, or of the user with uid `uid`, from /etc/passwd.
fn passwd_entry(user: Option<&str>, uid: Option<u32>) -> anyhow::Result<Option<(u32, u32)>> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let [name, _, line_uid, line_gid, ..] = fields[..] else {
            continue;
        };
        let parsed = || -> anyhow::Result<(u32, u32)> {
            Ok((
                line_uid
                    .parse()
                    .with_context(|| format!("uid {line_uid:?} of {name}"))?,
                line_gid
                    .parse()
                    .with_context(|| format!("gid {line_gid:?} of {name}"))?,
            ))
        };
        if user == Some(name)
            || (user.is_none() && uid.map(|u| u.to_string()).as_deref() == Some(line_uid))
        {
            return parsed().map(Some);
        }
    }
    Ok(None)
}

/// A binary given on the command line, or found on PATH.
fn binary(given: Option<PathBuf>, name: &str) -> Option<PathBuf> {
    match given {
        Some(path) => path.is_file().then_some(path),
        None => banger_vmm::backend::find_on_path(name),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (owner_uid, owner_gid) = match (&args.owner, args.owner_uid) {
        (Some(user), _) => passwd_entry(Some(user), None)?
            .with_context(|| format!("no user {user:?} in /etc/passwd"))?,
        // A uid without a passwd entry keeps its own number as its group.
        (None, Some(uid)) => passwd_entry(None, Some(uid))?.unwrap_or((uid, uid)),
        (None, None) => bail!("--owner USER or --owner-uid UID is required"),
    };
    let jails = match (
        binary(args.jailer.clone(), "jailer"),
        binary(args.firecracker.clone(), "firecracker"),
    ) {
        (Some(jailer), Some(firecracker)) => Some(bangerd_root::jail::Jails::new(
            bangerd_root::jail::JailConfig {
                dir: args.jail_dir.clone(),
                firecracker,
                jailer,
            },
        )),
        _ => None,
    };
    let subnet = bangerd_root::Subnet::parse(&args.subnet)
        .map_err(|e| anyhow::anyhow!("--subnet: {}", e.message))?;
    let listener = bangerd_root::bind(&args.socket, owner_uid)?;
    eprintln!(
        "bangerd-root {}: serving uid {owner_uid} on {} (subnet {}/{}; {})",
        env!("CARGO_PKG_VERSION"),
        args.socket.display(),
        subnet.network,
        subnet.prefix,
        match &jails {
            Some(j) => format!(
                "jails in {} with {} and {}",
                j.config.dir.display(),
                j.config.jailer.display(),
                j.config.firecracker.display()
            ),
            None => "no jailer and firecracker: priv.vmm.launch refuses".into(),
        }
    );
    let helper = std::sync::Arc::new(bangerd_root::Helper {
        owner_uid,
        owner_gid,
        subnet,
        jails,
        idle_timeout: std::time::Duration::from_secs(args.idle_timeout_secs.max(1)),
    });
    bangerd_root::run(helper, listener);
    Ok(())
}
