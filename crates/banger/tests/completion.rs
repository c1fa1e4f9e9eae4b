//! `banger completion` covers every command, and the README's command table lists every
//! command: both checked against the commands `--help` itself shows.

mod support;

use support::{stdout, Install};

/// The subcommands `banger PATH… --help` lists (without `help`).
fn subcommands(install: &Install, path: &[&str]) -> Vec<String> {
    let mut args: Vec<&str> = path.to_vec();
    args.push("--help");
    let help = stdout(&install.banger(&args));
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// Every command path, depth first: `["vm"]`, `["vm", "run"]`, `["image", "cache", "prune"]`…
fn command_paths(install: &Install) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut todo: Vec<Vec<String>> = vec![Vec::new()];
    while let Some(path) = todo.pop() {
        let refs: Vec<&str> = path.iter().map(String::as_str).collect();
        for sub in subcommands(install, &refs) {
            let mut child = path.clone();
            child.push(sub);
            out.push(child.clone());
            todo.push(child);
        }
    }
    out.sort();
    out
}

#[test]
fn bash_completion_and_the_readme_cover_every_command() {
    let install = Install::new();
    let paths = command_paths(&install);
    // The verbs added last are there.
    for wanted in [&["vm", "health"][..], &["vm", "stats"], &["kernel", "pull"]] {
        assert!(
            paths.iter().any(|p| p == wanted),
            "{wanted:?} not among {paths:?}"
        );
    }
    let bash = stdout(&install.banger(&["completion", "bash"]));
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let table: Vec<&str> = readme
        .split("```")
        .skip(1)
        .step_by(2)
        .find(|block| block.contains("banger vm run"))
        .expect("the README's command block")
        .lines()
        .filter(|l| l.starts_with("banger "))
        .collect();
    for path in &paths {
        // clap_complete joins words, and the parts of a hyphenated one, with `__subcmd__`.
        let function = format!(
            "cmd=\"banger__subcmd__{}\"",
            path.join("__subcmd__").replace('-', "__subcmd__")
        );
        assert!(bash.contains(&function), "bash completion lacks {path:?}");
        // A README line for the parent, naming this command as a word.
        let (last, parent) = path.split_last().unwrap();
        let prefix = std::iter::once("banger")
            .chain(parent.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        let listed = table.iter().any(|line| {
            // The command part, not the comment after `#`.
            let command = line.split(" #").next().unwrap_or(line);
            command.strip_prefix(&prefix).is_some_and(|rest| {
                rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                    .any(|w| w == last)
            })
        });
        assert!(
            listed,
            "README's command table lacks `banger {}`",
            path.join(" ")
        );
    }
    for shell in ["zsh", "fish"] {
        let script = stdout(&install.banger(&["completion", shell]));
        assert!(
            script.contains("health") && script.contains("pull"),
            "{shell}"
        );
    }
}
