//! `banger kernel pull [REF] [--name NAME]`: one `kernel.pull` call.

use banger_api::{KernelPull, KernelPullParams, KernelPullResult, KernelSource};
use banger_client::rpc::Client;

use crate::output::{call, emit};

/// Runs `banger kernel pull`.
pub fn run(
    client: &mut Client,
    reference: Option<String>,
    name: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let result = call::<KernelPull>(client, &KernelPullParams { reference, name })?;
    emit(json, &result, print_pull)
}

fn print_pull(r: &KernelPullResult) {
    let from = match r.source {
        KernelSource::Apt => format!("apt package {}", r.package.as_deref().unwrap_or("?")),
        KernelSource::Oci => format!(
            "{}@{}",
            r.reference.as_deref().unwrap_or("?"),
            r.manifest_digest.as_deref().unwrap_or("?")
        ),
    };
    println!(
        "pulled kernel {} ({}) from {from}",
        r.kernel.name, r.kernel.version
    );
}
