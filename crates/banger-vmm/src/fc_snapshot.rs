//! Firecracker's pause, resume and snapshot calls (`PATCH /vm`, `PUT /snapshot/create`,
//! `PUT /snapshot/load`), on a VM's API socket (see [`crate::firecracker::api_socket`]).
//!
//! A Firecracker snapshot is two files: the microVM state (devices, vCPUs) and the guest
//! memory. A load maps the memory file (`File` backend, private mapping): forks of one
//! snapshot share its pages until they write them.

use std::path::Path;

use serde_json::json;

use crate::error::Result;
use crate::firecracker::{api_socket, call_ok, ApiRequest};

/// `PATCH /vm {"state": "Paused"}`.
pub fn pause_request() -> ApiRequest {
    ApiRequest {
        method: "PATCH",
        path: "/vm".into(),
        body: json!({ "state": "Paused" }),
    }
}

/// `PATCH /vm {"state": "Resumed"}`.
pub fn resume_request() -> ApiRequest {
    ApiRequest {
        method: "PATCH",
        path: "/vm".into(),
        body: json!({ "state": "Resumed" }),
    }
}

/// `PUT /snapshot/create`: a full snapshot of a paused VM into `state` and `memory`.
pub fn create_request(state: &Path, memory: &Path) -> ApiRequest {
    ApiRequest {
        method: "PUT",
        path: "/snapshot/create".into(),
        body: json!({
            "snapshot_type": "Full",
            "snapshot_path": state,
            "mem_file_path": memory,
        }),
    }
}

/// `PUT /snapshot/load` into a fresh Firecracker (before any configuration call), its
/// memory mapped from `memory`; `resume` runs the vCPUs once loaded.
pub fn load_request(state: &Path, memory: &Path, resume: bool) -> ApiRequest {
    ApiRequest {
        method: "PUT",
        path: "/snapshot/load".into(),
        body: json!({
            "snapshot_path": state,
            "mem_backend": { "backend_type": "File", "backend_path": memory },
            "resume_vm": resume,
        }),
    }
}

/// Pauses the Firecracker VM whose run directory is `run_dir`.
pub fn pause(run_dir: &Path) -> Result<()> {
    call_ok(&api_socket(run_dir), &pause_request())
}

/// Resumes it.
pub fn resume(run_dir: &Path) -> Result<()> {
    call_ok(&api_socket(run_dir), &resume_request())
}

/// Snapshots the paused VM of `run_dir` into `state` and `memory`.
pub fn create(run_dir: &Path, state: &Path, memory: &Path) -> Result<()> {
    call_ok(&api_socket(run_dir), &create_request(state, memory))
}

/// Loads a snapshot into the not yet configured Firecracker of `run_dir`.
pub fn load(run_dir: &Path, state: &Path, memory: &Path, resume: bool) -> Result<()> {
    call_ok(&api_socket(run_dir), &load_request(state, memory, resume))
}
