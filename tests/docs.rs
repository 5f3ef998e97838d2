#![allow(clippy::unwrap_used)] // tests fail loudly by design

//! The shipped documentation matches the code: `.env.example` names every variable sluice
//! reads, in the sections `sluice serve --help` groups them in.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(std::fs::read_to_string(&p).unwrap());
        }
    }
}

#[test]
fn env_example_lists_every_variable() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
    let mut sources = Vec::new();
    rust_files(&root.join("src"), &mut sources);
    let mut missing = Vec::new();
    for src in &sources {
        for part in src.split("env = \"").skip(1) {
            let var = part.split('"').next().unwrap();
            if !example.contains(&format!("{var}=")) {
                missing.push(var.to_owned());
            }
        }
    }
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), ".env.example lacks: {missing:?}");
}

/// `.env.example` is laid out like `sluice serve --help`: each variable sits under the
/// section named as its flag's heading.
#[test]
fn env_example_sections_are_the_help_headings() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--help"])
        .env_clear()
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();

    // Heading of each variable in the help: headings are unindented lines ending in ':'.
    let mut heading = String::new();
    let mut in_help = Vec::new();
    for line in help.lines() {
        if let Some(h) = line.strip_suffix(':').filter(|_| !line.starts_with(' ')) {
            heading = h.to_owned();
        } else if let Some(rest) = line.trim().strip_prefix("[env: ") {
            let var = rest.split(['=', ']']).next().unwrap().to_owned();
            in_help.push((var, heading.clone()));
        }
    }
    assert!(in_help.len() >= 70, "{help}");

    let mut section = String::new();
    let mut wrong = Vec::new();
    for (var, heading) in &in_help {
        let mut found = None;
        for line in example.lines() {
            if let Some(title) = line.strip_prefix("# --- ") {
                section = title.trim_end_matches(['-', ' ']).to_owned();
            } else if line
                .trim_start_matches(['#', ' '])
                .starts_with(&format!("{var}="))
            {
                found = Some(section.clone());
                break;
            }
        }
        if found.as_deref() != Some(heading.as_str()) {
            wrong.push(format!("{var}: help {heading:?}, .env.example {found:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
