//! A directory of 20,000 subdirectories builds with the usual 1,024 descriptors: neither the
//! flattener nor the writer may hold a descriptor per directory (issue 15, item 3). In a test
//! binary of its own because it lowers the process's descriptor limit.

mod exact_support;

use exact_support::*;

#[test]
fn twenty_thousand_subdirectories_build_with_1024_descriptors() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(1024),
            maximum: limit.maximum,
        },
    )
    .unwrap();
    // The limit holds: a 1,100th descriptor cannot be had.
    let held: Vec<_> = (0..1100)
        .map_while(|_| std::fs::File::open("/dev/null").ok())
        .collect();
    assert!(held.len() < 1024, "descriptor limit not in force");
    drop(held);
    let mut es = vec![Ent::dir("wide/")];
    for i in 0..20_000 {
        es.push(Ent::dir(&format!("wide/d{i}/")));
    }
    es.push(ent("wide/d19999/leaf").data(b"leaf"));
    let blob = layer(&es);
    for privilege in modes() {
        let built = build(std::slice::from_ref(&blob), privilege)
            .unwrap_or_else(|e| panic!("{privilege:?}: {e}"));
        fsck(&built.image);
        let listing = debugfs(&built.image, "ls /wide");
        assert!(listing.matches(" d").count() >= 20_000, "{privilege:?}");
        assert!(debugfs(&built.image, "cat /wide/d19999/leaf").ends_with("leaf"));
    }
}
