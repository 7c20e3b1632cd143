//! `mailgate.example.toml` is the configuration reference: every key at its built-in
//! default. These tests keep it so both ways: the file loads to exactly the defaults,
//! every key of the defaults is set in it (or, for a key with no value by default such as
//! a certificate path, shown in a commented example in its section), and it sets no key
//! the defaults lack.

use figment::providers::{Format, Toml};
use figment::Figment;
use mailgate::config::Config;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mailgate.example.toml")
}

/// The built-in defaults as a JSON tree (what `Serialized::defaults` hands figment).
fn defaults() -> Value {
    serde_json::to_value(Config::default()).expect("Config serializes")
}

/// The example file as written, without defaults or environment underneath.
fn example() -> Value {
    Figment::from(Toml::file_exact(example_path()))
        .extract()
        .expect("mailgate.example.toml is TOML")
}

/// Every leaf of `tree` with its dotted path: scalars, arrays, nulls and empty tables.
fn leaves<'a>(tree: &'a Value, prefix: &str, out: &mut Vec<(String, &'a Value)>) {
    match tree {
        Value::Object(map) if !map.is_empty() => {
            for (key, value) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(value, &path, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf)),
    }
}

fn lookup<'a>(tree: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(tree, |node, key| node.get(key))
}

/// Whether the text shows `path` as a commented example: `# key = ...` inside the
/// key's `[section]`, or a commented table header `# [path.NAME]` or `# [path]` for a
/// map.
fn shown_commented(text: &str, path: &str) -> bool {
    let (section, key) = path.rsplit_once('.').unwrap_or(("", path));
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = header.to_string();
            continue;
        }
        let Some(comment) = line.strip_prefix('#').map(str::trim_start) else {
            continue;
        };
        // A map of tables (`# [tls.domains."example.org"]`) or of values
        // (`# [cluster.peers]` with `# "name" = "value"` lines below).
        if comment.starts_with(&format!("[{path}.")) || comment == format!("[{path}]") {
            return true;
        }
        if current == section
            && comment
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return true;
        }
    }
    false
}

#[test]
fn the_example_loads_to_the_built_in_defaults() {
    let path = example_path();
    let from_file = Config::load(Some(path.as_path())).expect("the example loads and validates");
    let built_in = Config::load(None).expect("the defaults load");
    assert_eq!(
        from_file, built_in,
        "mailgate.example.toml must load to exactly the built-in defaults"
    );
}

#[test]
fn the_example_names_every_key_and_no_other() {
    let defaults = defaults();
    let example = example();
    let text = std::fs::read_to_string(example_path()).expect("read the example");
    let mut problems = Vec::new();

    let mut expected = Vec::new();
    leaves(&defaults, "", &mut expected);
    for (path, default) in &expected {
        let has_no_value = default.is_null() || default.as_object().is_some_and(|m| m.is_empty());
        match lookup(&example, path) {
            Some(_) if has_no_value => problems.push(format!(
                "{path} has no value by default: show it only as a commented example"
            )),
            None if has_no_value => {
                if !shown_commented(&text, path) {
                    problems.push(format!(
                        "{path} (no value by default) has no commented example in its section"
                    ));
                }
            }
            None => problems.push(format!("{path} is missing (default: {default})")),
            Some(value) if value != *default => {
                problems.push(format!("{path} is {value}, but its default is {default}"))
            }
            Some(_) => {}
        }
    }

    let mut written = Vec::new();
    leaves(&example, "", &mut written);
    for (path, _) in &written {
        if lookup(&defaults, path).is_none() {
            problems.push(format!("{path} is not a configuration key"));
        }
    }

    assert!(
        !expected.is_empty() && problems.is_empty(),
        "mailgate.example.toml has drifted from src/config.rs:\n  {}",
        problems.join("\n  ")
    );
}
