//! The guest's resource counters for [`crate::proto::Message::Stats`]: CPU ticks from
//! `/proc/stat`, memory from `/proc/meminfo`, the root filesystem from `statvfs("/")`.
//! Parsing is kept apart from reading so it is tested on fixed text.

use std::io;

use crate::proto::GuestStats;

/// Reads the counters of the running guest.
pub fn read() -> io::Result<GuestStats> {
    let stat = std::fs::read_to_string("/proc/stat")
        .map_err(|e| io::Error::new(e.kind(), format!("read /proc/stat: {e}")))?;
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| io::Error::new(e.kind(), format!("read /proc/meminfo: {e}")))?;
    let mut stats = GuestStats::default();
    parse_proc_stat(&stat, &mut stats).map_err(|why| invalid("/proc/stat", why))?;
    parse_meminfo(&meminfo, &mut stats).map_err(|why| invalid("/proc/meminfo", why))?;
    stats.ticks_per_second = rustix::param::clock_ticks_per_second();
    let fs = rustix::fs::statvfs("/")
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("statvfs /: {e}")))?;
    stats.root_total_bytes = fs.f_blocks.saturating_mul(fs.f_frsize);
    stats.root_free_bytes = fs.f_bfree.saturating_mul(fs.f_frsize);
    stats.root_available_bytes = fs.f_bavail.saturating_mul(fs.f_frsize);
    Ok(stats)
}

fn invalid(file: &str, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{file}: {why}"))
}

/// The aggregate `cpu` line (user nice system idle iowait irq softirq steal …) and the
/// count of `cpuN` lines. `guest` and `guest_nice` are already counted in `user` and
/// `nice`, so only the first eight fields are summed.
pub fn parse_proc_stat(text: &str, stats: &mut GuestStats) -> Result<(), &'static str> {
    let mut found = false;
    let mut cpus = 0;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("cpu") => {
                let fields: Vec<u64> = words
                    .take(8)
                    .map(|w| w.parse().map_err(|_| "a cpu field is not a number"))
                    .collect::<Result<_, _>>()?;
                if fields.len() < 4 {
                    return Err("the cpu line has fewer than 4 fields");
                }
                let idle = fields[3].saturating_add(fields.get(4).copied().unwrap_or(0));
                let total = fields.iter().fold(0u64, |a, b| a.saturating_add(*b));
                stats.cpu_total_ticks = total;
                stats.cpu_busy_ticks = total.saturating_sub(idle);
                found = true;
            }
            Some(w) if w.starts_with("cpu") && w[3..].bytes().all(|b| b.is_ascii_digit()) => {
                cpus += 1;
            }
            _ => {}
        }
    }
    if !found {
        return Err("no cpu line");
    }
    stats.cpus = cpus;
    Ok(())
}

/// `MemTotal` and `MemAvailable`, given in kB (KiB).
pub fn parse_meminfo(text: &str, stats: &mut GuestStats) -> Result<(), &'static str> {
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    };
    stats.mem_total_bytes = kib("MemTotal").ok_or("no MemTotal")?.saturating_mul(1024);
    stats.mem_available_bytes = kib("MemAvailable")
        .ok_or("no MemAvailable")?
        .saturating_mul(1024);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_busy_excludes_idle_and_iowait_and_counts_cpus() {
        let text = "cpu  10 1 5 100 4 2 3 0 7 0\n\
                    cpu0 5 1 2 50 2 1 1 0 7 0\n\
                    cpu1 5 0 3 50 2 1 2 0 0 0\n\
                    intr 1 2 3\nctxt 99\nbtime 1\n";
        let mut s = GuestStats::default();
        parse_proc_stat(text, &mut s).unwrap();
        // user+nice+system+irq+softirq+steal; guest (7) is inside user already.
        assert_eq!(s.cpu_busy_ticks, 10 + 1 + 5 + 2 + 3);
        assert_eq!(s.cpu_total_ticks, 10 + 1 + 5 + 100 + 4 + 2 + 3);
        assert_eq!(s.cpus, 2);
    }

    #[test]
    fn proc_stat_without_a_cpu_line_or_with_garbage_is_refused() {
        let mut s = GuestStats::default();
        assert_eq!(parse_proc_stat("intr 1\n", &mut s), Err("no cpu line"));
        assert!(parse_proc_stat("cpu 1 x 3 4\n", &mut s).is_err());
        assert!(parse_proc_stat("cpu 1 2\n", &mut s).is_err());
    }

    #[test]
    fn meminfo_in_bytes() {
        let text = "MemTotal:         243000 kB\nMemFree:  1 kB\nMemAvailable:     200000 kB\n";
        let mut s = GuestStats::default();
        parse_meminfo(text, &mut s).unwrap();
        assert_eq!(s.mem_total_bytes, 243000 * 1024);
        assert_eq!(s.mem_available_bytes, 200000 * 1024);
        assert_eq!(
            parse_meminfo("MemTotal: 1 kB\n", &mut s),
            Err("no MemAvailable")
        );
    }

    #[test]
    fn read_works_on_this_linux() {
        let s = read().unwrap();
        assert!(s.cpus >= 1 && s.cpu_total_ticks >= s.cpu_busy_ticks);
        assert!(s.mem_total_bytes >= s.mem_available_bytes && s.mem_total_bytes > 0);
        assert!(s.root_total_bytes >= s.root_free_bytes);
        assert!(s.root_free_bytes >= s.root_available_bytes);
        assert_eq!(s.ticks_per_second, 100);
    }
}
