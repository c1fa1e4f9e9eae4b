//! A guest restored from a snapshot is a copy of the template's memory: the same kernel
//! RNG state, hostname and clock. `banger-agent --refresh-identity`, run by the host
//! through the agent right after a restore, makes it its own (Firecracker's snapshot
//! docs: reseed the RNG from outside the clone, and fix the clock):
//!
//! - `BANGER_SEED` (hex, from the host's RNG) is added to the kernel's pool with
//!   `RNDADDENTROPY`, then `RNDRESEEDCRNG` makes every later read use it at once;
//! - `BANGER_HOSTNAME` becomes the hostname;
//! - `BANGER_TIME_NS` (the host's wall clock) sets `CLOCK_REALTIME`.

use std::io;
use std::os::fd::AsRawFd;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203 as libc::Ioctl;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207 as libc::Ioctl;
/// The most seed bytes taken (the kernel's input pool is 256 bits; more adds nothing).
pub const MAX_SEED_BYTES: usize = 512;

/// Adds `seed` to the kernel's entropy pool (credited) and reseeds the CRNG from it.
pub fn reseed(seed: &[u8]) -> io::Result<()> {
    if seed.len() > MAX_SEED_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "seed of {} bytes is over MAX_SEED_BYTES ({MAX_SEED_BYTES})",
                seed.len()
            ),
        ));
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // Keep the u32 array whole.
    info.resize(8 + seed.len().div_ceil(4) * 4, 0);
    // SAFETY: `info` is a live rand_pool_info whose buf_size matches the bytes after
    // its header; the kernel only reads it during the call.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `CLOCK_REALTIME` to `ns` nanoseconds since the epoch.
pub fn set_clock(ns: u128) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as _,
    };
    // SAFETY: `ts` is a live timespec, read by the kernel during the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn hex_bytes(text: &str) -> io::Result<Vec<u8>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "BANGER_SEED is not hex");
    if !text.len().is_multiple_of(2) {
        return Err(bad());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

/// `--refresh-identity`: everything above, from the environment.
pub fn refresh_from_env() -> io::Result<()> {
    if let Ok(seed) = std::env::var("BANGER_SEED") {
        reseed(&hex_bytes(&seed)?)?;
    }
    if let Ok(name) = std::env::var("BANGER_HOSTNAME") {
        crate::system::set_hostname(&name)?;
    }
    if let Ok(ns) = std::env::var("BANGER_TIME_NS") {
        let ns = ns.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "BANGER_TIME_NS is not a number",
            )
        })?;
        set_clock(ns)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_seed_parses_and_refuses_junk() {
        assert_eq!(hex_bytes("00ff10").unwrap(), [0, 255, 16]);
        assert!(hex_bytes("0g").is_err());
        assert!(hex_bytes("abc").is_err());
    }

    #[test]
    fn oversized_seed_is_refused_naming_the_limit() {
        let err = reseed(&[0; MAX_SEED_BYTES + 1]).unwrap_err();
        assert!(err.to_string().contains("MAX_SEED_BYTES"), "{err}");
    }
}
