//! The README's settings table against the binary's own `--help`: every setting the
//! node takes is a row, every row is a setting, and each default the table shows is
//! the one the node applies (a changed default must change the docs with it). The
//! shipped deployment files set only settings the binary knows.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::process::Command;

use sessionhub_tests::process::{node_binary, repo_root};

/// `SESSIONHUB_*` name → its default as `--help` prints it (None: no default).
fn help_defaults() -> BTreeMap<String, Option<String>> {
    // Without the environment: clap shows a set variable's value in its `[env: ...]`.
    let out = Command::new(node_binary())
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "sessionhub --help failed: {out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    let mut settings = BTreeMap::new();
    for (i, _) in help.match_indices("[env: ") {
        let rest = &help[i + "[env: ".len()..];
        // `[env: NAME=]`, or `[env: NAME]` for a secret (its value is hidden).
        let name = &rest[..rest.find(['=', ']']).unwrap()];
        // Clap prints `[default: x]` right after the env bracket when there is one.
        let after = &rest[rest.find(']').unwrap() + 1..];
        let default = after
            .strip_prefix(" [default: ")
            .map(|d| d[..d.find(']').unwrap()].to_string());
        settings.insert(name.to_string(), default);
    }
    settings
}

/// `SESSIONHUB_*` name → the default cell's value for it (a row may name several
/// settings, `A` / `B`, with as many defaults); None where the cell is not one
/// literal per setting in backticks (`unset`, prose such as "one per CPU").
fn readme_defaults() -> BTreeMap<String, Option<String>> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let table = readme
        .split("| variable | flag | default | meaning |")
        .nth(1)
        .expect("README has the settings table");
    let mut rows = BTreeMap::new();
    for line in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
        let names: Vec<&str> = cells[0]
            .split(" / ")
            .map(|n| n.trim().trim_matches('`'))
            .collect();
        let values: Vec<&str> = cells[2].split(" / ").map(str::trim).collect();
        let literal = values.len() == names.len()
            && values
                .iter()
                .all(|v| v.len() > 2 && v.starts_with('`') && v.ends_with('`'));
        for (k, name) in names.iter().enumerate() {
            let value = literal.then(|| values[k].trim_matches('`').to_string());
            assert!(
                rows.insert(name.to_string(), value).is_none(),
                "{name} has two rows in the README's settings table"
            );
        }
    }
    rows
}

#[test]
fn the_readme_settings_table_matches_the_binary() {
    let help = help_defaults();
    let readme = readme_defaults();
    let missing: Vec<_> = help.keys().filter(|k| !readme.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "settings missing from the README's table: {missing:?}"
    );
    let unknown: Vec<_> = readme.keys().filter(|k| !help.contains_key(*k)).collect();
    assert!(
        unknown.is_empty(),
        "README rows that are no setting: {unknown:?}"
    );
    let mut checked = 0;
    for (name, shown) in &readme {
        if let Some(shown) = shown {
            assert_eq!(
                help[name].as_ref(),
                Some(shown),
                "{name}: the README shows default `{shown}`, the binary applies {:?}",
                help[name]
            );
            checked += 1;
        }
    }
    // Most rows show a literal default; a parser that matched none would pass vacuously.
    assert!(
        checked >= 30,
        "only {checked} literal defaults found in the README's table"
    );
}

/// The settings a deployment file sets: `SESSIONHUB_X: value` (compose) and
/// `- name: SESSIONHUB_X` (Kubernetes), comments left out.
fn settings_set_in(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("- name: ").unwrap_or(l);
            let name = l.split(':').next()?.trim();
            (name.starts_with("SESSIONHUB_") && name.len() > "SESSIONHUB_".len())
                .then(|| name.to_string())
        })
        .collect()
}

/// A node refuses an unknown `SESSIONHUB_*` variable at start-up, so a misspelt or
/// retired setting in a shipped deployment file would stop every node it starts;
/// CI has no Docker or Kubernetes to find that out by running them.
#[test]
fn the_shipped_deployment_files_set_only_real_settings() {
    let help = help_defaults();
    for file in ["docker-compose.yml", "deploy/k8s/sessionhub.yaml"] {
        let set = settings_set_in(file);
        assert!(
            set.len() >= 3,
            "{file}: only {set:?} found; has its form changed?"
        );
        let unknown: Vec<_> = set.iter().filter(|n| !help.contains_key(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} sets what is no setting: {unknown:?}"
        );
    }
}

/// The compose file runs the demo (any visitor signs in as anyone) with a
/// placeholder API key: what it publishes must be reachable from this machine only,
/// and every long-running service comes back after a restart of Docker.
#[test]
fn the_compose_file_publishes_on_loopback_only_and_restarts_its_services() {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    let published: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("- \"") && l.matches(':').count() >= 1 && l.ends_with('"'))
        .filter(|l| {
            l.trim_start_matches("- \"")
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .collect();
    assert!(published.len() >= 3, "ports found: {published:?}");
    for p in &published {
        assert!(
            p.starts_with("- \"127.0.0.1:"),
            "published beyond loopback: {p}"
        );
    }
    for service in ["redis", "nginx"] {
        let block: String = text
            .split(&format!("\n  {service}:\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no service {service}"))
            .lines()
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            block.contains("restart: unless-stopped"),
            "{service} has no restart policy"
        );
    }
    assert!(
        text.contains("restart: unless-stopped\n  stop_grace_period"),
        "the nodes' restart policy"
    );
}
