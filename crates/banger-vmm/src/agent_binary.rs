//! Is this file a guest agent a VM can run? The agent is PID 1 of an image banger knows
//! nothing about (no libc, no dynamic loader of the right kind), so it must be a static
//! x86-64 executable. A plain `cargo build --release` leaves a dynamically linked one next
//! to bangerd; booting it ends in a kernel panic with only a register dump to go on, so
//! `doctor` and `vm create` check before any VM boots.

use std::io::Read;
use std::path::Path;

use goblin::elf::header::{EM_X86_64, ET_DYN, ET_EXEC};
use goblin::elf::program_header::PT_INTERP;

/// Largest agent file read for the check (the real one is about 2 MiB).
pub const MAX_AGENT_BYTES: u64 = 64 << 20;

/// How to build an agent that passes the check.
pub const BUILD_HINT: &str =
    "build it with `cargo build --release -p banger-agent --target x86_64-unknown-linux-musl` \
     and set agent_bin in config.toml to target/x86_64-unknown-linux-musl/release/banger-agent";

/// `Ok` when `path` is a static x86-64 ELF executable; otherwise what it is instead.
pub fn check_static_agent(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_AGENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_AGENT_BYTES {
        return Err(format!(
            "{} is larger than MAX_AGENT_BYTES ({MAX_AGENT_BYTES} bytes)",
            path.display()
        ));
    }
    let elf = goblin::elf::Elf::parse(&bytes)
        .map_err(|e| format!("{} is not an ELF executable ({e})", path.display()))?;
    if !elf.is_64 || elf.header.e_machine != EM_X86_64 {
        return Err(format!(
            "{} is not an x86-64 executable (ELF machine {})",
            path.display(),
            elf.header.e_machine
        ));
    }
    if !matches!(elf.header.e_type, ET_EXEC | ET_DYN) {
        return Err(format!(
            "{} is not an executable (ELF type {})",
            path.display(),
            elf.header.e_type
        ));
    }
    // A dynamic loader request is what makes a binary unusable as PID 1 of any image; a
    // static-pie (ET_DYN without PT_INTERP) runs fine.
    if let Some(interp) = elf.interpreter {
        return Err(format!(
            "{} is dynamically linked (interpreter {interp})",
            path.display()
        ));
    }
    if elf.program_headers.iter().any(|p| p.p_type == PT_INTERP) {
        return Err(format!("{} is dynamically linked", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_executable_passes() {
        if !banger_testkit::require(
            Path::new("/bin/busybox").exists(),
            "busybox-static is not installed",
        ) {
            return;
        }
        check_static_agent(Path::new("/bin/busybox")).unwrap();
    }

    #[test]
    fn a_dynamically_linked_executable_is_refused_naming_its_interpreter() {
        let err = check_static_agent(Path::new("/bin/true")).unwrap_err();
        assert!(
            err.starts_with("/bin/true is dynamically linked (interpreter /lib"),
            "{err}"
        );
    }

    #[test]
    fn text_and_other_architectures_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("agent.sh");
        std::fs::write(&text, "#!/bin/sh\n").unwrap();
        let err = check_static_agent(&text).unwrap_err();
        assert!(err.contains("is not an ELF executable"), "{err}");

        // An aarch64 header: ELF64, little endian, ET_EXEC, EM_AARCH64 (183).
        let mut arm = b"\x7fELF\x02\x01\x01".to_vec();
        arm.resize(16, 0);
        arm.extend(2u16.to_le_bytes()); // e_type
        arm.extend(183u16.to_le_bytes()); // e_machine
        arm.extend(1u32.to_le_bytes()); // e_version
        arm.resize(0x34, 0);
        arm.extend(64u16.to_le_bytes()); // e_ehsize
        arm.extend(56u16.to_le_bytes()); // e_phentsize
        arm.extend(0u16.to_le_bytes()); // e_phnum
        arm.extend(64u16.to_le_bytes()); // e_shentsize
        arm.resize(64, 0);
        let path = dir.path().join("arm");
        std::fs::write(&path, arm).unwrap();
        let err = check_static_agent(&path).unwrap_err();
        assert!(err.contains("is not an x86-64 executable"), "{err}");

        let err = check_static_agent(&dir.path().join("missing")).unwrap_err();
        assert!(err.starts_with("open "), "{err}");
    }
}
