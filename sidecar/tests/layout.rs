//! The agent's module layout as `lib.rs` documents it: its list "Modules, lowest first" names
//! every top-level module, and a module reaches only modules above it in that list (so the
//! imports have no cycle); every module file opens with a `//!` comment saying what it owns.
//! Read from the source text: a reference is `crate::m` (also inside `crate::{…}`) or a
//! `super::` path that climbs out of the module, in code outside `#[cfg(test)]` modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with its module path (`spool/mod.rs` is `["spool"]`, the
/// crate root's files `[]`).
fn module_files(dir: &Path, prefix: &[String], out: &mut Vec<(Vec<String>, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src is readable")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .expect("a UTF-8 file name")
            .to_string();
        let mut module = prefix.to_vec();
        if path.is_dir() {
            module.push(name);
            module_files(&path, &module, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            // `mod.rs` is its directory's module; `lib.rs` and `main.rs` are the crate root.
            let root = prefix.is_empty() && matches!(name.as_str(), "lib" | "main");
            if name != "mod" && !root {
                module.push(name);
            }
            out.push((module, path));
        }
    }
}

/// The order `lib.rs` documents: its `//! - [`m`]: …` lines, lowest first.
fn documented_order() -> Vec<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    lib.lines()
        .filter_map(|line| line.strip_prefix("//! - [`"))
        .filter_map(|rest| rest.split_once("`]"))
        .map(|(name, _)| name.to_string())
        .collect()
}

/// The code of a file without its test modules: an inline `#[cfg(test)] mod … { … }` runs to
/// the end of the file by convention; files declared `#[cfg(test)] mod x;` are left out whole.
fn code(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => text,
    }
}

/// Names of modules declared `#[cfg(test)] mod name;` in `text`.
fn test_only_children(text: &str) -> Vec<String> {
    text.split("#[cfg(test)]\nmod ")
        .skip(1)
        .filter_map(|rest| rest.split_once(';'))
        .filter(|(name, _)| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Identifiers and the punctuation that matters for paths, in order.
fn tokens(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_alphanumeric() || c == '_' {
            let mut word = c.to_string();
            while let Some(&n) = chars
                .peek()
                .filter(|n| n.is_ascii_alphanumeric() || **n == '_')
            {
                word.push(n);
                chars.next();
            }
            out.push(word);
        } else if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            out.push("::".into());
        } else if matches!(c, '{' | '}' | ',' | ';') {
            out.push(c.to_string());
        }
    }
    out
}

/// Top-level modules that code in module `module` (a path) reaches.
fn references(module: &[String], code: &str) -> BTreeSet<String> {
    let toks = tokens(code);
    let mut found = BTreeSet::new();
    for (i, tok) in toks.iter().enumerate() {
        // `crate::` or a `super::` chain (only at its start, not in its middle).
        let mut at = if tok == "crate" {
            i
        } else if tok == "super" && (i == 0 || toks[i - 1] != "::") {
            let mut n = 0;
            while toks.get(i + 2 * n).is_some_and(|t| t == "super")
                && toks.get(i + 2 * n + 1).is_some_and(|t| t == "::")
            {
                n += 1;
            }
            if n < module.len() {
                continue; // stays inside this top-level module
            }
            i + 2 * n - 2 // the last `super`, followed by `::` and the name
        } else {
            continue;
        };
        if toks.get(at + 1).map(String::as_str) != Some("::") {
            continue;
        }
        at += 2;
        match toks.get(at).map(String::as_str) {
            Some("{") => {
                // Each entry of the group starts with a name: after `{` or a top-level `,`.
                let mut level = 0;
                let mut expect_name = true;
                for t in &toks[at..] {
                    match t.as_str() {
                        "{" => {
                            level += 1;
                            expect_name = level == 1;
                        }
                        "}" => {
                            level -= 1;
                            if level == 0 {
                                break;
                            }
                        }
                        "," => expect_name = level == 1,
                        name if expect_name && level == 1 && name != "::" => {
                            found.insert(name.to_string());
                            expect_name = false;
                        }
                        _ => {}
                    }
                }
            }
            Some(name) => {
                found.insert(name.to_string());
            }
            None => {}
        }
    }
    found
}

/// Edges between top-level modules: module → the modules its non-test code reaches.
fn imports(top_level: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    module_files(&src(), &[], &mut files);
    let test_only: BTreeSet<Vec<String>> = files
        .iter()
        .flat_map(|(module, path)| {
            let text = std::fs::read_to_string(path).expect("readable");
            test_only_children(&text)
                .into_iter()
                .map(|child| {
                    let mut m = module.clone();
                    m.push(child);
                    m
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let mut edges = BTreeMap::<String, BTreeSet<String>>::new();
    for (module, path) in &files {
        let Some(top) = module.first() else { continue }; // the crate root
        if test_only.contains(module) {
            continue;
        }
        let text = std::fs::read_to_string(path).expect("readable");
        let reached = references(module, code(&text));
        edges.entry(top.clone()).or_default().extend(
            reached
                .into_iter()
                .filter(|m| m != top && top_level.contains(m)),
        );
    }
    edges
}

#[test]
fn modules_reach_only_modules_above_them_in_the_documented_order() {
    let order = documented_order();
    let mut files = Vec::new();
    module_files(&src(), &[], &mut files);
    let top_level: BTreeSet<String> = files
        .iter()
        .filter_map(|(module, _)| module.first().cloned())
        .collect();
    assert_eq!(
        order.iter().cloned().collect::<BTreeSet<_>>(),
        top_level,
        "lib.rs's module list (\"Modules, lowest first\") must name every top-level module once"
    );
    assert_eq!(
        order.len(),
        top_level.len(),
        "a module listed twice: {order:?}"
    );
    let rank: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let edges = imports(&top_level);
    assert!(
        edges["delivery"].contains("spool"),
        "the reader sees delivery → spool: {edges:?}"
    );
    let upward: Vec<String> = edges
        .iter()
        .flat_map(|(from, tos)| tos.iter().map(move |to| (from, to)))
        .filter(|(from, to)| rank[to.as_str()] > rank[from.as_str()])
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(
        upward.is_empty(),
        "modules reaching modules listed below them in lib.rs: {upward:?}\nmove the shared part below both (docs/architecture.md, part nano-agent)"
    );
}

#[test]
fn every_module_file_says_what_it_owns() {
    let mut files = Vec::new();
    module_files(&src(), &[], &mut files);
    let silent: Vec<String> = files
        .iter()
        .filter(|(_, path)| {
            !std::fs::read_to_string(path)
                .expect("readable")
                .trim_start()
                .starts_with("//!")
        })
        .map(|(_, path)| path.display().to_string())
        .collect();
    assert!(
        silent.is_empty(),
        "module files that do not open with a //! comment saying what they own: {silent:?}"
    );
}

#[test]
fn the_reader_finds_references() {
    let m = |s: &str| vec![s.to_string()];
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        references(
            &m("control"),
            "use crate::{spool::{self, Spool}, metrics::Metrics};\nlet x = crate::health::f();"
        ),
        set(&["health", "metrics", "spool"])
    );
    // `super::` inside the module stays there; climbing out of it reaches the root.
    let deep = vec!["upstream".to_string(), "socketio".to_string()];
    assert_eq!(references(&deep, "use super::Upstream;"), set(&[]));
    assert_eq!(
        references(&deep, "use super::super::spool::Spool;"),
        set(&["spool"])
    );
    assert_eq!(
        test_only_children("mod a;\n#[cfg(test)]\nmod model_tests;\n"),
        vec!["model_tests".to_string()]
    );
}
