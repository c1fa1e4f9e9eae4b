//! `vm.logs`: the console log of a VM sent to the caller, the rotated previous file
//! first; with `follow`, what the console writes next until the VM stops.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use banger_api::{OutputStream, VmLogsParams, VmLogsResult};

use super::{OutputWriter, VmService};
use crate::services::CallContext;
use crate::ServiceResult;

impl VmService {
    /// Sends the console log of `params.name` to the caller as `output` on `stdout`; with
    /// `follow`, keeps sending what the console writes until the VM is no longer running
    /// or the caller hangs up.
    pub fn logs(&self, ctx: &CallContext, params: &VmLogsParams) -> ServiceResult<VmLogsResult> {
        use std::os::unix::fs::MetadataExt;
        let vm = self.show(&params.name)?;
        let path = Path::new(&vm.dir).join(banger_vmm::console::CONSOLE_LOG);
        let previous = Path::new(&vm.dir).join(banger_vmm::console::CONSOLE_LOG_PREVIOUS);
        let mut out = OutputWriter {
            ctx,
            stream: OutputStream::Stdout,
        };
        let mut sent = 0u64;
        // The console rotates (see banger_vmm::console): the previous file first. A
        // rotation between this read and the open below loses that one file's worth.
        if let Ok(mut file) = std::fs::File::open(&previous) {
            sent += std::io::copy(&mut file, &mut out)
                .with_context(|| format!("read {}", previous.display()))?;
        }
        let mut log = match std::fs::File::open(&path) {
            Ok(file) => Some(file),
            // Never booted: nothing logged yet, which following may change.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("open {}", path.display()))
                    .into())
            }
        };
        let mut send_new = |log: &mut Option<std::fs::File>| -> anyhow::Result<()> {
            if log.is_none() {
                *log = std::fs::File::open(&path).ok();
            }
            if let Some(file) = log {
                sent += std::io::copy(file, &mut out)
                    .with_context(|| format!("read {}", path.display()))?;
                // Rotated: what was read is now the previous file, complete; go on with
                // the new one from its start.
                let rotated = match (std::fs::metadata(&path), file.metadata()) {
                    (Ok(now), Ok(open)) => now.ino() != open.ino(),
                    _ => false,
                };
                if rotated {
                    sent += std::io::copy(file, &mut out)
                        .with_context(|| format!("read {}", path.display()))?;
                    *log = std::fs::File::open(&path).ok();
                    if let Some(file) = log {
                        sent += std::io::copy(file, &mut out)
                            .with_context(|| format!("read {}", path.display()))?;
                    }
                }
            }
            Ok(())
        };
        send_new(&mut log)?;
        if params.follow {
            let mut input = ctx.take_input();
            let mut checked = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(100));
                send_new(&mut log)?;
                let hung_up = input.as_mut().is_some_and(|i| {
                    matches!(
                        i.try_recv(),
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
                    )
                });
                if hung_up {
                    break;
                }
                if checked.elapsed() >= Duration::from_secs(1) {
                    checked = Instant::now();
                    if !self.show(&params.name)?.state.is_running() {
                        send_new(&mut log)?;
                        break;
                    }
                }
            }
        }
        Ok(VmLogsResult {
            vm: vm.name,
            bytes: sent,
        })
    }
}
