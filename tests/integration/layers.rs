//! The crate's layers run one way (`src/lib.rs` lists them): every `crate::` path in a
//! file under `src/` must name its own module or a module of a lower layer, and the
//! pure files (wire, the protocol codecs, the SMTP core and cluster hashing) touch no
//! I/O, runtime or store at all. Read from the source text, so a new import that breaks a rule fails
//! here before it becomes a cycle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module and its layer; a module may use only lower layers.
const LAYERS: &[(&str, u32)] = &[
    ("wire", 1),
    ("fsutil", 1),
    ("auth", 2),
    ("tls", 2),
    ("redis_conn", 2),
    ("config", 3),
    ("metrics", 4),
    ("net", 5),
    ("store", 5),
    ("locks", 5),
    ("throttle", 5),
    ("delivery", 6),
    ("provision", 6),
    ("migrate", 6),
    ("cluster", 7),
    ("pop3", 8),
    ("smtp", 8),
    ("admin", 8),
    ("server", 9),
    ("app", 10),
];

/// Sans-IO files: no sockets, runtime, logging, store or clock.
const PURE: &[&str] = &[
    "wire/",
    "pop3/codec/",
    "smtp/codec.rs",
    "smtp/core.rs",
    "cluster/hash.rs",
    "migrate/dovecot.rs",
    "migrate/frame.rs",
];
const IMPURE_WORDS: &[&str] = &[
    "tokio",
    "tracing",
    "crate::store",
    "crate::net",
    "std::net",
    "std::fs",
    "Instant::now",
    "SystemTime",
];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The top-level module a file under `src/` belongs to (`None` for lib.rs and main.rs).
fn module_of(relative: &str) -> Option<&str> {
    let first = relative.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then_some(name)
}

/// Source text without `//` comments, so prose naming a module is not an import.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module named by a `crate::` path: `crate::a::b`, and each name of a grouped
/// `crate::{a, b::c}`.
fn crate_refs(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        // `mailgate::crate::` never occurs; a preceding identifier char means another path.
        let preceded = rest[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !preceded {
            if let Some(group) = after.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.push(name);
                    }
                }
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        }
        rest = after;
    }
    out
}

/// The broken rules of the files given as (path under `src/`, text).
fn violations(files: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (path, text) in files {
        let code = code_of(text);
        if let Some(module) = module_of(path) {
            match layer(module) {
                None => out.push(format!("{path}: module {module} has no layer in LAYERS")),
                Some(own) => {
                    for used in crate_refs(&code) {
                        match layer(&used) {
                            _ if used == module => {}
                            None => out.push(format!("{path}: crate::{used} has no layer")),
                            Some(l) if l >= own => out.push(format!(
                                "{path}: {module} (layer {own}) uses crate::{used} (layer {l})"
                            )),
                            Some(_) => {}
                        }
                    }
                }
            }
        }
        if PURE.iter().any(|p| path.starts_with(p)) {
            for word in IMPURE_WORDS {
                if code.contains(word) {
                    out.push(format!("{path}: pure file uses {word}"));
                }
            }
        }
    }
    out
}

fn sources(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path: PathBuf = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path
                .strip_prefix(root)
                .expect("under src")
                .to_string_lossy()
                .into_owned();
            out.insert(relative, std::fs::read_to_string(&path).expect("read"));
        }
    }
}

#[test]
fn layers_run_one_way_and_pure_files_stay_pure() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    sources(&root, &root, &mut files);
    assert!(files.len() > 30, "found only {} source files", files.len());
    let broken = violations(&files);
    assert!(
        broken.is_empty(),
        "layer rules broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_checker_catches_what_it_must() {
    let files: BTreeMap<String, String> = [
        ("smtp/session.rs", "use crate::pop3::codec::LineReader;\n"),
        ("metrics/http.rs", "use crate::{config, server::Shared};\n"),
        (
            "config.rs",
            "let o = crate::store::StoreOptions::default();\n",
        ),
        (
            "delivery.rs",
            "// crate::smtp in a comment is fine\nuse crate::wire;\n",
        ),
        ("wire/line.rs", "use tokio::io::AsyncRead;\n"),
        ("pop3/login.rs", "use crate::net::Io;\n"),
        ("newthing.rs", "use crate::wire;\n"),
    ]
    .into_iter()
    .map(|(p, t)| (p.to_owned(), t.to_owned()))
    .collect();
    let broken = violations(&files);
    let expected = [
        "smtp/session.rs: smtp (layer 8) uses crate::pop3 (layer 8)",
        "metrics/http.rs: metrics (layer 4) uses crate::server (layer 9)",
        "config.rs: config (layer 3) uses crate::store (layer 5)",
        "wire/line.rs: pure file uses tokio",
        "newthing.rs: module newthing has no layer in LAYERS",
    ];
    for e in expected {
        assert!(
            broken.iter().any(|b| b == e),
            "{e} not reported: {broken:?}"
        );
    }
    assert_eq!(broken.len(), expected.len(), "{broken:?}");
}
