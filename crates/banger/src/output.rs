//! How every command prints: JSON (`--json`) or prose, from one place; and the two ways of
//! making a call (plain, or drawing its progress on a terminal).

use std::io::IsTerminal;

use anyhow::Context;
use banger_client::rpc::{CallError, Client};
use serde::Serialize;

use crate::progress;

/// Prints `value` as pretty JSON.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("encode result")?
    );
    Ok(())
}

/// Prints `value` as JSON when `json`, else as `prose` words it.
pub fn emit<T: Serialize>(json: bool, value: &T, prose: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        print_json(value)
    } else {
        prose(value);
        Ok(())
    }
}

/// Calls `M`.
pub fn call<M: banger_api::Method>(
    client: &mut Client,
    params: &M::Params,
) -> anyhow::Result<M::Result> {
    client.call::<M>(params).map_err(anyhow::Error::from)
}

/// Calls `M`, drawing its progress notifications as bars when stderr is a terminal and
/// the output is not JSON.
pub fn call_showing_progress<M: banger_api::Method>(
    client: &mut Client,
    params: &M::Params,
    json: bool,
) -> anyhow::Result<M::Result> {
    let mut bars = progress::Bars::new(!json && std::io::stderr().is_terminal());
    let result = client.call_with_progress::<M>(params, |p| bars.update(&p));
    bars.finish();
    result.map_err(anyhow::Error::from)
}

/// Prints a failure: on stderr always (with the error kind and op_id the daemon gave), and
/// as `{"error": …}` on stdout with `--json`.
pub fn report_error(error: &anyhow::Error, json: bool) {
    if let Some(CallError::Rpc(rpc)) = error.downcast_ref::<CallError>() {
        if json {
            println!("{}", serde_json::json!({ "error": rpc }));
        }
        eprintln!(
            "banger: {} [{}, {}]",
            rpc.message, rpc.data.kind, rpc.data.op_id
        );
    } else {
        if json {
            println!(
                "{}",
                serde_json::json!({ "error": { "message": format!("{error:#}") } })
            );
        }
        eprintln!("banger: {error:#}");
    }
}
