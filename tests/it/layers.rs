#![allow(clippy::unwrap_used)] // tests fail loudly by design

//! The crate's modules point one way, checked on the source text: the graph of which
//! top-level module names which has no cycle and follows [`LAYERS`]; `domain` and `config`
//! name no other module; `guard` knows nothing of HTTP. Only `crate::…` paths and external
//! crate names in code are seen, comments and `#[cfg(test)]` modules excluded; a
//! `super::super::` escape or a re-export is not followed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules of `src/`, lowest first. A module names only modules of its own
/// layer or of layers below it (and the graph has no cycle even within a layer).
const LAYERS: &[&[&str]] = &[
    // Leaves: the chat domain types, settings, the hub's channels, the task queue.
    &["domain", "config", "hub", "queue"],
    // Subsystems: limiters, reply cache, storage, the cluster bus, metrics and health,
    // upstream providers, the client dialects (Responses, Messages).
    &[
        "guard", "cache", "store", "cluster", "ops", "upstream", "dialect",
    ],
    // Services: sessions and completions, prompt jobs.
    &["chat", "tasks"],
    // What the services' results become on the wire: the error type, SSE/WebSocket framing.
    &["error", "transport"],
    &["state"],
    &["http"],
    &["server"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Each code line of every file of `src/<module>` (a directory or `<module>.rs`), comments
/// and `#[cfg(test)] mod … { … }` blocks (and `tests.rs` files) cut off, with its place.
fn code_lines(module: &str) -> Vec<(String, String)> {
    let dir = src().join(module);
    let mut files = Vec::new();
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    } else {
        files.push(src().join(format!("{module}.rs")));
    }
    files.retain(|f| f.is_file() && !f.ends_with("tests.rs"));
    assert!(!files.is_empty(), "no sources for {module}");
    let mut lines = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // The closing line of a test module being skipped, and whether the last line was
        // `#[cfg(test)]`.
        let mut skip_to: Option<String> = None;
        let mut test_attr = false;
        for (n, line) in text.lines().enumerate() {
            if let Some(end) = &skip_to {
                if line == end {
                    skip_to = None;
                }
                continue;
            }
            let code = line.split("//").next().unwrap_or_default().trim();
            if test_attr && code.starts_with("mod ") && code.ends_with('{') {
                let indent = &line[..line.len() - line.trim_start().len()];
                skip_to = Some(format!("{indent}}}"));
                test_attr = false;
                continue;
            }
            test_attr = code == "#[cfg(test)]";
            if !code.is_empty() {
                lines.push((format!("{}:{}", file.display(), n + 1), code.to_owned()));
            }
        }
    }
    lines
}

/// The top-level modules of the library: each directory and file of `src/` but the crate
/// roots.
fn modules() -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(src()).unwrap().flatten() {
        let path = entry.path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let rust = path.is_dir() || path.extension().is_some_and(|e| e == "rs");
        if rust && name != "lib" && name != "main" {
            out.push(name);
        }
    }
    out.sort();
    out
}

/// Which top-level modules each one names, with the first place it does.
fn graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let mut graph = BTreeMap::new();
    for module in modules() {
        let mut uses = BTreeMap::new();
        for (at, code) in code_lines(&module) {
            for used in crate_modules(&code) {
                if used != module && !used.is_empty() {
                    uses.entry(used.to_owned()).or_insert_with(|| at.clone());
                }
            }
        }
        graph.insert(module, uses);
    }
    graph
}

