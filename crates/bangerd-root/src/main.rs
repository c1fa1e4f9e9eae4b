//! `bangerd-root --owner USER|--owner-uid UID [--socket PATH] [--subnet A.B.C.D/N]`: serves
//! the `priv.*` methods (see the library docs) to the owner uid only, one thread per
//! connection.
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
}

fn uid_of(user: &str) -> anyhow::Result<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in passwd.lines() {
        let mut fields = line.split(':');
        if fields.next() == Some(user) {
            let uid = fields.nth(1).context("a passwd line without a uid")?;
            return uid
                .parse()
                .with_context(|| format!("uid {uid:?} of {user}"));
        }
    }
    bail!("no user {user:?} in /etc/passwd")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let owner_uid = match (&args.owner, args.owner_uid) {
        (Some(user), _) => uid_of(user)?,
        (None, Some(uid)) => uid,
        (None, None) => bail!("--owner USER or --owner-uid UID is required"),
    };
    let subnet = bangerd_root::Subnet::parse(&args.subnet)
        .map_err(|e| anyhow::anyhow!("--subnet: {}", e.message))?;
    let listener = bangerd_root::bind(&args.socket, owner_uid)?;
    eprintln!(
        "bangerd-root {}: serving uid {owner_uid} on {} (subnet {}/{})",
        env!("CARGO_PKG_VERSION"),
        args.socket.display(),
        subnet.network,
        subnet.prefix
    );
    let helper = std::sync::Arc::new(bangerd_root::Helper { owner_uid, subnet });
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let helper = std::sync::Arc::clone(&helper);
                std::thread::spawn(move || helper.serve(stream));
            }
            Err(e) => eprintln!("bangerd-root: accept: {e}"),
        }
    }
    Ok(())
}
