#![allow(clippy::unwrap_used)] // tests fail loudly by design

//! Two one-way rules between modules, checked on the source text: `config` names no other
//! module of the crate, and `guard` knows nothing of HTTP (no axum, tower-http, `http`,
//! `error` or `app` modules). Only `crate::…` paths and external crate names in code are
//! seen, comments excluded; a `super::super::` escape or a re-export is not followed.

use std::path::{Path, PathBuf};

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

/// Each code line of every file under `src/<module>`, comments cut off, with its place.
fn code_lines(module: &str) -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(module);
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    assert!(!files.is_empty(), "no sources under {}", dir.display());
    let mut lines = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default().trim();
            if !code.is_empty() {
                lines.push((format!("{}:{}", file.display(), n + 1), code.to_owned()));
            }
        }
    }
    lines
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