/// A cycle of the graph as its modules in order (the first repeated at the end), if any.
fn find_cycle(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Option<Vec<String>> {
    fn visit<'a>(
        at: &'a str,
        graph: &'a BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|m| *m == at) {
            let mut cycle: Vec<String> = path[i..].iter().map(|m| (*m).to_owned()).collect();
            cycle.push(at.to_owned());
            return Some(cycle);
        }
        if !done.insert(at) {
            return None;
        }
        path.push(at);
        for next in graph.get(at).into_iter().flat_map(|uses| uses.keys()) {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = graph();
    // A scan that saw nothing would pass anything.
    assert!(
        graph["server"].contains_key("http"),
        "the scan sees no edges"
    );
    if let Some(cycle) = find_cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| format!("  {} -> {} ({})", w[0], w[1], graph[&w[0]][&w[1]]))
            .collect();
        panic!(
            "modules form a cycle: {}\n{}",
            cycle.join(" -> "),
            steps.join("\n")
        );
    }
}

#[test]
fn modules_name_only_their_layer_or_below() {
    let mut wrong = Vec::new();
    for (module, uses) in graph() {
        let Some(layer) = layer_of(&module) else {
            wrong.push(format!("{module} is in no layer of LAYERS"));
            continue;
        };
        for (used, at) in uses {
            match layer_of(&used) {
                Some(l) if l <= layer => {}
                Some(_) => wrong.push(format!("{at}: {module} names {used}, a layer above it")),
                None => wrong.push(format!("{at}: {module} names {used}, in no layer")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn domain_names_no_other_module() {
    let mut found = Vec::new();
    for (at, code) in code_lines("domain") {
        for module in crate_modules(&code) {
            if module != "domain" {
                found.push(format!("{at}: crate::{module}"));
            }
        }
        if code.contains("super::super::") {
            found.push(format!("{at}: super::super::"));
        }
    }
    assert!(
        found.is_empty(),
        "domain is not a leaf:\n{}",
        found.join("\n")
    );
}

#[test]
fn a_cycle_is_found_and_shown() {
    let edges = |pairs: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (a, b) in pairs {
            g.entry((*a).into())
                .or_default()
                .insert((*b).into(), String::new());
        }
        g
    };
    assert_eq!(
        find_cycle(&edges(&[("a", "b"), ("b", "c"), ("a", "c")])),
        None
    );
    assert_eq!(
        find_cycle(&edges(&[("a", "b"), ("b", "c"), ("c", "b")])).unwrap(),
        ["b", "c", "b"]
    );
}

#[test]
fn test_modules_are_not_scanned() {
    let lines = code_lines("domain");
    assert!(lines.iter().all(|(_, code)| !code.contains("mod tests")));
}

/// The crate modules a line names as `crate::<module>`.
fn crate_modules(code: &str) -> Vec<&str> {
    code.match_indices("crate::")
        // `sluice_crate::x` or `$crate::x` is not a path into this crate.
        .filter(|(i, _)| {
            code[..*i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '$'))
        })
        .map(|(i, m)| {
            let rest = &code[i + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn config_names_no_module_above_it() {
    let mut above = Vec::new();
    for (at, code) in code_lines("config") {
        for module in crate_modules(&code) {
            if module != "config" {
                above.push(format!("{at}: crate::{module}"));
            }
        }
        if code.contains("super::super::") {
            above.push(format!("{at}: super::super::"));
        }
    }
    assert!(
        above.is_empty(),
        "config reaches above itself:\n{}",
        above.join("\n")
    );
}

#[test]
fn guard_knows_nothing_of_http() {
    let mut found = Vec::new();
    for (at, code) in code_lines("guard") {
        for module in crate_modules(&code) {
            if matches!(module, "http" | "error" | "server" | "state") {
                found.push(format!("{at}: crate::{module}"));
            }
        }
        for name in ["axum", "tower_http", "ApiError", "IntoResponse"] {
            if code.contains(name) {
                found.push(format!("{at}: {name}"));
            }
        }
    }
    assert!(found.is_empty(), "guard speaks HTTP:\n{}", found.join("\n"));
}

#[test]
fn the_scan_sees_paths() {
    assert_eq!(
        crate_modules("use crate::http::auth; let x = crate::config::X;"),
        ["http", "config"]
    );
    assert!(crate_modules("$crate::x; sluice_crate::y").is_empty());
}
