//! Makes a VM restored from a template (or a snapshot) its own: the host runs
//! `/.banger/agent --refresh-identity` in it right after the restore, which reseeds the
//! kernel RNG from 64 bytes of the host's RNG (`RNDADDENTROPY` + `RNDRESEEDCRNG`; QEMU's
//! `vmgenid` device changes too, for kernels that reseed on it), sets the VM's own
//! hostname and sets the clock to the host's. See `banger_agent::identity`.

use std::time::SystemTime;

use anyhow::{bail, Context};
use banger_agent::proto::{ExecRequest, ExitStatus};
use banger_api::VmInfo;
use banger_vmm::agent::{AgentClient, AGENT_GUEST_PATH};

/// Host random bytes a restored guest gets.
const SEED_BYTES: usize = 64;

/// Refreshes the identity of the restored `vm` through its agent.
pub(super) fn refresh(client: &AgentClient, vm: &VmInfo) -> anyhow::Result<()> {
    let seed: [u8; SEED_BYTES] = std::array::from_fn(|_| rand::random());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("host clock before 1970")?
        .as_nanos();
    let request = ExecRequest::new([AGENT_GUEST_PATH, "--refresh-identity"])
        .env("BANGER_SEED", hex::encode(seed))
        .env("BANGER_HOSTNAME", vm.name.as_str())
        .env("BANGER_TIME_NS", now.to_string());
    let out = client
        .output(&request)
        .with_context(|| format!("run {AGENT_GUEST_PATH} --refresh-identity"))?;
    if out.status != ExitStatus::Code(0) {
        bail!(
            "{AGENT_GUEST_PATH} --refresh-identity ended with {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
