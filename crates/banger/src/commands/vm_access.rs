//! Reaching into VMs: `banger vm ports`, `banger vm ssh`, `banger vm ssh-proxy` (OpenSSH's
//! `ProxyCommand`) and `banger ssh-config` (the `Host banger.NAME` entries).

use std::process::ExitCode;

use banger_api::{
    NameParams, VmPorts, VmPortsResult, VmSshConfig, VmSshConfigParams, VmSshConfigResult,
    VmSshProxy,
};
use banger_client::rpc::Client;
use clap::Subcommand;

use crate::interactive::{self, Mode};
use crate::output::{call, emit, print_json};

/// The `banger vm` commands of this module.
#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// What listens in a running VM (TCP and UDP) and what it publishes on the host.
    Ports {
        /// The VM.
        name: String,
    },
    /// Log in to a running VM with OpenSSH (`ssh banger.NAME`), or run CMD there, with
    /// the install's key and the VM's pinned host key; no host port is needed.
    Ssh {
        /// The VM.
        name: String,
        /// A command to run instead of a login shell (given to ssh as is).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// The byte stream of an SSH connection to the VM on stdin/stdout, for OpenSSH's
    /// ProxyCommand (see `banger ssh-config`).
    SshProxy {
        /// The VM.
        name: String,
    },
}

/// Runs one of [`AccessCommand`].
pub fn run(client: &mut Client, command: AccessCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        AccessCommand::Ports { name } => {
            let result = call::<VmPorts>(client, &NameParams { name })?;
            emit(json, &result, print_ports)?;
        }
        AccessCommand::SshProxy { name } => {
            // Bytes as they come (never escaped): they are the SSH protocol.
            let result =
                interactive::call::<VmSshProxy>(client, &NameParams { name }, Mode::Pipe, true);
            return Ok(match result {
                Ok(r) => ExitCode::from(r.exit_code.unwrap_or(255).clamp(0, 255) as u8),
                Err(e) => {
                    crate::output::report_error(&e, false);
                    ExitCode::from(255)
                }
            });
        }
        AccessCommand::Ssh { name, command } => {
            let config = call::<VmSshConfig>(
                client,
                &VmSshConfigParams {
                    name: Some(name.clone()),
                },
            )?;
            let host = config.hosts.first().ok_or_else(|| {
                anyhow::anyhow!("the daemon returned no ssh entry for VM {name:?}")
            })?;
            let mut ssh = std::process::Command::new("ssh");
            // Only these options: the user's ~/.ssh/config must not redirect banger.NAME.
            ssh.args(["-F", "/dev/null"]);
            for option in host_options(&config, host)? {
                ssh.arg("-o").arg(option.replacen(' ', "=", 1));
            }
            ssh.arg(&host.alias);
            if !command.is_empty() {
                ssh.arg("--").args(&command);
            }
            let status = ssh
                .status()
                .map_err(|e| anyhow::anyhow!("run ssh (apt-get install openssh-client): {e}"))?;
            return Ok(ExitCode::from(
                status.code().unwrap_or(255).clamp(0, 255) as u8
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `banger ssh-config`: `Host banger.NAME` entries for every VM that has booted.
pub fn ssh_config(client: &mut Client, json: bool) -> anyhow::Result<ExitCode> {
    let config = call::<VmSshConfig>(client, &VmSshConfigParams::default())?;
    if json {
        print_json(&config)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("# banger VMs: `ssh banger.NAME`. Written by `banger ssh-config`; Include it from ~/.ssh/config.");
    println!(
        "# Each VM's host key is pinned in UserKnownHostsFile, so StrictHostKeyChecking stays on."
    );
    for host in &config.hosts {
        println!("\nHost {}", host.alias);
        for option in host_options(&config, host)? {
            println!("    {option}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The options of one entry, `Key value` each.
fn host_options(
    config: &VmSshConfigResult,
    host: &banger_api::SshHost,
) -> anyhow::Result<Vec<String>> {
    let banger = std::env::current_exe()
        .map_err(|e| anyhow::anyhow!("find this banger's path for ProxyCommand: {e}"))?;
    Ok(vec![
        format!("User {}", host.user),
        format!(
            "ProxyCommand {} vm ssh-proxy {}",
            quote(&banger.display().to_string()),
            host.vm
        ),
        format!("IdentityFile {}", quote(&config.identity_file)),
        "IdentitiesOnly yes".into(),
        format!("UserKnownHostsFile {}", quote(&config.known_hosts_file)),
        format!("HostKeyAlias {}", host.alias),
        "StrictHostKeyChecking yes".into(),
        // The VM is reached through the proxy, never by address.
        "CheckHostIP no".into(),
    ])
}

/// ssh_config(5) takes a value with spaces in double quotes.
fn quote(value: &str) -> String {
    if value.contains([' ', '\t']) {
        format!("\"{value}\"")
    } else {
        value.to_owned()
    }
}

fn print_ports(result: &VmPortsResult) {
    println!("{:<6} {:<24} PUBLISHED", "PROTO", "LISTENING");
    for l in &result.listening {
        let addr = std::net::SocketAddr::new(l.address, l.port);
        let published = if l.published.is_empty() {
            "-".to_owned()
        } else {
            l.published.join(", ")
        };
        println!("{:<6} {:<24} {published}", l.protocol, addr.to_string());
    }
    let listened = |p: &banger_api::PublishedPort| {
        result
            .listening
            .iter()
            .any(|l| l.protocol == p.protocol && l.port == p.guest_port)
    };
    for p in result.published.iter().filter(|p| !listened(p)) {
        println!(
            "{:<6} {:<24} {} (nothing listens on guest port {})",
            p.protocol,
            "-",
            p.host_addr(),
            p.guest_port
        );
    }
}
