//! What a VM uses and whether it answers, end to end on a real kernel in QEMU: `vm stats`
//! with the guest's own counters, `vm health`, resources reaching the guest, and the exit
//! statuses `vm run`/`vm exec` promise.

mod support;

use banger_testkit::Registry;
use serde_json::Value;
use support::vms::ready_install_in;
use support::{assert_exit, assert_mem_total_is_256_mib, stderr, stdout, Install};

const QEMU_USER_NET: &str = "vmm = \"qemu\"\nnetwork = \"user\"\n";

fn json(install: &Install, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["--json"];
    all.extend(args);
    let out = install.banger(&all);
    let value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", stdout(&out), stderr(&out)));
    (out.status.code(), value)
}

/// The keys of the JSON object `value`, sorted.
fn sorted_keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    keys
}

fn exec_status(install: &Install, vm: &str, argv: &[&str]) -> Option<i32> {
    install.vm_exec(vm, argv).status.code()
}

#[test]
fn memory_and_cpus_reach_the_guest_exit_statuses_pass_and_stats_and_health_report() {
    let registry = Registry::start();
    let Some(install) = ready_install_in(QEMU_USER_NET, None, Some(&registry)) else {
        return;
    };

    // --memory 256M: the guest's MemTotal is 256 MiB less what the kernel keeps.
    let out = install.vm_run_rm(
        None,
        &["--memory", "256M"],
        &["sh", "-c", "cat /proc/meminfo; exit 5"],
    );
    // The command's own status comes through.
    assert_exit(&out, 5);
    assert_mem_total_is_256_mib(&stdout(&out));

    // 125: banger failed (an image the registry does not have), before any VM.
    let missing = registry.reference("no-such-image", "v1");
    let out = install.banger(&["vm", "run", "--rm", "--image", &missing, "--", "true"]);
    assert_exit(&out, 125);
    assert!(stderr(&out).contains("no-such-image"), "{}", stderr(&out));

    // vm set --cpus 2 on a stopped VM; the next boot has two CPUs.
    let out = install.vm_create("s1", &["--cpus", "1", "--no-start"]);
    assert_exit(&out, 0);
    let (code, health) = json(&install, &["vm", "health", "s1"]);
    assert_eq!(code, Some(1));
    assert_eq!(health["status"], "stopped");
    assert_eq!(
        stdout(&install.banger(&["vm", "health", "s1"])),
        "s1 stopped: VM \"s1\" is not running\n"
    );
    let (code, stats) = json(&install, &["vm", "stats", "s1"]);
    assert_eq!(code, Some(0));
    assert_eq!(stats["state"], "stopped");
    assert!(stats.get("guest").is_none() && stats.get("guest_error").is_none());

    let out = install.banger(&["vm", "set", "s1", "--cpus", "2", "--memory", "320MiB"]);
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&install.banger(&["vm", "start", "s1"])),
        "started s1\n"
    );
    let out = install.banger(&["vm", "exec", "s1", "--", "nproc"]);
    assert_eq!(stdout(&out), "2\n", "{}", stderr(&out));

    // 127 not found, 126 cannot run, the command's own status otherwise.
    assert_eq!(exec_status(&install, "s1", &["no-such-command"]), Some(127));
    assert_eq!(exec_status(&install, "s1", &["/etc"]), Some(126));
    assert_eq!(
        exec_status(&install, "s1", &["sh", "-c", "exit 5"]),
        Some(5)
    );
    assert_eq!(exec_status(&install, "no-such-vm", &["true"]), Some(125));

    // Stats: the host's view and the guest's, with the documented fields.
    let out = install.banger(&["vm", "exec", "s1", "--", "sh", "-c", "echo x > /root/f"]);
    assert_exit(&out, 0);
    let (code, stats) = json(&install, &["vm", "stats", "s1"]);
    assert_eq!(code, Some(0), "{stats}");
    assert_eq!(
        sorted_keys(&stats),
        [
            "disk_allocated_bytes",
            "disk_bytes",
            "guest",
            "memory_bytes",
            "name",
            "state",
            "vcpus",
            "vmm_cpu_seconds",
            "vmm_rss_bytes"
        ],
        "{stats}"
    );
    assert_eq!(stats["state"], "running");
    assert_eq!(stats["vcpus"], 2);
    assert_eq!(stats["memory_bytes"], 320u64 << 20);
    let guest = &stats["guest"];
    assert_eq!(
        sorted_keys(guest),
        [
            "cpu_percent",
            "cpu_sample_ms",
            "cpus",
            "disk_available_bytes",
            "disk_total_bytes",
            "disk_used_bytes",
            "memory_available_bytes",
            "memory_total_bytes",
            "memory_used_bytes"
        ]
    );
    assert_eq!(guest["cpus"], 2);
    let cpu = guest["cpu_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&cpu), "{guest}");
    assert!(guest["cpu_sample_ms"].as_u64().unwrap() > 0, "{guest}");
    let mem_total = guest["memory_total_bytes"].as_u64().unwrap();
    assert!(
        (240u64 << 20..=320u64 << 20).contains(&mem_total),
        "{guest}"
    );
    assert_eq!(
        guest["memory_used_bytes"].as_u64().unwrap()
            + guest["memory_available_bytes"].as_u64().unwrap(),
        mem_total
    );
    // The guest's / is the VM's root disk (ext4 keeps some of it for metadata).
    let disk_total = guest["disk_total_bytes"].as_u64().unwrap();
    let disk_bytes = stats["disk_bytes"].as_u64().unwrap();
    assert!(
        disk_total <= disk_bytes && disk_total > disk_bytes / 2,
        "{stats}"
    );
    assert!(guest["disk_used_bytes"].as_u64().unwrap() > 0, "{guest}");
    assert!(
        guest["disk_available_bytes"].as_u64().unwrap()
            <= disk_total - guest["disk_used_bytes"].as_u64().unwrap(),
        "{guest}"
    );
    let prose = stdout(&install.banger(&["vm", "stats", "s1"]));
    let lines: Vec<&str> = prose.lines().collect();
    assert_eq!(lines.len(), 2, "{prose}");
    assert!(lines[0].starts_with("s1  running  vmm rss "), "{prose}");
    assert!(lines[1].starts_with("s1  guest cpu "), "{prose}");

    // Health: the agent answers, with its latency and protocol version.
    let (code, health) = json(&install, &["vm", "health", "s1"]);
    assert_eq!(code, Some(0), "{health}");
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["agent_version"], 4);
    assert_eq!(health["timeout_ms"], 5000);
    assert!(health["latency_ms"].as_f64().unwrap() > 0.0, "{health}");
    let prose = stdout(&install.banger(&["vm", "health", "s1"]));
    assert!(
        prose.starts_with("s1 healthy: agent answered in "),
        "{prose}"
    );
    assert!(prose.ends_with(" ms (protocol 4)\n"), "{prose}");

    // A frozen VMM (SIGSTOP: a real hang) does not answer: exit 1, naming the bound.
    let pid = json(&install, &["vm", "show", "s1"]).1["pid"]
        .as_i64()
        .unwrap() as i32;
    let pid = rustix::process::Pid::from_raw(pid).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::Stop).unwrap();
    let out = install.banger(&["vm", "health", "s1"]);
    rustix::process::kill_process(pid, rustix::process::Signal::Cont).unwrap();
    assert_exit(&out, 1);
    assert_eq!(
        stdout(&out),
        "s1 unresponsive: the agent of VM \"s1\" did not answer a ping within HEALTH_TIMEOUT (5s)\n"
    );
    let (code, health) = json(&install, &["vm", "health", "s1"]);
    assert_eq!(
        (code, &health["status"]),
        (Some(0), &Value::from("healthy"))
    );

    let out = install.banger(&["vm", "rm", "s1"]);
    assert_exit(&out, 0);
}
