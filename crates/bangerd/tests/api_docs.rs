//! docs/api.md documents exactly the methods the dispatch table routes.

use bangerd::dispatch::Dispatch;

#[test]
fn docs_api_md_lists_exactly_the_dispatched_methods() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md"))
        .expect("read docs/api.md");
    let mut documented: Vec<&str> = docs
        .lines()
        .filter_map(|line| line.strip_prefix("### `")?.strip_suffix('`'))
        .collect();
    documented.sort();
    let routed = Dispatch::new().methods();
    assert_eq!(
        documented, routed,
        "docs/api.md and the dispatch table disagree: document new methods as ### `name`"
    );
}
