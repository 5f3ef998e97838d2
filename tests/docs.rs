#![allow(clippy::unwrap_used)] // tests fail loudly by design

//! The shipped documentation matches the code: `.env.example` names every variable sluice
//! reads.

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
